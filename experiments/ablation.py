"""Ablation: tuning methods compared at equal compute on one task, over several seeds.

Every method gets the same budget: wall-clock seconds (``--seconds``, measured in the same
process, one method at a time: the fair measure, since a hypergradient step costs more than a
plain one) or training steps (``--budget``: optimizer steps on training batches, summed over
all the runs it trains); both are reported either way. Each method's result is the test
accuracy of the configuration it selected on validation (the model at its best validation
epoch), with anytime curves of that number against seconds. The searched / tuned quantities are the learning rate
(log-uniform in [1e-3, 1]) and, for the samplers, the CNN's width; weight decay 5e-4,
momentum 0.9.

Methods:
  plain                                        the control: one untuned run at the lr the
                                              hypergradient modes start from (0.01)
  random, grid, tpe, tpe_hyperband, evolution  Optuna samplers over (lr, width), each trial a
                                              plain run of ``--trial-epochs`` epochs
  hg_greedy, hg_truncated, hg_amortized,       one run whose lr is tuned by hypergradients
  hg_forward, hg_carried                      (greedy K=1; reverse K=10 truncated to 5; the
                                              same on every 4th horizon only; forward K=10;
                                              forward K=10 with the tangents carried across
                                              the run) for the whole budget, fitted on a
                                              hyper-validation split carved from train (10 %)
                                              so that val, which selects, stays unseen
  sgd_hd                                       one run with the SGD-HD optimizer (online lr)
  pbt, pbt_hybrid                              PBT population of 4 sharing the budget; the
                                              hybrid's members also tune lr by hypergradient

Tasks: ``digits`` (2-D CNN on scikit-learn's 8x8 digits), ``mnist1d`` (1-D CNN on MNIST-1D),
``fashion_mnist`` (2-conv CNN with a flatten head on a 10,000-image stratified subset of
Fashion-MNIST, Debian's dataset-fashion-mnist; ``--train-size`` changes the subset, 0 keeps all
54,000), ``cifar10`` (small ResNet; only when the data files are present).

    python experiments/ablation.py --quick          # < 10 min on 2 CPU cores
    python experiments/ablation.py --task mnist1d --seeds 3 --budget 60000
    python experiments/ablation.py --task fashion_mnist --seeds 3 --seconds 300
    python experiments/ablation.py --headline --headline-task fashion_mnist --seeds 3

Writes experiments/results/ablation_<task>/{runs.csv, curves.csv, table.md, best_so_far.png,
anytime_test_vs_seconds.png} (``--out`` elsewhere); ``--results PAGE`` appends the table to a
results page (experiments/RESULTS.md is written by hand from these files, never overwritten).
The headline writes experiments/results/headline_<task>_e<epochs>_n<size>/: one CSV per seed,
table.md and the anytime plot.
"""

from __future__ import annotations

import argparse
import csv
import math
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import optuna  # noqa: E402
import torch  # noqa: E402

from gradhpo.data import DatasetNotFoundError, load_dataset  # noqa: E402
from gradhpo.jobs.tune import HYPER_VAL_FRACTION  # noqa: E402
from gradhpo.pbt.manager import PopulationBasedTraining, RunMember  # noqa: E402
from gradhpo.run import TrainingRun  # noqa: E402
from gradhpo.search import create_study  # noqa: E402
from gradhpo.search.space import SearchSpace  # noqa: E402

optuna.logging.set_verbosity(optuna.logging.WARNING)
ROOT = Path(__file__).resolve().parents[1]

TASKS: dict[str, dict[str, Any]] = {
    "digits": {
        "data": {"name": "digits", "seed": 0},
        "model": {"name": "cnn", "depth": 2, "width": 16},
        "batch": 32,
    },
    "mnist1d": {
        "data": {"name": "mnist1d", "seed": 0},
        "model": {"name": "cnn1d", "depth": 3, "width": 32, "kernel_size": 5, "pooling": "stride"},
        "batch": 100,
    },
    "fashion_mnist": {
        "data": {"name": "fashion_mnist", "seed": 0, "train_size": 10000},
        "model": {"name": "cnn", "depth": 2, "width": 32, "head": "flatten", "head_width": 64},
        "batch": 128,
    },
    "cifar10": {"data": {"name": "cifar10", "seed": 0}, "model": {"name": "resnet"}, "batch": 128},
}
SAMPLERS = {
    "random": ("random", None),
    "grid": ("grid", None),
    "tpe": ({"name": "tpe", "n_startup_trials": 4}, None),
    "tpe_hyperband": (
        {"name": "tpe", "n_startup_trials": 4},
        {"name": "hyperband", "min_resource": 1},
    ),
    "evolution": ({"name": "evolution", "population_size": 4, "sample_size": 2}, None),
}
HYPERGRADIENT = {
    "hg_greedy": {"method": "greedy", "horizon": 1},
    "hg_truncated": {"method": "reverse", "horizon": 10, "truncate": 5},
    # Amortized: the same hypergradient on every 4th horizon only, plain steps in between.
    "hg_amortized": {"method": "reverse", "horizon": 10, "truncate": 5, "every": 4},
    "hg_forward": {"method": "forward", "horizon": 10},
    # Forward mode carried across the whole run (RTHO): long-horizon, online.
    "hg_carried": {"method": "forward", "horizon": 10, "carry": True, "carry_decay": 0.99},
}
METHODS = ["plain", *SAMPLERS, *HYPERGRADIENT, "sgd_hd", "pbt", "pbt_hybrid"]
LR_LOW, LR_HIGH, DEFAULT_LR_START = 1e-3, 1.0, 0.01
LR_START = DEFAULT_LR_START  # --start-lr
HEADLINE_MODES = [
    "plain",
    "hg_greedy",
    "hg_truncated",
    "hg_amortized",
    "hg_carried",
    "sgd_hd",
    "pbt",
    "pbt_hybrid",
]


class Tracker:
    """Counts training steps and seconds across every run of one method; records the best
    validation accuracy so far (and the test accuracy of the model that reached it). The
    budget is ``budget`` training steps, ``seconds`` of wall-clock, or both (whichever ends
    first); test evaluations are not counted against the clock."""

    def __init__(self, budget: int | None = None, seconds: float | None = None) -> None:
        if budget is None and seconds is None:
            raise ValueError("Tracker: give a step budget or seconds")
        self.budget = budget
        self.seconds = seconds
        self.steps = 0
        self.start = time.perf_counter()
        self.end: float | None = None  # set by finish(): the clock stops
        self.paused = 0.0  # seconds spent on test evaluations, not charged to the method
        self.stopped = False
        self.best_val = -1.0
        self.best_test = math.nan
        self.curve: list[tuple[int, float, float, float]] = []

    @property
    def elapsed(self) -> float:
        """Seconds charged to the method (frozen once it has finished)."""
        now = self.end if self.end is not None else time.perf_counter()
        return now - self.start - self.paused

    def finish(self) -> None:
        self.end = time.perf_counter()

    @property
    def remaining(self) -> int:
        """Training steps left (the step budget's; unbounded under a seconds budget)."""
        return 10**12 if self.budget is None else self.budget - self.steps

    @property
    def exhausted(self) -> bool:
        return (
            self.stopped
            or (self.budget is not None and self.steps >= self.budget)
            or (self.seconds is not None and self.elapsed >= self.seconds)
        )

    def record(self, steps: int, val: float, test_fn: Callable[[], float]) -> None:
        self.steps += steps
        if val > self.best_val:
            self.best_val = val
            started = time.perf_counter()
            self.best_test = test_fn()
            self.paused += time.perf_counter() - started
        self.curve.append((self.steps, self.elapsed, self.best_val, self.best_test))


def curve_rows(method: str, seed: int, tracker: Tracker) -> list[dict]:
    """A method's anytime curve as CSV rows: steps, seconds, best val so far, its test."""
    return [
        {
            "method": method,
            "seed": seed,
            "steps": s,
            "seconds": round(t, 3),
            "best_val": v,
            "test_of_best": b,
        }
        for s, t, v, b in tracker.curve
    ]


def make_run(
    task: dict,
    data: Any,
    seed: int,
    lr: float,
    width: int | None = None,
    tuner: dict | None = None,
    optimizer: str = "sgd",
) -> TrainingRun:
    model = dict(task["model"])
    if width is not None:
        model["width"] = width
    return TrainingRun(
        model=model,
        data=data,
        optimizer={"name": optimizer, "lr": lr, "momentum": 0.9, "weight_decay": 5e-4},
        batch_size=task["batch"],
        seed=seed,
        device="auto",
        tuner=tuner,
    )


def run_sampler(
    name: str, task: dict, data: Any, seed: int, tracker: Tracker, trial_epochs: int, tmp: Path
) -> None:
    sampler, pruner = SAMPLERS[name]
    space = SearchSpace.from_config(
        {
            "optimizer.lr": {
                "type": "float",
                "low": LR_LOW,
                "high": LR_HIGH,
                "log": True,
                "grid": [0.003, 0.03, 0.3],
            },
            "model.width": {"type": "categorical", "choices": [8, 16, 32]},
        }
    )
    study = create_study(
        tmp / f"{name}_{seed}",
        sampler=sampler,
        pruner=pruner,
        seed=seed,
        search_space=space,
        max_resource=trial_epochs,
    )

    def objective(trial: optuna.trial.Trial) -> float:
        params = space.suggest(trial)
        run = make_run(
            task, data, seed + trial.number, params["optimizer.lr"], params["model.width"]
        )
        best = 0.0
        for epoch in range(1, trial_epochs + 1):
            n = min(run.steps_per_epoch, tracker.remaining)
            if n <= 0 or tracker.exhausted:
                break
            run.step(n)
            val = run.evaluate("val")["accuracy"] if not run.diverged else 0.0
            tracker.record(n, val, lambda: run.evaluate("test")["accuracy"])
            best = max(best, val)
            trial.report(val, epoch)
            if trial.should_prune():
                raise optuna.TrialPruned()
        return best

    while not tracker.exhausted and not study.optuna._stop_flag:
        done = len(study.finished_trials())
        study.optimize(objective, n_trials=done + 1)


def run_hypergradient(name: str, task: dict, data: Any, seed: int, tracker: Tracker) -> None:
    tuner = {
        "hypers": [{"name": "lr"}],
        "hyper_lr": 0.05,
        "hyper_val_fraction": HYPER_VAL_FRACTION,
        **HYPERGRADIENT[name],
    }
    run = make_run(task, data, seed, LR_START, tuner=tuner)
    _train_single(run, tracker)


def run_sgd_hd(task: dict, data: Any, seed: int, tracker: Tracker) -> None:
    from gradhpo.optim import SGDHD

    run = make_run(task, data, seed, LR_START)
    run.optimizer = SGDHD(
        run.model.parameters(), lr=LR_START, momentum=0.9, weight_decay=5e-4, hypergrad_lr=1e-3
    )
    _train_single(run, tracker)


def _train_single(run: TrainingRun, tracker: Tracker) -> None:
    while not tracker.exhausted:
        n = min(run.steps_per_epoch, tracker.remaining)
        run.step(n)
        val = run.evaluate("val")["accuracy"] if not run.diverged else 0.0
        tracker.record(n, val, lambda: run.evaluate("test")["accuracy"])
        if run.diverged:
            tracker.stopped = True
            break


def run_pbt(task: dict, data: Any, seed: int, tracker: Tracker, hybrid: bool, tmp: Path) -> None:
    population = 4
    space = SearchSpace.from_config(
        {"optimizer.lr": {"type": "float", "low": LR_LOW, "high": LR_HIGH, "log": True}}
    )
    tuner = (
        {
            "hypers": [{"name": "lr"}],
            "method": "greedy",
            "horizon": 1,
            "hyper_lr": 0.05,
            "hyper_val_fraction": HYPER_VAL_FRACTION,
        }
        if hybrid
        else None
    )
    members: dict[int, RunMember] = {}

    def factory(i: int, values: dict) -> RunMember:
        members[i] = RunMember(
            make_run(task, data, seed * 100 + i, values["optimizer.lr"], tuner=tuner)
        )
        return members[i]

    probe = make_run(task, data, seed, LR_START)
    # The population shares the budget; under a seconds budget it runs until the clock stops
    # it (at the next member evaluation).
    total = 10**9 if tracker.budget is None else max(1, tracker.budget // population)
    interval = min(probe.steps_per_epoch, total)

    last_step = [0] * population

    def on_evaluate(i: int, step: int, score: float, member: Any, values: dict) -> None:
        trained, last_step[i] = step - last_step[i], step
        tracker.record(
            trained,
            score if not math.isnan(score) else 0.0,
            lambda: member.run.evaluate("test")["accuracy"],
        )
        if tracker.budget is None and tracker.exhausted:
            raise _OutOfTime

    pbt = PopulationBasedTraining(
        factory,
        space.parameters,
        tmp / f"pbt_{hybrid}_{seed}",
        population=population,
        interval=interval,
        total_steps=total,
        seed=seed,
        on_evaluate=on_evaluate,
    )
    try:
        pbt.run()
    except _OutOfTime:
        pass
    finally:
        pbt.close()


class _OutOfTime(Exception):
    """Stops a population when a seconds budget is spent."""


def run_method(
    method: str,
    task: dict,
    data: Any,
    seed: int,
    budget: int | None,
    trial_epochs: int,
    tmp: Path,
    seconds: float | None = None,
) -> Tracker:
    tracker = Tracker(budget, seconds)
    if method in SAMPLERS:
        run_sampler(method, task, data, seed, tracker, trial_epochs, tmp)
    elif method in HYPERGRADIENT:
        run_hypergradient(method, task, data, seed, tracker)
    elif method == "sgd_hd":
        run_sgd_hd(task, data, seed, tracker)
    elif method == "plain":  # the control: one untuned run at the tuned modes' starting lr
        _train_single(make_run(task, data, seed, LR_START), tracker)
    else:
        run_pbt(task, data, seed, tracker, hybrid=method == "pbt_hybrid", tmp=tmp)
    tracker.finish()
    return tracker


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", choices=sorted(TASKS), default="digits")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=METHODS)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument(
        "--budget", type=int, default=None, help="training steps per method per seed"
    )
    parser.add_argument(
        "--seconds",
        type=float,
        default=None,
        help="wall-clock seconds per method per seed (the fair budget; steps reported beside)",
    )
    parser.add_argument(
        "--train-size",
        type=int,
        default=None,
        help="fashion_mnist: training subset size (0 keeps all 54,000)",
    )
    parser.add_argument("--trial-epochs", type=int, default=3)
    parser.add_argument(
        "--target", type=float, default=None, help="validation accuracy for compute-to-target"
    )
    parser.add_argument(
        "--quick", action="store_true", help="digits, 2 seeds, a small budget (< 10 min)"
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--start-lr",
        type=float,
        default=DEFAULT_LR_START,
        help="the lr of the plain control and where the tuned modes start (a bad default "
        "shows what tuning recovers)",
    )
    parser.add_argument(
        "--headline",
        action="store_true",
        help="TPE's best of 30 trials vs gradhpo's modes at 1/5 of TPE's wall-clock seconds",
    )
    parser.add_argument("--headline-task", choices=sorted(TASKS), default="mnist1d")
    parser.add_argument(
        "--headline-modes", nargs="+", choices=HEADLINE_MODES, default=HEADLINE_MODES
    )
    parser.add_argument(
        "--seed-list", type=int, nargs="+", default=None, help="headline: these seeds only"
    )
    parser.add_argument(
        "--headline-table",
        action="store_true",
        help="headline: only redraw the table and plot from the seed files in --out",
    )
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument(
        "--results",
        type=Path,
        default=None,
        help="a results page to append the table to (e.g. experiments/RESULTS.md); the table "
        "is always in <out>/table.md",
    )
    args = parser.parse_args()
    if not (args.start_lr > 0 and math.isfinite(args.start_lr)):
        parser.error(f"--start-lr: expected a positive number, got {args.start_lr!r}")
    global LR_START
    LR_START = args.start_lr
    torch.set_num_threads(args.threads)
    # The first torch.optim optimizer of a process imports torch._dynamo (seconds): paid here,
    # before any method's clock starts, not by whichever method happens to run first.
    torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    if args.quick:
        args.task = "digits"
        args.budget = args.budget or 1200
    if args.headline:
        return headline(args)
    task = TASKS[args.task]
    try:
        data = load_task_data(task, args.train_size)
    except DatasetNotFoundError as exc:
        print(f"ablation: {exc}", file=sys.stderr)
        return 2
    per_epoch = len(data.train) // task["batch"]
    budget = args.budget or (None if args.seconds else 40 * per_epoch)
    target = args.target if args.target is not None else (0.95 if args.task == "digits" else 0.9)
    out = args.out or ROOT / "experiments" / "results" / f"ablation_{args.task}"
    out.mkdir(parents=True, exist_ok=True)
    command = "python experiments/ablation.py " + " ".join(sys.argv[1:])

    rows, curves = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for method in args.methods:
            for seed in range(args.seeds):
                tracker = run_method(
                    method, task, data, seed, budget, args.trial_epochs, Path(tmp), args.seconds
                )
                seconds = tracker.elapsed
                to_target = next((s for s, _, v, _ in tracker.curve if v >= target), None)
                rows.append(
                    {
                        "method": method,
                        "seed": seed,
                        "steps": tracker.steps,
                        "seconds": round(seconds, 2),
                        "best_val_accuracy": tracker.best_val,
                        "test_accuracy_of_best": tracker.best_test,
                        "steps_to_target": to_target,
                    }
                )
                curves += curve_rows(method, seed, tracker)
                print(
                    f"{method:>14} seed {seed}: val {tracker.best_val:.4f} test {tracker.best_test:.4f} steps {tracker.steps} {seconds:.1f} s"
                )

    write_csv(out / "runs.csv", rows)
    write_csv(out / "curves.csv", curves)

    def stats(values: list[float]) -> str:
        if len(values) == 1:
            return f"{values[0]:.4f}"
        return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}"

    lines = [
        f"| method | best val accuracy | test accuracy (of the best) | steps to {target:.0%} val (median) | steps (mean) | seconds (mean) |",
        "|---|---|---|---|---|---|",
    ]
    for method in args.methods:
        sel = [r for r in rows if r["method"] == method]
        reached = [r["steps_to_target"] for r in sel if r["steps_to_target"] is not None]
        reach = (
            f"{statistics.median(reached):.0f} ({len(reached)}/{len(sel)})"
            if reached
            else f"not reached (0/{len(sel)})"
        )
        lines.append(
            f"| {method} | {stats([r['best_val_accuracy'] for r in sel])} | {stats([r['test_accuracy_of_best'] for r in sel])} | "
            f"{reach} | {statistics.mean(r['steps'] for r in sel):.0f} | "
            f"{statistics.mean(r['seconds'] for r in sel):.1f} |"
        )
    budget_text = " and ".join(
        part
        for part in (
            f"{budget} training steps (~{budget / per_epoch:.0f} epochs)" if budget else "",
            f"{args.seconds:g} wall-clock seconds" if args.seconds else "",
        )
        if part
    )
    header = (
        f"Task `{args.task}` ({len(data.train)} training images), budget {budget_text} per "
        f"method per seed, {args.seeds} seeds (mean ± sd); plain runs at, and the tuned modes "
        f"start from, lr {LR_START:g}. Command: `{command}`. "
        f"Machine: {platform.machine()}, {torch.get_num_threads()} torch threads, "
        f"{'CUDA ' + torch.cuda.get_device_name() if torch.cuda.is_available() else 'CPU only'}; "
        f"{time.strftime('%Y-%m-%d')}."
    )
    table = header + "\n\n" + "\n".join(lines) + "\n"
    (out / "table.md").write_text(table)

    plot_curves(
        curves,
        args.methods,
        range(args.seeds),
        ("steps", "training steps (all runs of the method)"),
        ("best_val", "best validation accuracy so far"),
        f"ablation on {args.task}: best so far vs compute",
        out / "best_so_far.png",
        ylim=(max(0.0, target - 0.3), 1.0),
    )
    plot_curves(  # anytime: the test accuracy of the configuration selected so far
        curves,
        args.methods,
        range(args.seeds),
        ("seconds", "wall-clock seconds (training and validation)"),
        ("test_of_best", "test accuracy of the configuration selected on val"),
        f"{args.task}: anytime test accuracy vs seconds",
        out / "anytime_test_vs_seconds.png",
    )

    if args.results is not None:  # appended: the page also holds other runs' sections
        with args.results.open("a") as fh:
            fh.write(f"\n## Ablation: {args.task}\n\nFiles: `{out}`.\n\n" + table)
    print(table)
    return 0


def load_task_data(task: dict, train_size: int | None) -> Any:
    spec = dict(task["data"])
    if train_size is not None:
        if train_size:
            spec["train_size"] = train_size
        else:
            spec.pop("train_size", None)
    return load_dataset(spec.pop("name"), **spec)


def plot_curves(
    curves: list[dict],
    methods: list[str],
    seeds: list[int] | range,
    x: tuple[str, str],
    y: tuple[str, str],
    title: str,
    path: Path,
    ylim: tuple[float, float] | None = None,
) -> None:
    """One step line per method and seed of ``curves``' column ``y[0]`` against ``x[0]``
    (``x[1]``, ``y[1]``: axis labels); NaN points (no test figure yet) are left out."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for k, method in enumerate(methods):
        for seed in seeds:
            pts = [
                (c[x[0]], c[y[0]])
                for c in curves
                if c["method"] == method and c["seed"] == seed and not math.isnan(c[y[0]])
            ]
            if pts:
                ax.step(
                    [p[0] for p in pts],
                    [p[1] for p in pts],
                    where="post",
                    color=f"C{k % 10}",
                    alpha=0.8,
                    label=method if seed == seeds[0] else None,
                    linestyle="-" if k < 10 else "--",
                )
    ax.set_xlabel(x[1])
    ax.set_ylabel(y[1])
    if ylim is not None:
        ax.set_ylim(*ylim)
    ax.legend(fontsize=7, ncol=2)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def headline(args: argparse.Namespace) -> int:
    """TPE with 30 trials of ``--trial-epochs`` epochs against each gradhpo mode given one
    fifth of the wall-clock seconds TPE used, on ``--headline-task``. The goal: a mode that
    uses hypergradients reaches TPE's test accuracy (of the configuration selected on val).

    Each seed's rows and curves go to ``<out>/seed<k>.csv`` / ``curves_seed<k>.csv`` as each
    method finishes, so seeds can run in separate processes (``--seed-list``, one core each)
    and a killed run keeps what it finished; the table and the anytime plot are then drawn
    from every seed file of ``<out>`` (``--headline-table`` redraws them alone)."""
    task = TASKS[args.headline_task]
    out = args.out or headline_dir(args)
    out.mkdir(parents=True, exist_ok=True)
    if args.headline_table:
        return headline_table(args, out, task)
    try:
        data = load_task_data(task, args.train_size)
    except DatasetNotFoundError as exc:
        print(f"ablation: {exc}", file=sys.stderr)
        return 2
    setup = headline_setup(args, len(data.train))
    per_epoch = len(data.train) // task["batch"]
    tpe_budget = 30 * args.trial_epochs * per_epoch
    seeds = args.seed_list if args.seed_list is not None else list(range(args.seeds))
    with tempfile.TemporaryDirectory() as tmp:
        for seed in seeds:
            rows: list[dict] = []
            curves: list[dict] = []
            tpe = run_method("tpe", task, data, seed, tpe_budget, args.trial_epochs, Path(tmp))
            keep_seed_row(out, setup, seed, TPE_ROW, tpe, rows, curves)
            for mode in args.headline_modes:
                t = run_method(
                    mode, task, data, seed, None, args.trial_epochs, Path(tmp), tpe.elapsed / 5
                )  # tpe.elapsed is frozen: run_method stopped its clock
                keep_seed_row(out, setup, seed, mode, t, rows, curves)
    return headline_table(args, out, task)


TPE_ROW = "tpe (30 trials)"


def keep_seed_row(
    out: Path,
    setup: str,
    seed: int,
    method: str,
    tracker: Tracker,
    rows: list[dict],
    curves: list[dict],
) -> None:
    """Adds one finished method to its seed's rows and curves and rewrites both files."""
    rows.append(
        {
            "method": method,
            "seed": seed,
            "steps": tracker.steps,
            "seconds": round(tracker.elapsed, 2),
            "best_val": tracker.best_val,
            "test_of_best": tracker.best_test,
            "setup": setup,
        }
    )
    curves += curve_rows(method, seed, tracker)
    write_csv(out / f"seed{seed}.csv", rows)
    write_csv(out / f"curves_seed{seed}.csv", curves)
    print(
        f"{method} seed {seed}: val {tracker.best_val:.4f} test {tracker.best_test:.4f} "
        f"steps {tracker.steps} {tracker.elapsed:.1f} s",
        flush=True,
    )


def headline_dir(args: argparse.Namespace) -> Path:
    size = "all" if args.train_size == 0 else (args.train_size or "default")
    return (
        ROOT
        / "experiments"
        / "results"
        / f"headline_{args.headline_task}_e{args.trial_epochs}_n{size}"
    )


def headline_setup(args: argparse.Namespace, n_train: int) -> str:
    """What makes two seed files comparable: the task, the protocol and the machine."""
    return (
        f"{args.headline_task}, {n_train} training images, TPE 30 x {args.trial_epochs} epochs, "
        f"{platform.machine()}, {torch.get_num_threads()} torch threads"
        + (f", start lr {LR_START:g}" if LR_START != DEFAULT_LR_START else "")
    )


def write_csv(path: Path, rows: list[dict]) -> None:
    tmp = path.with_suffix(".tmp")
    with tmp.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    tmp.replace(path)


def read_seed_files(out: Path, stem: str) -> list[dict]:
    rows: list[dict] = []
    for path in sorted(out.glob(f"{stem}*.csv")):
        with path.open(newline="") as fh:
            for row in csv.DictReader(fh):
                for key in ("steps", "seed"):
                    row[key] = int(row[key])
                for key in ("seconds", "best_val", "test_of_best"):
                    row[key] = float(row[key])
                rows.append(row)
    return rows


def headline_table(args: argparse.Namespace, out: Path, task: dict) -> int:
    rows = read_seed_files(out, "seed")
    if not rows:
        print(f"ablation: no headline seed files (seed<k>.csv) in {out}", file=sys.stderr)
        return 2
    setups = sorted({r["setup"] for r in rows})
    if len(setups) > 1:
        print(f"ablation: {out} mixes seed files of different setups: {setups}", file=sys.stderr)
        return 2
    tpe_test = {r["seed"]: r["test_of_best"] for r in rows if r["method"] == TPE_ROW}
    methods = [TPE_ROW, *[m for m in HEADLINE_MODES if any(r["method"] == m for r in rows)]]

    def stats(values: list[float]) -> str:
        if len(values) == 1:
            return f"{values[0]:.4f}"
        return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}"

    lines = [
        "| method | seeds | steps (mean) | seconds (mean) | best val accuracy | "
        "test accuracy of the selected | reaches TPE's test accuracy |",
        "|---|---|---|---|---|---|---|",
    ]
    for method in methods:
        sel = [r for r in rows if r["method"] == method]
        reach = sum(r["test_of_best"] >= tpe_test[r["seed"]] for r in sel if r["seed"] in tpe_test)
        lines.append(
            f"| {method} | {len(sel)} | {statistics.mean(r['steps'] for r in sel):.0f} | "
            f"{statistics.mean(r['seconds'] for r in sel):.1f} | "
            f"{stats([r['best_val'] for r in sel])} | {stats([r['test_of_best'] for r in sel])} | "
            f"{'-' if method == TPE_ROW else f'{reach}/{len(sel)} seeds'} |"
        )
    seeds = sorted({r["seed"] for r in rows})
    text = (
        f"Setup: {setups[0]}; seeds {seeds}; every gradhpo mode gets one fifth of the seconds "
        f"TPE used in the same process (steps reported beside); hypergradients are fitted on a "
        f"hyper-validation split carved from train, never on val. Files: `{out.relative_to(ROOT) if out.is_relative_to(ROOT) else out}`; "
        f"{time.strftime('%Y-%m-%d')}.\n\n" + "\n".join(lines) + "\n"
    )
    (out / "table.md").write_text(text)
    curves = read_seed_files(out, "curves_seed")
    if curves:
        plot_curves(
            curves,
            methods,
            seeds,
            ("seconds", "wall-clock seconds (training and validation)"),
            ("test_of_best", "test accuracy of the configuration selected on val"),
            f"headline, {args.headline_task}: anytime test accuracy vs seconds",
            out / "anytime_test_vs_seconds.png",
        )
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
