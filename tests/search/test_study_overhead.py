"""What a Study does per trial beyond plain Optuna (issue 17): one listing of the study's trials
per fresh trial, counting that does not walk finished trials again, the sampler state written
in the format ``save_sampler_state`` writes, and the reseed rule of concurrent drivers."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import optuna
import pytest
from optuna.trial import TrialState

from gradhpo.files import read_slot_file
from gradhpo.search import create_study, load_study
from gradhpo.search.samplers import reseed_sampler, save_sampler_state
from gradhpo.search.study import FINISHED_STATES, derived_seed, is_retried

optuna.logging.set_verbosity(optuna.logging.WARNING)


class CountingStorage(optuna.storages.InMemoryStorage):
    """An in-memory storage that counts listings of all trials and of running ones."""

    def __init__(self) -> None:
        super().__init__()
        self.listings = {"all": 0, "running": 0}

    def get_all_trials(self, study_id: int, deepcopy: bool = True, states: Any = None) -> Any:
        if states is None:
            self.listings["all"] += 1
        elif tuple(states) == (TrialState.RUNNING,):
            self.listings["running"] += 1
        return super().get_all_trials(study_id, deepcopy=deepcopy, states=states)


def objective(trial: optuna.trial.Trial) -> float:
    return trial.suggest_float("x", -1.0, 1.0) ** 2


def test_a_fresh_trial_costs_one_listing_of_all_trials_and_one_of_the_running(
    tmp_path: Path,
) -> None:
    """The loop's count lists all trials (plain Optuna's ask lists the waiting ones); after
    the ask the running trials are listed for the reseed check. Trials numbered below
    n_trials are not checked as surplus (a third listing each before)."""
    storage = CountingStorage()
    study = create_study(tmp_path / "s", sampler="random", pruner=None, storage=storage)
    storage.listings.update(all=0, running=0)
    study.optimize(objective, n_trials=30)
    assert study.trial_counts()["finished"] == 30
    # 30 trials and the loop's last count, plus the count at the start and the progress at
    # the end (finished_trials).
    assert storage.listings["all"] <= 31 + 2, storage.listings
    assert storage.listings["running"] == 30 + 1, storage.listings  # + the stale-trial check


def _full_count(study: Any) -> int:
    return sum(
        1
        for t in study.optuna.get_trials(deepcopy=False)
        if t.state in FINISHED_STATES and not is_retried(t)
    )


def test_the_incremental_count_agrees_with_a_full_count(tmp_path: Path) -> None:
    """Counting starts after the trials already known finished; a trial left running holds
    that point back, a trial retired later is not counted, and a listing that is not the
    study's (fewer trials) is counted afresh."""
    study = create_study(tmp_path / "s", sampler="random", pruner=None, seed=0)
    study.optimize(objective, n_trials=5)
    long_running = study.ask()  # holds the settled prefix at number 5
    long_running.suggest_float("x", -1.0, 1.0)
    for _ in range(4):  # ask/tell: optimize would wait for the running trial to reach 9
        trial = study.ask()
        study.tell(trial, objective(trial))
    trials = study.optuna.get_trials(deepcopy=False)
    done, unfinished = study._tally(trials)
    assert done == _full_count(study) == 9
    assert [t.number for t in unfinished] == [long_running.number]
    assert study._settled == (5, 5)
    # Retired while running: not counted, and the prefix moves past it.
    frozen = study.optuna._storage.get_trial(long_running._trial_id)
    assert study._retire(frozen)
    done, unfinished = study._tally(study.optuna.get_trials(deepcopy=False))
    assert done == _full_count(study) == 9 and not unfinished
    assert study._settled == (10, 9)
    # A surplus/duplicate/failed mix is counted as a full walk counts it.
    dup = study.ask()
    dup.suggest_float("x", -1.0, 1.0)
    study._close_duplicate(dup, "test")
    failed = study.ask()
    study.tell(failed, state=TrialState.FAIL)
    assert study._tally(study.optuna.get_trials(deepcopy=False))[0] == _full_count(study) == 10
    # A shorter listing (not this study's trials as tallied): counted from the start.
    assert study._tally(study.optuna.get_trials(deepcopy=False)[:3])[0] == 3


def test_a_journal_is_read_past_the_settled_trials_and_agrees_with_a_full_listing(
    tmp_path: Path, monkeypatch
) -> None:
    """On the journal (the default storage) the loop reads only the trials past the settled
    prefix from the storage's replay, and the running trials after the ask without another
    pass over the file. What it counts and finds running is what full listings give, also
    with a second driver (another Study on the same file) that created trials meanwhile."""
    from gradhpo.search.study import _journal_of

    study = create_study(tmp_path / "s", sampler="random", pruner=None, seed=0)
    assert _journal_of(study.optuna._storage) is not None
    study.optimize(objective, n_trials=6)
    other = load_study(tmp_path / "s")  # a second driver of the same journal file
    left = other.ask()  # running under the other driver
    left.suggest_float("x", -1.0, 1.0)
    for _ in range(3):
        trial = other.ask()
        other.tell(trial, objective(trial))
    total, tail, base = study._listing_to_count()
    assert base is not None and base[0] == 6 and total == 10
    assert [t.number for t in tail] == [6, 7, 8, 9]
    done, unfinished = study._tally(tail, base)
    assert done == _full_count(study) == 9 and [t.number for t in unfinished] == [6]
    assert study._settled == (6, 6)  # held back by the running trial 6
    # After the ask, the running trials are those of a full listing (the other driver's
    # trial 6 and the new one): a driver that sees another one running reseeds.
    calls = []
    real = study.optuna._storage.get_all_trials
    monkeypatch.setattr(
        study.optuna._storage,
        "get_all_trials",
        lambda *a, **k: calls.append(k.get("states")) or real(*a, **k),
    )
    fresh, running = study._ask_fresh(full=False)
    assert not calls  # read from the replay: no listing through the storage
    full = [t.number for t in real(study.optuna._study_id, states=(TrialState.RUNNING,))]
    assert sorted(t.number for t in running) == sorted(full) == [6, fresh.number]
    assert study._state_after is None  # reseeded: another driver's trial is running


@pytest.mark.parametrize("storage", ["sqlite", "journal"])
def test_a_database_counts_in_sql_what_a_listing_counts(tmp_path: Path, storage: str) -> None:
    """On a database the loop's count is one SQL statement; it must agree with the count of
    a full listing on every kind of trial: complete, pruned, failed, retried, surplus,
    duplicate, a mark whose value is false (counted), running and waiting. Other storages
    have no SQL count (None)."""
    from gradhpo.search.study import _DUPLICATE, _RETRIED, _SURPLUS, _sql_tally

    study = create_study(tmp_path / "s", sampler="random", pruner=None, seed=0, storage=storage)
    study.optimize(objective, n_trials=3)
    raw = study.optuna._storage

    def fail_with(key: str | None, value: Any) -> None:
        trial = study.ask()
        trial.suggest_float("x", -1.0, 1.0)
        if key is not None:
            raw.set_trial_system_attr(trial._trial_id, key, value)
        study.tell(trial, state=TrialState.FAIL)

    fail_with(None, None)  # a plain failure: counts
    fail_with(_RETRIED, True)
    fail_with(_SURPLUS, True)
    fail_with(_DUPLICATE, "the proposal of trial 0")
    fail_with(_DUPLICATE, "")  # a false mark: counts
    fail_with(_RETRIED, False)  # counts
    pruned = study.ask()
    pruned.suggest_float("x", -1.0, 1.0)
    study.tell(pruned, state=TrialState.PRUNED)
    running = study.ask()
    running.suggest_float("x", -1.0, 1.0)
    study.enqueue({"x": 0.5})
    listing = study.optuna.get_trials(deepcopy=False)
    study._settled = (0, 0)
    done, unfinished = study._tally(listing)
    want = (
        len(listing),
        done,
        sum(t.state == TrialState.RUNNING for t in unfinished),
        sum(t.state == TrialState.WAITING for t in unfinished),
    )
    assert want == (12, 7, 1, 1)  # 3 complete + 3 counted failures + 1 pruned
    got = _sql_tally(raw, study.optuna._study_id)
    assert got == (want if storage == "sqlite" else None)


def test_n_trials_is_exact_when_retried_trials_push_numbers_past_it(tmp_path: Path) -> None:
    """Trials numbered n_trials or more are checked as surplus; with dead trials retried
    under new numbers the study still ends with exactly n counted trials."""
    study = create_study(tmp_path / "s", sampler="random", pruner=None, seed=0)
    for _ in range(3):  # three dead trials: failed as retried, not counted
        trial = study.ask()
        trial.suggest_float("x", -1.0, 1.0)
        study._retire(study.optuna._storage.get_trial(trial._trial_id))
    study.optimize(objective, n_trials=6)
    counts = study.trial_counts()
    assert counts["finished"] == 6 and counts["not_counted"] == 3
    assert max(t.number for t in study.trials) == 8


def test_the_sampler_state_record_is_what_save_sampler_state_writes(tmp_path: Path) -> None:
    study = create_study(tmp_path / "s", sampler="tpe", pruner=None, seed=3)
    study.optimize(objective, n_trials=4)
    written = read_slot_file(study.sampler_state_path)
    save_sampler_state(study.sampler, tmp_path / "ref.json", trial=3)
    assert written == (tmp_path / "ref.json").read_bytes()
    assert json.loads(written)["trial"] == 3
    leftovers = [
        p.name
        for p in (tmp_path / "s").iterdir()
        if p.name.endswith(".tmp") and not p.name.startswith(".study.journal.lock.")
    ]
    assert leftovers == []  # (the journal lock keeps its own record while the study is open)


def test_a_driver_that_sees_another_running_after_its_ask_reseeds(tmp_path: Path) -> None:
    """Driver A lists the trials, driver B creates a trial, then A asks: A's listing after
    the ask shows B's trial running, so A draws from the seed of its own trial's number, not
    from the saved state both restored. Alone, a driver keeps its state (one driver
    reproduces a serial run)."""
    create_study(tmp_path / "s", sampler="random", pruner=None, seed=7).optimize(
        objective, n_trials=2
    )
    a, b = load_study(tmp_path / "s"), load_study(tmp_path / "s")
    b_trial = b.ask()
    a_trial, listing = a._ask_fresh(full=True)
    assert [t.number for t in listing] == [0, 1, 2, 3]
    reference = optuna.samplers.RandomSampler()
    reseed_sampler(reference, derived_seed(7, a_trial.number))
    expected = optuna.create_study(sampler=reference).ask().suggest_float("x", -1.0, 1.0)
    a_x = a_trial.suggest_float("x", -1.0, 1.0)
    assert a_x == expected != b_trial.suggest_float("x", -1.0, 1.0)
    a.tell(a_trial, a_x**2)
    b.tell(b_trial, 0.0)
    assert a._state_after == a_trial.number
    a._ask_fresh(full=False)  # nobody else running: no reseed
    assert a._state_after == a_trial.number


def test_on_a_database_a_lone_driver_counts_instead_of_listing(tmp_path: Path, monkeypatch) -> None:
    """On an RDB storage the check for other drivers after the ask is one COUNT: a driver
    alone does not list the trials, one that counts another's running trial lists them and
    reseeds, as on the journal."""
    from gradhpo.search.study import _running_count

    create_study(tmp_path / "s", storage="sqlite", sampler="random", pruner=None, seed=7).optimize(
        objective, n_trials=2
    )
    a, b = load_study(tmp_path / "s"), load_study(tmp_path / "s")
    storage, study_id = a.optuna._storage, a.optuna._study_id
    assert _running_count(storage, study_id) == 0
    b_trial = b.ask()
    assert _running_count(storage, study_id) == 1
    listed: list[object] = []
    real = type(storage).get_all_trials
    monkeypatch.setattr(
        type(storage),
        "get_all_trials",
        lambda self, *args, **kwargs: (
            listed.append(kwargs.get("states")) or real(self, *args, **kwargs)
        ),
    )
    a_trial, _ = a._ask_fresh(full=False)
    assert listed and a._state_after is None  # b's trial runs: listed, reseeded
    a.tell(a_trial, a_trial.suggest_float("x", -1.0, 1.0) ** 2)
    b.tell(b_trial, 0.0)
    assert a._state_after == a_trial.number
    listed.clear()
    a._ask_fresh(full=False)  # nobody else running: counted, not listed, no reseed
    assert not listed and a._state_after == a_trial.number
    assert _running_count(optuna.storages.InMemoryStorage(), 0) is None  # lists instead
