"""A shorter run of benchmarks/soak.py: resident memory flat after warm-up, every loss finite."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_short_soak_keeps_rss_flat_and_every_loss_finite(tmp_path):
    # Its own process: pytest's own allocations would blur the curve.
    command = [sys.executable, "-m", "benchmarks.soak", "--steps", "300", "--warmup", "100", "--every", "20"]
    done = subprocess.run([*command, "--out", str(tmp_path)], cwd=REPO, capture_output=True, text=True, timeout=1200)
    result = json.loads((tmp_path / "soak.json").read_text())
    assert len(result["losses"]) == 300 and result["all_losses_finite"], result["losses"]
    steps = [step for step, _ in result["rss_samples"]]
    assert steps[0] == 20 and steps[-1] == 300 and 100 in steps
    assert result["rss_drift_after_warmup"] <= 0.02, result["rss_samples"]
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
