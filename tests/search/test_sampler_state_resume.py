"""A driver that dies after a trial drew its parameters but before the sampler's state after
that draw was saved: the resumed study proposes what the uninterrupted one did (issue 16)."""

from __future__ import annotations

import gc
import json
from pathlib import Path

import optuna
import pytest

from gradhpo.files import read_slot_file
from gradhpo.search import create_study, load_study

optuna.logging.set_verbosity(optuna.logging.WARNING)

TPE = {"name": "tpe", "n_startup_trials": 2}


def bowl(trial: optuna.trial.Trial) -> float:
    x = trial.suggest_float("x", -3.0, 3.0)
    y = trial.suggest_int("y", 0, 10)
    return (x - 1.0) ** 2 + (y - 4) ** 2


def _sequence(study) -> list[dict]:
    return [t.params for t in study.finished_trials()]


@pytest.mark.parametrize("drawn", ["all", "part", "none"])
def test_a_trial_killed_before_its_sampler_state_is_drawn_again(tmp_path: Path, drawn) -> None:
    """Trial 2 dies having drawn all, part or none of its parameters, before its first
    heartbeat (where the state after the draw is saved). Queued again, its parameters would be
    evaluated while the restored sampler drew from the same state once more (TPE then saw other
    finished trials: a different sequence). Drawn again, the study is the uninterrupted one."""
    whole = create_study(tmp_path / "whole", sampler=TPE, pruner=None, seed=3)
    whole.optimize(bowl, n_trials=5)

    study = create_study(tmp_path / "s", sampler=TPE, pruner=None, seed=3)
    study.optimize(bowl, n_trials=2)
    saved = json.loads(read_slot_file(tmp_path / "s" / "sampler_state.bin"))
    assert saved["trial"] == 1  # the trial whose draw the saved state follows
    trial = study.ask()
    if drawn in ("all", "part"):
        trial.suggest_float("x", -3.0, 3.0)
    if drawn == "all":
        trial.suggest_int("y", 0, 10)
    del study, trial  # the driver is gone (same process: its token is no longer live)
    gc.collect()

    resumed = load_study(tmp_path / "s")
    assert resumed.recover_stale_trials() == [2]
    dead = resumed.optuna.trials[2]
    assert dead.state.name == "FAIL" and dead.system_attrs["gradhpo:retried"] is True
    assert not resumed.optuna.get_trials(states=(optuna.trial.TrialState.WAITING,))
    resumed.optimize(bowl, n_trials=5)
    assert _sequence(resumed) == _sequence(whole)
    assert resumed.trial_counts()["not_counted"] == 1


def test_a_trial_that_saved_its_state_or_started_work_is_queued_again(tmp_path: Path) -> None:
    """Once the state after the draw is saved (the first heartbeat), or the trial claimed its
    parameters or reported a value, the dead trial is queued again and continued, as before."""
    for case in ("heartbeat", "claimed", "reported"):
        study = create_study(tmp_path / case, sampler=TPE, pruner=None, seed=3)
        study.optimize(bowl, n_trials=2)
        trial = study.ask()
        bowl(trial)
        if case == "heartbeat":
            study.heartbeat(trial)
        elif case == "claimed":
            study.optuna._storage.set_trial_system_attr(trial._trial_id, "gradhpo:claimed", True)
        else:
            trial.report(1.0, 1)
        params = trial.params
        del study, trial
        gc.collect()
        resumed = load_study(tmp_path / case)
        assert resumed.recover_stale_trials() == [2], case
        (waiting,) = resumed.optuna.get_trials(states=(optuna.trial.TrialState.WAITING,))
        assert waiting.system_attrs["fixed_params"] == params, case
        assert waiting.user_attrs["gradhpo:resume_from"] == 2, case


def test_a_state_saved_without_its_trial_keeps_the_old_rule(tmp_path: Path) -> None:
    """A sampler state written before the state recorded its trial (in the file of those
    versions, sampler_state.json): which trial it follows is unknown, so a dead trial is
    queued again (what every resume did before)."""
    study = create_study(tmp_path / "s", sampler=TPE, pruner=None, seed=3)
    study.optimize(bowl, n_trials=2)
    current = tmp_path / "s" / "sampler_state.bin"
    payload = json.loads(read_slot_file(current))
    del payload["trial"]
    (tmp_path / "s" / "sampler_state.json").write_text(json.dumps(payload))
    current.unlink()
    trial = study.ask()
    bowl(trial)
    del study, trial
    gc.collect()
    resumed = load_study(tmp_path / "s")
    assert resumed.recover_stale_trials() == [2]
    assert len(resumed.optuna.get_trials(states=(optuna.trial.TrialState.WAITING,))) == 1
