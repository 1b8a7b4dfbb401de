"""OfflineTuner: whole-run hypergradients of a schedule, robust outer updates, rejection."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from gradhpo.hyper.methods import InnerProblem, Objective, hypergradient
from gradhpo.hyper.offline import OfflineTuner
from gradhpo.hyper.optimizers import make_optimizer
from gradhpo.hyper.spec import HyperParameters

DT = torch.float64
BUDGET = 12
SPECS = [{"name": "lr", "init": 0.1, "schedule": {"segments": 3}}]


def tiny_mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 3)).to(DT)


def data(seed: int = 1, k: int = BUDGET, n: int = 16):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(3, 3, generator=g, dtype=DT)
    out = []
    for _ in range(k):
        x = torch.randn(n, 3, generator=g, dtype=DT)
        out.append((x, (x @ w).argmax(1)))
    return out


@pytest.mark.parametrize("method", ["forward", "checkpointed", "reverse"])
def test_sign_step_moves_each_raw_value_by_the_step_size(method) -> None:
    batches, (val,) = data(), data(seed=2, k=1, n=64)
    model = tiny_mlp()
    tuner = OfflineTuner(model, SPECS, budget=BUDGET, method=method, outer_lr=0.2, decay=0.5)
    before = tuner.hypers.raw["lr"].detach().clone()
    # The hypergradient the tuner follows: the final validation loss of the whole run.
    hypers = HyperParameters(SPECS, dict(model.named_parameters()), budget=BUDGET)
    problem = InnerProblem(model, make_optimizer("sgd"), hypers)
    params = {n: p.detach() for n, p in model.named_parameters()}
    want = hypergradient(
        "reverse",
        problem,
        params,
        problem.optimizer.init(params),
        {},
        batches,
        Objective.validation(model, *val),
    ).grads["lr"]
    report = tuner.step(batches, val)
    assert report.accepted and report.step_size == 0.2
    torch.testing.assert_close(tuner.hypers.raw["lr"].detach(), before - 0.2 * torch.sign(want))
    assert tuner.step_size == pytest.approx(0.1)
    # The starting weights are untouched: every run starts from the same point.
    for name, p in model.named_parameters():
        assert torch.equal(p.detach(), params[name])


@pytest.mark.parametrize("update", ["sign", "normalized", "adam"])
def test_outer_steps_lower_the_final_validation_loss(update) -> None:
    batches, (val,) = data(), data(seed=2, k=1, n=64)
    tuner = OfflineTuner(tiny_mlp(), SPECS, budget=BUDGET, update=update, outer_lr=0.3, decay=0.9)
    first = tuner.step(batches, val).objective
    for _ in range(8):
        tuner.step(batches, val)
    params, buffers, losses = tuner.train(batches)
    final = float(Objective.validation(tuner.model, *val).final(params, buffers))
    assert final < first - 1e-3, (first, final)
    assert losses.shape == (BUDGET,)


def test_a_diverging_run_is_rejected_and_the_step_halved() -> None:
    batches, (val,) = data(), data(seed=2, k=1, n=64)
    tuner = OfflineTuner(tiny_mlp(), SPECS, budget=BUDGET, outer_lr=0.4)
    good = tuner.hypers.state_dict()
    tuner.step(batches, val)
    with torch.no_grad():
        tuner.hypers.raw["lr"].fill_(math.log(1e300))  # as if an update had gone far too far
    report = tuner.step(batches, val)
    assert not report.accepted and tuner.rejected_steps == 1
    assert tuner.step_size == pytest.approx(0.4 * 0.95 / 2)
    # Back to the hypers that the last finite run used (the first run's).
    assert torch.equal(tuner.hypers.raw["lr"].detach(), good["lr"])
    assert tuner.step(batches, val).accepted


def test_state_dict_continues_exactly() -> None:
    batches, (val,) = data(), data(seed=2, k=1, n=64)
    a = OfflineTuner(tiny_mlp(), SPECS, budget=BUDGET, update="adam")
    a.step(batches, val)
    b = OfflineTuner(tiny_mlp(), SPECS, budget=BUDGET, update="adam")
    b.load_state_dict(a.state_dict())
    assert a.step(batches, val) == b.step(batches, val)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"method": "greedy"}, "does not differentiate a whole run"),
        ({"update": "rmsprop"}, "update: unknown 'rmsprop'"),
        ({"budget": 0}, "budget must be an integer >= 1, got 0"),
        ({"decay": 1.5}, r"decay must be a number in \(0.0, 1.0\], got 1.5"),
        ({"outer_lr": -1}, "outer_lr must be a number"),
    ],
)
def test_bad_arguments(kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        OfflineTuner(tiny_mlp(), SPECS, **{"budget": BUDGET, **kwargs})


def test_wrong_number_of_batches() -> None:
    tuner = OfflineTuner(tiny_mlp(), SPECS, budget=BUDGET)
    with pytest.raises(ValueError, match="expected budget=12 batches, got 3"):
        tuner.step(data(k=3), data(k=1)[0])


def test_use_best_loads_the_hypers_of_the_lowest_objective() -> None:
    batches, (val,) = data(), data(seed=2, k=1, n=64)
    tuner = OfflineTuner(tiny_mlp(), SPECS, budget=BUDGET, outer_lr=0.5, decay=1.0)
    seen = []
    for _ in range(4):
        before = tuner.hypers.state_dict()
        seen.append((tuner.step(batches, val).objective, before))
    objective, want = min(seen, key=lambda pair: pair[0])
    assert tuner.best_objective == objective
    tuner.use_best()
    assert torch.equal(tuner.hypers.raw["lr"].detach(), want["lr"])
