"""Fully fused LM-head TOFU (``impl="fused"``): the projection runs inside Triton, so logits only
ever exist as register tiles.

Forward: programs over (token block, vocabulary split) compute logits tiles with ``tl.dot`` over H
and keep, per row, the online max and every sum TOFU needs; a merge kernel combines the splits into
the loss, the focal weight and the per-row softmax terms (O(N) floats). Backward: programs over
(token block, vocabulary block) recompute their logits tile, form ``g * (softmax(z / beta) -
onehot) * scale`` in registers and add ``dZ @ W`` and ``dZ^T @ X`` with atomics (or, opt-in on
sm_90, bulk tensor reductions of whole tiles: ``TMA_REDUCE``): into fp32
``grad_hidden`` (one token slab at a time) and into ``grad_weight``, fp32 or, with
``accum_fp32=False``, the gradient itself in the weight's dtype. Work whose gradient is below the
output precision can be skipped.
"""

from __future__ import annotations

import functools
import math
import os
import time
from dataclasses import dataclass, replace

import torch
import torch.distributed as dist
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from tofu_kernels.tofu import _cap, _capped, tofu_row_terms
from tofu_kernels.utils import (
    HALF_DTYPES,
    LAUNCH_OPTIONS,
    TOFUParams,
    cancel_rounding,
    check_backward,
    filter_reference,
    interpreting,
    normalized_grad_scale,
    reduce_loss,
    reduction_scale,
    rows_gain,
)

# Launch configs by compute capability major (9: Hopper, 8: Ampere/Ada), as triton.Config
# kwargs. sm_90's are the fastest of the candidates below that `bench/tune_fused.py` timed on an
# H100 (Llama-3-8B head, 8192 tokens, bf16; bench/results/h100-80gb-hbm3-20261127-tune.md):
# forward 64x256 tiles 20.5 ms against 31.2 for 64x128; backward 128x128 118 ms, the best
# (fp32 grad_weight). sm_80's are not timed yet: chosen by tile arithmetic.
# Programs run in groups of GROUP_N token blocks (GROUP_ROWS tokens, token blocks fastest within
# a group): the programs in flight then share a 16 MB slice of hidden (H 4096, bf16) and a few
# vocabulary tiles, which stay in L2, instead of streaming all of hidden from memory once per
# vocabulary tile; in the backward it also spreads the atomics of the programs in flight over
# 16 grad_hidden and ~16 grad_weight blocks instead of piling them on one.
GROUP_ROWS = 2048
FWD_CONFIGS = {
    9: dict(BLOCK_N=64, BLOCK_V=256, BLOCK_K=64, GROUP_N=32, num_warps=8, num_stages=3,
            FP32=dict(BLOCK_K=16)),
    8: dict(BLOCK_N=64, BLOCK_V=128, BLOCK_K=64, GROUP_N=32, num_warps=8, num_stages=3),
}  # fmt: skip
# An entry's "FP32" overrides its keys for fp32 inputs (default: half the BLOCK_K, since fp32
# tiles take twice the bytes). The fp32 backward (IEEE dots on CUDA cores) is where ptxas can
# give up on registers: for sm_90 it gave BLOCK_K 32 with 3 stages 32 registers and 23 KB of
# spills per thread under triton 3.9 (BLOCK_K 16 with 3 stages: 12 KB under 3.6); BLOCK_K 16
# with 2 stages gets 255 registers and under 256 B under both. tests/compile_kernels.py fails
# on such spills. Not timed: fp32 is for checking, bf16 for speed.
BWD_CONFIGS = {
    9: dict(BLOCK_N=128, BLOCK_V=128, BLOCK_K=64, GROUP_N=16, num_warps=8, num_stages=3,
            FP32=dict(BLOCK_K=16, num_stages=2)),
    8: dict(BLOCK_N=128, BLOCK_V=128, BLOCK_K=64, GROUP_N=16, num_warps=8, num_stages=3),
}  # fmt: skip
# A (major, minor) key overrides its major: 8.6, 8.9 and 12.x (A10, A40, L4, L40S, RTX 30/40/50,
# GB10) give a block at most 99 KiB of shared memory, the A100 163; the 3-stage backward takes
# 128 KiB, sm_90's forward 120 KiB (12.x would otherwise take sm_90's configs). Their fp32
# backward takes 4 warps: with 8, ptxas gave it 40 registers and 11 KB of spills under triton
# 3.6 (under 2 KB with 4, under both).
_SMALL_SHARED_BWD = {
    **BWD_CONFIGS[8], "num_stages": 2, "FP32": dict(BLOCK_K=16, num_warps=4),
}  # fmt: skip
BWD_CONFIGS.update({(8, 6): _SMALL_SHARED_BWD, (8, 9): _SMALL_SHARED_BWD, 12: _SMALL_SHARED_BWD})
# The forward takes the backward's BLOCK_K, fp32 too (hence the FP32 entries): the backward's
# recomputed logits then sum their products as the forward's did (the interpreter sums each K
# block, then adds it to the tile), so they match the row max and sums the forward kept bit for
# bit. Under the interpreter, fp32 logits ~100 apart at beta 0.3 were 2e-5 off otherwise.
# (Autotuning, opt-in, picks the two kernels' configs independently.)
_SMALL_SHARED_FWD = {**FWD_CONFIGS[8], "FP32": dict(BLOCK_K=16)}
FWD_CONFIGS.update({(8, 6): _SMALL_SHARED_FWD, (8, 9): _SMALL_SHARED_FWD, 12: _SMALL_SHARED_FWD})
FWD_CONFIG, BWD_CONFIG = FWD_CONFIGS[9], BWD_CONFIGS[9]  # elsewhere (and the interpreter)
# Opt-in autotuning (TOFU_AUTOTUNE=1): these candidates are timed once per (H, V, dtypes), as
# they are for every dtype (fp32 too: the tables' FP32 overrides do not apply).
# sm_90's default first, then its untimed deeper pipelines (4 stages, or BLOCK_K 128 in 2: 160
# KiB of shared memory), then the rest, which the first H100 run timed slower.
TUNE_FWD = [
    dict(BLOCK_N=bn, BLOCK_V=bv, BLOCK_K=bk, GROUP_N=GROUP_ROWS // bn, num_warps=w, num_stages=st)
    for bn, bv, bk, w, st in ((64, 256, 64, 8, 3), (64, 256, 64, 8, 4), (64, 256, 128, 8, 2),
                              (128, 256, 64, 8, 3), (64, 128, 128, 4, 3), (128, 128, 64, 8, 3),
                              (64, 128, 64, 8, 3), (128, 128, 64, 4, 4))
]  # fmt: skip
# ...and the default without groups (token blocks fastest over the whole grid), to measure them
UNGROUPED = 1 << 16
_HOPPER_FWD = {k: v for k, v in FWD_CONFIGS[9].items() if k != "FP32"}  # a candidate's keys
TUNE_FWD.append({**_HOPPER_FWD, "GROUP_N": UNGROUPED})
# The larger tiles first (bench/tune_fused.py's budget reaches them): they cut the backward's
# atomic traffic by a third (bench/NOTES.md). With BLOCK_K 64 and 3 stages they took 272 KiB of
# shared memory and failed on an H100; they fit sm_90 with 2 stages (224 KiB) or with BLOCK_K 32
# (168 KiB). 2 stages first: BLOCK_K 32 cost the 128 x 128 tile 24% there.
TUNE_BWD = [
    dict(BLOCK_N=bn, BLOCK_V=bv, BLOCK_K=bk, GROUP_N=GROUP_ROWS // bn, num_warps=w, num_stages=st)
    for bn, bv, bk, w, st in ((128, 256, 64, 8, 2), (128, 256, 32, 8, 3), (256, 128, 64, 8, 2),
                              (256, 128, 32, 8, 3), (64, 128, 64, 8, 3), (128, 128, 64, 8, 3),
                              (128, 128, 32, 8, 4), (128, 64, 64, 4, 3))
]  # fmt: skip
_HOPPER_BWD = {k: v for k, v in BWD_CONFIGS[9].items() if k != "FP32"}  # a candidate's keys
TUNE_BWD.append({**_HOPPER_BWD, "GROUP_N": UNGROUPED})
# "TMA_REDUCE": True (sm_90 and later) adds each backward tile into grad_hidden and grad_weight
# with one bulk tensor reduction (cp.reduce.async.bulk.tensor) instead of per-thread atomics.
# The backward is bound by its atomic traffic (bench/NOTES.md); whether L2 takes bulk adds
# faster is for bench/tune_fused.py to measure, so no table sets it yet. Not an autotuning
# candidate: its descriptors' boxes are made for the launch's config.
TUNE_BWD_TMA = [{**_HOPPER_BWD, "TMA_REDUCE": True}]
# Forward vocabulary splits are whole multiples of this many columns, so that the split layout
# (and the partials buffer) does not depend on the config's BLOCK_V.
SPLIT_ALIGN = 256
# Rows of the per-row partials of each vocabulary split: max, sum, target-excluded sums at 1 and
# beta, entropy sum, target logit, max left of the target (-inf where none).
N_PARTIALS = 7
ROW_ALIGN = 256  # likewise for the backward's grad_hidden token slabs and BLOCK_N
# grad_hidden sums V / BLOCK_V tile products per element: in bf16 that is ~0.1 off at the Llama
# head (bench/accum_precision.py), so it sums in fp32, in token slabs of this many elements.
GX_SLAB_ELEMS = 2**23
# Gradient filtering: skip rows whose bound |g (1 - q_y) scale| on every entry is below this
# fraction of utils.filter_reference (the largest entry; with softcap, at most it), and
# vocabulary tiles whose entries all are below it divided by V (2^-12: under bf16/fp16
# resolution of a sum that holds the largest).
FILTER_EPS_HALF = 2.0**-12


@triton.jit
def _load_rows(ptr, idx, stride, mask, k, ks, k_mask, UPCAST: tl.constexpr):
    """(len(idx), BLOCK_K) tile of rows ``idx`` of a row-major matrix, columns ``k + ks``."""
    tile = tl.load(
        ptr + idx[:, None] * stride + (k + ks)[None, :],
        mask=mask[:, None] & k_mask[None, :],
        other=0.0,
    )
    if UPCAST:  # the interpreter cannot multiply bf16; the GPU keeps tensor-core inputs
        tile = tile.to(tl.float32)
    return tile


@triton.jit
def _add_rows(ptr, desc, first, idx, stride, mask, k, ks, k_mask, tile, TMA_REDUCE: tl.constexpr):
    """Add ``tile`` into rows ``idx`` (``first`` onwards) of a row-major matrix, columns ``k +
    ks``: by atomics, or by one bulk add of the tile through ``desc``, done in L2 (TMA_REDUCE;
    the masks' entries, out of the matrix, are then dropped by the hardware)."""
    if TMA_REDUCE:
        desc.atomic_add([first, k], tile)
    else:
        tl.atomic_add(
            ptr + idx[:, None] * stride + (k + ks)[None, :],
            tile,
            mask=mask[:, None] & k_mask[None, :],
            sem="relaxed",
        )


@triton.jit
def _dot(a, b, acc, IEEE: tl.constexpr):
    """``acc + a @ b``; exact fp32 products when IEEE (Triton's fp32 default is TF32)."""
    if IEEE:
        return tl.dot(a, b, acc, input_precision="ieee")
    return tl.dot(a, b, acc)


@triton.jit
def _logits_tile(
    x_ptr, w_ptr, b_ptr, rows, cols, row_mask, col_mask, H, stride_xn, stride_wv,
    HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """fp32 (BLOCK_N, BLOCK_V) tile of ``x @ w.T (+ b)`` (before any softcap); out-of-range
    entries junk."""
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    ks = tl.arange(0, BLOCK_K)
    for k in range(0, H, BLOCK_K):
        k_mask = (k + ks) < H
        x = _load_rows(x_ptr, rows, stride_xn, row_mask, k, ks, k_mask, UPCAST)
        w = _load_rows(w_ptr, cols, stride_wv, col_mask, k, ks, k_mask, UPCAST)
        acc = _dot(x, tl.trans(w), acc, IEEE)
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    return acc


@triton.jit
def _fused_fwd_kernel(
    # pointers: hidden (N, H), weight (V, H), bias (V,), labels (N,); partials (7, SPLITS, N)
    x_ptr, w_ptr, b_ptr, labels_ptr, part_ptr,
    # sizes and strides (elements; unit stride along H); the vocabulary splits
    N, V, H, stride_xn, stride_wv, n_splits, cols_per_split,
    # TOFU parameters (runtime fp32)
    beta, softcap, ignore_index,
    # meta
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_N: tl.constexpr,
):  # fmt: skip
    pid_n, split = grouped_pid(tl.program_id(0), tl.cdiv(N, BLOCK_N), n_splits, GROUP_N)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    rows64 = rows.to(tl.int64)
    y = tl.load(labels_ptr + rows, mask=row_mask, other=ignore_index)
    valid = row_mask & (y != ignore_index)
    inv_beta = 1.0 / beta

    m = tl.full((BLOCK_N,), -float("inf"), tl.float32)  # any finite logit, however low, is above
    s1 = tl.zeros((BLOCK_N,), tl.float32)
    s1x = tl.zeros((BLOCK_N,), tl.float32)
    sbx = tl.zeros((BLOCK_N,), tl.float32)
    sz = tl.zeros((BLOCK_N,), tl.float32)
    zy = tl.full((BLOCK_N,), -float("inf"), tl.float32)
    m_before = tl.full((BLOCK_N,), -float("inf"), tl.float32)
    tiles_per_split = cols_per_split // BLOCK_V
    t_start = split * tiles_per_split
    t_end = tl.minimum(t_start + tiles_per_split, tl.cdiv(V, BLOCK_V))
    if tl.max(valid.to(tl.int32), axis=0) > 0:  # a block of ignored rows skips its tiles
        for t in range(t_start, t_end):
            cols = t * BLOCK_V + tl.arange(0, BLOCK_V)
            col_mask = cols < V
            z = _logits_tile(
                x_ptr, w_ptr, b_ptr, rows64, cols.to(tl.int64), row_mask, col_mask, H, stride_xn,
                stride_wv, HAS_BIAS, UPCAST, IEEE, BLOCK_N, BLOCK_V, BLOCK_K,
            )  # fmt: skip
            z = _cap(z, softcap, HAS_SOFTCAP)
            m, s1, s1x, sbx, sz, zy, m_before = online_update(
                z, cols, col_mask, y, inv_beta, m, s1, s1x, sbx, sz, zy, m_before
            )
    store_partials(part_ptr, split, n_splits, N, rows, row_mask, m, s1, s1x, sbx, sz, zy, m_before)


@triton.jit
def grouped_pid(pid, n_row_blocks, n_cols, GROUP_N: tl.constexpr):
    """(token block, column) of program ``pid`` of a 1-D grid of ``n_row_blocks * n_cols``,
    in groups of ``GROUP_N`` token blocks, token blocks fastest within a group."""
    per_group = GROUP_N * n_cols
    first = (pid // per_group) * GROUP_N
    size = tl.minimum(n_row_blocks - first, GROUP_N)  # the last group may be short
    local = pid % per_group
    return first + local % size, local // size


@triton.jit
def online_update(z, cols, col_mask, y, inv_beta, m, s1, s1x, sbx, sz, zy, m_before):
    """Fold an fp32 (rows, BLOCK_V) logits tile (softcapped; columns ``cols``, in range where
    ``col_mask``) into each row's running max ``m`` and the sums relative to it: ``s1`` of
    exp(z - m), ``s1x``/``sbx`` of exp(z - m) and exp((z - m) / beta) without the target,
    ``sz`` of (z - m) exp(z - m); ``zy`` the target logit and ``m_before`` the max of the
    columns left of it (argmax takes the first of tied maxima), -inf until seen."""
    z = tl.where(col_mask[None, :], z, -float("inf"))
    m_new = tl.maximum(m, tl.max(z, axis=1))
    # the sums are relative to m_new, or to 0 while every logit so far is -inf (logits that
    # overflowed their dtype): -inf - -inf would make them NaN
    m_ref = tl.where(m_new > -float("inf"), m_new, 0.0)
    alpha = tl.exp(m - m_ref)  # 0 on the first tile (m = -inf)
    zm = z - m_ref[:, None]
    e1 = tl.exp(zm)
    eb = tl.exp(zm * inv_beta)
    is_y = cols[None, :] == y[:, None]
    # where alpha is 0, (m - m_ref) * s1 is -inf * 0 (the first tile) or may overflow: 0 there;
    # likewise e1 * zm where zm overflowed to -inf (logits ~3e38 apart)
    shift = tl.where(alpha > 0, (m - m_ref) * s1, 0.0)
    sz = alpha * (sz + shift) + tl.sum(tl.where(e1 > 0, e1 * zm, 0.0), axis=1)
    s1 = alpha * s1 + tl.sum(e1, axis=1)
    s1x = alpha * s1x + tl.sum(tl.where(is_y, 0.0, e1), axis=1)
    sbx = tl.exp((m - m_ref) * inv_beta) * sbx + tl.sum(tl.where(is_y, 0.0, eb), axis=1)
    zy = tl.maximum(zy, tl.max(tl.where(is_y, z, -float("inf")), axis=1))
    left = cols[None, :] < y[:, None]
    m_before = tl.maximum(m_before, tl.max(tl.where(left, z, -float("inf")), axis=1))
    return m_new, s1, s1x, sbx, sz, zy, m_before


@triton.jit
def tofu_dz(z, cols, y, m, coef, target, inv_beta, softcap, HAS_SOFTCAP: tl.constexpr):
    """The gradient on an fp32 tile of logits ``z`` (before the softcap): with ``z`` softcapped,
    ``coef * exp((z - m) / beta)`` (``coef`` = scale * g / sb per row) off the target column,
    ``target`` (= -scale * g * sbx / sb) on it, times the softcap's derivative at ``z``."""
    if HAS_SOFTCAP:
        z, slope = _capped(z, softcap)
    dz = tl.exp((z - m[:, None]) * inv_beta) * coef[:, None]
    dz = tl.where(cols[None, :] == y[:, None], target[:, None], dz)
    if HAS_SOFTCAP:
        dz = dz * slope
    return dz


@triton.jit
def store_partials(part_ptr, split, n_splits, N, rows, row_mask, m, s1, s1x, sbx, sz, zy, m_before):
    """Write a block of rows' running terms as vocabulary split ``split`` of (7, SPLITS, N)."""
    part = part_ptr + split * N + rows
    stride_part = n_splits * N
    tl.store(part, m, mask=row_mask)
    tl.store(part + stride_part, s1, mask=row_mask)
    tl.store(part + 2 * stride_part, s1x, mask=row_mask)
    tl.store(part + 3 * stride_part, sbx, mask=row_mask)
    tl.store(part + 4 * stride_part, sz, mask=row_mask)
    tl.store(part + 5 * stride_part, zy, mask=row_mask)
    tl.store(part + 6 * stride_part, m_before, mask=row_mask)


@triton.jit
def _cap_slope(capped, softcap):
    """Softcap's derivative ``1 - (capped / softcap)^2`` from a capped logit."""
    t = tl.abs(capped / softcap)
    return (1.0 - t) * (1.0 + t)


@triton.jit
def _fused_merge_kernel(
    # pointers: partials (7, SPLITS, N) in; per-row loss (N,), stats (4, N), bwd terms (4, N) out
    part_ptr, labels_ptr, loss_ptr, stats_ptr, rowterm_ptr,
    # sizes
    N, V, n_splits,
    # TOFU parameters
    gamma, beta, softcap, ignore_index,
    # meta
    HAS_SOFTCAP: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    y = tl.load(labels_ptr + rows, mask=row_mask, other=ignore_index)
    valid = y != ignore_index
    stride_part = n_splits * N
    inv_beta = 1.0 / beta

    m = tl.full((BLOCK_N,), -float("inf"), tl.float32)
    for s in range(0, n_splits):
        m = tl.maximum(m, tl.load(part_ptr + s * N + rows, mask=row_mask, other=-float("inf")))
    s1 = tl.zeros((BLOCK_N,), tl.float32)
    s1x = tl.zeros((BLOCK_N,), tl.float32)
    sbx = tl.zeros((BLOCK_N,), tl.float32)
    sz = tl.zeros((BLOCK_N,), tl.float32)
    zy = tl.full((BLOCK_N,), -float("inf"), tl.float32)
    m_before = tl.full((BLOCK_N,), -float("inf"), tl.float32)
    for s in range(0, n_splits):
        p = part_ptr + s * N + rows
        m_s = tl.load(p, mask=row_mask, other=-float("inf"))
        live = m_s > -float("inf")  # a split without columns for the row (or no row) adds 0
        a = tl.where(live, tl.exp(m_s - m), 0.0)
        s1_s = tl.load(p + stride_part, mask=row_mask, other=0.0)
        shift = tl.where(a > 0, (m_s - m) * s1_s, 0.0)  # may overflow where a underflowed
        sz += a * (tl.load(p + 4 * stride_part, mask=row_mask, other=0.0) + shift)
        s1 += a * s1_s
        s1x += a * tl.load(p + 2 * stride_part, mask=row_mask, other=0.0)
        ab = tl.where(live, tl.exp((m_s - m) * inv_beta), 0.0)
        sbx += ab * tl.load(p + 3 * stride_part, mask=row_mask, other=0.0)
        zy = tl.maximum(zy, tl.load(p + 5 * stride_part, mask=row_mask, other=-float("inf")))
        m_before = tl.maximum(
            m_before, tl.load(p + 6 * stride_part, mask=row_mask, other=-float("inf"))
        )
    # V < 0: not known on the host (vocabulary parallel); a label is in range there when some
    # shard found its target (zy finite, as it is for finite logits)
    in_range = (y >= 0) & tl.where(V < 0, zy > -float("inf"), y < V)
    row_ok = valid & in_range & row_mask
    zy_m = tl.where(row_ok, zy - m, 0.0)
    s1x = tl.where(row_ok, s1x, 0.0)
    sbx = tl.where(row_ok, sbx, 0.0)
    loss, g, p_y = tofu_row_terms(s1x, sbx, zy_m, gamma, beta)
    s1 = tl.where(row_ok, s1, 1.0)
    entropy = tl.log(s1) - sz / s1
    zero = tl.zeros((BLOCK_N,), tl.float32)
    loss = tl.where(in_range, loss, float("nan"))
    tl.store(loss_ptr + rows, tl.where(valid, loss, zero), mask=row_mask)
    tl.store(stats_ptr + rows, tl.where(row_ok, p_y, zero), mask=row_mask)
    tl.store(stats_ptr + N + rows, tl.where(row_ok, g, zero), mask=row_mask)
    tl.store(stats_ptr + 2 * N + rows, tl.where(row_ok, entropy, zero), mask=row_mask)
    correct = row_ok & (zy_m >= 0) & (m_before < zy)  # argmax == y (the first of tied maxima)
    tl.store(stats_ptr + 3 * N + rows, tl.where(correct, 1.0, zero), mask=row_mask)
    # Backward terms: row max, g / sb, the target column -g * sbx / sb (no cancellation), and
    # the larger of two entries of the pre-cap logits' gradient, filtering's reference: the
    # target's and, with softcap (whose factor can make it the larger), the row max column's.
    g = tl.where(row_ok, g, zero)
    sb = sbx + tl.exp(zy_m * inv_beta)
    target = -g * (sbx / sb)
    tl.store(rowterm_ptr + rows, tl.where(row_ok, m, float("inf")), mask=row_mask)
    tl.store(rowterm_ptr + N + rows, g / sb, mask=row_mask)
    tl.store(rowterm_ptr + 2 * N + rows, target, mask=row_mask)
    entry = tl.abs(target)
    if HAS_SOFTCAP:
        # from the capped logits, so only as exact as their rounding deep in saturation (where
        # the factor is under ~1e-6; 0 past ~9 softcaps): filtering's reference needs no more
        entry *= _cap_slope(tl.where(row_ok, zy, 0.0), softcap)
        top = g / sb * _cap_slope(tl.where(row_ok, m, 0.0), softcap)
        entry = tl.maximum(entry, tl.where(zy_m < 0, top, 0.0))  # a column other than y's
    tl.store(rowterm_ptr + 3 * N + rows, entry, mask=row_mask)


@triton.jit
def _fused_bwd_kernel(
    # pointers: hidden, weight, bias, labels; per-row terms (4, N); grad scale (1 or N);
    # filtering's reference (1,); gradient accumulators: fp32 (N, H), fp32
    # or the weight's dtype (V, H), fp32 (V,); the rows' sums of the rounding errors of the
    # tiles that grad_hidden sums, fp32 (N,); all contiguous
    x_ptr, w_ptr, b_ptr, labels_ptr, rowterm_ptr, scale_ptr, ref_ptr, gx_ptr, gw_ptr, gb_ptr,
    err_ptr,
    # with TMA_REDUCE, tensor descriptors of the grad_hidden and grad_weight accumulators, in
    # (BLOCK_N | BLOCK_V, BLOCK_K) boxes; None for a gradient not asked for
    gx_desc, gw_desc,
    # sizes and strides
    N, V, H, stride_xn, stride_wv, stride_rt, stride_scale,
    # TOFU parameters, filtering threshold (0 keeps everything that is not exactly 0), the factor
    # of grad_weight's tile sums (an fp16 accumulator would overflow at the tiles' scale)
    beta, softcap, ignore_index, filter_eps, gw_gain,
    # meta
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, GRAD_X: tl.constexpr,
    GRAD_W: tl.constexpr, GRAD_B: tl.constexpr, ROW_ERR: tl.constexpr, UPCAST: tl.constexpr,
    IEEE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_N: tl.constexpr, TMA_REDUCE: tl.constexpr,
):  # fmt: skip
    pid_n, pid_v = grouped_pid(tl.program_id(0), tl.cdiv(N, BLOCK_N), tl.cdiv(V, BLOCK_V), GROUP_N)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    row_mask = rows < N
    col_mask = cols < V
    rows64 = rows.to(tl.int64)
    cols64 = cols.to(tl.int64)
    y = tl.load(labels_ptr + rows, mask=row_mask, other=ignore_index)
    m = tl.load(rowterm_ptr + rows, mask=row_mask, other=float("inf"))
    scale = tl.load(scale_ptr + rows * stride_scale, mask=row_mask, other=0.0)
    coef = tl.load(rowterm_ptr + stride_rt + rows, mask=row_mask, other=0.0) * scale
    target = tl.load(rowterm_ptr + 2 * stride_rt + rows, mask=row_mask, other=0.0) * scale
    # Every |dz| entry of a row is at most g (1 - q_y) |scale|, its target entry before the
    # softcap's factor: rows at or under the threshold (ignored rows; with filtering, confident
    # ones) add nothing, and a block of such rows is skipped before its GEMMs.
    threshold = filter_eps * tl.load(ref_ptr)
    keep = tl.abs(target) > threshold
    coef = tl.where(keep, coef, 0.0)
    target = tl.where(keep, target, 0.0)
    if tl.max(keep.to(tl.int32), axis=0) > 0:
        z = _logits_tile(
            x_ptr, w_ptr, b_ptr, rows64, cols64, row_mask, col_mask, H, stride_xn, stride_wv,
            HAS_BIAS, UPCAST, IEEE, BLOCK_N, BLOCK_V, BLOCK_K,
        )  # fmt: skip
        dz = tofu_dz(z, cols, y, m, coef, target, 1.0 / beta, softcap, HAS_SOFTCAP)
        dz = tl.where(row_mask[:, None] & col_mask[None, :], dz, 0.0)
        # A vocabulary tile whose every entry is under threshold / V is skipped: all the tiles a
        # row skips then add up to at most the threshold (under threshold per entry, as CCE
        # filters, a flat softmax would lose its whole off-target gradient).
        if tl.max(tl.max(tl.abs(dz), axis=1), axis=0) * V > threshold:
            if GRAD_B:
                tl.atomic_add(gb_ptr + cols64, tl.sum(dz, axis=0), mask=col_mask, sem="relaxed")
            dz_in = dz.to(x_ptr.dtype.element_ty)
            if UPCAST:
                dz_in = dz_in.to(tl.float32)
            if ROW_ERR:  # for cancel_rounding
                err = tl.sum(dz_in.to(tl.float32) - dz, axis=1)
                tl.atomic_add(err_ptr + rows, err, mask=row_mask, sem="relaxed")
            ks = tl.arange(0, BLOCK_K)
            for k in range(0, H, BLOCK_K):
                k_mask = (k + ks) < H
                if GRAD_X:
                    w = _load_rows(w_ptr, cols64, stride_wv, col_mask, k, ks, k_mask, UPCAST)
                    gx = _dot(dz_in, w, tl.zeros((BLOCK_N, BLOCK_K), tl.float32), IEEE)
                    _add_rows(
                        gx_ptr, gx_desc, pid_n * BLOCK_N, rows64, H, row_mask, k, ks, k_mask,
                        gx, TMA_REDUCE,
                    )  # fmt: skip
                if GRAD_W:
                    x = _load_rows(x_ptr, rows64, stride_xn, row_mask, k, ks, k_mask, UPCAST)
                    gw = _dot(tl.trans(dz_in), x, tl.zeros((BLOCK_V, BLOCK_K), tl.float32), IEEE)
                    gw = (gw * gw_gain).to(gw_ptr.dtype.element_ty)
                    _add_rows(
                        gw_ptr, gw_desc, pid_v * BLOCK_V, cols64, H, col_mask, k, ks, k_mask,
                        gw, TMA_REDUCE,
                    )  # fmt: skip


def _dot_flags(dtype: torch.dtype) -> dict:
    return dict(UPCAST=interpreting() and dtype != torch.float32, IEEE=dtype == torch.float32)


def _n_splits(n_blocks: int, units: int, device: torch.device) -> int:
    """Vocabulary splits so the forward grid has about two programs per SM."""
    if device.type != "cuda":
        return min(units, 2)
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(units, triton.cdiv(2 * sms, max(n_blocks, 1))))


def fused_config(table: dict, capability: tuple[int, int], dtype: torch.dtype) -> dict:
    """The table's launch config for ``capability`` (an exact (major, minor) key, else its
    major's); fp32 tiles are twice the bytes of bf16/fp16 ones, so they take half the BLOCK_K
    (shared memory: 208 KiB > A100's 163), or the entry's ``FP32`` overrides."""
    major = tuple(capability)[0]
    cfg = dict(table.get(tuple(capability), table.get(major, table[9] if major > 9 else table[8])))
    fp32 = cfg.pop("FP32", {"BLOCK_K": cfg["BLOCK_K"] // 2})
    if dtype == torch.float32:
        cfg.update(fp32)
    return cfg


def autotuning() -> bool:
    """Opt-in autotuning of the fused kernels: ``TOFU_AUTOTUNE=1`` in the environment."""
    return os.environ.get("TOFU_AUTOTUNE", "0") == "1"


def _wall_clock_bench(fn, quantiles=None) -> list[float]:
    """The interpreter has no GPU timer; its timings mean nothing, only the code path is run."""
    start = time.perf_counter()
    fn()
    return [(time.perf_counter() - start) * 1e3] * 3


@functools.cache
def _tuned(kernel, configs: tuple, reset: tuple):
    """``kernel`` autotuned over ``configs`` (sorted item tuples of config dicts) per (H, V,
    dtypes); ``reset``: the accumulators, zeroed before each timed run."""
    configs = [dict(c) for c in configs]
    return triton.autotune(
        configs=[
            triton.Config(
                {k: v for k, v in c.items() if k not in ("num_warps", "num_stages")},
                num_warps=c["num_warps"],
                num_stages=c["num_stages"],
            )
            for c in configs
        ],
        key=["H", "V"],
        reset_to_zero=list(reset),
        do_bench=_wall_clock_bench if interpreting() else None,
    )(kernel)


def _grid(rows: int, vocab: int):
    """The backward's 1-D grid: token blocks times vocabulary tiles of the config."""
    return lambda meta: (triton.cdiv(rows, meta["BLOCK_N"]) * triton.cdiv(vocab, meta["BLOCK_V"]),)


def weight_accumulator(dtype: torch.dtype, accum_fp32: bool) -> torch.dtype:
    """The backward's grad_weight accumulator for a weight of ``dtype``: fp32, or the weight's
    dtype (the interpreter has no bf16 atomics: it sums such a gradient in fp32 instead)."""
    if accum_fp32 or (interpreting() and dtype == torch.bfloat16):
        return torch.float32
    return dtype


def bulk_reduce_ok(device: torch.device, h: int, gw_dtype: torch.dtype) -> bool:
    """Whether the backward can add its tiles by bulk tensor reductions (TMA, sm_90 and later;
    under the interpreter only where it implements them): the accumulators' rows must start on
    16-byte boundaries."""
    if h * 4 % 16 or h * gw_dtype.itemsize % 16:
        return False
    if interpreting():
        from triton.runtime.interpreter import InterpreterBuilder

        return hasattr(InterpreterBuilder, "create_descriptor_reduce")
    cuda = device.type == "cuda" and torch.version.hip is None  # ROCm's MI300 reports 9.4
    return cuda and torch.cuda.get_device_capability(device)[0] >= 9


def _reduce_descriptors(
    tma: bool, gx: torch.Tensor | None, gw: torch.Tensor | None, cfg: dict
) -> tuple[TensorDescriptor | None, TensorDescriptor | None]:
    """The backward's ``gx_desc, gw_desc`` arguments: descriptors of the (rows, H) accumulators
    in the config's tile boxes with ``tma``, else None."""

    def desc(t: torch.Tensor | None, rows: int) -> TensorDescriptor | None:
        if not tma or t is None:
            return None
        return TensorDescriptor(t, list(t.shape), list(t.stride()), [rows, cfg["BLOCK_K"]])

    return desc(gx, cfg.get("BLOCK_N")), desc(gw, cfg.get("BLOCK_V"))


def _launcher(kernel, table: dict, candidates: list, x: torch.Tensor, reset: tuple = ()):
    """(kernel to index with a grid, its config kwargs): the fixed config for ``x``'s device and
    dtype, or, with autotuning on, the autotuned kernel that picks them itself."""
    if autotuning():
        configs = tuple(tuple(sorted(c.items())) for c in candidates)
        return _tuned(kernel, configs, reset), {}
    capability = torch.cuda.get_device_capability(x.device) if x.device.type == "cuda" else (9, 0)
    return kernel, fused_config(table, capability, x.dtype)


def fused_tofu_partials(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None,
    params: TOFUParams,
) -> torch.Tensor:
    """Per-row partials ``(7, SPLITS, N)`` over vocabulary splits of ``weight (V, H)``."""
    n, h = hidden.shape
    vocab = weight.shape[0]
    labels = labels.contiguous()  # the kernels read labels[row] densely
    units = triton.cdiv(vocab, SPLIT_ALIGN)
    group_rows = min(n, GROUP_ROWS)  # the programs of one group fill the GPU
    splits = _n_splits(triton.cdiv(group_rows, FWD_CONFIG["BLOCK_N"]), units, hidden.device)
    cols_per_split = triton.cdiv(units, splits) * SPLIT_ALIGN
    splits = triton.cdiv(vocab, cols_per_split)  # no empty split
    partials = torch.empty(N_PARTIALS, splits, n, dtype=torch.float32, device=hidden.device)
    if n == 0:
        return partials
    kernel, cfg = _launcher(_fused_fwd_kernel, FWD_CONFIGS, TUNE_FWD, hidden)
    softcap = params.softcap if params.softcap is not None else 1.0
    kernel[lambda meta: (triton.cdiv(n, meta["BLOCK_N"]) * splits,)](
        hidden, weight, bias if bias is not None else weight, labels, partials,
        n, vocab, h, hidden.stride(0), weight.stride(0), splits, cols_per_split,
        params.beta, softcap, params.ignore_index,
        HAS_BIAS=bias is not None, HAS_SOFTCAP=params.softcap is not None,
        **_dot_flags(hidden.dtype), **cfg, **LAUNCH_OPTIONS,
    )  # fmt: skip
    return partials


def fused_tofu_merge(
    partials: torch.Tensor, labels: torch.Tensor, vocab: int | None, params: TOFUParams
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Combine ``(7, S, N)`` partials into per-token fp32 losses ``(N,)``, stats ``(4, N)`` and
    the backward's per-row terms ``(4, N)``: row max, g / sb, the target column, and
    filtering's reference entry (:func:`~tofu_kernels.utils.filter_reference`).
    ``vocab`` None: not known on the host (vocabulary parallel); a label no partial holds is
    out of range."""
    if vocab is None:
        vocab = -1
    n = labels.shape[0]
    labels = labels.contiguous()
    loss = torch.empty(n, dtype=torch.float32, device=labels.device)
    stats = torch.empty(4, n, dtype=torch.float32, device=labels.device)
    rowterms = torch.empty(4, n, dtype=torch.float32, device=labels.device)
    if n == 0:
        return loss, stats, rowterms
    merge_block = 128
    softcap = params.softcap if params.softcap is not None else 1.0
    _fused_merge_kernel[(triton.cdiv(n, merge_block),)](
        partials, labels, loss, stats, rowterms, n, vocab, partials.shape[1],
        params.gamma, params.beta, softcap, params.ignore_index,
        HAS_SOFTCAP=params.softcap is not None, BLOCK_N=merge_block, **LAUNCH_OPTIONS,
    )  # fmt: skip
    return loss, stats, rowterms


def collapse_splits(partials: torch.Tensor, beta: float) -> torch.Tensor:
    """Merge ``(7, S, N)`` partials into ``(7, 1, N)`` with PyTorch (as the merge kernel does)."""
    m_s, s1, s1x, sbx, sz, zy, m_before = partials.unbind(0)
    m = m_s.max(0).values
    live = m_s > -math.inf  # a split without columns for the row adds 0 (and no NaN)
    a = torch.where(live, torch.exp(m_s - m), 0.0)
    shift = torch.where(a > 0, (m_s - m) * s1, 0.0)
    merged = [
        m,
        (a * s1).sum(0),
        (a * s1x).sum(0),
        (torch.where(live, torch.exp((m_s - m) / beta), 0.0) * sbx).sum(0),
        (a * (sz + shift)).sum(0),
        zy.max(0).values,
        m_before.max(0).values,
    ]
    return torch.stack(merged).unsqueeze(1)


def fused_tofu_fwd(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None,
    params: TOFUParams,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fused forward on ``hidden (N, H)``, ``weight (V, H)``: per-token fp32 losses ``(N,)``,
    stats ``(4, N)`` and the backward's per-row terms ``(4, N)``. No checks, no autograd."""
    partials = fused_tofu_partials(hidden, weight, labels, bias, params)
    return fused_tofu_merge(partials, labels, weight.shape[0], params)


def fused_tofu_bwd(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None,
    rowterms: torch.Tensor,
    grad_scale: torch.Tensor,
    params: TOFUParams,
    needs: tuple[bool, bool, bool],
    filter_eps: float | None = None,
    accum_fp32: bool = True,
    gx_fp32: bool = False,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Gradients of ``sum_t grad_scale[t] * loss[t]`` (``grad_scale`` fp32, 1 or N elements) for
    (hidden, weight, bias) where ``needs`` says so. ``filter_eps``: None picks the default (on
    for half precision, exact zeros only for fp32); 0 disables filtering. ``accum_fp32``: sum
    ``grad_weight`` in an fp32 (V, H) buffer and cast once, or add straight into a gradient of
    the weight's dtype (no buffer; one rounding per token block). ``grad_hidden`` always sums in
    fp32, one token slab of at most ``GX_SLAB_ELEMS`` elements at a time, and is returned in
    fp32 with ``gx_fp32`` (a vocabulary shard's share, summed over ranks before rounding)."""
    n, h = hidden.shape
    vocab = weight.shape[0]
    dev, f32 = hidden.device, torch.float32
    labels, grad_scale = labels.contiguous(), grad_scale.contiguous()
    if filter_eps is None:
        filter_eps = 0.0 if hidden.dtype == f32 else FILTER_EPS_HALF
    w_acc = weight_accumulator(weight.dtype, accum_fp32)
    gx_dtype = f32 if gx_fp32 else hidden.dtype
    gx = torch.empty(n, h, dtype=gx_dtype, device=dev) if needs[0] else None
    gw = torch.zeros(vocab, h, dtype=w_acc, device=dev) if needs[1] else None
    gb = torch.zeros(vocab, dtype=f32, device=dev) if needs[2] else None
    if n and any(needs):
        # fp16's gradient is formed near its headroom, the scale undone below (norm)
        grad_scale, norm = normalized_grad_scale(rowterms, grad_scale, hidden.dtype)
        ref = filter_reference(rowterms, grad_scale)
        gain = rows_gain(n, w_acc)  # 1 unless the accumulator is fp16
        kernel, cfg = _launcher(
            _fused_bwd_kernel, BWD_CONFIGS, TUNE_BWD, hidden,
            ("gx_ptr", "gw_ptr", "gb_ptr", "err_ptr"),
        )  # fmt: skip
        tma = cfg.pop("TMA_REDUCE", False) and bulk_reduce_ok(hidden.device, h, w_acc)
        # grad_hidden's rounding errors, moved onto the targets' weight rows (cancel_rounding)
        row_err = needs[0] and hidden.dtype in HALF_DTYPES
        slab = n
        if needs[0] and gx_dtype != f32:  # grad_hidden sums in an fp32 slab, then is cast
            slab = max(ROW_ALIGN, GX_SLAB_ELEMS // h // ROW_ALIGN * ROW_ALIGN)
        row_scale = grad_scale.numel() > 1
        # gradients not asked for point at a scratch word of their own: autotuning zeroes
        # every accumulator argument before its timed runs
        dummy = hidden.new_zeros(1, dtype=f32)
        for s in range(0, n, slab):
            e = min(s + slab, n)
            gx_acc = dummy
            if needs[0]:
                gx_acc = (
                    gx[s:e].zero_() if gx_dtype == f32 else hidden.new_zeros(e - s, h, dtype=f32)
                )
            err = hidden.new_zeros(e - s, dtype=f32) if row_err else dummy
            kernel[_grid(e - s, vocab)](
                hidden[s:e], weight, bias if bias is not None else weight, labels[s:e],
                rowterms[:, s:e], grad_scale[s:e] if row_scale else grad_scale, ref, gx_acc,
                gw if gw is not None else dummy, gb if gb is not None else dummy, err,
                *_reduce_descriptors(tma, gx_acc if needs[0] else None, gw, cfg),
                e - s, vocab, h, hidden.stride(0), weight.stride(0), rowterms.stride(0),
                int(row_scale), params.beta,
                params.softcap if params.softcap is not None else 1.0, params.ignore_index,
                float(filter_eps), gain,
                HAS_BIAS=bias is not None, HAS_SOFTCAP=params.softcap is not None,
                GRAD_X=needs[0], GRAD_W=needs[1], GRAD_B=needs[2], ROW_ERR=row_err,
                TMA_REDUCE=tma, **_dot_flags(hidden.dtype), **cfg, **LAUNCH_OPTIONS,
            )  # fmt: skip
            if row_err:
                cancel_rounding(gx_acc, err, weight, labels[s:e])
            if needs[0]:
                if norm is not None:
                    gx_acc.mul_(norm)
                if gx_dtype != f32:  # fp32 grad_hidden was summed in place
                    gx[s:e] = gx_acc
        if norm is not None:
            if gw is not None:
                gw.mul_(norm / gain)
            if gb is not None:
                gb.mul_(norm)
    # Cast one fp32 buffer at a time, dropping each before the next cast.
    if gw is not None:
        gw = gw.to(weight.dtype)
    if gb is not None:
        gb = gb.to(bias.dtype)
    return gx, gw, gb


def recompute_partials(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None,
    params: TOFUParams,
    impl: str = "fused",
    chunk_size: int | None = None,
) -> torch.Tensor:
    """``(7, S, N)`` partials of a recompute-in-backward impl: the fused kernel, or
    ``impl="vocab_chunked"``'s cuBLAS chunks (whose module imports this one)."""
    if impl == "vocab_chunked":
        from tofu_kernels.vocab_chunked import vocab_chunked_partials

        return vocab_chunked_partials(hidden, weight, labels, bias, params, chunk_size)
    return fused_tofu_partials(hidden, weight, labels, bias, params)


@torch.library.custom_op("tofu_kernels::fused_tofu_fwd", mutates_args=())
def fused_fwd_op(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None,
    gamma: float,
    beta: float,
    ignore_index: int,
    softcap: float | None,
    impl: str,
    chunk_size: int | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The forward of ``impl`` ("fused" or "vocab_chunked") as an opaque op for
    ``torch.compile``: per-token losses, stats and the backward's per-row terms."""
    params = TOFUParams(gamma, beta, ignore_index, "sum", softcap)
    partials = recompute_partials(hidden, weight, labels, bias, params, impl, chunk_size)
    return fused_tofu_merge(partials, labels, weight.shape[0], params)


@fused_fwd_op.register_fake
def _(hidden, weight, labels, bias, gamma, beta, ignore_index, softcap, impl, chunk_size):
    n = hidden.shape[0]
    return (hidden.new_empty(n, dtype=torch.float32), hidden.new_empty(4, n, dtype=torch.float32),
            hidden.new_empty(4, n, dtype=torch.float32))  # fmt: skip


@torch.library.custom_op("tofu_kernels::fused_tofu_bwd", mutates_args=())
def fused_bwd_op(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None,
    rowterms: torch.Tensor,
    grad_scale: torch.Tensor,
    gamma: float,
    beta: float,
    ignore_index: int,
    softcap: float | None,
    needs: list[bool],
    filter_eps: float | None,
    accum_fp32: bool,
    impl: str,
    chunk_size: int | None,
    gx_fp32: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The backward of ``impl`` as an opaque op; gradients not asked for come back empty;
    ``grad_hidden`` in fp32 with ``gx_fp32``."""
    params = TOFUParams(gamma, beta, ignore_index, "sum", softcap)
    if impl == "vocab_chunked":
        from tofu_kernels.vocab_chunked import lean_slab_rows, vocab_chunked_bwd

        grads = vocab_chunked_bwd(
            hidden, weight, labels, bias, rowterms, grad_scale, params, tuple(needs), chunk_size,
            gx_fp32, lean_slab_rows(hidden.shape[0], weight.dtype, accum_fp32),
        )  # fmt: skip
    else:
        grads = fused_tofu_bwd(
            hidden, weight, labels, bias, rowterms, grad_scale, params, tuple(needs),
            filter_eps, accum_fp32, gx_fp32,
        )  # fmt: skip
    return tuple(g if g is not None else hidden.new_empty(0) for g in grads)


@fused_bwd_op.register_fake
def _(hidden, weight, labels, bias, rowterms, grad_scale, gamma, beta, ignore_index, softcap,
      needs, filter_eps, accum_fp32, impl, chunk_size, gx_fp32):  # fmt: skip
    gx_dtype = torch.float32 if gx_fp32 else hidden.dtype
    return (  # contiguous, as the op makes them; a fresh empty tensor for each not needed
        hidden.new_empty(hidden.shape, dtype=gx_dtype) if needs[0] else hidden.new_empty(0),
        weight.new_empty(weight.shape) if needs[1] else hidden.new_empty(0),
        bias.new_empty(bias.shape) if needs[2] and bias is not None else hidden.new_empty(0),
    )


@dataclass(frozen=True)
class FusedParams:
    """Options of the recompute-in-backward impls: "fused", and "vocab_chunked" (its chunk
    size in vocabulary columns)."""

    tofu: TOFUParams
    filter_eps: float | None = None
    # grad_weight summed in fp32, or in the weight's dtype (fused: atomics into the gradient;
    # vocab_chunked: across token slabs)
    accum_fp32: bool = True
    # vocabulary parallel: this rank's shard of the vocabulary is [vocab_offset, + weight rows)
    # (a 0-dim device tensor: gathered without a host sync)
    process_group: object = None
    vocab_offset: torch.Tensor | int = 0
    impl: str = "fused"
    chunk_size: int | None = None


def shard_layout(
    local_vocab: int, group, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """(this rank's vocabulary offset, the global vocabulary), 0-dim int64 tensors on ``device``,
    for contiguous shards in rank order.

    The shard sizes are all-gathered on every call: a tiny collective, no host sync. A cache
    would hit or miss on each rank alone (two heads whose shards differ only on some ranks), and
    a rank that missed entered the gather while the others went on to the next collective.
    """
    size = torch.full((1,), local_vocab, dtype=torch.int64, device=device)  # no host copy
    sizes = [torch.empty_like(size) for _ in range(dist.get_world_size(group))]
    dist.all_gather(sizes, size, group=group)
    sizes = torch.cat(sizes)
    return sizes[: dist.get_rank(group)].sum(), sizes.sum()


# A shard's labels: its target columns 0..V_local-1; ignored rows and targets on other shards
# get ids no column has. Not the global ignore_index: one in [0, V_local) (0, say) would make a
# target in the shard's first columns look ignored (its row's partials were then skipped: NaN).
LOCAL_IGNORE, LOCAL_ELSEWHERE = -1, -2


def _local_labels(y: torch.Tensor, params: FusedParams, local_vocab: int) -> torch.Tensor:
    """Global labels to this shard's columns (ignored: ``LOCAL_IGNORE``, targets elsewhere:
    ``LOCAL_ELSEWHERE``); the kernels then take ``ignore_index=LOCAL_IGNORE``."""
    local = y - params.vocab_offset
    in_shard = (local >= 0) & (local < local_vocab)
    local = torch.where(in_shard, local, torch.full_like(y, LOCAL_ELSEWHERE))
    return torch.where(y == params.tofu.ignore_index, torch.full_like(y, LOCAL_IGNORE), local)


def _vocab_parallel_fwd(x, w, y, bias, params: FusedParams):
    """Each rank reduces its shard to per-row partials; one all_gather gives every rank all of
    them, and the merge (identical on every rank) the global loss, g and softmax terms."""
    group = params.process_group
    partials = recompute_partials(
        x, w, _local_labels(y, params, w.shape[0]), bias,
        replace(params.tofu, ignore_index=LOCAL_IGNORE), params.impl, params.chunk_size,
    )  # fmt: skip
    mine = collapse_splits(partials, params.tofu.beta).contiguous()
    # the max left of a target on a later shard is this whole shard's max
    later = y >= params.vocab_offset + w.shape[0]
    mine[6, 0] = torch.where(later, mine[0, 0], mine[6, 0])
    gathered = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(gathered, mine, group=group)
    return fused_tofu_merge(torch.cat(gathered, dim=1), y, None, params.tofu)


class FusedTOFUFunction(torch.autograd.Function):
    """Forward keeps O(N) per-row terms; backward recomputes logits tiles (any reduction).

    With a process group, ``weight``/``bias`` are this rank's vocabulary shard: the per-row
    partials are all-gathered in forward, and ``grad_hidden`` all-reduced in backward.
    """

    @staticmethod
    def forward(
        ctx,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        labels: torch.Tensor,
        num_items_in_batch: int | float | torch.Tensor | None,
        params: FusedParams,
        needs: tuple[bool, bool, bool],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        x = hidden.reshape(-1, hidden.shape[-1])
        if x.stride(-1) != 1:
            x = x.contiguous()
        w = weight if weight.stride(-1) == 1 else weight.contiguous()
        if bias is not None:
            bias = bias.contiguous()  # the fused kernels read bias[col] densely
        y = labels.reshape(-1)
        t = params.tofu
        if params.process_group is None:
            loss_rows, row_stats, rowterms = fused_fwd_op(
                x, w, y, bias, t.gamma, t.beta, t.ignore_index, t.softcap, params.impl,
                params.chunk_size,
            )  # fmt: skip
        else:
            loss_rows, row_stats, rowterms = _vocab_parallel_fwd(x, w, y, bias, params)
            y = _local_labels(y, params, w.shape[0])  # backward matches targets in the shard
        scale = reduction_scale(
            y if params.process_group is None else labels, t, num_items_in_batch
        )
        ctx.params, ctx.needs, ctx.hidden_shape = params, needs, hidden.shape
        ctx.save_for_backward(x, w, bias, y, rowterms, scale)
        ctx.mark_non_differentiable(row_stats)
        return reduce_loss(loss_rows, labels.shape, t, scale), row_stats

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor, _grad_stats: torch.Tensor | None):
        check_backward(ctx, "fused_linear_tofu_loss", consumes=False)  # inputs are only read
        x, w, bias, y, rowterms, scale = ctx.saved_tensors
        # contiguous: a grad_output from .sum() is an expanded, stride-0 view
        grad_scale = grad_loss.reshape(-1).to(torch.float32).contiguous()
        if scale is not None:
            grad_scale = grad_scale * scale
        t = ctx.params.tofu
        sharded = ctx.params.process_group is not None
        ignore = LOCAL_IGNORE if sharded else t.ignore_index  # y holds the shard's labels
        grads = fused_bwd_op(
            x, w, y, bias, rowterms, grad_scale, t.gamma, t.beta, ignore, t.softcap,
            list(ctx.needs), ctx.params.filter_eps, ctx.params.accum_fp32, ctx.params.impl,
            ctx.params.chunk_size, sharded,
        )  # fmt: skip
        gx, gw, gb = (g if need else None for g, need in zip(grads, ctx.needs, strict=True))
        if gx is not None:
            if sharded:  # every shard's share, in fp32: the shares' shared directions cancel
                dist.all_reduce(gx, group=ctx.params.process_group)
                gx = gx.to(x.dtype)
            gx = gx.view(ctx.hidden_shape)
        return gx, gw, gb, None, None, None, None
