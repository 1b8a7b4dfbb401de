"""Multi-layer perceptron ("mlp") over flattened inputs of any shape.

Each hidden layer is linear -> norm -> activation -> dropout; a linear
classifier follows. ``depth=0`` is multinomial logistic regression.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ._common import (
    ACTIVATIONS,
    check_choice,
    check_float,
    check_input_shape,
    check_int,
    check_int_list,
    make_activation,
    make_norm,
    read_config,
)

MLP_NORMS: tuple[str, ...] = ("none", "layer", "batch")
MLP_DEFAULTS: dict[str, Any] = {
    "depth": 2,
    "width": 128,
    "activation": "relu",
    "dropout": 0.0,
    "norm": "none",
}
"""Config knobs of "mlp" and their defaults."""


class MLP(nn.Module):
    """Fully connected classifier; inputs (B, *shape) are flattened to (B, in_features)."""

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        *,
        depth: int = 2,
        width: int | Sequence[int] = 128,
        activation: str = "relu",
        dropout: float = 0.0,
        norm: str = "none",
    ) -> None:
        super().__init__()
        check_int("in_features", in_features, 1)
        check_int("num_classes", num_classes, 1)
        depth = check_int("depth", depth, 0)
        widths = check_int_list("width", width, depth, 1)
        check_choice("activation", activation, tuple(ACTIVATIONS))
        dropout = check_float("dropout", dropout, 0.0, 1.0)
        check_choice("norm", norm, MLP_NORMS)

        self.flatten = nn.Flatten(start_dim=1)
        hidden = []
        features = in_features
        for out_features in widths:
            layers: OrderedDict[str, nn.Module] = OrderedDict(
                linear=nn.Linear(features, out_features),
                norm=make_norm(norm, out_features, dim=0),
                act=make_activation(activation),
            )
            if dropout > 0:
                layers["dropout"] = nn.Dropout(dropout)
            hidden.append(nn.Sequential(layers))
            features = out_features
        self.hidden = nn.Sequential(*hidden)
        self.classifier = nn.Linear(features, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return logits of shape (B, num_classes)."""
        return self.classifier(self.hidden(self.flatten(x)))


def build_mlp(config: Mapping[str, Any], input_shape: tuple[int, ...], num_classes: int) -> MLP:
    """Build an "mlp" for inputs of any shape from a config mapping."""
    settings = read_config(config, MLP_DEFAULTS, "mlp")
    shape = check_input_shape(input_shape, None, "mlp", "with at least one dim")
    return MLP(math.prod(shape), num_classes, **settings)
