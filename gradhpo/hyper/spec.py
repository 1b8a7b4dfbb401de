"""Hyperparameter specifications and their constrained, differentiable raw tensors.

A :class:`HyperSpec` says *what* is tuned (``lr``, ``weight_decay``, ``momentum``, ``beta1``,
``beta2``, ``eps``; loss-side ``l2`` and ``example_weight``), at which granularity (one
``scalar``, one value ``per_tensor``, one ``per_element``; ``per_example`` for example
weights) and through which parametrization. :class:`HyperParameters` turns a list of specs
into unconstrained *raw* leaf tensors and maps them to valid values:

* ``log``: ``value = exp(raw)`` (or, with bounds, ``exp(log low + (log high - log low) *
  sigmoid(raw))``): positive whatever the hypergradient does;
* ``softplus``: ``value = softplus(raw)`` (bounds: ``low + (high - low) * sigmoid(raw)``);
* ``sigmoid``: ``value = low + (high - low) * sigmoid(raw)`` with default bounds (0, 1).

Values are never clamped after the fact: every raw value maps to a valid hyperparameter.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

__all__ = [
    "HYPER_NAMES",
    "OPTIMIZER_HYPERS",
    "LOSS_HYPERS",
    "GRANULARITIES",
    "TRANSFORMS",
    "HyperSpec",
    "HyperParameters",
    "parse_specs",
]

Tensor = torch.Tensor

#: Hyperparameters read by the inner optimizers.
OPTIMIZER_HYPERS = ("lr", "weight_decay", "momentum", "beta1", "beta2", "eps")
#: Hyperparameters of the training loss: an L2 penalty ``0.5 * sum(l2 * w**2)`` and weights
#: on each training example's loss.
LOSS_HYPERS = ("l2", "example_weight")
HYPER_NAMES = OPTIMIZER_HYPERS + LOSS_HYPERS
GRANULARITIES = ("scalar", "per_tensor", "per_element", "per_example")
TRANSFORMS = ("log", "softplus", "sigmoid")

_DEFAULT_TRANSFORM = {
    "lr": "log",
    "weight_decay": "log",
    "eps": "log",
    "l2": "log",
    "example_weight": "log",
    "momentum": "sigmoid",
    "beta1": "sigmoid",
    "beta2": "sigmoid",
}


def _logit(p: float) -> float:
    return math.log(p) - math.log1p(-p)


def _inverse_softplus(v: float) -> float:
    return v + math.log(-math.expm1(-v)) if v < 20 else v


@dataclass(frozen=True)
class HyperSpec:
    """One tuned hyperparameter.

    Args:
        name: one of :data:`HYPER_NAMES`.
        init: initial (constrained) value: a number, or for ``per_tensor``/``per_element`` a
            mapping ``{parameter name: number}`` giving each tensor its own start.
        granularity: ``scalar``, ``per_tensor``, ``per_element``; ``per_example`` (only and
            always for ``example_weight``).
        transform: ``log``, ``softplus`` or ``sigmoid``; default by name (log for lr, wd, eps,
            l2, example weights; sigmoid for momentum and betas).
        low, high: optional bounds of the value (both or none; required open interval for
            ``sigmoid``, default (0, 1)).
    """

    name: str
    init: float | Mapping[str, float]
    granularity: str = "scalar"
    transform: str | None = None
    low: float | None = None
    high: float | None = None

    def __post_init__(self) -> None:
        if self.name not in HYPER_NAMES:
            raise ValueError(
                f"hyperparameter name: unknown {self.name!r}; known: {list(HYPER_NAMES)}"
            )
        if self.granularity not in GRANULARITIES:
            raise ValueError(
                f"{self.name}.granularity: unknown {self.granularity!r}; choose one of {list(GRANULARITIES)}"
            )
        if (self.granularity == "per_example") != (self.name == "example_weight"):
            raise ValueError(
                f"{self.name}.granularity: {self.granularity!r} does not fit; example_weight is "
                "always 'per_example' and only example_weight can be"
            )
        transform = self.transform or _DEFAULT_TRANSFORM[self.name]
        if transform not in TRANSFORMS:
            raise ValueError(
                f"{self.name}.transform: unknown {transform!r}; choose one of {list(TRANSFORMS)}"
            )
        object.__setattr__(self, "transform", transform)
        low, high = self.low, self.high
        if (low is None) != (high is None):
            raise ValueError(
                f"{self.name}: give both bounds or none, got low={low!r}, high={high!r}"
            )
        if transform == "sigmoid" and low is None:
            low, high = 0.0, 1.0
            object.__setattr__(self, "low", low)
            object.__setattr__(self, "high", high)
        if low is not None:
            if not (math.isfinite(low) and math.isfinite(high) and low < high):
                raise ValueError(
                    f"{self.name}: bounds need low < high, got low={low!r}, high={high!r}"
                )
            if transform == "log" and low <= 0:
                raise ValueError(f"{self.name}: log parametrization needs low > 0, got low={low!r}")
        inits = self.init.values() if isinstance(self.init, Mapping) else [self.init]
        if isinstance(self.init, Mapping) and self.granularity not in ("per_tensor", "per_element"):
            raise ValueError(
                f"{self.name}.init: a per-parameter mapping needs granularity per_tensor or "
                f"per_element, got {self.granularity!r}"
            )
        for value in inits:
            self._check_value(value)

    def _check_value(self, value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"{self.name}.init: expected a number, got {value!r}")
        value = float(value)
        if self.low is not None:
            if not self.low < value < self.high:
                raise ValueError(
                    f"{self.name}.init: must lie strictly inside ({self.low}, {self.high}), got {value!r}"
                )
        elif self.transform in ("log", "softplus") and not (value > 0 and math.isfinite(value)):
            raise ValueError(f"{self.name}.init: must be > 0 and finite, got {value!r}")
        return value

    # ------------------------------------------------------------------ transforms
    def to_raw(self, value: float) -> float:
        """Inverse of :meth:`constrain` for one number."""
        value = self._check_value(value)
        if self.low is not None:
            if self.transform == "log":
                u = (math.log(value) - math.log(self.low)) / (
                    math.log(self.high) - math.log(self.low)
                )
            else:
                u = (value - self.low) / (self.high - self.low)
            return _logit(u)
        return math.log(value) if self.transform == "log" else _inverse_softplus(value)

    def constrain(self, raw: Tensor) -> Tensor:
        """Map raw (unconstrained) values to valid hyperparameter values, differentiably."""
        if self.low is not None:
            u = torch.sigmoid(raw)
            if self.transform == "log":
                lo, hi = math.log(self.low), math.log(self.high)
                return torch.exp(lo + (hi - lo) * u)
            return self.low + (self.high - self.low) * u
        return torch.exp(raw) if self.transform == "log" else F.softplus(raw)

    def init_for(self, param_name: str) -> float:
        if isinstance(self.init, Mapping):
            return float(self.init[param_name])
        return float(self.init)


def parse_specs(specs: Sequence[HyperSpec | Mapping[str, Any]]) -> list[HyperSpec]:
    """Accept :class:`HyperSpec` objects or plain mappings (from YAML) and check for repeats."""
    if isinstance(specs, (str, bytes)) or not isinstance(specs, Sequence):
        raise TypeError(f"hypers: expected a list of specs, got {specs!r}")
    parsed: list[HyperSpec] = []
    for i, spec in enumerate(specs):
        if isinstance(spec, Mapping):
            unknown = set(spec) - {"name", "init", "granularity", "transform", "low", "high"}
            if unknown:
                raise ValueError(f"hypers[{i}]: unknown key(s) {sorted(unknown)}")
            if "name" not in spec or "init" not in spec:
                raise ValueError(f"hypers[{i}]: 'name' and 'init' are required, got {dict(spec)!r}")
            spec = HyperSpec(**spec)
        elif not isinstance(spec, HyperSpec):
            raise TypeError(f"hypers[{i}]: expected a HyperSpec or mapping, got {spec!r}")
        parsed.append(spec)
    names = [s.name for s in parsed]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(f"hypers: each hyperparameter may appear once, repeated: {repeated}")
    if not parsed:
        raise ValueError("hypers: at least one hyperparameter spec is required, got []")
    return parsed


class HyperParameters:
    """Raw (unconstrained) leaf tensors for a list of specs over one model's parameters.

    ``raw`` maps keys to leaf tensors with ``requires_grad=True``: ``name`` for a scalar or a
    per-example vector, ``name/param`` for per-tensor (0-d) and per-element (param-shaped)
    values. :meth:`values` maps raw tensors to what optimizers and losses read:
    ``{hyper name: {param name: tensor broadcastable to the param}}``, and for
    ``example_weight`` the vector of weights itself.
    """

    def __init__(
        self,
        specs: Sequence[HyperSpec | Mapping[str, Any]],
        params: Mapping[str, Tensor],
        *,
        num_examples: int | None = None,
    ) -> None:
        self.specs = parse_specs(specs)
        if not params:
            raise ValueError("HyperParameters: the model has no parameters")
        self.param_shapes = {k: tuple(v.shape) for k, v in params.items()}
        first = next(iter(params.values()))
        self.dtype, self.device = first.dtype, first.device
        self.raw: dict[str, Tensor] = {}
        self._keys: dict[str, list[tuple[str, str | None]]] = {}
        for spec in self.specs:
            if isinstance(spec.init, Mapping):
                missing = sorted(set(params) - set(spec.init))
                extra = sorted(set(spec.init) - set(params))
                if missing or extra:
                    raise ValueError(
                        f"{spec.name}.init: per-parameter values must name exactly the model's "
                        f"parameters; missing {missing}, unknown {extra}"
                    )
            keys: list[tuple[str, str | None]] = []
            if spec.granularity == "scalar":
                keys.append((spec.name, None))
                self.raw[spec.name] = self._leaf(spec.to_raw(spec.init_for("")), ())
            elif spec.granularity == "per_example":
                if num_examples is None or num_examples < 1:
                    raise ValueError(
                        f"{spec.name}: per_example granularity needs the number of training "
                        f"examples, got num_examples={num_examples!r}"
                    )
                keys.append((spec.name, None))
                self.raw[spec.name] = self._leaf(spec.to_raw(spec.init_for("")), (num_examples,))
            else:
                for pname, shape in self.param_shapes.items():
                    key = f"{spec.name}/{pname}"
                    keys.append((key, pname))
                    leaf_shape = () if spec.granularity == "per_tensor" else shape
                    self.raw[key] = self._leaf(spec.to_raw(spec.init_for(pname)), leaf_shape)
            self._keys[spec.name] = keys
        self.num_examples = num_examples

    def _leaf(self, value: float, shape: tuple[int, ...]) -> Tensor:
        return torch.full(shape, value, dtype=self.dtype, device=self.device, requires_grad=True)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.specs)

    def spec(self, name: str) -> HyperSpec:
        for s in self.specs:
            if s.name == name:
                return s
        raise KeyError(f"hyperparameter {name!r} is not tuned; tuned: {list(self.names)}")

    def numel(self) -> int:
        """Number of scalar hyperparameters (what forward mode pays for)."""
        return sum(t.numel() for t in self.raw.values())

    def values(self, raw: Mapping[str, Tensor] | None = None) -> dict[str, Any]:
        """Constrained values (differentiable functions of ``raw``, default ``self.raw``)."""
        raw = self.raw if raw is None else raw
        out: dict[str, Any] = {}
        for spec in self.specs:
            keys = self._keys[spec.name]
            if spec.granularity in ("scalar", "per_example"):
                value = spec.constrain(raw[spec.name])
                out[spec.name] = (
                    value
                    if spec.granularity == "per_example"
                    else {p: value for p in self.param_shapes}
                )
            else:
                out[spec.name] = {pname: spec.constrain(raw[key]) for key, pname in keys}
        return out

    @torch.no_grad()
    def summary(self) -> dict[str, float]:
        """Flat ``{key: value}`` of the current values for logging; per-element and
        per-example values are summarized by their mean."""
        result: dict[str, float] = {}
        for spec in self.specs:
            for key, _ in self._keys[spec.name]:
                result[key] = float(spec.constrain(self.raw[key]).mean())
        return result

    @torch.no_grad()
    def set_values(self, values: Mapping[str, float]) -> None:
        """Set constrained values by key (``"lr"``, ``"lr/conv.weight"``...); a scalar name
        also sets every per-tensor/per-element entry of that hyperparameter."""
        updates: dict[str, float] = {}
        for key, value in values.items():
            name = key.split("/", 1)[0]
            spec = self.spec(name)
            targets = (
                [key]
                if key in self.raw
                else [k for k, _ in self._keys[name]]
                if key == name
                else []
            )
            if not targets:
                raise KeyError(f"unknown hyperparameter key {key!r}; known: {sorted(self.raw)}")
            raw_value = spec.to_raw(value)  # validates before anything changes
            updates.update({t: raw_value for t in targets})
        for key, raw_value in updates.items():
            self.raw[key].fill_(raw_value)

    def state_dict(self) -> dict[str, Tensor]:
        return {k: v.detach().clone() for k, v in self.raw.items()}

    @torch.no_grad()
    def load_state_dict(self, state: Mapping[str, Tensor]) -> None:
        if set(state) != set(self.raw):
            raise ValueError(
                f"hyperparameter state keys {sorted(state)} do not match {sorted(self.raw)}"
            )
        for key, value in state.items():
            if value.shape != self.raw[key].shape:
                raise ValueError(
                    f"hyperparameter {key!r}: shape {tuple(value.shape)} != {tuple(self.raw[key].shape)}"
                )
            self.raw[key].copy_(value)
