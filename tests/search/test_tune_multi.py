"""Multi-objective studies from a config: `search.metric: [val_accuracy, params]` through
`gradhpo tune`, the Pareto front evaluated on the test set, report and export of a Pareto
trial, the config errors, and resume after a killed process."""

from __future__ import annotations

import copy
import json
import os
import re
from pathlib import Path

import optuna
import pytest
import torch
import yaml
from gradhpo.models import build_model, count_parameters

from gradhpo.cli import main
from gradhpo.data import load_data
from gradhpo.jobs.export import load_exported
from gradhpo.run import TrainingRun
from gradhpo.search import load_study
from gradhpo.search.study import load_optuna_study

optuna.logging.set_verbosity(optuna.logging.WARNING)

MULTI = {
    "name": "mo",
    "data": {"name": "digits", "seed": 0},
    "model": {"name": "cnn", "depth": 1, "width": 4, "norm": "none"},
    "optimizer": {"name": "sgd", "lr": 0.1, "momentum": 0.9},
    "training": {"epochs": 1, "batch_size": 64, "device": "cpu", "seed": 0},
    "search": {
        "space": {
            "model.width": {"type": "int", "low": 2, "high": 12},
            "optimizer.lr": {"type": "float", "low": 0.02, "high": 0.3, "log": True},
        },
        "sampler": {"name": "nsga2", "population_size": 2},
        "metric": ["val_accuracy", "params"],
        "trials": 4,
    },
}


def write(tmp_path: Path, config: dict, name: str = "config.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


def tune(tmp_path: Path, config: dict, *extra: str) -> int:
    path = write(tmp_path, config)
    return main(["tune", str(path), "--out", str(tmp_path / "runs"), "--no-progress", *extra])


def _set(config: dict, path: str, value) -> dict:
    config = copy.deepcopy(config)
    *parents, leaf = path.split("/")
    node = config
    for key in parents:
        node = node[key]
    node[leaf] = value
    return config


def test_a_two_objective_study_from_a_config(tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert tune(tmp_path, MULTI) == 0
    out = capsys.readouterr().out
    run_dir = tmp_path / "runs" / "mo"
    study = load_study(run_dir)
    assert study.directions == ["maximize", "minimize"]
    assert study.optuna.metric_names == ["val_accuracy", "params"]
    assert json.loads((run_dir / "study.json").read_text())["pruner"] is None
    done = study.finished_trials()
    assert len(done) == 4 and all(t.state.name == "COMPLETE" for t in done)
    for t in done:  # the second objective is the parameter count of the trial's model
        model = build_model({**MULTI["model"], "width": t.params["model.width"]}, (1, 8, 8), 10)
        assert t.values[1] == count_parameters(model)
        assert t.user_attrs["objectives"] == {"val_accuracy": t.values[0], "params": t.values[1]}
        assert not t.intermediate_values  # nothing reported: no pruning in a multi-objective study

    # The Pareto front: printed, evaluated on the test set, its weights kept (only its).
    front = sorted(t.number for t in study.best_trials)
    assert f"mo: Pareto front of {len(front)} trial(s) over val_accuracy (maximize), params " in out
    for number in front:
        assert re.search(rf"mo:   trial {number}: val_accuracy [\d.]+, params \d+; ", out), out
    assert f"export one with `gradhpo export {run_dir} --trial N` (N in {front})" in out
    stored = study.optuna.user_attrs["pareto_test"]
    assert [e["trial"] for e in stored] == front
    assert all(0.0 <= e["test_accuracy"] <= 1.0 and e["test_loss"] > 0 for e in stored)
    assert set(stored[0]["values"]) == {"val_accuracy", "params"}
    assert "best_test" not in study.optuna.user_attrs
    kept = sorted(p.relative_to(run_dir).as_posix() for p in run_dir.rglob("*.pt"))
    assert kept == [f"trials/{n:04d}/best_0.pt" for n in front]

    # gradhpo report draws the history of every objective and names them.
    assert main(["report", str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert "Pareto front of" in out and "4 trial(s): 4 complete" in out
    md = (run_dir / "report" / "results.md").read_text()
    assert "value 0: val_accuracy (higher is better)" in md
    assert "value 1: params (lower is better)" in md
    for png in ("optimization_history.png", "hyperparameters.png", "parallel_coordinates.png"):
        assert (run_dir / "report" / png).read_bytes()[:4] == b"\x89PNG"

    # Export: a Pareto trial by number; without one there is no single best to choose.
    assert main(["export", str(run_dir)]) == 2
    err = capsys.readouterr().err
    assert "multi-objective study" in err and f"--trial (trials {front})" in err
    assert main(["export", str(run_dir), "--trial", str(front[0])]) == 0
    weights = run_dir / "export" / f"trial_{front[0]:04d}.pt"
    card = yaml.safe_load(weights.with_suffix(".yaml").read_text())
    assert card["metric"] == ["val_accuracy", "params"]
    assert card["value"] == list(study.optuna.trials[front[0]].values)
    assert card["test"]["accuracy"] == stored[0]["test_accuracy"]
    run = TrainingRun.from_checkpoint(
        run_dir / "trials" / f"{front[0]:04d}" / "best_0.pt",
        data=load_data(MULTI["data"])[1],
        device="cpu",
    )
    x = run.data.test.x[:8]
    run.model.eval()
    with torch.no_grad():
        assert torch.equal(load_exported(weights)(x), run.model(x))


def test_latency_is_a_measured_objective_with_tpe(tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    config = _set(MULTI, "search/metric", ["val_loss", "latency_ms"])
    config["search"].update(sampler={"name": "tpe", "n_startup_trials": 1}, trials=2)
    config["search"]["directions"] = ["minimize", "minimize"]  # may be given; must agree
    assert tune(tmp_path, config) == 0
    study = load_study(tmp_path / "runs" / "mo")
    assert study.directions == ["minimize", "minimize"]
    for t in study.finished_trials():
        assert t.state.name == "COMPLETE" and 0.0 < t.values[1] < 10_000.0
    assert "latency_ms" in capsys.readouterr().out


def test_a_diverged_trial_is_pruned_in_a_multi_objective_study(
    tmp_path: Path, capsys, monkeypatch
) -> None:
    monkeypatch.chdir(tmp_path)
    config = copy.deepcopy(MULTI)
    config["search"].update(
        space={"optimizer.lr": {"type": "categorical", "choices": [0.1, 1.0e9]}},
        sampler="grid",
        trials=2,
    )
    assert tune(tmp_path, config) == 0
    assert "2 of 2 trials finished: 1 complete, 1 pruned (1 diverged)" in capsys.readouterr().out
    study = load_optuna_study(tmp_path / "runs" / "mo")
    by_lr = {t.params["optimizer.lr"]: t for t in study.trials}
    assert by_lr[1.0e9].state.name == "PRUNED" and by_lr[1.0e9].user_attrs["diverged"]
    assert [t.number for t in study.best_trials] == [by_lr[0.1].number]


BAD = [
    (
        ["val_accuracy", "flops"],
        None,
        r"search.metric\[1\]: unknown objective 'flops'; expected one of \['val_accuracy', "
        r"'val_loss', 'params', 'latency_ms'\]",
    ),
    (["params", "latency_ms"], None, r"search.metric: expected exactly one of \['val_accuracy'"),
    (["val_accuracy", "val_loss"], None, r"search.metric: expected exactly one of"),
    (["val_accuracy", "params", "params"], None, r"search.metric: an objective is named twice"),
    ([], None, r"search.metric: expected one of .* or a non-empty list"),
    ("params", None, r"'params' is a model property, for a multi-objective study"),
    (
        ["val_accuracy", "params"],
        {"directions": ["maximize", "maximize"]},
        r"search.directions: \['maximize', 'maximize'\] does not match the objectives "
        r"\['val_accuracy', 'params'\], whose directions are \['maximize', 'minimize'\]",
    ),
    (
        ["val_accuracy", "params"],
        {"pruner": "median"},
        r"search.pruner: 'median' cannot prune a multi-objective study",
    ),
    (
        ["val_accuracy", "params"],
        {"sampler": {"name": "cmaes"}},
        r"search.sampler: 'cmaes' optimizes one objective",
    ),
    (
        ["val_accuracy", "params"],
        {"baseline": True},
        r"search.baseline: compares the best trial with the untuned default",
    ),
    ("val_loss", {"directions": ["maximize"]}, r"search.directions: \['maximize'\] does not"),
]


@pytest.mark.parametrize(("metric", "extra", "message"), BAD, ids=[b[2][:40] for b in BAD])
def test_bad_objectives_are_one_line_exit_2_nothing_written(
    tmp_path: Path, capsys, monkeypatch, metric, extra, message
) -> None:
    monkeypatch.chdir(tmp_path)
    config = _set(MULTI, "search/metric", metric)
    config["search"].update(extra or {})
    assert tune(tmp_path, config) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("gradhpo: error: ") and "\n" not in err
    assert re.search(message, err), err
    assert not (tmp_path / "runs").exists() and not (tmp_path / "tensorboard_logs").exists()


KILLED = {**MULTI, "training": {**MULTI["training"], "epochs": 3}}  # a window inside trial 2
KILLED["search"] = {**MULTI["search"], "sampler": {"name": "tpe", "n_startup_trials": 2}}


def _by_origin(directory: Path) -> list[tuple[dict, list[float]]]:
    """Finished trials as (params, values) in the order of the trial each continues."""
    done = load_study(directory).finished_trials()
    key = lambda t: t.user_attrs.get("gradhpo:resume_from", t.number)  # noqa: E731
    return [(t.params, t.values) for t in sorted(done, key=key)]


@pytest.fixture(scope="module")
def killed_reference(tmp_path_factory) -> tuple[Path, list[tuple[dict, list[float]]]]:
    """The uninterrupted study the killed ones must end as (one for the module)."""
    root = tmp_path_factory.mktemp("mo_reference")
    cfg = write(root, KILLED)
    cwd = os.getcwd()
    os.chdir(root)
    try:
        assert main(["tune", str(cfg), "--out", str(root / "ref"), "--no-progress"]) == 0
    finally:
        os.chdir(cwd)
    return cfg, _by_origin(root / "ref" / "mo")


# Named points (tests/kill_points.py), each hit exactly, so each test passes every time:
# (kill point, the epoch trial 2 resumes at; None: it is drawn again, nothing to resume).
MO_KILLS = {
    # Trial 2 has its epoch-1 checkpoint and progress: resumed from epoch 1.
    "after_epoch_1": ("replaced:*/trials/0002/progress.json@1", 1),
    # Its epoch-2 weights are written, the epoch-2 progress is not: still epoch 1's, whose
    # weights were kept as prev_0.pt (the timed kill this test had before landed here about
    # one run in five, and the resumed trial took epoch 2's weights with epoch 1's progress).
    "between_checkpoint_and_progress": ("replaced:*/trials/0002/last_0.pt@2", 1),
    # Trial 2 has drawn its parameters; the sampler state after the draw is not yet saved
    # (the first state creates the file; trials 1 and 2 write theirs into its slots).
    "before_sampler_state": ("write:*/mo/sampler_state.bin@2", None),
    # The same, with the write of that state cut in half: the resume reads the one before.
    "torn_sampler_state": ("torn:*/mo/sampler_state.bin@2", None),
}


@pytest.mark.parametrize("point", MO_KILLS)
def test_a_killed_multi_objective_study_resumes_to_the_uninterrupted_result(
    tmp_path: Path, monkeypatch, killed_reference, point: str
) -> None:
    """`gradhpo tune` killed (SIGKILL) at a named point of trial 2; `gradhpo resume` ends with
    the trials, parameters and values (both objectives) of the uninterrupted study, a trial
    continued from its checkpoint where it had one. A kill timed by polling for a file (as
    this test once did) landed between trial 2's checkpoint and its progress file about one
    run in five, and the resumed trial trained one epoch too many."""
    from kill_points import run_killed

    monkeypatch.chdir(tmp_path)
    cfg, reference = killed_reference
    kill_at, resumed_at = MO_KILLS[point]
    run_dir = tmp_path / "runs" / "mo"
    run_killed(
        kill_at, "tune", str(cfg), "--out", str(tmp_path / "runs"), "--no-progress", cwd=tmp_path
    )
    states = {t.number: t.state.name for t in load_optuna_study(run_dir).trials}
    assert states == {0: "COMPLETE", 1: "COMPLETE", 2: "RUNNING"}

    assert main(["resume", str(run_dir), "--no-progress"]) == 0
    study = load_study(run_dir)
    if resumed_at is not None:
        retry = [t for t in study.finished_trials() if t.user_attrs.get("gradhpo:resume_from") == 2]
        assert len(retry) == 1 and retry[0].user_attrs["gradhpo:resumed_at_epoch"] == resumed_at
    resumed = _by_origin(run_dir)
    assert [p for p, _ in resumed] == [p for p, _ in reference]
    flat = lambda pairs: [x for _, values in pairs for x in values]  # noqa: E731
    assert flat(resumed) == pytest.approx(flat(reference), abs=1e-6)
    assert [e["trial"] for e in study.optuna.user_attrs["pareto_test"]] == sorted(
        t.number for t in study.best_trials
    )
