"""A persistent Optuna study that lives in one study directory.

Layout of a study directory::

    study.journal         Optuna journal storage (the default of a new study; one JSON line per
                          change; optuna-dashboard study.journal)
    .study.journal.lock.<id>.tmp
                          the journal lock's record, one per process that has the study open
                          (removed when it closes; see gradhpo.search.journal_lock)
    study.db              SQLite storage of studies created before the journal default, or
                          with storage="sqlite" (optuna-dashboard sqlite:///study.db)
    study.json            name, directions, sampler/pruner specs, storage (password masked)
    config.yaml           the resolved config (config-driven studies)
    sampler_state.bin     RNG state of the sampler after the last fresh ask: its JSON in two
                          checksummed slots written in turn (gradhpo.files.SlotFile); studies
                          from before it have sampler_state.json, read until the first write
    trials/<n>/           per-trial files: last/best checkpoints, history.json

The trials can also live outside the directory: ``create_study(directory,
storage="postgresql://user:pw@host/db")`` (any Optuna RDB URL: sqlite:///, postgresql://,
mysql://, ...), ``storage="grpc://host:port"`` (Optuna's gRPC storage proxy in front of one
database, for drivers on many machines) or ``storage=<optuna BaseStorage>`` (e.g. ``optuna.storages.InMemoryStorage()``,
a JournalStorage of your own). The directory still holds ``study.json``, the sampler state and
the trials' checkpoints. ``study.json`` records the URL with its password masked; a password is
never written to a file or shown in a message, so :func:`load_study` then needs the URL again.

What :class:`Study` adds to ``optuna.Study``:

* the sampler's random state is saved after every fresh ask and restored on load, so a resumed
  study continues the sampler's sequence instead of repeating it (optuna issue #3255);
* trials left RUNNING by a dead driver (killed process) are recovered: marked FAIL and their
  parameters enqueued again, with ``gradhpo:resume_from`` pointing at the dead trial so the
  objective can continue from its last checkpoint. Enqueued trials are asked without moving
  the sampler's random state, so recovery does not change what the sampler proposes next; a
  dead trial killed after its draw but before the sampler's state after it was saved (and
  before any work: nothing claimed or reported) is failed uncounted and drawn again instead;
* ``optimize(objective, n_trials=N)`` counts *finished* trials in the study, not calls: the
  study ends with exactly N finished trials, however many drivers (processes, threads,
  resumes) share it. This differs from Optuna, whose ``n_trials`` means "N more in this call";
  ``n_trials_mode="more"`` gives Optuna's meaning for a single driver;
* a trial never stays RUNNING after its objective raised or returned something that is not a
  number in this process: it is FAIL with the reason in the user attribute ``error``
  (an interrupted trial, KeyboardInterrupt/SystemExit, is failed and queued again, so
  ``gradhpo resume`` continues it from its checkpoint); a pruned trial's reason is in the
  user attribute ``pruned``;
* several drivers never evaluate the same proposal twice: an objective calls
  :meth:`Study.claim` once it has drawn its parameters (``gradhpo tune``'s objective and
  :func:`~gradhpo.search.fit_trial` do), and a fresh proposal equal to the parameters of a
  finished trial, or of a running trial that claimed them, is not evaluated: the trial is
  closed as FAIL + ``gradhpo:duplicate`` (not counted) and the driver asks again (after
  ``MAX_DUPLICATES`` in a row the space counts as exhausted and the driver stops, saying
  so). While other drivers are running trials, each fresh trial's sampler draws from a seed
  derived from the study's seed and the trial's number, so drivers that restored the same
  saved sampler state do not propose the same points in the first place.

A driver is identified by host, pid and a per-object token; a RUNNING trial is stale when its
driver's process is gone (same host), when it is this process but not a live Study object, or
when its heartbeat is older than ``stale_after`` seconds. The heartbeat is written when the
trial is created, by :func:`~gradhpo.search.fit_trial` and config trials every epoch, by a
user objective's ``trial.report`` (at most once per tenth of ``stale_after``), or by the
objective itself through :meth:`Study.heartbeat` (one that runs longer than ``stale_after``
without reporting must, or a driver on another host takes its trial for dead). These heartbeats are trial system attributes, so they work on every
storage (journal, SQLite, RDB servers, in-memory).

Every finished trial is logged as one line on the ``gradhpo.search`` logger (INFO; WARNING for
failures), as Optuna logs its trials. Without any logging configuration the lines go to
stderr and follow Optuna's verbosity (``optuna.logging.set_verbosity(WARNING)`` quiets both);
once the application configures logging (a handler on the root logger), the records go there.
"""

from __future__ import annotations

import gc
import hashlib
import json
import logging
import math
import numbers
import os
import re
import socket
import sqlite3
import sys
import threading
import time
import uuid
import warnings
import weakref
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, cast
from urllib.parse import unquote, urlsplit

import optuna
from optuna.storages import BaseStorage, JournalStorage
from optuna.storages.journal import JournalFileBackend
from optuna.trial import FrozenTrial, TrialState
from sqlalchemy.engine import make_url
from tqdm.auto import tqdm

from gradhpo.config import ConfigError
from gradhpo.files import SlotFile, read_slot_file, write_json
from gradhpo.run.loop import METRICS, Direction
from gradhpo.search.journal_lock import OwnedFileLock
from gradhpo.search.retry import RetryingStorage, open_through_outage
from gradhpo.search.samplers import (
    make_pruner,
    make_sampler,
    reseed_sampler,
    restore_sampler_rng_states,
    sampler_rng_states,
)

try:
    from optuna.study._tell import _tell_with_warning
except ImportError:  # pragma: no cover - a future optuna without it: the public tell
    _tell_with_warning = None  # type: ignore[assignment]

__all__ = [
    "FINISHED_STATES",
    "JOURNAL_FILE",
    "MAX_DUPLICATES",
    "DuplicateProposal",
    "SQLITE_FILE",
    "Study",
    "create_study",
    "is_retried",
    "load_optuna_study",
    "load_study",
    "mask_password",
    "open_storage_url",
    "owning_study",
]

#: States of trials that count towards ``n_trials``.
FINISHED_STATES = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
#: The embedded storages of a study directory: the journal (default of a new study) and
#: SQLite (older studies, or ``storage="sqlite"``).
JOURNAL_FILE = "study.journal"
SQLITE_FILE = "study.db"
_EMBEDDED = {"journal": JOURNAL_FILE, "sqlite": SQLITE_FILE}
_RETRIED = "gradhpo:retried"
_SURPLUS = "gradhpo:surplus"
_DUPLICATE = "gradhpo:duplicate"
_CLAIMED = "gradhpo:claimed"
#: Fresh proposals in a row that repeat evaluated parameters before a driver gives up (the
#: space looks exhausted).
MAX_DUPLICATES = 50
_DRIVER = "gradhpo:driver"
RESUME_FROM = "gradhpo:resume_from"
_LIVE_TOKENS: weakref.WeakValueDictionary[str, Study] = weakref.WeakValueDictionary()
_BY_OPTUNA: weakref.WeakValueDictionary[int, Study] = weakref.WeakValueDictionary()
_N_TRIALS_MODES = ("total", "more")

logger = logging.getLogger("gradhpo.search")


# ---------------------------------------------------------------------- logging
class _StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """The default handler of ``gradhpo.search``: writes to the *current* ``sys.stderr``, only
    while the application has not configured logging itself, and at Optuna's verbosity."""

    def __init__(self) -> None:
        super().__init__()
        self.setFormatter(logging.Formatter("[%(levelname).1s %(asctime)s] %(message)s"))

    @property  # type: ignore[override]
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:  # StreamHandler.__init__ assigns it
        pass

    def filter(self, record: logging.LogRecord) -> bool:
        if logging.getLogger().handlers:
            return False  # the record propagates to the application's handlers instead
        return record.levelno >= optuna.logging.get_verbosity() and super().filter(record)


if not any(isinstance(h, _StderrHandler) for h in logger.handlers):
    logger.addHandler(_StderrHandler())
if logger.level == logging.NOTSET:
    logger.setLevel(logging.INFO)


def _logging(level: int) -> bool:
    """Whether a record at ``level`` would be shown anywhere (to skip building the message)."""
    if not logger.isEnabledFor(level):
        return False
    return bool(logging.getLogger().handlers) or level >= optuna.logging.get_verbosity()


# ---------------------------------------------------------------------- storages
_URL_LIKE = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]+:/")
_USERINFO = re.compile(r"^(?P<head>[A-Za-z][A-Za-z0-9+.\-]*:/*)(?P<user>[^:@/?#]*):(?P<pw>.*)@")
_QUERY_SECRET = re.compile(r"(?i)([?&](?:password|passwd|pwd)=)[^&#]*")


def mask_password(url: str) -> str:
    """``url`` with its password (``user:password@`` or a ``password=`` query parameter)
    replaced by ``***``; everything else as given."""
    masked = _USERINFO.sub(lambda m: f"{m['head']}{m['user']}:***@", str(url), count=1)
    return _QUERY_SECRET.sub(r"\1***", masked)


def _has_password(url: str) -> bool:
    return mask_password(url) != url


def _sanitize(text: str, url: str) -> str:
    """An error message from a driver with every trace of the URL's password removed."""
    text = text.replace(url, mask_password(url))
    match = _USERINFO.match(url)
    if match and match["pw"]:
        for secret in sorted({match["pw"], unquote(match["pw"])}, key=len, reverse=True):
            text = text.replace(secret, "***")
    return mask_password(text)


def _check_directory(directory: Any, where: str) -> Path:
    if not isinstance(directory, (str, os.PathLike)):
        raise TypeError(
            f"{where}: directory must be a path (str or os.PathLike), got {type(directory).__name__}"
        )
    text = os.fspath(directory)
    if isinstance(text, bytes):
        text = os.fsdecode(text)
    if _URL_LIKE.match(text):
        raise ValueError(
            f"{where}: directory {mask_password(text)!r} looks like a storage URL; pass it as "
            f"storage=... and give a folder for study.json, the sampler state and checkpoints, "
            f"e.g. {where}('runs/my_study', storage='sqlite:///runs/my_study.db')"
        )
    return Path(text)


def _sqlite_connection(path: Path) -> sqlite3.Connection:
    """One SQLite connection in WAL mode with ``synchronous=NORMAL``.

    With SQLite's defaults every commit waits for two fsyncs, which made 100 trivial trials
    take ~3 s here. WAL + NORMAL survives a killed process (committed transactions are in the
    log); only a power cut may lose the last commits. Readers (optuna-dashboard, a second
    driver) are not blocked by a writer in WAL mode. The generous busy timeout lets several
    drivers share one file."""
    conn = sqlite3.connect(path, timeout=60, check_same_thread=False)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    return conn


def _sqlite_storage(path: Path) -> optuna.storages.RDBStorage:
    return optuna.storages.RDBStorage(
        f"sqlite:///{path}", engine_kwargs={"creator": lambda: _sqlite_connection(path)}
    )


def _journal_storage(path: Path) -> JournalStorage:
    """The journal in ``path``: an append-only file of JSON lines, one per change, written
    under a lock file and fsync-ed per append, so drivers in several processes can share it.
    The lock file (:class:`~gradhpo.search.journal_lock.OwnedFileLock`: local disks, NFS,
    Windows) names its holder, so one left by a killed driver on this machine is broken at
    once instead of after Optuna's 30 s grace period."""
    backend = JournalFileBackend(str(path), lock_obj=OwnedFileLock(str(path)))
    return JournalStorage(backend)


#: Optuna's gRPC storage proxy listens here unless the URL names another port.
GRPC_DEFAULT_PORT = 13000


def _grpc_storage(url: str) -> BaseStorage:
    """Optuna's gRPC storage proxy client for ``grpc://host[:port]`` (a proxy server in front
    of one database, for many drivers on many machines: ``gradhpo storage-proxy``)."""
    parts = urlsplit(url)
    try:
        port = parts.port or GRPC_DEFAULT_PORT
    except ValueError:  # not a number or out of range
        port = None
    if not parts.hostname or port is None or parts.path not in ("", "/") or parts.query:
        raise ValueError(
            f"storage {url!r}: a gRPC storage URL is grpc://HOST[:PORT] (port 1-65535, "
            f"default {GRPC_DEFAULT_PORT}), nothing after it"
        )
    from optuna.storages import GrpcStorageProxy

    with warnings.catch_warnings():  # experimental in Optuna since 4.2: tested here
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        proxy = GrpcStorageProxy(host=parts.hostname, port=port)
    try:
        proxy.get_all_studies()  # the first call connects: an unreachable proxy fails here
    except Exception as exc:
        details = getattr(exc, "details", None)  # a grpc.RpcError says why in details()
        detail = str(details() if callable(details) else exc).strip()
        raise ValueError(
            f"storage {url!r}: cannot reach the gRPC storage proxy: {detail}"
        ) from None
    return proxy


def open_storage_url(url: str) -> BaseStorage:
    """The Optuna storage a study ``storage=`` URL names (an RDB URL such as
    ``postgresql://user:pw@host/db`` or ``sqlite:///path.db``, or ``grpc://host:port``), as a
    study opens it: database servers behind the connection-retrying wrapper. A failure is a
    ValueError that names the URL with its password masked."""
    if not isinstance(url, str) or "://" not in url:
        raise ValueError(
            f"storage: expected a storage URL such as 'sqlite:///study.db', got {url!r}"
        )
    return _url_storage(url)


def _url_storage(url: str, *, through_outage: bool = False) -> BaseStorage:
    """An Optuna RDB storage for ``url`` (or the gRPC proxy's client for ``grpc://``); every
    failure is a ValueError with the password masked (and the driver's exception not chained,
    as it may quote the URL). ``through_outage``: a database server that cannot be reached is
    waited for (:func:`~gradhpo.search.retry.open_through_outage`), as when a driver opens a
    study that exists on it while it restarts; a new study's URL fails at once."""
    if url.startswith("grpc://"):
        return _grpc_storage(url)
    try:
        parsed = make_url(url)
        database = parsed.database
        if parsed.get_backend_name() == "sqlite" and database and database != ":memory:":
            path = Path(database)
            if not parsed.query:
                return _sqlite_storage(path)
        if parsed.get_backend_name() == "sqlite" or not through_outage:
            rdb = optuna.storages.RDBStorage(url)
        else:
            rdb = open_through_outage(lambda: optuna.storages.RDBStorage(url), mask_password(url))
        if parsed.get_backend_name() == "sqlite":
            return rdb
        # A database server: calls are retried while the connection is lost (a restart, a
        # network drop), with Optuna's cache of finished trials under the retries.
        return RetryingStorage(optuna.storages._CachedStorage(rdb), name=mask_password(url))
    except Exception as exc:
        message = _sanitize(f"{type(exc).__name__}: {exc}", url)
    message = " ".join(message.split())  # drivers' messages span lines: one line here
    raise ValueError(f"storage {mask_password(url)!r}: cannot open it: {message}")


def _storage_spec(storage: Any, where: str) -> tuple[str, Any]:
    """Validate a ``storage`` argument: ``(kind, value)`` with kind journal/sqlite (embedded
    files), url or object."""
    if storage is None:
        return "journal", None
    if isinstance(storage, BaseStorage):
        return "object", storage
    if isinstance(storage, str):
        if storage in _EMBEDDED:
            return storage, None
        if "://" in storage:
            return "url", storage
    shown = mask_password(storage) if isinstance(storage, str) else storage
    raise ValueError(
        f"{where}: storage must be 'journal' or 'sqlite' (a file in the study directory), an "
        f"Optuna storage URL such as 'sqlite:///path/study.db', "
        f"'postgresql://user:password@host/db' or 'grpc://host:port' (a storage proxy), or an "
        f"optuna.storages.BaseStorage; got {shown!r}"
    )


def _storage_record(kind: str, value: Any) -> dict[str, Any]:
    """What ``study.json`` says about the storage (never a password)."""
    if kind in _EMBEDDED:
        return {"kind": kind, "file": _EMBEDDED[kind]}
    if kind == "url":
        return {"kind": "url", "url": mask_password(value), "password": _has_password(value)}
    return {"kind": "object", "class": type(value).__name__}


def _describe(record: Mapping[str, Any]) -> str:
    kind = record.get("kind")
    if kind in _EMBEDDED:
        return f"{kind} file {record.get('file')}"
    if kind == "url":
        return str(record.get("url"))
    return f"storage object {record.get('class', '?')}"


def _open_storage(
    directory: Path, meta: Mapping[str, Any], storage: Any, where: str
) -> tuple[BaseStorage, dict[str, Any]]:
    """The storage of an existing study: ``storage`` if given, else what ``study.json``
    records (or, for directories from before the record, whichever file exists)."""
    if storage is not None:
        kind, value = _storage_spec(storage, where)
    else:
        record = meta.get("storage")
        if isinstance(record, Mapping) and record.get("kind") in ("journal", "sqlite"):
            kind, value = str(record["kind"]), None
        elif isinstance(record, Mapping) and record.get("kind") == "url":
            if record.get("password"):
                raise ValueError(
                    f"{where}: {str(directory)!r} keeps its trials in {record.get('url')!r}; "
                    "its password is not stored: pass storage=<the full URL>"
                )
            kind, value = "url", str(record.get("url"))
        elif isinstance(record, Mapping) and record.get("kind") == "object":
            raise ValueError(
                f"{where}: {str(directory)!r} was created with a {record.get('class')} storage "
                "object; pass it again as storage=..."
            )
        elif (directory / JOURNAL_FILE).is_file():
            kind, value = "journal", None
        elif (directory / SQLITE_FILE).is_file():
            kind, value = "sqlite", None
        else:
            raise ConfigError(
                f"{str(directory)!r} is not a study directory (no {JOURNAL_FILE} or {SQLITE_FILE})"
            )
    if kind in _EMBEDDED:
        path = directory / _EMBEDDED[kind]
        if not path.is_file():
            raise ConfigError(f"{str(directory)!r} is not a study directory: no {path.name}")
        _check_storage_file(path, kind)
        opened: BaseStorage = _journal_storage(path) if kind == "journal" else _sqlite_storage(path)
    elif kind == "url":
        opened = _url_storage(value, through_outage=True)
    else:
        opened = value
    return opened, _storage_record(kind, value)


_SQLITE_HEADER = b"SQLite format 3\x00"


def _check_storage_file(path: Path, kind: str) -> None:
    """A study's own storage file must be whole before Optuna opens it: Optuna would turn an
    empty file into a new database (SQLite) or read a damaged journal up to the damage and
    then append after it, making it unreadable. Every problem is one ConfigError naming the
    file; nothing is written."""
    restore = "restore it from a backup, or start a new study under another name"
    try:
        size = path.stat().st_size
        if size == 0:
            raise ConfigError(f"{str(path)!r}: empty (0 bytes): it holds no study; {restore}")
        if kind == "sqlite":
            with path.open("rb") as fh:
                header = fh.read(len(_SQLITE_HEADER))
            if header != _SQLITE_HEADER:
                raise ConfigError(f"{str(path)!r}: not an SQLite database; {restore}")
            _check_sqlite(path, restore)
            return
        with path.open("rb") as fh:
            for number, line in enumerate(fh, start=1):
                if not line.endswith(b"\n"):
                    raise ConfigError(
                        f"{str(path)!r}: damaged journal: line {number} is cut off (the file "
                        "ends inside a record; a full disk or a partial copy?); "
                        f"{restore}, or cut the file after line {number - 1} "
                        f"(truncate -s {size - len(line)} {path}) to keep the trials "
                        "recorded before it"
                    )
                try:
                    record = json.loads(line)
                except ValueError:
                    record = None
                if not isinstance(record, dict) or "op_code" not in record:
                    raise ConfigError(
                        f"{str(path)!r}: damaged journal: line {number} is not an Optuna "
                        f"journal record; {restore}"
                    )
    except OSError as exc:
        raise ConfigError(f"{str(path)!r}: cannot read: {exc.strerror}") from exc


def _check_sqlite(path: Path, restore: str) -> None:
    """SQLite's own integrity check of a cleanly closed database (no ``-wal`` file beside
    it), opened as immutable: nothing is created or written. With a ``-wal`` file (a driver
    was killed, or is running) the main file alone may lag behind: SQLite recovers it
    when Optuna opens it, so only the header is checked."""
    if path.with_name(path.name + "-wal").exists():
        return
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro&immutable=1", uri=True)
        try:
            row = conn.execute("PRAGMA quick_check").fetchone()
        finally:
            conn.close()
    except sqlite3.DatabaseError as exc:
        raise ConfigError(
            f"{str(path)!r}: not a readable SQLite database ({exc}); {restore}"
        ) from exc
    if row is None or row[0] != "ok":
        raise ConfigError(
            f"{str(path)!r}: damaged SQLite database ({row[0] if row else 'no answer'}); {restore}"
        )


def _load_sampler_state(sampler: optuna.samplers.BaseSampler, directory: Path) -> int | None:
    """Restore the sampler state saved in ``directory`` (``sampler_state.bin``, or an older
    study's ``sampler_state.json``; see :mod:`gradhpo.search.samplers`). An unreadable state
    is a ConfigError naming the file (continuing from a wrong state would silently change the
    study's sequence); one of another kind of sampler is ignored (the sampler starts from its
    seed).

    Returns the number of the trial whose draw the restored state follows: -1 when there is
    no saved state (the sampler is at its seed, before any draw), None when that is unknown
    (a state saved without it, or one ignored)."""
    path = directory / SAMPLER_STATE
    if not path.is_file():
        path = directory / LEGACY_SAMPLER_STATE
        if not path.is_file():
            return -1
    fix = "delete it to continue the study with the sampler started from its seed"
    try:
        data = read_slot_file(path) if path.name == SAMPLER_STATE else path.read_bytes()
        payload = json.loads(data.decode("utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{str(path)!r}: unreadable sampler state ({exc}); {fix}") from exc
    if (
        not isinstance(payload, dict)
        or not isinstance(payload.get("sampler"), str)
        or not isinstance(payload.get("rng"), dict)
    ):
        raise ConfigError(
            f'{str(path)!r}: not a sampler state (expected {{"sampler": ..., "rng": '
            f"{{...}}}}, got {_short(payload, 60)}); {fix}"
        )
    if payload["sampler"] != type(sampler).__name__:
        return None
    try:
        restore_sampler_rng_states(sampler, payload["rng"])
    except (ValueError, TypeError, KeyError, IndexError) as exc:
        raise ConfigError(f"{str(path)!r}: unusable sampler state ({exc}); {fix}") from exc
    after = payload.get("trial")
    return after if isinstance(after, int) and not isinstance(after, bool) else None


def _read_meta(directory: Path, where: str) -> dict[str, Any]:
    path = directory / "study.json"
    if not path.is_file():
        raise ConfigError(
            f"{str(directory)!r} is not a study directory (no study.json"
            + ("" if directory.is_dir() else "; the folder does not exist")
            + ")"
        )
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{str(path)!r}: unreadable ({exc})") from exc
    if not isinstance(meta, dict) or not isinstance(meta.get("name"), str):
        raise ConfigError(f"{str(path)!r}: not a gradhpo study record (no 'name')")
    return meta


def load_optuna_study(
    directory: str | os.PathLike[str], *, storage: str | BaseStorage | None = None
) -> optuna.Study:
    """The plain ``optuna.Study`` of a study directory, whatever its storage (for reading:
    reports, dashboards, dataframes); no sampler state, no recovery."""
    directory = _check_directory(directory, "load_optuna_study")
    meta = _read_meta(directory, "load_optuna_study")
    opened, record = _open_storage(directory, meta, storage, "load_optuna_study")
    try:
        return optuna.load_study(study_name=meta["name"], storage=opened)
    except KeyError:
        raise ConfigError(
            f"{str(directory)!r}: the storage ({_describe(record)}) holds no study named "
            f"{meta['name']!r}"
        ) from None


# ---------------------------------------------------------------------- trials
def is_retried(trial: optuna.trial.FrozenTrial) -> bool:
    """A trial that does not count: a dead trial whose parameters were enqueued again (its
    retry counts instead) or that the sampler draws again, a surplus trial a driver asked
    while other drivers were already running the last ones (see :meth:`Study.optimize`), or
    a duplicate proposal that was never evaluated (see :meth:`Study.claim`)."""
    return trial.state == TrialState.FAIL and bool(
        trial.system_attrs.get(_RETRIED)
        or trial.system_attrs.get(_SURPLUS)
        or trial.system_attrs.get(_DUPLICATE)
    )


def owning_study(trial: Any) -> Study | None:
    """The live :class:`Study` whose ``optimize``/``ask`` made ``trial`` (``None`` for a
    trial of a plain Optuna study, a FixedTrial, ...): how :func:`~gradhpo.search.fit_trial`
    finds the study of a user's objective to keep its heartbeat and claim its proposal."""
    owner = getattr(trial, "study", None)
    study = _BY_OPTUNA.get(id(owner)) if owner is not None else None
    return study if study is not None and study.optuna is owner else None


class DuplicateProposal(optuna.TrialPruned):
    """Raised by :meth:`Study.claim`: the trial's parameters are those of another trial, so
    it is not evaluated (the study closes it uncounted and asks again). A subclass of
    ``optuna.TrialPruned``, so a plain Optuna loop records it as pruned, never as a value."""


#: The sampler state of a study directory, and the file of versions before it.
SAMPLER_STATE = "sampler_state.bin"
LEGACY_SAMPLER_STATE = "sampler_state.json"


class _FreshTrial(optuna.trial.Trial):
    """A fresh trial asked by a :class:`Study`: its first ``report`` claims its parameters
    (:meth:`Study.claim`) unless they were claimed already, so a user objective that reports
    (most do, every epoch) never trains a proposal another trial holds past its first epoch;
    the objective may call ``study.claim(trial)`` after its suggests to claim before any
    work, as :func:`~gradhpo.search.fit_trial` and config trials do. Its reports also keep
    its heartbeat fresh (:meth:`Study.heartbeat`, at most once per tenth of the study's
    ``stale_after``), so a long user objective on another host is not taken for dead."""

    def __init__(self, study: optuna.Study, trial_id: int) -> None:
        super().__init__(study, trial_id)
        self.claimed = False
        self.beat = time.monotonic()  # the creation wrote a heartbeat

    def report(self, value: float, step: int) -> None:
        owner = owning_study(self)
        if owner is not None:
            # No parameters (an objective that suggests nothing): nothing to claim.
            if not self.claimed and self.params:
                owner.claim(self)
            if time.monotonic() - self.beat > owner.stale_after / 10:
                owner.heartbeat(self)
        super().report(value, step)


def derived_seed(seed: int | None, index: int, kind: str = "trial") -> int:
    """A 32-bit seed from a study's ``seed``, a ``kind`` of index (``trial`` number,
    ``driver`` index, ``reseed`` value) and the ``index``: distinct (kind, index) pairs give
    unrelated streams, the same triple always the same seed. The kind keeps driver k's stream
    from being trial k's (they were equal: two drivers then proposed the same point)."""
    digest = hashlib.sha256(f"gradhpo:{kind}:{seed}:{index}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


def _rdb_of(storage: BaseStorage) -> optuna.storages.RDBStorage | None:
    """The Optuna RDB storage behind ``storage`` (also under Optuna's cache and
    :class:`RetryingStorage`), or None."""
    rdb: Any = storage
    for attr in ("backend", "_backend"):  # RetryingStorage, then optuna's _CachedStorage
        rdb = rdb.__dict__.get(attr, rdb) if hasattr(rdb, "__dict__") else rdb
    return rdb if isinstance(rdb, optuna.storages.RDBStorage) else None


def _sql_scalars(rdb: optuna.storages.RDBStorage, build: Callable[..., Any]) -> Any:
    """The one row of the query ``build(session, models)`` on ``rdb``; None when it fails
    (another Optuna's models, a lost connection: the caller then lists, retried)."""
    try:
        from optuna.storages._rdb import models

        session = rdb.scoped_session()
        try:
            row = build(session, models).one()
            session.commit()
        except BaseException:
            session.rollback()
            raise
        finally:
            session.close()
    except Exception:  # noqa: BLE001
        logger.debug("could not count the trials in SQL", exc_info=True)
        return None
    return row


def _running_count(storage: BaseStorage, study_id: int) -> int | None:
    """The number of RUNNING trials of study ``study_id`` when ``storage`` is a database,
    counted in one SQL statement; listing them costs Optuna seven (the trials, then their
    params, values, attributes and intermediate values), which on a database server was
    most of what a study added to a trivial trial. None for other storages (a journal or
    memory lists them from memory) and when the count fails (the caller lists them)."""
    rdb = _rdb_of(storage)
    if rdb is None:
        return None
    from sqlalchemy import func

    row = _sql_scalars(
        rdb,
        lambda session, models: session.query(func.count(models.TrialModel.trial_id)).filter(
            models.TrialModel.study_id == study_id,
            models.TrialModel.state == TrialState.RUNNING,
        ),
    )
    return None if row is None else int(row[0])


#: JSON texts of the values ``bool()`` finds false: a mark stored with one of them does not
#: make a trial uncounted (see :func:`is_retried`).
_FALSY_JSON = ("false", "null", "0", "0.0", "-0.0", '""', "[]", "{}")


def _sql_tally(storage: BaseStorage, study_id: int) -> tuple[int, int, int, int] | None:
    """(trials, finished trials that count, running, waiting) of study ``study_id`` on a
    database, in one SQL statement: what :meth:`Study._tally` counts from a listing of every
    trial, which on a database costs Optuna's cache seven statements per trial (the
    unfinished trials with their params, values and attributes). A finished trial counts
    unless it is FAIL with a true retried, surplus or duplicate mark (:func:`is_retried`).
    None for other storages and when the query fails (the caller lists)."""
    rdb = _rdb_of(storage)
    if rdb is None:
        return None
    from sqlalchemy import and_, case, exists, func, not_

    def build(session: Any, models: Any) -> Any:
        trial, attr = models.TrialModel, models.TrialSystemAttributeModel
        marked = exists().where(
            attr.trial_id == trial.trial_id,
            attr.key.in_([_RETRIED, _SURPLUS, _DUPLICATE]),
            attr.value_json.notin_(_FALSY_JSON),
        )
        uncounted = and_(trial.state == TrialState.FAIL, marked)
        counted = and_(trial.state.in_(FINISHED_STATES), not_(uncounted))
        ones = lambda cond: func.coalesce(func.sum(case((cond, 1), else_=0)), 0)  # noqa: E731
        return session.query(
            func.count(trial.trial_id),
            ones(counted),
            ones(trial.state == TrialState.RUNNING),
            ones(trial.state == TrialState.WAITING),
        ).filter(trial.study_id == study_id)

    row = _sql_scalars(rdb, build)
    return None if row is None else (int(row[0]), int(row[1]), int(row[2]), int(row[3]))


def _journal_of(storage: BaseStorage) -> JournalStorage | None:
    """The Optuna journal storage behind ``storage`` (also under :class:`RetryingStorage`)
    when its in-memory replay can be read directly (see :func:`_journal_trials`)."""
    journal = storage.__dict__.get("backend", storage) if hasattr(storage, "__dict__") else storage
    if isinstance(journal, JournalStorage) and all(
        hasattr(journal, attr) for attr in ("_thread_lock", "_replay_result", "_sync_with_backend")
    ):
        return journal
    return None


def _journal_trials(
    journal: JournalStorage, study_id: int, start: int, *, sync: bool
) -> tuple[int, list[FrozenTrial]] | None:
    """(the number of trials of study ``study_id``, those numbered ``start`` or more) from a
    journal storage's replay of its file, read after catching up with the file (``sync``)
    or as it is. ``get_all_trials`` walks every trial of the study to filter them, twice per
    trial of :meth:`Study.optimize`: at 1,000 trials that walk was the largest part of what a
    study added to a trivial trial. Trials are listed in number order (their number is their
    position in the study). None when this Optuna's replay is not laid out as expected (the
    caller then lists them the public way)."""
    try:
        with journal._thread_lock:
            if sync:
                journal._sync_with_backend()
            replay: Any = journal._replay_result
            ids = replay._study_id_to_trial_ids[study_id]
            return len(ids), [replay._trials[i] for i in ids[start:]]
    except (AttributeError, KeyError, TypeError):  # another Optuna's internals
        return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _short(value: Any, limit: int = 120) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _as_float(value: Any) -> float | None:
    if isinstance(value, (str, bytes)) or value is None:
        return None
    try:
        return float(value)
    except (TypeError, ValueError, OverflowError):
        return None


def _is_scalar(value: Any) -> bool:
    return isinstance(value, numbers.Number) or getattr(value, "ndim", None) == 0


class Study:
    """An Optuna study in a study directory (see the module docstring). Create it with
    :func:`create_study`, open it again with :func:`load_study`.

    Optuna's conventions: ``best_trial``/``best_params``/``best_value`` (single objective),
    ``best_trials`` (Pareto front), ``trials``, ``get_trials``, ``trials_dataframe()``,
    ``ask``/``tell``, ``enqueue``, ``stop``, ``optimize``. ``study.optuna`` is the underlying
    ``optuna.Study`` (visualization, anything else).
    """

    def __init__(
        self,
        directory: Path,
        optuna_study: optuna.Study,
        *,
        stale_after: float = 600.0,
        storage_record: Mapping[str, Any] | None = None,
        seed: int | None = None,
    ) -> None:
        self.directory = Path(directory)
        #: The study's sampler seed (``study.json``); per-trial seeds of concurrent drivers
        #: are derived from it (and from the trial number alone for an unseeded study, whose
        #: drivers also restore one saved state).
        self.seed = seed
        self.optuna = optuna_study
        self.sampler = optuna_study.sampler
        self.stale_after = float(stale_after)
        self.storage_record = dict(storage_record or {})
        self.token = uuid.uuid4().hex
        self._unsaved: set[int] = set()  # fresh trials whose sampler state is not saved yet
        self._state_file = SlotFile(self.directory / SAMPLER_STATE)
        self._legacy_state_checked = False
        #: The trial whose draw this driver's sampler state follows (saved or restored): -1
        #: before any draw, None when unknown (reseeded, or restored from an untagged state).
        self._state_after: int | None = None
        self._lock = threading.Lock()
        #: (k, c): the first k trials of the study (numbers 0..k-1) are finished and c of them
        #: count. A finished trial never changes whether it counts (only RUNNING trials are
        #: retired; the surplus, duplicate and retried marks are written before the FAIL), so
        #: counting a listing starts at trial k instead of walking every trial again.
        self._settled: tuple[int, int] = (0, 0)
        _LIVE_TOKENS[self.token] = self
        _BY_OPTUNA[id(optuna_study)] = self
        self._driver: dict[str, Any] = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "token": self.token,
        }

    def __repr__(self) -> str:
        return (
            f"<gradhpo Study {self.name!r} in {str(self.directory)!r} "
            f"({_describe(self.storage_record) if self.storage_record else 'storage'})>"
        )

    # ------------------------------------------------------------------ properties
    @property
    def name(self) -> str:
        return self.optuna.study_name

    @property
    def direction(self) -> str:
        """'maximize' or 'minimize' (RuntimeError for a multi-objective study, as Optuna)."""
        return self.optuna.direction.name.lower()

    @property
    def directions(self) -> list[str]:
        """One 'maximize'/'minimize' per objective."""
        return [d.name.lower() for d in self.optuna.directions]

    @property
    def is_multi_objective(self) -> bool:
        return len(self.optuna.directions) > 1

    @property
    def sampler_state_path(self) -> Path:
        return self.directory / SAMPLER_STATE

    @property
    def dashboard_hint(self) -> str:
        """How to open this study in optuna-dashboard (a URL's password masked)."""
        kind = self.storage_record.get("kind")
        if kind == "journal":
            return f"optuna-dashboard {self.directory / JOURNAL_FILE}"
        if kind == "sqlite":
            return f"optuna-dashboard sqlite:///{self.directory / SQLITE_FILE}"
        if kind == "url":
            return f"optuna-dashboard {self.storage_record.get('url')}"
        return "optuna-dashboard: the study lives in a storage object of this process"

    def trial_dir(self, number: int) -> Path:
        return self.directory / "trials" / f"{number:04d}"

    @property
    def trials(self) -> list[FrozenTrial]:
        """All trials (copies), as ``optuna.Study.trials``; dead trials that were retried
        under a new number are included (see :meth:`finished_trials`)."""
        return self.optuna.trials

    def get_trials(
        self, deepcopy: bool = True, states: Sequence[TrialState] | None = None
    ) -> list[FrozenTrial]:
        """As ``optuna.Study.get_trials``."""
        return self.optuna.get_trials(deepcopy=deepcopy, states=states)

    def finished_trials(self) -> list[FrozenTrial]:
        """Finished trials, without the dead ones that were retried under a new number."""
        return [
            t
            for t in self.optuna.get_trials(deepcopy=False, states=FINISHED_STATES)
            if not is_retried(t)
        ]

    def trial_counts(self) -> dict[str, int]:
        """How the study's trials ended: ``complete``, ``pruned`` (of which ``diverged``:
        pruned by the divergence rule), ``failed``, ``finished`` (the three together: what
        ``n_trials`` counts), ``running``, ``waiting``, and ``not_counted`` (dead trials
        retried under a new number, surplus and duplicate proposals never evaluated)."""
        counts = dict.fromkeys(
            ("complete", "pruned", "diverged", "failed", "finished", "running", "waiting"), 0
        )
        counts["not_counted"] = 0
        for t in self.optuna.get_trials(deepcopy=False):
            if is_retried(t):
                counts["not_counted"] += 1
            elif t.state == TrialState.COMPLETE:
                counts["complete"] += 1
            elif t.state == TrialState.PRUNED:
                counts["pruned"] += 1
                counts["diverged"] += int(bool(t.user_attrs.get("diverged")))
            elif t.state == TrialState.FAIL:
                counts["failed"] += 1
            elif t.state == TrialState.RUNNING:
                counts["running"] += 1
            elif t.state == TrialState.WAITING:
                counts["waiting"] += 1
        counts["finished"] = counts["complete"] + counts["pruned"] + counts["failed"]
        return counts

    def _require_single(self, what: str) -> None:
        if self.is_multi_objective:
            raise RuntimeError(
                f"{what} is for single-objective studies; this study has "
                f"{len(self.optuna.directions)} objectives {self.directions}: use best_trials"
            )

    @property
    def best_trial(self) -> FrozenTrial | None:
        """The best COMPLETE trial (ties: the earlier one), ``None`` while there is none
        (Optuna raises ValueError there; :attr:`best_params`/:attr:`best_value` do too).
        RuntimeError for a multi-objective study, as Optuna."""
        self._require_single("best_trial")
        complete = [
            t
            for t in self.optuna.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
            if t.value is not None and math.isfinite(t.value)
        ]
        if not complete:
            return None
        sign = 1.0 if self.direction == "maximize" else -1.0
        # Fixed tie-break: the earlier trial wins.
        return max(complete, key=lambda t: (sign * cast(float, t.value), -t.number))

    def _best_or_raise(self, what: str) -> FrozenTrial:
        self._require_single(what)
        best = self.best_trial
        if best is None:
            raise ValueError(f"{what}: study {self.name!r} has no completed trial yet")
        return best

    @property
    def best_params(self) -> dict[str, Any]:
        """Parameters of :attr:`best_trial` (ValueError while no trial completed)."""
        return dict(self._best_or_raise("best_params").params)

    @property
    def best_value(self) -> float:
        """Value of :attr:`best_trial` (ValueError while no trial completed)."""
        value = self._best_or_raise("best_value").value
        assert value is not None
        return value

    @property
    def best_trials(self) -> list[FrozenTrial]:
        """The Pareto front of the COMPLETE trials (every objective), as Optuna's."""
        return self.optuna.best_trials

    def trials_dataframe(
        self, attrs: Sequence[str] | None = None, multi_index: bool = False
    ) -> Any:
        """The trials as a pandas DataFrame (Optuna's ``trials_dataframe``); needs pandas:
        ``pip install 'gradhpo[pandas]'``."""
        try:
            import pandas  # noqa: F401
        except ImportError as exc:
            raise ImportError(
                "trials_dataframe needs pandas: pip install 'gradhpo[pandas]' (or pandas)"
            ) from exc
        if attrs is None:
            return self.optuna.trials_dataframe(multi_index=multi_index)
        return self.optuna.trials_dataframe(attrs=tuple(attrs), multi_index=multi_index)

    def stop(self) -> None:
        """Stop :meth:`optimize` after the running trial(s), as ``optuna.Study.stop`` (call it
        from an objective or a callback)."""
        self.optuna.stop()

    # ------------------------------------------------------------------ ask / tell
    def ask(self, *, waiting: bool | None = None) -> optuna.trial.Trial:
        """Ask a trial. Enqueued trials (retries, user-enqueued points) leave the sampler's
        random state untouched; after a fresh ask the state is saved to disk (once the trial
        has drawn its parameters). ``waiting`` says whether enqueued trials exist, if the
        caller already knows."""
        if waiting is None:
            waiting = bool(self.optuna.get_trials(deepcopy=False, states=(TrialState.WAITING,)))
        if waiting:
            with self._lock:
                snapshot = sampler_rng_states(self.sampler)
                trial = self.optuna.ask()
                restore_sampler_rng_states(self.sampler, snapshot)
            self.heartbeat(trial)
            return trial
        trial, _ = self._ask_fresh(full=False)
        return trial

    def _ask_fresh(self, *, full: bool) -> tuple[optuna.trial.Trial, list[FrozenTrial]]:
        """A fresh trial, and the study's trials listed after it was created: all of them
        (``full``: :meth:`optimize`'s loop checks the trial as surplus with the same listing)
        or the running ones (none when a database counts this trial as the only one
        running: see :func:`_running_count`). Looking after the creation is what makes two
        drivers that start at once not both miss each other: the later one to create its
        trial sees the earlier one's, and reseeds."""
        trial = self._new_trial()
        self._unsaved.add(trial._trial_id)
        storage, study_id = self.optuna._storage, self.optuna._study_id
        if not full and _running_count(storage, study_id) == 1:
            return trial, []  # only this trial runs: nobody to reseed for, nothing to list
        journal = None if full else _journal_of(storage)
        # A journal caught up with its file when it created the trial, so its replay already
        # holds every trial created before this one; only trials past the settled prefix
        # (all finished) can be running.
        tail = (
            None
            if journal is None
            else _journal_trials(journal, study_id, self._settled[0], sync=False)
        )
        listing = (
            [t for t in tail[1] if t.state == TrialState.RUNNING]
            if tail is not None
            else storage.get_all_trials(
                study_id, deepcopy=False, states=None if full else (TrialState.RUNNING,)
            )
        )
        if self._others_running(listing, trial._trial_id):
            # Drivers that restored the same saved state would draw the same points: while
            # others run, each fresh trial draws from a seed of its own (study seed, number).
            with self._lock:
                reseed_sampler(self.sampler, derived_seed(self.seed, trial.number))
                self._state_after = None
        return trial, listing

    def _others_running(self, trials: Sequence[FrozenTrial], trial_id: int) -> bool:
        """Whether a trial of ``trials`` other than ``trial_id`` is RUNNING under another
        driver."""
        for t in trials:
            if t.state != TrialState.RUNNING or t._trial_id == trial_id:
                continue
            driver = t.system_attrs.get(_DRIVER)
            if not isinstance(driver, Mapping) or driver.get("token") != self.token:
                return True
        return False

    def reseed(self, seed: int) -> None:
        """Start this driver's sampler from ``seed`` (derived with the study's seed) instead
        of continuing the saved state: ``gradhpo resume --seed``."""
        with self._lock:
            reseed_sampler(self.sampler, derived_seed(self.seed, int(seed), "reseed"))
            self._state_after = None

    def reseed_driver(self, worker: int) -> None:
        """Start this driver's sampler from a seed of its own, as driver ``worker`` of several
        (see :func:`gradhpo.search.drivers.distinct_sampler`). The seed is derived from the
        study's seed, ``worker`` and the number of trials the study holds now: a driver
        started again later (a resume after a kill) never replays the stream an earlier
        start of driver ``worker`` drew from (every draw made from that stream created a
        trial first, so the count has grown since), and a rerun from the same state draws the
        same points."""
        start = len(self.optuna._storage.get_all_trials(self.optuna._study_id, deepcopy=False))
        with self._lock:
            reseed_sampler(self.sampler, derived_seed(self.seed, int(worker), f"driver@{start}"))
            self._state_after = None

    def claim(self, trial: optuna.trial.Trial) -> None:
        """Claim the parameters ``trial`` has drawn, before any work is done on them; raise
        :class:`DuplicateProposal` when they are those of another trial: a finished one
        (retried, surplus and duplicate trials aside), one waiting in the queue, or a running
        one that claimed them (a running trial of another driver still drawing is not
        compared: its claim comes after this one's and finds this trial).

        The claim is written before the others are read, so of two drivers that draw the same
        point at the same time at least one sees the other's claim: two never both evaluate
        it. Enqueued trials (retries of dead trials, the user's own points) are evaluated
        whatever they repeat."""
        storage = self.optuna._storage
        storage.set_trial_system_attr(trial._trial_id, _CLAIMED, True)
        mine = storage.get_trial(trial._trial_id)
        if "fixed_params" in mine.system_attrs:
            return
        params = mine.params
        for other in storage.get_all_trials(self.optuna._study_id, deepcopy=False):
            if other._trial_id == trial._trial_id or is_retried(other):
                continue
            if other.state == TrialState.WAITING:
                theirs = other.system_attrs.get("fixed_params")
            elif other.state == TrialState.RUNNING and not (
                other.system_attrs.get(_CLAIMED) or "fixed_params" in other.system_attrs
            ):
                continue
            else:
                theirs = other.params
            if theirs == params:
                raise DuplicateProposal(
                    f"parameters {params} are those of trial {other.number} "
                    f"({other.state.name.lower()})"
                )
        if isinstance(trial, _FreshTrial):
            trial.claimed = True

    def _new_trial(self) -> optuna.trial.Trial:
        """``optuna.Study.ask`` for a fresh trial, with this driver's heartbeat written in the
        same storage operation as the trial itself (one write less per trial)."""
        study = self.optuna
        study._thread_local.cached_all_trials = None
        template = FrozenTrial(
            number=-1,
            state=TrialState.RUNNING,
            value=None,
            datetime_start=datetime.now(),
            datetime_complete=None,
            params={},
            distributions={},
            user_attrs={},
            system_attrs={_DRIVER: {**self._driver, "beat": time.time()}},
            intermediate_values={},
            trial_id=-1,
        )
        trial_id = study._storage.create_new_trial(study._study_id, template_trial=template)
        return _FreshTrial(study, trial_id)

    def _save_sampler_state(self, trial: optuna.trial.Trial) -> None:
        """Save the sampler's state once a fresh trial has drawn its parameters: at its first
        heartbeat after the ask (objectives suggest first, then train) or at tell. Saving at
        the ask itself would be too early: most samplers draw inside ``suggest_*``."""
        if trial._trial_id in self._unsaved:
            self._unsaved.discard(trial._trial_id)
            self._write_sampler_state(trial.number)
            self._state_after = trial.number

    def _write_sampler_state(self, number: int) -> None:
        """Write the sampler's state (the JSON of
        :func:`~gradhpo.search.samplers.save_sampler_state`: sampler, RNG states, ``"trial":
        number``) into ``sampler_state.bin``'s next slot: one ``pwrite`` per trial on a
        descriptor kept open, where a temporary file and a rename cost about ten times as
        much. A killed driver leaves the previous state complete in the other slot (see
        :class:`~gradhpo.files.SlotFile`); a ``sampler_state.json`` of an older version is
        removed once this file holds a state."""
        payload = {
            "sampler": type(self.sampler).__name__,
            "rng": sampler_rng_states(self.sampler, compact=True),
            "trial": int(number),
        }
        self._state_file.write(json.dumps(payload, separators=(",", ":")).encode("utf-8"))
        if not self._legacy_state_checked:
            self._legacy_state_checked = True
            (self.directory / LEGACY_SAMPLER_STATE).unlink(missing_ok=True)

    def tell(
        self,
        trial: optuna.trial.Trial | int,
        value: float | Sequence[float] | None = None,
        state: TrialState | None = None,
    ) -> FrozenTrial:
        """As ``optuna.Study.tell`` (``value``: one number, or one per objective); saves the
        sampler state first if this fresh trial has not done so yet."""
        if isinstance(trial, optuna.trial.Trial):
            self._save_sampler_state(trial)
        return self.optuna.tell(trial, value, state=state)

    def heartbeat(self, trial: optuna.trial.Trial) -> None:
        """Mark ``trial`` as alive and owned by this driver (call it every epoch or so)."""
        if trial._trial_id in self._unsaved and trial.params:
            self._save_sampler_state(trial)
        self.optuna._storage.set_trial_system_attr(
            trial._trial_id, _DRIVER, {**self._driver, "beat": time.time()}
        )
        if isinstance(trial, _FreshTrial):
            trial.beat = time.monotonic()

    def enqueue(
        self, params: Mapping[str, Any], user_attrs: Mapping[str, Any] | None = None
    ) -> None:
        self.optuna.enqueue_trial(
            dict(params), user_attrs=dict(user_attrs or {}), skip_if_exists=False
        )

    # ------------------------------------------------------------------ recovery
    def _is_stale(self, trial: FrozenTrial) -> bool:
        driver = trial.system_attrs.get(_DRIVER)
        if not isinstance(driver, Mapping):
            # Asked outside a gradhpo Study (plain Optuna): only its age can tell.
            started = trial.datetime_start.timestamp() if trial.datetime_start else time.time()
            return time.time() - started > self.stale_after
        if time.time() - float(driver.get("beat", 0.0)) > self.stale_after:
            return True
        if driver.get("host") != socket.gethostname():
            return False
        if driver.get("pid") == os.getpid():
            return driver.get("token") not in _LIVE_TOKENS
        return not _pid_alive(int(driver.get("pid", -1)))

    def _retire(self, trial: FrozenTrial) -> bool:
        """Fail a RUNNING trial as retried (not counted); False if it finished meanwhile."""
        storage = self.optuna._storage
        # Mark first (a finished trial takes no attributes), then fail it. Only FAIL +
        # retried counts as "retried", so if its driver finished it meanwhile, it stays counted.
        try:
            storage.set_trial_system_attr(trial._trial_id, _RETRIED, True)
            storage.set_trial_state_values(trial._trial_id, state=TrialState.FAIL)
        except optuna.exceptions.UpdateFinishedTrialError:
            return False
        return True

    def _draws_again(self, trial: FrozenTrial) -> bool:
        """Whether a dead trial is drawn again rather than queued again: a fresh trial (not
        enqueued) whose driver died after the draw but before it saved the sampler's state
        after the draw (so the state this driver holds, saved after an earlier trial, is the
        one the dead trial drew from), and before any work on it (no claim, nothing
        reported). Queued again, its parameters would be evaluated and the sampler would draw
        from the same state once more: the study would go on differently from the
        uninterrupted one. Drawn again, it gets the same parameters (one driver: the same
        state, the same finished trials) and the sequence goes on unchanged."""
        after = self._state_after
        return (
            after is not None
            and after < trial.number
            and "fixed_params" not in trial.system_attrs
            and not trial.system_attrs.get(_CLAIMED)
            and not trial.intermediate_values
        )

    def _requeue(self, trial: FrozenTrial) -> bool:
        """Fail a RUNNING trial and enqueue its parameters again (``gradhpo:resume_from``
        points at the first dead trial of the chain); False if it finished meanwhile."""
        if not self._retire(trial):
            return False
        origin = trial.user_attrs.get(RESUME_FROM, trial.number)
        self.enqueue(
            trial.params,
            {**trial.user_attrs, RESUME_FROM: origin, "gradhpo:retry_of": trial.number},
        )
        return True

    def recover_stale_trials(self) -> list[int]:
        """Fail every stale RUNNING trial and enqueue its parameters again; returns the numbers
        of the recovered trials. A dead trial that had drawn its parameters but not yet saved
        the sampler's state after the draw is failed (not counted) without being queued again:
        the sampler draws it again (see :meth:`_draws_again`)."""
        recovered = []
        for trial in self.optuna.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            if not self._is_stale(trial):
                continue
            if self._draws_again(trial):
                if self._retire(trial):
                    recovered.append(trial.number)
                    logger.warning(
                        "Trial %d was left running by a driver that is gone before it saved "
                        "the sampler's state after drawing %s; failed it (not counted): the "
                        "sampler draws it again.",
                        trial.number,
                        trial.params,
                    )
                continue
            if self._requeue(trial):
                recovered.append(trial.number)
                logger.warning(
                    "Trial %d was left running by a driver that is gone; failed it and queued "
                    "its parameters %s again.",
                    trial.number,
                    trial.params,
                )
        return recovered

    # ------------------------------------------------------------------ optimize
    def optimize(
        self,
        objective: Callable[[optuna.trial.Trial], Any],
        n_trials: int | None = None,
        timeout: float | None = None,
        n_jobs: int = 1,
        catch: type[BaseException] | Sequence[type[BaseException]] = (),
        callbacks: Sequence[Callable[[Study, FrozenTrial], None]] | None = None,
        gc_after_trial: bool = False,
        show_progress_bar: bool = False,
        *,
        n_trials_mode: str = "total",
        progress: Any = None,
    ) -> list[int]:
        """Run trials until the study holds ``n_trials`` finished trials, or ``timeout``
        seconds of this call passed; returns the numbers of the trials this call ran.

        **n_trials is a total**: with ``n_trials_mode="total"`` (default) it is the number of
        finished trials (COMPLETE, PRUNED, FAIL; retried dead trials not counted) the study
        must hold at the end, counted in the storage. A resumed study, or several drivers
        (processes, ``n_jobs`` threads, ``gradhpo resume``) on one study, stop at exactly that
        many; calling ``optimize(f, n_trials=20)`` twice runs 20 trials, not 40. Optuna's
        meaning ("this many more") is ``n_trials_mode="more"``: the target becomes the number
        finished at the start of the call plus ``n_trials`` (trials other drivers finish
        meanwhile count towards it).

        ``objective(trial)`` returns a number (one per objective of a multi-objective study)
        or raises ``optuna.TrialPruned``. Anything else fails the trial with the reason in its
        user attribute ``error``: a returned non-number, NaN or infinity (the study goes on),
        an exception listed in ``catch`` (the study goes on), any other exception (it
        propagates). An interrupted trial (KeyboardInterrupt, SystemExit) is failed and its
        parameters queued again, so the next ``optimize`` or ``gradhpo resume`` continues it.

        ``n_jobs`` > 1 runs that many driver threads in this process (-1: one per CPU), as
        Optuna's: useful when the objective releases the GIL (PyTorch does) or waits; for
        CPU-bound Python use processes (:mod:`gradhpo.search.drivers`). Threads make the
        sampler's sequence depend on timing, so a seeded study is reproducible only with
        ``n_jobs=1``. ``callbacks`` are called as ``callback(study, frozen_trial)`` with this
        :class:`Study` after each trial this call ran. ``show_progress_bar`` draws a tqdm bar
        (``progress`` passes your own bar). ``gc_after_trial`` runs ``gc.collect()`` after
        each trial."""
        if not callable(objective):
            raise TypeError(f"optimize: objective must be callable, got {objective!r}")
        n_trials = self._check_optimize_args(n_trials, timeout, n_jobs, n_trials_mode)
        catch = _catch_tuple(catch)
        if callbacks is not None and not all(callable(c) for c in callbacks):
            raise TypeError(f"optimize: callbacks must be callables, got {callbacks!r}")
        if n_jobs == -1:
            n_jobs = os.cpu_count() or 1
        self.recover_stale_trials()
        target = n_trials
        if n_trials is not None and n_trials_mode == "more":
            target = len(self.finished_trials()) + n_trials
        elif n_trials is not None and _logging(logging.INFO):
            done = len(self.finished_trials())
            if done >= n_trials:
                logger.info(
                    "Study %r already holds %d finished trials; n_trials=%d counts the "
                    "study's total (n_trials_mode='more' runs that many more).",
                    self.name,
                    done,
                    n_trials,
                )
        deadline = None if timeout is None else time.monotonic() + timeout
        bar = progress
        own_bar = None
        if bar is None and show_progress_bar:
            bar = own_bar = tqdm(total=target, desc=self.name, unit="trial")
        # Samplers that exhaust their space (grid, brute force) call optuna's Study.stop(),
        # which only works inside Optuna's own loop; this loop honours the same flag.
        self.optuna._stop_flag = False
        ran: list[int] = []
        args = (objective, target, deadline, catch, list(callbacks or ()), bar, ran, gc_after_trial)
        try:
            if n_jobs == 1:
                self._driver_loop(*args)
            else:
                self._threads(n_jobs, args)
        finally:
            if own_bar is not None:
                own_bar.close()
        return ran

    @staticmethod
    def _check_optimize_args(n_trials: Any, timeout: Any, n_jobs: Any, mode: Any) -> int | None:
        if n_trials is not None and (
            isinstance(n_trials, bool) or not isinstance(n_trials, numbers.Integral) or n_trials < 0
        ):
            raise ValueError(f"optimize: n_trials must be an integer >= 0, got {n_trials!r}")
        if timeout is not None and (
            isinstance(timeout, bool)
            or not isinstance(timeout, numbers.Real)
            or not float(timeout) > 0
            or not math.isfinite(float(timeout))
        ):
            raise ValueError(f"optimize: timeout must be seconds > 0, got {timeout!r}")
        if n_trials is None and timeout is None:
            raise ValueError("optimize: give n_trials or timeout (or both)")
        if (
            isinstance(n_jobs, bool)
            or not isinstance(n_jobs, numbers.Integral)
            or (n_jobs < 1 and n_jobs != -1)
        ):
            raise ValueError(f"optimize: n_jobs must be an integer >= 1 or -1, got {n_jobs!r}")
        if mode not in _N_TRIALS_MODES:
            raise ValueError(
                f"optimize: n_trials_mode must be one of {list(_N_TRIALS_MODES)}, got {mode!r}"
            )
        return None if n_trials is None else int(n_trials)

    def _threads(self, n_jobs: int, args: tuple[Any, ...]) -> None:
        errors: list[BaseException] = []

        def work() -> None:
            try:
                self._driver_loop(*args)
            except BaseException as exc:  # noqa: BLE001 - handed to the calling thread
                errors.append(exc)
                self.optuna._stop_flag = True

        threads = [
            threading.Thread(target=work, name=f"gradhpo-driver-{k}", daemon=True)
            for k in range(n_jobs)
        ]
        for t in threads:
            t.start()
        try:
            for t in threads:
                t.join()
        except BaseException:
            # Interrupted while waiting: let the threads finish their trials, then re-raise.
            self.optuna._stop_flag = True
            for t in threads:
                t.join()
            raise
        if errors:
            raise errors[0]

    def _driver_loop(self, *args: Any) -> None:
        self.optuna._thread_local.in_optimize_loop = True
        try:
            self._loop(*args)
        finally:
            self.optuna._thread_local.in_optimize_loop = False

    def _loop(
        self,
        objective: Callable[[optuna.trial.Trial], Any],
        n_trials: int | None,
        deadline: float | None,
        catch: tuple[type[BaseException], ...],
        callbacks: list[Callable[[Study, FrozenTrial], None]],
        progress: Any,
        ran: list[int],
        gc_after_trial: bool,
    ) -> None:
        duplicates = 0
        while not self.optuna._stop_flag:
            counted = _sql_tally(self.optuna._storage, self.optuna._study_id)
            if counted is not None:  # a database: counted in SQL
                total, done, running, n_waiting = counted
                waiting = n_waiting > 0
            else:
                total, trials, base = self._listing_to_count()
                done, unfinished = self._tally(trials, base)
                running = sum(1 for t in unfinished if t.state == TrialState.RUNNING)
                waiting = any(t.state == TrialState.WAITING for t in unfinished)
            if progress is not None:
                progress.n = done
                progress.refresh()
            if n_trials is not None and done >= n_trials:
                break
            if deadline is not None and time.monotonic() >= deadline:
                break
            if n_trials is not None and done + running >= n_trials and not waiting:
                # Other drivers are finishing the last trials: wait instead of overshooting.
                time.sleep(0.5)
                self.recover_stale_trials()
                continue
            if waiting:
                trial = self.ask(waiting=True)
            else:
                # One listing after the ask serves the reseed check and, for a trial numbered
                # n_trials or more (only those can be surplus: see _surplus), the surplus
                # check. The new trial's number is at least len(trials): all trials are listed
                # then; the running ones otherwise (and all of them too in the rare case that
                # other drivers' trials pushed this one's number to n_trials meanwhile).
                full = n_trials is not None and total >= n_trials
                trial, listing = self._ask_fresh(full=full)
                if n_trials is not None and trial.number >= n_trials:
                    if not full:
                        listing = self.optuna._storage.get_all_trials(
                            self.optuna._study_id, deepcopy=False
                        )
                    if self._surplus(trial, n_trials, listing):
                        continue
            if not self._run_one(objective, trial, catch):
                duplicates += 1
                if duplicates >= MAX_DUPLICATES:
                    logger.warning(
                        "Study %r: the sampler proposed only parameters that were already "
                        "evaluated, %d times in a row; the search space looks exhausted, so "
                        "this driver stops (%d finished trials).",
                        self.name,
                        duplicates,
                        len(self.finished_trials()),
                    )
                    break
                continue
            duplicates = 0
            ran.append(trial.number)
            if callbacks:
                frozen = self.optuna._storage.get_trial(trial._trial_id)
                for callback in callbacks:
                    callback(self, frozen)
            if gc_after_trial:
                gc.collect()
        if progress is not None:
            progress.n = len(self.finished_trials())
            progress.refresh()

    def _listing_to_count(
        self,
    ) -> tuple[int, list[FrozenTrial], tuple[int, int] | None]:
        """What :meth:`_tally` counts: (the number of the study's trials, a listing, the
        settled point it starts at or None for all of them). A journal lists only the trials
        past the settled prefix (see :func:`_journal_trials`); other storages list all."""
        base = self._settled
        journal = _journal_of(self.optuna._storage)
        found = (
            None
            if journal is None
            else _journal_trials(journal, self.optuna._study_id, base[0], sync=True)
        )
        if found is not None:
            total, tail = found
            if (tail[0].number if tail else total) == base[0]:
                return total, tail, base
        trials = self.optuna.get_trials(deepcopy=False)
        return len(trials), trials, None

    def _tally(
        self, trials: Sequence[FrozenTrial], base: tuple[int, int] | None = None
    ) -> tuple[int, list[FrozenTrial]]:
        """The number of finished trials of the study that count, and the trials of
        ``trials`` that are not finished. ``trials``: a listing of all the study's trials, in
        number order as every Optuna storage gives them, or (``base`` = (k, c), a settled
        point) of those numbered k or more, the first k being finished with c of them
        counting. A full listing is counted from the settled trials of the last listing (see
        ``_settled``), so a long study is not walked whole at every trial."""
        if base is not None:
            (settled, settled_done), offset = base, base[0]
        else:
            settled, settled_done = self._settled
            offset = 0
            if settled > len(trials) or (settled and trials[settled - 1].number != settled - 1):
                settled, settled_done = 0, 0  # not the listing the tally was made from: afresh
        done = settled_done
        unfinished: list[FrozenTrial] = []
        for index in range(settled - offset, len(trials)):
            t = trials[index]
            if t.state in FINISHED_STATES:
                counts = int(not is_retried(t))
                done += counts
                if settled == index + offset and t.number == settled:
                    settled, settled_done = settled + 1, settled_done + counts
            else:
                unfinished.append(t)
        self._settled = (settled, settled_done)  # one assignment: threads see a whole pair
        return done, unfinished

    def _surplus(
        self, trial: optuna.trial.Trial, n_trials: int, trials: Sequence[FrozenTrial]
    ) -> bool:
        """Several drivers can pass the "fewer than n" check at once. After the ask every
        trial is visible, so decide by trial number: a fresh trial runs only if the finished
        trials plus the running trials numbered below it leave room. Otherwise it is closed as
        FAIL + ``gradhpo:surplus`` (not counted, parameters never trained).

        The loop checks only trials numbered ``n_trials`` or more; exactly ``n_trials``
        still holds. Trial numbers count every trial (retried, surplus and duplicate ones
        too), so at most ``k`` counted trials are numbered below ``k``. Take the counted
        trial H with the highest number. If H was not checked (numbered below ``n_trials``),
        every counted trial is numbered at most H's number, so there are at most
        ``n_trials`` of them. If H was checked, every trial numbered below it existed at
        H's check (numbers follow creation) and was counted there, as finished or as
        running ahead of H (those retired later no longer count: fewer still), so at most
        ``n_trials - 1`` counted trials are numbered below H. Enqueued trials are not
        checked, as before (the loop asks them only when it saw them waiting).

        ``trials``: all the study's trials, listed after ``trial`` was created."""
        done, unfinished = self._tally(trials)
        ahead = sum(
            1 for t in unfinished if t.state == TrialState.RUNNING and t.number < trial.number
        )
        if done + ahead < n_trials:
            return False
        storage = self.optuna._storage
        storage.set_trial_system_attr(trial._trial_id, _SURPLUS, True)
        self._unsaved.discard(trial._trial_id)
        storage.set_trial_state_values(trial._trial_id, state=TrialState.FAIL)
        logger.debug(
            "Trial %d not run: the other drivers' trials complete the study.", trial.number
        )
        return True

    def _values(self, result: Any) -> tuple[list[float] | None, str | None]:
        """The objective's return value as one float per objective, or why it is not one."""
        n = len(self.optuna.directions)
        several = not _is_scalar(result) and (
            isinstance(result, Sequence)
            and not isinstance(result, (str, bytes))
            or (getattr(result, "ndim", None) or 0) > 0
        )
        if n == 1 and several:
            return None, (
                f"objective returned {_short(result)} ({type(result).__name__}); a "
                "single-objective study needs one number"
            )
        if n > 1 and not several:
            return None, (
                f"objective returned {_short(result)} ({type(result).__name__}); this study "
                f"has {n} objectives {self.directions}: return a sequence of {n} numbers"
            )
        values = list(result) if several else [result]
        if len(values) != n:
            return None, (
                f"objective returned {len(values)} values {_short(result)}; this study has "
                f"{n} objectives {self.directions}"
            )
        floats = []
        for v in values:
            f = _as_float(v) if _is_scalar(v) or not hasattr(v, "__len__") else None
            if f is None:
                return None, (
                    f"objective returned {_short(v)} ({type(v).__name__}); expected a number"
                )
            if not math.isfinite(f):
                return None, f"objective returned a non-finite value {f!r}"
            floats.append(f)
        return floats, None

    def _run_one(
        self,
        objective: Callable[[optuna.trial.Trial], Any],
        trial: optuna.trial.Trial,
        catch: tuple[type[BaseException], ...],
    ) -> bool:
        """Run the objective on ``trial`` and finish the trial, whatever happens; False when
        it was a duplicate proposal (closed uncounted, see :meth:`claim`)."""
        try:
            result = objective(trial)
        except DuplicateProposal as exc:
            self._close_duplicate(trial, str(exc))
            return False
        except optuna.TrialPruned as exc:
            self._finish(trial, TrialState.PRUNED, None, str(exc) or None)
            return True
        except Exception as exc:
            self._finish(trial, TrialState.FAIL, None, f"{type(exc).__name__}: {exc}", exc)
            if isinstance(exc, catch):
                return True
            raise
        except BaseException:
            # KeyboardInterrupt, SystemExit: fail the trial and queue its parameters again, so
            # the next optimize (or `gradhpo resume`) continues it from its checkpoint.
            self._interrupted(trial)
            raise
        values, reason = self._values(result)
        if reason is not None:
            self._finish(trial, TrialState.FAIL, None, reason)
        else:
            self._finish(trial, TrialState.COMPLETE, values, None)
        return True

    def _close_duplicate(self, trial: optuna.trial.Trial, reason: str) -> None:
        """Close a duplicate proposal: FAIL + ``gradhpo:duplicate`` (not counted, never
        evaluated); the sampler's state after its draw is kept."""
        storage = self.optuna._storage
        self._save_sampler_state(trial)
        storage.set_trial_system_attr(trial._trial_id, _DUPLICATE, reason)
        storage.set_trial_state_values(trial._trial_id, state=TrialState.FAIL)
        logger.debug("Trial %d not run: %s.", trial.number, reason)

    def _interrupted(self, trial: optuna.trial.Trial) -> None:
        try:
            if trial.params:
                self._save_sampler_state(trial)
            frozen = self.optuna._storage.get_trial(trial._trial_id)
            if frozen.state == TrialState.RUNNING and self._requeue(frozen):
                logger.warning(
                    "Trial %d interrupted; failed it and queued its parameters again.",
                    trial.number,
                )
        except Exception:  # noqa: BLE001 - the interrupt matters more; recovery handles it
            logger.debug("could not requeue interrupted trial %d", trial.number, exc_info=True)

    def _finish(
        self,
        trial: optuna.trial.Trial,
        state: TrialState,
        values: list[float] | None,
        reason: str | None,
        exc: BaseException | None = None,
    ) -> None:
        storage = self.optuna._storage
        try:
            if state == TrialState.FAIL and reason is not None:
                storage.set_trial_user_attr(trial._trial_id, "error", reason)
            elif state == TrialState.PRUNED and reason is not None:
                storage.set_trial_user_attr(trial._trial_id, "pruned", reason)
            self._save_sampler_state(trial)
            if _tell_with_warning is not None:
                _tell_with_warning(self.optuna, trial, values, state=state, suppress_warning=True)
            else:  # pragma: no cover
                self.optuna.tell(trial, values, state=state)
        except BaseException:
            # Never leave it RUNNING because telling failed (a sampler's after_trial, ...).
            try:
                storage.set_trial_state_values(trial._trial_id, state=TrialState.FAIL)
            except Exception:  # noqa: BLE001 - already finished, or the storage is gone
                pass
            raise
        self._log_finished(trial, state, values, reason, exc)

    def _log_finished(
        self,
        trial: optuna.trial.Trial,
        state: TrialState,
        values: list[float] | None,
        reason: str | None,
        exc: BaseException | None,
    ) -> None:
        if state == TrialState.FAIL:
            if _logging(logging.WARNING):
                logger.warning(
                    "Trial %d failed with parameters %s: %s",
                    trial.number,
                    trial.params,
                    reason,
                    exc_info=exc if exc is not None and _logging(logging.DEBUG) else None,
                )
            return
        if not _logging(logging.INFO):
            return
        if state == TrialState.PRUNED:
            logger.info("Trial %d pruned%s.", trial.number, f" ({reason})" if reason else "")
            return
        assert values is not None
        if len(values) > 1:
            logger.info(
                "Trial %d finished with values %s and parameters %s.",
                trial.number,
                values,
                trial.params,
            )
            return
        best = self.best_trial
        tail = "" if best is None else f" Best is trial {best.number} with value {best.value}."
        logger.info(
            "Trial %d finished with value %s and parameters %s.%s",
            trial.number,
            values[0],
            trial.params,
            tail,
        )


def _catch_tuple(catch: Any) -> tuple[type[BaseException], ...]:
    items = (catch,) if isinstance(catch, type) else tuple(catch or ())
    for item in items:
        if not (isinstance(item, type) and issubclass(item, BaseException)):
            raise TypeError(f"optimize: catch must hold exception classes, got {item!r}")
    return items


# ---------------------------------------------------------------------- create / load
def _check_directions(direction: Any, directions: Any, metric: Any) -> list[Direction]:
    """The study's directions from ``direction``/``directions``/``metric`` (see
    :func:`create_study`); every contradiction is a ValueError naming both."""
    if metric is not None and metric not in METRICS:
        raise ValueError(f"create_study: metric must be one of {list(METRICS)}, got {metric!r}")
    if direction is not None and directions is not None:
        raise ValueError(
            f"create_study: give direction={direction!r} or directions={directions!r}, not both"
        )
    if directions is not None:
        if isinstance(directions, str) or not isinstance(directions, Sequence) or not directions:
            raise ValueError(
                "create_study: directions must be a non-empty list such as "
                f"['minimize', 'maximize'], got {directions!r}"
            )
        result = list(directions)
        field = "directions"
    else:
        result = [direction] if direction is not None else []
        field = "direction"
    for d in result:
        if d not in ("maximize", "minimize"):
            raise ConfigError(f"{field}: expected 'maximize' or 'minimize', got {d!r}")
    if metric is not None:
        wanted = METRICS[metric]
        if not result:
            result = [wanted]
        elif len(result) > 1:
            raise ValueError(
                f"create_study: metric={metric!r} names one objective but directions={result!r} "
                "has several; leave metric out of multi-objective studies"
            )
        elif result[0] != wanted:
            raise ValueError(
                f"create_study: metric {metric!r} must be {wanted}d but direction={result[0]!r}"
            )
    return cast("list[Direction]", result) or ["maximize"]


def _existing(directory: Path) -> bool:
    return any((directory / f).exists() for f in ("study.json", JOURNAL_FILE, SQLITE_FILE))


def create_study(
    directory: str | os.PathLike[str],
    *,
    name: str | None = None,
    direction: str | None = None,
    directions: Sequence[str] | None = None,
    metric: str | None = None,
    sampler: str | Mapping[str, Any] | optuna.samplers.BaseSampler = "tpe",
    pruner: str | Mapping[str, Any] | optuna.pruners.BasePruner | None = "median",
    seed: int | None = 0,
    max_resource: int | None = None,
    search_space: Any = None,
    storage: str | BaseStorage | None = None,
    load_if_exists: bool = False,
    stale_after: float = 600.0,
) -> Study:
    """Create a new study in ``directory`` (a folder: ``study.json``, sampler state,
    checkpoints; refuses one that holds a study unless ``load_if_exists``).

    ``storage``: where the trials live. ``None`` (default) or ``"journal"``: Optuna's journal
    file ``study.journal`` in the directory; ``"sqlite"``: ``study.db`` in the directory; an
    Optuna storage URL (``sqlite:///path.db``, ``postgresql://user:pw@host/db``,
    ``mysql://...``); or an ``optuna.storages.BaseStorage`` object (e.g. ``InMemoryStorage()``;
    pass it again to :func:`load_study`). A URL as ``directory`` is a ValueError.

    Direction: ``direction="maximize"|"minimize"``, ``directions=[...]`` for a
    multi-objective study (samplers: tpe, nsga2, random, ...), or ``metric="val_loss"`` /
    ``"val_accuracy"``, which sets the direction the metric needs (and must agree with a
    direction given too). With none of them the study maximizes (gradhpo's default metric is
    validation accuracy); :func:`~gradhpo.search.fit_trial` refuses a metric whose direction
    contradicts the study's, so a loss cannot be maximized by mistake.

    ``sampler``/``pruner`` are names (see :data:`~gradhpo.search.samplers.SAMPLERS`),
    mappings with constructor arguments, or Optuna objects. Named specs are stored in
    ``study.json`` so :func:`load_study` can rebuild them; with objects, pass them again.
    ``search_space``: a :class:`~gradhpo.search.SearchSpace`, a ``search.space`` mapping, or
    (grid sampler) a plain ``{"x": [1, 2, 3]}`` grid, stored in ``study.json`` when it is
    plain data. ``load_if_exists=True`` opens the study already in ``directory`` (or, with an
    external storage, the study of that name there) after checking that its directions and
    named sampler/pruner match."""
    directory = _check_directory(directory, "create_study")
    kind, value = _storage_spec(storage, "create_study")
    dirs = _check_directions(direction, directions, metric)
    if name is not None and (not isinstance(name, str) or not name):
        raise ValueError(f"create_study: name must be a non-empty string, got {name!r}")
    if not isinstance(load_if_exists, bool):
        raise ValueError(
            f"create_study: load_if_exists must be True or False, got {load_if_exists!r}"
        )
    if _existing(directory):
        if not load_if_exists:
            raise ConfigError(
                f"study directory {str(directory)!r} already holds a study; resume it instead "
                "(load_study, or create_study(..., load_if_exists=True))"
            )
        return _load_existing(
            directory, dirs, sampler, pruner, search_space, storage, stale_after, name
        )
    sampler_obj = make_sampler(sampler, search_space, seed=seed)
    pruner_obj = make_pruner(pruner, max_resource=max_resource)
    name = name or directory.resolve().name
    meta: dict[str, Any] = {
        "name": name,
        "direction": dirs[0] if len(dirs) == 1 else None,
        "directions": dirs,
        "metric": metric,
        "sampler": sampler if isinstance(sampler, (str, Mapping)) else None,
        "pruner": pruner if isinstance(pruner, (str, Mapping)) or pruner is None else None,
        "seed": seed,
        "max_resource": max_resource,
        "storage": _storage_record(kind, value),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    plain_space = _plain_space(search_space)
    if plain_space is not None:
        meta["search_space"] = plain_space
    # An external storage is opened first: a bad URL or a taken name leaves no folder behind.
    opened: BaseStorage | None = _url_storage(value) if kind == "url" else value
    if kind in _EMBEDDED:
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / _EMBEDDED[kind]
        opened = _journal_storage(path) if kind == "journal" else _sqlite_storage(path)
    try:
        study = optuna.create_study(
            storage=opened,
            study_name=name,
            directions=dirs,
            sampler=sampler_obj,
            pruner=pruner_obj,
            load_if_exists=load_if_exists and kind in ("url", "object"),
        )
    except optuna.exceptions.DuplicatedStudyError:
        raise ValueError(
            f"create_study: storage {_describe(meta['storage'])!r} already holds a study named "
            f"{name!r}; pass load_if_exists=True to continue it, or another name="
        ) from None
    if [d.name.lower() for d in study.directions] != dirs:
        raise ValueError(
            f"create_study: the study {name!r} in the storage has directions "
            f"{[d.name.lower() for d in study.directions]}, not {dirs}"
        )
    directory.mkdir(parents=True, exist_ok=True)
    write_json(directory / "study.json", meta)
    return Study(
        directory, study, stale_after=stale_after, storage_record=meta["storage"], seed=seed
    )


def _plain_space(space: Any) -> Any:
    """A ``search_space`` given as plain data (a grid dict or a ``search.space`` mapping),
    JSON-serializable, to be stored in ``study.json``; ``None`` otherwise."""
    if not isinstance(space, Mapping):
        return None
    try:
        return json.loads(json.dumps(space))
    except (TypeError, ValueError):
        return None


def _load_existing(
    directory: Path,
    dirs: list[Direction],
    sampler: Any,
    pruner: Any,
    search_space: Any,
    storage: Any,
    stale_after: float,
    name: str | None,
) -> Study:
    meta = _read_meta(directory, "create_study")
    stored = meta.get("directions") or [meta.get("direction", "maximize")]
    if stored != dirs:
        raise ValueError(
            f"create_study(load_if_exists=True): {str(directory)!r} holds a study with "
            f"directions {stored}, not {dirs}"
        )
    if name is not None and name != meta["name"]:
        raise ValueError(
            f"create_study(load_if_exists=True): {str(directory)!r} holds study "
            f"{meta['name']!r}, not name={name!r}"
        )
    for field, given in (("sampler", sampler), ("pruner", pruner)):
        if isinstance(given, (str, Mapping)) and meta.get(field) is not None:
            if _spec_name(given) != _spec_name(meta[field]) or (
                isinstance(given, Mapping) and dict(given) != meta[field]
            ):
                raise ValueError(
                    f"create_study(load_if_exists=True): {str(directory)!r} was created with "
                    f"{field}={meta[field]!r}, not {field}={given!r}"
                )
    return load_study(
        directory,
        sampler=sampler if isinstance(sampler, optuna.samplers.BaseSampler) else None,
        pruner=pruner if isinstance(pruner, optuna.pruners.BasePruner) else None,
        search_space=search_space,
        storage=storage,
        stale_after=stale_after,
    )


def _spec_name(spec: Any) -> Any:
    return spec.get("name") if isinstance(spec, Mapping) else spec


def load_study(
    directory: str | os.PathLike[str],
    *,
    sampler: optuna.samplers.BaseSampler | None = None,
    pruner: optuna.pruners.BasePruner | None = None,
    search_space: Any = None,
    storage: str | BaseStorage | None = None,
    stale_after: float = 600.0,
) -> Study:
    """Open the study in ``directory`` with its sampler (rebuilt from ``study.json`` unless
    given) and the sampler's saved random state. The storage is the one ``study.json``
    records (``study.journal``, ``study.db``, a URL without password); a URL with a password
    or a storage object must be passed again as ``storage=``."""
    directory = _check_directory(directory, "load_study")
    meta = _read_meta(directory, "load_study")
    opened, record = _open_storage(directory, meta, storage, "load_study")
    if search_space is None:
        search_space = meta.get("search_space")
    if sampler is None:
        if meta.get("sampler") is None:
            raise ConfigError(
                f"{str(directory)!r} was created with a sampler object; pass sampler=..."
            )
        sampler = make_sampler(meta["sampler"], search_space, seed=meta.get("seed"))
    if pruner is None:
        pruner = make_pruner(meta.get("pruner"), max_resource=meta.get("max_resource"))
    try:
        study = optuna.load_study(
            study_name=meta["name"], storage=opened, sampler=sampler, pruner=pruner
        )
    except KeyError:
        raise ConfigError(
            f"{str(directory)!r}: the storage ({_describe(record)}) holds no study named "
            f"{meta['name']!r}"
        ) from None
    after = _load_sampler_state(sampler, directory)
    loaded = Study(
        directory, study, stale_after=stale_after, storage_record=record, seed=meta.get("seed")
    )
    loaded._state_after = after
    return loaded
