"""`gradhpo export`: a study, a train run and a PBT run to a plain state_dict + YAML card that
rebuilds the same module; the bad inputs are one line and exit code 2, nothing half-written."""

from __future__ import annotations

import copy
from pathlib import Path

import optuna
import pytest
import torch
import yaml

from gradhpo.cli import main
from gradhpo.config import ConfigError
from gradhpo.data import load_data, load_dataset
from gradhpo.jobs import export as export_module
from gradhpo.jobs.export import export_model, load_exported, read_export
from gradhpo.pbt.store import PBTDatabase
from gradhpo.run import TrainingRun
from gradhpo.search import load_study

optuna.logging.set_verbosity(optuna.logging.WARNING)

STUDY = {
    "name": "tiny",
    "data": {"name": "digits", "seed": 0},
    "model": {"name": "cnn", "depth": 1, "width": 4, "norm": "none"},
    "optimizer": {"name": "sgd", "lr": 0.1, "momentum": 0.9},
    "tuner": {"hypers": [{"name": "lr"}], "method": "greedy", "horizon": 1, "hyper_lr": 0.05},
    "training": {"epochs": 1, "batch_size": 128, "device": "cpu", "seed": 0},
    "search": {
        "space": {
            "model.width": {"type": "int", "low": 2, "high": 6},
            "optimizer.lr": {"type": "float", "low": 0.02, "high": 0.3, "log": True},
        },
        "sampler": {"name": "random"},
        "pruner": None,
        "trials": 2,
    },
}

TRAIN = {
    "name": "plain",
    "data": {"name": "digits", "seed": 0},
    "model": {"name": "mlp", "depth": 1, "width": 8},
    "optimizer": {"name": "sgd", "lr": 0.1},
    "training": {"epochs": 1, "batch_size": 64, "device": "cpu"},
}

PBT = {
    "name": "pop",
    "data": {"name": "digits", "seed": 0},
    "model": {"name": "cnn", "depth": 1, "width": 4, "norm": "none", "dropout": 0.1},
    "optimizer": {"name": "sgd", "lr": 0.1, "momentum": 0.9},
    "training": {"epochs": 1, "batch_size": 64, "device": "cpu", "seed": 0},
    "pbt": {
        "population": 2,
        "interval": 5,
        "steps": 10,
        "space": {"optimizer.lr": {"type": "float", "low": 0.01, "high": 0.3, "log": True}},
        "fraction": 0.5,
        "seed": 1,
    },
}


def _run(tmp_path: Path, command: str, config: dict) -> Path:
    path = tmp_path / f"{command}.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    assert main([command, str(path), "--out", str(tmp_path / "runs"), "--no-progress"]) == 0
    return tmp_path / "runs" / config["name"]


def _batch(card: dict) -> torch.Tensor:
    _, splits = load_data(card["data"])
    return splits.test.x[:16]


def _same_outputs(run: TrainingRun, path: Path) -> None:
    """The exported module and the run's model give the same outputs on a test batch."""
    module = load_exported(path)
    assert not module.training
    x = _batch(read_export(path))
    run.model.eval()
    with torch.no_grad():
        assert torch.equal(module(x), run.model(x.to(run.device)).cpu())


def _one_error_line(capsys, pattern: str) -> None:
    err = capsys.readouterr().err
    assert err.startswith("gradhpo: error: ") and err.count("\n") == 1, err
    assert pattern in err, err


@pytest.fixture(scope="module")
def study_dir(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("study")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(tmp)
        return _run(tmp, "tune", STUDY)


def test_tune_prints_the_best_checkpoint_and_the_export_command(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = copy.deepcopy(STUDY)
    config["search"]["trials"] = 1
    run_dir = _run(tmp_path, "tune", config)
    out = capsys.readouterr().out
    best = load_study(run_dir).best_trial
    assert f"best checkpoint {run_dir / 'trials' / f'{best.number:04d}' / 'best_0.pt'}" in out
    assert f"`gradhpo export {run_dir}`" in out


def test_a_study_exports_its_best_trial_at_its_best_epoch(study_dir: Path, capsys) -> None:
    assert main(["export", str(study_dir)]) == 0
    out = capsys.readouterr().out
    weights = study_dir / "export" / "best.pt"
    assert f"to {weights} and {weights.with_suffix('.yaml')}" in out

    # A plain state_dict, loadable with weights_only=True.
    state = torch.load(weights, weights_only=True)
    assert all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items())

    study = load_study(study_dir)
    best = study.best_trial
    card = yaml.safe_load(weights.with_suffix(".yaml").read_text())
    assert card["model"] == {
        "name": "cnn",
        "depth": 1,
        "width": best.params["model.width"],
        "norm": "none",
    }
    assert card["input_shape"] == [1, 8, 8] and card["num_outputs"] == 10
    assert card["classification"] is True and card["loss"] == "cross_entropy"
    assert card["data"] == {"name": "digits", "seed": 0} | card["data"]
    assert card["metric"] == "val_accuracy" and card["value"] == best.value
    assert card["params"] == best.params
    summary = study.optuna.user_attrs["best_test"]
    assert card["test"] == {"accuracy": summary["test_accuracy"], "loss": summary["test_loss"]}
    assert set(card["hyperparameters"]) >= {"lr", "momentum"}
    assert card["source"]["kind"] == "study" and card["source"]["trial"] == best.number

    checkpoint = study_dir / "trials" / f"{best.number:04d}" / "best_0.pt"
    assert card["source"]["checkpoint"] == str(checkpoint)
    run = TrainingRun.from_checkpoint(checkpoint, data=load_data(STUDY["data"])[1], device="cpu")
    assert card["hyperparameters"] == pytest.approx(run.hyperparameters)
    _same_outputs(run, weights)

    # Another trial: only the best one keeps its weights (keep_checkpoints: best).
    other = next(t.number for t in study.trials if t.number != best.number)
    assert main(["export", str(study_dir), "--trial", str(other)]) == 2
    _one_error_line(capsys, "only the best trial keeps its weights")
    assert main(["export", str(study_dir), "--trial", "99"]) == 2
    _one_error_line(capsys, "--trial: the study has no trial 99")


def test_an_existing_out_is_refused_unless_forced(study_dir: Path, tmp_path, capsys) -> None:
    out = tmp_path / "model.pt"
    assert main(["export", str(study_dir), "--out", str(out)]) == 0
    card = out.with_suffix(".yaml")
    before = (out.read_bytes(), card.read_bytes())
    capsys.readouterr()
    assert main(["export", str(study_dir), "--out", str(out)]) == 2
    _one_error_line(capsys, "already exists; choose another --out or pass --force")
    card.unlink()  # the card alone counts too
    out.rename(tmp_path / "moved.pt")
    card.write_text("x")
    assert main(["export", str(study_dir), "--out", str(out)]) == 2
    _one_error_line(capsys, f"{str(card)!r} already exists")
    assert main(["export", str(study_dir), "--out", str(out), "--force"]) == 0
    assert (out.read_bytes(), card.read_bytes()) == before  # the same export again
    assert main(["export", str(study_dir), "--out", str(tmp_path / "m.yaml")]) == 2
    _one_error_line(capsys, "names the YAML card")


def test_bad_run_folders_are_one_line_and_exit_2(tmp_path: Path, capsys) -> None:
    assert main(["export", str(tmp_path / "nope")]) == 2
    _one_error_line(capsys, "run directory not found")
    (tmp_path / "stuff").mkdir()
    (tmp_path / "stuff" / "notes.txt").write_text("hello")
    assert main(["export", str(tmp_path / "stuff")]) == 2
    _one_error_line(capsys, "is not a gradhpo run directory")
    assert sorted(p.name for p in (tmp_path / "stuff").iterdir()) == ["notes.txt"]
    assert not (tmp_path / "nope").exists()


def test_a_train_run_exports_its_weights(tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    run_dir = _run(tmp_path, "train", TRAIN)
    assert main(["export", str(run_dir), "--out", str(tmp_path / "out" / "plain.pt")]) == 0
    card = read_export(tmp_path / "out" / "plain.pt")
    assert card["model"]["name"] == "mlp" and card["metric"] == "val_accuracy"
    assert card["source"]["kind"] == "train" and card["params"] == {}
    assert card["test"]["accuracy"] == pytest.approx(
        yaml.safe_load((run_dir / "metrics.json").read_text())["test_accuracy"]
    )
    run = TrainingRun.from_checkpoint(run_dir / "checkpoint.pt", device="cpu")
    _same_outputs(run, tmp_path / "out" / "plain.yaml")  # the card's path works as well
    assert main(["export", str(run_dir), "--trial", "0"]) == 2
    _one_error_line(capsys, "--trial: ")
    # the card says how raw examples become model inputs: applying it to the unnormalized
    # split gives the inputs the model was trained on
    inputs = card["inputs"]
    assert inputs["rule"] == "x = raw / divisor, then per channel (x - mean[c]) / std[c]"
    plain = load_dataset("digits", seed=0, normalize=False).val.x  # raw / divisor already
    mean = torch.tensor(inputs["mean"]).view(1, -1, *[1] * (plain.ndim - 2))
    std = torch.tensor(inputs["std"]).view(1, -1, *[1] * (plain.ndim - 2))
    expected = load_dataset("digits", seed=0).val.x
    assert torch.allclose((plain - mean) / std, expected, atol=1e-5)


def test_a_pbt_run_exports_its_best_member(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    run_dir = _run(tmp_path, "pbt", PBT)
    assert main(["export", str(run_dir)]) == 0
    weights = run_dir / "export" / "best.pt"
    card = read_export(weights)
    db = PBTDatabase(run_dir)
    best = db.get_meta("best")
    db.close()
    assert card["source"]["member"] == best["member"] and card["source"]["finished"] is True
    assert card["metric"] == "val_accuracy" and card["value"] == best["score"]
    assert card["params"] == best["values"]
    assert card["test"] == {"accuracy": best["test_accuracy"], "loss": best["test_loss"]}
    assert card["model"]["dropout"] == 0.1
    run = TrainingRun.from_checkpoint(
        card["source"]["checkpoint"], data=load_data(PBT["data"])[1], device="cpu"
    )
    _same_outputs(run, weights)

    # A run that has not finished (no stored best): the member with the best latest score.
    db = PBTDatabase(run_dir)
    with db.transaction():
        db.set_meta("best", None)
    db.close()
    again = read_export(export_model(run_dir, tmp_path / "unfinished.pt")["weights_path"])
    assert again["source"]["member"] == best["member"] and again["source"]["finished"] is False
    assert again["sha256"] == card["sha256"] and again["test"] is None


def test_a_user_factory_is_imported_by_name(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    config = {
        "name": "reg",
        "data": {"factory": "gradhpo.testing.regression:linear_data", "n": 200},
        "model": {"factory": "gradhpo.testing.regression:two_layer", "width": 8},
        "optimizer": {"name": "sgd", "lr": 0.05},
        "training": {"epochs": 1, "batch_size": 32, "device": "cpu", "loss": "mse"},
    }
    run_dir = _run(tmp_path, "train", config)
    weights = export_model(run_dir)["weights_path"]
    card = read_export(weights)
    assert card["model"] == {"factory": "gradhpo.testing.regression:two_layer", "width": 8}
    assert card["classification"] is False and card["loss"] == "mse"
    assert (
        card["metric"] == "val_loss"
        and card["num_outputs"] == 1
        and "accuracy" not in (card["test"] or {})
    )
    _same_outputs(TrainingRun.from_checkpoint(run_dir / "checkpoint.pt", device="cpu"), weights)


def test_nothing_half_written_and_a_foreign_weights_file_is_refused(
    study_dir: Path, tmp_path: Path, monkeypatch
) -> None:
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "a.pt"

    def broken(*args, **kwargs):
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as m:
        m.setattr(export_module, "write_text", broken)
        with pytest.raises(OSError):
            export_model(study_dir, out)
    assert list(tmp_path.iterdir()) == []  # no weights without a card, no temporary file

    export_model(study_dir, out)
    train_dir = _run(tmp_path, "train", TRAIN)
    other = export_model(train_dir, tmp_path / "b.pt")["weights_path"]
    out.write_bytes(other.read_bytes())  # the wrong weights beside a.yaml
    with pytest.raises(ConfigError, match="SHA-256 differs"):
        load_exported(out)


def test_a_cross_validated_study_exports_the_fold_asked_for(
    tmp_path: Path, capsys, monkeypatch
) -> None:
    monkeypatch.chdir(tmp_path)
    config = copy.deepcopy(STUDY)
    config["search"].update(trials=1, cv_folds=2)
    run_dir = _run(tmp_path, "tune", config)
    assert "(and 1 more fold(s))" in capsys.readouterr().out
    card = read_export(export_model(run_dir, tmp_path / "f1.pt", fold=1)["weights_path"])
    assert card["source"]["fold"] == 1 and card["source"]["folds"] == 2
    assert card["source"]["checkpoint"].endswith("trials/0000/best_1.pt")
    fold0 = read_export(export_model(run_dir, tmp_path / "f0.pt")["weights_path"])
    assert fold0["sha256"] != card["sha256"]  # each fold trained its own model
    assert main(["export", str(run_dir), "--fold", "2"]) == 2
    _one_error_line(capsys, "--fold: expected 0 to 1 (the study has 2 fold(s)), got 2")
