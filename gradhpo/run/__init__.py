"""Training runs: the run object, the loop that trains it for epochs, and its checkpoints.

* :mod:`~gradhpo.run.training_run` - :class:`TrainingRun`: model + data + optimizer (+ a
  hypergradient tuner) behind ``step / evaluate / hyperparameters / state_dict``.
* :mod:`~gradhpo.run.loop` - :func:`train_epochs`, the one epoch loop, and
  :class:`EarlyStopping`.
"""

from gradhpo.run.loop import EarlyStopping, train_epochs
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
