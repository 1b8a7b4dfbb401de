"""Tiny module-level objectives for executor tests and the overhead benchmark.

Workers (spawned processes, Ray workers) import an objective by its module and name, so these
live in the package rather than in tests/."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import optuna


def quadratic(trial: optuna.trial.Trial) -> float:
    x = trial.suggest_float("x", -2.0, 2.0)
    time.sleep(0.02)
    return (x - 0.5) ** 2


def die_once(trial: optuna.trial.Trial) -> float:
    """Kills its own process (SIGKILL) in the middle of trial 2 the first time it runs (after
    one reported epoch, so the trial has done work and is continued, not drawn again); a
    marker file remembers."""
    x = trial.suggest_float("x", -2.0, 2.0)
    marker = Path(os.environ["GRADHPO_TEST_MARKER"])
    if trial.number == 2 and not marker.exists():
        trial.report((x - 0.5) ** 2 + 1.0, 0)
        marker.write_text(str(os.getpid()))
        os.kill(os.getpid(), signal.SIGKILL)
    return (x - 0.5) ** 2


def instant(trial: optuna.trial.Trial) -> float:
    """No work at all: for measuring the executors' own overhead."""
    return trial.suggest_float("x", -2.0, 2.0) ** 2


def slow_epochs(trial: optuna.trial.Trial) -> float:
    """Five "epochs" of 30 ms, each reported (so a kill can land mid-trial)."""
    x = trial.suggest_float("x", -2.0, 2.0)
    value = 0.0
    for epoch in range(1, 6):
        time.sleep(0.03)
        value = (x - 0.5) ** 2 + 1.0 / epoch
        trial.report(value, epoch)
    return value
