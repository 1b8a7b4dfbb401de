"""BatchedPopulation: every member against an independent TrainingRun, exploit, divergence,
bad inputs and checkpoints.

The reference for each member is a sequential ``TrainingRun`` with the same seed and
hyperparameters. In float32 the vmapped convolutions sum in another order, so weights agree to
rounding (rtol 1e-5, atol 1e-6; measured max abs difference ~4e-7 after 5 steps); in float64
(the run's module cast with ``.to(float64)``, the population built with ``dtype=float64``)
they agree to ~1e-16, checked at 1e-12.
"""

from __future__ import annotations

import io
import math
import re
from dataclasses import replace
from typing import Any

import pytest
import torch
from gradhpo.models import build_model

from gradhpo.data import DataSplits, Split, load_dataset
from gradhpo.pbt import BatchedPopulation
from gradhpo.run import TrainingRun

N = 4
SEEDS = [3, 1, 4, 5]
K = 5
BATCH = 32
SGD = {"name": "sgd", "momentum": 0.9}
SGD_HYPERS = {
    "lr": [0.1, 0.05, 0.2, 0.01],
    "momentum": [0.9, 0.0, 0.5, 0.95],
    "weight_decay": [0.0, 1e-3, 1e-2, 0.0],
}
ADAM = {"name": "adam"}
ADAM_HYPERS = {
    "lr": [1e-3, 3e-3, 1e-2, 5e-4],
    "beta1": [0.9, 0.8, 0.9, 0.5],
    "beta2": [0.999, 0.99, 0.999, 0.9],
    "weight_decay": [0.0, 1e-3, 0.0, 1e-2],
}
F32 = {"rtol": 1e-5, "atol": 1e-6}
F64 = {"rtol": 1e-12, "atol": 1e-14}


def cnn(norm: str = "batch", **extra: Any) -> dict[str, Any]:
    return {"name": "cnn", "depth": 2, "width": 8, "norm": norm, **extra}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def digits() -> DataSplits:
    return load_dataset("digits", seed=0)


def as_float64(data: DataSplits) -> DataSplits:
    def cast(split: Split) -> Split:
        return Split(split.x.double(), split.y)

    return replace(data, train=cast(data.train), val=cast(data.val), test=cast(data.test))


def make_population(data: DataSplits, **overrides: Any) -> BatchedPopulation:
    kwargs: dict[str, Any] = dict(
        model=cnn(),
        data=data,
        n_members=N,
        optimizer=SGD,
        hypers=SGD_HYPERS,
        batch_size=BATCH,
        seeds=SEEDS,
        device="cpu",
    )
    kwargs.update(overrides)
    return BatchedPopulation(**kwargs)


def reference_run(
    data: DataSplits,
    i: int,
    model: dict[str, Any],
    optimizer: dict[str, Any],
    hypers: dict[str, list[float]],
    seeds: list[int] = SEEDS,
    dtype: torch.dtype | None = None,
) -> TrainingRun:
    member_opt = {**optimizer, **{name: values[i] for name, values in hypers.items()}}
    run = TrainingRun(
        model=model,
        data=data,
        optimizer=member_opt,
        batch_size=BATCH,
        seed=seeds[i],
        device="cpu",
    )
    if dtype is not None:
        run.model.to(dtype)  # in place: the optimizer keeps the same Parameter objects
    return run


def assert_member_close(
    pop: BatchedPopulation, i: int, expected: dict[str, torch.Tensor], tol: dict[str, float]
) -> None:
    got = pop.member_state_dict(i)["model"]
    assert list(got) == list(expected)
    for name, value in expected.items():
        if value.is_floating_point():
            torch.testing.assert_close(got[name], value, **tol, msg=f"member {i}: {name}")
        else:
            assert torch.equal(got[name], value), f"member {i}: {name}"


def assert_members_equal(a: dict[str, Any], b: dict[str, Any]) -> None:
    """Exact equality of two member_state_dicts' model, optimizer state, hypers and step."""
    for name in a["model"]:
        assert torch.equal(a["model"][name], b["model"][name]), name
    assert a["optimizer"]["state"].keys() == b["optimizer"]["state"].keys()
    for k, slots in a["optimizer"]["state"].items():
        for slot, value in slots.items():
            assert torch.equal(value, b["optimizer"]["state"][k][slot]), (k, slot)
    assert a["hypers"] == b["hypers"]
    assert a["step"] == b["step"]
    assert a["diverged"] == b["diverged"]


# ------------------------------------------------------------------ batched == sequential
@pytest.mark.parametrize("norm", ["batch", "none"])
@pytest.mark.parametrize(
    ("optimizer", "hypers"), [(SGD, SGD_HYPERS), (ADAM, ADAM_HYPERS)], ids=["sgd", "adam"]
)
def test_matches_sequential_training_runs(
    digits: DataSplits, norm: str, optimizer: dict, hypers: dict
) -> None:
    model = cnn(norm)
    pop = make_population(digits, model=model, optimizer=optimizer, hypers=hypers)
    losses = pop.step(K)
    assert losses.shape == (N,) and losses.dtype == torch.float64
    evaluation = pop.evaluate("val")
    for i in range(N):
        run = reference_run(digits, i, model, optimizer, hypers)
        run_loss = run.step(K)
        assert math.isclose(float(losses[i]), run_loss, rel_tol=1e-5)
        assert_member_close(pop, i, run.model.state_dict(), F32)
        expected = run.evaluate("val")
        assert math.isclose(float(evaluation["loss"][i]), expected["loss"], rel_tol=1e-5)
        assert float(evaluation["accuracy"][i]) == pytest.approx(expected["accuracy"], abs=0.01)
        assert pop.get_hyperparameters(i) == pytest.approx(run.hyperparameters)
    assert pop.steps.tolist() == [K] * N
    assert not pop.diverged.any()


@pytest.mark.parametrize(
    ("optimizer", "hypers"),
    [
        ({"name": "sgd", "momentum": 0.9, "nesterov": True}, {"lr": [0.1, 0.05, 0.2, 0.02]}),
        ({"name": "adamw"}, {"lr": [1e-3, 3e-3, 1e-2, 5e-4], "weight_decay": [0, 0.1, 1e-2, 1]}),
    ],
    ids=["nesterov", "adamw"],
)
def test_float64_matches_sequential_to_rounding(
    digits: DataSplits, optimizer: dict, hypers: dict
) -> None:
    data = as_float64(digits)
    model = cnn("batch")
    pop = make_population(
        data, model=model, optimizer=optimizer, hypers=hypers, dtype=torch.float64
    )
    pop.step(K)
    for i in range(N):
        run = reference_run(data, i, model, optimizer, hypers, dtype=torch.float64)
        run.step(K)
        assert_member_close(pop, i, run.model.state_dict(), F64)


@pytest.mark.parametrize(
    "model",
    [
        {"name": "mlp", "depth": 2, "width": 16, "norm": "batch"},
        cnn("group", groups=4, pooling="l2", activation="tanh"),
    ],
    ids=["mlp-batchnorm", "cnn-groupnorm"],
)
def test_other_model_families_match(digits: DataSplits, model: dict) -> None:
    pop = make_population(digits, model=model, n_members=2, seeds=[0, 7], hypers=None)
    pop.step(3)
    for i, seed in enumerate([0, 7]):
        run = reference_run(digits, 0, model, SGD, {}, seeds=[seed])
        run.step(3)
        assert_member_close(pop, i, run.model.state_dict(), F32)


def test_hyperparameter_changes_follow_torch_optim(digits: DataSplits) -> None:
    """Changing lr and switching momentum on mid-training: torch's SGD creates its momentum
    buffer at the first step with momentum != 0, and the population must do the same."""
    hypers = {"lr": [0.1, 0.05], "momentum": [0.0, 0.9]}
    pop = make_population(digits, n_members=2, seeds=[0, 1], hypers=hypers)
    runs = [reference_run(digits, i, cnn(), SGD, hypers, seeds=[0, 1]) for i in range(2)]
    pop.step(3)
    for i, run in enumerate(runs):
        run.step(3)
        # Same optimizer-state layout as torch: no momentum buffer while momentum is 0.
        exported = pop.member_state_dict(i)["optimizer"]
        expected = run.optimizer.state_dict()
        assert exported["state"].keys() == expected["state"].keys()
        for k, slots in expected["state"].items():
            assert slots.keys() == exported["state"][k].keys()
        assert exported["param_groups"] == expected["param_groups"]
    assert pop.member_state_dict(0)["optimizer"]["state"] == {}
    change = {"lr": 0.02, "momentum": 0.8}
    pop.set_hyperparameters(0, **change)
    runs[0].set_hyperparameters(**change)
    pop.set_hyperparameters(1, momentum=0.0)
    runs[1].set_hyperparameters(momentum=0.0)
    pop.step(3)
    for i, run in enumerate(runs):
        run.step(3)
        assert_member_close(pop, i, run.model.state_dict(), F32)
        assert pop.get_hyperparameters(i) == pytest.approx(run.hyperparameters)


def test_hypers_accept_tensors_and_scalars(digits: DataSplits) -> None:
    lrs = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64)
    pop = make_population(digits, hypers={"lr": lrs, "momentum": 0.5})
    assert pop.get_hyperparameters(2) == {"lr": 0.3, "weight_decay": 0.0, "momentum": 0.5}
    assert torch.equal(pop.hyperparameters["lr"], lrs)
    pop.set_hyperparameters(2, lr=0.01)
    assert pop.get_hyperparameters(2)["lr"] == 0.01
    assert pop.get_hyperparameters(1)["lr"] == 0.2


def test_dropout_masks_differ_per_member(digits: DataSplits) -> None:
    same = {"seeds": [0, 0], "n_members": 2, "hypers": None}
    plain = make_population(digits, model=cnn(dropout=0.0), **same)
    plain.step(1)
    dropped = make_population(digits, model=cnn(dropout=0.5), **same)
    dropped.step(1)
    w_plain = plain.params["classifier.weight"]
    w_dropped = dropped.params["classifier.weight"]
    assert torch.equal(w_plain[0], w_plain[1])
    assert not torch.equal(w_dropped[0], w_dropped[1])


def test_global_rng_untouched(digits: DataSplits) -> None:
    before = torch.get_rng_state()
    pop = make_population(digits, model=cnn(dropout=0.3))
    pop.step(2)
    pop.evaluate("test")
    assert torch.equal(torch.get_rng_state(), before)


# ------------------------------------------------------------------ export and exploit
def test_member_exports_to_training_run_and_model(digits: DataSplits) -> None:
    pop = make_population(digits, optimizer=ADAM, hypers=ADAM_HYPERS)
    pop.step(3)
    i = 2
    state = pop.member_state_dict(i)
    module = build_model(cnn(), digits.input_shape, digits.num_classes)
    module.load_state_dict(state["model"])  # strict

    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)
    cfg = loaded["config"]
    run = TrainingRun(
        model=cfg["model"],
        data=digits,
        optimizer=cfg["optimizer"],
        batch_size=cfg["training"]["batch_size"],
        seed=cfg["training"]["seed"],
        device="cpu",
    )
    run.load_state_dict(loaded)
    assert run.global_step == 3
    run.step(4)
    pop.step(4)
    assert_member_close(pop, i, run.model.state_dict(), F32)

    # ... and back: a TrainingRun's state loads into a member.
    run_state = run.state_dict()
    pop.load_member_state_dict(0, run_state)
    assert_members_equal(pop.member_state_dict(0), run_state)
    assert pop.member_state_dict(0)["iterator"]["position"] == run_state["iterator"]["position"]


def test_copy_member_copies_everything_and_continues_with_own_batches(
    digits: DataSplits,
) -> None:
    src, dst = 2, 0
    pop = make_population(digits, model=cnn("batch"))
    pop.step(3)
    dst_iterator = pop.member_state_dict(dst)["iterator"]
    pop.copy_member(src, dst)
    copied, source = pop.member_state_dict(dst), pop.member_state_dict(src)
    assert_members_equal(copied, source)
    assert copied["optimizer"]["param_groups"] == source["optimizer"]["param_groups"]
    assert torch.equal(copied["iterator"]["permutation"], dst_iterator["permutation"])
    assert copied["iterator"]["position"] == dst_iterator["position"]

    # The reference: the source's state in a run that reads dst's batches.
    reference_state = {**source, "iterator": dst_iterator}
    run = reference_run(digits, dst, cnn("batch"), SGD, SGD_HYPERS)
    run.load_state_dict(reference_state)
    run.step(K)
    pop.step(K)
    assert_member_close(pop, dst, run.model.state_dict(), F32)
    # The source was not disturbed by the copy.
    src_run = reference_run(digits, src, cnn("batch"), SGD, SGD_HYPERS)
    src_run.step(3 + K)
    assert_member_close(pop, src, src_run.model.state_dict(), F32)


# ------------------------------------------------------------------ divergence
@pytest.mark.parametrize("norm", ["batch", "none"])
def test_diverging_member_does_not_touch_the_others(digits: DataSplits, norm: str) -> None:
    lrs = [0.1, 1e30, 0.05, 0.2]
    with_bad = make_population(digits, model=cnn(norm), hypers={"lr": lrs})
    keep = [0, 2, 3]
    without = make_population(
        digits,
        model=cnn(norm),
        n_members=3,
        seeds=[SEEDS[j] for j in keep],
        hypers={"lr": [lrs[j] for j in keep]},
    )
    frozen: dict[str, torch.Tensor] | None = None
    for _ in range(K):
        losses = with_bad.step(1)
        without.step(1)
        if bool(with_bad.diverged[1]) and frozen is None:
            frozen = with_bad.member_state_dict(1)["model"]
    assert with_bad.diverged.tolist() == [False, True, False, False]
    assert math.isnan(float(losses[1]))
    assert torch.isfinite(losses[keep]).all()
    assert frozen is not None
    after = with_bad.member_state_dict(1)["model"]
    for name in frozen:  # a diverged member is frozen (no update is applied any more)
        assert torch.equal(frozen[name], after[name]) or torch.isnan(frozen[name]).all(), name
    steps = with_bad.steps.tolist()
    assert steps[1] < K and [steps[j] for j in keep] == [K] * 3
    for name, value in without.params.items():
        assert torch.equal(with_bad.params[name][keep], value), name
    for name, value in without.buffers.items():
        assert torch.equal(with_bad.buffers[name][keep], value), name

    # PBT's exploit revives a diverged slot.
    with_bad.copy_member(0, 1)
    assert not with_bad.diverged[1]
    assert torch.isfinite(with_bad.step(1)).all()


# ------------------------------------------------------------------ bad inputs
BAD_CONSTRUCTOR = [
    ({"n_members": 0}, "n_members must be an integer >= 1, got 0"),
    ({"n_members": 2}, "seeds must have n_members=2 entries, got 4"),
    ({"seeds": [0, 1, -1, 3]}, "seeds[2] must be an integer >= 0, got -1"),
    ({"hypers": {"lr": [0.1, -1.0, 0.1, 0.1]}}, "'hypers.lr[1]' must be > 0, got -1.0"),
    ({"hypers": {"lr": [0.1, 0.2]}}, "hypers.lr must have n_members=4 values, got 2"),
    ({"hypers": {"momentum": 1.0}}, "'hypers.momentum[0]' must be in [0, 1), got 1.0"),
    ({"hypers": {"weight_decay": [0, 0, 0, -0.1]}}, "'hypers.weight_decay[3]' must be >= 0"),
    ({"hypers": {"lr": [0.1, math.nan, 0.1, 0.1]}}, "'hypers.lr[1]' must be finite, got nan"),
    ({"hypers": {"beta1": 0.9}}, "unknown hyperparameter 'beta1' for optimizer 'sgd'"),
    ({"optimizer": {"name": "rmsprop"}}, "optimizer.name: unknown optimizer 'rmsprop'"),
    (
        {
            "optimizer": {"name": "sgd", "momentum": 0.9, "nesterov": True},
            "hypers": {"momentum": [0.9, 0.0, 0.9, 0.9]},
        },
        "hypers.momentum[1]: Nesterov momentum needs momentum > 0, got 0.0",
    ),
    ({"batch_size": 0}, "batch_size must be an integer >= 1, got 0"),
    ({"dtype": torch.int64}, "dtype must be a floating torch.dtype, got torch.int64"),
    ({"model": {"name": "cnn", "norm": "weird"}}, "norm must be one of"),
    ({"device": "tpu"}, "device: unknown device 'tpu'"),
]


@pytest.mark.parametrize(("overrides", "message"), BAD_CONSTRUCTOR)
def test_bad_constructor_arguments(digits: DataSplits, overrides: dict, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        make_population(digits, **overrides)


@pytest.fixture(scope="module")
def small_population(digits: DataSplits) -> BatchedPopulation:
    return make_population(digits)


BAD_CALLS = [
    (lambda p: p.set_hyperparameters(0, lr=math.inf), "'lr' must be finite, got inf"),
    (lambda p: p.set_hyperparameters(0, momentum=-0.5), "'momentum' must be in [0, 1), got -0.5"),
    (lambda p: p.set_hyperparameters(0, beta2=0.9), "unknown hyperparameter(s) ['beta2']"),
    (
        lambda p: p.set_hyperparameters(4, lr=0.1),
        "member must be an integer in [0, 4), got member=4",
    ),
    (lambda p: p.get_hyperparameters(-1), "member must be an integer in [0, 4), got member=-1"),
    (lambda p: p.copy_member(0, 9), "dst must be an integer in [0, 4), got dst=9"),
    (lambda p: p.copy_member(True, 1), "src must be an integer in [0, 4), got src=True"),
    (lambda p: p.step(0), "step: n must be an integer >= 1, got 0"),
    (lambda p: p.evaluate("dev"), "split must be 'train', 'val' or 'test', got 'dev'"),
    (lambda p: p.load_member_state_dict(0, {"hypers": {}}), "at least a 'model' entry"),
    (
        lambda p: p.load_member_state_dict(0, {"model": {"classifier.weight": torch.zeros(1)}}),
        "does not fit this architecture",
    ),
    (lambda p: p.load_state_dict({"config": {}}), "population state is missing key(s)"),
]


@pytest.mark.parametrize(("call", "message"), BAD_CALLS)
def test_bad_method_arguments(small_population: BatchedPopulation, call, message: str) -> None:
    before = small_population.get_hyperparameters(0)
    with pytest.raises(ValueError, match=re.escape(message)):
        call(small_population)
    assert small_population.get_hyperparameters(0) == before


def test_load_state_dict_rejects_another_population(digits: DataSplits) -> None:
    state = make_population(digits).state_dict()
    other = make_population(digits, model=cnn("none"))
    with pytest.raises(ValueError, match=re.escape("population state has model=")):
        other.load_state_dict(state)
    adam = make_population(digits, optimizer=ADAM, hypers=None)
    with pytest.raises(ValueError, match=re.escape("optimizer.name='sgd'")):
        adam.load_state_dict(state)


# ------------------------------------------------------------------ checkpoints
@pytest.mark.parametrize(("optimizer", "hypers"), [(SGD, SGD_HYPERS), (ADAM, ADAM_HYPERS)])
def test_state_dict_round_trip_continues_identically(
    digits: DataSplits, optimizer: dict, hypers: dict
) -> None:
    model = cnn("batch", dropout=0.25)  # dropout: the random stream must resume too
    pop = make_population(digits, model=model, optimizer=optimizer, hypers=hypers)
    pop.step(3)
    state = pop.state_dict()
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)

    pop.step(2)  # the snapshot must not change under a later step
    for name, value in loaded["params"].items():
        assert torch.equal(state["params"][name], value), name

    restored = make_population(digits, model=model, optimizer=optimizer, hypers=None, seeds=[9] * N)
    restored.load_state_dict(loaded)
    restored.step(2)
    assert restored.get_hyperparameters(1) == pop.get_hyperparameters(1)
    assert torch.equal(restored.steps, pop.steps)
    for a, b in zip(
        (pop.step(3), *pop.evaluate("val").values()),
        (restored.step(3), *restored.evaluate("val").values()),
        strict=True,
    ):
        assert torch.equal(a, b)
    for name, value in pop.params.items():
        assert torch.equal(restored.params[name], value), name
    for name, value in pop.buffers.items():
        assert torch.equal(restored.buffers[name], value), name
