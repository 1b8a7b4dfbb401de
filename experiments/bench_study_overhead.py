"""Overhead of the study machinery: 100 trivial trials with SQLite storage.

Compares, in the same process and run:

* ``plain optuna``: ``optuna.create_study(storage="sqlite:///...")`` + ``study.optimize``
  with Optuna's default SQLite settings (the baseline);
* ``gradhpo Study``: :func:`gradhpo.search.create_study` + ``Study.optimize`` (WAL journal,
  sampler-state file, driver heartbeat, stale-trial checks).

The objective does nothing but suggest two parameters, so the time is all overhead. Each
repetition uses a fresh directory; the script reports the median over repetitions.

    python experiments/bench_study_overhead.py --trials 100 --repeats 5
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import optuna

from gradhpo.search import create_study

optuna.logging.set_verbosity(optuna.logging.WARNING)


def objective(trial: optuna.trial.BaseTrial) -> float:
    x = trial.suggest_float("x", -1.0, 1.0)
    k = trial.suggest_categorical("k", ["a", "b", "c"])
    return x * x + (k == "b")


def plain(directory: Path, sampler: str, trials: int) -> float:
    s = (
        optuna.samplers.RandomSampler(seed=0)
        if sampler == "random"
        else optuna.samplers.TPESampler(seed=0)
    )
    study = optuna.create_study(storage=f"sqlite:///{directory / 'plain.db'}", sampler=s)
    start = time.perf_counter()
    study.optimize(objective, n_trials=trials)
    return time.perf_counter() - start


def ours(directory: Path, sampler: str, trials: int) -> float:
    study = create_study(directory / "study", sampler=sampler, pruner=None, seed=0)
    start = time.perf_counter()
    study.optimize(objective, n_trials=trials)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--samplers", nargs="+", default=["random", "tpe"])
    parser.add_argument(
        "--out", type=Path, default=Path("experiments/results/bench_study_overhead")
    )
    args = parser.parse_args()

    results = {}
    for sampler in args.samplers:
        times: dict[str, list[float]] = {"plain optuna": [], "gradhpo Study": []}
        for _ in range(args.repeats):
            with tempfile.TemporaryDirectory() as tmp:
                times["plain optuna"].append(plain(Path(tmp), sampler, args.trials))
            with tempfile.TemporaryDirectory() as tmp:
                times["gradhpo Study"].append(ours(Path(tmp), sampler, args.trials))
        med = {k: statistics.median(v) for k, v in times.items()}
        results[sampler] = {
            "seconds": times,
            "median_s": med,
            "ratio_ours_over_plain": med["gradhpo Study"] / med["plain optuna"],
        }
        print(
            f"{sampler:>6}: {args.trials} trials  plain optuna {med['plain optuna']:.3f} s  "
            f"gradhpo Study {med['gradhpo Study']:.3f} s  "
            f"(ratio {results[sampler]['ratio_ours_over_plain']:.2f}; per trial "
            f"{1000 * med['gradhpo Study'] / args.trials:.1f} ms)"
        )
    args.out.mkdir(parents=True, exist_ok=True)
    payload = {
        "command": f"python experiments/bench_study_overhead.py --trials {args.trials} --repeats {args.repeats}",
        "machine": f"{platform.machine()} {platform.processor() or ''} python {platform.python_version()}".strip(),
        "optuna": optuna.__version__,
        "date": time.strftime("%Y-%m-%d"),
        "results": results,
    }
    (args.out / "results.json").write_text(json.dumps(payload, indent=2), encoding="utf-8")


if __name__ == "__main__":
    main()
