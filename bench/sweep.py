"""Time the impls' default-setting knobs side by side at one case, to choose the defaults
(chunk sizes, grad_weight accumulation, token slabs, the fused forward's launch config) by
measurement.

    python bench/sweep.py [--case llama3-8b --tokens 8192] [--only SUBSTRING] [--out DIR]

Each variant is a ``fused_linear_tofu_loss`` call (TOFU, gamma 3, beta 0.8) with its options,
measured by ``bench/run.py``'s harness (loss checked against float64, peak memory above the
inputs, ``do_bench`` median): one table row each, and ``DIR/sweep.json``. On CPU (``--smoke``)
it runs at a tiny shape through the interpreter, where the timings mean nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from unittest import mock

sys.path.insert(0, str(Path(__file__).resolve().parent))

import run as harness  # noqa: E402 (sets TRITON_INTERPRET first where there is no GPU)
from providers import Provider, _tofu_kernels  # noqa: E402
from tune_fused import launch_config  # noqa: E402

from tofu_kernels import fused_tofu, vocab_chunked  # noqa: E402

# (name, impl, options, module settings to change for the variant or None): the defaults
# first, as the baseline. The fused forward's 64x128 tiles were sm_90's default before the
# first H100 run (31.2 ms against 64x256's 20.5 ms there). vocab_chunked's token slabs
# (accum_dtype=None) are a quarter of the tokens, at most LEAN_SLAB_ROWS rows (2048 at 8192
# tokens), in H-column chunks (4096 at the Llama head; 2048 before this sweep ran).
FUSED_FWD_NARROW = dict(BLOCK_N=64, BLOCK_V=128, BLOCK_K=64, GROUP_N=32, num_warps=8, num_stages=3)
LEAN = {"accum_dtype": None}
VARIANTS = [
    ("chunked", "chunked", {}, None),
    *[(f"chunked-c{c}", "chunked", {"chunk_size": c}, None) for c in (1024, 2048, 4096)],
    *[
        (f"chunked-bf16acc-c{c}", "chunked", {"chunk_size": c, "accum_dtype": None}, None)
        for c in (1024, 2048, 4096)
    ],
    ("vocab_chunked", "vocab_chunked", {}, None),
    *[(f"vocab_chunked-c{c}", "vocab_chunked", {"chunk_size": c}, None) for c in (8192, 16384)],
    ("vocab_chunked-bf16acc", "vocab_chunked", LEAN, None),
    ("vocab_chunked-bf16acc-c2048", "vocab_chunked", {**LEAN, "chunk_size": 2048}, None),
    ("vocab_chunked-bf16acc-s1024", "vocab_chunked", LEAN, {"LEAN_SLAB_ROWS": 1024}),
    (
        "vocab_chunked-bf16acc-s4096",
        "vocab_chunked",
        LEAN,
        {"LEAN_SLABS": 2, "LEAN_SLAB_ROWS": 4096},
    ),
    ("fused", "fused", {}, None),
    ("fused-bf16acc", "fused", {"accum_dtype": None}, None),
    ("fused-fwd64x128", "fused", {}, {"FWD_CONFIGS": FUSED_FWD_NARROW}),
]


@contextlib.contextmanager
def setting(changes: dict[str, object] | None) -> Iterator[None]:
    """Apply a variant's module settings, then restore them: a fused launch config (under the
    device's capability key), vocab_chunked's token slabs."""
    with contextlib.ExitStack() as stack:
        for name, value in (changes or {}).items():
            if name == "FWD_CONFIGS":
                stack.enter_context(launch_config(fused_tofu.FWD_CONFIGS, value))
            else:
                stack.enter_context(mock.patch.object(vocab_chunked, name, value))
        yield


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--case", default="llama3-8b", help="a case name of the h100 preset")
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--only", default="", help="run the variants whose name contains this")
    parser.add_argument("--smoke", action="store_true", help="CPU: a tiny shape, interpreted")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    preset = harness.PRESETS["smoke" if args.smoke else "h100"]
    if args.smoke:
        case = preset.cases[0]
    else:
        if harness.DEVICE == "cpu":
            parser.error("the h100 cases need a CUDA device (use --smoke on CPU)")
        case = next(c for c in preset.cases if (c.name, c.tokens) == (args.case, args.tokens))
    env = harness.environment()
    inputs = harness.make_inputs(case, preset.rotate)
    ref = harness.reference_losses(inputs)["tofu"]
    rows = []
    for name, impl, options, change in VARIANTS:
        if args.only not in name:
            continue
        provider = Provider(name, ("tofu",), _tofu_kernels(impl, **options))
        start = time.monotonic()
        with setting(change):
            row = harness.measure(provider, case, "tofu", inputs, ref, preset)
        row.update(wall_s=time.monotonic() - start, variant=name, impl=impl)
        row["options"] = {k: str(v) for k, v in options.items()}
        row["settings"] = {k: str(v) for k, v in (change or {}).items()}
        rows.append(row)
        if args.out is not None:  # after every row: a call cut short keeps what it measured
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / "sweep.json").write_text(json.dumps({"env": env, "rows": rows}, indent=1))
        print(harness._progress(dict(row, case=case.name, tokens=case.tokens, provider=name,
                                     loss="tofu")), flush=True)  # fmt: skip
    lines = [
        f"{env['device']}, torch {env['torch']}, triton {env['triton']}: {case.name}, "
        f"{case.tokens} tokens, TOFU fwd+bwd",
        "",
        "| variant | ms | p20 | p80 | peak MB | status |",
        "|---|--:|--:|--:|--:|---|",
    ]
    for r in rows:
        num = [f"{r[k]:.2f}" if r[k] is not None else "" for k in ("ms", "ms_p20", "ms_p80")]
        mem = f"{r['peak_mem_mb']:,.0f}" if r["peak_mem_mb"] is not None else ""
        lines.append(f"| {r['variant']} | {' | '.join(num)} | {mem} | {r['status']} |")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
