"""Exploit and explore steps of Population Based Training (Jaderberg et al. 2017).

Pure functions of (scores, values, random state): the manager calls them, tests check their
statistics. Ranking has one fixed tie-break everywhere: on equal scores the lower member index
ranks higher.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import optuna

from gradhpo.search.samplers import make_sampler
from gradhpo.search.space import Parameter

__all__ = ["rank", "truncation", "tournament", "perturb", "resample", "explore", "sampler_proposal"]


def rank(scores: Sequence[float], maximize: bool = True) -> list[int]:
    """Member indices from best to worst; NaN scores rank last; ties: lower index first."""

    def key(i: int) -> tuple[int, float, int]:
        s = scores[i]
        if s is None or math.isnan(s):
            return (1, 0.0, i)
        return (0, -s if maximize else s, i)

    return sorted(range(len(scores)), key=key)


def truncation(
    scores: Sequence[float], fraction: float, rng: np.random.RandomState, maximize: bool = True
) -> dict[int, int]:
    """Truncation selection: each member of the bottom ``fraction`` copies a member drawn
    uniformly from the top ``fraction``. Returns ``{loser: winner}``."""
    n = len(scores)
    if not 0 < fraction <= 0.5:
        raise ValueError(f"fraction must be in (0, 0.5], got {fraction!r}")
    cut = max(1, int(fraction * n)) if n >= 2 else 0
    order = rank(scores, maximize)
    top, bottom = order[:cut], order[n - cut :]
    return {loser: int(top[rng.randint(len(top))]) for loser in bottom}


def tournament(
    scores: Sequence[float], rng: np.random.RandomState, maximize: bool = True
) -> dict[int, int]:
    """Binary tournament: each member meets one other drawn uniformly; it copies the other
    if the other ranks strictly higher (by :func:`rank`'s order, ties included)."""
    n = len(scores)
    position = {member: pos for pos, member in enumerate(rank(scores, maximize))}
    copies = {}
    for i in range(n):
        if n < 2:
            break
        j = int(rng.randint(n - 1))
        j = j + 1 if j >= i else j
        if position[j] < position[i]:
            copies[i] = j
    return copies


def _bounded(p: Parameter, value: float) -> float | int:
    value = min(max(value, p.low), p.high)
    if p.type == "int":
        step = int(p.step or 1)
        value = int(round((value - p.low) / step)) * step + int(p.low)
        return int(min(max(value, p.low), p.high))
    if p.step is not None:
        value = round((value - p.low) / p.step) * p.step + p.low
        return float(min(max(value, p.low), p.high))
    return float(value)


def resample(p: Parameter, rng: np.random.RandomState) -> Any:
    """A draw from the parameter's prior (uniform, or log-uniform with ``log``)."""
    if p.type == "categorical":
        return p.choices[rng.randint(len(p.choices))]
    if p.log:
        value = math.exp(rng.uniform(math.log(p.low), math.log(p.high)))
    else:
        value = rng.uniform(p.low, p.high)
    if p.type == "int":
        return _bounded(p, value)
    return _bounded(p, value)


def perturb(p: Parameter, value: Any, factors: Sequence[float], rng: np.random.RandomState) -> Any:
    """Multiply a number by a factor drawn from ``factors`` (clipped to the bounds; ints are
    rounded and moved by at least one step when rounding would undo the move); move a
    categorical value to a neighbouring choice in the listed order."""
    if p.type == "categorical":
        i = p.choices.index(value) if value in p.choices else 0
        if len(p.choices) == 1:
            return p.choices[0]
        if i == 0:
            return p.choices[1]
        if i == len(p.choices) - 1:
            return p.choices[i - 1]
        return p.choices[i + (1 if rng.rand() < 0.5 else -1)]
    factor = float(factors[rng.randint(len(factors))])
    new = _bounded(p, value * factor)
    if p.type == "int" and new == value and factor != 1.0:
        new = _bounded(p, value + (int(p.step or 1) if factor > 1 else -int(p.step or 1)))
    return new


def explore(
    parameters: Sequence[Parameter],
    values: Mapping[str, Any],
    rng: np.random.RandomState,
    *,
    factors: Sequence[float] = (0.8, 1.2),
    resample_probability: float = 0.0,
) -> dict[str, Any]:
    """Explore every parameter: resample from the prior with ``resample_probability``,
    otherwise perturb."""
    out = dict(values)
    for p in parameters:
        if rng.rand() < resample_probability:
            out[p.path] = resample(p, rng)
        else:
            out[p.path] = perturb(p, values[p.path], factors, rng)
    return out


def sampler_proposal(
    parameters: Sequence[Parameter],
    history: Sequence[tuple[Mapping[str, Any], float]],
    *,
    maximize: bool,
    seed: int,
    sampler: str = "tpe",
) -> dict[str, Any]:
    """New values proposed by an Optuna sampler fitted on the population's history
    (``(values, score)`` of every member at every evaluation)."""
    study = optuna.create_study(
        direction="maximize" if maximize else "minimize",
        sampler=make_sampler({"name": sampler}, seed=seed),
    )
    dists = {p.path: p.distribution() for p in parameters}
    for values, score in history:
        if score is None or not math.isfinite(score):
            continue
        params = {k: values[k] for k in dists}
        study.add_trial(optuna.trial.create_trial(params=params, distributions=dists, value=score))
    trial = study.ask(dists)
    return dict(trial.params)
