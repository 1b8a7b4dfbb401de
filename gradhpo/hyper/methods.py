"""Hypergradients of an outer objective through K inner training steps.

Every method returns d(objective)/d(raw hyperparameters) for the same unrolled computation

    w_{k+1}, s_{k+1} = update(w_k, grad L_train(w_k, batch_k; lambda), s_k; lambda),  k < K
    objective = a * L_final(w_K) + b * mean_k L_data(w_k, batch_k)

and differ only in how they get it:

* ``reverse``: backpropagation through the whole unroll (memory: K steps of activations);
* ``reverse`` with ``truncate=T``: only the last T steps are differentiated (T = K is full);
* ``checkpointed``: the forward pass keeps only the parameters and optimizer state at the
  start of each segment of ``checkpoint_every`` steps (default 1); the backward pass
  recomputes one segment at a time and propagates adjoints by vector-Jacobian products (the
  last segment is taken with its graph in the forward pass, so it is not recomputed). Same
  result as ``reverse`` to float rounding, memory K / ``checkpoint_every`` parameter copies
  plus one segment's activations;
* ``forward``: forward-mode (real-time recurrent) differentiation, one tangent per scalar
  hyperparameter, memory independent of K. Each step's tangent is taken in two parts: the
  tangent of the inner gradient is a Hessian-vector product by reverse over reverse (for
  several directions at once, ``is_grads_batched``), and the optimizer update's tangent by
  forward mode (dual tensors for one direction, ``torch.func.vmap`` over ``jvp`` for several),
  so a step costs about what a reverse-mode step does. ``chunk`` trades speed for memory;
  ``compile=True`` differentiates the whole step by ``vmap`` over ``jvp`` under
  ``torch.compile`` instead;
* ``greedy``: ``reverse`` over a single step (K = 1), the cheap online signal.

Implicit differentiation at convergence lives in :mod:`gradhpo.hyper.implicit`.

Randomness (dropout) is replayed exactly: the torch RNG state at the start of each inner step
is recorded so that recomputation (checkpointed) and every chunk of tangent directions
(forward; within a vmapped chunk, ``randomness="same"``: one mask for all directions) see the
same masks as the plain forward pass.

:func:`unroll` takes the same inner steps without any hypergradient (amortized tuning).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from functools import partial
from typing import Any, cast

import torch
import torch.autograd.forward_ad as fwAD
from torch import nn
from torch.func import functional_call, grad_and_value, jvp, vmap

from gradhpo.hyper.implicit import implicit_hypergradient

# The per-example losses live in losses.py; re-exported here, where they were first defined.
from gradhpo.hyper.losses import LossFn, cross_entropy_per_example, squared_error_per_example
from gradhpo.hyper.optimizers import HYPER_PREFIX, STEP_KEY, InnerOptimizer
from gradhpo.hyper.rng import RngState
from gradhpo.hyper.spec import LOSS_HYPERS, HyperParameters

__all__ = [
    "METHODS",
    "Objective",
    "InnerProblem",
    "HypergradResult",
    "hypergradient",
    "inner_step",
    "unroll",
    "implicit_at",
    "cross_entropy_per_example",
    "squared_error_per_example",
]

Tensor = torch.Tensor
Params = dict[str, Tensor]
Batch = Sequence[Tensor]  # (x, y) or (x, y, example_indices)

METHODS = ("reverse", "checkpointed", "forward", "greedy")


@dataclass(frozen=True)
class Objective:
    """``final_weight * final(params_K, buffers_K) + train_weight * mean inner data loss``.

    Use :meth:`validation` (the default outer loss: cross-entropy on a validation batch with
    the model in eval mode), :meth:`train_mean` (mean inner training loss along the unroll) or
    build one with any ``final(params, buffers) -> scalar``.
    """

    final: Callable[[Params, Params], Tensor] | None = None
    final_weight: float = 1.0
    train_weight: float = 0.0

    def __post_init__(self) -> None:
        if self.final is None and self.train_weight == 0:
            raise ValueError("Objective: needs a final loss or a non-zero train_weight")

    @staticmethod
    def validation(
        model: nn.Module, x: Tensor, y: Tensor, loss_fn: LossFn | None = None
    ) -> Objective:
        """Mean ``loss_fn`` (default cross-entropy) on ``(x, y)``, model in eval mode."""
        per_example = loss_fn or cross_entropy_per_example

        def final(params: Params, buffers: Params) -> Tensor:
            with _mode(model, training=False):
                outputs = functional_call(model, (params, buffers), (x,))
            return per_example(outputs, y).mean()

        return Objective(final=final)

    @staticmethod
    def train_mean() -> Objective:
        return Objective(final=None, final_weight=0.0, train_weight=1.0)


@dataclass
class InnerProblem:
    """The inner training problem: model (used functionally), optimizer, tuned hypers and the
    per-example training loss ``loss_fn(outputs, targets) -> (B,)``."""

    model: nn.Module
    optimizer: InnerOptimizer
    hypers: HyperParameters
    loss_fn: LossFn = cross_entropy_per_example
    # Whether functional_call must untie tied weights (it walks the whole module at every call
    # when asked to): computed on first use and refreshed by every hypergradient() call.
    _tied: bool | None = field(default=None, init=False, repr=False, compare=False)

    def tie_weights(self, refresh: bool = False) -> bool:
        if refresh or self._tied is None:
            self._tied = _has_tied_tensors(self.model)
        return self._tied


@dataclass
class HypergradResult:
    """What a method returns. Tensors in ``params``/``state``/``buffers`` are detached."""

    grads: dict[str, Tensor]  # d objective / d raw, keyed like HyperParameters.raw
    objective: Tensor  # 0-d, detached
    train_losses: Tensor  # (K,) inner data losses, detached
    params: Params
    state: Params
    buffers: Params
    residual: float | None = None  # implicit only: relative residual of the linear solve
    # forward only: d(params)/d(raw) and d(optimizer slots)/d(raw) after the last step,
    # (n scalar hypers, *shape) each, keyed "params/<name>" / "state/<slot>"; pass them back
    # as ``tangents=`` to carry forward mode across unrolls.
    tangents: dict[str, Tensor] | None = None


def _in_mode(model: nn.Module, training: bool) -> bool:
    """Whether ``model`` and every submodule already are in ``training`` mode."""
    return model.training == training and all(m.training == training for m in model.modules())


#: The model that :func:`hypergradient` has put in train mode for the whole unroll: inner
#: steps on it skip the per-step mode check while its root module reports train mode.
_TRAIN_HELD: ContextVar[nn.Module | None] = ContextVar("gradhpo_train_held", default=None)


@contextmanager
def _mode(model: nn.Module, training: bool):
    """``model.train(training)`` for the block, then the previous mode back.

    A no-op when every module already is in that mode (the common case: it is entered at
    every inner step, and ``model.train`` walks and sets every module twice)."""
    if _in_mode(model, training):
        yield
        return
    previous = model.training
    model.train(training)
    try:
        yield
    finally:
        model.train(previous)


def _has_tied_tensors(model: nn.Module) -> bool:
    """Whether a parameter or buffer of ``model`` is registered under more than one name."""
    seen: set[int] = set()
    for _, t in (
        *model.named_parameters(remove_duplicate=False),
        *model.named_buffers(remove_duplicate=False),
    ):
        if id(t) in seen:
            return True
        seen.add(id(t))
    return False


def _training_loss(
    problem: InnerProblem, params: Params, buffers: Params, batch: Batch, values: Mapping[str, Any]
) -> tuple[Tensor, tuple[Tensor, Params]]:
    """(total loss that is minimised, (data loss, updated buffers)).

    The data loss is the plain mean of ``problem.loss_fn``; the total adds example weights and the L2
    penalty when those are tuned. Buffers are cloned here so that BatchNorm's in-place running
    statistics update never touches the caller's tensors (required under torch.func).
    """
    x, y = batch[0], batch[1]
    buffers = {k: v.clone() for k, v in buffers.items()}
    model = problem.model
    if _TRAIN_HELD.get() is model and model.training:
        logits = functional_call(model, (params, buffers), (x,), tie_weights=problem.tie_weights())
    else:
        with _mode(model, training=True):
            logits = functional_call(
                model, (params, buffers), (x,), tie_weights=problem.tie_weights()
            )
    per_example = problem.loss_fn(logits, y)
    data_loss = per_example.mean()
    total = data_loss
    if "example_weight" in values:
        if len(batch) < 3:
            raise ValueError("example_weight is tuned: batches must be (x, y, example_indices)")
        total = (per_example * values["example_weight"][batch[2]]).mean()
    if "l2" in values:
        l2 = values["l2"]
        total = total + 0.5 * sum((l2[n] * p.pow(2)).sum() for n, p in params.items())
    return total, (data_loss, buffers)


def inner_step(
    problem: InnerProblem,
    params: Params,
    state: Params,
    buffers: Params,
    raw: Mapping[str, Tensor],
    batch: Batch,
    *,
    functional: bool = False,
    step: int | None = None,
    constants: Mapping[str, Tensor] | None = None,
) -> tuple[Params, Params, Params, Tensor]:
    """One differentiable training step: (new params, new state, new buffers, data loss).

    ``step`` is the training step the hyperparameters are read at (needed only by scheduled
    hyperparameters; :func:`hypergradient` takes it from the optimizer's step count).
    ``constants`` gives untuned optimizer hyperparameters as 0-d tensors (forward mode passes
    them as primals with zero tangents: see :func:`_forward_constants`).

    Differentiable with respect to ``params``, ``state`` and ``raw``. The inner gradient is
    taken with ``torch.autograd.grad`` (``create_graph`` only where something upstream needs
    it: about 15 % faster than ``torch.func.grad`` here), or with ``torch.func.grad`` when
    ``functional=True``, which the step needs under ``torch.func`` transforms (forward mode).
    """
    values = problem.hypers.values(raw, step)
    if constants:
        values = {**values, **{n: {p: c for p in params} for n, c in constants.items()}}
    return _step(problem, params, state, buffers, values, batch, functional)


def _step(
    problem: InnerProblem,
    params: Params,
    state: Params,
    buffers: Params,
    values: Mapping[str, Any],
    batch: Batch,
    functional: bool = False,
) -> tuple[Params, Params, Params, Tensor]:
    """:func:`inner_step` with the hyperparameter values already computed from raw (once per
    unroll instead of once per step)."""
    if functional:
        grads, (_, (data_loss, new_buffers)) = grad_and_value(
            lambda p: _training_loss(problem, p, buffers, batch, values), has_aux=True
        )(params)
    else:
        grads, data_loss, new_buffers = _autograd_loss_grad(problem, params, buffers, batch, values)
    new_params, new_state = problem.optimizer.update(params, grads, state, values)
    return new_params, new_state, new_buffers, data_loss


def _autograd_loss_grad(
    problem: InnerProblem, params: Params, buffers: Params, batch: Batch, values: Mapping[str, Any]
) -> tuple[Params, Tensor, Params]:
    """Gradient of the training loss; second-order graph only when the outer computation is
    recording and the gradient can depend on something tracked (params or loss-side hypers)."""
    tracked = any(p.requires_grad for p in params.values())
    loss_side = any(
        isinstance(v, Tensor) and v.requires_grad
        for name in LOSS_HYPERS
        if name in values
        for v in (values[name].values() if isinstance(values[name], Mapping) else [values[name]])
    )
    create_graph = torch.is_grad_enabled() and (tracked or loss_side)
    with torch.enable_grad():
        leaves = {
            k: v if v.requires_grad else v.detach().requires_grad_() for k, v in params.items()
        }
        total, (data_loss, new_buffers) = _training_loss(problem, leaves, buffers, batch, values)
        grads = torch.autograd.grad(
            total, list(leaves.values()), create_graph=create_graph, allow_unused=True
        )
    grad_dict = _or_zeros(leaves, grads)
    if not create_graph:
        data_loss = data_loss.detach()
    return grad_dict, data_loss, _detach(new_buffers)


def _detach(tensors: Mapping[str, Tensor]) -> Params:
    return {k: v.detach() for k, v in tensors.items()}


def _track(tensors: Mapping[str, Tensor]) -> Params:
    """Detached copies that require grad (floating tensors only)."""
    return {k: v.detach().requires_grad_(v.is_floating_point()) for k, v in tensors.items()}


def _carries_tangent(name: str, value: Tensor) -> bool:
    """Whether an optimizer state entry can depend on the hyperparameters: floating slots do;
    the step counter, boolean flags and carried (constant) hyperparameter values do not."""
    return value.is_floating_point() and name != STEP_KEY and not name.startswith(HYPER_PREFIX)


def _first_step(problem: InnerProblem, state: Mapping[str, Tensor]) -> int | None:
    """The training step of an unroll's first inner step, for scheduled hyperparameters: the
    inner optimizer's step count (None without schedules: nothing reads it)."""
    if not problem.hypers.scheduled:
        return None
    return int(state[STEP_KEY]) if STEP_KEY in state else 0


def _step_at(first: int | None, k: int) -> int | None:
    return None if first is None else first + k


def _zeros_like(raw: Mapping[str, Tensor]) -> dict[str, Tensor]:
    return {k: torch.zeros_like(v) for k, v in raw.items()}


def _or_zeros(like: Mapping[str, Tensor], grads: Sequence[Tensor | None]) -> dict[str, Tensor]:
    """``autograd.grad(..., allow_unused=True)``'s results keyed like ``like``, with zeros
    where an input was unused (``None``)."""
    return {
        k: g if g is not None else torch.zeros_like(v)
        for (k, v), g in zip(like.items(), grads, strict=True)
    }


def _with_train_mean(value: Tensor, objective: Objective, losses: Sequence[Tensor]) -> Tensor:
    """The objective's value: its final term ``value`` plus the train-mean term, if any."""
    if not objective.train_weight:
        return value
    return value + objective.train_weight * torch.stack(list(losses)).mean()


@dataclass(frozen=True)
class _Unroll:
    """What every method differentiates: K = len(batches) inner steps of ``problem`` from
    (params, state, buffers), scored by ``objective``."""

    problem: InnerProblem
    params: Params
    state: Params
    buffers: Params
    batches: Sequence[Batch]
    objective: Objective


@dataclass(frozen=True)
class _ForwardOptions:
    """Forward mode's own options (see :func:`hypergradient`)."""

    max_directions: int = 64
    chunk: int | None = None
    compile: bool = False
    tangents: Mapping[str, Tensor] | None = None


def _final_loss(objective: Objective, params: Params, buffers: Params) -> Tensor:
    if objective.final is None or objective.final_weight == 0:
        return torch.zeros((), dtype=next(iter(params.values())).dtype)
    return objective.final_weight * objective.final(params, buffers)


def _check_horizon(batches: Sequence[Batch], truncate: int | None) -> int:
    k = len(batches)
    if k < 1:
        raise ValueError(f"K (number of inner batches) must be >= 1, got {k}")
    if truncate is None:
        return k
    if isinstance(truncate, bool) or not isinstance(truncate, int) or not 1 <= truncate <= k:
        raise ValueError(f"truncate (T) must be an integer in [1, K={k}], got {truncate!r}")
    return truncate


# ---------------------------------------------------------------------- reverse mode
def _reverse(u: _Unroll, truncate: int | None) -> HypergradResult:
    problem, params, state, buffers, batches = u.problem, u.params, u.state, u.buffers, u.batches
    objective = u.objective
    raw = problem.hypers.raw
    k_total = len(batches)
    t = _check_horizon(batches, truncate)
    losses: list[Tensor] = []
    first = _first_step(problem, state)
    # Untracked prefix of a truncated unroll: hypers act as constants there.
    const = problem.hypers.values_by_step({k: v.detach() for k, v in raw.items()})
    for i, batch in enumerate(batches[: k_total - t]):
        values = const(_step_at(first, i))
        params, state, buffers, loss = _step(problem, params, state, buffers, values, batch)
        params, state, buffers = _detach(params), _detach(state), _detach(buffers)
        losses.append(loss.detach())
    # No need to track the start point: the graph begins where the hypers first act.
    params, state = _detach(params), _detach(state)
    tracked_losses: list[Tensor] = []
    # One graph node per hyper (per schedule position), shared by every step that reads it.
    tracked_values = problem.hypers.values_by_step(raw)
    for i, batch in enumerate(batches[k_total - t :], start=k_total - t):
        values = tracked_values(_step_at(first, i))
        params, state, buffers, loss = _step(problem, params, state, buffers, values, batch)
        buffers = _detach(buffers)
        tracked_losses.append(loss)
    obj = _final_loss(objective, params, buffers)
    if objective.train_weight:
        obj = obj + objective.train_weight * (torch.stack(losses + tracked_losses).sum() / k_total)
    grads: Sequence[Tensor | None]
    if obj.requires_grad:
        grads = torch.autograd.grad(obj, list(raw.values()), allow_unused=True)
    else:  # nothing in the objective depends on the hypers (e.g. train_mean over one step)
        grads = (None,) * len(raw)
    with torch.no_grad():
        all_losses = torch.stack([*losses, *(loss.detach() for loss in tracked_losses)])
    return HypergradResult(
        grads=_or_zeros(raw, grads),
        objective=obj.detach(),
        train_losses=all_losses,
        params=_detach(params),
        state=_detach(state),
        buffers=buffers,
    )


# ---------------------------------------------------------------------- checkpointed
def _tracked_segment(
    problem: InnerProblem,
    start: tuple[Params, Params, Params],
    batches: Sequence[Batch],
    steps: range,
    first: int | None,
    moving: set[str],
) -> tuple[Params, Params, Params, Params, Params, list[Tensor]]:
    """Steps ``steps`` from ``start`` = (params, state, buffers) with their graph, from fresh
    leaves: (params in, state in, params out, state out, buffers out, the steps' data losses).
    The hyperparameter values are computed from raw once for the segment (one graph node per
    hyper, read by every step of it) and freed by the segment's one vector-Jacobian product."""
    params, state, buffers = start
    p_in = _track(params)
    s_in = {n: v.detach().requires_grad_(n in moving) for n, v in state.items()}
    values_at = problem.hypers.values_by_step(problem.hypers.raw)
    p, s, b = p_in, s_in, buffers
    losses = []
    for k in steps:
        p, s, b, loss = _step(problem, p, s, b, values_at(_step_at(first, k)), batches[k])
        b = _detach(b)
        losses.append(loss)
    return p_in, s_in, p, s, b, losses


def _checkpointed(u: _Unroll, truncate: int | None, every: int) -> HypergradResult:
    problem, params, state, buffers, batches = u.problem, u.params, u.state, u.buffers, u.batches
    objective = u.objective
    raw = problem.hypers.raw
    k_total = len(batches)
    t = _check_horizon(batches, truncate)
    first = _first_step(problem, state)
    const = problem.hypers.values_by_step({k: v.detach() for k, v in raw.items()})
    # The tracked steps in segments of ``every`` (the last one may be shorter): the forward
    # pass keeps each segment's start point and RNG state; the backward pass recomputes one
    # segment at a time (replaying its dropout masks) and takes one vector-Jacobian product
    # through it.
    starts = list(range(k_total - t, k_total, every))
    segments = [range(a, min(a + every, k_total)) for a in starts]
    saved: list[tuple[tuple[Params, Params, Params], RngState]] = []
    losses: list[Tensor] = []
    params, state, buffers = _detach(params), _detach(state), _detach(buffers)
    moving = {n for n, v in state.items() if _carries_tangent(n, v)}
    device = next(iter(params.values())).device
    for i, batch in enumerate(batches[: starts[-1]]):
        if i >= starts[0] and (i - starts[0]) % every == 0:
            saved.append(((params, state, buffers), RngState.capture(device)))
        with torch.no_grad():
            values = const(_step_at(first, i))
            params, state, buffers, loss = _step(problem, params, state, buffers, values, batch)
        losses.append(loss)
    # The last segment is taken with its graph, kept for the first vector-Jacobian product of
    # the backward sweep (at most ``every`` steps' activations, which that sweep holds
    # anyway): it is not computed twice.
    last = _tracked_segment(problem, (params, state, buffers), batches, segments[-1], first, moving)
    final_params, final_state, final_buffers = _detach(last[2]), _detach(last[3]), last[4]
    losses.extend(loss.detach() for loss in last[5])

    tracked = _track(final_params)
    obj = _final_loss(objective, tracked, final_buffers)
    keys = list(raw)
    grads = _zeros_like(raw)
    if obj.requires_grad:
        adj = torch.autograd.grad(
            obj, [*tracked.values(), *(raw[k] for k in keys)], allow_unused=True
        )
        adj_params = _or_zeros(tracked, adj[: len(tracked)])
        for k, g in zip(keys, adj[len(tracked) :], strict=True):
            if g is not None:
                grads[k] += g
    else:
        adj_params = {n: torch.zeros_like(v) for n, v in tracked.items()}
    adj_state = {n: torch.zeros_like(final_state[n]) for n in moving}
    loss_weight = objective.train_weight / k_total

    rng_after = RngState.capture(device)
    for j in range(len(segments) - 1, -1, -1):
        if j == len(segments) - 1:
            p_in, s_in, p_out, s_out, _, seg_losses = last
        else:
            start, rng = saved[j]
            rng.restore()
            p_in, s_in, p_out, s_out, _, seg_losses = _tracked_segment(
                problem, start, batches, segments[j], first, moving
            )
        s_out_float = {n: v for n, v in s_out.items() if n in adj_state}
        outputs = [*p_out.values(), *s_out_float.values()]
        cotangents = [*(adj_params[n] for n in p_out), *(adj_state[n] for n in s_out_float)]
        if loss_weight:
            outputs.extend(seg_losses)
            cotangents.extend(torch.full_like(loss, loss_weight) for loss in seg_losses)
        s_in_float = {n: v for n, v in s_in.items() if n in adj_state}
        inputs = [*p_in.values(), *s_in_float.values(), *(raw[k] for k in keys)]
        vjp = torch.autograd.grad(outputs, inputs, cotangents, allow_unused=True)
        n_p, n_s = len(p_in), len(s_in_float)
        adj_params = _or_zeros(p_in, vjp[:n_p])
        adj_state = _or_zeros(s_in_float, vjp[n_p : n_p + n_s])
        for k, g in zip(keys, vjp[n_p + n_s :], strict=True):
            if g is not None:
                grads[k] += g
    rng_after.restore()

    with torch.no_grad():
        obj_value = _with_train_mean(obj.detach(), objective, losses)
    return HypergradResult(
        grads=grads,
        objective=obj_value,
        train_losses=torch.stack(losses).detach(),
        params=final_params,
        state=final_state,
        buffers=final_buffers,
    )


# ---------------------------------------------------------------------- forward mode
def _chunks(n: int, chunk: int | None) -> list[tuple[int, int]]:
    size = n if chunk is None else chunk
    return [(a, min(a + size, n)) for a in range(0, n, size)]


def _tangent_step(
    problem: InnerProblem,
    primals: tuple[Params, Params, Params, Params],
    fixed: Params,
    buffers: Params,
    batch: Batch,
    tan_p: Params,
    tan_s: Params,
    tan_r: Params,
    step: int | None = None,
) -> tuple[Params, Tensor, Params, Params, Tensor, Params, Params]:
    """One forward-mode step for a chunk of c directions by ``torch.func`` (``vmap`` over
    ``jvp`` of the whole step; what ``compile=True`` compiles): primals ``(params, moving
    state, raw, constants)`` and tangents stacked on a leading (c,) dimension (the constants'
    tangents are zeros). Returns (new params, data loss, their tangents (c, ...): params,
    moving state, loss; the full new state, new buffers). The eager path is
    :func:`_hvp_tangent_step`."""
    moving = list(primals[1])

    def one_step(p: Params, s: Params, r: Params, k: Params):
        k = dict(k)
        counter = {STEP_KEY: k.pop(STEP_KEY)} if STEP_KEY in k else {}
        new_p, new_s, new_b, loss = inner_step(
            problem,
            p,
            {**s, **fixed, **counter},
            buffers,
            r,
            batch,
            functional=True,
            step=step,
            constants=k,
        )
        return (new_p, {n: new_s[n] for n in moving}, loss), (new_s, new_b)

    def tangent_step(tp: Params, ts: Params, tr: Params):
        tk = {n: torch.zeros_like(v) for n, v in primals[3].items()}
        return jvp(one_step, primals, (tp, ts, tr, tk), has_aux=True)

    if next(iter(tan_r.values())).shape[0] == 1:  # one direction: a plain jvp (chunk=1)
        one = tuple({n: t[0] for n, t in part.items()} for part in (tan_p, tan_s, tan_r))
        (p_next, _, loss), (dp, ds, dloss), (new_s, new_b) = tangent_step(*one)
        dp = {n: t.unsqueeze(0) for n, t in dp.items()}
        ds = {n: t.unsqueeze(0) for n, t in ds.items()}
        return p_next, loss, dp, ds, dloss.unsqueeze(0), new_s, new_b
    # All directions of the chunk in one pass: the primal step is computed once and shared
    # (it does not depend on the tangent), so dropout draws one mask for all ("same") and
    # BatchNorm updates its statistics once; unbatched outputs come back expanded.
    (p_next, _, loss), (dp, ds, dloss), (new_s, new_b) = vmap(tangent_step, randomness="same")(
        tan_p, tan_s, tan_r
    )
    first = lambda d: {n: t[0] for n, t in d.items()}  # noqa: E731
    return first(p_next), loss[0], dp, ds, dloss, first(new_s), first(new_b)


# torch's forward-mode AD entry points without the public wrappers' per-call Python checks
# (about 10 us a call, a dozen calls per forward-mode step of a small model); the public
# ones where this torch has no such functions. ``_forward`` makes one dual through the public
# API first, which registers torch's forward-mode decompositions as the wrappers would.
_RAW_MAKE_DUAL = getattr(torch, "_make_dual", None)
_RAW_UNPACK_DUAL = getattr(torch, "_unpack_dual", None)


def _make_dual(t: Tensor, tangent: Tensor, level: int) -> Tensor:
    if _RAW_MAKE_DUAL is None:  # pragma: no cover - every torch this package supports has it
        return fwAD.make_dual(t, tangent, level=level)
    return _RAW_MAKE_DUAL(t, tangent, level=level)


def _unpack_dual(t: Tensor, level: int) -> tuple[Tensor, Tensor | None]:
    """(primal, tangent or None) of ``t`` at forward-AD ``level``."""
    if _RAW_UNPACK_DUAL is None:  # pragma: no cover
        u = fwAD.unpack_dual(t, level=level)
        return u.primal, u.tangent
    primal, tangent = _RAW_UNPACK_DUAL(t, level=level)
    return primal, tangent


def _with_constants(values: dict[str, Any], constants: Mapping[str, Tensor], params: Params):
    """``values`` plus the untuned optimizer constants, given for every parameter."""
    if not constants:
        return values
    return {**values, **{n: {q: c for q in params} for n, c in constants.items()}}


def _hvp_tangent_step(
    problem: InnerProblem,
    primals: tuple[Params, Params, Params, Params],
    fixed: Params,
    buffers: Params,
    batch: Batch,
    tan_p: Params,
    tan_s: Params,
    tan_r: Params,
    step: int | None = None,
    *,
    loss_tangent: bool = True,
) -> tuple[Params, Tensor, Params, Params, Tensor, Params, Params]:
    """:func:`_tangent_step` without ``torch.func``, for c >= 1 directions at once.

    The step is ``update(w, g(w, lambda), s; lambda)`` with ``g`` the gradient of the training
    loss. Its tangent is split where the cost is:

    * the tangent of the inner gradient, ``dg = H dw + (d^2 L / dw dlambda) dlambda``, is one
      Hessian-vector product per direction taken by reverse over reverse: the gradient of
      ``g . dw + (dL/dlambda) . dlambda`` with respect to ``w`` (``is_grads_batched`` for
      several directions). The ops are those of a reverse-mode step (a forward, a backward
      with its graph, and a backward through that), so a step costs about what reverse mode
      pays per step, where forward-over-reverse paid the forward-mode derivative of every
      backward op (Python decompositions for some, such as ``log_softmax``'s);
    * the update's tangent (elementwise arithmetic) by forward mode: dual tensors for one
      direction, ``vmap`` of ``jvp`` for several.

    The data loss depends on the hyperparameters only through ``w``, so its tangent is its
    gradient dotted with ``dw`` (zeros without ``loss_tangent``: an objective without the
    train-mean term never reads it). Same quantity as :func:`_tangent_step`, up to float
    rounding.
    """
    params, moving_state, raw, constants = primals
    constants = dict(constants)
    counter = {STEP_KEY: constants.pop(STEP_KEY)} if STEP_KEY in constants else {}
    n_dir = next(iter(tan_r.values())).shape[0]
    hypers = problem.hypers
    loss_side = [k for n in LOSS_HYPERS if n in hypers.names for k in hypers.keys_of(n)]
    leaves = {n: v.detach().requires_grad_() for n, v in params.items()}
    raw_leaves = {k: (v.detach().requires_grad_() if k in loss_side else v) for k, v in raw.items()}
    with torch.enable_grad():
        values = _with_constants(hypers.values(raw_leaves, step), constants, params)
        total, (loss, new_b) = _training_loss(problem, leaves, buffers, batch, values)
        wrt = [*leaves.values(), *(raw_leaves[k] for k in loss_side)]
        first = torch.autograd.grad(total, wrt, create_graph=True, allow_unused=True)
        grads = _or_zeros(leaves, first[: len(leaves)])
        # The data loss's gradient: the total's unless the loss side adds terms.
        data_grads = (
            _or_zeros(
                leaves,
                torch.autograd.grad(
                    loss, list(leaves.values()), retain_graph=True, allow_unused=True
                ),
            )
            if loss_side and loss_tangent
            else grads
        )
        outs, seeds = [], []
        for g, key in zip(first, [*(_P + n for n in leaves), *loss_side], strict=True):
            if g is not None and g.requires_grad:
                outs.append(g)
                seeds.append(tan_p[key[len(_P) :]] if key.startswith(_P) else tan_r[key])
        products: Sequence[Tensor | None] = [None] * len(leaves)
        if outs:
            if n_dir == 1:
                products = [
                    None if h is None else h.unsqueeze(0)
                    for h in torch.autograd.grad(
                        outs, list(leaves.values()), [s[0] for s in seeds], allow_unused=True
                    )
                ]
            else:
                products = torch.autograd.grad(
                    outs, list(leaves.values()), seeds, is_grads_batched=True, allow_unused=True
                )
    dg = {
        n: h if h is not None else tan_p[n].new_zeros(tan_p[n].shape)
        for n, h in zip(leaves, products, strict=True)
    }
    dloss = (
        cast(
            Tensor,
            sum((data_grads[n].detach() * tan_p[n]).reshape(n_dir, -1).sum(1) for n in leaves),
        )
        if loss_tangent
        else tan_r[next(iter(tan_r))].new_zeros(n_dir)
    )
    g0 = _detach(grads)
    moving = list(moving_state)

    def update(p: Params, g: Params, s: Params, r: Params):
        vals = _with_constants(hypers.values(r, step), constants, p)
        new_p, new_s = problem.optimizer.update(p, g, {**s, **fixed, **counter}, vals)
        return (new_p, {n: new_s[n] for n in moving}), new_s

    if n_dir == 1:
        with fwAD.dual_level() as level:
            dual = lambda d, t: {n: _make_dual(v, t[n][0], level) for n, v in d.items()}  # noqa: E731
            (new_p, new_moving), new_s = update(
                dual(params, tan_p), dual(g0, dg), dual(moving_state, tan_s), dual(raw, tan_r)
            )
            up = {n: _unpack_dual(v, level) for n, v in new_p.items()}
            us = {n: _unpack_dual(v, level) for n, v in new_moving.items()}
            tangent = lambda u: torch.zeros_like(u[0]) if u[1] is None else u[1]  # noqa: E731
            dp = {n: tangent(u).unsqueeze(0) for n, u in up.items()}
            ds = {n: tangent(u).unsqueeze(0) for n, u in us.items()}
            p_next = {n: u[0] for n, u in up.items()}
            full_state = {
                n: us[n][0] if n in us else _unpack_dual(v, level)[0] for n, v in new_s.items()
            }
    else:
        # Flat tuples in and out: vmap and jvp flatten their arguments on every call.
        pn, mn, rn = list(params), moving, list(raw)
        sn: list[str] = []  # the new state's keys, recorded by the first call
        flat = lambda d, names: tuple(d[n] for n in names)  # noqa: E731
        named = lambda names, t: dict(zip(names, t, strict=True))  # noqa: E731

        def flat_update(p: tuple, g: tuple, s: tuple, r: tuple):
            (new_p, new_moving), new_s = update(
                named(pn, p), named(pn, g), named(mn, s), named(rn, r)
            )
            sn[:] = list(new_s)
            return (flat(new_p, pn), flat(new_moving, mn)), flat(new_s, sn)

        primals_u = (flat(params, pn), flat(g0, pn), flat(moving_state, mn), flat(raw, rn))
        batched = vmap(
            lambda tp, tg, ts, tr: jvp(flat_update, primals_u, (tp, tg, ts, tr), has_aux=True)
        )(flat(tan_p, pn), flat(dg, pn), flat(tan_s, mn), flat(tan_r, rn))
        (p_next_b, _), (dp_t, ds_t), full_b = cast(Any, batched)
        p_next = {n: t[0] for n, t in zip(pn, p_next_b, strict=True)}
        full_state = {n: t[0] for n, t in zip(sn, full_b, strict=True)}
        dp, ds = named(pn, dp_t), named(mn, ds_t)
    return _detach(p_next), loss.detach(), dp, ds, dloss, _detach(full_state), _detach(new_b)


_COMPILED: dict[str, Callable[..., Any]] = {}


def _compiled_tangent_step() -> Callable[..., Any]:
    """:func:`_tangent_step` through ``torch.compile`` (built once; recompiled by torch for
    new shapes, models or optimizers). ``fallback_random`` keeps torch's own random kernels,
    so dropout draws exactly the masks of the eager step."""
    if "tangent_step" not in _COMPILED:
        _COMPILED["tangent_step"] = torch.compile(
            _tangent_step, dynamic=False, options={"fallback_random": True}
        )
    return _COMPILED["tangent_step"]


def _forward(u: _Unroll, truncate: int | None, options: _ForwardOptions) -> HypergradResult:
    problem, params, state, buffers, batches = u.problem, u.params, u.state, u.buffers, u.batches
    objective, max_directions, chunk = u.objective, options.max_directions, options.chunk
    if truncate is not None and truncate != len(batches):
        raise ValueError(
            f"truncate: forward mode differentiates every step (real-time), got truncate={truncate!r} "
            f"for K={len(batches)}"
        )
    _check_horizon(batches, None)
    hypers = problem.hypers
    n_dir = hypers.numel()
    if n_dir > max_directions:
        raise ValueError(
            f"forward mode carries one tangent per scalar hyperparameter: {n_dir} > "
            f"max_directions={max_directions}; use reverse or checkpointed mode for many hypers"
        )
    if n_dir == 0:  # pragma: no cover - guarded by parse_specs
        raise ValueError("forward mode needs at least one hyperparameter")
    keys = list(hypers.raw)
    raw = {k: v.detach() for k, v in hypers.raw.items()}
    # Direction d is the one-hot tangent of the d-th scalar of the raw hypers (keys in order,
    # elements in row-major order); each chunk of directions is one stacked tangent (c, ...).
    sizes = [raw[k].numel() for k in keys]
    eye = torch.eye(n_dir, dtype=hypers.dtype, device=hypers.device)
    basis = dict(zip(keys, torch.split(eye, sizes, dim=1), strict=True))
    chunks = _chunks(n_dir, chunk)
    raw_tangents = [
        {k: basis[k][a:b].reshape(b - a, *raw[k].shape) for k in keys} for a, b in chunks
    ]

    params, state, buffers = _detach(params), _detach(state), _detach(buffers)
    # Only the optimizer's slots carry a tangent: the step counter, flags and carried
    # hyperparameter values do not depend on the hypers (their tangent would stay 0).
    moving = [n for n, v in state.items() if _carries_tangent(n, v)]
    start = _check_tangents(options.tangents, params, state, moving, n_dir)
    tan_p = [{n: start[_P + n][a:b] for n in params} for a, b in chunks]
    tan_s = [{n: start[_S + n][a:b] for n in moving} for a, b in chunks]
    loss_tangent_sum = [
        torch.zeros(b - a, dtype=hypers.dtype, device=hypers.device) for a, b in chunks
    ]
    losses: list[Tensor] = []

    device = next(iter(params.values())).device
    if options.compile:
        step_fn = _compiled_tangent_step()
    else:
        step_fn = partial(_hvp_tangent_step, loss_tangent=bool(objective.train_weight))
        with fwAD.dual_level():  # registers the decompositions (see _make_dual)
            fwAD.make_dual(raw[keys[0]], torch.zeros_like(raw[keys[0]]))
    first = _first_step(problem, state)
    for k, batch in enumerate(batches):
        rng = RngState.capture(device)
        fixed = {n: v for n, v in state.items() if n not in moving}
        constants = _forward_constants(problem, state, params)
        primals = (params, {n: state[n] for n in moving}, raw, constants)
        for c in range(len(chunks)):
            rng.restore()  # every chunk replays the same dropout masks
            p_next, loss, dp, ds, dloss, full_state, new_buffers = step_fn(
                problem,
                primals,
                fixed,
                buffers,
                batch,
                tan_p[c],
                tan_s[c],
                raw_tangents[c],
                _step_at(first, k),
            )
            tan_p[c], tan_s[c] = dp, ds
            loss_tangent_sum[c] = loss_tangent_sum[c] + dloss
        params, state, buffers = _detach(p_next), _detach(full_state), _detach(new_buffers)
        losses.append(loss.detach())

    tracked = _track(params)
    obj = (
        objective.final_weight * objective.final(tracked, buffers)
        if objective.final is not None and objective.final_weight
        else None
    )
    if obj is not None and obj.requires_grad:
        dobj = _or_zeros(
            tracked, torch.autograd.grad(obj, list(tracked.values()), allow_unused=True)
        )
    else:
        dobj = {n: torch.zeros_like(v) for n, v in params.items()}
    k_total = len(batches)
    per_direction = []
    for c, (a, b) in enumerate(chunks):
        total = cast(
            Tensor,
            sum((dobj[n].unsqueeze(0) * tan_p[c][n]).reshape(b - a, -1).sum(1) for n in params),
        )
        if objective.train_weight:
            total = total + objective.train_weight * loss_tangent_sum[c] / k_total
        per_direction.append(total)
    flat = torch.cat(per_direction).to(hypers.dtype)
    grads = {
        k: g.reshape(raw[k].shape).clone()
        for k, g in zip(keys, torch.split(flat, sizes), strict=True)
    }
    with torch.no_grad():
        final = (
            obj.detach()
            if obj is not None
            else torch.zeros((), dtype=hypers.dtype, device=hypers.device)
        )
        obj_value = _with_train_mean(final, objective, losses)
    return HypergradResult(
        grads=grads,
        objective=obj_value,
        train_losses=torch.stack(losses),
        params=params,
        state=state,
        buffers=buffers,
        tangents={
            **{_P + n: torch.cat([t[n] for t in tan_p]) for n in params},
            **{_S + n: torch.cat([t[n] for t in tan_s]) for n in moving},
        },
    )


def _forward_constants(problem: InnerProblem, state: Params, params: Params) -> Params:
    """The optimizer's untuned, non-zero hyperparameters as 0-d tensors in the parameters'
    dtype (the values the optimizer would use: carried in the state, else its defaults).

    Forward mode passes them to the step as primals with zero tangents. Left as Python
    numbers or plain tensors, every product of a constant with a tensor that carries a
    tangent gets a symbolic zero tangent, whose arithmetic torch runs through its Python
    reference implementations: a few hundred microseconds per operation, which made a
    forward-mode step of a small MLP about ten times a plain one. The values are the same, so
    the results are too (up to the sign of zeros). The step counter is passed the same way
    (Adam raises its betas to its power)."""
    optimizer = problem.optimizer
    like = next(iter(params.values()))
    out: Params = {}
    for name in optimizer.hyper_names:
        if name in problem.hypers.names:
            continue
        carried = state.get(HYPER_PREFIX + name)
        value = float(carried) if carried is not None else float(optimizer.defaults[name])
        if value != 0.0:
            out[name] = torch.tensor(value, dtype=like.dtype, device=like.device)
    if optimizer.reads_step and STEP_KEY in state and state[STEP_KEY].is_floating_point():
        out[STEP_KEY] = state[STEP_KEY]
    return out


#: Key prefixes of forward mode's tangents (:attr:`HypergradResult.tangents`).
_P, _S = "params/", "state/"


def _check_tangents(
    tangents: Mapping[str, Tensor] | None,
    params: Params,
    state: Params,
    moving: Sequence[str],
    n_dir: int,
) -> dict[str, Tensor]:
    """The starting tangents of forward mode, (n_dir, *shape) each: zeros (a fresh start), or
    the ``tangents`` that an earlier call returned (carried forward mode), checked."""
    shapes = {
        **{_P + n: (n_dir, *v.shape) for n, v in params.items()},
        **{_S + n: (n_dir, *state[n].shape) for n in moving},
    }
    like = {**{_P + n: v for n, v in params.items()}, **{_S + n: state[n] for n in moving}}
    if tangents is None:
        return {k: like[k].new_zeros(shape) for k, shape in shapes.items()}
    if set(tangents) != set(shapes):
        raise ValueError(
            f"tangents: keys {sorted(tangents)} do not match this problem's {sorted(shapes)}"
        )
    for key, shape in shapes.items():
        if tuple(tangents[key].shape) != shape:
            raise ValueError(
                f"tangents[{key!r}]: shape {tuple(tangents[key].shape)}, expected {shape}"
            )
    return {k: t.detach().to(like[k]) for k, t in tangents.items()}


def implicit_at(
    problem: InnerProblem,
    params: Mapping[str, Tensor],
    buffers: Mapping[str, Tensor],
    batches: Sequence[Batch],
    objective: Objective,
    *,
    solver: str = "cg",
    iterations: int = 20,
    damping: float = 0.0,
    alpha: float = 0.01,
) -> HypergradResult:
    """Implicit-function-theorem hypergradient at ``params`` taken as the training minimum.

    The training loss is the mean over ``batches`` of the inner loss (with its L2 and
    example-weight terms); only loss-side hyperparameters move the minimum, so optimizer
    hyperparameters are refused. ``objective`` must be a final loss (no train-mean term).
    No training step is taken: ``params`` come back unchanged.
    """
    not_loss_side = [n for n in problem.hypers.names if n not in LOSS_HYPERS]
    if not_loss_side:
        raise ValueError(
            f"implicit differentiation needs loss-side hyperparameters (l2, example_weight); "
            f"{not_loss_side} do not move the training minimum"
        )
    final = objective.final
    if final is None or objective.train_weight:
        raise ValueError(
            "implicit differentiation needs a final objective without a train-mean term"
        )
    if problem.hypers.scheduled:
        raise ValueError(
            "implicit differentiation needs constant hyperparameters: a schedule does not "
            "define one training minimum"
        )
    _check_horizon(batches, None)
    params, buffers = _detach(params), _detach(buffers)
    losses: list[Tensor] = []

    def train_loss(p: Params, raw: dict[str, Tensor]) -> Tensor:
        values = problem.hypers.values(raw)
        total: Tensor | float = 0.0
        losses.clear()
        for batch in batches:
            batch_loss, (data_loss, _) = _training_loss(problem, p, buffers, batch, values)
            total = total + batch_loss
            losses.append(data_loss.detach())
        return cast(Tensor, total) / len(batches)  # a tensor: batches is not empty

    def outer_loss(p: Params, raw: dict[str, Tensor]) -> Tensor:
        return objective.final_weight * final(p, buffers)

    result = implicit_hypergradient(
        train_loss,
        outer_loss,
        params,
        dict(problem.hypers.raw),
        solver=solver,
        iterations=iterations,
        damping=damping,
        alpha=alpha,
    )
    return HypergradResult(
        grads=result.grads,
        objective=result.outer_loss,
        train_losses=torch.stack(losses) if losses else torch.zeros(0),
        params=params,
        state={},
        buffers=buffers,
        residual=result.residual,
    )


def hypergradient(
    method: str,
    problem: InnerProblem,
    params: Mapping[str, Tensor],
    state: Mapping[str, Tensor],
    buffers: Mapping[str, Tensor],
    batches: Sequence[Batch],
    objective: Objective,
    *,
    truncate: int | None = None,
    max_directions: int = 64,
    chunk: int | None = None,
    compile: bool = False,
    tangents: Mapping[str, Tensor] | None = None,
    checkpoint_every: int = 1,
) -> HypergradResult:
    """Run K = len(batches) inner steps from (params, state, buffers) and differentiate the
    objective with respect to ``problem.hypers.raw`` by ``method`` (see module docstring).

    ``chunk`` (forward mode only): how many tangent directions are propagated together in one
    vectorized pass (one batched Hessian-vector product per step); ``None`` (default) all of
    them, the fastest; smaller chunks hold less memory (each chunk keeps its own tangents and
    recomputes the primal step), and ``chunk=1`` is one direction at a time. The result does
    not depend on it (up to float rounding).

    ``compile`` (forward mode only): run each forward-mode step (``vmap`` over ``jvp`` of the
    whole step) through ``torch.compile``. On small models, where the per-operation cost
    dominates, a step is several times faster than the eager one once compiled (the MNIST-1D
    MLP of ``experiments/bench_engine.py``: 2.2x for one direction, 4.4x for eight); the
    first call compiles (tens of seconds on a CPU), and a new
    batch shape, model or optimizer compiles again. Dropout draws the same masks as without
    it; the results agree with the eager ones up to float rounding (fused kernels).

    ``checkpoint_every`` (checkpointed only): how many steps a segment holds. The forward
    pass keeps the start point of each segment; the backward pass recomputes one segment at a
    time and takes one vector-Jacobian product through it. 1 (default) keeps K parameter
    copies and one step's activations; s keeps about K/s copies and s steps' activations and
    pays the fixed cost of a backward call and of the hyperparameter values once per segment
    instead of once per step (faster on small models). The result does not depend on it.

    ``tangents`` (forward mode only): start from the tangents that an earlier call returned
    (:attr:`HypergradResult.tangents`) instead of zeros. The result then differentiates
    through every step since the tangents were last zero (real-time recurrent learning
    carried across unrolls, RTHO), treating earlier hyperparameter updates as if the current
    values had held all along; memory does not grow with the horizon.

    Scheduled hyperparameters are read at the training step given by the inner optimizer's
    step count (``state["step"]``) plus the step's index in ``batches``."""
    if method not in METHODS:
        raise ValueError(f"method: unknown {method!r}; choose one of {list(METHODS)}")
    if chunk is not None and (isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1):
        raise ValueError(f"chunk must be an integer >= 1 or None, got {chunk!r}")
    if (
        isinstance(checkpoint_every, bool)
        or not isinstance(checkpoint_every, int)
        or checkpoint_every < 1
    ):
        raise ValueError(f"checkpoint_every must be an integer >= 1, got {checkpoint_every!r}")
    if checkpoint_every != 1 and method != "checkpointed":
        raise ValueError(
            f"checkpoint_every: only the checkpointed method has segments, got method {method!r}"
        )
    if compile and method != "forward":
        raise ValueError(f"compile: only forward mode steps are compiled, got method {method!r}")
    if compile and problem.hypers.scheduled:
        raise ValueError(
            "compile: scheduled hyperparameters are not supported (a new schedule position "
            "would compile a new step)"
        )
    if tangents is not None and method != "forward":
        raise ValueError(f"tangents: only forward mode carries tangents, got method {method!r}")
    if method == "greedy" and len(batches) != 1:
        raise ValueError(f"greedy differentiates one step: K must be 1, got K={len(batches)}")
    u = _Unroll(problem, dict(params), dict(state), dict(buffers), batches, objective)
    with _unrolling(problem):
        if method == "forward":
            options = _ForwardOptions(max_directions, chunk, compile, tangents)
            return _forward(u, truncate, options)
        if method == "checkpointed":
            return _checkpointed(u, truncate, checkpoint_every)
        return _reverse(u, None if method == "greedy" else truncate)


@contextmanager
def _unrolling(problem: InnerProblem):
    """Train mode once for a whole unroll (the previous mode back at the end), so that the
    inner steps skip their per-step mode switch; the eval-mode objective switches for itself.
    Also refreshes whether the model has tied weights."""
    problem.tie_weights(refresh=True)
    with _mode(problem.model, training=True):
        token = _TRAIN_HELD.set(problem.model)
        try:
            yield
        finally:
            _TRAIN_HELD.reset(token)


def unroll(
    problem: InnerProblem,
    params: Mapping[str, Tensor],
    state: Mapping[str, Tensor],
    buffers: Mapping[str, Tensor],
    batches: Sequence[Batch],
) -> tuple[Params, Params, Params, Tensor]:
    """K = len(batches) plain inner steps, no hypergradient: (params, state, buffers, the (K,)
    inner data losses), all detached.

    The same arithmetic as the steps of :func:`hypergradient` with the hyperparameters held
    at their current values, at the cost of plain training (no graph is recorded): the plain
    horizons of amortized tuning (:class:`~gradhpo.hyper.tuner.HyperTuner` ``every``).
    """
    _check_horizon(batches, None)
    values_at = problem.hypers.values_by_step(
        {k: v.detach() for k, v in problem.hypers.raw.items()}
    )
    first = _first_step(problem, state)
    params, state, buffers = _detach(params), _detach(state), _detach(buffers)
    losses: list[Tensor] = []
    with _unrolling(problem), torch.no_grad():
        for k, batch in enumerate(batches):
            values = values_at(_step_at(first, k))
            params, state, buffers, loss = _step(problem, params, state, buffers, values, batch)
            losses.append(loss)
    return params, state, buffers, torch.stack(losses)
