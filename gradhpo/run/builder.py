"""The one builder: from a run config (the YAML shape, validated by
:func:`gradhpo.config.validate_train_config`) to a :class:`TrainingRun`.

Every job builds its runs here — ``gradhpo train``, each trial of a study and the study's
pre-flight, each PBT member — so a user's mistake in the model, optimizer, tuner or data
section reads the same wherever it surfaces: one :class:`ConfigError` naming where it came
from and the field and value. :class:`~gradhpo.pbt.BatchedPopulation.from_config` reads
the same shape for a vmapped population.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import torch

from gradhpo.config import ConfigError
from gradhpo.data import DatasetNotFoundError, DataSplits, load_data
from gradhpo.models import ModelConfigError
from gradhpo.run.training_run import TrainingRun

__all__ = ["build_run", "load_job_data"]


def build_run(
    config: Mapping[str, Any],
    *,
    data: DataSplits | None = None,
    seed: int | None = None,
    device: str | torch.device | None = None,
    where: str = "config",
) -> TrainingRun:
    """Build the run of ``config`` (on ``data`` if given, with ``seed``/``device`` overriding
    the config's). Mistakes in the config become :class:`ConfigError` ``"<where>: gives an
    invalid run: ..."``; a missing data set stays a :class:`DatasetNotFoundError` (its
    message says where the files were looked for and how to get them)."""
    try:
        return TrainingRun.from_config(config, data=data, seed=seed, device=device)
    except DatasetNotFoundError:
        raise
    except (ModelConfigError, ValueError, TypeError) as exc:
        raise ConfigError(f"{where}: gives an invalid run: {exc}") from exc


_PROCESS_CACHE: dict[str, list[DataSplits]] = {}


def load_job_data(
    config: Mapping[str, Any], n_folds: int | None = None, *, cached: bool = False
) -> list[DataSplits]:
    """The data of a job, loaded once: one :class:`DataSplits`, or one per fold of
    ``n_folds``-fold cross-validation. Mistakes in the ``data`` section are ConfigErrors.

    ``cached=True`` keeps the result for the rest of the process (executor workers, which
    run many tasks of one job, load the data set once)."""
    key = json.dumps([config["data"], n_folds], sort_keys=True)
    if cached and key in _PROCESS_CACHE:
        return _PROCESS_CACHE[key]
    spec = config["data"]
    try:
        if n_folds is not None and isinstance(spec, Mapping) and "factory" in spec:
            raise ValueError(
                f"cross-validation (n_folds={n_folds}) needs a built-in data set; data.factory "
                f"{spec['factory']!r} returns one split (give your factory a fold argument and "
                "run one study per fold)"
            )
        if n_folds is None:
            folds = [load_data(spec)[1]]
        else:
            folds = [load_data({**spec, "n_folds": n_folds, "fold": i})[1] for i in range(n_folds)]
    except DatasetNotFoundError:
        raise
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"data: {exc}") from exc
    if cached:
        _PROCESS_CACHE[key] = folds
    return folds
