"""Hybrid PBT (a tuner inside every member): exploring a tuned hyperparameter moves its level
by the PBT ratio and keeps what the hypergradients learned (issue 13: it used to overwrite
every schedule segment with the PBT record's perturbed starting value)."""

from __future__ import annotations

import math

import pytest
import torch

from gradhpo.hyper.spec import HyperParameters, HyperSpec, Schedule
from gradhpo.pbt import RunMember
from gradhpo.run import TrainingRun


def hybrid_run(seed: int = 0) -> TrainingRun:
    return TrainingRun(
        model={"name": "mlp", "depth": 1, "width": 8},
        data={"name": "synthetic", "seed": 0},
        optimizer={"name": "sgd", "lr": 0.05, "momentum": 0.9},
        batch_size=16,
        seed=seed,
        device="cpu",
        epochs=2,
        tuner={
            "hypers": [
                {"name": "lr", "schedule": {"segments": 3}},
                {"name": "weight_decay", "init": 1e-3},
            ],
            "method": "reverse",
            "horizon": 4,
        },
    )


def segments(run: TrainingRun, name: str = "lr") -> list[float]:
    spec = run.tuner.hypers.spec(name)
    (key,) = run.tuner.hypers.keys_of(name)
    return spec.constrain(run.tuner.hypers.raw[key].detach()).tolist()


def test_explore_scales_a_learned_schedule_and_keeps_its_shape() -> None:
    member = RunMember(hybrid_run(), "val_loss", {"optimizer.lr": 0.05, "optimizer.momentum": 0.9})
    member.run.tuner.hypers.set_values({"lr[0]": 0.05, "lr[1]": 0.02, "lr[2]": 0.01})
    member.apply({"optimizer.lr": 0.06, "optimizer.momentum": 0.8})
    assert segments(member.run) == pytest.approx([0.06, 0.024, 0.012], rel=1e-6)
    assert member.run.hyperparameters["momentum"] == pytest.approx(0.8)  # a constant: set
    assert member.values == {"optimizer.lr": 0.06, "optimizer.momentum": 0.8}


def test_a_copier_scales_the_winners_learned_values() -> None:
    winner = RunMember(hybrid_run(0), "val_loss", {"optimizer.lr": 0.05})
    winner.run.step(12)  # the tuner moves the segments it reached
    learned = segments(winner.run)
    assert learned != pytest.approx([0.05, 0.05, 0.05])
    loser = RunMember(hybrid_run(1), "val_loss", {"optimizer.lr": 0.2})
    loser.load_state_dict(winner.state_dict(), keep_stream=True)
    assert loser.values == {"optimizer.lr": 0.05}  # the winner's record came with its state
    loser.apply({"optimizer.lr": 0.04})  # explore: the winner's record times 0.8
    assert segments(loser.run) == pytest.approx([v * 0.8 for v in learned], rel=1e-6)


def test_without_a_record_the_value_is_set() -> None:
    member = RunMember(hybrid_run(), "val_loss")  # built without values (e.g. by hand)
    member.apply({"optimizer.lr": 0.03})
    assert segments(member.run) == pytest.approx([0.03] * 3, rel=1e-6)


@pytest.mark.parametrize(
    "spec",
    [
        HyperSpec("lr", 0.1),  # log
        HyperSpec("momentum", 0.5, transform="softplus"),
        HyperSpec("lr", 0.1, low=1e-3, high=1.0),  # bounded, log-sigmoid
        HyperSpec("momentum", 0.5, low=0.0, high=0.99, transform="sigmoid"),
    ],
    ids=["log", "softplus", "bounded-log", "bounded-linear"],
)
def test_scale_values_per_transform(spec: HyperSpec) -> None:
    params = {"w": torch.zeros(3, 2), "b": torch.zeros(2)}
    spec = HyperSpec(
        spec.name,
        spec.init,
        granularity="per_tensor",
        transform=spec.transform,
        low=spec.low,
        high=spec.high,
        schedule=Schedule(segments=2, steps=10),
    )
    hypers = HyperParameters([spec], params)
    hypers.set_values({f"{spec.name}/w[0]": spec.init * 0.5, f"{spec.name}/b[1]": spec.init * 0.8})
    before = {k: spec.constrain(v.detach()).clone() for k, v in hypers.raw.items()}
    hypers.scale_values(spec.name, 1.1)
    for key, value in hypers.raw.items():
        after = spec.constrain(value.detach())
        expected = before[key] * 1.1
        if spec.high is not None:
            expected = expected.clamp(max=spec.high * (1 - 1e-6))
        assert torch.allclose(after, expected, rtol=1e-5), key
    with pytest.raises(ValueError, match="scale factor must be > 0"):
        hypers.scale_values(spec.name, -1.0)
    with pytest.raises(ValueError, match="scale factor must be > 0"):
        hypers.scale_values(spec.name, math.inf)


def test_a_bounded_value_scaled_past_its_bound_stays_inside() -> None:
    spec = HyperSpec("momentum", 0.9, low=0.0, high=0.99, transform="sigmoid")
    hypers = HyperParameters([spec], {"w": torch.zeros(2)})
    hypers.scale_values("momentum", 2.0)
    value = float(spec.constrain(next(iter(hypers.raw.values())).detach()))
    assert 0.98 < value < 0.99


def test_reapplying_the_record_changes_nothing() -> None:
    """A resume rebuilds a member, loads its checkpoint and re-applies its PBT record: that
    must not close the tuner's open horizon (it did: hybrid PBT killed mid-horizon resumed
    to other scores) nor move a learned value."""
    member = RunMember(hybrid_run(), "val_loss", {"optimizer.lr": 0.05})
    member.run.step(2)  # half a horizon of 4: open
    before = segments(member.run)
    member.apply({"optimizer.lr": 0.05})
    assert len(member.run._pending) == 2
    assert segments(member.run) == before
