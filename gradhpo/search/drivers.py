"""Study drivers as executor workers (a user objective on a shared study; the config-driven
worker is :func:`gradhpo.jobs.tune.config_study_worker`).

Each worker opens the study directory itself (the storage shared by all: the directory's
``study.journal`` or ``study.db``, or the study's database URL) and runs trials until the study
holds ``n_trials`` finished ones; :meth:`gradhpo.search.Study.optimize` counts finished trials
in the storage and waits rather than overshoot, so any number of drivers — workers of one
executor, or separate ``gradhpo resume`` processes — give exactly ``n_trials``, and never
evaluate one proposal twice (:meth:`gradhpo.search.Study.claim`). A driver that
starts after another one died recovers the dead one's RUNNING trial (its process is gone) and
continues it from its last checkpoint.

For a multi-node Ray cluster the study directory must be on storage every node can reach (a
shared file system: the journal needs a file system where creating a file with O_EXCL is
atomic — local disks, NFSv3+ —, SQLite needs working file locks, e.g. NFSv4 or a local disk
of a single-node cluster), since drivers read and write the storage and checkpoints there, or
the trials in a database server (``storage="postgresql://..."``, passed to every worker);
and since a driver on another host cannot see whether a process is alive, its trials are
recovered only after the heartbeat grace period (``stale_after``, 600 s by default).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import optuna

from gradhpo.execution import Executor, make_executor
from gradhpo.search.study import Study, load_study

__all__ = [
    "distinct_sampler",
    "objective_worker",
    "open_driver",
    "run_drivers",
    "run_objective_study",
]


def distinct_sampler(study: Study, worker: int, workers: int) -> None:
    """Drivers of one study restore the same saved sampler state (whichever driver saved it
    last); left alone, two drivers with a seeded sampler would propose the same points. A
    single worker keeps the saved state (it reproduces a serial run); with several, worker k
    reseeds the sampler from a seed derived from the study's seed, k and the number of trials
    the study holds at this start (:meth:`gradhpo.search.Study.reseed_driver`: a resumed
    worker k does not draw again what worker k drew before the kill). (While drivers run
    side by side, :meth:`gradhpo.search.Study.ask` also gives every fresh trial a seed of its
    own, and :meth:`~gradhpo.search.Study.claim` refuses a proposal another trial holds, so
    separate ``gradhpo resume`` processes never evaluate a point twice either.)"""
    if workers > 1:
        study.reseed_driver(worker)


def open_driver(
    directory: str, worker: int, workers: int, storage: str | None, search_space: Any = None
) -> Study:
    """The study in ``directory`` as driver ``worker`` of ``workers`` opens it in an executor
    worker: Optuna's log quiet, the sampler distinct (:func:`distinct_sampler`)."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = load_study(directory, storage=storage, search_space=search_space)
    distinct_sampler(study, worker, workers)
    return study


def objective_worker(
    directory: str,
    objective: Callable[[optuna.trial.Trial], float],
    n_trials: int,
    timeout: float | None,
    worker: int = 0,
    workers: int = 1,
    storage: str | None = None,
) -> dict[str, Any]:
    """Worker: run a user objective (a picklable, module-level function) on the study in
    ``directory`` to ``n_trials`` (``storage``: the study's database URL, when study.json
    cannot name it because it has a password)."""
    study = open_driver(directory, worker, workers, storage)
    ran = study.optimize(objective, n_trials=n_trials, timeout=timeout, catch=(Exception,))
    return {"pid": os.getpid(), "trials": ran}


def run_objective_study(
    directory: str | os.PathLike[str],
    objective: Callable[[optuna.trial.Trial], float],
    executor: Executor | str | None,
    *,
    workers: int,
    n_trials: int,
    timeout: float | None = None,
    storage: str | None = None,
) -> list[dict[str, Any]]:
    """Run ``workers`` drivers of the study in ``directory`` with a user objective
    (``storage``: a database URL with a password, see :func:`gradhpo.search.load_study`)."""
    return run_drivers(
        objective_worker,
        directory,
        objective,
        executor,
        workers=workers,
        n_trials=n_trials,
        timeout=timeout,
        storage=storage,
    )


def run_drivers(
    worker: Callable[..., dict[str, Any]],
    directory: str | os.PathLike[str],
    payload: Any,
    executor: Executor | str | None,
    *,
    workers: int,
    n_trials: int,
    timeout: float | None = None,
    storage: str | None = None,
) -> list[dict[str, Any]]:
    """Run ``workers`` drivers of the study in ``directory`` on ``executor``, driver k as the
    task ``worker(directory, payload, n_trials, timeout, k, workers, storage)`` (``payload``:
    what the worker trains, a user objective or a config); one result per driver, in order."""
    ex = make_executor(executor)
    args = [
        (str(directory), payload, n_trials, timeout, k, workers, storage) for k in range(workers)
    ]
    return ex.run(worker, args)
