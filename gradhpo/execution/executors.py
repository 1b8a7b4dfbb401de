"""Serial, local-process and Ray executors behind one interface (see the package docstring)."""

from __future__ import annotations

import ctypes
import itertools
import multiprocessing as mp
import os
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, CancelledError, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from typing import Any

import torch

__all__ = [
    "EXECUTORS",
    "Executor",
    "SerialExecutor",
    "ProcessExecutor",
    "RayExecutor",
    "Task",
    "WorkerFailed",
    "make_executor",
]


class WorkerFailed(RuntimeError):
    """A worker died more often than ``max_failures`` allows."""


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def _threads_for(workers: int, threads: int | None) -> int:
    return threads if threads is not None else max(1, _cpu_count() // max(1, workers))


def _check(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def _run_with_threads(threads: int, fn: Callable[..., Any], args: tuple[Any, ...]) -> Any:
    _init_worker(threads)
    return fn(*args)


#: Submission numbers of tasks (all executors): ``wait_any`` returns finished tasks in this order.
_SUBMITTED = itertools.count()


class Task:
    """A call ``fn(*args)`` handed to :meth:`Executor.submit`. :meth:`Executor.wait_any`
    returns it once finished; then :meth:`result` gives its value or raises its exception (a
    task's own, or :class:`WorkerFailed` when its worker died too often)."""

    def __init__(self, fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
        self.fn = fn
        self.args = args
        self.number = next(_SUBMITTED)
        self.done = False
        self._value: Any = None
        self._error: BaseException | None = None
        self._handle: Any = None  # the executor's: a future, a Ray object reference
        self._pool: Any = None  # processes: the pool the future belongs to

    def _finish(self, value: Any = None, error: BaseException | None = None) -> None:
        self.done, self._value, self._error = True, value, error
        self._handle = self._pool = None

    def result(self) -> Any:
        if not self.done:
            raise RuntimeError("task not finished: wait for it with executor.wait_any")
        if self._error is not None:
            raise self._error
        return self._value


class Executor:
    """Runs workers ``fn(*args)``; ``run`` returns their results in order. ``submit`` starts
    one call and returns its :class:`Task` at once; ``wait_any(tasks)`` blocks until one of
    them has finished and returns the finished ones, in the order they were submitted. After
    :meth:`close` (idempotent; also on leaving a ``with`` block) ``run`` and ``submit`` raise
    ``RuntimeError``: a closed executor starts no workers that nobody would close.

    The base class runs a submitted task inside ``wait_any`` through :meth:`run`, the earliest
    submitted first (``serial``, and any executor that only defines ``run``); ``processes``
    and ``ray`` start it at once on a worker."""

    name = "base"
    closed = False

    def run(self, fn: Callable[..., Any], args_list: Sequence[tuple[Any, ...]]) -> list[Any]:
        raise NotImplementedError

    def submit(self, fn: Callable[..., Any], args: Sequence[Any]) -> Task:
        """Start ``fn(*args)``; its :class:`Task` comes back at once."""
        self._refuse_if_closed()
        task = Task(fn, tuple(args))
        self._start(task)
        return task

    def wait_any(self, tasks: Collection[Task]) -> list[Task]:
        """Block until at least one of ``tasks`` has finished; return every finished one,
        in the order they were submitted. A task's exception is raised by its ``result()``."""
        if not tasks:
            raise ValueError("wait_any: tasks is empty; give at least one submitted task")
        if not any(task.done for task in tasks):
            self._refuse_if_closed()
            self._wait([task for task in tasks if not task.done])
        return sorted((task for task in tasks if task.done), key=lambda task: task.number)

    def _start(self, task: Task) -> None:
        """Start ``task`` (the base class: nothing, ``_wait`` runs it)."""

    def _wait(self, pending: list[Task]) -> None:
        """Finish at least one of ``pending`` (the base class: the earliest submitted, here)."""
        task = min(pending, key=lambda t: t.number)
        try:
            (value,) = self.run(task.fn, [task.args])
        except Exception as exc:  # noqa: BLE001 - the task's, raised by its result()
            task._finish(error=exc)
        else:
            task._finish(value)

    def close(self) -> None:
        """Release resources (the Ray instance this executor started)."""
        self.closed = True

    def _refuse_if_closed(self) -> None:
        if self.closed:
            raise RuntimeError(
                f"the {self.name!r} executor is closed; make a new one to run more tasks"
            )

    def __enter__(self) -> Executor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class SerialExecutor(Executor):
    """Every worker in this process, one after the other (the default)."""

    name = "serial"

    def run(self, fn: Callable[..., Any], args_list: Sequence[tuple[Any, ...]]) -> list[Any]:
        self._refuse_if_closed()
        return [fn(*args) for args in args_list]


def _init_worker(threads: int, parent: tuple[int, bool] | _Spawner | None = None) -> None:
    """A worker's start-up: ``parent`` is a pool worker's :class:`_Spawner`, which arrives
    unpickled as (driver pid, spawned by the main thread)."""
    if isinstance(parent, tuple):
        _exit_with_parent(*parent)
    torch.set_num_threads(threads)


#: prctl(2) option: the signal this process gets when the thread that spawned it ends.
_PR_SET_PDEATHSIG = 1
#: How often a pool worker's watcher thread checks that its driver is alive (seconds).
PARENT_CHECK_INTERVAL = 0.5


class _Spawner:
    """A pool worker's start-up argument that names the driver: pickled when the worker is
    spawned, in the thread that spawns it (``Process.start`` pickles its arguments there), it
    becomes ``(driver pid, spawned by the main thread)`` in the worker."""

    def __reduce__(self) -> tuple[Any, ...]:
        by_main = threading.current_thread() is threading.main_thread()
        return (tuple, ((os.getpid(), by_main),))


def _exit_with_parent(pid: int, by_main_thread: bool) -> None:
    """Make this pool worker end as soon as the driver process ``pid`` that spawned it dies.

    A SIGKILLed driver runs no clean-up: its workers kept training and writing (the pool's
    queues never report the driver gone to a busy worker, and an idle one waits on them for
    ever). On Linux the kernel sends SIGKILL to the worker when its parent dies
    (``prctl(PR_SET_PDEATHSIG)``) - but it does so when the *thread* that spawned the worker
    ends, so only for workers spawned by the driver's main thread, which lives as long as the
    process. Everywhere, a daemon thread also watches the parent: on POSIX the worker is
    re-parented when its driver dies (``os.getppid()`` changes), on Windows the parent's
    process handle is signalled. The check after ``prctl`` covers a driver that died before."""
    if by_main_thread and sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, ctypes.c_ulong(signal.SIGKILL), 0, 0, 0)
        except (OSError, AttributeError):  # pragma: no cover - no usable libc
            pass
    if os.name == "posix" and os.getppid() != pid:
        os._exit(1)
    threading.Thread(
        target=_watch_parent, args=(pid,), name="gradhpo-watch-driver", daemon=True
    ).start()


def _watch_parent(pid: int) -> None:
    if os.name == "posix":
        while os.getppid() == pid:
            time.sleep(PARENT_CHECK_INTERVAL)
    else:  # pragma: no cover - Windows: no re-parenting; wait on the parent's handle
        from multiprocessing.connection import wait as wait_for

        parent = mp.parent_process()
        if parent is None:
            return
        wait_for([parent.sentinel])
    os._exit(1)  # from any thread: the whole process, at once, no clean-up to run


class ProcessExecutor(Executor):
    """A pool of ``workers`` local processes (``spawn``: no state inherited from the driver),
    each with ``threads_per_worker`` torch threads, kept alive between :meth:`run` calls (a
    PBT run submits one round of member tasks after another; starting a Python process that
    imports torch costs ~2-3 s here). A worker that dies (killed, crashed) breaks the pool:
    the pool is rebuilt and every unfinished task submitted again — tasks must therefore be
    idempotent, which study drivers (they continue the shared study) and PBT member tasks
    (they write their own output file) are. More than ``max_failures`` such breaks in all raise
    :class:`WorkerFailed`. Results must be picklable. A worker ends by itself when its driver
    process dies, even by SIGKILL (see :func:`_exit_with_parent`): at once on Linux, within
    ``PARENT_CHECK_INTERVAL`` seconds on other POSIX systems or when a thread other than the
    main one spawned it."""

    name = "processes"

    def __init__(
        self,
        workers: int | None = None,
        *,
        threads_per_worker: int | None = None,
        max_failures: int = 3,
    ) -> None:
        self.workers = _check("workers", workers if workers is not None else _cpu_count(), 1)
        self.threads = _check(
            "threads_per_worker", _threads_for(self.workers, threads_per_worker), 1
        )
        self.max_failures = _check("max_failures", max_failures, 0)
        self.failures = 0
        self._pool: Any = None

    def _get_pool(self) -> Any:
        if self._pool is None:
            self._pool = ProcessPoolExecutor(
                max_workers=self.workers,
                mp_context=mp.get_context("spawn"),
                initializer=_init_worker,
                initargs=(self.threads, _Spawner()),
            )
        return self._pool

    def run(self, fn: Callable[..., Any], args_list: Sequence[tuple[Any, ...]]) -> list[Any]:
        self._refuse_if_closed()
        results: dict[int, Any] = {}
        todo = list(range(len(args_list)))
        while todo:
            pool = self._get_pool()
            futures = {pool.submit(fn, *args_list[i]): i for i in todo}
            wait(futures)
            broken = False
            for future, i in futures.items():
                try:
                    results[i] = future.result()
                except BrokenProcessPool:
                    broken = True
            todo = [i for i in todo if i not in results]
            if broken and not self._break():
                raise WorkerFailed(
                    f"a worker process died; {self.failures} failures > max_failures={self.max_failures}"
                )
        return [results[i] for i in range(len(args_list))]

    def _break(self) -> bool:
        """The pool broke: drop it, count the failure; False once failures exceed the limit."""
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None
        self.failures += 1
        return self.failures <= self.max_failures

    def _start(self, task: Task) -> None:
        pool = self._get_pool()
        task._handle, task._pool = pool.submit(task.fn, *task.args), pool

    def _wait(self, pending: list[Task]) -> None:
        """Tasks whose pool broke (here or in ``run``) are submitted again to a new pool, as
        ``run`` does with its unfinished tasks; a break beyond ``max_failures`` finishes every
        task it broke with :class:`WorkerFailed`."""
        while True:
            broken = []
            for task in pending:
                if not task._handle.done():
                    continue
                try:
                    task._finish(task._handle.result())
                except (BrokenProcessPool, CancelledError):
                    broken.append(task)
                except Exception as exc:  # noqa: BLE001 - the task's, raised by its result()
                    task._finish(error=exc)
            if broken and any(task._pool is self._pool for task in broken) and not self._break():
                error = WorkerFailed(
                    f"a worker process died; {self.failures} failures > "
                    f"max_failures={self.max_failures}"
                )
                for task in broken:
                    task._finish(error=error)
            if any(task.done for task in pending):
                return
            for task in pending:
                if task._pool is not self._pool:  # its pool broke and was dropped
                    self._start(task)
            wait([task._handle for task in pending], return_when=FIRST_COMPLETED)

    def close(self) -> None:
        super().close()
        if self._pool is not None:  # unfinished submitted tasks are cancelled, not run
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None


class RayExecutor(Executor):
    """Workers as Ray tasks with resource requests (``num_cpus``, ``num_gpus``, fractional GPUs
    allowed). ``address`` connects to a running cluster (``"auto"`` or ``ray://host:port``);
    without it a local instance is started, dashboard off, bound to 127.0.0.1, its files under
    ``temp_dir`` — and shut down by :meth:`close`. A task whose worker dies is retried by Ray up
    to ``max_failures`` times (``max_retries``); exceptions raised by the task are not retried."""

    name = "ray"

    def __init__(
        self,
        workers: int | None = None,
        *,
        address: str | None = None,
        num_cpus: int | None = None,
        num_cpus_per_worker: float = 1,
        num_gpus_per_worker: float = 0,
        max_failures: int = 3,
        temp_dir: str | None = None,
    ) -> None:
        if address is None and "ray" not in sys.modules:
            # Ray resolves 127.0.0.1 to the machine's network address unless its "no cluster"
            # mode is on (read once, when Ray is imported); a local instance must listen on
            # the loopback interface only. Worker processes inherit the variable.
            os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        try:
            import ray
        except ImportError as exc:  # pragma: no cover - depends on the install
            raise ValueError("executor 'ray' needs Ray: pip install 'gradhpo[ray]'") from exc
        self.ray = ray
        self.max_failures = _check("max_failures", max_failures, 0)
        if not isinstance(num_cpus_per_worker, (int, float)) or num_cpus_per_worker <= 0:
            raise ValueError(f"num_cpus_per_worker must be > 0, got {num_cpus_per_worker!r}")
        if not isinstance(num_gpus_per_worker, (int, float)) or num_gpus_per_worker < 0:
            raise ValueError(f"num_gpus_per_worker must be >= 0, got {num_gpus_per_worker!r}")
        self.num_cpus_per_worker = num_cpus_per_worker
        self.num_gpus_per_worker = num_gpus_per_worker
        self._started = False
        self._submitted: Any = None  # the remote function of submitted tasks, made once
        if not ray.is_initialized():
            if address is None:
                self._temp_dir = temp_dir or tempfile.mkdtemp(prefix="gradhpo-ray-")
                ray.init(
                    num_cpus=num_cpus or _cpu_count(),
                    include_dashboard=False,
                    _node_ip_address="127.0.0.1",
                    _temp_dir=self._temp_dir,
                    log_to_driver=False,
                    configure_logging=False,
                )
            else:
                ray.init(address=address, log_to_driver=False)
            self._started = True
        total = ray.cluster_resources().get("CPU", 1)
        self.workers = _check(
            "workers",
            workers if workers is not None else max(1, int(total // num_cpus_per_worker)),
            1,
        )
        self.threads = max(1, int(num_cpus_per_worker))

    def _remote(self) -> Any:
        return self.ray.remote(
            num_cpus=self.num_cpus_per_worker,
            num_gpus=self.num_gpus_per_worker,
            max_retries=self.max_failures,
            retry_exceptions=False,
        )(_run_with_threads)

    def _start(self, task: Task) -> None:
        # Not limited to ``workers`` in flight: Ray queues the tasks its resources cannot run.
        if self._submitted is None:
            self._submitted = self._remote()
        task._handle = self._submitted.remote(self.threads, task.fn, task.args)

    def _wait(self, pending: list[Task]) -> None:
        refs = {task._handle: task for task in pending}
        done, _ = self.ray.wait(list(refs), num_returns=1)
        for ref in done:
            task = refs[ref]
            try:
                task._finish(self.ray.get(ref))
            except self.ray.exceptions.WorkerCrashedError as exc:
                failed = WorkerFailed(
                    f"a worker died more than max_failures={self.max_failures} times"
                )
                failed.__cause__ = exc
                task._finish(error=failed)
            except Exception as exc:  # noqa: BLE001 - the task's, raised by its result()
                task._finish(error=exc)

    def run(self, fn: Callable[..., Any], args_list: Sequence[tuple[Any, ...]]) -> list[Any]:
        # Closed: Ray would otherwise start a default instance (not loopback-only) on its own.
        self._refuse_if_closed()
        remote = self._remote()
        results: list[Any] = [None] * len(args_list)
        queue = list(enumerate(args_list))
        in_flight: dict[Any, int] = {}
        while queue or in_flight:
            while queue and len(in_flight) < self.workers:
                index, args = queue.pop(0)
                in_flight[remote.remote(self.threads, fn, args)] = index
            done, _ = self.ray.wait(list(in_flight), num_returns=1)
            for ref in done:
                index = in_flight.pop(ref)
                try:
                    results[index] = self.ray.get(ref)
                except self.ray.exceptions.WorkerCrashedError as exc:
                    raise WorkerFailed(
                        f"worker {index} died more than max_failures={self.max_failures} times"
                    ) from exc
        return results

    def close(self) -> None:
        super().close()
        if self._started:
            self.ray.shutdown()
            self._started = False


EXECUTORS: dict[str, type[Executor]] = {
    "serial": SerialExecutor,
    "processes": ProcessExecutor,
    "ray": RayExecutor,
}


def make_executor(spec: str | Mapping[str, Any] | Executor | None = None) -> Executor:
    """``"serial"``, ``{"name": "processes", "workers": 2}``, ``{"name": "ray", "address":
    "auto", "num_gpus_per_worker": 0.5}``... or an Executor object."""
    if spec is None:
        return SerialExecutor()
    if isinstance(spec, Executor):
        return spec
    if isinstance(spec, str):
        spec = {"name": spec}
    if not isinstance(spec, Mapping) or spec.get("name") not in EXECUTORS:
        name = spec.get("name") if isinstance(spec, Mapping) else spec
        raise ValueError(
            f"executor.name: unknown executor {name!r}; choose one of {sorted(EXECUTORS)}"
        )
    kwargs = {k: v for k, v in spec.items() if k != "name"}
    try:
        return EXECUTORS[spec["name"]](**kwargs)
    except TypeError as exc:
        raise ValueError(f"executor: {exc}") from exc
