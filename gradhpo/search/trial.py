"""Train one :class:`~gradhpo.run.TrainingRun` inside a user's Optuna objective."""

from __future__ import annotations

from typing import TYPE_CHECKING

import optuna

from gradhpo.run import EarlyStopping, Epoch, TrainingRun, fit
from gradhpo.run.loop import METRICS, check_metric, worst
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
    check_metric(metric)
    early = (
        EarlyStopping(patience, mode="max" if METRICS[metric] == "maximize" else "min")
        if patience
        else None
    )
    live = study is not None and isinstance(trial, optuna.trial.Trial)

    def report(epoch: Epoch) -> None:
        if epoch.diverged:
            return
        trial.report(epoch.value, epoch.epoch)
        if live:
            study.heartbeat(trial)  # type: ignore[union-attr]
        if trial.should_prune():
            raise optuna.TrialPruned(f"pruned at epoch {epoch.epoch} ({metric}={epoch.value:.4f})")

    if live:
        study.heartbeat(trial)  # type: ignore[union-attr]
    hooks = [report] if early is None else [report, early]
    history = fit([run], epochs, metric=metric, hooks=hooks, loggers=[logger])
    finished = [e for e in history if not e.diverged]
    if not finished:
        return worst(metric)
    return (
        max(e.value for e in finished)
        if METRICS[metric] == "maximize"
        else min(e.value for e in finished)
    )
