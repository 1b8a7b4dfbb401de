"""OnlineHyperTuner: multi-step hypergradient tuning of lr / weight decay / momentum for a
plain training loop.

The drop-in HD optimizers (:mod:`gradhpo.optim.hd`) use the greedy one-step signal of the
training loss. This wrapper is for users who want more: every K steps it differentiates a
*validation* loss through the last K training steps (greedy, truncated reverse, checkpointed
or forward mode from :mod:`gradhpo.hyper`) and takes one step on the hyperparameters.

Usage in an ordinary loop::

    tuner = OnlineHyperTuner(model, val_batches=val_loader, optimizer="sgd", lr=0.01,
                             momentum=0.9, tune=("lr", "weight_decay"), weight_decay=1e-4,
                             method="reverse", horizon=10)
    for x, y in train_loader:
        loss = tuner.step(x, y)          # one training step, applied to `model` at once
    tuner.hyperparameters               # {'lr': ..., 'weight_decay': ..., 'momentum': 0.9}

How it works: steps 1..K-1 of a horizon are applied immediately without a graph (the model is
always current); the start of the horizon (weights, buffers, optimizer state, RNG state) is
kept, and on the K-th call the K steps are recomputed from there by the engine while the
hypergradient is taken. The recomputation replays the same batches and dropout masks, so it
reproduces the trajectory exactly; its cost is one extra forward/backward per step for K > 1
(none for greedy, K = 1). A rejected hyper step (NaN/inf) rolls the weights back to the start
of the horizon, as :class:`~gradhpo.hyper.tuner.HyperTuner` does; ``rejected_steps`` counts it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from gradhpo.hyper.methods import LossFn, inner_step
from gradhpo.hyper.rng import RngState
from gradhpo.hyper.tuner import HyperTuner, TunerReport

__all__ = ["OnlineHyperTuner", "TUNABLE"]

Tensor = torch.Tensor
#: What the online tuner can adapt (the optimizer must read it).
TUNABLE = ("lr", "weight_decay", "momentum")
_DEFAULT_INIT = {"lr": 0.01, "weight_decay": 1e-4, "momentum": 0.9}


class OnlineHyperTuner:
    """Hypergradient tuning of a plain training loop (see the module docstring).

    Args:
        model: the module being trained (updated in place by :meth:`step`).
        val_batches: where validation batches come from: an iterable of ``(x, y)`` (cycled
            when exhausted) or a callable returning one batch.
        optimizer: inner optimizer name: ``sgd``, ``momentum``, ``nesterov``, ``adam``, ``adamw``.
        tune: hyperparameters to adapt, from :data:`TUNABLE`.
        method, horizon, truncate, hyper_lr, hyper_optimizer, clip, loss_fn: as in
            :class:`~gradhpo.hyper.tuner.HyperTuner` (horizon defaults to 1 for greedy, 10
            otherwise).
        **optimizer_kwargs: the optimizer's values (``lr``, ``momentum``, ``weight_decay``,
            ``nesterov``...): starting values of the tuned ones, constants for the rest.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        val_batches: Iterable[Sequence[Tensor]] | Callable[[], Sequence[Tensor]],
        optimizer: str = "sgd",
        tune: Sequence[str] = ("lr",),
        method: str = "greedy",
        horizon: int | None = None,
        truncate: int | None = None,
        hyper_lr: float = 0.02,
        hyper_optimizer: str = "adam",
        clip: float | None = None,
        loss_fn: LossFn | None = None,
        **optimizer_kwargs: Any,
    ) -> None:
        if isinstance(tune, str) or not tune:
            raise ValueError(
                f"tune: expected a non-empty list of names from {TUNABLE}, got {tune!r}"
            )
        unknown = [name for name in tune if name not in TUNABLE]
        if unknown:
            raise ValueError(f"tune: unknown {unknown}; the online tuner adapts {list(TUNABLE)}")
        if callable(val_batches):
            self._next_val: Callable[[], Sequence[Tensor]] = val_batches
        elif isinstance(val_batches, Iterable):
            self._val_source = val_batches
            self._val_iter: Iterator[Sequence[Tensor]] = iter(val_batches)
            self._next_val = self._cycle_val
        else:
            raise TypeError(
                f"val_batches: expected an iterable of (x, y) or a callable, got {val_batches!r}"
            )
        specs = [
            {"name": name, "init": optimizer_kwargs.get(name, _DEFAULT_INIT[name])} for name in tune
        ]
        self.tuner = HyperTuner(
            model,
            specs,
            optimizer=optimizer,
            optimizer_kwargs={k: v for k, v in optimizer_kwargs.items() if k not in tune},
            method=method,
            horizon=horizon if horizon is not None else (1 if method == "greedy" else 10),
            truncate=truncate,
            hyper_optimizer=hyper_optimizer,
            hyper_lr=hyper_lr,
            clip=clip,
            objective="val",
            loss_fn=loss_fn,
        )
        self.model = model
        self._pending: list[tuple[Tensor, Tensor]] = []
        self._start: dict[str, Any] | None = None
        self.last_report: TunerReport | None = None

    def _cycle_val(self) -> Sequence[Tensor]:
        try:
            return next(self._val_iter)
        except StopIteration:
            self._val_iter = iter(self._val_source)
            try:
                return next(self._val_iter)
            except StopIteration:
                raise ValueError("val_batches is empty") from None

    # ------------------------------------------------------------------ training
    @property
    def horizon(self) -> int:
        return self.tuner.horizon

    @property
    def rejected_steps(self) -> int:
        return self.tuner.rejected_steps

    @property
    def hyperparameters(self) -> dict[str, float]:
        """Current values: the tuned ones and the optimizer's constants."""
        constants = {
            k: float(v)
            for k, v in self.tuner.problem.optimizer.defaults.items()
            if k not in self.tuner.hypers.names
        }
        return {**constants, **self.tuner.hypers.summary()}

    def step(self, x: Tensor, y: Tensor) -> float:
        """One training step on ``(x, y)``; every ``horizon``-th call also a hyper step.
        Returns the training loss of this step (``nan`` if the horizon was rolled back)."""
        if not self._pending:
            self._start = {
                "params": {n: p.detach().clone() for n, p in self.model.named_parameters()},
                "buffers": {n: b.detach().clone() for n, b in self.model.named_buffers()},
                "state": dict(self.tuner.opt_state),
                "rng": RngState.capture(x.device),
            }
        self._pending.append((x, y))
        if len(self._pending) < self.horizon:
            return self._plain_step(x, y)
        return self._hyper_step()

    def _plain_step(self, x: Tensor, y: Tensor) -> float:
        params = {n: p.detach() for n, p in self.model.named_parameters()}
        buffers = {n: b.detach() for n, b in self.model.named_buffers()}
        raw = {k: v.detach() for k, v in self.tuner.hypers.raw.items()}
        with torch.no_grad():
            new_params, state, new_buffers, loss = inner_step(
                self.tuner.problem, params, self.tuner.opt_state, buffers, raw, (x, y)
            )
            for name, p in self.model.named_parameters():
                p.copy_(new_params[name])
            for name, b in self.model.named_buffers():
                b.copy_(new_buffers[name])
        self.tuner.opt_state = state
        return float(loss)

    def _hyper_step(self) -> float:
        start = self._start
        assert start is not None
        with torch.no_grad():
            for name, p in self.model.named_parameters():
                p.copy_(start["params"][name])
            for name, b in self.model.named_buffers():
                b.copy_(start["buffers"][name])
        self.tuner.opt_state = start["state"]
        start["rng"].restore()
        batches, self._pending, self._start = self._pending, [], None
        report = self.tuner.step(batches, self._next_val())
        self.last_report = report
        return report.last_loss if report.weights_updated else float("nan")

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """Tuner state (hypers, outer and inner optimizer states, counters). Saved at a
        horizon boundary; mid-horizon the pending batches are not kept (see load)."""
        return {"tuner": self.tuner.state_dict(), "pending_steps": len(self._pending)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore; the model's own weights are restored by the caller (model.load_state_dict).
        A state saved mid-horizon resumes at a horizon boundary (the partial horizon's steps
        are kept in the weights but not used for a hypergradient)."""
        self.tuner.load_state_dict(state["tuner"])
        self._pending, self._start = [], None
