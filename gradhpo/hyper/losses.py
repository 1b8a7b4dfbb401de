"""Training losses by name: what ``training.loss`` in a config (and ``TrainingRun(loss=)``)
names. Every loss is per example, ``loss(outputs, targets) -> (B,)``: training takes the mean,
evaluation the sum over a split, and the hypergradient engine uses it as it is.

* ``cross_entropy`` (the default): logits ``(B, C)`` and integer class targets ``(B,)``;
* ``mse``: half the squared error summed over an example's outputs (``0.5 * ||o - t||^2``);
* ``l1``: absolute error summed over an example's outputs;
* ``huber``: smooth L1 (quadratic below 1, linear above) summed over an example's outputs;
* ``bce_with_logits``: binary cross-entropy of logits against 0/1 (or soft) float targets,
  summed over an example's outputs;
* ``"package.module:function"``: your own per-example loss, imported.

The regression losses refuse outputs and targets whose shapes would broadcast into a wrong
answer (``(B, 1)`` outputs against ``(B,)`` targets are the same numbers and are accepted).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from gradhpo.config import import_object

__all__ = [
    "LOSSES",
    "LossFn",
    "cross_entropy_per_example",
    "resolve_loss",
    "squared_error_per_example",
]

LossFn = Callable[[Tensor, Tensor], Tensor]  # (outputs, targets) -> per-example losses (B,)


def cross_entropy_per_example(outputs: Tensor, targets: Tensor) -> Tensor:
    """The default loss: cross-entropy of logits, one value per example.

    Refuses what would be a silent wrong answer: floating-point targets or a single output
    column (a regression model: cross-entropy over one class is 0 whatever the weights, so
    nothing would train). Pass another loss (``training.loss: mse``, ``loss_fn=``)."""
    if targets.is_floating_point() or outputs.dim() < 2 or outputs.shape[1] < 2:
        raise ValueError(
            "the default loss is cross-entropy over class indices, got outputs of shape "
            f"{tuple(outputs.shape)} and {targets.dtype} targets of shape {tuple(targets.shape)}; "
            "for regression or other losses choose one (training.loss: mse, l1, huber, "
            "bce_with_logits) or pass loss_fn=... (per-example losses, e.g. "
            "gradhpo.hyper.losses.squared_error_per_example)"
        )
    return F.cross_entropy(outputs, targets, reduction="none")


def _matched(outputs: Tensor, targets: Tensor, name: str) -> tuple[Tensor, Tensor]:
    """Outputs and float targets with the same shape, or a ValueError naming both shapes."""
    if outputs.dtype in (torch.float16, torch.bfloat16):  # mixed precision: sum in float32
        outputs = outputs.float()
    if not targets.is_floating_point() or targets.dtype != outputs.dtype:
        targets = targets.to(outputs.dtype)
    if outputs.shape != targets.shape:
        same_numbers = outputs.shape[:1] == targets.shape[:1] and (
            outputs[0].numel() == targets[0].numel() if len(outputs) else True
        )
        if not same_numbers:
            raise ValueError(
                f"loss {name}: outputs of shape {tuple(outputs.shape)} do not match targets of "
                f"shape {tuple(targets.shape)} (one target value per output per example)"
            )
        targets = targets.reshape(outputs.shape)
    return outputs, targets


def _mse(outputs: Tensor, targets: Tensor) -> Tensor:
    o, t = _matched(outputs, targets, "mse")
    return 0.5 * (o - t).pow(2).flatten(1).sum(1) if o.dim() > 1 else 0.5 * (o - t).pow(2)


def _l1(outputs: Tensor, targets: Tensor) -> Tensor:
    o, t = _matched(outputs, targets, "l1")
    return (o - t).abs().flatten(1).sum(1) if o.dim() > 1 else (o - t).abs()


def _huber(outputs: Tensor, targets: Tensor) -> Tensor:
    o, t = _matched(outputs, targets, "huber")
    per = F.smooth_l1_loss(o, t, reduction="none")
    return per.flatten(1).sum(1) if o.dim() > 1 else per


def _bce_with_logits(outputs: Tensor, targets: Tensor) -> Tensor:
    o, t = _matched(outputs, targets, "bce_with_logits")
    per = F.binary_cross_entropy_with_logits(o, t, reduction="none")
    return per.flatten(1).sum(1) if o.dim() > 1 else per


#: ``0.5 * ||outputs - targets||^2`` per example (regression): the ``mse`` loss.
squared_error_per_example: LossFn = _mse

#: Losses by config name (``training.loss``).
LOSSES: dict[str, LossFn] = {
    "cross_entropy": cross_entropy_per_example,
    "mse": _mse,
    "l1": _l1,
    "huber": _huber,
    "bce_with_logits": _bce_with_logits,
}


def resolve_loss(spec: Any, field: str = "training.loss") -> LossFn:
    """The per-example loss named by ``spec``: a :data:`LOSSES` name, an importable
    ``"module:function"`` or a callable. Anything else is a ValueError naming ``field``."""
    if callable(spec):
        return spec
    if not isinstance(spec, str) or not spec:
        raise ValueError(
            f"{field}: expected one of {list(LOSSES)} or 'module:function', got {spec!r}"
        )
    if spec in LOSSES:
        return LOSSES[spec]
    if spec.startswith("<"):  # what a run's config records for a lambda or local function
        raise ValueError(
            f"{field}: {spec} cannot be imported by name (a lambda or a local function); "
            "define the loss at module level, or pass the callable again"
        )
    if ":" not in spec:
        raise ValueError(
            f"{field}: unknown loss {spec!r}; choose one of {list(LOSSES)} or give your own "
            "per-example loss as 'module:function'"
        )
    loss: Callable[..., Any] = import_object(spec, field)
    if not callable(loss):
        raise ValueError(f"{field}: {spec!r} is not callable")
    return loss
