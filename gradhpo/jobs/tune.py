"""Config-driven studies: what ``gradhpo tune`` and ``gradhpo resume`` run.

A tune config is a train config (see :mod:`gradhpo.config`) plus a ``search`` section::

    search:
      space: {...}                 # see gradhpo.search.space
      sampler: tpe                 # or {name: tpe, n_startup_trials: 5}; see SAMPLERS
      pruner: median               # or {name: hyperband, reduction_factor: 3}; null for none
      metric: val_accuracy         # or val_loss (direction follows); a list for several
                                   # objectives, e.g. [val_accuracy, params] (below)
      directions: null             # optional; must be the directions the metric names give
      trials: 20                   # finished trials in the study
      timeout: null                # seconds per invocation
      cv_folds: null               # k >= 2: k-fold cross-validation inside each trial
      early_stopping: {patience: 3, min_delta: 0.0}   # or null
      seed: 0                      # sampler seed (default: training.seed)
      keep_checkpoints: best       # best: only the best trial's weights stay; all

Several objectives (a multi-objective study, Optuna's ``directions``): ``search.metric`` is a
list of :data:`OBJECTIVES`: exactly one of ``val_accuracy`` / ``val_loss`` (what each trial
trains for: its best epoch, early stopping, the checkpoint kept) and cheap properties of the
trial's model, ``params`` (parameter count, minimized) and ``latency_ms`` (forward time of
one eval batch on the trial's device, minimized: warm-up passes, then the median of
:data:`LATENCY_REPEATS` timed ones; it depends on the machine and its load). Directions
follow the names; ``search.directions``, when given, must say the same. Samplers: ``tpe``
(the default), ``nsga2``, ``random``, ``grid``, ``qmc``, ``gp``, ``bruteforce`` (``cmaes``
and ``evolution`` are single-objective). Optuna cannot prune a multi-objective study
(``Trial.report`` is single-objective), so ``search.pruner`` is refused unless null (a
multi-objective study has no pruner by default), and so is ``search.baseline`` (there is
no single best trial to compare). The end of the study evaluates every trial of the Pareto
front on the test set (the study's user attribute ``pareto_test``) and keeps their weights
(``keep_checkpoints: best`` keeps the Pareto front's); ``gradhpo export DIR --trial N``
exports one of them.

``training.epochs`` is the number of epochs of each trial. Inside a trial the continuous
hyperparameters named in ``tuner`` are adapted by hypergradient as in ``gradhpo train``; a
search parameter such as ``optimizer.lr`` then sets their starting value.

How trials end and what ``search.trials`` counts:

* ``search.trials`` is the number of *finished* trials the study holds at the end: complete,
  pruned and failed ones (a study must end even where some region of the space always
  fails). What they were is never left implicit: ``gradhpo tune`` / ``resume`` print
  "N of M trials finished: c complete, p pruned (d diverged), f failed" and how to run more,
  and :meth:`~gradhpo.search.Study.trial_counts` gives the same numbers.
* A diverged trial (non-finite training loss) is PRUNED with the reason in its user
  attribute ``diverged``, under every metric (:mod:`gradhpo.search.trial`).
* A study that learns nothing stops and says why (:class:`StudyFailed`, exit code 1): when
  its first ``SAME_FAILURE_STOP`` finished trials (or all of them, when fewer are asked for)
  failed with the same exception type (see :func:`same_failure`), the drivers stop after those
  trials; and a study that ends with finished trials but none complete fails as well.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import logging
import math
import os
import re
import shutil
import time
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import optuna
import torch
from tqdm import tqdm

from gradhpo.config import (
    STORAGE_ENV,
    ConfigError,
    check_executor,
    check_int,
    check_sizes,
    load_yaml,
    with_section,
)
from gradhpo.data import DataSplits
from gradhpo.execution import make_executor
from gradhpo.files import write_json
from gradhpo.jobs.rundir import check_output_dirs, create_run_dir, open_run_dir, run_dir_of
from gradhpo.models import count_parameters
from gradhpo.run import EarlyStopping, Epoch, TrainingRun, fit, resolve_device
from gradhpo.run.builder import build_run, load_job_data
from gradhpo.run.loop import METRICS, Direction, check_metric_fits, worst
from gradhpo.search.drivers import open_driver, run_drivers
from gradhpo.search.samplers import SAMPLERS, make_pruner, make_sampler
from gradhpo.search.space import SearchSpace
from gradhpo.search.study import (
    RESUME_FROM,
    Study,
    create_study,
    is_retried,
    load_study,
    mask_password,
)
from gradhpo.search.trial import prune_diverged
from gradhpo.tensorboard_logger import TensorBoardLogger

__all__ = [
    "LATENCY_REPEATS",
    "OBJECTIVES",
    "SAME_FAILURE_STOP",
    "SEARCH_DEFAULTS",
    "StudyFailed",
    "counts_line",
    "same_failure",
    "validate_tune_config",
    "ConfigObjective",
    "prepare_study",
    "evaluate_best",
    "evaluate_pareto",
    "forward_latency_ms",
    "objective_names",
    "selection_metric",
]

logger = logging.getLogger("gradhpo.search")

SEARCH_DEFAULTS: dict[str, Any] = {
    "space": None,
    "sampler": "tpe",
    "pruner": "median",
    "metric": "val_accuracy",
    "trials": 20,
    "timeout": None,
    "cv_folds": None,
    "early_stopping": None,
    "seed": None,
    "keep_checkpoints": "best",
    "executor": None,
    "baseline": False,
    "storage": None,
    "directions": None,
}

#: Objectives of ``search.metric`` and their directions: the training metrics (one of them
#: selects each trial's best epoch) and properties of the trial's model.
OBJECTIVES: dict[str, Direction] = {**METRICS, "params": "minimize", "latency_ms": "minimize"}
#: Samplers that cannot optimize several objectives.
SINGLE_OBJECTIVE_SAMPLERS = ("cmaes", "evolution")
#: Timed forward passes of ``latency_ms`` (after :data:`LATENCY_WARMUP` untimed ones).
LATENCY_REPEATS = 10
LATENCY_WARMUP = 3


#: A study whose first this many finished trials all failed for the same reason stops.
SAME_FAILURE_STOP = 3


class StudyFailed(RuntimeError):
    """A study that learned nothing: its first trials all failed for the same reason, or it
    ended with finished trials of which none completed. The message says why."""


def _same(reason: str) -> str:
    """What makes two failures "the same": the exception's type ("OSError: [Errno 28] ..."
    -> "OSError"; its text names each trial's own paths and parameters), or for other
    reasons (an objective's bad return value) the text with its numbers blanked."""
    match = re.match(r"([A-Za-z_][\w.]*): ", reason)
    return match.group(1) if match else re.sub(r"\d+", "#", reason)


def same_failure(study: Study, n_trials: int) -> str | None:
    """The error of the study's first trial when its first ``min(SAME_FAILURE_STOP,
    n_trials)`` finished trials (and every later one) failed for the same reason (the same
    exception type) and none completed or was pruned; ``None`` otherwise."""
    finished = sorted(study.finished_trials(), key=lambda t: t.number)
    k = min(SAME_FAILURE_STOP, n_trials)
    if len(finished) < k or any(t.state != optuna.trial.TrialState.FAIL for t in finished):
        return None
    reasons = [str(t.user_attrs.get("error", "unknown error")) for t in finished]
    if len({_same(r) for r in reasons}) != 1:
        return None
    return reasons[0]


def counts_line(counts: Mapping[str, int], asked: int) -> str:
    """The line "N of M trials finished: c complete, p pruned (d diverged), f failed" and, where
    the study holds fewer usable trials than asked, why and what to do."""
    text = (
        f"{counts['finished']} of {asked} trials finished: {counts['complete']} complete, "
        f"{counts['pruned']} pruned"
        + (f" ({counts['diverged']} diverged)" if counts["diverged"] else "")
        + f", {counts['failed']} failed"
    )
    if counts["failed"]:
        text += " (failed trials count toward the total; their errors are in `gradhpo report`)"
    if counts["finished"] < asked:
        text += f"; {asked - counts['finished']} not run"
    return text


def validate_tune_config(raw: Mapping[str, Any]) -> tuple[dict[str, Any], SearchSpace]:
    """Validate a tune config: the train sections plus ``search``. Returns the resolved
    config and its search space; every mistake is a ConfigError naming the field."""
    config, s = with_section(raw, "search", SEARCH_DEFAULTS, "gradhpo tune")
    s["metric"] = _check_objectives(s["metric"], s["directions"])
    if isinstance(s["metric"], list):
        _check_multi_objective(s, raw["search"])
    check_int("search.trials", s["trials"], 1)
    if s["timeout"] is not None:
        t = s["timeout"]
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not t > 0:
            raise ConfigError(
                f"search.timeout: expected a number of seconds > 0 or null, got {t!r}"
            )
    if s["cv_folds"] is not None:
        check_int("search.cv_folds", s["cv_folds"], 2)
        if "n_folds" in config["data"] or "fold" in config["data"]:
            raise ConfigError("search.cv_folds: cannot be combined with data.n_folds / data.fold")
    early = s["early_stopping"]
    if early is not None:
        if not isinstance(early, Mapping):
            raise ConfigError(
                f"search.early_stopping: expected {{patience: N}} or null, got {early!r}"
            )
        bad = sorted(set(early) - {"patience", "min_delta"})
        if bad:
            raise ConfigError(
                f"search.early_stopping: unknown key(s) {bad}; allowed: ['patience', 'min_delta']"
            )
        check_int("search.early_stopping.patience", early.get("patience"), 1)
        delta = early.get("min_delta", 0.0)
        if isinstance(delta, bool) or not isinstance(delta, (int, float)) or delta < 0:
            raise ConfigError(
                f"search.early_stopping.min_delta: expected a number >= 0, got {delta!r}"
            )
    s["seed"] = (
        config["training"]["seed"] if s["seed"] is None else check_int("search.seed", s["seed"], 0)
    )
    if s["keep_checkpoints"] not in ("best", "all"):
        raise ConfigError(
            f"search.keep_checkpoints: expected 'best' or 'all', got {s['keep_checkpoints']!r}"
        )
    if not isinstance(s["baseline"], bool):
        raise ConfigError(f"search.baseline: expected true or false, got {s['baseline']!r}")
    s["executor"] = check_executor("search.executor", s["executor"])
    s["storage"] = check_storage("search.storage", s["storage"])
    space = SearchSpace.from_config(s["space"])
    config["search"] = s
    return config, space


def _check_objectives(metric: Any, directions: Any) -> str | list[str]:
    """``search.metric`` as a name (one objective) or a list of two or more names, with
    exactly one training metric among them; ``search.directions`` (optional) must be the
    directions the names give."""
    if isinstance(metric, str):
        if metric not in METRICS:
            extra = (
                f"; {metric!r} is a model property, for a multi-objective study: "
                f"metric: [val_accuracy, {metric}]"
                if metric in OBJECTIVES
                else ""
            )
            raise ConfigError(
                f"search.metric: expected one of {list(METRICS)}, got {metric!r} (or a list of "
                f"objectives from {list(OBJECTIVES)} for a multi-objective study){extra}"
            )
        names = [metric]
    elif isinstance(metric, list) and metric:
        names = list(metric)
        for i, name in enumerate(names):
            if not isinstance(name, str) or name not in OBJECTIVES:
                raise ConfigError(
                    f"search.metric[{i}]: unknown objective {name!r}; expected one of "
                    f"{list(OBJECTIVES)}"
                )
        if len(set(names)) != len(names):
            raise ConfigError(f"search.metric: an objective is named twice in {names}")
        trained = [n for n in names if n in METRICS]
        if len(trained) != 1:
            raise ConfigError(
                f"search.metric: expected exactly one of {list(METRICS)} (what each trial "
                f"trains for) among the objectives, got {names}"
            )
    else:
        raise ConfigError(
            f"search.metric: expected one of {list(METRICS)} or a non-empty list of objectives "
            f"from {list(OBJECTIVES)}, got {metric!r}"
        )
    if directions is not None:
        wanted = [OBJECTIVES[n] for n in names]
        given = [directions] if isinstance(directions, str) else directions
        if given != wanted:
            raise ConfigError(
                f"search.directions: {directions!r} does not match the objectives {names}, "
                f"whose directions are {wanted} (or leave search.directions out)"
            )
    return names[0] if len(names) == 1 else names


def _check_multi_objective(s: dict[str, Any], given: Mapping[str, Any]) -> None:
    """What a multi-objective study cannot have: a pruner (Optuna's pruners read one
    reported value; ``Trial.report`` is single-objective), a single-objective sampler, a
    baseline (it compares one best trial). An unset pruner becomes null."""
    pruner = s["pruner"]
    if (
        "pruner" in given
        and pruner not in (None, "none")
        and not (isinstance(pruner, Mapping) and pruner.get("name") == "none")
    ):
        raise ConfigError(
            f"search.pruner: {_spec_text(pruner)} cannot prune a multi-objective study "
            f"(search.metric {s['metric']}): Optuna's pruners read one reported value per "
            "epoch; set search.pruner: null (early_stopping still works)"
        )
    s["pruner"] = None
    spec = s["sampler"]
    name = spec.get("name") if isinstance(spec, Mapping) else spec
    if name in SINGLE_OBJECTIVE_SAMPLERS:
        raise ConfigError(
            f"search.sampler: {name!r} optimizes one objective; a multi-objective study "
            f"(search.metric {s['metric']}) takes tpe, nsga2, random, grid, qmc, gp or "
            "bruteforce"
        )
    if s["baseline"] is True:
        raise ConfigError(
            "search.baseline: compares the best trial with the untuned default; a "
            f"multi-objective study (search.metric {s['metric']}) has a Pareto front instead"
        )


def objective_names(search: Mapping[str, Any]) -> list[str]:
    """The objectives of a validated ``search`` section, in order."""
    metric = search["metric"]
    return [metric] if isinstance(metric, str) else list(metric)


def selection_metric(search: Mapping[str, Any]) -> str:
    """The training metric of a validated ``search`` section: what each trial trains for
    (its best epoch, early stopping, pruning, the weights kept)."""
    return next(n for n in objective_names(search) if n in METRICS)


def directions_of(search: Mapping[str, Any]) -> list[Direction]:
    return [OBJECTIVES[n] for n in objective_names(search)]


def forward_latency_ms(
    run: TrainingRun, *, repeats: int = LATENCY_REPEATS, warmup: int = LATENCY_WARMUP
) -> float:
    """Milliseconds of one forward pass of ``run``'s model on one eval batch of its
    validation split (``training.eval_batch_size`` examples), on the run's device, in eval
    mode without gradients (under the run's autocast precision): ``warmup`` untimed passes,
    then the median of ``repeats`` timed ones (CUDA synchronized around each). The model's
    state is not changed (eval mode: no dropout draw, no BatchNorm statistics update)."""
    model = run.model
    x = run.data.val.x[: run.eval_batch_size]
    cuda = run.device.type == "cuda"
    dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(run.precision)
    was_training = model.training
    model.eval()
    times = []
    autocast = (
        torch.autocast(run.device.type, dtype=dtype)
        if dtype is not None
        else contextlib.nullcontext()
    )
    try:
        with torch.no_grad(), autocast:
            for _ in range(warmup):
                model(x)
            for _ in range(repeats):
                if cuda:
                    torch.cuda.synchronize(run.device)
                start = time.perf_counter()
                model(x)
                if cuda:
                    torch.cuda.synchronize(run.device)
                times.append(time.perf_counter() - start)
    finally:
        model.train(was_training)
    times.sort()
    middle = len(times) // 2
    median = times[middle] if len(times) % 2 else (times[middle - 1] + times[middle]) / 2
    return 1000.0 * median


def model_property(name: str, run: TrainingRun) -> float:
    """The value of a model-property objective (``params``, ``latency_ms``) for ``run``."""
    if name == "params":
        return float(count_parameters(run.model))
    if name == "latency_ms":
        return forward_latency_ms(run)
    raise ValueError(f"unknown model property {name!r}")


def check_storage(field: str, value: Any) -> str | None:
    """``search.storage``: null or ``journal`` (the study directory's journal file),
    ``sqlite`` (a file there), or an Optuna storage URL without a password. A password would be
    written into the study's config.yaml: it goes on the command line (``--storage``) or in
    ``$GRADHPO_STORAGE`` instead."""
    if value is None or value in ("journal", "sqlite"):
        return value
    if not isinstance(value, str) or "://" not in value:
        raise ConfigError(
            f"{field}: expected null, 'journal', 'sqlite' or a storage URL such as "
            f"'postgresql://user@host/db', got {value!r}"
        )
    if mask_password(value) != value:
        raise ConfigError(
            f"{field}: {mask_password(value)!r} has a password, which would be written into "
            f"the study's config.yaml; give the URL with --storage or ${STORAGE_ENV} instead"
        )
    return value


#: A new study's tuner fits its hypergradients on this share of the training split
#: (``tuner.hyper_val_fraction``) unless the config says otherwise.
HYPER_VAL_FRACTION = 0.1


def with_hyper_validation(config: dict[str, Any]) -> dict[str, Any]:
    """A new study's config with ``tuner.hyper_val_fraction`` defaulted: trials are selected
    on the validation split, so the tuner's objective must not be that split (a config can
    set the key to null to use it anyway). Studies made before the default keep their stored
    config as it is, so they resume exactly."""
    tuner = config.get("tuner")
    if (
        isinstance(tuner, Mapping)
        and tuner.get("objective", "val") == "val"
        and "hyper_val_fraction" not in tuner
    ):
        config = {**config, "tuner": {**tuner, "hyper_val_fraction": HYPER_VAL_FRACTION}}
    return config


def load_folds(config: Mapping[str, Any]) -> list[DataSplits]:
    """The data once per study: one DataSplits, or one per cross-validation fold."""
    return load_job_data(config, config["search"]["cv_folds"])


class ConfigObjective:
    """The trial objective of a config-driven study.

    Builds the run(s) from the sampled choices, trains epoch by epoch (all CV folds in
    lockstep so the pruner sees the mean over folds each epoch), reports the metric to Optuna,
    checkpoints every epoch (``trials/<n>/last_<fold>.pt``) and the best epoch
    (``best_<fold>.pt``), logs to TensorBoard, and returns the best epoch's metric.
    """

    def __init__(
        self,
        study: Study,
        config: Mapping[str, Any],
        space: SearchSpace,
        folds: list[DataSplits],
        *,
        progress: bool = False,
    ) -> None:
        self.study = study
        self.config = config
        self.space = space
        self.folds = folds
        self.search = config["search"]
        self.objectives = objective_names(self.search)
        self.metric = selection_metric(self.search)  # what each trial trains for
        self.multi = len(self.objectives) > 1  # no pruning: Trial.report is single-objective
        self.maximize = METRICS[self.metric] == "maximize"
        self.epochs = config["training"]["epochs"]
        self.tb_root = Path(config["output"]["tensorboard_dir"]) / study.name
        self.progress = progress

    def build_runs(self, params: Mapping[str, Any]) -> list[TrainingRun]:
        run_config = self.space.apply(self.config, params)
        return [build_run(run_config, data=fold, where="trial") for fold in self.folds]

    def __call__(self, trial: optuna.trial.Trial) -> float | tuple[float, ...]:
        params = self.space.suggest(trial)
        self.study.heartbeat(trial)  # also saves the sampler state now that params are drawn
        self.study.claim(trial)  # a proposal another trial holds is not evaluated twice
        runs = self.build_runs(params)
        tdir = self.study.trial_dir(trial.number)
        tdir.mkdir(parents=True, exist_ok=True)
        early = None
        if self.search["early_stopping"] is not None:
            es = self.search["early_stopping"]
            early = EarlyStopping(
                es["patience"],
                min_delta=es.get("min_delta", 0.0),
                mode="max" if self.maximize else "min",
            )

        history: list[dict[str, Any]] = []
        best: float | None = None
        start_epoch = 0
        origin = trial.user_attrs.get(RESUME_FROM)
        if origin is not None:
            start_epoch, history, best = self._resume(trial, runs, tdir, origin, early)

        k = len(runs)
        names = [f"fold_{i}" for i in range(k)] if k > 1 else [""]
        loggers = [TensorBoardLogger(self.tb_root / f"trial_{trial.number:04d}" / n) for n in names]

        def checkpoint(epoch: Epoch) -> None:
            """best_<fold>.pt at the best epoch, last_<fold>.pt and progress.json each epoch
            (what a retried trial continues from); nothing for a diverged epoch.

            progress.json is the commit: it names each fold's step, and until it is written
            the previous last_<fold>.pt is kept as prev_<fold>.pt, so a kill anywhere in
            between leaves, for every fold, the checkpoint the progress file names."""
            if epoch.diverged:
                return
            history.append({"epoch": epoch.epoch, "value": epoch.value, "folds": epoch.records})
            for i, run in enumerate(runs):
                if epoch.improved:
                    run.save(tdir / f"best_{i}.pt")
                last = tdir / f"last_{i}.pt"
                if last.is_file():
                    os.replace(last, tdir / f"prev_{i}.pt")
                run.save(last)
            write_json(
                tdir / "progress.json",
                {
                    "epoch": epoch.epoch,
                    "steps": [run.global_step for run in runs],
                    "best": epoch.best,
                    "history": history,
                    "early": early.state_dict() if early else None,
                },
            )

        def report(epoch: Epoch) -> None:
            self.study.heartbeat(trial)
            if epoch.diverged or self.multi:
                return  # diverged: the trial ends as such below; no made-up value is reported
            trial.report(epoch.value, epoch.epoch)
            if not stopping[0] and trial.should_prune():
                self._finish_logs(loggers, trial, params, runs, epoch.best)
                raise optuna.TrialPruned(
                    f"pruned at epoch {epoch.epoch} ({self.metric}={epoch.value:.4f})"
                )

        stopping = [False]

        def early_stop(epoch: Epoch) -> bool:
            stopping[0] = early is not None and early(epoch)
            return stopping[0]

        bar = None
        if self.progress:
            bar = tqdm(
                total=self.epochs,
                initial=start_epoch,
                desc=f"trial {trial.number}",
                unit="epoch",
                leave=False,
            )
        try:
            done = fit(
                runs,
                self.epochs,
                metric=self.metric,
                start_epoch=start_epoch,
                best=best,
                hooks=[early_stop, checkpoint, report],
                loggers=loggers,
                progress=bar,
            )
        finally:
            if bar is not None:
                bar.close()
        trial.set_user_attr("hyperparameters", runs[0].hyperparameters)
        trial.set_user_attr("epochs", len(history))
        if done and done[-1].diverged:
            self._finish_logs(loggers, trial, params, runs, best)
            prune_diverged(trial, done[-1].epoch)
        if done:
            best = done[-1].best
        self._finish_logs(loggers, trial, params, runs, best)
        value = worst(self.metric) if best is None else best
        if not self.multi:
            return value
        # The other objectives: properties of the trial's model (the same in every fold).
        values = {
            name: value if name == self.metric else model_property(name, runs[0])
            for name in self.objectives
        }
        trial.set_user_attr("objectives", values)
        return tuple(values[name] for name in self.objectives)

    def _resume(
        self,
        trial: optuna.trial.Trial,
        runs: list[TrainingRun],
        tdir: Path,
        origin: int,
        early: EarlyStopping | None,
    ) -> tuple[int, list[dict[str, Any]], float | None]:
        """Continue a trial whose driver died: load its last checkpoints and history, report
        the finished epochs again to this trial. Starts from scratch when nothing was saved,
        or when what was saved cannot be read (a warning names the file)."""
        # The dead trial may itself have been a retry: its own progress is the newest.
        retry_of = trial.user_attrs.get("gradhpo:retry_of", origin)
        for number in dict.fromkeys((retry_of, origin)):
            old = self.study.trial_dir(int(number))
            progress_file = old / "progress.json"
            if not progress_file.is_file():
                continue
            if not all(
                (old / f"last_{i}.pt").is_file() or (old / f"prev_{i}.pt").is_file()
                for i in range(len(runs))
            ):
                continue
            try:
                progress = json.loads(progress_file.read_text(encoding="utf-8"))
                history = list(progress["history"])
                states = [_checkpoint_at(old, i, progress.get("steps")) for i in range(len(runs))]
                for run, state in zip(runs, states, strict=True):
                    run.load_state_dict(state)
            except Exception as exc:  # noqa: BLE001 - any damage: the trial starts over
                logger.warning(
                    "Trial %d: cannot continue from trial %d's files in %s (%s: %s); it "
                    "starts from scratch.",
                    trial.number,
                    int(number),
                    old,
                    type(exc).__name__,
                    exc,
                )
                runs[:] = self.build_runs(self.space.suggest(trial))
                continue
            for i in range(len(runs)):
                if (old / f"best_{i}.pt").is_file() and old != tdir:
                    shutil.copy2(old / f"best_{i}.pt", tdir / f"best_{i}.pt")
            for record in history if not self.multi else ():
                trial.report(record["value"], record["epoch"])
            if early is not None and progress.get("early"):
                early.load_state_dict(progress["early"])
            trial.set_user_attr("gradhpo:resumed_at_epoch", int(progress["epoch"]))
            return int(progress["epoch"]), history, progress["best"]
        return 0, [], None

    def _finish_logs(
        self,
        loggers: list[TensorBoardLogger],
        trial: optuna.trial.Trial,
        params: Mapping[str, Any],
        runs: list[TrainingRun],
        best: float | None,
    ) -> None:
        flat = {k: (str(v) if isinstance(v, list) else v) for k, v in params.items()}
        for tb, run in zip(loggers, runs, strict=True):
            hp = {**flat, **{f"final/{k}": v for k, v in run.hyperparameters.items()}}
            tb.hparams(hp, {f"best_{self.metric}": worst(self.metric) if best is None else best})
            tb.close()


def kept_trials(study: Study) -> list[optuna.trial.FrozenTrial]:
    """The trials whose weights the end of the study evaluates (and ``keep_checkpoints:
    best`` keeps): the best trial, or every trial of a multi-objective study's Pareto
    front."""
    if study.is_multi_objective:
        return sorted(study.best_trials, key=lambda t: t.number)
    best = study.best_trial
    return [] if best is None else [best]


def _checkpoint_at(tdir: Path, fold: int, steps: list[int] | None) -> dict[str, Any]:
    """Fold ``fold``'s checkpoint in ``tdir`` at the step progress.json names: last_<fold>.pt,
    or prev_<fold>.pt when a kill came after the next epoch's checkpoint but before its
    progress file (a progress file without steps, from before they were recorded: last)."""
    for name in (f"last_{fold}.pt", f"prev_{fold}.pt"):
        path = tdir / name
        if not path.is_file():
            continue
        state = torch.load(path, map_location="cpu", weights_only=True)
        if steps is None or int(state["step"]) == int(steps[fold]):
            return state
    raise ValueError(
        f"no checkpoint of fold {fold} at step {steps[fold] if steps else '?'} "
        "(last_/prev_ files of another epoch)"
    )


def _cleanup_checkpoints(study: Study, keep: str) -> None:
    """After each trial: unfinished trials keep ``last_*``; finished ones drop it; with
    ``keep == "best"`` only the best trial (the Pareto front of a multi-objective study)
    keeps its ``best_*`` weights."""
    kept = {t.number for t in kept_trials(study)}
    trials = study.optuna.get_trials(deepcopy=False)
    unfinished = (optuna.trial.TrialState.RUNNING, optuna.trial.TrialState.WAITING)
    # A dead trial's files are the starting point of its pending retry: keep them until then.
    retries_pending = any(t.state in unfinished for t in trials)
    for trial in trials:
        if trial.state in unfinished:
            continue
        if is_retried(trial) and retries_pending:
            continue
        tdir = study.trial_dir(trial.number)
        if not tdir.is_dir():
            continue
        for f in [*tdir.glob("last_*.pt"), *tdir.glob("prev_*.pt")]:
            f.unlink(missing_ok=True)
        if keep == "best" and trial.number not in kept:
            for f in tdir.glob("best_*.pt"):
                f.unlink(missing_ok=True)


def _best_run(
    study: Study, best: optuna.trial.FrozenTrial, fold: int, data: DataSplits, device: Any
) -> TrainingRun:
    """The best trial's best-epoch run of ``fold``; a missing or unreadable checkpoint is a
    ConfigError naming the file (checked on resume before anything runs, and at the end)."""
    path = study.trial_dir(best.number) / f"best_{fold}.pt"
    fix = "restore the file, or run `gradhpo report` for the validation results"
    if not path.is_file():
        raise ConfigError(
            f"{str(path)!r}: missing: trial {best.number}'s best-epoch weights are gone, so "
            f"its test accuracy cannot be measured; {fix}"
        )
    try:
        return TrainingRun.from_checkpoint(path, data=data, device=device)
    except Exception as exc:  # noqa: BLE001 - a damaged file: say which and what to do
        first = str(exc).splitlines()[0] if str(exc) else ""
        raise ConfigError(
            f"{str(path)!r}: unreadable checkpoint of trial {best.number} "
            f"({type(exc).__name__}: {first}); {fix}"
        ) from exc


def _test_summary(
    study: Study,
    trial: optuna.trial.FrozenTrial,
    config: Mapping[str, Any],
    folds: list[DataSplits],
) -> dict[str, Any]:
    """Test-set figures of ``trial``'s best-epoch weights (mean over CV folds)."""
    results = [
        _best_run(study, trial, i, fold, config["training"]["device"]).evaluate("test")
        for i, fold in enumerate(folds)
    ]
    return {
        "trial": trial.number,
        "params": trial.params,
        "hyperparameters": trial.user_attrs.get("hyperparameters", {}),
        "test_accuracy": _mean_accuracy(results),
        "test_loss": sum(r["loss"] for r in results) / len(results),
        # The weights evaluated: its best epoch, one file per fold (`gradhpo export` reads them).
        "checkpoints": [
            str(study.trial_dir(trial.number) / f"best_{i}.pt") for i in range(len(folds))
        ],
    }


def evaluate_best(
    study: Study, config: Mapping[str, Any], folds: list[DataSplits]
) -> dict[str, Any] | None:
    """Test-set evaluation of the best trial only (its best-epoch weights; mean over CV folds).
    Stored as the study's user attribute ``best_test`` and returned. A multi-objective
    study: :func:`evaluate_pareto`."""
    if study.is_multi_objective:
        return evaluate_pareto(study, config, folds)
    best = study.best_trial
    if best is None:
        return None
    summary = _test_summary(study, best, config, folds)
    summary = {
        "trial": best.number,
        "metric": config["search"]["metric"],
        "value": best.value,
        **summary,
    }
    study.optuna.set_user_attr("best_test", summary)
    return summary


def evaluate_pareto(
    study: Study, config: Mapping[str, Any], folds: list[DataSplits]
) -> dict[str, Any] | None:
    """A multi-objective study's end: every trial of the Pareto front evaluated on the test
    set as :func:`evaluate_best` evaluates the best trial. The list (by trial number; each
    entry ``trial``, ``values`` by objective name, ``params``, ``hyperparameters``,
    ``test_accuracy``, ``test_loss``, ``checkpoints``) is stored as the study's user
    attribute ``pareto_test``; returns ``{"objectives", "directions", "pareto"}`` (None
    while no trial completed)."""
    front = kept_trials(study)
    if not front:
        return None
    names = objective_names(config["search"])
    pareto = [
        {
            "trial": t.number,
            "values": dict(zip(names, t.values, strict=True)),
            **{k: v for k, v in _test_summary(study, t, config, folds).items() if k != "trial"},
        }
        for t in front
    ]
    study.optuna.set_user_attr("pareto_test", pareto)
    return {"objectives": names, "directions": directions_of(config["search"]), "pareto": pareto}


def _mean_accuracy(results: list[dict[str, float]]) -> float | None:
    """Mean test accuracy over folds; None without class labels (a regression loss)."""
    if any("accuracy" not in r for r in results):
        return None
    return sum(r["accuracy"] for r in results) / len(results)


def train_baseline(config: Mapping[str, Any], data: DataSplits, seconds: float) -> dict[str, Any]:
    """The untuned default beside a study: the config's own model and optimizer sections (no
    search space applied, no hypergradient tuner), trained on the same data for the same
    wall-clock ``seconds`` as the study (whole epochs, at least one); the epoch with the best
    validation metric is evaluated on the test set, as the study's best trial is."""
    metric = selection_metric(config["search"])
    run = build_run({**config, "tuner": None}, data=data, where="baseline")
    start = time.perf_counter()
    best_state: dict[str, Any] = {}

    def keep_best(epoch: Epoch) -> bool:
        if epoch.improved and not epoch.diverged:
            best_state.update(run.state_dict())
        return time.perf_counter() - start >= seconds

    history = fit([run], 10**9, metric=metric, hooks=[keep_best])
    elapsed = time.perf_counter() - start
    if best_state:
        run.load_state_dict(best_state)
    test = run.evaluate("test") if best_state else {"loss": math.nan}
    return {
        "budget": seconds,
        "seconds": elapsed,
        "epochs": len(history),
        "steps": run.global_step,
        "value": history[-1].best if history else worst(metric),
        "test_accuracy": test.get("accuracy", 0.0 if run.data.classification else None),
        "test_loss": test["loss"],
    }


def prepare_study(
    config_path: str | os.PathLike[str] | None = None,
    *,
    raw: Mapping[str, Any] | None = None,
    resume_dir: str | os.PathLike[str] | None = None,
    storage: str | None = None,
) -> tuple[Study, dict[str, Any], SearchSpace, list[DataSplits]]:
    """Validate everything, load the data, pre-flight check the space, then create (or open)
    the study directory. Nothing is written before every check has passed.

    ``storage`` (a URL, e.g. with a password, from the command line) takes the place of
    ``search.storage``; it is not written anywhere (study.json keeps it masked)."""
    if resume_dir is not None:
        resume_dir = Path(resume_dir)
        _, raw = open_run_dir(resume_dir, "study")
    elif raw is None:
        raw = load_yaml(config_path)  # type: ignore[arg-type]
    config, space = validate_tune_config(raw)
    if resume_dir is None:
        config = with_hyper_validation(config)
    folds = load_folds(config)
    _preflight(config, space, folds[0])
    s = config["search"]
    storage = storage or s["storage"]
    if resume_dir is not None:
        try:
            study = load_study(resume_dir, storage=storage, search_space=space)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        for kept in kept_trials(study):  # what the end of the run evaluates must load now
            for i, fold in enumerate(folds):
                _best_run(study, kept, i, fold, "cpu")
        return study, config, space, folds
    directory = run_dir_of(config)

    def new_study(tmp: Path) -> None:
        made = create_study(
            tmp,
            name=config["name"],
            directions=directions_of(s),
            sampler=s["sampler"],
            pruner=s["pruner"],
            seed=s["seed"],
            max_resource=config["training"]["epochs"],
            search_space=space,
            storage=storage,
        )
        if made.is_multi_objective:  # names for `gradhpo report` and optuna-dashboard
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                made.optuna.set_metric_names(objective_names(s))

    try:
        create_run_dir(directory, "study", config, populate=new_study)
    except ValueError as exc:  # the storage cannot be opened (the message masks a password)
        raise ConfigError(f"search.storage: {exc}") from None
    study = load_study(directory, storage=storage, search_space=space)
    return study, config, space, folds


def _preflight(config: Mapping[str, Any], space: SearchSpace, data: DataSplits) -> None:
    """Exercise, without writing anything, what every trial will do, so that a mistake that
    would fail every trial is one config error now rather than N failed trials later:
    the output folders can be made (``output.dir``, ``output.tensorboard_dir``), the device
    exists, the sampler and pruner run a short dry study (:func:`dry_run_search`), and a run
    builds (on the CPU, no training) at the base point and at every corner value of every
    parameter (an unknown model, a bad choice, an optimizer/tuner mismatch, a size over the
    limits)."""
    check_output_dirs(config)
    try:
        resolve_device(config["training"]["device"])
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"training.device: {exc}") from exc
    try:
        check_metric_fits(selection_metric(config["search"]), data, "search.metric")
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    dry_run_search(config, space)
    for label, params in space.corner_params():
        where = "config" if label == "base point" else label
        corner = space.apply(config, params)
        check_sizes(corner, where)
        build_run(corner, data=data, device="cpu", where=where)


#: Most trials of the pre-flight's dry study (enough to leave the start-up phase of every
#: sampler with its default settings: NSGA-II's population of 50 is the largest).
DRY_RUN_TRIALS = 60
_STARTUP_ARGS = ("n_startup_trials", "population_size")


def _dry_trials(spec: Any, cls: type) -> int:
    """Trials the dry study runs: past the sampler's start-up phase (the model-based phase,
    e.g. CMA-ES after its first trial, reads arguments the start-up phase never touches)."""
    given = spec if isinstance(spec, Mapping) else {}
    params = inspect.signature(cls).parameters
    startup = 1
    for name in _STARTUP_ARGS:
        value = given.get(name, params[name].default if name in params else None)
        if isinstance(value, int) and not isinstance(value, bool):
            startup = max(startup, value)
    return min(startup + 2, DRY_RUN_TRIALS)


def dry_run_search(config: Mapping[str, Any], space: SearchSpace) -> None:
    """Run the configured sampler and pruner on a throw-away in-memory study (no training:
    made-up values, a few reported epochs per trial), so that an argument of the wrong type
    (``n_startup_trials: x``) or an invalid value the constructor does not check (CMA-ES
    ``sigma0: x``) is a ConfigError naming ``search.sampler`` / ``search.pruner`` instead of
    an exception in every trial."""
    s = config["search"]
    epochs = config["training"]["epochs"]
    spec = s["sampler"]
    name = spec.get("name") if isinstance(spec, Mapping) else spec
    n = _dry_trials(spec, SAMPLERS[name]) if name in SAMPLERS else 3
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            sampler = make_sampler(spec, space, seed=s["seed"])
            pruner = make_pruner(s["pruner"], max_resource=epochs)
            multi = isinstance(s["metric"], list)
            study = optuna.create_study(directions=directions_of(s), sampler=sampler, pruner=pruner)
            # Samplers that exhaust a grid call study.stop(), legal only inside optimize.
            study._thread_local.in_optimize_loop = True
            for i in range(n + 3):
                value = ((i * 7919) % 97) / 97.0
                field = "search.sampler"
                try:
                    trial = study.ask()
                    space.suggest(trial)
                    field = "search.pruner"
                    pruned = False
                    for epoch in range(min(epochs, 3) if not multi else 0):
                        trial.report(value + 0.01 * epoch, epoch)
                        # The first n trials complete (the sampler leaves its start-up
                        # phase on complete trials); the last ones take the pruner's word.
                        if trial.should_prune() and i >= n:
                            pruned = True
                            break
                    field = "search.sampler"
                    state = optuna.trial.TrialState.PRUNED if pruned else None
                    # Made-up values; a multi-objective study's others vary against the first.
                    told = [value, ((i * 31) % 13) / 13.0, ((i * 17) % 11) / 11.0][
                        : len(study.directions)
                    ]
                    study.tell(trial, None if pruned else (told if multi else value), state=state)
                except ConfigError:
                    raise
                except Exception as exc:  # noqa: BLE001 - whatever a trial would meet
                    raise ConfigError(
                        f"{field}: {_spec_text(s[field.split('.')[1]])} fails in a dry run of "
                        f"the study (trial {i}): {type(exc).__name__}: {exc}"
                    ) from exc
                if study._stop_flag:
                    break
    finally:
        optuna.logging.set_verbosity(verbosity)


def _spec_text(spec: Any) -> str:
    return repr(dict(spec)) if isinstance(spec, Mapping) else repr(spec)


def run_trials(
    study: Study,
    config: Mapping[str, Any],
    space: SearchSpace,
    folds: list[DataSplits],
    *,
    trials: int | None = None,
    timeout: float | None = None,
    progress: bool = True,
) -> list[int]:
    """Run (or continue) trials in this process until the study holds ``trials`` finished
    ones; returns the numbers of the trials this call finished. Failed trials are recorded
    with their error and the study goes on, unless every trial so far failed for the same
    reason (:func:`same_failure`): then the driver stops and :func:`run_study` raises."""
    s = config["search"]
    n_trials = trials if trials is not None else s["trials"]
    timeout = timeout if timeout is not None else s["timeout"]
    objective = ConfigObjective(study, config, space, folds, progress=progress)
    finished: list[int] = []

    def after_trial(st: Study, frozen: optuna.trial.FrozenTrial) -> None:
        finished.append(frozen.number)  # a failure is logged once by the study (gradhpo.search)
        _cleanup_checkpoints(st, s["keep_checkpoints"])
        if frozen.state == optuna.trial.TrialState.FAIL and same_failure(st, n_trials):
            st.stop()  # every trial so far failed the same way: run_study says why

    with tqdm(
        total=n_trials, desc=f"{study.name} trials", unit="trial", disable=not progress or None
    ) as bar:
        study.optimize(
            objective,
            n_trials=n_trials,
            timeout=timeout,
            catch=(Exception,),
            callbacks=[after_trial],
            progress=bar,
        )
    _cleanup_checkpoints(study, s["keep_checkpoints"])
    return finished


def run_study(
    study: Study,
    config: Mapping[str, Any],
    space: SearchSpace,
    folds: list[DataSplits],
    *,
    trials: int | None = None,
    timeout: float | None = None,
    progress: bool = True,
    storage: str | None = None,
) -> dict[str, Any] | None:
    """Run the study to ``trials`` finished trials — in this process, or with
    ``search.executor`` on several local processes or Ray workers, each a driver of the shared
    study — then evaluate the best trial on the test set. The summary holds ``counts``
    (:meth:`~gradhpo.search.Study.trial_counts` and ``asked``; also the study's user
    attribute ``counts``). :class:`StudyFailed` when the study learned nothing (module
    docstring)."""
    s = config["search"]
    executor = s.get("executor") or {"name": "serial"}
    n_trials = trials if trials is not None else s["trials"]
    start = time.perf_counter()
    if executor.get("name", "serial") == "serial" and executor.get("workers", 1) == 1:
        run_trials(study, config, space, folds, trials=trials, timeout=timeout, progress=progress)
    else:
        spec = {k: v for k, v in executor.items() if k != "workers"}
        workers = executor.get("workers", 1)
        with make_executor(
            {**spec, "workers": workers} if spec["name"] != "serial" else spec
        ) as ex:
            run_drivers(
                config_study_worker,
                study.directory,
                dict(config),
                ex,
                workers=workers,
                n_trials=n_trials,
                timeout=timeout if timeout is not None else s["timeout"],
                storage=storage,
            )
    counts = study.trial_counts()
    study.optuna.set_user_attr("counts", {**counts, "asked": n_trials})
    reason = same_failure(study, n_trials)
    if reason is not None:
        raise StudyFailed(
            f"{study.name}: stopped: the first {min(SAME_FAILURE_STOP, n_trials)} trial(s) all "
            f"failed with the same error: {reason}"
        )
    if counts["finished"] and not counts["complete"]:
        raise StudyFailed(f"{study.name}: no trial completed ({counts_line(counts, n_trials)})")
    summary = evaluate_best(study, config, folds)
    if summary is not None:
        summary["counts"] = {**counts, "asked": n_trials}
        summary["seconds"] = time.perf_counter() - start
        if s["baseline"]:
            summary["baseline"] = train_baseline(config, folds[0], summary["seconds"])
            study.optuna.set_user_attr("baseline", summary["baseline"])
    return summary


def config_study_worker(
    directory: str,
    config: Mapping[str, Any],
    n_trials: int,
    timeout: float | None,
    worker: int = 0,
    workers: int = 1,
    storage: str | None = None,
) -> dict[str, Any]:
    """Executor worker: one driver of the config-driven study in ``directory``, run to
    ``n_trials`` finished trials. ``config`` is the driver's already validated and
    pre-flighted config (plain data, so it pickles): the worker only opens the study and
    loads its data (``storage``: the study's URL when study.json cannot name it)."""
    space = SearchSpace.from_config(config["search"]["space"])
    study = open_driver(directory, worker, workers, storage, search_space=space)
    folds = load_job_data(config, config["search"]["cv_folds"], cached=True)
    ran = run_trials(study, config, space, folds, trials=n_trials, timeout=timeout, progress=False)
    return {"pid": os.getpid(), "trials": ran}
