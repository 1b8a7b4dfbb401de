"""`gradhpo tune` / `resume` with the trials in another storage: `search.storage` (no
password in a config: it would be written to config.yaml), `--storage` / $GRADHPO_STORAGE
(never written), SQLite by URL and a real PostgreSQL server."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import optuna
import pytest
import yaml
from postgres import PostgresServer, postgres_server, postgres_url  # noqa: F401

from gradhpo.cli import main
from gradhpo.search import load_study

TINY = {
    "name": "stored",
    "data": {"name": "digits", "seed": 0},
    "model": {"name": "cnn", "depth": 1, "width": 4, "norm": "none"},
    "optimizer": {"name": "sgd", "lr": 0.1, "momentum": 0.9},
    "training": {"epochs": 1, "batch_size": 128, "device": "cpu", "seed": 0},
    "search": {
        "space": {"optimizer.lr": {"type": "float", "low": 0.02, "high": 0.3, "log": True}},
        "sampler": "random",
        "pruner": None,
        "trials": 2,
    },
}


def tune(tmp_path: Path, config: dict, *extra: str) -> int:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return main(["tune", str(path), "--out", str(tmp_path / "runs"), "--no-progress", *extra])


def all_text(root: Path) -> str:
    return "".join(
        p.read_bytes().decode("utf-8", "replace") for p in root.rglob("*") if p.is_file()
    )


@pytest.mark.parametrize(
    ("storage", "message"),
    [
        (
            "postgresql://me:secret@127.0.0.1:1/db",
            r"search\.storage: 'postgresql://me:\*\*\*@127\.0\.0\.1:1/db' has a password",
        ),
        ("mongo", r"search\.storage: expected null, 'journal', 'sqlite' or a storage URL"),
        (3, r"search\.storage: expected .* got 3"),
    ],
)
def test_bad_storage_is_one_line_and_nothing_written(tmp_path, capsys, storage, message) -> None:
    config = copy.deepcopy(TINY)
    config["search"]["storage"] = storage
    assert tune(tmp_path, config) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "secret" not in err[0]
    assert re.search(message, err[0]), err[0]
    assert not (tmp_path / "runs").exists()


def test_trials_in_a_sqlite_url_and_resume_without_repeating_it(tmp_path, capsys) -> None:
    config = copy.deepcopy(TINY)
    db = tmp_path / "trials.db"
    config["search"]["storage"] = f"sqlite:///{db}"
    assert tune(tmp_path, config) == 0
    run_dir = tmp_path / "runs" / "stored"
    assert not (run_dir / "study.journal").exists() and db.is_file()
    trials = optuna.load_study(study_name="stored", storage=f"sqlite:///{db}").trials
    assert len(trials) == 2
    capsys.readouterr()
    assert main(["resume", str(run_dir), "--trials", "3", "--no-progress"]) == 0
    assert len(load_study(run_dir).finished_trials()) == 3


def test_postgres_password_from_the_command_line_is_never_written(
    tmp_path,
    capsys,
    monkeypatch,
    postgres_url,  # noqa: F811
) -> None:
    assert ":" in postgres_url.split("@")[0].split("//")[1]  # the URL has a password
    password = postgres_url.split("@")[0].rsplit(":", 1)[1]
    config = copy.deepcopy(TINY)
    assert tune(tmp_path, config, "--storage", postgres_url) == 0
    run_dir = tmp_path / "runs" / "stored"
    assert password not in all_text(run_dir)
    capsys.readouterr()
    # study.json cannot name the password: resume says how to give it ...
    monkeypatch.delenv("GRADHPO_STORAGE", raising=False)
    assert main(["resume", str(run_dir), "--trials", "3", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "storage" in err[0] and password not in err[0]
    # ... and takes it from the environment.
    monkeypatch.setenv("GRADHPO_STORAGE", postgres_url)
    assert main(["resume", str(run_dir), "--trials", "3", "--no-progress"]) == 0
    assert len(load_study(run_dir, storage=postgres_url).finished_trials()) == 3
    assert password not in all_text(run_dir)
