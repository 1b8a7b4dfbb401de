"""The ``gradhpo`` command: a real training run, and one-line errors with exit code 2."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from gradhpo.cli import main

TINY = {
    "name": "tiny",
    "data": {"name": "synthetic", "seed": 0},
    "model": {"name": "cnn", "depth": 1, "width": 4},
    "optimizer": {"name": "sgd", "lr": 0.1, "momentum": 0.9},
    "training": {"epochs": 2, "batch_size": 16, "device": "cpu"},
}


def write_config(tmp_path: Path, config: dict) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


def run_cli(tmp_path: Path, config: dict | str, *extra: str) -> int:
    path = write_config(tmp_path, config) if isinstance(config, dict) else Path(config)
    return main(["train", str(path), "--out", str(tmp_path / "runs"), "--no-progress", *extra])


def test_train_writes_run_directory(tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)  # tensorboard_logs/ relative to the working directory
    assert run_cli(tmp_path, TINY) == 0
    out = capsys.readouterr().out
    assert "tiny: test accuracy" in out
    run_dir = tmp_path / "runs" / "tiny"
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["steps"] > 0 and len(metrics["history"]) == 2
    assert 0.0 <= metrics["test_accuracy"] <= 1.0
    resolved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert resolved["training"]["epochs"] == 2 and resolved["training"]["seed"] == 0
    state = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    assert state["step"] == metrics["steps"]
    assert list((tmp_path / "tensorboard_logs" / "tiny").rglob("events.out.tfevents.*"))


def test_epochs_override(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert run_cli(tmp_path, TINY, "--epochs", "1") == 0
    metrics = json.loads((tmp_path / "runs" / "tiny" / "metrics.json").read_text())
    assert len(metrics["history"]) == 1


def _with(section: str, **values) -> dict:
    config = json.loads(json.dumps(TINY))
    config[section] = {**config.get(section, {}), **values} if values else None
    return config


BAD_CONFIGS = [
    ({**TINY, "trainning": {}}, "unknown key(s) ['trainning']"),
    (_with("training", epochs=-3), "training.epochs: expected an integer >= 1, got -3"),
    (_with("training", epochs="ten"), "training.epochs: expected an integer, got 'ten'"),
    (_with("training", augment="yes"), "training.augment: expected true or false, got 'yes'"),
    (_with("training", batchsize=3), "training: unknown key(s) ['batchsize']"),
    (_with("model", name="transformer"), "transformer"),
    (_with("model", depth=0), "depth"),
    (_with("model", pooling="median"), "median"),
    (_with("data", name="imagenet"), "imagenet"),
    (_with("data", val_fraction=1.5), "1.5"),
    (_with("optimizer", name="lbfgs"), "unknown optimizer 'lbfgs'"),
    (_with("optimizer", lr=-1.0), "'optimizer.lr' must be > 0, got -1.0"),
    ({k: v for k, v in TINY.items() if k != "model"}, "model: section is required"),
]


@pytest.mark.parametrize(("config", "message"), BAD_CONFIGS)
def test_bad_config_one_line_exit_2(tmp_path: Path, capsys, monkeypatch, config, message) -> None:
    monkeypatch.chdir(tmp_path)
    assert run_cli(tmp_path, config) == 2
    err = capsys.readouterr().err
    assert err.startswith("gradhpo: error:") and err.count("\n") == 1, err
    assert message in err
    assert not (tmp_path / "runs").exists()
    assert not (tmp_path / "tensorboard_logs").exists()


def test_missing_and_invalid_files(tmp_path: Path, capsys) -> None:
    assert run_cli(tmp_path, str(tmp_path / "nope.yaml")) == 2
    assert "config file not found" in capsys.readouterr().err
    broken = tmp_path / "broken.yaml"
    broken.write_text("data: {name: digits\nmodel: [", encoding="utf-8")
    assert run_cli(tmp_path, str(broken)) == 2
    assert "invalid YAML" in capsys.readouterr().err
    listed = tmp_path / "list.yaml"
    listed.write_text("- 1\n- 2\n", encoding="utf-8")
    assert run_cli(tmp_path, str(listed)) == 2
    assert "top level must be a mapping" in capsys.readouterr().err


def test_missing_torchvision_dataset_is_one_line(tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    config = _with("data", name="cifar10", data_dir=str(tmp_path / "nowhere"))
    assert run_cli(tmp_path, config) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "download=True" in err and "nowhere" in err


def test_console_entry_point_exit_code_and_help(tmp_path: Path) -> None:
    """The installed command, in a subprocess: no traceback, exit 2; --help works."""
    bad = write_config(tmp_path, _with("training", epochs=0))
    proc = subprocess.run(
        [sys.executable, "-m", "gradhpo.cli", "train", str(bad)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and proc.stderr.count("\n") == 1
    helped = subprocess.run(
        [sys.executable, "-m", "gradhpo.cli", "train", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert helped.returncode == 0 and "--epochs" in helped.stdout


def test_train_with_hypergradient_tuner(tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    config = {**TINY, "tuner": {"hypers": [{"name": "lr"}], "method": "greedy"}}
    assert run_cli(tmp_path, config, "--epochs", "1") == 0
    out = capsys.readouterr().out
    assert "tuned hyperparameters" in out and "lr=" in out
    metrics = json.loads((tmp_path / "runs" / "tiny" / "metrics.json").read_text())
    assert metrics["hyperparameters"]["lr"] != 0.1  # moved by the hypergradient


@pytest.mark.parametrize(
    ("tuner", "message"),
    [
        ({"hypers": [{"name": "lr"}], "horizon": 0}, "horizon (K) must be an integer >= 1, got 0"),
        ({"hypers": [{"name": "learning_rate", "init": 0.1}]}, "unknown 'learning_rate'"),
        ({"hypers": [{"name": "lr", "init": -0.1}]}, "lr.init: must be > 0 and finite, got -0.1"),
        ({"hypers": [{"name": "lr"}], "horizon": 4, "truncate": 5}, "got T=5"),
        ({"hypers": [{"name": "lr"}], "method": "magic"}, "unknown 'magic'"),
    ],
)
def test_bad_tuner_section_one_line_exit_2(
    tmp_path: Path, capsys, monkeypatch, tuner, message
) -> None:
    monkeypatch.chdir(tmp_path)
    assert run_cli(tmp_path, {**TINY, "tuner": tuner}) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (
            b"name: a\nmodel: {name: cnn}\ndata: {name: synthetic}\nmodel: {name: mlp}\n",
            "duplicate key 'model'",
        ),
        (b"name: \xff\xfe\ndata: {name: synthetic}\n", "not UTF-8"),
        (
            b"name: a\ndata: {name: synthetic, seed: -1}\nmodel: {name: cnn}\n",
            "data.seed: expected an integer >= 0, got -1",
        ),
    ],
    ids=["duplicate-key", "not-utf8", "negative-data-seed"],
)
def test_bad_config_files_are_one_line(
    tmp_path: Path, capsys, monkeypatch, content: bytes, message: str
) -> None:
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "c.yaml"
    path.write_bytes(content)
    assert main(["train", str(path), "--out", str(tmp_path / "runs"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not (tmp_path / "runs").exists()


def test_pbt_space_errors_name_the_pbt_section(tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    config = {
        "name": "p",
        "data": {"name": "synthetic"},
        "model": {"name": "cnn", "depth": 1, "width": 4},
        "pbt": {
            "population": 2,
            "interval": 2,
            "steps": 4,
            "space": {"optimizer.lr": {"type": "float"}},
        },
    }
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    assert main(["pbt", str(path), "--out", str(tmp_path / "runs"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "pbt.space.optimizer.lr" in err and "search.space" not in err


def test_version_and_seed(tmp_path: Path, capsys, monkeypatch) -> None:
    import gradhpo

    with pytest.raises(SystemExit) as stop:
        main(["--version"])
    assert (
        stop.value.code == 0 and capsys.readouterr().out.strip() == f"gradhpo {gradhpo.__version__}"
    )
    monkeypatch.chdir(tmp_path)
    assert run_cli(tmp_path, TINY, "--seed", "5", "--epochs", "1") == 0
    resolved = yaml.safe_load((tmp_path / "runs" / "tiny" / "config.yaml").read_text())
    assert resolved["training"]["seed"] == 5
    assert run_cli(tmp_path, TINY, "--seed", "-1", "--name", "neg") == 2
    assert "training.seed: expected an integer >= 0, got -1" in capsys.readouterr().err
