"""The PBT database: member state, scores, lineage and reference-counted checkpoints.

One SQLite file (``pbt.db``) per PBT run holds

* ``meta``: key/value JSON (config, manager RNG state, progress);
* ``members``: each member's current step, hyperparameter values, last score and the id of
  the checkpoint it resumes from;
* ``checkpoints``: files under ``checkpoints/`` with a reference count;
* ``scores``: every evaluation ``(step, member, score, values)``;
* ``lineage``: every exploit ``(step, member, source, values before, values after)``.

Reference counting is what keeps a checkpoint alive while anyone still needs it (the failure
of Ray Tune issues #9036 / #27170 was a checkpoint deleted while another trial was about to
restore from it). A checkpoint is referenced by every member whose current state it is —
its owner and each member that copied it in an exploit — and deleted only when the last
reference goes. All changes of one PBT step are one transaction; files are deleted after the
commit, so a killed process never leaves the database pointing at a missing file (it may
leave an unreferenced file, which :meth:`PBTDatabase.sweep` removes on resume).
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from gradhpo.config import ConfigError
from gradhpo.files import atomic_write, write_torch

__all__ = ["PBTDatabase"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS members (
    member INTEGER PRIMARY KEY, step INTEGER NOT NULL, checkpoint INTEGER,
    vals TEXT NOT NULL, score REAL);
CREATE TABLE IF NOT EXISTS checkpoints (
    id INTEGER PRIMARY KEY AUTOINCREMENT, member INTEGER NOT NULL, step INTEGER NOT NULL,
    path TEXT NOT NULL, refs INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS scores (
    step INTEGER NOT NULL, member INTEGER NOT NULL, score REAL, vals TEXT NOT NULL, time REAL);
CREATE TABLE IF NOT EXISTS lineage (
    step INTEGER NOT NULL, member INTEGER NOT NULL, source INTEGER NOT NULL,
    checkpoint INTEGER NOT NULL, old TEXT NOT NULL, new TEXT NOT NULL, time REAL);
"""


def _dumps(value: Any) -> str:
    return json.dumps(value, sort_keys=True)


class PBTDatabase:
    """Access to ``<directory>/pbt.db`` and ``<directory>/checkpoints/``."""

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = Path(directory)
        self.checkpoint_dir = self.directory / "checkpoints"
        self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.directory / "pbt.db"
        self.conn = sqlite3.connect(self.path, timeout=60, isolation_level=None)
        try:
            self.conn.execute("PRAGMA journal_mode=WAL")
            self.conn.execute("PRAGMA synchronous=NORMAL")
            self.conn.executescript(_SCHEMA)
        except sqlite3.DatabaseError as exc:
            self.conn.close()
            raise ConfigError(
                f"{str(self.path)!r}: not a readable PBT database ({exc}); restore it from a "
                "backup or start a new run under another name"
            ) from exc
        self._to_delete: list[Path] = []

    def close(self) -> None:
        self.conn.close()

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """One atomic PBT step; files released inside are deleted after the commit."""
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self.conn.execute("ROLLBACK")
            self._to_delete.clear()
            raise
        self.conn.execute("COMMIT")
        for path in self._to_delete:
            path.unlink(missing_ok=True)
        self._to_delete.clear()

    # ------------------------------------------------------------------ meta
    def get_meta(self, key: str, default: Any = None) -> Any:
        row = self.conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return default if row is None else json.loads(row[0])

    def set_meta(self, key: str, value: Any) -> None:
        self.conn.execute(
            "INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, _dumps(value))
        )

    # ------------------------------------------------------------------ checkpoints
    def new_checkpoint_path(self, member: int, step: int) -> Path:
        """A fresh file name for a member's state. Unique: one member may write twice at one
        step (its own state, then the state it holds after copying another member)."""
        return self.checkpoint_dir / f"member{member:03d}_step{step:09d}_{uuid.uuid4().hex[:8]}.pt"

    def write_checkpoint(self, member: int, step: int, state: Mapping[str, Any]) -> Path:
        """Write a member's state to a new file atomically; it is not referenced yet (call
        :meth:`add_checkpoint` inside the step's transaction)."""
        path = self.new_checkpoint_path(member, step)
        return write_torch(path, dict(state))

    def write_checkpoint_bytes(self, path: Path, data: bytes) -> Path:
        """Write a checkpoint file's content (a member state as bytes, from a task that cannot
        reach this directory) to ``path`` (from :meth:`new_checkpoint_path`) atomically; it is
        not referenced yet (call :meth:`add_checkpoint` inside the step's transaction)."""
        with atomic_write(path, "wb") as fh:
            fh.write(data)
        return path

    def add_checkpoint(self, member: int, step: int, path: Path) -> int:
        cur = self.conn.execute(
            "INSERT INTO checkpoints (member, step, path, refs) VALUES (?, ?, ?, 0)",
            (member, step, path.name),
        )
        assert cur.lastrowid is not None  # every INSERT sets it
        return cur.lastrowid

    def acquire(self, checkpoint: int) -> None:
        self.conn.execute("UPDATE checkpoints SET refs = refs + 1 WHERE id = ?", (checkpoint,))

    def release(self, checkpoint: int | None) -> None:
        if checkpoint is None:
            return
        self.conn.execute("UPDATE checkpoints SET refs = refs - 1 WHERE id = ?", (checkpoint,))
        row = self.conn.execute(
            "SELECT refs, path FROM checkpoints WHERE id = ?", (checkpoint,)
        ).fetchone()
        if row is not None and row[0] <= 0:
            self.conn.execute("DELETE FROM checkpoints WHERE id = ?", (checkpoint,))
            self._to_delete.append(self.checkpoint_dir / row[1])

    def checkpoint_path(self, checkpoint: int) -> Path:
        row = self.conn.execute(
            "SELECT path FROM checkpoints WHERE id = ?", (checkpoint,)
        ).fetchone()
        if row is None:
            raise KeyError(f"checkpoint {checkpoint} is not in the database")
        return self.checkpoint_dir / row[0]

    def checkpoint_bytes(self, checkpoint: int) -> bytes:
        """The content of a checkpoint's file, for a task that cannot reach this directory
        (it loads it with ``weights_only=True``)."""
        return self.checkpoint_path(checkpoint).read_bytes()

    def load_checkpoint(self, checkpoint: int) -> dict[str, Any]:
        return torch.load(self.checkpoint_path(checkpoint), map_location="cpu", weights_only=True)

    def refcounts(self) -> dict[int, int]:
        return dict(self.conn.execute("SELECT id, refs FROM checkpoints").fetchall())

    def sweep(self) -> list[Path]:
        """Repair after a killed step: reference counts are set to the number of members
        pointing at each checkpoint (an extra reference held by a step that never finished is
        dropped),
        unreferenced checkpoints are deleted, and so are files the database does not know."""
        pointing: dict[int, int] = {}
        for (ck,) in self.conn.execute(
            "SELECT checkpoint FROM members WHERE checkpoint IS NOT NULL"
        ):
            pointing[ck] = pointing.get(ck, 0) + 1
        with self.transaction():
            for ck, refs in self.refcounts().items():
                if pointing.get(ck, 0) != refs:
                    self.conn.execute(
                        "UPDATE checkpoints SET refs = ? WHERE id = ?", (pointing.get(ck, 0), ck)
                    )
            self.conn.execute("DELETE FROM checkpoints WHERE refs <= 0")
        known = {row[0] for row in self.conn.execute("SELECT path FROM checkpoints")}
        removed = []
        for path in self.checkpoint_dir.iterdir():
            if path.name not in known:
                path.unlink(missing_ok=True)
                removed.append(path)
        return removed

    # ------------------------------------------------------------------ members
    def set_member(
        self,
        member: int,
        step: int,
        checkpoint: int | None,
        values: Mapping[str, Any],
        score: float | None,
    ) -> None:
        """Point ``member`` at ``checkpoint`` (acquired) and release what it pointed at."""
        row = self.conn.execute(
            "SELECT checkpoint FROM members WHERE member = ?", (member,)
        ).fetchone()
        old = row[0] if row is not None else None
        if checkpoint is not None:
            self.acquire(checkpoint)
        self.conn.execute(
            "INSERT OR REPLACE INTO members (member, step, checkpoint, vals, score) VALUES (?, ?, ?, ?, ?)",
            (member, step, checkpoint, _dumps(dict(values)), score),
        )
        if old is not None:
            self.release(old)

    def members(self) -> list[dict[str, Any]]:
        rows = self.conn.execute(
            "SELECT member, step, checkpoint, vals, score FROM members ORDER BY member"
        )
        return [
            {"member": m, "step": s, "checkpoint": c, "values": json.loads(v), "score": sc}
            for m, s, c, v, sc in rows.fetchall()
        ]

    # ------------------------------------------------------------------ history
    def record_score(self, step: int, member: int, score: float, values: Mapping[str, Any]) -> None:
        self.conn.execute(
            "INSERT INTO scores (step, member, score, vals, time) VALUES (?, ?, ?, ?, ?)",
            (step, member, score, _dumps(dict(values)), time.time()),
        )

    def record_exploit(
        self,
        step: int,
        member: int,
        source: int,
        checkpoint: int,
        old: Mapping[str, Any],
        new: Mapping[str, Any],
    ) -> None:
        self.conn.execute(
            "INSERT INTO lineage (step, member, source, checkpoint, old, new, time) VALUES (?, ?, ?, ?, ?, ?, ?)",
            (step, member, source, checkpoint, _dumps(dict(old)), _dumps(dict(new)), time.time()),
        )

    def scores(self) -> list[dict[str, Any]]:
        rows = self.conn.execute(
            "SELECT step, member, score, vals FROM scores ORDER BY rowid"
        ).fetchall()
        return [
            {"step": s, "member": m, "score": sc, "values": json.loads(v)} for s, m, sc, v in rows
        ]

    def lineage(self) -> list[dict[str, Any]]:
        rows = self.conn.execute(
            "SELECT step, member, source, checkpoint, old, new FROM lineage ORDER BY rowid"
        ).fetchall()
        return [
            {
                "step": s,
                "member": m,
                "source": src,
                "checkpoint": c,
                "old": json.loads(o),
                "new": json.loads(n),
            }
            for s, m, src, c, o, n in rows
        ]
