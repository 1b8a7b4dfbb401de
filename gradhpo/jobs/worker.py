"""``gradhpo worker``: attach this process to a running study and run its trials.

A study is shared by any number of drivers: each opens the study's storage, asks for a trial,
trains it and reports, until the study holds its number of finished trials (counted in the
storage, so together they stop at exactly N). A worker is one more such driver, started by
hand on any machine that reaches the study directory (a shared file system) and its storage
(the directory's journal, or a database server):

* a config-driven study (made by ``gradhpo tune``: ``config.yaml`` in the directory): the
  worker reads the config, loads the data once, and runs the same trial objective as
  ``gradhpo tune`` (checkpoints under ``trials/``, TensorBoard logs, pruning), to
  ``search.trials`` or ``trials``;
* a study made from Python (:func:`gradhpo.search.create_study`, no ``config.yaml``): give
  the objective as ``module:function`` (importable on the worker's machine) and the total
  number of trials.

The worker reseeds its sampler (from ``seed``, or a fresh random seed), so workers that
restored the same saved sampler state do not propose the same points. It does not evaluate
the best trial on the test set: the process that started the study (``gradhpo tune``, or
``gradhpo resume`` afterwards) does.
"""

from __future__ import annotations

import importlib
import os
import secrets
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from gradhpo.config import STORAGE_ENV, ConfigError
from gradhpo.jobs.rundir import MARKER, open_run_dir
from gradhpo.jobs.tune import load_folds, run_trials, validate_tune_config
from gradhpo.search.samplers import reseed_sampler
from gradhpo.search.space import SearchSpace
from gradhpo.search.study import Study, load_study

__all__ = ["WorkerJob", "prepare_worker", "run_worker", "STORAGE_ENV"]


@dataclass
class WorkerJob:
    """What :func:`run_worker` needs: the opened study and either the config-driven trial
    (config, space, folds) or a user objective."""

    study: Study
    config: dict[str, Any] | None = None
    space: SearchSpace | None = None
    folds: list[Any] = field(default_factory=list)
    objective: Callable[..., Any] | None = None


def load_objective(spec: str) -> Callable[..., Any]:
    """The callable named by ``"module:function"``; a ConfigError naming ``objective`` and the
    bad value otherwise."""
    if not isinstance(spec, str) or spec.count(":") != 1 or not all(spec.split(":")):
        raise ConfigError(f"objective: expected 'module:function', got {spec!r}")
    module_name, name = spec.split(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"objective: cannot import module {module_name!r} ({exc})") from exc
    fn = getattr(module, name, None)
    if not callable(fn):
        raise ConfigError(f"objective: {module_name!r} has no function {name!r} (from {spec!r})")
    return fn


def _open(directory: Path, storage: str | None, space: SearchSpace | None) -> Study:
    try:
        return load_study(directory, storage=storage, search_space=space)
    except ConfigError:
        raise
    except ValueError as exc:  # a URL that cannot be opened, a password not stored
        raise ConfigError(f"{exc} (command line: --storage URL or ${STORAGE_ENV})") from None


def prepare_worker(
    directory: str | os.PathLike[str],
    *,
    storage: str | None = None,
    objective: str | Callable[..., Any] | None = None,
) -> WorkerJob:
    """Open the study in ``directory`` (``storage``: its URL, needed when ``study.json``
    cannot name it because of a password). A config-driven study also has its config
    validated and its data loaded; a Python-made study needs ``objective``."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ConfigError(f"study directory not found: {str(directory)!r}")
    if (directory / MARKER).is_file() or (directory / "config.yaml").is_file():
        _, raw = open_run_dir(directory, "study")
        if objective is not None:
            raise ConfigError(
                f"objective: {str(directory)!r} is a config-driven study (config.yaml); its "
                f"trials are the config's, leave out objective (got {objective!r})"
            )
        config, space = validate_tune_config(raw)
        folds = load_folds(config)
        study = _open(directory, storage, space)
        return WorkerJob(study, config=config, space=space, folds=folds)
    if not (directory / "study.json").is_file():
        raise ConfigError(
            f"{str(directory)!r} is not a study directory (no study.json or config.yaml)"
        )
    if objective is None:
        raise ConfigError(
            f"objective: {str(directory)!r} was made from Python (no config.yaml); give its "
            "objective as 'module:function'"
        )
    fn = load_objective(objective) if isinstance(objective, str) else objective
    if not callable(fn):
        raise ConfigError(f"objective: expected a callable or 'module:function', got {fn!r}")
    return WorkerJob(_open(directory, storage, None), objective=fn)


def _check_count(field_name: str, value: Any) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ConfigError(f"{field_name}: expected an integer >= 1, got {value!r}")


def run_worker(
    job: WorkerJob,
    *,
    trials: int | None = None,
    timeout: float | None = None,
    seed: int | None = None,
    threads: int | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Run trials of ``job.study`` in this process until the study holds ``trials`` finished
    ones (a config-driven study: ``search.trials`` by default), or ``timeout`` seconds
    passed. Returns ``{"ran", "finished", "target", "seed", "seconds", "host", "pid"}``."""
    _check_count("trials", trials)
    if timeout is not None and (
        isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0
    ):
        raise ConfigError(f"timeout: expected seconds > 0, got {timeout!r}")
    _check_count("threads", threads)
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
        raise ConfigError(f"seed: expected an integer >= 0, got {seed!r}")
    if job.config is None and trials is None:
        raise ConfigError(
            "trials: required for a study made from Python (the study does not record how "
            "many trials it should hold)"
        )
    if threads is not None:
        torch.set_num_threads(threads)
    seed = secrets.randbelow(2**31) if seed is None else seed
    reseed_sampler(job.study.sampler, seed)
    start = time.perf_counter()
    if job.config is not None:
        assert job.space is not None
        target = trials if trials is not None else job.config["search"]["trials"]
        ran = run_trials(
            job.study,
            job.config,
            job.space,
            job.folds,
            trials=target,
            timeout=timeout,
            progress=progress,
        )
    else:
        assert job.objective is not None
        target = trials
        ran = job.study.optimize(
            job.objective,
            n_trials=target,
            timeout=timeout,
            catch=(Exception,),
            show_progress_bar=progress,
        )
    return {
        "ran": list(ran),
        "finished": len(job.study.finished_trials()),
        "target": target,
        "seed": seed,
        "seconds": time.perf_counter() - start,
        "host": socket.gethostname(),
        "pid": os.getpid(),
    }
