"""Optimizers that adapt their own learning rate by hypergradient descent.

Baydin et al., "Online Learning Rate Adaptation with Hypergradient Descent" (ICLR 2018). Every
optimizer here moves its parameters as ``theta_t = theta_{t-1} - lr * u_t`` with an update
direction ``u_t`` that does not depend on ``lr``. Treating the previous step's lr as the variable,

    h_t = d f(theta_{t-1}) / d lr = g_t . d theta_{t-1} / d lr = -g_t . u_{t-1},

where ``g_t`` is the gradient of the objective being minimized at ``theta_{t-1}`` (the current
step's gradient) and ``u_{t-1}`` the direction of the previous step. Before any parameter moves,
each adaptation unit (see ``adapt``) updates its learning rate once, then every parameter of the
unit takes its step with that same new lr:

* ``rule="additive"`` (the paper's main rule): ``lr_t = lr_{t-1} - beta * h_t``
  ``= lr_{t-1} + beta * g_t . u_{t-1}``;
* ``rule="multiplicative"`` (the paper's normalized variant):
  ``lr_t = lr_{t-1} * (1 - beta * h_t / (||g_t|| ||u_{t-1}||)) = lr_{t-1} * (1 + beta * cos)``,
  with ``cos`` the cosine between ``g_t`` and ``u_{t-1}``; when either norm is 0 the cosine is
  taken as 0 (lr unchanged).

The dot products and norms run over the unit's parameters. A parameter that has no stored
direction from the most recent applied step (the first step, a parameter that got no gradient
then) contributes nothing to the dot product (it did not move with that lr), and a unit none of
whose parameters has one keeps its lr: at the first step no lr changes. For the multiplicative
rule ``||g_t||`` is over every parameter of the unit that has a gradient (the norm of the full
vector), ``||u_{t-1}||`` over the stored directions.

``beta`` is ``hypergrad_lr``; ``hypergrad_lr=0`` reproduces :mod:`torch.optim` exactly: the
parameter update uses the same elementwise operations in the same order as torch's
multi-tensor (foreach) path, which on the CPU are those of its single-tensor path; checked bit
for bit in the tests against torch on the CPU with ``foreach`` False and True, and on CUDA with
the defaults (a CUDA test). The dot products are taken in the parameters' dtype and summed per
unit in Python floats (on the multi-tensor path first per device and dtype on the device, see
``foreach``).

Stacked levels (``hypergrad_lrs``, additive rule only)
    Chandra et al., "Gradient Descent: The Ultimate Optimizer" (NeurIPS 2022): beta itself can
    be adapted by hypergradient descent, and its rate by the next level, and so on.
    ``hypergrad_lrs=(kappa,)`` adapts ``beta`` with the fixed rate ``kappa``;
    ``(kappa, nu)`` adapts ``beta`` and ``kappa``, with ``nu`` fixed; and so on: the last
    entry is fixed, the others are initial values. Levels are ``beta_0 = lr``,
    ``beta_1 = hypergrad_lr``, ``beta_2, ... = hypergrad_lrs``. Since
    ``lr_t = lr_{t-1} - beta_{t-1} h_t``, the loss after the next step depends on the ``beta``
    of this step through ``lr_t`` alone (one step back, as ``h`` itself), so

        ``H_1 = d f(theta_t) / d beta_{t-1} = h_{t+1} * d lr_t / d beta_{t-1} = -h_{t+1} h_t``

    and in general ``H_k = -H_{k-1} * (H_{k-1} of the unit's previous update)``, ``H_0 = h``.
    At each step, per unit, the levels are updated top down, each with the new rate above it,
    then the lr with the new beta: for two levels ``beta_t = beta_{t-1} + kappa h_{t+1} h_t``,
    then ``lr_{t+1} = lr_t - beta_t h_{t+1}``. (This is the derivative autograd gives through
    one step of every level, as in Chandra et al.; note ``H_k`` scales like ``h^(2^k)``, so
    each level's rate has its own units.) Details:

    * every ``beta_k >= 0``: a negative result is raised to 0; since its update is additive,
      a beta at 0 comes back up when ``H_k`` turns negative. The lr keeps its clamps.
    * a level whose value did not move by exactly ``-beta_{k+1} H_k`` in the unit's previous
      update (first step, no hypergradient, skipped, clamped to 0 / ``lr_min`` / ``MAX_LR``)
      has no derivative by its rate: the level above it is not updated at this step;
    * a non-finite ``H_k`` or result skips that level's update and adds one to
      ``skipped_lr_updates``; a level whose rate is 0 is not touched (not even counted), so
      all higher rates 0 give exactly the one-level trajectory;
    * the rates and previous hypergradients live where the lr lives: in ``group["hypergrad_lr"]``,
      ``group["hypergrad_lrs"]`` (updated in place, the last entry unchanged) and
      ``group["hd_prev_hypergrads"]`` (every group, for ``adapt="optimizer"``); with
      ``adapt="tensor"`` in the tensor's state under the same keys, created from the group's
      values when the tensor first gets a gradient, and the group holds the per-level means,
      rescaling the tensors' values when written from outside, as for the lr. All of it is in
      ``state_dict()``. :attr:`hypergrad_rates` lists ``(beta_1, ..., beta_n)`` per unit.
    * the multiplicative rule normalizes ``h`` by the norms, which has no such chain: combining
      it with ``hypergrad_lrs`` raises ``ValueError``.

Adaptation units (``adapt``)
    ``"optimizer"``: one lr shared by all param groups (the paper's setting); the dot product is
    summed over every parameter of every group, and the shared value is kept in *every* group's
    ``"lr"`` (the groups must agree at all times: different values raise ``ValueError`` in the
    constructor, in ``add_param_group`` and at ``step``). ``hypergrad_lr``, ``rule`` and
    ``lr_min`` must then be equal in all groups too; a group added later takes them (and the
    current shared lr) from the first group unless it gives them.
    ``"group"`` (default): one lr per param group, in ``group["lr"]``.
    ``"tensor"``: one lr per parameter tensor, in ``optimizer.state[p]["lr"]`` (created from
    ``group["lr"]`` when the tensor first gets a gradient); after each step ``group["lr"]`` holds
    the arithmetic mean of its tensors' lrs (exactly their value where they are all equal), for
    logging.

Learning-rate schedulers
    The adapted lr is written to ``group["lr"]`` after every step and read back from it before
    the next, so a scheduler that writes ``group["lr"]`` between steps changes the value the
    adaptation continues from. Schedulers that compute the new value from the current
    ``group["lr"]`` (``StepLR``, ``MultiStepLR``, ``ExponentialLR``) therefore rescale the adapted
    lr (``StepLR(gamma=0.1)`` turns an adapted 0.37 into 0.037); schedulers that compute it from
    their base values (``LambdaLR``, ``OneCycleLR``, ``CyclicLR``) overwrite it, so adaptation
    only acts between their updates. With ``adapt="tensor"`` a new ``group["lr"]`` rescales
    every tensor lr of the group by ``new / old mean`` (all set to the new value if the old
    mean was 0 or they were all equal).

Safety
    * The lr never becomes negative or NaN: a non-finite hypergradient (or multiplicative factor)
      leaves the unit's lr unchanged for that step and adds one to ``skipped_lr_updates``; an
      adapted value below ``lr_min`` (default ``1e-10``) is raised to ``lr_min``, under both
      rules, and one above ``MAX_LR = 1e30`` is lowered to it (a larger lr is meaningless, and
      ``lr / (1 - beta1^t)`` must still be a float32 number for the kernels). With
      ``hypergrad_lr=0`` the lr is never touched (not even clamped).
    * A step whose gradient (after the L2 term, for SGD/Adam) holds a NaN or an infinity changes
      nothing - no parameter, buffer, counter or lr - sets ``diverged = True`` (sticky) and adds
      one to ``diverged_steps``. Later finite steps are applied as usual; stopping is the caller's
      decision. (This check is free in steady state: a non-finite gradient makes its dot product
      non-finite; tensors without a previous direction are checked explicitly.)
    * ``hypergradients`` holds the last ``h_t`` per unit (``nan`` where none was computed),
      ``learning_rates`` the current lr per unit (same layout).

Which step is "previous": the most recent *applied* step. A diverged step, or a step in which
no parameter had a gradient, moves nothing and does not count, so the next step still uses the
directions of the last step that did move the parameters.

State
    Per parameter, next to torch's own entries (``momentum_buffer``; ``step``, ``exp_avg``,
    ``exp_avg_sq``): ``hd_direction`` (``u`` of the last step the tensor took part in; for
    heavy-ball it is the momentum buffer itself, not a copy), ``hd_direction_scale`` (Adam: the
    stored tensor times this float is ``u``), ``hd_step`` (index of the applied step that stored
    it) and, with ``adapt="tensor"``, ``lr`` (with stacked levels also ``hypergrad_lr``,
    ``hypergrad_lrs`` and ``hd_prev_hypergrads``, kept in the param groups in the other modes).
    ``state_dict()`` adds one entry ``"hd"`` with ``adapt``, ``applied_steps``,
    ``skipped_lr_updates``, ``diverged`` and ``diverged_steps``; ``load_state_dict`` restores
    them, so a reloaded optimizer continues the same trajectory bit for bit. (A state dict
    without ``"hd"``, e.g. from ``torch.optim.SGD``, loads with the counters reset; the first
    step then adapts nothing.) The state is the same on both paths (see ``foreach``), so a
    state dict saved on one continues on the other.

Two paths (``foreach``), chosen per param group as torch.optim chooses them
    ``foreach=None`` (default) takes the multi-tensor path where every parameter of the group
    that has a gradient is on a device with foreach kernels (CUDA), else the per-tensor path;
    ``True`` / ``False`` force one (foreach ops run on the CPU too). The elementwise update is
    the same sequence of ``torch._foreach_*`` ops on both, the one torch's multi-tensor step
    runs (on the CPU a ``_foreach_*`` op is a loop over the tensors in C++, which is why
    ``hypergrad_lr=0`` equals torch.optim on either path there); the multi-tensor path runs it
    once per device and dtype, so that CUDA takes its fused multi-tensor kernels. They differ in
    the dot products: the per-tensor path takes one per tensor and sums them in Python floats;
    the multi-tensor path concatenates the gradients and directions of each (device, dtype)
    share of a unit into one vector and takes one dot product of it (two kernels however many
    tensors), so its ``h`` differs from the per-tensor path's in rounding only. Tensors of more
    than 2**22 elements take a dot product each (copying them would cost more than the launch
    saved), and with ``adapt="tensor"`` every tensor is its own unit, so both paths take one
    dot product per tensor there. ``load_state_dict`` takes ``foreach`` from the saved groups,
    as torch.optim does.

Cost per step over the base optimizer: the dot products, one stored direction per tensor (none
extra for heavy-ball; one division for Adam, two passes for AdamW with weight decay), for the
multiplicative rule two norms, and one host sync that reads the dot products back. Not
supported: sparse gradients, complex parameters, ``maximize``, ``amsgrad``,
``fused``/``capturable``/``differentiable`` switches, tensor lrs.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar, cast

import torch
from torch import Tensor
from torch._utils import _flatten_dense_tensors
from torch.optim import Optimizer
from torch.optim.optimizer import _default_to_fused_or_foreach

__all__ = [
    "ADAPT_MODES",
    "DEFAULT_LR_MIN",
    "MAX_LR",
    "RULES",
    "SGDHD",
    "SGDNHD",
    "AdamHD",
    "AdamWHD",
    "HypergradientOptimizer",
]

RULES = ("additive", "multiplicative")
ADAPT_MODES = ("optimizer", "group", "tensor")
DEFAULT_LR_MIN = 1e-10
MAX_LR = 1e30
_T = TypeVar("_T")
_CAT_LIMIT = 1 << 22  # elements: about the copy a GPU makes in the time of one kernel launch
_SHARED_KEYS = ("lr", "hypergrad_lr", "hypergrad_lrs", "rule", "lr_min", "hd_prev_hypergrads")


# --------------------------------------------------------------------------------------------
# validation helpers


def _finite(value: Any) -> float | None:
    """``value`` as a float if it is a finite real number (not a bool), else ``None``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None
    number = float(value)
    return number if math.isfinite(number) else None


def _real(
    name: str, value: Any, requirement: str, ok: Callable[[float], bool] = lambda v: True
) -> float:
    number = _finite(value)
    if number is None or not ok(number):
        raise ValueError(f"Invalid {name}: {value!r} (must be a {requirement})")
    return number


def _non_negative(name: str, value: Any) -> float:
    return _real(name, value, "finite number >= 0", lambda v: v >= 0)


def _reals(
    name: str, value: Any, requirement: str, ok: Callable[[float], bool], length: int | None = None
) -> tuple[float, ...]:
    """A sequence of finite numbers, each satisfying ``ok`` (and ``length`` of them if given)."""
    checked: list[float | None] = [None]
    if not isinstance(value, str | bytes | Tensor) and isinstance(value, Sequence):
        checked = [_finite(v) for v in value]
    if (length is not None and len(checked) != length) or any(
        v is None or not ok(v) for v in checked
    ):
        raise ValueError(f"Invalid {name}: {value!r} (must be {requirement})")
    return tuple(checked)  # type: ignore[arg-type]


def _choice(name: str, value: Any, choices: tuple[str, ...]) -> str:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"Invalid {name}: {value!r} (must be one of {', '.join(choices)})")
    return value


# --------------------------------------------------------------------------------------------
# values of the adaptation units, and the tensor arithmetic of a step


def _mean(values: list[float]) -> float:
    """The arithmetic mean; exactly the common value when all are equal."""
    if all(v == values[0] for v in values):
        return values[0]
    return sum(values) / len(values)


def _rescaled(values: list[float], target: float) -> list[float]:
    """``values`` scaled so that their mean becomes ``target`` (all set to it if the mean is 0 or
    all are equal)."""
    mean = _mean(values)
    if mean == 0 or all(v == values[0] for v in values):
        return [target] * len(values)
    return [v * (target / mean) for v in values]


def _level(values: dict[str, Any], level: int) -> float:
    """Level 0 is the lr, level k >= 1 the rate ``beta_k`` (``hypergrad_lr``, ``hypergrad_lrs``)
    of a param group or, with ``adapt="tensor"``, of a tensor's state."""
    return [values["lr"], values["hypergrad_lr"], *values["hypergrad_lrs"]][level]


def _set_level(values: dict[str, Any], level: int, value: float) -> None:
    if level < 2:
        values["lr" if level == 0 else "hypergrad_lr"] = value
    else:
        rates = list(values["hypergrad_lrs"])
        rates[level - 2] = value
        values["hypergrad_lrs"] = tuple(rates)


def _dot(a: Tensor, b: Tensor) -> Tensor:
    if a.is_contiguous() and b.is_contiguous():
        return torch.dot(a.view(-1), b.view(-1))
    return (a * b).sum()


def _dot_sum(grads: list[Tensor], directions: list[Tensor]) -> Tensor:
    """``sum_i grads[i] . directions[i]`` as one 0-d tensor; for several pairs (one device and
    dtype) one concatenation and one dot product, however many tensors."""
    if len(grads) == 1:
        return _dot(grads[0], directions[0])
    flat = _flatten_dense_tensors([*grads, *directions])  # flattened and concatenated in C++
    half = flat.numel() // 2
    return torch.dot(flat[:half], flat[half:])


def _group_indices(indices: list[int], keys: list[Any]) -> list[list[int]]:
    """``indices`` grouped by their ``keys`` (a parallel list), in order of first appearance."""
    if all(key == keys[0] for key in keys):  # the common case, quickly
        return [indices] if indices else []
    groups: dict[Any, list[int]] = {}
    for i, key in zip(indices, keys, strict=True):
        groups.setdefault(key, []).append(i)
    return list(groups.values())


def _pick(items: list[_T], indices: list[int]) -> list[_T]:
    return items if len(indices) == len(items) else [items[i] for i in indices]


def _read(values: list[Tensor]) -> list[float]:
    """The values of 0-d tensors as floats: one device-to-host copy (a host sync) per device."""
    if len(values) == 1:
        return [values[0].item()]
    read = [0.0] * len(values)
    for indices in _group_indices(list(range(len(values))), [v.device for v in values]):
        stacked = torch.stack([values[i] for i in indices]).tolist()
        for i, value in zip(indices, stacked, strict=True):
            read[i] = value
    return read


def _all_finite(tensors: list[Tensor]) -> bool:
    checks = [
        torch.isfinite(_flatten_dense_tensors([tensors[i] for i in indices])).all()
        for indices in _group_indices(list(range(len(tensors))), [t.device for t in tensors])
    ]
    return all(bool(check) for check in checks)


def _store(
    states: list[dict[str, Any]], directions: Sequence[Tensor], scales: list[float] | None = None
) -> None:
    """Keep ``u_t`` (the stored tensor times its scale) for the next step's hypergradient."""
    for i, (state, d) in enumerate(zip(states, directions, strict=True)):
        state["hd_direction"] = d
        if scales is not None:
            state["hd_direction_scale"] = scales[i]


# --------------------------------------------------------------------------------------------
# base class


@dataclass
class _Work:
    """What one param group contributes to a step: the tensors with a gradient."""

    group: dict[str, Any]
    foreach: bool  # the multi-tensor path (see the module docstring)
    params: list[Tensor]
    grads: list[Tensor]  # g_t as the hypergradient sees it (with the L2 term for SGD/Adam)
    states: list[dict[str, Any]]
    directions: list[Tensor | None]  # u_{t-1} up to a scale, None where there is none
    scales: list[float]
    # positions of the tensors with a direction, grouped into the sets whose dot products are
    # summed on the device (one tensor each on the per-tensor path), and per set that sum
    # times the scale: sum g_t . u_{t-1}
    sets: list[list[int]] = field(default_factory=list)
    dots: list[float] = field(default_factory=list)
    grad_sq: list[float] | None = None  # ||g_t||^2 per tensor (multiplicative rule only)
    dir_sq: list[float] | None = None  # ||u_{t-1}||^2 per tensor (nan where no direction)


@dataclass
class _Chain:
    """The hyper-learning rates of one unit (stacked levels) and its previous hypergradients.

    ``rates = [beta_1, ..., beta_n]`` (``hypergrad_lr``, then ``hypergrad_lrs``);
    ``previous[k]`` is ``H_k`` of the unit's last lr update (``H_0 = h``) where the value of
    level ``k`` (the lr for ``k = 0``, else ``beta_k``) then moved by exactly
    ``-beta_{k+1} H_k``, ``None`` where it did not (no chain to differentiate through).
    """

    rates: list[float]
    previous: list[float | None]

    @classmethod
    def read(cls, source: dict[str, Any]) -> _Chain:
        rates = [source["hypergrad_lr"], *source["hypergrad_lrs"]]
        previous = list(source["hd_prev_hypergrads"])
        if len(previous) != len(rates) - 1:  # the levels were changed by hand: start over
            previous = [None] * (len(rates) - 1)
        return cls(rates, previous)

    def write(self, target: dict[str, Any]) -> None:
        target["hypergrad_lr"] = self.rates[0]
        target["hypergrad_lrs"] = tuple(self.rates[1:])
        target["hd_prev_hypergrads"] = tuple(self.previous)


class HypergradientOptimizer(Optimizer):
    """Common machinery of the hypergradient-descent optimizers (see the module docstring).

    Subclasses define the base optimizer through ``_validate_settings`` (argument checks),
    ``_coupled_weight_decay`` (whether ``g_t``, used by both the update and the hypergradient,
    includes the L2 term) and ``_update`` (the torch.optim step of one device's and dtype's
    tensors, which also stores the new direction ``u_t``).
    """

    _coupled_weight_decay = True

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        defaults: dict[str, Any],
        adapt: str,
    ) -> None:
        self.adapt = _choice("adapt", adapt, ADAPT_MODES)
        self.skipped_lr_updates = 0
        self.diverged = False
        self.diverged_steps = 0
        self._applied_steps = 0
        self._last_h: dict[Any, float] = {}
        self._validate_settings(defaults)
        super().__init__(params, defaults)

    # ---------------------------------------------------------------- to define in subclasses

    def _validate_settings(self, settings: dict[str, Any]) -> None:
        """Check (and normalize to floats) every setting of a group or of the defaults."""
        settings["lr"] = _non_negative("lr", settings["lr"])
        settings["weight_decay"] = _non_negative("weight_decay", settings["weight_decay"])
        settings["hypergrad_lr"] = _non_negative("hypergrad_lr", settings["hypergrad_lr"])
        settings["rule"] = _choice("rule", settings["rule"], RULES)
        rates = settings["hypergrad_lrs"] = _reals(
            "hypergrad_lrs",
            settings["hypergrad_lrs"],
            "a sequence of finite numbers >= 0",
            lambda v: v >= 0,
        )
        if rates and settings["rule"] != "additive":
            raise ValueError(
                f"Invalid hypergrad_lrs: {rates!r} (stacked levels need rule='additive'; "
                f"rule={settings['rule']!r} normalizes the hypergradient, so its lr is no "
                "gradient-descent step in hypergrad_lr that a higher level could differentiate)"
            )
        if self.adapt != "tensor":  # the unit's previous hypergradients live in the group
            previous = settings.get("hd_prev_hypergrads")
            if not (
                isinstance(previous, tuple | list)
                and len(previous) == len(rates)
                and all(v is None or (type(v) is float and math.isfinite(v)) for v in previous)
            ):
                previous = (None,) * len(rates)  # a new group, a torch state dict: no chain yet
            settings["hd_prev_hypergrads"] = tuple(previous)
        settings["lr_min"] = _real(
            "lr_min", settings["lr_min"], "finite number > 0", lambda v: v > 0
        )
        if not (settings["foreach"] is None or isinstance(settings["foreach"], bool)):
            raise ValueError(
                f"Invalid foreach: {settings['foreach']!r} (must be None, True or False)"
            )

    def _update(
        self,
        group: dict[str, Any],
        params: list[Tensor],
        grads: list[Tensor],
        states: list[dict[str, Any]],
        lrs: list[float],
    ) -> None:
        raise NotImplementedError

    # ---------------------------------------------------------------- torch.optim contract

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if self.adapt == "optimizer" and self.param_groups and isinstance(param_group, dict):
            for key in _SHARED_KEYS:
                param_group.setdefault(key, self.param_groups[0][key])
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:
            self._validate_settings(group)
            for p in group["params"]:
                if p.is_complex():
                    raise ValueError(
                        f"{type(self).__name__} does not support complex parameters "
                        f"(got one of dtype {p.dtype})"
                    )
            if self.adapt == "optimizer":
                first = self.param_groups[0]
                for key in _SHARED_KEYS:
                    if group[key] != first[key]:
                        raise ValueError(
                            f"adapt='optimizer' shares one {key} across all param groups, but "
                            f"group {len(self.param_groups) - 1} has {key}={group[key]!r} and "
                            f"group 0 has {key}={first[key]!r}"
                        )
        except ValueError:
            self.param_groups.pop()
            raise

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["hd"] = {
            "adapt": self.adapt,
            "applied_steps": self._applied_steps,
            "skipped_lr_updates": self.skipped_lr_updates,
            "diverged": self.diverged,
            "diverged_steps": self.diverged_steps,
        }
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        hd = state_dict.pop("hd", None)
        if hd is not None and hd.get("adapt") != self.adapt:
            raise ValueError(
                f"state dict was saved with adapt={hd.get('adapt')!r}, "
                f"this optimizer has adapt={self.adapt!r}"
            )
        super().load_state_dict(state_dict)
        for group in self.param_groups:  # e.g. a torch.optim state dict: no hypergrad_lr, ...
            for key, value in self.defaults.items():
                group.setdefault(key, value)
            self._validate_settings(group)
        hd = hd or {}
        self._applied_steps = int(hd.get("applied_steps", 0))
        self.skipped_lr_updates = int(hd.get("skipped_lr_updates", 0))
        self.diverged = bool(hd.get("diverged", False))
        self.diverged_steps = int(hd.get("diverged_steps", 0))
        self._last_h = {}

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        for key in ("adapt", "skipped_lr_updates", "diverged", "diverged_steps"):
            state[key] = getattr(self, key)
        state["_applied_steps"] = self._applied_steps
        state["_last_h"] = self._last_h
        return state

    # ---------------------------------------------------------------- diagnostics

    def _units(self) -> list[tuple[Any, dict[str, Any], dict[str, Any]]]:
        """Per adaptation unit, as the diagnostics lay them out: its key in ``_last_h``, its
        param group, and the dict that holds its values (the group, with ``adapt="tensor"`` the
        tensor's state, whose values fall back to the group's until it has its own)."""
        if self.adapt != "tensor":
            groups = self.param_groups[:1] if self.adapt == "optimizer" else self.param_groups
            return [(key, g, g) for key, g in enumerate(groups)]
        return [
            ((gi, pi), g, self.state.get(p, {}))
            for gi, g in enumerate(self.param_groups)
            for pi, p in enumerate(g["params"])
        ]

    @property
    def hypergradients(self) -> list[float]:
        """``h_t`` of the last step per adaptation unit: one value (``adapt="optimizer"``), one
        per group, or one per parameter tensor in param-group order; ``nan`` where none was
        computed (first step, no gradient, a diverged step)."""
        return [self._last_h.get(key, math.nan) for key, _, _ in self._units()]

    @property
    def learning_rates(self) -> list[float]:
        """The current lr per adaptation unit, laid out like :attr:`hypergradients`."""
        return [values.get("lr", group["lr"]) for _, group, values in self._units()]

    @property
    def hypergrad_rates(self) -> list[tuple[float, ...]]:
        """The current ``(beta_1, ..., beta_n)`` (``hypergrad_lr``, then ``hypergrad_lrs``) per
        adaptation unit, laid out like :attr:`learning_rates`."""
        return [
            (source["hypergrad_lr"], *source["hypergrad_lrs"])
            for _, group, values in self._units()
            for source in [values if self._own_rates(values, group) else group]
        ]

    # ---------------------------------------------------------------- the step

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """Adapt the learning rate(s), then take one step of the base optimizer.

        Returns the closure's loss (``None`` without a closure).
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._absorb_external_lr_changes()
        works = [self._collect(group) for group in self.param_groups]
        self._reduce(works)
        if not self._gradients_finite(works):
            self.diverged = True
            self.diverged_steps += 1
            self._last_h = {}
            return loss
        lrs = self._adapt(works)
        if not any(work.params for work in works):
            return loss  # nothing moved: the last applied step stays the reference
        step_index = self._applied_steps + 1
        for work, work_lrs in zip(works, lrs, strict=True):
            for part in self._parts(work):
                self._update(
                    work.group,
                    _pick(work.params, part),
                    _pick(work.grads, part),
                    _pick(work.states, part),
                    _pick(work_lrs, part),
                )
            for state in work.states:
                state["hd_step"] = step_index
        self._applied_steps = step_index
        if self.adapt == "tensor":  # the group shows the mean of its tensors' values
            for group in self.param_groups:
                for level, (_, values) in enumerate(self._tensor_levels(group)):
                    _set_level(group, level, _mean(values))
        return loss

    def _collect(self, group: dict[str, Any]) -> _Work:
        params: list[Tensor] = []
        grads: list[Tensor] = []
        states: list[dict[str, Any]] = []
        directions: list[Tensor | None] = []  # u_{t-1} where the last applied step stored one
        scales: list[float] = []
        for p in group["params"]:
            grad = p.grad
            if grad is None:
                continue
            if grad.is_sparse:
                raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
            state = self.state[p]
            params.append(p)
            grads.append(grad)
            states.append(state)
            current = state.get("hd_step") == self._applied_steps
            directions.append(state.get("hd_direction") if current else None)
            scales.append(float(state.get("hd_direction_scale", 1.0)) if current else 1.0)
        foreach = group["foreach"]
        if foreach is None:  # torch.optim's default: foreach where every tensor is on CUDA
            foreach = _default_to_fused_or_foreach(params, differentiable=False)[1]
        if params and group["weight_decay"] != 0 and self._coupled_weight_decay:
            grads = list(torch._foreach_add(grads, params, alpha=group["weight_decay"]))
        return _Work(group, foreach, params, grads, states, directions, scales)

    @staticmethod
    def _parts(work: _Work) -> list[list[int]]:
        """The work's tensors as they go to ``_update``: all at once on the per-tensor path, per
        device and dtype on the multi-tensor path (torch's multi-tensor kernels need that)."""
        indices = list(range(len(work.params)))
        if work.foreach:
            return _group_indices(indices, [(p.device, p.dtype) for p in work.params])
        return [indices] if indices else []

    def _sets(self, work: _Work) -> list[list[int]]:
        """The tensors with a direction, grouped into the sets whose dot products are summed on
        the device: one per device, dtype and scale on the multi-tensor path, one per tensor on
        the per-tensor path, with ``adapt="tensor"`` (every tensor is its own unit) and for
        tensors of more than ``_CAT_LIMIT`` elements (copying them costs more than a launch)."""
        with_dir = [i for i, d in enumerate(work.directions) if d is not None]
        if not work.foreach or self.adapt == "tensor":
            return [[i] for i in with_dir]
        keys = [
            i if (g := work.grads[i]).numel() > _CAT_LIMIT else (g.device, g.dtype, work.scales[i])
            for i in with_dir
        ]
        return _group_indices(with_dir, keys)

    def _reduce(self, works: list[_Work]) -> None:
        """All dot products (and norms, for the multiplicative rule) with one host sync."""
        pending: list[Tensor] = []
        for work in works:
            work.sets = self._sets(work)
            directions = cast(list[Tensor], work.directions)
            for members in work.sets:
                grads = [work.grads[i] for i in members]
                pending.append(_dot_sum(grads, [directions[i] for i in members]))
            if work.group["rule"] == "multiplicative" and work.params:
                pending.extend(torch._foreach_norm(work.grads))
                stored = [d for d in directions if d is not None]
                if stored:
                    pending.extend(torch._foreach_norm(stored))
        values = iter(_read(pending) if pending else [])
        for work in works:
            work.dots = [next(values) * work.scales[members[0]] for members in work.sets]
            if work.group["rule"] == "multiplicative" and work.params:
                work.grad_sq = [v * v for v in (next(values) for _ in work.params)]
                work.dir_sq = [
                    math.nan if d is None else (next(values) * scale) ** 2
                    for d, scale in zip(work.directions, work.scales, strict=True)
                ]

    def _gradients_finite(self, works: list[_Work]) -> bool:
        # A NaN or infinity in g_t makes every dot product it enters non-finite, so only tensors
        # without a direction or in a set with a non-finite dot product need an explicit look.
        suspects: list[Tensor] = []
        for work in works:
            sets = zip(work.sets, work.dots, strict=True)
            checked = {i for members, dot in sets if math.isfinite(dot) for i in members}
            if len(checked) < len(work.grads):
                suspects.extend(g for i, g in enumerate(work.grads) if i not in checked)
        return not suspects or _all_finite(suspects)

    def _new_lr(
        self,
        lr: float,
        settings: dict[str, Any],
        dots: list[float],
        grad_sq: float,
        dir_sq: float,
        chain: _Chain | None = None,
    ) -> tuple[float, float]:
        """One unit's lr update from its dot products ``g_t . u_{t-1}`` (one per tensor, or per
        set of tensors summed on the device) and, for the multiplicative rule, the squared
        norms; returns ``(lr_t, h_t)``.

        With a ``chain`` (stacked levels) its rates are updated first, in place, and the lr
        then moves with the new ``beta_1``; ``chain.previous`` is set for the next step.
        """
        if not dots:
            if chain is not None:  # the unit moves without a hypergradient: the chain breaks
                chain.previous = [None] * len(chain.previous)
            return lr, math.nan
        h = -sum(dots)
        if not math.isfinite(h):
            self.skipped_lr_updates += 1
            if chain is not None:
                chain.previous = [None] * len(chain.previous)
            return lr, h
        if chain is None:
            beta = settings["hypergrad_lr"]
        else:
            self._climb(chain, h)
            beta = chain.rates[0]
        if beta == 0:
            return lr, h
        if settings["rule"] == "additive":
            new = lr - beta * h
        else:
            denominator = math.sqrt(grad_sq) * math.sqrt(dir_sq)
            if not math.isfinite(denominator):  # a norm overflowed: the cosine is unknown
                self.skipped_lr_updates += 1
                return lr, h
            if denominator == 0:
                return lr, h
            new = lr * (1.0 - beta * h / denominator)
        if not math.isfinite(new):
            self.skipped_lr_updates += 1
            if chain is not None:
                chain.previous[0] = None
            return lr, h
        clamped = min(max(new, settings["lr_min"]), MAX_LR)
        if chain is not None and clamped != new:  # d lr / d beta_1 = 0 at the clamp
            chain.previous[0] = None
        return clamped, h

    def _climb(self, chain: _Chain, h: float) -> None:
        """Update the stacked rates ``beta_1 .. beta_{n-1}`` of one unit from ``h_t`` (finite).

        ``H_0 = h_t``; ``H_k = -H_{k-1} * previous[k-1]`` is the derivative of the loss at
        the current point by the value ``beta_k`` had in the unit's previous update (one step
        back, as for ``h``), since then the value below moved by ``-beta_k H_{k-1}`` (previous).
        Top down, each level takes a gradient step with the (already updated) rate above it:
        ``beta_k <- max(beta_k - beta_{k+1} H_k, 0)``; ``beta_n`` is fixed. A level whose rate
        is 0 is left alone; a non-finite product or result skips that level's update (counted
        in ``skipped_lr_updates``); ``previous[0] = h`` is kept or cleared by the lr update.
        """
        levels = len(chain.previous)
        grads: list[float | None] = [h]
        for k in range(levels):
            below, before = grads[k], chain.previous[k]
            grads.append(None if below is None or before is None else -below * before)
        previous: list[float | None] = [h] + [None] * (levels - 1)
        for k in range(levels, 0, -1):
            grad, rate = grads[k], chain.rates[k]
            if grad is None:
                continue
            if rate == 0:  # beta_k stays: it still moved by exactly -0 * H_k
                if k < levels and math.isfinite(grad):
                    previous[k] = grad
                continue
            new = chain.rates[k - 1] - rate * grad
            if not math.isfinite(new):
                self.skipped_lr_updates += 1
                continue
            if new < 0:  # floored: the derivative through the floor is 0
                chain.rates[k - 1] = 0.0
                continue
            chain.rates[k - 1] = new
            if k < levels:
                previous[k] = grad
        chain.previous = previous

    def _adapt(self, works: list[_Work]) -> list[list[float]]:
        """Update every unit's lr (before any parameter moves); the lr of each tensor."""
        self._last_h = {}
        if self.adapt == "tensor":
            lrs = []
            for gi, work in enumerate(works):
                group = work.group
                index = {id(p): pi for pi, p in enumerate(group["params"])}
                work_lrs = []
                levels = len(group["hypergrad_lrs"])
                dot_of = {s[0]: dot for s, dot in zip(work.sets, work.dots, strict=True)}
                for i, (p, state) in enumerate(zip(work.params, work.states, strict=True)):
                    chain = None
                    if levels:
                        if not self._own_rates(state, group):  # first gradient
                            state["hypergrad_lr"] = group["hypergrad_lr"]
                            state["hypergrad_lrs"] = group["hypergrad_lrs"]
                            state["hd_prev_hypergrads"] = (None,) * levels
                        chain = _Chain.read(state)
                    lr, h = self._new_lr(
                        state.get("lr", group["lr"]),
                        group,
                        [dot_of[i]] if i in dot_of else [],
                        work.grad_sq[i] if work.grad_sq else math.nan,
                        work.dir_sq[i] if work.dir_sq else math.nan,
                        chain,
                    )
                    state["lr"] = lr
                    if chain is not None:
                        chain.write(state)
                    self._last_h[(gi, index[id(p)])] = h
                    work_lrs.append(lr)
                lrs.append(work_lrs)
            return lrs
        units = [works] if self.adapt == "optimizer" else [[w] for w in works]
        lrs = []
        for key, unit in enumerate(units):
            settings = unit[0].group
            dots = [d for w in unit for d in w.dots]
            grad_sq = sum(v for w in unit for v in (w.grad_sq or []))
            dir_sq = sum(v for w in unit for v in (w.dir_sq or []) if not math.isnan(v))
            # a unit none of whose tensors has a gradient does not move: its chain stays
            moves = any(w.params for w in unit)
            chain = _Chain.read(settings) if settings["hypergrad_lrs"] and moves else None
            lr, h = self._new_lr(settings["lr"], settings, dots, grad_sq, dir_sq, chain)
            self._last_h[key] = h
            for w in unit:  # one work per group: with "optimizer", every group gets it
                w.group["lr"] = lr
                if chain is not None:
                    chain.write(w.group)
                lrs.append([lr] * len(w.params))
        return lrs

    @staticmethod
    def _own_rates(state: dict[str, Any], group: dict[str, Any]) -> bool:
        """Tensor mode: whether a tensor's state holds its own stacked rates."""
        levels = len(group["hypergrad_lrs"])
        return levels > 0 and len(state.get("hypergrad_lrs", ())) == levels

    def _tensor_levels(
        self, group: dict[str, Any]
    ) -> list[tuple[list[dict[str, Any]], list[float]]]:
        """Tensor mode: per level (the lr, then with stacked levels ``beta_1 .. beta_n``) the
        states of the group's tensors that hold their own value, and those values; levels no
        tensor holds yet are left out."""
        states = [s for p in group["params"] if "lr" in (s := self.state.get(p, {}))]
        levels = [(states, [s["lr"] for s in states])] if states else []
        own = [s for s in states if self._own_rates(s, group)]
        rows = [[s["hypergrad_lr"], *s["hypergrad_lrs"]] for s in own]
        return levels + [(own, list(column)) for column in zip(*rows, strict=True)]

    def _absorb_external_lr_changes(self) -> None:
        """Pick up values a scheduler (or the user) wrote into ``group["lr"]`` (and, with
        stacked levels in tensor mode, into ``group["hypergrad_lr"]`` / ``["hypergrad_lrs"]``):
        with ``adapt="tensor"`` the tensors' values are rescaled (see ``_rescaled``)."""
        if self.adapt == "optimizer":
            keys = ["lr"]
            if self.param_groups[0]["hypergrad_lrs"]:  # adapted, so written to every group
                keys += ["hypergrad_lr", "hypergrad_lrs"]
            for key in keys:
                values = [g[key] for g in self.param_groups]
                if any(v != values[0] for v in values):
                    raise ValueError(
                        f"adapt='optimizer' keeps one {key} shared by all param groups, but the "
                        f"groups now hold different values {values}; set the same {key} in "
                        "every group"
                    )
        elif self.adapt == "tensor":  # a group value that is no longer the mean of its tensors'
            for group in self.param_groups:  # values was written there: rescale them to it
                for level, (states, values) in enumerate(self._tensor_levels(group)):
                    target = _level(group, level)
                    if target != _mean(values):
                        for state, value in zip(states, _rescaled(values, target), strict=True):
                            _set_level(state, level, value)


# --------------------------------------------------------------------------------------------
# SGD family


class SGDHD(HypergradientOptimizer):
    r"""SGD (optionally with heavy-ball momentum) whose lr adapts by hypergradient descent.

    Same arguments and defaults as :class:`torch.optim.SGD` (``lr=1e-3, momentum=0,
    dampening=0, weight_decay=0, nesterov=False``; ``nesterov=True`` is :class:`SGDNHD`), plus the keyword-only
    ``hypergrad_lr`` (beta, default ``1e-3``; its scale is lr^2 / loss, retune it with lr),
    ``hypergrad_lrs`` (rates of stacked higher levels, default none), ``rule``
    (``"additive"``/``"multiplicative"``), ``adapt`` (``"optimizer"``/``"group"``/``"tensor"``)
    and ``lr_min`` (default ``1e-10``); see :mod:`gradhpo.optim.hd`.

    The objective includes the L2 term, so ``g_t = grad f(theta_{t-1}) + wd * theta_{t-1}``
    exactly as torch adds it, and torch's step is ``theta_t = theta_{t-1} - lr * u_t`` with

    * no momentum: ``u_t = g_t``;
    * heavy ball: ``u_t = b_t = momentum * b_{t-1} + (1 - dampening) * g_t`` (``b_1 = g_1``),
      the momentum buffer itself.

    Hence ``h_t = -g_t . u_{t-1}`` and the additive rule reads
    ``lr_t = lr_{t-1} + beta * g_t . u_{t-1}`` (``g_t . g_{t-1}`` without momentum, the paper's
    SGD-HD). As in the paper, the dependence of the buffer on earlier lrs is neglected.
    """

    _nesterov = False

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        momentum: float = 0,
        dampening: float = 0,
        weight_decay: float = 0,
        nesterov: bool | None = None,
        *,
        hypergrad_lr: float = 1e-3,
        hypergrad_lrs: Sequence[float] = (),
        rule: str = "additive",
        adapt: str = "group",
        lr_min: float = DEFAULT_LR_MIN,
        foreach: bool | None = None,
    ) -> None:
        if nesterov is not None:  # as torch.optim.SGD(nesterov=...); SGDNHD is SGDHD(nesterov=True)
            if not isinstance(nesterov, bool):
                raise ValueError(f"Invalid nesterov: {nesterov!r} (expected True or False)")
            self._nesterov = nesterov
        defaults = {
            "lr": lr,
            "momentum": momentum,
            "dampening": dampening,
            "weight_decay": weight_decay,
            "nesterov": self._nesterov,
            "hypergrad_lr": hypergrad_lr,
            "hypergrad_lrs": hypergrad_lrs,
            "rule": rule,
            "lr_min": lr_min,
            "foreach": foreach,
        }
        super().__init__(params, defaults, adapt)

    def _validate_settings(self, settings: dict[str, Any]) -> None:
        super()._validate_settings(settings)
        settings["momentum"] = _non_negative("momentum", settings["momentum"])
        settings["dampening"] = _real("dampening", settings["dampening"], "finite number")
        name, nesterov = type(self).__name__, self._nesterov
        for key, bad, why in (
            ("nesterov", settings["nesterov"] is not nesterov,
             f"this {name} has nesterov={nesterov} for all its param groups"),
            ("momentum", nesterov and settings["momentum"] <= 0,
             f"{name} uses Nesterov momentum, which needs momentum > 0"),
            ("dampening", nesterov and settings["dampening"] != 0,
             f"{name} uses Nesterov momentum, which needs dampening = 0"),
        ):  # fmt: skip
            if bad:
                raise ValueError(f"Invalid {key}: {settings[key]!r} ({why})")

    def _update(
        self,
        group: dict[str, Any],
        params: list[Tensor],
        grads: list[Tensor],
        states: list[dict[str, Any]],
        lrs: list[float],
    ) -> None:
        momentum, dampening = group["momentum"], group["dampening"]
        directions = grads
        if momentum != 0:
            buffers: list[Tensor] = []
            old: list[int] = []
            for i, (state, g) in enumerate(zip(states, grads, strict=True)):
                if state.get("momentum_buffer") is None:  # as torch: the first buffer is g
                    state["momentum_buffer"] = g.detach().clone()
                else:
                    old.append(i)
                buffers.append(state["momentum_buffer"])
            if old:
                torch._foreach_mul_([buffers[i] for i in old], momentum)
                torch._foreach_add_(
                    [buffers[i] for i in old], [grads[i] for i in old], alpha=1 - dampening
                )
            if self._nesterov:
                directions = list(torch._foreach_add(grads, buffers, alpha=momentum))
            else:
                directions = buffers
        if all(lr == lrs[0] for lr in lrs):  # theta <- theta - lr * u, as torch's add_
            torch._foreach_add_(params, directions, alpha=-lrs[0])
        else:
            for p, d, lr in zip(params, directions, lrs, strict=True):
                p.add_(d, alpha=-lr)
        if momentum != 0 or group["weight_decay"] != 0:
            _store(states, directions)  # a fresh tensor (or the momentum buffer): no copy
            return
        # u_t is the user's .grad tensor: keep a copy (zero_grad may zero it in place), into the
        # stored tensor of the last step where there is a usable one.
        reuse = [
            i
            for i, (state, g) in enumerate(zip(states, grads, strict=True))
            if (stored := state.get("hd_direction")) is not None
            and stored is not state.get("momentum_buffer")
            and stored.shape == g.shape
            and stored.dtype == g.dtype
        ]
        if reuse:
            torch._foreach_copy_(
                [states[i]["hd_direction"] for i in reuse], [grads[i] for i in reuse]
            )
        fresh = [i for i in range(len(grads)) if i not in set(reuse)]
        _store([states[i] for i in fresh], [grads[i].detach().clone() for i in fresh])


class SGDNHD(SGDHD):
    r"""SGD with Nesterov momentum whose lr adapts by hypergradient descent (SGDN-HD).

    Arguments as :class:`SGDHD`; ``momentum`` must be given (> 0) and ``dampening`` must be 0,
    as for ``torch.optim.SGD(nesterov=True)``.

    torch's Nesterov step is ``b_t = momentum * b_{t-1} + g_t`` (``b_1 = g_1``) and
    ``theta_t = theta_{t-1} - lr * u_t`` with ``u_t = g_t + momentum * b_t``, where ``g_t``
    includes the L2 term. So ``h_t = -g_t . u_{t-1}`` with that ``u``, which is stored.
    """

    _nesterov = True


# --------------------------------------------------------------------------------------------
# Adam family


class AdamHD(HypergradientOptimizer):
    r"""Adam whose lr adapts by hypergradient descent (Adam-HD).

    Same arguments and defaults as :class:`torch.optim.Adam` (``lr=1e-3, betas=(0.9, 0.999),
    eps=1e-8, weight_decay=0``; no ``amsgrad``), plus the keyword-only ``hypergrad_lr``
    (default ``1e-7``: Adam's directions are O(1) per element, so beta is far smaller than for
    SGD), ``hypergrad_lrs``, ``rule``, ``adapt`` and ``lr_min``.

    With ``g_t`` the gradient including the (coupled) L2 term ``wd * theta_{t-1}``,
    ``m_t = beta1 m_{t-1} + (1 - beta1) g_t``, ``v_t = beta2 v_{t-1} + (1 - beta2) g_t^2`` and
    torch's bias corrections ``c1 = 1 - beta1^t``, ``c2 = 1 - beta2^t``, torch's step is
    ``theta_t = theta_{t-1} - lr * u_t`` with

        ``u_t = m_hat_t / (sqrt(v_hat_t) + eps) = (m_t / c1) / (sqrt(v_t) / sqrt(c2) + eps)``,

    so ``h_t = -g_t . u_{t-1}``. One lr update per unit and step, from the dot product summed
    over all the unit's tensors before any of them moves; every tensor then steps with the same
    new lr. (The authors' code updates the lr inside the per-tensor loop, so each tensor sees a
    different lr; not here.) The stored direction is ``m_t / (sqrt(v_t)/sqrt(c2) + eps)`` with
    the scale ``1 / c1`` kept beside it, which costs one division per element.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0,
        *,
        hypergrad_lr: float = 1e-7,
        hypergrad_lrs: Sequence[float] = (),
        rule: str = "additive",
        adapt: str = "group",
        lr_min: float = DEFAULT_LR_MIN,
        foreach: bool | None = None,
    ) -> None:
        defaults = {
            "lr": lr,
            "betas": betas,
            "eps": eps,
            "weight_decay": weight_decay,
            "hypergrad_lr": hypergrad_lr,
            "hypergrad_lrs": hypergrad_lrs,
            "rule": rule,
            "lr_min": lr_min,
            "foreach": foreach,
        }
        super().__init__(params, defaults, adapt)

    def _validate_settings(self, settings: dict[str, Any]) -> None:
        super()._validate_settings(settings)
        settings["betas"] = _reals(
            "betas", settings["betas"], "two finite numbers in [0, 1)", lambda v: 0 <= v < 1, 2
        )
        settings["eps"] = _non_negative("eps", settings["eps"])

    def _update(
        self,
        group: dict[str, Any],
        params: list[Tensor],
        grads: list[Tensor],
        states: list[dict[str, Any]],
        lrs: list[float],
    ) -> None:
        beta1, beta2 = group["betas"]
        eps, weight_decay = group["eps"], group["weight_decay"]
        for p, state in zip(params, states, strict=True):
            if "step" not in state:
                # as torch: a float32 step counter on the CPU, moments like the parameter
                state["step"] = torch.tensor(0.0, dtype=torch.float32)
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        steps = [state["step"] for state in states]
        exp_avgs = [state["exp_avg"] for state in states]
        exp_avg_sqs = [state["exp_avg_sq"] for state in states]
        torch._foreach_add_(steps, torch.tensor(1.0), alpha=1.0)  # as torch: one wrapped 1
        counts = [s.item() for s in steps]
        correction1 = [1 - beta1**t for t in counts]
        correction2_sqrt = [(1 - beta2**t) ** 0.5 for t in counts]
        torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
        torch._foreach_mul_(exp_avg_sqs, beta2)
        torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1 - beta2)
        denominators = torch._foreach_sqrt(exp_avg_sqs)
        torch._foreach_div_(denominators, correction2_sqrt)
        torch._foreach_add_(denominators, eps)
        if not self._coupled_weight_decay and weight_decay != 0:
            # u_t = wd * theta_{t-1} + m_hat / (sqrt(v_hat) + eps), taken before theta moves
            directions = torch._foreach_mul(params, weight_decay)
            torch._foreach_addcdiv_(
                directions, exp_avgs, denominators, [1 / c for c in correction1]
            )
            scales = [1.0] * len(params)
            torch._foreach_mul_(params, [1 - lr * weight_decay for lr in lrs])
        else:
            directions = torch._foreach_div(exp_avgs, denominators)
            scales = [1 / c for c in correction1]
        torch._foreach_addcdiv_(
            params,
            exp_avgs,
            denominators,
            [-(lr / c) for lr, c in zip(lrs, correction1, strict=True)],
        )
        _store(states, directions, scales)


class AdamWHD(AdamHD):
    r"""AdamW (decoupled weight decay) whose lr adapts by hypergradient descent.

    Same arguments and defaults as :class:`torch.optim.AdamW` (``weight_decay=1e-2``), plus the
    hypergradient arguments of :class:`AdamHD`.

    torch's AdamW step is ``theta_t = theta_{t-1} (1 - lr wd) - lr m_hat_t / (sqrt(v_hat_t) + eps)
    = theta_{t-1} - lr * u_t`` with ``u_t = m_hat_t / (sqrt(v_hat_t) + eps) + wd * theta_{t-1}``:
    the decay term is part of ``d theta_t / d lr``. The objective has no L2 term, so ``g_t`` is
    the raw gradient, and ``h_t = -g_t . u_{t-1}``. ``u_t`` is stored whole (two passes).
    """

    _coupled_weight_decay = False

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        *,
        hypergrad_lr: float = 1e-7,
        hypergrad_lrs: Sequence[float] = (),
        rule: str = "additive",
        adapt: str = "group",
        lr_min: float = DEFAULT_LR_MIN,
        foreach: bool | None = None,
    ) -> None:
        super().__init__(
            params,
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            hypergrad_lr=hypergrad_lr,
            hypergrad_lrs=hypergrad_lrs,
            rule=rule,
            adapt=adapt,
            lr_min=lr_min,
            foreach=foreach,
        )
