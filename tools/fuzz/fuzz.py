"""Random cases of tofu_loss / fused_linear_tofu_loss against the float64 oracle.

Each seed draws one case: dtype, impl, shape, reduction, gamma, beta, softcap, ignored rows,
bias, chunking, accumulator, the logits' spread and the upstream gradient's size (far wider
ranges than the test grid's). A case that misses the test suite's tolerances, or raises,
prints one JSON line. See README.md.

    PYTHONPATH=. python tools/fuzz/fuzz.py --op linear --seeds 0:200 --out /tmp/fz.jsonl
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import warnings
from functools import partial
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported
ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import torch  # noqa: E402

from helpers import (  # noqa: E402
    GRAD_RTOL,
    LINEAR_GRAD_RTOL,
    LINEAR_LOSS_RTOL,
    LOSS_RTOL,
    linear_oracle,
    oracle,
    random_labels,
)
from tofu_kernels import fused_linear_tofu_loss, tofu_loss  # noqa: E402

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
GAMMAS = (0.0, 0.5, 1.0, 3.0, 7.0)
BETAS = (0.3, 0.8, 1.0, 2.0)
SOFTCAPS = (None, None, 5.0, 30.0)
IGNORED = (0.0, 0.3, 1.0)
MAX_CONFIDENT_LOGIT = 300.0  # --confident linear rows: the lead is the margin or less
# Cases with fp32 logits (fp32 inputs, or the fused impl's registers) are judged after taking
# off this many times how far the oracle moves on the logits of torch's fp32 GEMM: a kernel's
# fp32 logits carry errors of the same size (rounding, and the sums' cancellation), and a
# confident row's loss moves by about gamma + 1 times its lead's error (2e-4 at logits of 300,
# gamma 7)
FP32_LOGITS_SLACK = 4.0


def upstream_scale(r: random.Random, dtype: torch.dtype) -> float:
    """fp16: 1e-6 to 1e4 (loss scaling); the others: 1e-30 to 1e8."""
    return 10 ** (r.uniform(-6, 4) if dtype == torch.float16 else r.uniform(-30, 8))


def confident_draw(r: random.Random) -> dict:
    """``--confident``'s parameters of a case: the share of rows made peaked, and the margin."""
    return dict(confident=r.choice([0.5, 1.0]), margin=10 ** r.uniform(0.5, 2.5))


def peaked_rows(r: random.Random, case: dict, labels: torch.Tensor) -> torch.Tensor:
    """Which rows ``--confident`` makes peaked: each not ignored one with the case's chance."""
    picked = torch.tensor([r.random() < case["confident"] for _ in range(labels.numel())])
    return picked.reshape(labels.shape) & (labels != -100)


def rel(
    actual: torch.Tensor,
    expected: torch.Tensor,
    tol: float,
    elementwise: bool,
    slack: torch.Tensor | None = None,
):
    """(error, largest |expected|): the largest error over the largest |expected| (the linear
    tests' ``rel_err``), or with ``elementwise`` less ``tol`` times each |expected| first (the
    rows tests' ``assert_close``: ``tol * (|expected| + peak)`` per entry); each entry's error
    less its ``slack`` where given."""
    expected = expected.double()
    if not expected.numel():
        return 0.0, 0.0
    peak = expected.abs().max().item()
    diff = (actual.double() - expected).abs()
    if slack is not None:
        diff = diff - slack
    if elementwise:
        diff = diff - tol * expected.abs()
    return diff.max().item() / max(peak, 1e-30), peak


def representable(peak: float, dtype: torch.dtype) -> bool:
    """Whether a result of this size has the dtype's digits: not near overflow, not subnormal."""
    info = torch.finfo(dtype)
    return peak == 0 or info.tiny * 1e3 < peak < info.max / 4


def linear_case(
    r: random.Random, confident: bool = False, strict: bool = False
) -> tuple[dict, list | None]:
    """One case of ``fused_linear_tofu_loss``: (its description, its failures or None where
    the drawn inputs or their logits are not finite in their dtype). ``confident``: half or
    all of the rows take their argmax as the label, the hidden state scaled so that it leads
    by 3 to 300 (less where that would take a logit past 300). ``strict``: judge fp32 logits
    against the exact ones' oracle alone (no :data:`FP32_LOGITS_SLACK`)."""
    dtype = r.choice(DTYPES)
    impl = r.choice(["torch", "chunked", "vocab_chunked", "fused"])
    n, h, v = r.choice([1, 2, 7, 33, 64, 130]), r.choice([1, 3, 16, 33]), r.choice([1, 17, 301])
    kw = dict(reduction=r.choice(["mean", "sum", "none"]), gamma=r.choice(GAMMAS),
              beta=r.choice(BETAS), softcap=r.choice(SOFTCAPS))  # fmt: skip
    bias, ignored = r.random() < 0.3, r.choice(IGNORED)
    xs, zs = 10 ** r.uniform(-3, 2), 10 ** r.uniform(-1, 3)  # hidden's size, the logits' spread
    ws = zs / (xs * math.sqrt(h))
    opts = dict(impl=impl, accum_dtype=r.choice([torch.float32, None]))
    chunk = r.choice([None, None, 5, 64])
    if chunk is not None and impl != "fused":  # vocab_chunked's are columns: 16 or 64 of them
        opts["chunk_size"] = max(chunk, 16) if impl == "vocab_chunked" else chunk
    go_scale = upstream_scale(r, dtype)
    kw["num_items_in_batch"] = r.choice([None, None, 3, 100.5])
    if impl in ("torch", "chunked") and r.random() < 0.3:
        opts["drop_ignored"] = True
    case = dict(op="linear", dtype=str(dtype), n=n, h=h, v=v, bias=bias, ignored=ignored, xs=xs,
                zs=zs, go=go_scale, **kw, **{k: str(o) for k, o in opts.items()})  # fmt: skip
    if confident:  # drawn last: the other draws stay those of the seed without the option
        case.update(confident_draw(r))

    x = torch.randn(n, h) * xs
    w = (torch.randn(v, h) * ws).to(dtype).requires_grad_(True)
    b = (torch.randn(v) * zs).to(dtype).requires_grad_(True) if bias else None
    y = random_labels((n,), v, "cpu", ignored)
    if confident and v > 1:  # no hidden state lifts an arbitrary target at small H: the argmax
        peaked = peaked_rows(r, case, y)
        z = x.double() @ w.detach().double().T  # before the bias
        top = z.topk(2, dim=1)
        y = torch.where(peaked, top.indices[:, 0], y)
        # the scale that makes the lead the margin, short of logits past 300: a near tie would
        # take them to thousands, where fp32's own rounding of them is what a case measures
        scale = torch.minimum(case["margin"] / (top.values[:, 0] - top.values[:, 1]),
                              MAX_CONFIDENT_LOGIT / z.abs().max(1).values)  # fmt: skip
        x = torch.where(peaked[:, None], x * scale[:, None], x)
    x = x.to(dtype).requires_grad_(True)
    if not all(torch.isfinite(t).all() for t in (x, w) + ((b,) if bias else ())):
        return case, None  # weights past fp16's range: not a case
    with torch.no_grad():
        logits = x.double() @ w.double().T + (b.double() if bias else 0)
    if not logits.abs().max() < torch.finfo(dtype).max:
        return case, None  # nor logits past it (confident rows' scaled hidden states)
    loss = fused_linear_tofu_loss(x, w, y, bias=b, **kw, **opts)
    go = torch.randn_like(loss) * go_scale
    loss.backward(go)
    # a logits buffer in the inputs' dtype (the chunked impls', as a materialized head's) rounds
    # them, ~|z| 2^-9 in bf16: no impl with one can do better than the oracle on those logits
    rounded = impl != "fused" and dtype != torch.float32
    ref = linear_oracle(x, w, y, bias=b, grad_output=go, logits_dtype=dtype if rounded else None,
                        **kw)  # fmt: skip
    slack = [None] * 4
    if not rounded and not strict:
        slack = [
            FP32_LOGITS_SLACK * (a - e).abs()
            for a, e in zip(gemm32_oracle(x, w, b, y, go, kw), ref, strict=True)
        ]
    bad = check([("loss", loss.detach(), ref[0], LINEAR_LOSS_RTOL[dtype], slack[0])], dtype)
    leaves = (("hidden", x, 1), ("weight", w, 2), ("bias", b, 3))
    pairs = [(name, t.grad, ref[i], LINEAR_GRAD_RTOL[dtype], slack[i])
             for name, t, i in leaves if t is not None]  # fmt: skip
    return case, bad + check(pairs, dtype)


def gemm32_oracle(x, w, b, y, go, kw: dict) -> tuple[torch.Tensor, ...]:
    """The float64 oracle's (loss, grad hidden, grad weight, grad bias) on the logits of torch's
    fp32 GEMM of the same inputs instead of the exact ones."""
    with torch.no_grad():
        z = torch.nn.functional.linear(x.float(), w.float(), None if b is None else b.float())
    loss, gz = oracle(z, y, grad_output=go, **kw)
    return loss, gz @ w.double(), gz.T @ x.double(), gz.sum(0)


def rows_case(r: random.Random, confident: bool = False) -> tuple[dict, list | None]:
    """One case of ``tofu_loss``, as :func:`linear_case`."""
    dtype = r.choice(DTYPES)
    shape = r.choice([(1,), (7,), (3, 5), (2, 3, 4)])
    v = r.choice([1, 2, 17, 300, 1025, 5000])
    kw = dict(reduction=r.choice(["mean", "sum", "none"]), gamma=r.choice(GAMMAS),
              beta=r.choice(BETAS), softcap=r.choice(SOFTCAPS),
              num_items_in_batch=r.choice([None, None, 3, 100.5]))  # fmt: skip
    impl, ignored, strided = r.choice(["triton", "torch"]), r.choice(IGNORED), r.random() < 0.3
    zs = 10 ** r.uniform(-2, 3.5 if dtype == torch.float16 else 3)
    go_scale = upstream_scale(r, dtype)
    case = dict(op="rows", dtype=str(dtype), impl=impl, shape=shape, v=v, ignored=ignored,
                strided=strided, zs=zs, go=go_scale, **kw)  # fmt: skip
    if confident:  # drawn last, as in linear_case
        case.update(confident_draw(r))

    full = torch.randn(*shape, v * (2 if strided else 1)) * zs
    y = random_labels(shape, v, "cpu", ignored)
    if confident:
        lift = peaked_rows(r, case, y) * case["margin"]
        cols = y.clamp(min=0) * (2 if strided else 1)
        full.scatter_add_(-1, cols.unsqueeze(-1), lift.unsqueeze(-1).float())
    full = full.to(dtype)  # before the view: to() would copy a strided view contiguous
    z = (full[..., ::2] if strided else full).requires_grad_(True)
    if not torch.isfinite(z).all():
        return case, None  # logits past fp16's range: not a case
    loss = tofu_loss(z, y, impl=impl, **kw)
    go = torch.randn_like(loss) * go_scale
    loss.backward(go)
    ref_loss, ref_grad = oracle(z, y, grad_output=go, **kw)
    pairs = [("loss", loss.detach(), ref_loss, LOSS_RTOL[dtype]),
             ("logits", z.grad, ref_grad, GRAD_RTOL[dtype])]  # fmt: skip
    return case, check(pairs, dtype, elementwise=True)


def check(pairs: list, dtype: torch.dtype, elementwise: bool = False) -> list:
    """[(name, error, peak)] for results off by more than their tolerance (or not finite), where
    the expected result is representable in ``dtype``; ``pairs`` of (name, result, expected,
    tolerance[, slack per entry or None])."""
    bad = []
    for name, got, want, tol, *slack in pairs:
        err, peak = rel(got, want, tol, elementwise, *slack)
        finite = bool(torch.isfinite(got).all())
        if (not finite or err > tol) and (name == "loss" or representable(peak, dtype)):
            bad.append((name, err if finite else "non-finite", peak))
    return bad


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--op", choices=["linear", "rows"], default="linear")
    parser.add_argument("--seeds", default="0:100", help="START:STOP")
    parser.add_argument("--out", type=Path, help="append failures here too (JSON lines)")
    parser.add_argument(
        "--strict", action="store_true",
        help="linear: judge fp32 logits against the exact logits' oracle alone (no slack)",
    )  # fmt: skip
    parser.add_argument(
        "--confident", action="store_true",
        help="make half or all of the rows peaked: the target leads by 3 to 300 (trained models')",
    )  # fmt: skip
    args = parser.parse_args()
    start, stop = (int(s) for s in args.seeds.split(":"))
    # the interpreter runs NumPy on lanes the kernels mask out afterwards (as pyproject.toml)
    warnings.filterwarnings("ignore", category=RuntimeWarning, module="triton.runtime.interpreter")
    run = partial(rows_case, confident=args.confident)
    if args.op == "linear":
        run = partial(linear_case, confident=args.confident, strict=args.strict)
    failures = skipped = 0
    for seed in range(start, stop):
        r = random.Random(seed)
        torch.manual_seed(seed)
        try:
            case, bad = run(r)
            skipped += bad is None
            record = dict(case, seed=seed, bad=bad) if bad else None
        except Exception as exc:  # a crash is a finding too
            record = dict(op=args.op, seed=seed, error=repr(exc)[:500])
        if record is not None:
            failures += 1
            line = json.dumps(record)
            print(line, flush=True)
            if args.out is not None:
                with args.out.open("a") as f:
                    f.write(line + "\n")
    cases = stop - start - skipped
    print(f"{args.op}: {cases} cases, {failures} failed ({skipped} seeds drew non-finite inputs)",
          file=sys.stderr)  # fmt: skip
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
