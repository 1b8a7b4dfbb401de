"""gradhpo inside a Lightning Trainer (gradhpo.integrations.lightning, issue 15): the HD
optimizers in configure_optimizers, the greedy validation-loss tuning callback held to the
engine (OnlineHyperTuner, greedy) and to float64 finite differences, its effect on a too-small
lr, gradient accumulation, schedulers, checkpoints and resume, logging and its refusals."""

from __future__ import annotations

import copy
import functools
import math
from collections.abc import Callable, Sequence
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

L = pytest.importorskip("lightning.pytorch")
from lightning.pytorch.callbacks import Callback, ModelCheckpoint  # noqa: E402
from lightning.pytorch.loggers import Logger  # noqa: E402

from gradhpo.integrations.lightning import (  # noqa: E402
    HypergradientLogger,
    HyperparameterTuningCallback,
)
from gradhpo.optim import SGDHD, OnlineHyperTuner  # noqa: E402

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    # Lightning's own use of torch's pytree, not ours.
    pytest.mark.filterwarnings(
        "ignore:`isinstance\\(treespec, LeafSpec\\)` is deprecated:FutureWarning"
    ),
]

Factory = Callable[[Any], torch.optim.Optimizer]


def _data(
    n: int, seed: int, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=gen, dtype=dtype)
    y = (x[:, :3].sum(1) > 0).long() + (x[:, 3] > 0.5).long()
    return x, y


def _batches(n: int, size: int, seed: int, dtype: torch.dtype = torch.float32) -> list:
    x, y = _data(n * size, seed, dtype)
    return list(zip(x.split(size), y.split(size), strict=True))


def _loader(n: int, size: int, seed: int, dtype: torch.dtype = torch.float32) -> DataLoader:
    return DataLoader(TensorDataset(*_data(n * size, seed, dtype)), batch_size=size)


class Net(L.LightningModule):
    def __init__(self, factory: Factory, dtype: torch.dtype = torch.float32, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.net = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3)).to(dtype)
        self.factory = factory

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return F.cross_entropy(self(batch[0]), batch[1])

    def configure_optimizers(self) -> Any:
        return self.factory(self)


class Recorder(Callback):
    """The lr of every param group after each training batch (put it after the tuner)."""

    def __init__(self) -> None:
        self.lrs: list[list[float]] = []
        self.hypergrads: list[dict[str, list[float]]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.lrs.append([g["lr"] for g in trainer.optimizers[0].param_groups])
        for cb in trainer.callbacks:
            if isinstance(cb, HyperparameterTuningCallback):
                self.hypergrads.append(copy.deepcopy(cb.last_hypergradient))


class MemoryLogger(Logger):
    def __init__(self) -> None:
        super().__init__()
        self.metrics: list[tuple[int, dict[str, float]]] = []

    @property
    def name(self) -> str:
        return "memory"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.metrics.append((step, dict(metrics)))

    def series(self, name: str) -> list[float]:
        return [m[name] for _, m in self.metrics if name in m]


def _trainer(callbacks: list, **kwargs: Any) -> L.Trainer:
    options = {
        "accelerator": "cpu",
        "devices": 1,
        "enable_progress_bar": False,
        "logger": False,
        "enable_checkpointing": False,
        "enable_model_summary": False,
        "log_every_n_steps": 1,
        "num_sanity_val_steps": 0,
    }
    return L.Trainer(callbacks=callbacks, **{**options, **kwargs})


def _make_sgd(module: nn.Module, **kw: Any) -> torch.optim.Optimizer:
    return torch.optim.SGD(module.parameters(), **kw)


def _sgd(**kw: Any) -> Factory:
    return functools.partial(_make_sgd, **kw)  # picklable (ddp_spawn)


# ---------------------------------------------------------------- 1. HD optimizers as they are


def test_an_hd_optimizer_in_configure_optimizers_adapts_and_is_logged() -> None:
    """SGDHD returned by configure_optimizers trains under the Trainer, its lr moves from the
    start, and HypergradientLogger sends that lr (and h) to the logger at every step."""
    model = Net(lambda m: SGDHD(m.parameters(), lr=0.05, hypergrad_lr=0.01))
    logger, recorder = MemoryLogger(), Recorder()
    trainer = _trainer([HypergradientLogger(), recorder], max_steps=30, logger=logger)
    trainer.fit(model, _loader(10, 16, seed=1))
    lrs = [row[0] for row in recorder.lrs]
    assert len(lrs) == 30 and lrs[-1] != 0.05
    assert len(set(lrs)) > 20  # adapted at nearly every step
    # (Lightning stores logged values as float32 tensors)
    assert logger.series("hd/lr") == pytest.approx(lrs, rel=1e-6)
    h = logger.series("hd/hypergradient")
    assert len(h) == 29  # none at the first step (no previous direction)
    assert h[-1] == pytest.approx(trainer.optimizers[0].hypergradients[0], rel=1e-6)
    assert logger.series("hd/skipped_lr_updates")[-1] == 0


# ---------------------------------------------------------------- 2. against the engine

ENGINE_CASES = {
    "sgd-lr": (
        _sgd(lr=0.05),
        ("lr",),
        {"optimizer": "sgd", "lr": 0.05, "momentum": 0.0},
    ),
    "momentum-dampening-lr-wd": (
        _sgd(lr=0.05, momentum=0.9, dampening=0.3, weight_decay=1e-2),
        ("lr", "weight_decay"),
        {"optimizer": "sgd", "lr": 0.05, "momentum": 0.9, "dampening": 0.3, "weight_decay": 1e-2},
    ),
    "nesterov-lr-wd": (
        _sgd(lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-2),
        ("lr", "weight_decay"),
        {"optimizer": "sgd", "lr": 0.05, "momentum": 0.9, "nesterov": True, "weight_decay": 1e-2},
    ),
    "adam-l2-lr": (
        lambda m: torch.optim.Adam(m.parameters(), lr=0.01, weight_decay=1e-3),
        ("lr",),
        {"optimizer": "adam", "lr": 0.01, "weight_decay": 1e-3},
    ),
    "adamw-lr-wd": (
        lambda m: torch.optim.AdamW(m.parameters(), lr=0.01, weight_decay=0.05),
        ("lr", "weight_decay"),
        {"optimizer": "adamw", "lr": 0.01, "weight_decay": 0.05},
    ),
}


@pytest.mark.parametrize("case", list(ENGINE_CASES))
def test_the_callback_is_the_engines_greedy_tuner(case: str) -> None:
    """Float64, same weights, batches and validation batches: the Trainer with the callback
    and OnlineHyperTuner(method="greedy") in a plain loop take the same hyper steps (every
    value after every step) and end at the same weights."""
    factory, tune, engine_kwargs = ENGINE_CASES[case]
    dt = torch.float64
    steps, train, val = 12, _batches(12, 16, seed=1, dtype=dt), _batches(3, 32, seed=2, dtype=dt)
    model = Net(factory, dtype=dt)
    reference = copy.deepcopy(model.net)

    callback = HyperparameterTuningCallback(val, tune=tune, hyper_lr=0.05)
    values: list[dict[str, float]] = []

    class Values(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            values.append({k: v[0] for k, v in callback.values.items()})

    trainer = _trainer([callback, Values()], max_steps=steps, precision="64-true")
    trainer.fit(model, DataLoader(train, batch_size=None))

    tuner = OnlineHyperTuner(
        reference,
        val_batches=val,
        tune=tune,
        method="greedy",
        hyper_lr=0.05,
        loss_fn=lambda out, y: F.cross_entropy(out, y, reduction="none"),
        **engine_kwargs,
    )
    expected = []
    for x, y in train:
        tuner.step(x, y)
        expected.append({k: tuner.hyperparameters[k] for k in tune})
    assert callback.hyper_steps == steps
    for got, want in zip(values, expected, strict=True):
        assert got == pytest.approx(want, rel=1e-10, abs=0)
    assert values[-1]["lr"] != values[0]["lr"]
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(values[-1]["lr"], rel=1e-15)
    for a, b in zip(model.net.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------- 3. finite differences

FD_CASES = {
    "sgd-lr-wd": (_sgd(lr=0.1, weight_decay=1e-2), ("lr", "weight_decay"), 5),
    "momentum-dampening-first-step": (
        _sgd(lr=0.1, momentum=0.9, dampening=0.3, weight_decay=1e-2),
        ("lr", "weight_decay"),
        1,
    ),
    "momentum-dampening": (
        _sgd(lr=0.1, momentum=0.9, dampening=0.3, weight_decay=1e-2),
        ("lr", "weight_decay"),
        5,
    ),
    "nesterov-foreach": (
        _sgd(lr=0.1, momentum=0.8, nesterov=True, weight_decay=1e-2, foreach=True),
        ("lr", "weight_decay"),
        5,
    ),
    "adam-amsgrad-l2": (
        lambda m: torch.optim.Adam(m.parameters(), lr=0.01, weight_decay=1e-2, amsgrad=True),
        ("lr",),
        5,
    ),
    "adam-decoupled": (
        lambda m: torch.optim.Adam(
            m.parameters(), lr=0.01, weight_decay=0.05, decoupled_weight_decay=True
        ),
        ("lr", "weight_decay"),
        5,
    ),
    "adamw-single-tensor": (
        lambda m: torch.optim.AdamW(m.parameters(), lr=0.01, weight_decay=0.05, foreach=False),
        ("lr", "weight_decay"),
        5,
    ),
}


@pytest.mark.parametrize("case", list(FD_CASES))
def test_the_hypergradient_is_a_finite_difference_of_the_validation_loss(case: str) -> None:
    """Float64: d val loss(w_t) / d log(value) of the tuned step t, as the callback computes it
    inside the Trainer, equals a central finite difference: the same step from the same
    weights, optimizer state and gradients with the value scaled by exp(+-eps), scored on the
    same validation batch (configurations the engine lacks: amsgrad, foreach, decoupled Adam,
    SGD's undamped first momentum step)."""
    factory, tune, step = FD_CASES[case]
    dt = torch.float64
    val = _batches(2, 32, seed=2, dtype=dt)
    saved: dict[str, Any] = {}

    class Save(Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
            saved["model"] = copy.deepcopy(pl_module.state_dict())
            saved["optimizer"] = copy.deepcopy(optimizer.state_dict())
            saved["grads"] = [p.grad.clone() for p in pl_module.parameters()]

    callback = HyperparameterTuningCallback(val, tune=tune, every=step)
    model = Net(factory, dtype=dt)
    trainer = _trainer([Save(), callback], max_steps=step, precision="64-true")
    trainer.fit(model, DataLoader(_batches(step, 16, seed=1, dtype=dt), batch_size=None))
    assert callback.hyper_steps == 1

    def val_loss_after_step(name: str, factor: float) -> float:
        net = Net(factory, dtype=dt)
        net.load_state_dict(saved["model"])
        optimizer = factory(net)
        optimizer.load_state_dict(copy.deepcopy(saved["optimizer"]))
        for p, g in zip(net.parameters(), saved["grads"], strict=True):
            p.grad = g.clone()
        optimizer.param_groups[0][name] *= factor
        optimizer.step()
        with torch.no_grad():
            return float(F.cross_entropy(net(val[0][0]), val[0][1]))

    eps = 1e-5
    for name in tune:
        fd = (
            val_loss_after_step(name, math.exp(eps)) - val_loss_after_step(name, math.exp(-eps))
        ) / (2 * eps)
        got = callback.last_hypergradient[name][0]
        assert got == pytest.approx(fd, rel=1e-6, abs=1e-12), name
        assert abs(fd) > 1e-6  # a real signal, not two zeros


# ---------------------------------------------------------------- the effect


def _val_loss(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float(F.cross_entropy(net(x), y))


def test_a_too_small_lr_is_raised_and_the_validation_loss_falls_faster() -> None:
    """Same seed, data and 120 steps from lr = 1e-3 (far too small here): with the callback the
    lr climbs by orders of magnitude and the held-out validation loss ends well below the
    untuned run's."""
    train = _loader(40, 16, seed=1)  # 40 steps per epoch
    tuning_val = _batches(4, 64, seed=2)
    held_out = _data(1000, seed=3)
    results = {}
    for tuned in (False, True):
        model = Net(_sgd(lr=1e-3, momentum=0.9))
        callbacks = [HyperparameterTuningCallback(tuning_val, hyper_lr=0.1)] if tuned else []
        trainer = _trainer(callbacks, max_steps=120)
        trainer.fit(model, train)
        results[tuned] = (trainer.optimizers[0].param_groups[0]["lr"], _val_loss(model, *held_out))
    (lr_plain, loss_plain), (lr_tuned, loss_tuned) = results[False], results[True]
    assert lr_plain == 1e-3
    assert lr_tuned > 30 * 1e-3
    assert loss_tuned < 0.8 * loss_plain, results


# ---------------------------------------------------------------- Lightning's own features


def test_gradient_accumulation_gives_the_whole_batch_trajectory() -> None:
    """accumulate_grad_batches=2 over half batches forms the whole batch's gradient (Lightning
    scales the loss), so the hyper steps match one step per whole batch (float64)."""
    dt = torch.float64
    x, y = _data(8 * 16, seed=1, dtype=dt)
    val = _batches(2, 32, seed=2, dtype=dt)
    trajectories = []
    for size, accumulate in ((16, 1), (8, 2)):
        recorder = Recorder()
        callback = HyperparameterTuningCallback(val, tune=("lr", "weight_decay"), hyper_lr=0.05)
        trainer = _trainer(
            [callback, recorder],
            max_epochs=2,
            accumulate_grad_batches=accumulate,
            precision="64-true",
        )
        trainer.fit(
            Net(_sgd(lr=0.1, momentum=0.9, weight_decay=1e-2), dtype=dt),
            DataLoader(TensorDataset(x, y), batch_size=size),
        )
        assert callback.hyper_steps == 16
        trajectories.append([row[0] for row in recorder.lrs][accumulate - 1 :: accumulate])
    assert trajectories[1] == pytest.approx(trajectories[0], rel=1e-10)
    assert trajectories[0][-1] != 0.1


def test_a_scheduler_that_rescales_the_lr_composes_with_the_hyper_steps() -> None:
    """ExponentialLR multiplies group['lr'] after every step and the callback's hyper step is a
    factor on it: lr_t = lr_{t-1} * gamma * exp(-hyper_lr * hypergradient_t) (outer SGD)."""
    gamma, hyper_lr = 0.9, 0.5

    def factory(m: Net) -> Any:
        optimizer = torch.optim.SGD(m.parameters(), lr=0.1)
        scheduler = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=gamma)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }

    recorder = Recorder()
    callback = HyperparameterTuningCallback(
        _batches(2, 32, seed=2), hyper_lr=hyper_lr, hyper_optimizer="sgd"
    )
    _trainer([callback, recorder], max_steps=10).fit(Net(factory), _loader(10, 16, seed=1))
    previous = 0.1
    for (lr,), h in zip(recorder.lrs, recorder.hypergrads, strict=True):
        assert lr == pytest.approx(previous * gamma * math.exp(-hyper_lr * h["lr"][0]), rel=1e-12)
        previous = lr
    assert callback.values["lr"][0] == pytest.approx(previous, rel=1e-15)


def test_param_groups_are_tuned_apart_and_logged_by_group() -> None:
    """One value per param group, each from its own hypergradient; logged as hyper/lr/pg<i>
    with the validation loss and hypergradient norm, at every step."""

    def factory(m: Net) -> Any:
        first, second = m.net[0], m.net[2]
        return torch.optim.SGD(
            [{"params": first.parameters(), "lr": 0.05}, {"params": second.parameters()}], lr=0.2
        )

    logger = MemoryLogger()
    callback = HyperparameterTuningCallback(_batches(2, 32, seed=2), hyper_lr=0.05)
    trainer = _trainer([callback], max_steps=8, logger=logger)
    trainer.fit(Net(factory), _loader(8, 16, seed=1))
    lrs = [g["lr"] for g in trainer.optimizers[0].param_groups]
    assert callback.values["lr"] == pytest.approx(lrs, rel=1e-15)
    assert lrs[0] != 0.05 and lrs[1] != 0.2
    assert lrs[0] / 0.05 != pytest.approx(lrs[1] / 0.2)  # moved apart, not one factor
    assert len(logger.series("hyper/lr/pg0")) == 8
    assert logger.series("hyper/lr/pg1")[-1] == pytest.approx(lrs[1])
    assert len(logger.series("hyper/val_loss")) == 8
    assert all(v > 0 for v in logger.series("hyper/hypergrad_norm"))


def test_every_spaces_the_hyper_steps_and_epoch_logging() -> None:
    """every=3: hyper steps after optimizer steps 3, 6, 9 only; logging_interval='epoch' logs
    the values once per epoch."""
    logger, recorder = MemoryLogger(), Recorder()
    callback = HyperparameterTuningCallback(
        _batches(2, 32, seed=2), every=3, logging_interval="epoch"
    )
    trainer = _trainer([callback, recorder], max_epochs=2, logger=logger)
    trainer.fit(Net(_sgd(lr=0.1)), _loader(5, 16, seed=1))
    lrs = [row[0] for row in recorder.lrs]
    changed = [i + 1 for i in range(len(lrs)) if lrs[i] != (lrs[i - 1] if i else 0.1)]
    assert changed == [3, 6, 9] and callback.hyper_steps == 3
    assert logger.series("hyper/lr") == pytest.approx([lrs[4], lrs[9]])


@pytest.mark.filterwarnings("ignore:`training_step` returned `None`")
def test_a_step_that_moves_nothing_is_skipped_and_a_nan_objective_rolled_back() -> None:
    """A training_step that returns None (Lightning skips the backward, the optimizer moves
    nothing) takes no hyper step; a validation batch with a NaN rejects its hyper step and
    puts the lr back to its value before the previous one."""

    class Skipping(Net):
        def training_step(self, batch: Any, batch_idx: int) -> Any:
            return None if batch_idx == 1 else super().training_step(batch, batch_idx)

    val = _batches(4, 32, seed=2)
    bad = (val[2][0].clone(), val[2][1])
    bad[0][0, 0] = float("nan")
    val[2] = bad
    recorder = Recorder()
    callback = HyperparameterTuningCallback(val, hyper_lr=0.1)
    _trainer([callback, recorder], max_steps=6).fit(Skipping(_sgd(lr=0.1)), _loader(6, 16, seed=1))
    lrs = [row[0] for row in recorder.lrs]
    assert callback.skipped_steps == 1 and lrs[1] == lrs[0]
    # validation batches drawn: 0 (step 1), 1 (step 3), 2 = NaN (step 4): rejected
    assert callback.rejected_steps == 1
    assert lrs[3] == pytest.approx(lrs[1], rel=1e-15)  # the step-3 update undone
    assert callback.hyper_steps == 4 and math.isfinite(lrs[-1])


# ---------------------------------------------------------------- checkpoints


@pytest.mark.filterwarnings("ignore:Checkpoint directory .* exists and is not empty")
@pytest.mark.parametrize("source", ["list", "loader"])
def test_a_resumed_trainer_continues_the_uninterrupted_trajectory(tmp_path, source: str) -> None:
    """The callback's state (log-values, outer Adam state, the position in the validation
    batches) is in Lightning's checkpoint; a new Trainer, module and callback resumed with
    ckpt_path= take exactly the steps of the uninterrupted run (CPU, bit for bit)."""

    def val() -> Any:  # 3 batches: the resume lands mid-pass
        return _batches(3, 32, seed=2) if source == "list" else _loader(3, 32, seed=2)

    def run(max_epochs: int, ckpt_path: str | None = None, save: str | None = None) -> Recorder:
        recorder = Recorder()
        callbacks = [
            HyperparameterTuningCallback(val(), tune=("lr", "weight_decay"), hyper_lr=0.05),
            recorder,
        ]
        if save is not None:
            callbacks.append(
                ModelCheckpoint(dirpath=tmp_path / save, save_last=True, every_n_epochs=1)
            )
        trainer = _trainer(callbacks, max_epochs=max_epochs, enable_checkpointing=save is not None)
        optimizer = _sgd(lr=0.1, momentum=0.9, weight_decay=1e-3)
        trainer.fit(
            Net(optimizer, seed=0 if ckpt_path is None else 5),
            _loader(8, 16, seed=1),
            ckpt_path=ckpt_path,
        )
        return recorder

    whole = run(4)
    first = run(2, save="first")
    last = tmp_path / "first" / "last.ckpt"
    state = torch.load(last, weights_only=True)["callbacks"]
    (key,) = [k for k in state if k.startswith("HyperparameterTuningCallback")]
    assert state[key]["hyper_steps"] == 16 and state[key]["val_drawn"] == 16
    second = run(4, ckpt_path=str(last), save="first")  # as a real resume: same folder
    assert first.lrs == whole.lrs[:16]
    assert second.lrs == whole.lrs[16:]
    assert second.hypergrads == whole.hypergrads[16:]


def test_state_dict_round_trip_and_a_mismatched_checkpoint() -> None:
    callback = HyperparameterTuningCallback(_batches(2, 32, seed=2), tune=("lr", "weight_decay"))
    _trainer([callback], max_steps=4).fit(
        Net(_sgd(lr=0.1, weight_decay=1e-3)), _loader(4, 16, seed=1)
    )
    state = callback.state_dict()
    assert state["hyper_steps"] == 4 and set(state["raw"]) == {"lr", "weight_decay"}
    other = HyperparameterTuningCallback(_batches(2, 32, seed=2), tune=("lr",))
    with pytest.raises(ValueError, match=r"tuned \['lr', 'weight_decay'\].*tunes \['lr'\]"):
        other.load_state_dict(state)
    fresh = HyperparameterTuningCallback(_batches(2, 32, seed=2), tune=("lr", "weight_decay"))
    fresh.load_state_dict(state)
    assert fresh.state_dict()["raw"]["lr"].equal(state["raw"]["lr"])  # kept until fit binds


# ---------------------------------------------------------------- refusals


def test_bad_arguments_are_refused_by_name() -> None:
    val = _batches(1, 8, seed=2)
    table: list[tuple[dict[str, Any], type[Exception], str]] = [
        ({"tune": "lr"}, ValueError, "tune: expected a non-empty list"),
        ({"tune": ()}, ValueError, "tune: expected a non-empty list"),
        ({"tune": ("momentum",)}, ValueError, r"tune: \['momentum'\]"),
        ({"tune": ("lr", "lr")}, ValueError, "each name once"),
        ({"hyper_lr": 0}, ValueError, "hyper_lr must be a number > 0, got 0"),
        ({"hyper_lr": math.inf}, ValueError, "hyper_lr must be finite"),
        ({"hyper_optimizer": "rmsprop"}, ValueError, "hyper_optimizer: unknown 'rmsprop'"),
        ({"every": 0}, ValueError, "every must be an integer >= 1, got 0"),
        ({"every": True}, ValueError, "every must be an integer >= 1, got True"),
        ({"clip": -1.0}, ValueError, "clip must be a number > 0, got -1.0"),
        ({"loss_fn": F.mse_loss, "val_loss": lambda m, b: 0}, ValueError, "give one of them"),
        ({"loss_fn": 3}, TypeError, "loss_fn must be callable, got 3"),
        ({"log": "yes"}, ValueError, "log must be true or false, got 'yes'"),
        ({"logging_interval": "batch"}, ValueError, "logging_interval: unknown 'batch'"),
    ]
    for kwargs, error, message in table:
        with pytest.raises(error, match=message):
            HyperparameterTuningCallback(val, **kwargs)
    with pytest.raises(TypeError, match="val_batches: expected a sequence or iterable"):
        HyperparameterTuningCallback(5)
    with pytest.raises(ValueError, match="logging_interval: unknown 'batch'"):
        HypergradientLogger(logging_interval="batch")


class Manual(Net):
    def __init__(self, factory: Factory) -> None:
        super().__init__(factory)
        self.automatic_optimization = False

    def training_step(self, batch: Any, batch_idx: int) -> None:
        optimizer = self.optimizers()
        optimizer.zero_grad()
        self.manual_backward(super().training_step(batch, batch_idx))
        optimizer.step()


REFUSED: dict[str, tuple[Callable[[], L.LightningModule], tuple[str, ...], type, str]] = {
    "manual optimization": (
        lambda: Manual(_sgd(lr=0.1)),
        ("lr",),
        ValueError,
        "automatic_optimization=False is not supported",
    ),
    "an HD optimizer": (
        lambda: Net(lambda m: SGDHD(m.parameters(), lr=0.1)),
        ("lr",),
        TypeError,
        "SGDHD adapts its own lr",
    ),
    "another optimizer": (
        lambda: Net(lambda m: torch.optim.RMSprop(m.parameters(), lr=0.1)),
        ("lr",),
        TypeError,
        "optimizer RMSprop is not supported",
    ),
    "maximize": (
        lambda: Net(_sgd(lr=0.1, maximize=True)),
        ("lr",),
        ValueError,
        "param group 0 has maximize=True",
    ),
    "a tensor lr": (
        lambda: Net(
            lambda m: torch.optim.Adam(m.parameters(), lr=torch.tensor(0.01), foreach=False)
        ),
        ("lr",),
        ValueError,
        "param group 0 has a tensor lr",
    ),
    "Adam's L2 weight decay": (
        lambda: Net(lambda m: torch.optim.Adam(m.parameters(), lr=0.01, weight_decay=1e-3)),
        ("lr", "weight_decay"),
        ValueError,
        "tune 'weight_decay' with Adam's L2 form is not supported.*use AdamW",
    ),
    "a zero weight decay": (
        lambda: Net(_sgd(lr=0.1)),
        ("weight_decay",),
        ValueError,
        "param group 0 has weight_decay=0; a tuned weight_decay must start > 0",
    ),
    "a zero lr": (
        lambda: Net(_sgd(lr=0.0)),
        ("lr",),
        ValueError,
        "param group 0 has lr=0.0; a tuned lr must start > 0",
    ),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_unsupported_configurations_are_refused_at_fit_start(case: str) -> None:
    make, tune, error, message = REFUSED[case]
    callback = HyperparameterTuningCallback(_batches(1, 8, seed=2), tune=tune)
    with pytest.raises(error, match=message):
        _trainer([callback], max_steps=2).fit(make(), _loader(2, 8, seed=1))


def test_a_sharding_strategy_and_two_optimizers_are_refused() -> None:
    """Checked at fit start too (hooks called directly: FSDP needs devices, and Lightning 2.6
    itself refuses two optimizers under automatic optimization before the callback runs)."""
    from lightning.pytorch.strategies import FSDPStrategy, SingleDeviceStrategy

    model = Net(_sgd(lr=0.1))
    callback = HyperparameterTuningCallback(_batches(1, 8, seed=2))
    fake = SimpleNamespace(strategy=FSDPStrategy(), optimizers=[])
    with pytest.raises(ValueError, match="strategy FSDPStrategy is not supported"):
        callback.on_fit_start(fake, model)
    two = [
        torch.optim.SGD(model.net[0].parameters(), lr=0.1),
        torch.optim.SGD(model.net[2].parameters(), lr=0.1),
    ]
    fake = SimpleNamespace(strategy=SingleDeviceStrategy("cpu"), optimizers=two)
    with pytest.raises(ValueError, match="expected one optimizer, configure_optimizers gave 2"):
        callback.on_fit_start(fake, model)


def test_empty_validation_batches_are_an_error() -> None:
    callback = HyperparameterTuningCallback([])
    with pytest.raises(ValueError, match="val_batches is empty"):
        _trainer([callback], max_steps=2).fit(Net(_sgd(lr=0.1)), _loader(2, 8, seed=1))


# ---------------------------------------------------------------- DDP


class _RankHalf(Sequence):
    """Validation batches of which each DDP process sees its own half."""

    def __init__(self, batches: list) -> None:
        self.batches = batches

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int) -> Any:
        x, y = self.batches[i]
        rank = torch.distributed.get_rank()
        return x.chunk(2)[rank], y.chunk(2)[rank]


class _RankInterleaved(torch.utils.data.Dataset):
    """Training examples 2i + rank: with batch size b, the two processes' batches k together
    are the examples of one batch of 2b (a DistributedSampler without shuffling, by hand)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.x) // 2

    def __getitem__(self, i: int) -> Any:
        j = 2 * i + torch.distributed.get_rank()
        return self.x[j], self.y[j]


class _Dump(Callback):
    def __init__(self, path: str) -> None:
        self.path, self.lrs = path, []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])

    def on_train_end(self, trainer, pl_module) -> None:
        torch.save(self.lrs, f"{self.path}/rank{trainer.global_rank}.pt")


@pytest.mark.slow
def test_under_ddp_the_processes_take_one_hyper_step_the_single_process_one(tmp_path) -> None:
    """Two CPU processes (ddp_spawn, gloo), each with half of every training and validation
    batch: the hypergradient is averaged over them, so both keep the same lr, and it is the
    lr of one process on the whole batches (float64)."""
    dt = torch.float64
    x, y = _data(6 * 16, seed=1, dtype=dt)
    val = _batches(2, 32, seed=2, dtype=dt)
    tune = ("lr", "weight_decay")

    single = Recorder()
    _trainer(
        [HyperparameterTuningCallback(val, tune=tune, hyper_lr=0.05), single],
        max_epochs=1,
        precision="64-true",
    ).fit(
        Net(_sgd(lr=0.1, momentum=0.9, weight_decay=1e-2), dtype=dt),
        DataLoader(TensorDataset(x, y), batch_size=16),
    )
    trainer = _trainer(
        [
            HyperparameterTuningCallback(_RankHalf(val), tune=tune, hyper_lr=0.05),
            _Dump(str(tmp_path)),
        ],
        max_epochs=1,
        precision="64-true",
        devices=2,
        strategy="ddp_spawn",
        use_distributed_sampler=False,
    )
    trainer.fit(
        Net(_sgd(lr=0.1, momentum=0.9, weight_decay=1e-2), dtype=dt),
        DataLoader(_RankInterleaved(x, y), batch_size=8),
    )
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    assert ranks[0] == ranks[1]
    assert ranks[0] == pytest.approx([row[0] for row in single.lrs], rel=1e-10)
    assert ranks[0][-1] != 0.1
