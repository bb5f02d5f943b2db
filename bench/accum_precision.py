"""How precise is accumulating the fused backward's gradients in bf16? A CPU emulation.

The fused backward adds one fp32 tile product per (token block, vocabulary tile) into each
gradient. With fp32 accumulators the sums are exact to fp32; accumulating straight into the bf16
gradients (atomics in the gradient's dtype, no accumulator memory) rounds after every addition:
``grad_weight`` takes N / BLOCK_N additions per element, ``grad_hidden`` V / BLOCK_V. This script
replays those additions in the same order of magnitude and rounding (each addition rounded to
bf16, round-to-nearest-even, as ``red.add.bf16`` does) at the real N and V of the Llama-3-8B head
with a small H (the error per element does not depend on H, only on the number and size of the
addends), and reports the error against float64 the way the GPU tests measure it: the largest
elementwise error over the largest magnitude. It also replays ``grad_weight`` summed in fp32 per
token slab and rounded to bf16 after each (``impl="vocab_chunked"`` with ``accum_dtype=None``:
``--lean-slab`` tokens; Liger's chunks of 256 rows the same way).

    python bench/accum_precision.py [--tokens 8192] [--vocab 128256] [--hidden 64]
"""

from __future__ import annotations

import argparse

import torch

from tofu_kernels.reference import tofu_rows


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.double() - expected).abs().max() / expected.abs().max()).item()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--vocab", type=int, default=128256)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--slab", type=int, default=512)
    ap.add_argument("--lean-slab", type=int, default=2048, help="a multiple of --slab")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    n, v, h = args.tokens, args.vocab, args.hidden
    # the GPU test's inputs: logits with a spread of a few units, 30% of labels ignored
    x = torch.randn(n, h).to(torch.bfloat16)
    w = (torch.randn(v, h) * 3 / h**0.5).to(torch.bfloat16)
    y = torch.randint(0, v, (n,))
    y[torch.rand(n) < 0.3] = -100
    scale = 1.0 / (y != -100).sum().item()  # reduction="mean"
    xd, wd = x.double(), w.double()

    block_ns, block_vs = (64, 128), (128, 256)
    gw_ref = torch.zeros(v, h, dtype=torch.float64)
    gw_f32 = torch.zeros(v, h)
    gw_bf16 = {b: torch.zeros(v, h, dtype=torch.bfloat16) for b in block_ns}
    # rounded once per slab of token rows: fp32 sums of slab_rows[k] rows, then a bf16 addition
    slab_rows = (256, args.lean_slab)
    gw_slabs = {r: torch.zeros(v, h, dtype=torch.bfloat16) for r in slab_rows}
    gw_slab_part = {r: torch.zeros(v, h) for r in slab_rows}
    gx_ref = torch.zeros(n, h, dtype=torch.float64)
    gx_f32 = torch.zeros(n, h)
    gx_bf16 = {b: torch.zeros(n, h, dtype=torch.bfloat16) for b in block_vs}
    for s in range(0, n, args.slab):
        rows = slice(s, s + args.slab)
        _, _, dz = tofu_rows(xd[rows] @ wd.T, y[rows], 3.0, 0.8, -100, None, True)
        dz = dz * scale
        gw_ref += dz.T @ xd[rows]
        gx_ref[rows] = dz @ wd
        dz_in = dz.to(torch.bfloat16).float()  # the kernel feeds bf16 dz to the tensor cores
        xf, wf = x[rows].float(), w.float()
        for b in block_ns:
            for t in range(0, dz_in.shape[0], b):
                part = dz_in[t : t + b].T @ xf[t : t + b]
                gw_bf16[b] = (gw_bf16[b].float() + part).to(torch.bfloat16)
        gw_f32 += dz_in.T @ xf
        for r in slab_rows:
            step = min(r, args.slab)
            for t in range(0, dz_in.shape[0], step):
                gw_slab_part[r] += dz_in[t : t + step].T @ xf[t : t + step]
                end = s + t + step
                if end % r == 0 or end >= n:
                    gw_slabs[r] = (gw_slabs[r].float() + gw_slab_part[r]).to(torch.bfloat16)
                    gw_slab_part[r].zero_()
        for b in block_vs:
            acc = torch.zeros(dz_in.shape[0], h, dtype=torch.bfloat16)
            for c in range(0, v, b):
                acc = (acc.float() + dz_in[:, c : c + b] @ wf[c : c + b]).to(torch.bfloat16)
            gx_bf16[b][rows] = acc
        gx_f32[rows] = dz_in @ wf
        print(f"rows {s + dz.shape[0]}/{n}", flush=True)

    print(f"\nN={n} V={v} H={h} bf16 inputs, gamma=3 beta=0.8, 30% ignored, mean reduction")
    print("error = max |got - float64| / max |float64|  (the GPU tests allow 2e-2)\n")
    print("| gradient | accumulation | additions per element | error |")
    print("|---|---|---|---|")
    print(f"| grad_weight | fp32, cast once | {n // 64} (BLOCK_N=64) | "
          f"{rel_err(gw_f32.to(torch.bfloat16), gw_ref):.2e} |")  # fmt: skip
    for b, got in gw_bf16.items():
        print(
            f"| grad_weight | bf16 atomics | {n // b} (BLOCK_N={b}) | {rel_err(got, gw_ref):.2e} |"
        )
    for r, got in gw_slabs.items():
        print(f"| grad_weight | bf16 per {r}-token slab | {-(-n // r)} | "
              f"{rel_err(got, gw_ref):.2e} |")  # fmt: skip
    print(f"| grad_hidden | fp32, cast once | {v // 128} (BLOCK_V=128) | "
          f"{rel_err(gx_f32.to(torch.bfloat16), gx_ref):.2e} |")  # fmt: skip
    for b, got in gx_bf16.items():
        print(f"| grad_hidden | bf16 atomics | {-(-v // b)} (BLOCK_V={b}) | "
              f"{rel_err(got, gx_ref):.2e} |")  # fmt: skip


if __name__ == "__main__":
    main()
