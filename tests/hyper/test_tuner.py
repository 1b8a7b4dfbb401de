"""HyperTuner and its use through TrainingRun: hyper steps, NaN rejection, clipping, resume."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from gradhpo.data import DataSplits, Split, load_dataset
from gradhpo.hyper.methods import InnerProblem, Objective, hypergradient, unroll
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
        ({"every": 0}, r"every \(M\) must be an integer >= 1, got 0"),
        ({"every": 2.5}, r"every \(M\) must be an integer >= 1, got 2.5"),
        ({"method": "forward", "chunk": 0}, "chunk must be an integer >= 1, got 0"),
        ({"compile": True}, "only forward mode steps are compiled, got method 'reverse'"),
        ({"method": "forward", "compile": 1}, "compile must be true or false, got 1"),
        ({"method": "checkpointed", "checkpoint_every": 0}, "checkpoint_every must be an"),
        ({"checkpoint_every": 2}, "only the checkpointed method has segments, got method 'rev"),
    ],
)
def test_bad_tuner_arguments(kwargs, match) -> None:
    args = {"hypers": [{"name": "lr", "init": 0.1}], **kwargs}
    with pytest.raises(ValueError, match=match):
        HyperTuner(tiny_model(), args.pop("hypers"), **args)


# ---------------------------------------------------------------------- amortized tuning
def _params(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_every_one_is_the_default_behaviour_exactly() -> None:
    """every=1 tunes every horizon: bitwise the tuner without the option."""
    runs = []
    for kwargs in ({}, {"every": 1}):
        model = tiny_model()
        tuner = HyperTuner(
            model, [{"name": "lr", "init": 0.1}], optimizer="momentum", horizon=3, **kwargs
        )
        reports = [tuner.step(batches(3, seed=s), batches(1, seed=50 + s)[0]) for s in range(4)]
        runs.append((tuner, reports, _params(model)))
    (a, reports_a, params_a), (b, reports_b, params_b) = runs
    assert reports_a == reports_b and all(r.tuned and r.accepted for r in reports_b)
    assert all(torch.equal(params_a[k], params_b[k]) for k in params_a)
    assert torch.equal(a.hypers.raw["lr"].detach(), b.hypers.raw["lr"].detach())
    assert b.hyper_steps == 4 and b.horizons == 4
    assert b.tuned_steps == b.total_steps == 12 and b.tuned_fraction == 1.0


@pytest.mark.parametrize("method", ["reverse", "forward"])
def test_every_three_tunes_every_third_horizon(method: str) -> None:
    """Hypers move on horizons 0, 3, 6 only; in between the weights follow plain inner
    steps (unroll) with the hypers of the moment."""
    model = tiny_model()
    tuner = HyperTuner(
        model,
        [{"name": "lr", "init": 0.1}, {"name": "weight_decay", "init": 1e-3}],
        optimizer="momentum",
        method=method,
        horizon=2,
        every=3,
    )
    assert math.isnan(tuner.tuned_fraction)
    for h in range(7):
        train, val = batches(2, seed=h), batches(1, seed=100 + h)[0]
        raw_before = tuner.hypers.state_dict()
        start = _params(model)
        state_before = {k: v.clone() for k, v in tuner.opt_state.items()}
        assert tuner.next_is_tuned == (h % 3 == 0)
        report = tuner.step(train, val)
        moved = any(not torch.equal(raw_before[k], v.detach()) for k, v in tuner.hypers.raw.items())
        assert report.accepted and report.weights_updated and report.steps == 2
        assert report.tuned == (h % 3 == 0) and moved == (h % 3 == 0), h
        if not report.tuned:
            assert math.isnan(report.objective) and math.isnan(report.hypergrad_norm)
            want, want_state, _, losses = unroll(tuner.problem, start, state_before, {}, train)
            assert all(torch.equal(p.detach(), want[n]) for n, p in model.named_parameters())
            assert all(torch.equal(tuner.opt_state[k], want_state[k]) for k in want_state)
            assert report.train_loss == float(losses.mean())
    assert tuner.hyper_steps == 3 and tuner.horizons == 7
    assert (tuner.tuned_steps, tuner.total_steps) == (6, 14)
    assert math.isclose(tuner.tuned_fraction, 3 / 7)


def test_amortized_state_dict_round_trip_mid_cycle() -> None:
    def make() -> HyperTuner:
        return HyperTuner(
            tiny_model(), [{"name": "lr", "init": 0.1}], optimizer="adam", horizon=2, every=3
        )

    tuner = make()
    for h in range(4):  # horizons 0 (tuned), 1, 2, 3 (tuned): the next one is plain
        tuner.step(batches(2, seed=h), batches(1, seed=100 + h)[0])
    state = tuner.state_dict()
    assert (state["horizons"], state["tuned_steps"], state["total_steps"]) == (4, 4, 8)
    twin = make()
    twin.model.load_state_dict(tuner.model.state_dict())
    twin.load_state_dict(state)
    for h in range(4, 9):
        train, val = batches(2, seed=h), batches(1, seed=100 + h)[0]
        a, b = tuner.step(train, val), twin.step(train, val)
        assert a == b and a.tuned == (h % 3 == 0)
    assert all(
        torch.equal(x, y)
        for x, y in zip(_params(tuner.model).values(), _params(twin.model).values(), strict=True)
    )
    assert tuner.state_dict()["inner"].keys() == twin.state_dict()["inner"].keys()
    assert (twin.horizons, twin.tuned_steps, twin.total_steps) == (9, 6, 18)
    # A state dict from before amortized tuning (no counters) still loads.
    old = {k: v for k, v in state.items() if k not in ("horizons", "tuned_steps", "total_steps")}
    twin.load_state_dict(old)
    assert (twin.horizons, twin.tuned_steps, twin.total_steps) == (0, 0, 0)


def test_nan_in_a_plain_horizon_rolls_back_and_retries_it_plain() -> None:
    model = tiny_model()
    tuner = HyperTuner(model, [{"name": "lr", "init": 0.1}], horizon=2, every=2)
    val = batches(1, seed=5)[0]
    assert tuner.step(batches(2), val).tuned  # horizon 0: tuned
    previous = {k: v.clone() for k, v in tuner._previous_raw.items()}
    weights = snapshot(model)
    bad = batches(2, seed=1)
    bad[1][0][0, 0] = float("nan")
    report = tuner.step(bad, val)
    assert not report.tuned and not report.accepted and not report.weights_updated
    assert tuner.rejected_steps == 1 and tuner.consecutive_rejections == 1
    assert all(torch.equal(weights[k], v) for k, v in snapshot(model).items())
    assert torch.equal(tuner.hypers.raw["lr"].detach(), previous["lr"])
    assert (tuner.horizons, tuner.total_steps) == (1, 2)
    retry = tuner.step(batches(2, seed=2), val)  # the same role: plain
    assert not retry.tuned and retry.accepted and tuner.consecutive_rejections == 0
    assert tuner.step(batches(2, seed=3), val).tuned


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
    # horizons of 4 and 4, then 2 steps of an open third horizon, applied as plain steps and
    # replayed with the hypergradient when a later call completes it (greedy: ten of 1)
    loss = run.step(10)
    assert math.isfinite(loss) and run.global_step == 10
    assert run.tuner.hyper_steps == (10 if method == "greedy" else 2)
    run.step(2)
    assert run.tuner.hyper_steps == (12 if method == "greedy" else 3)
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


def test_run_config_carries_amortized_tuning(synthetic: DataSplits, tmp_path) -> None:
    """tuner.every reaches the HyperTuner from a run config: one horizon in three is tuned,
    and a checkpoint taken mid-cycle continues exactly."""
    tuner = {"hypers": [{"name": "lr"}], "method": "reverse", "horizon": 2, "every": 3}
    run = TrainingRun(data=synthetic, tuner=tuner, **TUNED)
    run.step(12)  # six horizons: the 1st and 4th are tuned
    assert (run.tuner.tuned_steps, run.tuner.total_steps) == (4, 12)
    assert run.tuner.hyper_steps == 2
    half = TrainingRun(data=synthetic, tuner=tuner, **TUNED)
    half.step(6)
    resumed = TrainingRun.from_checkpoint(
        half.save(tmp_path / "t.pt"), data=synthetic, device="cpu"
    )
    resumed.step(6)
    assert resumed.hyperparameters == run.hyperparameters
    assert (resumed.tuner.tuned_steps, resumed.tuner.total_steps) == (4, 12)
    with pytest.raises(ValueError, match="every"):
        TrainingRun(data=synthetic, tuner={**tuner, "every": 0}, **TUNED)


def test_run_config_carries_checkpoint_segments(synthetic: DataSplits) -> None:
    """tuner.checkpoint_every reaches the hypergradient from a run config: the tuned run is
    the one-step-segment run's, to float rounding (the same hypergradient)."""
    tuner = {"hypers": [{"name": "lr"}], "method": "checkpointed", "horizon": 4}
    runs = []
    for every in (1, 3):
        run = TrainingRun(data=synthetic, tuner={**tuner, "checkpoint_every": every}, **TUNED)
        run.step(12)
        runs.append(run)
    assert runs[1].tuner.checkpoint_every == 3 and runs[1].tuner.hyper_steps == 3
    assert runs[1].hyperparameters == pytest.approx(runs[0].hyperparameters, rel=1e-5)
    with pytest.raises(ValueError, match="checkpoint_every must be an integer >= 1, got -1"):
        TrainingRun(data=synthetic, tuner={**tuner, "checkpoint_every": -1}, **TUNED)
