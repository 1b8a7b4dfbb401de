"""A small task whose best learning rate first rises, then falls: for testing PBT.

Minimise ``L(w) = sum_i (a w_i^4 / 4 + b w_i^2 / 2)`` by SGD with Gaussian gradient noise of
standard deviation ``sigma``, starting far from the minimum (``w = w0``). Far out the
curvature ``3 a w^2 + b`` is large, so a large learning rate diverges and only a small one is
safe; as ``w`` shrinks the curvature drops to ``b`` and a large learning rate makes the fastest
progress; near the minimum the gradient noise sets a loss floor proportional to the learning
rate, so the learning rate should fall again. No fixed learning rate is good in all three
phases, which is what PBT's schedule-by-exploitation can find.

:class:`QuarticMember` implements the :class:`~gradhpo.pbt.manager.Member` interface (score =
``-log10(loss)``, higher is better; a diverged member scores NaN).
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from typing import Any

import torch

__all__ = ["QuarticMember", "QuarticFactory"]


class QuarticMember:
    """One SGD run on the noisy quartic (see module docstring); hyperparameter ``optimizer.lr``."""

    def __init__(
        self,
        lr: float,
        *,
        seed: int = 0,
        dim: int = 16,
        a: float = 1.0,
        b: float = 0.05,
        sigma: float = 0.5,
        w0: float = 10.0,
        step_seconds: float = 0.0,
    ) -> None:
        """``step_seconds``: wall-clock time each step takes (a sleep), so fault tests can
        catch a member in the middle of its interval; the results do not depend on it."""
        self.lr = float(lr)
        self.step_seconds = float(step_seconds)
        self.a, self.b, self.sigma = a, b, sigma
        self.w = torch.full((dim,), float(w0), dtype=torch.float64)
        self.generator = torch.Generator().manual_seed(seed)
        self.global_step = 0
        self.diverged = False

    def loss(self) -> float:
        w = self.w
        return float((self.a * w**4 / 4 + self.b * w**2 / 2).sum())

    def step(self, n: int) -> float:
        for _ in range(n):
            if self.diverged:
                return math.nan
            if self.step_seconds:
                time.sleep(self.step_seconds)
            noise = torch.randn(self.w.shape, generator=self.generator, dtype=torch.float64)
            grad = self.a * self.w**3 + self.b * self.w + self.sigma * noise
            self.w = self.w - self.lr * grad
            self.global_step += 1
            if not torch.isfinite(self.w).all() or self.w.abs().max() > 1e6:
                self.diverged = True
        return self.loss()

    def score(self) -> float:
        if self.diverged:
            return math.nan
        return -math.log10(max(self.loss(), 1e-300))

    def state_dict(self) -> dict[str, Any]:
        return {
            "w": self.w.clone(),
            "lr": self.lr,
            "rng": self.generator.get_state(),
            "step": self.global_step,
            "diverged": self.diverged,
        }

    def load_state_dict(self, state: Mapping[str, Any], *, keep_stream: bool = False) -> None:
        self.w = state["w"].clone()
        self.lr = float(state["lr"])
        self.global_step = int(state["step"])
        self.diverged = bool(state["diverged"])
        if not keep_stream:
            self.generator.set_state(state["rng"])

    def apply(self, values: Mapping[str, Any]) -> None:
        for path, value in values.items():
            if path != "optimizer.lr":
                raise ValueError(f"{path}: the quartic task has only optimizer.lr")
            self.lr = float(value)

    @property
    def hyperparameters(self) -> dict[str, float]:
        return {"lr": self.lr}


class QuarticFactory:
    """A picklable member factory (executors ship it to worker processes): member ``i`` gets
    seed ``seed + i`` and the learning rate in ``values["optimizer.lr"]``."""

    def __init__(self, seed: int = 100, **options: Any) -> None:
        self.seed = seed
        self.options = options

    def __call__(self, index: int, values: Mapping[str, Any]) -> QuarticMember:
        return QuarticMember(values["optimizer.lr"], seed=self.seed + index, **self.options)
