"""Benchmark: speed and memory of the hypergradient engine (gradhpo.hyper, issue "engine").

Three figures, each against a baseline measured in the same run:

1. **Reverse-mode time ratio** (goal <= 1.9x on CPU). Time of ``hypergradient("reverse", ...)``
   through K = 20 inner steps (SGD with momentum 0.9, scalar lr tuned, validation objective)
   over the time of 20 plain training steps of the same model with ``torch.optim.SGD``
   (zero_grad, forward, backward, step) on the same batches. Model:
   ``build_model({"name": "cnn", "depth": 2, "width": 16, "norm": "batch"}, (1, 8, 8), 10)``,
   batch 32 of real ``digits`` training images; the validation objective is the cross-entropy
   on one batch of 32 ``digits`` validation images (model in eval mode). Both are warmed up
   first (torch.func has a first-call overhead), then R repetitions (default 7) are timed
   interleaved (A, B, A, B, ...); the figure is median(A) / median(B), with the min and max
   of the per-pair ratios A_i / B_i.
2. **Checkpointed peak memory over higher's at K = 50** (goal <= 0.25x). Peak memory of
   ``hypergradient("checkpointed", ...)`` versus the same unroll + hypergradient done with
   ``higher`` (``innerloop_ctx(model, SGD(momentum=0.9), copy_initial_weights=True,
   override={"lr": [lr]})`` then ``torch.autograd.grad(val_loss, lr)``). Model where
   activations dominate memory: ``{"name": "cnn", "depth": 2, "width": 32, "norm": "none"}`` on
   random (3, 32, 32) inputs, 10 classes, batch 64 (validation batch 64). Norm "none" so that
   ``higher`` handles the model without BatchNorm buffer questions.
3. **Forward-mode memory at K = 200 over K = 10** (goal <= 1.1x): peak memory of
   ``hypergradient("forward", ...)`` with scalar lr and weight decay tuned (two tangent
   directions), same model and inputs as 2 but batch 16 (validation batch 16): forward mode
   costs two full jvp passes (primal + tangent) per step, and K = 200 of them at batch 64 would
   take several minutes on 2 cores; its memory is activation-dominated at batch 16 as well.

Memory method
-------------
Each memory figure is measured in a FRESH subprocess
(``python bench_hypergrad.py --measure JSON``), so that nothing a previous measurement
allocated, cached or left in the allocator can hide or inflate the next one. In the child:

* everything is built first (model, data batches, hyperparameters, optimizer state), and the
  same computation is run once with K = 1 as a warm-up, so one-off costs (lazy library
  initialisation, torch.func first call, oneDNN primitives) are not charged to the
  measurement;
* ``gc.collect()``, then the current resident set size (``VmRSS`` from ``/proc/self/status``)
  is read as the baseline, and the kernel's peak-RSS counter of this address space is reset to
  the current RSS by writing ``5`` to ``/proc/self/clear_refs`` (so the set-up's and
  warm-up's peaks do not count; if that file cannot be written the child says so and the
  peak covers the whole child);
* the computation is run once; the peak is read and the figure is the increment
  ``peak - baseline``.

Which peak counter: ``VmHWM`` (``/proc/self/status``), not
``resource.getrusage(RUSAGE_SELF).ru_maxrss``. On Linux ``ru_maxrss`` is the maximum of this
address space's high-water mark (= ``VmHWM``, which ``clear_refs`` resets) and a per-process
value that ``exec`` copies from the address space the child was forked from, i.e. the
*parent's* RSS at spawn time. That value is not reset by ``clear_refs``, so with a parent of
1 GiB and a child of 0.8 GiB ``ru_maxrss - baseline`` reads ~0.2 GiB whatever the child does
(observed while writing this script: 216 MiB instead of 46 MiB for the same child, depending
only on what the parent had done before). Both numbers are in each child's JSON output
(``peak_bytes`` from ``VmHWM``, ``ru_maxrss_kib`` for reference).

The child runs with ``MALLOC_MMAP_THRESHOLD_=131072`` and ``MALLOC_TRIM_THRESHOLD_=131072``:
a fixed threshold turns off glibc's dynamic threshold, so every buffer of 128 KiB or more is
its own mapping that is returned to the kernel when freed. Without it, memory freed by the
warm-up could stay resident in the heap, be counted in the baseline and be silently reused by
the measured run (an underestimate). The child is repeated ``--mem-repeats`` times (default
3) per configuration and the median increment is used. Every ratio is a ratio of median
increments.

On CUDA (``--device cuda``, or ``auto`` when ``torch.cuda.is_available()``) the child uses
``torch.cuda.memory_allocated()`` as the baseline, ``torch.cuda.reset_peak_memory_stats()``,
and ``torch.cuda.max_memory_allocated()`` as the peak (tensor memory only, no CUDA context);
timings synchronize the device before reading the clock.

Usage (from the repository root)::

    .venv/bin/python experiments/bench_hypergrad.py             # full run (a few minutes on 2 cores)
    .venv/bin/python experiments/bench_hypergrad.py --quick     # smaller K / fewer reps, < 1 min
    .venv/bin/python experiments/bench_hypergrad.py --profile   # + where reverse mode spends time

Output: a Markdown table on stdout, and ``results.csv`` + ``results.md`` in ``--out``
(default ``experiments/results/bench_hypergrad/``).
"""

from __future__ import annotations

import argparse
import csv
import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `models` and `gradhpo` without an installed package too
    sys.path.insert(0, str(ROOT))

from gradhpo.models import build_model  # noqa: E402

from gradhpo.data import load_dataset  # noqa: E402
from gradhpo.hyper import (  # noqa: E402
    HyperParameters,
    InnerProblem,
    Objective,
    hypergradient,
    make_optimizer,
)

DEFAULT_OUT = ROOT / "experiments/results/bench_hypergrad"

LR0 = 0.05
MOMENTUM = 0.9
WEIGHT_DECAY0 = 5e-4

# Figure 1: timing model and data.
TIME_MODEL = {"name": "cnn", "depth": 2, "width": 16, "norm": "batch"}
TIME_BATCH = 32
# Figures 2 and 3: a model whose activations dominate memory.
MEM_MODEL = {"name": "cnn", "depth": 2, "width": 32, "norm": "none"}
MEM_INPUT = (3, 32, 32)
CKPT_BATCH = 64  # figure 2
FWD_BATCH = 16  # figure 3: smaller, forward mode costs ~2 x (primal + tangent) per step
NUM_CLASSES = 10

GOAL_TIME = 1.9
GOAL_CKPT = 0.25
GOAL_FWD = 1.1

MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}


# ----------------------------------------------------------------------------- helpers
def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: CUDA is not available")
    return torch.device(name)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def make_problem(model, hyper_names: list[str], device: torch.device):
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    buffers = {n: b.detach().clone() for n, b in model.named_buffers()}
    opt = make_optimizer("momentum", lr=LR0, momentum=MOMENTUM)
    inits = {"lr": LR0, "weight_decay": WEIGHT_DECAY0}
    hypers = HyperParameters([{"name": n, "init": inits[n]} for n in hyper_names], params)
    return InnerProblem(model, opt, hypers), params, opt.init(params), buffers


def digits_batches(k: int, device: torch.device):
    """K training batches of 32 real digits images (cycling through a seeded permutation of
    the train split) and one validation batch of 32."""
    data = load_dataset("digits", seed=0)
    g = torch.Generator().manual_seed(0)
    order = torch.randperm(len(data.train.x), generator=g)
    n = len(order) // TIME_BATCH
    batches = []
    for i in range(k):
        idx = order[(i % n) * TIME_BATCH : (i % n + 1) * TIME_BATCH]
        batches.append((data.train.x[idx].to(device), data.train.y[idx].to(device)))
    val = (data.val.x[:TIME_BATCH].to(device), data.val.y[:TIME_BATCH].to(device))
    return batches, val, data.input_shape, data.num_classes


def random_batches(k: int, batch: int, device: torch.device, seed: int = 1):
    """K random training batches of MEM_INPUT images and one validation batch, all of size
    ``batch``."""
    g = torch.Generator().manual_seed(seed)

    def one():
        x = torch.randn(batch, *MEM_INPUT, generator=g)
        y = torch.randint(0, NUM_CLASSES, (batch,), generator=g)
        return x.to(device), y.to(device)

    batches = [one() for _ in range(k)]
    return batches, one()


# ----------------------------------------------------------------------------- memory (child)
def build_measurement(spec: dict[str, Any], device: torch.device) -> Callable[[int], float]:
    """Builds everything for one memory configuration; returns ``run(k)`` that performs the
    computation over the first k batches and returns the hypergradient as a float."""
    torch.manual_seed(0)
    model = build_model(dict(MEM_MODEL), MEM_INPUT, NUM_CLASSES).to(device)
    batches, (xv, yv) = random_batches(spec["k"], spec["batch"], device)
    method = spec["method"]

    if method == "higher":
        import higher

        lr = torch.tensor(LR0, device=device, requires_grad=True)

        def run(k: int) -> float:
            opt = torch.optim.SGD(model.parameters(), lr=LR0, momentum=MOMENTUM)
            with higher.innerloop_ctx(
                model, opt, copy_initial_weights=True, override={"lr": [lr]}
            ) as (fmodel, diffopt):
                for x, y in batches[:k]:
                    diffopt.step(F.cross_entropy(fmodel(x), y))
                val = F.cross_entropy(fmodel(xv), yv)
                (d_lr,) = torch.autograd.grad(val, lr)
            return LR0 * float(d_lr)  # d/d log(lr), comparable with gradhpo's raw gradient

        return run

    names = ["lr", "weight_decay"] if method == "forward" else ["lr"]
    problem, params, state, buffers = make_problem(model, names, device)
    objective = Objective.validation(model, xv, yv)

    def run(k: int) -> float:
        result = hypergradient(method, problem, params, state, buffers, batches[:k], objective)
        return float(result.grads["lr"])

    return run


def measure_child(spec: dict[str, Any]) -> None:
    torch.set_flush_denormal(True)
    device = resolve_device(spec["device"])
    run = build_measurement(spec, device)
    run(1)  # warm-up: same computation, one step
    gc.collect()
    sync(device)
    out: dict[str, Any] = {"spec": spec}
    if device.type == "cuda":
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        start = time.perf_counter()
        value = run(spec["k"])
        sync(device)
        seconds = time.perf_counter() - start
        peak = torch.cuda.max_memory_allocated(device)
        out.update(baseline_bytes=base, peak_bytes=peak, peak_reset=True)
    else:
        base_kib = status_kib("VmRSS")
        out["baseline_split_kib"] = {f: status_kib(f) for f in ("RssAnon", "RssFile", "RssShmem")}
        out["peak_reset"] = reset_peak_rss()
        start = time.perf_counter()
        value = run(spec["k"])
        seconds = time.perf_counter() - start
        # The peak is this address space's high-water mark (VmHWM), which clear_refs reset to
        # the baseline; ru_maxrss is recorded for reference only (see the module docstring:
        # it is floored at the parent's RSS inherited through fork + exec).
        peak_kib = status_kib("VmHWM")
        out["ru_maxrss_kib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        out["after_split_kib"] = {f: status_kib(f) for f in ("RssAnon", "RssFile", "RssShmem")}
        out.update(baseline_bytes=base_kib * 1024, peak_bytes=peak_kib * 1024)
    out.update(
        increment_bytes=out["peak_bytes"] - out["baseline_bytes"], seconds=seconds, grad=value
    )
    print("RESULT " + json.dumps(out), flush=True)


def measure_in_subprocess(spec: dict[str, Any]) -> dict[str, Any]:
    env = {**os.environ, **MALLOC_ENV}
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--measure", json.dumps(spec)],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(
            f"measurement {spec} failed (exit {proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
        )
    result = json.loads(lines[-1][len("RESULT ") :])
    if not result.get("peak_reset", True):
        print(
            "  warning: could not reset the peak RSS counter; peak includes set-up and warm-up",
            file=sys.stderr,
        )
    return result


def memory_figure(
    method: str, k: int, batch: int, repeats: int, device: torch.device
) -> dict[str, Any]:
    runs = []
    for _ in range(repeats):
        runs.append(
            measure_in_subprocess({"method": method, "k": k, "batch": batch, "device": device.type})
        )
        gc.collect()
    incs = [r["increment_bytes"] for r in runs]
    med = statistics.median(incs)
    print(
        f"  {method:12s} K={k:<4d} peak increment median {med / 2**20:8.1f} MiB "
        f"(runs: {', '.join(f'{i / 2**20:.1f}' for i in incs)}), "
        f"{statistics.median(r['seconds'] for r in runs):.2f} s/run, "
        f"d objective / d log(lr) {runs[0]['grad']:.5g}",
        flush=True,
    )
    return {"median": med, "all": incs, "seconds": statistics.median(r["seconds"] for r in runs)}


# ----------------------------------------------------------------------------- timing
def timing_setup(k: int, device: torch.device):
    batches, (xv, yv), input_shape, num_classes = digits_batches(k, device)
    torch.manual_seed(0)
    model = build_model(dict(TIME_MODEL), input_shape, num_classes).to(device)
    init_state = {n: t.detach().clone() for n, t in model.state_dict().items()}
    problem, params, state, buffers = make_problem(model, ["lr"], device)
    objective = Objective.validation(model, xv, yv)

    def hyper() -> None:
        hypergradient("reverse", problem, params, state, buffers, batches, objective)

    def plain() -> None:
        for x, y in batches:
            sgd.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
            sgd.step()

    sgd = torch.optim.SGD(model.parameters(), lr=LR0, momentum=MOMENTUM)

    def reset_plain() -> None:
        nonlocal sgd
        model.load_state_dict(init_state)
        model.train()
        sgd = torch.optim.SGD(model.parameters(), lr=LR0, momentum=MOMENTUM)

    return hyper, plain, reset_plain, (problem, params, state, buffers, batches, objective)


class LoadMonitor:
    """CPU used by *other* processes (in cores) while a block runs: total busy time of the
    machine from ``/proc/stat`` minus this process's own CPU time (``os.times``)."""

    def __init__(self) -> None:
        self.tick = os.sysconf("SC_CLK_TCK")

    def snapshot(self) -> tuple[float, float, float]:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:9]]
        busy = (sum(v) - v[3] - v[4]) / self.tick  # all but idle and iowait
        own = os.times()
        return busy, own.user + own.system, time.monotonic()

    @staticmethod
    def others(a: tuple[float, float, float], b: tuple[float, float, float]) -> float:
        wall = max(b[2] - a[2], 1e-9)
        return max((b[0] - a[0]) - (b[1] - a[1]), 0.0) / wall

    def sample(self, seconds: float = 0.5) -> float:
        a = self.snapshot()
        time.sleep(seconds)
        return self.others(a, self.snapshot())


MONITOR = LoadMonitor()
IDLE_CORES = 0.1  # other processes using less than a tenth of a core: "idle"


class IdleGate:
    """Before each timed pair, waits (up to a total budget) until other processes use less
    than ``IDLE_CORES``; a pair during which they did is discarded and repeated while budget
    is left. With a budget of 0 nothing waits and every pair is kept (and reported)."""

    def __init__(self, budget_s: float) -> None:
        self.deadline = time.monotonic() + budget_s
        self.enabled = budget_s > 0
        self.waited = 0.0

    def left(self) -> bool:
        return self.enabled and time.monotonic() < self.deadline

    def wait(self) -> None:
        start = time.monotonic()
        while self.left() and MONITOR.sample(0.5) >= IDLE_CORES:
            time.sleep(2.0)
        self.waited += time.monotonic() - start


def timed(fn: Callable[[], None], device: torch.device) -> tuple[float, float]:
    """(wall seconds, cores used by other processes meanwhile)."""
    gc.collect()
    sync(device)
    a = MONITOR.snapshot()
    start = time.perf_counter()
    fn()
    sync(device)
    seconds = time.perf_counter() - start
    return seconds, MONITOR.others(a, MONITOR.snapshot())


def interleaved(
    fns: list[Callable[[], None]],
    resets: list[Callable[[], None] | None],
    repeats: int,
    gate: IdleGate,
    device: torch.device,
) -> tuple[list[list[float]], list[float], int]:
    """Times ``fns`` in turn, ``repeats`` rounds; returns (times per fn, other-process load
    per kept round, number of discarded rounds)."""
    times: list[list[float]] = [[] for _ in fns]
    loads: list[float] = []
    discarded = 0
    while len(loads) < repeats:
        gate.wait()
        # The wait sleeps; the first timed call after a sleep runs on cold caches and a
        # clocked-down core. One untimed call of the last function puts every round in the
        # steady state of the interleaving (each function runs right after the previous one).
        if resets[-1] is not None:
            resets[-1]()
        fns[-1]()
        round_times, round_load = [], 0.0
        for fn, reset in zip(fns, resets, strict=True):
            if reset is not None:
                reset()
            seconds, load = timed(fn, device)
            round_times.append(seconds)
            round_load = max(round_load, load)
        if round_load >= IDLE_CORES and gate.left():
            discarded += 1
            continue
        for acc, value in zip(times, round_times, strict=True):
            acc.append(value)
        loads.append(round_load)
    return times, loads, discarded


def time_figure(
    k: int, repeats: int, warmup: int, gate: IdleGate, device: torch.device
) -> dict[str, Any]:
    hyper, plain, reset_plain, _ = timing_setup(k, device)
    for _ in range(warmup):
        hyper()
        reset_plain()
        plain()
    (t_hyper, t_plain), loads, discarded = interleaved(
        [hyper, plain], [None, reset_plain], repeats, gate, device
    )
    pair = [a / b for a, b in zip(t_hyper, t_plain, strict=True)]
    res = {
        "hyper": t_hyper,
        "plain": t_plain,
        "ratio": statistics.median(t_hyper) / statistics.median(t_plain),
        "pair_min": min(pair),
        "pair_max": max(pair),
        "load_max": max(loads),
        "disturbed": sum(load >= IDLE_CORES for load in loads),
        "discarded": discarded,
        "waited": gate.waited,
    }
    print(
        f"  reverse K={k}: median {statistics.median(t_hyper) * 1e3:.1f} ms "
        f"[{min(t_hyper) * 1e3:.1f}, {max(t_hyper) * 1e3:.1f}]; plain SGD x{k}: median "
        f"{statistics.median(t_plain) * 1e3:.1f} ms [{min(t_plain) * 1e3:.1f}, "
        f"{max(t_plain) * 1e3:.1f}]; ratio {res['ratio']:.2f}x "
        f"(per pair {res['pair_min']:.2f}-{res['pair_max']:.2f}); other processes <= "
        f"{res['load_max']:.2f} cores during kept pairs, {discarded} pairs discarded, "
        f"{gate.waited:.0f} s waited for idle",
        flush=True,
    )
    return res


def profile_reverse(k: int, repeats: int, gate: IdleGate, device: torch.device) -> list[str]:
    """Where the reverse-mode time goes. Times, interleaved like figure 1 (median of
    ``repeats``): the whole ``hypergradient("reverse")``; its unroll alone (K x the public
    ``inner_step``, building the graph, as ``_reverse`` does) and unroll + validation loss +
    ``autograd.grad`` (their difference is the backward pass); the unroll under ``no_grad``;
    plain SGD steps and plain forward + backward only; and, for reference, the same unroll +
    hypergradient with ``higher``. Then the top operators by self CPU time (torch.profiler)."""
    import higher

    from gradhpo.hyper import inner_step

    hyper, plain, reset_plain, (problem, params, state, buffers, batches, objective) = timing_setup(
        k, device
    )
    raw = problem.hypers.raw
    model = problem.model
    xv, yv = digits_batches(1, device)[1]

    def unroll(hypers=raw):
        p, s, b = dict(params), dict(state), dict(buffers)
        for batch in batches:
            p, s, b, _ = inner_step(problem, p, s, b, hypers, batch)
            b = {n: v.detach() for n, v in b.items()}
        return p, b

    def unroll_backward() -> None:
        p, b = unroll()
        torch.autograd.grad(objective.final(p, b), [raw["lr"]])

    def unroll_nograd() -> None:
        with torch.no_grad():
            unroll({n: v.detach() for n, v in raw.items()})

    def fwd_bwd() -> None:
        model.train()
        for x, y in batches:
            model.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()

    def with_higher() -> None:
        lr = torch.tensor(LR0, device=device, requires_grad=True)
        opt = torch.optim.SGD(model.parameters(), lr=LR0, momentum=MOMENTUM)
        model.train()
        with higher.innerloop_ctx(model, opt, copy_initial_weights=True, override={"lr": [lr]}) as (
            fmodel,
            diffopt,
        ):
            for x, y in batches:
                diffopt.step(F.cross_entropy(fmodel(x), y))
            fmodel.eval()
            torch.autograd.grad(F.cross_entropy(fmodel(xv), yv), lr)
        model.train()

    cases = [
        ("hypergradient('reverse')", hyper, None),
        ("  unroll only (K x inner_step, graph built)", lambda: unroll() and None, None),
        ("  unroll + validation loss + autograd.grad", unroll_backward, None),
        ("  unroll under no_grad (no graph)", unroll_nograd, None),
        (f"plain SGD x{k} (zero_grad, fwd, bwd, step)", plain, reset_plain),
        (f"  plain fwd + bwd x{k} (no optimizer)", fwd_bwd, reset_plain),
        ("higher: same unroll + hypergradient", with_higher, reset_plain),
    ]
    for _, fn, reset in cases * 2:  # warm-up
        if reset is not None:
            reset()
        fn()
    times, loads, discarded = interleaved(
        [c[1] for c in cases], [c[2] for c in cases], repeats, gate, device
    )
    med = {c[0]: statistics.median(t) for c, t in zip(cases, times, strict=True)}
    base = med[cases[4][0]]
    lines = [
        f"median of {repeats} interleaved rounds (other processes <= {max(loads):.2f} cores, "
        f"{discarded} rounds discarded); ratio to plain SGD x{k}:"
    ]
    lines += [f"  {name:48s} {t * 1e3:8.1f} ms  {t / base:5.2f}x" for name, t in med.items()]
    backward = med[cases[2][0]] - med[cases[1][0]]
    lines.append(
        f"  {'=> backward pass (difference of the two above)':48s} {backward * 1e3:8.1f} ms  "
        f"{backward / base:5.2f}x"
    )
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        hyper()
    lines.append("torch.profiler, one reverse-mode call, top 20 ops by self CPU time:")
    lines.append(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20))
    reset_plain()
    with profile(activities=activities) as prof:
        plain()
    lines.append(f"torch.profiler, {k} plain SGD steps, top 12 ops by self CPU time:")
    lines.append(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))
    return lines


# ----------------------------------------------------------------------------- main
def mib(b: float) -> str:
    return f"{b / 2**20:.1f} MiB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--repeats", type=int, default=None, help="timing repetitions (7)")
    parser.add_argument("--mem-repeats", type=int, default=None, help="children per config (3)")
    parser.add_argument("--quick", action="store_true", help="fewer reps, smaller K (< 1 min)")
    parser.add_argument("--profile", action="store_true", help="also profile reverse mode")
    parser.add_argument(
        "--wait-idle",
        type=float,
        default=None,
        metavar="SECONDS",
        help="timing: total budget for waiting until other processes use < 0.1 core before "
        "each pair, and for repeating disturbed pairs (600, --quick 30; 0 = never wait)",
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--measure", help=argparse.SUPPRESS)  # internal: one memory child
    args = parser.parse_args()

    if args.measure:
        measure_child(json.loads(args.measure))
        return

    torch.set_flush_denormal(True)
    device = resolve_device(args.device)
    repeats = args.repeats or (3 if args.quick else 7)
    mem_repeats = args.mem_repeats or (1 if args.quick else 3)
    k_time = 20
    k_ckpt = 10 if args.quick else 50
    k_fwd_short, k_fwd_long = (5, 20) if args.quick else (10, 200)
    warmup = 1 if args.quick else 2

    started = time.perf_counter()
    load = os.getloadavg()
    machine = (
        f"{platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, device {device}"
        + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else "")
    )
    print(f"# bench_hypergrad: {machine}; load average at start {load[0]:.2f}", flush=True)

    print(f"[1] reverse-mode time, K={k_time}, {repeats} interleaved repetitions", flush=True)
    wait_idle = args.wait_idle if args.wait_idle is not None else (30.0 if args.quick else 600.0)
    gate = IdleGate(wait_idle)
    tres = time_figure(k_time, repeats, warmup, gate, device)

    print(f"[2] peak memory, checkpointed vs higher, K={k_ckpt}, {mem_repeats} children each")
    ckpt = memory_figure("checkpointed", k_ckpt, CKPT_BATCH, mem_repeats, device)
    hig = memory_figure("higher", k_ckpt, CKPT_BATCH, mem_repeats, device)
    ckpt_ratio = ckpt["median"] / hig["median"]

    print(f"[3] forward-mode peak memory, K={k_fwd_long} vs K={k_fwd_short}")
    fshort = memory_figure("forward", k_fwd_short, FWD_BATCH, mem_repeats, device)
    flong = memory_figure("forward", k_fwd_long, FWD_BATCH, mem_repeats, device)
    fwd_ratio = flong["median"] / fshort["median"]

    mem_kind = "CUDA max_memory_allocated" if device.type == "cuda" else "peak RSS increment"

    def spread(xs: list[float], scale: float = 1e3, unit: str = "ms") -> str:
        return f"min {min(xs) * scale:.1f}, max {max(xs) * scale:.1f} {unit}"

    def yes(ok: bool) -> str:
        return "yes" if ok else "no"

    rows = [
        # figure, value, goal, met, detail
        (
            f"reverse-mode time / plain SGD time, K={k_time}",
            f"{tres['ratio']:.2f}x",
            f"<= {GOAL_TIME}x",
            yes(tres["ratio"] <= GOAL_TIME),
            f"ratio of medians of {repeats}; per-pair ratios min {tres['pair_min']:.2f}x, "
            f"max {tres['pair_max']:.2f}x; other processes <= {tres['load_max']:.2f} cores "
            f"during kept pairs ({tres['discarded']} disturbed pairs discarded)",
        ),
        (
            f"checkpointed / higher peak memory, K={k_ckpt}",
            f"{ckpt_ratio:.3f}x",
            f"<= {GOAL_CKPT}x",
            yes(ckpt_ratio <= GOAL_CKPT),
            f"{mem_kind}, median of {mem_repeats} fresh processes each",
        ),
        (
            f"forward-mode peak memory K={k_fwd_long} / K={k_fwd_short}",
            f"{fwd_ratio:.3f}x",
            f"<= {GOAL_FWD}x",
            yes(fwd_ratio <= GOAL_FWD),
            f"{mem_kind}, median of {mem_repeats} fresh processes each; lr + weight decay",
        ),
        (
            f"hypergradient('reverse') K={k_time}, median",
            f"{statistics.median(tres['hyper']) * 1e3:.1f} ms",
            "-",
            "-",
            spread(tres["hyper"]),
        ),
        (
            f"{k_time} plain torch.optim.SGD steps, median",
            f"{statistics.median(tres['plain']) * 1e3:.1f} ms",
            "-",
            "-",
            spread(tres["plain"]),
        ),
    ]
    for name, k, res in (
        ("checkpointed", k_ckpt, ckpt),
        ("higher", k_ckpt, hig),
        ("forward", k_fwd_short, fshort),
        ("forward", k_fwd_long, flong),
    ):
        rows.append(
            (
                f"{name} K={k} peak memory increment, median",
                mib(res["median"]),
                "-",
                "-",
                "runs: "
                + ", ".join(f"{b / 2**20:.1f}" for b in res["all"])
                + f" MiB; {res['seconds']:.2f} s per run",
            )
        )

    header = ("figure", "value", "goal", "met", "detail")
    table = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    table += ["| " + " | ".join(r) + " |" for r in rows]
    setup = (
        f"Time: {TIME_MODEL} on digits (1, 8, 8), batch 32, validation batch 32, SGD momentum "
        f"{MOMENTUM}, lr {LR0} tuned (log). Memory: {MEM_MODEL} on random {MEM_INPUT} inputs, "
        f"batch {CKPT_BATCH} for checkpointed vs higher (SGD momentum {MOMENTUM}, lr tuned), batch "
        f"{FWD_BATCH} for forward mode (lr and weight decay tuned, 2 tangent directions); "
        "validation batch of the same size."
    )
    text = "\n".join(table)
    print()
    print(text)
    print()
    print(setup)

    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / "results.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    command = "python experiments/bench_hypergrad.py " + " ".join(sys.argv[1:])
    (args.out / "results.md").write_text(
        f"# Hypergradient engine benchmark\n\nCommand: `{command.strip()}`\n\n"
        f"Machine: {machine}; load average at start {load[0]:.2f}. "
        f"Date: {time.strftime('%Y-%m-%d')}.\n\n{setup}\n\n{text}\n"
    )
    print(f"\nwrote {args.out / 'results.csv'} and {args.out / 'results.md'}")

    if args.profile:
        print("\n[profile] reverse mode")
        for line in profile_reverse(k_time, repeats, IdleGate(wait_idle), device):
            print(line)
    print(f"total {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
