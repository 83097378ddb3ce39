"""benchmarks/gpu_check.py's CPU mode runs its checks' code paths, so the GPU acceptance command cannot rot between
the rare sessions that have a GPU. Two are left to the tests that run the same commands: the pipeline check is
`dvc repro` of the default pipeline (tests/pipelines), the torchrun check `segflow train` under torchrun with two
gloo processes (tests/training/test_distributed.py, which also checks it trains as one process does)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow  # a minute: scheduled among the first (tests/conftest.py)


def test_gpu_check_passes_its_quick_cpu_mode_and_prints_one_table(tmp_path):
    out = tmp_path / "table.md"
    done = subprocess.run(
        [sys.executable, str(REPO / "benchmarks/gpu_check.py"), "--device", "cpu", "--quick",
         "--checks", "throughput", "compile", "--out", str(out)],
        capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    rows = [line.split("|")[1:3] for line in out.read_text().splitlines() if line.startswith("| ") and "---" not in line]
    assert [(name.strip(), result.strip()) for name, result in rows[1:]] == [
        ("throughput", "pass"), ("compile", "pass")]
