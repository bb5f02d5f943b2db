"""The benchmark harness end to end at its smoke preset (tiny shapes, CPU, Triton interpreted).

It checks the plumbing and the schema, not speed: timings are never asserted. Each provider's loss
is checked against float64 by the harness itself (status "error: mismatch ..." otherwise).
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tofu_kernels.linear_tofu import LINEAR_IMPLS

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
FIELDS = {
    "provider": str,
    "loss": str,
    "tokens": int,
    "hidden": int,
    "vocab": int,
    "dtype": str,
    "mode": str,
    "weight_grad": bool,
    "ms": (float, type(None)),
    "ms_p20": (float, type(None)),
    "ms_p80": (float, type(None)),
    "peak_mem_mb": (float, type(None)),
    "status": str,
    "device": str,
    "torch": str,
    "triton": str,
}
EXPECTED = {
    "tofu": {f"tofu_kernels/{i}" for i in LINEAR_IMPLS if i != "auto"}
    | {"torch_eager", "torch_compile", "gemm_floor"},
    "ce": {f"tofu_kernels/{i}" for i in LINEAR_IMPLS if i != "auto"}
    | {"liger", "liger_fp32", "cce", "torch_native", "torch_eager", "gemm_floor"},
}
# Must run wherever the smoke preset runs (the others may lack a package or a CUDA device).
MUST_BE_OK = {"tofu_kernels/chunked", "tofu_kernels/torch", "torch_eager", "gemm_floor"}


@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> tuple[Path, Path, list[dict]]:
    """The smoke preset through bench/run_gpu.sh, the GPU run's one command (without its GPU
    tests, and with no wheel folder), so that a GPU session never finds a fault in it first."""
    out = tmp_path_factory.mktemp("bench")
    published = out / "published"
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # python3
    if not torch.cuda.is_available():
        env["TRITON_INTERPRET"] = "1"
    cmd = ["bash", "bench/run_gpu.sh", str(out), "--preset", "smoke", "--no-tests"]
    proc = subprocess.run(
        [*cmd, "--wheels", str(out / "no-wheels"), "--results", str(published)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,  # about 30 s on 2 idle cores; generous for a loaded CI machine
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # what it prints last is the headline table and its goal lines; the log has all of it
    assert proc.stdout.rstrip().splitlines()[-1].startswith("Goal, "), proc.stdout[-3000:]
    assert "== benchmark: preset smoke" in (out / "run_gpu.log").read_text()
    return out, published, json.loads((out / "results.json").read_text())


def test_schema(smoke):
    _, _, rows = smoke
    assert rows
    for row in rows:
        for key, kind in FIELDS.items():
            assert isinstance(row[key], kind), (key, row)
        assert row["loss"] in ("tofu", "ce")
        assert row["mode"] in ("fwd", "fwd_bwd")
        status = row["status"]
        assert status in ("ok", "oom", "unavailable") or status.startswith("error: "), row
        if status == "ok":
            assert row["ms"] > 0 and row["ms_p20"] <= row["ms"] <= row["ms_p80"], row
        if not torch.cuda.is_available():
            assert row["device"] == "cpu" and row["peak_mem_mb"] is None


def test_every_provider_has_a_row_per_case(smoke):
    _, _, rows = smoke
    cases = {(r["case"], r["tokens"]) for r in rows}
    assert len(cases) >= 3
    for case in cases:
        for loss, expected in EXPECTED.items():
            got = {
                r["provider"]
                for r in rows
                if (r["case"], r["tokens"]) == case and r["loss"] == loss
            }
            assert got >= expected, (case, loss, expected - got)
    modes = {(r["mode"], r["weight_grad"]) for r in rows}
    assert {("fwd_bwd", True), ("fwd_bwd", False), ("fwd", False)} <= modes


def test_losses_agree(smoke):
    """No mismatch against float64, the core providers all ran, and every ok loss is close."""
    _, _, rows = smoke
    bad = [r for r in rows if r["status"].startswith("error: mismatch")]
    assert not bad, bad
    for r in rows:
        if r["provider"] in MUST_BE_OK:
            assert r["status"] == "ok", r
        if r["status"] == "ok" and r["provider"] != "gemm_floor":
            assert r["loss_value"] == pytest.approx(r["ref_loss"], rel=2e-2), r
    # The same case's ok providers agree with each other, not only with the reference.
    groups: dict[tuple, list[float]] = {}
    for r in rows:
        if r["status"] == "ok" and r["loss_value"] is not None:
            groups.setdefault((r["case"], r["tokens"], r["loss"]), []).append(r["loss_value"])
    for key, values in groups.items():
        assert max(values) - min(values) <= 4e-2 * abs(min(values)), (key, values)


def test_reports_and_published_copies(smoke):
    out, published, rows = smoke
    md = (out / "results.md").read_text()
    assert "Headline" in md and "| provider |" in md
    assert rows[0]["torch"] in md and rows[0]["triton"] in md
    pngs = sorted(out.glob("*.png"))
    assert pngs and all(p.stat().st_size > 1000 for p in pngs)
    # bench/results/<card>-<yyyymmdd>.json with its report and plots
    stamp = rows[0]["date"].replace("-", "")
    names = {p.name for p in published.iterdir()}
    copies = [n for n in names if n.endswith(f"-{stamp}.json")]
    assert len(copies) == 1, names
    if rows[0]["device"] == "cpu":
        assert copies == [f"cpu-{stamp}.json"]
    prefix = copies[0].removesuffix(".json")
    assert f"{prefix}.md" in names
    assert {f"{prefix}-{p.name}" for p in pngs} <= names


def test_publish_never_overwrites_another_run(smoke, tmp_path, monkeypatch):
    """A second run on the same card and day is published as <prefix>-2; the same run again
    (here with one more row, as run.py --cases completes it) replaces its own copy."""
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    report = importlib.import_module("report")
    out, _, rows = smoke
    dest = tmp_path / "results"
    first = report.publish(out, dest)[0]
    other = tmp_path / "other"
    other.mkdir()
    changed = [dict(r, ms=r["ms"] + 1.0) if r["status"] == "ok" else r for r in rows]
    (other / "results.json").write_text(json.dumps(changed))
    (other / "results.md").write_text("other run")
    second = report.publish(other, dest)[0]
    assert second.name == first.name.replace(".json", "-2.json")
    assert json.loads(first.read_text()) == rows  # untouched
    (out / "results.json").write_text(json.dumps(rows + [dict(rows[0], case="extra")]))
    try:
        assert report.publish(out, dest)[0] == first  # the same run, completed: in place
    finally:
        (out / "results.json").write_text(json.dumps(rows))
    assert len(json.loads(first.read_text())) == len(rows) + 1


def test_report_only_rebuilds_from_json(smoke, tmp_path):
    """A run whose machine lacked matplotlib (or was killed) is reported from results.json."""
    out, _, rows = smoke
    (tmp_path / "results.json").write_text((out / "results.json").read_text())
    cmd = [sys.executable, "bench/run.py", "--preset", "smoke", "--out", str(tmp_path)]
    proc = subprocess.run(
        [*cmd, "--report-only"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.rstrip().splitlines()[-1].startswith("Goal")  # the headline is last
    assert rows[0]["device"] in (tmp_path / "results.md").read_text()
    assert list(tmp_path.glob("*.png"))


def test_cut_short_and_completed_runs(smoke, monkeypatch, tmp_path):
    """A killed run's report says which rows it never reached, and a run completed by
    --cases (rows appended) is reported from each row's last measurement."""
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    run = importlib.import_module("run")
    report = importlib.import_module("report")
    _, _, rows = smoke
    first = [r for r in rows if r["case"] == rows[0]["case"] and r["tokens"] == rows[0]["tokens"]]
    full = run.cut_short_rows(first, run.PRESETS["smoke"])
    assert len(full) == len(rows)  # every (case, provider, loss) of the preset has a row
    assert {r["note"] for r in full[len(first) :]} == {"the run was cut short before this row"}
    assert run.cut_short_rows(rows, run.PRESETS["smoke"]) == rows
    redo = dict(rows[0], status="ok", ms=123.0, note="completed")
    latest = report.latest_rows([dict(rows[0], status="unavailable", ms=None), *rows[1:], redo])
    assert len(latest) == len(rows) and latest[0]["ms"] == 123.0
    run.write_json(rows, tmp_path)
    assert json.loads((tmp_path / "results.json").read_text()) == rows
    assert not list(tmp_path.glob("*.tmp"))


def test_failures_become_rows(monkeypatch, tmp_path):
    """Unavailable, out of memory, an exception, a wrong loss, a stuck provider and a spent
    budget each give a row with its status; the run itself never fails."""
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    run = importlib.import_module("run")
    providers = importlib.import_module("providers")

    def ce(h, w, y):
        return torch.nn.functional.cross_entropy((h @ w.t()).float(), y)

    def raising(exc):
        def fn(h, w, y):
            raise exc

        return fn

    def unavailable(case, loss):
        raise providers.Unavailable("not here")

    def slow(h, w, y):
        time.sleep(5)

    behaviours = {
        "fine": ce,
        "oom": raising(torch.cuda.OutOfMemoryError("CUDA out of memory")),
        "boom": raising(RuntimeError("bad input\nsecond line")),
        "wrong": lambda h, w, y: 2 * ce(h, w, y),
        "slow": slow,
    }
    fakes = [
        providers.Provider(name, ("ce",), lambda case, loss, fn=fn: fn)
        for name, fn in behaviours.items()
    ]
    fakes.append(providers.Provider("missing", ("ce",), unavailable))
    case = run.Case("t", 8, 16, 4)
    preset = dataclasses.replace(run.PRESETS["smoke"], cases=(case,), provider_timeout_s=1)

    status = {r["provider"]: r["status"] for r in run.run(preset, fakes, None, tmp_path)}
    assert status["fine"] == "ok"
    assert status["oom"] == "oom"
    assert status["boom"] == "error: RuntimeError: bad input"
    assert status["wrong"].startswith("error: mismatch")
    assert status["slow"] == "error: TimeoutError: timeout after 1 s"
    assert status["missing"] == "unavailable"
    assert json.loads((tmp_path / "results.json").read_text())  # written after every case

    late = run.run(preset, fakes[:1], 1e-9, tmp_path)
    assert [(r["status"], r["note"]) for r in late] == [
        ("unavailable", "skipped: time budget spent")
    ]

    # the floor's one measurement serves its second loss even when the budget ran out during
    # the first (that row was "skipped", and the headline's floor column blank)
    def floor(h, w, y):
        time.sleep(0.3)
        return h @ w.t()

    gemms = providers.Provider("floor", ("tofu", "ce"), lambda case, loss: floor, has_loss=False)
    rows = run.run(dataclasses.replace(preset, provider_timeout_s=30), [gemms], 0.2, tmp_path)
    assert [r["status"] for r in rows] == ["ok", "ok"] and rows[0]["ms"] == rows[1]["ms"]

    names = {p.name for p in providers.all_providers()}
    assert set(run.PRESETS["h100"].headline_only) <= names  # no misspelt name skips nothing

    # a provider timed at the headline case only: a row at every other case, which says so
    cases = (case, dataclasses.replace(case, tokens=2))
    preset = dataclasses.replace(preset, cases=cases, headline=("t", 2), headline_only=("fine",))
    rows = run.run(preset, fakes[:1], None, tmp_path)
    assert [(r["tokens"], r["status"], r["note"]) for r in rows] == [
        (4, "unavailable", "timed at the headline case only"),
        (2, "ok", ""),
    ]


def test_card_names(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    report = importlib.import_module("report")
    assert report.card_slug("NVIDIA H100 80GB HBM3") == "h100-80gb-hbm3"
    assert report.card_slug("NVIDIA H200") == "h200"
    assert report.card_slug("cpu") == "cpu"


@pytest.mark.parametrize("no_tma", [False, True])
def test_tune_fused_smoke(tmp_path, no_tma):
    """bench/tune_fused.py end to end on CPU: every candidate row ran and agreed with the
    default config (timings are not asserted); --no-tma leaves the bulk reductions out."""
    cmd = [sys.executable, str(ROOT / "bench" / "tune_fused.py"), "--smoke", "--out", str(tmp_path)]
    proc = subprocess.run(cmd + ["--no-tma"] * no_tma, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads((tmp_path / "tune.json").read_text())
    assert len(result["fwd"]) == 2 and len(result["bwd"]) == 4 and len(result["breakdown"]) == 5
    # the bulk-reduction candidate first; the interpreter here has none, so it ran atomics
    tma = [r.get("TMA_REDUCE", False) for r in result["bwd"]]
    assert tma == ([False] * 4 if no_tma else [True, True, False, False])
    assert {r["adds"] for r in result["bwd"]} == {"atomics"}
    assert all(r["status"] == "ok" and r["ms"] > 0 for r in result["breakdown"])
    assert all(r["status"] == "ok" and r["ms"] > 0 for r in result["fwd"] + result["bwd"])
    assert "| bwd |" in (tmp_path / "tune.md").read_text()


def test_launch_config_override_is_exact_and_restored(monkeypatch):
    """tune_fused.launch_config (also the sweep's): inside, fused_config returns the candidate
    for this device ((9, 0) on CPU); after, the table is as before, also when the body raises."""
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    tune = importlib.import_module("tune_fused")
    fused = importlib.import_module("tofu_kernels.fused_tofu")
    before = dict(fused.FWD_CONFIGS)
    candidate = {**fused.FWD_CONFIGS[8], "BLOCK_V": 64}
    with pytest.raises(RuntimeError), tune.launch_config(fused.FWD_CONFIGS, candidate):
        assert fused.fused_config(fused.FWD_CONFIGS, (9, 0), torch.bfloat16) == candidate
        raise RuntimeError
    assert fused.FWD_CONFIGS == before


def test_sweep_smoke(tmp_path):
    """bench/sweep.py end to end on CPU: a row per variant, each loss checked against float64
    (timings are not asserted)."""
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "sweep.py"), "--smoke", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = json.loads((tmp_path / "sweep.json").read_text())["rows"]
    names = [r["variant"] for r in rows]
    assert names[0] == "chunked" and "fused-fwd64x128" in names and len(names) == len(set(names))
    assert all(r["status"] == "ok" and r["ms"] > 0 for r in rows), rows
    assert "| chunked-c2048 |" in proc.stdout


def test_cases_option_runs_only_those(tmp_path):
    """run.py --cases A --providers P: the rows of those alone (to finish a run cut short)."""
    out = tmp_path / "out"
    argv = ["--preset", "smoke", "--cases", "tiny/fwd", "--providers", "tofu_kernels/chunked"]
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "run.py"), *argv, "--out", str(out)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = json.loads((out / "results.json").read_text())
    assert {(r["case"], r["provider"]) for r in rows} == {("tiny/fwd", "tofu_kernels/chunked")}
    assert all(r["status"] == "ok" for r in rows)


def test_auto_choice_and_its_record(monkeypatch, tmp_path):
    """impl="auto"'s picks come from a GPU run's rows: per regime the least total time over the
    cases chunked ran; a candidate that failed any of them is out, a case cut by the time budget
    is left out; a CPU run picks nothing.
    publish.py --auto keeps other capabilities' entries, and the library follows the table."""
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    report = importlib.import_module("report")
    publish = importlib.import_module("publish")
    gpu = {"device": "NVIDIA H100 80GB HBM3", "versions": {"capability": "9.0"}}

    def row(impl, case, ms, weight_grad=True, status="ok", loss="tofu", mode="fwd_bwd"):
        return dict(gpu, provider=f"tofu_kernels/{impl}", case=case, tokens=8192, ms=ms,
                    weight_grad=weight_grad, status=status, loss=loss, mode=mode)  # fmt: skip

    rows = [
        row("chunked", "a", 10.0), row("chunked", "b", 10.0),
        row("vocab_chunked", "a", 8.0), row("vocab_chunked", "b", 13.0),  # 21 > 20: slower
        row("fused", "a", 5.0), row("fused", "b", 5.0, status="oom"),  # failed one: out
        row("chunked-bf16acc", "a", 1.0), row("chunked-bf16acc", "b", 1.0),  # not a candidate
        row("vocab_chunked", "a", 1.0, loss="ce"), row("vocab_chunked", "a", 1.0, mode="fwd"),
        row("chunked", "lora", 6.0, weight_grad=False),
        row("vocab_chunked", "lora", 4.0, weight_grad=False),
    ]  # fmt: skip
    assert report.auto_choice(rows) == {
        "capability": "9.0", "device": gpu["device"], "train": "chunked", "frozen": "vocab_chunked"
    }  # fmt: skip
    rows.append(row("vocab_chunked", "b", 11.0))  # a later row of the same case wins: 19 < 20
    assert report.auto_choice(rows)["train"] == "vocab_chunked"
    # the time budget ran out after chunked's row of a case: that case is left out, no one is
    cut = rows + [row("chunked", "c", 1.0), row("vocab_chunked", "c", None, status="unavailable")]
    assert report.auto_choice(cut)["train"] == "vocab_chunked"
    assert report.auto_choice([dict(r, versions={"capability": None}) for r in rows]) is None

    table = tmp_path / "auto_impl.json"
    table.write_text(json.dumps({"8.0": {"train": "chunked"}, "9.0": {"frozen": "fused"}}))
    lora = [r for r in rows if r["case"] != "lora"]  # this run measured no frozen head
    publish.record_auto(lora, "bench/results/x.json", table)
    entries = json.loads(table.read_text())
    assert entries["8.0"] == {"train": "chunked"}
    assert entries["9.0"]["train"] == "vocab_chunked" and entries["9.0"]["frozen"] == "fused"
    entries["9.0"]["frozen"] = "vocab_chunked"

    from tofu_kernels import linear_tofu

    # compiled code bakes the pick in: no read of the table's file, no graph break
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))

    def pick(x):
        impl = linear_tofu.auto_impl(torch.device("cuda"), frozen=False)
        return x * 2 if impl == linear_tofu.auto_impl(torch.device("cuda"), False) else x

    assert torch.compile(pick, fullgraph=True, backend="eager")(torch.ones(2)).tolist() == [2, 2]

    monkeypatch.setattr(linear_tofu, "measured_impls", lambda: entries)
    assert linear_tofu.auto_impl(torch.device("cuda"), frozen=False) == "vocab_chunked"
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    assert linear_tofu.auto_impl(torch.device("cuda"), frozen=True) == "chunked"  # none measured
    entries["8.0"]["train"] = "bogus"
    assert linear_tofu.auto_impl(torch.device("cuda"), frozen=False) == "chunked"

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 6))
    entries["8.0"]["train"] = "fused"  # measured on 8.0 only: 8.6 has less shared memory
    assert linear_tofu.auto_impl(torch.device("cuda"), frozen=False) == "chunked"
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    assert linear_tofu.auto_impl(torch.device("cuda"), frozen=False) == "fused"
    monkeypatch.setattr(torch, "are_deterministic_algorithms_enabled", lambda: True)
    assert linear_tofu.auto_impl(torch.device("cuda"), frozen=False) == "chunked"  # no atomics
