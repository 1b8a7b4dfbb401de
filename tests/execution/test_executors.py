"""Executors: serial, local processes and Ray run study drivers; exactly N trials with several
drivers on one SQLite study; a killed worker is retried and its trial continued."""

from __future__ import annotations

import copy
import tempfile
from pathlib import Path

import optuna
import pytest
import yaml

from gradhpo.execution import ProcessExecutor, SerialExecutor, make_executor
from gradhpo.search import create_study, load_study
from gradhpo.search.drivers import run_objective_study
from gradhpo.testing.objectives import die_once, quadratic

optuna.logging.set_verbosity(optuna.logging.WARNING)


def _check_exactly(study, n: int) -> None:
    done = study.finished_trials()
    assert len(done) == n
    numbers = [t.number for t in done]
    assert len(set(numbers)) == n  # none duplicated
    assert all(t.state.name == "COMPLETE" for t in done)


@pytest.mark.slow
def test_four_driver_processes_on_one_sqlite_study_give_exactly_n_trials(tmp_path: Path) -> None:
    create_study(tmp_path / "s", sampler="random", pruner=None, direction="minimize", seed=0)
    with ProcessExecutor(4, threads_per_worker=1) as executor:
        results = run_objective_study(tmp_path / "s", quadratic, executor, workers=4, n_trials=23)
    study = load_study(tmp_path / "s")
    _check_exactly(study, 23)
    assert len({r["pid"] for r in results}) == 4  # four separate driver processes
    assert sorted(n for r in results for n in r["trials"]) == sorted(
        t.number for t in study.finished_trials()
    )
    params = [t.params["x"] for t in study.finished_trials()]
    assert len(set(params)) == 23  # drivers do not propose the same points


def test_one_process_worker_reproduces_the_serial_study(tmp_path: Path) -> None:
    for name, ex in (
        ("serial", SerialExecutor()),
        ("proc", ProcessExecutor(1, threads_per_worker=1)),
    ):
        create_study(tmp_path / name, sampler="tpe", pruner=None, direction="minimize", seed=4)
        run_objective_study(tmp_path / name, quadratic, ex, workers=1, n_trials=8)
    serial = [t.params for t in load_study(tmp_path / "serial").finished_trials()]
    proc = [t.params for t in load_study(tmp_path / "proc").finished_trials()]
    assert serial == proc


def test_killed_worker_is_restarted_and_its_trial_retried(tmp_path: Path, monkeypatch) -> None:
    marker = tmp_path / "died"
    monkeypatch.setenv("GRADHPO_TEST_MARKER", str(marker))
    create_study(tmp_path / "s", sampler="random", pruner=None, direction="minimize", seed=0)
    with ProcessExecutor(1, threads_per_worker=1, max_failures=2) as executor:
        run_objective_study(tmp_path / "s", die_once, executor, workers=1, n_trials=5)
    assert marker.exists() and executor.failures == 1
    study = load_study(tmp_path / "s")
    _check_exactly(study, 5)
    retried = [t for t in study.finished_trials() if t.user_attrs.get("gradhpo:resume_from") == 2]
    dead = [t for t in study.optuna.trials if t.number == 2][0]
    assert len(retried) == 1 and retried[0].params == dead.params and dead.state.name == "FAIL"


def test_executor_specs_are_checked() -> None:
    assert isinstance(make_executor(None), SerialExecutor)
    assert make_executor({"name": "processes", "workers": 3}).workers == 3
    with pytest.raises(ValueError, match="executor.name: unknown executor 'mpi'"):
        make_executor("mpi")
    with pytest.raises(ValueError, match="workers must be an integer >= 1, got 0"):
        ProcessExecutor(0)
    with pytest.raises(ValueError, match="executor: .*unexpected keyword"):
        make_executor({"name": "processes", "cores": 2})


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
        "trials": 4,
    },
}


@pytest.mark.slow
def test_config_study_on_two_processes(tmp_path: Path, monkeypatch, capsys) -> None:
    from gradhpo.cli import main

    monkeypatch.chdir(tmp_path)
    config = copy.deepcopy(TINY)
    config["search"]["executor"] = {"name": "processes", "workers": 2, "threads_per_worker": 1}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["tune", str(path), "--out", str(tmp_path / "runs"), "--no-progress"]) == 0
    assert "test accuracy" in capsys.readouterr().out
    _check_exactly(load_study(tmp_path / "runs" / "tiny"), 4)


def test_bad_executor_config_is_one_line(tmp_path: Path, monkeypatch, capsys) -> None:
    from gradhpo.cli import main

    monkeypatch.chdir(tmp_path)
    for executor, message in [
        ({"name": "slurm"}, "search.executor.name: unknown executor 'slurm'"),
        (
            {"name": "processes", "workers": 0},
            "search.executor.workers: expected an integer >= 1, got 0",
        ),
        (
            {"name": "processes", "gpus": 1},
            "search.executor: unknown key(s) ['gpus'] for 'processes'",
        ),
    ]:
        config = copy.deepcopy(TINY)
        config["search"]["executor"] = executor
        path = tmp_path / "c.yaml"
        path.write_text(yaml.safe_dump(config))
        assert main(["tune", str(path), "--out", str(tmp_path / "runs")]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1
    assert not (tmp_path / "runs").exists()


@pytest.fixture
def ray_executor(tmp_path: Path, monkeypatch):
    # Before the first `import ray` (the executor would set it too): loopback only.
    monkeypatch.setenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    pytest.importorskip("ray")
    from gradhpo.execution import RayExecutor

    # Set before Ray starts: its worker processes inherit the environment of ray.init.
    monkeypatch.setenv("GRADHPO_TEST_MARKER", str(tmp_path / "died"))
    temp = tempfile.mkdtemp(
        prefix="rt", dir="/tmp"
    )  # short: Ray's socket paths have a length limit
    executor = RayExecutor(2, num_cpus=2, temp_dir=temp, max_failures=2)
    try:
        yield executor
    finally:
        executor.close()


@pytest.mark.slow
def test_ray_study_matches_serial_and_survives_a_killed_worker(
    tmp_path: Path, monkeypatch, ray_executor
) -> None:
    import ray

    assert ray.is_initialized()
    node = ray.nodes()[0]
    assert node["NodeManagerAddress"] == "127.0.0.1"
    # One worker on Ray proposes exactly what the serial driver does.
    create_study(tmp_path / "serial", sampler="tpe", pruner=None, direction="minimize", seed=4)
    run_objective_study(tmp_path / "serial", quadratic, SerialExecutor(), workers=1, n_trials=6)
    create_study(tmp_path / "ray", sampler="tpe", pruner=None, direction="minimize", seed=4)
    run_objective_study(tmp_path / "ray", quadratic, ray_executor, workers=1, n_trials=6)
    assert [t.params for t in load_study(tmp_path / "ray").finished_trials()] == [
        t.params for t in load_study(tmp_path / "serial").finished_trials()
    ]
    # A Ray worker killed mid-trial: Ray retries the task, the new driver continues the trial.
    create_study(tmp_path / "kill", sampler="random", pruner=None, direction="minimize", seed=0)
    run_objective_study(tmp_path / "kill", die_once, ray_executor, workers=1, n_trials=5)
    assert (tmp_path / "died").exists()
    study = load_study(tmp_path / "kill")
    _check_exactly(study, 5)
    assert any(t.user_attrs.get("gradhpo:resume_from") == 2 for t in study.finished_trials())
