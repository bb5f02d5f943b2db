"""TOFU loss over materialized logits: Triton kernel, launcher, autograd Function, public API."""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from tofu_kernels.reference import tofu_rows
from tofu_kernels.utils import (
    LAUNCH_OPTIONS,
    TORCH_DTYPES,
    TOFUParams,
    TOFUStats,
    check_backward,
    check_label_range,
    check_labels,
    check_num_items,
    check_tensor,
    grad_multiplier,
    half_range,
    headroom,
    pow2_near,
    reduce_loss,
    reduction_scale,
    use_triton,
)

# Launch configuration: one program per row, streaming the vocabulary in tiles of BLOCK_V.
BLOCK_V_MAX = 4096
BLOCK_V_MIN = 128
NUM_WARPS_LARGE = 8  # tiles of 2048 columns and more
NUM_WARPS_SMALL = 4
# impl="torch" works on row chunks of about this many logits, so its temporaries stay bounded.
TORCH_CHUNK_ELEMENTS = 1 << 22


@triton.jit
def _log1p(x):
    """log(1 + x) for x >= 0 to full precision (Goldberg's trick; Triton has no core log1p)."""
    u = 1.0 + x
    return tl.where(u == 1.0, x, tl.log(u) * (x / (u - 1.0)))


@triton.jit
def _softplus(x):
    return tl.maximum(x, 0.0) + _log1p(tl.exp(-tl.abs(x)))


@triton.jit
def _capped(z, softcap):
    """``softcap * tanh(z / softcap)`` and its derivative ``1 - tanh^2``, from core ops
    (libdevice's tanh is not in the interpreter). The derivative as ``4t / (1 + t)^2`` with
    ``t = exp(-2 |z| / softcap)``: ``1 - (capped / softcap)^2`` cancels deep in saturation."""
    t = tl.exp(-2.0 * tl.abs(z / softcap))
    r = softcap * (1.0 - t) / (1.0 + t)
    return tl.where(z < 0, -r, r), 4.0 * t / ((1.0 + t) * (1.0 + t))


@triton.jit
def _cap(z, softcap, HAS_SOFTCAP: tl.constexpr):
    """fp32 logits, softcapped if asked (every load goes through here, so z_y matches its tile)."""
    if HAS_SOFTCAP:
        z, _ = _capped(z, softcap)
    return z


@triton.jit
def tofu_row_terms(s1x, sbx, zy_m, gamma, beta):
    """Per-row TOFU terms from the target-excluded sums (relative to the row max ``m``).

    s1x = sum_{j != y} exp(z_j - m), sbx = sum_{j != y} exp((z_j - m) / beta), zy_m = z_y - m.
    Returns (loss, g, p) by the spec's safe form: no NaN or inf for finite logits.
    """
    ell = tl.log(s1x) - zy_m  # log((1 - p) / p); -inf when the target holds all the mass
    # beta * softplus(ell_b) with ell_b = x / beta, from x: ell_b itself overflows fp32 for a
    # small beta (zy_m / beta: inf at beta 1e-37 and logits ~100) where the loss does not
    x = beta * tl.log(sbx) - zy_m
    sp = _softplus(ell)  # -log p
    # log1p(T) / T with T = e^ell, written so neither T -> 0 nor T -> inf gives 0/0.
    t = tl.exp(tl.minimum(ell, 0.0))
    u = 1.0 + t
    ratio_small = tl.where(u == 1.0, 1.0, tl.log(u) / (u - 1.0))
    big = tl.exp(-tl.maximum(ell, 0.0))  # 0 for ell = inf (z_y - m overflowed): not inf * 0
    ratio = tl.where(ell > 0, tl.where(big > 0, sp * big, 0.0), ratio_small)
    focal = tl.exp(-gamma * _softplus(-ell)) * (1.0 + gamma * ratio)
    g = tl.where(gamma == 0.0, 1.0, focal)  # a branch, not a power: exactly 1 at gamma = 0
    loss = g * (tl.maximum(x, 0.0) + beta * _log1p(tl.exp(-tl.abs(x) / beta)))
    return loss, g, tl.exp(-sp)


@triton.jit
def _tofu_fwd_kernel(
    # pointers: logits (N, V) read, labels (N,), per-row loss (N,) and stats (4, N), grad (N, V),
    # optional fp32 factor for the gradient rows (one per row, or one for all with stride 0),
    # optional fp32 (N,) sums of the stored gradient rows' rounding errors
    logits_ptr,
    labels_ptr,
    loss_ptr,
    stats_ptr,
    grad_ptr,
    grad_scale_ptr,
    err_ptr,
    row_norm_ptr,
    # strides in elements (rows of logits and grad may be padded; grad may alias logits)
    stride_logits,
    stride_grad,
    stride_stats,
    stride_grad_scale,
    # vocabulary size
    V,
    # TOFU parameters: runtime fp32 scalars, so new values do not recompile
    gamma,
    beta,
    softcap,
    ignore_index,
    # meta
    HAS_SOFTCAP: tl.constexpr,
    COMPUTE_GRAD: tl.constexpr,
    HAS_GRAD_SCALE: tl.constexpr,
    HAS_ERR: tl.constexpr,
    HAS_ROW_NORM: tl.constexpr,
    LOG2_ROOM: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    z_row = logits_ptr + row * stride_logits
    cols = tl.arange(0, BLOCK_V)
    inv_beta = 1.0 / beta

    y = tl.load(labels_ptr + row)
    valid = y != ignore_index
    in_range = (y >= 0) & (y < V)
    row_ok = valid & in_range
    y = tl.where(in_range, y, 0)  # never read outside the row, whatever the label
    # fp32 before any math: the interpreter keeps bf16 as raw bits
    zy = _cap(tl.load(z_row + y).to(tl.float32), softcap, HAS_SOFTCAP)
    zero = tl.zeros_like(zy)

    # Pass 1: running max m (started at the finite z_y) and every sum relative to it: the full
    # and target-excluded sums at temperatures 1 and beta, and sum_j e^(z_j-m) (z_j-m) for entropy;
    # m_before, the max left of the target (argmax takes the first of tied maxima).
    m = zy
    m_before = tl.full((), -float("inf"), tl.float32)
    s1 = zero
    s1x = zero
    sbx = zero
    sz = zero
    if row_ok:  # ignored rows skip the pass (a branch: loop bounds stay data-independent)
        for start in range(0, V, BLOCK_V):
            offs = start + cols
            mask = offs < V
            z = _cap(
                tl.load(z_row + offs, mask=mask, other=0.0).to(tl.float32), softcap, HAS_SOFTCAP
            )
            z = tl.where(mask, z, -float("inf"))
            m_new = tl.maximum(m, tl.max(z, axis=0))
            # relative to 0 while every logit so far is -inf (overflowed): not -inf - -inf
            m_ref = tl.where(m_new > -float("inf"), m_new, 0.0)
            alpha = tl.exp(m - m_ref)
            not_y = offs != y
            e1 = tl.exp(z - m_ref)
            eb = tl.exp((z - m_ref) * inv_beta)
            # 0 where (m - m_ref) or z - m_ref overflowed (logits ~3e38 apart): not 0 * inf
            shift = tl.where(alpha > 0, (m - m_ref) * s1, 0.0)
            sz = alpha * (sz + shift) + tl.sum(tl.where(e1 > 0, e1 * (z - m_ref), 0.0))
            s1 = alpha * s1 + tl.sum(e1, axis=0)
            s1x = alpha * s1x + tl.sum(tl.where(not_y, e1, 0.0), axis=0)
            sbx = tl.exp((m - m_ref) * inv_beta) * sbx + tl.sum(tl.where(not_y, eb, 0.0), axis=0)
            m_before = tl.maximum(m_before, tl.max(tl.where(offs < y, z, -float("inf")), axis=0))
            m = m_new

    zy_m = zy - m
    loss, g, p = tofu_row_terms(s1x, sbx, zy_m, gamma, beta)
    entropy = tl.log(s1) - sz / s1
    correct = tl.where((zy_m >= 0) & (m_before < zy), 1.0, 0.0)  # argmax == y
    loss = tl.where(in_range, loss, float("nan"))  # an out-of-range label is loud, never silent
    tl.store(loss_ptr + row, tl.where(valid, loss, zero))
    tl.store(stats_ptr + row, tl.where(row_ok, p, zero))
    tl.store(stats_ptr + stride_stats + row, tl.where(row_ok, g, zero))
    tl.store(stats_ptr + 2 * stride_stats + row, tl.where(row_ok, entropy, zero))
    tl.store(stats_ptr + 3 * stride_stats + row, tl.where(row_ok, correct, zero))

    if COMPUTE_GRAD:
        # Pass 2: g * (softmax(z / beta) - onehot), the target column as -g * sbx / sb (exact).
        g = tl.where(row_ok, g, 0.0)
        if HAS_GRAD_SCALE:
            g = g * tl.load(grad_scale_ptr + row * stride_grad_scale)
        m = tl.where(row_ok, m, float("inf"))  # rows without a loss write exact zeros
        sb = sbx + tl.exp(zy_m * inv_beta)
        if HAS_ROW_NORM:
            # fp16: the row over a power of two 2^k that brings its largest entry (the target's,
            # |g| sbx / sb, or below it) near 2^LOG2_ROOM, and 2^k stored for backward: at its
            # own scale a confident row (g and 1 - q_y both small) would flush to zeros that no
            # loss scale in backward brings back. k is clamped: 2^-k stays finite.
            peak = tl.abs(g) * (sbx / sb)
            k = tl.where(peak > 0, tl.floor(tl.log2(peak) + 0.5) - LOG2_ROOM, 0.0)
            k = tl.minimum(tl.maximum(k, -126.0), 126.0)
            g = g * tl.exp2(-k)
            tl.store(row_norm_ptr + row, tl.exp2(k))
        coef = g / sb
        target = tl.where(row_ok, -g * (sbx / sb), 0.0)
        g_row = grad_ptr + row * stride_grad
        err = zero
        for start in range(0, V, BLOCK_V):
            offs = start + cols
            mask = offs < V
            z = tl.load(z_row + offs, mask=mask, other=0.0).to(tl.float32)
            if HAS_SOFTCAP:
                z, slope = _capped(z, softcap)
            dz = tl.where(offs == y, target, tl.exp((z - m) * inv_beta) * coef)
            if HAS_SOFTCAP:
                dz = dz * slope
            stored = dz.to(grad_ptr.dtype.element_ty)
            tl.store(g_row + offs, stored, mask=mask)
            if HAS_ERR:
                err += tl.sum(tl.where(mask, stored.to(tl.float32) - dz, 0.0), axis=0)
        if HAS_ERR:
            tl.store(err_ptr + row, err)


def launch_config(vocab: int) -> tuple[int, int]:
    """(BLOCK_V, num_warps) for a row of ``vocab`` logits."""
    block = min(max(triton.next_power_of_2(vocab), BLOCK_V_MIN), BLOCK_V_MAX)
    return block, NUM_WARPS_LARGE if block >= 2048 else NUM_WARPS_SMALL


def _row_outputs(
    logits: torch.Tensor, dtype: torch.dtype, compute_grad: bool, grad: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Per-row loss ``(N,)`` and stats ``(4, N)`` in ``dtype``, and the gradient buffer (the given
    one, a new one in the logits' dtype, or None without ``compute_grad``)."""
    n, vocab = logits.shape
    loss = torch.empty(n, dtype=dtype, device=logits.device)
    stats = torch.empty(4, n, dtype=dtype, device=logits.device)
    if compute_grad and grad is None:
        grad = torch.empty((n, vocab), dtype=logits.dtype, device=logits.device)
    return loss, stats, grad if compute_grad else None


def tofu_fwd(
    logits: torch.Tensor,
    labels: torch.Tensor,
    gamma: float = 3.0,
    beta: float = 0.8,
    ignore_index: int = -100,
    softcap: float | None = None,
    compute_grad: bool = True,
    grad: torch.Tensor | None = None,
    grad_scale: torch.Tensor | None = None,
    grad_err: torch.Tensor | None = None,
    row_norm: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Per-token TOFU on ``(N, V)`` logits (unit column stride) with the Triton kernel; no checks.

    Returns ``(loss_rows, stats, grad)``: fp32 ``(N,)`` losses (0 at ``ignore_index``, NaN for a
    label outside ``[0, V)``), fp32 ``(4, N)`` stats (p, g, entropy, target-is-argmax) and, when
    ``compute_grad``, the unreduced gradient ``g * (softmax(z / beta) - onehot(y))`` (softcap
    chain rule included) in ``grad``: a given ``(N, V)`` buffer, which may be ``logits`` itself
    (in place), or a new one of the logits' dtype. ``grad_scale``, fp32 with 1 or N elements,
    multiplies the gradient rows (the reduction's scale, or a per-token upstream gradient).
    ``grad_err``, fp32 ``(N,)``, receives each stored gradient row's sum of rounding errors
    (stored minus exact; see :func:`~tofu_kernels.utils.cancel_rounding`). ``row_norm``, fp32
    ``(N,)``, receives a power of two per row that the stored row is divided by (its largest
    entry then near :func:`~tofu_kernels.utils.headroom`; :class:`TOFULossFunction` asks for it
    with fp16 logits and multiplies it back in backward).
    """
    n, vocab = logits.shape
    if logits.stride(1) != 1 and vocab > 1:  # one class: column 0 alone, any stride
        raise ValueError("tofu_fwd needs logits with unit stride along the vocabulary")
    labels = labels.contiguous()  # the kernel reads labels[row] and grad_scale[row] densely
    grad_scale = grad_scale.contiguous() if grad_scale is not None else None
    loss, stats, grad = _row_outputs(logits, torch.float32, compute_grad, grad)
    if n == 0:
        return loss, stats, grad
    block, num_warps = launch_config(vocab)
    _tofu_fwd_kernel[(n,)](
        logits,
        labels,
        loss,
        stats,
        grad if grad is not None else loss,
        grad_scale if grad_scale is not None else loss,
        grad_err if grad_err is not None else loss,
        row_norm if row_norm is not None else loss,
        logits.stride(0),
        grad.stride(0) if grad is not None else 0,
        stats.stride(0),
        1 if grad_scale is not None and grad_scale.numel() > 1 else 0,
        vocab,
        float(gamma),
        float(beta),
        float(softcap) if softcap is not None else 1.0,
        int(ignore_index),
        HAS_SOFTCAP=softcap is not None,
        COMPUTE_GRAD=grad is not None,
        HAS_GRAD_SCALE=grad_scale is not None,
        HAS_ERR=grad is not None and grad_err is not None,
        HAS_ROW_NORM=grad is not None and row_norm is not None,
        LOG2_ROOM=math.log2(headroom(logits.dtype)),
        BLOCK_V=block,
        num_warps=num_warps,
        **LAUNCH_OPTIONS,
    )
    return loss, stats, grad


def tofu_fwd_torch(
    logits: torch.Tensor,
    labels: torch.Tensor,
    gamma: float = 3.0,
    beta: float = 0.8,
    ignore_index: int = -100,
    softcap: float | None = None,
    compute_grad: bool = True,
    grad: torch.Tensor | None = None,
    grad_scale: torch.Tensor | None = None,
    grad_err: torch.Tensor | None = None,
    row_norm: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """:func:`tofu_fwd` in plain PyTorch, in row chunks of about ``TORCH_CHUNK_ELEMENTS`` logits.

    Math in fp32 (fp64 for fp64 logits), by the same safe form as the oracle.
    """
    n, vocab = logits.shape
    compute_dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    loss, stats, grad = _row_outputs(logits, compute_dtype, compute_grad, grad)
    rows = max(1, TORCH_CHUNK_ELEMENTS // vocab)
    for s in range(0, n, rows):
        e = min(n, s + rows)
        chunk = logits[s:e].to(compute_dtype)
        loss[s:e], stats[:, s:e], g = tofu_rows(
            chunk, labels[s:e], gamma, beta, ignore_index, softcap, compute_grad
        )
        if grad is not None:
            if grad_scale is not None:
                g = g * (grad_scale[s:e] if grad_scale.numel() > 1 else grad_scale).reshape(-1, 1)
            if row_norm is not None:  # as the kernel, from the row's largest entry itself
                peak = g.abs().amax(1)
                norm = torch.where(peak > 0, pow2_near(peak) / headroom(logits.dtype), 1.0)
                row_norm[s:e] = norm.clamp(2.0**-126, 2.0**126)
                g = g / row_norm[s:e, None].to(g.dtype)
            grad[s:e] = g
            if grad_err is not None:
                grad_err[s:e] = (grad[s:e].to(g.dtype) - g).sum(1)
    return loss, stats, grad


@torch.library.custom_op("tofu_kernels::tofu_rows", mutates_args=())
def tofu_rows_op(
    logits: torch.Tensor,
    labels: torch.Tensor,
    gamma: float,
    beta: float,
    ignore_index: int,
    softcap: float | None,
    compute_grad: bool,
    triton_impl: bool,
    grad_scale: torch.Tensor | None,
    row_norms: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`tofu_fwd` (or its PyTorch twin) as an opaque op, so ``torch.compile`` traces around
    the launch: losses, stats, the gradient and, with ``row_norms``, its rows' norms. An output
    not computed is empty (an op cannot return None)."""
    fwd = tofu_fwd if triton_impl else tofu_fwd_torch
    rows = logits.shape[0] if row_norms and compute_grad else 0
    norms = logits.new_empty(rows, dtype=torch.float32)
    loss, stats, grad = fwd(
        logits, labels, gamma, beta, ignore_index, softcap, compute_grad, None, grad_scale,
        row_norm=norms if norms.numel() else None,
    )  # fmt: skip
    return loss, stats, grad if grad is not None else logits.new_empty(0), norms


@tofu_rows_op.register_fake
def _(logits, labels, gamma, beta, ignore_index, softcap, compute_grad, triton_impl, grad_scale,
      row_norms):  # fmt: skip
    n, vocab = logits.shape
    dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    grad = logits.new_empty((n, vocab) if compute_grad else (0,))
    norms = logits.new_empty(n if row_norms and compute_grad else 0, dtype=torch.float32)
    return logits.new_empty(n, dtype=dtype), logits.new_empty(4, n, dtype=dtype), grad, norms


class TOFULossFunction(torch.autograd.Function):
    """Computes the loss and its gradient in forward; backward only scales the stored gradient."""

    @staticmethod
    def forward(
        ctx,
        logits: torch.Tensor,
        labels: torch.Tensor,
        num_items_in_batch: int | float | torch.Tensor | None,
        params: TOFUParams,
        compute_grad: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        vocab = logits.shape[-1]
        z = logits.reshape(-1, vocab)
        if z.stride(-1) != 1:
            z = z.contiguous()
        y = labels.reshape(-1)
        dtype = torch.float64 if z.dtype == torch.float64 else torch.float32
        scale = reduction_scale(y, params, num_items_in_batch, dtype)
        # the gradient is rounded once: formed at the mean's scale over a power of two near it
        # (at 1/N itself fp16 would flush it), which backward multiplies back exactly; fp16
        # rows also over their own power of two (a confident row's entries are far below 1)
        norm = pow2_near(scale) if scale is not None else None
        loss_rows, row_stats, grad, row_norms = tofu_rows_op(
            z, y, params.gamma, params.beta, params.ignore_index, params.softcap, compute_grad,
            use_triton(params.impl, z.device, z.dtype),
            (scale / norm).reshape(1) if scale is not None else None, half_range(z.dtype),
        )  # fmt: skip
        ctx.params = params
        ctx.logits_shape = logits.shape
        ctx.save_for_backward(grad, norm, row_norms)
        ctx.mark_non_differentiable(row_stats)
        return reduce_loss(loss_rows, labels.shape, params, scale), row_stats

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor, _grad_stats: torch.Tensor | None):
        check_backward(ctx, "tofu_loss", consumes=True)
        grad, norm, row_norms = ctx.saved_tensors
        factor = grad_multiplier(grad_loss, norm, torch.promote_types(grad.dtype, torch.float32))
        if row_norms.numel():
            factor = factor * row_norms.reshape(-1, 1)
        grad.mul_(factor)  # fp32 products, each rounded once
        return grad.view(ctx.logits_shape), None, None, None, None


def tofu_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    gamma: float = 3.0,
    beta: float = 0.8,
    ignore_index: int = -100,
    reduction: str = "mean",
    num_items_in_batch: int | torch.Tensor | None = None,
    softcap: float | None = None,
    impl: str = "auto",
    return_stats: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, TOFUStats]:
    r"""TOFU (tempered focal) loss of arXiv 2605.00195 on logits, with its gradient fused in.

    Equivalent PyTorch, per token with logits ``z`` (after the optional ``softcap * tanh(z /
    softcap)``) and label ``y``::

        p = softmax(z)[y]
        g = ((1 - p) ** gamma - gamma * p * (1 - p) ** (gamma - 1) * log(p)).detach()
        loss = -beta * g * log_softmax(z / beta)[y]

    then reduced over tokens whose label is not ``ignore_index``: ``"mean"`` divides the sum by the
    number of such tokens (or by ``num_items_in_batch`` when given, as Hugging Face's Trainer does
    under gradient accumulation; no valid token gives 0), ``"sum"`` sums, ``"none"`` returns the
    per-token losses (0 at ignored tokens). ``gamma=0, beta=1`` is cross-entropy. Computed in the
    numerically safe form of the spec: no NaN for finite logits, whatever ``gamma >= 0, beta > 0``.

    Args:
        logits: ``(..., V)`` float32, bfloat16 or float16 (float64 with ``impl="torch"``).
        labels: ``(...)`` integer class ids in ``[0, V)`` or ``ignore_index``.
        impl: ``"triton"``, ``"torch"`` (chunked PyTorch, same math) or ``"auto"``: Triton for GPU
            tensors, and for CPU tensors under ``TRITON_INTERPRET=1``; PyTorch otherwise.
        return_stats: also return a :class:`TOFUStats` of detached per-call statistics.

    Returns:
        fp32 scalar for "mean"/"sum", fp32 ``labels.shape`` for "none" (fp64 for fp64 logits);
        with ``return_stats``,
        ``(loss, stats)``. The gradient (logits' dtype) is computed in forward when the logits
        require grad and is only scaled by ``grad_output`` in backward.

    Example::

        >>> logits = torch.randn(8, 1000, requires_grad=True)
        >>> labels = torch.randint(0, 1000, (8,))
        >>> loss = tofu_loss(logits, labels, gamma=3.0, beta=0.8)
        >>> loss.backward()
    """
    params = TOFUParams(gamma, beta, ignore_index, reduction, softcap, impl)
    check_tensor("logits", logits, TORCH_DTYPES)
    if logits.ndim == 0 or logits.shape[-1] == 0:
        raise ValueError(
            f"logits must have a non-empty vocabulary dimension, got {tuple(logits.shape)}"
        )
    # torch's cross_entropy takes (N, C, d1, ...) logits, classes in dim 1
    channels_first = logits.shape[:1] + logits.shape[2:] if logits.ndim > 2 else None
    advice = "logits look like torch's (N, C, d1, ...) layout; tofu_loss takes classes last: "
    advice += "pass logits.movedim(1, -1)"
    labels = check_labels(labels, logits.shape[:-1], logits.device, ((channels_first, advice),))
    check_num_items(num_items_in_batch)
    use_triton(impl, logits.device, logits.dtype)  # raises for a dtype the chosen impl cannot take
    check_label_range(labels, logits.shape[-1], ignore_index)
    compute_grad = torch.is_grad_enabled() and logits.requires_grad
    loss, row_stats = TOFULossFunction.apply(
        logits, labels, num_items_in_batch, params, compute_grad
    )
    if return_stats:
        return loss, TOFUStats.from_rows(row_stats, labels, ignore_index)
    return loss


class TOFULoss(torch.nn.Module):
    """Module form of :func:`tofu_loss`: ``TOFULoss(gamma, beta)(logits, labels)``."""

    def __init__(
        self,
        gamma: float = 3.0,
        beta: float = 0.8,
        ignore_index: int = -100,
        reduction: str = "mean",
        softcap: float | None = None,
        impl: str = "auto",
        return_stats: bool = False,
    ) -> None:
        super().__init__()
        TOFUParams(gamma, beta, ignore_index, reduction, softcap, impl)  # fail at construction
        self.gamma, self.beta, self.ignore_index = gamma, beta, ignore_index
        self.reduction, self.softcap, self.impl = reduction, softcap, impl
        self.return_stats = return_stats

    def forward(
        self,
        logits: torch.Tensor,
        labels: torch.Tensor,
        num_items_in_batch: int | torch.Tensor | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, TOFUStats]:
        return tofu_loss(
            logits,
            labels,
            gamma=self.gamma,
            beta=self.beta,
            ignore_index=self.ignore_index,
            reduction=self.reduction,
            num_items_in_batch=num_items_in_batch,
            softcap=self.softcap,
            impl=self.impl,
            return_stats=self.return_stats,
        )

    def extra_repr(self) -> str:
        return f"gamma={self.gamma}, beta={self.beta}, reduction={self.reduction!r}"
