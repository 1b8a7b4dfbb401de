"""gradhpo's training runs as a Ray Tune trainable (the ``tune`` extra: ``pip install
'gradhpo[tune]'``).

::

    from ray import tune
    from gradhpo.integrations.ray_tune import load_run, trainable

    space = {"optimizer.lr": tune.loguniform(1e-3, 0.3), "model.width": tune.choice([8, 16])}
    tuner = tune.Tuner(
        trainable("experiments/configs/digits_cnn.yaml", param_space=space),
        param_space=space,
        tune_config=tune.TuneConfig(metric="val_loss", mode="min", num_samples=20,
                                    scheduler=tune.schedulers.ASHAScheduler(max_t=15)),
    )
    best = tuner.fit().get_best_result()
    run = load_run(best.checkpoint)            # a TrainingRun, continued or evaluated at will

* :func:`trainable` turns a run config (the YAML shape of ``gradhpo train``: ``data, model,
  optimizer, training``, an optional ``tuner`` section for hypergradient tuning inside each
  trial) into a Tune function trainable. Tune's sampled ``config`` is written into that base
  config by dotted paths (``optimizer.lr``, ``model.width``, ``training.batch_size``,
  ``tuner.hyper_lr``; or nested, ``{"optimizer": {"lr": ...}}``) and validated by gradhpo's
  own checks: a bad path or value is a :class:`~gradhpo.config.ConfigError` naming it,
  before anything trains. ``param_space=`` also builds the run at every corner of the space
  in the driver (as ``gradhpo tune``'s pre-flight does), so such a mistake stops the
  experiment before the first trial starts.
* Each trial trains through gradhpo's one loop (:func:`gradhpo.run.fit`) and reports every
  epoch: ``epoch, step, train_loss, val_loss``, ``val_accuracy`` where the targets are class
  labels, every continuous hyperparameter as ``hyper/<name>`` (the values a tuner adapts
  included), ``epoch_seconds`` and ``diverged``; with a Tune :class:`~ray.tune.Checkpoint`
  holding the :class:`~gradhpo.run.TrainingRun`'s state (:data:`CHECKPOINT_FILE`, written
  atomically with ``torch.save``, read with ``weights_only=True``). A diverged trial reports
  ``val_loss = inf`` (and ``val_accuracy = 0``) once and ends; a NaN validation loss is
  reported as inf too.
* A trial that starts with a checkpoint (``tune.get_checkpoint()``: paused by a scheduler,
  retried after a failure, or given another trial's checkpoint by PBT) continues from it:
  the run's resume is bit-identical on CPU, so a paused or retried trial reports exactly
  what it would have reported without the interruption. Values that differ from those the
  checkpoint was trained with (PBT's exploit and explore) are applied as gradhpo's own PBT
  applies them (:meth:`gradhpo.pbt.RunMember.apply`: ``optimizer.*``, ``training.batch_size``,
  ``model.dropout``; a hyperparameter the trial's tuner adapts is scaled by new/old, keeping
  its learned shape); anything else (the architecture) cannot change and is an error.
* The data set is loaded once per worker process (:func:`gradhpo.run.builder.load_job_data`
  with its process cache), not per epoch; with ``TuneConfig(reuse_actors=True)`` trials that
  share a process share one copy.
* Test figures are not reported unless asked (``report_test=True``: ``test_loss``,
  ``test_accuracy`` every epoch, for information). Select trials on ``val_loss`` or
  ``val_accuracy``, never on ``test_*``: a test split used for selection no longer
  estimates the chosen model's error.
"""

from __future__ import annotations

import math
import os
import re
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ray import tune
from ray.tune.search import sample

from gradhpo.config import ConfigError, load_yaml, validate_train_config
from gradhpo.files import write_torch
from gradhpo.pbt import RunMember
from gradhpo.run import RUN_SECTIONS, Epoch, TrainingRun, fit, upgrade_run_state
from gradhpo.run.builder import build_run, load_job_data
from gradhpo.search.space import SearchSpace

__all__ = [
    "CHECKPOINT_FILE",
    "check_space",
    "load_run",
    "read_checkpoint",
    "run_trial",
    "trainable",
    "trial_config",
]

#: The file in each Tune checkpoint directory: the run's state dict
#: (:meth:`gradhpo.run.TrainingRun.state_dict`) plus ``pbt_values`` (the trial's sampled values)
#: and ``tune: {"epoch": e}``; its ``config`` names the data set, so
#: ``TrainingRun.from_checkpoint(path)`` rebuilds the run anywhere.
CHECKPOINT_FILE = "run.pt"

_Report = Callable[..., None]


# ------------------------------------------------------------------------------ configs
def _base_config(base_config: Mapping[str, Any] | str | os.PathLike[str]) -> dict[str, Any]:
    """The validated base run config (a mapping, or a YAML file's path). A relative
    ``data.data_dir`` is made absolute here, in the driver: Tune runs trials in their own
    working directories."""
    raw = load_yaml(base_config) if isinstance(base_config, (str, os.PathLike)) else base_config
    if isinstance(raw, Mapping):
        for section in ("search", "pbt"):
            if section in raw:
                raise ConfigError(
                    f"{section}: a {section!r} section belongs to `gradhpo "
                    f"{'tune' if section == 'search' else 'pbt'}`; with Ray Tune give the base "
                    "run config and put the search space in the Tuner's param_space"
                )
    config = validate_train_config(raw)
    data = config["data"]
    if isinstance(data.get("data_dir"), str) and not Path(data["data_dir"]).is_absolute():
        config["data"] = {**data, "data_dir": str(Path(data["data_dir"]).expanduser().resolve())}
    return config


def _plain(value: Any) -> Any:
    """Numpy scalars (what some Tune samplers return) as Python numbers, so gradhpo's checks
    see ``8`` rather than ``np.int64(8)``."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _is_grid(value: Any) -> bool:
    return isinstance(value, Mapping) and set(value) == {"grid_search"}


def _paths(config: Mapping[str, Any], where: str) -> dict[str, Any]:
    """Tune's config as ``{"<section>.<key>": value}``: dotted keys as they are, a section's
    mapping (``{"optimizer": {"lr": ...}}``) one key at a time. Anything else is a
    ConfigError naming the key and its value."""
    if not isinstance(config, Mapping):
        raise ConfigError(f"{where}: expected a mapping of dotted paths, got {config!r}")
    paths: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(key, str) and "." not in key and isinstance(value, Mapping):
            if key not in RUN_SECTIONS or _is_grid(value):
                raise ConfigError(
                    f"{where}: {key}={value!r}: expected dotted paths '<section>.<key>' "
                    f"(section one of {list(RUN_SECTIONS)}) or a section's mapping of keys"
                )
            items = [(f"{key}.{k}", v) for k, v in value.items()]
        else:
            items = [(key, value)]
        for path, v in items:
            parts = path.split(".") if isinstance(path, str) else []
            if len(parts) != 2 or not all(parts) or parts[0] not in RUN_SECTIONS:
                raise ConfigError(
                    f"{where}: {path!r}={v!r}: expected a dotted path '<section>.<key>' with "
                    f"section one of {list(RUN_SECTIONS)} (e.g. 'optimizer.lr', 'model.width')"
                )
            paths[path] = v
    return paths


def trial_config(
    base_config: Mapping[str, Any] | str | os.PathLike[str],
    config: Mapping[str, Any],
    *,
    where: str | None = None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The run config of one trial: ``base_config`` with Tune's sampled ``config`` written in
    at its dotted paths, validated (:func:`gradhpo.config.validate_train_config`). Returns
    ``(run_config, params)``, ``params`` being the sampled values by path. Mistakes are
    ConfigErrors naming the path (or field) and the value."""
    base = _base_config(base_config)
    params = {p: _plain(v) for p, v in _paths(config, "Ray Tune config").items()}
    where = where or f"Ray Tune config {params}"
    try:
        run_config = validate_train_config(SearchSpace.apply(base, params))
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    return run_config, params


def _corners(value: Any) -> list[Any]:
    """Values of a param_space entry worth building in a pre-flight: every choice of a
    categorical or grid, the ends of a bounded range, the value of a constant; nothing for
    what cannot be enumerated (``sample_from``, unbounded normals)."""
    if _is_grid(value):
        return list(value["grid_search"])
    if isinstance(value, sample.Categorical):
        return list(value.categories)
    if isinstance(value, sample.Integer):
        top = value.upper if isinstance(value.sampler, sample.Quantized) else value.upper - 1
        return [value.lower] if top <= value.lower else [value.lower, top]
    if isinstance(value, sample.Float):
        if not (math.isfinite(value.lower) and math.isfinite(value.upper)):
            return []
        return [value.lower, value.upper]
    if isinstance(value, sample.Domain):
        return []
    return [value]


def check_space(
    base_config: Mapping[str, Any] | str | os.PathLike[str], param_space: Mapping[str, Any]
) -> list[str]:
    """Pre-flight of a Tune ``param_space`` in the driver: every path must name a run config
    field, and the run is built (data loaded once, model made, loss checked) at a base point
    (each entry's first choice or lower end) and with each entry moved to each of its corner
    values. The first mistake is a ConfigError naming the entry and value; returns the
    labels of the points built."""
    base = _base_config(base_config)
    corners = {p: _corners(v) for p, v in _paths(param_space, "param_space").items()}
    start = {p: values[0] for p, values in corners.items() if values}
    points = [(f"param_space base point {start}", start)]
    for path, values in corners.items():
        for value in values[1:]:
            points.append((f"param_space {path}={value!r}", {**start, path: value}))
    for label, params in points:
        run_config, _ = trial_config(base, params, where=label)
        data = load_job_data(run_config, cached=True)[0]
        build_run(run_config, data=data, device="cpu", where=label)
    return [label for label, _ in points]


# ------------------------------------------------------------------------------ checkpoints
def read_checkpoint(checkpoint: tune.Checkpoint | str | os.PathLike[str]) -> dict[str, Any]:
    """The state in a checkpoint of :func:`run_trial` (a Tune Checkpoint, its directory or
    the :data:`CHECKPOINT_FILE` itself), read with ``torch.load(weights_only=True)``."""
    if isinstance(checkpoint, tune.Checkpoint):
        with checkpoint.as_directory() as folder:
            return read_checkpoint(folder)
    path = Path(checkpoint)
    if path.is_dir():
        path = path / CHECKPOINT_FILE
    if not path.is_file():
        raise ValueError(
            f"checkpoint {str(path)!r} not found: not a checkpoint of "
            "gradhpo.integrations.ray_tune (which writes run.pt)"
        )
    state = upgrade_run_state(torch.load(path, map_location="cpu", weights_only=True))
    if not isinstance(state.get("tune"), Mapping) or "epoch" not in state["tune"]:
        raise ValueError(f"checkpoint {str(path)!r} has no 'tune' record: not a Tune trial's")
    return state


def load_run(
    checkpoint: tune.Checkpoint | str | os.PathLike[str], *, device: str | torch.device = "cpu"
) -> TrainingRun:
    """The :class:`~gradhpo.run.TrainingRun` of a trial's checkpoint (``result.checkpoint``),
    rebuilt from the config it holds (data reloaded by its spec) and loaded: evaluate it,
    export it, or train it further."""
    state = read_checkpoint(checkpoint)
    run = TrainingRun.from_config(state["config"], device=device)
    run.load_state_dict(state)
    return run


def _write_checkpoint(
    member: RunMember, run_config: Mapping[str, Any], epoch: int, folder: Path
) -> Any:  # a tune.Checkpoint (Ray types from_directory as its base class)
    state = member.state_dict()
    if state["config"].get("data") is None:  # built on the shared splits: name their spec
        state["config"] = {**state["config"], "data": run_config["data"]}
    state["tune"] = {"epoch": epoch}
    write_torch(folder / CHECKPOINT_FILE, state)
    return tune.Checkpoint.from_directory(folder)


# ------------------------------------------------------------------------------ the trial
def _metrics(run: TrainingRun, record: Mapping[str, Any], report_test: bool) -> dict[str, Any]:
    diverged = bool(record.get("diverged", False))
    metrics: dict[str, Any] = {
        "epoch": record["epoch"],
        "step": record["step"],
        "train_loss": record["train_loss"],
        # A diverged run (or a NaN loss) scores the worst loss: inf, which schedulers rank
        # last (NaN compares as neither better nor worse).
        "val_loss": math.inf if diverged or math.isnan(record["val_loss"]) else record["val_loss"],
    }
    if record.get("val_accuracy") is not None:
        metrics["val_accuracy"] = record["val_accuracy"]
    metrics.update({f"hyper/{k}": v for k, v in record["hypers"].items()})
    metrics["epoch_seconds"] = record["seconds"]
    metrics["diverged"] = diverged
    if report_test and not diverged:
        test = run.evaluate("test")
        metrics["test_loss"] = test["loss"]
        if "accuracy" in test:
            metrics["test_accuracy"] = test["accuracy"]
    return metrics


def _check_options(report_test: Any, checkpoint_every: Any, threads: Any) -> None:
    for field, value in (("checkpoint_every", checkpoint_every), ("threads", threads)):
        if value is None and field == "threads":
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{field} must be an integer >= 1, got {value!r}")
    if not isinstance(report_test, bool):
        raise TypeError(f"report_test must be true or false, got {report_test!r}")


def run_trial(
    base_config: Mapping[str, Any] | str | os.PathLike[str],
    config: Mapping[str, Any],
    *,
    report: _Report | None = None,
    get_checkpoint: Callable[[], Any] | None = None,
    report_test: bool = False,
    checkpoint_every: int = 1,
    threads: int | None = None,
) -> list[dict[str, Any]]:
    """One trial: what :func:`trainable`'s function does, with Tune's ``report`` and
    ``get_checkpoint`` replaceable (``None``: ``tune.report`` / ``tune.get_checkpoint``) to run
    a trial outside Tune. Builds the run of ``trial_config(base_config, config)``, continues
    from the checkpoint ``get_checkpoint()`` returns (if any), trains the remaining epochs of
    ``training.epochs`` and calls ``report(metrics, checkpoint=...)`` after each (a
    checkpoint every ``checkpoint_every`` epochs and at the last one). Returns the metrics it
    reported."""
    _check_options(report_test, checkpoint_every, threads)
    report = report if report is not None else tune.report
    get_checkpoint = get_checkpoint if get_checkpoint is not None else tune.get_checkpoint
    run_config, params = trial_config(base_config, config)
    where = f"Ray Tune config {params}"
    if threads is not None:
        torch.set_num_threads(threads)
    data = load_job_data(run_config, cached=True)[0]  # once per process
    run = build_run(run_config, data=data, where=where)
    metric = "val_accuracy" if run.data.classification else "val_loss"
    member = RunMember(run, metric, values=params)
    start = 0
    checkpoint = get_checkpoint()
    if checkpoint is not None:
        state = read_checkpoint(checkpoint)
        start = int(state["tune"]["epoch"])
        before = dict(state.get("pbt_values") or {})
        changed = {p: v for p, v in params.items() if p not in before or before[p] != v}
        try:
            member.load_state_dict(state)
            member.apply(params)  # values that differ from the checkpoint's (PBT): set them
        except (RuntimeError, ValueError) as exc:
            raise ConfigError(
                f"{where}: cannot continue the checkpoint made with {before} "
                f"(changed: {changed}): {exc}"
            ) from None
    epochs = run_config["training"]["epochs"]
    reported: list[dict[str, Any]] = []

    def hook(epoch: Epoch) -> None:
        metrics = _metrics(run, epoch.records[0], report_test)
        reported.append(metrics)
        if epoch.diverged or (epoch.epoch % checkpoint_every and epoch.epoch != epochs):
            report(metrics)
            return
        with tempfile.TemporaryDirectory(prefix="gradhpo-tune-") as folder:
            report(
                metrics, checkpoint=_write_checkpoint(member, run_config, epoch.epoch, Path(folder))
            )

    if start < epochs:
        fit([run], epochs, metric=metric, start_epoch=start, hooks=[hook])
    return reported


def _trial_cpus() -> int | None:
    """The CPUs Tune reserved for this trial (None where it cannot say)."""
    try:
        resources = tune.get_context().get_trial_resources()
        cpus = resources.required_resources.get("CPU", 0)
    except (AttributeError, RuntimeError):
        return None
    return max(1, int(cpus)) if cpus else None


def trainable(
    base_config: Mapping[str, Any] | str | os.PathLike[str],
    *,
    param_space: Mapping[str, Any] | None = None,
    report_test: bool = False,
    checkpoint_every: int = 1,
    threads: int | None = None,
) -> Callable[[dict[str, Any]], None]:
    """A Tune function trainable that trains ``base_config`` (a run config mapping or YAML
    path, validated now) with each trial's sampled values written in by dotted path (see the
    module docstring for what it reports and checkpoints).

    Args:
        param_space: the Tuner's ``param_space``; given, it is checked now by
            :func:`check_space` (the run built at each corner, in this process), so a bad
            path or value fails before any trial starts.
        report_test: also report ``test_loss``/``test_accuracy`` each epoch (for
            information; never select on them).
        checkpoint_every: report a checkpoint every this many epochs (and at the last).
        threads: torch threads per trial; default the CPUs Tune reserved for the trial
            (1 unless ``tune.with_resources`` says otherwise).
    """
    base = _base_config(base_config)
    _check_options(report_test, checkpoint_every, threads)
    if param_space is not None:
        check_space(base, param_space)

    def train(config: dict[str, Any]) -> None:
        run_trial(
            base,
            config,
            report=tune.report,
            get_checkpoint=tune.get_checkpoint,
            report_test=report_test,
            checkpoint_every=checkpoint_every,
            threads=threads if threads is not None else _trial_cpus(),
        )

    # Tune names trials after the function: gradhpo_<config name>_<trial id>.
    train.__name__ = train.__qualname__ = "gradhpo_" + re.sub(r"\W", "_", base["name"])
    return train
