"""Benchmark: speed of the hypergradient engine against plain training and other libraries
(issue 14, "engine speed").

One process, interleaved: every method of a problem is run once per round, round-robin
(the starting method rotates from round to round), for R rounds after one untimed warm-up run
each; each figure is the median over the rounds, and every ratio is a ratio of medians taken
in the same run (so a slow period of the machine hits all methods alike).

Problems
--------
(a) ``cnn``: ``build_model({"name": "cnn", "depth": 2, "width": 32, "norm": "none",
    "pooling": "max"}, (1, 28, 28), 10)``, batch 32 of random images, K = 20 inner SGD steps
    (lr 0.05), objective = cross-entropy on a validation batch of 32 (eval mode),
    hypergradient d(objective)/d(lr).
(b) ``cnn-bn``: the same CNN with ``norm: batch`` (BatchNorm running statistics are carried
    through the unroll as buffers and used, as constants, by the eval-mode validation loss).
(c) ``mnist1d-mlp``: the MNIST-1D "meta-learn a learning rate" MLP, 40-50-10 (ReLU),
    ``build_model({"name": "mlp", "depth": 1, "width": 50}, (40,), 10)``, batch 100 of
    random length-40 signals, K = 200 inner SGD steps (lr 0.1), validation batch 1000 (the
    size of MNIST-1D's test split). Random data of the right shapes: nothing is downloaded.

Methods (per problem)
---------------------
* ``plain``: K steps of ``torch.optim.SGD`` (zero_grad, forward, backward, step), no
  hypergradient: the baseline of every "x plain" ratio;
* ``gradhpo reverse`` / ``gradhpo checkpointed`` / ``gradhpo forward-1``:
  ``gradhpo.hyper.hypergradient(method, ...)`` with one scalar hyper (lr, log-parametrized);
* ``gradhpo forward-8``: forward mode with 8 scalar hyperparameters (8 tangent directions):
  lr ``per_tensor`` plus, where the model has fewer than 8 parameter tensors, weight decay
  (``per_tensor`` for the 4-tensor MLP, scalar for the 6-tensor CNN, together with a scalar
  L2 penalty); the inner optimizer stays SGD without momentum;
* ``gradhpo checkpointed segment-S`` (``--segment S``, default 4; 1 leaves it out):
  checkpointed with ``checkpoint_every=S``: one saved start point and one backward call per
  segment of S steps instead of per step;
* ``gradhpo reverse every-M`` (``--every M``, default 4; 1 leaves it out): amortized tuning,
  what ``HyperTuner(every=M)`` does over M horizons: one reverse-mode hypergradient horizon
  and M - 1 plain horizons (``gradhpo.hyper.unroll``), tuned steps / total steps = 1/M; its
  time is reported per horizon of K steps (the run's time / M), so "x plain" is the average
  cost of a tuned training step;
* ``gradhpo forward-1 compiled`` / ``gradhpo forward-8 compiled`` (``--compile`` only):
  forward mode with ``compile=True`` (each step through ``torch.compile``; the compilation
  happens in the untimed warm-up run);
* ``higher``: ``higher.innerloop_ctx(model, SGD, copy_initial_weights=True,
  override={"lr": [lr]})`` then ``torch.autograd.grad(val_loss, lr)``;
* ``bare``: a hand-written unroll: params as a dict, ``torch.func.functional_call``,
  ``torch.autograd.grad(..., create_graph=True)``, the SGD update written inline, then
  ``torch.autograd.grad(val_loss, lr)``;
* ``torchopt``: TorchOpt's functional API (``torchopt.sgd(lr=lr_tensor)``,
  ``update(..., inplace=False)``, ``apply_updates(..., inplace=False)``), only if TorchOpt
  imports (it is not a dependency of gradhpo; a note is printed when it is missing).

Every method computes the same quantity. Before timing, each problem is rebuilt tiny and in
float64 and the hypergradients of every method are compared with gradhpo reverse (relative
error <= 1e-6; gradhpo's gradients are w.r.t. raw = log lr and are divided by lr); forward-8
(and forward-8 compiled) is compared with gradhpo reverse on the same 8 hyperparameters. The
script stops (exit status 1) if a check fails.

Timing details: each timed run is preceded, outside the clock, by a reset (parameters,
BatchNorm buffers) and ``gc.collect()``; the garbage collector is disabled while the clock
runs; on CUDA the device is synchronized before reading the clock. On CPU denormals are
flushed to zero. ``--threads`` (default 2) sets ``torch.set_num_threads``. The load average
is printed before and after: the figures are only meaningful on a quiet machine.

Usage (from the repository root)::

    .venv/bin/python experiments/bench_engine.py                     # all problems, 5 rounds
    .venv/bin/python experiments/bench_engine.py --problems a,c --rounds 9
    .venv/bin/python experiments/bench_engine.py --quick --rounds 1  # smoke test, tiny sizes
    .venv/bin/python experiments/bench_engine.py --compile --every 8  # + compiled forward mode

Output: the tables on stdout; ``results.csv`` (one row per problem and method, with every
round's time), ``summary.csv`` (the ratios per problem), ``checks.csv`` (the agreement
checks) and ``results.md`` in ``--out`` (default ``experiments/results/bench_engine/``).
"""

from __future__ import annotations

import argparse
import copy
import csv
import datetime
import gc
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # so that `python experiments/...` works without installing
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from gradhpo.models import build_model  # noqa: E402
from torch import nn  # noqa: E402
from torch.func import functional_call  # noqa: E402

from gradhpo.hyper import (  # noqa: E402
    HyperParameters,
    InnerProblem,
    Objective,
    hypergradient,
    make_optimizer,
)
from gradhpo.hyper.methods import unroll  # noqa: E402

OUT_DIR = ROOT / "experiments" / "results" / "bench_engine"
TOLERANCE = 1e-6
Tensor = torch.Tensor

PLAIN = "plain"
REVERSE = "gradhpo reverse"
CHECKPOINTED = "gradhpo checkpointed"
FORWARD1 = "gradhpo forward-1"
FORWARD8 = "gradhpo forward-8"
HIGHER = "higher"
BARE = "bare"
TORCHOPT = "torchopt"
REVERSE8 = "gradhpo reverse-8"  # check only: the reference of forward-8 (and compiled)
FORWARD1C = "gradhpo forward-1 compiled"
FORWARD8C = "gradhpo forward-8 compiled"


AMORTIZED = "gradhpo reverse every-"  # + M
SEGMENTED = "gradhpo checkpointed segment-"  # + S


def amortized_name(every: int) -> str:
    return f"{AMORTIZED}{every}"


# ----------------------------------------------------------------------------- problems
@dataclass(frozen=True)
class Problem:
    """One benchmark problem at one size."""

    key: str  # a, b, c
    name: str
    model: dict[str, Any]
    input_shape: tuple[int, ...]
    classes: int
    batch: int
    val_batch: int
    k: int
    lr: float

    def describe(self) -> str:
        cfg = ", ".join(f"{k}={v}" for k, v in self.model.items() if k != "name")
        return (
            f"({self.key}) {self.name}: {self.model['name']}({cfg}) on {self.input_shape}, "
            f"batch {self.batch}, val batch {self.val_batch}, K={self.k}, SGD lr {self.lr}"
        )


CNN = {"name": "cnn", "depth": 2, "width": 32, "norm": "none", "pooling": "max"}
MLP = {"name": "mlp", "depth": 1, "width": 50, "activation": "relu"}

PROBLEMS: dict[str, Problem] = {
    "a": Problem("a", "cnn", CNN, (1, 28, 28), 10, 32, 32, 20, 0.05),
    "b": Problem("b", "cnn-bn", {**CNN, "norm": "batch"}, (1, 28, 28), 10, 32, 32, 20, 0.05),
    "c": Problem("c", "mnist1d-mlp", MLP, (40,), 10, 100, 1000, 200, 0.1),
}


def quick(p: Problem) -> Problem:
    """Smoke-test size (``--quick``): same architecture, tiny inputs and horizon."""
    if p.model["name"] == "cnn":
        return replace(
            p, model={**p.model, "width": 8}, input_shape=(1, 12, 12), batch=8, val_batch=8, k=4
        )
    return replace(p, batch=20, val_batch=50, k=20)


def tiny(p: Problem) -> Problem:
    """Agreement-check size (run in float64)."""
    if p.model["name"] == "cnn":
        return replace(
            p, model={**p.model, "width": 4}, input_shape=(1, 8, 8), batch=4, val_batch=4, k=3
        )
    return replace(p, batch=8, val_batch=16, k=5)


def eight_specs(param_shapes: dict[str, tuple[int, ...]], lr: float) -> list[dict[str, Any]]:
    """8 scalar hyperparameters (8 forward-mode directions): lr per tensor, completed with
    weight decay (per tensor, or scalar plus a scalar L2 penalty) where the model has fewer than
    8 parameter tensors. The optimizer stays plain SGD (no momentum state)."""
    n = len(param_shapes)
    specs: list[dict[str, Any]] = [{"name": "lr", "init": lr, "granularity": "per_tensor"}]
    if n == 8:
        return specs
    if n == 4:
        return specs + [{"name": "weight_decay", "init": 1e-4, "granularity": "per_tensor"}]
    if n == 6:
        return specs + [{"name": "weight_decay", "init": 1e-4}, {"name": "l2", "init": 1e-4}]
    raise ValueError(f"forward-8: no 8-direction spec for a model with {n} parameter tensors")


@dataclass
class Context:
    """Everything a problem's methods share: model, initial parameters, data."""

    problem: Problem
    device: torch.device
    dtype: torch.dtype
    model: nn.Module
    params: dict[str, Tensor]  # initial parameters (never modified)
    buffers: dict[str, Tensor]  # initial buffers (never modified)
    batches: list[tuple[Tensor, Tensor]]
    val: tuple[Tensor, Tensor]

    def reset_module(self, module: nn.Module) -> None:
        with torch.no_grad():
            for n, p in module.named_parameters():
                p.copy_(self.params[n])
            for n, b in module.named_buffers():
                b.copy_(self.buffers[n])


def make_context(p: Problem, device: torch.device, dtype: torch.dtype, seed: int = 0) -> Context:
    torch.manual_seed(seed)
    model = build_model(dict(p.model), p.input_shape, p.classes).to(device=device, dtype=dtype)
    g = torch.Generator().manual_seed(seed + 1)

    def batch(n: int) -> tuple[Tensor, Tensor]:
        x = torch.randn(n, *p.input_shape, generator=g, dtype=dtype)
        y = torch.randint(0, p.classes, (n,), generator=g)
        return x.to(device), y.to(device)

    batches = [batch(p.batch) for _ in range(p.k)]
    return Context(
        problem=p,
        device=device,
        dtype=dtype,
        model=model,
        params={n: t.detach().clone() for n, t in model.named_parameters()},
        buffers={n: t.detach().clone() for n, t in model.named_buffers()},
        batches=batches,
        val=batch(p.val_batch),
    )


# ----------------------------------------------------------------------------- methods
@dataclass
class Method:
    """``prepare()`` runs outside the clock; ``run()`` is timed and returns the
    hypergradient as ``{key: d objective / d value}`` (``{"lr": ...}`` for the lr-only
    methods), or None for plain training."""

    name: str
    hypers: int
    run: Callable[[], dict[str, Tensor] | None]
    prepare: Callable[[], None] = field(default=lambda: None)
    per: int = 1  # horizons of K steps per run: the reported time is the run's time / per


def _eval_loss(model: nn.Module, params_and_buffers: Any, x: Tensor, y: Tensor) -> Tensor:
    model.train(False)
    try:
        return F.cross_entropy(functional_call(model, params_and_buffers, (x,)), y)
    finally:
        model.train(True)


def plain_method(ctx: Context) -> Method:
    model = copy.deepcopy(ctx.model)
    opt = torch.optim.SGD(model.parameters(), lr=ctx.problem.lr)

    def run() -> None:
        model.train()
        for x, y in ctx.batches:
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
            opt.step()

    return Method(PLAIN, 0, run, prepare=lambda: ctx.reset_module(model))


def gradhpo_method(
    ctx: Context,
    method: str,
    specs: list[dict[str, Any]],
    name: str,
    *,
    compile: bool = False,
    every: int = 1,
    checkpoint_every: int = 1,
) -> Method:
    """gradhpo's hypergradient; with ``every`` = M > 1, followed by M - 1 plain horizons from
    its weights (amortized tuning)."""
    model = copy.deepcopy(ctx.model)  # used functionally: never modified
    opt = make_optimizer("sgd", lr=ctx.problem.lr)
    hypers = HyperParameters(specs, ctx.params)
    problem = InnerProblem(model, opt, hypers)
    state = opt.init(ctx.params)
    objective = Objective.validation(model, *ctx.val)
    single_lr = [s["name"] for s in specs] == ["lr"] and specs[0].get("granularity") in (
        None,
        "scalar",
    )

    def run() -> dict[str, Tensor]:
        kwargs: dict[str, Any] = {"compile": True} if compile else {}
        if checkpoint_every > 1:
            kwargs["checkpoint_every"] = checkpoint_every
        result = hypergradient(
            method, problem, ctx.params, state, ctx.buffers, ctx.batches, objective, **kwargs
        )
        params, opt_state, buffers = result.params, result.state, result.buffers
        for _ in range(every - 1):
            params, opt_state, buffers, _ = unroll(problem, params, opt_state, buffers, ctx.batches)
        if single_lr:  # d/d(raw = log lr) -> d/d lr, as the other libraries report it
            return {"lr": result.grads["lr"] / torch.exp(hypers.raw["lr"].detach())}
        return result.grads

    return Method(name, hypers.numel(), run, per=every)


def higher_method(ctx: Context) -> Method | str:
    try:
        import higher
    except ImportError as exc:  # pragma: no cover - higher is a dev dependency
        return f"higher skipped: {exc}"
    model = copy.deepcopy(ctx.model)
    opt = torch.optim.SGD(model.parameters(), lr=ctx.problem.lr)
    lr = torch.tensor(ctx.problem.lr, dtype=ctx.dtype, device=ctx.device, requires_grad=True)
    xv, yv = ctx.val

    def run() -> dict[str, Tensor]:
        model.train()
        with higher.innerloop_ctx(model, opt, copy_initial_weights=True, override={"lr": [lr]}) as (
            fmodel,
            diffopt,
        ):
            for x, y in ctx.batches:
                diffopt.step(F.cross_entropy(fmodel(x), y))
            fmodel.train(False)
            val = F.cross_entropy(fmodel(xv), yv)
            (g,) = torch.autograd.grad(val, lr)
        return {"lr": g}

    # higher updates BatchNorm running statistics in the wrapped model's own buffers: reset.
    return Method(HIGHER, 1, run, prepare=lambda: ctx.reset_module(model))


def bare_method(ctx: Context) -> Method:
    model = copy.deepcopy(ctx.model)
    lr = torch.tensor(ctx.problem.lr, dtype=ctx.dtype, device=ctx.device, requires_grad=True)
    holder: dict[str, dict[str, Tensor]] = {}

    def prepare() -> None:  # BatchNorm updates its running statistics in place
        holder["buffers"] = {n: b.clone() for n, b in ctx.buffers.items()}

    def run() -> dict[str, Tensor]:
        buffers = holder["buffers"]
        params = {n: p.detach().requires_grad_() for n, p in ctx.params.items()}
        model.train()
        for x, y in ctx.batches:
            loss = F.cross_entropy(functional_call(model, (params, buffers), (x,)), y)
            grads = torch.autograd.grad(loss, list(params.values()), create_graph=True)
            params = {n: p - lr * g for (n, p), g in zip(params.items(), grads, strict=True)}
        val = _eval_loss(model, (params, buffers), *ctx.val)
        (g,) = torch.autograd.grad(val, lr)
        return {"lr": g}

    return Method(BARE, 1, run, prepare=prepare)


def torchopt_method(ctx: Context) -> Method | str:
    try:
        import torchopt
    except Exception as exc:  # noqa: BLE001 - any import failure means "not available"
        return f"TorchOpt skipped: it does not import with torch {torch.__version__} ({exc!r})"
    model = copy.deepcopy(ctx.model)
    lr = torch.tensor(ctx.problem.lr, dtype=ctx.dtype, device=ctx.device, requires_grad=True)
    opt = torchopt.sgd(lr=lr)  # type: ignore[arg-type]  # a tensor lr is differentiated
    names = list(ctx.params)
    holder: dict[str, dict[str, Tensor]] = {}

    def prepare() -> None:
        holder["buffers"] = {n: b.clone() for n, b in ctx.buffers.items()}

    def run() -> dict[str, Tensor]:
        buffers = holder["buffers"]
        params = tuple(ctx.params[n].detach().requires_grad_() for n in names)
        state = opt.init(params)
        model.train()
        for x, y in ctx.batches:
            out = functional_call(model, (dict(zip(names, params, strict=True)), buffers), (x,))
            grads = torch.autograd.grad(F.cross_entropy(out, y), params, create_graph=True)
            updates, state = opt.update(grads, state, inplace=False)
            params = tuple(torchopt.apply_updates(params, updates, inplace=False))
        val = _eval_loss(model, (dict(zip(names, params, strict=True)), buffers), *ctx.val)
        (g,) = torch.autograd.grad(val, lr)
        return {"lr": g}

    return Method(TORCHOPT, 1, run, prepare=prepare)


def build_methods(
    ctx: Context,
    *,
    with_reverse8: bool = False,
    every: int = 1,
    compile: bool = False,
    segment: int = 1,
) -> tuple[list[Method], list[str]]:
    """The methods of one problem (plain first) and notes on the ones skipped."""
    lr_spec = [{"name": "lr", "init": ctx.problem.lr}]
    specs8 = eight_specs({n: tuple(p.shape) for n, p in ctx.params.items()}, ctx.problem.lr)
    methods: list[Method] = [
        plain_method(ctx),
        gradhpo_method(ctx, "reverse", lr_spec, REVERSE),
        gradhpo_method(ctx, "checkpointed", lr_spec, CHECKPOINTED),
        gradhpo_method(ctx, "forward", lr_spec, FORWARD1),
        gradhpo_method(ctx, "forward", specs8, FORWARD8),
    ]
    if segment > 1:
        name = f"{SEGMENTED}{segment}"
        methods.append(gradhpo_method(ctx, "checkpointed", lr_spec, name, checkpoint_every=segment))
    if every > 1:
        methods.append(gradhpo_method(ctx, "reverse", lr_spec, amortized_name(every), every=every))
    if compile:
        methods.append(gradhpo_method(ctx, "forward", lr_spec, FORWARD1C, compile=True))
        methods.append(gradhpo_method(ctx, "forward", specs8, FORWARD8C, compile=True))
    if with_reverse8:
        methods.append(gradhpo_method(ctx, "reverse", specs8, REVERSE8))
    notes: list[str] = []
    methods.append(bare_method(ctx))
    for extra in (higher_method(ctx), torchopt_method(ctx)):
        if isinstance(extra, str):
            notes.append(extra)
        else:
            methods.append(extra)
    for m in methods:
        if m.name in (FORWARD8, FORWARD8C) and m.hypers != 8:
            raise AssertionError(f"forward-8 has {m.hypers} directions")
    return methods, notes


# ----------------------------------------------------------------------------- agreement
def relative_error(got: dict[str, Tensor], want: dict[str, Tensor]) -> float:
    if got.keys() != want.keys():
        return math.inf
    worst = 0.0
    for key, w in want.items():
        scale = float(w.abs().max().clamp_min(1e-12))
        worst = max(worst, float((got[key] - w).abs().max()) / scale)
    return worst


def agreement_check(
    problem: Problem,
    device: torch.device,
    *,
    every: int = 1,
    compile: bool = False,
    segment: int = 1,
) -> list[dict[str, Any]]:
    """Float64, tiny problem: every hypergradient method against gradhpo reverse."""
    ctx = make_context(tiny(problem), device, torch.float64)
    methods, _ = build_methods(
        ctx, with_reverse8=True, every=every, compile=compile, segment=segment
    )
    grads: dict[str, dict[str, Tensor]] = {}
    for m in methods:
        if m.name == PLAIN:
            continue
        m.prepare()
        out = m.run()
        assert out is not None
        grads[m.name] = {k: v.detach() for k, v in out.items()}
    rows = []
    for name, g in grads.items():
        if name in (REVERSE, REVERSE8):
            continue
        eight = name in (FORWARD8, FORWARD8C)
        ref = REVERSE8 if eight else REVERSE
        err = relative_error(g, grads[ref])
        value = float(g["lr"]) if "lr" in g and g["lr"].numel() == 1 else float("nan")
        rows.append(
            {
                "problem": problem.key,
                "method": name,
                "reference": ref,
                "hypers": len(g) if eight else 1,
                "value": value,
                "reference_value": float(grads[ref]["lr"]) if ref == REVERSE else float("nan"),
                "relative_error": err,
                "passed": err <= TOLERANCE,
            }
        )
    return rows


# ----------------------------------------------------------------------------- timing
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(method: Method, device: torch.device) -> float:
    method.prepare()
    gc.collect()
    sync(device)
    gc.disable()
    try:
        start = time.perf_counter()
        method.run()
        sync(device)
        return (time.perf_counter() - start) / method.per
    finally:
        gc.enable()


def time_problem(
    ctx: Context, methods: Sequence[Method], rounds: int, warmup: int
) -> dict[str, list[float]]:
    for _ in range(warmup):
        for m in methods:
            timed(m, ctx.device)
    times: dict[str, list[float]] = {m.name: [] for m in methods}
    for r in range(rounds):
        shift = r % len(methods)
        for m in [*methods[shift:], *methods[:shift]]:
            times[m.name].append(timed(m, ctx.device))
    return times


# ----------------------------------------------------------------------------- report
def _fmt(x: float, digits: int = 2) -> str:
    return "n/a" if x is None or not math.isfinite(x) else f"{x:.{digits}f}"


def summarize(problem: Problem, hypers: dict[str, int], times: dict[str, list[float]]):
    med = {m: statistics.median(t) * 1e3 for m, t in times.items()}
    plain = med[PLAIN]
    baselines = [med[m] for m in (HIGHER, BARE) if m in med]
    best = min(baselines) if baselines else math.nan
    rows = []
    for m, t in times.items():
        per_round = [a / b for a, b in zip(t, times[PLAIN], strict=True)]
        rows.append(
            {
                "problem": problem.key,
                "problem_name": problem.name,
                "method": m,
                "hypers": hypers[m],
                "k": problem.k,
                "batch": problem.batch,
                "rounds": len(t),
                "median_ms": med[m],
                "min_ms": min(t) * 1e3,
                "max_ms": max(t) * 1e3,
                "x_plain": med[m] / plain,
                "x_plain_round_min": min(per_round),
                "x_plain_round_max": max(per_round),
                "x_min_higher_bare": med[m] / best,
                "times_ms": ";".join(f"{v * 1e3:.3f}" for v in t),
            }
        )

    def ratio(a: str, b: str) -> float:
        return med[a] / med[b] if a in med and b in med else math.nan

    amortized = next((m for m in med if m.startswith(AMORTIZED)), "")
    segmented = next((m for m in med if m.startswith(SEGMENTED)), "")

    summary = {
        "problem": problem.key,
        "problem_name": problem.name,
        "k": problem.k,
        "plain_ms": plain,
        "reverse_x_plain": ratio(REVERSE, PLAIN),
        "reverse_x_min_higher_bare": med[REVERSE] / best,
        "checkpointed_over_reverse": ratio(CHECKPOINTED, REVERSE),
        "segment": int(segmented.removeprefix(SEGMENTED)) if segmented else 1,
        "segmented_over_reverse": ratio(segmented, REVERSE),
        "forward1_over_reverse": ratio(FORWARD1, REVERSE),
        "forward8_over_forward1": ratio(FORWARD8, FORWARD1),
        "amortized_every": int(amortized.removeprefix(AMORTIZED)) if amortized else 1,
        "amortized_x_plain": ratio(amortized, PLAIN),
        "amortized_over_reverse": ratio(amortized, REVERSE),
        "forward1_compiled_over_reverse": ratio(FORWARD1C, REVERSE),
        "forward8_compiled_over_forward1_compiled": ratio(FORWARD8C, FORWARD1C),
        "higher_x_plain": ratio(HIGHER, PLAIN),
        "bare_x_plain": ratio(BARE, PLAIN),
        "torchopt_x_plain": ratio(TORCHOPT, PLAIN),
    }
    return rows, summary


def method_table(rows: list[dict[str, Any]]) -> list[str]:
    lines = [
        "| problem | method | hypers | median ms | [min, max] ms | x plain [per-round min, max] "
        "| x min(higher, bare) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['problem']} | {r['method']} | {r['hypers']} | {r['median_ms']:.1f} | "
            f"[{r['min_ms']:.1f}, {r['max_ms']:.1f}] | **{_fmt(r['x_plain'])}** "
            f"[{_fmt(r['x_plain_round_min'])}, {_fmt(r['x_plain_round_max'])}] | "
            f"{_fmt(r['x_min_higher_bare'])} |"
        )
    return lines


def summary_table(summaries: list[dict[str, Any]]) -> list[str]:
    lines = [
        "| problem | K | plain ms | reverse x plain | reverse x min(higher, bare) "
        "| checkpointed / reverse | checkpointed segment-S (S) / reverse "
        "| forward-1 / reverse | forward-8 / forward-1 "
        "| every-M (M) x plain | forward-1 compiled / reverse "
        "| forward-8 compiled / forward-1 compiled "
        "| higher x plain | bare x plain | torchopt x plain |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in summaries:
        lines.append(
            f"| {s['problem']} {s['problem_name']} | {s['k']} | {s['plain_ms']:.1f} | "
            f"**{_fmt(s['reverse_x_plain'])}** | **{_fmt(s['reverse_x_min_higher_bare'])}** | "
            f"{_fmt(s['checkpointed_over_reverse'])} | "
            f"{_fmt(s['segmented_over_reverse'])} ({s['segment']}) | "
            f"{_fmt(s['forward1_over_reverse'])} | "
            f"{_fmt(s['forward8_over_forward1'])} | "
            f"{_fmt(s['amortized_x_plain'])} ({s['amortized_every']}) | "
            f"{_fmt(s['forward1_compiled_over_reverse'])} | "
            f"{_fmt(s['forward8_compiled_over_forward1_compiled'])} | "
            f"{_fmt(s['higher_x_plain'])} | "
            f"{_fmt(s['bare_x_plain'])} | {_fmt(s['torchopt_x_plain'])} |"
        )
    return lines


def check_table(rows: list[dict[str, Any]]) -> list[str]:
    lines = [
        "| problem | method | reference | d obj / d lr | reference value | relative error | ok |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        eight = r["method"] in (FORWARD8, FORWARD8C)
        value = "(8 hypers)" if eight else f"{r['value']:.10e}"
        ref = "" if eight else f"{r['reference_value']:.10e}"
        lines.append(
            f"| {r['problem']} | {r['method']} | {r['reference']} | {value} | {ref} | "
            f"{r['relative_error']:.1e} | {'yes' if r['passed'] else 'NO'} |"
        )
    return lines


def write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    if not rows:
        return
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def machine_line(args: argparse.Namespace, device: torch.device) -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = f", {torch.cuda.get_device_name(device)}" if device.type == "cuda" else ""
    return (
        f"{cpu}, {os.cpu_count()} cores{gpu}; torch {torch.__version__}, python "
        f"{platform.python_version()}; device {device}, {args.threads} torch threads"
    )


def loadavg() -> str:
    try:
        return " ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:  # pragma: no cover
        return "n/a"


# ----------------------------------------------------------------------------- main
def resolve_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: CUDA is not available")
    return torch.device(name)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=5, help="timed rounds (default 5)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed runs per method first")
    ap.add_argument("--problems", default="a,b,c", help="comma-separated subset of a,b,c")
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    ap.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test (< 30 s)")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda", "auto"))
    ap.add_argument("--out", type=Path, default=OUT_DIR)
    ap.add_argument(
        "--every",
        type=int,
        default=4,
        help="amortized tuning: time one hypergradient horizon per M (default 4; 1: off)",
    )
    ap.add_argument(
        "--segment",
        type=int,
        default=4,
        help="also time checkpointed with checkpoint_every=S (default 4; 1: off)",
    )
    ap.add_argument(
        "--compile",
        action="store_true",
        help="also time forward mode with compile=True (torch.compile; compiles in the warm-up)",
    )
    args = ap.parse_args(argv)
    keys = [k.strip() for k in args.problems.split(",") if k.strip()]
    unknown = [k for k in keys if k not in PROBLEMS]
    if not keys or unknown:
        ap.error(f"--problems: unknown {unknown}; choose from {list(PROBLEMS)}")
    args.problems = keys
    if min(args.rounds, args.threads, args.every, args.segment) < 1 or args.warmup < 0:
        ap.error("--rounds, --threads, --every and --segment must be >= 1, --warmup >= 0")
    if args.compile and args.warmup < 1:
        ap.error("--compile needs --warmup >= 1 (the compilation must not be timed)")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.compile:
        # Every (problem, size, dtype, hyper set) is one compilation of the same step function.
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    device = resolve_device(args.device)
    if device.type == "cpu":
        torch.set_flush_denormal(True)
    problems = [quick(PROBLEMS[k]) if args.quick else PROBLEMS[k] for k in args.problems]
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    print(f"machine: {machine_line(args, device)}")
    load_start = loadavg()
    print(f"load average at start: {load_start}")

    # 1. agreement (float64, tiny)
    checks: list[dict[str, Any]] = []
    for p in problems:
        checks += agreement_check(
            PROBLEMS[p.key], device, every=args.every, compile=args.compile, segment=args.segment
        )
    print(
        f"\nagreement check (float64, tiny problems, tolerance {TOLERANCE:g} relative to "
        "gradhpo reverse):"
    )
    print("\n".join(check_table(checks)))
    write_csv(args.out / "checks.csv", checks)
    failed = [c for c in checks if not c["passed"]]
    if failed:
        print(f"\nFAILED agreement check: {[(c['problem'], c['method']) for c in failed]}")
        return 1

    # 2. timing (float32, interleaved rounds)
    rows: list[dict[str, Any]] = []
    summaries: list[dict[str, Any]] = []
    notes: set[str] = set()
    for p in problems:
        print(f"\ntiming {p.describe()}, {args.rounds} rounds ...", flush=True)
        ctx = make_context(p, device, torch.float32)
        methods, skipped = build_methods(
            ctx, every=args.every, compile=args.compile, segment=args.segment
        )
        notes.update(skipped)
        times = time_problem(ctx, methods, args.rounds, args.warmup)
        r, s = summarize(p, {m.name: m.hypers for m in methods}, times)
        rows += r
        summaries.append(s)
        print("\n".join(method_table(r)), flush=True)
    for note in sorted(notes):
        print(f"note: {note}")

    elapsed = time.perf_counter() - started
    header = [
        "# Engine speed (issue 14): gradhpo hypergradients vs plain training, higher, a bare "
        "unroll" + (", TorchOpt" if not any("TorchOpt" in n for n in notes) else ""),
        "",
        f"Command: `python experiments/bench_engine.py {' '.join(argv or sys.argv[1:])}`".rstrip(),
        "",
        f"Machine: {machine_line(args, device)}. Date: {datetime.date.today().isoformat()}. "
        f"Load average (1, 5, 15 min) at start {load_start}, at end {loadavg()}. "
        f"Wall time {elapsed:.0f} s.",
        "",
        "Problems:",
        "",
        *[f"* {p.describe()}" for p in problems],
        "",
        f"{args.rounds} interleaved rounds after {args.warmup} warm-up run(s) per method; "
        "medians; every ratio is a ratio of medians from this run.",
        "",
        *[f"Note: {n}" for n in sorted(notes)],
    ]
    md = [
        *header,
        "",
        "## Summary",
        "",
        *summary_table(summaries),
        "",
        "## Per method",
        "",
        *method_table(rows),
        "",
        "## Agreement check (float64, tiny problems)",
        "",
        *check_table(checks),
        "",
    ]
    print("\nsummary:")
    print("\n".join(summary_table(summaries)))
    print(f"\nload average at end: {loadavg()}; wall time {elapsed:.1f} s")
    write_csv(args.out / "results.csv", rows)
    write_csv(args.out / "summary.csv", summaries)
    (args.out / "results.md").write_text("\n".join(md), encoding="utf-8")
    print(f"wrote {args.out}/results.csv, summary.csv, checks.csv, results.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
