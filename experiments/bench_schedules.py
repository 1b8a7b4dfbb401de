"""Benchmark: the price of long-horizon hypergradients (issue 13).

Two figures, one process, interleaved rounds (the method order rotates), medians, ratios of
medians taken in the same run:

1. **Carried forward mode** (``HyperTuner(method="forward", carry=True)``): the cost of one
   horizon of K inner steps with 1, 2 and 8 scalar hyperparameters (lr; an lr schedule of 2
   segments; an lr schedule of 8 segments: 1, 2, 8 tangent directions) over K plain
   ``torch.optim.SGD`` steps.
2. **Schedule tuning** (``OfflineTuner``): the wall-clock of one outer step (a whole run of T
   inner steps differentiated with respect to a 4-segment lr schedule) by forward, reverse
   and checkpointed mode, over a plain run of T steps.

Problem: an MLP 40-50-10 (the MNIST-1D "meta-learn a learning rate" net) on random data of
MNIST-1D's shapes (batch 100, validation batch 1000) and, with ``--cnn``, the 2-conv CNN of
bench_engine.py (width 32, no BatchNorm, batch 32 of 1x28x28). SGD with momentum 0.9.

    python experiments/bench_schedules.py [--rounds 5] [--k 20] [--t 200] [--threads 2] [--cnn]

Prints a Markdown table (copy it into BENCHMARKS.md with the command, machine and date); the
load average is printed before and after: the figures only mean something on a quiet machine.
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # so that `python experiments/...` works without installing
    sys.path.insert(0, str(ROOT))

from gradhpo.models import build_model  # noqa: E402

from gradhpo.hyper import HyperTuner, OfflineTuner  # noqa: E402

PROBLEMS = {
    "mlp": ({"name": "mlp", "depth": 1, "width": 50}, (40,), 100, 1000),
    "cnn": (
        {"name": "cnn", "depth": 2, "width": 32, "norm": "none", "pooling": "max"},
        (1, 28, 28),
        32,
        32,
    ),
}


def data(shape, batch: int, n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(batch, *shape, generator=g), torch.randint(0, 10, (batch,), generator=g))
        for _ in range(n)
    ]


def methods(name: str, k: int, t: int) -> dict[str, Callable[[], None]]:
    config, shape, batch, val_size = PROBLEMS[name]
    torch.manual_seed(0)
    model = build_model(config, shape, 10)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    batches_k, batches_t = data(shape, batch, k, 1), data(shape, batch, t, 2)
    val = data(shape, val_size, 1, 3)[0]

    def reset() -> None:
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.copy_(start[n])

    def plain(batches) -> Callable[[], None]:
        def run() -> None:
            reset()
            opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
            loss_fn = torch.nn.CrossEntropyLoss()
            for x, y in batches:
                opt.zero_grad(set_to_none=True)
                loss_fn(model(x), y).backward()
                opt.step()

        return run

    def carried(segments: int) -> Callable[[], None]:
        spec = {"name": "lr", "init": 0.05}
        if segments > 1:
            spec["schedule"] = {"segments": segments, "steps": k}
        tuner = HyperTuner(
            model,
            [spec],
            optimizer="momentum",
            optimizer_kwargs={"momentum": 0.9},
            method="forward",
            horizon=k,
            carry=True,
        )

        def run() -> None:
            reset()
            tuner.opt_state = tuner.problem.optimizer.init(start)
            tuner.tangents = None
            tuner.step(batches_k, val)

        return run

    def offline(method: str) -> Callable[[], None]:
        spec = {"name": "lr", "init": 0.05, "schedule": {"segments": 4}}
        reset()
        tuner = OfflineTuner(
            model,
            [spec],
            budget=t,
            optimizer="momentum",
            optimizer_kwargs={"momentum": 0.9},
            method=method,
        )
        return lambda: tuner.step(batches_t, val)

    return {
        f"plain K={k}": plain(batches_k),
        "carried forward, 1 hyper": carried(1),
        "carried forward, 2 hypers": carried(2),
        "carried forward, 8 hypers": carried(8),
        f"plain run T={t}": plain(batches_t),
        "schedule outer step, forward": offline("forward"),
        "schedule outer step, reverse": offline("reverse"),
        "schedule outer step, checkpointed": offline("checkpointed"),
    }


def timed(fn: Callable[[], None]) -> float:
    gc.collect()
    gc.disable()
    try:
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start
    finally:
        gc.enable()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--k", type=int, default=20)
    parser.add_argument("--t", type=int, default=200)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cnn", action="store_true", help="also the 2-conv CNN")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    print(f"load average before: {os.getloadavg()}")
    lines = [
        f"Command: `python experiments/bench_schedules.py {' '.join(argv or sys.argv[1:])}`; "
        f"{platform.machine()}, {args.threads} threads, torch {torch.__version__}, "
        f"{time.strftime('%Y-%m-%d')}; medians of {args.rounds} interleaved rounds.",
        "",
        "| problem | method | median s | x plain |",
        "|---|---|---|---|",
    ]
    for name in ["mlp", "cnn"] if args.cnn else ["mlp"]:
        table = methods(name, args.k, args.t)
        for fn in table.values():  # warm-up, untimed
            fn()
        times: dict[str, list[float]] = {label: [] for label in table}
        labels = list(table)
        for r in range(args.rounds):
            for label in labels[r % len(labels) :] + labels[: r % len(labels)]:
                times[label].append(timed(table[label]))
        med = {label: statistics.median(v) for label, v in times.items()}
        for label in labels:
            base = med[labels[0]] if "T=" not in label and "outer" not in label else med[labels[4]]
            lines.append(f"| {name} | {label} | {med[label]:.4f} | {med[label] / base:.2f} |")
    print(f"load average after: {os.getloadavg()}")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
