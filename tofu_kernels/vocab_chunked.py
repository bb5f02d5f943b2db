"""Vocabulary-chunked LM-head TOFU (``impl="vocab_chunked"``): cuBLAS GEMMs over chunks of
vocabulary columns, so that each chunk's ``grad_weight`` rows are written once by one GEMM over
all N tokens (fp32 accumulation inside cuBLAS), with no accumulator across chunks.

Forward: per chunk of C columns, a GEMM writes the chunk's logits ``(N, C)`` into a reused buffer
and a Triton kernel folds them into per-row partial sums (the fused impl's vocabulary splits:
online max, both sums, target logit, entropy sum); the fused impl's merge makes the loss, the
focal weight and the per-row terms of the gradient (O(N) floats, saved for backward).
Backward: per chunk, the same GEMM again, a Triton kernel turns the logits into their gradient
in place, then ``grad_weight[chunk] = dZ^T @ X`` and ``grad_hidden += dZ @ W[chunk]`` (into an
fp32 ``(N, H)`` accumulator: N x H x 4 bytes, 128 MB at 8192 tokens and H 4096).

Four GEMM-sized passes against the token-chunked impl's three, but no read-modify-write of a
``(V, H)`` accumulator per token chunk (memory-bound for chunks of a few hundred tokens).

With ``accum_dtype=None`` (half precision) the backward runs over token slabs, each the above
on its rows: ``grad_hidden`` needs an fp32 buffer of one slab only, and ``grad_weight`` is
summed across slabs in its own dtype (one rounding per slab, read and written once per slab):
below Liger's memory, which holds a ``(chunk, V)`` logits buffer.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tofu_kernels.fused_tofu import (
    N_PARTIALS,
    online_update,
    store_partials,
    tofu_dz,
)
from tofu_kernels.tofu import _cap
from tofu_kernels.utils import (
    HALF_DTYPES,
    LAUNCH_OPTIONS,
    TOFUParams,
    accumulate,
    cancel_rounding,
    half_range,
    mm_fp32,
    normalized_grad_scale,
)

# Launch configs of the two memory-bound kernels over the chunk's logits (not yet timed on a
# GPU): a few rows per program, wide column tiles.
PARTIALS_CONFIG = dict(BLOCK_N=4, BLOCK_V=1024, num_warps=4)
GRAD_CONFIG = dict(BLOCK_N=4, BLOCK_V=1024, num_warps=4)
# Chunks of at least this many columns keep the GEMMs large; by default a chunk's logits are
# about the size of hidden (C = H columns), and C is a multiple of CHUNK_ALIGN.
MIN_VOCAB_CHUNK = 2048
CHUNK_ALIGN = 256
# accum_dtype=None in half precision: the backward runs over token slabs (grad_hidden summed in
# a (slab, H) fp32 buffer, grad_weight across slabs in its own dtype) in the usual chunks: at
# least LEAN_SLABS slabs of at most LEAN_SLAB_ROWS rows, of even size in multiples of
# SLAB_ALIGN rows. Its temporaries, 4 * slab * H + 2 * slab * C bytes in bf16 (1.5 N H with H-column
# chunks up to 8192 tokens), stay under Liger's (chunk, V) logits buffer (about 2 N H bytes,
# its chunk being about N H / V rows) from ~2048 tokens on: at the Llama-3 head with 8192 tokens
# 32 + 16 MB against 63, with 4096 tokens 16 + 8 against 31 (bench/NOTES.md). fp16 adds an
# fp32 temporary to sum grad_weight at its scale, FP32_SUM_ROWS rows of it at a time (8 MB at
# H 4096, not the chunk's 64 MB).
# Four slabs keep grad_weight's read-modify-writes to three up to 8192 tokens (1 GB each in
# bf16 at the Llama head); beyond, one per LEAN_SLAB_ROWS tokens.
LEAN_SLABS = 4
LEAN_SLAB_ROWS = 2048
SLAB_ALIGN = 128
FP32_SUM_ROWS = 512


@triton.jit
def _chunk_partials_kernel(
    # pointers: the chunk's logits (N, C), labels (N,), partials (7, SPLITS, N)
    z_ptr, labels_ptr, part_ptr,
    # sizes and strides: the chunk holds vocabulary columns [col0, col0 + C); it is split `split`
    N, C, col0, stride_zn, split, n_splits,
    # TOFU parameters (runtime fp32)
    beta, softcap, ignore_index,
    # meta
    HAS_SOFTCAP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    y = tl.load(labels_ptr + rows, mask=row_mask, other=ignore_index)
    valid = row_mask & (y != ignore_index)
    inv_beta = 1.0 / beta
    z_rows = z_ptr + rows.to(tl.int64)[:, None] * stride_zn

    m = tl.full((BLOCK_N,), -float("inf"), tl.float32)
    s1 = tl.zeros((BLOCK_N,), tl.float32)
    s1x = tl.zeros((BLOCK_N,), tl.float32)
    sbx = tl.zeros((BLOCK_N,), tl.float32)
    sz = tl.zeros((BLOCK_N,), tl.float32)
    zy = tl.full((BLOCK_N,), -float("inf"), tl.float32)
    m_before = tl.full((BLOCK_N,), -float("inf"), tl.float32)
    if tl.max(valid.to(tl.int32), axis=0) > 0:  # rows that are all ignored read nothing
        for c in range(0, C, BLOCK_V):
            local = c + tl.arange(0, BLOCK_V)
            col_mask = local < C
            z = tl.load(z_rows + local[None, :], mask=row_mask[:, None] & col_mask[None, :])
            z = _cap(z.to(tl.float32), softcap, HAS_SOFTCAP)
            m, s1, s1x, sbx, sz, zy, m_before = online_update(
                z, col0 + local, col_mask, y, inv_beta, m, s1, s1x, sbx, sz, zy, m_before
            )
    store_partials(part_ptr, split, n_splits, N, rows, row_mask, m, s1, s1x, sbx, sz, zy, m_before)


@triton.jit
def _chunk_grad_kernel(
    # pointers: the chunk's logits (N, C), overwritten with their gradient; labels (N,);
    # per-row terms (4, N) of the merge (row max, g / sb, target column, ...); grad scale (1 or N);
    # per column block, the rows' sums of rounding errors, added to over the chunks
    # (cdiv(C, BLOCK_V), N) (HAS_ERR)
    z_ptr, labels_ptr, rowterm_ptr, scale_ptr, err_ptr,
    # sizes and strides
    N, C, col0, stride_zn, stride_rt, stride_scale,
    # TOFU parameters
    beta, softcap, ignore_index,
    # meta
    HAS_SOFTCAP: tl.constexpr, HAS_ERR: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    local = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    row_mask = rows < N
    mask = row_mask[:, None] & (local < C)[None, :]
    y = tl.load(labels_ptr + rows, mask=row_mask, other=ignore_index)
    m = tl.load(rowterm_ptr + rows, mask=row_mask, other=float("inf"))  # inf: no gradient
    scale = tl.load(scale_ptr + rows * stride_scale, mask=row_mask, other=0.0)
    coef = tl.load(rowterm_ptr + stride_rt + rows, mask=row_mask, other=0.0) * scale
    target = tl.load(rowterm_ptr + 2 * stride_rt + rows, mask=row_mask, other=0.0) * scale
    ptrs = z_ptr + rows.to(tl.int64)[:, None] * stride_zn + local[None, :]
    z = tl.load(ptrs, mask=mask).to(tl.float32)  # softcapped in tofu_dz, with its derivative
    dz = tofu_dz(z, col0 + local, y, m, coef, target, 1.0 / beta, softcap, HAS_SOFTCAP)
    stored = dz.to(z_ptr.dtype.element_ty)
    tl.store(ptrs, stored, mask=mask)
    if HAS_ERR:  # each (column block, row) has one program per chunk: no atomics, deterministic
        err = tl.sum(tl.where(mask, stored.to(tl.float32) - dz, 0.0), axis=1)
        err_ptrs = err_ptr + tl.program_id(1) * N + rows
        tl.store(err_ptrs, tl.load(err_ptrs, mask=row_mask) + err, mask=row_mask)


def default_vocab_chunk(hidden: int, vocab: int) -> int:
    """Vocabulary columns per chunk: the chunk's logits about the size of ``hidden`` (C = H),
    at least ``MIN_VOCAB_CHUNK``, a multiple of ``CHUNK_ALIGN``, at most the vocabulary."""
    chunk = max(MIN_VOCAB_CHUNK, triton.cdiv(hidden, CHUNK_ALIGN) * CHUNK_ALIGN)
    return min(vocab, chunk)


def _chunks(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    chunk: int,
    storage: torch.Tensor | None = None,
):
    """Yield ``(index, col0, logits)`` per vocabulary chunk; ``logits`` is the chunk's
    ``hidden @ weight[chunk].T + bias[chunk]`` in a buffer reused across chunks (``storage``,
    at least ``N * chunk`` elements, or a new one)."""
    n = hidden.shape[0]
    vocab = weight.shape[0]
    if storage is None:
        storage = torch.empty(n * min(chunk, vocab), dtype=hidden.dtype, device=hidden.device)
    for i, c0 in enumerate(range(0, vocab, chunk)):
        c1 = min(c0 + chunk, vocab)
        z = storage[: n * (c1 - c0)].view(n, c1 - c0)  # contiguous, also for the last chunk
        if bias is None:
            torch.mm(hidden, weight[c0:c1].t(), out=z)
        else:
            torch.addmm(bias[c0:c1], hidden, weight[c0:c1].t(), out=z)
        yield i, c0, z


def vocab_chunked_partials(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None,
    params: TOFUParams,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Per-row partial sums ``(7, S, N)`` over the ``S`` vocabulary chunks of ``weight (V, H)``
    (the format of :func:`tofu_kernels.fused_tofu.fused_tofu_partials`)."""
    n, h = hidden.shape
    vocab = weight.shape[0]
    labels = labels.contiguous()
    chunk = chunk_size or default_vocab_chunk(h, vocab)
    splits = triton.cdiv(vocab, chunk)
    partials = torch.empty(N_PARTIALS, splits, n, dtype=torch.float32, device=hidden.device)
    if n == 0:
        return partials
    cfg = PARTIALS_CONFIG
    softcap = params.softcap if params.softcap is not None else 1.0
    for i, c0, z in _chunks(hidden, weight, bias, chunk):
        _chunk_partials_kernel[(triton.cdiv(n, cfg["BLOCK_N"]),)](
            z, labels, partials, n, z.shape[1], c0, z.stride(0), i, splits,
            params.beta, softcap, params.ignore_index,
            HAS_SOFTCAP=params.softcap is not None, **cfg, **LAUNCH_OPTIONS,
        )  # fmt: skip
    return partials


def lean_slab_rows(n: int, dtype: torch.dtype, accum_fp32: bool) -> int | None:
    """Token slab of the backward over ``n`` tokens where ``grad_weight`` is summed in the
    weight's half-precision dtype (``accum_dtype=None``): ``n`` split evenly into at least
    ``LEAN_SLABS`` slabs of at most ``LEAN_SLAB_ROWS`` rows, rounded up to ``SLAB_ALIGN`` rows
    (no slab of a few rows, which would cost a pass over the weight for nothing); else None
    (all tokens at once). fp32 takes no slabs: its ``grad_hidden`` accumulator is the gradient
    itself."""
    if dtype not in HALF_DTYPES or accum_fp32:
        return None
    slabs = max(LEAN_SLABS, triton.cdiv(n, LEAN_SLAB_ROWS))
    rows = triton.cdiv(triton.cdiv(n, slabs), SLAB_ALIGN) * SLAB_ALIGN
    return max(1, min(LEAN_SLAB_ROWS, rows))


def vocab_chunked_bwd(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None,
    rowterms: torch.Tensor,
    grad_scale: torch.Tensor,
    params: TOFUParams,
    needs: tuple[bool, bool, bool],
    chunk_size: int | None = None,
    gx_fp32: bool = False,
    slab_rows: int | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Gradients of ``sum_t grad_scale[t] * loss[t]`` (``grad_scale`` fp32, 1 or N elements)
    for (hidden, weight, bias) where ``needs`` says so, from the merge's per-row terms;
    ``grad_hidden`` stays fp32 with ``gx_fp32``.

    ``slab_rows``: run the tokens in slabs of that many rows (None: all at once). Each slab's
    ``grad_hidden`` is summed in an fp32 ``(slab_rows, H)`` buffer instead of an ``(N, H)`` one
    (unless it is returned in fp32), and ``grad_weight`` is summed across slabs in the weight's
    dtype: one rounding per slab."""
    n, h = hidden.shape
    vocab = weight.shape[0]
    dev = hidden.device
    labels, grad_scale = labels.contiguous(), grad_scale.contiguous()
    slab = max(1, min(n, slab_rows or n))
    one_slab = slab >= n
    gx = acc = None
    if needs[0]:
        # one slab, or an fp32 result: grad_hidden is its own fp32 accumulator (cast at the end);
        # else each slab's rows are summed in an fp32 buffer, then written into the gradient
        if one_slab or gx_fp32:
            gx = torch.zeros(n, h, dtype=torch.float32, device=dev)
        else:
            gx = torch.empty(n, h, dtype=hidden.dtype, device=dev)
            acc = torch.empty(slab, h, dtype=torch.float32, device=dev)
    # grad_weight rows are written by the first slab's GEMM of their chunk, added to by later ones
    gw = torch.empty(vocab, h, dtype=weight.dtype, device=dev) if needs[1] else None
    gb = torch.zeros(vocab, dtype=torch.float32, device=dev) if needs[2] else None
    if n == 0 or not any(needs):
        if gw is not None:
            gw.zero_()
    else:
        cfg = GRAD_CONFIG
        softcap = params.softcap if params.softcap is not None else 1.0
        chunk = chunk_size or default_vocab_chunk(h, vocab)
        # fp16 logits' gradient is written scaled to a safe range by a power of two, undone
        # below (norm). bf16 and fp32 are written at their own scale: the same power of two
        # would change no digit there (short of subnormals, at upstream gradients under
        # ~1e-30) and cost a pass over grad_weight at the end (2 GB in bf16 at the Llama head).
        grad_scale, norm = normalized_grad_scale(rowterms, grad_scale, hidden.dtype)
        # fp16 grad_weight rows are summed in fp32 and rounded once, at their own scale: at any
        # fixed scale that keeps an N-row sum under 65504, small rows are subnormals or zeros
        # (an H100 run at 8192 tokens found 2% of grad_weight's entries off, some by 100%)
        sum_fp32 = half_range(weight.dtype)
        # grad_hidden's rounding errors, moved onto the targets' weight rows (cancel_rounding)
        err_blocks = None
        if hidden.dtype in HALF_DTYPES and gx is not None:
            blocks = triton.cdiv(min(chunk, vocab), cfg["BLOCK_V"])
            err_blocks = torch.empty(blocks * slab, dtype=torch.float32, device=dev)
        storage = torch.empty(slab * min(chunk, vocab), dtype=hidden.dtype, device=dev)
        for s0 in range(0, n, slab):
            s1 = min(s0 + slab, n)
            rows = s1 - s0
            x_s, y_s = hidden[s0:s1], labels[s0:s1]
            scale_s = grad_scale[s0:s1] if grad_scale.numel() > 1 else grad_scale
            acc_s = None
            if gx is not None:
                acc_s = gx[s0:s1] if acc is None else acc[:rows].zero_()
            if err_blocks is not None:  # (column blocks, rows), summed over the chunks
                err_blocks[: blocks * rows].zero_()
            for _, c0, z in _chunks(x_s, weight, bias, chunk, storage):
                c = z.shape[1]
                grid = (triton.cdiv(rows, cfg["BLOCK_N"]), triton.cdiv(c, cfg["BLOCK_V"]))
                _chunk_grad_kernel[grid](
                    z, y_s, rowterms[:, s0:s1], scale_s,
                    err_blocks if err_blocks is not None else rowterms,
                    rows, c, c0, z.stride(0), rowterms.stride(0), int(scale_s.numel() > 1),
                    params.beta, softcap, params.ignore_index,
                    HAS_SOFTCAP=params.softcap is not None, HAS_ERR=err_blocks is not None,
                    **cfg, **LAUNCH_OPTIONS,
                )  # fmt: skip
                if gw is not None:
                    _weight_grad(gw[c0 : c0 + c], z, x_s, norm, sum_fp32, first=s0 == 0)
                if acc_s is not None:
                    accumulate(acc_s, z, weight[c0 : c0 + c])
                if gb is not None:
                    gb[c0 : c0 + c] += z.sum(0, dtype=torch.float32)
            z = None
            if one_slab:  # the logits buffer goes before grad_hidden's cast, the backward's peak
                storage = None
            if err_blocks is not None:
                err_s = err_blocks[: blocks * rows].view(blocks, rows).sum(0)
                cancel_rounding(acc_s, err_s, weight, y_s)
            if acc_s is not None:
                if norm is not None:
                    acc_s.mul_(norm)
                if acc is not None:
                    gx[s0:s1] = acc_s
        if gb is not None and norm is not None:
            gb.mul_(norm)
    if gx is not None and not gx_fp32:
        gx = gx.to(hidden.dtype)
    if gb is not None:
        gb = gb.to(bias.dtype)
    return gx, gw, gb


def _weight_grad(
    gw: torch.Tensor, z: torch.Tensor, x: torch.Tensor, norm: torch.Tensor | None,
    sum_fp32: bool, first: bool,
) -> None:  # fmt: skip
    """``gw (=|+=) z.T @ x``: in fp32 and rounded once at the true scale (``* norm``, fp16)
    with ``sum_fp32``, ``FP32_SUM_ROWS`` rows at a time, else in ``gw``'s dtype (the logits'
    gradient is at its true scale)."""
    if sum_fp32:
        for r0 in range(0, gw.shape[0], FP32_SUM_ROWS):
            rows, z_rows = gw[r0 : r0 + FP32_SUM_ROWS], z[:, r0 : r0 + FP32_SUM_ROWS]
            if first:
                torch.mul(mm_fp32(z_rows.t(), x), norm, out=rows)
            else:
                rows.add_(mm_fp32(z_rows.t(), x).mul_(norm))
    elif first:
        torch.mm(z.t(), x, out=gw)
    else:
        gw.addmm_(z.t(), x)
