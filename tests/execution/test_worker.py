"""`gradhpo worker`: a process attached to a running study runs its trials until the study
holds N; config-driven studies and studies made from Python (--objective); the storage URL
from --storage or $GRADHPO_STORAGE; every bad input is one line and exit code 2."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
from postgres import postgres_server, postgres_url  # noqa: F401

from gradhpo.cli import main
from gradhpo.jobs.tune import prepare_study
from gradhpo.jobs.worker import prepare_worker, run_worker
from gradhpo.search import create_study, load_study

optuna.logging.set_verbosity(optuna.logging.WARNING)

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = {
    "name": "tiny",
    "data": {"name": "digits", "seed": 0},
    "model": {"name": "cnn", "depth": 1, "width": 4, "norm": "none"},
    "optimizer": {"name": "sgd", "lr": 0.1, "momentum": 0.9},
    "training": {"epochs": 1, "batch_size": 128, "device": "cpu", "seed": 0},
    "search": {
        "space": {"model.width": {"type": "int", "low": 2, "high": 6}},
        "sampler": "random",
        "pruner": None,
        "trials": 3,
    },
}


def _config_study(tmp_path: Path) -> Path:
    """A config-driven study as `gradhpo tune` makes it, before any trial ran."""
    raw = copy.deepcopy(TINY)
    raw["output"] = {"dir": str(tmp_path / "runs"), "tensorboard_dir": str(tmp_path / "tb")}
    study, *_ = prepare_study(raw=raw)
    return study.directory


def _check_exactly(study, n: int) -> None:
    done = study.finished_trials()
    assert len(done) == n and len({t.number for t in done}) == n
    assert all(t.state.name == "COMPLETE" for t in done)


def test_a_worker_runs_a_config_driven_study_to_its_trials(tmp_path: Path, capsys) -> None:
    directory = _config_study(tmp_path)
    assert main(["worker", str(directory), "--no-progress", "--seed", "5"]) == 0
    out = capsys.readouterr().out
    assert "tiny: worker on" in out and "with 0 finished trial(s)" in out
    assert "this worker ran 3 trial(s)" in out and "sampler seed 5" in out
    assert "the study holds 3 of 3" in out
    study = load_study(directory)
    _check_exactly(study, 3)
    assert all(study.trial_dir(t.number).is_dir() for t in study.finished_trials())
    # Attached again to a complete study: nothing to do. --trials raises the total.
    assert main(["worker", str(directory), "--no-progress"]) == 0
    assert "ran 0 trial(s)" in capsys.readouterr().out
    assert main(["worker", str(directory), "--no-progress", "--trials", "4"]) == 0
    _check_exactly(load_study(directory), 4)


def test_two_workers_with_different_seeds_draw_different_points(tmp_path: Path) -> None:
    create_study(tmp_path / "a", sampler="random", pruner=None, seed=0)
    create_study(tmp_path / "b", sampler="random", pruner=None, seed=0)
    for name, seed in (("a", 1), ("b", 2)):
        job = prepare_worker(tmp_path / name, objective="gradhpo.testing.objectives:instant")
        result = run_worker(job, trials=3, seed=seed)
        assert result["finished"] == 3 and result["ran"] == [0, 1, 2] and result["seed"] == seed
    a = [t.params for t in load_study(tmp_path / "a").trials]
    b = [t.params for t in load_study(tmp_path / "b").trials]
    assert a != b


def test_a_python_study_with_objective_and_the_url_from_the_environment(
    tmp_path: Path, monkeypatch, capsys
) -> None:
    # A study whose storage URL is not in study.json: a storage object here, so the URL
    # comes from $GRADHPO_STORAGE (an SQLite URL stands in for a database server).
    url = f"sqlite:///{tmp_path / 'trials.db'}"
    create_study(tmp_path / "s", storage=url, sampler="random", pruner=None)
    meta = tmp_path / "s" / "study.json"
    record = json.loads(meta.read_text())
    record["storage"]["password"] = True  # as if the URL had a password: it must be given
    meta.write_text(json.dumps(record))
    args = ["worker", str(tmp_path / "s"), "--objective", "gradhpo.testing.objectives:instant"]
    assert main([*args, "--trials", "4", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "password is not stored" in err and "--storage URL or $GRADHPO_STORAGE" in err
    monkeypatch.setenv("GRADHPO_STORAGE", url)
    assert main([*args, "--trials", "4", "--no-progress"]) == 0
    assert "the study holds 4 of 4" in capsys.readouterr().out
    _check_exactly(load_study(tmp_path / "s", storage=url), 4)


def test_bad_input_is_one_line_and_exit_2(tmp_path: Path, capsys) -> None:
    python_study = tmp_path / "py"
    create_study(python_study, sampler="random", pruner=None)
    config_study = _config_study(tmp_path)
    train_dir = tmp_path / "train"
    train_dir.mkdir()
    (train_dir / "gradhpo.json").write_text(json.dumps({"kind": "train", "layout": 1}))
    (train_dir / "config.yaml").write_text("name: t\n")
    objective = "gradhpo.testing.objectives:instant"
    cases = [
        ([str(tmp_path / "nope")], "study directory not found: "),
        ([str(tmp_path)], "is not a study directory (no study.json or config.yaml)"),
        ([str(train_dir)], "holds a train run, not a study run"),
        ([str(python_study), "--trials", "3"], "objective: "),
        ([str(python_study), "--objective", objective], "--trials: required for a study made"),
        ([str(python_study), "--objective", "instant", "--trials", "2"], "got 'instant'"),
        ([str(python_study), "--objective", "no_such_mod:f", "--trials", "2"], "cannot import"),
        (
            [str(python_study), "--objective", "gradhpo.testing.objectives:nope", "--trials", "2"],
            "has no function 'nope'",
        ),
        ([str(config_study), "--objective", objective], "is a config-driven study"),
        ([str(config_study), "--trials", "0"], "--trials: expected an integer >= 1, got 0"),
        ([str(config_study), "--timeout", "-1"], "--timeout: expected seconds > 0, got -1.0"),
        ([str(config_study), "--seed", "-3"], "--seed: expected an integer >= 0, got -3"),
        ([str(config_study), "--threads", "0"], "--threads: expected an integer >= 1, got 0"),
        (
            [str(python_study), "--objective", objective, "--trials", "2", "--storage", "bogus"],
            "storage must be 'journal' or 'sqlite'",
        ),
    ]
    for args, message in cases:
        assert main(["worker", *args, "--no-progress"]) == 2, args
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1 and err.startswith("gradhpo: error: "), (
            args,
            err,
        )
    assert len(load_study(python_study).trials) == 0  # nothing ran
    assert len(load_study(config_study).trials) == 0


def test_library_errors_name_the_field_and_value(tmp_path: Path) -> None:
    create_study(tmp_path / "s", sampler="random", pruner=None)
    job = prepare_worker(tmp_path / "s", objective=lambda t: 0.0)
    for kwargs, message in [
        ({"trials": 0}, "trials: expected an integer >= 1, got 0"),
        ({"trials": 2, "timeout": 0}, "timeout: expected seconds > 0, got 0"),
        ({"trials": 2, "seed": -1}, "seed: expected an integer >= 0, got -1"),
        ({"trials": 2, "threads": 1.5}, "threads: expected an integer >= 1, got 1.5"),
        ({}, "trials: required for a study made from Python"),
    ]:
        with pytest.raises(ValueError, match=message.replace("(", r"\(")):
            run_worker(job, **kwargs)
    with pytest.raises(ValueError, match="objective: expected a callable or 'module:function'"):
        prepare_worker(tmp_path / "s", objective=3)  # type: ignore[arg-type]


WORKER_ENV = {"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


@pytest.mark.slow
def test_three_worker_processes_on_a_postgresql_study_give_exactly_n(
    tmp_path: Path,
    postgres_url: str,  # noqa: F811
) -> None:
    """As on three machines: `gradhpo worker DIR` three times, the password-carrying URL in
    $GRADHPO_STORAGE (not on the command line), a study made from Python."""
    create_study(
        tmp_path / "s",
        storage=postgres_url,
        sampler="tpe",
        pruner=None,
        direction="minimize",
        seed=0,
    )
    env = {**os.environ, **WORKER_ENV, "GRADHPO_STORAGE": postgres_url}
    command = [
        sys.executable,
        "-m",
        "gradhpo.cli",
        "worker",
        str(tmp_path / "s"),
        "--objective",
        "gradhpo.testing.objectives:quadratic",
        "--trials",
        "20",
        "--threads",
        "1",
        "--no-progress",
    ]
    procs = [
        subprocess.Popen(
            command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for _ in range(3)
    ]
    outputs = [p.communicate(timeout=300) for p in procs]
    for proc, (out, err) in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, err
        assert "the study holds 20 of 20" in out
    study = load_study(tmp_path / "s", storage=postgres_url)
    _check_exactly(study, 20)
    ran = sum(int(out.split("this worker ran ")[1].split()[0]) for out, _ in outputs)
    assert ran == 20
    assert len({t.params["x"] for t in study.finished_trials()}) == 20  # distinct proposals
