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

A hyperparameter can also be a **schedule** over training (:class:`Schedule`): S segments,
each its own raw scalar (or per-tensor value), piecewise constant or linearly interpolated
between S knots. Its raw tensor has a leading (S,) dimension and its value depends on the
training step (:meth:`HyperParameters.values` ``step=``); linear interpolation mixes the
*constrained* knot values, so every step's value stays valid.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F

__all__ = [
    "HYPER_NAMES",
    "OPTIMIZER_HYPERS",
    "LOSS_HYPERS",
    "GRANULARITIES",
    "TRANSFORMS",
    "INTERPOLATIONS",
    "Schedule",
    "HyperSpec",
    "HyperParameters",
    "parse_specs",
    "split_segment_key",
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
INTERPOLATIONS = ("constant", "linear")

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


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class Schedule:
    """A hyperparameter as a function of the training step: ``segments`` raw values over
    ``steps`` training steps.

    * ``constant``: step t uses segment ``min(t * S // steps, S - 1)`` (equal-length segments);
    * ``linear``: S knots at steps ``i * (steps - 1) / (S - 1)``; between two knots the value
      is interpolated linearly (S = 1 is a constant).

    Steps at or past ``steps`` use the last segment / knot. ``steps`` may be left ``None``
    and filled in from the training budget (``HyperParameters(budget=)``).
    """

    segments: int
    interpolation: str = "constant"
    steps: int | None = None
    field_name: str = "schedule"

    def __post_init__(self) -> None:
        where = self.field_name
        if not _is_int(self.segments) or self.segments < 1:
            raise ValueError(f"{where}.segments: must be an integer >= 1, got {self.segments!r}")
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(
                f"{where}.interpolation: unknown {self.interpolation!r}; choose one of "
                f"{list(INTERPOLATIONS)}"
            )
        if self.steps is not None:
            if not _is_int(self.steps) or self.steps < 1:
                raise ValueError(f"{where}.steps: must be an integer >= 1, got {self.steps!r}")
            if self.segments > self.steps:
                raise ValueError(
                    f"{where}.segments: {self.segments} segments need at least as many training "
                    f"steps, got steps={self.steps}"
                )

    @classmethod
    def parse(cls, value: Schedule | Mapping[str, Any], field_name: str) -> Schedule:
        if isinstance(value, Schedule):
            return value
        if not isinstance(value, Mapping):
            raise TypeError(f"{field_name}: expected a mapping like {{segments: 5}}, got {value!r}")
        unknown = sorted(set(value) - {"segments", "interpolation", "steps"})
        if unknown:
            raise ValueError(
                f"{field_name}: unknown key(s) {unknown}; allowed: segments, interpolation, steps"
            )
        if "segments" not in value:
            raise ValueError(f"{field_name}.segments is required, got {dict(value)!r}")
        return cls(**value, field_name=field_name)

    def with_steps(self, steps: int) -> Schedule:
        return Schedule(self.segments, self.interpolation, steps, self.field_name)

    def weights(self, step: int) -> tuple[tuple[int, float], ...]:
        """The segments (knots) that step ``step`` reads and their weights (sum 1)."""
        if self.steps is None:
            raise ValueError(f"{self.field_name}.steps: not set (give steps or a budget)")
        s, t = self.segments, max(int(step), 0)
        if self.interpolation == "constant" or s == 1:
            return ((min(t * s // self.steps, s - 1), 1.0),)
        last = self.steps - 1
        position = min(t, last) * (s - 1) / last
        i = min(int(position), s - 2)
        frac = position - i
        if frac == 0.0:
            return ((i, 1.0),)
        if frac == 1.0:
            return ((i + 1, 1.0),)
        return ((i, 1.0 - frac), (i + 1, frac))

    def to_config(self) -> dict[str, Any]:
        return {"segments": self.segments, "interpolation": self.interpolation, "steps": self.steps}


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
        schedule: make the hyperparameter a :class:`Schedule` over training (or a mapping
            ``{segments: S, interpolation: constant|linear, steps: T}``); ``scalar`` or
            ``per_tensor`` granularity. Every segment starts at ``init``.
    """

    name: str
    init: float | Mapping[str, float]
    granularity: str = "scalar"
    transform: str | None = None
    low: float | None = None
    high: float | None = None
    schedule: Schedule | Mapping[str, Any] | None = None

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
        if low is not None and high is not None:
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
        if self.schedule is not None:
            schedule = Schedule.parse(self.schedule, f"{self.name}.schedule")
            if self.granularity not in ("scalar", "per_tensor"):
                raise ValueError(
                    f"{self.name}.schedule: needs granularity 'scalar' or 'per_tensor', got "
                    f"{self.granularity!r}"
                )
            object.__setattr__(self, "schedule", schedule)

    def _check_value(self, value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"{self.name}.init: expected a number, got {value!r}")
        value = float(value)
        if self.low is not None and self.high is not None:
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
        if self.low is not None and self.high is not None:
            if self.transform == "log":
                u = (math.log(value) - math.log(self.low)) / (
                    math.log(self.high) - math.log(self.low)
                )
            else:
                u = (value - self.low) / (self.high - self.low)
            return _logit(u)
        return math.log(value) if self.transform == "log" else _inverse_softplus(value)

    def unconstrain(self, value: Tensor) -> Tensor:
        """Inverse of :meth:`constrain`, elementwise on a tensor of valid values; values on
        or past a bound are moved just inside it (a sigmoid never reaches its ends)."""
        if self.low is not None and self.high is not None:
            if self.transform == "log":
                lo, hi = math.log(self.low), math.log(self.high)
                u = (value.log() - lo) / (hi - lo)
            else:
                u = (value - self.low) / (self.high - self.low)
            u = u.clamp(1e-6, 1 - 1e-6)
            return u.log() - (-u).log1p()
        if self.transform == "log":
            return value.log()
        return torch.where(value < 20, value + torch.log(-torch.expm1(-value)), value)

    def constrain(self, raw: Tensor) -> Tensor:
        """Map raw (unconstrained) values to valid hyperparameter values, differentiably."""
        if self.low is not None and self.high is not None:
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


def split_segment_key(key: str) -> tuple[str | None, int | None]:
    """``("lr/conv.weight", 3)`` for a schedule segment's key ``"lr/conv.weight[3]"``,
    ``(key, None)`` for a key without an index, ``(None, None)`` for a malformed index."""
    if not (key.endswith("]") and "[" in key):
        return key, None
    base, _, tail = key[:-1].rpartition("[")
    return (base, int(tail)) if tail.isdigit() else (None, None)


def parse_specs(specs: Sequence[HyperSpec | Mapping[str, Any]]) -> list[HyperSpec]:
    """Accept :class:`HyperSpec` objects or plain mappings (from YAML) and check for repeats."""
    if isinstance(specs, (str, bytes)) or not isinstance(specs, Sequence):
        raise TypeError(f"hypers: expected a list of specs, got {specs!r}")
    parsed: list[HyperSpec] = []
    for i, spec in enumerate(specs):
        if isinstance(spec, Mapping):
            unknown = set(spec) - {
                "name",
                "init",
                "granularity",
                "transform",
                "low",
                "high",
                "schedule",
            }
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
    values; a scheduled hyperparameter's leaves have a leading (S,) segment dimension.
    :meth:`values` maps raw tensors to what optimizers and losses read:
    ``{hyper name: {param name: tensor broadcastable to the param}}``, and for
    ``example_weight`` the vector of weights itself.

    ``budget`` (training steps) fills in the length of schedules that do not give their own ``steps``.
    """

    def __init__(
        self,
        specs: Sequence[HyperSpec | Mapping[str, Any]],
        params: Mapping[str, Tensor],
        *,
        num_examples: int | None = None,
        budget: int | None = None,
    ) -> None:
        specs = parse_specs(specs)
        if budget is not None and (not _is_int(budget) or budget < 1):
            raise ValueError(f"budget: must be an integer >= 1, got {budget!r}")
        self.specs = [self._resolve_schedule(spec, budget) for spec in specs]
        #: The schedule of each scheduled hyperparameter (steps filled in), by name.
        self.schedules = {
            s.name: s.schedule for s in self.specs if isinstance(s.schedule, Schedule)
        }
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
            schedule = self.schedules.get(spec.name)
            segments = () if schedule is None else (schedule.segments,)
            keys: list[tuple[str, str | None]] = []
            if spec.granularity == "scalar":
                keys.append((spec.name, None))
                self.raw[spec.name] = self._leaf(spec.to_raw(spec.init_for("")), segments)
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
                    self.raw[key] = self._leaf(
                        spec.to_raw(spec.init_for(pname)), (*segments, *leaf_shape)
                    )
            self._keys[spec.name] = keys
        self.num_examples = num_examples
        self.scheduled = bool(self.schedules)

    @staticmethod
    def _resolve_schedule(spec: HyperSpec, budget: int | None) -> HyperSpec:
        schedule = spec.schedule  # a Schedule or None once the spec is made
        if not isinstance(schedule, Schedule) or schedule.steps is not None:
            return spec
        if budget is None:
            raise ValueError(
                f"{spec.name}.schedule.steps: unknown; give the schedule's steps or the "
                "training budget in steps (budget=; in a config, from training.epochs)"
            )
        return replace(spec, schedule=schedule.with_steps(budget))

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

    def keys_of(self, name: str) -> list[str]:
        """The keys of :attr:`raw` that hold hyperparameter ``name``."""
        self.spec(name)
        return [key for key, _ in self._keys[name]]

    def numel(self) -> int:
        """Number of scalar hyperparameters (what forward mode pays for)."""
        return sum(t.numel() for t in self.raw.values())

    def position(self, step: int | None) -> tuple[Any, ...]:
        """What distinguishes the values at ``step`` from those at other steps: equal
        positions give equal values (a cache key; ``()`` without schedules)."""
        if not self.scheduled:
            return ()
        if step is None:
            raise ValueError(
                f"scheduled hyperparameters {list(self.schedules)} need "
                "the training step to give their values"
            )
        return tuple(schedule.weights(step) for schedule in self.schedules.values())

    def _constrained(self, spec: HyperSpec, leaf: Tensor, step: int | None) -> Tensor:
        schedule = self.schedules.get(spec.name)
        if schedule is None:
            return spec.constrain(leaf)
        assert step is not None  # values() refuses a missing step (position)
        mix = schedule.weights(step)
        if len(mix) == 1:
            return spec.constrain(leaf[mix[0][0]])
        (i, a), (j, b) = mix
        return a * spec.constrain(leaf[i]) + b * spec.constrain(leaf[j])

    def values(
        self, raw: Mapping[str, Tensor] | None = None, step: int | None = None
    ) -> dict[str, Any]:
        """Constrained values (differentiable functions of ``raw``, default ``self.raw``) at
        training step ``step`` (needed only by scheduled hyperparameters)."""
        raw = self.raw if raw is None else raw
        self.position(step)  # refuses a missing step for schedules
        out: dict[str, Any] = {}
        for spec in self.specs:
            keys = self._keys[spec.name]
            if spec.granularity in ("scalar", "per_example"):
                value = self._constrained(spec, raw[spec.name], step)
                out[spec.name] = (
                    value
                    if spec.granularity == "per_example"
                    else {p: value for p in self.param_shapes}
                )
            else:
                out[spec.name] = {
                    pname: self._constrained(spec, raw[key], step) for key, pname in keys
                }
        return out

    def values_by_step(self, raw: Mapping[str, Tensor] | None = None):
        """``step -> values(raw, step)`` that computes each distinct position once (every
        step of an unroll without schedules shares one set of values and its graph)."""
        cache: dict[tuple[Any, ...], dict[str, Any]] = {}

        def at(step: int | None) -> dict[str, Any]:
            key = self.position(step)
            if key not in cache:
                cache[key] = self.values(raw, step)
            return cache[key]

        return at

    @torch.no_grad()
    def summary(self) -> dict[str, float]:
        """Flat ``{key: value}`` of the current values for logging; per-element and
        per-example values are summarized by their mean; a schedule gives one entry per
        segment (``lr[0]``, ``lr[1]``, ...)."""
        result: dict[str, float] = {}
        for spec in self.specs:
            for key, _ in self._keys[spec.name]:
                value = spec.constrain(self.raw[key])
                schedule = self.schedules.get(spec.name)
                if schedule is None:
                    result[key] = float(value.mean())
                else:
                    for i in range(schedule.segments):
                        result[f"{key}[{i}]"] = float(value[i].mean())
        return result

    @torch.no_grad()
    def current(self, step: int) -> dict[str, float]:
        """``{name: mean value at training step step}`` (what a schedule gives now)."""
        return {
            name: float(torch.stack([v.mean() for v in per.values()]).mean())
            if isinstance(per, Mapping)
            else float(per.mean())
            for name, per in self.values({k: v.detach() for k, v in self.raw.items()}, step).items()
        }

    def _targets(self, key: str) -> tuple[HyperSpec, list[tuple[str, int | None]]]:
        """Raw entries that a summary key names: ``lr``, ``lr/param``, ``lr[3]``,
        ``lr/param[3]`` (a scheduled name without an index sets every segment)."""
        base, index = split_segment_key(key)
        if base is None:
            raise KeyError(f"unknown hyperparameter key {key!r}; known: {sorted(self.raw)}")
        name = base.split("/", 1)[0]
        spec = self.spec(name)
        if base in self.raw:
            entries = [base]
        elif base == name:
            entries = [k for k, _ in self._keys[name]]
        else:
            raise KeyError(f"unknown hyperparameter key {key!r}; known: {sorted(self.raw)}")
        schedule = self.schedules.get(name)
        if index is not None:
            if schedule is None or index >= schedule.segments:
                raise KeyError(
                    f"hyperparameter key {key!r}: {name} has no segment {index}"
                    + ("" if schedule is None else f" (segments: {schedule.segments})")
                )
        return spec, [(entry, index) for entry in entries]

    @torch.no_grad()
    def set_values(self, values: Mapping[str, float]) -> None:
        """Set constrained values by key (``"lr"``, ``"lr/conv.weight"``, ``"lr[2]"`` for a
        schedule's segment...); a scalar name also sets every per-tensor/per-element entry and
        every segment of that hyperparameter."""
        updates: list[tuple[str, int | None, float]] = []
        for key, value in values.items():
            spec, targets = self._targets(key)
            raw_value = spec.to_raw(value)  # validates before anything changes
            updates.extend((entry, index, raw_value) for entry, index in targets)
        for entry, index, raw_value in updates:
            (self.raw[entry] if index is None else self.raw[entry][index]).fill_(raw_value)

    @torch.no_grad()
    def scale_values(self, name: str, factor: float) -> None:
        """Multiply every value of hyperparameter ``name`` by ``factor`` (every per-tensor or
        per-element entry and every schedule segment), keeping their ratios: a learned
        schedule keeps its shape at another level (PBT's explore of a tuned hyper). Bounded
        hypers stay inside their bounds."""
        spec = self.spec(name)
        if isinstance(factor, bool) or not isinstance(factor, (int, float)):
            raise TypeError(f"{name}: scale factor must be a number, got {factor!r}")
        if not (factor > 0 and math.isfinite(factor)):
            raise ValueError(f"{name}: scale factor must be > 0 and finite, got {factor!r}")
        for key in self.keys_of(name):
            raw = self.raw[key]
            if spec.low is None and spec.transform == "log":
                raw.add_(math.log(factor))  # exact in log space
            else:
                raw.copy_(spec.unconstrain(spec.constrain(raw) * factor))

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
