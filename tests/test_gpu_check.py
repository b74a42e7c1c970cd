"""bench/gpu_check.py --dry-run: every step of the GPU check at toy size on the CPU.

What the suite runs of the GPU check, so that its first run on a lent GPU machine works.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
STEPS = {"environment", "training", "memory", "speed", "prediction", "tests"}


@pytest.mark.slow
def test_gpu_check_dry_run_runs_every_step(tmp_path: Path) -> None:
    out = tmp_path / "out"
    done = subprocess.run(
        [sys.executable, "bench/gpu_check.py", "--dry-run", "--out", str(out),
         "--workdir", str(tmp_path / "work")],
        cwd=REPO, capture_output=True, text=True,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    steps = json.loads((out / "gpu_check.json").read_text())["steps"]
    assert set(steps) == STEPS and all(step["ok"] for step in steps.values()), steps
    assert steps["environment"]["auto_precision"] == "fp32"  # a CPU: no autocast
    training = steps["training"]
    assert [r["method"] for r in training["results"]] == ["ours", "reference"]
    assert all(r["cells_per_s"] > 0 for r in training["results"])
    assert training["flops_per_cell"] > 0 and training["ratio_vs_reference"]["ours"] > 0
    memory = steps["memory"]["rows"]
    assert len(memory) == 6 and all(r["model_step_cells_per_s"] > 0 for r in memory)
    speed = steps["speed"]["rows"]
    assert [r["variant"] for r in speed] == ["eager", "eager-math"]
    assert all(r["model_step_cells_per_s"] > 0 for r in speed), speed
    prediction = steps["prediction"]
    assert all(r["cells_per_s"] > 0 for r in prediction["rows"])
    assert prediction["vcc_validation_minutes_at_best"] > 0
    tests = steps["tests"]["summary"]
    assert "passed" in tests and "failed" not in tests and "error" not in tests
    assert "training: ok" in done.stdout
