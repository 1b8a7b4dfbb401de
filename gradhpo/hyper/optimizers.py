"""Differentiable inner optimizers for hypergradient computation.

Each optimizer is a pair of pure functions over dicts of tensors::

    state = opt.init(params)
    params, state = opt.update(params, grads, state, hp)

so that the parameters after ``K`` updates are a differentiable function of the
hyperparameters in ``hp`` (learning rate, weight decay, momentum, Adam betas, eps). Nothing is
modified in place, nothing is read back to Python (no ``.item()``, no branching on tensor
values), so the updates work under plain autograd (``create_graph=True`` inner gradients) and
under the :mod:`torch.func` transforms (``grad``, ``jvp``, ``vmap``).

Hyperparameter values (``hp``) are given per hyperparameter and per parameter tensor::

    hp = {"lr": {"0.weight": torch.tensor(0.1), "0.bias": torch.full((8,), 0.05)}}

Each value must broadcast to its parameter without changing the parameter's shape: a 0-d
tensor for a scalar hyperparameter, or a tensor of the parameter's shape for a per-element
one. A hyperparameter (or a parameter) absent from ``hp`` takes the optimizer's constant
default, set in the constructor. To tune one scalar shared by all tensors, put the same 0-d
tensor under every parameter name. Entries the optimizer does not consume (other
hyperparameters, such as loss-side ones, or names that are not in ``params``) are ignored, so
one ``hp`` dict can serve the loss and the optimizer; checking that every tuned name is in
``hyper_names`` is the caller's job.

With constant hyperparameters the updates equal :mod:`torch.optim` (``SGD``, ``Adam``,
``AdamW`` with their default ``foreach``/``fused`` off path) step for step, up to
floating-point rounding; see each class for the few documented differences.

State layout: a flat dict ``{f"{slot}/{param_name}": tensor, ..., "step": tensor}`` where
``"step"`` is a 0-d tensor counting the updates done so far, with the dtype and device of
the (first) parameter.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, ClassVar

import torch

__all__ = [
    "DEFAULT_HYPERPARAMETERS",
    "INNER_OPTIMIZERS",
    "OPTIMIZER_FLAGS",
    "OPTIMIZER_HYPERPARAMETERS",
    "check_hyper_value",
    "check_hyperparameter_update",
    "optimizer_config",
    "torch_optimizer",
    "SGD",
    "Adam",
    "AdamW",
    "HyperValues",
    "InnerOptimizer",
    "Params",
    "State",
    "make_optimizer",
]

Tensor = torch.Tensor
Params = dict[str, Tensor]
State = dict[str, Tensor]
HyperValues = Mapping[str, Mapping[str, Tensor]]

STEP_KEY = "step"


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


def _as_float(name: str, value: Any) -> float:
    """Constructor values are plain numbers; a 1-element tensor is accepted and read once."""
    if isinstance(value, bool):
        raise ValueError(f"{name} must be a number, got {value!r}")
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {value!r}") from None


class InnerOptimizer:
    """Base class: a differentiable optimizer as ``init``/``update`` pure functions.

    Subclasses set ``name``, ``hyper_names`` and ``slots`` (the per-parameter state buffers)
    and implement :meth:`_update_one`. ``defaults`` maps every name in ``hyper_names`` to the
    constant used when ``hp`` does not give that hyperparameter for a parameter.
    """

    name: ClassVar[str] = "base"
    hyper_names: ClassVar[tuple[str, ...]] = ()
    slots: ClassVar[tuple[str, ...]] = ()

    def __init__(self, **defaults: float) -> None:
        self.defaults: dict[str, float] = dict(defaults)

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self._config().items())
        return f"{type(self).__name__}({args})"

    def _config(self) -> dict[str, Any]:
        return dict(self.defaults)

    # -- state -----------------------------------------------------------------------------

    def init(self, params: Params) -> State:
        """Fresh state: zero buffers shaped like each parameter, and ``step = 0``."""
        state: State = {}
        for slot in self.slots:
            for pname, p in params.items():
                state[f"{slot}/{pname}"] = torch.zeros_like(p)
        first = next(iter(params.values()), None)
        if first is None:
            state[STEP_KEY] = torch.zeros(())
        else:
            state[STEP_KEY] = torch.zeros((), dtype=first.dtype, device=first.device)
        return state

    # -- hyperparameters ---------------------------------------------------------------------

    def hyper(self, hp: HyperValues | None, name: str, param_name: str, like: Tensor) -> Tensor:
        """Value of hyperparameter ``name`` for parameter ``param_name``.

        ``hp[name][param_name]`` if given (returned as is, so gradients flow to it), else a
        constant tensor of ``defaults[name]`` with the dtype and device of ``like``.
        """
        value = self._lookup(hp, name, param_name)
        if value is not None:
            if not isinstance(value, Tensor):
                raise ValueError(
                    f"hp[{name!r}][{param_name!r}] must be a tensor, got {type(value).__name__}"
                )
            shape = tuple(like.shape)
            try:
                ok = tuple(torch.broadcast_shapes(value.shape, like.shape)) == shape
            except RuntimeError:
                ok = False
            if not ok:
                raise ValueError(
                    f"hp[{name!r}][{param_name!r}] has shape {tuple(value.shape)}, which does "
                    f"not broadcast to the parameter's shape {shape}"
                )
            return value
        return torch.tensor(self.defaults[name], dtype=like.dtype, device=like.device)

    @staticmethod
    def _lookup(hp: HyperValues | None, name: str, param_name: str) -> Any:
        if hp is None or name not in hp:
            return None
        per_param = hp[name]
        if not isinstance(per_param, Mapping):
            raise ValueError(
                f"hp[{name!r}] must map parameter names to tensors, got {type(per_param).__name__}"
            )
        return per_param.get(param_name)

    def _is_tuned(self, hp: HyperValues | None, name: str, param_name: str) -> bool:
        return self._lookup(hp, name, param_name) is not None

    def _is_const_zero(self, hp: HyperValues | None, name: str, param_name: str) -> bool:
        """True when ``name`` is not given for this parameter and its default is 0.

        This is a structural test (on ``hp``'s keys, never on tensor values); it lets an
        update skip a term exactly as torch.optim does when the constant is zero.
        """
        return not self._is_tuned(hp, name, param_name) and self.defaults[name] == 0.0

    # -- update ------------------------------------------------------------------------------

    def update(
        self,
        params: Params,
        grads: Params,
        state: State,
        hp: HyperValues | None = None,
    ) -> tuple[Params, State]:
        """One optimizer step; returns new ``(params, state)`` and modifies nothing."""
        if STEP_KEY not in state:
            raise KeyError(f"state has no {STEP_KEY!r} entry; build it with init()")
        step = state[STEP_KEY]
        new_params: Params = {}
        new_state: State = {}
        for pname, p in params.items():
            if pname not in grads:
                raise KeyError(f"grads has no entry for parameter {pname!r}")
            slots = {}
            for slot in self.slots:
                key = f"{slot}/{pname}"
                if key not in state:
                    raise KeyError(f"state has no entry {key!r}; build it with init()")
                slots[slot] = state[key]
            new_p, new_slots = self._update_one(pname, p, grads[pname], slots, step, hp)
            new_params[pname] = new_p
            for slot, value in new_slots.items():
                new_state[f"{slot}/{pname}"] = value
        new_state[STEP_KEY] = step + 1
        return new_params, new_state

    def _update_one(
        self,
        pname: str,
        p: Tensor,
        g: Tensor,
        slots: dict[str, Tensor],
        step: Tensor,
        hp: HyperValues | None,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        raise NotImplementedError


class SGD(InnerOptimizer):
    """SGD with optional L2 weight decay, (Nesterov) momentum and dampening.

    Per tensor, with ``g`` the gradient (``torch.optim.SGD``'s arithmetic)::

        g = g + weight_decay * p
        b = g                                   on the first step (step == 0)
        b = momentum * b + (1 - dampening) * g  afterwards
        g = g + momentum * b  if nesterov  else  b
        p = p - lr * g

    The first-step rule is expressed with ``torch.where`` on the step counter. Hyperparameters:
    ``lr``, ``weight_decay``, ``momentum`` (``dampening`` and ``nesterov`` are fixed).

    When ``momentum`` is the constant 0 and not tuned, the momentum term is skipped (as in
    torch.optim) and the buffer just records ``g`` (what the formula gives for momentum 0 and
    no dampening, so the state is the same as with a tuned momentum of 0). When it is tuned, the momentum formula is
    always applied: a tuned value of exactly 0 with ``dampening > 0`` then gives
    ``(1 - dampening) * g`` after the first step, where torch.optim (which special-cases
    ``momentum == 0``) would use ``g``.
    """

    name: ClassVar[str] = "sgd"
    hyper_names: ClassVar[tuple[str, ...]] = ("lr", "weight_decay", "momentum")
    slots: ClassVar[tuple[str, ...]] = ("momentum_buffer",)

    def __init__(
        self,
        lr: float = 0.1,
        weight_decay: float = 0.0,
        momentum: float = 0.0,
        nesterov: bool = False,
        dampening: float = 0.0,
    ) -> None:
        lr = _as_float("lr", lr)
        weight_decay = _as_float("weight_decay", weight_decay)
        momentum = _as_float("momentum", momentum)
        dampening = _as_float("dampening", dampening)
        _check(lr > 0.0 and math.isfinite(lr), f"lr must be > 0, got {lr}")
        _check(
            weight_decay >= 0.0 and math.isfinite(weight_decay),
            f"weight_decay must be >= 0, got {weight_decay}",
        )
        _check(0.0 <= momentum < 1.0, f"momentum must be in [0, 1), got {momentum}")
        _check(0.0 <= dampening <= 1.0, f"dampening must be in [0, 1], got {dampening}")
        if nesterov and (momentum <= 0.0 or dampening != 0.0):
            raise ValueError(
                "nesterov=True requires momentum > 0 and dampening == 0, got "
                f"momentum={momentum}, dampening={dampening}"
            )
        super().__init__(lr=lr, weight_decay=weight_decay, momentum=momentum)
        self.nesterov = bool(nesterov)
        self.dampening = dampening

    def _config(self) -> dict[str, Any]:
        return {**self.defaults, "nesterov": self.nesterov, "dampening": self.dampening}

    def _update_one(self, pname, p, g, slots, step, hp):
        lr = self.hyper(hp, "lr", pname, p)
        if not self._is_const_zero(hp, "weight_decay", pname):
            g = g + self.hyper(hp, "weight_decay", pname, p) * p
        buf = slots["momentum_buffer"]
        if not self._is_const_zero(hp, "momentum", pname):
            mu = self.hyper(hp, "momentum", pname, p)
            later = mu * buf + (1.0 - self.dampening) * g
            buf = torch.where(step == 0, g, later)
            g = g + mu * buf if self.nesterov else buf
        else:
            buf = g
        return p - lr * g, {"momentum_buffer": buf}


class Adam(InnerOptimizer):
    """Adam with coupled L2 weight decay (``torch.optim.Adam``, ``amsgrad=False``).

    Per tensor, with ``t = step + 1``::

        g = g + weight_decay * p
        m = m + (1 - beta1) * (g - m)
        v = beta2 * v + (1 - beta2) * g * g
        p = p - lr / (1 - beta1**t) * m / (sqrt(v) / sqrt(1 - beta2**t) + eps)

    Hyperparameters: ``lr``, ``beta1``, ``beta2``, ``eps``, ``weight_decay``; the powers are
    tensor ops, so the betas may be tuned (and per element).

    The square root is taken as ``sqrt(clamp_min(v, tiny))`` with
    ``tiny = torch.finfo(v.dtype).tiny``. Its value equals torch's ``sqrt(v)`` except where
    ``v < tiny`` (``sqrt(tiny)`` is ~1e-154 in float64, ~1e-19 in float32, negligible next to
    ``eps``), but its derivative stays finite at ``v = 0``: with a plain ``sqrt`` a parameter
    whose gradient has always been exactly zero (e.g. a dead ReLU unit) gives
    ``0 * inf = NaN`` hypergradients.

    The bias corrections are computed in the parameter's dtype: in float32 ``1 - beta2**t``
    carries the float32 rounding of ``beta2`` (torch.optim uses Python doubles there), a
    relative difference of ~1e-5 in the step size for ``beta2 = 0.999``.
    """

    name: ClassVar[str] = "adam"
    hyper_names: ClassVar[tuple[str, ...]] = ("lr", "beta1", "beta2", "eps", "weight_decay")
    slots: ClassVar[tuple[str, ...]] = ("exp_avg", "exp_avg_sq")
    decoupled: ClassVar[bool] = False

    def __init__(
        self,
        lr: float = 1e-3,
        beta1: float = 0.9,
        beta2: float = 0.999,
        eps: float = 1e-8,
        weight_decay: float = 0.0,
    ) -> None:
        lr = _as_float("lr", lr)
        beta1 = _as_float("beta1", beta1)
        beta2 = _as_float("beta2", beta2)
        eps = _as_float("eps", eps)
        weight_decay = _as_float("weight_decay", weight_decay)
        _check(lr > 0.0 and math.isfinite(lr), f"lr must be > 0, got {lr}")
        _check(0.0 <= beta1 < 1.0, f"beta1 must be in [0, 1), got {beta1}")
        _check(0.0 <= beta2 < 1.0, f"beta2 must be in [0, 1), got {beta2}")
        _check(eps > 0.0 and math.isfinite(eps), f"eps must be > 0, got {eps}")
        _check(
            weight_decay >= 0.0 and math.isfinite(weight_decay),
            f"weight_decay must be >= 0, got {weight_decay}",
        )
        super().__init__(lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay)

    def _update_one(self, pname, p, g, slots, step, hp):
        lr = self.hyper(hp, "lr", pname, p)
        beta1 = self.hyper(hp, "beta1", pname, p)
        beta2 = self.hyper(hp, "beta2", pname, p)
        eps = self.hyper(hp, "eps", pname, p)
        if not self._is_const_zero(hp, "weight_decay", pname):
            wd = self.hyper(hp, "weight_decay", pname, p)
            if self.decoupled:
                p = p * (1.0 - lr * wd)
            else:
                g = g + wd * p
        t = step + 1
        m = slots["exp_avg"]
        v = slots["exp_avg_sq"]
        m = m + (1.0 - beta1) * (g - m)
        v = v * beta2 + (1.0 - beta2) * (g * g)
        bias_correction1 = 1.0 - beta1**t
        bias_correction2 = 1.0 - beta2**t
        step_size = lr / bias_correction1
        tiny = torch.finfo(v.dtype).tiny
        denom = torch.sqrt(torch.clamp_min(v, tiny)) / torch.sqrt(bias_correction2) + eps
        return p - step_size * (m / denom), {"exp_avg": m, "exp_avg_sq": v}


class AdamW(Adam):
    """Adam with decoupled weight decay (``torch.optim.AdamW``).

    Same as :class:`Adam` except that the weight decay is applied to the parameter before the
    Adam step, ``p = p * (1 - lr * weight_decay)``, instead of being added to the gradient.
    Default ``weight_decay`` is 1e-2, as in torch.
    """

    name: ClassVar[str] = "adamw"
    decoupled: ClassVar[bool] = True

    def __init__(
        self,
        lr: float = 1e-3,
        beta1: float = 0.9,
        beta2: float = 0.999,
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
    ) -> None:
        super().__init__(lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay)


# ----------------------------------------------------------------- optimizer configs
# The plain-data form of an optimizer that TrainingRun, BatchedPopulation and configs use.

#: Continuous hyperparameters each optimizer exposes through ``TrainingRun.hyperparameters``.
OPTIMIZER_HYPERPARAMETERS: dict[str, tuple[str, ...]] = {
    "sgd": ("lr", "weight_decay", "momentum"),
    "adam": ("lr", "weight_decay", "beta1", "beta2", "eps"),
    "adamw": ("lr", "weight_decay", "beta1", "beta2", "eps"),
}
OPTIMIZER_FLAGS: dict[str, tuple[str, ...]] = {"sgd": ("nesterov",), "adam": (), "adamw": ()}
DEFAULT_HYPERPARAMETERS: dict[str, dict[str, float]] = {
    "sgd": {"lr": 0.1, "weight_decay": 0.0, "momentum": 0.0},
    "adam": {"lr": 1e-3, "weight_decay": 0.0, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8},
    "adamw": {"lr": 1e-3, "weight_decay": 1e-2, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8},
}

def check_hyper_value(name: str, value: Any, label: str | None = None) -> float:
    """Validate one hyperparameter value; ``label`` is the field name used in messages."""
    label = label or name
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"hyperparameter {label!r} must be a number, got {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"hyperparameter {label!r} must be finite, got {value!r}")
    if name in ("lr", "eps") and value <= 0:
        raise ValueError(f"hyperparameter {label!r} must be > 0, got {value!r}")
    if name == "weight_decay" and value < 0:
        raise ValueError(f"hyperparameter {label!r} must be >= 0, got {value!r}")
    if name in ("momentum", "beta1", "beta2") and not 0.0 <= value < 1.0:
        raise ValueError(f"hyperparameter {label!r} must be in [0, 1), got {value!r}")
    return value


def check_hyperparameter_update(
    spec: Mapping[str, Any], names: tuple[str, ...], values: Mapping[str, Any]
) -> dict[str, float]:
    """Validate new values for an optimizer's hyperparameters: only ``names`` are known, each
    value is checked by :func:`check_hyper_value`, Nesterov needs momentum > 0. Shared by
    :class:`TrainingRun` and :class:`gradhpo.pbt.BatchedPopulation`."""
    unknown = sorted(set(values) - set(names))
    if unknown:
        raise ValueError(
            f"unknown hyperparameter(s) {unknown} for optimizer "
            f"{spec['name']!r}; known: {list(names)}"
        )
    checked = {name: check_hyper_value(name, v) for name, v in values.items()}
    if spec.get("nesterov") and checked.get("momentum", 1.0) == 0:
        raise ValueError("hyperparameter 'momentum' must be > 0 with Nesterov, got 0.0")
    return checked


def optimizer_config(optimizer: Mapping[str, Any]) -> dict[str, Any]:
    """Validate an optimizer config (``{"name": "sgd"|"adam"|"adamw", <hyperparameters>,
    "nesterov": bool}``) and fill in the defaults; returns a plain dict. Every mistake is a
    ``ValueError``/``TypeError`` naming ``optimizer.<field>`` and the value."""
    if not isinstance(optimizer, Mapping):
        raise TypeError(f"optimizer must be a mapping, got {optimizer!r}")
    name = optimizer.get("name", "sgd")
    if name not in OPTIMIZER_HYPERPARAMETERS:
        raise ValueError(
            f"optimizer.name: unknown optimizer {name!r}; choose one of {sorted(OPTIMIZER_HYPERPARAMETERS)}"
        )
    allowed = {"name", *OPTIMIZER_HYPERPARAMETERS[name], *OPTIMIZER_FLAGS[name]}
    unknown = sorted(set(optimizer) - allowed)
    if unknown:
        raise ValueError(
            f"optimizer: unknown key(s) {unknown} for {name!r}; allowed: {sorted(allowed)}"
        )
    spec: dict[str, Any] = {"name": name}
    for key, default in DEFAULT_HYPERPARAMETERS[name].items():
        spec[key] = check_hyper_value(key, optimizer.get(key, default), f"optimizer.{key}")
    if name == "sgd":
        nesterov = optimizer.get("nesterov", False)
        if not isinstance(nesterov, bool):
            raise TypeError(f"optimizer.nesterov must be true or false, got {nesterov!r}")
        if nesterov and spec["momentum"] == 0:
            raise ValueError("optimizer.nesterov: Nesterov momentum needs momentum > 0, got 0")
        spec["nesterov"] = nesterov
    return spec


def torch_optimizer(params: list[torch.nn.Parameter], spec: Mapping[str, Any]) -> torch.optim.Optimizer:
    """The torch.optim twin of an :func:`optimizer_config` (same arithmetic as the inner
    optimizers, step for step up to rounding)."""
    name = spec["name"]
    if name == "sgd":
        return torch.optim.SGD(
            params,
            lr=spec["lr"],
            momentum=spec["momentum"],
            weight_decay=spec["weight_decay"],
            nesterov=spec["nesterov"],
        )
    cls = torch.optim.Adam if name == "adam" else torch.optim.AdamW
    return cls(
        params,
        lr=spec["lr"],
        betas=(spec["beta1"], spec["beta2"]),
        eps=spec["eps"],
        weight_decay=spec["weight_decay"],
    )


# name -> (class, preset keyword arguments, overridable by the caller)
_REGISTRY: dict[str, tuple[type[InnerOptimizer], dict[str, Any]]] = {
    "sgd": (SGD, {}),
    "momentum": (SGD, {"momentum": 0.9}),
    "nesterov": (SGD, {"momentum": 0.9, "nesterov": True}),
    "adam": (Adam, {}),
    "adamw": (AdamW, {}),
}
_ARGS: dict[type[InnerOptimizer], tuple[str, ...]] = {
    SGD: ("lr", "weight_decay", "momentum", "nesterov", "dampening"),
    Adam: ("lr", "beta1", "beta2", "eps", "weight_decay"),
    AdamW: ("lr", "beta1", "beta2", "eps", "weight_decay"),
}

INNER_OPTIMIZERS: tuple[str, ...] = tuple(_REGISTRY)


def make_optimizer(name: str, **kwargs: Any) -> InnerOptimizer:
    """Build an inner optimizer by name (one of :data:`INNER_OPTIMIZERS`).

    ``"momentum"`` is SGD with momentum 0.9 and ``"nesterov"`` SGD with Nesterov momentum 0.9;
    keyword arguments override these presets and the constructor defaults.
    """
    if name not in _REGISTRY:
        raise ValueError(
            f"unknown inner optimizer {name!r}; choose one of {', '.join(INNER_OPTIMIZERS)}"
        )
    cls, preset = _REGISTRY[name]
    allowed = _ARGS[cls]
    unknown = [k for k in kwargs if k not in allowed]
    if unknown:
        raise ValueError(
            f"unknown argument(s) {', '.join(map(repr, unknown))} for inner optimizer {name!r}; "
            f"it takes {', '.join(allowed)}"
        )
    return cls(**{**preset, **kwargs})
