"""HyperTuner: online hyperparameter tuning while a model trains.

Each :meth:`HyperTuner.step` takes K training batches (and a validation batch), runs K inner
steps from the model's current weights while computing the hypergradient of the objective,
writes the new weights back into the model and takes one step of an outer optimizer on the
*raw* (unconstrained) hyperparameters. Graphs are dropped after every horizon.

Amortized tuning (``every=M``): only every M-th horizon computes a hypergradient and takes a
hyper step; the M - 1 horizons in between run their K inner steps plainly (no graph, the same
inner optimizer arithmetic, hyperparameters held constant), at about the cost of plain
training. The tuner counts ``tuned_steps`` (inner steps taken in hypergradient horizons) and
``total_steps`` (all inner steps applied to the model); ``tuned_fraction`` is their ratio.
The horizons counted are those whose weights were applied (a rolled-back horizon is retried in
the same role), and the counts are part of :meth:`HyperTuner.state_dict`, so a resume
continues the cycle exactly.

Carried forward mode (``carry=True``, method ``forward``): the tangents d(weights)/d(hypers)
are not restarted at every horizon but carried across the whole run (real-time recurrent
hyperparameter optimization, RTHO / OHO): each hyper step's hypergradient accounts for every
earlier step, at a memory cost independent of the run's length. ``carry_decay`` < 1
multiplies the carried tangents by that factor at every horizon (forgetting old steps);
the tangents restart from zero after a rejected step and are part of the state dict.

Scheduled hyperparameters (:class:`~gradhpo.hyper.spec.Schedule`) take their length from
``budget`` when their spec does not give it. Online, a segment gets hypergradients only once
the run reaches it, so with ``warm_segments`` (default) a segment reached for the first time
starts from the current value of the segment before it, and the schedule continues where
tuning has brought it instead of jumping back to ``init``.

Non-finite values are handled, never fatal: if an inner loss, the objective, the new weights
or the hypergradient is NaN/inf, the hyper step is rejected, the weights go back to where the
horizon started and the hyperparameters to their values before the previous hyper update
(the likeliest cause). Rejections are counted (``rejected_steps``,
``consecutive_rejections``) and reported in every :class:`TunerReport`.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from gradhpo.hyper.methods import (
    METHODS,
    Batch,
    InnerProblem,
    LossFn,
    Objective,
    cross_entropy_per_example,
    hypergradient,
    unroll,
)
from gradhpo.hyper.optimizers import InnerOptimizer, resolve_optimizer
from gradhpo.hyper.spec import HyperParameters, HyperSpec

__all__ = ["HyperTuner", "TunerReport", "OBJECTIVES", "HYPER_OPTIMIZERS"]

OBJECTIVES = ("val", "train_mean")
HYPER_OPTIMIZERS = ("adam", "sgd")


@dataclass(frozen=True)
class TunerReport:
    """Outcome of one horizon."""

    accepted: bool
    objective: float
    train_loss: float  # mean inner data loss over the horizon
    last_loss: float  # inner data loss of the horizon's last step
    hypergrad_norm: float  # before clipping; nan when rejected for a non-finite gradient
    values: dict[str, float]  # hyperparameter values after the step (means for per-element)
    steps: int  # inner steps in this horizon
    weights_updated: bool  # False when the horizon was rolled back (non-finite weights/losses)
    # False for a plain horizon of amortized tuning (every > 1): no hypergradient was taken,
    # the hypers did not move; objective and hypergrad_norm are nan.
    tuned: bool = True


@dataclass(frozen=True)
class _Plain:
    """What :meth:`HyperTuner._reject` reads from a plain (untuned) horizon."""

    train_losses: torch.Tensor
    params: Mapping[str, torch.Tensor]
    state: Mapping[str, torch.Tensor]
    buffers: Mapping[str, torch.Tensor]
    objective: float = math.nan


def _check_positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    return value


class HyperTuner:
    """Tune continuous hyperparameters of ``model``'s training by hypergradients.

    Args:
        model: the module being trained; its parameters and buffers are read at the start of
            each horizon and written back at the end.
        hypers: :class:`HyperSpec` objects or mappings (``{"name": "lr", "init": 0.1}``).
        optimizer: inner optimizer name (``sgd``, ``momentum``, ``nesterov``, ``adam``,
            ``adamw``) or an :class:`InnerOptimizer`; ``optimizer_kwargs`` set its constant
            (untuned) hyperparameters.
        method: ``reverse``, ``checkpointed``, ``forward`` or ``greedy`` (forces horizon 1).
        horizon: K, inner steps per hyper step.
        truncate: T <= K, differentiate only the last T steps (reverse, checkpointed).
        hyper_optimizer: ``adam`` or ``sgd`` on the raw hyperparameters, with ``hyper_lr``.
        clip: clip the global norm of the raw hypergradient to this value (None: off).
        objective: ``val`` (validation loss after the horizon, model in eval mode) or
            ``train_mean`` (mean inner training loss).
        num_examples: size of the training set, needed only for ``example_weight``.
        max_directions: forward mode refuses more scalar hyperparameters than this.
        chunk: forward mode: tangent directions propagated together (None: all; 1: one
            ``jvp`` per direction, the least memory); see :func:`hypergradient`.
        compile: forward mode only: each step through ``torch.compile`` (see
            :func:`hypergradient`; the first horizon compiles).
        checkpoint_every: checkpointed only: steps per recomputed segment (1: one step,
            the least memory; larger: fewer backward calls, faster on small models).
        every: M, amortized tuning: a hypergradient on every M-th horizon only (the first,
            then every M-th), plain inner steps in between (see module docstring); 1 tunes
            every horizon.
        loss_fn: per-example loss ``loss_fn(outputs, targets) -> (B,)`` of the training and
            validation objectives (default: cross-entropy over class indices, which refuses
            float targets and single-output models rather than returning 0).
        carry: forward mode only: carry the tangents across horizons (see module docstring).
        carry_decay: factor in (0, 1] applied to the carried tangents at every horizon.
        budget: the training budget in inner steps, the length of schedules that do not
            give their own ``steps``.
        warm_segments: a schedule's segment reached for the first time starts from the
            segment before it (see module docstring); False keeps every segment's own value.
    """

    def __init__(
        self,
        model: nn.Module,
        hypers: Sequence[HyperSpec | Mapping[str, Any]],
        *,
        optimizer: str | InnerOptimizer = "sgd",
        optimizer_kwargs: Mapping[str, Any] | None = None,
        method: str = "reverse",
        horizon: int = 10,
        truncate: int | None = None,
        hyper_optimizer: str = "adam",
        hyper_lr: float = 0.05,
        clip: float | None = None,
        objective: str = "val",
        num_examples: int | None = None,
        max_directions: int = 64,
        chunk: int | None = None,
        compile: bool = False,
        every: int = 1,
        loss_fn: LossFn | None = None,
        checkpoint_every: int = 1,
        carry: bool = False,
        carry_decay: float = 1.0,
        budget: int | None = None,
        warm_segments: bool = True,
    ) -> None:
        if method not in METHODS:
            raise ValueError(f"method: unknown {method!r}; choose one of {list(METHODS)}")
        horizon = _check_positive_int("horizon (K)", horizon)
        if method == "greedy":
            horizon = 1
        if truncate is not None:
            _check_positive_int("truncate (T)", truncate)
            if truncate > horizon:
                raise ValueError(f"truncate (T) must be <= horizon (K={horizon}), got T={truncate}")
            if method == "forward" and truncate != horizon:
                raise ValueError(
                    f"truncate: forward mode differentiates every step, got T={truncate}"
                )
        if objective not in OBJECTIVES:
            raise ValueError(f"objective: unknown {objective!r}; choose one of {list(OBJECTIVES)}")
        if objective == "train_mean" and horizon == 1:
            raise ValueError(
                f"objective 'train_mean' with method {method!r} and horizon 1: the loss of a "
                "horizon's only step is taken before the hypers act, so its hypergradient is "
                "always 0; use objective 'val' or horizon >= 2"
            )
        if hyper_optimizer not in HYPER_OPTIMIZERS:
            raise ValueError(
                f"hyper_optimizer: unknown {hyper_optimizer!r}; choose one of {list(HYPER_OPTIMIZERS)}"
            )
        if isinstance(hyper_lr, bool) or not isinstance(hyper_lr, (int, float)) or not hyper_lr > 0:
            raise ValueError(f"hyper_lr must be a number > 0, got {hyper_lr!r}")
        if clip is not None and (
            isinstance(clip, bool) or not isinstance(clip, (int, float)) or not clip > 0
        ):
            raise ValueError(f"clip must be a number > 0 or None, got {clip!r}")
        if chunk is not None:
            _check_positive_int("chunk", chunk)
        if not isinstance(compile, bool):
            raise ValueError(f"compile must be true or false, got {compile!r}")
        if compile and method != "forward":
            raise ValueError(
                f"compile: only forward mode steps are compiled, got method {method!r}"
            )
        every = _check_positive_int("every (M)", every)
        checkpoint_every = _check_positive_int("checkpoint_every", checkpoint_every)
        if checkpoint_every != 1 and method != "checkpointed":
            raise ValueError(
                "checkpoint_every: only the checkpointed method has segments, "
                f"got method {method!r}"
            )
        if not isinstance(carry, bool):
            raise ValueError(f"carry must be true or false, got {carry!r}")
        if carry and method != "forward":
            raise ValueError(f"carry: only forward mode carries tangents, got method {method!r}")
        if carry and every != 1:
            raise ValueError(
                f"carry: the carried tangents need every horizon differentiated, got every={every}"
            )
        if (
            isinstance(carry_decay, bool)
            or not isinstance(carry_decay, (int, float))
            or not 0 < carry_decay <= 1
        ):
            raise ValueError(f"carry_decay must be a number in (0, 1], got {carry_decay!r}")

        inner = resolve_optimizer(optimizer, optimizer_kwargs)
        params = {n: p.detach() for n, p in model.named_parameters()}
        self.hypers = HyperParameters(hypers, params, num_examples=num_examples, budget=budget)
        unusable = [
            s.name
            for s in self.hypers.specs
            if s.name not in inner.hyper_names and s.name not in ("l2", "example_weight")
        ]
        if unusable:
            raise ValueError(
                f"hypers: {unusable} not used by optimizer {inner.name!r}, which reads {list(inner.hyper_names)}"
            )
        self.model = model
        if loss_fn is not None and not callable(loss_fn):
            raise TypeError(f"loss_fn must be callable(outputs, targets) -> (B,), got {loss_fn!r}")
        self.loss_fn = loss_fn or cross_entropy_per_example
        self.problem = InnerProblem(model, inner, self.hypers, self.loss_fn)
        self.method = method
        self.horizon = horizon
        self.truncate = truncate
        self.objective = objective
        self.clip = clip
        self.max_directions = max_directions
        self.chunk = chunk
        self.compile = compile
        self.every = every
        self.checkpoint_every = checkpoint_every
        self.carry = carry
        self.carry_decay = float(carry_decay)
        self.tangents: dict[str, torch.Tensor] | None = None  # carried forward mode
        if not isinstance(warm_segments, bool):
            raise ValueError(f"warm_segments must be true or false, got {warm_segments!r}")
        self.warm_segments = warm_segments
        # Per scheduled hyperparameter: the highest segment the run has reached.
        self.segments_reached = dict.fromkeys(self.hypers.schedules, 0)
        self.opt_state = inner.init(params)
        raw_leaves = list(self.hypers.raw.values())
        if hyper_optimizer == "adam":
            self.outer: torch.optim.Optimizer = torch.optim.Adam(raw_leaves, lr=hyper_lr)
        else:
            self.outer = torch.optim.SGD(raw_leaves, lr=hyper_lr)
        self._previous_raw = self.hypers.state_dict()
        self.hyper_steps = 0
        self.rejected_steps = 0
        self.consecutive_rejections = 0
        self.horizons = 0  # horizons applied to the model (tuned or plain)
        self.tuned_steps = 0  # inner steps applied in hypergradient horizons
        self.total_steps = 0  # all inner steps applied

    @property
    def tuned_fraction(self) -> float:
        """``tuned_steps / total_steps`` (nan before the first step)."""
        return self.tuned_steps / self.total_steps if self.total_steps else math.nan

    @property
    def next_is_tuned(self) -> bool:
        """Whether the next :meth:`step` computes a hypergradient (amortized tuning)."""
        return self.horizons % self.every == 0

    # ------------------------------------------------------------------ one horizon
    def _objective(self, val_batch: Batch | None) -> Objective:
        if self.objective == "train_mean":
            return Objective.train_mean()
        if val_batch is None:
            raise ValueError("objective 'val' needs a validation batch")
        return Objective.validation(self.model, val_batch[0], val_batch[1], self.loss_fn)

    def step(self, batches: Sequence[Batch], val_batch: Batch | None = None) -> TunerReport:
        """K = len(batches) inner steps and one hyper step (see module docstring); with
        ``every=M`` > 1, only every M-th horizon takes the hyper step, the others are plain."""
        if not 1 <= len(batches) <= self.horizon:
            raise ValueError(f"step: expected 1..{self.horizon} batches, got {len(batches)}")
        params = {n: p.detach() for n, p in self.model.named_parameters()}
        buffers = {n: b.detach() for n, b in self.model.named_buffers()}
        self._reach_segments(len(batches))
        if not self.next_is_tuned:
            return self._plain_step(params, buffers, batches)
        truncate = None if self.truncate is None else min(self.truncate, len(batches))
        result = hypergradient(
            self.method,
            self.problem,
            params,
            self.opt_state,
            buffers,
            batches,
            self._objective(val_batch),
            truncate=truncate,
            max_directions=self.max_directions,
            chunk=self.chunk,
            compile=self.compile,
            tangents=self._carried(),
            checkpoint_every=self.checkpoint_every,
        )
        grads = [result.grads[k] for k in self.hypers.raw]
        grad_norm = torch.linalg.vector_norm(
            torch.stack([torch.linalg.vector_norm(g) for g in grads])
        )
        finite = (
            bool(torch.isfinite(result.train_losses).all())
            and bool(torch.isfinite(result.objective))
            and all(bool(torch.isfinite(v).all()) for v in result.params.values())
        )
        if not finite or not bool(torch.isfinite(grad_norm)):
            return self._reject(result, finite, float(grad_norm), len(batches))

        self._previous_raw = self.hypers.state_dict()
        scale = 1.0
        if self.clip is not None and float(grad_norm) > self.clip:
            scale = self.clip / float(grad_norm)
        for leaf, g in zip(self.hypers.raw.values(), grads, strict=True):
            leaf.grad = g * scale
        self.outer.step()
        self.outer.zero_grad(set_to_none=True)
        self._write_back(result.params, result.buffers)
        self.opt_state = result.state
        if self.carry:
            self.tangents = result.tangents
        self._count(len(batches), tuned=True)
        self.hyper_steps += 1
        self.consecutive_rejections = 0
        return TunerReport(
            accepted=True,
            objective=float(result.objective),
            train_loss=float(result.train_losses.mean()),
            last_loss=float(result.train_losses[-1]),
            hypergrad_norm=float(grad_norm),
            values=self.hypers.summary(),
            steps=len(batches),
            weights_updated=True,
        )

    def advance(self, batches: Sequence[Batch]) -> torch.Tensor:
        """Plain inner steps inside a horizon that the caller will replay with :meth:`step`
        from a state it saved before them (:class:`~gradhpo.run.TrainingRun` does this so a
        horizon does not depend on how its caller slices steps). Applied to the model only
        when every loss and weight is finite; returns the per-step losses either way. Counts
        nothing: the replay counts the whole horizon."""
        if not 1 <= len(batches) < self.horizon:
            raise ValueError(f"advance: expected 1..{self.horizon - 1} batches, got {len(batches)}")
        params = {n: p.detach() for n, p in self.model.named_parameters()}
        buffers = {n: b.detach() for n, b in self.model.named_buffers()}
        self._reach_segments(len(batches))
        new_params, new_state, new_buffers, losses = unroll(
            self.problem, params, self.opt_state, buffers, batches
        )
        if bool(torch.isfinite(losses).all()) and all(
            bool(torch.isfinite(v).all()) for v in new_params.values()
        ):
            self._write_back(new_params, new_buffers)
            self.opt_state = new_state
        return losses

    def _plain_step(
        self,
        params: dict[str, torch.Tensor],
        buffers: dict[str, torch.Tensor],
        batches: Sequence[Batch],
    ) -> TunerReport:
        """A horizon of amortized tuning without hypergradient: K plain inner steps."""
        new_params, new_state, new_buffers, losses = unroll(
            self.problem, params, self.opt_state, buffers, batches
        )
        finite = bool(torch.isfinite(losses).all()) and all(
            bool(torch.isfinite(v).all()) for v in new_params.values()
        )
        if not finite:
            return self._reject(
                _Plain(losses, new_params, new_state, new_buffers),
                False,
                math.nan,
                len(batches),
                tuned=False,
            )
        self._write_back(new_params, new_buffers)
        self.opt_state = new_state
        self._count(len(batches), tuned=False)
        self.consecutive_rejections = 0
        return TunerReport(
            accepted=True,
            objective=math.nan,
            train_loss=float(losses.mean()),
            last_loss=float(losses[-1]),
            hypergrad_norm=math.nan,
            values=self.hypers.summary(),
            steps=len(batches),
            weights_updated=True,
            tuned=False,
        )

    def _count(self, steps: int, tuned: bool) -> None:
        """A horizon of ``steps`` inner steps was applied to the model."""
        self.horizons += 1
        self.total_steps += steps
        if tuned:
            self.tuned_steps += steps

    def _reject(
        self,
        result: Any,
        weights_finite: bool,
        grad_norm: float,
        steps: int,
        tuned: bool = True,
    ) -> TunerReport:
        """Undo: hypers to their values before the last update; weights kept only if finite."""
        self.rejected_steps += 1
        self.consecutive_rejections += 1
        self.hypers.load_state_dict(self._previous_raw)
        self.tangents = None  # carried tangents restart from the rolled-back point
        if weights_finite:
            # The inner steps were fine, only the hypergradient was not: keep the progress.
            self._write_back(result.params, result.buffers)
            self.opt_state = result.state
            self._count(steps, tuned=tuned)
        return TunerReport(
            accepted=False,
            objective=float(result.objective),
            train_loss=float(result.train_losses.mean()),
            last_loss=float(result.train_losses[-1]),
            hypergrad_norm=grad_norm if math.isfinite(grad_norm) else math.nan,
            values=self.hypers.summary(),
            steps=steps,
            weights_updated=weights_finite,
            tuned=tuned,
        )

    @torch.no_grad()
    def _reach_segments(self, steps: int) -> None:
        """Record the schedule segments that the next ``steps`` inner steps read; with
        ``warm_segments``, a newly reached one starts from the segment before it."""
        if not self.segments_reached:
            return
        first = int(self.opt_state["step"])
        for name, schedule in self.hypers.schedules.items():
            top = max(i for t in range(first, first + steps) for i, _ in schedule.weights(t))
            for i in range(self.segments_reached[name] + 1, top + 1):
                if self.warm_segments:
                    for key in self.hypers.keys_of(name):
                        self.hypers.raw[key][i] = self.hypers.raw[key][i - 1]
            self.segments_reached[name] = max(top, self.segments_reached[name])

    def _carried(self) -> dict[str, torch.Tensor] | None:
        """The tangents to start this horizon from (carried forward mode), decayed."""
        if not self.carry or self.tangents is None:
            return None
        if self.carry_decay == 1.0:
            return self.tangents
        return {k: v * self.carry_decay for k, v in self.tangents.items()}

    @torch.no_grad()
    def _write_back(
        self, params: Mapping[str, torch.Tensor], buffers: Mapping[str, torch.Tensor]
    ) -> None:
        for name, p in self.model.named_parameters():
            p.copy_(params[name])
        for name, b in self.model.named_buffers():
            b.copy_(buffers[name])

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {
            "hypers": self.hypers.state_dict(),
            "previous_hypers": {k: v.clone() for k, v in self._previous_raw.items()},
            # Deep copy: torch.optim's state_dict shares its live tensors, and a state dict is
            # expected to be a snapshot (PBT copies them between members in memory).
            "outer": copy.deepcopy(self.outer.state_dict()),
            "inner": {k: v.detach().clone() for k, v in self.opt_state.items()},
            "hyper_steps": self.hyper_steps,
            "rejected_steps": self.rejected_steps,
            "consecutive_rejections": self.consecutive_rejections,
            "horizons": self.horizons,
            "tuned_steps": self.tuned_steps,
            "total_steps": self.total_steps,
            "segments_reached": dict(self.segments_reached),
            "tangents": None
            if self.tangents is None
            else {k: v.detach().clone() for k, v in self.tangents.items()},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.hypers.load_state_dict(state["hypers"])
        self._previous_raw = {k: v.clone() for k, v in state["previous_hypers"].items()}
        self.outer.load_state_dict(state["outer"])
        if set(state["inner"]) != set(self.opt_state):
            raise ValueError("inner optimizer state does not match this tuner's optimizer")
        self.opt_state = {k: v.clone() for k, v in state["inner"].items()}
        self.hyper_steps = int(state["hyper_steps"])
        self.rejected_steps = int(state["rejected_steps"])
        self.consecutive_rejections = int(state["consecutive_rejections"])
        # Absent from state dicts written before amortized tuning existed (every horizon tuned).
        self.horizons = int(state.get("horizons", 0))
        self.tuned_steps = int(state.get("tuned_steps", 0))
        self.total_steps = int(state.get("total_steps", 0))
        self.segments_reached.update(state.get("segments_reached", {}))
        tangents = state.get("tangents")
        self.tangents = None if tangents is None else {k: v.clone() for k, v in tangents.items()}
