"""OnlineHyperTuner: exact equivalence with the engine, plain-SGD equivalence without
adaptation, direction of adaptation, state and bad input."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from gradhpo.hyper.tuner import HyperTuner
from gradhpo.optim import OnlineHyperTuner

pytestmark = pytest.mark.usefixtures("one_thread")


def model_with_dropout() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Dropout(0.3), nn.Linear(8, 3))


def data(k: int, seed: int = 0, n: int = 16):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(6, 3, generator=g)
    out = []
    for _ in range(k):
        x = torch.randn(n, 6, generator=g)
        out.append((x, (x @ w).argmax(1)))
    return out


def test_matches_engine_horizon_by_horizon() -> None:
    """Immediate steps + recompute == HyperTuner on the same horizons (dropout included)."""
    a, b = model_with_dropout(), model_with_dropout()
    val = data(1, seed=9)[0]
    settings = dict(method="reverse", horizon=3, hyper_lr=0.1)
    online = OnlineHyperTuner(
        a,
        val_batches=[val],
        optimizer="momentum",
        tune=("lr", "weight_decay"),
        lr=0.1,
        weight_decay=1e-3,
        **settings,
    )
    engine = HyperTuner(
        b,
        [{"name": "lr", "init": 0.1}, {"name": "weight_decay", "init": 1e-3}],
        optimizer="momentum",
        objective="val",
        **settings,
    )
    batches = data(6)
    torch.manual_seed(5)
    losses = []
    for i, (x, y) in enumerate(batches):
        before = copy.deepcopy(a.state_dict())
        losses.append(online.step(x, y))
        if i % 3 != 2:  # the model is current after every call, not only at horizon ends
            assert not torch.equal(before["0.weight"], a.state_dict()["0.weight"])
    torch.manual_seed(5)
    engine.step(batches[:3], val)
    engine.step(batches[3:], val)
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7, msg=name)
    assert online.hyperparameters["lr"] == pytest.approx(engine.hypers.summary()["lr"], rel=1e-6)
    assert online.tuner.hyper_steps == 2 and all(math.isfinite(v) for v in losses)


def test_without_adaptation_equals_torch_sgd() -> None:
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    reference = copy.deepcopy(model)
    online = OnlineHyperTuner(
        model,
        val_batches=data(1, seed=9),
        optimizer="momentum",
        tune=("lr",),
        lr=0.05,
        momentum=0.9,
        method="reverse",
        horizon=2,
        hyper_optimizer="sgd",
        hyper_lr=1e-30,
    )
    opt = torch.optim.SGD(reference.parameters(), lr=0.05, momentum=0.9)
    for x, y in data(8):
        online.step(x, y)
        loss = nn.functional.cross_entropy(reference(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    for p, q in zip(model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize(("lr", "direction"), [(1e-4, 1), (3.0, -1)])
def test_lr_moves_the_right_way(lr: float, direction: int) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 3))
    online = OnlineHyperTuner(
        model,
        val_batches=data(4, seed=9),
        tune=("lr",),
        lr=lr,
        method="reverse",
        horizon=4,
        hyper_lr=0.05,
    )
    for x, y in data(40):
        online.step(x, y)
    ratio = online.hyperparameters["lr"] / lr
    assert (ratio > 1.3) if direction > 0 else (ratio < 1 / 1.3), ratio


def test_greedy_hyper_step_every_call_and_state_round_trip() -> None:
    model = model_with_dropout()
    online = OnlineHyperTuner(
        model,
        val_batches=lambda: data(1, seed=9)[0],
        tune=("lr", "momentum"),
        optimizer="momentum",
        lr=0.05,
        momentum=0.8,
    )
    for x, y in data(4):
        online.step(x, y)
    assert online.horizon == 1 and online.tuner.hyper_steps == 4
    state = online.state_dict()
    twin_model = copy.deepcopy(model)
    twin = OnlineHyperTuner(
        twin_model,
        val_batches=lambda: data(1, seed=9)[0],
        tune=("lr", "momentum"),
        optimizer="momentum",
        lr=0.05,
        momentum=0.8,
    )
    twin.load_state_dict(state)
    for i, (x, y) in enumerate(data(3, seed=4)):
        torch.manual_seed(i)  # same dropout masks for both
        a = online.step(x, y)
        torch.manual_seed(i)
        assert a == twin.step(x, y)
    assert online.hyperparameters == twin.hyperparameters


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"tune": ("beta1",)}, r"unknown \['beta1'\]"),
        ({"tune": "lr"}, "expected a non-empty list"),
        ({"tune": ()}, "expected a non-empty list"),
        ({"val_batches": 3}, "val_batches: expected an iterable"),
        ({"method": "reverse", "horizon": 0}, "got 0"),
        ({"lr": -0.1}, "lr.init: must be > 0"),
    ],
)
def test_bad_arguments(kwargs, match) -> None:
    args = {"val_batches": data(1), "tune": ("lr",), **kwargs}
    with pytest.raises((ValueError, TypeError), match=match):
        OnlineHyperTuner(nn.Linear(6, 3), **args)


def test_empty_validation_iterable() -> None:
    online = OnlineHyperTuner(nn.Linear(6, 3), val_batches=[], tune=("lr",))
    x, y = data(1)[0]
    with pytest.raises(ValueError, match="val_batches is empty"):
        online.step(x, y)


def test_regression_needs_a_loss_and_trains_with_one() -> None:
    """A single-output model with float targets: cross-entropy over one class is 0 whatever
    the weights (nothing would train), so the default loss refuses; with loss_fn it trains."""
    from gradhpo.hyper.methods import squared_error_per_example

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, 3, generator=gen)
    y = x @ torch.tensor([[1.0], [-2.0], [0.5]])
    model = torch.nn.Linear(3, 1)
    tuner = OnlineHyperTuner(model, val_batches=[(x, y)], lr=0.05)
    with pytest.raises(ValueError, match="loss_fn"):
        tuner.step(x, y)
    tuner = OnlineHyperTuner(
        model, val_batches=[(x, y)], lr=0.05, loss_fn=squared_error_per_example
    )
    losses = [tuner.step(x, y) for _ in range(30)]
    assert losses[-1] < 0.2 * losses[0]
