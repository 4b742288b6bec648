"""The benchmark scripts run end to end (small and on CPU, as CI can)."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_check_runs_on_cpu(tmp_path):
    out = tmp_path / "gpu_check.md"
    cmd = [sys.executable, "-m", "benchmarks.gpu_check", "--device", "cpu", "--quick", "--steps", "1"]
    subprocess.run([*cmd, "--models", "cnn2", "--out", str(out)], cwd=ROOT, check=True, timeout=600)
    text = out.read_text()
    assert "| cnn2 | fp32 |" in text and "| cnn2 | bf16 |" in text
