"""Benchmark: time per training step of the hypergradient-descent optimizers
(:mod:`gradhpo.optim.hd`) against their torch.optim base optimizers (goal: <= 1.05x).

Pairs (same hyperparameters on both sides, ``weight_decay`` as given by ``--weight-decay``,
both values by default):

* ``torch.optim.SGD``                      vs ``SGDHD``   (hypergrad_lr 1e-3)
* ``torch.optim.SGD(momentum=0.9, nesterov=True)`` vs ``SGDNHD`` (hypergrad_lr 1e-3)
* ``torch.optim.Adam``                     vs ``AdamHD``  (hypergrad_lr 1e-7)
* ``torch.optim.AdamW``                    vs ``AdamWHD`` (hypergrad_lr 1e-7)

torch's optimizers run with their defaults (on CPU the single-tensor "for-loop" path; on CUDA
the multi-tensor ``foreach`` path; the ``base path`` column says which), i.e. what a user gets
by swapping one class for the other. Each HD optimizer is timed on both of its paths
(``--hd-paths``, default both): ``foreach`` (``foreach=True``, the default on CUDA: one dot
product per device and dtype, the update through torch's multi-tensor kernels) and
``per-tensor`` (``foreach=False``, the default on CPU: one dot product per tensor); one row
each, against the same base timings.

Model: ``build_model({"name": "cnn", "depth": 3, "width": 64}, (3, 32, 32), 10)`` (BatchNorm,
max pooling; 76,490 parameters in 11 tensors), batch 64 of random data, cross-entropy.
``--model logreg``: logistic regression on (1, 8, 8) inputs (650 parameters in 2 tensors), a
model whose ``step()`` is a large share of the training step.

Figures per pair:

1. **full step**: ``zero_grad(set_to_none=True)``, forward, loss, backward, ``step()``. Each
   side (base, HD on each path) has its own copy of the model (same initial weights) and its
   own optimizer; one repetition times ``--steps`` (default 1) consecutive steps of one side.
   After ``--warmup`` steps on each side, ``--repeats`` (default 41) repetitions per side are
   interleaved (A B C, C A B, B C A, then the same reversed, ...: fine-grained, so all sides see
   the same load, and no side always runs first); the figure per side is the median over
   repetitions of the mean time per step, and the ratio is median(HD) / median(base), with the
   min and max of the per-repetition ratios beside it.
2. **step only**: gradients are computed once, then ``optimizer.step()`` alone is timed
   (``--step-iters`` calls per repetition), same interleaving and medians.

A third column derives the HD optimizers' extra cost per training step from the step-only
figures, ``(median step() HD - median step() base) / median full step base``: the forward and
backward passes are the same on both sides, so this is the overhead a full step pays, measured
on a block of microseconds instead of one of hundreds of milliseconds (on a shared machine the
full-step ratio itself is only known to several per cent).

On CUDA every timed block is closed by ``torch.cuda.synchronize()``.

Before timing, the script looks for other busy processes (CPU use of every process sampled
from ``/proc`` over 3 s, so that a long-idle process with a high lifetime ``%CPU`` in ``ps aux``
does not count); if one uses more than 25 % of a core it waits and polls every 30 s for up to
``--wait`` seconds (default 600), then runs anyway and says so. With other jobs around the
benchmark uses one thread (``torch.set_num_threads(1)``); on an idle machine torch's default.

Usage (from the repository root)::

    .venv/bin/python experiments/bench_hd_optimizers.py --threads 1     # 4-6 min (+ up to 10 min waiting for other jobs)
    .venv/bin/python experiments/bench_hd_optimizers.py --quick         # < 1 min
    .venv/bin/python experiments/bench_hd_optimizers.py --device cuda   # default: auto
    .venv/bin/python experiments/bench_hd_optimizers.py --hd-paths foreach  # one HD path

Output: a Markdown table on stdout, ``results.csv`` and ``results.md`` in ``--out`` (default
``experiments/results/bench_hd/``).
"""

from __future__ import annotations

import argparse
import copy
import csv
import functools
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from gradhpo.models import build_model
from torch import nn
from torch.optim.optimizer import _default_to_fused_or_foreach

from gradhpo.optim import SGDHD, SGDNHD, AdamHD, AdamWHD

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "experiments" / "results" / "bench_hd"
NUM_CLASSES = 10
# name -> (build_model config, per-sample input shape)
MODELS: dict[str, tuple[dict, tuple[int, ...]]] = {
    "cnn": ({"name": "cnn", "depth": 3, "width": 64}, (3, 32, 32)),
    # a model whose step() is a large share of the training step (digits-sized input)
    "logreg": ({"name": "mlp", "depth": 0}, (1, 8, 8)),
}
LR = 1e-3

BaseFactory = Callable[[list[torch.Tensor], float], torch.optim.Optimizer]
HDFactory = Callable[[list[torch.Tensor], float, bool], torch.optim.Optimizer]

PAIRS: dict[str, tuple[BaseFactory, HDFactory]] = {
    "SGD / SGDHD": (
        lambda p, wd: torch.optim.SGD(p, lr=LR, weight_decay=wd),
        lambda p, wd, fe: SGDHD(p, lr=LR, weight_decay=wd, hypergrad_lr=1e-3, foreach=fe),
    ),
    "SGD-Nesterov / SGDNHD": (
        lambda p, wd: torch.optim.SGD(p, lr=LR, momentum=0.9, nesterov=True, weight_decay=wd),
        lambda p, wd, fe: SGDNHD(
            p, lr=LR, momentum=0.9, weight_decay=wd, hypergrad_lr=1e-3, foreach=fe
        ),
    ),
    "Adam / AdamHD": (
        lambda p, wd: torch.optim.Adam(p, lr=LR, weight_decay=wd),
        lambda p, wd, fe: AdamHD(p, lr=LR, weight_decay=wd, hypergrad_lr=1e-7, foreach=fe),
    ),
    "AdamW / AdamWHD": (
        lambda p, wd: torch.optim.AdamW(p, lr=LR, weight_decay=wd),
        lambda p, wd, fe: AdamWHD(p, lr=LR, weight_decay=wd, hypergrad_lr=1e-7, foreach=fe),
    ),
}
# the HD optimizers' two paths (their ``foreach`` argument)
HD_PATHS = {"foreach": True, "per-tensor": False}


def torch_default_path(params: list[torch.Tensor]) -> str:
    """The path torch.optim takes for these parameters when ``foreach`` is not given."""
    return (
        "foreach" if _default_to_fused_or_foreach(params, differentiable=False)[1] else "for-loop"
    )


# ---------------------------------------------------------------------------------- idle check
def _cpu_ticks() -> dict[int, tuple[int, str]]:
    ticks: dict[int, tuple[int, str]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2 :].split()
        ticks[int(entry)] = (int(fields[11]) + int(fields[12]), cmd)  # utime + stime
    return ticks


def busy_processes(window: float = 3.0, threshold: float = 0.25) -> list[str]:
    """Other processes that used more than ``threshold`` of a core over ``window`` seconds."""
    hz = os.sysconf("SC_CLK_TCK")
    before = _cpu_ticks()
    time.sleep(window)
    after = _cpu_ticks()
    me = os.getpid()
    busy = []
    for pid, (t1, cmd) in after.items():
        if pid == me or pid not in before:
            continue
        share = (t1 - before[pid][0]) / hz / window
        if share > threshold:
            busy.append(f"pid {pid} {100 * share:.0f}% {cmd[:110]}")
    return busy


def wait_until_idle(max_wait: float, poll: float = 30.0) -> tuple[bool, list[str], float]:
    """Polls until no other process is busy or ``max_wait`` s passed: (idle, busy, waited)."""
    start = time.monotonic()
    listing = subprocess.run(["ps", "aux", "--sort=-%cpu"], capture_output=True, text=True)
    print("ps aux (top 8 by lifetime %CPU):", flush=True)
    for line in listing.stdout.splitlines()[:8]:
        print("   ", line[:160])
    while True:
        busy = busy_processes()
        if not busy:  # confirm: other jobs here often start in waves
            time.sleep(5.0)
            busy = busy_processes()
        waited = time.monotonic() - start
        if not busy:
            return True, [], waited
        print(f"[{waited:5.0f} s] other busy processes:", *busy, sep="\n    ", flush=True)
        if waited + poll > max_wait:
            return False, busy, waited
        time.sleep(poll)


# ---------------------------------------------------------------------------------- timing
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Side:
    model: nn.Module
    opt: torch.optim.Optimizer


def _train_step(side: Side, x: torch.Tensor, y: torch.Tensor) -> None:
    side.opt.zero_grad(set_to_none=True)
    F.cross_entropy(side.model(x), y).backward()
    side.opt.step()


def time_block(fn: Callable[[], None], n: int, device: torch.device) -> float:
    """Mean seconds per call of ``n`` consecutive calls of ``fn``."""
    _sync(device)
    start = time.perf_counter()
    for _ in range(n):
        fn()
    _sync(device)
    return (time.perf_counter() - start) / n


def interleaved(
    fns: list[Callable[[], None]], n: int, repeats: int, device: torch.device
) -> list[list[float]]:
    """Per side, the per-repetition seconds per call; repetition ``r`` runs the sides rotated by
    ``r``, reversed every other round of rotations (two sides: A B, B A, B A, A B, ...)."""
    times: list[list[float]] = [[] for _ in fns]
    k = len(fns)
    for r in range(repeats):
        order = [(r + j) % k for j in range(k)]
        if (r // k) % 2:
            order.reverse()
        for i in order:
            times[i].append(time_block(fns[i], n, device))
    return times


@dataclass
class Row:
    device: str
    pair: str
    weight_decay: float
    hd_path: str
    base_path: str
    full_base: list[float]
    full_hd: list[float]
    step_base: list[float]
    step_hd: list[float]
    busy_after: list[str]

    @staticmethod
    def _ratio(a: list[float], b: list[float]) -> tuple[float, float, float]:
        per = [x / y for x, y in zip(a, b, strict=True)]
        return statistics.median(a) / statistics.median(b), min(per), max(per)

    @property
    def full_ratio(self) -> tuple[float, float, float]:
        return self._ratio(self.full_hd, self.full_base)

    @property
    def step_ratio(self) -> tuple[float, float, float]:
        return self._ratio(self.step_hd, self.step_base)

    @property
    def step_overhead(self) -> float:
        """Extra step() time of HD as a share of a full base training step."""
        extra = statistics.median(self.step_hd) - statistics.median(self.step_base)
        return extra / statistics.median(self.full_base)


def bench_pair(
    pair: str,
    weight_decay: float,
    device: torch.device,
    *,
    steps: int,
    warmup: int,
    repeats: int,
    step_iters: int,
    batch: int,
    model: str = "cnn",
    hd_paths: list[str] | None = None,
) -> list[Row]:
    """One row per HD path, all timed interleaved with the same base optimizer."""
    make_base, make_hd = PAIRS[pair]
    paths = hd_paths or list(HD_PATHS)
    torch.manual_seed(0)
    config, input_shape = MODELS[model]
    model0 = build_model(config, input_shape, NUM_CLASSES).to(device)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn((batch, *input_shape), generator=gen).to(device)
    y = torch.randint(0, NUM_CLASSES, (batch,), generator=gen).to(device)

    def maker(foreach: bool | None) -> Callable[[list[torch.Tensor]], torch.optim.Optimizer]:
        if foreach is None:
            return lambda params: make_base(params, weight_decay)
        return lambda params: make_hd(params, weight_decay, foreach)

    makers = [maker(None)] + [maker(HD_PATHS[path]) for path in paths]
    sides = []
    for make in makers:
        net = copy.deepcopy(model0).train()
        sides.append(Side(net, make(list(net.parameters()))))
    base_path = torch_default_path(list(model0.parameters()))

    # 1. full step
    for side in sides:
        time_block(functools.partial(_train_step, side, x, y), warmup, device)
    full = interleaved(
        [functools.partial(_train_step, side, x, y) for side in sides], steps, repeats, device
    )

    # 2. step only, with the gradients of one backward kept fixed
    for side in sides:
        side.opt.zero_grad(set_to_none=True)
        F.cross_entropy(side.model(x), y).backward()
        time_block(side.opt.step, warmup, device)
    step = interleaved([side.opt.step for side in sides], step_iters, repeats, device)
    busy = busy_processes(window=1.0)
    return [
        Row(
            device.type,
            pair,
            weight_decay,
            path,
            base_path,
            full[0],
            full[k],
            step[0],
            step[k],
            busy,
        )  # fmt: skip
        for k, path in enumerate(paths, start=1)
    ]


def markdown(rows: list[Row]) -> str:
    lines = [
        "| device | pair (base / HD) | weight decay | HD path | base path "
        "| full step base ms | full step HD ms "
        "| full step ratio [min, max] | step() base ms | step() HD ms | step() ratio [min, max] "
        "| step() extra / full step | other busy jobs after |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        fr, sr = r.full_ratio, r.step_ratio
        lines.append(
            f"| {r.device} | {r.pair} | {r.weight_decay:g} | {r.hd_path} | {r.base_path} "
            f"| {1e3 * statistics.median(r.full_base):.2f} "
            f"| {1e3 * statistics.median(r.full_hd):.2f} "
            f"| **{fr[0]:.3f}** [{fr[1]:.3f}, {fr[2]:.3f}] "
            f"| {1e3 * statistics.median(r.step_base):.3f} "
            f"| {1e3 * statistics.median(r.step_hd):.3f} "
            f"| {sr[0]:.2f} [{sr[1]:.2f}, {sr[2]:.2f}] | {100 * r.step_overhead:+.3f} % "
            f"| {len(r.busy_after)} |"
        )
    return "\n".join(lines) + "\n"


def write_csv(path: Path, rows: list[Row]) -> None:
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(
            [
                "device",
                "pair",
                "weight_decay",
                "hd_path",
                "base_path",
                "full_base_ms",
                "full_hd_ms",
                "full_ratio",
                "full_ratio_min",
                "full_ratio_max",
                "step_base_ms",
                "step_hd_ms",
                "step_ratio",
                "step_ratio_min",
                "step_ratio_max",
                "step_overhead_share",
                "busy_after",
            ]
        )
        for r in rows:
            fr, sr = r.full_ratio, r.step_ratio
            w.writerow(
                [
                    r.device,
                    r.pair,
                    r.weight_decay,
                    r.hd_path,
                    r.base_path,
                    f"{1e3 * statistics.median(r.full_base):.4f}",
                    f"{1e3 * statistics.median(r.full_hd):.4f}",
                    *(f"{v:.4f}" for v in fr),
                    f"{1e3 * statistics.median(r.step_base):.5f}",
                    f"{1e3 * statistics.median(r.step_hd):.5f}",
                    *(f"{v:.4f}" for v in sr),
                    f"{r.step_overhead:.6f}",
                    " | ".join(r.busy_after),
                ]
            )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto", help="cpu, cuda or auto (both if CUDA)")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--steps", type=int, default=None, help="full steps per repetition (1)")
    parser.add_argument("--repeats", type=int, default=None, help="repetitions per side (41)")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--step-iters", type=int, default=200, help="step() calls per repetition")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument(
        "--model", default="cnn", choices=list(MODELS), help="cnn (default) or logreg"
    )
    parser.add_argument("--weight-decay", type=float, nargs="+", default=[0.0, 1e-4])
    parser.add_argument("--pairs", nargs="+", default=list(PAIRS), choices=list(PAIRS))
    parser.add_argument(
        "--hd-paths",
        nargs="+",
        default=list(HD_PATHS),
        choices=list(HD_PATHS),
        help="the HD optimizers' paths to time (default: both)",
    )
    parser.add_argument(
        "--wait", type=float, default=600.0, help="longest wait for other jobs to finish, seconds"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads (default: 1 if other jobs run, else torch's)",
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    steps = args.steps or 1
    repeats = args.repeats or (5 if args.quick else 41)

    if args.device == "auto":
        devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    else:
        devices = [args.device]

    idle, busy, waited = wait_until_idle(0.0 if args.quick else args.wait)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    elif not idle:
        torch.set_num_threads(1)
    machine = (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} logical CPUs, "
        f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), python "
        f"{sys.version.split()[0]}"
    )
    if "cuda" in devices:
        machine += f", GPU {torch.cuda.get_device_name(0)}"
    state = (
        "idle (no other process above 25 % of a core)"
        if idle
        else f"NOT idle after waiting {waited:.0f} s: " + "; ".join(busy)
    )
    print(f"machine: {machine}\nmachine state before timing: {state}", flush=True)

    rows = []
    for dev in devices:
        for pair in args.pairs:
            for wd in args.weight_decay:
                pair_rows = bench_pair(
                    pair,
                    wd,
                    torch.device(dev),
                    steps=steps,
                    warmup=args.warmup,
                    repeats=repeats,
                    step_iters=args.step_iters,
                    batch=args.batch,
                    model=args.model,
                    hd_paths=args.hd_paths,
                )
                rows.extend(pair_rows)
                for row in pair_rows:
                    fr, sr = row.full_ratio, row.step_ratio
                    print(
                        f"{dev:4s} {pair:22s} wd={wd:<6g} HD {row.hd_path:10s} vs base "
                        f"{row.base_path:8s} full step {fr[0]:.3f}x [{fr[1]:.3f}, {fr[2]:.3f}]  "
                        f"step() {sr[0]:.2f}x (+{100 * row.step_overhead:.3f} % of a full step)",
                        flush=True,
                    )
    after = busy_processes()
    table = markdown(rows)
    args.out.mkdir(parents=True, exist_ok=True)
    write_csv(args.out / "results.csv", rows)
    note = (
        f"Machine: {machine}.\nBefore timing: {state}.\nAfter timing: "
        + ("no other busy process" if not after else "busy: " + "; ".join(after))
        + ".\n"
        f"{repeats} repetitions of {steps} full steps / {args.step_iters} step() calls per "
        f"side, {args.warmup} warm-up steps, model {args.model}, batch {args.batch}.\n"
    )
    (args.out / "results.md").write_text(note + "\n" + table)
    print("\n" + note + "\n" + table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
