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

Hyperparameters carried in the state (optax's ``inject_hyperparams``): ``init(params,
hypers={...})`` adds one float64 0-d entry ``"hyper/<name>"`` per hyperparameter of the
optimizer. ``update`` then reads them from the state, so they can be changed between steps
(PBT), checkpointed with the state and stacked per member (:class:`BatchedPopulation` vmaps
``update`` over (N,) hyperparameters). A value in ``hp`` still takes precedence (that is how
the hypergradient engine passes differentiable values), then the state, then ``defaults``.

This module is also the home of an optimizer's plain-data config (:func:`optimizer_config`:
``{"name": "sgd", "lr": 0.1, ...}``, what configs, :class:`~gradhpo.run.TrainingRun` and
PBT speak) and of its torch.optim twin (:func:`torch_optimizer`, and :func:`to_torch_state` /
:func:`from_torch_state` between the two state formats).
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
    "from_torch_state",
    "inner_optimizer",
    "optimizer_config",
    "resolve_optimizer",
    "to_torch_state",
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
HYPER_PREFIX = "hyper/"


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


class _Shared(Mapping[str, Tensor]):
    """A per-parameter mapping that gives one value for every parameter name."""

    def __init__(self, value: Tensor) -> None:
        self.value = value

    def __getitem__(self, key: str) -> Tensor:
        return self.value

    def get(self, key: str, default: Any = None) -> Tensor:  # type: ignore[override]
        return self.value

    def __iter__(self) -> Any:
        return iter(())

    def __len__(self) -> int:
        return 0


class InnerOptimizer:
    """Base class: a differentiable optimizer as ``init``/``update`` pure functions.

    Subclasses set ``name``, ``hyper_names`` and ``slots`` (the per-parameter state buffers)
    and implement :meth:`_update_one`. ``defaults`` maps every name in ``hyper_names`` to the
    constant used when ``hp`` does not give that hyperparameter for a parameter.
    """

    name: ClassVar[str] = "base"
    hyper_names: ClassVar[tuple[str, ...]] = ()
    slots: ClassVar[tuple[str, ...]] = ()
    #: Per-parameter 0-d boolean state entries (e.g. whether SGD's momentum buffer exists).
    flags: ClassVar[tuple[str, ...]] = ()
    #: Whether ``_update_one`` reads ``t`` (the step number): Adam's bias corrections do.
    reads_step: ClassVar[bool] = False

    def __init__(self, **defaults: float) -> None:
        self.defaults: dict[str, float] = dict(defaults)

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self._config().items())
        return f"{type(self).__name__}({args})"

    def _config(self) -> dict[str, Any]:
        return dict(self.defaults)

    # -- state -----------------------------------------------------------------------------

    def init(self, params: Params, hypers: Mapping[str, float] | None = None) -> State:
        """Fresh state: zero buffers shaped like each parameter, and ``step = 0``.

        With ``hypers`` (a mapping, possibly empty), the state also carries every
        hyperparameter of the optimizer as a float64 0-d tensor ``"hyper/<name>"``: the given
        value, else the constructor's default."""
        state: State = {}
        first = next(iter(params.values()), None)
        device = first.device if first is not None else None
        for slot in self.slots:
            for pname, p in params.items():
                state[f"{slot}/{pname}"] = torch.zeros_like(p)
        for flag in self.flags:
            for pname, p in params.items():
                state[f"{flag}/{pname}"] = torch.zeros((), dtype=torch.bool, device=p.device)
        if first is None:
            state[STEP_KEY] = torch.zeros(())
        else:
            state[STEP_KEY] = torch.zeros((), dtype=first.dtype, device=first.device)
        if hypers is not None:
            unknown = sorted(set(hypers) - set(self.hyper_names))
            if unknown:
                raise ValueError(
                    f"hypers: unknown hyperparameter(s) {unknown} for {self.name!r}; "
                    f"known: {list(self.hyper_names)}"
                )
            for name in self.hyper_names:
                value = _as_float(name, hypers.get(name, self.defaults[name]))
                state[HYPER_PREFIX + name] = torch.tensor(value, dtype=torch.float64, device=device)
        return state

    # -- hyperparameters ---------------------------------------------------------------------

    def hyper(self, hp: HyperValues | None, name: str, param_name: str, like: Tensor) -> Tensor:
        """Value of hyperparameter ``name`` for parameter ``param_name``.

        ``hp[name][param_name]`` if given (returned as is, so gradients flow to it; within
        :meth:`update` this includes the values carried in the state), else a constant
        tensor of ``defaults[name]`` with the dtype and device of ``like``.
        """
        value = self._lookup(hp, name, param_name)
        if value is not None:
            if not isinstance(value, Tensor):
                raise ValueError(
                    f"hp[{name!r}][{param_name!r}] must be a tensor, got {type(value).__name__}"
                )
            # Fast path (every step of every parameter): a 0-d value or one of the parameter's
            # exact shape always fits; only other shapes pay for the full broadcast check.
            if value.dim() == 0 or value.shape == like.shape:
                return value
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
        return torch.full((), self.defaults[name], dtype=like.dtype, device=like.device)

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
        # This step's 1-based number (Adam's bias corrections), computed once per update.
        t = state[STEP_KEY] + 1
        new_params: Params = {}
        new_state: State = {}
        carried = {
            name: state[HYPER_PREFIX + name]
            for name in self.hyper_names
            if HYPER_PREFIX + name in state
        }
        if carried:
            # Carried values act as given ones for every parameter; hp still comes first.
            hp = {**{name: _Shared(v) for name, v in carried.items()}, **(hp or {})}
        names = (*self.slots, *self.flags)  # once per update, not per parameter
        for pname, p in params.items():
            if pname not in grads:
                raise KeyError(f"grads has no entry for parameter {pname!r}")
            slots = {}
            for slot in names:
                key = f"{slot}/{pname}"
                if key not in state:
                    raise KeyError(f"state has no entry {key!r}; build it with init()")
                slots[slot] = state[key]
            new_p, new_slots = self._update_one(pname, p, grads[pname], slots, t, hp)
            new_params[pname] = new_p
            for slot, value in new_slots.items():
                new_state[f"{slot}/{pname}"] = value
        new_state[STEP_KEY] = t
        for name, value in carried.items():
            new_state[HYPER_PREFIX + name] = value
        return new_params, new_state

    def _update_one(
        self,
        pname: str,
        p: Tensor,
        g: Tensor,
        slots: dict[str, Tensor],
        t: Tensor,
        hp: HyperValues | None,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """One parameter's update; ``t`` is the step's 1-based number (state step + 1)."""
        raise NotImplementedError


class SGD(InnerOptimizer):
    """SGD with optional L2 weight decay, (Nesterov) momentum and dampening.

    Per tensor, with ``g`` the gradient (``torch.optim.SGD``'s arithmetic)::

        g = g + weight_decay * p
        b = g                                   at the first step with momentum != 0
        b = momentum * b + (1 - dampening) * g  afterwards
        g = g + momentum * b  if nesterov  else  b
        p = p - lr * g

    A step with momentum 0 is plain SGD and leaves the buffer alone. This is torch.optim's
    rule (it creates the buffer at the first step with momentum != 0), kept per parameter in
    the boolean state entry ``momentum_started/<param>`` and applied with ``torch.where``, so
    momentum switched on mid-run (PBT) starts exactly as in torch. Hyperparameters: ``lr``,
    ``weight_decay``, ``momentum`` (``dampening`` and ``nesterov`` are fixed).
    """

    name: ClassVar[str] = "sgd"
    hyper_names: ClassVar[tuple[str, ...]] = ("lr", "weight_decay", "momentum")
    slots: ClassVar[tuple[str, ...]] = ("momentum_buffer",)
    flags: ClassVar[tuple[str, ...]] = ("momentum_started",)

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

    def _update_one(self, pname, p, g, slots, t, hp):
        lr = self.hyper(hp, "lr", pname, p)
        if not self._is_const_zero(hp, "weight_decay", pname):
            g = g + self.hyper(hp, "weight_decay", pname, p) * p
        buf, started = slots["momentum_buffer"], slots["momentum_started"]
        if self._is_const_zero(hp, "momentum", pname):
            # No momentum term; like torch.optim, no buffer is started.
            return p - lr * g, {"momentum_buffer": buf, "momentum_started": started}
        mu = self.hyper(hp, "momentum", pname, p)
        # (1 - dampening) * g only when dampening is set: 1.0 * g is g, and a product with a
        # Python number is slow under forward-mode AD (see methods._forward_constants).
        damped = g if self.dampening == 0.0 else (1.0 - self.dampening) * g
        candidate = torch.where(started, mu * buf + damped, g)
        direction = g + mu * candidate if self.nesterov else candidate
        if not self._is_tuned(hp, "momentum", pname):  # a constant > 0: always on
            return p - lr * direction, {
                "momentum_buffer": candidate,
                "momentum_started": torch.ones_like(started),
            }
        # A value that may be 0 at this step (tuned, or carried in the state and changed by
        # PBT): where it is 0 the step is plain SGD and the buffer is left as it was.
        on = mu != 0
        direction = torch.where(on, direction, g)
        return p - lr * direction, {
            "momentum_buffer": torch.where(on, candidate, buf),
            "momentum_started": started | on.any(),
        }


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
    reads_step: ClassVar[bool] = True

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

    def _update_one(self, pname, p, g, slots, t, hp):
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


def torch_optimizer(
    params: list[torch.nn.Parameter], spec: Mapping[str, Any]
) -> torch.optim.Optimizer:
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


def resolve_optimizer(
    optimizer: str | InnerOptimizer, optimizer_kwargs: Mapping[str, Any] | None
) -> InnerOptimizer:
    """The inner optimizer of a tuner's ``optimizer`` argument: a name (built with
    ``optimizer_kwargs``, see :func:`make_optimizer`) or an :class:`InnerOptimizer` itself."""
    if isinstance(optimizer, str):
        return make_optimizer(optimizer, **dict(optimizer_kwargs or {}))
    if not isinstance(optimizer, InnerOptimizer):
        raise TypeError(f"optimizer must be a name or an InnerOptimizer, got {optimizer!r}")
    if optimizer_kwargs:
        raise ValueError("optimizer_kwargs: give them only with an optimizer name")
    return optimizer


# ----------------------------------------------------------------- torch.optim state format
def _param_group(spec: Mapping[str, Any], hypers: Mapping[str, float], n_params: int) -> dict:
    """torch.optim's param group for ``spec`` with ``hypers`` (keys taken from a real
    optimizer, so they match this torch version's ``state_dict`` format)."""
    dummies = [torch.nn.Parameter(torch.zeros(1)) for _ in range(max(n_params, 1))]
    group = torch_optimizer(dummies, {**spec, **hypers}).state_dict()["param_groups"][0]
    group["params"] = list(range(n_params))
    return group


def to_torch_state(
    spec: Mapping[str, Any], state: Mapping[str, Tensor], param_names: list[str]
) -> dict[str, Any]:
    """The torch.optim ``state_dict()`` of an :func:`optimizer_config` ``spec`` whose inner
    optimizer state (carrying its hyperparameters, see :meth:`InnerOptimizer.init`) is
    ``state``. SGD's buffers appear where torch would have created them (momentum started),
    Adam's slots once it has stepped, as in torch."""
    hypers = {
        name: float(state[HYPER_PREFIX + name]) for name in OPTIMIZER_HYPERPARAMETERS[spec["name"]]
    }
    per_param: dict[int, dict[str, Tensor]] = {}
    if spec["name"] == "sgd":
        for k, name in enumerate(param_names):
            if bool(state[f"momentum_started/{name}"]):
                per_param[k] = {"momentum_buffer": state[f"momentum_buffer/{name}"].clone()}
    else:
        step = float(state[STEP_KEY])
        if step > 0:
            for k, name in enumerate(param_names):
                per_param[k] = {
                    "step": torch.tensor(step),
                    "exp_avg": state[f"exp_avg/{name}"].clone(),
                    "exp_avg_sq": state[f"exp_avg_sq/{name}"].clone(),
                }
    group = _param_group(spec, hypers, len(param_names))
    return {"state": per_param, "param_groups": [group]}


def from_torch_state(
    spec: Mapping[str, Any], torch_state: Mapping[str, Any], params: Mapping[str, Tensor]
) -> State:
    """The inner-optimizer state (hyperparameters carried, from the first param group) of a
    torch.optim ``state_dict()`` for ``params`` (names in the optimizer's parameter order);
    ``{}`` or an empty ``state`` means a fresh optimizer. Inverse of :func:`to_torch_state`."""
    names = list(params)
    per_param = dict(torch_state.get("state", {})) if torch_state else {}
    groups = torch_state.get("param_groups") if torch_state else None
    hypers = {k: float(v) for k, v in spec.items() if k in OPTIMIZER_HYPERPARAMETERS[spec["name"]]}
    if groups:
        group = groups[0]
        for name in OPTIMIZER_HYPERPARAMETERS[spec["name"]]:
            if name in ("beta1", "beta2"):
                hypers[name] = float(group["betas"][0 if name == "beta1" else 1])
            else:
                hypers[name] = float(group[name])
    inner = make_optimizer(spec["name"], **_inner_kwargs(spec))
    state = inner.init(dict(params), hypers=hypers)
    if spec["name"] == "sgd":
        present = [
            per_param.get(k, {}).get("momentum_buffer") is not None for k in range(len(names))
        ]
        if any(present) and not all(present):
            raise ValueError("optimizer state has momentum buffers for only some parameters")
        for k, name in enumerate(names):
            if present[k]:
                state[f"momentum_buffer/{name}"] = (
                    per_param[k]["momentum_buffer"].to(params[name]).clone()
                )
                state[f"momentum_started/{name}"] = torch.ones_like(
                    state[f"momentum_started/{name}"]
                )
        return state
    present = [k in per_param for k in range(len(names))]
    if any(present) and not all(present):
        raise ValueError("optimizer state has Adam slots for only some parameters")
    if names and all(present):
        for k, name in enumerate(names):
            for slot in ("exp_avg", "exp_avg_sq"):
                state[f"{slot}/{name}"] = per_param[k][slot].to(params[name]).clone()
        state[STEP_KEY] = torch.full_like(state[STEP_KEY], float(per_param[0]["step"]))
    return state


def _inner_kwargs(spec: Mapping[str, Any]) -> dict[str, Any]:
    """Constructor arguments of the inner optimizer for an :func:`optimizer_config`."""
    return {k: v for k, v in spec.items() if k != "name"}


def inner_optimizer(spec: Mapping[str, Any]) -> InnerOptimizer:
    """The inner optimizer of an :func:`optimizer_config` (its values as the defaults)."""
    return make_optimizer(spec["name"], **_inner_kwargs(spec))
