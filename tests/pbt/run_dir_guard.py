"""Proof that PBT member tasks leave the run directory alone (``checkpoints="executor"``).

* :class:`GuardedFactory` wraps a member factory. In any process but the one that made it (an
  executor's worker: a spawned process, a Ray worker on any node) its first call installs an
  audit hook (:func:`sys.addaudithook`) that raises :class:`PermissionError` whenever that
  process opens, lists, creates, renames or deletes anything under the run directory, or
  connects to a database there. A member task calls the factory before it does anything else,
  so every file operation of the task is seen. In the driver it builds members unguarded.
* :class:`ArgumentAudit` wraps an executor and records every task argument (inside tuples,
  lists and dicts; the factory object is the test's own) that is a path under the run
  directory.

Under the files transport both fire (every task is given a path there and writes its
checkpoint there); under the executor transport neither may.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

from gradhpo.execution.executors import Executor

_GUARDED: set[str] = set()
# Audit events that name files: open() and os.open, os.* (listdir, scandir, mkdir, rename,
# remove, rmdir, chmod, utime, truncate, link, symlink...), shutil.*, sqlite3.connect, glob.
_FILE_EVENTS = ("os.", "shutil.", "sqlite3.", "glob.")


def _under(root: str, value: Any) -> str | None:
    if not isinstance(value, (str, bytes, os.PathLike)):
        return None
    try:
        path = os.path.abspath(os.fsdecode(value))
    except (TypeError, ValueError):
        return None
    return path if path == root or path.startswith(root + os.sep) else None


def guard(run_dir: str | os.PathLike[str]) -> None:
    """From now on, this process may not touch anything under ``run_dir`` (once per root)."""
    root = os.path.abspath(os.fspath(run_dir))
    if root in _GUARDED:
        return
    _GUARDED.add(root)

    def hook(event: str, args: tuple[Any, ...]) -> None:
        if event != "open" and not event.startswith(_FILE_EVENTS):
            return
        for arg in args:
            path = _under(root, arg)
            if path is not None:
                raise PermissionError(
                    f"a member task touched the run directory: {event} {path} (pid {os.getpid()})"
                )

    sys.addaudithook(hook)


class GuardedFactory:
    """``inner`` (a picklable member factory), guarded against ``run_dir`` outside the
    process that made it (see the module docstring)."""

    def __init__(self, inner: Callable[[int, Any], Any], run_dir: str | os.PathLike[str]) -> None:
        self.inner = inner
        self.run_dir = os.path.abspath(os.fspath(run_dir))
        self.driver = os.getpid()

    def __call__(self, index: int, values: Any) -> Any:
        if os.getpid() != self.driver:
            guard(self.run_dir)
        return self.inner(index, values)


def _paths_under(root: str, value: Any) -> list[str]:
    if isinstance(value, (tuple, list)):
        return [p for item in value for p in _paths_under(root, item)]
    if isinstance(value, dict):
        return [p for item in (*value.keys(), *value.values()) for p in _paths_under(root, item)]
    path = _under(root, value)
    return [] if path is None else [path]


class ArgumentAudit(Executor):
    """``inner`` with every task argument checked: ``paths`` lists those under ``run_dir``,
    ``tasks`` counts the tasks run, ``argument_bytes`` the bytes given to them."""

    def __init__(self, inner: Executor, run_dir: str | os.PathLike[str]) -> None:
        self.inner = inner
        self.name = inner.name
        self.root = os.path.abspath(os.fspath(run_dir))
        self.paths: list[str] = []
        self.tasks = 0
        self.argument_bytes = 0

    def run(self, fn: Callable[..., Any], args_list: Sequence[tuple[Any, ...]]) -> list[Any]:
        for args in args_list:
            self.paths += _paths_under(self.root, list(args[1:]))  # args[0]: the factory
            self.argument_bytes += sum(len(a) for a in args if isinstance(a, bytes))
        self.tasks += len(args_list)
        return self.inner.run(fn, args_list)

    def close(self) -> None:
        super().close()
        self.inner.close()
