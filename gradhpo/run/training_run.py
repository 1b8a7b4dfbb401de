"""A training run: model + data + optimizer + step counter behind one small interface.

Search, PBT and the CLI all drive training through :class:`TrainingRun`:

* ``step(n)`` trains ``n`` optimizer steps and returns their mean training loss;
* ``evaluate(split)`` returns the mean loss on ``"train"``, ``"val"`` or ``"test"``, and the
  accuracy where the targets are class labels;
* ``hyperparameters`` reads and writes the continuous hyperparameters (lr, weight decay, ...);
* ``state_dict()`` / ``load_state_dict()`` and ``save()`` / ``from_checkpoint()`` give a
  bit-identical continuation on CPU: weights, optimizer state, batch order, augmentation and
  dropout randomness all resume where they stopped.

Each run owns its random stream: the global torch RNG is swapped in for the duration of a
``step``/``evaluate`` call and swapped out again, so several runs interleaved in one process
(a PBT population) do not disturb one another.
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gradhpo.data import Augment, BatchIterator, DataSplits, carve_split, load_data
from gradhpo.files import write_torch
from gradhpo.hyper.losses import LOSSES, LossFn, cross_entropy_per_example, resolve_loss
from gradhpo.hyper.optimizers import (
    OPTIMIZER_HYPERPARAMETERS,
    check_hyper_value,
    check_hyperparameter_update,
    optimizer_config,
    torch_optimizer,
)
from gradhpo.hyper.rng import RngState
from gradhpo.hyper.tuner import HyperTuner, TunerReport
from gradhpo.models import build_model

__all__ = [
    "RUN_FORMAT",
    "RUN_SECTIONS",
    "TRAINING_KEYS",
    "TrainingRun",
    "TUNER_KEYS",
    "upgrade_run_state",
    "resolve_device",
    "swapped_rng",
]

#: Keys of ``TrainingRun(tuner=...)``; all but ``hypers`` have defaults (_TUNER_DEFAULTS).
TUNER_KEYS = (
    "hypers",
    "method",
    "horizon",
    "truncate",
    "hyper_optimizer",
    "hyper_lr",
    "clip",
    "objective",
    "val_batch_size",
    "max_rejections",
    "every",
    "chunk",
    "compile",
    "checkpoint_every",
    "carry",
    "carry_decay",
    "hyper_val_fraction",
    "warm_segments",
)
_TUNER_DEFAULTS: dict[str, Any] = {
    "method": "reverse",
    "horizon": 10,
    "truncate": None,
    "hyper_optimizer": "adam",
    "hyper_lr": 0.05,
    "clip": None,
    "objective": "val",
    "val_batch_size": 256,
    "max_rejections": 5,
    "every": 1,
    "chunk": None,
    "compile": False,
    "checkpoint_every": 1,
    "carry": False,
    "carry_decay": 1.0,
    "hyper_val_fraction": None,
    "warm_segments": True,
}
#: Keys of a run config's ``training`` section that a run reads (``epochs`` is the loop's).
TRAINING_KEYS = (
    "epochs",
    "batch_size",
    "seed",
    "device",
    "augment",
    "eval_batch_size",
    "loss",
    "precision",
)
#: ``training.precision``: the autocast dtype of plain training and evaluation (float16 adds
#: a GradScaler). Mixed precision is for runs without a tuner: the hypergradient engine
#: differentiates through the update in the model's own dtype.
PRECISIONS: dict[str, torch.dtype | None] = {
    "float32": None,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
#: Sections of a run config (the YAML shape) that a run reads; job configs add ``name``,
#: ``output``, ``search`` or ``pbt``, which a run ignores.
RUN_SECTIONS = ("data", "model", "optimizer", "tuner", "training")
_JOB_SECTIONS = ("name", "output", "search", "pbt")
#: Format tag of :meth:`TrainingRun.state_dict` (2: config in the YAML shape, ``format`` key).
RUN_FORMAT = "gradhpo.run/2"


@contextmanager
def swapped_rng(owner: Any) -> Iterator[None]:
    """Swap ``owner``'s private random stream (its ``_rng_state``, ``_cuda_rng_state`` and
    ``device``) into torch's global RNG for a block, and save the advanced state back; the
    global stream is left as it was. Used by TrainingRun and BatchedPopulation."""
    devices = [owner.device] if owner.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        own = owner._cuda_rng_state is not None
        RngState(owner._rng_state, owner._cuda_rng_state, owner.device if own else None).restore()
        try:
            yield
        finally:
            now = RngState.capture(owner.device)
            owner._rng_state = now.cpu
            if own:
                owner._cuda_rng_state = now.cuda


def _callable_name(fn: Any) -> str:
    """What a run's config records for a loss given as a callable: ``"module:qualname"``
    where that imports back to the same function (so the config reloads), else a
    description that a reload refuses with a message naming ``training.loss``."""
    module, qualname = getattr(fn, "__module__", None), getattr(fn, "__qualname__", None)
    if module and qualname and "<" not in qualname:
        spec = f"{module}:{qualname}"
        try:
            if resolve_loss(spec) is fn:
                return spec
        except (ValueError, TypeError):
            pass
    return f"<not importable: {qualname or type(fn).__name__}>"


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"`` picks CUDA when available, else CPU; anything else is passed to torch."""
    if isinstance(device, torch.device):
        return device
    if not isinstance(device, str):
        raise TypeError(f"device must be a string or torch.device, got {device!r}")
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as exc:
        raise ValueError(f"device: unknown device {device!r}") from exc
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device: {device!r} requested but CUDA is not available")
    return resolved


class TrainingRun:
    """One model trained on one data set by one optimizer.

    Args:
        model: model config for :func:`models.build_model` (``{"name": "cnn", ...}``).
        data: a data set name, a mapping of :func:`gradhpo.data.load_dataset` arguments
            (``{"name": "digits", "seed": 0}``) or already loaded :class:`DataSplits`.
        optimizer: ``{"name": "sgd"|"adam"|"adamw", <hyperparameters>, "nesterov": bool}``.
        batch_size: training minibatch size.
        seed: seeds weight initialisation, batch order, augmentation and dropout.
        device: ``"auto"`` (CUDA when available), ``"cpu"``, ``"cuda"``, ``"cuda:1"``...
        augment: random crop + horizontal flip on training batches (for CIFAR-like images).
        eval_batch_size: batch size used by :meth:`evaluate`.
        tuner: tune continuous hyperparameters by hypergradient while training (see
            :data:`TUNER_KEYS`): ``{"hypers": [{"name": "lr", "init": 0.05}, ...],
            "method": "reverse", "horizon": 10, ...}``. The optimizer then runs as the
            differentiable inner optimizer of :mod:`gradhpo.hyper` (same arithmetic as
            torch.optim); a spec without ``init`` starts from the optimizer config's value.
        epochs: the training budget in epochs (``training.epochs``): the length of tuned
            schedules (``schedule: {segments: S}``) that do not give their own ``steps``.
        loss: the training loss (``training.loss``): a name of
            :data:`gradhpo.hyper.losses.LOSSES` (``cross_entropy``, ``mse``, ``l1``, ``huber``,
            ``bce_with_logits``), ``"package.module:function"`` or a callable, per example:
            ``loss(outputs, targets) -> (B,)``. Training minimizes its mean, :meth:`evaluate`
            reports its mean over a split, the tuner differentiates it.
        precision: ``float32`` (default), ``bfloat16`` or ``float16`` (mixed precision:
            forward passes under ``torch.autocast``, float16 with a ``GradScaler`` whose
            state is checkpointed); runs without a tuner only.
    """

    def __init__(
        self,
        *,
        model: Mapping[str, Any],
        data: str | Mapping[str, Any] | DataSplits,
        optimizer: Mapping[str, Any] | None = None,
        batch_size: int = 128,
        seed: int = 0,
        device: str | torch.device = "auto",
        augment: bool = False,
        eval_batch_size: int = 1024,
        tuner: Mapping[str, Any] | None = None,
        epochs: int | None = None,
        loss: str | LossFn = "cross_entropy",
        precision: str = "float32",
    ) -> None:
        for field, value in (("batch_size", batch_size), ("eval_batch_size", eval_batch_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{field} must be an integer >= 1, got {value!r}")
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed must be an integer >= 0, got {seed!r}")
        if not isinstance(augment, bool):
            raise TypeError(f"augment must be true or false, got {augment!r}")
        if epochs is not None and (
            isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1
        ):
            raise ValueError(f"epochs must be an integer >= 1, got {epochs!r}")
        # Denormal floats make late-training CPU steps up to ~25x slower; flushing them is harmless.
        torch.set_flush_denormal(True)

        self.device = resolve_device(device)
        self.seed = seed
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.optimizer_spec = optimizer_config(optimizer or {"name": "sgd"})

        data_spec, splits = load_data(data)
        self.data = splits.to(self.device)
        # The tuner's validation objective: the val split, or a hyper-validation split carved
        # from train (tuner.hyper_val_fraction), so val stays unseen by the hypergradients.
        self.hyper_val = self.data.val
        fraction = None if tuner is None else dict(tuner).get("hyper_val_fraction")
        if fraction is not None:
            try:
                train, self.hyper_val = carve_split(self.data.train, fraction, seed=0)
            except ValueError as error:
                raise ValueError(f"tuner.hyper_val_{error}") from None
            self.data = replace(self.data, train=train)
        self.model_config = dict(model)
        if not isinstance(precision, str) or precision not in PRECISIONS:
            raise ValueError(
                f"training.precision: expected one of {list(PRECISIONS)}, got {precision!r}"
            )
        if precision != "float32" and tuner is not None:
            raise ValueError(
                f"training.precision: {precision} is for plain training; the hypergradient "
                "tuner differentiates through the update in the model's dtype (use float32 "
                "or drop the tuner)"
            )
        self.precision = precision
        self.loss_fn: LossFn = resolve_loss(loss)
        if not self.data.classification and self.loss_fn is cross_entropy_per_example:
            raise ValueError(
                f"training.loss: cross_entropy needs integer class labels, but data "
                f"{self.data.name!r} has float targets of shape "
                f"{tuple(self.data.train.y.shape[1:]) or '(scalar)'}; choose a regression loss "
                f"({', '.join(n for n in LOSSES if n != 'cross_entropy')}) or your own"
            )
        # The run's config in the YAML shape (what from_config reads and checkpoints keep).
        self.config: dict[str, Any] = {
            "data": data_spec,
            "model": dict(model),
            "optimizer": dict(self.optimizer_spec),
            "tuner": None if tuner is None else dict(tuner),
            "training": {
                "batch_size": batch_size,
                "seed": seed,
                "augment": augment,
                "eval_batch_size": eval_batch_size,
                **({} if epochs is None else {"epochs": epochs}),
                "loss": loss if isinstance(loss, str) else _callable_name(loss),
                "precision": precision,
            },
        }

        # Private random stream of this run (weights init, dropout); see _own_rng.
        self._rng_state = torch.Generator().manual_seed(seed).get_state()
        self._cuda_rng_state: torch.Tensor | None = None
        if self.device.type == "cuda":
            with torch.cuda.device(self.device):
                gen = torch.Generator(device=self.device).manual_seed(seed)
                self._cuda_rng_state = gen.get_state()
        with self._own_rng():
            self.model: nn.Module = build_model(
                model, self.data.input_shape, self.data.num_classes
            ).to(self.device)
        self._buffers = list(self.model.buffers())
        self._check_loss_shape()
        self.batches = self._train_batches(batch_size, seed, Augment() if augment else None)
        self.tuner: HyperTuner | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        if tuner is None:
            self.optimizer = torch_optimizer(list(self.model.parameters()), self.optimizer_spec)
        else:
            budget = None if epochs is None else epochs * len(self.batches)
            self.tuner, self._tuner_settings = self._make_tuner(tuner, budget)
        self.scaler: torch.amp.GradScaler | None = None
        if precision == "float16":
            self.scaler = torch.amp.GradScaler(self.device.type)
        self.val_batches: BatchIterator | None = None
        if self.tuner is not None and self.tuner.objective == "val":
            self.val_batches = BatchIterator(
                self.hyper_val.x,
                self.hyper_val.y,
                min(self._tuner_settings["val_batch_size"], len(self.hyper_val)),
                shuffle=True,
                seed=seed + 1,
            )
        self.global_step = 0
        self.diverged = False
        self.last_report: TunerReport | None = None
        # The open horizon (tuned runs): its batches already applied as plain steps, and the
        # run's state before them, from which the completed horizon is replayed (_tuned_steps).
        self._pending: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._pending_start: dict[str, Any] | None = None

    def _make_tuner(
        self, tuner: Mapping[str, Any], budget: int | None
    ) -> tuple[HyperTuner, dict[str, Any]]:
        if not isinstance(tuner, Mapping):
            raise TypeError(f"tuner must be a mapping, got {tuner!r}")
        unknown = sorted(set(tuner) - set(TUNER_KEYS))
        if unknown:
            raise ValueError(f"tuner: unknown key(s) {unknown}; allowed: {list(TUNER_KEYS)}")
        settings = {**_TUNER_DEFAULTS, **tuner}
        if "hypers" not in tuner:
            raise ValueError("tuner.hypers is required, e.g. [{name: lr}]")
        hypers = settings["hypers"]
        if isinstance(hypers, (str, bytes)) or not isinstance(hypers, (list, tuple)):
            raise ValueError(f"tuner.hypers: expected a list of specs, got {hypers!r}")
        filled = []
        for i, spec in enumerate(hypers):
            if (
                isinstance(spec, Mapping)
                and "init" not in spec
                and spec.get("name") in self.optimizer_spec
            ):
                spec = {**spec, "init": self.optimizer_spec[spec["name"]]}
            if isinstance(spec, Mapping) and spec.get("name") == "example_weight":
                raise ValueError(
                    f"tuner.hypers[{i}]: example_weight needs batches with example indices; "
                    "use gradhpo.hyper.HyperTuner directly"
                )
            filled.append(spec)
        for key in ("max_rejections", "val_batch_size"):
            value = settings[key]
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"tuner.{key} must be an integer >= 1, got {value!r}")
        try:
            tuner_obj = self._hyper_tuner(filled, settings, budget)
        except (ValueError, TypeError) as exc:
            # HyperTuner names its arguments ("carry must be ..."); say which section they are.
            raise type(exc)(f"tuner: {exc}") from None
        return tuner_obj, settings

    @torch.no_grad()
    def _check_loss_shape(self) -> None:
        """One loss on two training examples (eval mode: no statistics, no randomness): the
        model's outputs must suit the loss and the loss must be per example, else a
        ValueError naming ``training.loss`` now rather than a wrong answer later."""
        was_training = self.model.training
        self.model.eval()
        x, y = self.data.train.x[:2], self.data.train.y[:2]
        # In the model's dtype: a run may be built in float32 and cast to float64 after.
        dtype = next((p.dtype for p in self.model.parameters() if p.is_floating_point()), None)
        if dtype is not None and x.is_floating_point():
            x = x.to(dtype)
        try:
            out = self.loss_fn(self.model(x), y)
        except (RuntimeError, ValueError, IndexError) as exc:
            raise ValueError(
                f"training.loss {self.config['training']['loss']!r} does not fit the model's "
                f"outputs and the data's targets ({exc})"
            ) from None
        finally:
            self.model.train(was_training)
        if not isinstance(out, torch.Tensor) or out.shape != (len(y),):
            raise ValueError(
                f"training.loss {self.config['training']['loss']!r} must return one loss per "
                f"example, shape ({len(y)},) for {len(y)} examples, got "
                f"{getattr(out, 'shape', type(out).__name__)}"
            )

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        """Mixed precision for forward passes (``training.precision``), else nothing."""
        dtype = PRECISIONS[self.precision]
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=dtype)

    def _hyper_tuner(
        self, filled: list[Any], settings: Mapping[str, Any], budget: int | None
    ) -> HyperTuner:
        inner_kwargs = {k: v for k, v in self.optimizer_spec.items() if k != "name"}
        return HyperTuner(
            self.model,
            filled,
            optimizer=self.optimizer_spec["name"],
            optimizer_kwargs=inner_kwargs,
            method=settings["method"],
            horizon=settings["horizon"],
            truncate=settings["truncate"],
            hyper_optimizer=settings["hyper_optimizer"],
            hyper_lr=settings["hyper_lr"],
            clip=settings["clip"],
            objective=settings["objective"],
            every=settings["every"],
            chunk=settings["chunk"],
            compile=settings["compile"],
            checkpoint_every=settings["checkpoint_every"],
            loss_fn=self.loss_fn,
            carry=settings["carry"],
            carry_decay=settings["carry_decay"],
            budget=budget,
            warm_segments=settings["warm_segments"],
        )

    # ------------------------------------------------------------------ data and RNG
    def _own_rng(self) -> Any:
        """Swap this run's random state into torch's global RNG for the duration of a block."""
        return swapped_rng(self)

    # ------------------------------------------------------------------ training
    def step(self, n: int = 1) -> float:
        """Train ``n`` optimizer steps; returns their mean training loss.

        A non-finite loss is never applied to the weights: the run is marked ``diverged``, the
        step is skipped and ``nan`` is returned. Later calls on a diverged run do nothing and
        return ``nan``, so a search or population can drop it without crashing.
        """
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"step: n must be an integer >= 1, got {n!r}")
        if self.diverged:
            return math.nan
        self.model.train()
        if self.tuner is not None:
            return self._tuned_steps(n)
        optimizer = self.optimizer
        assert optimizer is not None  # a run without a tuner steps with torch.optim
        total = torch.zeros((), device=self.device, dtype=torch.float64)
        with self._own_rng():
            for _ in range(n):
                xb, yb = next(self.batches)
                # BatchNorm updates its running statistics during the forward pass; keep a copy
                # so that a non-finite batch leaves the model exactly as it was.
                saved = [b.clone() for b in self._buffers]
                with self._autocast():
                    loss = self.loss_fn(self.model(xb), yb).float().mean()
                if not torch.isfinite(loss):
                    for buffer, copy in zip(self._buffers, saved, strict=True):
                        buffer.copy_(copy)
                    self.diverged = True
                    return math.nan
                optimizer.zero_grad(set_to_none=True)
                if self.scaler is None:
                    loss.backward()
                    optimizer.step()
                else:  # float16: a step whose scaled gradients overflow is skipped, scale halved
                    self.scaler.scale(loss).backward()
                    self.scaler.step(optimizer)
                    self.scaler.update()
                self.global_step += 1
                total += loss.detach()
        return float(total) / n

    def _tuned_steps(self, n: int) -> float:
        """``n`` steps in horizons of K, whatever ``n`` is: ``step(10)`` and ten ``step(1)``
        take the same K-step hypergradients. A horizon left open at the end of a call is
        applied at once as plain steps (the model is always current) and kept; the call
        that completes it replays the whole horizon with the hypergradient from the state
        saved at its start (same batches, same dropout masks: the same trajectory). The
        returned loss is the mean over this call's steps (horizon means for replayed ones).
        An outside change to the run (hyperparameters, batch size, dropout) closes an open
        horizon as plain steps."""
        assert self.tuner is not None
        total, done = 0.0, 0
        with self._own_rng():
            while done < n:
                k = min(self.tuner.horizon - len(self._pending), n - done)
                batches = [next(self.batches) for _ in range(k)]
                if len(self._pending) + k < self.tuner.horizon:  # the horizon stays open
                    if not self._pending:
                        self._pending_start = self._snapshot()
                    losses = self.tuner.advance(batches)
                    if not bool(torch.isfinite(losses).all()):
                        self.diverged = True
                        return math.nan
                    self._pending += batches
                    self.global_step += k
                    done += k
                    total += float(losses.sum())
                    continue
                replayed = len(self._pending)
                if replayed:
                    self._restore(self._pending_start)
                    batches = self._pending + batches
                    self._close_horizon()
                val_batch = next(self.val_batches) if self.val_batches is not None else None
                report = self.tuner.step(batches, val_batch)
                self.last_report = report
                if report.weights_updated:
                    self.global_step += k
                    done += k
                    total += report.train_loss * k
                else:  # rolled back to the horizon's start: its earlier steps are undone too
                    self.global_step -= replayed
                # A rolled-back horizon is retried on fresh batches, up to max_rejections times.
                if self.tuner.consecutive_rejections >= self._tuner_settings["max_rejections"]:
                    self.diverged = True
                    return math.nan
        return total / n

    def _snapshot(self) -> dict[str, Any]:
        """The model, tuner and random state at the start of an open horizon (inside
        ``_own_rng``: the run's own stream is the global one)."""
        assert self.tuner is not None
        snap: dict[str, Any] = {
            "model": {k: v.detach().clone() for k, v in self.model.state_dict().items()},
            "tuner": self.tuner.state_dict(),
        }
        # Plain tensors under "rng"/"cuda_rng": the snapshot of an open horizon is saved in
        # checkpoints (weights_only loads), so it holds no RngState object.
        rng = RngState.capture(self.device)
        snap["rng"] = rng.cpu
        if rng.cuda is not None:
            snap["cuda_rng"] = rng.cuda
        return snap

    def _restore(self, snap: Mapping[str, Any] | None) -> None:
        assert self.tuner is not None and snap is not None
        self.model.load_state_dict(snap["model"])
        self.tuner.load_state_dict(snap["tuner"])
        cuda = snap.get("cuda_rng")
        RngState(snap["rng"], cuda, self.device if cuda is not None else None).restore()

    def _close_horizon(self) -> None:
        """Forget the open horizon: its steps stay applied (plain, no hypergradient)."""
        self._pending, self._pending_start = [], None

    @property
    def steps_per_epoch(self) -> int:
        return len(self.batches)

    @property
    def epoch(self) -> float:
        """Training progress in epochs (fractional)."""
        return self.global_step / self.steps_per_epoch

    @torch.no_grad()
    def evaluate(self, split: str = "val") -> dict[str, float]:
        """Mean loss of the current model on ``"train"``, ``"val"`` or ``"test"``, and its
        accuracy where the targets are class labels (``data.classification``)."""
        data = self.data.evaluation_split(split)
        was_training = self.model.training
        self.model.eval()
        loss_sum = torch.zeros((), device=self.device, dtype=torch.float64)
        correct = torch.zeros((), device=self.device, dtype=torch.int64)
        for start in range(0, len(data), self.eval_batch_size):
            xb = data.x[start : start + self.eval_batch_size]
            yb = data.y[start : start + self.eval_batch_size]
            with self._autocast():
                outputs = self.model(xb)
                losses = self.loss_fn(outputs, yb)
            loss_sum += losses.double().sum()
            if self.data.classification:
                correct += (outputs.argmax(dim=1) == yb).sum()
        self.model.train(was_training)
        metrics = {"loss": float(loss_sum) / len(data)}
        if self.data.classification:
            metrics["accuracy"] = float(correct) / len(data)
        return metrics

    # ------------------------------------------------------------------ hyperparameters
    @property
    def hyperparameter_names(self) -> tuple[str, ...]:
        names = OPTIMIZER_HYPERPARAMETERS[self.optimizer_spec["name"]]
        if self.tuner is not None and "l2" in self.tuner.hypers.names:
            names = (*names, "l2")
        return names

    @property
    def hyperparameters(self) -> dict[str, float]:
        """Current continuous hyperparameters. With a tuner: the tuned values (keys
        ``lr`` for scalars, ``lr/<param>`` per tensor; per-element ones by their mean) plus
        the constant ones; otherwise read from the optimizer's first param group."""
        if self.tuner is not None:
            constants = {
                k: float(self.optimizer_spec[k])
                for k in OPTIMIZER_HYPERPARAMETERS[self.optimizer_spec["name"]]
                if k not in self.tuner.hypers.names
            }
            return {**constants, **self.tuner.hypers.summary()}
        assert self.optimizer is not None
        group = self.optimizer.param_groups[0]
        values: dict[str, float] = {}
        for name in self.hyperparameter_names:
            if name == "beta1":
                values[name] = float(group["betas"][0])
            elif name == "beta2":
                values[name] = float(group["betas"][1])
            else:
                values[name] = float(group[name])
        return values

    @hyperparameters.setter
    def hyperparameters(self, values: Mapping[str, float]) -> None:
        self.set_hyperparameters(**values)

    def set_hyperparameters(self, **values: float) -> None:
        """Set some hyperparameters (all param groups); unknown names or bad values raise.

        With a tuner, tuned hyperparameters are set through their raw parametrization
        (``lr`` sets every per-tensor entry, ``lr/<param>`` one of them)."""
        self._close_horizon()
        if self.tuner is not None:
            tuned = {
                k: v for k, v in values.items() if k.split("/", 1)[0] in self.tuner.hypers.names
            }
            rest = {k: v for k, v in values.items() if k not in tuned}
            unknown = sorted(set(rest) - set(self.hyperparameter_names))
            if unknown:
                raise ValueError(
                    f"unknown hyperparameter(s) {unknown}; known: {list(self.hyperparameter_names)}"
                )
            checked = {name: check_hyper_value(name, v) for name, v in rest.items()}
            try:
                self.tuner.hypers.set_values(tuned)
            except KeyError as exc:
                raise ValueError(str(exc.args[0])) from exc
            self.tuner.problem.optimizer.defaults.update(checked)
            self.optimizer_spec.update(checked)
            return
        checked = check_hyperparameter_update(
            self.optimizer_spec, self.hyperparameter_names, values
        )
        assert self.optimizer is not None
        for group in self.optimizer.param_groups:
            for name, value in checked.items():
                if name in ("beta1", "beta2"):
                    betas = list(group["betas"])
                    betas[0 if name == "beta1" else 1] = value
                    group["betas"] = tuple(betas)
                else:
                    group[name] = value
        self.optimizer_spec.update(checked)

    def scale_hyperparameters(self, **factors: float) -> None:
        """Multiply hyperparameters by factors. A tuned one keeps its learned shape (every
        per-tensor entry and schedule segment scaled alike: PBT's explore of a hybrid
        member); a constant one is set to its value times the factor."""
        self._close_horizon()
        tuned = set(self.tuner.hypers.names) if self.tuner is not None else set()
        current = self.hyperparameters
        constant = {}
        for name, factor in factors.items():
            if name in tuned:
                continue
            if name not in current:
                raise ValueError(
                    f"unknown hyperparameter {name!r}; known: {list(self.hyperparameter_names)}"
                )
            constant[name] = current[name] * factor
        if constant:
            self.set_hyperparameters(**constant)  # validates every value before a tuned change
        if self.tuner is not None:
            for name, factor in factors.items():
                if name in tuned:
                    self.tuner.hypers.scale_values(name, factor)

    # ------------------------------------------------------------------ training options
    def set_batch_size(self, batch_size: int) -> None:
        """Train on batches of ``batch_size`` from now on (PBT explores it). A new batch
        stream starts, seeded by the run's seed and current step, so it is reproducible."""
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        if batch_size == self.batch_size:
            return
        self._close_horizon()
        self.batch_size = batch_size
        self.config["training"]["batch_size"] = batch_size
        self.batches = self._train_batches(
            batch_size, self.seed * 1_000_003 + self.global_step, self.batches.augment
        )

    def _train_batches(
        self,
        batch_size: int,
        seed: int,
        augment: Augment | Callable[[torch.Tensor, torch.Generator], torch.Tensor] | None,
    ) -> BatchIterator:
        """The shuffled training-batch stream (last incomplete batch dropped)."""
        return BatchIterator(
            self.data.train.x,
            self.data.train.y,
            min(batch_size, len(self.data.train)),
            shuffle=True,
            drop_last=True,
            seed=seed,
            augment=augment,
        )

    def set_dropout(self, p: float) -> None:
        """Set the probability of every ``nn.Dropout`` in the model (PBT explores it)."""
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p < 1.0:
            raise ValueError(f"dropout must be a number in [0, 1), got {p!r}")
        layers = [m for m in self.model.modules() if isinstance(m, nn.Dropout)]
        if not layers:
            raise ValueError(
                "dropout: the model was built without dropout layers; build it with dropout > 0"
            )
        if all(layer.p == float(p) for layer in layers):
            return  # unchanged: an open tuner horizon stays open
        self._close_horizon()
        for layer in layers:
            layer.p = float(p)
        self.config["model"] = {**self.config["model"], "dropout": float(p)}

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue bit-identically: ``{model, optimizer, hypers, step,
        rng, iterator, config, diverged}``; loadable with ``torch.load(weights_only=True)``.

        A snapshot: no tensor is shared with the live run (torch's module and optimizer state
        dicts return live tensors, which a later step would change under the caller)."""
        rng: dict[str, torch.Tensor] = {"torch": self._rng_state.clone()}
        if self._cuda_rng_state is not None:
            rng["cuda"] = self._cuda_rng_state.clone()
        return copy.deepcopy(
            {
                "format": RUN_FORMAT,
                "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict() if self.optimizer is not None else {},
                "tuner": self.tuner.state_dict() if self.tuner is not None else None,
                "val_iterator": self.val_batches.state_dict()
                if self.val_batches is not None
                else None,
                "hypers": self.hyperparameters,
                "step": self.global_step,
                "rng": rng,
                "iterator": self.batches.state_dict(),
                "config": self.config,
                "diverged": self.diverged,
                "scaler": None if self.scaler is None else self.scaler.state_dict(),
                # An open horizon of a tuned run (see _tuned_steps): None when there is none.
                "pending": None
                if not self._pending
                else {
                    # lists: the last batch of an epoch may be shorter
                    "x": [x for x, _ in self._pending],
                    "y": [y for _, y in self._pending],
                    "start": self._pending_start,
                },
            }
        )

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        state = upgrade_run_state(state)
        missing = {"model", "optimizer", "hypers", "step", "rng", "iterator"} - set(state)
        if missing:
            raise ValueError(f"checkpoint is missing key(s) {sorted(missing)}")
        if (state.get("tuner") is None) != (self.tuner is None):
            raise ValueError("checkpoint and run disagree on whether a hypergradient tuner is used")
        self.model.load_state_dict(state["model"])
        if self.tuner is not None:
            self.tuner.load_state_dict(state["tuner"])
            if self.val_batches is not None:
                self.val_batches.load_state_dict(state["val_iterator"])
        else:
            assert self.optimizer is not None
            self.optimizer.load_state_dict(state["optimizer"])
            self.set_hyperparameters(**state["hypers"])
        self.global_step = int(state["step"])
        self._rng_state = state["rng"]["torch"].clone()
        if self._cuda_rng_state is not None and "cuda" in state["rng"]:
            self._cuda_rng_state = state["rng"]["cuda"].clone()
        self.batches.load_state_dict(state["iterator"])
        self.diverged = bool(state.get("diverged", False))
        if self.scaler is not None and state.get("scaler") is not None:
            self.scaler.load_state_dict(state["scaler"])
        pending = state.get("pending")
        if pending is None or self.tuner is None:
            self._close_horizon()
        else:
            device = self.device
            self._pending = [
                (x.to(device), y.to(device))
                for x, y in zip(pending["x"], pending["y"], strict=True)
            ]
            start = dict(pending["start"])
            start["model"] = {k: v.to(device) for k, v in start["model"].items()}
            self._pending_start = start

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the checkpoint atomically (temp file in the same folder, then rename)."""
        return write_torch(path, self.state_dict())

    @classmethod
    def from_checkpoint(
        cls,
        path: str | os.PathLike[str],
        *,
        data: DataSplits | None = None,
        device: str | torch.device = "auto",
    ) -> TrainingRun:
        """Rebuild a run from :meth:`save`'s file. ``data`` is needed only when the run was
        built from user-supplied :class:`DataSplits` (which the checkpoint does not store)."""
        state = upgrade_run_state(torch.load(Path(path), map_location="cpu", weights_only=True))
        config = state["config"]
        if data is None and config["data"] is None:
            raise ValueError(
                f"checkpoint {str(path)!r} was made from user-supplied data; pass data=..."
            )
        run = cls.from_config(config, data=data, device=device)
        run.load_state_dict(state)
        return run

    @classmethod
    def from_config(
        cls,
        config: Mapping[str, Any],
        *,
        data: DataSplits | None = None,
        device: str | torch.device | None = None,
        seed: int | None = None,
    ) -> TrainingRun:
        """Build a run from a run config in the YAML shape (:attr:`config`'s form: ``data``,
        ``model``, ``optimizer``, ``tuner`` and ``training`` with ``batch_size``, ``seed``,
        ``device``, ``augment``, ``eval_batch_size``, ``epochs`` (the length of tuned
        schedules); a job's ``name``, ``output``, ``search``, ``pbt`` sections are ignored.

        ``data`` (already loaded splits) takes the place of ``config["data"]`` so that many
        runs of a job share one copy of the data set; ``device`` and ``seed`` override the
        config's (a PBT member is the config's seed plus its index)."""
        if not isinstance(config, Mapping):
            raise TypeError(f"run config must be a mapping, got {config!r}")
        unknown = sorted(set(config) - set(RUN_SECTIONS) - set(_JOB_SECTIONS))
        if unknown:
            raise ValueError(
                f"run config: unknown section(s) {unknown}; allowed: {list(RUN_SECTIONS)}"
            )
        if "model" not in config:
            raise ValueError("run config: 'model' is required")
        training = config.get("training") or {}
        if not isinstance(training, Mapping):
            raise TypeError(f"training must be a mapping, got {training!r}")
        unknown = sorted(set(training) - set(TRAINING_KEYS))
        if unknown:
            raise ValueError(f"training: unknown key(s) {unknown}; allowed: {list(TRAINING_KEYS)}")
        if data is None:
            if config.get("data") is None:
                raise ValueError("run config: 'data' is required (a data set name or mapping)")
            data = config["data"]
        kwargs = {k: v for k, v in training.items() if k != "device"}
        if seed is not None:
            kwargs["seed"] = seed
        chosen = device if device is not None else training.get("device", "auto")
        return cls(
            model=config["model"],
            data=data,
            optimizer=config.get("optimizer"),
            tuner=config.get("tuner"),
            device=chosen,
            **kwargs,
        )


def upgrade_run_state(state: Mapping[str, Any]) -> dict[str, Any]:
    """A run checkpoint in the current format (:data:`RUN_FORMAT`). Format 1 (before the
    ``format`` key) kept a flat config (``batch_size``, ``seed``... at the top); it is moved
    into the ``training`` section. Anything else is refused with the format it has."""
    if not isinstance(state, Mapping):
        raise ValueError(f"run checkpoint must be a mapping, got {type(state).__name__}")
    fmt = state.get("format")
    if fmt == RUN_FORMAT:
        return dict(state)
    if fmt is not None:
        raise ValueError(f"run checkpoint has format {fmt!r}; this gradhpo reads {RUN_FORMAT!r}")
    config = state.get("config")
    if isinstance(config, Mapping) and "training" not in config:
        flat = ("batch_size", "seed", "augment", "eval_batch_size")
        config = {
            **{k: v for k, v in config.items() if k not in flat},
            "training": {k: config[k] for k in flat if k in config},
        }
    return {**state, "config": config, "format": RUN_FORMAT}
