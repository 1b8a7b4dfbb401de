"""Hypergradient tuning inside a Lightning ``Trainer`` (the optional extra ``lightning``).

Two callbacks:

* :class:`HyperparameterTuningCallback` adapts the learning rate (and, for SGD and AdamW, the
  weight decay) of the LightningModule's own optimizer from the hypergradient of a
  *validation* loss, while the Trainer trains as usual: automatic optimization, the user's
  ``training_step``, gradient accumulation, clipping, mixed precision, schedulers.
* :class:`HypergradientLogger` logs the learning rate of every param group (and, for the
  drop-in optimizers of :mod:`gradhpo.optim.hd`, their last hypergradient) to the Trainer's
  logger. The HD optimizers need nothing else: ``configure_optimizers`` may return
  ``SGDHD(...)`` / ``AdamHD(...)`` like any ``torch.optim`` optimizer, and they adapt their
  own lr from the *training* loss.

What the tuning callback computes (greedy, one step)
    torch's SGD (any momentum, dampening, Nesterov, weight decay), Adam and AdamW move the
    weights by ``w_t = w_{t-1} + dw_t`` with ``dw_t = -lr * u_t``, where the direction
    ``u_t`` does not depend on that step's lr. Holding everything before the step fixed (the
    momentum and moment buffers, as the engine's ``greedy`` method does), the derivative of
    the validation loss after the step with respect to ``log lr`` is therefore exactly

        d L_val(w_t) / d log(lr) = grad L_val(w_t) . dw_t

    and, for the weight decay (L2 in SGD, decoupled in AdamW), with the snapshot
    ``w_{t-1}`` and the factor ``k`` by which the step multiplies the decay term
    (1 for AdamW and plain SGD; ``1 - dampening`` once SGD's momentum buffer exists, 1 at its
    first step; ``1 + momentum * that`` with Nesterov),

        d L_val(w_t) / d log(wd) = -lr * wd * k * grad L_val(w_t) . w_{t-1}.

    ``dw_t`` is read off the weights (a snapshot is taken in ``on_before_optimizer_step``,
    after the gradients are final, and compared in ``on_train_batch_end``), so the callback
    never re-implements the optimizer and works with whatever the Trainer does to form the
    gradient. It costs one copy of the weights and one forward/backward of a validation
    batch per tuned step (``every`` spaces them out). The hyperparameters live as log-values
    (positivity by parametrization), one per param group, stepped by an outer Adam (or SGD)
    with ``hyper_lr``: the same update as :class:`~gradhpo.optim.OnlineHyperTuner` with
    ``method="greedy"``, which the tests hold it to.

Why greedy only
    A K-step hypergradient (``reverse``, ``forward``) differentiates through K training steps,
    so it must own them: it needs the training loss as a function of the weights, which a
    Lightning ``training_step`` does not give. For those, train with
    :class:`~gradhpo.optim.OnlineHyperTuner` in a plain loop (or ``gradhpo train`` with a
    ``tuner`` section). Short horizons are biased toward small learning rates (Wu et al. 2018);
    the greedy signal is the cheapest and the most biased.

What it refuses, with an error naming the option: a manual-optimization module
(``automatic_optimization = False``), more than one optimizer, an optimizer other than
``torch.optim.SGD`` / ``Adam`` / ``AdamW`` (including the HD optimizers, which adapt their own
lr), ``maximize=True``, a tensor lr, tuning the weight decay of Adam's L2 form (use AdamW) or
from 0 (a log-value must start > 0), and strategies that shard the weights (FSDP, DeepSpeed):
single-device and DDP only (under DDP the hypergradient is averaged over processes, so every
process takes the same hyper step).

Schedulers and other writers of ``group["lr"]``: the callback applies its hyper step as a
factor on the value the group holds (``lr <- lr * exp(step of log lr)``) and reads the group
again before the next tuned step, so a scheduler that rescales the lr (``StepLR``,
``ExponentialLR``) composes with the adaptation; one that recomputes it from base values
(``LambdaLR``, ``OneCycleLR``) overwrites it.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.fabric.utilities import move_data_to_device
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, SingleDeviceStrategy

from gradhpo.optim.hd import HypergradientOptimizer

__all__ = ["HyperparameterTuningCallback", "HypergradientLogger", "TUNABLE", "SUPPORTED_OPTIMIZERS"]

Tensor = torch.Tensor
#: What the tuning callback adapts.
TUNABLE = ("lr", "weight_decay")
#: The optimizers whose greedy hypergradient the callback computes exactly (exact types).
SUPPORTED_OPTIMIZERS = (torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW)
HYPER_OPTIMIZERS = ("adam", "sgd")
LOGGING_INTERVALS = ("step", "epoch")
_FORMAT = "gradhpo.lightning/1"


def _positive_number(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"{name} must be a number > 0, got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return float(value)


def _metric_names(base: str, n_optimizers: int, n_groups: Sequence[int]) -> list[list[str]]:
    """``base`` for one optimizer with one group, else ``base/opt<j>`` and ``/pg<i>`` suffixes
    where there is more than one."""
    names = []
    for j, groups in enumerate(n_groups):
        head = base if n_optimizers == 1 else f"{base}/opt{j}"
        names.append([head if groups == 1 else f"{head}/pg{i}" for i in range(groups)])
    return names


class HyperparameterTuningCallback(Callback):
    """Greedy validation-loss hypergradient tuning of the optimizer's lr (and weight decay)
    in a Lightning ``Trainer`` (see the module docstring for what it computes).

    Args:
        val_batches: where validation batches come from: a sequence of batches (indexed in
            order, cycled), any other iterable of batches such as a ``DataLoader`` (cycled
            when exhausted), or a callable returning one batch. Batches are moved to the
            module's device. Exact resumption from a checkpoint needs a deterministic source
            (a sequence, or a loader without shuffling).
        tune: what to adapt, from :data:`TUNABLE`; one value per param group.
        hyper_lr: step size of the outer optimizer on the log-values.
        hyper_optimizer: ``adam`` (default) or ``sgd`` on the log-values.
        every: take a hyper step after every ``every``-th optimizer step (the others cost
            nothing extra).
        clip: clip the global norm of the hypergradient (over groups and names) to this.
        loss_fn: ``loss_fn(module(x), y)`` on a batch ``(x, y, ...)``, a scalar or per-example
            values (their mean is taken); default cross-entropy.
        val_loss: instead of ``loss_fn``, ``val_loss(module, batch) -> scalar`` for batches of
            any other shape.
        log: log the values (``<prefix>lr``, ``<prefix>weight_decay``), the validation loss
            and the hypergradient norm of each hyper step with ``pl_module.log``.
        logging_interval: ``step`` (every tuned step, subject to the Trainer's
            ``log_every_n_steps``) or ``epoch`` (the values at the end of each epoch).
        prefix: metric-name prefix.

    After a step, :attr:`values` holds the current values per param group,
    :attr:`last_hypergradient` the last hypergradient (d val loss / d log value) per group.
    """

    def __init__(
        self,
        val_batches: Sequence[Any] | Iterable[Any] | Callable[[], Any],
        *,
        tune: Sequence[str] = ("lr",),
        hyper_lr: float = 0.02,
        hyper_optimizer: str = "adam",
        every: int = 1,
        clip: float | None = None,
        loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
        val_loss: Callable[[pl.LightningModule, Any], Tensor] | None = None,
        log: bool = True,
        logging_interval: str = "step",
        prefix: str = "hyper/",
    ) -> None:
        super().__init__()
        if isinstance(tune, str) or not isinstance(tune, Sequence) or not tune:
            raise ValueError(
                f"tune: expected a non-empty list of names from {TUNABLE}, got {tune!r}"
            )
        unknown = [name for name in tune if name not in TUNABLE]
        if unknown or len(set(tune)) != len(tune):
            raise ValueError(
                f"tune: {list(tune)!r} - each name once, from {list(TUNABLE)} (the greedy "
                "callback has no derivative for the others)"
            )
        self.tune = tuple(tune)
        self.hyper_lr = _positive_number("hyper_lr", hyper_lr)
        if hyper_optimizer not in HYPER_OPTIMIZERS:
            raise ValueError(
                f"hyper_optimizer: unknown {hyper_optimizer!r}; choose one of {list(HYPER_OPTIMIZERS)}"
            )
        self.hyper_optimizer = hyper_optimizer
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be an integer >= 1, got {every!r}")
        self.every = every
        self.clip = None if clip is None else _positive_number("clip", clip)
        if loss_fn is not None and val_loss is not None:
            raise ValueError("loss_fn and val_loss: give one of them, not both")
        for name, fn in (("loss_fn", loss_fn), ("val_loss", val_loss)):
            if fn is not None and not callable(fn):
                raise TypeError(f"{name} must be callable, got {fn!r}")
        self.loss_fn = loss_fn or F.cross_entropy
        self.val_loss = val_loss
        if not isinstance(log, bool):
            raise ValueError(f"log must be true or false, got {log!r}")
        self.log = log
        if logging_interval not in LOGGING_INTERVALS:
            raise ValueError(
                f"logging_interval: unknown {logging_interval!r}; choose one of {list(LOGGING_INTERVALS)}"
            )
        self.logging_interval = logging_interval
        self.prefix = str(prefix)

        if callable(val_batches) and not isinstance(val_batches, Iterable):
            self._val_callable: Callable[[], Any] | None = val_batches
            self._val_source: Any = None
        elif isinstance(val_batches, Iterable) and not isinstance(val_batches, (str, bytes)):
            self._val_callable = None
            self._val_source = val_batches
        else:
            raise TypeError(
                "val_batches: expected a sequence or iterable of batches or a callable "
                f"returning one, got {val_batches!r}"
            )
        self._val_iter: Iterator[Any] | None = None
        self._val_drawn = 0  # batches drawn in all
        self._val_position = 0  # batches drawn from the current pass over an iterable

        # Bound at fit start.
        self._optimizer: torch.optim.Optimizer | None = None
        self.raw: dict[str, Tensor] = {}  # log-values, (n_groups,) float64 leaves
        self.outer: torch.optim.Optimizer | None = None
        self._written: dict[str, list[float]] = {}  # what the callback last wrote per group
        self._previous_raw: dict[str, Tensor] = {}
        self._snapshot: dict[str, Any] | None = None
        self._loaded: dict[str, Any] | None = None
        self.hyper_steps = 0
        self.rejected_steps = 0  # non-finite validation loss or hypergradient: hypers rolled back
        self.skipped_steps = 0  # tuned steps whose optimizer step moved nothing (e.g. AMP skip)
        self.last_hypergradient: dict[str, list[float]] = {}
        self.last_val_loss = math.nan

    # ------------------------------------------------------------------ Lightning state key
    @property
    def state_key(self) -> str:
        return self._generate_state_key(tune=list(self.tune), every=self.every)

    @property
    def values(self) -> dict[str, list[float]]:
        """Current values per param group (empty before the fit starts)."""
        return {name: [math.exp(v) for v in raw.tolist()] for name, raw in self.raw.items()}

    # ------------------------------------------------------------------ binding and checks
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not pl_module.automatic_optimization:
            raise ValueError(
                "HyperparameterTuningCallback: automatic_optimization=False is not supported "
                "(it reads the step the Trainer takes); tune a manual loop with "
                "gradhpo.optim.OnlineHyperTuner instead"
            )
        strategy = trainer.strategy
        if not isinstance(strategy, (SingleDeviceStrategy, DDPStrategy)) or isinstance(
            strategy, DeepSpeedStrategy
        ):
            raise ValueError(
                f"HyperparameterTuningCallback: strategy {type(trainer.strategy).__name__} is "
                "not supported (single device or DDP: the weights must not be sharded)"
            )
        optimizers = trainer.optimizers
        if len(optimizers) != 1:
            raise ValueError(
                f"HyperparameterTuningCallback: expected one optimizer, configure_optimizers "
                f"gave {len(optimizers)}"
            )
        optimizer = optimizers[0]
        if isinstance(optimizer, HypergradientOptimizer):
            raise TypeError(
                f"HyperparameterTuningCallback: {type(optimizer).__name__} adapts its own lr; "
                "use it alone (with HypergradientLogger to log it) or give a torch.optim "
                "SGD/Adam/AdamW to the callback"
            )
        if type(optimizer) not in SUPPORTED_OPTIMIZERS:
            raise TypeError(
                f"HyperparameterTuningCallback: optimizer {type(optimizer).__name__} is not "
                f"supported; expected one of {[c.__name__ for c in SUPPORTED_OPTIMIZERS]}"
            )
        for i, group in enumerate(optimizer.param_groups):
            if group.get("maximize", False):
                raise ValueError(
                    f"HyperparameterTuningCallback: param group {i} has maximize=True; the "
                    "callback minimizes a validation loss with a minimizing optimizer"
                )
            for name in self.tune:
                value = group[name]
                if isinstance(value, Tensor):
                    raise ValueError(
                        f"HyperparameterTuningCallback: param group {i} has a tensor {name} "
                        f"({value!r}); give a float"
                    )
                if (
                    name == "weight_decay"
                    and type(optimizer) is torch.optim.Adam
                    and not group.get("decoupled_weight_decay", False)
                ):
                    raise ValueError(
                        "HyperparameterTuningCallback: tune 'weight_decay' with Adam's L2 "
                        "form is not supported (it passes through the normalization); "
                        "use AdamW"
                    )
                if not (value > 0 and math.isfinite(value)):
                    raise ValueError(
                        f"HyperparameterTuningCallback: param group {i} has {name}={value!r}; "
                        f"a tuned {name} must start > 0 and finite (it is tuned as a log-value)"
                    )
        self._bind(optimizer)

    def _bind(self, optimizer: torch.optim.Optimizer) -> None:
        self._optimizer = optimizer
        groups = optimizer.param_groups
        self.raw = {
            name: torch.tensor(
                [math.log(float(g[name])) for g in groups], dtype=torch.float64
            ).requires_grad_()
            for name in self.tune
        }
        leaves = list(self.raw.values())
        if self.hyper_optimizer == "adam":
            self.outer = torch.optim.Adam(leaves, lr=self.hyper_lr)
        else:
            self.outer = torch.optim.SGD(leaves, lr=self.hyper_lr)
        self._written = {name: [float(g[name]) for g in groups] for name in self.tune}
        self._previous_raw = {k: v.detach().clone() for k, v in self.raw.items()}
        self._snapshot = None
        if self._loaded is not None:
            state, self._loaded = self._loaded, None
            self._apply_state(state)
        else:
            self.hyper_steps = self.rejected_steps = self.skipped_steps = 0
            self._val_drawn = self._val_position = 0
            self._val_iter = None

    # ------------------------------------------------------------------ the step
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        if optimizer is not self._optimizer:
            return
        self._snapshot = None
        if (trainer.global_step + 1) % self.every != 0:
            return
        self._read_groups()
        sgd = type(optimizer) is torch.optim.SGD
        groups = []
        for group in optimizer.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            entry: dict[str, Any] = {
                "params": params,
                "before": [p.detach().clone() for p in params],
                "lr": float(group["lr"]),
            }
            if "weight_decay" in self.tune:
                entry["weight_decay"] = float(group["weight_decay"])
                entry["decay_factor"] = [
                    self._sgd_decay_factor(group, optimizer.state.get(p, {})) if sgd else 1.0
                    for p in params
                ]
            groups.append(entry)
        self._snapshot = {"groups": groups}

    @staticmethod
    def _sgd_decay_factor(group: Mapping[str, Any], state: Mapping[str, Any]) -> float:
        """d(SGD direction)/d(weight_decay) per unit of w_{t-1}, torch's rules: the momentum
        buffer starts as the gradient (no dampening) and is damped afterwards."""
        momentum = float(group["momentum"])
        started = momentum != 0 and state.get("momentum_buffer") is not None
        c = 1.0 - float(group["dampening"]) if started else 1.0
        return 1.0 + momentum * c if group["nesterov"] else c

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        snapshot, self._snapshot = self._snapshot, None
        if snapshot is None:
            return
        deltas = [
            [p.detach() - b for p, b in zip(g["params"], g["before"], strict=True)]
            for g in snapshot["groups"]
        ]
        if not any(bool(d.any()) for group in deltas for d in group):
            self.skipped_steps += 1  # the optimizer did not move (e.g. a GradScaler skip)
            return
        val_loss, val_grads = self._validation_gradient(pl_module, snapshot)
        grads = self._raw_gradients(snapshot, deltas, val_grads, pl_module.device)
        # DDP: every process must take the same hyper step.
        parts = list(grads.values())
        stacked = torch.cat([val_loss.detach().reshape(1).to(parts[0]), *parts])
        stacked = trainer.strategy.reduce(stacked, reduce_op="mean").to("cpu", torch.float64)
        self.last_val_loss = float(stacked[0])
        offset = 1
        for name in grads:
            n = grads[name].numel()
            grads[name] = stacked[offset : offset + n]
            offset += n
        self.last_hypergradient = {name: g.tolist() for name, g in grads.items()}
        norm = float(torch.linalg.vector_norm(torch.cat(list(grads.values()))))
        if not (math.isfinite(self.last_val_loss) and math.isfinite(norm)):
            self._reject()
        else:
            self._outer_step(grads, norm)
        if self.log and self.logging_interval == "step":
            self._log(pl_module, norm)

    def _validation_gradient(
        self, pl_module: pl.LightningModule, snapshot: Mapping[str, Any]
    ) -> tuple[Tensor, list[list[Tensor | None]]]:
        batch = move_data_to_device(self._next_val(), pl_module.device)
        params = [p for g in snapshot["groups"] for p in g["params"]]
        modes = [(m, m.training) for m in pl_module.modules()]
        pl_module.eval()
        try:
            with torch.enable_grad():
                if self.val_loss is not None:
                    loss = self.val_loss(pl_module, batch)
                else:
                    loss = self.loss_fn(pl_module(batch[0]), batch[1])
                if not isinstance(loss, Tensor):
                    raise TypeError(f"the validation loss must be a tensor, got {loss!r}")
                loss = loss.mean()
                flat = torch.autograd.grad(loss, params, allow_unused=True)
        finally:
            for module, training in modes:
                module.training = training
        grads: list[list[Tensor | None]] = []
        i = 0
        for g in snapshot["groups"]:
            n = len(g["params"])
            grads.append(list(flat[i : i + n]))
            i += n
        return loss.detach(), grads

    def _raw_gradients(
        self,
        snapshot: Mapping[str, Any],
        deltas: list[list[Tensor]],
        val_grads: list[list[Tensor | None]],
        device: torch.device,
    ) -> dict[str, Tensor]:
        """d val loss / d log value, one entry per param group, on ``device``."""

        total_dtype = torch.float32 if device.type == "mps" else torch.float64  # no float64 there

        def dot(a: Tensor | None, b: Tensor) -> Tensor:
            if a is None:
                return torch.zeros((), dtype=total_dtype, device=device)
            acc = torch.promote_types(b.dtype, torch.float32)
            return torch.sum(a.to(acc) * b.to(acc)).to(device, total_dtype)

        zero = torch.zeros((), dtype=total_dtype, device=device)
        out: dict[str, Tensor] = {}
        for name in self.tune:
            per_group = []
            for g, delta, vg in zip(snapshot["groups"], deltas, val_grads, strict=True):
                if name == "lr":
                    total = sum((dot(a, d) for a, d in zip(vg, delta, strict=True)), zero)
                else:
                    total = sum(
                        (
                            k * dot(a, w)
                            for a, w, k in zip(vg, g["before"], g["decay_factor"], strict=True)
                        ),
                        zero,
                    )
                    total = -g["lr"] * g["weight_decay"] * total
                per_group.append(total)
            out[name] = torch.stack(per_group)
        return out

    def _outer_step(self, grads: Mapping[str, Tensor], norm: float) -> None:
        assert self.outer is not None
        self._previous_raw = {k: v.detach().clone() for k, v in self.raw.items()}
        scale = self.clip / norm if self.clip is not None and norm > self.clip else 1.0
        for name, leaf in self.raw.items():
            leaf.grad = grads[name] * scale
        self.outer.step()
        self.outer.zero_grad(set_to_none=True)
        self.hyper_steps += 1
        self._write_groups(relative=True)

    def _reject(self) -> None:
        self.rejected_steps += 1
        with torch.no_grad():
            for name, leaf in self.raw.items():
                leaf.copy_(self._previous_raw[name])
        self._write_groups(relative=False)

    # ------------------------------------------------------------------ param groups
    @torch.no_grad()
    def _read_groups(self) -> None:
        """A value written by someone else since (a scheduler) becomes the value tuned on."""
        assert self._optimizer is not None
        for name, leaf in self.raw.items():
            for i, group in enumerate(self._optimizer.param_groups):
                value = float(group[name])
                if value != self._written[name][i]:
                    leaf[i] = math.log(value)
                    self._written[name][i] = value

    @torch.no_grad()
    def _write_groups(self, relative: bool) -> None:
        """Write the log-values to the groups. ``relative``: as a factor on what a group
        holds now (the step's change of the log-value; a scheduler may have moved it since
        the snapshot), else the values themselves."""
        assert self._optimizer is not None
        for name, leaf in self.raw.items():
            for i, group in enumerate(self._optimizer.param_groups):
                current = float(group[name])
                if relative and current != self._written[name][i] and current > 0:
                    leaf[i] += math.log(current) - math.log(self._written[name][i])
                value = math.exp(float(leaf[i]))
                group[name] = value
                self._written[name][i] = value

    # ------------------------------------------------------------------ validation batches
    def _next_val(self) -> Any:
        self._val_drawn += 1
        if self._val_callable is not None:
            return self._val_callable()
        source = self._val_source
        if isinstance(source, Sequence):
            if len(source) == 0:
                raise ValueError("val_batches is empty")
            return source[(self._val_drawn - 1) % len(source)]
        if self._val_iter is None:  # first draw, or after a resume: skip what was drawn
            self._val_iter = iter(source)
            for _ in range(self._val_position):
                next(self._val_iter)
        try:
            batch = next(self._val_iter)
        except StopIteration:
            self._val_iter = iter(source)
            self._val_position = 0
            try:
                batch = next(self._val_iter)
            except StopIteration:
                raise ValueError("val_batches is empty") from None
        self._val_position += 1
        return batch

    # ------------------------------------------------------------------ logging
    def _log(self, pl_module: pl.LightningModule, norm: float | None) -> None:
        on_step = self.logging_interval == "step"
        kwargs: dict[str, Any] = {"on_step": on_step, "on_epoch": not on_step, "batch_size": 1}
        for name, values in self.values.items():
            names = _metric_names(self.prefix + name, 1, [len(values)])[0]
            for metric, value in zip(names, values, strict=True):
                pl_module.log(metric, value, **kwargs)
        if norm is not None:
            pl_module.log(self.prefix + "val_loss", self.last_val_loss, **kwargs)
            pl_module.log(self.prefix + "hypergrad_norm", norm, **kwargs)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.log and self.logging_interval == "epoch" and self.raw:
            self._log(pl_module, None)

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        if self.outer is None:
            return dict(self._loaded) if self._loaded is not None else {}
        return {
            "format": _FORMAT,
            "tune": list(self.tune),
            "raw": {k: v.detach().clone() for k, v in self.raw.items()},
            "previous_raw": {k: v.clone() for k, v in self._previous_raw.items()},
            "outer": copy.deepcopy(self.outer.state_dict()),
            "written": {k: list(v) for k, v in self._written.items()},
            "hyper_steps": self.hyper_steps,
            "rejected_steps": self.rejected_steps,
            "skipped_steps": self.skipped_steps,
            "val_drawn": self._val_drawn,
            "val_position": self._val_position,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not state_dict:
            return
        if state_dict.get("format") != _FORMAT:
            raise ValueError(
                f"HyperparameterTuningCallback: unknown state format {state_dict.get('format')!r}"
                f" (expected {_FORMAT!r})"
            )
        if list(state_dict["tune"]) != list(self.tune):
            raise ValueError(
                f"HyperparameterTuningCallback: the checkpoint tuned {list(state_dict['tune'])}, "
                f"this callback tunes {list(self.tune)}"
            )
        if self.outer is None:
            self._loaded = dict(state_dict)  # applied when the fit binds the optimizer
        else:
            self._apply_state(state_dict)

    def _apply_state(self, state: Mapping[str, Any]) -> None:
        assert self.outer is not None and self._optimizer is not None
        n_groups = len(self._optimizer.param_groups)
        for name in self.tune:
            if state["raw"][name].shape != (n_groups,):
                raise ValueError(
                    f"HyperparameterTuningCallback: the checkpoint has {state['raw'][name].numel()}"
                    f" param group(s), the optimizer {n_groups}"
                )
        with torch.no_grad():
            for name, leaf in self.raw.items():
                leaf.copy_(state["raw"][name])
        self._previous_raw = {k: v.clone() for k, v in state["previous_raw"].items()}
        self.outer.load_state_dict(state["outer"])
        self._written = {k: [float(x) for x in v] for k, v in state["written"].items()}
        self.hyper_steps = int(state["hyper_steps"])
        self.rejected_steps = int(state["rejected_steps"])
        self.skipped_steps = int(state["skipped_steps"])
        self._val_drawn = int(state["val_drawn"])
        self._val_position = int(state["val_position"])
        self._val_iter = None
        for name in self.tune:
            for i, group in enumerate(self._optimizer.param_groups):
                group[name] = self._written[name][i]


class HypergradientLogger(Callback):
    """Log the learning rate of every param group of every optimizer after each training
    batch (or at the end of each epoch) with ``pl_module.log``: ``<prefix>lr`` for one
    optimizer with one group, ``<prefix>lr/opt<j>/pg<i>`` where there are several. For the HD
    optimizers (:mod:`gradhpo.optim.hd`) also their last hypergradient ``h`` per adaptation
    unit (``<prefix>hypergradient``, same naming; per-tensor units are averaged over the
    group's tensors that have one) and ``<prefix>skipped_lr_updates``.

    Args:
        logging_interval: ``step`` (subject to the Trainer's ``log_every_n_steps``) or ``epoch``.
        prefix: metric-name prefix.
    """

    def __init__(self, logging_interval: str = "step", prefix: str = "hd/") -> None:
        super().__init__()
        if logging_interval not in LOGGING_INTERVALS:
            raise ValueError(
                f"logging_interval: unknown {logging_interval!r}; choose one of {list(LOGGING_INTERVALS)}"
            )
        self.logging_interval = logging_interval
        self.prefix = str(prefix)

    def _log(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        on_step = self.logging_interval == "step"
        kwargs: dict[str, Any] = {"on_step": on_step, "on_epoch": not on_step, "batch_size": 1}
        optimizers = trainer.optimizers
        sizes = [len(o.param_groups) for o in optimizers]
        lr_names = _metric_names(self.prefix + "lr", len(optimizers), sizes)
        h_names = _metric_names(self.prefix + "hypergradient", len(optimizers), sizes)
        for j, optimizer in enumerate(optimizers):
            for i, group in enumerate(optimizer.param_groups):
                pl_module.log(lr_names[j][i], float(group["lr"]), **kwargs)
            if isinstance(optimizer, HypergradientOptimizer):
                for i, h in enumerate(_per_group(optimizer)):
                    if math.isfinite(h):
                        pl_module.log(h_names[j][i], h, **kwargs)
                name = self.prefix + "skipped_lr_updates"
                if len(optimizers) > 1:
                    name += f"/opt{j}"
                pl_module.log(name, float(optimizer.skipped_lr_updates), **kwargs)

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        if self.logging_interval == "step":
            self._log(trainer, pl_module)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.logging_interval == "epoch":
            self._log(trainer, pl_module)


def _per_group(optimizer: HypergradientOptimizer) -> list[float]:
    """The last hypergradient per param group: the shared one for ``adapt="optimizer"``, the
    group's own for ``"group"``, the mean over the group's tensors that have one for
    ``"tensor"``."""
    h = optimizer.hypergradients
    groups = optimizer.param_groups
    if len(h) == len(groups):
        return h
    if len(h) == 1:
        return h * len(groups)
    out, i = [], 0
    for group in groups:
        n = len(group["params"])
        finite = [v for v in h[i : i + n] if math.isfinite(v)]
        out.append(sum(finite) / len(finite) if finite else math.nan)
        i += n
    return out
