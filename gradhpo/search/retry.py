"""Retry storage calls while a database server is unreachable.

A study whose trials live in a database server (``storage="postgresql://..."``) must survive
the server restarting or the network dropping for a while: every driver would otherwise fail
its running trial (or die) at the first storage call that finds the connection gone.
:class:`RetryingStorage` wraps an Optuna storage and repeats a call that failed because the
connection was lost (SQLAlchemy ``OperationalError``/``InterfaceError`` or a DBAPI error
marked as a disconnect, however Optuna wrapped it) with growing pauses (0.1 s doubling to
2 s), for up to ``retry_seconds`` in all; then the last error propagates. Other errors
(a finished trial, a missing study, bad data) propagate at once. SQLAlchemy drops the pool's
dead connections at the first disconnect, so a retry after the server is back reconnects.

Writes are repeated only where a repeat is harmless: attribute, parameter and intermediate
value writes set the same value again; a repeated state change that finds the trial already
in that state (the first attempt was committed, only its answer was lost) counts as done; a
repeated ``create_new_trial`` whose template carries system attributes (gradhpo's driver
record with its heartbeat time) first looks for the trial the lost attempt may have created,
so a retried ask never makes two trials.

Optuna's ``RDBStorage`` also repeats a failed trial creation itself (up to 5 attempts, for
deadlocks), out of this wrapper's sight: when the first attempt's COMMIT reached the server
but its answer was lost, the second attempt made a second trial and the first was left
RUNNING under a live driver, which no one recovers before the heartbeat grace period runs out
(the study waited for it). So every error SQLAlchemy reports on the storage's engine is
counted (per thread, ``handle_error``), and a creation that met one, or that was repeated
here, looks for the twins of its trial afterwards (the same driver record and attributes:
only a template with gradhpo's driver record is told apart from every other trial) and
closes them, never run and not counted: FAIL + ``gradhpo:duplicate``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from optuna.exceptions import UpdateFinishedTrialError
from optuna.storages import BaseStorage
from optuna.trial import FrozenTrial, TrialState

__all__ = [
    "RetryingStorage",
    "is_connection_error",
    "is_outage",
    "open_through_outage",
    "retry_while",
]

logger = logging.getLogger("gradhpo.search")

#: Seconds a storage call is retried while the database cannot be reached.
RETRY_SECONDS = 120.0
#: The mark of a trial closed without being run (FAIL + it: not counted); the same key as
#: :meth:`gradhpo.search.Study.claim`'s duplicate proposals (``is_retried`` reads it).
_DUPLICATE = "gradhpo:duplicate"
#: The system attribute in which :meth:`gradhpo.search.Study.ask` writes its driver record.
_DRIVER = "gradhpo:driver"


def is_connection_error(exc: BaseException) -> bool:
    """Whether ``exc`` (or an exception it was raised from) says the database connection was
    lost or could not be made."""
    try:
        from sqlalchemy import exc as sa_exc
    except ImportError:  # pragma: no cover - Optuna depends on SQLAlchemy
        return False
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, sa_exc.DBAPIError) and current.connection_invalidated:
            return True
        if isinstance(current, (sa_exc.OperationalError, sa_exc.InterfaceError)):
            return True
        if isinstance(current, sa_exc.DisconnectionError):
            return True
        current = current.__cause__ or current.__context__
    return False


def is_outage(exc: BaseException) -> bool:
    """Whether ``exc`` says the database server cannot be reached right now (refused, reset,
    shutting down, starting up), as opposed to refusing this client (a wrong password, a
    missing database): the driver's error carries no SQLSTATE (the network failed), or one of
    class 08 (connection exception) or 57P (the server is shutting down or starting)."""
    if not is_connection_error(exc):
        return False
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        orig = getattr(current, "orig", None)
        if orig is not None:
            state = getattr(orig, "sqlstate", None) or getattr(orig, "pgcode", None)
            return state is None or str(state).startswith(("08", "57P"))
        current = current.__cause__ or current.__context__
    return False


def retry_while(
    attempt: Callable[[bool], Any],
    retryable: Callable[[BaseException], bool],
    retry_seconds: float,
    sleep: Callable[[float], None],
    failed: Callable[[BaseException, bool], None],
    recovered: Callable[[], None],
) -> Any:
    """``attempt(repeat)`` (``repeat``: whether an earlier attempt failed) until it returns,
    repeated after an error that ``retryable`` accepts, with pauses from 0.1 s doubling to
    2 s, for up to ``retry_seconds`` in all; then the last error propagates, as does any other
    error at once. ``failed(error, first)`` is told of each failure before its pause,
    ``recovered()`` when an attempt succeeds after failures."""
    deadline = time.monotonic() + retry_seconds
    pause = 0.1
    repeat = False
    while True:
        try:
            result = attempt(repeat)
        except Exception as exc:
            if not retryable(exc) or time.monotonic() + pause > deadline:
                raise
            failed(exc, not repeat)
            repeat = True
            sleep(pause)
            pause = min(2.0, pause * 2)
            continue
        if repeat:
            recovered()
        return result


def open_through_outage(
    open_storage: Callable[[], Any],
    name: str,
    retry_seconds: float = RETRY_SECONDS,
    sleep: Callable[[float], None] = time.sleep,
) -> Any:
    """``open_storage()``, repeated while the server cannot be reached (:func:`is_outage`),
    for up to ``retry_seconds``: a driver that opens a study on a database server while the
    server restarts waits for it, as its storage calls do. Any other error propagates at
    once."""

    def failed(exc: BaseException, first: bool) -> None:
        if first:
            logger.warning(
                "Storage %s cannot be reached (%s); retrying for up to %.0f s.",
                name,
                type(exc).__name__,
                retry_seconds,
            )

    return retry_while(
        lambda repeat: open_storage(),
        is_outage,
        retry_seconds,
        sleep,
        failed,
        lambda: logger.warning("Storage %s reachable again; opened it.", name),
    )


def _retried(method: str) -> Callable[..., Any]:
    """The storage method ``method``: the backend's, retried while the connection is lost."""

    def call(self: RetryingStorage, *args: Any, **kwargs: Any) -> Any:
        return self._call(method, *args, **kwargs)

    call.__name__ = method
    call.__doc__ = f"``backend.{method}``, retried while the connection is lost."
    return call


class RetryingStorage(BaseStorage):
    """``backend`` (an Optuna storage) with its calls retried while the connection is lost
    (see the module docstring). ``name`` is how messages call the storage (a URL with its
    password masked)."""

    def __init__(
        self,
        backend: BaseStorage,
        *,
        retry_seconds: float = RETRY_SECONDS,
        name: str = "storage",
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if (
            isinstance(retry_seconds, bool)
            or not isinstance(retry_seconds, (int, float))
            or not (retry_seconds >= 0)
        ):
            raise ValueError(f"retry_seconds must be a number >= 0, got {retry_seconds!r}")
        self.backend = backend
        self.retry_seconds = float(retry_seconds)
        self.name = name
        self._sleep = sleep
        self.retries = 0  # calls repeated after a lost connection (for tests and logs)
        self.twins_closed = 0  # trials a retried creation made twice, closed (for tests and logs)
        self._watch_engine()

    def _watch_engine(self) -> None:
        """Count the errors SQLAlchemy reports on the backend's engine, per thread, so a
        creation Optuna repeated inside one call is noticed (see the module docstring)."""
        self._errors = threading.local()
        engine = getattr(getattr(self.backend, "_backend", self.backend), "engine", None)
        try:
            from sqlalchemy import event
            from sqlalchemy.engine import Engine
        except ImportError:  # pragma: no cover - Optuna depends on SQLAlchemy
            return
        if isinstance(engine, Engine):
            event.listen(engine, "handle_error", self._count_error)

    def _count_error(self, context: Any) -> None:
        self._errors.n = getattr(self._errors, "n", 0) + 1

    def _error_count(self) -> int:
        return int(getattr(self._errors, "n", 0))

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        del state["_errors"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._watch_engine()  # the backend's engine is a new one after unpickling

    def __repr__(self) -> str:
        return f"RetryingStorage({self.name})"

    # Every abstract method of BaseStorage: the backend's, retried (create_new_trial and
    # set_trial_state_values below take more care).
    create_new_study = _retried("create_new_study")
    delete_study = _retried("delete_study")
    set_study_user_attr = _retried("set_study_user_attr")
    set_study_system_attr = _retried("set_study_system_attr")
    get_study_id_from_name = _retried("get_study_id_from_name")
    get_study_name_from_id = _retried("get_study_name_from_id")
    get_study_directions = _retried("get_study_directions")
    get_study_user_attrs = _retried("get_study_user_attrs")
    get_study_system_attrs = _retried("get_study_system_attrs")
    get_all_studies = _retried("get_all_studies")
    set_trial_param = _retried("set_trial_param")
    get_trial_id_from_study_id_trial_number = _retried("get_trial_id_from_study_id_trial_number")
    get_trial_number_from_id = _retried("get_trial_number_from_id")
    get_trial_param = _retried("get_trial_param")
    set_trial_intermediate_value = _retried("set_trial_intermediate_value")
    set_trial_user_attr = _retried("set_trial_user_attr")
    set_trial_system_attr = _retried("set_trial_system_attr")
    get_trial = _retried("get_trial")
    get_all_trials = _retried("get_all_trials")
    get_n_trials = _retried("get_n_trials")
    get_best_trial = _retried("get_best_trial")
    get_trial_params = _retried("get_trial_params")
    get_trial_user_attrs = _retried("get_trial_user_attrs")
    get_trial_system_attrs = _retried("get_trial_system_attrs")
    check_trial_is_updatable = _retried("check_trial_is_updatable")

    def remove_session(self) -> None:
        self.backend.remove_session()

    def __getattr__(self, attr: str) -> Any:
        # Anything else a storage has (Optuna internals, _CachedStorage's helpers): as is.
        if attr == "backend":  # not set yet (unpickling)
            raise AttributeError(attr)
        return getattr(self.backend, attr)

    def _call(
        self, method: str, *args: Any, on_retry: Callable[[], Any] | None = None, **kwargs: Any
    ) -> Any:
        """``backend.method(*args, **kwargs)``, repeated while the connection is lost.
        ``on_retry()``, called before each repeat, may return ``(True, result)`` to finish
        with ``result`` instead (the lost attempt turned out to have been committed)."""
        finished: list[bool] = [False]  # a repeat found the lost attempt committed

        def attempt(repeat: bool) -> Any:
            if repeat and on_retry is not None:
                done, result = on_retry()
                if done:
                    finished[0] = True
                    return result
            return getattr(self.backend, method)(*args, **kwargs)

        def failed(exc: BaseException, first: bool) -> None:
            if first:
                logger.warning(
                    "Storage %s: connection lost in %s (%s); retrying for up to %.0f s.",
                    self.name,
                    method,
                    type(exc).__name__,
                    self.retry_seconds,
                )
            self.retries += 1

        def recovered() -> None:
            if not finished[0]:
                logger.warning("Storage %s reachable again; %s went through.", self.name, method)

        return retry_while(
            attempt, is_connection_error, self.retry_seconds, self._sleep, failed, recovered
        )

    def create_new_trial(self, study_id: int, template_trial: FrozenTrial | None = None) -> int:
        # A template with system attributes (gradhpo's driver record; Optuna's fixed_params of
        # an enqueued trial) tells the trial this call made from most others; one with the
        # driver record (its heartbeat time) from every other, so only its twins are closed.
        findable = template_trial is not None and bool(template_trial.system_attrs)
        unique = findable and _DRIVER in template_trial.system_attrs  # type: ignore[union-attr]

        def made() -> list[FrozenTrial]:
            assert template_trial is not None
            return [
                t
                for t in self.backend.get_all_trials(study_id, deepcopy=False)
                if t.system_attrs == template_trial.system_attrs
                and t.user_attrs == template_trial.user_attrs
                and t.state == template_trial.state
            ]

        repeated = [False]

        def committed() -> tuple[bool, Any]:
            repeated[0] = True
            found = made() if findable else []
            return (True, found[0]._trial_id) if found else (False, None)

        errors = self._error_count()
        trial_id = self._call("create_new_trial", study_id, template_trial, on_retry=committed)
        if unique and (repeated[0] or self._error_count() != errors):
            self._close_twins([t for t in made() if t._trial_id != trial_id], trial_id)
        return trial_id

    def _close_twins(self, twins: list[FrozenTrial], trial_id: int) -> None:
        """Close the trials a repeated creation made besides ``trial_id`` (its first attempts
        were committed, only their answers were lost): FAIL + ``gradhpo:duplicate``, never
        run and not counted."""
        if not twins:
            return
        number = self.get_trial_number_from_id(trial_id)
        for twin in twins:
            self.set_trial_system_attr(
                twin._trial_id,
                _DUPLICATE,
                f"made twice by a trial creation repeated after a lost connection; trial "
                f"{number} is the one run",
            )
            try:
                self.set_trial_state_values(twin._trial_id, TrialState.FAIL)
            except UpdateFinishedTrialError:  # pragma: no cover - no one else has its id
                pass
            self.twins_closed += 1
            logger.warning(
                "Storage %s: trial %d was made twice (a creation repeated after a lost "
                "connection); closed it, not counted: trial %d is the one run.",
                self.name,
                twin.number,
                number,
            )

    def set_trial_state_values(self, trial_id: int, state: TrialState, values: Any = None) -> bool:
        repeated = [False]

        def mark() -> tuple[bool, Any]:
            repeated[0] = True
            return False, None

        try:
            return self._call(
                "set_trial_state_values", trial_id, state=state, values=values, on_retry=mark
            )
        except UpdateFinishedTrialError:
            # The lost attempt was committed: the trial already is in the state asked for.
            if repeated[0] and self.backend.get_trial(trial_id).state == state:
                return True
            raise
