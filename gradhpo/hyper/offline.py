"""Offline long-horizon tuning: every outer step is a whole training run.

Greedy and K-step horizons optimise the validation loss a few steps ahead, which drives the
learning rate down (the short-horizon bias, Wu et al. 2018). :class:`OfflineTuner` instead
differentiates the validation loss *at the end of training* with respect to the
hyperparameters (typically schedules, :class:`~gradhpo.hyper.spec.Schedule`): each
:meth:`OfflineTuner.step` trains the model from the same starting weights for the whole
budget of inner steps with the current hyperparameters, takes the hypergradient of the final
validation loss (forward mode by default: memory independent of the budget; checkpointed
reverse when there are many scalar hyperparameters) and updates the raw hyperparameters.

The outer update is made robust for the long, badly conditioned problem (hypergradients of a
whole run vary over orders of magnitude): ``sign`` steps (the sign of each raw
hypergradient; Micaelli & Storkey 2021), ``normalized`` steps (the global direction of the
hypergradient) or ``adam``, all with a step size that shrinks by ``decay`` every outer step,
and optional norm clipping. A run whose loss or hypergradient is not finite is rejected:
the hyperparameters go back to the last finite ones and the step size is halved.

Hypergradients through a whole run can be chaotic (large, sign-flipping: a long unroll is a
deep, badly conditioned computation), so the last iterate is not always the best: the tuner
remembers the hyperparameters of the run with the lowest validation objective
(:attr:`OfflineTuner.best_objective`); :meth:`OfflineTuner.use_best` loads them.
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

__all__ = ["OfflineTuner", "OfflineReport", "OUTER_UPDATES"]

OUTER_UPDATES = ("sign", "normalized", "adam")

Tensor = torch.Tensor


@dataclass(frozen=True)
class OfflineReport:
    """Outcome of one outer step (one whole training run)."""

    accepted: bool
    objective: float  # validation loss at the end of the run, before the update
    train_loss: float  # mean inner training loss of the run
    hypergrad_norm: float
    step_size: float  # the outer step size used (0 when rejected)
    values: dict[str, float]  # hyperparameter values after the update


def _check_number(name: str, value: Any, low: float, high: float, closed_high: bool) -> float:
    ok = not isinstance(value, bool) and isinstance(value, (int, float))
    if ok:
        ok = low < value < high or (closed_high and value == high)
    if not ok:
        bracket = "]" if closed_high else ")"
        raise ValueError(f"{name} must be a number in ({low}, {high}{bracket}, got {value!r}")
    return float(value)


class OfflineTuner:
    """Tune hyperparameters (schedules) of a whole training run by hypergradient.

    Args:
        model: the module; its current parameters and buffers are the fixed starting point of
            every run (and are not modified).
        hypers: :class:`HyperSpec` objects or mappings; schedules take their length from
            ``budget``.
        budget: inner steps per run (every :meth:`step` gets exactly this many batches).
        optimizer, optimizer_kwargs: the inner optimizer (see :class:`HyperTuner`).
        method: ``forward`` (default), ``checkpointed`` or ``reverse``.
        update: ``sign``, ``normalized`` or ``adam`` (see module docstring).
        outer_lr: the first outer step size (in raw units: log-lr for a log parametrization).
        decay: the step size shrinks by this factor after every accepted step.
        clip: clip the raw hypergradient's global norm (``adam`` only; the other updates do
            not depend on its size).
        loss_fn: per-example loss of training and validation (default cross-entropy).
        chunk: forward mode's tangent directions per vectorized pass.
    """

    def __init__(
        self,
        model: nn.Module,
        hypers: Sequence[HyperSpec | Mapping[str, Any]],
        *,
        budget: int,
        optimizer: str | InnerOptimizer = "sgd",
        optimizer_kwargs: Mapping[str, Any] | None = None,
        method: str = "forward",
        update: str = "sign",
        outer_lr: float = 0.1,
        decay: float = 0.95,
        clip: float | None = None,
        loss_fn: LossFn | None = None,
        chunk: int | None = None,
    ) -> None:
        if method not in METHODS or method == "greedy":
            raise ValueError(
                f"method: {method!r} does not differentiate a whole run; choose forward, "
                "checkpointed or reverse"
            )
        if update not in OUTER_UPDATES:
            raise ValueError(f"update: unknown {update!r}; choose one of {list(OUTER_UPDATES)}")
        if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1:
            raise ValueError(f"budget must be an integer >= 1, got {budget!r}")
        self.outer_lr = _check_number("outer_lr", outer_lr, 0.0, math.inf, False)
        self.decay = _check_number("decay", decay, 0.0, 1.0, True)
        if clip is not None:
            _check_number("clip", clip, 0.0, math.inf, False)
        inner = resolve_optimizer(optimizer, optimizer_kwargs)
        params = {n: p.detach().clone() for n, p in model.named_parameters()}
        self.start = (params, {n: b.detach().clone() for n, b in model.named_buffers()})
        self.hypers = HyperParameters(hypers, params, budget=budget)
        self.model = model
        self.loss_fn = loss_fn or cross_entropy_per_example
        self.problem = InnerProblem(model, inner, self.hypers, self.loss_fn)
        self.budget = budget
        self.method = method
        self.update = update
        self.clip = clip
        self.chunk = chunk
        self.step_size = self.outer_lr
        self.outer_steps = 0
        self.rejected_steps = 0
        self._last_good = self.hypers.state_dict()
        self.best_objective = math.inf
        self._best = self.hypers.state_dict()
        self._adam = (
            torch.optim.Adam(list(self.hypers.raw.values()), lr=outer_lr)
            if update == "adam"
            else None
        )

    def _check_batches(self, batches: Sequence[Batch]) -> None:
        if len(batches) != self.budget:
            raise ValueError(f"step: expected budget={self.budget} batches, got {len(batches)}")

    def step(self, batches: Sequence[Batch], val_batch: Batch) -> OfflineReport:
        """Train from the starting weights on ``batches`` (the whole budget) with the current
        hyperparameters, differentiate the final loss on ``val_batch`` and update them."""
        self._check_batches(batches)
        params, buffers = self.start
        objective = Objective.validation(self.model, val_batch[0], val_batch[1], self.loss_fn)
        result = hypergradient(
            self.method,
            self.problem,
            params,
            self.problem.optimizer.init(params),
            buffers,
            batches,
            objective,
            max_directions=max(64, self.hypers.numel()),
            chunk=self.chunk,
        )
        grads = [result.grads[k] for k in self.hypers.raw]
        norm = float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])))

        def report(accepted: bool, used: float) -> OfflineReport:
            objective, train_loss = float(result.objective), float(result.train_losses.mean())
            return OfflineReport(accepted, objective, train_loss, norm, used, self.hypers.summary())

        if not (math.isfinite(norm) and bool(torch.isfinite(result.objective))):
            self.rejected_steps += 1
            self.hypers.load_state_dict(self._last_good)
            self.step_size /= 2
            return report(False, 0.0)
        self._last_good = self.hypers.state_dict()
        if float(result.objective) < self.best_objective:
            self.best_objective = float(result.objective)
            self._best = self._last_good
        used = self.step_size
        with torch.no_grad():
            if self._adam is not None:
                scale = 1.0 if self.clip is None or norm <= self.clip else self.clip / norm
                for group in self._adam.param_groups:
                    group["lr"] = used
                for leaf, g in zip(self.hypers.raw.values(), grads, strict=True):
                    leaf.grad = g * scale
                self._adam.step()
                self._adam.zero_grad(set_to_none=True)
            else:
                for leaf, g in zip(self.hypers.raw.values(), grads, strict=True):
                    direction = torch.sign(g) if self.update == "sign" else g / max(norm, 1e-30)
                    leaf.sub_(used * direction)
        self.step_size *= self.decay
        self.outer_steps += 1
        return report(True, used)

    def use_best(self) -> dict[str, float]:
        """Load the hyperparameters of the run with the lowest objective so far (those of
        the starting point before any step); returns their summary."""
        self.hypers.load_state_dict(self._best)
        return self.hypers.summary()

    def train(
        self, batches: Sequence[Batch]
    ) -> tuple[dict[str, Tensor], dict[str, Tensor], Tensor]:
        """One plain run from the starting weights with the current hyperparameters (no
        hypergradient): (params, buffers, the per-step training losses)."""
        self._check_batches(batches)
        params, buffers = self.start
        params, _, buffers, losses = unroll(
            self.problem, params, self.problem.optimizer.init(params), buffers, batches
        )
        return params, buffers, losses

    def state_dict(self) -> dict[str, Any]:
        return {
            "hypers": self.hypers.state_dict(),
            "last_good": {k: v.clone() for k, v in self._last_good.items()},
            "step_size": self.step_size,
            "outer_steps": self.outer_steps,
            "rejected_steps": self.rejected_steps,
            "best_objective": self.best_objective,
            "best": {k: v.clone() for k, v in self._best.items()},
            # A snapshot: torch.optim's state_dict shares its live tensors.
            "adam": None if self._adam is None else copy.deepcopy(self._adam.state_dict()),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.hypers.load_state_dict(state["hypers"])
        self._last_good = {k: v.clone() for k, v in state["last_good"].items()}
        self.step_size = float(state["step_size"])
        self.outer_steps = int(state["outer_steps"])
        self.rejected_steps = int(state["rejected_steps"])
        self.best_objective = float(state["best_objective"])
        self._best = {k: v.clone() for k, v in state["best"].items()}
        if self._adam is not None:
            self._adam.load_state_dict(state["adam"])
