"""Kill a gradhpo command at a named point: deterministic kills for the resume tests.

Run as a script, it runs the command line ``gradhpo ARGS`` in this process and sends itself
SIGKILL the N-th time the process reaches POINT (``N`` defaults to 1)::

    python tests/kill_points.py POINT[@N] -- tune config.yaml --out runs

A timed kill (poll for a file, then ``SIGKILL``) lands wherever the process happens to be;
these land exactly where the test says, so a test that passes, passes every time. The points
wrap the primitives every write of gradhpo goes through, nothing in gradhpo knows of them:

* ``replace:GLOB`` - ``os.replace`` onto a path matching GLOB is about to happen: the temp
  file of an atomic write is complete (fsync-ed) but not yet renamed ("during the write");
* ``replaced:GLOB`` - right after that rename (the file is in place, nothing after it ran);
* ``rename:GLOB`` - ``os.rename`` of a matching path is about to happen (a run directory
  built in its hidden sibling, about to be renamed into place);
* ``write:GLOB`` - an ``os.pwrite`` (or ``os.write``) to a descriptor of a matching file is
  about to happen (a record written in place: the sampler state's next slot);
* ``torn:GLOB`` - that write has written the first half of its bytes (what a kill in the
  middle of a write leaves);
* ``unlink:GLOB`` - right after a matching file was deleted (between the deletions that
  follow a PBT commit);
* ``sql:TEXT`` - an SQLite statement whose text (with its parameters) contains TEXT is about
  to run (the middle of a PBT step's transaction: ``sql:INSERT INTO lineage``);
* ``commit`` / ``committed`` - an SQLite ``COMMIT`` is about to run / has returned (the PBT
  step's transaction: before, its changes are lost; after, its released files are not yet
  deleted).

Globs match the whole path (``fnmatch``), so start them with ``*/``. The SQLite points see
connections opened with :func:`sqlite3.connect` (the PBT database; Optuna's journal storage
does not use SQLite).
"""

from __future__ import annotations

import fnmatch
import os
import signal
import sqlite3
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

KINDS = ("replace", "replaced", "rename", "write", "torn", "unlink", "sql", "commit", "committed")
_COUNT = [0]


def parse(point: str) -> tuple[str, str, int]:
    """``'replace:*/x.pt@3'`` -> ``('replace', '*/x.pt', 3)``."""
    spec, _, n = point.rpartition("@") if "@" in point else (point, "", "1")
    kind, _, arg = spec.partition(":")
    if kind not in KINDS or (kind not in ("commit", "committed") and not arg) or not n.isdigit():
        raise SystemExit(f"kill_points: bad point {point!r}; kinds: {', '.join(KINDS)}")
    return kind, arg, int(n)


def install(point: str) -> None:
    """Arm POINT in this process (see the module docstring)."""
    kind, arg, n = parse(point)

    def reached() -> None:
        _COUNT[0] += 1
        if _COUNT[0] == n:
            sys.stdout.flush()
            sys.stderr.flush()
            os.kill(os.getpid(), signal.SIGKILL)

    def matches(path: Any) -> bool:
        return fnmatch.fnmatchcase(os.fspath(path), arg)

    if kind in ("replace", "replaced"):
        replace = os.replace

        def patched_replace(src: Any, dst: Any, *args: Any, **kwargs: Any) -> None:
            hit = matches(dst)
            if hit and kind == "replace":
                reached()
            replace(src, dst, *args, **kwargs)
            if hit and kind == "replaced":
                reached()

        os.replace = patched_replace
    elif kind == "rename":
        rename = os.rename

        def patched_rename(src: Any, dst: Any, *args: Any, **kwargs: Any) -> None:
            if matches(src):
                reached()
            rename(src, dst, *args, **kwargs)

        os.rename = patched_rename
    elif kind in ("write", "torn"):
        write, pwrite = os.write, os.pwrite

        def arrive(fd: int, data: Any, cut: Callable[[bytes], Any]) -> None:
            try:
                target = os.readlink(f"/proc/self/fd/{fd}")
            except OSError:
                target = ""
            if matches(target):
                if kind == "torn" and _COUNT[0] + 1 == n:  # this is the write to cut short
                    cut(bytes(data)[: len(data) // 2])
                reached()

        def patched_write(fd: int, data: Any) -> int:
            arrive(fd, data, lambda half: write(fd, half))
            return write(fd, data)

        def patched_pwrite(fd: int, data: Any, offset: int) -> int:
            arrive(fd, data, lambda half: pwrite(fd, half, offset))
            return pwrite(fd, data, offset)

        os.write, os.pwrite = patched_write, patched_pwrite
    elif kind == "unlink":
        unlink = Path.unlink

        def patched_unlink(self: Path, missing_ok: bool = False) -> None:
            unlink(self, missing_ok=missing_ok)
            if matches(self):
                reached()

        Path.unlink = patched_unlink  # type: ignore[method-assign]
    else:

        class Connection(sqlite3.Connection):
            def execute(self, sql: str, parameters: Any = (), /) -> sqlite3.Cursor:
                commit = sql.strip().upper() == "COMMIT"
                if (kind == "sql" and arg in f"{sql} {parameters!r}") or (
                    kind == "commit" and commit
                ):
                    reached()
                cursor = super().execute(sql, parameters)
                if kind == "committed" and commit:
                    reached()
                return cursor

        connect = sqlite3.connect

        def patched_connect(*args: Any, **kwargs: Any) -> sqlite3.Connection:
            kwargs.setdefault("factory", Connection)
            return connect(*args, **kwargs)

        sqlite3.connect = patched_connect  # type: ignore[assignment]


def command(point: str, *args: str) -> list[str]:
    """The command line that runs ``gradhpo ARGS`` killed at POINT."""
    return [sys.executable, str(Path(__file__).resolve()), point, "--", *args]


def run_killed(point: str, *args: str, cwd: Any) -> None:
    """Run ``gradhpo ARGS`` in ``cwd`` killed at POINT (one thread per library); fail the
    calling test unless it died there by SIGKILL."""
    import subprocess

    proc = subprocess.run(
        command(point, *args),
        cwd=cwd,
        env={**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        timeout=300,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()


if __name__ == "__main__":
    if len(sys.argv) < 3 or sys.argv[2] != "--":
        raise SystemExit("usage: python kill_points.py POINT[@N] -- GRADHPO_ARGS...")
    install(sys.argv[1])
    from gradhpo.cli import main

    sys.exit(main(sys.argv[3:]))
