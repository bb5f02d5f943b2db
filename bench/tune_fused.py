"""Time every candidate launch config of the fused kernels at one shape, to choose the fixed
per-architecture defaults (``FWD_CONFIGS`` / ``BWD_CONFIGS`` in ``tofu_kernels/fused_tofu.py``).

    python bench/tune_fused.py [--tokens 8192 --hidden 4096 --vocab 128256] [--budget-s 240]
                               [--out DIR]

Times, with ``triton.testing.do_bench``: the cuBLAS logits GEMM (the scale), the default
backward broken down (both gradients, then each alone, fp32 or bf16 ``grad_weight`` atomics),
the backward (grad_hidden and grad_weight, fp32 and bf16 ``grad_weight`` accumulation) for each
of ``TUNE_BWD_TMA`` (bulk tensor reductions, first: a short budget reaches them) and
``TUNE_BWD``, and the forward (partials + merge) for each of ``TUNE_FWD``. A config that does
not fit the card (shared memory, registers) is a row with its error, and one whose loss or
gradients differ from the default config's by more than 2e-2 of the largest value a "mismatch"
row.
Prints a table per kernel, fastest first, and writes ``DIR/tune.json``. On CPU (``--smoke``)
it runs two candidates of each at tiny shapes through the interpreter: the timings mean nothing
there, the script is what is tested.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # the GPU machine runs from the checkout
    sys.path.insert(1, str(ROOT))
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import triton.testing  # noqa: E402

from tofu_kernels import fused_tofu  # noqa: E402
from tofu_kernels.utils import TOFUParams  # noqa: E402


@contextlib.contextmanager
def launch_config(table: dict, config: dict) -> Iterator[None]:
    """``config`` as ``table``'s (``FWD_CONFIGS``/``BWD_CONFIGS``) launch config on this device:
    under its exact (major, minor) key, which ``fused_config`` looks up first; the table is
    restored afterwards."""
    key = tuple(torch.cuda.get_device_capability()) if torch.cuda.is_available() else (9, 0)
    saved = dict(table)
    table[key] = config
    try:
        yield
    finally:
        table.clear()
        table.update(saved)


def bench_ms(fn, device: str) -> float:
    if device == "cpu":
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3
    return triton.testing.do_bench(fn, warmup=25, rep=100)


def save(result: dict, out: Path | None) -> None:
    """``out/tune.json`` rewritten after every row: a call cut short keeps what it timed."""
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "tune.json").write_text(json.dumps(result, indent=1))


def tune(args: argparse.Namespace) -> dict:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16
    n, h, v = args.tokens, args.hidden, args.vocab
    torch.manual_seed(0)
    x = torch.randn(n, h, device=device).to(dtype)
    w = (torch.randn(v, h, device=device) * 3 / h**0.5).to(dtype)
    y = torch.randint(0, v, (n,), device=device)
    params = TOFUParams()
    deadline = time.monotonic() + args.budget_s
    result = {
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "torch": torch.__version__,
        "triton": triton.__version__,
        "shape": dict(tokens=n, hidden=h, vocab=v, dtype=str(dtype)),
        "gemm_ms": bench_ms(lambda: x @ w.T, device),
        "breakdown": [],
        "fwd": [],
        "bwd": [],
    }
    # the default configs' results: every candidate must agree with them
    loss_ref, _, rowterms = fused_tofu.fused_tofu_fwd(x, w, y, None, params)
    scale = torch.full((1,), 1.0 / n, device=device)
    gx_ref, gw_ref, _ = fused_tofu.fused_tofu_bwd(
        x, w, y, None, rowterms, scale, params, (True, True, False)
    )
    # Where the default backward's time goes (the first H100 run: 118 ms against ~36 for its
    # GEMM work): both gradients with grad_weight's atomics in fp32 or in bf16, then (after
    # the bulk-reduction candidates, which a short budget must reach) each gradient alone.
    parts = [
        ("both, fp32 atomics", (True, True, False), True),
        ("both, bf16 atomics", (True, True, False), False),
        ("grad_hidden only", (True, False, False), True),
        ("grad_weight only, fp32 atomics", (False, True, False), True),
        ("grad_weight only, bf16 atomics", (False, True, False), False),
    ]

    def breakdown(what: str, needs: tuple[bool, bool, bool], accum_fp32: bool) -> None:
        row = {"what": what, "ms": None, "status": "ok"}
        if time.monotonic() > deadline:
            row["status"] = "skipped: budget"
        else:
            fn = lambda: fused_tofu.fused_tofu_bwd(  # noqa: E731
                x, w, y, None, rowterms, scale, params, needs, None, accum_fp32
            )
            try:
                fn()
                row["ms"] = bench_ms(fn, device)
            except Exception as exc:  # noqa: BLE001 - a row, not a crash
                row["status"] = f"error: {type(exc).__name__}: {str(exc)[:200]}"
        result["breakdown"].append(row)
        print("breakdown", row, flush=True)
        save(result, args.out)

    def candidate(kind: str, config: dict, accum_fp32: bool | None) -> None:
        row = dict(config, status="ok", ms=None)
        if accum_fp32 is not None:
            row["grad_weight_accum"] = "fp32" if accum_fp32 else "bf16"
            # what the launcher really does here (no bulk reductions before sm_90)
            acc = fused_tofu.weight_accumulator(dtype, accum_fp32)
            tma = config.get("TMA_REDUCE") and fused_tofu.bulk_reduce_ok(x.device, h, acc)
            row["adds"] = "bulk (TMA)" if tma else "atomics"
        if time.monotonic() > deadline:
            row["status"] = "skipped: budget"
            result[kind].append(row)
            return
        table = fused_tofu.FWD_CONFIGS if kind == "fwd" else fused_tofu.BWD_CONFIGS
        try:
            if kind == "fwd":
                fn = lambda: fused_tofu.fused_tofu_fwd(x, w, y, None, params)  # noqa: E731
            else:
                fn = lambda: fused_tofu.fused_tofu_bwd(  # noqa: E731
                    x, w, y, None, rowterms, scale, params, (True, True, False), None, accum_fp32
                )
            with launch_config(table, config):
                out = fn()  # compiles outside the timing
                pairs = (
                    [(out[0], loss_ref)]
                    if kind == "fwd"
                    else zip(out[:2], (gx_ref, gw_ref), strict=True)
                )
                diff = max(
                    ((o.float() - r.float()).abs().max() / r.float().abs().max()).item()
                    for o, r in pairs
                )
                row["ms"] = bench_ms(fn, device)
            if not diff <= 2e-2:  # the GPU tests' gradient tolerance
                row["status"] = f"mismatch: {diff:.1e} from the default config"
        except Exception as exc:  # a config that does not fit the card is a row, not a crash
            row["status"] = f"error: {type(exc).__name__}: {str(exc)[:200]}"
        result[kind].append(row)
        print(kind, row, flush=True)
        save(result, args.out)

    bulk = [] if args.no_tma else fused_tofu.TUNE_BWD_TMA
    candidates = fused_tofu.TUNE_FWD, bulk + fused_tofu.TUNE_BWD
    if args.smoke:
        candidates = tuple(c[:2] for c in candidates)
    runs = [("bwd", c, accum) for c in candidates[1] for accum in (True, False)]
    runs += [("fwd", c, None) for c in candidates[0]]
    n_bulk = 2 * len(bulk)  # the bulk-reduction rows, first: a short budget reaches them
    for part in parts[:2]:
        breakdown(*part)
    for run in runs[:n_bulk]:
        candidate(*run)
    for part in parts[2:]:
        breakdown(*part)
    for run in runs[n_bulk:]:
        candidate(*run)
    return result


def report(result: dict) -> str:
    lines = [
        f"{result['device']}, torch {result['torch']}, triton {result['triton']}, "
        f"{result['shape']}; logits GEMM {result['gemm_ms']:.2f} ms",
        "",
        "| default backward | ms |",
        "|---|---|",
    ]
    for r in result.get("breakdown", []):
        ms = f"{r['ms']:.2f}" if r["status"] == "ok" else r["status"]
        lines.append(f"| {r['what']} | {ms} |")
    for kind in ("fwd", "bwd"):
        lines += [
            "",
            f"| {kind} | BLOCK_N | BLOCK_V | BLOCK_K | GROUP_N | warps | stages | accum | adds "
            "| ms |",
        ]
        lines.append("|---|---|---|---|---|---|---|---|---|---|")
        rows = sorted(result[kind], key=lambda r: (r["ms"] is None, r["ms"] or 0.0))
        for r in rows:
            ms = f"{r['ms']:.2f}" if r["status"] == "ok" else r["status"]
            lines.append(
                f"| {kind} | {r['BLOCK_N']} | {r['BLOCK_V']} | {r['BLOCK_K']} | {r['GROUP_N']} "
                f"| {r['num_warps']} "
                f"| {r['num_stages']} | {r.get('grad_weight_accum', '')} "
                f"| {r.get('adds', '')} | {ms} |"
            )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--vocab", type=int, default=128256)
    ap.add_argument("--budget-s", type=float, default=240.0)
    ap.add_argument("--smoke", action="store_true", help="CPU: two configs each, tiny shapes")
    ap.add_argument(
        "--no-tma", action="store_true", help="leave out TUNE_BWD_TMA (if its GPU test failed)"
    )
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    if not args.smoke and not torch.cuda.is_available():
        ap.error("the real shapes need a CUDA device (use --smoke on CPU)")
    if args.smoke:
        args.tokens, args.hidden, args.vocab = 24, 40, 300
    result = tune(args)
    text = report(result)
    if args.out is not None:
        save(result, args.out)
        (args.out / "tune.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
