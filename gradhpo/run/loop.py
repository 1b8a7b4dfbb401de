"""The one training loop, :func:`fit`: ``gradhpo train``, every study trial (all its
cross-validation folds in lockstep) and ``fit_trial`` train through it, and differ only in
their hooks (checkpointing, reporting to a pruner, early stopping).

One place decides what an epoch record holds and what goes to TensorBoard:

* every ``log_every`` steps: the training loss, every continuous hyperparameter (``hyper/lr``,
  per layer ``hyper/lr/<param>`` where the tuner is granular), the tuner's hypergradient norm
  and its count of rejected hyper steps;
* every epoch: validation loss and accuracy (``val/...``) and the epoch's training loss.

The metric's direction (:data:`METRICS`) lives here too: which value is better, and what a
diverged run scores.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from gradhpo.run.training_run import TrainingRun
from gradhpo.tensorboard_logger import TensorBoardLogger

__all__ = [
    "METRICS",
    "EarlyStopping",
    "Epoch",
    "Hook",
    "check_metric",
    "check_metric_fits",
    "fit",
    "is_better",
    "train_epochs",
    "worst",
]

#: An optimization direction, in Optuna's words.
Direction = Literal["minimize", "maximize"]
#: The metrics a run is selected by, and their direction.
METRICS: dict[str, Direction] = {"val_accuracy": "maximize", "val_loss": "minimize"}


def check_metric(metric: str) -> str:
    """``metric`` if it is one of :data:`METRICS`, else a ValueError naming it."""
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {list(METRICS)}, got {metric!r}")
    return metric


def is_better(metric: str, a: float, b: float) -> bool:
    """Whether value ``a`` of ``metric`` is strictly better than ``b`` (NaN is never better)."""
    return a > b if METRICS[check_metric(metric)] == "maximize" else a < b


def worst(metric: str) -> float:
    """The value a diverged run scores: 0 accuracy, infinite loss."""
    return 0.0 if METRICS[check_metric(metric)] == "maximize" else math.inf


def _log_hyper_state(run: TrainingRun, logger: TensorBoardLogger, train_loss: float) -> None:
    step = run.global_step
    logger.scalars({"train/loss": train_loss}, step)
    logger.scalars(run.hyperparameters, step, prefix="hyper/")
    if run.tuner is not None:
        report = run.last_report
        values = {
            "tuner/rejected_steps": run.tuner.rejected_steps,
            "tuner/tuned_fraction": run.tuner.tuned_fraction,
        }
        if report is not None and report.tuned:  # plain (amortized) horizons have no norm
            values["tuner/hypergrad_norm"] = report.hypergrad_norm
        logger.scalars(values, step)


def _train_epoch(
    run: TrainingRun, epoch: int, logger: TensorBoardLogger | None, log_every: int
) -> dict[str, Any]:
    """One epoch of ``run`` in chunks of ``log_every`` steps, then its validation; returns the
    epoch's record (``diverged: True`` and no validation when the run diverged)."""
    per_epoch = run.steps_per_epoch
    start = time.perf_counter()
    done, loss_sum = 0, 0.0
    while done < per_epoch and not run.diverged:
        chunk = min(log_every, per_epoch - done)
        loss = run.step(chunk)
        if run.diverged:
            break
        done += chunk
        loss_sum += loss * chunk
        if logger is not None:
            _log_hyper_state(run, logger, loss)
    record: dict[str, Any] = {"epoch": epoch, "step": run.global_step}
    if run.diverged:
        # No accuracy without class labels (a regression loss): None, never a made-up 0.
        accuracy = 0.0 if run.data.classification else None
        record.update(train_loss=math.nan, val_loss=math.nan, val_accuracy=accuracy)
    else:
        val = run.evaluate("val")
        record.update(
            train_loss=loss_sum / per_epoch, val_loss=val["loss"], val_accuracy=val.get("accuracy")
        )
        if logger is not None:
            scalars = {"epoch/train_loss": record["train_loss"], "val/loss": val["loss"]}
            if "accuracy" in val:
                scalars["val/accuracy"] = val["accuracy"]
            logger.scalars(scalars, run.global_step)
    record.update(seconds=time.perf_counter() - start, hypers=run.hyperparameters)
    if run.diverged:
        record["diverged"] = True
    return record


@dataclass
class Epoch:
    """What the hooks of :func:`fit` see after each epoch."""

    epoch: int
    #: The metric, mean over the runs; the worst value when any run diverged.
    value: float
    #: One record per run (``epoch, step, train_loss, val_loss, val_accuracy, seconds,
    #: hypers``, and ``diverged`` where it did).
    records: list[dict[str, Any]]
    #: The best value so far, this epoch included, and whether this epoch set it.
    best: float
    improved: bool
    diverged: bool


#: A hook of :func:`fit`: called after each epoch, returns True to stop (early stopping),
#: or raises (Optuna's ``TrialPruned``) to abort.
Hook = Callable[[Epoch], bool | None]


def fit(
    runs: Sequence[TrainingRun],
    epochs: int,
    *,
    metric: str = "val_accuracy",
    start_epoch: int = 0,
    best: float | None = None,
    hooks: Sequence[Hook] = (),
    loggers: Sequence[TensorBoardLogger | None] | None = None,
    log_every: int | None = None,
    progress: Any = None,
) -> list[Epoch]:
    """The one training loop: epochs ``start_epoch + 1 .. epochs`` of every run in lockstep
    (several runs are the folds of a cross-validated trial), then ``metric`` averaged over
    the runs, the best value so far (by the metric's direction), and the hooks in order:
    checkpointing, reporting to a pruner, early stopping, ... . Stops after an epoch in which
    a run diverged or a hook returned True.

    ``loggers`` (one per run) receive the training loss, every hyperparameter, the tuner's
    hypergradient norm and rejected steps every ``log_every`` steps (default about ten points
    per epoch, rounded to whole tuner horizons so a horizon is never split) and the
    validation metrics every epoch. ``progress`` is an optional tqdm bar advanced per epoch.
    """
    check_metric(metric)
    if metric == "val_accuracy":
        for run in runs:
            check_metric_fits(metric, run.data)
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"epochs must be an integer >= 1, got {epochs!r}")
    if not runs:
        raise ValueError("fit: needs at least one run")
    loggers = list(loggers) if loggers is not None else [None] * len(runs)
    if len(loggers) != len(runs):
        raise ValueError(f"fit: {len(loggers)} loggers for {len(runs)} runs")
    every = [_log_every(run, log_every) for run in runs]
    history: list[Epoch] = []
    for epoch in range(start_epoch + 1, epochs + 1):
        records = [
            _train_epoch(run, epoch, tb, n) for run, tb, n in zip(runs, loggers, every, strict=True)
        ]
        diverged = any(r.get("diverged") for r in records)
        value = worst(metric) if diverged else sum(r[metric] for r in records) / len(records)
        if best is None or is_better(metric, value, best):
            best, improved = value, True
        else:
            improved = False
        result = Epoch(epoch, value, records, best, improved, diverged)
        history.append(result)
        if progress is not None:
            progress.update(1)
            progress.set_postfix({metric: f"{value:.4f}"})
        stop = False
        for hook in hooks:
            stop = bool(hook(result)) or stop
        if stop or diverged:
            break
    return history


def check_metric_fits(metric: str, data: Any, where: str = "metric") -> None:
    """``val_accuracy`` needs class labels: on float targets (a regression loss) it is a
    ValueError naming ``where`` that says to use ``val_loss``."""
    if metric == "val_accuracy" and not data.classification:
        raise ValueError(
            f"{where}: val_accuracy needs class labels, but data {data.name!r} has float "
            "targets (a regression loss); use val_loss"
        )


def _log_every(run: TrainingRun, log_every: int | None) -> int:
    if log_every is None:
        horizon = run.tuner.horizon if run.tuner is not None else 1
        return max(horizon, math.ceil(run.steps_per_epoch / 10 / horizon) * horizon)
    if isinstance(log_every, bool) or not isinstance(log_every, int) or log_every < 1:
        raise ValueError(f"log_every must be an integer >= 1, got {log_every!r}")
    return log_every


def train_epochs(
    run: TrainingRun,
    epochs: int,
    *,
    start_epoch: int = 0,
    logger: TensorBoardLogger | None = None,
    log_every: int | None = None,
    progress: Any = None,
) -> list[dict[str, Any]]:
    """:func:`fit` for one run without hooks; returns the epochs' records."""
    history = fit(
        [run],
        epochs,
        metric="val_accuracy" if run.data.classification else "val_loss",
        start_epoch=start_epoch,
        loggers=[logger],
        log_every=log_every,
        progress=progress,
    )
    return [e.records[0] for e in history]


class EarlyStopping:
    """Stop when a metric has not improved by ``min_delta`` for ``patience`` epochs.

    Use as (part of) an ``on_epoch`` callback: ``stop = early(record["val_accuracy"])``.
    """

    def __init__(self, patience: int, *, min_delta: float = 0.0, mode: str = "max") -> None:
        if isinstance(patience, bool) or not isinstance(patience, int) or patience < 1:
            raise ValueError(f"patience must be an integer >= 1, got {patience!r}")
        if isinstance(min_delta, bool) or not isinstance(min_delta, (int, float)) or min_delta < 0:
            raise ValueError(f"min_delta must be a number >= 0, got {min_delta!r}")
        if mode not in ("max", "min"):
            raise ValueError(f"mode must be 'max' or 'min', got {mode!r}")
        self.patience = patience
        self.min_delta = float(min_delta)
        self.mode = mode
        self.best = -math.inf if mode == "max" else math.inf
        self.bad_epochs = 0

    def __call__(self, value: float | Epoch) -> bool:
        """Feed one epoch's value (or :class:`Epoch`, as a hook of :func:`fit`); ``True``
        means stop now."""
        if isinstance(value, Epoch):
            value = value.value
        better = (
            value > self.best + self.min_delta
            if self.mode == "max"
            else value < self.best - self.min_delta
        )
        if better:
            self.best = value
            self.bad_epochs = 0
        else:
            self.bad_epochs += 1
        return self.bad_epochs >= self.patience

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "bad_epochs": self.bad_epochs}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best = float(state["best"])
        self.bad_epochs = int(state["bad_epochs"])
