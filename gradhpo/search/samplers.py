"""Optuna samplers and pruners chosen by name, and the sampler state that survives a restart.

``make_sampler({"name": "tpe", "n_startup_trials": 5}, space, seed=0)`` builds Optuna's
sampler; extra keys are passed to its constructor and checked against its signature, so a
typo is a :class:`~gradhpo.config.ConfigError` naming ``search.sampler.<key>``. Any
``optuna.samplers.BaseSampler`` object is accepted as is (Python API).

Why the sampler state is saved: a study in SQLite keeps every trial, but not the sampler's
random generator. A restarted Optuna process builds a new sampler from the same seed and
draws the same "random" start-up points again (optuna issue #3255). We save the state of
every ``numpy.random.RandomState`` the sampler holds (found by walking its attributes, through
Optuna's ``LazyRandomState``) as JSON after each new trial is asked (a study directory keeps
it in ``sampler_state.bin``, two checksummed slots written in turn; the helpers below write
one JSON file), and restore it on resume:
the resumed study proposes exactly what the uninterrupted one would have. JSON, not pickle, so
loading a run directory never executes code from it.
"""

from __future__ import annotations

import base64
import inspect
import json
import os
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import optuna
from optuna.samplers._lazy_random_state import LazyRandomState

from gradhpo.config import ConfigError
from gradhpo.files import atomic_write
from gradhpo.search.evolution import RegularizedEvolutionSampler
from gradhpo.search.space import SearchSpace

__all__ = [
    "SAMPLERS",
    "PRUNERS",
    "grid_of",
    "make_sampler",
    "make_pruner",
    "sampler_rng_states",
    "restore_sampler_rng_states",
    "reseed_sampler",
    "save_sampler_state",
    "load_sampler_state",
]

_B64 = "b64:"

#: Sampler names accepted in ``search.sampler``.
SAMPLERS: dict[str, type[optuna.samplers.BaseSampler]] = {
    "random": optuna.samplers.RandomSampler,
    "grid": optuna.samplers.GridSampler,
    "tpe": optuna.samplers.TPESampler,
    "cmaes": optuna.samplers.CmaEsSampler,
    "gp": optuna.samplers.GPSampler,
    "nsga2": optuna.samplers.NSGAIISampler,
    "qmc": optuna.samplers.QMCSampler,
    "bruteforce": optuna.samplers.BruteForceSampler,
    "evolution": RegularizedEvolutionSampler,
}
#: Pruner names accepted in ``search.pruner`` ("asha" is Optuna's asynchronous successive
#: halving; "hyperband" with the TPE sampler gives BOHB-style search).
PRUNERS: dict[str, type[optuna.pruners.BasePruner]] = {
    "none": optuna.pruners.NopPruner,
    "median": optuna.pruners.MedianPruner,
    "percentile": optuna.pruners.PercentilePruner,
    "sha": optuna.pruners.SuccessiveHalvingPruner,
    "asha": optuna.pruners.SuccessiveHalvingPruner,
    "hyperband": optuna.pruners.HyperbandPruner,
    "threshold": optuna.pruners.ThresholdPruner,
    "patient": optuna.pruners.PatientPruner,
}


def _name_and_kwargs(field: str, spec: Any, known: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    if isinstance(spec, str):
        spec = {"name": spec}
    if not isinstance(spec, Mapping) or "name" not in spec:
        raise ConfigError(f"{field}: expected a name or a mapping with 'name', got {spec!r}")
    name = spec["name"]
    if name not in known:
        raise ConfigError(
            f"{field}.name: unknown {field.split('.')[-1]} {name!r}; choose one of {sorted(known)}"
        )
    return name, {k: v for k, v in spec.items() if k != "name"}


def _construct(field: str, cls: type, kwargs: dict[str, Any]) -> Any:
    params = inspect.signature(cls).parameters
    if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        unknown = sorted(set(kwargs) - set(params))
        if unknown:
            allowed = sorted(k for k, p in params.items() if p.kind is not p.VAR_POSITIONAL)
            raise ConfigError(
                f"{field}: unknown key(s) {unknown} for {cls.__name__}; allowed: {allowed}"
            )
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise ConfigError(
            f"{field}: {cls.__name__}({kwargs}) rejected its arguments: {exc}"
        ) from exc


def make_sampler(
    spec: str | Mapping[str, Any] | optuna.samplers.BaseSampler,
    space: SearchSpace | None = None,
    *,
    seed: int | None = None,
) -> optuna.samplers.BaseSampler:
    """Build a sampler from its name (and constructor arguments), seeded with ``seed``
    unless the spec gives its own ``seed``. The grid sampler takes its grid from ``space``."""
    if isinstance(spec, optuna.samplers.BaseSampler):
        return spec
    name, kwargs = _name_and_kwargs("search.sampler", spec, SAMPLERS)
    cls = SAMPLERS[name]
    if "seed" in inspect.signature(cls).parameters:
        kwargs.setdefault("seed", seed)
    if name == "grid":
        if "search_space" in kwargs:
            raise ConfigError("search.sampler.search_space: the grid comes from search.space")
        kwargs["search_space"] = grid_of(space)
        if not kwargs["search_space"]:
            raise ConfigError("search.sampler: the grid sampler needs a non-empty search.space")
    return _construct("search.sampler", cls, kwargs)


def grid_of(space: SearchSpace | Mapping[str, Any] | None) -> dict[str, list[Any]]:
    """The grid of Optuna's GridSampler from a :class:`SearchSpace`, a ``search.space``
    mapping (``{"optimizer.lr": {"type": "float", ..., "grid": [...]}}``), or a plain grid
    ``{"x": [1, 2, 3], "act": ["relu", "tanh"]}`` (Python API; values: str, int, float, bool
    or None, as Optuna's GridSampler takes)."""
    if space is None:
        return {}
    if isinstance(space, SearchSpace):
        return space.grid()
    if not isinstance(space, Mapping):
        raise ConfigError(
            "search_space: expected a SearchSpace, a search.space mapping or a grid "
            f"{{name: [values]}}, got {space!r}"
        )
    if not any(isinstance(v, (list, tuple)) for v in space.values()):
        return SearchSpace.from_config(space).grid()
    grid: dict[str, list[Any]] = {}
    for key, values in space.items():
        if not isinstance(key, str) or not key:
            raise ConfigError(f"search_space: parameter names must be strings, got {key!r}")
        if not isinstance(values, (list, tuple)):
            raise ConfigError(
                f"search_space.{key}: a grid lists each parameter's values, got {values!r}"
            )
        if not values:
            raise ConfigError(f"search_space.{key}: the grid needs at least one value, got []")
        for value in values:
            if value is not None and not isinstance(value, (str, int, float, bool)):
                raise ConfigError(
                    f"search_space.{key}: grid values must be str, int, float, bool or None, "
                    f"got {value!r}"
                )
            if isinstance(value, float) and value != value:
                raise ConfigError(f"search_space.{key}: grid values cannot be NaN")
        if len(set(map(repr, values))) != len(values):
            raise ConfigError(f"search_space.{key}: the grid repeats a value: {list(values)!r}")
        grid[key] = list(values)
    return grid


def make_pruner(
    spec: str | Mapping[str, Any] | optuna.pruners.BasePruner | None,
    *,
    max_resource: int | None = None,
) -> optuna.pruners.BasePruner:
    """Build a pruner from its name; ``hyperband`` gets ``max_resource`` (epochs) unless given;
    ``patient`` wraps the pruner given as ``wrapped`` (default median)."""
    if spec is None:
        return optuna.pruners.NopPruner()
    if isinstance(spec, optuna.pruners.BasePruner):
        return spec
    name, kwargs = _name_and_kwargs("search.pruner", spec, PRUNERS)
    if name == "hyperband" and max_resource is not None:
        kwargs.setdefault("max_resource", max_resource)
    if name == "patient":
        kwargs["wrapped_pruner"] = make_pruner(
            kwargs.pop("wrapped", "median"), max_resource=max_resource
        )
        kwargs.setdefault("patience", 1)
    return _construct("search.pruner", PRUNERS[name], kwargs)


# ---------------------------------------------------------------------- sampler RNG state
def _random_states(obj: Any, path: str, seen: set[int]) -> Iterator[tuple[str, Any, str]]:
    """Yield ``(path, owner, attribute)`` of every RandomState reachable from a sampler."""
    if id(obj) in seen:
        return
    seen.add(id(obj))
    for attr, value in sorted(vars(obj).items()):
        where = f"{path}.{attr}"
        if isinstance(value, np.random.RandomState):
            yield where, obj, attr
        elif isinstance(value, LazyRandomState):
            value.rng  # noqa: B018 - creates the generator so its state can be saved/restored
            yield from _random_states(value, where, seen)
        elif isinstance(value, (optuna.samplers.BaseSampler,)) or (
            hasattr(value, "__dict__") and type(value).__module__.startswith("optuna.samplers")
        ):
            yield from _random_states(value, where, seen)


def sampler_rng_states(
    sampler: optuna.samplers.BaseSampler, *, compact: bool = False
) -> dict[str, list[Any]]:
    """The state of every ``numpy.random.RandomState`` in ``sampler``, JSON-serializable
    (``compact``: the 624 generator keys as one base64 string instead of a list of ints)."""
    states = {}
    for path, owner, attr in _random_states(sampler, "sampler", set()):
        kind, keys, pos, has_gauss, cached = getattr(owner, attr).get_state()
        packed: Any = (
            _B64 + base64.b64encode(keys.astype("<u4").tobytes()).decode("ascii")
            if compact
            else keys.tolist()
        )
        states[path] = [kind, packed, int(pos), int(has_gauss), float(cached)]
    return states


def _keys(packed: Any) -> np.ndarray:
    if isinstance(packed, str) and packed.startswith(_B64):
        return np.frombuffer(base64.b64decode(packed[len(_B64) :]), dtype="<u4").astype(np.uint32)
    return np.asarray(packed, dtype=np.uint32)


def restore_sampler_rng_states(
    sampler: optuna.samplers.BaseSampler, states: Mapping[str, Any]
) -> None:
    """Inverse of :func:`sampler_rng_states`; the sampler's structure must match."""
    found = {path: (owner, attr) for path, owner, attr in _random_states(sampler, "sampler", set())}
    if set(found) != set(states):
        raise ValueError(
            f"sampler state does not fit this sampler: saved {sorted(states)}, sampler has {sorted(found)}"
        )
    for path, (owner, attr) in found.items():
        kind, keys, pos, has_gauss, cached = states[path]
        getattr(owner, attr).set_state((kind, _keys(keys), pos, has_gauss, cached))


def reseed_sampler(sampler: optuna.samplers.BaseSampler, seed: int) -> None:
    """Reseed every RandomState of ``sampler`` deterministically from ``seed``."""
    for k, (_, owner, attr) in enumerate(_random_states(sampler, "sampler", set())):
        getattr(owner, attr).seed((seed + k) % 2**32)


def save_sampler_state(
    sampler: optuna.samplers.BaseSampler,
    path: str | os.PathLike[str],
    *,
    trial: int | None = None,
) -> None:
    """Write the sampler's RNG states to ``path`` (JSON) atomically: a killed process leaves
    the previous state or this one. Called once per fresh trial, so without fsync (the rename
    alone is what makes it atomic against a kill; an fsync cost more than a trivial trial).
    ``trial``: the number of the trial whose draw the state follows (kept as ``"trial"``), so
    a resume can tell a dead trial that drew from this state from one that drew before it."""
    payload: dict[str, Any] = {
        "sampler": type(sampler).__name__,
        "rng": sampler_rng_states(sampler, compact=True),
    }
    if trial is not None:
        payload["trial"] = int(trial)
    with atomic_write(path, "w", fsync=False) as fh:
        fh.write(json.dumps(payload, separators=(",", ":")))


def load_sampler_state(sampler: optuna.samplers.BaseSampler, path: str | os.PathLike[str]) -> bool:
    """Restore what :func:`save_sampler_state` wrote; ``False`` when there is no saved state,
    it belongs to another kind of sampler, or it is unreadable (a warning; then the sampler
    keeps its fresh seed)."""
    path = Path(path)
    if not path.is_file():
        return False
    try:
        payload = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(payload, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as exc:
        warnings.warn(
            f"unreadable sampler state {str(path)!r} ({exc}); the sampler starts from its seed",
            stacklevel=2,
        )
        return False
    if payload.get("sampler") != type(sampler).__name__:
        return False
    restore_sampler_rng_states(sampler, payload["rng"])
    return True
