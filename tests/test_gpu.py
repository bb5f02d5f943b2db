"""Compiled kernels on a real GPU at production shapes (skipped without CUDA).

In the order bench/run_gpu.sh can afford them in its 150 s: the cheap checks first (the logits
kernel, no host sync, CUDA-graph capture), then the Llama-3 head against float64 per impl, then
inductor (its compiles are the slowest), fp32 through the fused kernels, then the fused
backward's bulk reductions (see there).
"""

from __future__ import annotations

import pytest
import torch

from helpers import (
    GRAD_RTOL,
    LINEAR_GRAD_RTOL,
    LINEAR_LOSS_RTOL,
    assert_close,
    linear_oracle,
    make_inputs,
    oracle,
    random_labels,
    random_logits,
    returns_of,
    shared_direction_head,
    tied_head,
)
from tofu_kernels import fused_linear_tofu_loss, tofu_loss

pytestmark = pytest.mark.gpu

LLAMA3_VOCAB = 128256


@pytest.mark.parametrize("softcap", [None, 30.0])
def test_llama3_vocab_bf16_against_oracle(softcap):
    logits = random_logits((512, LLAMA3_VOCAB), torch.bfloat16, "cuda").requires_grad_(True)
    labels = random_labels((512,), LLAMA3_VOCAB, "cuda", ignored=0.3)
    loss = tofu_loss(logits, labels, gamma=3.0, beta=0.8, softcap=softcap, impl="triton")
    loss.backward()
    ref_loss, ref_grad = oracle(
        logits,
        labels,
        gamma=3.0,
        beta=0.8,
        softcap=softcap,
        grad_output=torch.ones((), device="cuda"),
    )
    assert_close(loss, ref_loss, 1e-5, "loss")
    assert_close(logits.grad, ref_grad, GRAD_RTOL[torch.bfloat16], "grad")


def test_out_of_range_label_is_nan_on_gpu():
    logits = torch.randn(4, 1000, device="cuda")
    labels = torch.tensor([1, 2, 5000, 3], device="cuda")
    assert torch.isnan(tofu_loss(logits, labels))


def test_fp16_confident_rows_under_loss_scaling_on_gpu():
    """The per-row powers of two of fp16 tofu_loss through the compiled kernel (log2 and exp2
    on the GPU flush subnormals): every row confident, a GradScaler-sized upstream gradient."""
    torch.manual_seed(0)
    logits = torch.randn(256, LLAMA3_VOCAB, device="cuda") * 0.5
    labels = torch.randint(0, LLAMA3_VOCAB, (256,), device="cuda")
    logits[torch.arange(256), labels] += 15.0
    logits = logits.half().requires_grad_(True)
    tofu_loss(logits, labels, reduction="sum", impl="triton").backward(torch.tensor(65536.0))
    _, ref = oracle(logits, labels, gamma=3.0, beta=0.8, reduction="sum",
                    grad_output=torch.tensor(65536.0, device="cuda"))  # fmt: skip
    assert ref.abs().max() < 2.0**-14 * 65536  # at the loss's own scale: fp16's subnormals
    assert_close(logits.grad, ref, GRAD_RTOL[torch.float16], "grad")


@pytest.mark.parametrize("impl", ["chunked", "vocab_chunked", "fused"])
def test_accuracy_takes_the_first_of_tied_maxima_on_gpu(impl):
    """Targets tied at the max with an earlier column (wrong) or a later one (right), across the
    fused kernel's vocabulary splits and vocab_chunked's chunks at the Llama-3 vocabulary."""
    pairs = [(3, 100_000), (60_000, 128_000), (0, 128_255), (128_254, 5), (90_000, 30_000)]
    x, w, y = tied_head(pairs, 64, LLAMA3_VOCAB, torch.bfloat16, "cuda")
    _, stats = fused_linear_tofu_loss(x, w, y, impl=impl, return_stats=True)
    assert stats.accuracy.item() == pytest.approx(3 / 5, abs=1e-6)


@pytest.mark.parametrize("impl", ["chunked", "vocab_chunked", "fused"])
def test_no_host_device_sync_in_the_hot_path(impl):
    # 1024 tokens: vocab_chunked with accum_dtype=None runs four token slabs of 256 rows
    x = torch.randn(1024, 512, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = (torch.randn(32000, 512, device="cuda") / 20).to(torch.bfloat16).requires_grad_(True)
    y = random_labels((1024,), 32000, "cuda", ignored=0.3)
    for accum in (torch.float32, None):  # compile and cache outside the check
        fused_linear_tofu_loss(x, w, y, impl=impl, accum_dtype=accum).backward()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for kwargs in (
            {},
            {"num_items_in_batch": 700},
            {"reduction": "none"},
            {"accum_dtype": None},
        ):
            loss = fused_linear_tofu_loss(x, w, y, impl=impl, **kwargs)
            loss.sum().backward()
        logits = (x.detach() @ w.detach().T).requires_grad_(True)
        tofu_loss(logits, y, impl="triton").backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("impl", ["chunked", "vocab_chunked", "fused"])
def test_cuda_graph_capture_of_a_training_step(impl):
    x = torch.randn(512, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = (torch.randn(10000, 256, device="cuda") / 16).to(torch.bfloat16).requires_grad_(True)
    y = random_labels((512,), 10000, "cuda", ignored=0.3)

    def step():
        loss = fused_linear_tofu_loss(x, w, y, impl=impl)
        return (loss, *torch.autograd.grad(loss, (x, w)))

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static = step()
    with torch.no_grad():  # new inputs in the captured buffers, then replay
        x.copy_(torch.randn_like(x))
        y.copy_(random_labels((512,), 10000, "cuda", ignored=0.3))
    graph.replay()
    torch.cuda.synchronize()
    eager = step()
    for got, want in zip(static, eager, strict=True):
        assert_close(got, want, 1e-2, "replayed graph vs eager")


ACCUM_IDS = {torch.float32: "fp32acc", None: "acc_none", True: "frozen", False: "trained"}


# accum_dtype None: chunked accumulates grad_weight in bf16 per 1024-row chunk, fused by bf16
# atomics (emulated error at this shape ~1.2e-2 of the largest entry: bench/accum_precision.py),
# vocab_chunked over four token slabs, rounding grad_weight to bf16 after each
@pytest.mark.parametrize(
    "impl,accum_dtype,frozen",
    [("chunked", torch.float32, False), ("chunked", torch.float32, True), ("chunked", None, False),
     ("vocab_chunked", torch.float32, False), ("vocab_chunked", torch.float32, True),
     ("vocab_chunked", None, False),
     ("fused", torch.float32, False), ("fused", torch.float32, True), ("fused", None, False)],
    ids=lambda v: ACCUM_IDS.get(v, v) if not isinstance(v, str) else v,
)  # fmt: skip
def test_fused_linear_llama3_head_bf16_against_oracle(impl, accum_dtype, frozen, monkeypatch):
    """The Llama-3-8B head: 8192 tokens, H=4096, V=128256, bf16, 30% of labels ignored."""
    from tofu_kernels import vocab_chunked

    slabs = returns_of(monkeypatch, vocab_chunked, "lean_slab_rows")
    n, h, v = 8192, 4096, LLAMA3_VOCAB
    x = torch.randn(n, h, device="cuda", dtype=torch.bfloat16).requires_grad_(True)
    w = (torch.randn(v, h, device="cuda") * 3 / h**0.5).to(torch.bfloat16)
    w.requires_grad_(not frozen)
    y = random_labels((n,), v, "cuda", ignored=0.3)
    loss = fused_linear_tofu_loss(x, w, y, impl=impl, accum_dtype=accum_dtype)
    loss.backward()
    if impl == "vocab_chunked":  # accum_dtype=None ran the token slabs
        assert slabs == [vocab_chunked.LEAN_SLAB_ROWS if accum_dtype is None else None]
    ref_loss, gx, gw, _ = linear_oracle(x, w, y, gamma=3.0, beta=0.8, rows_per_slice=512)
    assert abs(loss.item() - ref_loss.item()) <= 1e-3 * ref_loss.item()
    assert_close(x.grad, gx, 2e-2, "grad_hidden")
    if not frozen:
        assert_close(w.grad, gw, 2e-2, "grad_weight")
    else:
        assert w.grad is None


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("impl", ["chunked", "vocab_chunked", "fused"])
def test_fused_linear_llama3_head_half_flat_softmax(impl, dtype):
    """fp16/bf16 at the Llama-3-8B head under 2^16 loss scaling (exact in bf16's range), with a
    flat softmax over weight rows that share a direction, as a trained head's do.
    - fp16: at a mean's 1/N most logit-gradient entries would be zeros, and grad_hidden would
      lose the off-target part (0.4 off by CPU emulation at 4096 tokens).
    - both: each gradient row's rounding errors add up along the shared direction in grad_hidden
      unless moved onto w_y (utils.cancel_rounding; an H100 found chunked 5.5e-3 off in fp16
      without it, and bf16 is 6e-2 off on CPU at 512 x 2048)."""
    n, h, v = 8192, 4096, LLAMA3_VOCAB
    x, w = shared_direction_head(n, v, h, dtype, "cuda")
    x.requires_grad_(True)
    w.requires_grad_(True)
    y = random_labels((n,), v, "cuda", ignored=0.3)
    go = torch.tensor(2.0**16, device="cuda")
    fused_linear_tofu_loss(x, w, y, impl=impl).backward(go)
    _, gx, gw, _ = linear_oracle(x, w, y, gamma=3.0, beta=0.8, grad_output=go, rows_per_slice=512)
    # bf16 at 1e-2, not the usual 2e-2: by a round-to-nearest emulation of these inputs the
    # correction leaves ~2.5e-3, its absence ~2.1e-2, which 2e-2 would let through
    rtol = {torch.float16: LINEAR_GRAD_RTOL[torch.float16], torch.bfloat16: 1e-2}[dtype]
    assert_close(x.grad, gx, rtol, "grad_hidden")
    assert_close(w.grad, gw, LINEAR_GRAD_RTOL[dtype], "grad_weight")


def test_auto_follows_the_measured_table(monkeypatch):
    """impl="auto" runs the table's pick for this GPU's capability (bench/publish.py --auto),
    and the token-chunked impl when an option of that impl is given."""
    from tofu_kernels import fused_tofu, linear_tofu

    capability = "{}.{}".format(*torch.cuda.get_device_capability())
    table = {capability: {"train": "vocab_chunked", "frozen": "fused"}}
    monkeypatch.setattr(linear_tofu, "measured_impls", lambda: table)
    seen = []
    real = fused_tofu.recompute_partials

    def spy(*args, **kwargs):
        seen.append(args[5] if len(args) > 5 else kwargs.get("impl", "fused"))
        return real(*args, **kwargs)

    monkeypatch.setattr(fused_tofu, "recompute_partials", spy)
    x = torch.randn(64, 128, device="cuda", dtype=torch.bfloat16)
    w = (torch.randn(1000, 128, device="cuda") / 12).to(torch.bfloat16).requires_grad_(True)
    y = random_labels((64,), 1000, "cuda")
    fused_linear_tofu_loss(x, w, y).backward()
    fused_linear_tofu_loss(x, w.detach(), y)
    fused_linear_tofu_loss(x, w, y, chunk_size=16).backward()  # chunked: no partials
    assert seen == ["vocab_chunked", "fused"]


@pytest.mark.parametrize("impl", ["chunked", "vocab_chunked", "fused"])
def test_inductor_fullgraph_matches_eager(impl):
    x = torch.randn(2, 256, 512, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = (torch.randn(32000, 512, device="cuda") / 20).to(torch.bfloat16).requires_grad_(True)
    y = random_labels((2, 256), 32000, "cuda", ignored=0.3)

    def step(x, w, y):
        return fused_linear_tofu_loss(torch.tanh(x), w, y, impl=impl)

    compiled = torch.compile(step, fullgraph=True)
    results = []
    for fn in (step, compiled):
        loss = fn(x, w, y)
        results.append((loss, *torch.autograd.grad(loss, (x, w))))
    for got, want in zip(results[1], results[0], strict=True):
        assert_close(got, want, 1e-2, "inductor vs eager")


def test_fused_fp32_with_bias_and_softcap_against_oracle():
    """fp32 inputs (IEEE dots on CUDA cores) through the GPU compiler: the fused kernels' fp32
    launch configs are their own (the tables' "FP32": the backward's where ptxas keeps its
    registers, the forward's BLOCK_K the same), which no other GPU test runs. An odd
    vocabulary, bias and softcap."""
    f32 = torch.float32
    x, w, b, y = make_inputs((1024,), 1024, 32003, f32, "cuda", bias=True)
    for t in (x, w, b):
        t.requires_grad_(True)
    loss = fused_linear_tofu_loss(x, w, y, bias=b, softcap=30.0, impl="fused")
    loss.backward()
    ref_loss, gx, gw, gb = linear_oracle(x, w, y, bias=b, gamma=3.0, beta=0.8, softcap=30.0)
    assert_close(loss, ref_loss, LINEAR_LOSS_RTOL[f32], "loss")
    for got, want, what in ((x.grad, gx, "hidden"), (w.grad, gw, "weight"), (b.grad, gb, "bias")):
        assert_close(got, want, LINEAR_GRAD_RTOL[f32], f"grad_{what}")


def test_fused_bulk_reduce_llama3_head_bf16_against_oracle(monkeypatch):
    """impl="fused" with TMA_REDUCE (bulk tensor reductions, sm_90 on) at the Llama-3-8B head,
    grad_weight summed in fp32 and by bf16 adds into the gradient (accum_dtype=None). Last in
    the file: a fault in these untried reductions would poison the process's CUDA context for
    every test after it."""
    from tofu_kernels import fused_tofu

    major, minor = torch.cuda.get_device_capability()
    if major < 9:
        pytest.skip("bulk tensor reductions need sm_90 or later")
    cfg = fused_tofu.fused_config(fused_tofu.BWD_CONFIGS, (major, minor), torch.bfloat16)
    monkeypatch.setitem(fused_tofu.BWD_CONFIGS, (major, minor), {**cfg, "TMA_REDUCE": True})
    descs = returns_of(monkeypatch, fused_tofu, "_reduce_descriptors")
    n, h, v = 8192, 4096, LLAMA3_VOCAB
    x = torch.randn(n, h, device="cuda", dtype=torch.bfloat16)
    w = (torch.randn(v, h, device="cuda") * 3 / h**0.5).to(torch.bfloat16)
    y = random_labels((n,), v, "cuda", ignored=0.3)
    ref_loss, gx, gw, _ = linear_oracle(x, w, y, gamma=3.0, beta=0.8, rows_per_slice=512)
    for accum_dtype in (torch.float32, None):
        xg, wg = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
        loss = fused_linear_tofu_loss(xg, wg, y, impl="fused", accum_dtype=accum_dtype)
        loss.backward()
        assert abs(loss.item() - ref_loss.item()) <= 1e-3 * ref_loss.item()
        assert_close(xg.grad, gx, 2e-2, f"grad_hidden, accum_dtype={accum_dtype}")
        assert_close(wg.grad, gw, 2e-2, f"grad_weight, accum_dtype={accum_dtype}")
    # every backward launch took the bulk path
    assert descs and all(d is not None for pair in descs for d in pair)
