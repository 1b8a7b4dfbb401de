"""Overhead of 100 trivial trials on the serial, process and Ray executors.

Each executor runs drivers of one SQLite study (`gradhpo.search.drivers.run_objective_study`)
with an objective that only suggests one number (`gradhpo.testing.objectives.quadratic` without
its sleep: `instant`), so the time is start-up + storage + coordination. Serial: one driver in
this process; processes and Ray: ``--workers`` drivers (default 2 = the cores here), timed
from submitting the work to getting the results, including process / Ray-worker start-up; the
Ray instance itself is started once before timing (about 2.5 s here) and reported separately.

    python experiments/bench_executor_overhead.py --trials 100 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import optuna

from gradhpo.execution import ProcessExecutor, SerialExecutor
from gradhpo.search import create_study
from gradhpo.search.drivers import run_objective_study
from gradhpo.testing.objectives import instant

optuna.logging.set_verbosity(optuna.logging.WARNING)


def once(executor, workers: int, trials: int) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        create_study(Path(tmp) / "s", sampler="random", pruner=None, seed=0)
        start = time.perf_counter()
        run_objective_study(Path(tmp) / "s", instant, executor, workers=workers, n_trials=trials)
        return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--no-ray", action="store_true")
    parser.add_argument(
        "--out", type=Path, default=Path("experiments/results/bench_executor_overhead")
    )
    args = parser.parse_args()

    results: dict[str, dict] = {}
    plans = [
        ("serial", SerialExecutor(), 1),
        ("processes", ProcessExecutor(args.workers, threads_per_worker=1), args.workers),
    ]
    ray_executor = None
    if not args.no_ray:
        from gradhpo.execution import RayExecutor

        start = time.perf_counter()
        ray_executor = RayExecutor(args.workers, num_cpus=args.workers)
        results["ray start-up"] = {"median_s": time.perf_counter() - start}
        plans.append(("ray", ray_executor, args.workers))
    try:
        for name, executor, workers in plans:
            times = [once(executor, workers, args.trials) for _ in range(args.repeats)]
            results[name] = {
                "workers": workers,
                "seconds": times,
                "median_s": statistics.median(times),
            }
            print(
                f"{name:>10} ({workers} driver(s)): {args.trials} trials in {statistics.median(times):.2f} s (median of {args.repeats})"
            )
    finally:
        if ray_executor is not None:
            ray_executor.close()
    if "ray start-up" in results:
        print(
            f"ray start-up (once, not in the figures above): {results['ray start-up']['median_s']:.2f} s"
        )
    args.out.mkdir(parents=True, exist_ok=True)
    payload = {
        "command": f"python experiments/bench_executor_overhead.py --trials {args.trials} --repeats {args.repeats} --workers {args.workers}",
        "date": time.strftime("%Y-%m-%d"),
        "results": results,
    }
    (args.out / "results.json").write_text(json.dumps(payload, indent=2))


if __name__ == "__main__":
    main()
