"""`gradhpo tune / resume / report` end to end on a tiny CNN, bad configs, and resume after a
killed process."""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import yaml

from gradhpo.cli import main
from gradhpo.run import EarlyStopping
from gradhpo.search import create_study, fit_trial, load_study
from gradhpo.search.study import load_optuna_study

optuna.logging.set_verbosity(optuna.logging.WARNING)

TINY = {
    "name": "tiny",
    "data": {"name": "digits", "seed": 0},
    "model": {"name": "cnn", "depth": 1, "width": 4, "norm": "none"},
    "optimizer": {"name": "sgd", "lr": 0.1, "momentum": 0.9},
    "tuner": {
        "hypers": [{"name": "lr", "granularity": "per_tensor"}],
        "method": "reverse",
        "horizon": 3,
        "hyper_lr": 0.05,
    },
    "training": {"epochs": 2, "batch_size": 128, "device": "cpu", "seed": 0},
    "search": {
        "space": {
            "model.depth": {"type": "int", "low": 1, "high": 2},
            "model.width": {"type": "int", "low": 2, "high": 6, "per_layer": "model.depth"},
            "optimizer.lr": {"type": "float", "low": 0.02, "high": 0.3, "log": True},
        },
        "sampler": {"name": "tpe", "n_startup_trials": 2},
        "pruner": None,
        "trials": 3,
    },
}


def write(tmp_path: Path, config: dict, name: str = "config.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


def tune(tmp_path: Path, config: dict, *extra: str) -> int:
    path = write(tmp_path, config)
    return main(["tune", str(path), "--out", str(tmp_path / "runs"), "--no-progress", *extra])


def event_scalars(folder: Path) -> dict[str, list[float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder))
    acc.Reload()
    return {tag: [e.value for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_tune_writes_study_checkpoints_logs_and_report(tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert tune(tmp_path, TINY) == 0
    out = capsys.readouterr().out
    assert "tiny: best trial" in out and "test accuracy" in out
    run_dir = tmp_path / "runs" / "tiny"
    assert {p.name for p in run_dir.iterdir()} >= {
        "study.journal",
        "study.json",
        "config.yaml",
        "sampler_state.bin",
        "trials",
    }
    study = load_study(run_dir)
    assert len(study.finished_trials()) == 3
    best = study.best_trial
    # Only the best trial keeps weights; no unfinished-trial checkpoint is left behind.
    assert sorted(p.relative_to(run_dir).as_posix() for p in run_dir.rglob("*.pt")) == [
        f"trials/{best.number:04d}/best_0.pt"
    ]
    summary = study.optuna.user_attrs["best_test"]
    assert summary["trial"] == best.number and 0.0 <= summary["test_accuracy"] <= 1.0

    # TensorBoard: per-layer lr trajectories of the granular tuner, hypergradient norms, metrics.
    tb = tmp_path / "tensorboard_logs" / "tiny" / "trial_0000"
    scalars = event_scalars(tb)
    lr_tags = [t for t in scalars if t.startswith("hyper/lr/")]
    assert lr_tags and all(len(scalars[t]) >= 4 for t in lr_tags)
    assert len(set(scalars[lr_tags[0]])) > 1  # the trajectory moves
    assert {"tuner/hypergrad_norm", "tuner/rejected_steps", "val/accuracy", "train/loss"} <= set(
        scalars
    )
    assert list(tb.rglob("events.out.tfevents.*"))  # plus the hparams summary's own file

    assert main(["report", str(run_dir)]) == 0
    report = run_dir / "report"
    for png in ("optimization_history.png", "hyperparameters.png", "parallel_coordinates.png"):
        assert (report / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = (report / "results.csv").read_text().strip().splitlines()
    assert len(rows) == 4 and "model.depth" in rows[0]
    assert "Best trial" in (report / "results.md").read_text()


def test_cross_validation_trains_every_fold(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    config = copy.deepcopy(TINY)
    config["search"].update(trials=2, cv_folds=2)
    config["training"]["epochs"] = 1
    assert tune(tmp_path, config) == 0
    run_dir = tmp_path / "runs" / "tiny"
    progress = json.loads((run_dir / "trials" / "0000" / "progress.json").read_text())
    folds = progress["history"][0]["folds"]
    assert len(folds) == 2 and folds[0]["val_accuracy"] != folds[1]["val_accuracy"]
    assert progress["history"][0]["value"] == pytest.approx(
        (folds[0]["val_accuracy"] + folds[1]["val_accuracy"]) / 2
    )
    assert (tmp_path / "tensorboard_logs" / "tiny" / "trial_0000" / "fold_1").is_dir()
    best = load_study(run_dir).best_trial
    assert sorted(p.name for p in (run_dir / "trials" / f"{best.number:04d}").glob("*.pt")) == [
        "best_0.pt",
        "best_1.pt",
    ]


def test_early_stopping_ends_a_plateaued_trial(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    config = copy.deepcopy(TINY)
    config["tuner"] = None
    config["optimizer"]["lr"] = 1e-9  # nothing moves: validation accuracy is flat
    config["training"]["epochs"] = 5
    config["search"].update(
        trials=1,
        early_stopping={"patience": 1},
        space={"model.width": {"type": "int", "low": 2, "high": 3}},
    )
    assert tune(tmp_path, config) == 0
    trial = load_study(tmp_path / "runs" / "tiny").finished_trials()[0]
    assert trial.user_attrs["epochs"] == 2 and len(trial.intermediate_values) == 2


def test_early_stopping_rule() -> None:
    stop = EarlyStopping(2, min_delta=0.01)
    assert [stop(v) for v in (0.5, 0.6, 0.605, 0.61, 0.7)] == [False, False, False, True, False]
    low = EarlyStopping(1, mode="min")
    assert [low(v) for v in (1.0, 0.5, 0.7)] == [False, False, True]
    with pytest.raises(ValueError, match="patience must be an integer >= 1, got 0"):
        EarlyStopping(0)


def _set(config: dict, path: str, value) -> dict:
    config = copy.deepcopy(config)
    *parents, leaf = path.split("/")
    node = config
    for key in parents:
        node = node[key]
    if value is _DELETE:
        del node[leaf]
    else:
        node[leaf] = value
    return config


_DELETE = object()
BAD_CONFIGS = [
    ("search/colour", "red", r"search: unknown key\(s\) \['colour'\]"),
    ("search/trials", "many", r"search.trials: expected an integer, got 'many'"),
    ("search/trials", 0, r"search.trials: expected an integer >= 1, got 0"),
    (
        "search/space/model.depth",
        {"type": "categorical", "choices": []},
        r"search.space.model.depth.choices: expected at least one choice, got \[\]",
    ),
    (
        "search/space/model.depth",
        {"type": "int", "low": 3, "high": 1},
        r"search.space.model.depth: low must be <= high, got low=3 > high=1",
    ),
    (
        "search/space/optimizer.lr",
        {"type": "float", "low": 0, "high": 0.3, "log": True},
        r"search.space.optimizer.lr.low: a log-scale range needs low > 0, got 0",
    ),
    (
        "search/space/optimizer.lr",
        {"type": "float", "low": "x", "high": 0.3},
        r"search.space.optimizer.lr.low: expected a finite number, got 'x'",
    ),
    ("search/sampler", "bayesian", r"search.sampler.name: unknown sampler 'bayesian'"),
    (
        "search/sampler",
        {"name": "tpe", "startup": 2},
        r"search.sampler: unknown key\(s\) \['startup'\]",
    ),
    ("search/pruner", "aggressive", r"search.pruner.name: unknown pruner 'aggressive'"),
    (
        "search/metric",
        "accuracy",
        r"search.metric: expected one of \['val_accuracy', 'val_loss'\], got 'accuracy'",
    ),
    ("search/cv_folds", 1, r"search.cv_folds: expected an integer >= 2, got 1"),
    ("search/timeout", -5, r"search.timeout: expected a number of seconds > 0 or null, got -5"),
    (
        "search/early_stopping",
        {"patience": 0},
        r"search.early_stopping.patience: expected an integer >= 1, got 0",
    ),
    (
        "search/space/model.name",
        {"type": "categorical", "choices": ["cnn", "transformer"]},
        r"search.space.model.name='transformer': gives an invalid run: .*transformer",
    ),
    (
        "search/space/model.pooling",
        {"type": "categorical", "choices": ["max", "median"]},
        r"search.space.model.pooling='median'.*'median'",
    ),
    ("model/name", "vit", r"config: gives an invalid run: .*'vit'"),
    ("data/name", "imagenet", r"imagenet"),
    ("training/epochs", 0, r"training.epochs: expected an integer >= 1, got 0"),
    ("search", _DELETE, r"search: section is required"),
    (
        "search/space/data.seed",
        {"type": "int", "low": 0, "high": 2},
        r"section 'data' cannot be searched",
    ),
    # Values the constructors accept but every trial would fail on: the pre-flight's dry
    # study of the sampler and pruner catches them.
    (
        "search/sampler",
        {"name": "tpe", "n_startup_trials": "x"},
        r"search.sampler: \{'n_startup_trials': 'x', 'name': 'tpe'\} fails in a dry run",
    ),
    (
        "search/sampler",
        {"name": "cmaes", "sigma0": "x"},
        r"search.sampler: \{'name': 'cmaes', 'sigma0': 'x'\} fails in a dry run .*TypeError",
    ),
    (
        "search/pruner",
        {"name": "median", "n_warmup_steps": "x"},
        r"search.pruner: .*'n_warmup_steps': 'x'",
    ),
]


@pytest.mark.parametrize(
    ("path", "value", "message"), BAD_CONFIGS, ids=[f"{p}={v}" for p, v, _ in BAD_CONFIGS]
)
def test_bad_config_one_line_exit_2_nothing_written(
    tmp_path: Path, capsys, monkeypatch, path, value, message
) -> None:
    monkeypatch.chdir(tmp_path)
    assert tune(tmp_path, _set(TINY, path, value)) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("gradhpo: error: ") and "\n" not in err
    assert __import__("re").search(message, err), err
    assert not (tmp_path / "runs").exists() and not (tmp_path / "tensorboard_logs").exists()


def test_cli_refuses_existing_study_and_bad_paths(tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    config = _set(TINY, "search/trials", 1)
    config["training"]["epochs"] = 1
    assert tune(tmp_path, config) == 0
    capsys.readouterr()
    assert tune(tmp_path, config) == 2
    assert "already holds a study; continue it with `gradhpo resume" in capsys.readouterr().err
    for argv in (
        ["resume", str(tmp_path / "nope")],
        ["report", str(tmp_path / "nope")],
        ["resume", str(tmp_path)],
    ):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "gradhpo: error:" in err
    assert main(["tune", str(tmp_path / "missing.yaml")]) == 2
    assert "config file not found" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["tune", "--help"])
    assert exc.value.code == 0 and "--trials" in capsys.readouterr().out


def _trials(directory: Path) -> list[tuple[int, str]]:
    study = load_optuna_study(directory)
    return [(t.number, t.state.name) for t in study.get_trials(deepcopy=False)]


def _by_origin(study) -> list[tuple[dict, float]]:
    """Finished trials in the order the sampler proposed them (a retry takes its origin's place)."""
    done = study.finished_trials()
    key = lambda t: t.user_attrs.get("gradhpo:resume_from", t.number)  # noqa: E731
    return [(t.params, t.value) for t in sorted(done, key=key)]


def test_resume_after_killed_process_keeps_trials_and_sampler(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    config = copy.deepcopy(TINY)
    config["search"]["trials"] = 4
    config["training"]["epochs"] = 3  # a wide window to kill trial 2 between epochs 1 and 3

    # Reference: the same study, uninterrupted.
    (tmp_path / "ref").mkdir()
    assert (
        main(
            [
                "tune",
                str(write(tmp_path, config, "ref.yaml")),
                "--out",
                str(tmp_path / "ref"),
                "--no-progress",
            ]
        )
        == 0
    )
    reference = _by_origin(load_study(tmp_path / "ref" / "tiny"))

    cfg = write(tmp_path, config, "killed.yaml")
    run_dir = tmp_path / "runs" / "tiny"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "gradhpo.cli",
            "tune",
            str(cfg),
            "--out",
            str(tmp_path / "runs"),
            "--no-progress",
        ],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 120
    try:
        # Kill in the middle of trial 2: after its first epoch's checkpoint, before it ends.
        while time.monotonic() < deadline:
            if (run_dir / "trials" / "0002" / "progress.json").is_file():
                break
            assert proc.poll() is None, proc.stderr.read().decode()
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    before = dict(_trials(run_dir))
    assert (
        before.get(0) == "COMPLETE" and before.get(1) == "COMPLETE" and before.get(2) == "RUNNING"
    )
    finished_before = {t.number: (t.params, t.value) for t in load_study(run_dir).finished_trials()}

    assert main(["resume", str(run_dir), "--no-progress"]) == 0
    study = load_study(run_dir)
    done = study.finished_trials()
    assert len(done) == 4  # exactly the requested number; the dead trial is not counted
    for number, (params, value) in finished_before.items():  # nothing finished was lost or redone
        match = [t for t in done if t.number == number]
        assert match and match[0].params == params and match[0].value == value
    retry = [t for t in done if t.user_attrs.get("gradhpo:resume_from") == 2]
    assert len(retry) == 1 and retry[0].user_attrs["gradhpo:resumed_at_epoch"] >= 1
    # The sampler went on where it was: same proposals (and, training being deterministic on
    # the CPU, the same values) as the uninterrupted study.
    resumed = _by_origin(study)
    assert [p for p, _ in resumed] == [p for p, _ in reference]
    assert [v for _, v in resumed] == pytest.approx([v for _, v in reference], abs=1e-6)


def test_python_api_define_by_run_and_ask_tell(tmp_path: Path) -> None:
    from gradhpo.run import TrainingRun

    study = create_study(tmp_path / "api", sampler="random", pruner="median", seed=0)

    def objective(trial):
        width = trial.suggest_int("width", 2, 4)
        run = TrainingRun(
            model={"name": "mlp", "width": width, "depth": 1},
            data="synthetic",
            batch_size=32,
            device="cpu",
            tuner={"hypers": [{"name": "lr"}], "horizon": 2},
        )
        return fit_trial(trial, run, epochs=2, study=study)

    study.optimize(objective, n_trials=2)
    trial = study.ask()
    study.tell(trial, 0.5)
    values = [t.value for t in study.finished_trials()]
    assert len(values) == 3 and all(0.0 <= v <= 1.0 for v in values)
    assert all(len(t.intermediate_values) == 2 for t in study.finished_trials()[:2])


def test_baseline_is_the_untuned_default_at_the_same_wall_clock(
    tmp_path: Path, capsys, monkeypatch
) -> None:
    monkeypatch.chdir(tmp_path)
    config = _set(TINY, "search/trials", 2)
    assert tune(tmp_path, config, "--baseline") == 0
    out = capsys.readouterr().out
    line = [x for x in out.splitlines() if "untuned default" in x]
    assert len(line) == 1 and "tuned:" in line[0], out
    study = load_study(tmp_path / "runs" / "tiny")
    base = study.optuna.user_attrs["baseline"]
    assert base["epochs"] >= 1 and base["steps"] > 0
    assert 0.0 <= base["test_accuracy"] <= 1.0
    # whole epochs until the study's wall-clock seconds are used up
    assert base["seconds"] >= base["budget"] > 0


def test_baseline_must_be_a_boolean(tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert tune(tmp_path, _set(TINY, "search/baseline", "yes")) == 2
    assert "search.baseline: expected true or false, got 'yes'" in capsys.readouterr().err


# ---------------------------------------------------------------- pre-flight, all-fail, counts
def test_an_unusable_tensorboard_dir_is_refused_by_the_pre_flight(
    tmp_path: Path, capsys, monkeypatch
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "afile").write_text("x")
    config = copy.deepcopy(TINY)
    config["output"] = {"tensorboard_dir": "afile/tb"}
    assert tune(tmp_path, config) == 2
    err = capsys.readouterr().err
    assert err == (
        "gradhpo: error: output.tensorboard_dir: 'afile/tb' cannot be created: 'afile' is a "
        "file; choose another path\n"
    )
    assert not (tmp_path / "runs").exists()


def test_a_study_whose_trials_all_fail_the_same_way_stops_with_the_reason(
    tmp_path: Path, capsys, monkeypatch
) -> None:
    """Not a silent exit 0 with N failed trials: the first 3 fail alike, the study stops."""
    from gradhpo.jobs import tune as tune_job

    monkeypatch.chdir(tmp_path)

    def broken(self, params):
        raise RuntimeError(f"disk quota exceeded writing trial with {params}")

    monkeypatch.setattr(tune_job.ConfigObjective, "build_runs", broken)
    config = _set(TINY, "search/trials", 6)
    assert tune(tmp_path, config) == 1
    captured = capsys.readouterr()
    last = captured.err.strip().splitlines()[-1]
    assert last.startswith("gradhpo: error: tiny: stopped: the first 3 trial(s) all failed")
    assert "RuntimeError: disk quota exceeded" in last
    assert "3 of 6 trials finished: 0 complete, 0 pruned, 3 failed" in captured.out
    assert [state for _, state in _trials(tmp_path / "runs" / "tiny")] == ["FAIL"] * 3
    # Failures with different exceptions are not "the same reason": the study goes on.
    calls = iter(range(100))

    def flaky(self, params):
        raise (RuntimeError, ValueError, KeyError)[next(calls) % 3]("flaky")

    monkeypatch.setattr(tune_job.ConfigObjective, "build_runs", flaky)
    config = _set(_set(TINY, "search/trials", 4), "name", "flaky")
    assert tune(tmp_path, config) == 1  # ... but ends with none complete: still a failure
    captured = capsys.readouterr()
    assert "4 of 4 trials finished: 0 complete, 0 pruned, 4 failed" in captured.out
    assert (
        captured.err.strip()
        .splitlines()[-1]
        .startswith("gradhpo: error: flaky: no trial completed")
    )


@pytest.mark.parametrize("metric", ["val_accuracy", "val_loss"])
def test_a_diverged_trial_is_pruned_with_its_reason_under_every_metric(
    tmp_path: Path, capsys, monkeypatch, metric: str
) -> None:
    """One rule: PRUNED + user attr 'diverged' (it was COMPLETE 0.0 under val_accuracy and
    FAIL under val_loss), reported in the counts; the study goes on and ends well."""
    monkeypatch.chdir(tmp_path)
    config = copy.deepcopy(TINY)
    config.pop("tuner")
    config["training"]["epochs"] = 1
    config["search"] = {
        "space": {"optimizer.lr": {"type": "categorical", "choices": [0.1, 1.0e9]}},
        "sampler": "grid",
        "pruner": None,
        "metric": metric,
        "trials": 2,
    }
    assert tune(tmp_path, config) == 0
    out = capsys.readouterr().out
    assert "2 of 2 trials finished: 1 complete, 1 pruned (1 diverged), 0 failed" in out
    study = load_optuna_study(tmp_path / "runs" / "tiny")
    by_lr = {t.params["optimizer.lr"]: t for t in study.trials}
    bad = by_lr[1.0e9]
    assert bad.state.name == "PRUNED" and bad.value is None
    assert bad.user_attrs["diverged"] == "diverged: non-finite training loss in epoch 1"
    assert by_lr[0.1].state.name == "COMPLETE"
    assert study.user_attrs["counts"]["diverged"] == 1


def test_fit_trial_prunes_a_diverged_run(tmp_path: Path) -> None:
    from gradhpo.run import TrainingRun

    study = create_study(tmp_path / "s", metric="val_loss", sampler="random", pruner=None)

    def objective(trial):
        lr = trial.suggest_float("lr", 1e9, 1e10, log=True)
        config = {**TINY, "optimizer": {"name": "sgd", "lr": lr}, "tuner": None}
        run = TrainingRun.from_config(config, device="cpu")
        return fit_trial(trial, run, 1, metric="val_loss", study=study)

    study.optimize(objective, n_trials=1)
    (trial,) = study.trials
    assert trial.state.name == "PRUNED" and trial.user_attrs["diverged"].startswith("diverged")
    assert study.trial_counts() == {
        "complete": 0,
        "pruned": 1,
        "diverged": 1,
        "failed": 0,
        "finished": 1,
        "running": 0,
        "waiting": 0,
        "not_counted": 0,
    }


def test_a_retried_trial_with_damaged_files_starts_over(
    tmp_path: Path, capsys, monkeypatch, caplog
) -> None:
    """A trial interrupted after its first epoch is queued again; if its last checkpoint is
    damaged by then, the retry trains from scratch (a warning names the files) instead of
    failing."""
    from gradhpo.jobs import tune as tune_job

    monkeypatch.chdir(tmp_path)
    real = tune_job.write_json

    def interrupted(path, payload, *args, **kwargs):
        real(path, payload, *args, **kwargs)
        if Path(path).name == "progress.json" and payload["epoch"] == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(tune_job, "write_json", interrupted)
    config = _set(TINY, "search/trials", 1)
    assert tune(tmp_path, config) == 130
    monkeypatch.setattr(tune_job, "write_json", real)
    study_dir = tmp_path / "runs" / "tiny"
    (study_dir / "trials" / "0000" / "last_0.pt").write_bytes(b"damaged")
    capsys.readouterr()
    with caplog.at_level("WARNING", logger="gradhpo.search"):
        assert main(["resume", str(study_dir), "--no-progress"]) == 0
    assert "cannot continue from trial 0's files" in caplog.text
    assert "starts from scratch" in caplog.text
    (done,) = load_study(study_dir).finished_trials()
    assert done.state.name == "COMPLETE" and done.user_attrs["epochs"] == 2
    assert "gradhpo:resumed_at_epoch" not in done.user_attrs  # trained from epoch 0
    assert "1 of 1 trials finished: 1 complete" in capsys.readouterr().out


@pytest.mark.slow
def test_tune_killed_at_many_points_resumes_to_the_uninterrupted_result(
    tmp_path: Path, monkeypatch
) -> None:
    """`gradhpo tune` / `resume` killed (SIGKILL) inside study creation, between trials, in
    the middle of trials and right at checkpoint writes; every restart continues, and the
    study ends with exactly the trials, parameters and values of the uninterrupted run."""
    monkeypatch.chdir(tmp_path)
    config = copy.deepcopy(TINY)
    config["search"]["trials"] = 5
    config["training"]["epochs"] = 3
    (tmp_path / "ref").mkdir()
    cfg = write(tmp_path, config)
    assert main(["tune", str(cfg), "--out", str(tmp_path / "ref"), "--no-progress"]) == 0
    reference = _by_origin(load_study(tmp_path / "ref" / "tiny"))

    runs = tmp_path / "runs"
    run_dir = runs / "tiny"
    # Kill when the pattern first exists under runs/ (plus a delay); creation: the hidden
    # sibling the study is built in (or, if it was too quick to be seen, the study itself).
    kills = [
        (".tiny.*.tmp", 0.0),
        ("tiny/trials/0000/progress.json", 0.0),
        ("tiny/trials/0001", 0.3),
        ("tiny/trials/0002/last_0.pt", 0.0),
        ("tiny/trials/0003/best_0.pt", 0.05),
        ("tiny/trials/0004", 0.0),
    ]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    for pattern, delay in kills:
        command = (
            ["resume", str(run_dir)]
            if (run_dir / "gradhpo.json").is_file()
            else ["tune", str(cfg), "--out", str(runs)]
        )
        proc = subprocess.Popen(
            [sys.executable, "-m", "gradhpo.cli", *command, "--no-progress"],
            cwd=tmp_path,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        deadline = time.monotonic() + 180
        try:
            while time.monotonic() < deadline and proc.poll() is None:
                if list(runs.glob(pattern)) or (pattern.startswith(".") and run_dir.exists()):
                    time.sleep(delay)
                    break
                time.sleep(0.005)
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
        assert proc.returncode in (0, -signal.SIGKILL), proc.stderr.read().decode()
    if not (run_dir / "gradhpo.json").is_file():
        assert main(["tune", str(cfg), "--out", str(runs), "--no-progress"]) == 0
    assert main(["resume", str(run_dir), "--no-progress"]) == 0
    study = load_study(run_dir)
    assert len(study.finished_trials()) == 5
    assert not [t for t in study.trials if t.state.name == "RUNNING"]
    resumed = _by_origin(study)
    assert [p for p, _ in resumed] == [p for p, _ in reference]
    assert [v for _, v in resumed] == pytest.approx([v for _, v in reference], abs=1e-6)


def test_a_new_study_fits_hypergradients_on_a_hyper_validation_split(tmp_path: Path) -> None:
    """tuner.hyper_val_fraction defaults to 0.1 for a new study (kept in its stored config, so
    a resume trains on the same data); null keeps the validation split."""
    from gradhpo.jobs.tune import HYPER_VAL_FRACTION, with_hyper_validation

    config = copy.deepcopy(TINY)
    filled = with_hyper_validation(config)
    assert filled["tuner"]["hyper_val_fraction"] == HYPER_VAL_FRACTION == 0.1
    assert "hyper_val_fraction" not in config["tuner"]  # not modified in place
    config["tuner"]["hyper_val_fraction"] = None
    assert with_hyper_validation(config)["tuner"]["hyper_val_fraction"] is None
    config["tuner"] = {**TINY["tuner"], "objective": "train_mean"}
    assert "hyper_val_fraction" not in with_hyper_validation(config)["tuner"]
    assert with_hyper_validation({**TINY, "tuner": None})["tuner"] is None

    config = copy.deepcopy(TINY)
    config["search"]["trials"] = 1
    assert tune(tmp_path, config) == 0
    stored = yaml.safe_load((tmp_path / "runs" / "tiny" / "config.yaml").read_text())
    assert stored["tuner"]["hyper_val_fraction"] == 0.1
