"""The journal lock (gradhpo.search.journal_lock.OwnedFileLock): a lock file left by a killed
holder on this machine is broken at once, never one of a live holder; a lock file that names
no owner this process can check (Optuna's empty one, garbage, another host) waits for the
grace period as Optuna does; processes appending through it lose nothing."""

from __future__ import annotations

import json
import os
import pickle
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import optuna
import pytest
from optuna.storages.journal import JournalFileBackend

from gradhpo.search import journal_lock
from gradhpo.search.journal_lock import OwnedFileLock

pytestmark = pytest.mark.skipif(
    not os.path.exists("/proc/self/stat"), reason="the dead-owner test reads /proc"
)

#: Optuna's grace period, the wait each of these tests must stay well under.
GRACE = 30.0
#: A generous bound for breaking a dead owner's lock (it takes milliseconds).
PROMPT = 5.0

#: Children load the module from its file: importing the gradhpo package costs seconds.
_PRELUDE = f"""
import importlib.util, json, os, signal, sys, time
spec = importlib.util.spec_from_file_location("journal_lock", {journal_lock.__file__!r})
journal_lock = importlib.util.module_from_spec(spec)
spec.loader.exec_module(journal_lock)
"""


def _child(body: str, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", _PRELUDE + textwrap.dedent(body), *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )


def _expect(proc: subprocess.Popen[str], line: str) -> None:
    assert proc.stdout is not None
    got = proc.stdout.readline().strip()
    if got != line:
        proc.kill()
        _, err = proc.communicate()
        raise AssertionError(f"child said {got!r}, not {line!r}; stderr:\n{err}")


HOLDER = """
lock = journal_lock.OwnedFileLock(sys.argv[1])
lock.acquire()
print("held", flush=True)
sys.stdin.readline()  # hold until told (or killed)
lock.release()
print("released", flush=True)
"""


def _journal(tmp_path: Path) -> Path:
    path = tmp_path / "study.journal"
    path.touch()
    return path


def _assert_no_records_left(directory: Path, *live: OwnedFileLock) -> None:
    """Only the ``live`` lock objects keep a temporary record (one each, between
    acquisitions), and none is left once they are gone."""
    assert len(list(directory.glob(".*.tmp"))) == len(live)
    for lock in live:
        lock.close()
    assert not list(directory.glob(".*.tmp")), "no temporary record left behind"


def _timed_acquire(lock: OwnedFileLock, timeout: float | None = None) -> tuple[bool, float]:
    start = time.monotonic()
    taken = lock.acquire(timeout=timeout)
    return taken, time.monotonic() - start


# ---------------------------------------------------------------------- a dead holder
def test_a_lock_left_by_a_sigkilled_holder_is_broken_at_once(tmp_path: Path) -> None:
    journal = _journal(tmp_path)
    holder = _child(HOLDER, str(journal))
    _expect(holder, "held")
    holder.kill()  # SIGKILL while it holds the lock; not reaped yet (a zombie holds nothing)
    left = json.loads(Path(f"{journal}.lock").read_bytes())
    assert left["pid"] == holder.pid

    lock = OwnedFileLock(journal, grace_period=GRACE)
    taken, waited = _timed_acquire(lock, timeout=GRACE / 2)
    holder.wait()
    assert taken and waited < PROMPT, f"waited {waited:.1f} s for a dead holder's lock"
    assert json.loads(Path(f"{journal}.lock").read_bytes())["pid"] == os.getpid()
    lock.release()
    assert not Path(f"{journal}.lock").exists()
    _assert_no_records_left(tmp_path, lock)


def test_a_reused_pid_does_not_keep_a_dead_holders_lock(tmp_path: Path) -> None:
    """The record names a live pid (this process's parent) with another start time: that
    pid was reused by a newer process, the holder is gone."""
    journal = _journal(tmp_path)
    me = journal_lock._me()
    record = {**me, "pid": os.getppid(), "start": "1", "nonce": "n"}
    Path(f"{journal}.lock").write_text(json.dumps(record))
    taken, waited = _timed_acquire(OwnedFileLock(journal, grace_period=GRACE), timeout=GRACE / 2)
    assert taken and waited < PROMPT


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_records_itself_not_its_parent(tmp_path: Path) -> None:
    """A lock object made before a fork: the child's lock file names the child, so once the
    child is killed holding it, the (live) parent is not taken for its owner."""
    journal = _journal(tmp_path)
    lock = OwnedFileLock(journal, grace_period=GRACE)
    pid = os.fork()
    if pid == 0:  # the child: take the lock and die holding it
        try:
            lock.acquire()
        finally:
            os.kill(os.getpid(), signal.SIGKILL)
    os.waitpid(pid, 0)
    assert json.loads(Path(f"{journal}.lock").read_bytes())["pid"] == pid
    taken, waited = _timed_acquire(lock, timeout=GRACE / 2)
    assert taken and waited < PROMPT
    lock.release()


def test_a_lock_this_process_left_behind_is_broken(tmp_path: Path) -> None:
    """A lock file naming this very process under a nonce none of its acquisitions holds
    (an acquisition interrupted after its link) is dead; one it holds is alive."""
    journal = _journal(tmp_path)
    holding = OwnedFileLock(journal, grace_period=GRACE)
    holding.acquire()
    other = OwnedFileLock(journal, grace_period=0.05)
    assert other.acquire(timeout=0.3) is False  # this process holds it: alive, no grace
    assert holding._held is not None
    nonce = holding._held[0]
    holding._held = None  # forget it, as an interrupted acquisition would
    with journal_lock._HELD_LOCK:
        journal_lock._HELD.discard(nonce)
    taken, waited = _timed_acquire(other, timeout=GRACE / 2)
    assert taken and waited < PROMPT
    other.release()


# ---------------------------------------------------------------------- a live holder
def test_a_live_holders_lock_is_not_broken_and_the_waiter_proceeds_after_release(
    tmp_path: Path,
) -> None:
    journal = _journal(tmp_path)
    holder = _child(HOLDER, str(journal))
    try:
        _expect(holder, "held")
        # A grace period far shorter than the wait: a live owner here is never broken by it.
        waiter = OwnedFileLock(journal, grace_period=0.05)
        taken, waited = _timed_acquire(waiter, timeout=0.5)
        assert taken is False and waited >= 0.5

        result: list[float] = []
        thread = threading.Thread(target=lambda: result.append(_timed_acquire(waiter)[1]))
        thread.start()
        time.sleep(0.3)
        assert thread.is_alive() and not result, "the waiter must wait for a live holder"
        assert holder.stdin is not None
        holder.stdin.write("go\n")
        holder.stdin.flush()
        _expect(holder, "released")
        thread.join(PROMPT)
        assert result and not thread.is_alive(), "the waiter proceeds once it is released"
        assert json.loads(Path(f"{journal}.lock").read_bytes())["pid"] == os.getpid()
        waiter.release()
        assert holder.wait(PROMPT) == 0
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()


# ---------------------------------------------------------------------- owners it cannot check
def _other_host_record() -> bytes:
    return json.dumps(
        {
            "host": socket.gethostname() + "-elsewhere",
            "boot": "another-boot",
            "pidns": "pid:[1]",
            "pid": 999_999_999,  # no such process here, but it is not here either
            "start": "1",
            "nonce": "n",
        }
    ).encode()


@pytest.mark.parametrize(
    "content",
    [
        pytest.param(b"", id="optuna-empty"),
        pytest.param(b"\xff\x00garbage{", id="garbage"),
        pytest.param(b'["a", "list"]', id="json-not-a-record"),
        pytest.param(b'{"nonce": "n", "pid": "not-a-pid"}', id="record-without-owner"),
        pytest.param(_other_host_record(), id="another-host"),
    ],
)
def test_a_lock_of_an_owner_it_cannot_check_falls_back_to_the_grace_period(
    tmp_path: Path, content: bytes
) -> None:
    journal = _journal(tmp_path)
    Path(f"{journal}.lock").write_bytes(content)
    lock = OwnedFileLock(journal, grace_period=0.4)
    assert lock.acquire(timeout=0.2) is False, "not broken before the grace period"
    taken, waited = _timed_acquire(lock, timeout=PROMPT)
    assert taken and 0.2 <= waited < PROMPT
    lock.release()
    assert not Path(f"{journal}.lock").exists()


def test_a_changing_lock_file_it_cannot_check_is_not_broken(tmp_path: Path) -> None:
    """The grace period counts from the last change (Optuna's rule)."""
    journal = _journal(tmp_path)
    lock_file = Path(f"{journal}.lock")
    lock_file.write_bytes(b"")
    stop = threading.Event()

    def touch() -> None:
        n = 0
        while not stop.wait(0.05):
            n += 1
            lock_file.write_bytes(b"x" * (n % 7))

    toucher = threading.Thread(target=touch)
    toucher.start()
    try:
        assert OwnedFileLock(journal, grace_period=0.3).acquire(timeout=1.0) is False
    finally:
        stop.set()
        toucher.join()


def test_an_optuna_symlink_lock_is_broken_without_touching_the_journal(tmp_path: Path) -> None:
    journal = _journal(tmp_path)
    journal.write_text('{"op_code": 0}\n')
    os.symlink(journal, f"{journal}.lock")  # what JournalFileSymlinkLock makes
    lock = OwnedFileLock(journal, grace_period=0.2)
    taken, _ = _timed_acquire(lock, timeout=PROMPT)
    assert taken and journal.read_text() == '{"op_code": 0}\n'
    assert not os.path.islink(f"{journal}.lock")
    lock.release()


def test_no_grace_period_never_breaks_an_unknown_lock(tmp_path: Path) -> None:
    journal = _journal(tmp_path)
    Path(f"{journal}.lock").write_bytes(b"")
    assert OwnedFileLock(journal, grace_period=None).acquire(timeout=0.3) is False


@pytest.mark.parametrize("bad", [0, -1, True, "30", float("nan")])
def test_a_bad_grace_period_is_a_clear_error(tmp_path: Path, bad: object) -> None:
    with pytest.raises(ValueError, match=r"grace_period must be a number > 0 or None, got"):
        OwnedFileLock(tmp_path / "study.journal", grace_period=bad)  # type: ignore[arg-type]


def test_release_without_holding_and_a_broken_lock_are_errors(tmp_path: Path) -> None:
    journal = _journal(tmp_path)
    lock = OwnedFileLock(journal)
    with pytest.raises(RuntimeError, match="does not hold"):
        lock.release()
    lock.acquire()
    with pytest.raises(RuntimeError, match="holds this lock already"):
        lock.acquire()
    Path(f"{journal}.lock").write_bytes(b"someone else")  # broken and taken by another
    with pytest.raises(RuntimeError, match="broken while this process held it"):
        lock.release()
    assert Path(f"{journal}.lock").read_bytes() == b"someone else", "another's lock is kept"


def test_stray_temporary_records_of_dead_acquirers_are_removed(tmp_path: Path) -> None:
    journal = _journal(tmp_path)
    me = journal_lock._me()
    dead = tmp_path / ".study.journal.lock.dead.tmp"
    dead.write_text(json.dumps({**me, "pid": os.getppid(), "start": "1", "nonce": "dead"}))
    unknown = tmp_path / ".study.journal.lock.unknown.tmp"
    unknown.write_bytes(_other_host_record())
    OwnedFileLock(journal)
    assert not dead.exists() and unknown.exists()


def test_a_pickled_lock_works(tmp_path: Path) -> None:
    journal = _journal(tmp_path)
    backend = pickle.loads(pickle.dumps(JournalFileBackend(str(journal), OwnedFileLock(journal))))
    backend.append_logs([{"op_code": 0}])
    assert [*backend.read_logs(0)] == [{"op_code": 0}]
    assert not Path(f"{journal}.lock").exists()


def test_without_hard_links_it_falls_back_to_an_exclusive_create(
    tmp_path: Path, monkeypatch
) -> None:
    journal = _journal(tmp_path)

    def no_link(*args: object) -> None:
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_link)
    lock = OwnedFileLock(journal)
    lock.acquire()
    assert json.loads(Path(f"{journal}.lock").read_bytes())["pid"] == os.getpid()
    assert OwnedFileLock(journal).acquire(timeout=0.1) is False
    lock.release()
    assert not Path(f"{journal}.lock").exists() and not list(tmp_path.glob(".*.tmp"))


def test_one_record_is_kept_between_acquisitions_each_with_its_own_nonce(tmp_path: Path) -> None:
    journal = _journal(tmp_path)
    lock = OwnedFileLock(journal)
    nonces = []
    for _ in range(5):
        lock.acquire()
        nonces.append(json.loads(Path(f"{journal}.lock").read_bytes())["nonce"])
        lock.release()
    assert len(set(nonces)) == 5
    assert len(list(tmp_path.glob(".*.tmp"))) == 1
    for record in tmp_path.glob(".*.tmp"):
        record.unlink()  # removed by hand: the next acquisition makes it again
    lock.acquire()
    assert OwnedFileLock(journal).acquire(timeout=0.1) is False
    lock.release()
    assert not Path(f"{journal}.lock").exists()
    _assert_no_records_left(tmp_path, lock)


def test_two_lock_objects_of_one_process_exclude_each_other(tmp_path: Path) -> None:
    """Two lock objects on one journal (two studies opened in one process), a thread each,
    many short acquisitions: every increment survives and no lock is ever broken (a waiter
    that reads a kept record through an old descriptor must not take its live owner for
    dead)."""
    journal = _journal(tmp_path)
    counter = [0]
    errors: list[BaseException] = []

    def work(lock: OwnedFileLock) -> None:
        try:
            for _ in range(300):
                lock.acquire()
                value = counter[0]
                time.sleep(0)
                counter[0] = value + 1
                lock.release()
        except BaseException as exc:  # noqa: BLE001 - reported by the test thread
            errors.append(exc)

    locks = [OwnedFileLock(journal, grace_period=GRACE) for _ in range(2)]
    threads = [threading.Thread(target=work, args=(lock,)) for lock in locks]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors and counter[0] == 600
    _assert_no_records_left(tmp_path, *locks)


def test_without_kept_records_each_acquisition_makes_its_own(tmp_path: Path, monkeypatch) -> None:
    """Where ``pwrite`` is missing (Windows) every acquisition writes a new temporary record
    and removes it after the link."""
    monkeypatch.setattr(journal_lock, "_KEEP_RECORD", False)
    journal = _journal(tmp_path)
    lock = OwnedFileLock(journal)
    lock.acquire()
    assert json.loads(Path(f"{journal}.lock").read_bytes())["pid"] == os.getpid()
    assert not list(tmp_path.glob(".*.tmp"))
    assert OwnedFileLock(journal).acquire(timeout=0.1) is False
    lock.release()
    assert not Path(f"{journal}.lock").exists() and not list(tmp_path.glob(".*.tmp"))


# ---------------------------------------------------------------------- several processes
APPENDER = """
from optuna.storages.journal import JournalFileBackend
journal, counter, worker, n, die_after = sys.argv[1], sys.argv[2], *map(int, sys.argv[3:])
lock = journal_lock.OwnedFileLock(journal)
backend = JournalFileBackend(journal, lock_obj=lock)
for i in range(n):
    backend.append_logs([{"worker": worker, "i": i}])
    lock.acquire()  # a read-modify-write that loses counts unless the lock excludes
    if i == die_after:
        os.kill(os.getpid(), signal.SIGKILL)  # dies holding the lock
    with open(counter) as f:
        value = int(f.read())
    time.sleep(0.0005)
    with open(counter, "w") as f:
        f.write(str(value + 1))
    lock.release()
print("done", flush=True)
"""


def test_processes_appending_through_the_lock_lose_nothing_even_when_one_is_killed(
    tmp_path: Path,
) -> None:
    journal = _journal(tmp_path)
    counter = tmp_path / "counter"
    counter.write_text("0")
    workers, n, die_after = 3, 60, 20
    start = time.monotonic()
    procs = [
        _child(APPENDER, str(journal), str(counter), str(w), str(n), "-1") for w in range(workers)
    ]
    killed = _child(APPENDER, str(journal), str(counter), str(workers), str(n), str(die_after))
    for proc in procs:
        out, err = proc.communicate(timeout=GRACE)
        assert proc.returncode == 0 and out.strip() == "done", err
    killed.communicate(timeout=GRACE)
    elapsed = time.monotonic() - start
    assert killed.returncode == -signal.SIGKILL

    records = [json.loads(line) for line in journal.read_text().splitlines()]
    seen = {(r["worker"], r["i"]) for r in records}
    expected = {(w, i) for w in range(workers) for i in range(n)}
    expected |= {(workers, i) for i in range(die_after + 1)}
    assert len(records) == len(expected) and seen == expected
    assert int(counter.read_text()) == workers * n + die_after  # no increment lost
    assert elapsed < GRACE / 2, f"took {elapsed:.1f} s: a dead holder's lock was waited for"
    # The killed worker's lock is left when it died after the others were done: the next
    # acquirer breaks it at once.
    lock = OwnedFileLock(journal, grace_period=GRACE)
    taken, waited = _timed_acquire(lock, timeout=GRACE / 2)
    assert taken and waited < PROMPT
    lock.release()
    assert not Path(f"{journal}.lock").exists()
    _assert_no_records_left(tmp_path, lock)


# ---------------------------------------------------------------------- a study end to end
DRIVER = """
import optuna
from gradhpo.search import create_study, journal_lock  # the study's own lock class
optuna.logging.set_verbosity(optuna.logging.WARNING)
study = create_study(sys.argv[1], direction="minimize", sampler="random", pruner=None, seed=0)
acquire = journal_lock.OwnedFileLock.acquire
count = [0]

def acquire_then_die(self, timeout=None):
    taken = acquire(self, timeout)
    count[0] += 1
    if count[0] == 6:  # inside a trial, holding the journal's lock
        print("dying", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
    return taken

journal_lock.OwnedFileLock.acquire = acquire_then_die
study.optimize(lambda trial: trial.suggest_float("x", -1, 1) ** 2, n_trials=5)
"""


@pytest.mark.slow
def test_a_study_whose_driver_is_killed_holding_the_lock_resumes_promptly(tmp_path: Path) -> None:
    from gradhpo.search import load_study

    directory = tmp_path / "study"
    driver = _child(DRIVER, str(directory))
    out, err = driver.communicate(timeout=120)
    assert driver.returncode == -signal.SIGKILL and "dying" in out, err
    left = json.loads((directory / "study.journal.lock").read_bytes())
    assert left["pid"] == driver.pid

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    start = time.monotonic()
    study = load_study(directory)
    study.optimize(lambda trial: trial.suggest_float("x", -1, 1) ** 2, n_trials=5)
    elapsed = time.monotonic() - start
    assert elapsed < GRACE / 3, f"the resume waited {elapsed:.1f} s"
    finished = [t for t in study.trials if t.state.is_finished()]
    assert sum(t.state == optuna.trial.TrialState.COMPLETE for t in finished) == 5
    assert not (directory / "study.journal.lock").exists()
