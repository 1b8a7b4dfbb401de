"""Where work runs: in this process (``serial``), in local worker processes (``processes``) or
on a Ray cluster (``ray``).

An executor runs ``n`` workers, each a call ``fn(*args)`` that returns a small picklable
result, and restarts a worker that dies (killed process, lost Ray worker) up to
``max_failures`` times in all. Study drivers are such workers: each opens the shared study
(SQLite) and runs trials until the study holds the requested number (see
:func:`gradhpo.search.drivers.study_worker`); a restarted driver recovers the trial its dead
predecessor left RUNNING and continues it from its last checkpoint.

Besides ``run`` (a batch, results in order), ``submit(fn, args)`` starts one call and returns
its :class:`Task`, and ``wait_any(tasks)`` returns those of ``tasks`` that have finished once
one has (``serial``: runs the earliest submitted then): async PBT keeps one task per member in
flight this way.

Threads: two torch processes with default threads on 2 cores ran ~100x slower than one here,
so every worker sets ``torch.set_num_threads(threads_per_worker)`` (default: cores / workers,
at least 1) before it imports anything heavy.
"""

from __future__ import annotations

from gradhpo.execution.executors import (
    EXECUTORS,
    Executor,
    ProcessExecutor,
    RayExecutor,
    SerialExecutor,
    Task,
    WorkerFailed,
    make_executor,
)

__all__ = [
    "EXECUTORS",
    "Executor",
    "ProcessExecutor",
    "RayExecutor",
    "SerialExecutor",
    "Task",
    "WorkerFailed",
    "make_executor",
]
