"""Hyperparameter specs: parametrizations, granularities, bounds and bad input."""

from __future__ import annotations

import math

import pytest
import torch

from gradhpo.hyper.spec import HyperParameters, HyperSpec

PARAMS = {"a.weight": torch.zeros(3, 2), "a.bias": torch.zeros(3)}


@pytest.mark.parametrize(
    "spec",
    [
        HyperSpec("lr", 0.03),
        HyperSpec("lr", 0.03, transform="softplus"),
        HyperSpec("lr", 0.03, low=1e-4, high=1.0),
        HyperSpec("weight_decay", 1e-5, transform="softplus", low=0.0, high=0.1),
        HyperSpec("momentum", 0.9),
        HyperSpec("beta2", 0.999),
        HyperSpec("momentum", 0.5, low=0.1, high=0.95),
        HyperSpec("eps", 1e-8),
    ],
)
def test_round_trip_and_gradient(spec: HyperSpec) -> None:
    init = float(spec.init)
    raw = torch.tensor(spec.to_raw(init), dtype=torch.float64, requires_grad=True)
    value = spec.constrain(raw)
    assert math.isclose(float(value.detach()), init, rel_tol=1e-9)
    (grad,) = torch.autograd.grad(value, raw)
    assert float(grad) > 0  # monotone parametrization


@pytest.mark.parametrize(
    "spec",
    [HyperSpec("lr", 0.1), HyperSpec("momentum", 0.9), HyperSpec("lr", 0.1, low=1e-3, high=1.0)],
)
def test_values_stay_valid_for_any_raw(spec: HyperSpec) -> None:
    raw = torch.tensor([-1e3, -30.0, 0.0, 30.0, 1e3], dtype=torch.float64)
    values = spec.constrain(raw)
    assert torch.isfinite(values).all() or spec.low is None
    lo = spec.low if spec.low is not None else 0.0
    assert (values >= lo).all()
    if spec.high is not None:
        assert (values <= spec.high).all()


def test_granularities_and_values() -> None:
    hp = HyperParameters(
        [
            {"name": "lr", "init": 0.1},
            {"name": "momentum", "init": 0.9, "granularity": "per_tensor"},
            {
                "name": "weight_decay",
                "init": {"a.weight": 1e-3, "a.bias": 1e-4},
                "granularity": "per_element",
            },
            {"name": "example_weight", "init": 1.0, "granularity": "per_example"},
        ],
        PARAMS,
        num_examples=5,
    )
    assert set(hp.raw) == {
        "lr",
        "momentum/a.weight",
        "momentum/a.bias",
        "weight_decay/a.weight",
        "weight_decay/a.bias",
        "example_weight",
    }
    assert hp.raw["weight_decay/a.weight"].shape == (3, 2) and hp.raw["momentum/a.bias"].shape == ()
    assert hp.numel() == 1 + 2 + 9 + 5
    values = hp.values()
    assert values["lr"]["a.weight"] is values["lr"]["a.bias"]  # one shared scalar
    torch.testing.assert_close(values["weight_decay"]["a.bias"], torch.full((3,), 1e-4))
    assert values["example_weight"].shape == (5,)
    assert all(t.requires_grad for t in hp.raw.values())
    summary = hp.summary()
    assert math.isclose(summary["momentum/a.bias"], 0.9, rel_tol=1e-6)


def test_set_values_and_state_dict() -> None:
    hp = HyperParameters([{"name": "lr", "init": 0.1, "granularity": "per_tensor"}], PARAMS)
    hp.set_values({"lr": 0.5})
    assert all(math.isclose(v, 0.5, rel_tol=1e-6) for v in hp.summary().values())
    hp.set_values({"lr/a.bias": 0.2})
    assert math.isclose(hp.summary()["lr/a.bias"], 0.2, rel_tol=1e-6)
    state = hp.state_dict()
    other = HyperParameters([{"name": "lr", "init": 0.1, "granularity": "per_tensor"}], PARAMS)
    other.load_state_dict(state)
    assert other.summary() == hp.summary()
    with pytest.raises(ValueError, match="must be > 0"):
        hp.set_values({"lr": -1.0})
    assert math.isclose(hp.summary()["lr/a.bias"], 0.2, rel_tol=1e-6)  # unchanged on error
    with pytest.raises(KeyError, match="lr/c.weight"):
        hp.set_values({"lr/c.weight": 0.1})


@pytest.mark.parametrize(
    ("specs", "kwargs", "match"),
    [
        ([{"name": "lr", "init": -0.1}], {}, "lr.init: must be > 0 and finite, got -0.1"),
        ([{"name": "lr", "init": 0.0}], {}, "got 0.0"),
        ([{"name": "learning_rate", "init": 0.1}], {}, "unknown 'learning_rate'"),
        ([{"name": "momentum", "init": 1.0}], {}, r"strictly inside \(0.0, 1.0\), got 1.0"),
        ([{"name": "lr", "init": 0.1, "granularity": "per_layer"}], {}, "unknown 'per_layer'"),
        ([{"name": "lr", "init": 0.1, "granularity": "per_example"}], {}, "does not fit"),
        ([{"name": "example_weight", "init": 1.0}], {}, "does not fit"),
        (
            [{"name": "example_weight", "init": 1.0, "granularity": "per_example"}],
            {},
            "num_examples=None",
        ),
        (
            [{"name": "lr", "init": {"a.weight": 0.1}, "granularity": "per_tensor"}],
            {},
            r"missing \['a.bias'\]",
        ),
        (
            [
                {
                    "name": "lr",
                    "init": {"a.weight": 0.1, "a.bias": 0.1, "b.weight": 0.1},
                    "granularity": "per_tensor",
                }
            ],
            {},
            r"unknown \['b.weight'\]",
        ),
        (
            [{"name": "lr", "init": {"a.weight": 0.1}}],
            {},
            "needs granularity per_tensor or per_element",
        ),
        (
            [{"name": "lr", "init": 0.1, "low": 0.0, "high": 1.0}],
            {},
            "log parametrization needs low > 0, got low=0.0",
        ),
        ([{"name": "lr", "init": 0.1, "low": 1e-3}], {}, "both bounds or none"),
        ([{"name": "lr", "init": 2.0, "low": 1e-3, "high": 1.0}], {}, "got 2.0"),
        ([{"name": "lr", "init": 0.1, "transform": "tanh"}], {}, "unknown 'tanh'"),
        ([{"name": "lr", "init": "big"}], {}, "expected a number, got 'big'"),
        ([{"name": "lr", "init": 0.1}, {"name": "lr", "init": 0.2}], {}, r"repeated: \['lr'\]"),
        ([{"name": "lr"}], {}, "'name' and 'init' are required"),
        ([{"name": "lr", "init": 0.1, "scale": "log"}], {}, r"unknown key\(s\) \['scale'\]"),
        ([], {}, "at least one"),
    ],
)
def test_bad_specs(specs, kwargs, match) -> None:
    with pytest.raises((ValueError, TypeError), match=match):
        HyperParameters(specs, PARAMS, **kwargs)
