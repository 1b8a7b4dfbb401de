"""Files that are never seen half-written: the one atomic write of the package.

Every file gradhpo writes for later reading (checkpoints, configs, JSON state, caches,
reports) goes through :func:`atomic_write`: the content goes to a temporary file in the same
folder, is flushed and ``fsync``-ed, then renamed over the target with :func:`os.replace`.
A reader sees the old file or the new one, never a prefix; a kill or an exception leaves at
most the old file, and the temporary file is removed on every error path.

The one exception is a small record rewritten at every trial (a sampler's RNG state), where
an open, a rename and a close per write cost more than a trivial trial: :class:`SlotFile`
keeps it in two checksummed slots of one file, written in place, alternately. A write that a
kill cuts short spoils only its own slot, and :func:`read_slot_file` returns the newest
complete one.
"""

from __future__ import annotations

import json
import os
import struct
import tempfile
import threading
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import torch

__all__ = [
    "SlotFile",
    "atomic_write",
    "read_slot_file",
    "write_text",
    "write_json",
    "write_torch",
]


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


# ---------------------------------------------------------------------- two-slot records
_SLOT_MAGIC = b"GHPSLOT1"
# magic, sequence number, slot capacity, payload length, CRC-32 of (sequence, capacity,
# length, payload); the payload follows. Slot i starts at i * capacity; the file is exactly
# two slots long.
_SLOT_HEADER = struct.Struct("<8sQIII4x")


def _slot_crc(seq: int, capacity: int, payload: bytes) -> int:
    return zlib.crc32(payload, zlib.crc32(struct.pack("<QII", seq, capacity, len(payload))))


def _slot_record(seq: int, capacity: int, payload: bytes) -> bytes:
    header = _SLOT_HEADER.pack(
        _SLOT_MAGIC, seq, capacity, len(payload), _slot_crc(seq, capacity, payload)
    )
    return header + payload


def _parse_slots(data: bytes) -> tuple[int, int, bytes | None]:
    """(capacity, newest complete sequence number or 0, its payload or None) of a two-slot
    file's bytes; ValueError when they are not one (what is wrong, in words)."""
    if not data:
        raise ValueError("empty file")
    if data[:8] not in (_SLOT_MAGIC, bytes(8)) or len(data) < _SLOT_HEADER.size:
        raise ValueError("not a gradhpo two-slot record file")
    capacity = _SLOT_HEADER.unpack_from(data, 0)[2]  # slot 0 always states it
    if capacity < _SLOT_HEADER.size or len(data) != 2 * capacity:
        raise ValueError(
            f"cut off or damaged ({len(data)} bytes, two slots of {capacity} expected)"
        )
    best: tuple[int, bytes | None] = (0, None)
    for start in (0, capacity):
        magic, seq, cap, length, crc = _SLOT_HEADER.unpack_from(data, start)
        end = start + _SLOT_HEADER.size + length
        if magic != _SLOT_MAGIC or cap != capacity or end > start + capacity:
            continue
        payload = data[start + _SLOT_HEADER.size : end]
        if _slot_crc(seq, cap, payload) == crc and seq > best[0]:
            best = (seq, payload)
    return capacity, best[0], best[1]


def read_slot_file(path: str | os.PathLike[str]) -> bytes:
    """The newest complete record of a :class:`SlotFile`; ValueError (saying what is wrong)
    when the file is not one, is cut off, or holds no complete record."""
    _, _, payload = _parse_slots(Path(path).read_bytes())
    if payload is None:
        raise ValueError("no complete record in either slot")
    return payload


def _write_at(fd: int, data: memoryview, offset: int) -> int:
    """Write at ``offset`` without moving a file position that a forked child shares
    (``pwrite``); where there is none (Windows), seek then write."""
    if hasattr(os, "pwrite"):
        return os.pwrite(fd, data, offset)
    os.lseek(fd, offset, os.SEEK_SET)  # pragma: no cover - POSIX has pwrite
    return os.write(fd, data)  # pragma: no cover


class SlotFile:
    """A small record rewritten often, kept in two slots of one file: each :meth:`write`
    puts the record, with a sequence number and a CRC-32, into the slot the previous write
    did not use, in place (one ``pwrite`` on a descriptor kept open), without fsync. A kill in
    the middle of a write leaves the other slot's record complete, which
    :func:`read_slot_file` then returns: the record before, as a rename would have left it.

    The file is created, and grown when a record outgrows its slots, by an atomic rename
    (the new record in one slot); a file replaced or removed by someone else is reopened.
    Writers of one object are serialized by a lock; writers in several processes each keep
    their own sequence, so which of two concurrent writers' records is read back is not
    defined (each is complete). Call :meth:`close` to release the descriptor (also done at
    garbage collection)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._fd: int | None = None
        self._inode: tuple[int, int] | None = None
        self._capacity = 0
        self._seq = 0
        self._lock = threading.Lock()

    def write(self, payload: bytes) -> None:
        with self._lock:
            if self._fd is not None and not self._still_ours():
                self._close()
            if self._fd is None:
                self._open()
            if self._fd is None or _SLOT_HEADER.size + len(payload) > self._capacity:
                self._create(payload)
                return
            self._seq += 1
            record = memoryview(_slot_record(self._seq, self._capacity, payload))
            offset = (self._seq % 2) * self._capacity
            while record:
                written = _write_at(self._fd, record, offset)
                record, offset = record[written:], offset + written

    def close(self) -> None:
        with self._lock:
            self._close()

    def __del__(self) -> None:
        if getattr(self, "_fd", None) is not None:
            self._close()

    def _still_ours(self) -> bool:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return False
        return (st.st_dev, st.st_ino) == self._inode

    def _open(self) -> None:
        """Open the existing file and continue its sequence; leave ``_fd`` None when there
        is no usable file (it is then created afresh)."""
        try:
            fd = os.open(self.path, os.O_RDWR)
        except FileNotFoundError:
            return
        try:
            with open(fd, "rb", closefd=False) as fh:
                capacity, seq, _ = _parse_slots(fh.read())
        except ValueError:
            os.close(fd)
            return
        st = os.fstat(fd)
        self._fd, self._inode = fd, (st.st_dev, st.st_ino)
        self._capacity, self._seq = capacity, seq

    def _create(self, payload: bytes) -> None:
        self._close()
        need = _SLOT_HEADER.size + len(payload)
        capacity = 4096
        while capacity < 2 * need:  # room for the record to grow before the next rewrite
            capacity *= 2
        self._seq += 1
        data = bytearray(2 * capacity)
        record = _slot_record(self._seq, capacity, payload)
        start = (self._seq % 2) * capacity
        data[start : start + len(record)] = record
        if self._seq % 2:  # slot 0 holds no record but says how large the slots are
            data[: _SLOT_HEADER.size] = _SLOT_HEADER.pack(bytes(8), 0, capacity, 0, 0)
        with atomic_write(self.path, "wb", fsync=False) as fh:
            fh.write(data)
        self._open()

    def _close(self) -> None:
        fd, self._fd, self._inode = self._fd, None, None
        if fd is not None:
            os.close(fd)
