"""The Python API of gradhpo.search.Study: Optuna's conventions (best_*, trials, dataframes,
n_jobs, callbacks, load_if_exists, multi-objective, grid from a plain dict, one log line per
trial), what a bad objective does to its trial, n_trials as the study's total, and the
metric/direction check of fit_trial."""

from __future__ import annotations

import logging
import math
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import optuna
import pytest

from gradhpo.config import ConfigError
from gradhpo.search import create_study, fit_trial, load_study
from gradhpo.search.trial import check_direction

optuna.logging.set_verbosity(optuna.logging.WARNING)


def square(trial: optuna.trial.Trial) -> float:
    return trial.suggest_float("x", -1.0, 1.0) ** 2


def _states(study) -> list[str]:
    return [t.state.name for t in study.trials]


# ---------------------------------------------------------------------- bad objectives
@pytest.mark.parametrize(
    ("returned", "reason"),
    [
        ((0.1, 0.2), "returned (0.1, 0.2) (tuple); a single-objective study needs one number"),
        ([0.5], "returned [0.5] (list); a single-objective study needs one number"),
        (np.array([1.0, 2.0]), "(ndarray); a single-objective study needs one number"),
        ("0.5", "returned '0.5' (str); expected a number"),
        (None, "returned None (NoneType); expected a number"),
        ({"loss": 1.0}, "returned {'loss': 1.0} (dict); expected a number"),
        (float("nan"), "non-finite value nan"),
        (math.inf, "non-finite value inf"),
    ],
)
def test_a_non_number_fails_the_trial_with_its_reason_and_the_study_goes_on(
    tmp_path: Path, returned, reason: str
) -> None:
    study = create_study(tmp_path / "s", sampler="random", pruner=None)

    def objective(trial):
        trial.suggest_float("x", 0.0, 1.0)
        return returned

    ran = study.optimize(objective, n_trials=2)
    assert ran == [0, 1] and _states(study) == ["FAIL", "FAIL"]
    assert all(reason in t.user_attrs["error"] for t in study.trials)
    # Nothing left RUNNING: the next optimize does not wait for a stale trial.
    start = time.monotonic()
    study.optimize(square, n_trials=4, timeout=30)
    assert len(study.finished_trials()) == 4 and time.monotonic() - start < 10


def test_numbers_of_other_types_are_values(tmp_path: Path) -> None:
    import torch

    values = iter([np.float32(0.25), torch.tensor(0.5), 3, True])
    study = create_study(tmp_path / "s", sampler="random", pruner=None)
    study.optimize(lambda t: next(values), n_trials=4)
    assert [t.value for t in study.trials] == [0.25, 0.5, 3.0, 1.0]


def test_an_exception_fails_the_trial_records_why_and_propagates(tmp_path: Path) -> None:
    study = create_study(tmp_path / "s", sampler="random", pruner=None)

    def broken(trial):
        trial.suggest_float("x", 0.0, 1.0)
        raise RuntimeError("out of memory")

    with pytest.raises(RuntimeError, match="out of memory"):
        study.optimize(broken, n_trials=3)
    (trial,) = study.trials
    assert trial.state.name == "FAIL" and trial.user_attrs["error"] == "RuntimeError: out of memory"
    study.optimize(broken, n_trials=3, catch=RuntimeError)  # a single class, as Optuna takes
    assert _states(study) == ["FAIL"] * 3


def test_an_interrupted_trial_is_failed_and_queued_again_not_left_running(tmp_path: Path) -> None:
    study = create_study(tmp_path / "s", sampler="random", pruner=None)

    def interrupted(trial):
        trial.suggest_float("x", 0.0, 1.0)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        study.optimize(interrupted, n_trials=2)
    assert _states(study) == ["FAIL", "WAITING"]
    dead = study.trials[0]
    study.optimize(square, n_trials=1, timeout=30)
    (retry,) = study.finished_trials()
    assert retry.params == dead.params and retry.user_attrs["gradhpo:resume_from"] == 0


def test_a_failing_sampler_after_trial_does_not_leave_the_trial_running(tmp_path: Path) -> None:
    class Broken(optuna.samplers.RandomSampler):
        def after_trial(self, study, trial, state, values):
            raise OSError("disk full")

    study = create_study(tmp_path / "s", sampler=Broken(seed=0), pruner=None)
    with pytest.raises(OSError, match="disk full"):
        study.optimize(square, n_trials=2)
    assert _states(study) in (["COMPLETE"], ["FAIL"])  # finished, whichever way


# ---------------------------------------------------------------------- metric and direction
def test_fit_trial_refuses_to_maximize_a_loss(tmp_path: Path) -> None:
    study = create_study(tmp_path / "s", sampler="random", pruner=None)  # maximize by default
    trial = study.ask()
    with pytest.raises(
        ValueError,
        match="metric 'val_loss' must be minimized, but the study's direction is 'maximize'",
    ):
        fit_trial(trial, None, epochs=1, metric="val_loss", study=study)  # before any training
    loss_study = create_study(tmp_path / "l", metric="val_loss", sampler="random", pruner=None)
    assert loss_study.direction == "minimize"
    with pytest.raises(
        ValueError,
        match="metric 'val_accuracy' must be maximized, but the study's direction is 'minimize'",
    ):
        check_direction(loss_study.ask(), "val_accuracy")
    check_direction(loss_study.ask(), "val_loss")
    check_direction(optuna.trial.FixedTrial({}), "val_loss")  # no study: nothing to check


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {"metric": "val_loss", "direction": "maximize"},
            "metric 'val_loss' must be minimized but direction='maximize'",
        ),
        ({"metric": "loss"}, "metric must be one of \\['val_accuracy', 'val_loss'\\], got 'loss'"),
        ({"direction": "max"}, "direction: expected 'maximize' or 'minimize', got 'max'"),
        (
            {"directions": ["minimize", "up"]},
            "directions: expected 'maximize' or 'minimize', got 'up'",
        ),
        ({"directions": "minimize"}, "directions must be a non-empty list .* got 'minimize'"),
        ({"directions": []}, "directions must be a non-empty list .* got \\[\\]"),
        (
            {"direction": "minimize", "directions": ["minimize"]},
            "direction='minimize' or directions=\\['minimize'\\], not both",
        ),
        ({"name": ""}, "name must be a non-empty string, got ''"),
        ({"load_if_exists": "yes"}, "load_if_exists must be True or False, got 'yes'"),
    ],
)
def test_bad_create_study_arguments_name_the_field_and_value(
    tmp_path: Path, kwargs, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        create_study(tmp_path / "s", **kwargs)
    assert not (tmp_path / "s").exists()


# ---------------------------------------------------------------------- Optuna conventions
def test_best_params_value_trials_and_dataframe(tmp_path: Path) -> None:
    study = create_study(tmp_path / "s", direction="minimize", sampler="random", pruner=None)
    with pytest.raises(ValueError, match="has no completed trial yet"):
        study.best_params  # noqa: B018
    with pytest.raises(ValueError, match="has no completed trial yet"):
        study.best_value  # noqa: B018
    study.optimize(square, n_trials=5)
    best = min(study.trials, key=lambda t: t.value)
    assert study.best_trial.number == best.number
    assert study.best_params == best.params and study.best_value == best.value
    assert [t.number for t in study.best_trials] == [best.number]
    assert all(isinstance(t, optuna.trial.FrozenTrial) for t in study.trials)
    assert len(study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))) == 5
    frame = study.trials_dataframe()
    assert len(frame) == 5 and list(frame["params_x"]) == [t.params["x"] for t in study.trials]
    assert list(study.trials_dataframe(attrs=("number", "value")).columns) == ["number", "value"]


def test_n_trials_is_the_studys_total_and_mode_more_is_optunas(tmp_path: Path, caplog) -> None:
    study = create_study(tmp_path / "s", sampler="random", pruner=None)
    assert study.optimize(square, n_trials=3) == [0, 1, 2]
    with caplog.at_level(logging.INFO, logger="gradhpo.search"):
        assert study.optimize(square, n_trials=3) == []  # already 3: nothing to do
    assert "counts the study's total" in caplog.text
    assert study.optimize(square, n_trials=2, n_trials_mode="more") == [3, 4]
    assert len(study.finished_trials()) == 5


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"n_trials": -1}, "n_trials must be an integer >= 0, got -1"),
        ({"n_trials": "5"}, "n_trials must be an integer >= 0, got '5'"),
        ({"n_trials": True}, "n_trials must be an integer >= 0, got True"),
        ({"n_trials": 2.5}, "n_trials must be an integer >= 0, got 2.5"),
        ({"timeout": 0}, "timeout must be seconds > 0, got 0"),
        ({"n_trials": 1, "n_jobs": 0}, "n_jobs must be an integer >= 1 or -1, got 0"),
        ({"n_trials": 1, "n_jobs": -2}, "n_jobs must be an integer >= 1 or -1, got -2"),
        (
            {"n_trials": 1, "n_trials_mode": "new"},
            "n_trials_mode must be one of \\['total', 'more'\\], got 'new'",
        ),
        ({}, "give n_trials or timeout"),
    ],
)
def test_bad_optimize_arguments_name_the_field_and_value(
    tmp_path: Path, kwargs, message: str
) -> None:
    study = create_study(tmp_path / "s", sampler="random", pruner=None)
    with pytest.raises(ValueError, match=message):
        study.optimize(square, **kwargs)
    with pytest.raises(TypeError, match="catch must hold exception classes, got 'oops'"):
        study.optimize(square, n_trials=1, catch=("oops",))
    assert study.trials == []


def test_n_jobs_threads_give_exactly_n_trials(tmp_path: Path) -> None:
    study = create_study(tmp_path / "s", sampler="random", pruner=None)

    def slow(trial):
        time.sleep(0.01)
        return square(trial)

    ran = study.optimize(slow, n_trials=12, n_jobs=3)
    done = study.finished_trials()
    assert len(done) == 12 and sorted(ran) == sorted(t.number for t in done)
    assert len({t.params["x"] for t in done}) == 12
    assert not [t for t in study.trials if t.state.name == "RUNNING"]


def test_n_jobs_passes_an_exception_on_after_the_threads_stop(tmp_path: Path) -> None:
    study = create_study(tmp_path / "s", sampler="random", pruner=None)

    def flaky(trial):
        if trial.number == 2:
            raise ValueError("bad trial")
        time.sleep(0.01)
        return square(trial)

    with pytest.raises(ValueError, match="bad trial"):
        study.optimize(flaky, n_trials=50, n_jobs=2)
    assert len(study.trials) < 50
    assert not [t for t in study.trials if t.state.name == "RUNNING"]


def test_callbacks_progress_bar_and_stop(tmp_path: Path, capsys) -> None:
    study = create_study(tmp_path / "s", sampler="random", pruner=None)
    seen = []

    def callback(s, frozen):
        assert s is study
        seen.append((frozen.number, frozen.state.name))
        if frozen.number == 2:
            s.stop()

    study.optimize(square, n_trials=10, callbacks=[callback], show_progress_bar=True)
    assert seen == [(0, "COMPLETE"), (1, "COMPLETE"), (2, "COMPLETE")]
    assert "trial" in capsys.readouterr().err  # the tqdm bar
    # Optuna's own callbacks take our Study too.
    stop_at_5 = optuna.study.MaxTrialsCallback(5, states=None)
    study.optimize(square, n_trials=10, callbacks=[stop_at_5])
    assert len(study.trials) == 5


def test_load_if_exists(tmp_path: Path) -> None:
    first = create_study(tmp_path / "s", metric="val_loss", sampler="random", pruner=None)
    first.optimize(square, n_trials=2)
    with pytest.raises(ConfigError, match="already holds a study"):
        create_study(tmp_path / "s", metric="val_loss", sampler="random", pruner=None)
    again = create_study(
        tmp_path / "s", metric="val_loss", sampler="random", pruner=None, load_if_exists=True
    )
    assert len(again.finished_trials()) == 2 and again.name == first.name
    with pytest.raises(ValueError, match=r"directions \['minimize'\], not \['maximize'\]"):
        create_study(tmp_path / "s", sampler="random", pruner=None, load_if_exists=True)
    with pytest.raises(ValueError, match="was created with sampler='random', not sampler='tpe'"):
        create_study(tmp_path / "s", direction="minimize", sampler="tpe", load_if_exists=True)
    # A new directory with load_if_exists is simply created.
    fresh = create_study(tmp_path / "t", sampler="random", pruner=None, load_if_exists=True)
    assert fresh.trials == []


@pytest.mark.parametrize("sampler", ["nsga2", "tpe", "random"])
def test_multi_objective_studies(tmp_path: Path, sampler: str) -> None:
    study = create_study(
        tmp_path / "s", directions=["minimize", "maximize"], sampler=sampler, pruner=None
    )
    assert study.directions == ["minimize", "maximize"] and study.is_multi_objective

    def two(trial):
        x = trial.suggest_float("x", 0.0, 1.0)
        return x**2, x

    study.optimize(two, n_trials=6)
    assert len(study.finished_trials()) == 6 and set(_states(study)) == {"COMPLETE"}
    front = study.best_trials
    assert front and all(len(t.values) == 2 for t in front)
    for attr in ("best_trial", "best_params", "best_value"):
        with pytest.raises(RuntimeError, match=f"{attr} is for single-objective studies"):
            getattr(study, attr)
    with pytest.raises(RuntimeError):
        study.direction  # noqa: B018
    # Wrong arity fails the trial with the reason; the study goes on.
    study.optimize(lambda t: 1.0, n_trials=7)
    study.optimize(lambda t: (1.0, 2.0, 3.0), n_trials=8)
    assert "this study has 2 objectives" in study.trials[6].user_attrs["error"]
    assert "returned 3 values" in study.trials[7].user_attrs["error"]
    # Resume and recovery work alike.
    trial = study.ask()
    trial.suggest_float("x", 0.0, 1.0)
    del study, trial
    resumed = load_study(tmp_path / "s")
    assert resumed.directions == ["minimize", "maximize"]
    assert resumed.recover_stale_trials() == [8]
    resumed.optimize(two, n_trials=9)
    assert len(resumed.finished_trials()) == 9


def test_grid_sampler_from_a_plain_dict(tmp_path: Path) -> None:
    grid = {"x": [1, 2, 3], "act": ["relu", "tanh"]}
    study = create_study(tmp_path / "s", sampler="grid", search_space=grid, pruner=None)

    def objective(trial):
        x = trial.suggest_categorical("x", grid["x"])
        act = trial.suggest_categorical("act", grid["act"])
        return x + (act == "relu")

    study.optimize(objective, n_trials=100)  # the grid sampler stops the study when exhausted
    seen = sorted((t.params["x"], t.params["act"]) for t in study.trials)
    assert seen == sorted((x, a) for x in grid["x"] for a in grid["act"])
    again = load_study(tmp_path / "s")  # the grid is in study.json
    assert again.sampler._search_space == {"act": ["relu", "tanh"], "x": [1, 2, 3]}


@pytest.mark.parametrize(
    ("space", "message"),
    [
        ({"x": []}, r"search_space.x: the grid needs at least one value, got \[\]"),
        ({"x": [1, object()]}, r"search_space.x: grid values must be .* got <object"),
        ({"x": [1, 1]}, r"search_space.x: the grid repeats a value: \[1, 1\]"),
        ({"x": [1], "y": 2}, r"search_space.y: a grid lists each parameter's values, got 2"),
        ({"x": 2}, r"search.space.x"),
        ("x", r"search_space: expected a SearchSpace, a search.space mapping or a grid"),
    ],
)
def test_a_bad_grid_names_the_parameter_and_value(tmp_path: Path, space, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        create_study(tmp_path / "s", sampler="grid", search_space=space)


# ---------------------------------------------------------------------- logging
def test_one_log_line_per_finished_trial(tmp_path: Path, caplog) -> None:
    study = create_study(tmp_path / "s", direction="minimize", sampler="random", pruner=None)

    def objective(trial):
        x = trial.suggest_float("x", 0.0, 1.0)
        if trial.number == 1:
            raise optuna.TrialPruned("too slow")
        if trial.number == 2:
            return "bad"
        return x

    with caplog.at_level(logging.INFO, logger="gradhpo.search"):
        study.optimize(objective, n_trials=4)
    records = [r for r in caplog.records if r.name == "gradhpo.search"]
    assert [r.levelname for r in records] == ["INFO", "INFO", "WARNING", "INFO"]
    assert records[0].getMessage().startswith("Trial 0 finished with value ")
    assert "Best is trial 0" in records[0].getMessage()
    assert records[1].getMessage() == "Trial 1 pruned (too slow)."
    assert "Trial 2 failed with parameters" in records[2].getMessage()
    assert "expected a number" in records[2].getMessage()


def test_without_logging_configured_the_lines_go_to_stderr_at_optunas_verbosity(
    tmp_path: Path,
) -> None:
    script = (
        "import sys, optuna\n"
        "from gradhpo.search import create_study\n"
        "s = create_study(sys.argv[1], sampler='random', pruner=None)\n"
        "s.optimize(lambda t: t.suggest_float('x', 0, 1), n_trials=2)\n"
        "optuna.logging.set_verbosity(optuna.logging.WARNING)\n"
        "s.optimize(lambda t: t.suggest_float('x', 0, 1), n_trials=4)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "s")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if "finished with value" in line]
    assert [line.split("] ")[1][:16] for line in lines] == ["Trial 0 finished", "Trial 1 finished"]
