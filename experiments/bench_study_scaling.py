"""Throughput of a real small study with 1, 2, 4 workers (issue 17).

The study is the product's config path: a study config (default: the main job's
``experiments/configs/digits_search.yaml``, a CNN architecture search on scikit-learn's 8x8
digits with hypergradient-tuned lr/wd inside every trial) with a fixed number of short trials,
run by :func:`gradhpo.jobs.tune.prepare_study` and :func:`gradhpo.jobs.tune.run_study` with
``search.executor`` set to each setting: ``processes`` (a spawn pool, ``threads_per_worker``
torch threads each) and ``ray`` (a local Ray instance with ``num_cpus`` = workers x threads,
``num_cpus_per_worker`` = threads), ``--workers`` drivers of the one shared study (journal
storage, the default). ``serial`` runs the study in the measuring process itself (one worker).

Every (setting, repeat) is one fresh Python process, run one after another (repeat by repeat,
the settings in the order given), in a fresh temporary directory. Per run: the seconds of
``run_study`` (starting the workers, the trials, the test evaluation of the best trial), the
span from the first trial's start to the last trial's end, trials finished (complete + pruned +
failed), trials per minute (finished / ``run_study`` seconds), epochs trained (one report per
epoch, summed over trials) and epochs per minute, the mean seconds of a trial and of one epoch
inside a worker, and the best validation value. The pruner and early stopping make the work of
a trial depend on what the other workers have reported, so trials per minute and epochs per
minute differ; ``--fixed-work`` turns both off (every trial trains every epoch). The summary
gives medians over repeats and the speed-up of each setting over the same executor with 1
worker: median ``run_study`` seconds of 1 worker / of N workers, and the ratio of epochs per
minute.

Writes ``results.json`` (every run and the summary), ``runs.csv`` and ``results.md`` under
``--out``.

    python experiments/bench_study_scaling.py --trials 12 --workers 1 2 4 --repeats 2
    python experiments/bench_study_scaling.py --fixed-work --epochs 30 --out /tmp/scaling
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
EXECUTORS = ("serial", "processes", "ray")
DEFAULT_CONFIG = ROOT / "experiments" / "configs" / "digits_search.yaml"


def _loadavg() -> str:
    try:
        return Path("/proc/loadavg").read_text().strip()
    except OSError:  # not Linux
        return "n/a"


def executor_spec(name: str, workers: int, threads: int) -> dict[str, Any]:
    """The ``search.executor`` entry of one setting."""
    if name == "serial":
        if workers != 1:
            raise ValueError(f"--workers: the serial executor has one worker, got {workers}")
        return {"name": "serial", "workers": 1}
    if name == "processes":
        return {"name": "processes", "workers": workers, "threads_per_worker": threads}
    if name == "ray":
        return {
            "name": "ray",
            "workers": workers,
            "num_cpus": workers * threads,
            "num_cpus_per_worker": threads,
        }
    raise ValueError(f"--executors: unknown executor {name!r}; choose one of {list(EXECUTORS)}")


# ---------------------------------------------------------------------- one run (child)
def run_once(spec: dict[str, Any]) -> dict[str, Any]:
    """One setting, in this process: prepare the study from the config, run it, measure."""
    started = time.perf_counter()
    import optuna
    import torch

    from gradhpo.config import load_yaml
    from gradhpo.jobs.tune import prepare_study, run_study

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    torch.set_num_threads(spec["threads"])
    root = Path(spec["dir"])
    raw = load_yaml(spec["config"])
    raw["name"] = f"scaling_{spec['executor']}_{spec['workers']}"
    raw["search"]["trials"] = spec["trials"]
    raw["search"]["executor"] = executor_spec(spec["executor"], spec["workers"], spec["threads"])
    if spec["epochs"] is not None:
        raw["training"]["epochs"] = spec["epochs"]
    if spec["fixed_work"]:  # every trial trains every epoch
        raw["search"]["pruner"] = None
        raw["search"]["early_stopping"] = None
    raw["output"] = {"dir": str(root / "runs"), "tensorboard_dir": str(root / "tb")}
    load_before = _loadavg()
    study, config, space, folds = prepare_study(raw=raw)
    t0 = time.perf_counter()
    summary = run_study(study, config, space, folds, progress=False)
    seconds = time.perf_counter() - t0
    trials = [t for t in study.optuna.get_trials(deepcopy=False) if t.state.is_finished()]
    begun = [t.datetime_start for t in trials if t.datetime_start is not None]
    ended = [t.datetime_complete for t in trials if t.datetime_complete is not None]
    durations = [
        (t.datetime_complete - t.datetime_start).total_seconds()
        for t in trials
        if t.datetime_start is not None and t.datetime_complete is not None
    ]
    counts = study.trial_counts()
    finished = counts["finished"]
    epochs = sum(len(t.intermediate_values) for t in trials)  # one report per epoch
    return {
        "executor": spec["executor"],
        "workers": spec["workers"],
        "threads_per_worker": spec["threads"],
        "repeat": spec["repeat"],
        "run_study_s": seconds,
        "process_s": time.perf_counter() - started,
        "span_s": (max(ended) - min(begun)).total_seconds() if begun and ended else None,
        "counts": counts,
        "finished": finished,
        "trials_per_min": 60.0 * finished / seconds,
        "mean_trial_s": statistics.mean(durations) if durations else None,
        "epochs": epochs,
        "epochs_per_min": 60.0 * epochs / seconds,
        "s_per_epoch": sum(durations) / epochs if epochs else None,
        "metric": config["search"]["metric"],
        "best_value": None if summary is None else summary["value"],
        "best_trial": None if summary is None else summary["trial"],
        "test_accuracy": None if summary is None else summary["test_accuracy"],
        "loadavg_before": load_before,
        "loadavg_after": _loadavg(),
    }


# ---------------------------------------------------------------------- summary
def summarize(runs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Medians per (executor, workers), in the order first seen; ``speedup``: the median
    ``run_study`` seconds of the same executor with 1 worker over this setting's (None when
    1 worker was not run)."""
    groups: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for r in runs:
        groups.setdefault((r["executor"], r["workers"]), []).append(r)
    rows = []
    for (name, workers), group in groups.items():

        def med(key: str, group: list[dict[str, Any]] = group) -> float | None:
            values = [r[key] for r in group if r[key] is not None]
            return statistics.median(values) if values else None

        rows.append(
            {
                "executor": name,
                "workers": workers,
                "repeats": len(group),
                "run_study_s": med("run_study_s"),
                "span_s": med("span_s"),
                "process_s": med("process_s"),
                "finished": med("finished"),
                "finished_pruned": [(r["finished"], r["counts"]["pruned"]) for r in group],
                "trials_per_min": med("trials_per_min"),
                "mean_trial_s": med("mean_trial_s"),
                "epochs": med("epochs"),
                "epochs_per_min": med("epochs_per_min"),
                "s_per_epoch": med("s_per_epoch"),
                "best_value": med("best_value"),
                "best_values": [r["best_value"] for r in group],
                "test_accuracy": med("test_accuracy"),
            }
        )
    base = {r["executor"]: r for r in rows if r["workers"] == 1}
    for r in rows:
        one = base.get(r["executor"])
        r["speedup"] = r["epochs_speedup"] = None
        if one is not None and one["run_study_s"] and r["run_study_s"]:
            r["speedup"] = one["run_study_s"] / r["run_study_s"]
        if one is not None and one["epochs_per_min"] and r["epochs_per_min"]:
            r["epochs_speedup"] = r["epochs_per_min"] / one["epochs_per_min"]
    return rows


def _f(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def markdown(rows: Sequence[dict[str, Any]], metric: str) -> str:
    header = [
        "executor",
        "workers",
        "repeats",
        "run_study s",
        "trials span s",
        "finished (pruned)",
        "trials/min",
        "speed-up vs 1",
        "epochs trained",
        "epochs/min",
        "epochs/min vs 1",
        "mean trial s",
        "s per epoch in a worker",
        f"best {metric} (each repeat)",
        "test acc.",
    ]
    # One separator cell per header cell (a short separator row breaks the table).
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        values = ", ".join(_f(v, ".4f") for v in r["best_values"])
        counts = ", ".join(f"{n} ({p})" for n, p in r["finished_pruned"])
        lines.append(
            f"| {r['executor']} | {r['workers']} | {r['repeats']} | {_f(r['run_study_s'], '.1f')} "
            f"| {_f(r['span_s'], '.1f')} | {counts} "
            f"| {_f(r['trials_per_min'], '.1f')} | {_f(r['speedup'], '.2f')} "
            f"| {_f(r['epochs'], 'g')} | {_f(r['epochs_per_min'], '.1f')} "
            f"| {_f(r['epochs_speedup'], '.2f')} "
            f"| {_f(r['mean_trial_s'], '.2f')} | {_f(r['s_per_epoch'], '.3f')} "
            f"| {_f(r['best_value'], '.4f')} ({values}) "
            f"| {_f(r['test_accuracy'], '.4f')} |"
        )
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------- driver (parent)
def _child(spec: dict[str, Any], timeout: float) -> dict[str, Any]:
    """Run one setting in a fresh Python process, its files in a fresh temporary directory
    (also its TMPDIR: a local Ray instance puts its session there)."""
    root = tempfile.mkdtemp(prefix="bss", dir="/tmp")  # short: Ray's socket paths
    spec = {**spec, "dir": root}
    result = Path(root) / "result.json"
    env = {**os.environ, "TMPDIR": root, "OMP_NUM_THREADS": str(spec["threads"])}
    try:
        done = subprocess.run(
            [sys.executable, __file__, "--one", json.dumps(spec), "--result", str(result)],
            env=env,
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if done.returncode != 0:
            raise RuntimeError(
                f"{spec['executor']} x {spec['workers']} (repeat {spec['repeat']}) failed "
                f"with exit code {done.returncode}:\n{done.stderr[-3000:]}"
            )
        return json.loads(result.read_text(encoding="utf-8"))
    finally:
        shutil.rmtree(root, ignore_errors=True)


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="a study config")
    parser.add_argument("--trials", type=int, default=12, help="trials of every study")
    parser.add_argument("--epochs", type=int, default=None, help="override training.epochs")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--executors", nargs="+", choices=EXECUTORS, default=["processes", "ray"])
    parser.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    parser.add_argument(
        "--fixed-work",
        action="store_true",
        help="no pruner, no early stopping: every trial trains training.epochs epochs",
    )
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per run")
    parser.add_argument(
        "--out", type=Path, default=ROOT / "experiments" / "results" / "bench_study_scaling"
    )
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one is not None:
        return args
    for field, values in (
        ("--trials", [args.trials]),
        ("--workers", args.workers),
        ("--threads", [args.threads]),
        ("--repeats", [args.repeats]),
        ("--epochs", [] if args.epochs is None else [args.epochs]),
    ):
        bad = [v for v in values if v < 1]
        if bad:
            parser.error(f"{field}: expected integers >= 1, got {bad[0]}")
    if not args.timeout > 0:
        parser.error(f"--timeout: expected seconds > 0, got {args.timeout}")
    if not args.config.is_file():
        parser.error(f"--config: no such file: {args.config}")
    if "serial" in args.executors and args.workers != [1]:
        parser.error(
            f"--executors serial: the serial executor has one worker; got --workers "
            f"{' '.join(map(str, args.workers))} (run serial on its own with --workers 1)"
        )
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse(argv)
    if args.one is not None:
        result = run_once(json.loads(args.one))
        args.result.write_text(json.dumps(result), encoding="utf-8")
        return
    settings = [(name, w) for name in args.executors for w in args.workers]
    runs = []
    for repeat in range(args.repeats):
        for name, workers in settings:
            spec = {
                "executor": name,
                "workers": workers,
                "threads": args.threads,
                "repeat": repeat,
                "trials": args.trials,
                "epochs": args.epochs,
                "fixed_work": args.fixed_work,
                "config": str(args.config.resolve()),
            }
            r = _child(spec, args.timeout)
            runs.append(r)
            print(
                f"repeat {repeat} {name:>9} x {workers}: run_study {r['run_study_s']:.1f} s, "
                f"{r['finished']} finished ({r['trials_per_min']:.1f}/min), {r['epochs']} epochs "
                f"({r['epochs_per_min']:.1f}/min), mean trial "
                f"{_f(r['mean_trial_s'], '.2f')} s, best {r['metric']} "
                f"{_f(r['best_value'], '.4f')}; loadavg {r['loadavg_before']} -> "
                f"{r['loadavg_after']}",
                flush=True,
            )
    rows = summarize(runs)
    metric = runs[0]["metric"] if runs else "value"
    table = markdown(rows, metric)
    print(table)
    command = " ".join(["python", "experiments/bench_study_scaling.py", *(argv or sys.argv[1:])])
    args.out.mkdir(parents=True, exist_ok=True)
    payload = {
        "command": command,
        "config": str(args.config),
        "fixed_work": args.fixed_work,
        "machine": f"{platform.machine()} python {platform.python_version()} "
        f"{os.cpu_count()} cores",
        "date": time.strftime("%Y-%m-%d"),
        "runs": runs,
        "summary": rows,
    }
    (args.out / "results.json").write_text(json.dumps(payload, indent=2), encoding="utf-8")
    with (args.out / "runs.csv").open("w", newline="", encoding="utf-8") as f:
        kinds = ("complete", "pruned", "failed")
        fields = [k for k in runs[0] if k != "counts"] + list(kinds)
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        for r in runs:
            writer.writerow({**r, **{k: r["counts"][k] for k in kinds}})
    (args.out / "results.md").write_text(f"Command: `{command}`\n\n{table}", encoding="utf-8")


if __name__ == "__main__":
    main()
