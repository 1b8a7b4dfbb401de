"""Files that are never seen half-written: the one atomic write of the package.

Every file gradhpo writes for later reading (checkpoints, configs, JSON state, caches,
reports) goes through :func:`atomic_write`: the content goes to a temporary file in the same
folder, is flushed and ``fsync``-ed, then renamed over the target with :func:`os.replace`.
A reader sees the old file or the new one, never a prefix; a kill or an exception leaves at
most the old file, and the temporary file is removed on every error path.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import torch

__all__ = ["atomic_write", "write_text", "write_json", "write_torch"]


@contextmanager
def atomic_write(
    path: str | os.PathLike[str],
    mode: str = "wb",
    *,
    encoding: str | None = None,
    fsync: bool = True,
) -> Iterator[IO[Any]]:
    """Open a temporary file beside ``path`` for writing; on a clean exit it is flushed,
    fsync-ed and renamed to ``path``. The parent folder is created if needed.

    ``mode`` is ``"wb"`` (default) or ``"w"`` (text, ``encoding`` defaults to UTF-8).
    ``fsync=False`` keeps the write atomic against a killed process (the rename) but not
    durable across a power loss; for small state written at every trial."""
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_write: mode must be 'w' or 'wb', got {mode!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        if mode == "w":
            fh: IO[Any] = os.fdopen(fd, "w", encoding=encoding or "utf-8", newline="")
        else:
            fh = os.fdopen(fd, "wb")
        with fh:
            yield fh
            fh.flush()
            if fsync:
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    with atomic_write(path, "w") as fh:
        fh.write(text)
    return Path(path)


def write_json(path: str | os.PathLike[str], payload: Any, *, indent: int | None = 2) -> Path:
    """Write ``payload`` as JSON to ``path`` atomically."""
    return write_text(path, json.dumps(payload, indent=indent) + "\n")


def write_torch(path: str | os.PathLike[str], obj: Any) -> Path:
    """``torch.save(obj)`` to ``path`` atomically (read back with ``weights_only=True``)."""
    with atomic_write(path, "wb") as fh:
        torch.save(obj, fh)
    return Path(path)
