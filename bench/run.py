"""Benchmark the fused LM-head TOFU loss against Liger, Cut Cross-Entropy and PyTorch.

    python bench/run.py --preset {smoke,h100} --out DIR [--budget-s S] [--publish bench/results]

Writes ``DIR/results.json`` (one row per provider, loss and case; failures are rows too),
``DIR/results.md`` (the headline table, then one per case) and PNG plots, and prints the headline
table last.
See bench/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import itertools
import json
import math
import os
import signal
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # the package need not be installed (the GPU machine runs from git)
    sys.path.insert(1, str(ROOT))

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu":
    # Triton providers run on CPU tensors through the interpreter; must precede importing triton.
    os.environ.setdefault("TRITON_INTERPRET", "1")


def _quiet_interpreter() -> None:
    # The interpreter evaluates masked-out lanes too (log(0) and the like): not our warnings.
    warnings.filterwarnings("ignore", category=RuntimeWarning, module="triton.runtime.interpreter")


_quiet_interpreter()

import triton  # noqa: E402
import triton.testing  # noqa: E402
from providers import (  # noqa: E402
    IGNORE_INDEX,
    LOSS_PARAMS,
    CaseInfo,
    Provider,
    Unavailable,
    all_providers,
)
from report import package_version, publish, write_reports  # noqa: E402

from tofu_kernels.reference import tofu_rows  # noqa: E402

ENV_KEYS = ("device", "torch", "triton", "date", "versions")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
LOSSES = ("tofu", "ce")


@dataclass(frozen=True)
class Case:
    name: str  # groups a token sweep ("llama3-8b"); variants get their own name
    hidden: int
    vocab: int
    tokens: int
    dtype: str = "bf16"
    mode: str = "fwd_bwd"  # or "fwd"
    weight_grad: bool = True  # False: frozen LM head (LoRA)
    ignored: float = 0.0  # fraction of labels set to ignore_index


@dataclass(frozen=True)
class Preset:
    cases: tuple[Case, ...]  # run in this order: the headline case first
    headline: tuple[str, int]  # (case name, tokens)
    rotate: int  # input sets cycled through, so no cache keyed on the inputs flatters anyone
    warmup_ms: float
    rep_ms: float  # do_bench's time for the timed runs
    headline_rep_ms: float  # more for the headline case, where the goal is decided
    min_reps: int  # timed runs at least, however slow the call
    cpu_reps: int
    provider_timeout_s: int  # compile included; the run's --budget-s may cut it shorter
    # providers timed at the headline case only (their other rows say so): what the budget
    # cannot afford everywhere and nobody picks by it
    headline_only: tuple[str, ...] = ()


def _llama_variants(tokens: int) -> tuple[Case, ...]:
    llama = {"hidden": 4096, "vocab": 128256, "tokens": tokens}
    return (
        Case("llama3-8b/lora", weight_grad=False, **llama),
        Case("llama3-8b/fwd", mode="fwd", weight_grad=False, **llama),
        Case("llama3-8b/ignore30", ignored=0.3, **llama),
    )


PRESETS = {
    # Tiny shapes on CPU (Triton providers under the interpreter): a test runs it in CI.
    "smoke": Preset(
        cases=(
            Case("tiny", 32, 256, 8),
            Case("tiny", 32, 256, 4),
            Case("tiny/lora", 32, 256, 4, weight_grad=False),
            Case("tiny/fwd", 32, 256, 4, mode="fwd", weight_grad=False),
            Case("tiny/ignore30", 32, 256, 8, ignored=0.3),
        ),
        headline=("tiny", 8),
        rotate=2,
        warmup_ms=0,
        rep_ms=0,
        headline_rep_ms=0,
        min_reps=0,
        cpu_reps=3,
        provider_timeout_s=60,
    ),
    # LM heads of real models, bf16; sized to finish within run_gpu.sh's 8 minutes on an H100.
    "h100": Preset(
        cases=(
            Case("llama3-8b", 4096, 128256, 8192),
            Case("llama3-8b", 4096, 128256, 4096),
            Case("llama3-8b", 4096, 128256, 16384),
            Case("qwen2.5-7b", 3584, 152064, 8192),
            Case("gemma-2-2b", 2304, 256000, 8192),
            *_llama_variants(8192),
        ),
        headline=("llama3-8b", 8192),
        rotate=3,
        warmup_ms=50,
        rep_ms=250,
        headline_rep_ms=1000,
        min_reps=5,
        cpu_reps=3,
        provider_timeout_s=150,
        # The PyTorch path (the CPU default) took 74 s of the first H100 run's 381 s of
        # providers, 66 s of them outside the headline case; wider chunks are a knob to compare
        # at the headline case. Without them the run fits run_gpu.sh's 8 minutes (bench/README).
        headline_only=("tofu_kernels/torch", "tofu_kernels/chunked-c4096"),
    ),
}


@dataclass
class Inputs:
    weight: torch.Tensor
    sets: list[tuple[torch.Tensor, torch.Tensor]]  # (hidden, labels), cycled through
    leaves: list[torch.Tensor] = field(default_factory=list)  # tensors whose .grad is reset


def make_inputs(case: Case, rotate: int, seed: int = 0) -> Inputs:
    """Random inputs (never zeros), logits with a spread like a trained LM head (std about 2)."""
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    dtype = DTYPES[case.dtype]
    grad = case.mode == "fwd_bwd"
    weight = torch.randn(case.vocab, case.hidden, device=DEVICE, dtype=dtype, generator=gen)
    weight.mul_(2.0 / math.sqrt(case.hidden)).requires_grad_(grad and case.weight_grad)
    sets = []
    for _ in range(max(1, rotate)):
        h = torch.randn(case.tokens, case.hidden, device=DEVICE, dtype=dtype, generator=gen)
        y = torch.randint(0, case.vocab, (case.tokens,), device=DEVICE, generator=gen)
        if case.ignored:
            drop = torch.rand(case.tokens, device=DEVICE, generator=gen) < case.ignored
            y = y.masked_fill(drop, IGNORE_INDEX)
        sets.append((h.requires_grad_(grad), y))
    leaves = [t for t in [weight] + [h for h, _ in sets] if t.requires_grad]
    return Inputs(weight, sets, leaves)


def reference_losses(inputs: Inputs) -> dict[str, float]:
    """float64 mean loss of every loss kind on the first input set, chunk by chunk of tokens."""
    h, y = inputs.sets[0]
    w64 = inputs.weight.detach().double()
    n, vocab = h.shape[0], w64.shape[0]
    chunk = max(1, (1 << 25) // vocab)  # 256 MB of float64 logits per chunk
    totals = dict.fromkeys(LOSSES, 0.0)
    for s in range(0, n, chunk):
        z = h[s : s + chunk].detach().double() @ w64.t()
        ys = y[s : s + chunk]
        for loss in LOSSES:
            gamma, beta = LOSS_PARAMS[loss]
            if loss == "ce":  # independent of tofu_rows: the plain definition
                rows = torch.nn.functional.cross_entropy(
                    z, ys, ignore_index=IGNORE_INDEX, reduction="none"
                )
            else:
                rows = tofu_rows(z, ys, gamma, beta, IGNORE_INDEX)[0]
            totals[loss] += rows.sum().item()
        del z
    valid = max(int((y != IGNORE_INDEX).sum()), 1)
    return {loss: total / valid for loss, total in totals.items()}


def loss_tolerance(dtype: str) -> float:
    """Relative tolerance of a provider's mean loss against float64: loose, to catch real bugs."""
    return 1e-3 if dtype == "fp32" else 2e-2


def _sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def _free() -> None:
    """Drop the last provider's memory before the next one is measured (CUDA only: on CPU
    nothing is measured, and a full collection costs ~0.2 s with transformers imported)."""
    if DEVICE == "cuda":
        gc.collect()
        torch.cuda.empty_cache()


def _library_gemms(device: str) -> None:
    """Small GEMMs of every kind the providers run (bf16 and fp32, with a bias, into fp32)."""
    for dtype in (torch.bfloat16, torch.float32):
        a = torch.ones(64, 64, device=device, dtype=dtype)
        torch.mm(a, a)
        torch.addmm(a[0], a, a)
        if device == "cuda":
            with contextlib.suppress(RuntimeError, TypeError):  # no out_dtype in this torch
                torch.mm(a, a, out_dtype=torch.float32)


class _GemmsInBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        _library_gemms(str(grad.device.type))
        return grad


_WARMED: set[str] = set()


def warm_library_workspaces(device: str) -> None:
    """Create the GEMM library's per-thread state once, before any provider is measured.

    cuBLAS keeps a handle and a workspace (32 MB on an H100) per thread, allocated from the
    caching allocator on a thread's first GEMM, and autograd runs CUDA backward passes on a
    thread of its own: the first provider whose backward calls cuBLAS (vocab_chunked: the first
    H100 run charged it 32 MB more at its first case than the buffer arithmetic gives, and
    nothing at the cases after) would otherwise pay that workspace as its own memory."""
    if device in _WARMED:
        return
    _library_gemms(device)
    x = torch.ones(8, device=device, requires_grad=True)
    _GemmsInBackward.apply(x).sum().backward()
    _sync()
    _WARMED.add(device)


@contextlib.contextmanager
def time_guard(seconds: int) -> Iterator[None]:
    """Raise TimeoutError in this (main) thread after ``seconds``: a stuck compile ends its row."""
    if seconds <= 0 or not hasattr(signal, "SIGALRM"):
        yield
        return

    def _raise(signum, frame):
        raise TimeoutError(f"timeout after {seconds} s")

    old = signal.signal(signal.SIGALRM, _raise)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def _error(e: BaseException) -> str:
    """``"error: <type>: <first line of the message>"``, short enough for a table cell."""
    lines = str(e).strip().splitlines()
    return f"error: {type(e).__name__}: {lines[0][:200] if lines else ''}".rstrip(": ")


def _quantile(values: list[float], q: float) -> float:
    s = sorted(values)
    pos = q * (len(s) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def make_call(fn: Callable, case: Case, inputs: Inputs, autograd: bool) -> Callable:
    """One training-step's worth of the loss: forward (and backward), on the next input set."""
    order = itertools.cycle(range(len(inputs.sets)))
    w = inputs.weight

    def call() -> torch.Tensor | None:
        h, y = inputs.sets[next(order)]
        for t in inputs.leaves:  # never time gradient accumulation
            t.grad = None
        if not autograd or case.mode == "fwd":
            with torch.no_grad():
                return fn(h, w, y)
        out = fn(h, w, y)
        out.backward()
        return out.detach()

    return call


def measure(
    provider: Provider,
    case: Case,
    loss: str,
    inputs: Inputs,
    ref: float | None,
    preset: Preset,
    deadline: float = math.inf,
    rep_ms: float | None = None,
) -> dict:
    """Check the loss value, then peak memory and time of one provider; never raises."""
    rep_ms = preset.rep_ms if rep_ms is None else rep_ms
    row: dict = {"status": "ok", "ms": None, "ms_p20": None, "ms_p80": None}
    row.update(peak_mem_mb=None, loss_value=None, ref_loss=ref, note="")
    # A provider started near the deadline gets what is left of the budget, plus some grace.
    limit = int(min(preset.provider_timeout_s, max(10.0, deadline - time.monotonic() + 30)))
    try:
        with time_guard(limit):
            warm_library_workspaces(DEVICE)
            _free()
            # Before the first call: buffers a provider keeps between calls count as its own.
            base = torch.cuda.memory_allocated() if DEVICE == "cuda" else 0
            fn = provider.build(CaseInfo(case.mode, case.weight_grad, DEVICE), loss)
            first = Inputs(inputs.weight, inputs.sets[:1], inputs.leaves)
            check = make_call(fn, case, first, provider.has_loss)
            call = make_call(fn, case, inputs, provider.has_loss)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                _quiet_interpreter()
                out = check()  # also the warm-up: compiles, autotunes, allocates workspaces
                _sync()
            if caught:  # e.g. a silent fallback to a slower path
                row["note"] = "warning: " + str(caught[0].message).strip().splitlines()[0][:200]
            if provider.has_loss:
                value = float(out)
                row["loss_value"] = value
                rel = abs(value - ref) / max(abs(ref), 1e-6)
                if not rel <= loss_tolerance(case.dtype):  # NaN fails too
                    row["status"] = f"error: mismatch loss={value:.6g} ref={ref:.6g} rel={rel:.2g}"
            del out
            for t in inputs.leaves:
                t.grad = None
            if DEVICE == "cuda":
                # The peak of a warm call: the first call's compile and autotuning are left out.
                torch.cuda.reset_peak_memory_stats()
                start = time.perf_counter()
                call()
                _sync()
                est_ms = (time.perf_counter() - start) * 1e3
                row["peak_mem_mb"] = (torch.cuda.max_memory_allocated() - base) / 2**20
                times = triton.testing.do_bench(
                    call,
                    warmup=max(preset.warmup_ms, est_ms),
                    rep=max(rep_ms, preset.min_reps * est_ms),
                    grad_to_none=inputs.leaves,
                    quantiles=[0.5, 0.2, 0.8],
                )
                row["ms"], row["ms_p20"], row["ms_p80"] = (float(t) for t in times)
            else:  # no CUDA events, no allocator stats: wall time, memory left null
                times = []
                for _ in range(preset.cpu_reps):
                    start = time.perf_counter()
                    call()
                    times.append((time.perf_counter() - start) * 1e3)
                row["ms"] = _quantile(times, 0.5)
                row["ms_p20"], row["ms_p80"] = _quantile(times, 0.2), _quantile(times, 0.8)
    except Unavailable as e:
        row.update(status="unavailable", note=str(e))
    except (torch.cuda.OutOfMemoryError, MemoryError) as e:
        row.update(status="oom", note=str(e).splitlines()[0][:200] if str(e) else "")
        row.update(ms=None, ms_p20=None, ms_p80=None, peak_mem_mb=None)
    except Exception as e:  # noqa: BLE001 - any failure is a row, never a crash of the run
        row["status"] = _error(e)
    finally:  # the next provider's measure() collects garbage before its baseline
        for t in inputs.leaves:
            t.grad = None
    return row


def environment() -> dict:
    """The run's machine and versions: the first four are row fields, the rest a row's
    ``versions``, so reports can be rebuilt from results.json alone (``--report-only``)."""
    name = torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu"
    return {
        "device": name,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
        "versions": {
            "python": sys.version.split()[0],
            "liger_kernel": package_version("liger-kernel"),
            "cut_cross_entropy": package_version("cut-cross-entropy"),
            "interpreter": os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"),
            # the key of impl="auto"'s measured picks (bench/publish.py --auto)
            "capability": (
                "{}.{}".format(*torch.cuda.get_device_capability()) if DEVICE == "cuda" else None
            ),
        },
    }


def case_fields(case: Case) -> dict:
    """A row's description of its case."""
    return {
        "case": case.name,
        "tokens": case.tokens,
        "hidden": case.hidden,
        "vocab": case.vocab,
        "dtype": case.dtype,
        "mode": case.mode,
        "weight_grad": case.weight_grad,
        "ignored": case.ignored,
    }


def run(preset: Preset, providers: list[Provider], budget_s: float | None, out: Path) -> list[dict]:
    """Every case, every provider; results.json is rewritten after each row (a killed run
    keeps what it measured)."""
    env = environment()
    deadline = time.monotonic() + budget_s if budget_s else math.inf
    rows = []
    for case in preset.cases:
        base = {**case_fields(case), **env}
        inputs, refs, input_error = None, None, None
        started = time.monotonic()
        headline = (case.name, case.tokens) == preset.headline
        rep_ms = preset.headline_rep_ms if headline else preset.rep_ms
        for provider in providers:
            shared = None  # gemm_floor: one measurement serves every loss
            for loss in (loss for loss in LOSSES if loss in provider.losses):
                if provider.name in preset.headline_only and not headline:
                    result = {"status": "unavailable", "note": "timed at the headline case only"}
                elif shared is not None:  # measured already: not skipped by the deadline
                    result = shared
                elif time.monotonic() > deadline:
                    result = {"status": "unavailable", "note": "skipped: time budget spent"}
                else:
                    if inputs is None and input_error is None:
                        try:  # built on first use, so a case past the budget allocates nothing
                            inputs = make_inputs(case, preset.rotate)
                            refs = reference_losses(inputs)
                        except (torch.cuda.OutOfMemoryError, MemoryError):
                            inputs = None
                            input_error = {"status": "oom", "note": "inputs or float64 reference"}
                        except Exception as e:  # noqa: BLE001 - the case's rows say why
                            inputs = None
                            input_error = {"status": _error(e), "note": "inputs or reference"}
                        _free()
                    if input_error is not None:
                        result = input_error
                    else:
                        t0 = time.monotonic()
                        result = measure(
                            provider, case, loss, inputs, refs[loss], preset, deadline, rep_ms
                        )
                        result["wall_s"] = round(time.monotonic() - t0, 2)  # compile included
                    if not provider.has_loss:
                        shared = result
                row = {"provider": provider.name, "loss": loss, **base, **result}
                if not provider.has_loss:
                    row.update(loss_value=None, ref_loss=None)
                    row["note"] = row["note"] or "the same GEMMs for every loss"
                rows.append(_complete(row))
                write_json(rows, out)
                print(_progress(rows[-1]), flush=True)
        del inputs
        _free()
        print(f"# {case.name} {case.tokens} tokens: {time.monotonic() - started:.1f} s", flush=True)
    return rows


ROW_KEYS = (
    "provider", "loss", "case", "tokens", "hidden", "vocab", "dtype", "mode", "weight_grad",
    "ignored", "ms", "ms_p20", "ms_p80", "peak_mem_mb", "status", "loss_value", "ref_loss",
    "note", "wall_s", "device", "torch", "triton", "date", "versions",
)  # fmt: skip


def _complete(row: dict) -> dict:
    """Every row carries every key, in one order."""
    defaults = {"ms": None, "ms_p20": None, "ms_p80": None, "peak_mem_mb": None}
    defaults.update(loss_value=None, ref_loss=None, note="", wall_s=None)
    return {key: row.get(key, defaults.get(key)) for key in ROW_KEYS}


def write_json(rows: list[dict], out: Path) -> None:
    """Rewrite results.json whole: a run killed mid-write leaves the previous one, not half."""
    tmp = out / "results.json.tmp"
    tmp.write_text(json.dumps(rows, indent=1) + "\n")
    os.replace(tmp, out / "results.json")


def cut_short_rows(rows: list[dict], preset: Preset) -> list[dict]:
    """The rows of a killed run, plus an "unavailable" row for each (case, provider, loss) it
    never reached: a provider that ran in some case is in every case's tables."""
    if not rows:
        return rows
    env = {key: rows[0][key] for key in ENV_KEYS}
    pairs = list(dict.fromkeys((r["provider"], r["loss"]) for r in rows))
    seen = {(r["case"], r["tokens"], r["provider"], r["loss"]) for r in rows}
    missing = [
        _complete(
            {
                "provider": provider,
                "loss": loss,
                **case_fields(case),
                "status": "unavailable",
                "note": "the run was cut short before this row",
                **env,
            }
        )
        for case in preset.cases
        for provider, loss in pairs
        if (case.name, case.tokens, provider, loss) not in seen
    ]
    return rows + missing


def _progress(row: dict) -> str:
    ms = f"{row['ms']:9.2f} ms" if row["ms"] is not None else " " * 12
    mem = f"{row['peak_mem_mb']:9.0f} MB" if row["peak_mem_mb"] is not None else " " * 12
    wall = f"[{row['wall_s']:6.1f} s]" if row["wall_s"] is not None else " " * 10
    head = f"{row['case']:>20} {row['tokens']:>6} {row['loss']:>4} {row['provider']:<22}"
    return f"{head} {ms} {mem} {wall} {row['status']} {row['note']}".rstrip()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="smoke")
    parser.add_argument("--out", type=Path, required=True, help="folder for results and plots")
    parser.add_argument(
        "--budget-s", type=float, default=None, help="seconds; later rows say unavailable"
    )
    parser.add_argument("--publish", type=Path, default=None, help="also copy as <card>-<date>.*")
    parser.add_argument("--providers", default=None, help="comma-separated names to run (debug)")
    parser.add_argument("--cases", default=None, help="comma-separated case names to run")
    parser.add_argument(
        "--report-only", action="store_true", help="rebuild tables and plots from results.json"
    )
    args = parser.parse_args(argv)

    preset = PRESETS[args.preset]
    if args.cases:
        wanted = set(args.cases.split(","))
        preset = replace(preset, cases=tuple(c for c in preset.cases if c.name in wanted))
    if args.report_only:  # after a killed run, or where the run's machine had no matplotlib
        rows = cut_short_rows(json.loads((args.out / "results.json").read_text()), preset)
        write_json(rows, args.out)
    else:
        if args.preset != "smoke" and DEVICE == "cpu":
            parser.error(f"preset {args.preset} needs a CUDA device (use --preset smoke on CPU)")
        providers = all_providers()
        if args.providers:
            wanted = set(args.providers.split(","))
            providers = [p for p in providers if p.name in wanted]
        args.out.mkdir(parents=True, exist_ok=True)
        rows = run(preset, providers, args.budget_s, args.out)
        write_json(rows, args.out)
    # The run's own machine and versions, also when rebuilding elsewhere.
    env = {key: rows[0][key] for key in ENV_KEYS} if rows else environment()
    headline = write_reports(rows, env, preset.headline, args.out, args.preset)
    if args.publish is not None:
        for path in publish(args.out, args.publish):
            print(f"published {path}")
    print(headline)  # last, so a log's tail is the answer
    return 0


if __name__ == "__main__":
    sys.exit(main())
