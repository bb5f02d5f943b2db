"""fused_linear_tofu_loss (chunked LM head + TOFU kernel) against the float64 oracle.

Shapes are small and odd on purpose: H and V not multiples of anything, chunk sizes that leave a
short last chunk, a handful of tokens (the TOFU kernel runs interpreted, one program per row).
"""

from __future__ import annotations

import gc
import inspect
import itertools
import json
import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
import torch.nn.functional as F

from helpers import (
    LINEAR_GRAD_RTOL,
    LINEAR_LOSS_RTOL,
    linear_oracle,
    make_inputs,
    random_labels,
    rel_err,
    returns_of,
    shared_direction_head,
    tied_head,
)
from tofu_kernels import FusedLinearTOFULoss, fused_linear_tofu_loss, tofu_loss
from tofu_kernels import fused_tofu as fused_mod
from tofu_kernels import linear_tofu as linear_mod
from tofu_kernels import vocab_chunked as vc_mod
from tofu_kernels.reference import tofu_rows

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# The two kernel impls share the oracle tests; each also has tests of its own mechanics.
KERNEL_IMPLS = ["chunked", "vocab_chunked", "fused"]


def run_and_compare(x, w, b, y, *, dtype=None, grad_output=True, **kwargs):
    """Forward + backward (random upstream gradient) against the oracle; returns the loss."""
    dtype = dtype or x.dtype
    if kwargs.get("impl") == "vocab_chunked" and "chunk_size" in kwargs:
        # its chunks are vocabulary columns: three chunks of V = 301, the last one short
        kwargs["chunk_size"] = 128
    leaves = [t for t in (x, w, b) if t is not None and t.requires_grad]
    loss = fused_linear_tofu_loss(x, w, y, bias=b, **kwargs)
    go = torch.randn_like(loss) if grad_output else torch.ones_like(loss)
    if leaves:
        loss.backward(go)
    skip = ("chunk_size", "impl", "accum_dtype", "drop_ignored")
    oracle_kwargs = {k: v for k, v in kwargs.items() if k not in skip}
    oracle_kwargs.setdefault("gamma", 3.0)
    oracle_kwargs.setdefault("beta", 0.8)
    ref_loss, gx, gw, gb = linear_oracle(x, w, y, bias=b, grad_output=go, **oracle_kwargs)
    assert loss.shape == ref_loss.shape and torch.isfinite(loss).all()
    assert rel_err(loss, ref_loss) < LINEAR_LOSS_RTOL[dtype], rel_err(loss, ref_loss)
    for t, ref, name in ((x, gx, "hidden"), (w, gw, "weight"), (b, gb, "bias")):
        if t is None or not t.requires_grad:
            continue
        assert t.grad.dtype == t.dtype and t.grad.shape == t.shape, name
        err = rel_err(t.grad, ref)
        assert err < LINEAR_GRAD_RTOL[dtype], f"grad_{name}: {err}"
    return loss


# Every dtype with every reduction (the chunk buffer, in-place gradient and GEMMs are what dtype
# changes; "none" takes the recompute-in-backward path); ignored fraction and bias cycle through
# the cases. Options that interact less are tested one at a time below, in fp32 and bf16.
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("impl", KERNEL_IMPLS)
def test_oracle_dtype_reduction(device, dtype, reduction, impl):
    i = DTYPES.index(dtype) + ["mean", "sum", "none"].index(reduction)
    x, w, b, y = make_inputs(
        (23,), 37, 301, dtype, device, bias=i % 2 == 0, ignored=[0, 0.3][i % 2]
    )
    for t in (x, w, b):
        if t is not None:
            t.requires_grad_(True)
    run_and_compare(x, w, b, y, reduction=reduction, chunk_size=8, impl=impl)


@pytest.mark.parametrize("ignored", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("impl", KERNEL_IMPLS)
def test_oracle_ignored_rows(device, ignored, impl):
    x, w, _, y = make_inputs((2, 9), 37, 301, torch.float32, device, ignored=ignored)
    x.requires_grad_(True), w.requires_grad_(True)
    loss = run_and_compare(x, w, None, y, chunk_size=5, impl=impl)
    if ignored == 1.0:
        assert loss.item() == 0 and (x.grad == 0).all() and (w.grad == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("impl", KERNEL_IMPLS)
def test_oracle_softcap_gamma_beta(device, dtype, impl):
    x, w, b, y = make_inputs((17,), 37, 301, dtype, device, bias=True)
    for t in (x, w, b):
        t.requires_grad_(True)
    run_and_compare(x, w, b, y, softcap=5.0, gamma=0.5, beta=1.5, chunk_size=6, impl=impl)


# Logits deep in the softcap's saturation (z / softcap in about [4, 10]: every derivative 1 -
# tanh^2 under 1e-3). The derivative written as 1 - (capped / softcap)^2 cancels there: the
# gradients were 3.6e-3 off (5.7e-4 for the torch impl); from the raw logit, 1e-7.
@pytest.mark.parametrize("impl", [*KERNEL_IMPLS, "torch"])
def test_oracle_softcap_saturated(device, impl):
    cap = 5.0
    x, w, _, y = make_inputs((9,), 16, 301, torch.float32, device, ignored=0.2)
    w = (w * (0.75 * cap / 4 / w.std())).requires_grad_(True)  # x @ w.T about 0.75 cap wide
    b = torch.full((301,), 7 * cap, device=device, requires_grad=True)
    x.requires_grad_(True)
    run_and_compare(x, w, b, y, softcap=cap, chunk_size=4, impl=impl)


# Finite fp32 logits at the ends of the range, x = 0 so that logits = bias exactly: a row whose
# every logit is below -1e30 (the fused kernels' running max started there: loss 0, p 1, no
# gradient), and logits 3e38 apart (z - max overflows: the entropy was NaN, 0 * -inf; per token,
# as the losses of ~2.4e38 would overflow their sum).
EXTREME_BIAS = {
    "below_-1e30": lambda v: torch.full((v,), -2e31).index_fill_(
        0, torch.tensor([7, 9, 11]), -1.5e31
    ),
    "3e38_apart": lambda v: (
        torch.randn(v)
        .index_fill_(0, torch.tensor([0]), 3e38)
        .index_fill_(0, torch.tensor([1, 5]), -3e38)
    ),
}


@pytest.mark.parametrize("extreme", sorted(EXTREME_BIAS))
@pytest.mark.parametrize("impl", [*KERNEL_IMPLS, "torch"])
def test_oracle_extreme_logits(device, impl, extreme):
    v = 301
    w = torch.randn(v, 16, device=device, requires_grad=True)
    x = torch.zeros(6, 16, device=device, requires_grad=True)
    b = EXTREME_BIAS[extreme](v).to(device)
    y = torch.tensor([3, 7, 0, 2, 9, 300], device=device)
    run_and_compare(x, w, b, y, impl=impl, reduction="none" if extreme == "3e38_apart" else "mean")
    _, stats = fused_linear_tofu_loss(x, w, y, bias=b, impl=impl, return_stats=True)
    _, ref, _ = tofu_rows(b.double().expand(6, v), y, 3.0, 0.8)
    for i, name in enumerate(("mean_p", "mean_focal_weight", "entropy", "accuracy")):
        assert rel_err(getattr(stats, name), ref[i].mean()) < 1e-5, name


@pytest.mark.parametrize("impl", [*KERNEL_IMPLS, "torch"])
def test_logits_that_overflow(device, impl):
    """Finite bf16 inputs whose logits overflow fp32 to -inf over a whole first tile (256
    columns) and at one target: every impl gives the loss of those logits, the last token's
    inf (its loss is beyond fp32). With running maxima started at -inf, such a tile made the
    sums NaN (-inf - -inf), and a -inf target was taken for an out-of-range label (NaN)."""
    v, h = 301, 16
    w = torch.randn(v, h, device=device) * 0.1
    w[:256] = -1e20  # x @ w.T = 1e19 * -1e20: -inf in fp32
    w[256:, 0] = 0.0
    x = torch.zeros(3, h, device=device)
    x[:, 0] = 1e19
    x, w = x.bfloat16(), w.bfloat16()
    y = torch.tensor([260, 300, 5], device=device)
    logits = x.float() @ w.float().T
    assert torch.isinf(logits[:, :256]).all() and torch.isfinite(logits[:, 256:]).all()
    ref, _, _ = tofu_rows(logits.double(), y, 3.0, 0.8)
    loss = fused_linear_tofu_loss(x, w, y, impl=impl, reduction="none")
    assert loss[2] == float("inf") and ref[2] == float("inf")
    assert rel_err(loss[:2], ref[:2]) < 1e-5


@pytest.mark.parametrize("impl", KERNEL_IMPLS)
def test_oracle_num_items_in_batch_3d_noncontiguous(device, impl):
    x, w, _, y = make_inputs((3, 7), 37, 301, torch.float32, device)
    wide = torch.randn(7, 3, 40, device=device)
    x = wide.transpose(0, 1)[..., :37].requires_grad_(True)  # 3-D, non-contiguous leaf
    assert not x.is_contiguous()
    w.requires_grad_(True)
    run_and_compare(x, w, None, y, num_items_in_batch=40, chunk_size=4, impl=impl)
    x.grad = w.grad = None
    run_and_compare(x, w, None, y, num_items_in_batch=torch.tensor(9), impl=impl)
    x.grad = w.grad = None  # a fraction (Trainer under context parallelism) is divided by too
    run_and_compare(x, w, None, y, num_items_in_batch=torch.tensor(0.5), impl=impl)


@pytest.mark.parametrize("impl", [*KERNEL_IMPLS, "torch"])
def test_strided_and_expanded_bias(device, impl):
    """A bias that is every other entry of a longer tensor, or one value expanded (stride 0):
    the fused kernels read it densely (its loss was off, and NaN from reading past the one
    stored value, until it was made contiguous)."""
    x, w, _, y = make_inputs((30,), 37, 301, torch.float32, device)
    for stored in (2 * 301, 1):
        base = torch.randn(stored, device=device, requires_grad=True)
        b = base[::2] if stored > 1 else base.expand(301)
        leaves = [t.clone().requires_grad_(True) for t in (x, w)]
        loss = fused_linear_tofu_loss(*leaves, y, bias=b, impl=impl)
        loss.backward()
        ref_loss, gx, gw, gb = linear_oracle(x, w, y, bias=b.detach().contiguous(), gamma=3.0,
                                             beta=0.8)  # fmt: skip
        tol = LINEAR_GRAD_RTOL[torch.float32]
        for got, want in ((loss, ref_loss), (leaves[0].grad, gx), (leaves[1].grad, gw)):
            assert rel_err(got, want) < tol
        if stored > 1:
            assert rel_err(base.grad[::2], gb) < tol and (base.grad[1::2] == 0).all()
        else:  # the entries' gradients summed: about 0 (each row's sums to 0), to gb's scale
            assert abs(base.grad.item() - gb.sum().item()) < tol * gb.abs().max().item()


@pytest.mark.parametrize("impl", [*KERNEL_IMPLS, "torch"])
def test_strided_labels(device, impl):
    """A strided 1-D view of labels, without dropping ignored rows (the GPU's default path)."""
    x, w, b, y = make_inputs((30,), 37, 301, torch.float32, device, bias=True)
    y = torch.stack([y, torch.zeros_like(y)], 1)[:, 0]
    assert y.stride() == (2,)
    x.requires_grad_(True)
    for reduction in ("mean", "none"):
        x.grad = None
        run_and_compare(x, w, b, y, reduction=reduction, chunk_size=8, impl=impl,
                        drop_ignored=False)  # fmt: skip


def test_frozen_weight_and_hidden_without_grad(device, monkeypatch):
    """LoRA: no grad_weight work at all; hidden without grad: no grad_hidden GEMM."""
    calls = []
    real = linear_mod.linear_tofu_fwd

    def spy(*args, **kwargs):
        calls.append((kwargs["need_grad_hidden"], kwargs["need_grad_weight"]))
        return real(*args, **kwargs)

    monkeypatch.setattr(linear_mod, "linear_tofu_fwd", spy)
    x, w, _, y = make_inputs((11,), 37, 301, torch.bfloat16, device)
    x.requires_grad_(True)
    run_and_compare(x, w, None, y, chunk_size=4, impl="chunked")
    assert w.grad is None
    x.requires_grad_(False)
    w.requires_grad_(True)
    run_and_compare(x, w, None, y, chunk_size=4, impl="chunked")
    with torch.no_grad():
        fused_linear_tofu_loss(x, w, y, impl="chunked")
    assert calls == [(True, False), (False, True), (False, False)]


@pytest.mark.parametrize("impl", KERNEL_IMPLS)
def test_weight_tied_to_embedding(device, impl):
    """A tied weight gets both gradients, the embedding's and the head's, summed by autograd."""
    emb = torch.nn.Embedding(301, 37).to(device)
    tokens = torch.randint(0, 301, (13,), device=device)
    labels = random_labels((13,), 301, device, 0.2)
    x = torch.tanh(emb(tokens))
    loss = fused_linear_tofu_loss(x, emb.weight, labels, chunk_size=5, impl=impl)
    loss.backward()
    ours = emb.weight.grad.clone()
    emb.weight.grad = None
    ref = tofu_loss(torch.tanh(emb(tokens)) @ emb.weight.T, labels, impl="torch")
    ref.backward()
    assert rel_err(ours, emb.weight.grad) < 1e-5


@pytest.mark.parametrize("impl", KERNEL_IMPLS)
def test_autocast_fp32_master_weights(device, impl):
    """Under autocast the GEMMs run in bf16 and gradients reach the fp32 parameters in fp32."""
    head = torch.nn.Linear(37, 301, bias=True).to(device)
    x = torch.randn(15, 37, device=device, requires_grad=True)
    y = random_labels((15,), 301, device, 0.2)
    with torch.autocast(device_type=device, dtype=torch.bfloat16):
        loss = fused_linear_tofu_loss(x, head.weight, y, bias=head.bias, impl=impl)
    loss.backward()
    assert loss.dtype == torch.float32 and head.weight.grad.dtype == torch.float32
    xb, wb, bb = (t.detach().to(torch.bfloat16) for t in (x, head.weight, head.bias))
    ref_loss, gx, gw, gb = linear_oracle(xb, wb, y, bias=bb, gamma=3.0, beta=0.8)
    assert rel_err(loss, ref_loss) < LINEAR_LOSS_RTOL[torch.bfloat16]
    for grad, ref in ((x.grad, gx), (head.weight.grad, gw), (head.bias.grad, gb)):
        assert rel_err(grad, ref) < LINEAR_GRAD_RTOL[torch.bfloat16]


@pytest.mark.parametrize("impl", KERNEL_IMPLS)
def test_stats_match_materialized_logits(device, impl):
    x, w, _, y = make_inputs((19,), 37, 301, torch.float32, device)
    loss, stats = fused_linear_tofu_loss(x, w, y, chunk_size=4, impl=impl, return_stats=True)
    _, ref = tofu_loss(x @ w.T, y, impl="torch", return_stats=True)
    for name, value in ref.as_dict().items():
        assert abs(getattr(stats, name).item() - value) <= 1e-5 * max(1.0, abs(value)), name


# (target, twin) logits tied at the max: argmax == label only where the target comes first (4 of
# 7), within a vocabulary_chunked chunk (64 columns) or fused split (256), and across them.
TIED_PAIRS = [(3, 7), (250, 260), (0, 300), (100, 130), (20, 10), (270, 240), (299, 1)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("impl", [*KERNEL_IMPLS, "torch"])
def test_accuracy_takes_the_first_of_tied_maxima(device, impl, dtype):
    """As argmax (and TRL's mean_token_accuracy): a target tied with an earlier column is wrong."""
    x, w, y = tied_head(TIED_PAIRS, 16, 301, dtype, device)
    _, stats = fused_linear_tofu_loss(x, w, y, impl=impl, chunk_size=64, return_stats=True)
    assert (x.float() @ w.float().T).argmax(1).eq(y).sum() == 4
    assert stats.accuracy.item() == pytest.approx(4 / 7, abs=1e-6)


@pytest.mark.parametrize("impl", ["chunked", "torch"])
def test_impls_and_drop_ignored_agree(device, impl):
    x, w, b, y = make_inputs((21,), 37, 301, torch.float32, device, bias=True, ignored=0.5)
    results = []
    for drop in (False, True):
        leaves = [t.detach().clone().requires_grad_(True) for t in (x, w, b)]
        loss = fused_linear_tofu_loss(
            leaves[0], leaves[1], y, bias=leaves[2], impl=impl, chunk_size=4, drop_ignored=drop
        )
        loss.backward()
        results.append([loss] + [t.grad for t in leaves])
    for a, b_ in zip(*results, strict=True):
        assert rel_err(a, b_) < 1e-5


# None: grad_weight in the weight's dtype (chunked: per chunk; fused: fp16 atomics under the
# interpreter, which has no bf16 atomics and sums bf16 in fp32; vocab_chunked: per token slab,
# here of 64 rows: two full slabs and a short one).
@pytest.mark.parametrize("impl", KERNEL_IMPLS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("accum_dtype", [None, torch.float32])
def test_weight_grad_accumulator_dtypes(device, monkeypatch, accum_dtype, dtype, impl):
    from tofu_kernels import vocab_chunked

    monkeypatch.setattr(vocab_chunked, "LEAN_SLAB_ROWS", 64)
    x, w, _, y = make_inputs((150,), 37, 301, dtype, device)
    x.requires_grad_(True)
    w.requires_grad_(True)
    run_and_compare(x, w, None, y, chunk_size=4, impl=impl, accum_dtype=accum_dtype)


@pytest.mark.parametrize("impl", KERNEL_IMPLS)
def test_cross_entropy_matches_liger_and_torch(device, impl):
    """gamma=0, beta=1 is cross-entropy: equal to Liger's fused linear CE (and torch's, if any)."""
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    x, w, _, y = make_inputs((24,), 37, 301, torch.float32, device, ignored=0.25)
    grads = {}
    for name in ("ours", "liger", "torch_native"):
        xs, ws = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
        if name == "ours":
            loss = fused_linear_tofu_loss(xs, ws, y, gamma=0.0, beta=1.0, impl=impl)
        elif name == "liger":
            loss = LigerFusedLinearCrossEntropyLoss()(ws, xs, y)
        elif hasattr(F, "linear_cross_entropy"):
            loss = F.linear_cross_entropy(xs, ws, y)
        else:
            continue
        loss.backward()
        grads[name] = (loss.detach(), xs.grad, ws.grad)
    ref = F.cross_entropy(x.double() @ w.double().T, y)
    for name, (loss, gx, gw) in grads.items():
        assert abs(loss.item() - ref.item()) < 1e-5 * ref.item(), name
        assert rel_err(gx, grads["ours"][1]) < 1e-5 and rel_err(gw, grads["ours"][2]) < 1e-5, name


@pytest.mark.parametrize("impl", KERNEL_IMPLS)
def test_module_matches_function(device, impl):
    x, w, b, y = make_inputs((9,), 37, 301, torch.float32, device, bias=True)
    module = FusedLinearTOFULoss(gamma=1.0, beta=1.5, reduction="sum", impl=impl)
    assert "beta=1.5" in repr(module)
    expected = fused_linear_tofu_loss(
        x, w, y, bias=b, gamma=1.0, beta=1.5, reduction="sum", impl=impl
    )
    assert torch.equal(module(x, w, y, b), expected)


def test_module_passes_every_option(monkeypatch):
    """Every option of the module's constructor reaches the function, as given."""
    names = list(inspect.signature(FusedLinearTOFULoss).parameters)
    options = {name: object() for name in names}  # a distinct sentinel each
    calls = []
    monkeypatch.setattr(linear_mod, "fused_linear_tofu_loss", lambda *a, **k: calls.append(k))
    monkeypatch.setattr(linear_mod, "TOFUParams", lambda *a: None)  # takes the sentinels
    monkeypatch.setattr(linear_mod, "LINEAR_IMPLS", (options["impl"],))
    FusedLinearTOFULoss(**options)("h", "w", "y", "b", num_items_in_batch="n")
    (kwargs,) = calls
    assert {k: kwargs[k] for k in names} == options
    assert kwargs["bias"] == "b" and kwargs["num_items_in_batch"] == "n"


def test_backward_twice_and_double_backward_raise(device):
    x, w, _, y = make_inputs((9,), 37, 301, torch.float32, device)
    x.requires_grad_(True)
    loss = fused_linear_tofu_loss(x, w, y, impl="chunked")
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward ran twice"):
        loss.backward()
    loss = fused_linear_tofu_loss(x, w, y, impl="chunked")
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(loss, x, create_graph=True)


def test_no_tensors_leak_across_iterations(device):
    """20 training iterations leave no tensor alive: nothing keeps gradients in a cycle."""
    x, w, b, y = make_inputs((9,), 37, 301, torch.float32, device, bias=True)
    for t in (x, w, b):
        t.requires_grad_(True)

    def step():
        loss, _ = fused_linear_tofu_loss(x, w, y, bias=b, impl="chunked", return_stats=True)
        loss.backward()
        for t in (x, w, b):
            t.grad = None

    def live_tensors():
        with warnings.catch_warnings():  # some torch objects warn when inspected
            warnings.simplefilter("ignore")
            return sum(1 for o in gc.get_objects() if torch.is_tensor(o))

    step()
    gc.collect()
    gc.disable()  # a leak through a reference cycle would survive plain refcounting
    try:
        before = live_tensors()
        for _ in range(20):
            step()
        after = live_tensors()
    finally:
        gc.enable()
    assert after <= before


BAD_INPUTS = [
    (dict(weight=torch.zeros(0, 8)), ValueError, "weight"),
    (dict(weight=torch.zeros(5, 9)), ValueError, "hidden"),
    (dict(bias=torch.zeros(4)), ValueError, "bias"),
    (dict(weight=torch.zeros(5, 8, dtype=torch.bfloat16)), TypeError, "weight"),
    (dict(labels=torch.zeros(3, dtype=torch.long)), ValueError, "labels"),
    (dict(labels=torch.full((4,), 5)), ValueError, "labels"),
    (dict(chunk_size=0), ValueError, "chunk_size"),
    (dict(impl="fast"), ValueError, "impl"),
    (dict(gamma=-1.0), ValueError, "gamma"),
    (dict(beta=float("nan")), ValueError, "beta"),
    (dict(weight=torch.zeros(5, 8, device="meta")), ValueError, "weight"),
    (dict(accum_dtype=torch.int32), ValueError, "accum_dtype"),
    (dict(accum_dtype=torch.float64, impl="fused"), ValueError, "accum_dtype"),
    (dict(accum_dtype=torch.float16, impl="vocab_chunked"), ValueError, "accum_dtype"),
    (dict(filter_eps=float("nan"), impl="fused"), ValueError, "filter_eps"),  # zeroed grads
    (dict(filter_eps=float("inf"), impl="fused"), ValueError, "filter_eps"),
    (dict(filter_eps=-1.0, impl="fused"), ValueError, "filter_eps"),
    (dict(num_items_in_batch=torch.tensor([3, 3])), ValueError, "num_items_in_batch"),
    (dict(bias=[0.0] * 5), TypeError, "bias"),
]


@pytest.mark.parametrize("change,error,pattern", BAD_INPUTS)
def test_bad_input_raises(change, error, pattern):
    args = dict(hidden=torch.randn(4, 8), weight=torch.randn(5, 8), labels=torch.arange(4))
    args.update(change)
    with pytest.raises(error, match=pattern):
        fused_linear_tofu_loss(args.pop("hidden"), args.pop("weight"), args.pop("labels"), **args)


MEMORY_SCRIPT = textwrap.dedent(
    """
    import json, resource, sys
    import torch
    from tofu_kernels import fused_linear_tofu_loss
    from tofu_kernels.reference import tofu_loss_published

    def rss_mb():
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    mode = sys.argv[1]
    torch.manual_seed(0)
    n, h, v = 2048, 256, 65536
    x = torch.randn(n, h, requires_grad=mode != "nograd")
    w = (torch.randn(v, h) / 16).requires_grad_(mode != "nograd")
    y = torch.randint(0, v, (n,))
    # grads of the size of the inputs are part of the baseline, not of the loss's footprint
    gx, gw = torch.ones_like(x), torch.ones_like(w)
    del gx, gw
    base = rss_mb()
    if mode == "reference":
        loss = tofu_loss_published(x @ w.T, y)
    else:
        with torch.set_grad_enabled(mode != "nograd"):
            loss = fused_linear_tofu_loss(x, w, y)
    if mode != "nograd":
        loss.backward()
    print(json.dumps({"peak_mb": rss_mb() - base, "loss": float(loss)}))
    """
)


@pytest.mark.slow
def test_memory_fused_vs_materialized():
    """Peak RSS above baseline at N=2048, H=256, V=65536 fp32 (the logits alone are 512 MiB)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # torch path on CPU

    def measure(mode):
        out = subprocess.run(
            [sys.executable, "-c", MEMORY_SCRIPT, mode], env=env, capture_output=True, text=True
        )
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout.strip().splitlines()[-1])

    ref, fused, nograd = measure("reference"), measure("fused"), measure("nograd")
    assert abs(ref["loss"] - fused["loss"]) < 1e-4 * ref["loss"]
    chunk_mb = linear_mod.default_chunk_size(2048, 256, 65536) * 65536 * 4 / 2**20
    print(f"peak MB: reference {ref['peak_mb']:.0f}, fused {fused['peak_mb']:.0f}, "
          f"no_grad {nograd['peak_mb']:.0f}, one chunk {chunk_mb:.0f}")  # fmt: skip
    assert ref["peak_mb"] > 1500  # the materialized path really is materialized
    assert fused["peak_mb"] <= 0.25 * ref["peak_mb"]
    assert nograd["peak_mb"] <= 4 * chunk_mb  # about one chunk (with its fp32 temporaries)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_scale_unless_one(device, dtype):
    """The chunked backward's scaling pass: a factor of 1 leaves the gradient as it is (on a GPU
    its kernel then moves no memory), any other scales it with one rounding, as torch's fp32
    multiply does; over a size that is not a multiple of the kernel's block."""
    g = torch.randn(3, linear_mod.SCALE_CONFIG["BLOCK"] + 5, device=device).to(dtype)
    before = g.clone()
    linear_mod.scale_unless_one(g, torch.ones((), device=device))
    assert torch.equal(g, before)
    linear_mod.scale_unless_one(g, torch.tensor(0.3, device=device))
    exact = before.float() * torch.tensor(0.3, device=device)
    if dtype == torch.bfloat16 and device == "cpu":  # the interpreter truncates fp32 to bf16
        torch.testing.assert_close(g.float(), exact, rtol=2**-7, atol=0)
    else:
        assert torch.equal(g, exact.to(dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_chunked_backward_factor_is_one_unless_fp16(device, monkeypatch, dtype):
    """bf16 and fp32 gradients are stored at their own scale, so the usual loss.backward()
    hands the scaling pass a factor of 1 (skipped: Liger pays a host sync to skip it); fp16's
    are a power of two off, which backward undoes. An upstream gradient of 3 scales all."""
    factors = []
    real = linear_mod.scale_unless_one

    def spy(grad, factor):
        factors.append(float(factor))
        real(grad, factor)

    monkeypatch.setattr(linear_mod, "scale_unless_one", spy)
    x, w, b, y = make_inputs((37,), 40, 301, dtype, device, bias=True)
    for go in (1.0, 3.0):
        leaves = [t.detach().clone().requires_grad_(True) for t in (x, w, b)]
        loss = fused_linear_tofu_loss(*leaves[:2], y, bias=leaves[2], impl="chunked")
        loss.backward(torch.tensor(go))
        ref = linear_oracle(x, w, y, bias=b, gamma=3.0, beta=0.8, grad_output=torch.tensor(go))
        for got, want in zip([t.grad for t in leaves], ref[1:], strict=True):
            assert rel_err(got, want) < LINEAR_GRAD_RTOL[dtype]
    ones = [f == 1.0 for f in factors[:3]]
    assert ones == [dtype != torch.float16] * 3 and not any(f == 1.0 for f in factors[3:])


# bf16 and fp32 with either grad_weight accumulation (vocab_chunked: token slabs with
# accum_dtype=None; fused: atomics into the gradient), and fp16 for contrast
@pytest.mark.parametrize("accum_dtype", [torch.float32, None], ids=["fp32acc", "acc_none"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("impl", ["vocab_chunked", "fused"])
def test_recompute_backward_scales_only_fp16(device, monkeypatch, impl, dtype, accum_dtype):
    """The recompute impls form the logits' gradient in backward: fp16 scaled by a power of two
    near its largest entry, undone afterwards; bf16 and fp32 have the range to form it at its
    own scale (no pass over grad_weight to undo a scale), so an upstream gradient of 2^-90
    still gives float64's gradients, per-token, with bias and softcap."""
    monkeypatch.setattr(vc_mod, "LEAN_SLAB_ROWS", 16)  # vocab_chunked's slabs: 16 rows
    monkeypatch.setattr(vc_mod, "FP32_SUM_ROWS", 64)  # fp16 grad_weight: 5 blocks, 1 short
    module = vc_mod if impl == "vocab_chunked" else fused_mod
    scaled = returns_of(monkeypatch, module, "normalized_grad_scale")
    x, w, b, y = make_inputs((37,), 40, 301, dtype, device, bias=True)
    opts = dict(softcap=20.0, reduction="none")
    leaves = [t.detach().clone().requires_grad_(True) for t in (x, w, b)]
    loss = fused_linear_tofu_loss(
        *leaves[:2], y, bias=leaves[2], impl=impl, accum_dtype=accum_dtype, **opts
    )
    go = torch.rand_like(loss) * (2.0**-90 if dtype != torch.float16 else 1.0)
    loss.backward(go)
    assert scaled and all((norm is not None) == (dtype == torch.float16) for _, norm in scaled)
    _, *ref = linear_oracle(x, w, y, bias=b, gamma=3.0, beta=0.8, grad_output=go, **opts)
    for got, want, name in zip([t.grad for t in leaves], ref, ("x", "w", "b"), strict=True):
        assert rel_err(got, want) < LINEAR_GRAD_RTOL[dtype], (name, rel_err(got, want))


def test_default_chunk_size():
    # chunk logits about the size of hidden, at least MIN_CHUNK_ROWS rows, at most all rows
    assert linear_mod.default_chunk_size(8192, 4096, 128256) == 262
    # where grad_weight is accumulated, ACCUM_CHUNK_ROWS per 4 accumulator bytes (H100 sweep)
    assert linear_mod.default_chunk_size(8192, 4096, 128256, 4) == 2048
    assert linear_mod.default_chunk_size(8192, 4096, 128256, 2) == 1024
    assert linear_mod.default_chunk_size(1000, 4096, 128256, 4) == 1000
    assert linear_mod.default_chunk_size(65536, 4096, 32000, 4) == 8389  # hidden's size wins
    assert linear_mod.default_chunk_size(4096, 256, 65536) == linear_mod.MIN_CHUNK_ROWS
    assert linear_mod.default_chunk_size(10, 4096, 128256) == 10
    for n, h, v in itertools.product([1, 300, 5000], [64, 4096], [100, 128256]):
        assert 1 <= linear_mod.default_chunk_size(n, h, v) <= n


@pytest.mark.parametrize("impl", KERNEL_IMPLS + ["torch"])
def test_none_reduction_summed_by_the_caller(device, impl):
    """loss.sum().backward() hands backward an expanded, stride-0 grad_output."""
    x, w, _, y = make_inputs((13,), 37, 301, torch.float32, device)
    x.requires_grad_(True), w.requires_grad_(True)
    fused_linear_tofu_loss(x, w, y, reduction="none", impl=impl, chunk_size=4).sum().backward()
    _, gx, gw, _ = linear_oracle(x, w, y, gamma=3.0, beta=0.8, reduction="sum")
    assert rel_err(x.grad, gx) < 1e-5 and rel_err(w.grad, gw) < 1e-5


def test_none_reduction_backward_twice_accumulates(device):
    """ "none" recomputes from its saved inputs: a retained graph gives the same gradient twice."""
    x, w, _, y = make_inputs((9,), 37, 301, torch.float32, device)
    x.requires_grad_(True)
    loss = fused_linear_tofu_loss(x, w, y, reduction="none", impl="chunked").sum()
    loss.backward(retain_graph=True)
    first = x.grad.clone()
    loss.backward()
    assert rel_err(x.grad, 2 * first) < 1e-6


@pytest.mark.parametrize("impl", KERNEL_IMPLS + ["torch"])
def test_narrow_int_labels(device, impl):
    """int32 and int16 labels as int64 (the torch impl's scatter took int64 only)."""
    x, w, b, y = make_inputs((11,), 37, 301, torch.float32, device, bias=True)
    x.requires_grad_(True)
    ref = fused_linear_tofu_loss(x, w, y, bias=b, impl=impl, chunk_size=4)
    (gx,) = torch.autograd.grad(ref, x)
    for dtype in (torch.int32, torch.int16):
        loss = fused_linear_tofu_loss(x, w, y.to(dtype), bias=b, impl=impl, chunk_size=4)
        (gx_narrow,) = torch.autograd.grad(loss, x)
        assert torch.equal(loss, ref) and torch.equal(gx_narrow, gx), dtype


@pytest.mark.parametrize("impl", KERNEL_IMPLS + ["torch"])
def test_int8_labels_and_one_element_num_items(device, impl):
    """int8 labels against an ignore_index outside int8 (torch wraps -1000 to 24 in a
    comparison: label 24 looked ignored), and a (1,)-shaped num_items_in_batch (a 0-dim loss)."""
    x, w, b, y = make_inputs((11,), 37, 100, torch.float32, device, bias=True, ignored=0.0)
    y[0] = 24
    kwargs = dict(bias=b, impl=impl, ignore_index=-1000)
    ref = fused_linear_tofu_loss(x, w, y, **kwargs)
    assert torch.equal(fused_linear_tofu_loss(x, w, y.to(torch.int8), **kwargs), ref)
    loss = fused_linear_tofu_loss(x, w, y, num_items_in_batch=torch.tensor([9]), **kwargs)
    assert loss.shape == () and rel_err(loss, ref * 11 / 9) < 1e-6


@pytest.mark.parametrize("impl", KERNEL_IMPLS)
@pytest.mark.parametrize("upstream", [1e-3, 1e3])
def test_fp16_with_a_tiny_or_large_upstream_gradient(device, impl, upstream):
    """The recompute impls form fp16 logit gradients at a scale normalized away from the
    upstream gradient: a tiny one (1e-3 made grad_hidden 1.4e-2 off: subnormals) or a large one
    (fp16 loss scaling) gives the same relative accuracy."""
    x, w, _, y = make_inputs((150,), 37, 301, torch.float16, device)
    x.requires_grad_(True)
    w.requires_grad_(True)
    go = torch.tensor(upstream, device=device)
    fused_linear_tofu_loss(x, w, y, impl=impl).backward(go)
    _, gx, gw, _ = linear_oracle(x, w, y, gamma=3.0, beta=0.8, grad_output=go)
    assert rel_err(x.grad, gx) < LINEAR_GRAD_RTOL[torch.float16], rel_err(x.grad, gx)
    assert rel_err(w.grad, gw) < LINEAR_GRAD_RTOL[torch.float16], rel_err(w.grad, gw)


def flat_fp16_head(rows, vocab, hidden, device, x_offset=0.0):
    """fp16 inputs of a flat softmax (logits spread ~0.3) whose weight rows share a direction,
    as a trained head's do: the off-target gradient then adds up to a large part of
    grad_hidden, though each of its entries is tiny (about g / V per row)."""
    common = torch.randn(1, hidden, device=device)
    w = (torch.randn(vocab, hidden, device=device) * 0.1 + common).half()
    x = (torch.randn(rows, hidden, device=device) * 0.3 + x_offset).half()
    return x, w


# 2048 tokens: a mean's 1/N put most fp16 entries of the logits' gradient (~g / (V N)) under
# fp16's normal range; the torch impl runs the token-chunked impl's own code, which is
# slow under the interpreter with impl="chunked" (a test below runs that on a small shape).
@pytest.mark.parametrize(
    "impl,reduction",
    [("torch", "mean"), ("torch", "none"), ("vocab_chunked", "mean"), ("fused", "none")],
)
def test_fp16_many_tokens_keep_the_off_target_gradient(device, impl, reduction):
    """Formed at the reduction's scale, 98% of those entries were zeros or subnormals and
    grad_hidden was 2.2e-2 off (0.4 at 4096 tokens by emulation); each impl now forms the
    logits' gradient peaking near 2^8 and undoes that scale exactly."""
    n, vocab = 2048, 1024
    x, w = flat_fp16_head(n, vocab, 32, device)
    y = torch.randint(0, vocab, (n,), device=device)
    x.requires_grad_(True)
    w.requires_grad_(True)
    go = torch.full((n,), 1.0 / n, device=device) if reduction == "none" else torch.tensor(1.0)
    fused_linear_tofu_loss(x, w, y, impl=impl, reduction=reduction).backward(go.to(device))
    _, gx, gw, _ = linear_oracle(x, w, y, gamma=3.0, beta=0.8, reduction=reduction, grad_output=go)
    assert rel_err(x.grad, gx) < LINEAR_GRAD_RTOL[torch.float16], rel_err(x.grad, gx)
    assert rel_err(w.grad, gw) < LINEAR_GRAD_RTOL[torch.float16], rel_err(w.grad, gw)


# H 256 and a shared direction 4x the standard one's stand in for the 33M grad_hidden entries of
# the Llama-3-8B head at 8192 tokens, where an H100 run found the chunked impl 5.5e-3 off in fp16;
# bf16 (softcap off only: the same code path) rounds 8x coarser
@pytest.mark.parametrize(
    "dtype,softcap",
    [(torch.float16, None), (torch.float16, 30.0), (torch.bfloat16, None)],
)
# "vocab_chunked-slabs": accum_dtype=None's token slabs, 200 rows here (a short last slab), in
# 4 vocabulary chunks (each chunk's rounding errors add to the rows' sums)
@pytest.mark.parametrize("impl", ["torch", "vocab_chunked", "vocab_chunked-slabs", "fused"])
def test_half_grad_hidden_keeps_a_shared_weight_direction_cancelled(
    device, monkeypatch, impl, dtype, softcap
):
    """grad_hidden = sum_v grad_v w_v, where a direction that all weight rows share cancels
    (without softcap, because a gradient row sums to 0); rounded to fp16/bf16, the row's target
    entry (its largest) adds its rounding error along that direction: about 9e-3 off here in
    fp16, with or without softcap, and 6e-2 in bf16, before each impl moved its rows' rounding
    errors onto w_y (utils.cancel_rounding)."""
    n, vocab, h = 512, 2048, 256
    x, w = shared_direction_head(n, vocab, h, dtype, device, common=4.0)
    x.requires_grad_(True)
    w.requires_grad_(True)
    y = random_labels((n,), vocab, device, ignored=0.3)
    go = torch.tensor(2.0**16, device=device)
    options = {}
    if impl == "vocab_chunked-slabs":
        from tofu_kernels import vocab_chunked

        monkeypatch.setattr(vocab_chunked, "LEAN_SLAB_ROWS", 200)
        impl, options = "vocab_chunked", {"accum_dtype": None, "chunk_size": 512}
    fused_linear_tofu_loss(x, w, y, impl=impl, softcap=softcap, **options).backward(go)
    _, gx, gw, _ = linear_oracle(x, w, y, gamma=3.0, beta=0.8, softcap=softcap, grad_output=go)
    assert rel_err(x.grad, gx) < LINEAR_GRAD_RTOL[dtype], rel_err(x.grad, gx)
    assert rel_err(w.grad, gw) < LINEAR_GRAD_RTOL[dtype], rel_err(w.grad, gw)


def test_cancel_rounding_in_row_steps(device):
    """utils.cancel_rounding gathers the targets' weight rows a few hundred at a time: 600 rows
    (a short last step) give acc - err * w_y exactly, with labels of ignored rows and of another
    vocabulary shard (negative, or V and beyond) left alone."""
    from tofu_kernels.utils import cancel_rounding

    n, vocab, h = 600, 50, 24
    w = torch.randn(vocab, h, device=device).to(torch.bfloat16)
    y = torch.randint(0, vocab, (n,), device=device)
    y[::7], y[1::11], y[2::13] = -100, vocab, -3
    acc, err = torch.randn(n, h, device=device), torch.randn(n, device=device)
    want = acc.clone()
    own = (y >= 0) & (y < vocab)
    want[own] -= err[own, None] * w[y[own]].float()
    cancel_rounding(acc, err, w, y)
    torch.testing.assert_close(acc, want, rtol=1e-6, atol=1e-6)


def test_fp64_gradients_are_exact(device):
    """fp64 (the CPU path's reference precision) never passes through fp32: a half-precision
    branch once took every dtype but fp32 and cast fp64's grad_hidden GEMM down (2.2e-5 off)."""
    x, w, _, y = make_inputs((64,), 32, 300, torch.float64, device)
    x.requires_grad_(True)
    w.requires_grad_(True)
    go = torch.randn((), dtype=torch.float64, device=device)
    fused_linear_tofu_loss(x, w, y, impl="torch").backward(go)
    _, gx, gw, _ = linear_oracle(x, w, y, gamma=3.0, beta=0.8, grad_output=go)
    assert rel_err(x.grad, gx) < 1e-12, rel_err(x.grad, gx)
    assert rel_err(w.grad, gw) < 1e-12, rel_err(w.grad, gw)


# 2048 tokens (a fixed factor of 2^-19) and hidden entries ~6e-4 here lose as many digits as
# 8192 tokens (2^-21) and entries ~5e-3 at the Llama-3 head, where an H100 run found it
@pytest.mark.parametrize("impl", ["torch", "vocab_chunked", "fused"])
def test_fp16_weight_gradient_of_small_hidden_states_keeps_its_digits(device, impl):
    """grad_weight summed into fp16 at a fixed factor near 1 / (N 2^8), safe from overflow for
    any N, put the entries of small hidden states' rows among fp16 subnormals with a few bits
    left (1.9e-2 off); the vocabulary-chunked impl now sums each chunk's rows in fp32 and
    rounds them once at their own scale."""
    n, vocab = 2048, 1024
    x, w = flat_fp16_head(n, vocab, 32, device)
    x = (x * 2.0**-9).requires_grad_(True)
    w.requires_grad_(True)
    y = random_labels((n,), vocab, device, ignored=0.3)
    go = torch.tensor(2.0**16, device=device)
    fused_linear_tofu_loss(x, w, y, impl=impl).backward(go)
    _, gx, gw, _ = linear_oracle(x, w, y, gamma=3.0, beta=0.8, grad_output=go)
    assert rel_err(x.grad, gx) < LINEAR_GRAD_RTOL[torch.float16], rel_err(x.grad, gx)
    assert rel_err(w.grad, gw) < LINEAR_GRAD_RTOL[torch.float16], rel_err(w.grad, gw)


@pytest.mark.parametrize("impl", ["torch", "vocab_chunked", "fused"])
def test_fp16_weight_gradient_sums_do_not_overflow(device, impl):
    """At the logits' gradient's unit scale, grad_weight's sum over 1024 tokens of one label
    with hidden states ~100 would pass fp16's 65504; sums into fp16 (the vocabulary-chunked
    GEMMs, accum_dtype=None) take an exact factor near 1/N, undone after (the true mean is ~50)."""
    n, vocab = 1024, 64
    x, w = flat_fp16_head(n, vocab, 16, device, x_offset=100.0)
    w = (w * 1e-3).requires_grad_(True)  # keep the softmax flat despite the large hidden states
    y = torch.full((n,), 3, device=device)
    x.requires_grad_(True)
    options = {} if impl == "vocab_chunked" else {"accum_dtype": None}
    fused_linear_tofu_loss(x, w, y, impl=impl, **options).backward()
    _, gx, gw, _ = linear_oracle(x, w, y, gamma=3.0, beta=0.8)
    assert gw.abs().max() > 20  # the true gradient is large, its unscaled sum overflows
    # (grad_hidden, ~1e-4 x g / N through this tiny weight, is under fp16's range here)
    assert torch.isfinite(x.grad).all()
    assert rel_err(w.grad, gw) < LINEAR_GRAD_RTOL[torch.float16], rel_err(w.grad, gw)


# Every impl: the token-chunked ones (torch, chunked) store grad_hidden in forward at the logits'
# gradient's headroom, where the bug was; the recompute impls store it at its own scale.
@pytest.mark.parametrize("impl", ["torch", "chunked", "vocab_chunked", "fused"])
def test_fp16_grad_hidden_of_a_large_weight_stays_finite(device, impl):
    """The token-chunked impls store grad_hidden in forward at the logits' gradient's scale (its
    peak near 2^8): a row's sum of that gradient times weight entries near 512 passed fp16's
    65504 (inf) though the true gradient (~6e3 here) is far inside it. grad_hidden is now
    stored over a power of two near the weight's largest entry, where that is over 1."""
    n, hidden, vocab = 64, 32, 301
    w = (torch.randn(vocab, hidden, device=device) * 512).half().requires_grad_(True)
    x = (torch.randn(n, hidden, device=device) * 5e-4).half().requires_grad_(True)  # logits ~1.5
    y = random_labels((n,), vocab, device, ignored=0.2)
    go = torch.tensor(3.0, device=device)
    fused_linear_tofu_loss(x, w, y, impl=impl, reduction="sum").backward(go)
    _, gx, gw, _ = linear_oracle(x, w, y, gamma=3.0, beta=0.8, reduction="sum", grad_output=go)
    assert 256 < gx.abs().max() < 2**14 and gw.abs().max() > 2**-8  # well inside fp16's range
    assert rel_err(x.grad, gx) < LINEAR_GRAD_RTOL[torch.float16], rel_err(x.grad, gx)
    assert rel_err(w.grad, gw) < LINEAR_GRAD_RTOL[torch.float16], rel_err(w.grad, gw)


def test_fp16_chunked_stores_its_gradients_at_a_unit_scale(device):
    """The token-chunked impl makes mean/sum gradients in forward and scales them in backward:
    stored at a mean's 1/N, this small weight's grad_hidden (~3e-6) was rounded to fp16
    subnormals, and fp16 loss scaling (2^16) could not win back the digits it exists for;
    gradients are now stored near 2^8 and scaled once."""
    n, vocab = 256, 512
    x, w = flat_fp16_head(n, vocab, 16, device)
    x.requires_grad_(True)
    w = (w * 1e-2).requires_grad_(True)
    y = torch.randint(0, vocab, (n,), device=device)
    go = torch.tensor(2.0**16, device=device)
    fused_linear_tofu_loss(x, w, y, impl="chunked").backward(go)
    _, gx, gw, _ = linear_oracle(x, w, y, gamma=3.0, beta=0.8, grad_output=go)
    assert rel_err(x.grad, gx) < LINEAR_GRAD_RTOL[torch.float16], rel_err(x.grad, gx)
    assert rel_err(w.grad, gw) < LINEAR_GRAD_RTOL[torch.float16], rel_err(w.grad, gw)


@pytest.mark.parametrize("impl", ["torch", "vocab_chunked", "fused"])
def test_fp16_confident_batch_with_loss_scaling(device, impl):
    """Every token confident (p > 0.95): focal weights g under 1e-4, so the logits' gradient is
    tiny whatever the upstream gradient. The recompute impls normalize by the largest row
    weight; the token-chunked impl forms it in forward, before g is known, and relies on fp16's
    headroom (2^8): without it grad_hidden was 0.15 off under 2^16 loss scaling."""
    n, vocab, hidden = 64, 512, 16
    # distinct +-1 weight rows and integer logits, exact in fp16: the error is the gradient's
    # own; a token's hidden state is twice its label's row, so its logit leads by 4 or more.
    # Labels are drawn among the rows that make a confident token: a row with several 1-bit
    # neighbours (each a lead of only 4) made an unlucky draw's token p = 0.93.
    codes = torch.randperm(2**hidden, device=device)[:vocab]
    bits = (codes[:, None] >> torch.arange(hidden, device=device)) & 1
    w = (bits * 2 - 1).half()
    p_own = torch.softmax(2 * w.double() @ w.double().T, 1).diagonal()
    confident = torch.nonzero(p_own > 0.95).flatten()
    y = confident[torch.randint(0, confident.numel(), (n,), device=device)]
    x = w[y] * 2
    z = x.double() @ w.double().T
    assert torch.softmax(z, 1).gather(1, y[:, None]).min() > 0.95
    x.requires_grad_(True)
    w.requires_grad_(True)
    go = torch.tensor(2.0**16, device=device)
    options = {} if impl == "vocab_chunked" else {"accum_dtype": torch.float32}
    fused_linear_tofu_loss(x, w, y, impl=impl, **options).backward(go)
    _, gx, gw, _ = linear_oracle(x, w, y, gamma=3.0, beta=0.8, grad_output=go)
    assert rel_err(x.grad, gx) < LINEAR_GRAD_RTOL[torch.float16], rel_err(x.grad, gx)
    assert rel_err(w.grad, gw) < LINEAR_GRAD_RTOL[torch.float16], rel_err(w.grad, gw)
