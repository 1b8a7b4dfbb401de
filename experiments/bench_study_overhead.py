"""Overhead of the study machinery per storage and per executor, on trivial trials.

Storages (``--storages``), each against plain Optuna on the same kind of storage, in the same
process and run:

* ``memory``: ``optuna.create_study()`` vs ``create_study(dir, storage=InMemoryStorage())``;
* ``journal``: Optuna's ``JournalStorage(JournalFileBackend(path))`` with its default lock vs
  gradhpo's default (the directory's ``study.journal``);
* ``sqlite``: ``optuna.create_study(storage="sqlite:///...")`` (SQLite's defaults) vs
  ``create_study(dir, storage="sqlite")`` (WAL, ``synchronous=NORMAL``);
* ``postgresql``: both on one PostgreSQL server: ``--postgres-url URL`` (or
  ``$GRADHPO_BENCH_POSTGRES``), else a throwaway server started here
  (:class:`gradhpo.testing.postgres.PostgresServer`, fsync on: the server's defaults), else
  the row is skipped. gradhpo's Study adds its connection-loss retries around Optuna's storage.

What gradhpo adds on top of Optuna: the sampler-state file after each fresh trial, the driver
record and heartbeat, the stale-trial check and counting finished trials in the storage.

Executors (``--executors``): drivers of one study (journal storage) run by
:func:`gradhpo.search.drivers.run_objective_study`: ``serial`` (one driver here),
``processes`` and ``ray`` (``--workers`` drivers; Ray: a local one-node instance) and ``ray3``
(Ray's multi-node test cluster: a head without CPUs and three one-CPU nodes on this machine,
three drivers). Timed from submitting the work to the results, worker start-up included;
starting Ray itself is reported separately.

The objective only suggests parameters (two for the storages, one for the executors), so the
time is all overhead. Each repetition uses a fresh directory (and study name); the figures are
medians over repetitions. Writes ``results.json`` and ``results.md`` under ``--out``.

    python experiments/bench_study_overhead.py --trials 100 1000 --repeats 3
    python experiments/bench_study_overhead.py --trials 100 --storages postgresql \\
        --postgres-url postgresql://user:pw@host/db --executors
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend

from gradhpo.search import create_study
from gradhpo.search.study import mask_password

optuna.logging.set_verbosity(optuna.logging.WARNING)

STORAGES = ("memory", "journal", "sqlite", "postgresql")
EXECUTORS = ("serial", "processes", "ray", "ray3")
MiB = 1024 * 1024


def objective(trial: optuna.trial.BaseTrial) -> float:
    x = trial.suggest_float("x", -1.0, 1.0)
    k = trial.suggest_categorical("k", ["a", "b", "c"])
    return x * x + (k == "b")


def _sampler(name: str) -> optuna.samplers.BaseSampler:
    if name == "random":
        return optuna.samplers.RandomSampler(seed=0)
    return optuna.samplers.TPESampler(seed=0)


# ---------------------------------------------------------------------- storages
def plain(kind: str, directory: Path, sampler: str, trials: int, url: str | None) -> float:
    name = f"plain-{uuid.uuid4().hex[:8]}"
    storage: Any
    if kind == "memory":
        storage = None
    elif kind == "journal":
        storage = JournalStorage(JournalFileBackend(str(directory / "plain.journal")))
    elif kind == "sqlite":
        storage = f"sqlite:///{directory / 'plain.db'}"
    else:
        storage = url
    study = optuna.create_study(storage=storage, sampler=_sampler(sampler), study_name=name)
    start = time.perf_counter()
    study.optimize(objective, n_trials=trials)
    return time.perf_counter() - start


def ours(kind: str, directory: Path, sampler: str, trials: int, url: str | None) -> float:
    storage: Any = {
        "memory": optuna.storages.InMemoryStorage(),
        "journal": None,
        "sqlite": "sqlite",
        "postgresql": url,
    }[kind]
    study = create_study(
        directory / "study",
        name=f"ours-{uuid.uuid4().hex[:8]}",
        storage=storage,
        sampler=sampler,
        pruner=None,
        seed=0,
    )
    start = time.perf_counter()
    study.optimize(objective, n_trials=trials)
    return time.perf_counter() - start


def _postgres(args: argparse.Namespace) -> tuple[str | None, Any, str]:
    """(URL, server to close or None, how it was found)."""
    url = args.postgres_url or os.environ.get("GRADHPO_BENCH_POSTGRES")
    if url:
        return url, None, f"given: {mask_password(url)}"
    from gradhpo.testing.postgres import PostgresServer, missing_reason

    reason = missing_reason()
    if reason is not None:
        return None, None, f"skipped: {reason}"
    server = PostgresServer(durable=True)
    return server.create_database("bench"), server, "a throwaway local server (fsync on)"


def bench_storages(args: argparse.Namespace) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    url = server = None
    if "postgresql" in args.storages:
        url, server, how = _postgres(args)
        print(f"postgresql: {how}")
    try:
        for trials in args.trials:
            for sampler in args.samplers:
                for kind in args.storages:
                    if kind == "postgresql" and url is None:
                        continue
                    times: dict[str, list[float]] = {"plain optuna": [], "gradhpo Study": []}
                    for _ in range(args.repeats):
                        for label, fn in (("plain optuna", plain), ("gradhpo Study", ours)):
                            with tempfile.TemporaryDirectory() as tmp:
                                times[label].append(fn(kind, Path(tmp), sampler, trials, url))
                    med = {k: statistics.median(v) for k, v in times.items()}
                    row = {
                        "trials": trials,
                        "sampler": sampler,
                        "storage": kind,
                        "seconds": times,
                        "median_s": med,
                        "ratio_ours_over_plain": med["gradhpo Study"] / med["plain optuna"],
                    }
                    rows.append(row)
                    print(
                        f"{trials:>5} trials {sampler:>6} {kind:>10}: plain optuna "
                        f"{med['plain optuna']:.3f} s, gradhpo Study {med['gradhpo Study']:.3f} s "
                        f"(ratio {row['ratio_ours_over_plain']:.2f}; "
                        f"{1000 * med['gradhpo Study'] / trials:.2f} ms per trial)",
                        flush=True,
                    )
    finally:
        if server is not None:
            server.close()
    return rows


# ---------------------------------------------------------------------- executors
def _ray_cluster(nodes: int, root: str) -> Any:
    """Ray's multi-node test cluster: a head without CPUs and ``nodes`` one-CPU nodes on
    127.0.0.1, the driver connected."""
    os.environ["RAY_TMPDIR"] = root
    os.makedirs(os.path.join(root, "ray"), exist_ok=True)
    import ray
    from ray.cluster_utils import Cluster

    common = {"node_ip_address": "127.0.0.1", "object_store_memory": 80 * MiB}
    cluster = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": 0,
            "include_dashboard": False,
            "temp_dir": os.path.join(root, "ray"),
            **common,
        },
    )
    for _ in range(nodes):
        cluster.add_node(num_cpus=1, **common)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False, configure_logging=False)
    return cluster


def _executor(name: str, workers: int) -> tuple[Any, int, Callable[[], None], float]:
    """(executor, drivers, close, start-up seconds)."""
    from gradhpo.execution import ProcessExecutor, RayExecutor, SerialExecutor

    start = time.perf_counter()
    if name == "serial":
        return SerialExecutor(), 1, lambda: None, 0.0
    if name == "processes":
        ex = ProcessExecutor(workers, threads_per_worker=1)
        return ex, workers, ex.close, 0.0
    # Before Ray is imported: 127.0.0.1 stays the loopback address.
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    root = tempfile.mkdtemp(prefix="bso", dir="/tmp")  # short: Ray's socket paths
    if name == "ray":
        ex = RayExecutor(workers, num_cpus=workers, temp_dir=root)
        return ex, workers, ex.close, time.perf_counter() - start
    import ray

    cluster = _ray_cluster(3, root)
    ex = RayExecutor(3, address=cluster.address)

    def close() -> None:
        ray.shutdown()
        cluster.shutdown()

    return ex, 3, close, time.perf_counter() - start


def bench_executors(args: argparse.Namespace) -> list[dict[str, Any]]:
    from gradhpo.search.drivers import run_objective_study
    from gradhpo.testing.objectives import instant

    rows = []
    for name in args.executors:
        executor, drivers, close, startup = _executor(name, args.workers)
        try:
            for trials in args.trials:
                times = []
                for _ in range(args.repeats):
                    with tempfile.TemporaryDirectory() as tmp:
                        create_study(Path(tmp) / "s", sampler="random", pruner=None, seed=0)
                        start = time.perf_counter()
                        run_objective_study(
                            Path(tmp) / "s", instant, executor, workers=drivers, n_trials=trials
                        )
                        times.append(time.perf_counter() - start)
                row = {
                    "trials": trials,
                    "executor": name,
                    "drivers": drivers,
                    "startup_s": startup,
                    "seconds": times,
                    "median_s": statistics.median(times),
                }
                rows.append(row)
                print(
                    f"{trials:>5} trials {name:>10} ({drivers} driver(s)): "
                    f"{row['median_s']:.2f} s ({1000 * row['median_s'] / trials:.2f} ms per "
                    f"trial; start-up {startup:.1f} s, not included)",
                    flush=True,
                )
        finally:
            close()
    return rows


# ---------------------------------------------------------------------- output
def markdown(storage_rows: list[dict], executor_rows: list[dict]) -> str:
    lines = []
    if storage_rows:
        lines += [
            "| trials | sampler | storage | plain Optuna | gradhpo Study | ratio | ms per trial |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in storage_rows:
            m = r["median_s"]
            lines.append(
                f"| {r['trials']} | {r['sampler']} | {r['storage']} | {m['plain optuna']:.3f} s "
                f"| {m['gradhpo Study']:.3f} s | {r['ratio_ours_over_plain']:.2f} "
                f"| {1000 * m['gradhpo Study'] / r['trials']:.2f} |"
            )
    if executor_rows:
        lines += [
            "",
            "| trials | executor | drivers | time | ms per trial | start-up (not included) |",
            "|---|---|---|---|---|---|",
        ]
        for r in executor_rows:
            lines.append(
                f"| {r['trials']} | {r['executor']} | {r['drivers']} | {r['median_s']:.2f} s "
                f"| {1000 * r['median_s'] / r['trials']:.2f} | {r['startup_s']:.1f} s |"
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, nargs="+", default=[100])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--samplers", nargs="+", default=["random", "tpe"])
    parser.add_argument("--storages", nargs="*", choices=STORAGES, default=list(STORAGES))
    parser.add_argument(
        "--executors",
        nargs="*",
        choices=EXECUTORS,
        default=list(EXECUTORS),
        help="none: storages only",
    )
    parser.add_argument("--workers", type=int, default=2, help="drivers of processes / ray")
    parser.add_argument(
        "--postgres-url", default=None, help="a PostgreSQL database (default: start one here)"
    )
    parser.add_argument(
        "--out", type=Path, default=Path("experiments/results/bench_study_overhead")
    )
    args = parser.parse_args(argv)
    for field, values in (("--trials", args.trials), ("--repeats", [args.repeats])):
        if any(v < 1 for v in values):
            parser.error(f"{field}: expected integers >= 1, got {values}")

    storage_rows = bench_storages(args)
    executor_rows = bench_executors(args) if args.executors else []
    args.out.mkdir(parents=True, exist_ok=True)
    command = " ".join(mask_password(a) if "://" in a else a for a in ["python", *sys.argv])
    payload = {
        "command": command,
        "machine": f"{platform.machine()} {platform.processor() or ''} python "
        f"{platform.python_version()} {os.cpu_count()} cores".replace("  ", " "),
        "optuna": optuna.__version__,
        "date": time.strftime("%Y-%m-%d"),
        "storages": storage_rows,
        "executors": executor_rows,
    }
    (args.out / "results.json").write_text(json.dumps(payload, indent=2), encoding="utf-8")
    (args.out / "results.md").write_text(
        f"Command: `{command}`\n\n" + markdown(storage_rows, executor_rows), encoding="utf-8"
    )


if __name__ == "__main__":
    main()
