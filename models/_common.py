"""Pieces shared by the model families: the config error, validation helpers,
and the activation / normalisation name tables.

Every helper raises :class:`ModelConfigError` with a message that names the
offending field and shows the bad value with ``repr``.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from torch import nn


class ModelConfigError(ValueError):
    """A model config, input shape or class count that cannot build a model."""


ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "relu": nn.ReLU,
    "gelu": nn.GELU,
    "tanh": nn.Tanh,
    "silu": nn.SiLU,
    "elu": nn.ELU,
    "leaky_relu": nn.LeakyReLU,
    "softplus": nn.Softplus,
}
"""Activation name -> factory. None of them works in place."""

_BATCH_NORMS: dict[int, Callable[[int], nn.Module]] = {
    0: nn.BatchNorm1d,
    1: nn.BatchNorm1d,
    2: nn.BatchNorm2d,
}

NORMS: dict[str, Callable[[int, int, int], nn.Module]] = {
    "none": lambda features, dim, groups: nn.Identity(),
    "batch": lambda features, dim, groups: _BATCH_NORMS[dim](features),
    "group": lambda features, dim, groups: nn.GroupNorm(groups, features),
    "layer": lambda features, dim, groups: nn.LayerNorm(features),
}
"""Norm name -> factory(features, spatial_dims, groups). Each family allows a subset."""


def make_activation(name: str) -> nn.Module:
    """Return a fresh activation module for a name already checked against ACTIVATIONS."""
    return ACTIVATIONS[name]()


def make_norm(name: str, features: int, *, dim: int, groups: int = 1) -> nn.Module:
    """Return a normalisation module; ``dim`` is the number of spatial dims (0 for flat features)."""
    return NORMS[name](features, dim, groups)


def check_int(field: str, value: Any, minimum: int) -> int:
    """Check that ``value`` is an int (not a bool) and ``>= minimum``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ModelConfigError(f"{field} must be an int, got {field}={value!r}")
    if value < minimum:
        raise ModelConfigError(f"{field} must be >= {minimum}, got {field}={value!r}")
    return int(value)


def check_float(field: str, value: Any, low: float, high: float) -> float:
    """Check that ``value`` is a real number in the half-open range ``[low, high)``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ModelConfigError(f"{field} must be a number, got {field}={value!r}")
    if not (math.isfinite(value) and low <= value < high):
        raise ModelConfigError(f"{field} must be in [{low}, {high}), got {field}={value!r}")
    return float(value)


def check_choice(field: str, value: Any, choices: Sequence[str]) -> str:
    """Check that ``value`` is one of the allowed strings."""
    if not isinstance(value, str) or value not in choices:
        raise ModelConfigError(f"{field} must be one of {tuple(choices)}, got {field}={value!r}")
    return value


def check_int_list(field: str, value: Any, length: int, minimum: int) -> list[int]:
    """Accept an int (repeated ``length`` times) or a list/tuple of exactly ``length`` ints."""
    if isinstance(value, (list, tuple)):
        if len(value) != length:
            raise ModelConfigError(
                f"{field} list must have length {length}, got {field}={value!r} "
                f"of length {len(value)}"
            )
        for index, item in enumerate(value):
            try:
                check_int(f"{field}[{index}]", item, minimum)
            except ModelConfigError as err:
                raise ModelConfigError(f"{err} (in {field}={value!r})") from None
        return [int(item) for item in value]
    return [check_int(field, value, minimum)] * length


def check_groups_divide(groups: int, widths: Sequence[int]) -> None:
    """Check that GroupNorm's ``groups`` divides every channel width."""
    for width in widths:
        if width % groups != 0:
            raise ModelConfigError(
                f"groups={groups} must divide every layer width, but width={width} "
                f"is not divisible by it (widths {list(widths)})"
            )


def read_config(config: Any, defaults: Mapping[str, Any], family: str) -> dict[str, Any]:
    """Merge ``config`` (minus its ``name``) over ``defaults``; reject unknown keys."""
    if not isinstance(config, Mapping):
        raise ModelConfigError(f"config must be a mapping, got config={config!r}")
    unknown = [key for key in config if key != "name" and key not in defaults]
    if unknown:
        allowed = ["name", *defaults]
        raise ModelConfigError(
            f"unknown config key(s) {', '.join(repr(k) for k in unknown)} for model "
            f"{family!r}; allowed keys: {allowed}"
        )
    return {**defaults, **{key: value for key, value in config.items() if key != "name"}}


def check_input_shape(
    input_shape: Any, rank: int | None, family: str, layout: str
) -> tuple[int, ...]:
    """Check a per-sample input shape of positive ints; ``rank=None`` allows any rank >= 1."""
    if not isinstance(input_shape, Sequence) or isinstance(input_shape, str):
        raise ModelConfigError(
            f"input_shape must be a tuple of ints, got input_shape={input_shape!r}"
        )
    shape = tuple(input_shape)
    bad_rank = len(shape) == 0 if rank is None else len(shape) != rank
    if bad_rank:
        raise ModelConfigError(
            f"model {family!r} needs input_shape {layout}, got input_shape={shape!r}"
        )
    for index, size in enumerate(shape):
        try:
            check_int(f"input_shape[{index}]", size, 1)
        except ModelConfigError as err:
            raise ModelConfigError(f"{err} (in input_shape={shape!r})") from None
    return tuple(int(size) for size in shape)


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of scalar parameters in ``model`` (only those requiring grad if ``trainable_only``)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
