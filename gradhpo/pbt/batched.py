"""A population of same-architecture models trained together in one vectorized step.

Population Based Training keeps N members of one architecture that differ only in their
weights, their continuous hyperparameters and their batches. Stepping them one after the other
pays Python and kernel-launch overhead N times for tiny kernels; :class:`BatchedPopulation`
stacks every parameter, buffer and optimizer slot along a leading member dimension and runs
one ``torch.func.vmap(grad_and_value(functional_call(...)))`` per step instead.

Setup compatibility with :class:`gradhpo.run.TrainingRun`. Member ``i`` starts exactly where
``TrainingRun(model=..., data=<same splits>, optimizer=..., batch_size=..., seed=seeds[i])``
starts: its weights are built inside a private RNG seeded with ``seeds[i]`` (what
``TrainingRun._own_rng`` does) and it reads the batches of a ``BatchIterator`` seeded with
``seeds[i]`` (``shuffle=True``, ``drop_last=True``). The optimizer update is written for
stacked tensors with torch.optim's arithmetic, so without dropout every member follows its
sequential twin to float rounding (the vmapped convolutions sum in another order).
:meth:`member_state_dict` uses ``TrainingRun.state_dict()``'s keys and torch.optim's format,
so a member can be exported to a ``TrainingRun`` and continue there.

BatchNorm is supported: running statistics are stacked buffers passed *into* the vmapped
function, cloned there (BatchNorm updates them in place) and returned, so each member keeps
its own statistics; eval mode reads them. Dropout works with per-member masks
(``vmap(randomness="different")``) drawn from one population random stream; with dropout the
members are therefore not bit-equal to sequential runs (those draw from one stream each).
"""

from __future__ import annotations

import copy
import math
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

import torch
import torch.nn.functional as F
from torch.func import functional_call, grad_and_value, vmap

from gradhpo.data import BatchIterator, DataSplits, Split, load_data
from gradhpo.hyper.optimizers import (
    HYPER_PREFIX,
    OPTIMIZER_HYPERPARAMETERS,
    check_hyper_value,
    check_hyperparameter_update,
    from_torch_state,
    inner_optimizer,
    optimizer_config,
    to_torch_state,
)
from gradhpo.models import build_model
from gradhpo.run import RUN_FORMAT, resolve_device, swapped_rng, upgrade_run_state

__all__ = ["BatchedPopulation"]

Tensor = torch.Tensor
_FORMAT = "gradhpo.BatchedPopulation/2"


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _per_member(values: Tensor, like: Tensor) -> Tensor:
    """View a (N,) tensor so that it broadcasts against a stacked (N, ...) tensor."""
    return values.reshape(values.shape[0], *([1] * (like.ndim - 1)))


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


class BatchedPopulation:
    """N members of one architecture trained together in one vmapped step.

    Args:
        model: model config for :func:`models.build_model` (``{"name": "cnn", ...}``); every
            family of ``models/`` works, BatchNorm included.
        data: :class:`DataSplits` (shared by all members), a data set name or a mapping of
            :func:`gradhpo.data.load_dataset` arguments.
        n_members: population size N.
        optimizer: ``{"name": "sgd"|"adam"|"adamw", <hyperparameters>, "nesterov": bool}``,
            validated as in ``TrainingRun``; its hyperparameters are every member's defaults.
        hypers: per-member values overriding the optimizer's, ``{"lr": [0.1, 0.05, ...]}``
            (a sequence or (N,) tensor of N numbers, or one number for all).
        batch_size: training minibatch size of every member.
        seeds: one seed per member (weights and batch order); default ``range(N)``.
        device: ``"auto"`` (CUDA when available), ``"cpu"``, ``"cuda"``, ...
        dtype: floating dtype of weights and data (default: as built, float32). Float64 is
            for tests: ``TrainingRun`` itself has no dtype knob.
        eval_batch_size: batch size of :meth:`evaluate`.

    Members are indexed ``0..N-1``. Per-member hyperparameters, step counters and the
    ``diverged`` flags are tensors of shape (N,).
    """

    def __init__(
        self,
        model: Mapping[str, Any],
        data: DataSplits | str | Mapping[str, Any],
        n_members: int,
        *,
        optimizer: Mapping[str, Any] | None = None,
        hypers: Mapping[str, Sequence[float] | float] | None = None,
        batch_size: int = 64,
        seeds: Sequence[int] | None = None,
        device: str | torch.device = "auto",
        dtype: torch.dtype | None = None,
        eval_batch_size: int = 1024,
    ) -> None:
        if not _is_int(n_members) or n_members < 1:
            raise ValueError(f"n_members must be an integer >= 1, got {n_members!r}")
        for field, value in (("batch_size", batch_size), ("eval_batch_size", eval_batch_size)):
            if not _is_int(value) or value < 1:
                raise ValueError(f"{field} must be an integer >= 1, got {value!r}")
        if not isinstance(model, Mapping):
            raise TypeError(f"model must be a mapping, got {model!r}")
        if dtype is not None and (
            not isinstance(dtype, torch.dtype) or not dtype.is_floating_point
        ):
            raise ValueError(f"dtype must be a floating torch.dtype, got {dtype!r}")
        self.n_members = n_members
        self.seeds = self._check_seeds(seeds, n_members)
        self.optimizer_spec = optimizer_config(optimizer or {"name": "sgd"})
        self.hyperparameter_names: tuple[str, ...] = OPTIMIZER_HYPERPARAMETERS[
            self.optimizer_spec["name"]
        ]
        hyper_values = self._check_hypers(hypers, n_members)
        # Same as TrainingRun: denormals make late-training CPU steps up to ~25x slower, and
        # flushing them changes results, so both must do it for the members to match.
        torch.set_flush_denormal(True)

        self.device = resolve_device(device)
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.model_config = dict(model)
        splits = load_data(data)[1].to(self.device)

        modules = []
        rng_after_first: Tensor | None = None
        for seed in self.seeds:
            # TrainingRun builds its model inside its private RNG seeded with `seed`.
            with torch.random.fork_rng(devices=[]):
                torch.set_rng_state(torch.Generator().manual_seed(seed).get_state())
                modules.append(
                    build_model(self.model_config, splits.input_shape, splits.num_classes)
                )
                if rng_after_first is None:
                    rng_after_first = torch.get_rng_state()
        if dtype is None:
            dtype = next(iter(modules[0].parameters())).dtype
        self.dtype = dtype
        if splits.train.x.is_floating_point():
            splits = _cast_splits(splits, dtype)
        self.data = splits

        # The template only supplies structure to functional_call; every tensor is passed in.
        self._template = copy.deepcopy(modules[0]).to("meta")
        self._param_names = [name for name, _ in self._template.named_parameters()]
        self._buffer_names = [name for name, _ in self._template.named_buffers()]
        self._state_names = list(self._template.state_dict().keys())
        self.params: dict[str, Tensor] = {
            name: torch.stack([dict(m.named_parameters())[name].detach() for m in modules])
            .to(self.device, dtype)
            .contiguous()
            for name in self._param_names
        }
        self.buffers: dict[str, Tensor] = {}
        for name in self._buffer_names:
            stacked = torch.stack([dict(m.named_buffers())[name] for m in modules])
            if stacked.is_floating_point():
                stacked = stacked.to(dtype)
            self.buffers[name] = stacked.to(self.device).contiguous()
        del modules

        # One optimizer arithmetic: the inner optimizer of gradhpo.hyper, vmapped over the
        # members, with each member's hyperparameters carried in its (stacked) state.
        self._inner = inner_optimizer(self.optimizer_spec)
        self._opt_state = self._fresh_optimizer_state()
        for name, values in hyper_values.items():
            self._opt_state[HYPER_PREFIX + name] = torch.tensor(
                values, dtype=torch.float64, device=self.device
            )
        self._step = torch.zeros(n_members, dtype=torch.int64, device=self.device)
        self._diverged = torch.zeros(n_members, dtype=torch.bool, device=self.device)

        # Batch order: one iterator per member over sample *indices*, seeded like
        # TrainingRun's, so its state_dict is interchangeable with a TrainingRun's.
        n_train = len(splits.train)
        index = torch.arange(n_train, device=self.device)
        self._iterators = [
            BatchIterator(
                index,
                index,
                min(batch_size, n_train),
                shuffle=True,
                drop_last=True,
                seed=seed,
            )
            for seed in self.seeds
        ]

        # Dropout masks come from one population stream; it starts where member 0's private
        # stream would be after building its model.
        assert rng_after_first is not None
        self._rng_state = rng_after_first
        self._cuda_rng_state: Tensor | None = None
        if self.device.type == "cuda":
            with torch.cuda.device(self.device):
                gen = torch.Generator(device=self.device).manual_seed(self.seeds[0])
                self._cuda_rng_state = gen.get_state()

        template = self._template

        def train_loss(
            params: dict[str, Tensor], buffers: dict[str, Tensor], x: Tensor, y: Tensor
        ) -> tuple[Tensor, dict[str, Tensor]]:
            # BatchNorm updates running statistics in place: work on copies and return them,
            # so the stacked buffers change only where the update is accepted.
            buffers = {k: v.clone() for k, v in buffers.items()}
            logits = functional_call(template, (params, buffers), (x,))
            return F.cross_entropy(logits, y), buffers

        def eval_logits(params: dict[str, Tensor], buffers: dict[str, Tensor], x: Tensor) -> Tensor:
            return functional_call(template, (params, buffers), (x,))

        self._train_fn = vmap(grad_and_value(train_loss, has_aux=True), randomness="different")
        self._update_fn = vmap(self._inner.update)
        self._eval_fn = vmap(eval_logits, in_dims=(0, 0, None), randomness="different")

    @classmethod
    def from_config(
        cls,
        config: Mapping[str, Any],
        data: DataSplits | None,
        n_members: int,
        *,
        seeds: Sequence[int] | None = None,
        device: str | torch.device | None = None,
    ) -> BatchedPopulation:
        """A population from a run config in the YAML shape (what
        :meth:`TrainingRun.from_config` reads): member ``i`` has seed ``training.seed + i``
        unless ``seeds`` are given, as the members of an unbatched PBT run."""
        training = config.get("training") or {}
        base_seed = int(training.get("seed", 0))
        return cls(
            config["model"],
            data if data is not None else config["data"],
            n_members,
            optimizer=config.get("optimizer"),
            batch_size=training.get("batch_size", 64),
            seeds=seeds if seeds is not None else [base_seed + i for i in range(n_members)],
            device=device if device is not None else training.get("device", "auto"),
            eval_batch_size=training.get("eval_batch_size", 1024),
        )

    # ------------------------------------------------------------------ validation helpers
    @staticmethod
    def _check_seeds(seeds: Sequence[int] | None, n: int) -> list[int]:
        if seeds is None:
            return list(range(n))
        if isinstance(seeds, (str, bytes)) or not isinstance(seeds, Sequence):
            raise ValueError(f"seeds must be a sequence of {n} integers, got {seeds!r}")
        if len(seeds) != n:
            raise ValueError(f"seeds must have n_members={n} entries, got {len(seeds)}: {seeds!r}")
        for i, seed in enumerate(seeds):
            if not _is_int(seed) or seed < 0:
                raise ValueError(f"seeds[{i}] must be an integer >= 0, got {seed!r}")
        return [int(s) for s in seeds]

    def _check_hypers(
        self, hypers: Mapping[str, Sequence[float] | float] | None, n: int
    ) -> dict[str, list[float]]:
        """Per-member values of every hyperparameter: the optimizer's, overridden by ``hypers``."""
        values = {
            name: [float(self.optimizer_spec[name])] * n for name in self.hyperparameter_names
        }
        if hypers is None:
            hypers = {}
        if not isinstance(hypers, Mapping):
            raise ValueError(f"hypers must be a mapping of name -> values, got {hypers!r}")
        for name, given in hypers.items():
            if name not in values:
                raise ValueError(
                    f"hypers: unknown hyperparameter {name!r} for optimizer "
                    f"{self.optimizer_spec['name']!r}; known: {list(self.hyperparameter_names)}"
                )
            if isinstance(given, Tensor):
                given = given.tolist()  # (N,) tensor -> list, 0-d -> number
            if isinstance(given, (str, bytes)):
                raise ValueError(f"hypers.{name} must be a number or {n} numbers, got {given!r}")
            if isinstance(given, Sequence):
                if len(given) != n:
                    raise ValueError(
                        f"hypers.{name} must have n_members={n} values, got {len(given)}: "
                        f"{list(given)!r}"
                    )
                items = list(given)
            else:
                items = [given] * n
            values[name] = [
                check_hyper_value(name, v, f"hypers.{name}[{j}]") for j, v in enumerate(items)
            ]
        if self.optimizer_spec.get("nesterov"):
            for j, mu in enumerate(values["momentum"]):
                if mu == 0:
                    raise ValueError(
                        f"hypers.momentum[{j}]: Nesterov momentum needs momentum > 0, got {mu!r}"
                    )
        return values

    def _member(self, i: Any, field: str = "member") -> int:
        if not _is_int(i) or not 0 <= i < self.n_members:
            raise ValueError(
                f"{field} must be an integer in [0, {self.n_members}), got {field}={i!r}"
            )
        return int(i)

    # ------------------------------------------------------------------ optimizer state
    def _fresh_optimizer_state(self) -> dict[str, Tensor]:
        """The inner optimizer's fresh state, one row per member."""
        one = self._inner.init(
            {name: p[0] for name, p in self.params.items()}, hypers=self.optimizer_spec_hypers
        )
        return {
            k: v.unsqueeze(0).repeat(self.n_members, *([1] * v.ndim)).contiguous()
            for k, v in one.items()
        }

    @property
    def optimizer_spec_hypers(self) -> dict[str, float]:
        return {name: float(self.optimizer_spec[name]) for name in self.hyperparameter_names}

    # ------------------------------------------------------------------ RNG
    def _own_rng(self) -> Any:
        """Swap the population's random stream into torch's global RNG (as TrainingRun does)."""
        return swapped_rng(self)

    # ------------------------------------------------------------------ training
    def _next_batch(self) -> tuple[Tensor, Tensor]:
        """(N, B, ...) inputs and (N, B) labels: each member's own next batch, one gather."""
        idx = torch.stack([next(it)[0] for it in self._iterators])
        return self.data.train.x[idx], self.data.train.y[idx]

    def step(self, n: int = 1) -> Tensor:
        """Train every member ``n`` steps; returns each member's mean training loss, shape (N,).

        A member whose loss is non-finite is marked ``diverged``: that update (weights,
        buffers, optimizer state, step count) is not applied and the member is frozen from
        then on, while the others continue. Its returned loss is ``nan`` (as
        ``TrainingRun.step``). All of this is ``torch.where`` on (N,) masks, no per-member
        Python branches, so one member cannot stall or corrupt the others.
        """
        if not _is_int(n) or n < 1:
            raise ValueError(f"step: n must be an integer >= 1, got {n!r}")
        nan = torch.full((self.n_members,), math.nan, dtype=torch.float64)
        if bool(self._diverged.all()):
            return nan
        self._template.train()
        total = torch.zeros(self.n_members, dtype=torch.float64, device=self.device)
        with self._own_rng():
            for _ in range(n):
                xb, yb = self._next_batch()
                grads, (loss, new_buffers) = self._train_fn(self.params, self.buffers, xb, yb)
                finite = torch.isfinite(loss)
                active = finite & ~self._diverged
                new_params, new_state = self._update_fn(self.params, grads, self._opt_state)
                self.params = _select(active, new_params, self.params)
                self.buffers = _select(active, new_buffers, self.buffers)
                self._opt_state = _select(active, new_state, self._opt_state)
                self._step = self._step + active.to(torch.int64)
                self._diverged = self._diverged | ~finite
                total = total + torch.where(active, loss.detach().to(torch.float64), 0.0)
        mean = (total / n).cpu()
        return torch.where(self._diverged.cpu(), nan, mean)

    @torch.no_grad()
    def evaluate(self, split: str = "val") -> dict[str, Tensor]:
        """Mean loss and accuracy of every member on ``"train"``, ``"val"`` or ``"test"``, in
        eval mode (BatchNorm uses each member's running statistics). Float64 CPU tensors (N,).
        """
        data = self.data.evaluation_split(split)
        self._template.eval()
        n = self.n_members
        loss_sum = torch.zeros(n, dtype=torch.float64, device=self.device)
        correct = torch.zeros(n, dtype=torch.int64, device=self.device)
        try:
            for start in range(0, len(data), self.eval_batch_size):
                xb = data.x[start : start + self.eval_batch_size]
                yb = data.y[start : start + self.eval_batch_size]
                logits = self._eval_fn(self.params, self.buffers, xb)  # (N, B, classes)
                losses = F.cross_entropy(logits.flatten(0, 1), yb.repeat(n), reduction="none").view(
                    n, -1
                )
                loss_sum += losses.sum(dim=1).double()
                correct += (logits.argmax(dim=2) == yb).sum(dim=1)
        finally:
            self._template.train()
        return {
            "loss": (loss_sum / len(data)).cpu(),
            "accuracy": (correct.double() / len(data)).cpu(),
        }

    # ------------------------------------------------------------------ inspection
    @property
    def diverged(self) -> Tensor:
        """Bool (N,) CPU tensor: members whose training loss went non-finite (frozen)."""
        return self._diverged.cpu().clone()

    @property
    def steps(self) -> Tensor:
        """Int64 (N,) CPU tensor: optimizer steps applied to each member."""
        return self._step.cpu().clone()

    @property
    def hyperparameters(self) -> dict[str, Tensor]:
        """Every hyperparameter as a float64 (N,) CPU tensor (a copy)."""
        return {
            name: self._opt_state[HYPER_PREFIX + name].cpu().clone()
            for name in self.hyperparameter_names
        }

    def get_hyperparameters(self, i: int) -> dict[str, float]:
        """Member ``i``'s hyperparameters, named as ``TrainingRun.hyperparameters``."""
        i = self._member(i)
        return {
            name: float(self._opt_state[HYPER_PREFIX + name][i])
            for name in self.hyperparameter_names
        }

    def set_hyperparameters(self, i: int, **values: float) -> None:
        """Set some of member ``i``'s hyperparameters; unknown names or bad values raise
        (``ValueError``/``TypeError`` naming the field and value, as ``TrainingRun``)."""
        i = self._member(i)
        checked = check_hyperparameter_update(
            self.optimizer_spec, self.hyperparameter_names, values
        )
        for name, value in checked.items():
            self._opt_state[HYPER_PREFIX + name][i] = value

    # ------------------------------------------------------------------ exploit
    def copy_member(self, src: int, dst: int) -> None:
        """PBT's exploit: member ``dst`` becomes a copy of ``src`` (weights, buffers, optimizer
        state, hyperparameters, step count, diverged flag). ``dst`` keeps reading its own
        batches, so the two separate again from the next step on."""
        src = self._member(src, "src")
        dst = self._member(dst, "dst")
        if src == dst:
            return
        for tensor in self._all_stacked():
            tensor[dst] = tensor[src]

    def _all_stacked(self) -> list[Tensor]:
        """Every stacked (N, ...) tensor of the member's state, for copying rows in place."""
        tensors = [*self.params.values(), *self.buffers.values(), *self._opt_state.values()]
        tensors += [self._step, self._diverged]
        return tensors

    # ------------------------------------------------------------------ member export
    def _member_optimizer_state(self, i: int) -> dict[str, Any]:
        """Member ``i``'s optimizer state in torch.optim's format (what TrainingRun holds)."""
        state = {k: v[i] for k, v in self._opt_state.items()}
        return to_torch_state(self.optimizer_spec, state, self._param_names)

    def member_state_dict(self, i: int) -> dict[str, Any]:
        """Member ``i`` as a ``TrainingRun`` checkpoint: ``{model, optimizer, tuner,
        val_iterator, hypers, step, rng, iterator, config, diverged}``.

        ``model`` loads into ``build_model(...)``'s module; the whole dict loads into a
        ``TrainingRun`` built with this member's settings (``config`` says which, with
        ``data: None``: pass the same splits) and continues with this member's batches.
        ``rng`` is the population's dropout stream (a member has none of its own).
        """
        i = self._member(i)
        tensors = {**self.params, **self.buffers}
        model_state = OrderedDict((name, tensors[name][i].clone()) for name in self._state_names)
        hp = self.get_hyperparameters(i)
        rng: dict[str, Tensor] = {"torch": self._rng_state.clone()}
        if self._cuda_rng_state is not None:
            rng["cuda"] = self._cuda_rng_state.clone()
        return {
            "format": RUN_FORMAT,
            "model": model_state,
            "optimizer": self._member_optimizer_state(i),
            "tuner": None,
            "val_iterator": None,
            "hypers": hp,
            "step": int(self._step[i]),
            "rng": rng,
            "iterator": self._iterators[i].state_dict(),
            "config": {
                "data": None,
                "model": copy.deepcopy(self.model_config),
                "optimizer": {**self.optimizer_spec, **hp},
                "tuner": None,
                "training": {
                    "batch_size": self.batch_size,
                    "seed": self.seeds[i],
                    "augment": False,
                    "eval_batch_size": self.eval_batch_size,
                },
            },
            "diverged": bool(self._diverged[i]),
        }

    def load_member_state_dict(
        self, i: int, state: Mapping[str, Any], *, load_iterator: bool = True
    ) -> None:
        """Load member ``i`` from :meth:`member_state_dict` or a ``TrainingRun.state_dict()``.

        ``model`` is required; ``optimizer`` (torch.optim format; ``{}`` means fresh state),
        ``hypers``, ``step``, ``diverged`` and ``iterator`` are loaded when present
        (``load_iterator=False`` keeps the member's own batch order).
        """
        i = self._member(i)
        if isinstance(state, Mapping) and "config" in state:
            state = upgrade_run_state(state)
        if not isinstance(state, Mapping) or "model" not in state:
            raise ValueError("member state must be a mapping with at least a 'model' entry")
        model_state = state["model"]
        missing = sorted(set(self._state_names) - set(model_state))
        unexpected = sorted(set(model_state) - set(self._state_names))
        if missing or unexpected:
            raise ValueError(
                f"member state 'model' does not fit this architecture: missing {missing}, "
                f"unexpected {unexpected}"
            )
        targets = {**self.params, **self.buffers}
        for name in self._state_names:
            value = torch.as_tensor(model_state[name])
            if tuple(value.shape) != tuple(targets[name].shape[1:]):
                raise ValueError(
                    f"member state 'model.{name}' has shape {tuple(value.shape)}, expected "
                    f"{tuple(targets[name].shape[1:])}"
                )
        if "hypers" in state:
            self.set_hyperparameters(i, **state["hypers"])  # validates before anything changes
        for name in self._state_names:
            targets[name][i] = torch.as_tensor(model_state[name]).to(targets[name])
        if "optimizer" in state:
            self._load_member_optimizer(i, state["optimizer"])
        if "step" in state:
            self._step[i] = int(state["step"])
        self._diverged[i] = bool(state.get("diverged", False))
        if load_iterator and state.get("iterator") is not None:
            self._iterators[i].load_state_dict(state["iterator"])

    def _load_member_optimizer(self, i: int, opt_state: Mapping[str, Any]) -> None:
        """Member ``i``'s optimizer state from torch.optim's format; its hyperparameters
        stay those set from the checkpoint's ``hypers`` (or the member's own)."""
        like = {name: self.params[name][i] for name in self._param_names}
        state = from_torch_state(self.optimizer_spec, opt_state, like)
        for key, value in state.items():
            if not key.startswith(HYPER_PREFIX):
                self._opt_state[key][i] = value

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """The whole population as plain data (tensors, numbers, strings, lists, dicts), so
        ``torch.load(weights_only=True)`` reads it back. A snapshot: no tensor is shared."""
        rng: dict[str, Tensor] = {"torch": self._rng_state.clone()}
        if self._cuda_rng_state is not None:
            rng["cuda"] = self._cuda_rng_state.clone()
        return copy.deepcopy(
            {
                "format": _FORMAT,
                "config": self._config(),
                "params": self.params,
                "buffers": self.buffers,
                "optimizer": self._opt_state,
                "step": self._step,
                "diverged": self._diverged,
                "iterators": [it.state_dict() for it in self._iterators],
                "rng": rng,
            }
        )

    def _config(self) -> dict[str, Any]:
        return {
            "model": copy.deepcopy(self.model_config),
            "optimizer": dict(self.optimizer_spec),
            "n_members": self.n_members,
            "batch_size": self.batch_size,
            "eval_batch_size": self.eval_batch_size,
            "seeds": list(self.seeds),
            "dtype": _dtype_name(self.dtype),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`; the population then continues bit-identically (CPU).

        The population must have been built with the same model, optimizer kind, size, batch
        size and data; a mismatch raises ``ValueError`` naming the field."""
        required = {"config", "params", "buffers", "optimizer", "step", "diverged"}
        missing = sorted((required | {"iterators", "rng"}) - set(state))
        if missing:
            raise ValueError(f"population state is missing key(s) {missing}")
        if state.get("format") != _FORMAT:
            raise ValueError(
                f"population state has format {state.get('format')!r}, expected {_FORMAT!r}"
            )
        config = state["config"]
        mine = self._config()
        for key in ("model", "n_members", "batch_size", "dtype"):
            if config.get(key) != mine[key]:
                raise ValueError(
                    f"population state has {key}={config.get(key)!r}, this population has "
                    f"{key}={mine[key]!r}"
                )
        for key in ("name", "nesterov"):
            theirs, ours = config["optimizer"].get(key), self.optimizer_spec.get(key)
            if theirs != ours:
                raise ValueError(
                    f"population state has optimizer.{key}={theirs!r}, this population has {ours!r}"
                )

        def stacked(source: Mapping[str, Tensor], like: Mapping[str, Tensor], what: str):
            if set(source) != set(like):
                raise ValueError(
                    f"population state '{what}' has keys {sorted(source)}, expected {sorted(like)}"
                )
            out = {}
            for name, ref in like.items():
                value = torch.as_tensor(source[name])
                if value.shape != ref.shape:
                    raise ValueError(
                        f"population state '{what}.{name}' has shape {tuple(value.shape)}, "
                        f"expected {tuple(ref.shape)}"
                    )
                out[name] = value.to(device=ref.device, dtype=ref.dtype).clone()
            return out

        params = stacked(state["params"], self.params, "params")
        buffers = stacked(state["buffers"], self.buffers, "buffers")
        opt = stacked(state["optimizer"], self._opt_state, "optimizer")
        iterators = state["iterators"]
        if len(iterators) != self.n_members:
            raise ValueError(
                f"population state has {len(iterators)} iterators, expected {self.n_members}"
            )
        for it, it_state in zip(self._iterators, iterators, strict=True):
            it.load_state_dict(it_state)
        self.params, self.buffers, self._opt_state = params, buffers, opt
        self._step = torch.as_tensor(state["step"]).to(self.device, torch.int64).clone()
        self._diverged = torch.as_tensor(state["diverged"]).to(self.device, torch.bool).clone()
        self.seeds = [int(s) for s in config.get("seeds", self.seeds)]
        self.load_rng_state(state["rng"])

    def load_rng_state(self, rng: Mapping[str, Tensor]) -> None:
        """Restore the population's dropout stream (the ``rng`` of :meth:`state_dict` or of
        any :meth:`member_state_dict`): what a full restore of its members does, since
        their masks come from this one stream."""
        if not isinstance(rng, Mapping) or not isinstance(rng.get("torch"), Tensor):
            raise ValueError(f"rng: expected {{'torch': <RNG state tensor>}}, got {rng!r}")
        self._rng_state = rng["torch"].clone()
        if self._cuda_rng_state is not None and "cuda" in rng:
            self._cuda_rng_state = rng["cuda"].clone()

    def __repr__(self) -> str:
        return (
            f"BatchedPopulation(model={self.model_config!r}, n_members={self.n_members}, "
            f"optimizer={self.optimizer_spec['name']!r}, device={str(self.device)!r})"
        )


def _select(mask: Tensor, new: dict[str, Tensor], old: dict[str, Tensor]) -> dict[str, Tensor]:
    """Per member: ``new`` where ``mask`` is true, ``old`` elsewhere."""
    return {k: torch.where(_per_member(mask, old[k]), new[k], old[k]) for k in old}


def _cast_splits(splits: DataSplits, dtype: torch.dtype) -> DataSplits:
    """The splits with floating features cast to ``dtype`` (labels untouched)."""

    def cast(split: Split) -> Split:
        return Split(split.x.to(dtype), split.y)

    return replace(splits, train=cast(splits.train), val=cast(splits.val), test=cast(splits.test))
