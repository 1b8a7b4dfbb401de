"""Train one :class:`~gradhpo.run.TrainingRun` inside a user's Optuna objective, and the one
rule for a diverged trial.

**A diverged trial is PRUNED**, whatever the metric: its training loss became non-finite, so
it has no trustworthy final value (a made-up 0.0 accuracy would be a COMPLETE trial under
``val_accuracy`` while an infinite ``val_loss`` would be a FAIL, as before this rule). The
reason is recorded in the trial's user attribute ``diverged`` ("diverged: non-finite training
loss in epoch 3"); the epochs before it stay reported as intermediate values, so samplers
(TPE ranks pruned trials below every complete one) and pruners learn that the region is bad,
and it is no error that stops a study. It is never the best trial."""

from __future__ import annotations

from typing import TYPE_CHECKING, NoReturn

import optuna

from gradhpo.run import EarlyStopping, Epoch, TrainingRun, fit
from gradhpo.run.loop import METRICS, Hook, check_metric, worst
from gradhpo.search.study import owning_study
from gradhpo.tensorboard_logger import TensorBoardLogger

if TYPE_CHECKING:
    from gradhpo.search.study import Study

__all__ = ["DIVERGED", "check_direction", "diverged_reason", "fit_trial", "prune_diverged"]

#: The user attribute that holds why a trial diverged.
DIVERGED = "diverged"


def diverged_reason(epoch: int) -> str:
    """The recorded reason of a trial that diverged in ``epoch``."""
    return f"diverged: non-finite training loss in epoch {epoch}"


def prune_diverged(trial: optuna.trial.BaseTrial, epoch: int) -> NoReturn:
    """End a diverged trial by the one rule (module docstring): the reason in the user
    attribute ``diverged``, then ``optuna.TrialPruned`` with it."""
    reason = diverged_reason(epoch)
    trial.set_user_attr(DIVERGED, reason)
    raise optuna.TrialPruned(reason)


def _directions(trial: optuna.trial.BaseTrial, study: Study | None) -> list[str] | None:
    owner = getattr(trial, "study", None)
    if isinstance(owner, optuna.Study):
        return [d.name.lower() for d in owner.directions]
    if study is not None:
        return list(study.directions)
    return None  # FixedTrial / FrozenTrial without a study: nothing to check


def check_direction(trial: optuna.trial.BaseTrial, metric: str, study: Study | None = None) -> None:
    """ValueError when the study of ``trial`` (or ``study``) optimizes ``metric`` the wrong
    way, e.g. maximizes ``val_loss``."""
    directions = _directions(trial, study)
    if directions is None or len(directions) != 1:
        return
    wanted = METRICS[check_metric(metric)]
    if directions[0] != wanted:
        raise ValueError(
            f"fit_trial: metric {metric!r} must be {wanted}d, but the study's direction is "
            f"{directions[0]!r}; create the study with direction={wanted!r} "
            f"(or create_study(..., metric={metric!r}))"
        )


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
    when the study's pruner says so; returns the best epoch's metric. A run that diverges
    ends the trial as PRUNED with the reason in its user attribute ``diverged`` (the one
    rule, see the module docstring), under every metric.

    ``study`` (a :class:`gradhpo.search.Study`; by default the one whose ``optimize`` runs
    the trial) keeps the trial's heartbeat fresh and claims
    the trial's parameters (:meth:`~gradhpo.search.Study.claim`: parameters another trial
    holds are not trained again, the trial is closed uncounted and the study asks again);
    ``patience`` stops early after that many epochs without improvement.

    The study must optimize the metric in its direction (``val_loss`` minimized,
    ``val_accuracy`` maximized): a contradiction is a ValueError naming both, raised before
    any training (``create_study(..., metric="val_loss")`` sets the right direction). A
    multi-objective study is not checked: which objective the metric is, only the
    objective knows."""
    check_metric(metric)
    check_direction(trial, metric, study)
    early = (
        EarlyStopping(patience, mode="max" if METRICS[metric] == "maximize" else "min")
        if patience
        else None
    )
    if study is None:
        study = owning_study(trial)  # a user objective run by Study.optimize / a driver

    def keep_alive(claim: bool = False) -> None:
        """Refresh a live trial's heartbeat in its study (and claim its parameters)."""
        if study is not None and isinstance(trial, optuna.trial.Trial):
            study.heartbeat(trial)
            if claim:
                study.claim(trial)  # never evaluate a proposal twice

    def report(epoch: Epoch) -> None:
        if epoch.diverged:
            return
        trial.report(epoch.value, epoch.epoch)
        keep_alive()
        if trial.should_prune():
            raise optuna.TrialPruned(f"pruned at epoch {epoch.epoch} ({metric}={epoch.value:.4f})")

    keep_alive(claim=True)
    hooks: list[Hook] = [report] if early is None else [report, early]
    history = fit([run], epochs, metric=metric, hooks=hooks, loggers=[logger])
    if history and history[-1].diverged:
        prune_diverged(trial, history[-1].epoch)
    finished = [e for e in history if not e.diverged]
    if not finished:
        return worst(metric)
    return (
        max(e.value for e in finished)
        if METRICS[metric] == "maximize"
        else min(e.value for e in finished)
    )
