"""Your own network, data set and loss (issue 15): ``model.factory`` / ``register_model``,
``data.factory``, ``training.loss``, end to end through TrainingRun, the hypergradient tuner,
a study and PBT, and every mistake as a clear error naming its field."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from gradhpo.models import ModelConfigError, build_model, register_model
from torch import nn

from gradhpo.cli import main
from gradhpo.config import ConfigError, validate_train_config
from gradhpo.data import DataSplits, Split, carve_split, load_data
from gradhpo.hyper.losses import LOSSES, resolve_loss
from gradhpo.run import TrainingRun, fit
from gradhpo.run.builder import load_job_data
from gradhpo.testing.regression import linear_data, two_layer

DATA = {"factory": "gradhpo.testing.regression:linear_data", "n": 300, "seed": 1}
MODEL = {"factory": "gradhpo.testing.regression:two_layer", "width": 8}
REGRESSION = {
    "name": "reg",
    "data": DATA,
    "model": MODEL,
    "optimizer": {"name": "sgd", "lr": 0.1, "momentum": 0.9},
    "training": {"epochs": 2, "batch_size": 32, "device": "cpu", "loss": "mse"},
}


def regression_run(**kwargs) -> TrainingRun:
    args = dict(model=MODEL, data=DATA, optimizer={"name": "sgd", "lr": 0.1}, loss="mse")
    return TrainingRun(**{**args, "batch_size": 32, "device": "cpu", **kwargs})


# ----------------------------------------------------------------------------------- losses
def test_named_losses_match_torch_per_example() -> None:
    gen = torch.Generator().manual_seed(0)
    out, target = torch.randn(6, 3, generator=gen), torch.randn(6, 3, generator=gen)
    want = {
        "mse": 0.5 * F.mse_loss(out, target, reduction="none").sum(1),
        "l1": F.l1_loss(out, target, reduction="none").sum(1),
        "huber": F.smooth_l1_loss(out, target, reduction="none").sum(1),
        "bce_with_logits": F.binary_cross_entropy_with_logits(
            out, target.sigmoid(), reduction="none"
        ).sum(1),
    }
    for name, expected in want.items():
        t = target.sigmoid() if name == "bce_with_logits" else target
        assert torch.allclose(LOSSES[name](out, t), expected, atol=1e-6), name
    labels = torch.tensor([0, 2, 1, 1, 0, 2])
    assert torch.allclose(
        LOSSES["cross_entropy"](out, labels), F.cross_entropy(out, labels, reduction="none")
    )


def test_regression_losses_refuse_shapes_that_would_broadcast() -> None:
    # (B, 1) outputs against (B,) targets are the same numbers: accepted.
    out, target = torch.randn(5, 1), torch.randn(5)
    assert torch.allclose(LOSSES["mse"](out, target), 0.5 * (out.squeeze(1) - target) ** 2)
    # (B,) against (B, 1) the same; (B, 2) against (B,) would broadcast to (B, B) or pair
    # the wrong numbers: refused with both shapes.
    with pytest.raises(ValueError, match=r"outputs of shape \(5, 2\).*targets of shape \(5,\)"):
        LOSSES["mse"](torch.randn(5, 2), target)


def test_resolve_loss_names_the_field() -> None:
    assert resolve_loss("mse") is LOSSES["mse"]
    assert resolve_loss("gradhpo.hyper.losses:resolve_loss") is resolve_loss
    with pytest.raises(ValueError, match="training.loss: unknown loss 'mae'"):
        resolve_loss("mae")
    with pytest.raises(
        ValueError, match="training.loss: cannot import module 'no_such_pkg.losses'"
    ):
        resolve_loss("no_such_pkg.losses:mine")
    with pytest.raises(ValueError, match="training.loss: expected one of"):
        resolve_loss(3)


# ----------------------------------------------------------------------------------- models
def test_model_factory_gets_shape_classes_and_knobs() -> None:
    model = build_model({**MODEL, "width": 5}, (7,), 2)
    assert model[0].in_features == 7 and model[0].out_features == 5
    assert model[-1].out_features == 2


def test_model_factory_mistakes() -> None:
    with pytest.raises(ModelConfigError, match="'name' or 'factory', not both"):
        build_model({**MODEL, "name": "mlp"}, (7,), 2)
    with pytest.raises(ModelConfigError, match="cannot import module 'nope'"):
        build_model({"factory": "nope:build"}, (7,), 2)
    with pytest.raises(ModelConfigError, match="has no 'missing'"):
        build_model({"factory": "gradhpo.testing.regression:missing"}, (7,), 2)
    with pytest.raises(ModelConfigError, match="expected 'package.module:function'"):
        build_model({"factory": "gradhpo.testing.regression"}, (7,), 2)
    with pytest.raises(
        ModelConfigError,
        match=r"failed with knobs \{.*'depth': 3\}: two_layer\(\) got an unexpected",
    ):
        build_model({**MODEL, "depth": 3}, (7,), 2)
    with pytest.raises(ModelConfigError, match="must return an nn.Module, got dict"):
        build_model({"factory": "builtins:dict"}, (7,), 2)


def test_register_model() -> None:
    def wide(input_shape, num_classes, width=3):
        return nn.Linear(input_shape[0], num_classes * width)

    register_model("test-wide", wide)
    register_model("test-wide", wide)  # the same factory again is fine
    assert build_model({"name": "test-wide", "width": 2}, (4,), 3).out_features == 6
    with pytest.raises(ValueError, match="already registered"):
        register_model("test-wide", two_layer)
    register_model("test-wide", two_layer, replace=True)
    with pytest.raises(ValueError, match="built-in family"):
        register_model("cnn", two_layer)
    with pytest.raises(ModelConfigError, match="test-wide"):  # listed among the names
        build_model({"name": "nope"}, (4,), 3)


# ------------------------------------------------------------------------------------- data
def test_data_factory_and_its_mistakes() -> None:
    spec, splits = load_data(DATA)
    assert spec == DATA and isinstance(splits, DataSplits) and not splits.classification
    assert len(splits.train) == 210 and splits.train.y.dtype == torch.float32
    with pytest.raises(ValueError, match="'name' or 'factory', not both"):
        load_data({**DATA, "name": "digits"})
    with pytest.raises(ValueError, match=r"must return gradhpo.data.DataSplits, got Sequential"):
        load_data(
            {
                "factory": "gradhpo.testing.regression:two_layer",
                "input_shape": (2,),
                "num_classes": 1,
            }
        )
    with pytest.raises(ValueError, match=r"failed with arguments \{.*'colour': 1\}"):
        load_data({**DATA, "colour": 1})
    with pytest.raises(ConfigError, match="cross-validation.*data.factory"):
        load_job_data({"data": DATA}, n_folds=3)


def test_float_targets_split_and_carve() -> None:
    y = torch.randn(40, 2)
    split = Split(torch.randn(40, 3), y)
    rest, carved = carve_split(split, 0.25, seed=0)
    assert len(carved) == 10 and len(rest) == 30
    together = torch.cat([rest.y, carved.y])
    assert sorted(together[:, 0].tolist()) == sorted(y[:, 0].tolist())  # a partition
    with pytest.raises(ValueError, match="1-D class labels or float targets"):
        Split(torch.randn(4, 3), torch.zeros(4, 2, dtype=torch.long))


# --------------------------------------------------------------------------- TrainingRun
def test_regression_run_trains_and_reports_loss_only() -> None:
    run = regression_run(optimizer={"name": "sgd", "lr": 0.1, "momentum": 0.9})
    before = run.evaluate("val")
    assert set(before) == {"loss"}
    run.step(60)
    after = run.evaluate("val")
    assert after["loss"] < before["loss"] / 3
    # evaluate's loss is the per-example loss averaged over the split
    with torch.no_grad():
        out = run.model(run.data.val.x).squeeze(1)
        expected = (0.5 * (out - run.data.val.y) ** 2).mean().item()
    assert after["loss"] == pytest.approx(expected, rel=1e-5)


def test_loss_mismatches_are_errors_naming_training_loss() -> None:
    with pytest.raises(ValueError, match="training.loss: cross_entropy needs integer class"):
        regression_run(loss="cross_entropy")
    with pytest.raises(ValueError, match="training.loss 'mse' does not fit"):
        TrainingRun(model={"name": "mlp"}, data="synthetic", loss="mse", device="cpu")
    with pytest.raises(ValueError, match=r"must return one loss per example, shape \(2,\)"):
        regression_run(loss=lambda out, y: ((out.squeeze(1) - y) ** 2).mean())


def test_a_callable_loss_is_recorded_so_the_config_reloads() -> None:
    run = regression_run(loss=LOSSES["huber"])
    assert run.config["training"]["loss"] == "gradhpo.hyper.losses:_huber"
    assert TrainingRun.from_config(run.config).loss_fn is LOSSES["huber"]
    local = regression_run(loss=lambda out, y: (out.squeeze(1) - y).abs())
    assert local.config["training"]["loss"].startswith("<not importable")
    with pytest.raises(ValueError, match="training.loss: .*lambda.* cannot be imported by name"):
        TrainingRun.from_config(local.config)


def test_checkpoint_of_a_factory_run_resumes_exactly(tmp_path: Path) -> None:
    a = regression_run(seed=3)
    a.step(7)
    path = a.save(tmp_path / "run.pt")
    b = TrainingRun.from_checkpoint(path)
    a.step(9)
    b.step(9)
    for p, q in zip(a.model.parameters(), b.model.parameters(), strict=True):
        assert torch.equal(p, q)


def test_hypergradient_tuner_differentiates_the_runs_loss() -> None:
    """The tuner's objective is the run's loss: its hypergradient of the validation MSE
    matches central finite differences of the same unrolled horizon in float64."""
    torch.manual_seed(0)
    data = linear_data(n=120, features=3, seed=2)
    data = DataSplits(
        data.name,
        *(Split(s.x.double(), s.y.double()) for s in (data.train, data.val, data.test)),
        data.num_classes,
        data.input_shape,
    )
    tuner = {
        "hypers": [{"name": "lr", "init": 0.05}],
        "method": "reverse",
        "horizon": 4,
        "hyper_optimizer": "sgd",
        "hyper_lr": 1e-30,
        "val_batch_size": 18,
    }
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # the model is built in float64
    try:
        run = TrainingRun(
            model=MODEL,
            data=data,
            loss="mse",
            batch_size=8,
            device="cpu",
            tuner=tuner,
            optimizer={"name": "sgd", "lr": 0.05},
        )
    finally:
        torch.set_default_dtype(previous)
    assert run.tuner.loss_fn is run.loss_fn
    assert next(run.model.parameters()).dtype == torch.float64
    start = {k: v.clone() for k, v in run.model.state_dict().items()}
    batches = [next(run.batches) for _ in range(4)]
    val = (data.val.x, data.val.y)
    report = run.tuner.step(batches, val)

    def val_loss_after(lr: float) -> float:
        run.model.load_state_dict(start)
        for xb, yb in batches:
            loss = LOSSES["mse"](run.model(xb), yb).mean()
            grads = torch.autograd.grad(loss, list(run.model.parameters()))
            with torch.no_grad():
                for p, g in zip(run.model.parameters(), grads, strict=True):
                    p -= lr * g
        with torch.no_grad():
            return LOSSES["mse"](run.model(val[0]), val[1]).mean().item()

    assert report.objective == pytest.approx(val_loss_after(0.05), rel=1e-10)
    h = 1e-6
    fd = (val_loss_after(0.05 + h) - val_loss_after(0.05 - h)) / (2 * h)
    # lr is tuned through log(lr): d obj / d log(lr) = lr * d obj / d lr
    assert report.hypergrad_norm == pytest.approx(abs(0.05 * fd), rel=1e-6)


# ---------------------------------------------------------------------- config and jobs
def write(tmp_path: Path, config: dict) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


def test_config_validation_accepts_factories_and_a_loss() -> None:
    resolved = validate_train_config(REGRESSION)
    assert resolved["training"]["loss"] == "mse"
    assert validate_train_config({**REGRESSION, "training": {}})["training"]["loss"] == (
        "cross_entropy"
    )
    with pytest.raises(ConfigError, match=r"model.name is required, or model.factory"):
        validate_train_config({**REGRESSION, "model": {"width": 3}})
    with pytest.raises(ConfigError, match="training.loss: expected a non-empty string"):
        validate_train_config({**REGRESSION, "training": {"loss": 5}})


def test_cli_train_a_regression_model(tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    path = write(tmp_path, REGRESSION)
    assert main(["train", str(path), "--out", str(tmp_path / "runs"), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "reg: test loss" in out and "accuracy" not in out
    metrics = json.loads((tmp_path / "runs" / "reg" / "metrics.json").read_text())
    assert metrics["test_accuracy"] is None and math.isfinite(metrics["test_loss"])
    assert all(r["val_accuracy"] is None for r in metrics["history"])
    assert metrics["history"][-1]["val_loss"] < 0.1


def test_cli_bad_loss_is_one_line_exit_2(tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    config = {**REGRESSION, "training": {**REGRESSION["training"], "loss": "cross_entropy"}}
    assert main(["train", str(write(tmp_path, config)), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip()
    assert "training.loss: cross_entropy needs integer class labels" in err
    assert len(err.splitlines()) == 1
    assert not (tmp_path / "r").exists() or not any((tmp_path / "r").iterdir())


def test_study_on_a_regression_model(tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    search = {
        "space": {
            "optimizer.lr": {"type": "float", "low": 0.01, "high": 0.3, "log": True},
            "model.width": {"type": "int", "low": 4, "high": 16},
        },
        "sampler": {"name": "random", "seed": 0},
        "metric": "val_loss",
        "trials": 3,
    }
    config = {**REGRESSION, "search": search}
    assert (
        main(
            ["tune", str(write(tmp_path, config)), "--out", str(tmp_path / "runs"), "--no-progress"]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "best val_loss" in out and "test loss" in out and "test accuracy" not in out
    # val_accuracy has no meaning without class labels: refused before any trial runs
    config["search"] = {**search, "metric": "val_accuracy"}
    assert (
        main(
            [
                "tune",
                str(write(tmp_path, config)),
                "--out",
                str(tmp_path / "runs2"),
                "--no-progress",
            ]
        )
        == 2
    )
    assert "search.metric: val_accuracy needs class labels" in capsys.readouterr().err


def test_pbt_on_a_regression_model_with_a_tuner(tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    pbt = {
        "population": 2,
        "interval": 10,
        "space": {"optimizer.lr": {"type": "float", "low": 0.01, "high": 0.3, "log": True}},
        "metric": "val_loss",
    }
    config = {
        **REGRESSION,
        "tuner": {"hypers": [{"name": "lr"}], "method": "reverse", "horizon": 5},
        "pbt": pbt,
    }
    assert (
        main(
            ["pbt", str(write(tmp_path, config)), "--out", str(tmp_path / "runs"), "--no-progress"]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "val_loss" in out and "test loss" in out and "test accuracy" not in out
    config = {**REGRESSION, "pbt": {**pbt, "batched": True}}
    assert (
        main(["pbt", str(write(tmp_path, config)), "--out", str(tmp_path / "r2"), "--no-progress"])
        == 2
    )
    assert "pbt.batched: a batched population trains with cross_entropy only" in (
        capsys.readouterr().err
    )


def test_fit_refuses_val_accuracy_without_labels() -> None:
    with pytest.raises(ValueError, match="val_accuracy needs class labels.*use val_loss"):
        fit([regression_run()], 1, metric="val_accuracy")
