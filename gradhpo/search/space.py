"""Search spaces read from a config's ``search.space`` section.

Each entry maps a dotted path into the run config (``model.depth``, ``optimizer.lr``,
``training.batch_size``, ``tuner.horizon``) to a distribution::

    model.depth:   {type: int, low: 1, high: 3}
    model.width:   {type: int, low: 8, high: 64, log: true, per_layer: model.depth}
    model.pooling: {type: categorical, choices: [max, avg]}
    model.dropout: {type: float, low: 0.0, high: 0.3, when: {model.norm: none}}
    optimizer.lr:  {type: float, low: 0.01, high: 0.2, log: true}   # start value of a tuned lr

* ``per_layer: <int parameter>`` samples one value per layer, as Optuna parameters
  ``model.width.0``, ``model.width.1``, ... that exist only up to the chosen depth, and
  writes the list to the config (``width: [w0, w1]``).
* ``when: {<parameter>: value or [values]}`` samples the parameter only if the other one took
  one of those values (conditional spaces); otherwise the base config's value stays.
* ``grid: [...]`` lists a float parameter's values for the grid sampler (ints and
  categoricals are enumerated by themselves).

Parameters are suggested in the order written, define-by-run, so a parameter may depend only
on parameters above it. Every mistake is a :class:`~gradhpo.config.ConfigError` naming
``search.space.<path>`` and the bad value.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import optuna

from gradhpo.config import ConfigError

__all__ = ["Parameter", "SearchSpace", "SEARCHABLE_SECTIONS"]

#: Run-config sections a search space may write into.
SEARCHABLE_SECTIONS = ("model", "optimizer", "training", "tuner")
_TRAINING_KEYS = ("batch_size", "augment")
_TYPES = ("categorical", "int", "float")
_SPEC_KEYS = ("type", "choices", "low", "high", "step", "log", "when", "per_layer", "grid")
_Scalar = (str, int, float, bool, type(None))


@dataclass(frozen=True)
class Parameter:
    """One searched parameter (see module docstring)."""

    path: str
    type: str
    choices: tuple[Any, ...] = ()
    low: float = 0.0
    high: float = 0.0
    step: float | None = None
    log: bool = False
    when: tuple[tuple[str, tuple[Any, ...]], ...] = ()
    per_layer: str | None = None
    grid: tuple[float, ...] = ()

    @property
    def section(self) -> str:
        return self.path.split(".", 1)[0]

    @property
    def key(self) -> str:
        return self.path.split(".", 1)[1]

    def distribution(self) -> optuna.distributions.BaseDistribution:
        if self.type == "categorical":
            return optuna.distributions.CategoricalDistribution(self.choices)
        if self.type == "int":
            return optuna.distributions.IntDistribution(
                int(self.low), int(self.high), log=self.log, step=int(self.step or 1)
            )
        return optuna.distributions.FloatDistribution(
            self.low, self.high, log=self.log, step=self.step
        )

    def suggest(self, trial: optuna.trial.BaseTrial, name: str) -> Any:
        if self.type == "categorical":
            return trial.suggest_categorical(name, list(self.choices))
        if self.type == "int":
            return trial.suggest_int(
                name, int(self.low), int(self.high), step=int(self.step or 1), log=self.log
            )
        return trial.suggest_float(name, self.low, self.high, step=self.step, log=self.log)

    def values(self) -> list[Any]:
        """The grid of this parameter (all choices / every int / the ``grid`` list)."""
        if self.type == "categorical":
            return list(self.choices)
        if self.type == "int":
            return list(range(int(self.low), int(self.high) + 1, int(self.step or 1)))
        return list(self.grid)

    def corners(self) -> list[Any]:
        """Values that exercise the extremes: every choice, or low and high."""
        if self.type == "categorical":
            return list(self.choices)
        if self.type == "int":
            return sorted({int(self.low), int(self.high)})
        return sorted({self.low, self.high})

    def active(self, params: Mapping[str, Any]) -> bool:
        return all(params.get(other) in allowed for other, allowed in self.when)


def _number(where: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{where}: expected a finite number, got {value!r}")
    return float(value)


def _parse_parameter(
    path: str, spec: Any, earlier: Mapping[str, Parameter], section: str = "search.space"
) -> Parameter:
    where = f"{section}.{path}"
    parts = path.split(".")
    if len(parts) != 2 or not all(parts):
        raise ConfigError(
            f"{where}: expected a path '<section>.<key>' with section in "
            f"{list(SEARCHABLE_SECTIONS)}, got {path!r}"
        )
    section, key = parts
    if section not in SEARCHABLE_SECTIONS:
        raise ConfigError(
            f"{where}: section {section!r} cannot be searched; choose one of {list(SEARCHABLE_SECTIONS)}"
        )
    if section == "training" and key not in _TRAINING_KEYS:
        raise ConfigError(
            f"{where}: training.{key} cannot be searched; allowed: {list(_TRAINING_KEYS)}"
        )
    if not isinstance(spec, Mapping):
        raise ConfigError(
            f"{where}: expected a mapping such as {{type: int, low: 1, high: 4}}, got {spec!r}"
        )
    unknown = sorted(set(spec) - set(_SPEC_KEYS))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; allowed: {list(_SPEC_KEYS)}")
    kind = spec.get("type")
    if kind not in _TYPES:
        raise ConfigError(f"{where}.type: expected one of {list(_TYPES)}, got {kind!r}")
    log = spec.get("log", False)
    if not isinstance(log, bool):
        raise ConfigError(f"{where}.log: expected true or false, got {log!r}")

    fields: dict[str, Any] = {"path": path, "type": kind, "log": log}
    if kind == "categorical":
        for extra in ("low", "high", "step", "log", "grid"):
            if extra in spec:
                raise ConfigError(f"{where}.{extra}: not allowed for a categorical parameter")
        choices = spec.get("choices")
        if not isinstance(choices, list):
            raise ConfigError(f"{where}.choices: expected a list, got {choices!r}")
        if not choices:
            raise ConfigError(f"{where}.choices: expected at least one choice, got []")
        for choice in choices:
            if not isinstance(choice, _Scalar):
                raise ConfigError(
                    f"{where}.choices: each choice must be a string, number, bool or null, got {choice!r}"
                )
        if len({repr(c) for c in choices}) != len(choices):
            raise ConfigError(f"{where}.choices: duplicate choices in {choices!r}")
        fields["choices"] = tuple(choices)
    else:
        if "choices" in spec:
            raise ConfigError(f"{where}.choices: only for type categorical (this is {kind})")
        for bound in ("low", "high"):
            if bound not in spec:
                raise ConfigError(f"{where}.{bound} is required for type {kind}")
        low = _number(f"{where}.low", spec["low"])
        high = _number(f"{where}.high", spec["high"])
        if kind == "int":
            for bound in ("low", "high"):
                if not isinstance(spec[bound], int):
                    raise ConfigError(f"{where}.{bound}: expected an integer, got {spec[bound]!r}")
        if low > high:
            raise ConfigError(
                f"{where}: low must be <= high, got low={spec['low']!r} > high={spec['high']!r}"
            )
        if log and low <= 0:
            raise ConfigError(f"{where}.low: a log-scale range needs low > 0, got {spec['low']!r}")
        step = spec.get("step")
        if step is not None:
            step = _number(f"{where}.step", step)
            if step <= 0 or (kind == "int" and not isinstance(spec["step"], int)):
                raise ConfigError(
                    f"{where}.step: expected a positive {'integer' if kind == 'int' else 'number'}, got {spec['step']!r}"
                )
            if log and (kind == "float" or step != 1):
                raise ConfigError(
                    f"{where}.step: cannot be combined with log: true (got step={spec['step']!r})"
                )
        fields.update(low=low, high=high, step=step)
        grid = spec.get("grid")
        if grid is not None:
            if kind != "float":
                raise ConfigError(f"{where}.grid: only for type float (ints are enumerated)")
            if not isinstance(grid, list) or not grid:
                raise ConfigError(
                    f"{where}.grid: expected a non-empty list of numbers, got {grid!r}"
                )
            values = tuple(_number(f"{where}.grid", g) for g in grid)
            outside = [g for g in values if not low <= g <= high]
            if outside:
                raise ConfigError(f"{where}.grid: values {outside} lie outside [{low}, {high}]")
            fields["grid"] = values

    when = spec.get("when")
    if when is not None:
        if not isinstance(when, Mapping) or not when:
            raise ConfigError(
                f"{where}.when: expected a mapping {{<parameter>: value(s)}}, got {when!r}"
            )
        conditions = []
        for other, allowed in when.items():
            if other not in earlier:
                raise ConfigError(
                    f"{where}.when: {other!r} is not a parameter defined above this one"
                )
            allowed = tuple(allowed) if isinstance(allowed, list) else (allowed,)
            conditions.append((other, allowed))
        fields["when"] = tuple(conditions)

    per_layer = spec.get("per_layer")
    if per_layer is not None:
        count = earlier.get(per_layer)
        if count is None or count.type != "int" or count.per_layer is not None:
            raise ConfigError(
                f"{where}.per_layer: expected an int parameter defined above this one, got {per_layer!r}"
            )
        if count.low < 0:
            raise ConfigError(f"{where}.per_layer: {per_layer} may be negative (low={count.low!r})")
        if section != "model":
            raise ConfigError(f"{where}.per_layer: only model parameters can be per layer")
        fields["per_layer"] = per_layer
    return Parameter(**fields)


class SearchSpace:
    """An ordered collection of :class:`Parameter` built from ``search.space``."""

    def __init__(self, parameters: list[Parameter]) -> None:
        self.parameters = parameters

    @classmethod
    def from_config(cls, space: Any, *, section: str = "search.space") -> SearchSpace:
        """Parse a ``space`` mapping; errors name ``<section>.<path>`` (``pbt.space`` for PBT)."""
        if space is None:
            return cls([])
        if not isinstance(space, Mapping):
            raise ConfigError(f"{section}: expected a mapping of parameters, got {space!r}")
        parsed: dict[str, Parameter] = {}
        for path, spec in space.items():
            if not isinstance(path, str):
                raise ConfigError(f"{section}: parameter names must be strings, got {path!r}")
            parsed[path] = _parse_parameter(path, spec, parsed, section)
        return cls(list(parsed.values()))

    def __len__(self) -> int:
        return len(self.parameters)

    def __iter__(self) -> Iterator[Parameter]:
        return iter(self.parameters)

    # ------------------------------------------------------------------ sampling
    def suggest(self, trial: optuna.trial.BaseTrial) -> dict[str, Any]:
        """Suggest every active parameter (define-by-run); returns ``{path: value}`` with
        per-layer parameters as lists."""
        params: dict[str, Any] = {}
        for p in self.parameters:
            if not p.active(params):
                continue
            if p.per_layer is not None:
                params[p.path] = [
                    p.suggest(trial, f"{p.path}.{i}") for i in range(params[p.per_layer])
                ]
            else:
                params[p.path] = p.suggest(trial, p.path)
        return params

    @staticmethod
    def apply(base: Mapping[str, Any], params: Mapping[str, Any]) -> dict[str, Any]:
        """A deep copy of the run config ``base`` (the YAML shape) with ``params`` written in
        at their dotted paths (``model.depth`` -> ``base["model"]["depth"]``)."""
        config = copy.deepcopy(dict(base))
        for path, value in params.items():
            section, key = path.split(".", 1)
            target = config.get(section)
            target = dict(target) if isinstance(target, Mapping) else {}
            target[key] = value
            config[section] = target
        return config

    def grid(self) -> dict[str, list[Any]]:
        """Search space for Optuna's GridSampler (per-layer parameters up to their maximum)."""
        grid: dict[str, list[Any]] = {}
        by_path = {p.path: p for p in self.parameters}
        for p in self.parameters:
            values = p.values()
            if not values:
                raise ConfigError(
                    f"search.space.{p.path}: the grid sampler needs 'grid: [...]' for a float parameter"
                )
            if p.per_layer is not None:
                for i in range(int(by_path[p.per_layer].high)):
                    grid[f"{p.path}.{i}"] = values
            else:
                grid[p.path] = values
        return grid

    def corner_params(self) -> Iterator[tuple[str, dict[str, Any]]]:
        """Parameter sets for a pre-flight check: a base point (first choice / low of each)
        and that point with each parameter moved to each of its corner values. Yields
        ``(label, params)``; inactive (conditional) parameters are left out."""

        def complete(fixed: Mapping[str, Any]) -> dict[str, Any]:
            params: dict[str, Any] = {}
            for p in self.parameters:
                if not p.active(params):
                    continue
                value = fixed.get(p.path, p.corners()[0])
                if p.per_layer is not None:
                    scalar = value[0] if isinstance(value, list) else value
                    value = [scalar] * int(params[p.per_layer])
                params[p.path] = value
            return params

        yield "base point", complete({})
        for p in self.parameters:
            for value in p.corners():
                yield f"search.space.{p.path}={value!r}", complete({p.path: value})
