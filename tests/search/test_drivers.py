"""Several drivers on one study never evaluate the same proposal twice, and end with exactly
the number of trials asked for: threads of one process here (fast), separate `gradhpo
resume` processes and executor workers in the slow tests below."""

from __future__ import annotations

import copy
import json
import logging
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import optuna
import pytest
import yaml

from gradhpo.search import create_study, load_study
from gradhpo.search.study import (
    MAX_DUPLICATES,
    DuplicateProposal,
    is_retried,
    load_optuna_study,
    owning_study,
)

optuna.logging.set_verbosity(optuna.logging.WARNING)


def _counted(directory: Path) -> list[optuna.trial.FrozenTrial]:
    study = load_optuna_study(directory)
    return [
        t for t in study.get_trials(deepcopy=False) if t.state.is_finished() and not is_retried(t)
    ]


def _assert_no_duplicates(trials: list[optuna.trial.FrozenTrial]) -> None:
    keys = [json.dumps(t.params, sort_keys=True) for t in trials]
    repeated = {k for k in keys if keys.count(k) > 1}
    assert not repeated, f"evaluated twice: {repeated}"


def discrete(trial: optuna.trial.Trial) -> float:
    x = trial.suggest_int("x", 0, 29)
    kind = trial.suggest_categorical("kind", ["a", "b"])
    owning_study(trial).claim(trial)  # what gradhpo's objectives (and fit_trial) do
    time.sleep(0.02)  # the drivers' trials overlap
    return x + (kind == "b")


def test_drivers_that_restored_the_same_sampler_state_never_repeat_a_proposal(
    tmp_path: Path,
) -> None:
    """Three drivers open the study with the same saved sampler state (as three `gradhpo
    resume` processes do) and share a small discrete space: zero duplicates, exactly N."""
    create_study(tmp_path / "s", sampler="random", pruner=None, seed=0).optimize(
        discrete, n_trials=2
    )
    drivers = [load_study(tmp_path / "s") for _ in range(3)]
    threads = [threading.Thread(target=d.optimize, args=(discrete, 24)) for d in drivers]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    counted = _counted(tmp_path / "s")
    assert len(counted) == 24
    _assert_no_duplicates(counted)
    counts = load_study(tmp_path / "s").trial_counts()
    assert counts["complete"] == 24 and counts["finished"] == 24


def test_the_grid_sampler_with_several_drivers_runs_each_point_once(tmp_path: Path) -> None:
    grid = {"x": [0, 1, 2, 3, 4, 5], "kind": ["a", "b"]}

    def objective(trial: optuna.trial.Trial) -> float:
        x = trial.suggest_categorical("x", grid["x"])
        trial.suggest_categorical("kind", grid["kind"])
        owning_study(trial).claim(trial)
        time.sleep(0.01)
        return float(x)

    create_study(tmp_path / "g", sampler="grid", search_space=grid, pruner=None, seed=1)
    drivers = [load_study(tmp_path / "g") for _ in range(3)]
    threads = [threading.Thread(target=d.optimize, args=(objective, 12)) for d in drivers]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    counted = _counted(tmp_path / "g")
    assert len(counted) == 12
    _assert_no_duplicates(counted)


def test_claim_refuses_the_params_of_a_finished_or_claimed_trial(tmp_path: Path) -> None:
    study = create_study(tmp_path / "s", sampler="random", pruner=None, seed=0)
    first = study.ask()
    first.suggest_categorical("x", ["only"])
    study.claim(first)  # nothing else holds it
    second = study.ask()
    second.suggest_categorical("x", ["only"])
    with pytest.raises(DuplicateProposal, match=r"are those of trial 0 \(running\)"):
        study.claim(second)
    study.tell(first, 1.0)
    # An enqueued point (the user's own, or a retry) is evaluated whatever it repeats.
    study.enqueue({"x": "only"})
    again = study.ask()
    again.suggest_categorical("x", ["only"])
    study.claim(again)


def test_an_exhausted_space_stops_the_driver_and_says_so(tmp_path: Path, caplog) -> None:
    """A space of one point and n_trials=3: one trial, then every proposal repeats it; the
    driver gives up after MAX_DUPLICATES asks instead of training it again (or spinning)."""

    def objective(trial: optuna.trial.Trial) -> float:
        trial.suggest_categorical("x", ["only"])
        owning_study(trial).claim(trial)
        return 1.0

    study = create_study(tmp_path / "s", sampler="random", pruner=None, seed=0)
    with caplog.at_level(logging.WARNING, logger="gradhpo.search"):
        study.optimize(objective, n_trials=3)
    counts = study.trial_counts()
    assert counts["finished"] == 1 and counts["not_counted"] == MAX_DUPLICATES
    assert "the search space looks exhausted" in caplog.text


def test_a_user_objective_claims_at_its_first_report(tmp_path: Path) -> None:
    """An objective that never calls claim itself: its first report claims the proposal, so a
    repeat stops there (closed uncounted) instead of being trained to the end; an objective
    that claimed already is not claimed again at its reports."""
    epochs: list[int] = []

    def objective(trial: optuna.trial.Trial) -> float:
        trial.suggest_categorical("x", ["only"])
        for epoch in range(3):
            trial.report(1.0, epoch)
            epochs.append(epoch)
        return 1.0

    study = create_study(tmp_path / "s", sampler="random", pruner=None, seed=0)
    study.optimize(objective, n_trials=3)
    counts = study.trial_counts()
    assert counts["finished"] == 1 and counts["not_counted"] == MAX_DUPLICATES
    assert epochs == [0, 1, 2]  # the repeats never got past their first report
    duplicates = [t for t in study.optuna.trials if t.system_attrs.get("gradhpo:duplicate")]
    assert len(duplicates) == MAX_DUPLICATES and all(not t.intermediate_values for t in duplicates)

    claims: list[int] = []
    claimed = create_study(tmp_path / "c", sampler="random", pruner=None, seed=0)
    original = claimed.claim
    claimed.claim = lambda trial: claims.append(trial.number) or original(trial)  # type: ignore[method-assign]

    def claims_first(trial: optuna.trial.Trial) -> float:
        trial.suggest_float("x", 0.0, 1.0)
        claimed.claim(trial)
        for epoch in range(3):
            trial.report(1.0, epoch)
        return 1.0

    claimed.optimize(claims_first, n_trials=2)
    assert claims == [0, 1]  # once per trial, by the objective


def test_owning_study_is_the_study_that_runs_the_trial(tmp_path: Path) -> None:
    study = create_study(tmp_path / "s", sampler="random", pruner=None)
    seen = []
    study.optimize(lambda t: seen.append(owning_study(t)) or 1.0, n_trials=1)
    assert seen == [study]
    plain = optuna.create_study()
    assert owning_study(plain.ask()) is None


# ---------------------------------------------------------------- several processes (slow)
TINY = {
    "name": "multi",
    "data": {"name": "digits", "seed": 0},
    "model": {"name": "cnn", "depth": 1, "width": 4, "norm": "none"},
    "optimizer": {"name": "sgd", "lr": 0.1, "momentum": 0.9},
    "training": {"epochs": 2, "batch_size": 128, "device": "cpu", "seed": 0},
    "search": {
        # 3 x 2 x 3 = 18 points, 8 trials: drivers with one sampler stream would collide.
        "space": {
            "model.width": {"type": "int", "low": 2, "high": 4},
            "model.pooling": {"type": "categorical", "choices": ["max", "avg"]},
            "optimizer.lr": {"type": "categorical", "choices": [0.05, 0.1, 0.2]},
        },
        "sampler": "random",
        "pruner": None,
        "trials": 8,
    },
    "output": {"dir": "runs", "tensorboard_dir": "tb"},
}


def _gradhpo(*args: str, cwd: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "gradhpo.cli", *args, "--no-progress"],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.mark.slow
def test_four_resume_processes_at_once_never_repeat_a_trial(tmp_path: Path) -> None:
    """A `tune` killed inside a trial, then 4 `gradhpo resume DIR` started together: one of
    them continues the dead trial, none evaluates a proposal another did, and the study
    holds exactly `trials` counted trials."""
    config = copy.deepcopy(TINY)
    config["training"]["epochs"] = 6  # long enough to be killed inside a trial
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
    # Killed inside trial 0, right after its epoch-1 progress is in place. (A kill sent when
    # a poll saw a checkpoint could land between two trials, leaving no trial to continue.)
    from kill_points import run_killed

    run_killed(
        "replaced:*/trials/0000/progress.json@1", "tune", "c.yaml", "--no-progress", cwd=tmp_path
    )
    study_dir = tmp_path / "runs" / "multi"
    drivers = [_gradhpo("resume", str(study_dir), cwd=tmp_path) for _ in range(4)]
    outputs = [d.communicate(timeout=600) for d in drivers]
    for d, (_out, err) in zip(drivers, outputs, strict=True):
        assert d.returncode == 0, err
    counted = _counted(study_dir)
    assert len(counted) == 8
    _assert_no_duplicates(counted)
    study = load_optuna_study(study_dir)
    retried = [t for t in study.trials if t.system_attrs.get("gradhpo:retried")]
    assert len(retried) == 1  # the killed trial, continued by exactly one driver
    continued = [t for t in counted if t.user_attrs.get("gradhpo:resume_from") is not None]
    assert len(continued) == 1 and continued[0].params == retried[0].params


@pytest.mark.slow
def test_tune_with_executor_processes_never_repeats_a_trial(tmp_path: Path, monkeypatch) -> None:
    from gradhpo.cli import main

    monkeypatch.chdir(tmp_path)
    config = copy.deepcopy(TINY)
    config["name"] = "workers"
    config["training"]["epochs"] = 1
    config["search"]["executor"] = {"name": "processes", "workers": 3}
    (tmp_path / "w.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
    assert main(["tune", "w.yaml", "--no-progress"]) == 0
    counted = _counted(tmp_path / "runs" / "workers")
    assert len(counted) == 8
    _assert_no_duplicates(counted)


def test_driver_streams_are_not_trial_streams() -> None:
    """Driver k's sampler seed must differ from the seed a fresh trial number k draws from
    while drivers run side by side (they were equal: a proposal repeated across drivers)."""
    from gradhpo.search.study import derived_seed

    seeds = {derived_seed(0, i, "driver") for i in range(8)}
    assert not seeds & {derived_seed(0, i) for i in range(8)}
    assert not seeds & {derived_seed(0, i, "reseed") for i in range(8)}
    assert derived_seed(0, 3) == derived_seed(0, 3, "trial")


def test_a_resumed_driver_does_not_replay_its_earlier_stream(tmp_path: Path) -> None:
    """Worker k of several drivers, started again on the same study (a resume after a kill),
    must not draw from the stream its earlier start drew from: it proposed the points it had
    already evaluated (one duplicate in 40 in a CI run of test_driver_death). Two starts from
    the same study state still draw the same points (reruns are reproducible)."""
    from gradhpo.search import create_study
    from gradhpo.search.drivers import open_driver

    directory = tmp_path / "s"
    create_study(directory, sampler="random", pruner=None, direction="minimize", seed=0)

    def first_draw() -> float:
        study = open_driver(str(directory), 0, 2, None)
        trial = study.ask()
        x = trial.suggest_float("x", -2.0, 2.0)
        study.tell(trial, x**2)
        return x

    def draw_without_telling() -> float:
        study = open_driver(str(directory), 0, 2, None)
        return study.sampler._rng.rng.uniform(-2.0, 2.0)

    before = first_draw()
    again = first_draw()  # the study now holds one trial: another stream
    assert again != before
    assert draw_without_telling() == draw_without_telling()  # same state, same stream


def test_a_user_objectives_reports_keep_its_heartbeat_fresh(tmp_path: Path) -> None:
    """A user objective that never calls heartbeat: its reports refresh the trial's heartbeat
    once a tenth of stale_after has passed (a long trial on another host is not taken for
    dead), and not at every report when that is far off."""
    import time

    from gradhpo.search.study import _DRIVER

    def run(stale_after: float) -> list[float]:
        study = create_study(
            tmp_path / str(stale_after), sampler="random", pruner=None, stale_after=stale_after
        )
        beats: list[float] = []

        def objective(trial: optuna.trial.Trial) -> float:
            trial.suggest_float("x", 0.0, 1.0)
            for epoch in range(4):
                time.sleep(0.06)
                trial.report(1.0, epoch)
                frozen = study.optuna._storage.get_trial(trial._trial_id)
                beats.append(frozen.system_attrs[_DRIVER]["beat"])
            return 1.0

        study.optimize(objective, n_trials=1)
        return beats

    assert len(set(run(0.5))) == 4  # every report came more than 0.05 s after the last beat
    assert len(set(run(600.0))) == 1  # the creation's heartbeat, not rewritten
