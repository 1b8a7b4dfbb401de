"""PBT across the nodes of a Ray cluster (issue 17): members trained as tasks on three
one-CPU nodes give the in-process run's scores, exploits and explored values, also when a
node is removed (SIGKILL, a machine that dies) in the middle of an interval: Ray retries the
killed member's task on another node from the same checkpoint (a file in the run directory
with ``checkpoints="files"``; with ``"executor"`` the same bytes, held by the driver in Ray's
object store, while no task touches the run directory), so nothing is lost or counted
twice."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import run_dir_guard
from helpers import LR, count_scores, initial_lrs, trace

from gradhpo.pbt.manager import PopulationBasedTraining
from gradhpo.testing.quartic import QuarticFactory

pytestmark = pytest.mark.slow


class CountingFactory:
    """QuarticFactory that appends ``pid index`` to a file each time it builds a member, so
    the test can count the member tasks that ran (a retried task runs twice)."""

    def __init__(self, log: Path, **options: float) -> None:
        self.log, self.inner = str(log), QuarticFactory(seed=100, **options)

    def __call__(self, index: int, values: Any) -> Any:
        with open(self.log, "a", encoding="utf-8") as f:
            f.write(f"{os.getpid()} {index}\n")
        return self.inner(index, values)


# 32768 float64 weights: a member's state (256 KiB) is above Ray's 100 KiB limit for objects
# passed inline, so under checkpoints="executor" states go through the nodes' object stores.
DIM = 32768


def _pbt(
    directory: Path, step_seconds: float = 0.0, checkpoints: str = "files"
) -> PopulationBasedTraining:
    directory.mkdir(parents=True, exist_ok=True)
    factory: Any = CountingFactory(
        directory.parent / f"{directory.name}.builds", step_seconds=step_seconds, dim=DIM
    )
    if checkpoints == "executor":  # a task that touches the run directory fails
        factory = run_dir_guard.GuardedFactory(factory, directory)
    return PopulationBasedTraining(
        factory,
        LR.parameters,
        directory,
        population=5,
        interval=10,
        total_steps=80,
        seed=2,
        fraction=0.4,
        initial_values=initial_lrs(5),
        checkpoints=checkpoints,
    )


@pytest.mark.parametrize("checkpoints", ["files", "executor"])
def test_pbt_on_three_nodes_survives_a_node_removed_mid_interval(
    tmp_path: Path, ray_cluster: Any, checkpoints: str
) -> None:
    import ray

    from gradhpo.execution import RayExecutor

    # the workers cannot import tests/: CountingFactory and GuardedFactory travel by value
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    ray.cloudpickle.register_pickle_by_value(run_dir_guard)

    local = _pbt(tmp_path / "local")
    expected = local.run()
    # 10 steps of 0.05 s: every member's task runs for about half a second, so a node
    # removed shortly after a step starts takes a running task with it.
    executor = RayExecutor(3, address=ray_cluster.address, max_failures=2)
    out: dict[str, Any] = {}

    def drive() -> None:  # the manager's database connection lives in this thread
        try:
            remote = _pbt(tmp_path / "ray", step_seconds=0.05, checkpoints=checkpoints)
            out["best"] = remote.run(executor=executor)
            out["trace"] = trace(remote)
        except BaseException as exc:  # noqa: BLE001 - handed to the test thread
            out["error"] = exc

    thread = threading.Thread(target=drive)
    thread.start()
    deadline = time.monotonic() + 120
    while thread.is_alive() and time.monotonic() < deadline:
        if count_scores(tmp_path / "ray") >= 10:  # two steps committed; the third is running
            break
        time.sleep(0.02)
    # The copies of step 2 ran before its commit: a build logged from now on is one of step
    # 3's training tasks, which then runs for 0.5 s. Remove the node it runs on at once.
    builds = tmp_path / "ray.builds"
    seen = len(builds.read_text().splitlines())
    victim = task_pid = None
    while victim is None and thread.is_alive() and time.monotonic() < deadline:
        for line in builds.read_text().splitlines()[seen:]:
            task_pid = int(line.split()[0])
            victim = ray_cluster.node_running(task_pid)
            if victim is not None:
                break
        time.sleep(0.01)
    assert victim is not None, "no member task was caught running"
    # A machine that dies takes its processes with it: the node's raylet and the worker that
    # runs the task (a worker left running would still hand its result to the driver).
    ray_cluster.remove_node(victim, allow_graceful=False)
    try:
        os.kill(task_pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    thread.join(timeout=300)
    assert not thread.is_alive() and "error" not in out, out.get("error")
    assert out["trace"] == trace(local)
    assert out["best"]["member"] == expected["member"]
    assert out["best"]["score"] == expected["score"]
    # One task per member and step (8 steps of 5 members) and one step-free task per copy
    # (an exploit), plus at least one retried task: the removal did kill a member in the
    # middle of its interval.
    lines = (tmp_path / "ray.builds").read_text().split()
    tasks = [pid for pid in lines[0::2] if int(pid) != os.getpid()]
    planned = 5 * 8 + len(out["trace"][1])
    assert len(tasks) > planned, (len(tasks), planned)
