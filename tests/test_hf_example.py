"""The examples run end to end (a few steps): the README's main-job command must not rot."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run(*args: str, timeout: float = 240) -> str:
    env = dict(os.environ)
    # The examples' own default: Triton on a GPU, PyTorch on a CPU (not the interpreter).
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run(
        [sys.executable, *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def test_sft_example(tmp_path):
    pytest.importorskip("matplotlib")
    out = run("examples/sft.py", "--max-steps", "3", "--batch-size", "4", "--out", str(tmp_path))
    assert "tokens/s" in out and "plot:" in out
    for loss in ("tofu", "ce"):
        result = json.loads((tmp_path / f"history_{loss}.json").read_text())
        assert len(result["history"]["loss"]) == 3
        assert {"entropy", "mean_p"} <= result["stats"].keys()
    assert (tmp_path / "sft_curves.png").stat().st_size > 10_000


def test_sft_example_with_trl(tmp_path):
    pytest.importorskip("trl")
    args = ["--trainer", "trl", "--loss", "tofu", "--max-steps", "2", "--batch-size", "4"]
    run("examples/sft.py", *args, "--out", str(tmp_path))
    result = json.loads((tmp_path / "history_tofu.json").read_text())
    assert len(result["history"]["loss"]) == 2 and result["stats"]


def test_direct_kernel_example():
    out = run("examples/direct_kernel.py")
    assert "fused TOFU loss" in out and "published loss" in out
