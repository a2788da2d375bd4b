"""bench/gpu_suite.py runs end to end (``--smoke``: tiny networks on the CPU)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

SUITE = Path(__file__).resolve().parents[2] / "bench" / "gpu_suite.py"


def _smoke(*cases: str) -> str:
    cmd = [sys.executable, str(SUITE), "--smoke"] + (["--cases", *cases] if cases else [])
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    return proc.stdout


@pytest.mark.slow  # about a minute of CPU time
def test_gpu_suite_smoke_whole_model_partial_budget_and_codeformer():
    out = _smoke("1024-bf16", "1024-fp8-6gb", "codeformer")
    rows = [line for line in out.splitlines() if line.startswith("| 1024") or line.startswith("| codeformer")]
    assert len(rows) == 2 + 4, out
    assert "| 1024-fp8-6gb |" in out and " / " in out  # weights loaded / streamed were reported


@pytest.mark.slow
def test_gpu_suite_smoke_every_case():
    out = _smoke()
    assert "2048-fp8-6gb-tiled" in out and "# total" in out
