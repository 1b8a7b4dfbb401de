"""Classifier families for gradhpo experiments, built from plain config mappings.

>>> model = build_model({"name": "cnn", "depth": 3, "pooling": "avg"}, (3, 32, 32), 10)

``config["name"]`` picks the family (one of :data:`MODEL_NAMES`); the other keys
are that family's knobs (see ``CNN_DEFAULTS``, ``RESNET_DEFAULTS`` and
``MLP_DEFAULTS``). Every invalid config raises :class:`ModelConfigError`.

The models avoid in-place activation ops, value-dependent control flow and
``.item()`` so they can run under ``torch.func.functional_call``, ``grad`` and
``vmap``.
"""

from __future__ import annotations

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
"""Values accepted for ``config["name"]``."""


def build_model(
    config: Mapping[str, Any], input_shape: tuple[int, ...], num_classes: int
) -> nn.Module:
    """Build the model described by ``config`` for per-sample ``input_shape`` and ``num_classes``.

    Raises :class:`ModelConfigError` naming the field and bad value for any invalid config.
    """
    if not isinstance(config, Mapping):
        raise ModelConfigError(f"config must be a mapping, got config={config!r}")
    if "name" not in config:
        raise ModelConfigError(
            f"config needs a 'name', one of {MODEL_NAMES}; got config={dict(config)!r}"
        )
    name = config["name"]
    if not isinstance(name, str) or name not in _BUILDERS:
        raise ModelConfigError(f"name must be one of {MODEL_NAMES}, got name={name!r}")
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
]
