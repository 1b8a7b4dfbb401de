"""A persistent Optuna study that lives in one run directory.

Layout of a study directory::

    study.db              Optuna RDB storage (SQLite; optuna-dashboard sqlite:///study.db)
    study.json            name, direction, sampler and pruner specs (for `gradhpo resume`)
    config.yaml           the resolved config (config-driven studies)
    sampler_state.json    RNG state of the sampler after the last fresh ask
    trials/<n>/           per-trial files: last/best checkpoints, history.json

What :class:`Study` adds to ``optuna.Study``:

* the sampler's random state is saved after every fresh ask and restored on load, so a resumed
  study continues the sampler's sequence instead of repeating it (optuna issue #3255);
* trials left RUNNING by a dead driver (killed process) are recovered: marked FAIL and their
  parameters enqueued again, with ``gradhpo:resume_from`` pointing at the dead trial so the
  objective can continue from its last checkpoint. Enqueued trials are asked without moving
  the sampler's random state, so recovery does not change what the sampler proposes next;
* ``optimize(objective, n_trials=N)`` counts *finished* trials in the study, not calls, so a
  resumed or shared study stops at exactly N finished trials.

A driver is identified by host, pid and a per-object token; a RUNNING trial is stale when its
driver's process is gone (same host), when it is this process but not a live Study object, or
when its heartbeat (written by the objective through :meth:`heartbeat`) is older than
``stale_after`` seconds.
"""

from __future__ import annotations

import json
import math
import os
import socket
import sqlite3
import time
import uuid
import weakref
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from gradhpo.config import ConfigError
from gradhpo.files import write_json
from gradhpo.search.samplers import (
    load_sampler_state,
    make_pruner,
    make_sampler,
    restore_sampler_rng_states,
    sampler_rng_states,
    save_sampler_state,
)

__all__ = ["Study", "create_study", "load_study", "is_retried", "FINISHED_STATES"]

#: States of trials that count towards ``n_trials``.
FINISHED_STATES = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
_RETRIED = "gradhpo:retried"
_SURPLUS = "gradhpo:surplus"
_DRIVER = "gradhpo:driver"
RESUME_FROM = "gradhpo:resume_from"
_LIVE_TOKENS: weakref.WeakValueDictionary[str, Study] = weakref.WeakValueDictionary()


def _sqlite_connection(path: Path) -> sqlite3.Connection:
    """One SQLite connection in WAL mode with ``synchronous=NORMAL``.

    With SQLite's defaults every commit waits for two fsyncs, which made 100 trivial trials
    take ~3 s here. WAL + NORMAL survives a killed process (committed transactions are in the
    log); only a power cut may lose the last commits. Readers (optuna-dashboard, a second
    driver) are not blocked by a writer in WAL mode. The generous busy timeout lets several
    drivers share one file."""
    conn = sqlite3.connect(path, timeout=60, check_same_thread=False)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    return conn


def _storage(directory: Path) -> optuna.storages.RDBStorage:
    path = directory / "study.db"
    return optuna.storages.RDBStorage(
        f"sqlite:///{path}", engine_kwargs={"creator": lambda: _sqlite_connection(path)}
    )


def is_retried(trial: optuna.trial.FrozenTrial) -> bool:
    """A trial that does not count: a dead trial whose parameters were enqueued again (its
    retry counts instead), or a surplus trial a driver asked while other drivers were already
    running the last ones (see :meth:`Study.optimize`)."""
    return trial.state == TrialState.FAIL and bool(
        trial.system_attrs.get(_RETRIED) or trial.system_attrs.get(_SURPLUS)
    )


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Study:
    """An Optuna study in a run directory (see module docstring). Create with
    :func:`create_study`, open again with :func:`load_study`.

    ``study.optuna`` is the underlying ``optuna.Study`` (trials, best_trial, dataframes,
    visualization); ``ask``/``tell`` and ``optimize`` mirror Optuna's.
    """

    def __init__(
        self,
        directory: Path,
        optuna_study: optuna.Study,
        *,
        stale_after: float = 600.0,
    ) -> None:
        self.directory = directory
        self.optuna = optuna_study
        self.sampler = optuna_study.sampler
        self.stale_after = float(stale_after)
        self.token = uuid.uuid4().hex
        self._unsaved: set[int] = set()  # fresh trials whose sampler state is not saved yet
        _LIVE_TOKENS[self.token] = self
        self._driver = {"host": socket.gethostname(), "pid": os.getpid(), "token": self.token}

    # ------------------------------------------------------------------ properties
    @property
    def name(self) -> str:
        return self.optuna.study_name

    @property
    def direction(self) -> str:
        return self.optuna.direction.name.lower()

    @property
    def sampler_state_path(self) -> Path:
        return self.directory / "sampler_state.json"

    def trial_dir(self, number: int) -> Path:
        return self.directory / "trials" / f"{number:04d}"

    def finished_trials(self) -> list[optuna.trial.FrozenTrial]:
        """Finished trials, without the dead ones that were retried under a new number."""
        return [
            t
            for t in self.optuna.get_trials(deepcopy=False, states=FINISHED_STATES)
            if not is_retried(t)
        ]

    @property
    def best_trial(self) -> optuna.trial.FrozenTrial | None:
        complete = [
            t
            for t in self.optuna.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
            if t.value is not None and math.isfinite(t.value)
        ]
        if not complete:
            return None
        sign = 1.0 if self.direction == "maximize" else -1.0
        # Fixed tie-break: the earlier trial wins.
        return max(complete, key=lambda t: (sign * t.value, -t.number))

    # ------------------------------------------------------------------ ask / tell
    def ask(self, *, waiting: bool | None = None) -> optuna.trial.Trial:
        """Ask a trial. Enqueued trials (retries, user-enqueued points) leave the sampler's
        random state untouched; after a fresh ask the state is saved to disk. ``waiting``
        says whether enqueued trials exist, if the caller already knows."""
        if waiting is None:
            waiting = bool(self.optuna.get_trials(deepcopy=False, states=(TrialState.WAITING,)))
        if waiting:
            snapshot = sampler_rng_states(self.sampler)
            trial = self.optuna.ask()
            restore_sampler_rng_states(self.sampler, snapshot)
        else:
            trial = self.optuna.ask()
            self._unsaved.add(trial._trial_id)
        self.heartbeat(trial)
        return trial

    def _save_sampler_state(self, trial: optuna.trial.Trial) -> None:
        """Save the sampler's state once a fresh trial has drawn its parameters: at its first
        heartbeat after the ask (objectives suggest first, then train) or at tell. Saving at
        the ask itself would be too early: most samplers draw inside ``suggest_*``."""
        if trial._trial_id in self._unsaved:
            self._unsaved.discard(trial._trial_id)
            save_sampler_state(self.sampler, self.sampler_state_path)

    def tell(
        self,
        trial: optuna.trial.Trial | int,
        value: float | None = None,
        state: TrialState | None = None,
    ) -> None:
        if isinstance(trial, optuna.trial.Trial):
            self._save_sampler_state(trial)
        self.optuna.tell(trial, value, state=state)

    def heartbeat(self, trial: optuna.trial.Trial) -> None:
        """Mark ``trial`` as alive and owned by this driver (call it every epoch or so)."""
        if trial._trial_id in self._unsaved and trial.params:
            self._save_sampler_state(trial)
        self.optuna._storage.set_trial_system_attr(
            trial._trial_id, _DRIVER, {**self._driver, "beat": time.time()}
        )

    def enqueue(
        self, params: Mapping[str, Any], user_attrs: Mapping[str, Any] | None = None
    ) -> None:
        self.optuna.enqueue_trial(
            dict(params), user_attrs=dict(user_attrs or {}), skip_if_exists=False
        )

    # ------------------------------------------------------------------ recovery
    def _is_stale(self, trial: optuna.trial.FrozenTrial) -> bool:
        driver = trial.system_attrs.get(_DRIVER)
        if not isinstance(driver, Mapping):
            # Asked outside a gradhpo Study (plain Optuna): only its age can tell.
            started = trial.datetime_start.timestamp() if trial.datetime_start else time.time()
            return time.time() - started > self.stale_after
        if time.time() - float(driver.get("beat", 0.0)) > self.stale_after:
            return True
        if driver.get("host") != socket.gethostname():
            return False
        if driver.get("pid") == os.getpid():
            return driver.get("token") not in _LIVE_TOKENS
        return not _pid_alive(int(driver.get("pid", -1)))

    def recover_stale_trials(self) -> list[int]:
        """Fail every stale RUNNING trial and enqueue its parameters again; returns the numbers
        of the recovered trials."""
        recovered = []
        storage = self.optuna._storage
        for trial in self.optuna.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            if not self._is_stale(trial):
                continue
            # Mark first (a finished trial takes no attributes), then fail it. Only FAIL +
            # retried counts as "retried", so if its driver finished it meanwhile, it stays counted.
            try:
                storage.set_trial_system_attr(trial._trial_id, _RETRIED, True)
                storage.set_trial_state_values(trial._trial_id, state=TrialState.FAIL)
            except optuna.exceptions.UpdateFinishedTrialError:
                continue
            origin = trial.user_attrs.get(RESUME_FROM, trial.number)
            self.enqueue(
                trial.params,
                {**trial.user_attrs, RESUME_FROM: origin, "gradhpo:retry_of": trial.number},
            )
            recovered.append(trial.number)
        return recovered

    # ------------------------------------------------------------------ optimize
    def optimize(
        self,
        objective: Callable[[optuna.trial.Trial], float],
        n_trials: int | None = None,
        *,
        timeout: float | None = None,
        catch: tuple[type[BaseException], ...] = (),
        callbacks: list[Callable[[Study, optuna.trial.FrozenTrial], None]] | None = None,
        progress: Any = None,
    ) -> list[int]:
        """Run trials until the study holds ``n_trials`` finished trials (or ``timeout``
        seconds passed in this call); returns the numbers of the trials this call ran. ``objective(trial)`` returns the value or raises
        ``optuna.TrialPruned``; exceptions listed in ``catch`` fail the trial and the study
        goes on, others fail the trial and propagate. ``progress`` is an optional tqdm bar."""
        if n_trials is None and timeout is None:
            raise ValueError("optimize: give n_trials or timeout (or both)")
        self.recover_stale_trials()
        deadline = None if timeout is None else time.monotonic() + timeout
        # Samplers that exhaust their space (grid, brute force) call optuna's Study.stop(),
        # which only works inside Optuna's own loop; this loop honours the same flag.
        self.optuna._stop_flag = False
        self.optuna._thread_local.in_optimize_loop = True
        ran: list[int] = []
        try:
            self._loop(objective, n_trials, deadline, catch, callbacks, progress, ran)
            return ran
        finally:
            self.optuna._thread_local.in_optimize_loop = False

    def _loop(
        self,
        objective: Callable[[optuna.trial.Trial], float],
        n_trials: int | None,
        deadline: float | None,
        catch: tuple[type[BaseException], ...],
        callbacks: list[Callable[[Study, optuna.trial.FrozenTrial], None]] | None,
        progress: Any,
        ran: list[int],
    ) -> None:
        while not self.optuna._stop_flag:
            trials = self.optuna.get_trials(deepcopy=False)
            done = sum(1 for t in trials if t.state in FINISHED_STATES and not is_retried(t))
            running = sum(1 for t in trials if t.state == TrialState.RUNNING)
            waiting = any(t.state == TrialState.WAITING for t in trials)
            if progress is not None:
                progress.n = done
                progress.refresh()
            if n_trials is not None and done >= n_trials:
                break
            if deadline is not None and time.monotonic() >= deadline:
                break
            if n_trials is not None and done + running >= n_trials and not waiting:
                # Other drivers are finishing the last trials: wait instead of overshooting.
                time.sleep(0.5)
                self.recover_stale_trials()
                continue
            trial = self.ask(waiting=waiting)
            if n_trials is not None and not waiting and self._surplus(trial, n_trials):
                continue
            self._run_one(objective, trial, catch)
            ran.append(trial.number)
            if callbacks:
                frozen = self.optuna._storage.get_trial(trial._trial_id)
                for callback in callbacks:
                    callback(self, frozen)

    def _surplus(self, trial: optuna.trial.Trial, n_trials: int) -> bool:
        """Several drivers can pass the "fewer than n" check at once. After the ask every
        trial is visible, so decide by trial number: a fresh trial runs only if the finished
        trials plus the running trials numbered below it leave room. Otherwise it is closed as
        FAIL + ``gradhpo:surplus`` (not counted, parameters never trained)."""
        trials = self.optuna.get_trials(deepcopy=False)
        done = sum(1 for t in trials if t.state in FINISHED_STATES and not is_retried(t))
        ahead = sum(1 for t in trials if t.state == TrialState.RUNNING and t.number < trial.number)
        if done + ahead < n_trials:
            return False
        storage = self.optuna._storage
        storage.set_trial_system_attr(trial._trial_id, _SURPLUS, True)
        self._unsaved.discard(trial._trial_id)
        storage.set_trial_state_values(trial._trial_id, state=TrialState.FAIL)
        return True

    def _run_one(
        self,
        objective: Callable[[optuna.trial.Trial], float],
        trial: optuna.trial.Trial,
        catch: tuple[type[BaseException], ...],
    ) -> None:
        try:
            value = objective(trial)
        except optuna.TrialPruned:
            self.tell(trial, state=TrialState.PRUNED)
            return
        except catch as exc:
            self.optuna._storage.set_trial_user_attr(
                trial._trial_id, "error", f"{type(exc).__name__}: {exc}"
            )
            self.tell(trial, state=TrialState.FAIL)
            return
        except (KeyboardInterrupt, SystemExit):
            # Leave it RUNNING: `resume` treats it like a killed driver and continues it.
            _LIVE_TOKENS.pop(self.token, None)
            raise
        except BaseException:
            self.tell(trial, state=TrialState.FAIL)
            raise
        if value is None or not math.isfinite(float(value)):
            self.optuna._storage.set_trial_user_attr(
                trial._trial_id, "error", f"non-finite value {value!r}"
            )
            self.tell(trial, state=TrialState.FAIL)
            return
        self.tell(trial, float(value))


def create_study(
    directory: str | os.PathLike[str],
    *,
    name: str | None = None,
    direction: str = "maximize",
    sampler: str | Mapping[str, Any] | optuna.samplers.BaseSampler = "tpe",
    pruner: str | Mapping[str, Any] | optuna.pruners.BasePruner | None = "median",
    seed: int | None = 0,
    max_resource: int | None = None,
    search_space: Any = None,
    stale_after: float = 600.0,
) -> Study:
    """Create a new study in ``directory`` (refuses an existing study there).

    ``sampler``/``pruner`` are names (see :data:`~gradhpo.search.samplers.SAMPLERS`),
    mappings with constructor arguments, or Optuna objects. Named specs are stored in
    ``study.json`` so :func:`load_study` can rebuild them; with objects, pass them again."""
    directory = Path(directory)
    if (directory / "study.db").exists():
        raise ConfigError(
            f"study directory {str(directory)!r} already holds a study; resume it instead"
        )
    if direction not in ("maximize", "minimize"):
        raise ConfigError(f"direction: expected 'maximize' or 'minimize', got {direction!r}")
    sampler_obj = make_sampler(sampler, search_space, seed=seed)
    pruner_obj = make_pruner(pruner, max_resource=max_resource)
    directory.mkdir(parents=True, exist_ok=True)
    name = name or directory.name
    meta = {
        "name": name,
        "direction": direction,
        "sampler": sampler if isinstance(sampler, (str, Mapping)) else None,
        "pruner": pruner if isinstance(pruner, (str, Mapping)) or pruner is None else None,
        "seed": seed,
        "max_resource": max_resource,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    study = optuna.create_study(
        storage=_storage(directory),
        study_name=name,
        direction=direction,
        sampler=sampler_obj,
        pruner=pruner_obj,
    )
    write_json(directory / "study.json", meta)
    return Study(directory, study, stale_after=stale_after)


def load_study(
    directory: str | os.PathLike[str],
    *,
    sampler: optuna.samplers.BaseSampler | None = None,
    pruner: optuna.pruners.BasePruner | None = None,
    search_space: Any = None,
    stale_after: float = 600.0,
) -> Study:
    """Open the study in ``directory`` with its sampler (rebuilt from ``study.json`` unless
    given) and the sampler's saved random state."""
    directory = Path(directory)
    meta_path = directory / "study.json"
    if not (directory / "study.db").is_file() or not meta_path.is_file():
        raise ConfigError(f"{str(directory)!r} is not a study directory (no study.db / study.json)")
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    if sampler is None:
        if meta.get("sampler") is None:
            raise ConfigError(
                f"{str(directory)!r} was created with a sampler object; pass sampler=..."
            )
        sampler = make_sampler(meta["sampler"], search_space, seed=meta.get("seed"))
    if pruner is None:
        pruner = make_pruner(meta.get("pruner"), max_resource=meta.get("max_resource"))
    study = optuna.load_study(
        study_name=meta["name"], storage=_storage(directory), sampler=sampler, pruner=pruner
    )
    load_sampler_state(sampler, directory / "sampler_state.json")
    return Study(directory, study, stale_after=stale_after)
