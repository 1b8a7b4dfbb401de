"""Every executor runs through one contract: the one that studies and PBT rely on.

Executors: ``serial`` (tasks in this process), ``processes`` (a spawn pool) and ``ray``
(a local Ray instance; slow). Their callers: study drivers (``run_objective_study``,
``run_config_study``) run one task per driver and read one result per driver; PBT runs one
``member_task`` per member and pairs results with members by position; the jobs hold the
executor in a ``with`` block. From the executors' docstrings and these uses:

1. **Results.** ``run(fn, args_list)`` calls ``fn(*args)`` for every entry and returns the
   results as a list in the order of ``args_list``, whatever order the tasks finish in;
   ``run(fn, [])`` is ``[]``; an executor runs call after call. ``fn`` is a module-level
   function that the workers import by name (here from :mod:`gradhpo.testing.tasks`);
   ``serial`` runs it in the caller's process, the others in other processes.
2. **A task's exception** makes ``run`` raise, within seconds (no hang), an exception of the
   task's type whose message contains the task's message (Ray: a ``RayTaskError`` subclass
   of that type, the remote traceback in its message). It is not retried and is no worker
   failure (no :class:`WorkerFailed`), and the executor's next ``run`` works.
3. **A worker that dies** (``os._exit`` in the task) costs no result while ``max_failures``
   allows it (``processes``: the pool is rebuilt and every unfinished task submitted again,
   up to ``max_failures`` breaks in all; ``ray``: the task retried up to ``max_failures``
   times): a task that dies twice, with ``max_failures=2``, runs three times and every result
   comes back in order. Beyond that ``run`` raises :class:`WorkerFailed` naming
   ``max_failures`` (a task that dies once, with ``max_failures=0``: run once, not retried),
   and the executor's next ``run`` works. Not for ``serial``: its task runs in the caller's
   process, and a task that ends its process ends the caller.
4. **Threads.** Every task sees the torch thread count the executor promises and reports as
   ``executor.threads``: ``processes`` ``threads_per_worker`` (default cores // workers, at
   least 1), ``ray`` ``int(num_cpus_per_worker)`` (at least 1); ``serial`` promises no count
   of its own, its tasks see the caller's. The caller's count is left as it was.
5. **Closing.** ``close()`` releases what the executor started (its pool processes; the Ray
   instance it started, not one it connected to) and may be called again; afterwards ``run``
   raises ``RuntimeError`` naming the executor and saying it is closed (instead of starting
   workers that nobody closes). Leaving a ``with`` block closes it, also when the body
   raises (the body's exception reaches the caller).
6. **Submit / wait for any** (async PBT keeps one task per member in flight). ``submit(fn,
   args)`` returns a :class:`~gradhpo.execution.Task` at once; ``wait_any(tasks)`` blocks until
   one of them has finished and returns every finished one, in submission order, each exactly
   once if the caller drops what it got; ``task.result()`` is the value, or raises the task's
   exception (a worker that died beyond ``max_failures``: :class:`WorkerFailed`), the others
   unaffected; a worker that dies within ``max_failures`` costs no result. ``serial`` runs the
   earliest submitted task inside ``wait_any`` (so tasks finish in submission order); the others
   start tasks at once and run them side by side. ``wait_any([])`` raises ``ValueError``;
   after ``close`` ``submit`` raises ``RuntimeError``. ``run`` and submitted tasks mix.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from gradhpo.execution import Executor, ProcessExecutor, SerialExecutor, Task, WorkerFailed
from gradhpo.testing.tasks import die, echo, torch_threads

#: Seconds a ``run`` call may take before the test calls it a hang (worker start-up included).
LIMIT = 120.0
#: Logical CPUs of the local Ray instance (Ray's resources, not cores it binds).
RAY_CPUS = 4


def _cores() -> int:
    return len(os.sched_getaffinity(0))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _within_limit(work: Callable[[], Any], what: str) -> Any:
    """``work()`` in a thread, failing the test if it has not returned within :data:`LIMIT`
    seconds (a hang must not block the suite); its exception is raised here."""
    out: dict[str, Any] = {}

    def target() -> None:
        try:
            out["result"] = work()
        except BaseException as exc:  # noqa: BLE001 - handed to the test thread
            out["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(LIMIT)
    if thread.is_alive():
        pytest.fail(f"{what} did not return within {LIMIT:.0f} s")
    if "error" in out:
        raise out["error"]
    return out["result"]


def call(executor: Executor, fn: Callable[..., Any], args_list: list[tuple]) -> list[Any]:
    """``executor.run(fn, args_list)``, failing the test if it has not returned within
    :data:`LIMIT` seconds."""
    return _within_limit(lambda: executor.run(fn, args_list), f"{executor.name}: run")


def collect(executor: Executor, tasks: list[Task]) -> list[Task]:
    """``wait_any`` until every task has finished: the tasks in the order they came back,
    failing the test if that takes more than :data:`LIMIT` seconds."""

    def drain() -> list[Task]:
        order: list[Task] = []
        pending = list(tasks)
        while pending:
            finished = executor.wait_any(pending)
            assert finished and all(task.done for task in finished)
            assert [t.number for t in finished] == sorted(t.number for t in finished)
            order += finished
            pending = [task for task in pending if task not in finished]
        return order

    return _within_limit(drain, f"{executor.name}: wait_any")


def attempts(log: Path) -> int:
    """How often a task with this log file ran."""
    return len(log.read_text().splitlines()) if log.exists() else 0


class SharedRay:
    """One local Ray instance for the module's Ray tests: executors made with ``own=False``
    connect to it (started when missing); ``own=True`` stops it and starts one owned by the
    executor (what ``close`` must shut down)."""

    def __init__(self) -> None:
        import ray

        self.ray = ray
        self.owner: Any = None
        self.temp_dirs: list[str] = []

    def temp_dir(self) -> str:
        # Short: Ray's socket paths have a length limit.
        self.temp_dirs.append(tempfile.mkdtemp(prefix="rx", dir="/tmp"))
        return self.temp_dirs[-1]

    def stop(self) -> None:
        if self.owner is not None:
            self.owner.close()
            self.owner = None
        if self.ray.is_initialized():
            self.ray.shutdown()

    def make(self, own: bool, workers: int, threads: int | None, max_failures: int) -> Any:
        from gradhpo.execution import RayExecutor

        options = {"num_cpus_per_worker": threads or 1, "max_failures": max_failures}
        if own:
            self.stop()
            return RayExecutor(workers, num_cpus=RAY_CPUS, temp_dir=self.temp_dir(), **options)
        if not self.ray.is_initialized():
            self.owner = RayExecutor(1, num_cpus=RAY_CPUS, temp_dir=self.temp_dir())
        return RayExecutor(workers, **options)

    def close(self) -> None:
        self.stop()
        for path in self.temp_dirs:
            shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def shared_ray() -> Iterator[SharedRay]:
    with pytest.MonkeyPatch.context() as mp:
        # Before the first `import ray`: a local instance on the loopback interface only.
        mp.setenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        pytest.importorskip("ray")
        shared = SharedRay()
        try:
            yield shared
        finally:
            shared.close()


@dataclass
class Kind:
    """How to make an executor of one kind, and what it promises."""

    name: str
    make: Callable[..., Executor]  # make(own, workers, threads, max_failures)
    remote: bool  # tasks run in other processes (and may die without ending the caller)
    threads: Callable[[int, int | None], int]  # (workers, threads) -> the promised count
    released: Callable[[list[int], bool], bool]  # (a closed executor's task pids, own)


def serial_kind(request: pytest.FixtureRequest) -> Kind:
    return Kind(
        "serial",
        lambda own, workers, threads, max_failures: SerialExecutor(),
        remote=False,
        threads=lambda workers, threads: torch.get_num_threads(),
        released=lambda pids, own: True,
    )


def processes_kind(request: pytest.FixtureRequest) -> Kind:
    return Kind(
        "processes",
        lambda own, workers, threads, max_failures: ProcessExecutor(
            workers, threads_per_worker=threads, max_failures=max_failures
        ),
        remote=True,
        threads=lambda workers, threads: threads or max(1, _cores() // workers),
        released=lambda pids, own: not any(_alive(pid) for pid in pids),
    )


def ray_kind(request: pytest.FixtureRequest) -> Kind:
    shared: SharedRay = request.getfixturevalue("shared_ray")

    def released(pids: list[int], own: bool) -> bool:
        # An executor that started its instance shuts it down; one that connected leaves it.
        return shared.ray.is_initialized() != own

    return Kind(
        "ray",
        shared.make,
        remote=True,
        threads=lambda workers, threads: max(1, int(threads or 1)),
        released=released,
    )


KINDS = {"serial": serial_kind, "processes": processes_kind, "ray": ray_kind}


@pytest.fixture(
    params=[
        "serial",
        "processes",
        pytest.param("ray", marks=pytest.mark.slow),
    ]
)
def kind(request: pytest.FixtureRequest) -> Kind:
    return KINDS[request.param](request)


@pytest.fixture
def new(kind: Kind) -> Iterator[Callable[..., Executor]]:
    """``new(own=False, workers=2, threads=None, max_failures=3)``: a fresh executor of the
    kind (``own``: Ray starts its own instance), closed after the test."""
    made: list[Executor] = []

    def make(
        own: bool = False, workers: int = 2, threads: int | None = None, max_failures: int = 3
    ) -> Executor:
        executor = kind.make(own, workers, threads, max_failures)
        made.append(executor)
        return executor

    yield make
    for executor in made:
        executor.close()


def _pids(results: list[tuple[Any, int]]) -> list[int]:
    return [pid for _, pid in results]


# 1. Results --------------------------------------------------------------------------------


def test_results_come_back_for_every_task_in_the_order_of_their_inputs(
    kind: Kind, new: Callable[..., Executor]
) -> None:
    executor = new(workers=2)
    n = 5
    # Later tasks finish first: a result list in completion order would be reversed in pairs.
    args = [({"task": i}, 0.1 * (n - 1 - i)) for i in range(n)]
    results = call(executor, echo, args)
    assert [value for value, _ in results] == [{"task": i} for i in range(n)]
    if kind.remote:
        assert os.getpid() not in _pids(results)
    else:
        assert set(_pids(results)) == {os.getpid()}
    assert call(executor, echo, []) == []
    again = call(executor, echo, [(i,) for i in range(7)])
    assert [value for value, _ in again] == list(range(7))


# 2. A task's exception -----------------------------------------------------------------------


def test_a_task_exception_reaches_the_caller_once_and_the_executor_stays_usable(
    kind: Kind, new: Callable[..., Executor], tmp_path: Path
) -> None:
    executor = new(workers=1, max_failures=1)
    log = tmp_path / "failing"
    args = [(0,), (1, 0.0, "task 1 failed: bad input 1", str(log)), (2,)]
    with pytest.raises(ValueError, match="task 1 failed: bad input 1") as info:
        call(executor, echo, args)
    assert not isinstance(info.value, WorkerFailed)
    assert attempts(log) == 1  # not retried
    results = call(executor, echo, [(i,) for i in range(3)])
    assert [value for value, _ in results] == [0, 1, 2]


# 3. A worker that dies -----------------------------------------------------------------------


def _needs_workers(kind: Kind) -> None:
    if not kind.remote:
        pytest.skip("serial runs a task in the caller's process: a task that dies ends it")


def test_a_dying_worker_costs_no_result_while_max_failures_allows(
    kind: Kind, new: Callable[..., Executor], tmp_path: Path
) -> None:
    _needs_workers(kind)
    executor = new(workers=1, max_failures=2)
    logs = [tmp_path / f"task{i}" for i in range(3)]
    args = [(f"value {i}", str(logs[i]), 2 if i == 1 else 0) for i in range(3)]
    assert call(executor, die, args) == ["value 0", "value 1", "value 2"]
    assert attempts(logs[1]) == 3
    results = call(executor, echo, [(i,) for i in range(3)])
    assert [value for value, _ in results] == [0, 1, 2]


def test_a_worker_dying_more_than_max_failures_raises_worker_failed(
    kind: Kind, new: Callable[..., Executor], tmp_path: Path
) -> None:
    _needs_workers(kind)
    executor = new(workers=1, max_failures=0)
    log = tmp_path / "task"
    with pytest.raises(WorkerFailed, match="max_failures=0"):
        call(executor, die, [("value", str(log), 1)])
    assert attempts(log) == 1  # not retried
    results = call(executor, echo, [(i,) for i in range(3)])
    assert [value for value, _ in results] == [0, 1, 2]


# 4. Threads ----------------------------------------------------------------------------------


@pytest.fixture
def caller_threads() -> Iterator[int]:
    """The caller at one torch thread (restored after): a count set on purpose, so that a
    task seeing it, or an executor changing it, shows."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield 1
    torch.set_num_threads(before)


def test_tasks_see_the_promised_thread_count(
    kind: Kind, new: Callable[..., Executor], caller_threads: int
) -> None:
    if kind.remote:
        # The default: cores // workers (processes), one per CPU asked for (Ray).
        assert new(workers=2).threads == kind.threads(2, None)
    # Three: neither the caller's count nor a fresh process's default on two cores.
    executor = new(workers=1, threads=3)
    promised = kind.threads(1, 3)
    if kind.remote:
        assert executor.threads == promised == 3
    assert call(executor, torch_threads, [()] * 3) == [promised] * 3
    assert torch.get_num_threads() == caller_threads


# 5. Closing ----------------------------------------------------------------------------------


def test_close_releases_the_workers_is_idempotent_and_refuses_new_work(
    kind: Kind, new: Callable[..., Executor]
) -> None:
    executor = new(own=True, workers=1)
    pids = _pids(call(executor, echo, [(0,), (1,)]))
    executor.close()
    assert kind.released(pids, own=True)
    executor.close()
    with pytest.raises(RuntimeError, match=f"'{kind.name}' executor is closed"):
        call(executor, echo, [(0,)])


def test_the_context_manager_closes_the_executor(kind: Kind, new: Callable[..., Executor]) -> None:
    with new(own=True, workers=1) as executor:
        pids = _pids(call(executor, echo, [(0,), (1,)]))
    assert kind.released(pids, own=True)
    with pytest.raises(RuntimeError, match="closed"):
        call(executor, echo, [(0,)])
    # The body raises: the executor is closed and the body's exception reaches the caller.
    with pytest.raises(KeyError, match="from the body"), new() as failing:
        raise KeyError("from the body")
    with pytest.raises(RuntimeError, match="closed"):
        call(failing, echo, [(0,)])
    assert kind.released([], own=False)  # Ray: the instance it connected to still runs


# 6. Submit / wait for any --------------------------------------------------------------------


def test_submitted_tasks_come_back_each_once_with_their_results(
    kind: Kind, new: Callable[..., Executor]
) -> None:
    executor = new(workers=2)
    n = 4
    # The first task is the slowest: remote executors finish others before it.
    tasks = [executor.submit(echo, (i, 2.5 if i == 0 else 0.0)) for i in range(n)]
    assert all(isinstance(task, Task) for task in tasks)
    with pytest.raises(RuntimeError, match="not finished"):
        tasks[0].result()  # serial: nothing ran yet; remote: still sleeping
    order = collect(executor, tasks)
    assert sorted(task.number for task in order) == sorted(task.number for task in tasks)
    assert [task.result()[0] for task in tasks] == list(range(n))
    if kind.remote:
        assert order[0] is not tasks[0]  # others finished beside it, before it
        assert os.getpid() not in {task.result()[1] for task in tasks}
    else:
        assert order == tasks  # one at a time, in submission order
        assert {task.result()[1] for task in tasks} == {os.getpid()}
    assert executor.wait_any(tasks[:2]) == tasks[:2]  # finished ones, at once
    with pytest.raises(ValueError, match="tasks is empty"):
        executor.wait_any([])
    # run and submitted tasks mix: a batch runs while a task is in flight.
    late = executor.submit(echo, ("late",))
    assert [value for value, _ in call(executor, echo, [(0,), (1,)])] == [0, 1]
    assert collect(executor, [late])[0].result()[0] == "late"


def test_a_submitted_task_exception_is_its_own_result(
    kind: Kind, new: Callable[..., Executor], tmp_path: Path
) -> None:
    executor = new(workers=1, max_failures=1)
    log = tmp_path / "failing"
    tasks = [
        executor.submit(echo, (0,)),
        executor.submit(echo, (1, 0.0, "task 1 failed: bad input 1", str(log))),
        executor.submit(echo, (2,)),
    ]
    collect(executor, tasks)
    with pytest.raises(ValueError, match="task 1 failed: bad input 1") as info:
        tasks[1].result()
    assert not isinstance(info.value, WorkerFailed)
    assert attempts(log) == 1  # not retried
    assert [tasks[0].result()[0], tasks[2].result()[0]] == [0, 2]


def test_a_dying_worker_costs_a_submitted_task_nothing_within_max_failures(
    kind: Kind, new: Callable[..., Executor], tmp_path: Path
) -> None:
    _needs_workers(kind)
    executor = new(workers=1, max_failures=2)
    logs = [tmp_path / f"task{i}" for i in range(3)]
    tasks = [
        executor.submit(die, (f"value {i}", str(logs[i]), 2 if i == 1 else 0)) for i in range(3)
    ]
    collect(executor, tasks)
    assert [task.result() for task in tasks] == ["value 0", "value 1", "value 2"]
    assert attempts(logs[1]) == 3

    failing = new(workers=1, max_failures=0)
    task = failing.submit(die, ("value", str(tmp_path / "once"), 1))
    collect(failing, [task])
    with pytest.raises(WorkerFailed, match="max_failures=0"):
        task.result()
    assert attempts(tmp_path / "once") == 1  # not retried
    again = failing.submit(echo, ("after",))
    assert collect(failing, [again])[0].result()[0] == "after"


def test_a_closed_executor_refuses_submissions(new: Callable[..., Executor]) -> None:
    executor = new(own=True, workers=1)
    executor.close()
    with pytest.raises(RuntimeError, match="closed"):
        executor.submit(echo, (0,))
