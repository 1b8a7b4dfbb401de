"""Hypergradients of an outer objective through K inner training steps.

Every method returns d(objective)/d(raw hyperparameters) for the same unrolled computation

    w_{k+1}, s_{k+1} = update(w_k, grad L_train(w_k, batch_k; lambda), s_k; lambda),  k < K
    objective = a * L_final(w_K) + b * mean_k L_data(w_k, batch_k)

and differ only in how they get it:

* ``reverse``: backpropagation through the whole unroll (memory: K steps of activations);
* ``reverse`` with ``truncate=T``: only the last T steps are differentiated (T = K is full);
* ``checkpointed``: the forward pass keeps only each step's parameters and optimizer state;
  the backward pass recomputes one step at a time and propagates adjoints by vector-Jacobian
  products. Same result as ``reverse`` to float rounding, memory K parameter copies plus one
  step's activations;
* ``forward``: forward-mode (real-time recurrent) differentiation with ``torch.func.jvp``, one
  tangent per scalar hyperparameter; memory independent of K;
* ``greedy``: ``reverse`` over a single step (K = 1), the cheap online signal.

Implicit differentiation at convergence lives in :mod:`gradhpo.hyper.implicit`.

Randomness (dropout) is replayed exactly: the torch RNG state at the start of each inner step
is recorded so that recomputation (checkpointed) and every tangent direction (forward) see the
same masks as the plain forward pass.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad_and_value, jvp

from gradhpo.hyper.implicit import implicit_hypergradient
from gradhpo.hyper.optimizers import InnerOptimizer
from gradhpo.hyper.spec import LOSS_HYPERS, HyperParameters

__all__ = [
    "METHODS",
    "Objective",
    "InnerProblem",
    "HypergradResult",
    "hypergradient",
    "inner_step",
    "implicit_at",
    "cross_entropy_per_example",
    "squared_error_per_example",
]

Tensor = torch.Tensor
Params = dict[str, Tensor]
Batch = Sequence[Tensor]  # (x, y) or (x, y, example_indices)
LossFn = Callable[[Tensor, Tensor], Tensor]  # (outputs, targets) -> per-example losses (B,)

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


def cross_entropy_per_example(outputs: Tensor, targets: Tensor) -> Tensor:
    """The default loss: cross-entropy of logits, one value per example."""
    return F.cross_entropy(outputs, targets, reduction="none")


def squared_error_per_example(outputs: Tensor, targets: Tensor) -> Tensor:
    """``0.5 * ||outputs - targets||^2`` per example (regression)."""
    return 0.5 * (outputs - targets).pow(2).flatten(1).sum(1)


@dataclass
class InnerProblem:
    """The inner training problem: model (used functionally), optimizer, tuned hypers and the
    per-example training loss ``loss_fn(outputs, targets) -> (B,)``."""

    model: nn.Module
    optimizer: InnerOptimizer
    hypers: HyperParameters
    loss_fn: LossFn = cross_entropy_per_example


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


@contextmanager
def _mode(model: nn.Module, training: bool):
    previous = model.training
    model.train(training)
    try:
        yield
    finally:
        model.train(previous)


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
    with _mode(problem.model, training=True):
        logits = functional_call(problem.model, (params, buffers), (x,))
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
) -> tuple[Params, Params, Params, Tensor]:
    """One differentiable training step: (new params, new state, new buffers, data loss).

    Differentiable with respect to ``params``, ``state`` and ``raw``. The inner gradient is
    taken with ``torch.autograd.grad`` (``create_graph`` only where something upstream needs
    it: about 15 % faster than ``torch.func.grad`` here), or with ``torch.func.grad`` when
    ``functional=True``, which the step needs under ``torch.func`` transforms (forward mode).
    """
    values = problem.hypers.values(raw)
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
    grad_dict = {
        k: g if g is not None else torch.zeros_like(v)
        for (k, v), g in zip(leaves.items(), grads, strict=True)
    }
    if not create_graph:
        data_loss = data_loss.detach()
    return grad_dict, data_loss, _detach(new_buffers)


def _get_rng(device: torch.device) -> tuple[Tensor, Tensor | None]:
    """RNG states that dropout draws from on ``device`` (CPU, plus the CUDA device's)."""
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


def _set_rng(device: torch.device, rng: tuple[Tensor, Tensor | None]) -> None:
    torch.set_rng_state(rng[0])
    if rng[1] is not None:
        torch.cuda.set_rng_state(rng[1], device)


def _detach(tensors: Mapping[str, Tensor]) -> Params:
    return {k: v.detach() for k, v in tensors.items()}


def _track(tensors: Mapping[str, Tensor]) -> Params:
    """Detached copies that require grad (floating tensors only)."""
    return {k: v.detach().requires_grad_(v.is_floating_point()) for k, v in tensors.items()}


def _zeros_like(raw: Mapping[str, Tensor]) -> dict[str, Tensor]:
    return {k: torch.zeros_like(v) for k, v in raw.items()}


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
def _reverse(
    problem: InnerProblem,
    params: Params,
    state: Params,
    buffers: Params,
    batches: Sequence[Batch],
    objective: Objective,
    truncate: int | None,
) -> HypergradResult:
    raw = problem.hypers.raw
    k_total = len(batches)
    t = _check_horizon(batches, truncate)
    losses: list[Tensor] = []
    # Untracked prefix of a truncated unroll: hypers act as constants there.
    for batch in batches[: k_total - t]:
        with torch.no_grad():
            const = {k: v.detach() for k, v in raw.items()}
        params, state, buffers, loss = inner_step(problem, params, state, buffers, const, batch)
        params, state, buffers = _detach(params), _detach(state), _detach(buffers)
        losses.append(loss.detach())
    # No need to track the start point: the graph begins where the hypers first act.
    params, state = _detach(params), _detach(state)
    tracked_losses: list[Tensor] = []
    for batch in batches[k_total - t :]:
        params, state, buffers, loss = inner_step(problem, params, state, buffers, raw, batch)
        buffers = _detach(buffers)
        tracked_losses.append(loss)
    obj = _final_loss(objective, params, buffers)
    if objective.train_weight:
        obj = obj + objective.train_weight * (torch.stack(losses + tracked_losses).sum() / k_total)
    keys = list(raw)
    if obj.requires_grad:
        grads = torch.autograd.grad(obj, [raw[k] for k in keys], allow_unused=True)
    else:  # nothing in the objective depends on the hypers (e.g. train_mean over one step)
        grads = (None,) * len(keys)
    with torch.no_grad():
        all_losses = torch.stack([*losses, *(loss.detach() for loss in tracked_losses)])
    return HypergradResult(
        grads={
            k: g if g is not None else torch.zeros_like(raw[k])
            for k, g in zip(keys, grads, strict=True)
        },
        objective=obj.detach(),
        train_losses=all_losses,
        params=_detach(params),
        state=_detach(state),
        buffers=buffers,
    )


# ---------------------------------------------------------------------- checkpointed
def _checkpointed(
    problem: InnerProblem,
    params: Params,
    state: Params,
    buffers: Params,
    batches: Sequence[Batch],
    objective: Objective,
    truncate: int | None,
) -> HypergradResult:
    raw = problem.hypers.raw
    k_total = len(batches)
    t = _check_horizon(batches, truncate)
    with torch.no_grad():
        const = {k: v.detach() for k, v in raw.items()}
    saved: list[tuple[Params, Params, Params, Any]] = []
    losses: list[Tensor] = []
    params, state, buffers = _detach(params), _detach(state), _detach(buffers)
    device = next(iter(params.values())).device
    for i, batch in enumerate(batches):
        if i >= k_total - t:
            saved.append((params, state, buffers, _get_rng(device)))
        with torch.no_grad():
            params, state, buffers, loss = inner_step(problem, params, state, buffers, const, batch)
        losses.append(loss)
    final_params, final_state, final_buffers = params, state, buffers

    tracked = _track(final_params)
    obj = _final_loss(objective, tracked, final_buffers)
    keys = list(raw)
    grads = _zeros_like(raw)
    if obj.requires_grad:
        adj = torch.autograd.grad(
            obj, [*tracked.values(), *(raw[k] for k in keys)], allow_unused=True
        )
        adj_params = {
            n: g if g is not None else torch.zeros_like(v)
            for (n, v), g in zip(tracked.items(), adj, strict=False)
        }
        for k, g in zip(keys, adj[len(tracked) :], strict=True):
            if g is not None:
                grads[k] += g
    else:
        adj_params = {n: torch.zeros_like(v) for n, v in tracked.items()}
    adj_state = {n: torch.zeros_like(v) for n, v in final_state.items() if v.is_floating_point()}
    loss_weight = objective.train_weight / k_total

    rng_after = _get_rng(device)
    for batch, (p_k, s_k, b_k, rng_k) in zip(reversed(batches), reversed(saved), strict=False):
        _set_rng(device, rng_k)
        p_in, s_in = _track(p_k), _track(s_k)
        p_out, s_out, _, loss = inner_step(problem, p_in, s_in, b_k, raw, batch)
        s_out_float = {n: v for n, v in s_out.items() if n in adj_state}
        outputs = [*p_out.values(), *s_out_float.values()]
        cotangents = [*(adj_params[n] for n in p_out), *(adj_state[n] for n in s_out_float)]
        if loss_weight:
            outputs.append(loss)
            cotangents.append(torch.full_like(loss, loss_weight))
        s_in_float = {n: v for n, v in s_in.items() if n in adj_state}
        inputs = [*p_in.values(), *s_in_float.values(), *(raw[k] for k in keys)]
        vjp = torch.autograd.grad(outputs, inputs, cotangents, allow_unused=True)
        n_p, n_s = len(p_in), len(s_in_float)
        adj_params = {
            n: g if g is not None else torch.zeros_like(p_in[n])
            for n, g in zip(p_in, vjp[:n_p], strict=True)
        }
        adj_state = {
            n: g if g is not None else torch.zeros_like(s_in_float[n])
            for n, g in zip(s_in_float, vjp[n_p : n_p + n_s], strict=True)
        }
        for k, g in zip(keys, vjp[n_p + n_s :], strict=True):
            if g is not None:
                grads[k] += g
    _set_rng(device, rng_after)

    with torch.no_grad():
        obj_value = obj.detach()
        if objective.train_weight:
            obj_value = obj_value + objective.train_weight * torch.stack(losses).mean()
    return HypergradResult(
        grads=grads,
        objective=obj_value,
        train_losses=torch.stack(losses).detach(),
        params=final_params,
        state=final_state,
        buffers=final_buffers,
    )


# ---------------------------------------------------------------------- forward mode
def _forward(
    problem: InnerProblem,
    params: Params,
    state: Params,
    buffers: Params,
    batches: Sequence[Batch],
    objective: Objective,
    truncate: int | None,
    max_directions: int,
) -> HypergradResult:
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
    keys = list(hypers.raw)
    raw = {k: v.detach() for k, v in hypers.raw.items()}
    # One-hot tangent of raw per direction (key, flat index).
    directions: list[tuple[str, int]] = [(k, i) for k in keys for i in range(raw[k].numel())]
    raw_tangents = []
    for key, idx in directions:
        tangent = _zeros_like(raw)
        tangent[key].view(-1)[idx] = 1.0
        raw_tangents.append(tangent)

    params, state, buffers = _detach(params), _detach(state), _detach(buffers)
    float_state = [n for n, v in state.items() if v.is_floating_point()]
    tan_p = [{n: torch.zeros_like(v) for n, v in params.items()} for _ in directions]
    tan_s = [{n: torch.zeros_like(state[n]) for n in float_state} for _ in directions]
    loss_tangent_sum = [
        torch.zeros((), dtype=hypers.dtype, device=hypers.device) for _ in directions
    ]
    losses: list[Tensor] = []

    device = next(iter(params.values())).device
    for batch in batches:
        rng = _get_rng(device)
        fixed_state = {n: v for n, v in state.items() if n not in float_state}

        def step(
            p: Params, s: Params, r: Params, _batch=batch, _fixed=fixed_state, _buffers=buffers
        ):
            new_p, new_s, new_b, loss = inner_step(
                problem, p, {**s, **_fixed}, _buffers, r, _batch, functional=True
            )
            return (new_p, {n: new_s[n] for n in float_state}, loss), (new_s, new_b)

        float_s = {n: state[n] for n in float_state}
        new_tp, new_ts = [], []
        for d in range(len(directions)):
            _set_rng(device, rng)
            (p_next, s_next, loss), (dp, ds, dloss), (full_state, new_buffers) = jvp(
                step, (params, float_s, raw), (tan_p[d], tan_s[d], raw_tangents[d]), has_aux=True
            )
            new_tp.append(dp)
            new_ts.append(ds)
            loss_tangent_sum[d] = loss_tangent_sum[d] + dloss
        if not directions:  # pragma: no cover - guarded by parse_specs
            raise ValueError("forward mode needs at least one hyperparameter")
        params, state, buffers = _detach(p_next), _detach(full_state), _detach(new_buffers)
        tan_p, tan_s = new_tp, new_ts
        losses.append(loss.detach())

    tracked = _track(params)
    raw_tracked = _track(raw)
    obj = (
        objective.final_weight * objective.final(tracked, buffers)
        if objective.final is not None and objective.final_weight
        else None
    )
    grads = _zeros_like(raw)
    if obj is not None and obj.requires_grad:
        dobj = torch.autograd.grad(obj, list(tracked.values()), allow_unused=True)
        dobj = {
            n: g if g is not None else torch.zeros_like(v)
            for (n, v), g in zip(tracked.items(), dobj, strict=True)
        }
    else:
        dobj = {n: torch.zeros_like(v) for n, v in params.items()}
    del raw_tracked
    k_total = len(batches)
    for d, (key, idx) in enumerate(directions):
        total = sum((dobj[n] * tan_p[d][n]).sum() for n in params)
        if objective.train_weight:
            total = total + objective.train_weight * loss_tangent_sum[d] / k_total
        grads[key].view(-1)[idx] = total
    with torch.no_grad():
        obj_value = (
            obj.detach()
            if obj is not None
            else torch.zeros((), dtype=hypers.dtype, device=hypers.device)
        )
        if objective.train_weight:
            obj_value = obj_value + objective.train_weight * torch.stack(losses).mean()
    return HypergradResult(
        grads=grads,
        objective=obj_value,
        train_losses=torch.stack(losses),
        params=params,
        state=state,
        buffers=buffers,
    )


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
    if objective.final is None or objective.train_weight:
        raise ValueError(
            "implicit differentiation needs a final objective without a train-mean term"
        )
    _check_horizon(batches, None)
    params, buffers = _detach(params), _detach(buffers)
    losses: list[Tensor] = []

    def train_loss(p: Params, raw: dict[str, Tensor]) -> Tensor:
        values = problem.hypers.values(raw)
        total = 0.0
        losses.clear()
        for batch in batches:
            batch_loss, (data_loss, _) = _training_loss(problem, p, buffers, batch, values)
            total = total + batch_loss
            losses.append(data_loss.detach())
        return total / len(batches)

    def outer_loss(p: Params, raw: dict[str, Tensor]) -> Tensor:
        return objective.final_weight * objective.final(p, buffers)

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
) -> HypergradResult:
    """Run K = len(batches) inner steps from (params, state, buffers) and differentiate the
    objective with respect to ``problem.hypers.raw`` by ``method`` (see module docstring)."""
    if method not in METHODS:
        raise ValueError(f"method: unknown {method!r}; choose one of {list(METHODS)}")
    params, state, buffers = dict(params), dict(state), dict(buffers)
    if method == "greedy":
        if len(batches) != 1:
            raise ValueError(f"greedy differentiates one step: K must be 1, got K={len(batches)}")
        return _reverse(problem, params, state, buffers, batches, objective, None)
    if method == "reverse":
        return _reverse(problem, params, state, buffers, batches, objective, truncate)
    if method == "checkpointed":
        return _checkpointed(problem, params, state, buffers, batches, objective, truncate)
    return _forward(problem, params, state, buffers, batches, objective, truncate, max_directions)
