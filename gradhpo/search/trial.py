"""Train one :class:`~gradhpo.run.TrainingRun` inside a user's Optuna objective."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import optuna

from gradhpo.run import EarlyStopping, TrainingRun, train_epochs
from gradhpo.tensorboard_logger import TensorBoardLogger

if TYPE_CHECKING:
    from gradhpo.search.study import Study

__all__ = ["fit_trial"]


def fit_trial(
    trial: optuna.trial.BaseTrial,
    run: TrainingRun,
    epochs: int,
    *,
    metric: str = "val_accuracy",
    study: Study | None = None,
    logger: TensorBoardLogger | None = None,
    patience: int | None = None,
) -> float:
    """Train ``run`` for ``epochs``, report ``metric`` to the trial every epoch and prune
    when the study's pruner says so; returns the best epoch's metric (the worst possible
    value if the run diverged before its first evaluation).

    ``study`` (a :class:`gradhpo.search.Study`) keeps the trial's heartbeat fresh;
    ``patience`` stops early after that many epochs without improvement."""
    if metric not in ("val_accuracy", "val_loss"):
        raise ValueError(f"metric must be 'val_accuracy' or 'val_loss', got {metric!r}")
    maximize = metric == "val_accuracy"
    early = EarlyStopping(patience, mode="max" if maximize else "min") if patience else None
    best: list[float] = []

    def on_epoch(record: dict[str, Any]) -> bool:
        value = record[metric]
        if record.get("diverged"):
            return True
        if not best or (value > best[0] if maximize else value < best[0]):
            best[:] = [value]
        trial.report(value, record["epoch"])
        if study is not None and isinstance(trial, optuna.trial.Trial):
            study.heartbeat(trial)
        if trial.should_prune():
            raise optuna.TrialPruned(f"pruned at epoch {record['epoch']} ({metric}={value:.4f})")
        return bool(early is not None and early(value))

    if study is not None and isinstance(trial, optuna.trial.Trial):
        study.heartbeat(trial)
    train_epochs(run, epochs, logger=logger, on_epoch=on_epoch)
    if not best:
        return 0.0 if maximize else math.inf
    return best[0]
