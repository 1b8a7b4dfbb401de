"""The epoch loop shared by ``gradhpo train``, study trials and anything else that trains a
:class:`~gradhpo.run.TrainingRun` for a number of epochs with logging.

One place decides what an epoch record holds and what goes to TensorBoard:

* every ``log_every`` steps: the training loss, every continuous hyperparameter (``hyper/lr``,
  per layer ``hyper/lr/<param>`` where the tuner is granular), the tuner's hypergradient norm
  and its count of rejected hyper steps;
* every epoch: validation loss and accuracy (``val/...``) and the epoch's training loss.

``on_epoch`` is called with each epoch's record; it may return ``True`` to stop early
(early stopping) or raise (Optuna's ``TrialPruned``) to abort.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

from gradhpo.run.training_run import TrainingRun
from gradhpo.tensorboard_logger import TensorBoardLogger

__all__ = ["train_epochs", "EarlyStopping"]

EpochCallback = Callable[[dict[str, Any]], bool | None]


def _log_hyper_state(run: TrainingRun, logger: TensorBoardLogger, train_loss: float) -> None:
    step = run.global_step
    logger.scalars({"train/loss": train_loss}, step)
    logger.scalars(run.hyperparameters, step, prefix="hyper/")
    if run.tuner is not None:
        report = run.last_report
        logger.scalars(
            {
                "tuner/rejected_steps": run.tuner.rejected_steps,
                "tuner/hypergrad_norm": report.hypergrad_norm if report is not None else 0.0,
            },
            step,
        )


def train_epochs(
    run: TrainingRun,
    epochs: int,
    *,
    start_epoch: int = 0,
    logger: TensorBoardLogger | None = None,
    log_every: int | None = None,
    on_epoch: EpochCallback | None = None,
    progress: Any = None,
) -> list[dict[str, Any]]:
    """Train epochs ``start_epoch + 1 .. epochs``; returns one record per finished epoch.

    A record is ``{"epoch", "step", "train_loss", "val_loss", "val_accuracy", "seconds",
    "hypers"}``. A diverged run stops the loop (its last record has ``train_loss`` nan and
    ``val_accuracy`` 0). ``log_every`` (steps) sets how often the hyperparameter trajectories
    are logged; by default about ten points per epoch, rounded to whole tuner horizons so a
    horizon is never split. ``progress`` is an optional tqdm bar advanced once per epoch.
    """
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"epochs must be an integer >= 1, got {epochs!r}")
    per_epoch = run.steps_per_epoch
    if log_every is None:
        horizon = run.tuner.horizon if run.tuner is not None else 1
        log_every = max(horizon, math.ceil(per_epoch / 10 / horizon) * horizon)
    if isinstance(log_every, bool) or not isinstance(log_every, int) or log_every < 1:
        raise ValueError(f"log_every must be an integer >= 1, got {log_every!r}")

    history: list[dict[str, Any]] = []
    for epoch in range(start_epoch + 1, epochs + 1):
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
        if run.diverged:
            record = {
                "epoch": epoch,
                "step": run.global_step,
                "train_loss": math.nan,
                "val_loss": math.nan,
                "val_accuracy": 0.0,
                "seconds": time.perf_counter() - start,
                "hypers": run.hyperparameters,
                "diverged": True,
            }
            history.append(record)
            if on_epoch is not None:
                on_epoch(record)
            break
        val = run.evaluate("val")
        record = {
            "epoch": epoch,
            "step": run.global_step,
            "train_loss": loss_sum / per_epoch,
            "val_loss": val["loss"],
            "val_accuracy": val["accuracy"],
            "seconds": time.perf_counter() - start,
            "hypers": run.hyperparameters,
        }
        history.append(record)
        if logger is not None:
            logger.scalars(
                {
                    "epoch/train_loss": record["train_loss"],
                    "val/loss": val["loss"],
                    "val/accuracy": val["accuracy"],
                },
                run.global_step,
            )
        if progress is not None:
            progress.update(1)
            progress.set_postfix(
                loss=f"{record['train_loss']:.3f}", val_acc=f"{val['accuracy']:.3f}"
            )
        if on_epoch is not None and on_epoch(record):
            break
    return history


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

    def __call__(self, value: float) -> bool:
        """Feed one epoch's value; ``True`` means stop now."""
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
