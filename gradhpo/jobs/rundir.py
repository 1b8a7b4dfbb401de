"""The one run-directory layout: every job (``train``, ``study``, ``pbt``) lives in
``<output.dir>/<name>/`` with its ``config.yaml`` and a kind marker ``gradhpo.json``
(``{"kind", "layout", "name"}``) beside what the kind keeps (``checkpoint.pt`` and
``metrics.json``; ``study.journal`` (or ``study.db``) and ``trials/``; ``pbt.db`` and
``checkpoints/``).

A directory comes into existence whole: :func:`create_run_dir` builds it in a hidden sibling
and renames it into place, so a kill during creation leaves either no run directory or a
complete one (never a ``study.db`` without its config); the hidden build folder a killed
creator leaves (it is named after its host and process) is removed by the next creation of
that directory. :func:`open_run_dir` reads the
marker and the config and turns every unreadable state into a :class:`ConfigError` that
names the file and says what to do. Directories made before the marker existed are
recognised by their files.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import socket
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import yaml

from gradhpo.config import ConfigError, load_yaml
from gradhpo.files import write_json, write_text

__all__ = [
    "KINDS",
    "MARKER",
    "check_output_dirs",
    "check_pbt_checkpoints",
    "check_writable_dir",
    "create_run_dir",
    "open_run_dir",
    "run_dir_of",
]

MARKER = "gradhpo.json"
LAYOUT = 1
#: Kinds of run directories and the file that identifies a directory made before the marker.
KINDS: dict[str, tuple[str, ...]] = {
    "train": ("checkpoint.pt",),
    "study": ("study.journal", "study.db"),
    "pbt": ("pbt.db",),
}
_DISPLAY = {"train": "a `gradhpo train` run", "study": "a study", "pbt": "a PBT run"}


def run_dir_of(config: Mapping[str, Any]) -> Path:
    """``<output.dir>/<name>`` of a validated config; the name may not leave ``output.dir``."""
    name = str(config["name"])
    if name in (".", "..") or "/" in name or "\\" in name or name.startswith("."):
        raise ConfigError(f"name: must be a plain folder name inside output.dir, got {name!r}")
    return Path(config["output"]["dir"]) / name


def check_writable_dir(field: str, path: str | os.PathLike[str]) -> Path:
    """Check, without creating anything, that the folder ``path`` (the value of ``field``,
    e.g. ``output.tensorboard_dir``) exists as a writable folder or can be created: its
    nearest existing ancestor is a folder this process may write into. A ConfigError naming
    the field, the value and the obstacle otherwise (a regular file on the way, no write
    permission). Root passes every permission check, as the operating system lets it."""
    path = Path(path)
    probe = path
    while not os.path.lexists(probe):
        if probe.parent == probe:
            break
        probe = probe.parent
    if os.path.lexists(probe) and not probe.is_dir():
        problem = (
            "is a file, not a folder"
            if probe == path
            else f"cannot be created: {str(probe)!r} is a file"
        )
        raise ConfigError(f"{field}: {str(path)!r} {problem}; choose another path")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ConfigError(
            f"{field}: {str(path)!r} is not writable (no write permission in "
            f"{str(probe)!r}); choose another path"
        )
    return path


def check_output_dirs(config: Mapping[str, Any]) -> None:
    """``output.dir`` and ``output.tensorboard_dir`` of a validated config can be written
    (see :func:`check_writable_dir`): checked in the pre-flight, before anything is made."""
    output = config.get("output") or {}
    for key in ("dir", "tensorboard_dir"):
        if isinstance(output.get(key), (str, os.PathLike)):
            check_writable_dir(f"output.{key}", output[key])


def create_run_dir(
    directory: Path,
    kind: str,
    config: Mapping[str, Any],
    populate: Callable[[Path], None] | None = None,
) -> Path:
    """Create the run directory ``directory`` of ``kind`` with ``config.yaml`` and the
    marker, after ``populate(tmp)`` has put the kind's own files in (e.g. an empty study
    database), all in a hidden temporary sibling renamed into place at the end."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {list(KINDS)}, got {kind!r}")
    check_output_dirs(config)  # a job must not fail later on a folder it cannot make
    directory = Path(directory)
    if directory.exists():
        existing = _kind_or_none(directory)
        what = _DISPLAY.get(existing or "", "files")
        hint = (
            f"; continue it with `gradhpo resume {directory}`"
            if existing in ("study", "pbt")
            else ""
        )
        raise ConfigError(
            f"output: {str(directory)!r} already holds {what}{hint} or choose another name"
        )
    try:
        directory.parent.mkdir(parents=True, exist_ok=True)
        _remove_dead_siblings(directory)
        tmp = Path(
            tempfile.mkdtemp(
                dir=directory.parent,
                prefix=f".{directory.name}.{socket.gethostname()}.{os.getpid()}.",
                suffix=".tmp",
            )
        )
    except OSError as exc:
        raise ConfigError(
            f"output.dir: cannot create {str(directory.parent)!r}: {exc.strerror}"
        ) from exc
    try:
        write_text(tmp / "config.yaml", yaml.safe_dump(dict(config), sort_keys=False))
        if populate is not None:
            populate(tmp)
        write_json(tmp / MARKER, {"kind": kind, "layout": LAYOUT, "name": directory.name})
        os.rename(tmp, directory)  # fails if another process created it meanwhile
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def check_pbt_checkpoints(directory: str | os.PathLike[str]) -> None:
    """Before a PBT run is resumed: every member's current checkpoint (what the run continues
    from) exists and loads (``torch.load(weights_only=True)``); otherwise one ConfigError
    naming the file, with nothing changed (the checkpoint is read, never repaired)."""
    import torch  # noqa: PLC0415 - only a resume needs it

    from gradhpo.pbt.store import PBTDatabase  # noqa: PLC0415

    db = PBTDatabase(directory)
    try:
        paths = [
            (m["member"], db.checkpoint_path(m["checkpoint"]))
            for m in db.members()
            if m["checkpoint"] is not None
        ]
    except KeyError as exc:
        raise ConfigError(f"{str(db.path)!r}: inconsistent PBT database ({exc})") from exc
    finally:
        db.close()
    fix = "restore it from a backup or start a new run under another name"
    seen: set[Path] = set()
    for member, path in paths:
        if path in seen:  # members that share a checkpoint: read it once
            continue
        seen.add(path)
        if not path.is_file():
            raise ConfigError(f"{str(path)!r}: member {member}'s checkpoint is missing; {fix}")
        try:
            torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - whatever the damage: name the file
            first = str(exc).splitlines()[0] if str(exc) else ""
            raise ConfigError(
                f"{str(path)!r}: member {member}'s checkpoint is unreadable "
                f"({type(exc).__name__}: {first}); {fix}"
            ) from exc


def _remove_dead_siblings(directory: Path) -> None:
    """Remove the hidden build folders of ``directory`` left by creators that were killed
    (``.<name>.<host>.<pid>.<random>.tmp``, this host, the process gone): litter, never a
    run directory. Folders of live processes, other hosts or another naming stay."""
    host = socket.gethostname()
    for sibling in directory.parent.glob(f".{glob.escape(directory.name)}.*.tmp"):
        parts = sibling.name[len(directory.name) + 2 :].split(".")
        if len(parts) < 4 or ".".join(parts[:-3]) != host or not parts[-3].isdigit():
            continue
        pid = int(parts[-3])
        if pid == os.getpid():
            continue
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(sibling, ignore_errors=True)
        except OSError:
            continue


def _kind_or_none(directory: Path) -> str | None:
    marker = directory / MARKER
    if marker.is_file():
        try:
            kind = json.loads(marker.read_text(encoding="utf-8")).get("kind")
        except (OSError, ValueError, AttributeError) as exc:
            raise ConfigError(
                f"{str(marker)!r}: unreadable kind marker ({exc}); it should read "
                '{"kind": "train" | "study" | "pbt", ...}'
            ) from exc
        if kind not in KINDS:
            raise ConfigError(
                f"{str(marker)!r}: unknown kind {kind!r}; expected one of {list(KINDS)}"
            )
        return kind
    for kind, probes in KINDS.items():
        if any((directory / probe).exists() for probe in probes):
            return kind
    return None


def open_run_dir(directory: str | os.PathLike[str], kind: str | None = None) -> tuple[str, dict]:
    """The kind and the raw config of an existing run directory (``kind`` given: it must be
    that kind). Every problem is one :class:`ConfigError` naming the file."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ConfigError(f"run directory not found: {str(directory)!r}")
    found = _kind_or_none(directory)
    if found is None:
        raise ConfigError(
            f"{str(directory)!r} is not a gradhpo run directory (no {MARKER}, study.journal, "
            "study.db or pbt.db)"
        )
    if kind is not None and found != kind:
        raise ConfigError(f"{str(directory)!r} holds a {found} run, not a {kind} run")
    path = directory / "config.yaml"
    if not path.is_file():
        raise ConfigError(f"{str(path)!r} is missing: the run directory is incomplete")
    config = load_yaml(path)
    if found == "pbt":
        # SQLite would make an empty database of a missing or 0-byte file and start over.
        db = directory / "pbt.db"
        if not db.is_file() or db.stat().st_size == 0:
            state = "missing" if not db.is_file() else "empty (0 bytes)"
            raise ConfigError(
                f"{str(db)!r} is {state}: the PBT run's members and scores are gone; restore "
                "it from a backup or start a new run under another name"
            )
    return found, config
