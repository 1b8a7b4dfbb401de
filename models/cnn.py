"""Plain convolutional classifiers for 2-D images ("cnn") and 1-D signals ("cnn1d").

One implementation, :class:`CNN`, serves both through its ``dim`` argument.
Each block is conv -> norm -> activation -> downsample; the blocks are followed
by a head: global average pooling (``head="gap"``, the default) or the flattened
last feature map (``head="flatten"``, as in the classic 2-conv Fashion-MNIST
CNNs), then an optional hidden dense layer (``head_width`` units with the
family's activation), dropout and a linear classifier.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ._common import (
    ACTIVATIONS,
    ModelConfigError,
    check_choice,
    check_float,
    check_groups_divide,
    check_input_shape,
    check_int,
    check_int_list,
    make_activation,
    make_norm,
    read_config,
)

POOLINGS: tuple[str, ...] = ("max", "avg", "l2", "stride", "none")
CNN_NORMS: tuple[str, ...] = ("batch", "group", "none")
CNN_HEADS: tuple[str, ...] = ("gap", "flatten")
CNN_DEFAULTS: dict[str, Any] = {
    "depth": 2,
    "width": 32,
    "kernel_size": 3,
    "pooling": "max",
    "norm": "batch",
    "groups": 8,
    "activation": "relu",
    "dropout": 0.0,
    "head": "gap",
    "head_width": 0,
}
"""Config knobs of "cnn" / "cnn1d" and their defaults."""

_CONVS: dict[int, type[nn.Module]] = {1: nn.Conv1d, 2: nn.Conv2d}
_MAX_POOLS: dict[int, type[nn.Module]] = {1: nn.MaxPool1d, 2: nn.MaxPool2d}
_AVG_POOLS: dict[int, type[nn.Module]] = {1: nn.AvgPool1d, 2: nn.AvgPool2d}
_AVG_POOL_FNS = {1: F.avg_pool1d, 2: F.avg_pool2d}
_SHRINKING_POOLINGS = ("max", "avg", "l2")


class L2Pool(nn.Module):
    """Power-2 (L2) pooling, ``sqrt(sum_window x**2 + eps)``, kernel = stride = ``kernel_size``.

    Matches ``nn.LPPool{1,2}d(2, kernel_size)`` up to ``eps``; the ``eps`` inside
    the square root keeps first and second derivatives finite where a whole
    window is zero (``nn.LPPool`` gives NaN/inf gradients there).
    """

    def __init__(self, dim: int, kernel_size: int = 2, eps: float = 1e-8) -> None:
        super().__init__()
        self.dim = dim
        self.kernel_size = kernel_size
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Pool the trailing ``dim`` spatial dimensions of ``x``."""
        window = self.kernel_size**self.dim
        mean_sq = _AVG_POOL_FNS[self.dim](x * x, self.kernel_size)
        return torch.sqrt(mean_sq * window + self.eps)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, kernel_size={self.kernel_size}, eps={self.eps}"


def _block_output_size(size: int, pooling: str) -> int:
    """Spatial size after one block: pools by 2 floor, a stride-2 'same' conv rounds up."""
    if pooling in _SHRINKING_POOLINGS:
        return size // 2
    if pooling == "stride":
        return -(-size // 2)
    return size


def _make_downsample(pooling: str, dim: int) -> nn.Module | None:
    """Return the pooling module for a block, or None for "stride"/"none"."""
    if pooling == "max":
        return _MAX_POOLS[dim](2)
    if pooling == "avg":
        return _AVG_POOLS[dim](2)
    if pooling == "l2":
        return L2Pool(dim, 2)
    return None


class CNN(nn.Module):
    """Conv classifier over inputs of shape (B, C, L) (``dim=1``) or (B, C, H, W) (``dim=2``).

    Knobs are validated here, so a bad argument raises :class:`ModelConfigError`.
    ``input_size`` is the spatial size of the input, ``(L,)`` or ``(H, W)``: ``head="flatten"``
    needs it to size the first dense layer, and when given, a depth that pools a side down to
    zero is rejected here. ``head_width`` > 0 adds a hidden dense layer (with ``activation``)
    between the pooled or flattened features and the classifier, with either head; dropout
    acts just before the classifier.
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        *,
        dim: int = 2,
        depth: int = 2,
        width: int | Sequence[int] = 32,
        kernel_size: int = 3,
        pooling: str = "max",
        norm: str = "batch",
        groups: int = 8,
        activation: str = "relu",
        dropout: float = 0.0,
        head: str = "gap",
        head_width: int = 0,
        input_size: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        if dim not in _CONVS:
            raise ModelConfigError(f"dim must be 1 or 2, got dim={dim!r}")
        check_int("in_channels", in_channels, 1)
        check_int("num_classes", num_classes, 1)
        depth = check_int("depth", depth, 1)
        widths = check_int_list("width", width, depth, 1)
        kernel_size = check_int("kernel_size", kernel_size, 1)
        if kernel_size % 2 == 0:
            raise ModelConfigError(
                f"kernel_size must be odd for 'same' padding, got kernel_size={kernel_size!r}"
            )
        check_choice("pooling", pooling, POOLINGS)
        check_choice("norm", norm, CNN_NORMS)
        groups = check_int("groups", groups, 1)
        if norm == "group":
            check_groups_divide(groups, widths)
        check_choice("activation", activation, tuple(ACTIVATIONS))
        dropout = check_float("dropout", dropout, 0.0, 1.0)
        check_choice("head", head, CNN_HEADS)
        head_width = check_int("head_width", head_width, 0)
        spatial = None if input_size is None else check_int_list("input_size", input_size, dim, 1)
        if spatial is not None:
            check_spatial_size(spatial, depth, pooling, (in_channels, *spatial))
        elif head == "flatten":
            raise ModelConfigError(
                "head='flatten' needs input_size (the input's spatial size), got input_size=None"
            )

        self.dim = dim
        self.pooling = pooling
        self.head = head
        stride = 2 if pooling == "stride" else 1
        blocks = []
        channels = in_channels
        for out_channels in widths:
            layers: OrderedDict[str, nn.Module] = OrderedDict(
                conv=_CONVS[dim](
                    channels,
                    out_channels,
                    kernel_size,
                    stride=stride,
                    padding=kernel_size // 2,
                    bias=norm != "batch",
                ),
                norm=make_norm(norm, out_channels, dim=dim, groups=groups),
                act=make_activation(activation),
            )
            downsample = _make_downsample(pooling, dim)
            if downsample is not None:
                layers["pool"] = downsample
            blocks.append(nn.Sequential(layers))
            channels = out_channels
        self.features = nn.Sequential(*blocks)
        features = channels
        if head == "flatten" and spatial is not None:  # input_size is required for "flatten"
            for _ in widths:
                spatial = [_block_output_size(size, pooling) for size in spatial]
            features = channels * math.prod(spatial)
        self.hidden: nn.Module = nn.Identity()
        if head_width > 0:
            self.hidden = nn.Sequential(
                OrderedDict(linear=nn.Linear(features, head_width), act=make_activation(activation))
            )
            features = head_width
        self.dropout: nn.Module = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.classifier = nn.Linear(features, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return logits of shape (B, num_classes)."""
        h = self.features(x)
        if self.head == "flatten":  # a config string, fixed at build time, not a tensor value
            h = h.flatten(1)
        else:
            h = h.flatten(2).mean(dim=-1)  # global average pooling
        return self.classifier(self.dropout(self.hidden(h)))


def check_spatial_size(
    spatial: Sequence[int], depth: int, pooling: str, input_shape: tuple[int, ...]
) -> None:
    """Raise if pooling by 2 after each of ``depth`` blocks drives a spatial size to 0."""
    if pooling not in _SHRINKING_POOLINGS:
        return  # "stride" convs give ceil(n / 2) >= 1, "none" keeps the size
    smallest = min(spatial)
    size = smallest
    for block in range(1, depth + 1):
        size //= 2
        if size == 0:
            raise ModelConfigError(
                f"depth={depth} with pooling={pooling!r} is impossible for "
                f"input_shape={input_shape!r}: spatial size {smallest} reaches 0 after "
                f"block {block}; lower depth or use pooling 'stride' or 'none'"
            )


def _build(
    config: Mapping[str, Any], input_shape: tuple[int, ...], num_classes: int, dim: int
) -> CNN:
    """Build a CNN of spatial dimension ``dim`` from a config mapping."""
    family = "cnn" if dim == 2 else "cnn1d"
    settings = read_config(config, CNN_DEFAULTS, family)
    layout = "(C, H, W)" if dim == 2 else "(C, L)"
    shape = check_input_shape(input_shape, dim + 1, family, layout)
    return CNN(shape[0], num_classes, dim=dim, input_size=shape[1:], **settings)


def build_cnn(config: Mapping[str, Any], input_shape: tuple[int, ...], num_classes: int) -> CNN:
    """Build a 2-D "cnn" for inputs (C, H, W)."""
    return _build(config, input_shape, num_classes, dim=2)


def build_cnn1d(config: Mapping[str, Any], input_shape: tuple[int, ...], num_classes: int) -> CNN:
    """Build a 1-D "cnn1d" for inputs (C, L)."""
    return _build(config, input_shape, num_classes, dim=1)
