"""Classifier families for gradhpo experiments, built from plain config mappings.

>>> model = build_model({"name": "cnn", "depth": 3, "pooling": "avg"}, (3, 32, 32), 10)

``config["name"]`` picks the family (one of :data:`MODEL_NAMES`, or a name given to
:func:`register_model`); the other keys are that family's knobs (see ``CNN_DEFAULTS``,
``RESNET_DEFAULTS`` and ``MLP_DEFAULTS``). Your own network instead of a family:

>>> model = build_model({"factory": "my_pkg.nets:build", "width": 64}, (1, 28, 28), 10)

calls ``my_pkg.nets.build(input_shape=(1, 28, 28), num_classes=10, width=64)``, which
returns an ``nn.Module`` (``num_classes`` is the number of outputs; for regression data the
number of target values per example). Every invalid config raises :class:`ModelConfigError`.

The models avoid in-place activation ops, value-dependent control flow and
``.item()`` so they can run under ``torch.func.functional_call``, ``grad`` and
``vmap``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any

from torch import nn

from ._common import ACTIVATIONS, ModelConfigError, count_parameters
from .cnn import CNN, CNN_DEFAULTS, CNN_HEADS, POOLINGS, L2Pool, build_cnn, build_cnn1d
from .mlp import MLP, MLP_DEFAULTS, build_mlp
from .resnet import RESNET_DEFAULTS, BasicBlock, ResNet, build_resnet

_BUILDERS: dict[str, Callable[[Mapping[str, Any], tuple[int, ...], int], nn.Module]] = {
    "cnn": build_cnn,
    "cnn1d": build_cnn1d,
    "resnet": build_resnet,
    "mlp": build_mlp,
}

MODEL_NAMES: tuple[str, ...] = tuple(_BUILDERS)
"""The built-in families of ``config["name"]``."""

_REGISTERED: dict[str, Callable[..., nn.Module]] = {}


def register_model(name: str, factory: Callable[..., nn.Module], *, replace: bool = False) -> None:
    """Make ``{"name": name, **knobs}`` build ``factory(input_shape=..., num_classes=...,
    **knobs)``. A registry lives in one process: runs on executor workers or resumed in a new
    process need the registration to happen there too (import it in the module that defines the
    network), or use ``{"factory": "package.module:function"}``, which every process imports."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"register_model: name must be a non-empty string, got {name!r}")
    if name in _BUILDERS:
        raise ValueError(f"register_model: {name!r} is a built-in family ({MODEL_NAMES})")
    if not callable(factory):
        raise TypeError(f"register_model: factory must be callable, got {factory!r}")
    if name in _REGISTERED and not replace and _REGISTERED[name] is not factory:
        raise ValueError(f"register_model: {name!r} is already registered (replace=True to change)")
    _REGISTERED[name] = factory


def _import_factory(spec: Any) -> Any:
    """The object named ``"package.module:function"`` (models/ stays independent of the rest
    of gradhpo, so this is its own small importer)."""
    if (
        not isinstance(spec, str)
        or spec.count(":") != 1
        or spec.startswith(":")
        or spec.endswith(":")
    ):
        raise ModelConfigError(f"factory: expected 'package.module:function', got {spec!r}")
    module_name, _, attribute = spec.partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise ModelConfigError(
            f"factory: cannot import module {module_name!r} of {spec!r} ({exc}); is it "
            "installed or on PYTHONPATH?"
        ) from None
    for part in attribute.split("."):
        if not hasattr(obj, part):
            raise ModelConfigError(f"factory: {module_name!r} has no {attribute!r} (from {spec!r})")
        obj = getattr(obj, part)
    return obj


def _from_factory(
    factory: Callable[..., Any],
    label: str,
    knobs: Mapping[str, Any],
    input_shape: tuple[int, ...],
    num_classes: int,
) -> nn.Module:
    try:
        model = factory(input_shape=tuple(input_shape), num_classes=num_classes, **knobs)
    except TypeError as exc:
        raise ModelConfigError(
            f"{label} failed with knobs {dict(knobs)!r}: {exc} (it is called as "
            "factory(input_shape=..., num_classes=..., **knobs))"
        ) from exc
    if not isinstance(model, nn.Module):
        raise ModelConfigError(f"{label} must return an nn.Module, got {type(model).__name__}")
    return model


def build_model(
    config: Mapping[str, Any], input_shape: tuple[int, ...], num_classes: int
) -> nn.Module:
    """Build the model described by ``config`` for per-sample ``input_shape`` and ``num_classes``.

    Raises :class:`ModelConfigError` naming the field and bad value for any invalid config.
    """
    if not isinstance(config, Mapping):
        raise ModelConfigError(f"config must be a mapping, got config={config!r}")
    if "factory" in config:
        if "name" in config:
            raise ModelConfigError(
                f"give 'name' or 'factory', not both; got name={config['name']!r}, "
                f"factory={config['factory']!r}"
            )
        factory = _import_factory(config["factory"])
        if not callable(factory):
            raise ModelConfigError(f"factory={config['factory']!r} is not callable")
        knobs = {k: v for k, v in config.items() if k != "factory"}
        return _from_factory(
            factory, f"factory {config['factory']!r}", knobs, input_shape, num_classes
        )
    if "name" not in config:
        raise ModelConfigError(
            f"config needs a 'name', one of {MODEL_NAMES + tuple(_REGISTERED)}, or a 'factory' "
            f"('package.module:function'); got config={dict(config)!r}"
        )
    name = config["name"]
    if isinstance(name, str) and name in _REGISTERED:
        knobs = {k: v for k, v in config.items() if k != "name"}
        return _from_factory(_REGISTERED[name], f"model {name!r}", knobs, input_shape, num_classes)
    if not isinstance(name, str) or name not in _BUILDERS:
        raise ModelConfigError(
            f"name must be one of {MODEL_NAMES + tuple(_REGISTERED)}, got name={name!r}"
        )
    return _BUILDERS[name](config, input_shape, num_classes)


__all__ = [
    "ACTIVATIONS",
    "BasicBlock",
    "CNN",
    "CNN_DEFAULTS",
    "CNN_HEADS",
    "L2Pool",
    "MLP",
    "MLP_DEFAULTS",
    "MODEL_NAMES",
    "ModelConfigError",
    "POOLINGS",
    "RESNET_DEFAULTS",
    "ResNet",
    "build_model",
    "count_parameters",
    "register_model",
]
