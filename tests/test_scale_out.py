"""Data parallel with torchrun: the commands the README's "Scaling out" section gives."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).parent


@pytest.mark.skipif(sys.platform != "linux", reason="gloo process groups on Linux")
@pytest.mark.parametrize("mode", ["ddp", "fsdp2"])
def test_data_parallel_with_torchrun_matches_single_process(mode):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(HERE / "dist_train.py"), mode]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    # a rank with a mismatch exits 1, which torchrun reports as its own failure
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    reports = [line for line in out.stdout.splitlines() if "checks" in line]
    assert len(reports) == 2 and all(r.endswith("bad []") for r in reports), out.stdout
