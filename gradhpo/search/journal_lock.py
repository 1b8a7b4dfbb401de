"""The lock of a study journal: a lock file that a dead owner does not leave in the way.

Optuna's ``JournalFileOpenLock`` creates an empty ``<journal>.lock`` with ``O_EXCL`` for each
append and deletes it after. A process killed while it holds the lock (SIGKILL, a lost
machine) leaves the file behind, and since an empty file says nothing of its owner, the next
process waits for Optuna's grace period (30 s without the file changing) before it breaks it:
every ``gradhpo resume`` after such a kill began with a 30 s wait.

:class:`OwnedFileLock` uses the same file name, so it still excludes Optuna's own locks (open
and symlink) on the same journal, but the file says who holds it: host name, boot id, pid
namespace, pid and the process's start time (which tells a reused pid), and a nonce per
acquisition. The file is created whole: the record is written to a temporary file beside it
which is then hard-linked to the lock's name (atomic, ``EEXIST`` while the lock is held; the
NFS-safe recipe, a lost answer checked by the link count). Where hard links are not
available (some Windows or FUSE file systems) the lock file is created with ``O_EXCL`` and
the record written after; a holder killed in between leaves an empty file (grace rule).
On POSIX a lock object keeps its temporary record between acquisitions and rewrites the nonce
in it in place (``pwrite``, the record keeps its length), so an acquisition costs one write
and one link and a release one ``lstat`` (the lock file must still be that record's inode,
which the record's open descriptor keeps from being reused) and one unlink: less than
Optuna's own symlink lock. The record goes when the object does (or :meth:`close`); one left
by a killed process goes when its lock is broken, or with the stray records below.

A waiter that finds the lock held

* breaks it at once when its owner is provably dead: same host, boot id and pid namespace
  (this kernel, the same view of pids) and that process is gone, a zombie or a newer process
  with the same pid; or it is this very process and none of its acquisitions holds that
  nonce (one interrupted between its link and its bookkeeping);
* never breaks it while that owner is alive on this machine (it waits, warning every 10 s);
* otherwise (another host or boot, another pid namespace, a system without ``/proc``, an
  empty file of Optuna's own lock, garbage) keeps Optuna's rule: it breaks a lock file that
  has not changed for ``grace_period`` seconds, as nothing better can be known.

Breaking is serialised between waiters by an ``flock`` on the journal itself (a breaker
re-reads the lock under it and deletes only the very file it judged), so two waiters that
judged the same dead lock cannot delete a live one the first of them has just taken; where
``flock`` is not available the break goes ahead as Optuna's does. Temporary files left by
acquirers killed before they removed them are deleted when a lock object is made for the
journal (the same dead-owner test).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import socket
import threading
import time
import uuid
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, NamedTuple

try:  # the lock interface JournalFileBackend calls (Optuna 4.0+; not exported)
    from optuna.storages.journal._file import BaseJournalFileLock
except ImportError:  # pragma: no cover - a future Optuna that moved it: any object will do
    BaseJournalFileLock = object  # type: ignore[misc,assignment]

__all__ = ["OwnedFileLock"]

logger = logging.getLogger(__name__)

#: The lock file's name is the journal's plus this (Optuna's locks use the same name).
LOCK_SUFFIX = ".lock"
#: How long a waiter sleeps at most between two tries (seconds).
MAX_SLEEP = 0.05
#: A waiter warns this often (seconds) while a live or unknown owner holds the lock.
WARNING_INTERVAL = 10.0
#: The most of a lock file that is read (a record is about 200 bytes).
_READ_LIMIT = 4096
#: The identity fields that must equal this process's for an owner to be checked here.
_PLACE = ("host", "boot", "pidns")

#: Nonces of the acquisitions this process holds (or is making) right now.
_HELD: set[str] = set()
_HELD_LOCK = threading.Lock()
#: This process's identity, by pid (a forked child computes its own).
_ME: dict[int, dict[str, Any]] = {}
#: Paths of the temporary records this process's lock objects keep between acquisitions.
_KEPT: set[str] = set()
#: Whether a lock object keeps its temporary record between acquisitions (POSIX: it rewrites
#: the record in place with ``pwrite``); elsewhere each acquisition makes a new one.
_KEEP_RECORD = hasattr(os, "pwrite") and os.name != "nt"


def _after_fork_in_child() -> None:
    global _HELD_LOCK
    _HELD_LOCK = threading.Lock()  # another thread may have held it at the fork
    _HELD.clear()  # the parent's acquisitions are not the child's
    _ME.clear()
    _KEPT.clear()  # the parent's records: a live process's, left alone by the dead-owner test


if hasattr(os, "register_at_fork"):  # not on Windows
    os.register_at_fork(after_in_child=_after_fork_in_child)


def _read_text(path: str) -> str | None:
    try:
        with open(path, encoding="ascii") as f:
            return f.read().strip()
    except (OSError, UnicodeDecodeError):
        return None


def _start_time(pid: int) -> str | None:
    """The start time of process ``pid`` (clock ticks after boot, from ``/proc``); None if
    there is no such process, it is a zombie (it holds nothing any more), or no ``/proc``."""
    text = _read_text(f"/proc/{pid}/stat")
    if text is None:
        return None
    fields = text.rpartition(")")[2].split()  # the name in parentheses may hold anything
    if len(fields) < 20 or fields[0] in ("Z", "X", "x"):
        return None
    return fields[19]  # field 22 of proc(5); fields[0] is field 3, the state


def _me() -> dict[str, Any]:
    """Who this process is, as a lock file records it (the boot id, pid namespace and start
    time are None where the system does not tell them: such an owner is never judged dead)."""
    pid = os.getpid()
    me = _ME.get(pid)
    if me is None:
        try:
            pidns: str | None = os.readlink("/proc/self/ns/pid")
        except (OSError, AttributeError):
            pidns = None
        me = {
            "host": socket.gethostname(),
            "boot": _read_text("/proc/sys/kernel/random/boot_id"),
            "pidns": pidns,
            "pid": pid,
            "start": _start_time(pid),
        }
        _ME.clear()
        _ME[pid] = me
    return me


def _parse(data: bytes) -> dict[str, Any] | None:
    """The owner recorded in a lock file, None if it is not a record of this module."""
    try:
        owner = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        return None
    return owner if isinstance(owner, dict) and isinstance(owner.get("nonce"), str) else None


def _judge(owner: dict[str, Any] | None) -> str:
    """``"dead"``, ``"alive"`` or ``"unknown"`` (an owner this process cannot check)."""
    me = _me()
    if (
        owner is None
        or any(me[k] is None or owner.get(k) != me[k] for k in _PLACE)
        or me["start"] is None
    ):
        return "unknown"
    pid, start = owner.get("pid"), owner.get("start")
    if isinstance(pid, bool) or not isinstance(pid, int) or not isinstance(start, str):
        return "unknown"
    if pid == me["pid"] and start == me["start"]:
        with _HELD_LOCK:
            return "alive" if owner["nonce"] in _HELD else "dead"
    return "alive" if _start_time(pid) == start else "dead"


def _describe(owner: dict[str, Any] | None) -> str:
    if owner is None:
        return "an owner it does not name (an Optuna lock file, or garbage)"
    same = all(owner.get(k) == _me()[k] for k in _PLACE)
    where = "this machine" if same else f"host {owner.get('host')!r}"
    return f"pid {owner.get('pid')!r} on {where}"


def _unlink(path: str) -> None:
    """Delete ``path`` if it is there; on Windows a file another process has open cannot be
    deleted, so that is tried again for a while (a waiter reads the lock file briefly)."""
    deadline = time.monotonic() + 2.0
    while True:
        try:
            os.unlink(path)
            return
        except FileNotFoundError:
            return
        except PermissionError:
            if os.name != "nt" or time.monotonic() > deadline:
                raise
            time.sleep(0.001)


@contextmanager
def _guard(journal: str) -> Iterator[None]:
    """An exclusive ``flock`` on the journal while a lock file is judged again and deleted
    (released by the kernel if the breaker dies); no guard where there is no ``flock``."""
    try:
        import fcntl
    except ImportError:  # Windows
        yield
        return
    try:
        fd = os.open(journal, os.O_RDONLY)
    except OSError:
        yield
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError:  # e.g. ENOLCK on a file system without locks: break as Optuna does
            pass
        yield
    finally:
        os.close(fd)  # releases the flock


class _Kept:
    """The temporary record a lock object keeps between acquisitions (link mode, POSIX): its
    file stays open (which also keeps its inode from being reused), each acquisition writes
    its own nonce into it in place (the record keeps its length) and links it to the lock's
    name, and a release checks by inode that the lock file is still this one. An acquisition
    is then one ``pwrite`` and one ``link``, a release one ``lstat`` and one ``unlink``."""

    def __init__(self, directory: str, prefix: str) -> None:
        self.pid = os.getpid()
        self.base = uuid.uuid4().hex
        self.count = 0
        head, tail = json.dumps({**_me(), "nonce": self.base}, sort_keys=True).split(self.base)
        self.head, self.tail = head.encode(), tail.encode()
        self.path = os.path.join(directory, f"{prefix}{self.base}.tmp")
        self.fds: list[int] = []  # the open descriptor (a list: the finalizer sees a new one)
        self.identity: tuple[int, int] = (-1, -1)
        self._open()
        _KEPT.add(self.path)
        self._finalizer = weakref.finalize(self, _drop_kept, self.path, self.fds, self.pid)

    def _open(self) -> None:
        fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o644)
        for old in self.fds:
            os.close(old)
        self.fds[:] = [fd]
        st = os.fstat(fd)
        self.identity = (st.st_dev, st.st_ino)

    def next_record(self) -> tuple[str, bytes]:
        """A fresh nonce for the next acquisition and the record holding it (not written yet:
        the nonce must count as held before it is, see :meth:`write`)."""
        self.count += 1
        nonce = f"{self.base}.{self.count:016x}"
        return nonce, self.head + nonce.encode() + self.tail

    def write(self, record: bytes) -> None:
        """Put ``record`` in the file. A waiter that opened the lock file during an earlier
        acquisition can read this through its descriptor: the record's nonce must already be
        in ``_HELD`` then, or this process would look dead to a waiter of its own."""
        os.pwrite(self.fds[0], record, 0)

    def read(self, size: int) -> bytes:
        return os.pread(self.fds[0], size, 0)

    def restore(self, record: bytes) -> None:
        """Make the file again, holding ``record`` (it was removed, by hand)."""
        self._open()
        os.pwrite(self.fds[0], record, 0)

    def close(self) -> None:
        self._finalizer()


def _drop_kept(path: str, fds: list[int], pid: int) -> None:
    """Remove a kept record (when its lock object is collected, or at exit); a forked child
    that inherited the object leaves its parent's record alone."""
    if os.getpid() != pid:
        return
    _KEPT.discard(path)
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass
    fds.clear()
    try:
        _unlink(path)
    except OSError:
        pass


class _Seen(NamedTuple):
    """A lock file as a waiter found it: its owner (None if not a record of this module) and
    what tells whether it is still the same file, unchanged (identity, time, size, bytes)."""

    owner: dict[str, Any] | None
    key: tuple[Any, ...]


class OwnedFileLock(BaseJournalFileLock):
    """The lock of the journal ``filepath`` (see the module docstring). ``grace_period``:
    seconds an unchanged lock file whose owner cannot be checked (another host, an Optuna
    lock) is waited for before it is broken; None: never."""

    def __init__(self, filepath: str | os.PathLike[str], grace_period: float | None = 30) -> None:
        if grace_period is not None and (
            isinstance(grace_period, bool)
            or not isinstance(grace_period, (int, float))
            or not grace_period > 0
        ):
            raise ValueError(f"grace_period must be a number > 0 or None, got {grace_period!r}")
        self._journal = os.fspath(filepath)
        self._lock_file = self._journal + LOCK_SUFFIX
        self._directory = os.path.dirname(os.path.abspath(self._lock_file))
        self._tmp_prefix = "." + os.path.basename(self._lock_file) + "."
        self.grace_period = grace_period
        self._use_link = True
        # Threads sharing this object take turns on the mutex (another may release it).
        self._mutex = threading.Lock()
        self._holder: int | None = None  # the thread that acquired it
        # (nonce, record, kept record or None) while held
        self._held: tuple[str, bytes, _Kept | None] | None = None
        self._kept: _Kept | None = None  # this process's kept temporary record (link mode)
        self._remove_stray_temporary_files()

    def __getstate__(self) -> dict[str, Any]:  # a pickled storage carries its lock
        state = self.__dict__.copy()
        state.update(_mutex=None, _holder=None, _held=None, _kept=None)  # a copy holds nothing
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._mutex = threading.Lock()

    def close(self) -> None:
        """Remove the temporary record this object keeps between acquisitions (done anyway
        when it is collected or the process exits); the next acquisition makes a new one."""
        with self._mutex:
            if self._kept is not None and self._held is None:
                self._kept.close()
                self._kept = None

    # ------------------------------------------------------------------ acquire / release
    def acquire(self, timeout: float | None = None) -> bool:
        """Take the lock, waiting as long as it takes (``timeout``: at most that many
        seconds; False if it was not taken by then)."""
        if self._holder == threading.get_ident():
            raise RuntimeError(f"{self._lock_file}: this thread holds this lock already")
        deadline = None if timeout is None else time.monotonic() + timeout
        if not self._mutex.acquire(timeout=-1 if timeout is None else max(timeout, 0)):
            return False
        try:
            taken = self._acquire_file(deadline)
        except BaseException:
            self._mutex.release()
            raise
        if not taken:
            self._mutex.release()
            return False
        self._holder = threading.get_ident()
        return True

    def release(self) -> None:
        """Give the lock up: delete the lock file, which must still be this acquisition's
        (RuntimeError if it was broken and is gone or another's, which is left alone)."""
        if self._held is None:
            raise RuntimeError(f"{self._lock_file}: this lock object does not hold the lock")
        nonce, record, kept = self._held
        self._held = self._holder = None
        try:
            if not (self._delete_kept_link(kept, record) if kept else self._delete_if(record)):
                raise RuntimeError(
                    f"{self._lock_file}: the lock was broken while this process held it"
                )
        finally:
            with _HELD_LOCK:
                _HELD.discard(nonce)
            self._mutex.release()

    # ------------------------------------------------------------------ helpers
    def _kept_record(self) -> _Kept:
        """This object's kept temporary record (made anew in a forked child)."""
        kept = self._kept
        if kept is None or kept.pid != os.getpid():
            kept = self._kept = _Kept(self._directory, self._tmp_prefix)
        return kept

    def _acquire_file(self, deadline: float | None) -> bool:
        """Create the lock file (the mutex held), breaking a dead or stale one in the way."""
        kept = self._kept_record() if self._use_link and _KEEP_RECORD else None
        if kept is not None:
            nonce, record = kept.next_record()
            tmp = kept.path
        else:
            nonce = uuid.uuid4().hex
            record = json.dumps({**_me(), "nonce": nonce}, sort_keys=True).encode()
            tmp = os.path.join(self._directory, f"{self._tmp_prefix}{nonce}.tmp")
        with _HELD_LOCK:
            _HELD.add(nonce)  # before the lock file exists: a waiter of this process sees it
        acquired = False
        try:
            if kept is not None:
                kept.write(record)
            elif self._use_link:
                fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
                try:
                    os.write(fd, record)
                finally:
                    os.close(fd)
            started = last_warning = seen_since = time.monotonic()
            seen: tuple[Any, ...] | None = None
            sleep = 0.001
            while True:
                if self._take(tmp, record, kept):
                    acquired = True
                    self._held = (nonce, record, kept if self._use_link else None)
                    return True
                held = self._read()
                if held is None:  # released meanwhile: try again at once
                    continue
                now = time.monotonic()
                if held.key != seen:
                    seen, seen_since = held.key, now
                verdict = _judge(held.owner)
                if verdict == "dead":
                    self._break(held, "its owner is dead")
                    self._remove_record_of(held.owner)
                    sleep = 0.001
                    continue
                if (
                    verdict == "unknown"
                    and self.grace_period is not None
                    and now - seen_since > self.grace_period
                ):
                    self._break(held, f"unchanged for {self.grace_period} s")
                    sleep = 0.001
                    continue
                if deadline is not None and now >= deadline:
                    return False
                if now - last_warning > WARNING_INTERVAL:
                    logger.warning(
                        "waiting %.0f s for the journal lock %s, held by %s",
                        now - started,
                        self._lock_file,
                        _describe(held.owner),
                    )
                    last_warning = now
                time.sleep(sleep)
                sleep = min(sleep * 2, MAX_SLEEP)
        finally:
            if not acquired:
                # Interrupted (an exception, Ctrl-C) maybe right after the lock file was made.
                self._delete_if(record)
                with _HELD_LOCK:
                    _HELD.discard(nonce)
            if kept is None:
                _unlink(tmp)  # (nothing there without hard links)
            elif not self._use_link:  # no hard links after all: the kept record is of no use
                kept.close()
                self._kept = None

    def _take(self, tmp: str, record: bytes, kept: _Kept | None = None) -> bool:
        """One try to create the lock file holding ``record``; False if it exists."""
        if self._use_link:  # ``tmp`` holds ``record``
            try:
                try:
                    os.link(tmp, self._lock_file)
                except FileNotFoundError:
                    if kept is None:
                        raise
                    kept.restore(record)  # the kept record was removed (by hand)
                    os.link(tmp, self._lock_file)
                return True
            except FileExistsError:
                # On NFS the answer to a link that was made can be lost and the retry say
                # EEXIST: the link count tells.
                return os.stat(tmp).st_nlink == 2
            except OSError as exc:
                if exc.errno in (errno.EIO, errno.ETIMEDOUT):
                    return os.stat(tmp).st_nlink == 2
                # No hard links on this file system: O_EXCL (a real error shows up there).
                logger.debug("%s: no hard links (%s); using O_EXCL", self._lock_file, exc)
                self._use_link = False
                _unlink(tmp)
        try:
            fd = os.open(self._lock_file, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        try:
            os.write(fd, record)
        finally:
            os.close(fd)
        return True

    def _read(self) -> _Seen | None:
        """The lock file as it is now, None if there is none. A symbolic link is not
        followed (Optuna's symlink lock points at the journal itself)."""
        try:
            fd = os.open(self._lock_file, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        except FileNotFoundError:
            return None
        except OSError as exc:  # ELOOP: a symbolic link, an Optuna symlink lock; EACCES...
            try:
                st = os.lstat(self._lock_file)
            except FileNotFoundError:
                return None
            return _Seen(None, (st.st_ino, st.st_mtime_ns, st.st_size, exc.errno))
        try:
            st = os.fstat(fd)
            try:
                data = os.read(fd, _READ_LIMIT)
            except OSError:  # EISDIR, ...: not a lock file of this module
                data = b""
        finally:
            os.close(fd)
        return _Seen(_parse(data), (st.st_ino, st.st_mtime_ns, st.st_size, data))

    def _delete_kept_link(self, kept: _Kept, record: bytes) -> bool:
        """Delete the lock file if it is ``kept``'s record, still holding ``record`` (same
        inode: the kept file's open descriptor keeps that inode from being reused); whether
        it did."""
        try:
            st = os.lstat(self._lock_file)
        except FileNotFoundError:
            return False
        if (st.st_dev, st.st_ino) != kept.identity or kept.read(len(record)) != record:
            return False
        _unlink(self._lock_file)
        return True

    def _delete_if(self, record: bytes) -> bool:
        """Delete the lock file if it holds ``record``; whether it did."""
        held = self._read()
        if held is None or held.key[-1] != record:
            return False
        _unlink(self._lock_file)
        return True

    def _break(self, held: _Seen, why: str) -> None:
        """Delete the lock file ``held`` if it is still that file (judged dead or stale)."""
        with _guard(self._journal):
            again = self._read()
            if again is None or again.key != held.key or _judge(again.owner) == "alive":
                return  # released or taken anew meanwhile: judge again
            logger.warning(
                "breaking the journal lock %s held by %s: %s",
                self._lock_file,
                _describe(held.owner),
                why,
            )
            _unlink(self._lock_file)

    def _remove_record_of(self, owner: dict[str, Any] | None) -> None:
        """Delete the temporary record a dead owner kept (its nonce names it)."""
        base = str((owner or {}).get("nonce", "")).partition(".")[0]
        if base.isalnum():
            path = os.path.join(self._directory, f"{self._tmp_prefix}{base}.tmp")
            if path not in _KEPT:
                try:
                    _unlink(path)
                except OSError:
                    pass

    def _remove_stray_temporary_files(self) -> None:
        """Temporary records of acquirers killed before they removed them."""
        try:
            names = os.listdir(self._directory)
        except OSError:
            return
        for name in names:
            if not (name.startswith(self._tmp_prefix) and name.endswith(".tmp")):
                continue
            path = os.path.join(self._directory, name)
            if path in _KEPT:  # kept by a lock object of this process
                continue
            try:
                with open(path, "rb") as f:
                    data = f.read(_READ_LIMIT)
            except OSError:
                continue
            if _judge(_parse(data)) == "dead":
                try:
                    _unlink(path)
                except OSError:
                    pass
