"""Tiny module-level executor tasks for the executor conformance suite
(``tests/conformance/test_executor_conformance.py``).

Spawned worker processes and Ray workers import a task by its module and name and cannot
import ``tests/``, so these live in the package. A task given a ``log`` file appends one line
to it each time it runs, so a test can count the runs (retries)."""

from __future__ import annotations

import os
import time
from typing import Any

import torch


def _log(path: str | None) -> int:
    """Append a line to ``path``; the number of lines before it (earlier runs)."""
    if path is None:
        return 0
    with open(path, "a+", encoding="utf-8") as f:
        f.seek(0)
        before = len(f.readlines())
        f.write(f"{os.getpid()}\n")
    return before


def echo(
    value: Any, delay: float = 0.0, error: str | None = None, log: str | None = None
) -> tuple[Any, int]:
    """``(value, pid)`` after ``delay`` seconds; with ``error``: raises ``ValueError(error)``."""
    _log(log)
    time.sleep(delay)
    if error is not None:
        raise ValueError(error)
    return value, os.getpid()


def die(value: Any, log: str, times: int = 1) -> Any:
    """Ends its own process (``os._exit(3)``: no cleanup, no exception) the first ``times``
    times it runs; afterwards returns ``value``."""
    if _log(log) < times:
        os._exit(3)
    return value


def torch_threads() -> int:
    """The torch thread count the task sees."""
    return torch.get_num_threads()
