"""impl="vocab_chunked" mechanics: chunk boundaries, what it allocates, what it skips.

The oracle grid shared with the other impls lives in test_linear_tofu.py.
"""

from __future__ import annotations

import pytest
import torch

from helpers import LINEAR_GRAD_RTOL, LINEAR_LOSS_RTOL, linear_oracle, make_inputs, rel_err
from tofu_kernels import fused_linear_tofu_loss
from tofu_kernels import vocab_chunked as vc_mod


def run(x, w, b, y, **kwargs):
    leaves = [t.detach().clone().requires_grad_(True) if t is not None else None for t in (x, w, b)]
    loss = fused_linear_tofu_loss(
        leaves[0], leaves[1], y, bias=leaves[2], impl="vocab_chunked", **kwargs
    )
    loss.backward()
    return [loss.detach()] + [t.grad if t is not None else None for t in leaves]


def check(x, w, b, y, grads, dtype, **oracle_kwargs):
    ref = linear_oracle(x, w, y, bias=b, gamma=3.0, beta=0.8, **oracle_kwargs)
    for got, want, name in zip(grads, ref, ("loss", "hidden", "weight", "bias"), strict=True):
        if got is not None:
            tol = LINEAR_LOSS_RTOL[dtype] if name == "loss" else LINEAR_GRAD_RTOL[dtype]
            assert rel_err(got, want) < tol, (name, rel_err(got, want))


# chunk sizes around V = 300: many chunks with a short last one, an exact divisor, one chunk
# exactly V, one larger than V
@pytest.mark.parametrize("chunk", [7, 100, 300, 1000])
def test_chunk_boundaries(device, chunk):
    x, w, b, y = make_inputs((21,), 40, 300, torch.float32, device, bias=True, ignored=0.2)
    y[:6] = torch.tensor([0, 99, 100, 199, 200, 299], device=device)  # targets on the edges
    check(x, w, b, y, run(x, w, b, y, chunk_size=chunk, softcap=15.0), torch.float32,
          softcap=15.0)  # fmt: skip


def test_default_chunk():
    assert vc_mod.default_vocab_chunk(4096, 128256) == 4096
    assert vc_mod.default_vocab_chunk(896, 151936) == vc_mod.MIN_VOCAB_CHUNK
    assert vc_mod.default_vocab_chunk(4000, 3000) == 3000
    assert vc_mod.default_vocab_chunk(4000, 10**6) % vc_mod.CHUNK_ALIGN == 0


def spy_allocations(monkeypatch) -> list:
    """The (shape, dtype) of every torch.zeros / torch.empty the vocab_chunked module makes."""
    shapes = []
    for name in ("zeros", "empty"):
        real = getattr(torch, name)

        def spy(*size, _real=real, dtype=None, **kwargs):
            shapes.append((tuple(size), dtype))
            return _real(*size, dtype=dtype, **kwargs)

        monkeypatch.setattr(vc_mod.torch, name, spy)
    return shapes


def test_no_weight_sized_fp32_buffer_and_frozen_weight(device, monkeypatch):
    """grad_weight rows are written once per chunk in the weight's dtype: nothing (V, H) in fp32
    is allocated; a frozen weight gets no grad_weight GEMM at all."""
    shapes = spy_allocations(monkeypatch)
    mm_outs = []  # the out= shapes of every GEMM
    for name in ("mm", "addmm"):
        real = getattr(torch, name)

        def gemm_spy(*args, _real=real, out=None, **kwargs):
            mm_outs.append(None if out is None else tuple(out.shape))
            return _real(*args, out=out, **kwargs)

        monkeypatch.setattr(vc_mod.torch, name, gemm_spy)
    x, w, _, y = make_inputs((30,), 40, 300, torch.bfloat16, device)
    grads = run(x, w, None, y, chunk_size=128)
    check(x, w, None, y, grads, torch.bfloat16)
    assert ((300, 40), torch.bfloat16) in shapes and ((300, 40), torch.float32) not in shapes
    assert mm_outs.count((128, 40)) == 2 and mm_outs.count((44, 40)) == 1  # grad_weight chunks
    mm_outs.clear()
    x.requires_grad_(True)
    fused_linear_tofu_loss(x, w, y, impl="vocab_chunked", chunk_size=128).backward()
    assert (30, 128) in mm_outs  # the logits GEMMs ran, and only they
    assert (128, 40) not in mm_outs and (44, 40) not in mm_outs


# accum_dtype=None in half precision runs the backward over token slabs: 23 rows in slabs of 7
# (three full, one of 2 rows: a short slab's layout of rounding-error sums), chunks of 128 of
# V = 301 (a short last one), with bias, softcap, ignored rows and a per-token upstream gradient;
# and a frozen weight (slabs of grad_hidden only).
@pytest.mark.parametrize(
    "dtype,frozen", [(torch.bfloat16, False), (torch.float16, False), (torch.bfloat16, True)]
)
def test_token_slabs(device, monkeypatch, dtype, frozen):
    monkeypatch.setattr(vc_mod, "LEAN_SLAB_ROWS", 7)
    shapes = spy_allocations(monkeypatch)
    x, w, b, y = make_inputs((23,), 40, 301, dtype, device, bias=True, ignored=0.3)
    leaves = [t.detach().clone().requires_grad_(t is not w or not frozen) for t in (x, w, b)]
    opts = dict(softcap=20.0, reduction="none")
    loss = fused_linear_tofu_loss(
        leaves[0], leaves[1], y, bias=leaves[2], impl="vocab_chunked", chunk_size=128,
        accum_dtype=None, **opts,
    )  # fmt: skip
    go = torch.randn_like(loss)
    loss.backward(go)
    ref = linear_oracle(x, w, y, bias=b, gamma=3.0, beta=0.8, grad_output=go, **opts)
    names = ("loss", "x", "w", "b")
    for got, want, name in zip([loss, *(t.grad for t in leaves)], ref, names, strict=True):
        if name == "w" and frozen:
            assert got is None
            continue
        tol = LINEAR_LOSS_RTOL[dtype] if name == "loss" else LINEAR_GRAD_RTOL[dtype]
        assert rel_err(got, want) < tol, (name, rel_err(got, want))
        assert name == "loss" or got.dtype == dtype
    # a (slab, H) fp32 grad_hidden buffer and a (slab, chunk) logits buffer, nothing (N, H) in
    # fp32; grad_hidden is allocated in its own dtype
    assert ((7, 40), torch.float32) in shapes and ((23, 40), torch.float32) not in shapes
    assert ((23, 40), dtype) in shapes and ((7 * 128,), dtype) in shapes
    assert vc_mod.lean_slab_rows(23, torch.float32, accum_fp32=False) is None  # fp32: no slabs
    assert vc_mod.lean_slab_rows(23, dtype, accum_fp32=True) is None


def test_lean_slab_rows():
    """At least four even slabs of at most 2048 rows, in multiples of 128: the temporaries
    (6 * slab * H bytes with H-column chunks) stay under Liger's logits chunk (~2 N H bytes) at
    4096 tokens as at 8192, grad_weight takes three read-modify-writes up to 8192 tokens, and
    no slab is a few rows (8193 tokens: five of 1664, not four of 2048 and one of 1)."""
    ns = (0, 100, 1000, 1025, 4096, 5000, 8192, 8193, 16384)
    rows = {n: vc_mod.lean_slab_rows(n, torch.bfloat16, accum_fp32=False) for n in ns}
    assert rows == {
        0: 1, 100: 128, 1000: 256, 1025: 384, 4096: 1024, 5000: 1280, 8192: 2048, 8193: 1664,
        16384: 2048,
    }  # fmt: skip


def test_token_slabs_fp16_weight_gradient_stays_in_range(device, monkeypatch):
    """fp16 slabs add each slab's grad_weight, summed in fp32, at its true scale: four slabs
    of 256 tokens of one label with hidden states ~100 (the true mean is ~50; one slab's sum
    at the logits' gradient's unit scale would pass 65504)."""
    monkeypatch.setattr(vc_mod, "LEAN_SLAB_ROWS", 256)
    n, vocab, hidden = 1024, 64, 16
    x = (torch.randn(n, hidden, device=device) + 100.0).half().requires_grad_(True)
    w = (torch.randn(vocab, hidden, device=device) * 1e-3).half().requires_grad_(True)
    y = torch.full((n,), 3, device=device)
    fused_linear_tofu_loss(x, w, y, impl="vocab_chunked", accum_dtype=None).backward()
    _, gx, gw, _ = linear_oracle(x, w, y, gamma=3.0, beta=0.8)
    assert gw.abs().max() > 20
    assert torch.isfinite(x.grad).all()
    assert rel_err(w.grad, gw) < LINEAR_GRAD_RTOL[torch.float16], rel_err(w.grad, gw)


def test_all_ignored_and_out_of_range(device):
    x, w, b, y = make_inputs((12,), 40, 300, torch.float32, device, bias=True, ignored=1.0)
    grads = run(x, w, b, y, chunk_size=128)
    assert grads[0].item() == 0 and all((g == 0).all() for g in grads[1:])
    from tofu_kernels.fused_tofu import fused_tofu_merge
    from tofu_kernels.utils import TOFUParams

    y = torch.tensor([1, 300, -7, 2], device=device)
    params = TOFUParams()
    partials = vc_mod.vocab_chunked_partials(x[:4], w, y, b, params, chunk_size=128)
    loss, _, rowterms = fused_tofu_merge(partials, y, 300, params)
    assert torch.isnan(loss[1:3]).all() and torch.isfinite(loss[[0, 3]]).all()
    assert (rowterms[1:, 1:3] == 0).all()  # no gradient from them


def test_empty_batch(device):
    x, w, b, _ = make_inputs((0,), 40, 300, torch.float32, device, bias=True)
    y = torch.zeros(0, dtype=torch.long, device=device)
    loss, gx, gw, gb = run(x, w, b, y, reduction="sum")
    assert loss.item() == 0 and gx.shape == (0, 40)
    assert (gw == 0).all() and (gb == 0).all()
