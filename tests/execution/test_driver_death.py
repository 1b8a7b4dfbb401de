"""A process executor's pool workers end by themselves when their driver is SIGKILLed (issue
16): only the driver is killed, in a session of its own, and every process it started must be
gone soon after; a resume then finishes the study with exact counts."""

from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import optuna
import pytest
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend

from gradhpo.execution import ProcessExecutor
from gradhpo.execution.executors import _Spawner
from gradhpo.search import create_study, load_study
from gradhpo.search.drivers import run_objective_study
from gradhpo.testing.objectives import slow_epochs

optuna.logging.set_verbosity(optuna.logging.WARNING)

N_TRIALS = 40
#: Generous: the workers end at once on Linux, within a second elsewhere.
DEADLINE = 30.0

DRIVER = textwrap.dedent(
    """
    import sys, optuna
    from gradhpo.execution import ProcessExecutor
    from gradhpo.search.drivers import run_objective_study
    from gradhpo.testing.objectives import slow_epochs
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    with ProcessExecutor(2, threads_per_worker=1) as executor:
        run_objective_study(sys.argv[1], slow_epochs, executor, workers=2, n_trials=int(sys.argv[2]))
    """
)


def _stat(pid: int) -> tuple[str, int, str] | None:
    """(state, parent pid, start time) of process ``pid`` from /proc, None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return fields[0], int(fields[1]), fields[19]


def _descendants(root: int) -> dict[int, str]:
    """Every live process below ``root``: pid -> start time (to tell a reused pid)."""
    parents: dict[int, list[int]] = {}
    starts: dict[int, str] = {}
    for name in os.listdir("/proc"):
        if name.isdigit() and (stat := _stat(int(name))) is not None and stat[0] != "Z":
            parents.setdefault(stat[1], []).append(int(name))
            starts[int(name)] = stat[2]
    found: dict[int, str] = {}
    todo = [root]
    while todo:
        for child in parents.get(todo.pop(), []):
            found[child] = starts[child]
            todo.append(child)
    return found


def _alive(pid: int, start: str) -> bool:
    stat = _stat(pid)
    return stat is not None and stat[0] != "Z" and stat[2] == start


def _finished(journal: Path) -> int:
    storage = JournalStorage(JournalFileBackend(str(journal)))
    studies = storage.get_all_studies()
    if not studies:
        return 0
    done = (optuna.trial.TrialState.COMPLETE,)
    return len(storage.get_all_trials(studies[0]._study_id, deepcopy=False, states=done))


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads processes from /proc")
@pytest.mark.slow
def test_pool_workers_end_when_their_driver_is_sigkilled_and_a_resume_is_exact(
    tmp_path: Path,
) -> None:
    directory = tmp_path / "s"
    create_study(directory, sampler="random", pruner=None, direction="minimize", seed=0)
    driver = subprocess.Popen(
        [sys.executable, "-c", DRIVER, str(directory), str(N_TRIALS)], start_new_session=True
    )
    try:
        # Kill once both workers are running trials (two finished), well before the forty.
        deadline = time.monotonic() + 120
        while _finished(directory / "study.journal") < 2:
            assert driver.poll() is None, "the driver ended before it could be killed"
            assert time.monotonic() < deadline, "the driver's workers finished no trial"
            time.sleep(0.02)
        started = _descendants(driver.pid)
        assert len(started) >= 2  # the two pool workers (and multiprocessing's tracker)
        os.kill(driver.pid, signal.SIGKILL)  # the driver alone, not its session
        driver.wait(timeout=30)

        deadline = time.monotonic() + DEADLINE
        while (left := [p for p, s in started.items() if _alive(p, s)]) and (
            time.monotonic() < deadline
        ):
            time.sleep(0.05)
        assert not left, f"processes of the killed driver still running: {left}"
        assert _finished(directory / "study.journal") < N_TRIALS  # killed mid-study
    finally:
        try:
            os.killpg(driver.pid, signal.SIGKILL)  # whatever is left of its session
        except ProcessLookupError:
            pass

    # Trials the killed workers left RUNNING are recovered (their processes are gone).
    with ProcessExecutor(2, threads_per_worker=1) as executor:
        run_objective_study(directory, slow_epochs, executor, workers=2, n_trials=N_TRIALS)
    study = load_study(directory)
    done = study.finished_trials()
    assert len(done) == N_TRIALS
    assert all(t.state.name == "COMPLETE" for t in done)
    assert len({t.number for t in done}) == N_TRIALS
    assert not [t for t in study.optuna.trials if t.state.name == "RUNNING"]
    assert len({t.params["x"] for t in done}) == N_TRIALS  # no proposal evaluated twice


def _spawned_in(thread_main: bool) -> tuple[int, bool]:
    """What a worker spawned by the main thread or by another thread gets."""
    if thread_main:
        return pickle.loads(pickle.dumps(_Spawner()))
    out: list[tuple[int, bool]] = []
    worker = threading.Thread(target=lambda: out.append(pickle.loads(pickle.dumps(_Spawner()))))
    worker.start()
    worker.join()
    return out[0]


def test_a_worker_learns_its_driver_and_the_spawning_thread() -> None:
    # prctl's death signal follows the spawning *thread*: a pool worker spawned by another
    # thread must not get it (it would die when that thread ends, its driver alive).
    assert _spawned_in(True) == (os.getpid(), True)
    assert _spawned_in(False) == (os.getpid(), False)


CHILD = textwrap.dedent(
    """
    import os, sys, time
    from gradhpo.execution.executors import _exit_with_parent
    _exit_with_parent(int(sys.argv[1]), sys.argv[2] == "main")
    print("ready", flush=True)
    time.sleep(600)
    """
)

MIDDLE = textwrap.dedent(
    """
    import subprocess, sys, os, threading
    def spawn():
        child = subprocess.Popen(
            [sys.executable, "-c", sys.argv[1], str(os.getpid()), sys.argv[2]],
            stdout=subprocess.PIPE, text=True,
        )
        child.stdout.readline()
        print(child.pid, flush=True)
    if sys.argv[2] == "main":
        spawn()
    else:
        t = threading.Thread(target=spawn)
        t.start()
        t.join()  # the spawning thread has ended; the child must live on
    sys.stdin.read()  # until the test kills this process
    """
)


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads processes from /proc")
@pytest.mark.parametrize("spawner", ["main", "thread"])
def test_a_worker_outlives_its_spawning_thread_but_not_its_driver(spawner: str) -> None:
    middle = subprocess.Popen(
        [sys.executable, "-c", MIDDLE, CHILD, spawner],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        child = int(middle.stdout.readline())
        start = _stat(child)[2]
        # Its spawning thread ended (spawner="thread") and its driver lives: it lives on
        # (checked after more than one watcher interval).
        time.sleep(1.5)
        assert _alive(child, start)
        os.kill(middle.pid, signal.SIGKILL)
        middle.wait(timeout=30)
        deadline = time.monotonic() + DEADLINE
        while _alive(child, start) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(child, start), "the worker outlived its killed driver"
    finally:
        try:
            os.killpg(middle.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
