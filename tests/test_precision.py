"""Mixed precision (``training.precision``, issue 15): bfloat16 / float16 autocast for plain
runs, float16 with a GradScaler whose state resumes exactly; refused where it cannot work."""

from __future__ import annotations

import pytest
import torch
import yaml

from gradhpo.cli import main
from gradhpo.config import ConfigError, validate_train_config
from gradhpo.run import TrainingRun

BASE = {
    "model": {"name": "cnn", "depth": 1, "width": 8},
    "data": {"name": "synthetic", "seed": 0},
    "optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.9},
    "batch_size": 16,
    "device": "cpu",
}


def make(precision: str, **kw) -> TrainingRun:
    return TrainingRun(**{**BASE, **kw}, precision=precision)


@pytest.mark.parametrize(
    "precision, dtype", [("bfloat16", torch.bfloat16), ("float16", torch.float16)]
)
def test_forward_passes_run_under_autocast_and_train(precision: str, dtype: torch.dtype) -> None:
    run, plain = make(precision), make("float32")
    seen: list[torch.dtype] = []
    run.model.register_forward_hook(lambda m, i, out: seen.append(out.dtype))
    before = run.evaluate("val")["loss"]
    run.step(30)
    plain.step(30)
    assert set(seen) == {dtype}  # training and evaluation forwards
    after = run.evaluate("val")["loss"]
    assert after < before
    # the same seed and batches in float32 end elsewhere: the precision really changed
    assert any(
        not torch.equal(a, b)
        for a, b in zip(run.model.parameters(), plain.model.parameters(), strict=True)
    )
    assert run.config["training"]["precision"] == precision
    assert (run.scaler is not None) == (precision == "float16")


def test_float16_scaler_state_resumes_exactly(tmp_path) -> None:
    run = make("float16")
    run.step(7)
    path = run.save(tmp_path / "run.pt")
    resumed = TrainingRun.from_checkpoint(path, device="cpu")
    assert resumed.precision == "float16"
    assert resumed.scaler.state_dict() == run.scaler.state_dict()
    run.step(9)
    resumed.step(9)
    assert resumed.scaler.get_scale() == run.scaler.get_scale()
    for a, b in zip(run.model.parameters(), resumed.model.parameters(), strict=True):
        assert torch.equal(a, b)


def test_mistakes_name_training_precision(tmp_path, capsys, monkeypatch) -> None:
    with pytest.raises(ValueError, match="training.precision: expected one of"):
        make("fp8")
    with pytest.raises(ValueError, match="training.precision: bfloat16 is for plain training"):
        make("bfloat16", tuner={"hypers": [{"name": "lr"}]})
    config = {"data": BASE["data"], "model": BASE["model"], "training": {"precision": "half"}}
    with pytest.raises(ConfigError, match=r"training.precision: expected one of .* got 'half'"):
        validate_train_config(config)
    monkeypatch.chdir(tmp_path)
    config = {
        "name": "p",
        "data": BASE["data"],
        "model": BASE["model"],
        "training": {"epochs": 1, "batch_size": 16, "device": "cpu", "precision": "bfloat16"},
        "pbt": {
            "population": 2,
            "interval": 5,
            "batched": True,
            "space": {"optimizer.lr": {"type": "float", "low": 0.01, "high": 0.1}},
        },
    }
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["pbt", str(path), "--out", str(tmp_path / "runs"), "--no-progress"]) == 2
    assert "pbt.batched: a batched population trains in float32" in capsys.readouterr().err
