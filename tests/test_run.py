"""TrainingRun: stepping, evaluation, hyperparameters, checkpoints, RNG isolation, divergence."""

from __future__ import annotations

import io
import math

import pytest
import torch

from gradhpo.data import DataSplits, Split, load_dataset
from gradhpo.run import TrainingRun, resolve_device

SMALL_CNN = {"name": "cnn", "depth": 2, "width": 8, "norm": "batch", "dropout": 0.25}


@pytest.fixture(scope="module")
def synthetic() -> DataSplits:
    return load_dataset("synthetic", seed=0)


def make_run(data: DataSplits | str, /, **overrides) -> TrainingRun:
    kwargs = dict(
        model=SMALL_CNN,
        data=data,
        optimizer={"name": "sgd", "lr": 0.05, "momentum": 0.9, "weight_decay": 1e-4},
        batch_size=16,
        seed=3,
        device="cpu",
    )
    kwargs.update(overrides)
    return TrainingRun(**kwargs)


def params_of(run: TrainingRun) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in run.model.state_dict().items()}


def assert_same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_step_trains_and_counts(synthetic: DataSplits) -> None:
    run = make_run(synthetic)
    before = run.evaluate("train")["loss"]
    losses = [run.step(10) for _ in range(6)]
    assert run.global_step == 60
    assert all(math.isfinite(loss) for loss in losses)
    after = run.evaluate("train")
    assert after["loss"] < 0.5 * before
    assert after["accuracy"] > 0.9
    assert run.epoch == pytest.approx(60 / run.steps_per_epoch)


def test_evaluate_all_splits_and_restores_mode(synthetic: DataSplits) -> None:
    run = make_run(synthetic)
    run.model.train()
    for split in ("train", "val", "test"):
        metrics = run.evaluate(split)
        assert set(metrics) == {"loss", "accuracy"}
        assert 0.0 <= metrics["accuracy"] <= 1.0 and metrics["loss"] > 0
    assert run.model.training
    with pytest.raises(ValueError, match="'validation'"):
        run.evaluate("validation")


def test_same_seed_same_run_different_seed_differs(synthetic: DataSplits) -> None:
    a, b, c = make_run(synthetic), make_run(synthetic), make_run(synthetic, seed=4)
    for run in (a, b, c):
        run.step(7)
    assert_same_state(params_of(a), params_of(b))
    flat = [torch.nn.utils.parameters_to_vector(r.model.parameters()) for r in (a, c)]
    assert not torch.equal(flat[0], flat[1])


@pytest.mark.parametrize(
    "optimizer",
    [
        {"name": "sgd", "lr": 0.05, "momentum": 0.9, "nesterov": True, "weight_decay": 1e-3},
        {"name": "adam", "lr": 1e-3},
        {"name": "adamw", "lr": 1e-3, "weight_decay": 0.05},
    ],
)
def test_checkpoint_resume_is_bit_identical(synthetic: DataSplits, tmp_path, optimizer) -> None:
    """save -> reload -> continue equals an uninterrupted run (dropout, augmentation, BN)."""
    uninterrupted = make_run(synthetic, optimizer=optimizer, augment=True)
    uninterrupted.step(11)
    uninterrupted.step(13)

    first = make_run(synthetic, optimizer=optimizer, augment=True)
    first.step(11)
    path = first.save(tmp_path / "ckpt" / "run.pt")
    first.step(5)  # progress after the save must not leak into the reloaded run
    resumed = TrainingRun.from_checkpoint(path, data=synthetic, device="cpu")
    assert resumed.global_step == 11
    resumed.step(13)

    assert_same_state(params_of(uninterrupted), params_of(resumed))
    assert resumed.evaluate("val") == uninterrupted.evaluate("val")


def test_from_checkpoint_rebuilds_named_data(tmp_path) -> None:
    run = make_run("synthetic")
    run.step(4)
    path = run.save(tmp_path / "run.pt")
    resumed = TrainingRun.from_checkpoint(path, device="cpu")
    run.step(6)
    resumed.step(6)
    assert_same_state(params_of(run), params_of(resumed))


def test_data_train_size_is_accepted_and_rebuilt_from_checkpoint(tmp_path) -> None:
    run = make_run({"name": "synthetic", "train_size": 30})
    assert len(run.data.train) == 30 and len(run.data.val) == 24
    path = run.save(tmp_path / "run.pt")
    resumed = TrainingRun.from_checkpoint(path, device="cpu")
    assert torch.equal(resumed.data.train.x, run.data.train.x)


def test_checkpoint_needs_data_when_user_supplied(synthetic: DataSplits, tmp_path) -> None:
    path = make_run(synthetic).save(tmp_path / "run.pt")
    with pytest.raises(ValueError, match="pass data="):
        TrainingRun.from_checkpoint(path, device="cpu")


def test_state_dict_loads_with_weights_only(synthetic: DataSplits) -> None:
    run = make_run(synthetic, optimizer={"name": "adam"})
    run.step(3)
    buffer = io.BytesIO()
    torch.save(run.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    assert set(state) >= {"model", "optimizer", "hypers", "step", "rng", "iterator", "config"}
    assert state["step"] == 3


def test_save_is_atomic_on_failure(synthetic: DataSplits, tmp_path, monkeypatch) -> None:
    run = make_run(synthetic)
    path = run.save(tmp_path / "run.pt")
    original = path.read_bytes()

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(OSError, match="disk full"):
        run.save(path)
    assert path.read_bytes() == original
    assert [p.name for p in tmp_path.iterdir()] == ["run.pt"]


def test_interleaved_runs_do_not_disturb_each_other(synthetic: DataSplits) -> None:
    alone = make_run(synthetic)
    for _ in range(4):
        alone.step(3)

    a, b = make_run(synthetic), make_run(synthetic, seed=9)
    for _ in range(4):
        a.step(3)
        b.step(2)
        torch.rand(5)  # user code touching the global RNG in between
    assert_same_state(params_of(alone), params_of(a))


def test_hyperparameters_get_set(synthetic: DataSplits) -> None:
    run = make_run(synthetic)
    assert run.hyperparameters == {"lr": 0.05, "weight_decay": 1e-4, "momentum": 0.9}
    run.hyperparameters = {"lr": 0.01}
    run.set_hyperparameters(momentum=0.5)
    for group in run.optimizer.param_groups:
        assert group["lr"] == 0.01 and group["momentum"] == 0.5
    adam = make_run(synthetic, optimizer={"name": "adam", "lr": 3e-4})
    adam.set_hyperparameters(beta1=0.8, beta2=0.99)
    assert adam.optimizer.param_groups[0]["betas"] == (0.8, 0.99)
    assert adam.hyperparameters["beta1"] == 0.8


@pytest.mark.parametrize(
    ("values", "match"),
    [
        ({"lr": -0.1}, "'lr' must be > 0, got -0.1"),
        ({"lr": float("nan")}, "'lr' must be finite"),
        ({"momentum": 1.0}, r"'momentum' must be in \[0, 1\), got 1.0"),
        ({"weight_decay": -1}, "'weight_decay' must be >= 0, got -1"),
        ({"beta1": 0.9}, r"unknown hyperparameter\(s\) \['beta1'\]"),
        ({"lr": "fast"}, "'lr' must be a number, got 'fast'"),
    ],
)
def test_bad_hyperparameters(synthetic: DataSplits, values, match) -> None:
    run = make_run(synthetic)
    before = run.hyperparameters
    with pytest.raises((ValueError, TypeError), match=match):
        run.set_hyperparameters(**values)
    assert run.hyperparameters == before


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"batch_size": 0}, "batch_size must be an integer >= 1, got 0"),
        ({"seed": -1}, "seed must be an integer >= 0, got -1"),
        ({"optimizer": {"name": "rmsprop"}}, "unknown optimizer 'rmsprop'"),
        ({"optimizer": {"name": "sgd", "betas": 0.9}}, r"unknown key\(s\) \['betas'\]"),
        ({"optimizer": {"name": "sgd", "lr": 0.0}}, "'optimizer.lr' must be > 0, got 0.0"),
        ({"optimizer": {"name": "sgd", "nesterov": True}}, "needs momentum > 0"),
        ({"data": {"name": "digits", "colour": True}}, r"data: unknown key\(s\) \['colour'\]"),
        ({"device": "tpu"}, "unknown device 'tpu'"),
    ],
)
def test_bad_construction(synthetic: DataSplits, overrides, match) -> None:
    with pytest.raises((ValueError, TypeError), match=match):
        make_run(synthetic, **overrides)


def test_divergence_is_flagged_not_applied() -> None:
    base = load_dataset("synthetic", seed=0)
    x = base.train.x.clone()
    x[::2] = float("nan")  # every batch sees NaNs
    data = DataSplits(
        name="nan",
        train=Split(x, base.train.y),
        val=base.val,
        test=base.test,
        num_classes=base.num_classes,
        input_shape=base.input_shape,
    )
    run = make_run(data)
    before = params_of(run)
    assert math.isnan(run.step(3))
    assert run.diverged and run.global_step == 0
    assert math.isnan(run.step(1))
    assert_same_state(before, params_of(run))


def test_resolve_device() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            resolve_device("cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_run_matches_cpu_closely(synthetic: DataSplits) -> None:
    cpu, gpu = make_run(synthetic, device="cpu"), make_run(synthetic, device="cuda")
    assert next(gpu.model.parameters()).is_cuda
    cpu_loss, gpu_loss = cpu.step(5), gpu.step(5)
    assert math.isfinite(gpu_loss) and abs(cpu_loss - gpu_loss) < 0.5


def test_hyper_validation_split_is_carved_from_train(synthetic: DataSplits, tmp_path) -> None:
    """tuner.hyper_val_fraction: the tuner's objective batches come from a stratified part of
    the train split, which the run no longer trains on; val and test are untouched."""
    tuner = {"hypers": [{"name": "lr"}], "horizon": 2, "hyper_val_fraction": 0.2}
    run = make_run(synthetic, tuner=tuner)
    n = len(synthetic.train)
    assert len(run.hyper_val) == round(0.2 * n) and len(run.data.train) == n - len(run.hyper_val)
    assert torch.equal(run.data.val.x, synthetic.val.x)
    # Disjoint: every train sample is in exactly one of the two.
    rows = {tuple(r.tolist()) for r in synthetic.train.x.flatten(1)}
    mine = [tuple(r.tolist()) for r in torch.cat([run.data.train.x, run.hyper_val.x]).flatten(1)]
    assert len(mine) == n and set(mine) == rows
    # Stratified: the class shares match the train split's.
    share = torch.bincount(synthetic.train.y).float() / n
    carved = torch.bincount(run.hyper_val.y, minlength=len(share)).float() / len(run.hyper_val)
    assert (carved - share).abs().max() < 0.05
    assert run.val_batches is not None and run.val_batches.x is run.hyper_val.x
    run.step(4)
    path = run.save(tmp_path / "run.pt")
    resumed = TrainingRun.from_checkpoint(path, data=synthetic, device="cpu")
    assert torch.equal(resumed.hyper_val.x, run.hyper_val.x)


@pytest.mark.parametrize("fraction", [0, 1.0, "a", 1e-9])
def test_bad_hyper_validation_fraction(synthetic: DataSplits, fraction) -> None:
    tuner = {"hypers": [{"name": "lr"}], "hyper_val_fraction": fraction}
    with pytest.raises(ValueError, match=r"tuner\.hyper_val_fraction"):
        make_run(synthetic, tuner=tuner)


# ------------------------------------------- a tuned horizon does not depend on step slicing
def _tuned(method: str = "reverse", **tuner) -> TrainingRun:
    return TrainingRun(
        model={"name": "cnn", "depth": 1, "width": 4, "norm": "batch", "dropout": 0.2},
        data={"name": "synthetic", "seed": 0},
        optimizer={"name": "sgd", "lr": 0.05, "momentum": 0.9},
        batch_size=16,
        device="cpu",
        tuner={"hypers": [{"name": "lr"}], "method": method, "horizon": 5, **tuner},
    )


def _same(a: TrainingRun, b: TrainingRun) -> bool:
    return all(
        torch.equal(x, y)
        for x, y in zip(
            a.state_dict()["model"].values(), b.state_dict()["model"].values(), strict=True
        )
    )


@pytest.mark.parametrize("method, tuner", [("reverse", {}), ("forward", {"carry": True})])
def test_horizon_does_not_depend_on_how_steps_are_sliced(method: str, tuner: dict) -> None:
    """Issue 15, item 6: ten step(1) calls used to take ten one-step (greedy) hyper steps and
    step(10) two five-step ones. Now every slicing takes the same K-step hypergradients and
    ends bit-identical (BatchNorm statistics and dropout masks included)."""
    whole = _tuned(method, **tuner)
    whole.step(10)
    for slicing in ([1] * 10, [3, 7], [4, 2, 4], [6, 4]):
        run = _tuned(method, **tuner)
        for n in slicing:
            run.step(n)
        assert run.tuner.hyper_steps == whole.tuner.hyper_steps == 2, slicing
        assert run.global_step == 10 and run.tuner.total_steps == 10
        assert run.hyperparameters == whole.hyperparameters, slicing
        assert _same(run, whole), slicing


def test_open_horizon_applies_its_steps_and_resumes_exactly() -> None:
    run = _tuned()
    before = {k: v.clone() for k, v in run.model.state_dict().items()}
    run.step(3)  # an open horizon: the model is current (trained), no hyper step yet
    assert run.tuner.hyper_steps == 0 and run.global_step == 3
    after = run.model.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    buffer = io.BytesIO()
    torch.save(run.state_dict(), buffer)
    buffer.seek(0)
    resumed = _tuned()
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    run.step(9)
    resumed.step(9)
    assert resumed.tuner.hyper_steps == run.tuner.hyper_steps == 2
    assert _same(run, resumed) and resumed.hyperparameters == run.hyperparameters


def test_an_outside_change_closes_the_open_horizon() -> None:
    run = _tuned()
    run.step(3)
    run.set_hyperparameters(lr=0.02)  # PBT explores: the 3 steps stay plain
    run.step(5)
    assert run.tuner.hyper_steps == 1 and run.global_step == 8
