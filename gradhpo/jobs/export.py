"""``gradhpo export DIR``: the model of a run folder as a plain ``state_dict`` and a YAML card.

What is exported from each kind of run folder:

* a study (``gradhpo tune``): the best trial's weights at its best epoch
  (``trials/<n>/best_<fold>.pt``; fold 0 of a cross-validated study unless ``fold=``), or
  ``trial=N`` (any complete trial whose weights were kept: ``search.keep_checkpoints: all``,
  or a trial on the Pareto front of a multi-objective study, which has no single best);
* a ``gradhpo train`` run: ``checkpoint.pt``, the weights at the end of training;
* a PBT run: the best member's current checkpoint (what ``gradhpo pbt`` evaluated on the test
  set; for an unfinished run, the member with the best latest score).

Two files come out (each written atomically, the YAML last):

* ``FILE.pt``: the model's ``state_dict`` alone (tensor names -> CPU tensors), so that
  ``model.load_state_dict(torch.load(FILE.pt, weights_only=True))`` works on the module;
* ``FILE.yaml`` beside it: ``format``, the weights' file name and SHA-256, the resolved
  ``model`` config (``gradhpo.models.build_model``'s argument: a family with its knobs, or
  ``{factory: "pkg.mod:fn", ...}``), ``input_shape``, ``num_outputs``, ``classification``,
  ``loss``, the ``data`` spec (and ``inputs``: the model expects examples preprocessed as
  ``gradhpo.data.load_data`` gives them), the selection ``metric`` and its ``value``, the ``test``
  figures where the job measured them, the continuous ``hyperparameters`` the weights were
  trained with at that point, the searched or explored ``params``, and the ``source`` (kind,
  folder, checkpoint, trial / member).

:func:`load_exported` rebuilds the ``nn.Module`` from the pair (``build_model`` with the
recorded config; a factory is imported by name, so it must be importable where the model is
loaded), checks the weights against the recorded SHA-256 (a ``.pt`` from another export is
refused, not loaded into the wrong card) and returns it in eval mode.

Before anything is written the module is rebuilt from the card and the weights are loaded
into it (strictly), so an export that would not load is an error, not a file.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import optuna
import torch
import yaml
from torch import nn

from gradhpo.config import ConfigError, load_yaml
from gradhpo.files import atomic_write, write_text
from gradhpo.jobs.rundir import check_writable_dir, open_run_dir
from gradhpo.models import build_model
from gradhpo.run.builder import load_job_data
from gradhpo.run.training_run import upgrade_run_state
from gradhpo.search.study import is_retried, load_optuna_study

__all__ = ["EXPORT_FORMAT", "default_export_path", "export_model", "load_exported", "read_export"]

#: Format tag of the YAML card.
EXPORT_FORMAT = "gradhpo.export/1"


def default_export_path(directory: str | os.PathLike[str], trial: int | None = None) -> Path:
    """Where ``gradhpo export DIR`` writes without ``--out``: ``DIR/export/best.pt``, or
    ``DIR/export/trial_<n>.pt`` for one chosen trial."""
    name = "best.pt" if trial is None else f"trial_{trial:04d}.pt"
    return Path(directory) / "export" / name


def card_path(weights: str | os.PathLike[str]) -> Path:
    """The YAML card beside a weights file: the same name with the suffix ``.yaml``."""
    return Path(weights).with_suffix(".yaml")


# ---------------------------------------------------------------------- plain data
def _plain(value: Any) -> Any:
    """``value`` as YAML-safe plain data (tuples as lists, numpy/torch scalars as numbers)."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return value.item()
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if hasattr(value, "item"):  # numpy scalars
        return value.item()
    return str(value)


def _test_figures(source: Mapping[str, Any] | None) -> dict[str, float] | None:
    if not source:
        return None
    test = {
        key: float(source[f"test_{key}"])
        for key in ("accuracy", "loss")
        if source.get(f"test_{key}") is not None
    }
    return test or None


def _load_checkpoint(path: Path, what: str) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"{str(path)!r}: missing: {what}'s weights are not there")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        return upgrade_run_state(state)
    except Exception as exc:  # noqa: BLE001 - whatever the damage: name the file
        first = str(exc).splitlines()[0] if str(exc) else ""
        raise ConfigError(
            f"{str(path)!r}: unreadable checkpoint of {what} ({type(exc).__name__}: {first})"
        ) from exc


# ---------------------------------------------------------------------- the sources
def _study_source(
    directory: Path,
    config: Mapping[str, Any],
    trial: int | None,
    fold: int,
    storage: str | None,
) -> dict[str, Any]:
    study = load_optuna_study(directory, storage=storage)
    search = config.get("search") or {}
    folds = search.get("cv_folds") or 1
    if not 0 <= fold < folds:
        raise ConfigError(
            f"--fold: expected 0 to {folds - 1} (the study has {folds} fold(s)), got {fold}"
        )
    complete = [
        t
        for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
        if not is_retried(t) and t.values is not None and all(math.isfinite(v) for v in t.values)
    ]
    multi = len(study.directions) > 1
    if trial is None:
        if multi:
            front = sorted(t.number for t in study.best_trials)
            raise ConfigError(
                f"{str(directory)!r} holds a multi-objective study, which has no single best "
                f"trial: choose one of its Pareto front with --trial (trials {front})"
            )
        if not complete:
            raise ConfigError(f"{str(directory)!r}: the study has no complete trial to export")
        sign = 1.0 if study.direction == optuna.study.StudyDirection.MAXIMIZE else -1.0
        chosen = max(complete, key=lambda t: (sign * t.values[0], -t.number))
    else:
        found = [t for t in study.get_trials(deepcopy=False) if t.number == trial]
        if not found:
            raise ConfigError(f"--trial: the study has no trial {trial}")
        chosen = found[0]
        if chosen not in complete:
            raise ConfigError(
                f"--trial: trial {trial} is {chosen.state.name.lower()}, not complete; "
                "export takes a complete trial"
            )
    path = directory / "trials" / f"{chosen.number:04d}" / f"best_{fold}.pt"
    if not path.is_file():
        why = (
            "with search.keep_checkpoints: best only the best trial keeps its weights"
            if trial is not None
            else "restore the file"
        )
        raise ConfigError(
            f"{str(path)!r}: missing: trial {chosen.number}'s weights are gone; {why}"
        )
    state = _load_checkpoint(path, f"trial {chosen.number}")
    names = _metric_names(study, search)
    metric: Any = names[0] if len(names) == 1 else names
    value: Any = chosen.values[0] if len(names) == 1 else list(chosen.values)
    test = None
    best_test = study.user_attrs.get("best_test")
    if isinstance(best_test, Mapping) and best_test.get("trial") == chosen.number:
        test = _test_figures(best_test)
    for entry in study.user_attrs.get("pareto_test") or []:
        if isinstance(entry, Mapping) and entry.get("trial") == chosen.number:
            test = _test_figures(entry)
    source: dict[str, Any] = {
        "kind": "study",
        "trial": chosen.number,
        "checkpoint": path,
    }
    if folds > 1:
        source.update(fold=fold, folds=folds)
    return {
        "state": state,
        "metric": metric,
        "value": value,
        "test": test,
        "params": dict(chosen.params),
        "source": source,
        "what": f"trial {chosen.number}",
    }


def _metric_names(study: optuna.Study, search: Mapping[str, Any]) -> list[str]:
    """The study's objective names: the config's ``search.metric`` (a name or a list), else
    Optuna's metric names, else ``objective i``."""
    n = len(study.directions)
    given = search.get("metric")
    names = [given] if isinstance(given, str) else list(given or [])
    if len(names) != n:
        names = list(getattr(study, "metric_names", None) or [])
    if len(names) != n:
        names = ["objective"] if n == 1 else [f"objective {i}" for i in range(n)]
    return [str(name) for name in names]


def _train_source(directory: Path) -> dict[str, Any]:
    path = directory / "checkpoint.pt"
    state = _load_checkpoint(path, "the run")
    if state.get("diverged"):
        raise ConfigError(
            f"{str(path)!r}: the run diverged (non-finite training loss); its weights are not "
            "a trained model"
        )
    metrics: dict[str, Any] = {}
    if (directory / "metrics.json").is_file():
        try:
            metrics = json.loads((directory / "metrics.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            metrics = {}
    history = metrics.get("history") or [{}]
    last = history[-1] if isinstance(history[-1], Mapping) else {}
    metric = "val_accuracy" if last.get("val_accuracy") is not None else "val_loss"
    return {
        "state": state,
        "metric": metric,
        "value": last.get(metric),
        "test": _test_figures(metrics),
        "params": {},
        "source": {"kind": "train", "checkpoint": path},
        "what": "the run",
    }


def _pbt_source(directory: Path, config: Mapping[str, Any]) -> dict[str, Any]:
    from gradhpo.pbt.store import PBTDatabase  # noqa: PLC0415 - only PBT folders need it

    db = PBTDatabase(directory)
    try:
        members = db.members()
        best = db.get_meta("best")
        maximize = db.get_meta("maximize")
        if not isinstance(best, Mapping):
            # An unfinished run: the member with the best latest score (NaN / none last).
            if maximize is None:
                maximize = (config.get("pbt") or {}).get("metric", "val_accuracy") != "val_loss"
            scored = [
                m for m in members if m["score"] is not None and math.isfinite(float(m["score"]))
            ]
            if not scored:
                raise ConfigError(f"{str(directory)!r}: no PBT member has a score yet")
            sign = 1.0 if maximize else -1.0
            top = max(scored, key=lambda m: (sign * float(m["score"]), -m["member"]))
            best = {
                "member": top["member"],
                "score": top["score"],
                "values": top["values"],
                "step": top["step"],
                "metric": (config.get("pbt") or {}).get("metric"),
            }
        row = next((m for m in members if m["member"] == best["member"]), None)
        if row is None or row["checkpoint"] is None:
            raise ConfigError(
                f"{str(directory)!r}: member {best['member']} has no checkpoint to export"
            )
        try:
            path = db.checkpoint_path(row["checkpoint"])
        except KeyError as exc:
            raise ConfigError(f"{str(db.path)!r}: inconsistent PBT database ({exc})") from exc
    finally:
        db.close()
    state = _load_checkpoint(path, f"member {best['member']}")
    metric = best.get("metric") or (config.get("pbt") or {}).get("metric", "val_accuracy")
    return {
        "state": state,
        "metric": metric,
        "value": best.get("score"),
        "test": _test_figures(best),
        "params": dict(best.get("values") or {}),
        "source": {
            "kind": "pbt",
            "member": int(best["member"]),
            "step": int(best.get("step") or row["step"]),
            "finished": "test_loss" in best,
            "checkpoint": path,
        },
        "what": f"member {best['member']}",
    }


# ---------------------------------------------------------------------- export
def _find(
    directory: Path, trial: int | None, fold: int, storage: str | None
) -> tuple[dict[str, Any], dict[str, Any]]:
    kind, config = open_run_dir(directory)
    if kind != "study" and trial is not None:
        raise ConfigError(f"--trial: {str(directory)!r} holds a {kind} run, not a study")
    if kind != "study" and fold != 0:
        raise ConfigError(f"--fold: {str(directory)!r} holds a {kind} run, not a study")
    if kind == "study":
        found = _study_source(directory, config, trial, fold, storage)
    elif kind == "train":
        found = _train_source(directory)
    else:
        found = _pbt_source(directory, config)
    return found, config


def _inputs(splits: Any) -> Any:
    """How raw examples must be prepared for the model: the data set's preprocessing
    (divisor and per-channel mean/std of the training split), or a sentence where the
    data set does not record it (a user's data factory)."""
    prep = getattr(splits, "preprocessing", None)
    if not prep:
        return (
            "as gradhpo.data.load_data(data) gives them (this data set does not record its "
            "preprocessing)"
        )
    rule = "x = raw / divisor" + (
        ", then per channel (x - mean[c]) / std[c]" if prep.get("mean") is not None else ""
    )
    return {**_plain(prep), "rule": rule}


def _card(found: Mapping[str, Any], config: Mapping[str, Any], directory: Path) -> dict[str, Any]:
    """The YAML card, without the weights' name and hash."""
    state = found["state"]
    run_config = state.get("config") or {}
    model = run_config.get("model") or config.get("model")
    data_spec = run_config.get("data") or config.get("data")
    if not isinstance(model, Mapping):
        raise ConfigError(f"{found['source']['checkpoint']}: the checkpoint names no model config")
    # The shapes come from the data set the run was trained on (the model needs them).
    (splits,) = load_job_data({"data": data_spec})
    training = run_config.get("training") or config.get("training") or {}
    source = {k: (str(v) if isinstance(v, Path) else v) for k, v in found["source"].items()}
    source["dir"] = str(directory.resolve())
    return {
        "format": EXPORT_FORMAT,
        "model": _plain(model),
        "input_shape": [int(n) for n in splits.input_shape],
        "num_outputs": int(splits.num_classes),
        "classification": bool(splits.classification),
        "loss": _plain(training.get("loss", "cross_entropy")),
        "data": _plain(data_spec),
        "inputs": _inputs(splits),
        "metric": _plain(found["metric"]),
        "value": _plain(found["value"]),
        "test": _plain(found["test"]),
        "hyperparameters": _plain(state.get("hypers") or {}),
        "params": _plain(found["params"]),
        "source": _plain(source),
    }


def export_model(
    directory: str | os.PathLike[str],
    out: str | os.PathLike[str] | None = None,
    *,
    trial: int | None = None,
    fold: int = 0,
    force: bool = False,
    storage: str | None = None,
) -> dict[str, Any]:
    """Export the model of the run folder ``directory`` (see the module docstring) to ``out``
    (default :func:`default_export_path`) and its YAML card beside it. Refuses an existing
    ``out`` or card unless ``force``. Returns the card plus ``weights_path`` and
    ``card_path``. Every user mistake is one :class:`ConfigError`; nothing is written then."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ConfigError(f"run directory not found: {str(directory)!r}")
    weights = Path(out) if out is not None else default_export_path(directory, trial)
    if weights.suffix.lower() in (".yaml", ".yml"):
        raise ConfigError(
            f"--out: {str(weights)!r} names the YAML card; give the weights file (e.g. "
            f"{str(weights.with_suffix('.pt'))!r}): the card is written beside it"
        )
    card_file = card_path(weights)
    if not force:
        for path in (weights, card_file):
            if os.path.lexists(path):
                raise ConfigError(
                    f"--out: {str(path)!r} already exists; choose another --out or pass --force "
                    "to replace it"
                )
    for path in (weights, card_file):
        if path.is_dir():
            raise ConfigError(f"--out: {str(path)!r} is a folder, not a file")
    check_writable_dir("--out", weights.parent)
    found, config = _find(directory, trial, fold, storage)
    card = _card(found, config, directory)
    state_dict = OrderedDict(
        (name, tensor.detach().to("cpu").clone())
        for name, tensor in found["state"]["model"].items()
    )
    _module(card, state_dict, where=str(found["source"]["checkpoint"]))  # it must load
    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    payload = buffer.getvalue()
    card = {**card, "weights": weights.name, "sha256": hashlib.sha256(payload).hexdigest()}
    weights.parent.mkdir(parents=True, exist_ok=True)
    replaced = os.path.lexists(weights)
    with atomic_write(weights, "wb") as fh:
        fh.write(payload)
    try:
        write_text(card_file, yaml.safe_dump(card, sort_keys=False))
    except BaseException:
        # No weights without their card. A replaced (--force) pair keeps the old card, which
        # load_exported refuses for these weights (SHA-256).
        if not replaced:
            weights.unlink(missing_ok=True)
        raise
    return {**card, "weights_path": weights, "card_path": card_file, "what": found["what"]}


# ---------------------------------------------------------------------- loading
def _module(card: Mapping[str, Any], state_dict: Mapping[str, Any], where: str) -> nn.Module:
    """``build_model`` from the card with ``state_dict`` loaded strictly."""
    model = build_model(card["model"], tuple(card["input_shape"]), int(card["num_outputs"]))
    try:
        model.load_state_dict(state_dict)
    except RuntimeError as exc:
        first = str(exc).splitlines()[0] if str(exc) else ""
        raise ConfigError(
            f"{where}: the weights do not fit the model {dict(card['model'])!r} ({first})"
        ) from exc
    return model


def read_export(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The YAML card of an export, given its ``.pt`` or its ``.yaml``; a ConfigError when it
    is missing or not an export card."""
    path = Path(path)
    card_file = path if path.suffix.lower() in (".yaml", ".yml") else card_path(path)
    if not card_file.is_file():
        raise ConfigError(
            f"{str(card_file)!r}: missing: the YAML card of the export (written beside the "
            "weights by `gradhpo export`) is needed to rebuild the model"
        )
    card = load_yaml(card_file)
    if card.get("format") != EXPORT_FORMAT:
        raise ConfigError(
            f"{str(card_file)!r}: not a gradhpo export card (format {card.get('format')!r}, "
            f"expected {EXPORT_FORMAT!r})"
        )
    missing = sorted({"model", "input_shape", "num_outputs", "weights", "sha256"} - set(card))
    if missing:
        raise ConfigError(f"{str(card_file)!r}: missing key(s) {missing}")
    return {**card, "card_path": card_file, "weights_path": card_file.parent / card["weights"]}


def load_exported(path: str | os.PathLike[str], *, device: str | torch.device = "cpu") -> nn.Module:
    """The ``nn.Module`` of an export (its ``.pt`` or ``.yaml``), weights loaded, in eval
    mode, on ``device``. The weights must be the ones the card was written with (SHA-256)."""
    card = read_export(path)
    weights = Path(card["weights_path"])
    if not weights.is_file():
        raise ConfigError(f"{str(weights)!r}: missing: the weights named by {card['card_path']}")
    payload = weights.read_bytes()
    if hashlib.sha256(payload).hexdigest() != card["sha256"]:
        raise ConfigError(
            f"{str(weights)!r}: these weights are not the ones {str(card['card_path'])!r} was "
            "written with (SHA-256 differs); export again"
        )
    state_dict = torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
    model = _module(card, state_dict, where=str(weights))
    return model.to(device).eval()
