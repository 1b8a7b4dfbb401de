"""Storage calls are retried while a database connection is lost (RetryingStorage), without
making a trial twice or failing a state change that went through; other errors are not
retried. The PostgreSQL server itself is stopped and started in tests/search/test_postgres.py."""

from __future__ import annotations

from typing import Any

import optuna
import pytest
import sqlalchemy.exc
from optuna.exceptions import StorageInternalError, UpdateFinishedTrialError
from optuna.trial import TrialState

from gradhpo.search import create_study
from gradhpo.search.retry import RetryingStorage, is_connection_error

optuna.logging.set_verbosity(optuna.logging.WARNING)


def _lost() -> StorageInternalError:
    """What Optuna's RDBStorage raises when the server went away mid-call."""
    try:
        raise sqlalchemy.exc.OperationalError("SELECT 1", {}, Exception("server closed"))
    except sqlalchemy.exc.OperationalError as cause:
        try:
            raise StorageInternalError("An exception is raised during the commit.") from cause
        except StorageInternalError as exc:
            return exc


class Flaky:
    """An in-memory storage whose method ``method`` fails ``fails`` times with a lost
    connection, before (``committed=False``) or after (True) doing the work."""

    def __init__(self, method: str, fails: int, committed: bool = False) -> None:
        self.inner = optuna.storages.InMemoryStorage()
        self.method, self.fails, self.committed = method, fails, committed
        self.calls = 0

    def __getattr__(self, name: str) -> Any:
        target = getattr(self.inner, name)
        if name != self.method:
            return target

        def call(*args: Any, **kwargs: Any) -> Any:
            self.calls += 1
            if self.fails > 0:
                self.fails -= 1
                if self.committed:
                    target(*args, **kwargs)
                raise _lost()
            return target(*args, **kwargs)

        return call


def _storage(flaky: Flaky, retry_seconds: float = 30.0) -> tuple[RetryingStorage, list[float]]:
    pauses: list[float] = []
    return RetryingStorage(
        flaky, retry_seconds=retry_seconds, name="db", sleep=pauses.append
    ), pauses


def test_connection_errors_are_recognised_through_optunas_wrapping() -> None:
    assert is_connection_error(_lost())
    assert not is_connection_error(StorageInternalError("too long"))
    assert not is_connection_error(KeyError("no study"))


def test_a_lost_connection_is_retried_with_growing_pauses_and_logged(caplog) -> None:
    flaky = Flaky("set_trial_user_attr", fails=5)
    storage, pauses = _storage(flaky)
    study = optuna.create_study(storage=storage)
    trial = study.ask()
    with caplog.at_level("WARNING", logger="gradhpo.search"):
        storage.set_trial_user_attr(trial._trial_id, "k", 1)
    assert flaky.calls == 6 and storage.retries == 5
    assert pauses == [0.1, 0.2, 0.4, 0.8, 1.6]
    assert storage.get_trial(trial._trial_id).user_attrs == {"k": 1}
    messages = [r.getMessage() for r in caplog.records]
    assert "connection lost in set_trial_user_attr" in messages[0]
    assert "reachable again" in messages[-1] and len(messages) == 2


def test_retries_stop_after_retry_seconds_with_the_last_error() -> None:
    flaky = Flaky("get_all_trials", fails=10**6)
    storage, pauses = _storage(flaky, retry_seconds=0.0)
    study_id = storage.create_new_study([optuna.study.StudyDirection.MINIMIZE], "s")
    with pytest.raises(StorageInternalError):
        storage.get_all_trials(study_id)
    assert flaky.calls == 1 and pauses == []


def test_other_errors_are_not_retried() -> None:
    flaky = Flaky("set_trial_user_attr", fails=0)
    storage, pauses = _storage(flaky)
    study = optuna.create_study(storage=storage)
    trial = study.ask()
    study.tell(trial, 1.0)
    with pytest.raises(UpdateFinishedTrialError):
        storage.set_trial_user_attr(trial._trial_id, "k", 1)
    assert pauses == [] and storage.retries == 0
    with pytest.raises(ValueError, match="retry_seconds must be a number >= 0, got -1"):
        RetryingStorage(flaky, retry_seconds=-1)


def test_a_trial_created_before_the_connection_dropped_is_not_created_twice(
    tmp_path,
) -> None:
    # The commit went through, only the answer was lost: gradhpo's ask finds its trial again
    # (its driver record with the heartbeat time is unique) instead of making a second one.
    flaky = Flaky("create_new_trial", fails=1, committed=True)
    storage, _ = _storage(flaky)
    study = create_study(tmp_path / "s", storage=storage, sampler="random", pruner=None)
    study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=3)
    assert flaky.calls == 3 and storage.retries == 1  # the lost answer found, not re-asked
    assert [t.state.name for t in study.trials] == ["COMPLETE"] * 3
    assert len(study.finished_trials()) == 3


def test_a_state_change_committed_before_the_drop_counts_as_done() -> None:
    flaky = Flaky("set_trial_state_values", fails=1, committed=True)
    storage, _ = _storage(flaky)
    study = optuna.create_study(storage=storage)
    trial = study.ask()
    assert storage.set_trial_state_values(trial._trial_id, TrialState.FAIL) is True
    assert storage.get_trial(trial._trial_id).state == TrialState.FAIL
    # Not a lost answer: finishing a finished trial is still an error.
    with pytest.raises(UpdateFinishedTrialError):
        storage.set_trial_state_values(trial._trial_id, TrialState.COMPLETE, [1.0])


def test_a_study_on_a_flaky_storage_completes_with_exact_counts(tmp_path) -> None:
    flaky = Flaky("set_trial_intermediate_value", fails=3)
    storage, _ = _storage(flaky)
    study = create_study(tmp_path / "s", storage=storage, sampler="random", pruner=None)

    def objective(trial: optuna.trial.Trial) -> float:
        x = trial.suggest_float("x", 0, 1)
        trial.report(x, 1)
        return x

    study.optimize(objective, n_trials=4)
    assert storage.retries == 3
    assert [t.state.name for t in study.trials] == ["COMPLETE"] * 4


class _DriverError(Exception):
    """A DBAPI error as psycopg raises it: ``sqlstate`` None when the network failed."""

    def __init__(self, message: str, sqlstate: str | None) -> None:
        super().__init__(message)
        self.sqlstate = sqlstate


def _operational(sqlstate: str | None) -> sqlalchemy.exc.OperationalError:
    return sqlalchemy.exc.OperationalError("SELECT 1", {}, _DriverError("x", sqlstate))


@pytest.mark.parametrize(
    ("sqlstate", "outage"),
    [
        (None, True),  # connection refused or reset
        ("57P01", True),  # admin shutdown
        ("57P03", True),  # the database system is starting up
        ("08006", True),  # connection failure
        ("28P01", False),  # password authentication failed
        ("3D000", False),  # no such database
    ],
)
def test_an_outage_is_told_from_a_refusal(sqlstate: str | None, outage: bool) -> None:
    from gradhpo.search.retry import is_outage

    assert is_outage(_operational(sqlstate)) is outage
    assert not is_outage(ValueError("not a database error"))


def test_opening_waits_through_an_outage_but_not_through_a_refusal(caplog) -> None:
    from gradhpo.search.retry import open_through_outage

    attempts: list[int] = []
    pauses: list[float] = []

    def opens_on_the_third_try() -> str:
        attempts.append(1)
        if len(attempts) < 3:
            raise _operational(None)
        return "storage"

    with caplog.at_level("WARNING", logger="gradhpo.search"):
        got = open_through_outage(opens_on_the_third_try, "db", 60, sleep=pauses.append)
    assert got == "storage" and len(attempts) == 3 and pauses == [0.1, 0.2]
    assert "cannot be reached" in caplog.text and "reachable again" in caplog.text

    def refuses() -> str:
        attempts.append(1)
        raise _operational("28P01")

    attempts.clear()
    with pytest.raises(sqlalchemy.exc.OperationalError):
        open_through_outage(refuses, "db", 60, sleep=pauses.append)
    assert len(attempts) == 1  # a wrong password is not waited for

    def always_down() -> str:
        raise _operational(None)

    with pytest.raises(sqlalchemy.exc.OperationalError):
        open_through_outage(always_down, "db", 0.0, sleep=pauses.append)  # no time: at once
