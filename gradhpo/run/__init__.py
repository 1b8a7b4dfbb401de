"""Training runs: the run object, the loop that trains it for epochs, and its checkpoints.

* :mod:`~gradhpo.run.training_run` - :class:`TrainingRun`: model + data + optimizer (+ a
  hypergradient tuner) behind ``step / evaluate / hyperparameters / state_dict``.
* :mod:`~gradhpo.run.loop` - :func:`fit`, the one training loop (epochs of one or several
  runs in lockstep, hooks for checkpoints, pruning, early stopping), the metrics' direction.
* :mod:`~gradhpo.run.builder` - :func:`build_run`, the one builder from a run config.
"""

from gradhpo.run.loop import METRICS, EarlyStopping, Epoch, fit, train_epochs
from gradhpo.run.training_run import (
    RUN_FORMAT,
    RUN_SECTIONS,
    TRAINING_KEYS,
    TUNER_KEYS,
    TrainingRun,
    resolve_device,
    swapped_rng,
    upgrade_run_state,
)

__all__ = [
    "EarlyStopping",
    "Epoch",
    "METRICS",
    "fit",
    "RUN_FORMAT",
    "RUN_SECTIONS",
    "TRAINING_KEYS",
    "TUNER_KEYS",
    "TrainingRun",
    "resolve_device",
    "swapped_rng",
    "train_epochs",
    "upgrade_run_state",
]
