"""Fused LM-head TOFU loss: ``hidden @ weight.T (+ bias)`` and TOFU, chunk by chunk of tokens.

The full ``(N, V)`` logits never exist: each chunk of tokens gets its logits in one reused buffer,
the TOFU kernel turns them into per-token losses and, in place, into the logits' gradient, and two
GEMMs fold that gradient into ``grad_hidden`` (this chunk's rows) and ``grad_weight`` (summed over
chunks in fp32). Gradients are produced in forward; backward only scales them by ``grad_output``
(and, in fp16, by the power of two they were stored over).

The public :func:`fused_linear_tofu_loss` also dispatches to the impls that recompute in backward
(``tofu_kernels.vocab_chunked``, ``tofu_kernels.fused_tofu``).
"""

from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import triton
import triton.language as tl

from tofu_kernels.fused_tofu import FusedParams, FusedTOFUFunction, shard_layout
from tofu_kernels.tofu import tofu_fwd, tofu_fwd_torch
from tofu_kernels.utils import (
    HALF_DTYPES,
    KERNEL_DTYPES,
    LAUNCH_OPTIONS,
    TORCH_DTYPES,
    TOFUParams,
    TOFUStats,
    accumulate,
    cancel_rounding,
    check_accum_dtype,
    check_backward,
    check_label_range,
    check_labels,
    check_num_items,
    check_tensor,
    check_triton_device,
    half_range,
    headroom,
    mm_fp32,
    pow2_near,
    reduce_loss,
    reduction_scale,
    rows_gain,
    use_triton,
)

LINEAR_IMPLS = ("auto", "chunked", "vocab_chunked", "fused", "torch")
# impls that save O(N) per-row terms and compute the gradients in backward
RECOMPUTE_IMPLS = ("vocab_chunked", "fused")
# impl="auto" on a GPU: the impl that `bench/publish.py --auto` found fastest in a committed
# benchmark run (bf16), per compute capability ("9.0") and regime ("train": grad_weight too,
# "frozen": a LoRA head); chunked where nothing was measured.
AUTO_TABLE = Path(__file__).with_name("auto_impl.json")


@functools.cache
def measured_impls() -> dict:
    """The contents of :data:`AUTO_TABLE`: ``{"9.0": {"train": impl, "frozen": impl, ...}}``."""
    return json.loads(AUTO_TABLE.read_text()) if AUTO_TABLE.exists() else {}


@torch.compiler.assume_constant_result  # a compiled graph bakes the pick in, reads no file
def auto_impl(device: torch.device, frozen: bool) -> str:
    """What ``impl="auto"`` runs on the CUDA ``device`` for a trained or ``frozen`` head: the
    measured pick for its exact compute capability (the fused kernels' shared memory differs
    within a major), never ``fused`` (atomics) under ``torch.use_deterministic_algorithms``."""
    major, minor = torch.cuda.get_device_capability(device)
    entry = measured_impls().get(f"{major}.{minor}", {})
    impl = entry.get("frozen" if frozen else "train", "chunked")
    if impl == "fused" and torch.are_deterministic_algorithms_enabled():
        return "chunked"
    return impl if impl in ("chunked", *RECOMPUTE_IMPLS) else "chunked"


# Default chunk: its logits about the size of `hidden` (N * H elements), but at least this many
# rows, so the grad_weight GEMM (K = chunk rows) is not starved on large vocabularies.
MIN_CHUNK_ROWS = 256
# ...and, where grad_weight is accumulated, at least this many rows per 4 bytes of accumulator:
# every chunk reads and writes the (V, H) accumulator once (8 V H bytes in fp32) against its
# GEMMs' 6 rows V H flops, about a tenth of their time at 2048 rows on an H100. Measured there
# at the Llama-3-8B head, 8192 tokens, bf16: 262-row chunks 101 ms, 2048 rows 45 ms (fp32);
# 67 and 45 ms at 262 and 1024 rows with a bf16 accumulator (bench/results/*-sweep.md).
ACCUM_CHUNK_ROWS = 2048


@dataclass(frozen=True)
class LinearTOFUParams:
    """Non-tensor options of the fused LM-head loss (the TOFU options plus chunking)."""

    tofu: TOFUParams
    chunk_size: int | None = None
    accum_dtype: torch.dtype | None = torch.float32
    drop_ignored: bool = False


def default_chunk_size(n_rows: int, hidden: int, vocab: int, accum_bytes: int = 0) -> int:
    """Rows per chunk: the chunk's logits about as many elements as ``hidden``, and at least
    ``ACCUM_CHUNK_ROWS * accum_bytes / 4`` rows where a ``grad_weight`` accumulator of
    ``accum_bytes`` per entry is read and written once per chunk (0: none)."""
    rows = max(MIN_CHUNK_ROWS, math.ceil(n_rows * hidden / vocab))
    rows = max(rows, ACCUM_CHUNK_ROWS * accum_bytes // 4)
    return max(1, min(n_rows, rows))


def linear_tofu_fwd(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None,
    params: LinearTOFUParams,
    *,
    grad_scale: torch.Tensor | None = None,
    need_grad_hidden: bool = True,
    need_grad_weight: bool = True,
    need_grad_bias: bool = True,
) -> tuple[
    torch.Tensor,
    torch.Tensor,
    torch.Tensor | None,
    torch.Tensor | None,
    torch.Tensor | None,
    torch.Tensor,
]:
    """Chunked TOFU on ``hidden (N, H) @ weight (V, H).T + bias``; no input checks, no autograd.

    Returns ``(loss_rows, stats, grad_hidden, grad_weight, grad_bias, norms)``: per-token fp32
    losses and ``(4, N)`` stats as :func:`tofu_kernels.tofu.tofu_fwd`, and the gradients of
    ``sum_t grad_scale[t] * loss[t]`` (``grad_scale`` with 1 or N elements, fp32 or fp64;
    None means 1) for the inputs asked for, in the inputs' dtypes (None for the others), each
    divided by a power of two: ``norms`` (3,) holds them (the gradient is ``grad * norms[i]``;
    all 1 but in fp16). In fp16 the logits' gradient is formed with ``grad_scale`` over a power
    of two near its largest entry, times :func:`~tofu_kernels.utils.headroom`: fp16 has a narrow
    range, and at a mean's 1/N most of its entries would be subnormals or zeros. In fp16,
    ``grad_hidden`` is stored over a power of two near the weight's largest entry too (where
    that passes 1), and ``grad_weight`` and ``grad_bias``, sums over N rows, over a power of
    two near their largest entry (fp32 accumulator) or near N (fp16 accumulator, by
    :func:`rows_gain`).
    """
    tofu = params.tofu
    n, h = hidden.shape
    vocab = weight.shape[0]
    device, dtype = hidden.device, hidden.dtype
    any_grad = need_grad_hidden or need_grad_weight or need_grad_bias
    rows_fwd = tofu_fwd if use_triton(tofu.impl, device, dtype) else tofu_fwd_torch

    out_dtype = torch.float64 if dtype == torch.float64 else torch.float32  # of losses and stats
    loss = torch.zeros(n, dtype=out_dtype, device=device)
    stats = torch.zeros(4, n, dtype=out_dtype, device=device)
    rows = None
    if params.drop_ignored and n:
        # Only valid rows go through the GEMMs; finding them costs a host sync on a GPU.
        rows = (labels != tofu.ignore_index).nonzero().squeeze(1)
        hidden, labels = hidden[rows], labels[rows]
        if grad_scale is not None and grad_scale.numel() > 1:
            grad_scale = grad_scale[rows]
    m = hidden.shape[0]

    acc_dtype = torch.promote_types(params.accum_dtype or weight.dtype, weight.dtype)
    # fp16: the kernel's gradient peaks near the headroom (the largest grad_scale over a power of
    # two near it, times the headroom); `norm` undoes that exactly. bf16 and fp32 have the range
    # to store it at its own scale (a power of two would change no digit), so that backward's
    # factor is grad_output itself: 1 in the usual loss.backward(), which scale_unless_one skips
    room = headroom(dtype)
    norm = torch.full(
        (1,), 1.0 / room, dtype=torch.promote_types(dtype, torch.float32), device=device
    )
    if any_grad and half_range(dtype) and grad_scale is not None and grad_scale.numel():
        norm = pow2_near(grad_scale.abs().max().reshape(1).to(norm.dtype)) / room
        grad_scale = grad_scale / norm
    elif any_grad and grad_scale is None and room != 1.0:
        grad_scale = norm.reciprocal()
    # an fp16 accumulator takes each chunk's sum times ~1/rows: at ~1 per row it would overflow
    alpha = rows_gain(m, acc_dtype)
    g_hidden = hidden.new_empty(hidden.shape) if need_grad_hidden else None  # contiguous
    g_weight = (
        torch.zeros(weight.shape, dtype=acc_dtype, device=device) if need_grad_weight else None
    )
    g_bias = torch.zeros(vocab, dtype=acc_dtype, device=device) if need_grad_bias else None

    # (a GPU's rule: a CPU's GEMMs are slow enough that the accumulator pass costs little)
    acc_bytes = acc_dtype.itemsize if need_grad_weight and device.type == "cuda" else 0
    chunk = params.chunk_size or default_chunk_size(m, h, vocab, acc_bytes)
    buffer = torch.empty((min(chunk, m), vocab), dtype=dtype, device=device)
    loss_m = torch.empty(m, dtype=out_dtype, device=device)
    stats_m = torch.empty(4, m, dtype=out_dtype, device=device)
    # grad_hidden sums a half-precision gradient over the vocabulary: in fp32, with its rows'
    # rounding errors moved onto their targets' weight rows (utils.cancel_rounding)
    half = dtype in HALF_DTYPES
    err = torch.empty(m, dtype=torch.float32, device=device) if half and need_grad_hidden else None
    # fp16 grad_hidden is stored at the logits' gradient's scale (a row's absolute sum is up to
    # 2 g sqrt(2) times the headroom, ~3.7 of it at gamma 3), times the weight: over a power of
    # two near the weight's largest entry where that passes 1 (then under 1024 g), or weights
    # of a few hundred would overflow 65504. One outlier entry shrinks every row alike.
    norm_h, shrink = norm, None
    if need_grad_hidden and half_range(dtype) and m:
        lo, hi = torch.aminmax(weight)  # no (V, H) temporary, as abs() would make
        shrink = pow2_near(torch.maximum(-lo, hi).float().clamp(min=1).reshape(1)).reciprocal()
        norm_h = norm / shrink
    for s in range(0, m, chunk):
        e = min(m, s + chunk)
        x = hidden[s:e]
        z = buffer[: e - s]
        if bias is None:
            torch.mm(x, weight.t(), out=z)
        else:
            torch.addmm(bias, x, weight.t(), out=z)
        scale = grad_scale if grad_scale is None or grad_scale.numel() == 1 else grad_scale[s:e]
        loss_m[s:e], stats_m[:, s:e], g = rows_fwd(
            z, labels[s:e], tofu.gamma, tofu.beta, tofu.ignore_index, tofu.softcap, any_grad,
            z, scale, grad_err=err[s:e] if err is not None else None,
        )  # fmt: skip
        if g_hidden is not None and err is None:
            torch.mm(g, weight, out=g_hidden[s:e])
        elif g_hidden is not None:
            gh = mm_fp32(g, weight)
            cancel_rounding(gh, err[s:e], weight, labels[s:e])
            if shrink is None:
                g_hidden[s:e] = gh
            else:
                torch.mul(gh, shrink, out=g_hidden[s:e])  # exact, then rounded once
        if g_weight is not None:
            accumulate(g_weight, g.t(), x, alpha)
        if g_bias is not None:
            g_bias.add_(g.sum(0, dtype=torch.promote_types(acc_dtype, torch.float32)), alpha=alpha)

    if rows is None:
        loss, stats = loss_m, stats_m
    else:
        loss[rows] = loss_m
        stats[:, rows] = stats_m
        if g_hidden is not None:
            g_hidden = torch.zeros((n, h), dtype=dtype, device=device).index_copy_(
                0, rows, g_hidden
            )
    g_weight, norm_w = _stored(g_weight, weight.dtype, norm / alpha)
    g_bias, norm_b = _stored(g_bias, bias.dtype if bias is not None else dtype, norm / alpha)
    return loss, stats, g_hidden, g_weight, g_bias, torch.cat([norm_h, norm_w, norm_b])


def _stored(
    acc: torch.Tensor | None, dtype: torch.dtype, norm: torch.Tensor
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """An accumulated gradient (times ``1 / norm``) cast to ``dtype``, and its new ``norm``: an
    fp32 sum over N rows cast to fp16 is first divided by a power of two near its largest entry
    (exact), so that it neither overflows nor falls into subnormals."""
    if acc is None or acc.dtype == dtype or not half_range(dtype):
        return (acc.to(dtype) if acc is not None else None), norm
    lo, hi = torch.aminmax(acc)  # no (V, H) temporary, as abs() would make
    peak = pow2_near(torch.maximum(-lo, hi).reshape(1)).to(norm.dtype)
    out = torch.empty(acc.shape, dtype=dtype, device=acc.device)
    return torch.div(acc, peak, out=out), norm * peak  # divided and cast in one pass


@torch.library.custom_op("tofu_kernels::linear_tofu_chunked", mutates_args=())
def linear_tofu_op(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None,
    grad_scale: torch.Tensor | None,
    gamma: float,
    beta: float,
    ignore_index: int,
    softcap: float | None,
    rows_impl: str,
    chunk_size: int | None,
    accum_dtype: torch.dtype | None,
    drop_ignored: bool,
    needs: list[bool],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`linear_tofu_fwd` as an opaque op for ``torch.compile``; gradients that were not
    asked for come back empty."""
    tofu = TOFUParams(gamma, beta, ignore_index, "sum", softcap, rows_impl)
    params = LinearTOFUParams(tofu, chunk_size, accum_dtype, drop_ignored)
    loss, stats, *grads, norms = linear_tofu_fwd(
        hidden, weight, labels, bias, params, grad_scale=grad_scale,
        need_grad_hidden=needs[0], need_grad_weight=needs[1], need_grad_bias=needs[2],
    )  # fmt: skip
    return loss, stats, *(g if g is not None else hidden.new_empty(0) for g in grads), norms


@linear_tofu_op.register_fake
def _(hidden, weight, labels, bias, grad_scale, gamma, beta, ignore_index, softcap, rows_impl,
      chunk_size, accum_dtype, drop_ignored, needs):  # fmt: skip
    n = hidden.shape[0]
    dtype = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    # contiguous, as the op makes them (empty_like would copy a transposed input's strides,
    # and inductor asserts the fake's); a fresh empty tensor for each gradient not needed
    return (
        hidden.new_empty(n, dtype=dtype),
        hidden.new_empty(4, n, dtype=dtype),
        hidden.new_empty(hidden.shape) if needs[0] else hidden.new_empty(0),
        weight.new_empty(weight.shape) if needs[1] else hidden.new_empty(0),
        bias.new_empty(bias.shape) if needs[2] and bias is not None else hidden.new_empty(0),
        hidden.new_empty(3, dtype=dtype),
    )


def _call_linear_op(x, weight, y, bias, params, grad_scale, needs):
    tofu = params.tofu
    loss, stats, *grads, norms = linear_tofu_op(
        x, weight, y, bias, grad_scale, tofu.gamma, tofu.beta, tofu.ignore_index, tofu.softcap,
        tofu.impl, params.chunk_size, params.accum_dtype, params.drop_ignored, list(needs),
    )  # fmt: skip
    grads = [g if need else None for g, need in zip(grads, needs, strict=True)]
    return loss, stats, *grads, norms


# Launch config of the backward's scaling pass (memory-bound): elements per program, warps.
SCALE_CONFIG = dict(BLOCK=4096, num_warps=4)


@triton.jit
def _scale_unless_one_kernel(
    # pointers: the gradient (n elements, contiguous), scaled in place; the fp32 factor (1,)
    g_ptr, factor_ptr,
    # size
    n,
    # meta
    BLOCK: tl.constexpr,
):  # fmt: skip
    factor = tl.load(factor_ptr)
    if factor != 1.0:  # the usual loss.backward(): no memory traffic at all
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        g = tl.load(g_ptr + offs, mask=mask).to(tl.float32)
        tl.store(g_ptr + offs, (g * factor).to(g_ptr.dtype.element_ty), mask=mask)


@torch.library.custom_op("tofu_kernels::scale_unless_one", mutates_args=("grad",))
def _scale_unless_one_op(grad: torch.Tensor, factor: torch.Tensor) -> None:
    n = grad.numel()
    if n:
        _scale_unless_one_kernel[(triton.cdiv(n, SCALE_CONFIG["BLOCK"]),)](
            grad, factor, n, **SCALE_CONFIG, **LAUNCH_OPTIONS
        )


def scale_unless_one(grad: torch.Tensor, factor: torch.Tensor) -> None:
    """``grad *= factor`` (a device scalar), rounded once. On a GPU, a kernel reads the factor
    and leaves ``grad`` untouched where it is 1 (the usual ``loss.backward()``, with bf16/fp32
    gradients stored at their own scale): no pass over a 1 GB ``grad_weight`` and no host sync
    (Liger's backward asks the host, ``torch.equal``, to skip its pass)."""
    if use_triton("auto", grad.device, grad.dtype) and grad.is_contiguous():
        _scale_unless_one_op(grad, factor.reshape(1).to(torch.float32))
    else:  # an fp32 (or fp64) factor with a dimension: grad is rounded once
        grad.mul_(factor.reshape((1,) * grad.ndim))


class LinearTOFUFunction(torch.autograd.Function):
    """Mean/sum: gradients made in forward (fp16 at a unit scale), scaled in backward. "none":
    recomputed in backward, since a per-token ``grad_output`` must weigh each row before the sum
    into ``grad_weight``."""

    @staticmethod
    def forward(
        ctx,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        labels: torch.Tensor,
        num_items_in_batch: int | float | torch.Tensor | None,
        params: LinearTOFUParams,
        needs: tuple[bool, bool, bool],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        tofu = params.tofu
        x = hidden.reshape(-1, hidden.shape[-1])
        y = labels.reshape(-1)
        compute_dtype = torch.promote_types(x.dtype, torch.float32)
        scale = reduction_scale(y, tofu, num_items_in_batch, compute_dtype)
        deferred = tofu.reduction == "none" and any(needs)
        fwd_needs = tuple(need and not deferred for need in needs)
        grad_scale = None if scale is None else scale.reshape(1)
        # fp16 stored at about 1 (a mean's 1/N would put its gradients into subnormals, where
        # fp16 loss scaling in backward could not win their digits back), times `norms` in
        # backward; bf16 and fp32 at their own scale (`norms` 1)
        loss_rows, row_stats, *grads, norms = _call_linear_op(
            x, weight, y, bias, params, grad_scale, fwd_needs
        )
        ctx.params, ctx.needs, ctx.deferred = params, needs, deferred
        ctx.compute_dtype = compute_dtype
        ctx.hidden_shape = hidden.shape
        if deferred:
            ctx.save_for_backward(x, weight, bias, y)
        else:
            ctx.save_for_backward(*grads, norms)
        ctx.mark_non_differentiable(row_stats)
        return reduce_loss(loss_rows, labels.shape, tofu, scale), row_stats

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor, _grad_stats: torch.Tensor | None):
        # "none" recomputes from saved inputs, so only mean/sum consume their gradients
        check_backward(ctx, "fused_linear_tofu_loss", consumes=not ctx.deferred)
        if ctx.deferred:
            x, weight, bias, y = ctx.saved_tensors
            # contiguous: a grad_output from .sum() is an expanded, stride-0 view
            grad_scale = grad_loss.reshape(-1).to(ctx.compute_dtype).contiguous()
            _, _, *grads, norms = _call_linear_op(
                x, weight, y, bias, ctx.params, grad_scale, ctx.needs
            )
            factor = 1.0  # already weighed by grad_output
        else:
            *grads, norms = ctx.saved_tensors
            factor = grad_loss.to(norms.dtype)
        for i, g in enumerate(grads):
            if g is not None:
                scale_unless_one(g, norms[i] * factor)
        g_hidden, g_weight, g_bias = grads
        if g_hidden is not None:
            g_hidden = g_hidden.view(ctx.hidden_shape)
        return g_hidden, g_weight, g_bias, None, None, None, None


def fused_linear_tofu_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    gamma: float = 3.0,
    beta: float = 0.8,
    ignore_index: int = -100,
    reduction: str = "mean",
    num_items_in_batch: int | torch.Tensor | None = None,
    softcap: float | None = None,
    chunk_size: int | None = None,
    impl: str = "auto",
    return_stats: bool = False,
    accum_dtype: torch.dtype | None = torch.float32,
    drop_ignored: bool | None = None,
    filter_eps: float | None = None,
    process_group: torch.distributed.ProcessGroup | None = None,
) -> torch.Tensor | tuple[torch.Tensor, TOFUStats]:
    r"""TOFU loss of an LM head, without materializing the ``(tokens, vocabulary)`` logits.

    Equivalent PyTorch::

        logits = hidden @ weight.T + bias          # (..., V), in hidden's dtype
        loss = tofu_loss(logits, labels, gamma=gamma, beta=beta, ...)

    (see :func:`tofu_kernels.tofu_loss` for the loss, reductions and options), computed without
    ever holding the ``(N, V)`` logits: by chunks of tokens or of vocabulary columns, or inside
    one Triton kernel (``impl``). Peak memory above the inputs and gradients is one chunk of
    logits plus, per impl, an fp32 gradient accumulator (see ``accum_dtype``).

    Args:
        hidden: ``(..., H)`` fp32/bf16/fp16 final hidden states (under ``torch.autocast``, cast to
            the autocast dtype together with ``weight`` and ``bias``, as ``F.linear`` would be).
        weight: ``(V, H)`` LM-head weight, same dtype as ``hidden``; a frozen weight (LoRA) skips
            the ``grad_weight`` GEMMs and accumulator entirely.
        labels: ``(...)`` class ids in ``[0, V)`` or ``ignore_index`` (no shift is applied).
        bias: optional ``(V,)``.
        chunk_size: tokens per chunk; default: the chunk's logits about the size of ``hidden``
            (at least ``MIN_CHUNK_ROWS`` rows), and at least 2048 rows (1024 with a 2-byte
            accumulator) where ``grad_weight`` is accumulated. Smaller chunks save memory, but
            each reads and writes the ``(V, H)`` accumulator once, and the ``grad_weight`` GEMM
            (inner dimension = chunk) becomes memory-bound. For
            ``impl="vocab_chunked"``: vocabulary columns per chunk (default H, at least 2048;
            the token slabs of ``accum_dtype=None`` use the same chunks).
        impl: ``"chunked"`` (cuBLAS GEMMs + the Triton TOFU kernel, over chunks of tokens,
            gradients made in forward), ``"vocab_chunked"`` (the same over chunks of vocabulary
            columns, O(N) saved floats, recomputed in backward: each chunk's ``grad_weight``
            rows come from one GEMM over all tokens, no accumulator), ``"fused"`` (the
            projection inside Triton too: logits only in registers, O(N) saved floats,
            recomputed in backward), ``"torch"`` (the chunked algorithm, TOFU in PyTorch) or
            ``"auto"``: on a GPU, the impl a committed benchmark run (bf16) measured fastest on
            its compute capability for a trained or frozen head (``tofu_kernels/
            auto_impl.json``; chunked where none was, whenever ``chunk_size``,
            ``drop_ignored`` or an ``accum_dtype`` other than fp32 is given, and for fp64; not
            fused under ``torch.use_deterministic_algorithms``); chunked under
            ``TRITON_INTERPRET=1``, torch for CPU tensors.
        accum_dtype: dtype of the ``grad_weight``/``grad_bias`` accumulator; None accumulates
            ``grad_weight`` in the weight's dtype: no (V, H) fp32 buffer, Liger's (chunked: one
            rounding per chunk) and CCE's (fused: atomics into the gradient, one rounding per
            token block) memory, at up to ~1.2e-2 of the largest entry at the Llama-3 head in
            bf16 against ~3.5e-3 with fp32 (``bench/accum_precision.py``). vocab_chunked has no
            such accumulator; with None (in bf16/fp16) it runs its backward over token slabs
            (a quarter of the tokens, at most 2048): ``grad_hidden`` summed in a slab-sized
            fp32 buffer instead of an (N, H) one, ``grad_weight`` rounded once per slab (its
            error grows with the number of slabs: ~6.3e-3 at 8192 tokens in bf16). The
            recompute impls take fp32 or None, and always sum ``grad_hidden`` in fp32: in bf16
            the fused impl's V / 128 tile products per entry would be ~0.1 off.
        drop_ignored: run only valid tokens through the GEMMs. Default: on for CPU tensors; on a
            GPU it needs one host-device sync (the number of valid tokens), so it is opt-in there.
        filter_eps: ``impl="fused"`` only: skip gradient work whose every entry is at most
            ``filter_eps`` times the largest entry of the logits' gradient (confident tokens,
            far-off vocabulary tiles; with softcap, times the largest of each row's target and
            row max entries, ``1 - tanh^2`` included: at most the largest). None:
            ``2**-12`` for bf16/fp16, exact zeros only for fp32; 0 disables it.
        process_group: vocabulary parallel. ``weight`` (and ``bias``) are then this rank's
            contiguous shard of the vocabulary (shards in rank order, any sizes), ``labels`` hold
            global ids, and ``hidden`` is the same on every rank. Every rank gets the global
            loss, the gradient of its shard and the full ``grad_hidden``. Runs on the fused and
            vocab_chunked impls (``auto``: fused, or vocab_chunked under
            ``torch.use_deterministic_algorithms``; GPU, or ``TRITON_INTERPRET=1``); each call
            all-gathers the shard sizes on the device (no host sync).
        return_stats: also return :class:`TOFUStats`.

    Returns:
        As :func:`tofu_kernels.tofu_loss`. With ``reduction="none"`` the gradients are recomputed
        in backward (the per-token ``grad_output`` must weigh rows before they are summed).

    Example::

        >>> hidden = torch.randn(2, 64, 256, requires_grad=True)
        >>> lm_head = torch.nn.Linear(256, 32000, bias=False)
        >>> labels = torch.randint(0, 32000, (2, 64))
        >>> loss = fused_linear_tofu_loss(hidden, lm_head.weight, labels)
        >>> loss.backward()
    """
    if impl not in LINEAR_IMPLS:
        raise ValueError(f"impl must be one of {LINEAR_IMPLS}, got {impl!r}")
    # the TOFU kernel's impl: "chunked" runs the Triton kernel on every device
    rows_impl = "torch" if impl == "torch" else ("triton" if impl == "chunked" else "auto")
    tofu = TOFUParams(gamma, beta, ignore_index, reduction, softcap, rows_impl)  # validates
    check_tensor("hidden", hidden, TORCH_DTYPES)
    check_tensor("weight", weight, TORCH_DTYPES)
    if weight.ndim != 2 or weight.shape[0] == 0:
        raise ValueError(f"weight must be (V, H) with V >= 1, got {tuple(weight.shape)}")
    if hidden.ndim == 0 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"hidden must be (..., H) with H = weight.shape[1] = {weight.shape[1]}, "
            f"got {tuple(hidden.shape)}"
        )
    if bias is not None:
        check_tensor("bias", bias, TORCH_DTYPES)
        if bias.shape != (weight.shape[0],):
            raise ValueError(f"bias must be ({weight.shape[0]},), got {tuple(bias.shape)}")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and t.device != hidden.device:
            raise ValueError(f"{name} is on {t.device}, expected {hidden.device} (hidden's)")
    swapped = "hidden and weight look swapped: the order is (hidden, weight, labels) (Liger's "
    swapped += "fused linear cross-entropy takes (weight, input, target))"
    labels = check_labels(labels, hidden.shape[:-1], hidden.device, ((weight.shape[:1], swapped),))
    check_num_items(num_items_in_batch)
    if chunk_size is not None and (
        isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1
    ):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    # NaN or inf zeroed every gradient; 1 or more skips every row, as documented (a test's switch)
    if filter_eps is not None and (
        isinstance(filter_eps, bool)
        or not isinstance(filter_eps, (int, float))
        or not 0 <= filter_eps < math.inf
    ):
        raise ValueError(f"filter_eps must be a finite number >= 0 or None, got {filter_eps!r}")

    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        hidden, weight = hidden.to(dtype), weight.to(dtype)
        bias = bias.to(dtype) if bias is not None else None
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and t.dtype != hidden.dtype:
            raise TypeError(
                f"{name} has dtype {t.dtype} but hidden has {hidden.dtype}; cast them to one "
                "dtype or run under torch.autocast"
            )
    check_accum_dtype(accum_dtype)
    vocab_offset, vocab = 0, weight.shape[0]
    if process_group is not None:
        if impl not in ("auto", *RECOMPUTE_IMPLS) or not use_triton(
            "auto", hidden.device, hidden.dtype
        ):
            raise ValueError(
                f"process_group (vocabulary parallel) runs on impl in {RECOMPUTE_IMPLS} (auto: "
                f"fused), which need CUDA tensors (or TRITON_INTERPRET=1) of {KERNEL_DTYPES}; "
                f"got impl={impl!r} and {hidden.dtype} on {hidden.device}"
            )
        if impl == "auto":  # fused adds with atomics
            deterministic = torch.are_deterministic_algorithms_enabled()
            impl = "vocab_chunked" if deterministic else "fused"
        vocab_offset, global_vocab = shard_layout(weight.shape[0], process_group, hidden.device)
        # the labels' range is checked on CPU only, where reading the size is free
        vocab = int(global_vocab) if hidden.device.type == "cpu" else None
    if (
        impl == "auto"
        and hidden.device.type == "cuda"
        and hidden.dtype in KERNEL_DTYPES
        and chunk_size is None  # options of the token-chunked algorithm keep it
        and drop_ignored is None
        and accum_dtype == torch.float32  # as measured
    ):
        impl = auto_impl(
            hidden.device, frozen=not (torch.is_grad_enabled() and weight.requires_grad)
        )
    if impl in ("chunked", *RECOMPUTE_IMPLS):
        if hidden.dtype not in KERNEL_DTYPES:
            raise TypeError(f"impl={impl!r} takes {KERNEL_DTYPES} inputs, got {hidden.dtype}")
        check_triton_device(impl, hidden.device)
    if impl in RECOMPUTE_IMPLS and accum_dtype not in (None, torch.float32, weight.dtype):
        raise ValueError(
            f"impl={impl!r} accumulates grad_weight in fp32 or, with accum_dtype=None, in the "
            f"weight's dtype; got accum_dtype={accum_dtype}"
        )
    if vocab is not None:
        check_label_range(labels, vocab, ignore_index)

    grad_on = torch.is_grad_enabled()
    needs = (
        grad_on and hidden.requires_grad,
        grad_on and weight.requires_grad,
        grad_on and bias is not None and bias.requires_grad,
    )
    with torch.autocast(device_type, enabled=False):
        if impl in RECOMPUTE_IMPLS:
            fused = FusedParams(
                tofu, filter_eps, accum_dtype is not None and accum_dtype != weight.dtype,
                process_group, vocab_offset, impl, chunk_size,
            )  # fmt: skip
            loss, row_stats = FusedTOFUFunction.apply(
                hidden, weight, bias, labels, num_items_in_batch, fused, needs
            )
        else:
            if drop_ignored is None:  # free on CPU; a host sync on a GPU
                drop_ignored = hidden.device.type == "cpu"
            params = LinearTOFUParams(tofu, chunk_size, accum_dtype, drop_ignored)
            loss, row_stats = LinearTOFUFunction.apply(
                hidden, weight, bias, labels, num_items_in_batch, params, needs
            )
    if return_stats:
        return loss, TOFUStats.from_rows(row_stats, labels, ignore_index)
    return loss


class FusedLinearTOFULoss(torch.nn.Module):
    """Module form of :func:`fused_linear_tofu_loss`; ``forward(hidden, weight, labels, bias)``."""

    def __init__(
        self,
        gamma: float = 3.0,
        beta: float = 0.8,
        ignore_index: int = -100,
        reduction: str = "mean",
        softcap: float | None = None,
        chunk_size: int | None = None,
        impl: str = "auto",
        return_stats: bool = False,
        accum_dtype: torch.dtype | None = torch.float32,
        drop_ignored: bool | None = None,
        filter_eps: float | None = None,
        process_group: torch.distributed.ProcessGroup | None = None,
    ) -> None:
        super().__init__()
        TOFUParams(gamma, beta, ignore_index, reduction, softcap)  # fail at construction
        if impl not in LINEAR_IMPLS:
            raise ValueError(f"impl must be one of {LINEAR_IMPLS}, got {impl!r}")
        self.gamma, self.beta, self.ignore_index = gamma, beta, ignore_index
        self.reduction, self.softcap, self.chunk_size = reduction, softcap, chunk_size
        self.impl, self.return_stats, self.accum_dtype = impl, return_stats, accum_dtype
        self.drop_ignored, self.filter_eps = drop_ignored, filter_eps
        self.process_group = process_group

    def forward(
        self,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        labels: torch.Tensor,
        bias: torch.Tensor | None = None,
        num_items_in_batch: int | torch.Tensor | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, TOFUStats]:
        return fused_linear_tofu_loss(
            hidden,
            weight,
            labels,
            bias=bias,
            gamma=self.gamma,
            beta=self.beta,
            ignore_index=self.ignore_index,
            reduction=self.reduction,
            num_items_in_batch=num_items_in_batch,
            softcap=self.softcap,
            chunk_size=self.chunk_size,
            impl=self.impl,
            return_stats=self.return_stats,
            accum_dtype=self.accum_dtype,
            drop_ignored=self.drop_ignored,
            filter_eps=self.filter_eps,
            process_group=self.process_group,
        )

    def extra_repr(self) -> str:
        return f"gamma={self.gamma}, beta={self.beta}, reduction={self.reduction!r}"
