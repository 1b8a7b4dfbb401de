"""`gradhpo pbt` / `resume` killed (SIGKILL) at named points - inside the run directory's
creation, during a member checkpoint's write, inside a step's database transaction, right
before and right after its COMMIT, between the deletions that follow a commit, before the
best member is recorded - then resumed: the result is the uninterrupted run's, plain,
hybrid (a `tuner` in every member) and batched (two vmapped groups of two) alike (issue 16). A population on two processes whose
checkpoints move through the executor (`pbt.checkpoints: executor`: the driver writes what
the tasks return) killed between a task's return and the driver's write of its state, and at
the step's commit, resumes to the uninterrupted in-process run, one task per member or per batched group
(issue 17). So does an async
population on one worker process, killed with a task per member in flight; on two workers
(checkpoints through the executor or in the run directory) every interval is scored once.

The points are those of tests/kill_points.py: each kill lands exactly there, every run."""

from __future__ import annotations

import copy
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from helpers import HYBRID_TUNER, digits_pbt_config, members_per_checkpoint, run_result
from kill_points import command

from gradhpo.pbt.store import PBTDatabase

PLAIN = digits_pbt_config("pop")
# Hybrid: every member also tunes a carried forward-mode lr schedule and its momentum by
# hypergradient; PBT explores what gradients cannot reach.
HYBRID = digits_pbt_config("hybrid", tuner=HYBRID_TUNER)
# Async: members served one at a time, one transaction per member step (2 exploits here).
ASYNC: dict[str, Any] = {**copy.deepcopy(PLAIN), "name": "apop"}
ASYNC["pbt"]["mode"] = "async"
# Batched: two groups of two members, each one vmapped model with its own dropout stream.
BATCHED = digits_pbt_config("bpop")
BATCHED["pbt"].update(
    batched=True,
    groups=2,
    space={
        "optimizer.lr": {"type": "float", "low": 0.02, "high": 0.3, "log": True},
        "optimizer.momentum": {"type": "float", "low": 0.5, "high": 0.95},
    },
)
HYBRID["pbt"]["space"] = {
    "training.batch_size": {"type": "categorical", "choices": [32, 64]},
    "model.dropout": {"type": "float", "low": 0.05, "high": 0.5},
}

# (command, point) in order; every kill must land. COMMIT 1 of a new run is the members'
# creation, COMMIT 1 of a resume the repair (sweep) of what a kill left; then one per step.
KILLS = [
    ("pbt", "replaced:*/.{name}.*.tmp/config.yaml"),  # creation: the config in the hidden folder
    ("pbt", "sql:PRAGMA journal_mode"),  # creation: the database being made in it
    ("pbt", "rename:*/.{name}.*.tmp"),  # creation: all written, not yet renamed into place
    ("pbt", "commit@3"),  # step 1 committed; step 2 about to COMMIT: its changes are lost
    ("resume", "replace:*/checkpoints/member*@2"),  # a checkpoint written, not renamed
    ("resume", "committed@2"),  # step 2 committed, the files it released not yet deleted
    ("resume", "unlink:*/checkpoints/member*@1"),  # between the deletions of the repair
    ("resume", "sql:INSERT INTO lineage@1"),  # inside step 3's transaction, before its exploit
    ("resume", "sql:'best'"),  # every step committed, the best member not yet recorded
]


# On two processes, checkpoints through the executor: every checkpoint write is the driver's
# (killed by these points; under `checkpoints: files` the workers write and no kill lands).
# A step here writes 4 trained states, then 1 copier's state, then COMMITs.
EXECUTOR_KILLS = [
    ("pbt", "replace:*/checkpoints/member*@1"),  # step 1's tasks returned; none written yet
    ("resume", "replaced:*/checkpoints/member*@3"),  # three of the four states written
    ("resume", "replace:*/checkpoints/member*@5"),  # the copier's state returned, not written
    ("resume", "commit@2"),  # step 1 written whole, its COMMIT (1: the repair) not run
    ("resume", "committed@3"),  # step 2 committed, the files it released not yet deleted
    ("resume", "sql:INSERT INTO lineage@1"),  # inside step 3's transaction
    ("resume", "sql:'best'"),  # every step committed: the resume runs no task at all
]


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.run(
        args, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=300
    )


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "gradhpo.cli", *args, "--no-progress"]


def _left_consistent(runs: Path, run_dir: Path) -> None:
    """No temporary file, no hidden build folder, no checkpoint the database does not hold,
    every reference count equal to the members pointing at the checkpoint."""
    assert not [p for p in runs.rglob("*.tmp")], sorted(runs.rglob("*.tmp"))
    assert sorted(p.name for p in runs.iterdir()) == [run_dir.name]
    db = PBTDatabase(run_dir)
    try:
        known = dict(db.conn.execute("SELECT path, refs FROM checkpoints").fetchall())
        assert sorted(p.name for p in db.checkpoint_dir.iterdir()) == sorted(known)
        assert db.refcounts() == members_per_checkpoint(db)
    finally:
        db.close()


@pytest.mark.slow
@pytest.mark.parametrize(
    ("config", "exploits"),
    [(PLAIN, 3), (ASYNC, 2), (HYBRID, 3), (BATCHED, 3)],
    ids=["plain", "async", "hybrid", "batched"],
)
def test_pbt_killed_at_named_points_resumes_to_the_uninterrupted_result(
    tmp_path: Path, config: dict[str, Any], exploits: int
) -> None:
    name = config["name"]
    path = tmp_path / "pbt.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    done = _run(_cli("pbt", str(path), "--out", str(tmp_path / "ref")), tmp_path)
    assert done.returncode == 0, done.stderr.decode()
    reference = run_result(tmp_path / "ref" / name)
    assert len(reference["scores"]) == 16 and len(reference["lineage"]) == exploits

    runs = tmp_path / "runs"
    run_dir = runs / name
    for what, point in KILLS:
        args = ["pbt", str(path), "--out", str(runs)] if what == "pbt" else ["resume", str(run_dir)]
        assert (what == "resume") == (run_dir / "gradhpo.json").is_file(), point
        killed = _run(command(point.format(name=name), *args, "--no-progress"), tmp_path)
        assert killed.returncode == -signal.SIGKILL, (point, killed.stderr.decode())

    done = _run(_cli("resume", str(run_dir)), tmp_path)
    assert done.returncode == 0, done.stderr.decode()
    assert run_result(run_dir) == reference
    _left_consistent(runs, run_dir)


def _run_session(args: list[str], cwd: Path) -> tuple[int, str]:
    """``_run`` in a session of its own, ended whole: the pool workers of a killed driver
    outlive it (idle, holding its stderr), a machine that dies takes them along."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    err = cwd / "stderr.txt"
    with open(err, "wb") as fh:
        proc = subprocess.Popen(
            args, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=fh, start_new_session=True
        )
        try:
            code = proc.wait(timeout=300)
        finally:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    return code, err.read_text(errors="replace")


def _kill_at_points_then_resume(
    config: Path, runs: Path, run_dir: Path, kills: list[tuple[str, str]], cwd: Path
) -> None:
    """Start ``pbt`` (or ``resume`` once the run exists) once per kill point, each killed
    there (SIGKILL), then resume the run to its end."""
    for what, point in kills:
        args = (
            ["pbt", str(config), "--out", str(runs)] if what == "pbt" else ["resume", str(run_dir)]
        )
        code, err = _run_session(command(point, *args, "--no-progress"), cwd)
        assert code == -signal.SIGKILL, (point, code, err)
    code, err = _run_session(_cli("resume", str(run_dir)), cwd)
    assert code == 0, err


@pytest.mark.slow
@pytest.mark.parametrize("base", [PLAIN, BATCHED], ids=["plain", "batched"])
def test_executor_checkpoints_killed_at_named_points_resume_to_the_in_process_result(
    tmp_path: Path, base: dict[str, Any]
) -> None:
    """Batched: one task per group of two members per round; the group's tasks run in fresh
    worker processes, so every round restores each group's dropout stream from its states."""
    name = base["name"]
    path = tmp_path / "pbt.yaml"
    path.write_text(yaml.safe_dump(base), encoding="utf-8")
    done = _run(_cli("pbt", str(path), "--out", str(tmp_path / "ref")), tmp_path)
    assert done.returncode == 0, done.stderr.decode()
    reference = run_result(tmp_path / "ref" / name)

    config = copy.deepcopy(base)
    config["pbt"]["executor"] = {"name": "processes", "workers": 2, "threads_per_worker": 1}
    config["pbt"]["checkpoints"] = "executor"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    runs = tmp_path / "runs"
    run_dir = runs / name
    _kill_at_points_then_resume(path, runs, run_dir, EXECUTOR_KILLS, tmp_path)
    assert run_result(run_dir) == reference
    _left_consistent(runs, run_dir)


# Async members on processes, checkpoints through the executor: one task per member in
# flight, one transaction per member step (the driver writes a task's returned state, then,
# on an exploit, the copier's state from a step-free task, then COMMITs).
ASYNC_EXECUTOR_KILLS = [
    ("pbt", "replace:*/checkpoints/member*@1"),  # the first task returned, the others queued
    ("resume", "replaced:*/checkpoints/member*@3"),  # two member steps committed, a third written
    ("resume", "commit@3"),  # one member step committed (1: the repair), the next one's COMMIT
    ("resume", "committed@2"),  # a member step committed, its released file not yet deleted
    ("resume", "sql:INSERT INTO lineage@1"),  # inside the first exploit's transaction
    ("resume", "replace:*/checkpoints/member*@2"),  # that exploit again: the copier's state
    ("resume", "sql:'best'"),  # every step committed: the resume runs no task at all
]
# Under `checkpoints: files` the workers write the states: the driver's kills are its COMMITs.
ASYNC_FILES_KILLS = [
    ("pbt", "commit@4"),  # three member steps committed (1: the members' creation)
    ("resume", "committed@3"),  # a member step committed, its released file not yet deleted
    ("resume", "commit@6"),  # four more member steps committed, the next one's COMMIT
]


def _scored_once(run_dir: Path) -> None:
    """Every member trained every interval once: 16 scores, one per (step, member), every
    member at the last step."""
    db = PBTDatabase(run_dir)
    try:
        keys = [(s["step"], s["member"]) for s in db.scores()]
        assert sorted(keys) == [(step, m) for step in (5, 10, 15, 20) for m in range(4)], keys
        assert [m["step"] for m in db.members()] == [20] * 4
    finally:
        db.close()


@pytest.mark.slow
@pytest.mark.parametrize(
    ("workers", "checkpoints", "kills"),
    [
        (1, "executor", ASYNC_EXECUTOR_KILLS),
        (2, "executor", ASYNC_EXECUTOR_KILLS[:4]),
        (2, "files", ASYNC_FILES_KILLS),
    ],
    ids=["one-executor", "two-executor", "two-files"],
)
def test_async_executor_killed_at_named_points_loses_and_repeats_nothing(
    tmp_path: Path, workers: int, checkpoints: str, kills: list[tuple[str, str]]
) -> None:
    """Async PBT on processes killed at named points, tasks in flight, then resumed: nothing
    committed is lost or trained again, nothing uncommitted counts, with the states through
    the executor or in the shared run directory. A pool of one runs the tasks in the order
    they were submitted, the in-process async order: the result is the in-process async
    run's. On two workers the order is the workers' (the run differs), the counts exact."""
    path = tmp_path / "pbt.yaml"
    config = copy.deepcopy(ASYNC)
    if workers == 1:
        path.write_text(yaml.safe_dump(config), encoding="utf-8")
        done = _run(_cli("pbt", str(path), "--out", str(tmp_path / "ref")), tmp_path)
        assert done.returncode == 0, done.stderr.decode()
        reference = run_result(tmp_path / "ref" / "apop")
        assert len(reference["lineage"]) == 2
    config["pbt"]["executor"] = {"name": "processes", "workers": workers, "threads_per_worker": 1}
    config["pbt"]["checkpoints"] = checkpoints
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    runs = tmp_path / "runs"
    run_dir = runs / "apop"
    _kill_at_points_then_resume(path, runs, run_dir, kills, tmp_path)
    _scored_once(run_dir)
    if workers == 1:
        assert run_result(run_dir) == reference
    _left_consistent(runs, run_dir)
