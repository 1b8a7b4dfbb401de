"""Config-driven PBT: what ``gradhpo pbt CONFIG`` and ``gradhpo resume DIR`` run.

A PBT config is a train config plus a ``pbt`` section::

    pbt:
      population: 8
      interval: 20               # optimizer steps between exploit/explore
      steps: null                # steps per member; default training.epochs epochs
      space:                     # what PBT explores (same syntax as search.space)
        optimizer.lr: {type: float, low: 0.001, high: 0.5, log: true}
        training.batch_size: {type: categorical, choices: [16, 32, 64]}
        model.dropout: {type: float, low: 0.01, high: 0.5}
      exploit: truncation        # or tournament
      fraction: 0.25
      explore: perturb           # or resample, sampler (TPE fitted on the history)
      factors: [0.8, 1.2]
      resample_probability: 0.25
      mode: sync                 # or async
      metric: val_accuracy       # or val_loss
      seed: 0
      batched: false             # true: one vmapped step for all members (BatchedPopulation;
                                 # sync mode, optimizer.* values only, no tuner)
      groups: 1                  # batched: that many groups of consecutive members, each one
                                 # vmapped model with its own dropout stream (same run in
                                 # process or on an executor: one task per group per round)
      executor: null             # members' intervals as tasks: {name: processes | ray, ...};
                                 # sync: a round of tasks at a time; async: a task per member
                                 # in flight, each decided and resubmitted as it finishes
      checkpoints: files         # with an executor: tasks read/write checkpoint files in the
                                 # run directory (shared by all workers); or executor: they
                                 # get and return them as bytes, only this process writes

With a ``tuner`` section the members also adapt their continuous hyperparameters by
hypergradient between exploits (the hybrid mode); a tuned schedule spans a member's whole run
(``pbt.steps``) unless it gives its own ``steps``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tqdm import tqdm

from gradhpo.config import ConfigError, check_executor, check_int, with_section
from gradhpo.data import DataSplits
from gradhpo.execution import make_executor
from gradhpo.jobs.rundir import create_run_dir, open_run_dir, run_dir_of
from gradhpo.models import ModelConfigError
from gradhpo.pbt.batched import BatchedPopulation
from gradhpo.pbt.manager import (
    CHECKPOINTS,
    BatchedGroup,
    BatchedMember,
    PopulationBasedTraining,
    RunMember,
    contiguous_groups,
)
from gradhpo.pbt.store import PBTDatabase
from gradhpo.run.builder import build_run, load_job_data
from gradhpo.run.loop import METRICS, check_metric_fits
from gradhpo.search.space import SearchSpace
from gradhpo.tensorboard_logger import TensorBoardLogger

__all__ = ["PBT_DEFAULTS", "validate_pbt_config", "prepare_pbt", "run_pbt"]

PBT_DEFAULTS: dict[str, Any] = {
    "population": 8,
    "interval": 20,
    "steps": None,
    "space": None,
    "exploit": "truncation",
    "fraction": 0.25,
    "explore": "perturb",
    "factors": [0.8, 1.2],
    "resample_probability": 0.25,
    "mode": "sync",
    "metric": "val_accuracy",
    "seed": None,
    "batched": False,
    "groups": 1,
    "executor": None,
    "checkpoints": "files",
}
_CHOICES = {
    "exploit": ("truncation", "tournament"),
    "explore": ("perturb", "resample", "sampler"),
    "mode": ("sync", "async"),
    "metric": ("val_accuracy", "val_loss"),
    "checkpoints": CHECKPOINTS,
}


def _number(field: str, value: Any, low: float, high: float, *, open_low: bool = False) -> float:
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
    if not ok or value < low or value > high or (open_low and value == low):
        bracket = "(" if open_low else "["
        raise ConfigError(f"{field}: expected a number in {bracket}{low}, {high}], got {value!r}")
    return float(value)


def validate_pbt_config(raw: Mapping[str, Any]) -> tuple[dict[str, Any], SearchSpace]:
    config, p = with_section(raw, "pbt", PBT_DEFAULTS, "gradhpo pbt")
    check_int("pbt.population", p["population"], 2)
    check_int("pbt.interval", p["interval"], 1)
    if p["steps"] is not None:
        check_int("pbt.steps", p["steps"], 1)
    for key, allowed in _CHOICES.items():
        if p[key] not in allowed:
            raise ConfigError(f"pbt.{key}: expected one of {list(allowed)}, got {p[key]!r}")
    _number("pbt.fraction", p["fraction"], 0.0, 0.5, open_low=True)
    _number("pbt.resample_probability", p["resample_probability"], 0.0, 1.0)
    factors = p["factors"]
    if not isinstance(factors, list) or not factors:
        raise ConfigError(
            f"pbt.factors: expected a non-empty list of positive numbers, got {factors!r}"
        )
    for f in factors:
        _number("pbt.factors", f, 0.0, math.inf, open_low=True)
    p["seed"] = (
        config["training"]["seed"] if p["seed"] is None else check_int("pbt.seed", p["seed"], 0)
    )
    p["executor"] = check_executor("pbt.executor", p["executor"])
    if not isinstance(p["batched"], bool):
        raise ConfigError(f"pbt.batched: expected true or false, got {p['batched']!r}")
    check_int("pbt.groups", p["groups"], 1)
    if p["groups"] > p["population"]:
        raise ConfigError(
            f"pbt.groups: at most one group per member ({p['population']}), got {p['groups']!r}"
        )
    if p["groups"] != 1 and not p["batched"]:
        raise ConfigError(
            f"pbt.groups: splits a batched population (pbt.batched: true), got {p['groups']!r} "
            "with batched false"
        )
    if p["batched"]:
        if config["tuner"] is not None:
            raise ConfigError(
                "pbt.batched: a batched population cannot run a hypergradient tuner; drop 'tuner'"
            )
        if p["mode"] != "sync":
            raise ConfigError(f"pbt.batched: needs mode 'sync', got {p['mode']!r}")
        if config["training"]["augment"]:
            raise ConfigError("pbt.batched: augmentation is not supported by a batched population")
        if config["training"]["precision"] != "float32":
            raise ConfigError(
                "pbt.batched: a batched population trains in float32, got training.precision "
                f"{config['training']['precision']!r}; drop one of them"
            )
        if config["training"]["loss"] != "cross_entropy":
            raise ConfigError(
                "pbt.batched: a batched population trains with cross_entropy only, got "
                f"training.loss {config['training']['loss']!r}; drop one of them"
            )
    space = SearchSpace.from_config(p["space"], section="pbt.space")
    if not len(space):
        raise ConfigError("pbt.space: expected at least one parameter to explore")
    for param in space:
        where = f"pbt.space.{param.path}"
        if param.when or param.per_layer:
            raise ConfigError(f"{where}: 'when' and 'per_layer' are for searches, not PBT")
        if param.section not in ("optimizer", "training", "model") or (
            param.section == "model" and param.key != "dropout"
        ):
            raise ConfigError(
                f"{where}: PBT can change optimizer.*, training.batch_size and model.dropout "
                f"during training, got {param.path!r}"
            )
        if param.path == "training.augment":
            raise ConfigError(f"{where}: augmentation cannot be switched during training")
        if p["batched"] and param.section != "optimizer":
            raise ConfigError(f"{where}: a batched population can only explore optimizer.* values")
        if param.path == "model.dropout" and param.low <= 0:
            raise ConfigError(
                f"{where}.low: must be > 0 so every member has dropout layers, got {param.low!r}"
            )
    config["pbt"] = p
    return config, space


class _Population:
    """Builds members from the config and logs each evaluation to TensorBoard."""

    def __init__(self, config: Mapping[str, Any], space: SearchSpace, data: DataSplits) -> None:
        self.config = config
        self.space = space
        self.data = data
        self.tb_root = Path(config["output"]["tensorboard_dir"]) / config["name"]
        self.loggers: dict[int, TensorBoardLogger] = {}
        p = config["pbt"]
        #: The batched groups (pbt.groups): member indices, and each group once built.
        self.members_of = contiguous_groups(p["population"], p["groups"])
        self.groups: dict[int, BatchedGroup] = {}

    def factory(self, index: int, values: dict[str, Any]) -> Any:
        if self.config["pbt"]["batched"]:
            return self._batched_member(index, values)
        run = build_run(
            self.space.apply(self.config, values),
            data=self.data,
            seed=int(self.config["training"]["seed"]) + index,
            where=f"member {index}",
        )
        return RunMember(run, self.config["pbt"]["metric"], values)

    def _batched_member(self, index: int, values: dict[str, Any]) -> BatchedMember:
        """Member ``index``: a row of its group's BatchedPopulation (built at the first call
        for any of its members; on an executor worker only the task's group is built).
        Member i has seed ``training.seed + i`` like the unbatched members; each group has a
        dropout stream of its own, so a population gives the same run wherever its groups
        train."""
        k = next(k for k, members in enumerate(self.members_of) if index in members)
        members = self.members_of[k]
        if k not in self.groups:
            base = int(self.config["training"]["seed"])
            population = BatchedPopulation.from_config(
                self.config, self.data, len(members), seeds=[base + i for i in members]
            )
            self.groups[k] = BatchedGroup(population, self.config["pbt"]["metric"])
        member = self.groups[k].member(index - members[0])
        member.apply(values)
        return member

    def on_evaluate(
        self, index: int, step: int, score: float, member: Any, values: dict[str, Any]
    ) -> None:
        if index not in self.loggers:
            self.loggers[index] = TensorBoardLogger(self.tb_root / f"member_{index:03d}")
        tb = self.loggers[index]
        tb.scalars({f"pbt/{self.config['pbt']['metric']}": score}, step)
        tb.scalars(member.hyperparameters, step, prefix="hyper/")
        numeric = {
            k: v
            for k, v in values.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)
        }
        tb.scalars(numeric, step, prefix="pbt_values/")

    def close(self) -> None:
        for tb in self.loggers.values():
            tb.close()

    def __getstate__(self) -> dict[str, Any]:
        """Shipped to executor workers without the data, loggers or batched group: a worker
        reloads the data set from the config (once per process)."""
        state = dict(self.__dict__)
        state.update(data=None, loggers={}, groups={})
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        if self.data is None:
            (self.data,) = load_job_data(self.config, cached=True)


def schedules_over(config: Mapping[str, Any], steps: int) -> dict[str, Any]:
    """``config`` with every tuned schedule that does not give its length spanning ``steps``
    (a member's whole run). Left to the run, the length would be ``training.epochs`` epochs of
    the member's batch size at build time, which PBT changes: a member rebuilt on resume after
    exploring the batch size would read its schedule on another time axis than before."""
    tuner = config.get("tuner")
    if not tuner:
        return dict(config)
    hypers = []
    for spec in tuner["hypers"]:
        schedule = spec.get("schedule") if isinstance(spec, Mapping) else None
        if isinstance(schedule, Mapping) and schedule.get("steps") is None:
            spec = {**spec, "schedule": {**schedule, "steps": steps}}
        hypers.append(spec)
    return {**config, "tuner": {**tuner, "hypers": hypers}}


def prepare_pbt(
    raw: Mapping[str, Any] | None = None, *, resume_dir: str | Path | None = None
) -> tuple[PopulationBasedTraining, dict[str, Any], _Population]:
    """Validate, load data, build one member as a pre-flight check, then create (or open) the
    run directory. Nothing is written before every check has passed."""
    if resume_dir is not None:
        resume_dir = Path(resume_dir)
        _, raw = open_run_dir(resume_dir, "pbt")
    config, space = validate_pbt_config(raw or {})
    (splits,) = load_job_data(config)
    try:
        check_metric_fits(config["pbt"]["metric"], splits, "pbt.metric")
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    steps = config["pbt"]["steps"]
    if steps is None:
        per_epoch = len(splits.train) // min(config["training"]["batch_size"], len(splits.train))
        steps = config["training"]["epochs"] * per_epoch
    config = schedules_over(config, steps)
    population = _Population(config, space, splits)
    for label, params in space.corner_params():
        where = "config" if label == "base point" else label.replace("search.space", "pbt.space")
        try:
            population.factory(0, dict(params)).apply(params)
        except ConfigError as exc:  # from build_run: report the cause under this corner
            raise ConfigError(f"{where}: gives an invalid member: {exc.__cause__ or exc}") from exc
        except (ModelConfigError, ValueError, TypeError) as exc:
            raise ConfigError(f"{where}: gives an invalid member: {exc}") from exc
    directory = resume_dir or run_dir_of(config)
    population.groups = {}  # the pre-flight population is not the one that trains
    p = config["pbt"]
    if resume_dir is None:
        create_run_dir(directory, "pbt", config, populate=lambda tmp: PBTDatabase(tmp).close())
    manager = PopulationBasedTraining(
        population.factory,
        space.parameters,
        directory,
        population=p["population"],
        interval=p["interval"],
        total_steps=steps,
        exploit=p["exploit"],
        fraction=p["fraction"],
        explore=p["explore"],
        factors=p["factors"],
        resample_probability=p["resample_probability"],
        mode=p["mode"],
        maximize=METRICS[p["metric"]] == "maximize",
        seed=p["seed"],
        on_evaluate=population.on_evaluate,
        checkpoints=p["checkpoints"],
        together=population.members_of if p["batched"] else None,
    )
    return manager, config, population


def run_pbt(
    manager: PopulationBasedTraining,
    config: Mapping[str, Any],
    population: _Population,
    *,
    progress: bool = True,
) -> dict[str, Any]:
    """Train the population to the end, then evaluate the best member on the test set."""
    executor_spec = config["pbt"]["executor"]
    remote = executor_spec is not None and executor_spec["name"] != "serial"
    resumed = manager.start(build=not remote)
    done = min(manager.steps)
    with tqdm(
        total=manager.total_steps,
        initial=done,
        desc=f"{config['name']} population",
        unit="step",
        disable=not progress or None,
    ) as bar:
        if remote:
            with make_executor(executor_spec) as executor:
                best = manager.run(progress=bar, executor=executor)
        else:
            best = manager.run(progress=bar)
    population.close()
    member = (
        manager.members[best["member"]] if manager.members else manager.build_member(best["member"])
    )
    if isinstance(member, BatchedMember):
        result = member.group.population.evaluate("test")
        test = {k: float(result[k][member.index]) for k in ("accuracy", "loss")}  # CE only
    else:
        assert isinstance(member, RunMember)  # a config's members are runs, batched or not
        test = member.run.evaluate("test")
    best.update(
        test_accuracy=test.get("accuracy"),  # None without class labels
        test_loss=test["loss"],
        resumed=resumed,
        metric=config["pbt"]["metric"],
    )
    with manager.db.transaction():
        manager.db.set_meta("best", best)
    return best
