"""A regression toy: your own data set and network given to gradhpo by name, as a user would
(``data: {factory: gradhpo.testing.regression:linear_data}``, ``model: {factory:
gradhpo.testing.regression:two_layer}``, ``training: {loss: mse}``). Tests and the docs use
it; executor workers import it by name like any user module.

The targets are ``y = x @ w + 0.1 * noise`` with ``outputs`` values per example: a linear
model can fit them to the noise level, so a falling validation loss is a real signal.
"""

from __future__ import annotations

import torch
from torch import nn

from gradhpo.data import DataSplits, Split

__all__ = ["linear_data", "two_layer"]


def linear_data(
    n: int = 512, features: int = 8, outputs: int = 1, noise: float = 0.1, seed: int = 0
) -> DataSplits:
    """``n`` examples split 70/15/15 into train/val/test; float targets of shape ``(n,)``
    for one output, ``(n, outputs)`` for several."""
    if n < 20 or features < 1 or outputs < 1:
        raise ValueError(
            f"linear_data: needs n >= 20, features >= 1, outputs >= 1; got {n}, "
            f"{features}, {outputs}"
        )
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, features, generator=gen)
    w = torch.randn(features, outputs, generator=gen) / features**0.5
    y = x @ w + noise * torch.randn(n, outputs, generator=gen)
    if outputs == 1:
        y = y.squeeze(1)
    a, b = int(0.7 * n), int(0.85 * n)
    return DataSplits(
        name=f"linear-{features}x{outputs}",
        train=Split(x[:a], y[:a]),
        val=Split(x[a:b], y[a:b]),
        test=Split(x[b:], y[b:]),
        num_classes=outputs,
        input_shape=(features,),
    )


def two_layer(
    input_shape: tuple[int, ...], num_classes: int, width: int = 16, dropout: float = 0.0
) -> nn.Module:
    """A two-layer tanh network with ``num_classes`` outputs (the number of target values)."""
    (features,) = input_shape
    layers: list[nn.Module] = [nn.Linear(features, width), nn.Tanh()]
    if dropout:
        layers.append(nn.Dropout(dropout))
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)
