"""HyperTuner and its use through TrainingRun: hyper steps, NaN rejection, clipping, resume."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from gradhpo.data import DataSplits, Split, load_dataset
from gradhpo.hyper.methods import InnerProblem, Objective, hypergradient
from gradhpo.hyper.tuner import HyperTuner
from gradhpo.run import TrainingRun


def tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))


def batches(k: int, seed: int = 0, n: int = 8):
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(n, 6, generator=g), torch.randint(0, 3, (n,), generator=g)) for _ in range(k)
    ]


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_step_follows_the_hypergradient() -> None:
    model = tiny_model()
    tuner = HyperTuner(
        model,
        [{"name": "lr", "init": 0.1}],
        optimizer="sgd",
        horizon=3,
        hyper_optimizer="sgd",
        hyper_lr=0.5,
    )
    train, val = batches(3), batches(1, seed=5)[0]
    # The hypergradient the step will use, computed independently from the same start.
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    expected = hypergradient(
        "reverse",
        InnerProblem(model, tuner.problem.optimizer, tuner.hypers),
        params,
        tuner.opt_state,
        {},
        train,
        Objective.validation(model, *val),
    )
    raw_before = float(tuner.hypers.raw["lr"].detach())
    report = tuner.step(train, val)
    assert report.accepted and report.steps == 3 and tuner.hyper_steps == 1
    assert math.isclose(
        float(tuner.hypers.raw["lr"].detach()),
        raw_before - 0.5 * float(expected.grads["lr"]),
        rel_tol=1e-6,
    )
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), expected.params[name])
    assert math.isclose(
        report.values["lr"], math.exp(float(tuner.hypers.raw["lr"].detach())), rel_tol=1e-6
    )


def test_nan_rejects_and_restores() -> None:
    model = tiny_model()
    tuner = HyperTuner(model, [{"name": "lr", "init": 0.1}], horizon=2, hyper_lr=0.1)
    val = batches(1, seed=5)[0]
    tuner.step(batches(2), val)  # one accepted update
    values_before_last_update = {k: v.clone() for k, v in tuner._previous_raw.items()}
    weights = snapshot(model)
    bad = batches(2, seed=1)
    bad[1][0][0, 0] = float("nan")
    report = tuner.step(bad, val)
    assert not report.accepted and not report.weights_updated
    assert tuner.rejected_steps == 1 and tuner.consecutive_rejections == 1
    assert all(torch.equal(weights[k], v) for k, v in snapshot(model).items())
    assert torch.equal(tuner.hypers.raw["lr"].detach(), values_before_last_update["lr"])
    assert tuner.step(batches(2, seed=2), val).accepted
    assert tuner.consecutive_rejections == 0 and tuner.rejected_steps == 1


def test_clipping_bounds_the_raw_update() -> None:
    model = tiny_model()
    tuner = HyperTuner(
        model,
        [{"name": "lr", "init": 0.5}],
        horizon=3,
        hyper_optimizer="sgd",
        hyper_lr=1.0,
        clip=1e-3,
    )
    before = float(tuner.hypers.raw["lr"].detach())
    report = tuner.step(batches(3), batches(1, seed=5)[0])
    assert report.hypergrad_norm > 1e-3  # clipping was active
    assert math.isclose(abs(float(tuner.hypers.raw["lr"].detach()) - before), 1e-3, rel_tol=1e-3)


def test_greedy_forces_horizon_one_and_state_round_trip() -> None:
    model = tiny_model()
    tuner = HyperTuner(model, [{"name": "lr", "init": 0.1}], method="greedy", horizon=10)
    assert tuner.horizon == 1
    with pytest.raises(ValueError, match="expected 1..1 batches, got 2"):
        tuner.step(batches(2), batches(1)[0])
    tuner.step(batches(1), batches(1, seed=3)[0])
    state = tuner.state_dict()
    twin = HyperTuner(tiny_model(), [{"name": "lr", "init": 0.1}], method="greedy")
    twin.model.load_state_dict(model.state_dict())
    twin.load_state_dict(state)
    a = tuner.step(batches(1, seed=4), batches(1, seed=6)[0])
    b = twin.step(batches(1, seed=4), batches(1, seed=6)[0])
    assert a == b


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"horizon": 0}, r"horizon \(K\) must be an integer >= 1, got 0"),
        ({"horizon": 3, "truncate": 4}, r"truncate \(T\) must be <= horizon \(K=3\), got T=4"),
        ({"method": "implicit"}, "unknown 'implicit'"),
        ({"objective": "test"}, "unknown 'test'"),
        ({"hyper_lr": -1}, "hyper_lr must be a number > 0, got -1"),
        ({"clip": 0}, "clip must be a number > 0 or None, got 0"),
        ({"hyper_optimizer": "lbfgs"}, "unknown 'lbfgs'"),
        ({"hypers": [{"name": "beta1", "init": 0.9}]}, r"\['beta1'\] not used by optimizer 'sgd'"),
        ({"optimizer": "rmsprop"}, "unknown inner optimizer 'rmsprop'"),
        ({"method": "greedy", "objective": "train_mean"}, "its hypergradient is always 0"),
        ({"horizon": 1, "objective": "train_mean"}, "horizon 1"),
    ],
)
def test_bad_tuner_arguments(kwargs, match) -> None:
    args = {"hypers": [{"name": "lr", "init": 0.1}], **kwargs}
    with pytest.raises(ValueError, match=match):
        HyperTuner(tiny_model(), args.pop("hypers"), **args)


# ---------------------------------------------------------------------- through TrainingRun
@pytest.fixture(scope="module")
def synthetic() -> DataSplits:
    return load_dataset("synthetic", seed=0)


TUNED = {
    "model": {"name": "cnn", "depth": 1, "width": 4, "norm": "batch", "dropout": 0.2},
    "optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.9},
    "batch_size": 16,
    "seed": 1,
    "device": "cpu",
}


@pytest.mark.parametrize("method", ["reverse", "checkpointed", "forward", "greedy"])
def test_run_tunes_while_training(synthetic: DataSplits, method: str) -> None:
    run = TrainingRun(
        data=synthetic,
        tuner={
            "hypers": [{"name": "lr"}, {"name": "weight_decay", "init": 1e-3}],
            "method": method,
            "horizon": 4,
        },
        **TUNED,
    )
    before = run.hyperparameters
    assert math.isclose(before["lr"], 0.05, rel_tol=1e-6) and before["momentum"] == 0.9
    loss = run.step(10)  # horizons of 4, 4 and 2 (greedy: ten of 1)
    assert math.isfinite(loss) and run.global_step == 10
    assert run.tuner.hyper_steps == (10 if method == "greedy" else 3)
    assert run.hyperparameters["lr"] != before["lr"]
    assert run.last_report is not None and run.last_report.accepted


def test_tuned_run_resumes_bit_identically(synthetic: DataSplits, tmp_path) -> None:
    tuner = {"hypers": [{"name": "lr"}], "method": "reverse", "horizon": 3}
    full = TrainingRun(data=synthetic, tuner=tuner, **TUNED)
    full.step(6)
    full.step(6)
    first = TrainingRun(data=synthetic, tuner=tuner, **TUNED)
    first.step(6)
    path = first.save(tmp_path / "tuned.pt")
    resumed = TrainingRun.from_checkpoint(path, data=synthetic, device="cpu")
    resumed.step(6)
    assert resumed.hyperparameters == full.hyperparameters
    for (k, a), b in zip(
        full.model.state_dict().items(), resumed.model.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b), k


def test_run_set_hyperparameters_with_tuner(synthetic: DataSplits) -> None:
    run = TrainingRun(
        data=synthetic, tuner={"hypers": [{"name": "lr", "granularity": "per_tensor"}]}, **TUNED
    )
    run.set_hyperparameters(lr=0.2, momentum=0.5)
    values = run.hyperparameters
    assert values["momentum"] == 0.5
    assert all(math.isclose(v, 0.2, rel_tol=1e-6) for k, v in values.items() if k.startswith("lr/"))
    with pytest.raises(ValueError, match="must be > 0"):
        run.set_hyperparameters(lr=-1.0)


def test_run_with_nan_data_is_flagged_diverged(synthetic: DataSplits) -> None:
    x = synthetic.train.x.clone()
    x[::3] = float("nan")
    data = DataSplits(
        "nan",
        Split(x, synthetic.train.y),
        synthetic.val,
        synthetic.test,
        synthetic.num_classes,
        synthetic.input_shape,
    )
    run = TrainingRun(
        data=data, tuner={"hypers": [{"name": "lr"}], "horizon": 2, "max_rejections": 3}, **TUNED
    )
    before = snapshot(run.model)
    assert math.isnan(run.step(4))
    assert run.diverged and run.tuner.rejected_steps == 3
    assert all(torch.equal(before[k], v) for k, v in snapshot(run.model).items())


@pytest.mark.parametrize(
    ("tuner", "match"),
    [
        ({"method": "reverse"}, "tuner.hypers is required"),
        ({"hypers": [{"name": "lr"}], "horizon": -2}, "got -2"),
        ({"hypers": [{"name": "lr"}], "speed": 1}, r"unknown key\(s\) \['speed'\]"),
        (
            {"hypers": [{"name": "weight_decay"}]},
            "weight_decay.init: must be > 0 and finite, got 0.0",
        ),
        ({"hypers": "lr"}, "expected a list of specs, got 'lr'"),
        (
            {"hypers": [{"name": "lr"}], "val_batch_size": 0},
            "tuner.val_batch_size must be an integer >= 1, got 0",
        ),
    ],
)
def test_bad_tuner_config_in_run(synthetic: DataSplits, tuner, match) -> None:
    with pytest.raises((ValueError, TypeError), match=match):
        TrainingRun(data=synthetic, tuner=tuner, **TUNED)
