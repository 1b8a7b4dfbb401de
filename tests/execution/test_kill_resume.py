"""Kill the driver at several random points of a study and of a PBT run; after the last
resume nothing that had finished is lost, nothing is duplicated, the counts are exact."""

from __future__ import annotations

import math
import os
import random
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import optuna
import pytest

from gradhpo.pbt.manager import PopulationBasedTraining
from gradhpo.pbt.store import PBTDatabase
from gradhpo.search import create_study, load_study
from gradhpo.search.space import SearchSpace
from gradhpo.testing.objectives import slow_epochs
from gradhpo.testing.quartic import QuarticMember

optuna.logging.set_verbosity(optuna.logging.WARNING)

STUDY_DRIVER = textwrap.dedent(
    """
    import sys, optuna
    from gradhpo.testing.objectives import slow_epochs
    from gradhpo.search import load_study
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    load_study(sys.argv[1]).optimize(slow_epochs, n_trials=int(sys.argv[2]))
    """
)


def _kill_when(cmd: list[str], db: Path, query: str, at_least: int, rng: random.Random) -> bool:
    """Run ``cmd`` and SIGKILL it a random moment (0-0.1 s) after ``query`` on the SQLite file
    ``db`` first returns a count >= ``at_least``; True if it was killed before finishing."""
    proc = subprocess.Popen(cmd, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        while proc.poll() is None:
            try:
                with sqlite3.connect(db, timeout=5) as conn:
                    count = conn.execute(query).fetchone()[0]
            except sqlite3.Error:
                count = 0
            if count >= at_least:
                time.sleep(rng.uniform(0.0, 0.1))
                proc.send_signal(signal.SIGKILL)
                proc.wait(timeout=30)
                return True
            time.sleep(0.01)
        return False
    finally:
        if proc.poll() is None:
            proc.kill()


@pytest.mark.slow
def test_study_survives_kills_at_random_points(tmp_path: Path) -> None:
    rng = random.Random(7)
    # SQLite storage: the test watches the trials table to kill the driver inside a trial.
    create_study(
        tmp_path / "s", sampler="tpe", pruner=None, direction="minimize", seed=0, storage="sqlite"
    )
    script = tmp_path / "driver.py"
    script.write_text(STUDY_DRIVER)
    n = 30
    seen: dict[int, tuple[dict, float]] = {}
    kills = 0
    for _ in range(4):
        # Kill inside a trial: once the k-th trial of this run has started (k random).
        kills += _kill_when(
            [sys.executable, str(script), str(tmp_path / "s"), str(n)],
            tmp_path / "s" / "study.db",
            "SELECT COUNT(*) FROM trials",
            len(load_study(tmp_path / "s").optuna.trials) + rng.randint(1, 4),
            rng,
        )
        study = load_study(tmp_path / "s")
        finished = {t.number: (t.params, t.value) for t in study.finished_trials()}
        for number, record in seen.items():  # nothing finished before is lost or changed
            assert finished.get(number) == record
        seen = finished
    study = load_study(tmp_path / "s")
    study.optimize(slow_epochs, n_trials=n)
    done = study.finished_trials()
    assert len(done) == n and len({t.number for t in done}) == n
    for number, record in seen.items():
        assert {t.number: (t.params, t.value) for t in done}[number] == record
    assert not [t for t in study.optuna.trials if t.state.name == "RUNNING"]
    # Every dead trial was retried exactly once, with its own parameters.
    dead = [t for t in study.optuna.trials if t.system_attrs.get("gradhpo:retried")]
    assert kills == 4 and len(dead) >= 2  # the kills did land in the middle of trials
    for t in dead:
        retries = [r for r in done if r.user_attrs.get("gradhpo:retry_of") == t.number]
        # Same parameters — unless it died before suggesting any (then the retry draws them).
        assert len(retries) <= 1 and all(r.params == t.params or not t.params for r in retries)


PBT_DRIVER = textwrap.dedent(
    """
    import math, sys, time
    import numpy as np
    from gradhpo.pbt.manager import PopulationBasedTraining
    from gradhpo.testing.quartic import QuarticMember
    from gradhpo.search.space import SearchSpace

    class Slow(QuarticMember):
        def step(self, n):
            time.sleep(0.001 * n)
            return super().step(n)

    lr = SearchSpace.from_config({"optimizer.lr": {"type": "float", "low": 1e-4, "high": 10.0, "log": True}})
    lrs = np.exp(np.random.RandomState(0).uniform(math.log(1e-4), math.log(0.05), 6))
    PopulationBasedTraining(
        lambda i, v: Slow(v["optimizer.lr"], seed=100 + i), lr.parameters, sys.argv[1],
        population=6, interval=10, total_steps=400, seed=3, resample_probability=0.0,
        mode=sys.argv[2], initial_values=[{"optimizer.lr": float(x)} for x in lrs]).run()
    """
)


def _pbt(directory: Path, mode: str) -> PopulationBasedTraining:
    lr = SearchSpace.from_config(
        {"optimizer.lr": {"type": "float", "low": 1e-4, "high": 10.0, "log": True}}
    )
    lrs = np.exp(np.random.RandomState(0).uniform(math.log(1e-4), math.log(0.05), 6))
    return PopulationBasedTraining(
        lambda i, v: QuarticMember(v["optimizer.lr"], seed=100 + i),
        lr.parameters,
        directory,
        population=6,
        interval=10,
        total_steps=400,
        seed=3,
        resample_probability=0.0,
        mode=mode,
        initial_values=[{"optimizer.lr": float(x)} for x in lrs],
    )


@pytest.mark.slow
def test_pbt_survives_kills_at_random_points(tmp_path: Path) -> None:
    rng = random.Random(11)
    reference = _pbt(tmp_path / "ref", "sync")
    expected = reference.run()
    script = tmp_path / "pbt.py"
    script.write_text(PBT_DRIVER)
    run_dir = tmp_path / "killed"
    scores_before: list = []
    kills = 0
    for _ in range(4):
        # Kill a random moment after a random number of further evaluations were committed.
        done = 0
        if (run_dir / "pbt.db").exists():
            db = PBTDatabase(run_dir)
            done = len(db.scores())
            db.close()
        kills += _kill_when(
            [sys.executable, str(script), str(run_dir), "sync"],
            run_dir / "pbt.db",
            "SELECT COUNT(*) FROM scores",
            done + rng.randint(1, 40),
            rng,
        )
        db = PBTDatabase(run_dir)
        scores = db.scores()
        db.close()
        assert scores[: len(scores_before)] == scores_before  # committed history never changes
        scores_before = scores
    assert kills >= 2
    resumed = _pbt(run_dir, "sync")
    assert resumed.start() and min(resumed.steps) < 400  # still unfinished after the kills
    best = resumed.run()
    assert best["member"] == expected["member"] and best["score"] == expected["score"]
    assert resumed.db.scores()[: len(scores_before)] == scores_before
    assert [(s["step"], s["member"], s["score"]) for s in resumed.db.scores()] == [
        (s["step"], s["member"], s["score"]) for s in reference.db.scores()
    ]
    assert len(resumed.db.lineage()) == len(reference.db.lineage())
