"""Small CIFAR-style ResNet ("resnet"): a 3x3 stem, three stages of basic blocks
with widths ``width * (1, 2, 4)``, stride 2 at the start of stages 2 and 3
(with 1x1 projection shortcuts), global average pooling and a linear classifier.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ._common import (
    ACTIVATIONS,
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

RESNET_NORMS: tuple[str, ...] = ("batch", "group", "none")
STAGE_WIDTH_FACTORS: tuple[int, ...] = (1, 2, 4)
RESNET_DEFAULTS: dict[str, Any] = {
    "num_blocks": [1, 1, 1],
    "width": 16,
    "norm": "batch",
    "groups": 8,
    "activation": "relu",
    "dropout": 0.0,
}
"""Config knobs of "resnet" and their defaults."""


def _conv(
    in_channels: int, out_channels: int, kernel_size: int, stride: int, norm: str
) -> nn.Conv2d:
    """Conv with 'same'-style padding; no bias when BatchNorm follows."""
    return nn.Conv2d(
        in_channels,
        out_channels,
        kernel_size,
        stride=stride,
        padding=kernel_size // 2,
        bias=norm != "batch",
    )


class BasicBlock(nn.Module):
    """Two 3x3 convs with a residual connection: act(norm(conv(act(norm(conv(x))))) + shortcut(x))."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        stride: int,
        norm: str,
        groups: int,
        activation: str,
    ) -> None:
        super().__init__()
        self.conv1 = _conv(in_channels, out_channels, 3, stride, norm)
        self.norm1 = make_norm(norm, out_channels, dim=2, groups=groups)
        self.act1 = make_activation(activation)
        self.conv2 = _conv(out_channels, out_channels, 3, 1, norm)
        self.norm2 = make_norm(norm, out_channels, dim=2, groups=groups)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                _conv(in_channels, out_channels, 1, stride, norm),
                make_norm(norm, out_channels, dim=2, groups=groups),
            )
        self.act2 = make_activation(activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the block."""
        out = self.act1(self.norm1(self.conv1(x)))
        out = self.norm2(self.conv2(out))
        return self.act2(out + self.shortcut(x))


class ResNet(nn.Module):
    """CIFAR-style ResNet over inputs (B, C, H, W). Knobs are validated here."""

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        *,
        num_blocks: int | Sequence[int] = (1, 1, 1),
        width: int = 16,
        norm: str = "batch",
        groups: int = 8,
        activation: str = "relu",
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        check_int("in_channels", in_channels, 1)
        check_int("num_classes", num_classes, 1)
        blocks_per_stage = check_int_list("num_blocks", num_blocks, len(STAGE_WIDTH_FACTORS), 1)
        width = check_int("width", width, 1)
        check_choice("norm", norm, RESNET_NORMS)
        groups = check_int("groups", groups, 1)
        widths = [width * factor for factor in STAGE_WIDTH_FACTORS]
        if norm == "group":
            check_groups_divide(groups, widths)
        check_choice("activation", activation, tuple(ACTIVATIONS))
        dropout = check_float("dropout", dropout, 0.0, 1.0)

        self.stem = nn.Sequential(
            _conv(in_channels, width, 3, 1, norm),
            make_norm(norm, width, dim=2, groups=groups),
            make_activation(activation),
        )
        stages = []
        channels = width
        for stage, (stage_width, count) in enumerate(zip(widths, blocks_per_stage, strict=True)):
            blocks = []
            for index in range(count):
                stride = 2 if stage > 0 and index == 0 else 1
                blocks.append(BasicBlock(channels, stage_width, stride, norm, groups, activation))
                channels = stage_width
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.dropout: nn.Module = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.classifier = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return logits of shape (B, num_classes)."""
        h = self.stages(self.stem(x))
        h = h.flatten(2).mean(dim=-1)  # global average pooling
        return self.classifier(self.dropout(h))


def build_resnet(
    config: Mapping[str, Any], input_shape: tuple[int, ...], num_classes: int
) -> ResNet:
    """Build a "resnet" for inputs (C, H, W) from a config mapping."""
    settings = read_config(config, RESNET_DEFAULTS, "resnet")
    shape = check_input_shape(input_shape, 3, "resnet", "(C, H, W)")
    return ResNet(shape[0], num_classes, **settings)
