"""Hybrid PBT (members also tune a carried forward-mode lr schedule and momentum by
hypergradient) resumes exactly: a kill at any point and `gradhpo resume` give the scores of
the uninterrupted run, bit for bit."""

from __future__ import annotations

import copy
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from helpers import HYBRID_TUNER, count_scores, digits_pbt_config

from gradhpo.cli import main
from gradhpo.jobs.pbt import prepare_pbt, validate_pbt_config
from gradhpo.pbt.store import PBTDatabase

HYBRID = digits_pbt_config("hybrid", tuner=HYBRID_TUNER)
HYBRID["pbt"]["steps"] = 60
HYBRID["pbt"]["space"] = {
    "training.batch_size": {"type": "categorical", "choices": [32, 64, 128]},
    "model.dropout": {"type": "float", "low": 0.05, "high": 0.5},
}

CLI = "import sys; from gradhpo.cli import main; sys.exit(main(sys.argv[1:]))"


def test_tuned_schedules_span_the_pbt_run_whatever_the_batch_size(tmp_path: Path) -> None:
    """A schedule's length is the member's whole run (pbt.steps), not training.epochs epochs
    of the batch size it was built with: PBT changes the batch size, and a member rebuilt on
    resume would read its schedule on another time axis (5-6 of 16 scores differed)."""
    config = copy.deepcopy(HYBRID)
    config["pbt"]["steps"] = None  # default: training.epochs epochs of training.batch_size
    config["output"] = {"dir": str(tmp_path / "runs"), "tensorboard_dir": str(tmp_path / "tb")}
    manager, resolved, population = prepare_pbt(validate_pbt_config(config)[0])
    lr = resolved["tuner"]["hypers"][0]["schedule"]
    assert lr["steps"] == manager.total_steps  # stored in config.yaml, so a resume agrees
    for batch_size in (32, 128):
        member = population.factory(1, {"training.batch_size": batch_size})
        (spec,) = [s for s in member.run.tuner.hypers.specs if s.name == "lr"]
        assert spec.schedule.steps == manager.total_steps


def _cli(config_path: Path, out: Path) -> list[str]:
    return [sys.executable, "-c", CLI, "pbt", str(config_path), "--out", str(out), "--no-progress"]


@pytest.mark.slow
def test_hybrid_pbt_killed_at_random_points_resumes_exactly(tmp_path: Path) -> None:
    rng = random.Random(5)
    config_path = tmp_path / "hybrid.yaml"
    config_path.write_text(yaml.safe_dump(HYBRID), encoding="utf-8")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    subprocess.run(_cli(config_path, tmp_path / "ref"), env=env, check=True, cwd=tmp_path)
    reference = PBTDatabase(tmp_path / "ref" / "hybrid")
    expected = reference.scores()
    reference.close()

    run_dir = tmp_path / "killed" / "hybrid"
    kills = 0
    for attempt in range(3):
        # 4 scores per interval: killed after step 15, 30, 45 (+ a random moment), each after
        # an exploit that may have changed a member's batch size.
        at_least = 12 * (attempt + 1)
        cmd = (
            _cli(config_path, tmp_path / "killed")
            if attempt == 0
            else [sys.executable, "-c", CLI, "resume", str(run_dir), "--no-progress"]
        )
        proc = subprocess.Popen(cmd, env=env, cwd=tmp_path, stdout=subprocess.DEVNULL)
        try:
            while proc.poll() is None:
                if count_scores(run_dir) >= at_least:
                    time.sleep(rng.uniform(0.0, 0.3))
                    proc.send_signal(signal.SIGKILL)
                    kills += 1
                    break
                time.sleep(0.02)
            proc.wait(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
    assert kills >= 2
    assert main(["resume", str(run_dir), "--no-progress"]) == 0
    db = PBTDatabase(run_dir)
    got = db.scores()
    db.close()
    assert [(s["step"], s["member"], s["score"]) for s in got] == [
        (s["step"], s["member"], s["score"]) for s in expected
    ]
