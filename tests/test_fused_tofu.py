"""impl="fused" mechanics: tiling across blocks/splits, gradient filtering both ways, backward.

The oracle grid shared with the chunked impl lives in test_linear_tofu.py.
"""

from __future__ import annotations

import pytest
import torch

from helpers import (
    LINEAR_GRAD_RTOL,
    LINEAR_LOSS_RTOL,
    linear_oracle,
    make_inputs,
    oracle,
    random_labels,
    rel_err,
    returns_of,
)
from tofu_kernels import fused_linear_tofu_loss
from tofu_kernels import fused_tofu as fused_mod


def compare(x, w, b, y, grads, ref, dtype):
    loss, gx, gw, gb = ref
    for got, want, name in ((grads[0], loss, "loss"), (grads[1], gx, "hidden"),
                            (grads[2], gw, "weight"), (grads[3], gb, "bias")):  # fmt: skip
        if got is None:
            continue
        tol = LINEAR_LOSS_RTOL[dtype] if name == "loss" else LINEAR_GRAD_RTOL[dtype]
        assert rel_err(got, want) < tol, (name, rel_err(got, want))


def run(x, w, b, y, train=(True, True, True), **kwargs):
    """[loss, grad_hidden, grad_weight, grad_bias] of impl="fused"; ``train``: which of (x, w, b)
    ask for their gradient (None for the others)."""
    leaves = [t.detach().clone().requires_grad_(r) if t is not None else None
              for t, r in zip((x, w, b), train, strict=True)]  # fmt: skip
    loss = fused_linear_tofu_loss(leaves[0], leaves[1], y, bias=leaves[2], impl="fused", **kwargs)
    loss.backward()
    return [loss.detach()] + [t.grad if t is not None else None for t in leaves]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_many_token_blocks_vocab_splits_and_k_steps(device, dtype):
    """N spans 3 token blocks (last one partial), V several tiles and splits, H two K steps
    (bf16; five in fp32, whose BLOCK_K is smaller)."""
    cfg = fused_mod.FWD_CONFIG
    n = 2 * cfg["BLOCK_N"] + 22
    h = cfg["BLOCK_K"] + 6
    v = 5 * cfg["BLOCK_V"] + 3
    x, w, b, y = make_inputs((n,), h, v, dtype, device, bias=True, ignored=0.3)
    grads = run(x, w, b, y, softcap=20.0, gamma=1.0, beta=0.5)
    ref = linear_oracle(x, w, y, bias=b, gamma=1.0, beta=0.5, softcap=20.0)
    compare(x, w, b, y, grads, ref, dtype)


@pytest.mark.parametrize("filter_eps", [0.0, None])
def test_gradient_filtering_within_tolerance(device, filter_eps):
    """Half the tokens confident (g ~ e^-90): filtering skips them and stays within tolerance."""
    x, w, _, y = make_inputs((90,), 48, 700, torch.bfloat16, device, ignored=0.0)
    confident = torch.arange(90, device=device) % 2 == 0
    # make the label the argmax by a wide margin on confident rows
    logits = x.float() @ w.float().T
    y = torch.where(confident, logits.argmin(1), y)  # any column; margin comes from the bias
    b = torch.zeros(700, device=device)
    b[y[confident]] = 40.0
    b = b.to(torch.bfloat16)
    grads = run(x, w, b, y, filter_eps=filter_eps)
    ref = linear_oracle(x, w, y, bias=b, gamma=3.0, beta=0.8)
    compare(x, w, b, y, grads, ref, torch.bfloat16)


def test_filtering_switch_is_live(device):
    """A threshold at the largest row weight drops everything: the switch really gates work."""
    x, w, _, y = make_inputs((20,), 48, 300, torch.float32, device, ignored=0.0)
    grads = run(x, w, None, y, filter_eps=1.0)
    assert (grads[1] == 0).all() and (grads[2] == 0).all()
    grads = run(x, w, None, y, filter_eps=0.0)
    assert (grads[1] != 0).any()


def test_backward_twice_accumulates(device):
    """Nothing is consumed in backward: a retained graph gives the same gradient twice."""
    x, w, _, y = make_inputs((20,), 48, 300, torch.float32, device)
    x.requires_grad_(True)
    loss = fused_linear_tofu_loss(x, w, y, impl="fused")
    loss.backward(retain_graph=True)
    first = x.grad.clone()
    loss.backward()
    assert rel_err(x.grad, 2 * first) < 1e-6
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(fused_linear_tofu_loss(x, w, y, impl="fused"), x, create_graph=True)


def test_frozen_weight_and_no_grad_skip_work(device, monkeypatch):
    calls = []
    real = fused_mod.fused_tofu_bwd

    def spy(*args, **kwargs):
        calls.append(args[7])  # needs
        return real(*args, **kwargs)

    monkeypatch.setattr(fused_mod, "fused_tofu_bwd", spy)
    x, w, b, y = make_inputs((20,), 48, 300, torch.float32, device, bias=True)
    x.requires_grad_(True)
    fused_linear_tofu_loss(x, w, y, bias=b, impl="fused").backward()
    assert w.grad is None and b.grad is None
    with torch.no_grad():
        fused_linear_tofu_loss(x, w, y, bias=b, impl="fused")
    assert calls == [(True, False, False)]


def test_out_of_range_label_gives_nan_not_oob(device):
    x, w, _, _ = make_inputs((4,), 48, 300, torch.float32, device)
    y = torch.tensor([1, 300, -7, 2], device=device)
    params = fused_mod.TOFUParams()
    loss, _, rowterms = fused_mod.fused_tofu_fwd(x, w, y, None, params)
    assert torch.isnan(loss[1:3]).all() and torch.isfinite(loss[[0, 3]]).all()
    assert (rowterms[1:, 1:3] == 0).all()  # no gradient from them


def test_all_rows_ignored(device):
    x, w, _, _ = make_inputs((20,), 48, 300, torch.bfloat16, device)
    y = random_labels((20,), 300, device, ignored=1.0)
    grads = run(x, w, None, y)
    assert grads[0].item() == 0 and (grads[1] == 0).all() and (grads[2] == 0).all()


def test_filtering_drops_exactly_the_small_rows(device):
    """Rows whose largest entry g (1 - q_y) |scale| is under the threshold add exactly nothing;
    the others are exact, because every tile they share a block with has entries above it."""
    x, w, b, y = make_inputs((40,), 48, 300, torch.float32, device, bias=True, ignored=0.0)
    confident = torch.arange(40, device=device) % 2 == 0
    x[confident] = 2.5 * w[y[confident]]  # the target's own direction: a margin of ~20 logits
    params = fused_mod.TOFUParams()
    _, _, rowterms = fused_mod.fused_tofu_fwd(x, w, y, b, params)
    scale = torch.ones(1, device=device)
    top = rowterms[2].abs()  # g (1 - q_y): the target entry, a row's largest
    eps = 1e-6
    light = top <= eps * top.max()
    assert light.any() and (~light).any() and (top[light] > 0).any()  # light, not exactly zero
    needs = (True, True, False)
    exact = fused_mod.fused_tofu_bwd(x, w, y, b, rowterms, scale, params, needs, 0.0)[0]
    kept = fused_mod.fused_tofu_bwd(x, w, y, b, rowterms, scale, params, needs, eps)[0]
    assert (kept[light] == 0).all() and (exact[light] != 0).any()
    torch.testing.assert_close(kept[~light], exact[~light], rtol=1e-6, atol=0)


# bf16 and fp16 (filtering's default is on for both; fp16 also scales by the same bound)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_filtering_of_a_batch_confident_under_the_tempered_softmax(device, dtype):
    """Every token's target leads by 8 logits (1 - p ~ 3e-4), and beta = 0.5 squares that for
    the tempered softmax q (1 - q_y ~ 1e-7): every gradient entry is under 2^-12 of the focal
    weight g = 1 (gamma 0), which filtering took as its reference and so dropped the whole
    gradient. It now filters against the largest entry, g (1 - q_y) |scale|."""
    n, vocab, hidden = 64, 512, 16
    codes = torch.randperm(2**hidden, device=device)[:vocab]  # distinct +-1 weight rows
    w = (((codes[:, None] >> torch.arange(hidden, device=device)) & 1) * 2 - 1).to(dtype)
    y = torch.randint(0, vocab, (n,), device=device)
    x = w[y] * 4  # logits: 64 for the target, at most 56 for any other row
    go = torch.tensor(2.0**16 if dtype == torch.float16 else 1.0, device=device)
    leaves = [t.clone().requires_grad_(True) for t in (x, w)]
    loss = fused_linear_tofu_loss(*leaves, y, gamma=0.0, beta=0.5, impl="fused")
    loss.backward(go)
    ref = linear_oracle(x, w, y, gamma=0.0, beta=0.5, grad_output=go)
    assert ref[1].abs().max() > 2 * torch.finfo(dtype).tiny  # in the dtype's normal range
    compare(x, w, None, y, [loss.detach(), *(t.grad for t in leaves), None], ref, dtype)


# bf16 and fp16 (filtering's default is on for both); fp16 with an upstream gradient that puts
# the gradients in its normal range
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_filtering_where_softcap_saturates_every_large_logit(device, dtype):
    """Forty of 53 weight rows give every token a logit of 220-245, over 7 softcaps (30) deep,
    the other rows ~0: the tempered softmax's mass sits on the forty, whose gradient entries
    softcap's derivative (under 2e-6) shrinks under 2^-12 / V of g (1 - q_y), and those of the
    other rows are ~e^-37 of it. Filtering took that bound as its reference and dropped the
    whole gradient; it now takes entries of the gradient, softcap's factor included."""
    n, vocab, hidden, cluster = 48, 53, 8, 40
    w = torch.randn(vocab, hidden, device=device) * 0.3
    w[:, 0] = 0
    w[:cluster, 0] = 1 + 0.1 * torch.rand(cluster, device=device)
    x = torch.randn(n, hidden, device=device) * 0.3
    x[:, 0] = 220.0
    x, w = x.to(dtype), w.to(dtype)
    y = torch.randint(0, cluster, (n,), device=device)
    go = torch.tensor(2.0**20 if dtype == torch.float16 else 1.0, device=device)
    opts = dict(gamma=3.0, beta=0.8, softcap=30.0)
    leaves = [t.clone().requires_grad_(True) for t in (x, w)]
    loss = fused_linear_tofu_loss(*leaves, y, impl="fused", **opts)
    loss.backward(go)
    ref = linear_oracle(x, w, y, grad_output=go, **opts)
    assert ref[1].abs().max() > 2**6 * torch.finfo(dtype).tiny  # in the dtype's normal range
    compare(x, w, None, y, [loss.detach(), *(t.grad for t in leaves), None], ref, dtype)


# without softcap, and with one whose factors range from 1 to ~1e-9 (logits up to ~14 softcaps;
# targets 4-6 softcaps below 0 in a third of the rows)
@pytest.mark.parametrize("softcap", [None, 4.0])
def test_filtering_reference_entries_are_the_gradients(device, softcap):
    """Row 3 of the per-row terms: each row's |target entry| of the float64 gradient on the
    pre-cap logits, and with softcap the larger of it and the row max column's entry (the
    largest entry without softcap); 0 for ignored rows."""
    x, w, b, y = make_inputs((300,), 16, 301, torch.float32, device, bias=True, ignored=0.2)
    w_y = w[y.clamp(min=0)]
    x[::3] = 2.0 * w_y[::3]  # confident rows: the target also the row max
    x[1::3] = -2.0 * w_y[1::3]  # targets deep in negative saturation: a smaller factor than
    # the row max column's, whose entry is then the larger
    _, _, rowterms = fused_mod.fused_tofu_fwd(x, w, y, b, fused_mod.TOFUParams(softcap=softcap))
    z = x.double() @ w.double().T + b.double()
    grad = oracle(z, y, gamma=3.0, beta=0.8, softcap=softcap, reduction="sum",
                  grad_output=torch.ones((), device=device))[1]  # fmt: skip
    valid = y != -100
    rows = torch.arange(len(y), device=device)[valid]
    target = grad[rows, y[valid]].abs()
    want = torch.zeros(len(y), dtype=torch.float64, device=device)
    want[valid] = target
    if softcap is not None:
        top = z.argmax(1)[valid]
        other = torch.where(top != y[valid], grad[rows, top].abs(), 0.0)
        want[valid] = torch.maximum(target, other)
        assert (other > target).any()  # where the other column is the larger
    else:
        assert torch.equal(want, grad.abs().max(1).values)  # the target's is the largest
    assert (rowterms[3][~valid] == 0).all()
    # softcap's factor is formed from fp32 capped logits: ~5e-7 off, times the entry's bound
    # g (1 - q_y) before the factor; confident rows' entries can be fp32 subnormals or zeros
    err = (rowterms[3].double() - want).abs()
    tol = 1e-4 * want + 1e-6 * rowterms[2].abs().double() + torch.finfo(torch.float32).tiny
    assert (err <= tol).all(), (err - tol).max()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_grad_hidden_in_token_slabs(device, dtype, monkeypatch):
    """grad_hidden sums in fp32 one token slab at a time (in place for fp32): slabs of two token
    blocks over 3.3 blocks, a per-row upstream gradient (reduction="none"), ignored rows."""
    block_n = fused_mod.BWD_CONFIG["BLOCK_N"]
    monkeypatch.setattr(fused_mod, "GX_SLAB_ELEMS", 2 * block_n * 40)
    x, w, b, y = make_inputs((3 * block_n + 20,), 40, 300, dtype, device, bias=True)
    leaves = [t.detach().clone().requires_grad_(True) for t in (x, w, b)]
    loss = fused_linear_tofu_loss(*leaves[:2], y, bias=leaves[2], reduction="none", impl="fused")
    go = torch.randn_like(loss)
    loss.backward(go)
    ref = linear_oracle(x, w, y, bias=b, gamma=3.0, beta=0.8, reduction="none", grad_output=go)
    compare(x, w, b, y, [loss.detach()] + [t.grad for t in leaves], ref, dtype)


def test_native_accumulation_allocates_no_weight_sized_fp32_buffer(device, monkeypatch):
    """accum_dtype=None: grad_weight is summed by atomics into the fp16 gradient itself."""
    big = []
    real_zeros = torch.zeros

    def spy(*size, dtype=None, **kwargs):
        if tuple(size) == (300, 40):
            big.append(dtype)
        return real_zeros(*size, dtype=dtype, **kwargs)

    monkeypatch.setattr(fused_mod.torch, "zeros", spy)
    x, w, _, y = make_inputs((30,), 40, 300, torch.float16, device)
    w.requires_grad_(True)
    for accum_dtype in (torch.float32, None):
        fused_linear_tofu_loss(x, w, y, impl="fused", accum_dtype=accum_dtype).backward()
    assert big == [torch.float32, torch.float16]


def test_split_and_slab_alignment_fit_every_config():
    configs = [*fused_mod.FWD_CONFIGS.values(), *fused_mod.TUNE_FWD]
    assert all(fused_mod.SPLIT_ALIGN % c["BLOCK_V"] == 0 for c in configs)
    configs = [*fused_mod.BWD_CONFIGS.values(), *fused_mod.TUNE_BWD]
    assert all(fused_mod.ROW_ALIGN % c["BLOCK_N"] == 0 for c in configs)


@pytest.mark.parametrize(
    "accum_dtype,bias,frozen", [(None, True, False), (torch.float32, True, False),
                                (torch.float32, False, True)],
)  # fmt: skip
def test_opt_in_autotuning(device, monkeypatch, accum_dtype, bias, frozen):
    """TOFU_AUTOTUNE=1 runs every candidate config once per kernel (the accumulators are zeroed
    between timed runs, or the gradients would count them), then the best one. The interpreter's
    timings mean nothing; the path and the results are what is tested."""
    timed = []
    real_bench = fused_mod._wall_clock_bench
    monkeypatch.setattr(fused_mod, "_wall_clock_bench", lambda fn, **kw: timed.append(fn) or
                        real_bench(fn, **kw))  # fmt: skip
    monkeypatch.setenv("TOFU_AUTOTUNE", "1")
    fused_mod._tuned.cache_clear()
    x, w, b, y = make_inputs((70,), 40, 300, torch.float16, device, bias=bias)
    ref = linear_oracle(x, w, y, bias=b, gamma=3.0, beta=0.8)
    for _ in range(2):  # tunes, then reuses the choice
        if frozen:  # gradients not asked for: their stand-ins are zeroed too, nothing else is
            xg = x.detach().clone().requires_grad_(True)
            loss = fused_linear_tofu_loss(xg, w, y, impl="fused", accum_dtype=accum_dtype)
            loss.backward()
            grads = [loss.detach(), xg.grad, None, None]
        else:
            grads = run(x, w, b, y, accum_dtype=accum_dtype)
        compare(x, w, b, y, grads, ref, torch.float16)
    assert fused_mod._tuned.cache_info().currsize == 2  # the forward and backward kernels
    if device == "cpu":  # on a GPU, triton's own timer
        assert len(timed) == len(fused_mod.TUNE_FWD) + len(fused_mod.TUNE_BWD)
    fused_mod._tuned.cache_clear()


def test_split_count_for_an_empty_batch(monkeypatch):
    """N = 0 on a GPU: no token blocks, still one split (was a division by zero)."""

    class Props:
        multi_processor_count = 132

    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: Props())
    assert fused_mod._n_splits(0, 501, torch.device("cuda")) >= 1
    # a group of GROUP_ROWS tokens (32 blocks of 64) over ~2 programs per SM: 9 splits
    assert fused_mod._n_splits(32, 501, torch.device("cuda")) == 9


def test_launch_config_per_capability():
    """An exact (major, minor) key, else the major's entry: 99 KiB cards (8.6, 8.9, every 12.x)
    take the small-shared-memory configs (tests/compile_kernels.py checks they fit)."""
    bf16 = torch.bfloat16
    small_fwd = fused_mod.fused_config(fused_mod.FWD_CONFIGS, (8, 0), bf16)
    small_bwd = fused_mod.fused_config(fused_mod.BWD_CONFIGS, (8, 6), bf16)
    for capability in [(8, 6), (8, 9), (12, 0), (12, 1)]:
        assert fused_mod.fused_config(fused_mod.FWD_CONFIGS, capability, bf16) == small_fwd
        assert fused_mod.fused_config(fused_mod.BWD_CONFIGS, capability, bf16) == small_bwd
    assert small_bwd["num_stages"] == 2
    hopper = fused_mod.fused_config(fused_mod.FWD_CONFIGS, (9, 0), bf16)
    assert hopper["BLOCK_V"] == 256  # the fastest timed on an H100
    assert fused_mod.fused_config(fused_mod.FWD_CONFIGS, (10, 0), bf16) == hopper
    # fp32 inputs: half the BLOCK_K, or an entry's own FP32 overrides (where ptxas otherwise
    # gives up on registers: tests/compile_kernels.py), never the "FP32" key itself
    fp32 = {cap: fused_mod.fused_config(fused_mod.BWD_CONFIGS, cap, torch.float32)
            for cap in [(8, 0), (8, 6), (9, 0)]}  # fmt: skip
    assert fp32[(8, 0)] == {**fused_mod.fused_config(fused_mod.BWD_CONFIGS, (8, 0), bf16),
                            "BLOCK_K": 32}  # fmt: skip
    assert fp32[(8, 6)] == {**small_bwd, "BLOCK_K": 16, "num_warps": 4}
    hopper_bwd = fused_mod.fused_config(fused_mod.BWD_CONFIGS, (9, 0), bf16)
    assert fp32[(9, 0)] == {**hopper_bwd, "BLOCK_K": 16, "num_stages": 2}
    assert not any("FP32" in c for c in [*fp32.values(), small_bwd, hopper_bwd])


# every key of the tables, a minor version without one, and a major above them
@pytest.mark.parametrize("capability", [(8, 0), (8, 6), (8, 9), (9, 0), (10, 0), (12, 0), (12, 1)])
def test_forward_and_backward_sum_over_the_same_k_blocks(capability):
    """The backward recomputes the forward's logits: with the same BLOCK_K it sums their
    products in the same blocks (the interpreter sums a block, then adds it)."""
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        fwd = fused_mod.fused_config(fused_mod.FWD_CONFIGS, capability, dtype)
        bwd = fused_mod.fused_config(fused_mod.BWD_CONFIGS, capability, dtype)
        assert fwd["BLOCK_K"] == bwd["BLOCK_K"], dtype


def test_fp32_recomputed_logits_match_the_forward(device):
    """fp32 logits ~100 apart at beta 0.3 (exp(z / beta) spans ~e^330): a recomputed logit one
    rounding away from the forward's moves its softmax entry by ~1e-5 relative, and each row's
    largest entry no longer cancels against its target's (from the forward's sums). With the
    backward's BLOCK_K 16 and the forward's 32 the interpreter's gradients were 2e-5 off."""
    x = torch.randn(40, 100, device=device)
    w = torch.randn(300, 100, device=device) * 3.0
    y = torch.randint(0, 300, (40,), device=device)
    assert (x @ w.T).abs().max() > 60
    grads = run(x, w, None, y, gamma=1.0, beta=0.3)
    ref = linear_oracle(x, w, y, gamma=1.0, beta=0.3)
    compare(x, w, None, y, grads, ref, torch.float32)


@pytest.mark.parametrize("group_n", [1, 2])
def test_grouped_program_order(device, monkeypatch, group_n):
    """Groups of 1 and 2 token blocks over 2.3 blocks (a short last group), with 2 splits in
    the forward and 3 vocabulary tiles in the backward: every (block, column) pair exactly once."""
    for table in (fused_mod.FWD_CONFIGS, fused_mod.BWD_CONFIGS):
        monkeypatch.setitem(table, 9, {**table[9], "BLOCK_N": 64, "GROUP_N": group_n})
    x, w, b, y = make_inputs((2 * 64 + 20,), 40, 300, torch.float16, device, bias=True)
    grads = run(x, w, b, y, softcap=20.0)
    ref = linear_oracle(x, w, y, bias=b, gamma=3.0, beta=0.8, softcap=20.0)
    compare(x, w, b, y, grads, ref, torch.float16)


# every dtype with both gradients; one gradient alone (the other's descriptor is None) in fp16
# and bf16 (whose bf16 grad_weight the interpreter sums in fp32)
@pytest.mark.parametrize(
    "dtype,accum_dtype,grads",
    [(torch.float32, torch.float32, "both"), (torch.bfloat16, torch.float32, "both"),
     (torch.float16, None, "both"), (torch.float16, None, "hidden"),
     (torch.bfloat16, None, "weight")],
)  # fmt: skip
def test_bulk_reduce_adds_what_the_atomics_add(device, monkeypatch, dtype, accum_dtype, grads):
    """TMA_REDUCE: whole-tile bulk adds give the atomics' gradients (bit for bit on CPU, where
    both add in program order) at the right tiles, over a partial last token block, vocabulary
    tile and K step (whose out-of-range entries the kernel makes zeros), two grad_hidden token
    slabs in half precision, bias, softcap, ignored rows."""
    h = 72  # rows of 16-byte multiples in fp32 and fp16; 2 (bf16/fp16) or 5 (fp32) K steps
    x, w, b, y = make_inputs((300,), h, 300, dtype, device, bias=True)
    monkeypatch.setattr(fused_mod, "GX_SLAB_ELEMS", 1)  # slabs of ROW_ALIGN = 256 rows
    train = {"both": (True,) * 3, "hidden": (True, False, False), "weight": (False, True, True)}
    kwargs = dict(train=train[grads], softcap=20.0, gamma=2.0, beta=0.7, accum_dtype=accum_dtype)
    atomics = run(x, w, b, y, **kwargs)
    boxes = returns_of(monkeypatch, fused_mod, "_reduce_descriptors")
    monkeypatch.setitem(fused_mod.BWD_CONFIGS, 9, {**fused_mod.BWD_CONFIGS[9], "TMA_REDUCE": True})
    bulk = run(x, w, b, y, **kwargs)
    ref = linear_oracle(x, w, y, bias=b, gamma=2.0, beta=0.7, softcap=20.0)
    compare(x, w, b, y, bulk, ref, dtype)
    if device == "cpu":
        slabs = 2 if dtype != torch.float32 and grads != "weight" else 1
        asked = {"both": [True, True], "hidden": [True, False], "weight": [False, True]}[grads]
        assert [[d is not None for d in pair] for pair in boxes] == [asked] * slabs
        for got, want in zip(bulk, atomics, strict=True):
            assert (got is None and want is None) or torch.equal(got, want)
    assert not fused_mod.bulk_reduce_ok(torch.device(device), 36, torch.bfloat16)  # 72-byte rows


def test_tile_filtering_keeps_many_small_entries(device):
    """A nearly flat softmax over 8192 columns: every non-target entry (~g / V) is under
    2^-12 * g, yet together they make grad_hidden. The rows share a common direction c in the
    weight (W_v = c + noise), so skipping them leaves ~-c in place of the exact gradient."""
    h, v = 32, 8192
    c = torch.randn(h, device=device)
    w = (c[None, :] + 0.5 * torch.randn(v, h, device=device)).to(torch.bfloat16)
    x = (0.05 * torch.randn(6, h, device=device)).to(torch.bfloat16)
    y = torch.randint(0, v, (6,), device=device)
    grads = run(x, w, None, y)  # default filter_eps for bf16
    ref = linear_oracle(x, w, y, gamma=3.0, beta=0.8)
    compare(x, w, None, y, grads, ref, torch.bfloat16)
