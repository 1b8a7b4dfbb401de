"""gradhpo.integrations.ray_tune: gradhpo's runs as a Ray Tune function trainable.

Most checks run a trial in this process through ``run_trial`` with a stand-in for Tune's
session (:class:`Session`: ``report`` keeps the metrics and copies each checkpoint, as Tune
persists it before ``report`` returns; ``get_checkpoint`` hands one back): what is reported,
sampled values and their mistakes, exact continuation, PBT's changed values, a tuner inside
the trial. Two slow tests run real Tuners on a local Ray instance (2 CPUs): ASHA over three
trials, and one tuned trial paused by a scheduler and retried after a failure.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

# Before the first `import ray`: a local instance listens on the loopback interface only
# (as gradhpo.execution's RayExecutor sets it).
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
ray = pytest.importorskip("ray")
tune = pytest.importorskip("ray.tune")

from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, TrialScheduler  # noqa: E402

from gradhpo.config import ConfigError  # noqa: E402
from gradhpo.integrations import ray_tune  # noqa: E402
from gradhpo.integrations.ray_tune import (  # noqa: E402
    check_space,
    load_run,
    read_checkpoint,
    run_trial,
    trainable,
)
from gradhpo.run import builder  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

#: Synthetic data (3 classes, 168 training images of 8x8): 5 steps of 32 per epoch.
BASE: dict[str, Any] = {
    "name": "tiny",
    "data": {"name": "synthetic"},
    "model": {"name": "cnn", "depth": 1, "width": 8, "norm": "batch", "dropout": 0.25},
    "optimizer": {"name": "sgd", "lr": 0.1, "momentum": 0.9, "weight_decay": 1e-4},
    "training": {"batch_size": 32, "epochs": 4, "device": "cpu", "augment": True},
}
#: The same with the lr tuned by hypergradient inside the trial; a horizon of 3 steps leaves
#: a horizon open at every epoch's end (5 steps), so checkpoints carry one.
TUNED: dict[str, Any] = {
    **BASE,
    "model": {"name": "cnn", "depth": 1, "width": 8},
    "tuner": {"hypers": [{"name": "lr"}], "horizon": 3, "hyper_lr": 0.05},
    "training": {**BASE["training"], "augment": False},
}


class Interrupted(Exception):
    """The trial was stopped from outside (a scheduler's pause, a killed worker)."""


class Session:
    """Tune's ``report`` / ``get_checkpoint`` for a trial run in this process."""

    def __init__(self, root: Path, checkpoint: Any = None, stop_after: int | None = None):
        self.root, self.checkpoint, self.stop_after = root, checkpoint, stop_after
        self.metrics: list[dict[str, Any]] = []
        self.checkpoints: list[Any] = []

    def report(self, metrics: dict[str, Any], *, checkpoint: Any = None) -> None:
        self.metrics.append(dict(metrics))
        if checkpoint is not None:  # Tune copies it to storage before report returns
            kept = self.root / f"checkpoint_{len(self.checkpoints):06d}"
            shutil.copytree(checkpoint.path, kept)
            self.checkpoints.append(tune.Checkpoint.from_directory(kept))
        if self.stop_after is not None and len(self.metrics) >= self.stop_after:
            raise Interrupted

    def get_checkpoint(self) -> Any:
        return self.checkpoint

    def run(self, base: Any, config: dict[str, Any], **options: Any) -> list[dict[str, Any]]:
        return run_trial(
            base, config, report=self.report, get_checkpoint=self.get_checkpoint, **options
        )


def timeless(metrics: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in m.items() if k != "epoch_seconds"} for m in metrics]


def assert_same(a: Any, b: Any, where: str = "state") -> None:
    """Equal bit for bit: tensors by torch.equal, containers entry by entry."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype, where
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for key in a:
            assert_same(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


# ------------------------------------------------------------------------------ one trial
def test_trial_reports_each_epoch_and_loads_data_once(tmp_path, monkeypatch) -> None:
    """Every epoch reports val/train loss, val accuracy, step, every hyperparameter and a
    checkpoint that rebuilds the run (data named by its spec) with the reported val figures;
    no test figure unless asked. Two trials in one process read the data set once."""
    loads = []
    real = builder.load_data
    monkeypatch.setattr(builder, "load_data", lambda spec: loads.append(spec) or real(spec))
    base = {**BASE, "data": {"name": "synthetic", "seed": 11}}  # not in the process cache yet

    session = Session(tmp_path / "a")
    session.run(base, {"optimizer.lr": 0.05, "model.width": 4})
    assert [m["epoch"] for m in session.metrics] == [1, 2, 3, 4]
    assert [m["step"] for m in session.metrics] == [5, 10, 15, 20]
    for m in session.metrics:
        assert {"train_loss", "val_loss", "val_accuracy", "diverged"} <= m.keys()
        assert (m["hyper/lr"], m["hyper/momentum"], m["hyper/weight_decay"]) == (0.05, 0.9, 1e-4)
        assert not any(key.startswith("test") for key in m)
    assert len(session.checkpoints) == 4
    run = load_run(session.checkpoints[-1])
    assert run.config["data"] == base["data"] and run.config["model"]["width"] == 4
    val = run.evaluate("val")
    assert (val["loss"], val["accuracy"]) == (
        session.metrics[-1]["val_loss"],
        session.metrics[-1]["val_accuracy"],
    )

    other = Session(tmp_path / "b")
    other.run(base, {"optimizer": {"lr": 0.2}}, report_test=True, checkpoint_every=3)
    assert [len(loads), len(other.checkpoints)] == [1, 2]  # epochs 3 and 4 (the last)
    test = load_run(other.checkpoints[-1]).evaluate("test")
    assert other.metrics[-1]["test_loss"] == test["loss"]
    assert other.metrics[-1]["test_accuracy"] == test["accuracy"]


@pytest.mark.parametrize("base", [BASE, TUNED], ids=["plain", "tuned"])
def test_trial_continued_from_its_checkpoint_is_exact(tmp_path, base) -> None:
    """A trial stopped after epoch 2 (paused, or its worker lost) and started again with its
    checkpoint reports epochs 3-4 exactly as the uninterrupted trial, and ends in the same
    state bit for bit (weights, optimizer or tuner state, batch order, random stream)."""
    config = {"optimizer.lr": 0.05}
    whole = Session(tmp_path / "whole")
    whole.run(base, config)
    first = Session(tmp_path / "first", stop_after=2)
    with pytest.raises(Interrupted):
        first.run(base, config)
    if base is TUNED:  # the case that needs the checkpointed open horizon
        assert read_checkpoint(first.checkpoints[-1])["pending"] is not None
    second = Session(tmp_path / "second", checkpoint=first.checkpoints[-1])
    second.run(base, config)

    assert [m["epoch"] for m in second.metrics] == [3, 4]
    assert timeless(first.metrics + second.metrics) == timeless(whole.metrics)
    assert_same(read_checkpoint(second.checkpoints[-1]), read_checkpoint(whole.checkpoints[-1]))
    # A checkpoint of the last epoch: nothing left to train, nothing reported.
    done = Session(tmp_path / "done", checkpoint=whole.checkpoints[-1])
    assert done.run(base, config) == [] and done.metrics == []


def test_tuner_inside_the_trial_reports_the_adapted_lr(tmp_path) -> None:
    """With a tuner section the lr moves by hypergradient during the trial; each epoch
    reports the value it has reached, which is the value the checkpointed run carries."""
    session = Session(tmp_path)
    session.run(TUNED, {"optimizer.lr": 0.05, "tuner.hyper_lr": 0.1})
    lrs = [m["hyper/lr"] for m in session.metrics]
    assert all(math.isfinite(lr) and lr > 0 for lr in lrs)
    assert len(set(lrs)) == len(lrs) and lrs[0] != 0.05  # it moved, every epoch
    for m, checkpoint in zip(session.metrics, session.checkpoints, strict=True):
        run = load_run(checkpoint)
        assert run.tuner is not None
        assert run.hyperparameters["lr"] == m["hyper/lr"]


def test_pbt_exploit_continues_with_the_new_values(tmp_path) -> None:
    """PBT restarts a trial on another trial's checkpoint with changed values: the weights
    and step continue, the changed lr applies from there; an architecture cannot change."""
    donor = Session(tmp_path / "donor", stop_after=2)
    with pytest.raises(Interrupted):
        donor.run(BASE, {"optimizer.lr": 0.05, "model.width": 8})
    state = read_checkpoint(donor.checkpoints[-1])
    assert state["pbt_values"] == {"optimizer.lr": 0.05, "model.width": 8}

    explored = Session(tmp_path / "explored", checkpoint=donor.checkpoints[-1])
    explored.run(BASE, {"optimizer.lr": 0.1, "model.width": 8})
    assert [(m["epoch"], m["step"], m["hyper/lr"]) for m in explored.metrics] == [
        (3, 15, 0.1),
        (4, 20, 0.1),
    ]
    wider = Session(tmp_path / "wider", checkpoint=donor.checkpoints[-1])
    with pytest.raises(ConfigError, match=r"cannot continue.*'model\.width': 16"):
        wider.run(BASE, {"optimizer.lr": 0.05, "model.width": 16})
    assert wider.metrics == []


def test_diverged_trial_reports_the_worst_loss_once(tmp_path) -> None:
    session = Session(tmp_path)
    session.run({**BASE, "model": {"name": "cnn", "depth": 1, "width": 8}}, {"optimizer.lr": 1e9})
    assert len(session.metrics) == 1 and session.checkpoints == []
    m = session.metrics[0]
    assert (m["diverged"], m["val_loss"], m["val_accuracy"]) == (True, math.inf, 0.0)


# ------------------------------------------------------------------------------ mistakes
BAD_SAMPLES = [
    ({"optimizer.lr": -1.0}, r"optimizer\.lr.*-1\.0"),
    ({"model.width": "wide"}, r"width.*'wide'"),
    ({"model.widht": 8}, r"'widht'"),
    ({"training.batch_size": 0}, r"training\.batch_size.*got 0"),
    ({"optimizer": {"nesterov": 3}}, r"nesterov.*got 3"),
    ({"tuner.horizon": 3}, r"tuner\.hypers is required"),  # no tuner section to set
    ({"lr": 0.1}, r"'lr'=0\.1: expected a dotted path"),
    ({"model.width.0": 8}, r"'model\.width\.0'=8: expected a dotted path"),
    ({"output.dir": "x"}, r"'output\.dir'='x': expected a dotted path"),
]


@pytest.mark.parametrize("config, match", BAD_SAMPLES, ids=[str(c) for c, _ in BAD_SAMPLES])
def test_bad_sampled_path_or_value_is_one_clear_error(tmp_path, config, match) -> None:
    """A bad path or value is a ConfigError naming it before anything trains, in the trial
    and in the driver's pre-flight of a param_space holding it."""
    session = Session(tmp_path)
    with pytest.raises(ConfigError, match=match):
        session.run(BASE, config)
    assert session.metrics == []
    with pytest.raises(ConfigError, match=match):
        trainable(BASE, param_space=config)


@pytest.mark.parametrize(
    "space, match",
    [
        ({"model.width": tune.choice([8, 0])}, r"param_space model\.width=0: .*width"),
        ({"optimizer.lr": tune.uniform(-1.0, 0.1)}, r"param_space base point .*-1\.0"),
        (
            {"model": {"depth": tune.randint(1, 3), "pooling": tune.choice(["max", "mean"])}},
            r"model\.pooling='mean'.*pooling",
        ),
    ],
)
def test_param_space_corners_are_checked_before_the_tuner(space, match) -> None:
    with pytest.raises(ConfigError, match=match):
        trainable(BASE, param_space=space)


def test_param_space_check_builds_each_corner() -> None:
    space = {
        "optimizer.lr": tune.loguniform(1e-3, 0.3),
        "model.depth": tune.randint(1, 3),  # 1 or 2: Tune's upper bound is exclusive
        "training.batch_size": tune.grid_search([16, 32]),
        "model.width": tune.sample_from(lambda _: 8),  # cannot be enumerated: left out
    }
    labels = check_space(BASE, space)
    assert labels[1:] == [
        "param_space optimizer.lr=0.3",
        "param_space model.depth=2",
        "param_space training.batch_size=32",
    ]


@pytest.mark.parametrize(
    "base, match",
    [
        ({"model": {"name": "cnn"}}, r"data: section is required"),
        ({**BASE, "search": {"space": {}}}, r"search: .*gradhpo tune.*param_space"),
        ({**BASE, "training": {"epochs": 0}}, r"training\.epochs: .*got 0"),
    ],
)
def test_bad_base_config_is_refused_when_the_trainable_is_made(base, match) -> None:
    with pytest.raises(ConfigError, match=match):
        trainable(base)


def test_trainable_options_are_checked() -> None:
    with pytest.raises(ValueError, match=r"checkpoint_every must be an integer >= 1, got 0"):
        trainable(BASE, checkpoint_every=0)
    with pytest.raises(TypeError, match=r"report_test must be true or false, got 'yes'"):
        trainable(BASE, report_test="yes")
    assert trainable(BASE).__name__ == "gradhpo_tiny"


def test_relative_data_dir_is_made_absolute_for_trials(tmp_path, monkeypatch) -> None:
    """Tune runs each trial in its own working directory."""
    monkeypatch.chdir(tmp_path)
    config, _ = ray_tune.trial_config({**BASE, "data": {"name": "digits", "data_dir": "d"}}, {})
    assert config["data"]["data_dir"] == str((tmp_path / "d").resolve())


# ------------------------------------------------------------------------------ real Tuners
@pytest.fixture(scope="module")
def local_ray() -> Iterator[Path]:
    """A local Ray instance with 2 CPUs on 127.0.0.1, shared by this module's Tuner tests;
    returns a short scratch folder (Ray's socket paths have a length limit)."""
    if ray.is_initialized():
        pytest.skip("Ray is already initialized in this process")
    root = Path(tempfile.mkdtemp(prefix="rt", dir="/tmp"))
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        _node_ip_address="127.0.0.1",
        _temp_dir=str(root / "ray"),
        log_to_driver=False,
        configure_logging=False,
    )
    try:
        yield root
    finally:
        ray.shutdown()
        shutil.rmtree(root, ignore_errors=True)


@pytest.mark.slow
def test_tuner_with_asha(local_ray) -> None:
    """Three sampled trials under ASHA: each reports every epoch it trains (epoch = Tune's
    iteration), the best result's config is one of the sampled ones, and its checkpoint
    loads into a run whose validation figures are the ones reported."""
    space = {"optimizer.lr": tune.loguniform(1e-2, 0.3), "model.width": tune.choice([4, 8])}
    tuner = tune.Tuner(
        trainable(BASE, param_space=space),
        param_space=space,
        tune_config=tune.TuneConfig(
            metric="val_loss",
            mode="min",
            num_samples=3,
            scheduler=ASHAScheduler(max_t=4, grace_period=1, reduction_factor=2),
        ),
        run_config=tune.RunConfig(storage_path=str(local_ray / "results"), name="asha", verbose=0),
    )
    grid = tuner.fit()
    assert grid.errors == [] and len(grid) == 3
    configs = [r.config for r in grid]
    for config in configs:
        assert set(config) == {"optimizer.lr", "model.width"}
        assert 1e-2 <= config["optimizer.lr"] <= 0.3 and config["model.width"] in (4, 8)
    for r in grid:
        df = r.metrics_dataframe
        n = len(df)
        assert list(df["training_iteration"]) == list(df["epoch"]) == list(range(1, n + 1))
        assert list(df["step"]) == [5 * e for e in range(1, n + 1)]
        assert df["val_loss"].notna().all() and df["val_accuracy"].notna().all()
        assert (df["hyper/lr"] == r.config["optimizer.lr"]).all()
        assert not any(c.startswith("test") for c in df.columns)
    assert max(len(r.metrics_dataframe) for r in grid) == 4
    best = grid.get_best_result()
    assert best.config in configs
    assert best.metrics["val_loss"] == min(r.metrics["val_loss"] for r in grid)
    run = load_run(best.checkpoint)
    val = run.evaluate("val")
    assert (val["loss"], val["accuracy"]) == (
        best.metrics["val_loss"],
        best.metrics["val_accuracy"],
    )
    assert run.global_step == best.metrics["step"]


class PauseOnce(FIFOScheduler):
    """Pauses each trial once, after iteration ``at``; FIFO runs paused trials again."""

    paused: list[str] = []

    def __init__(self, at: int) -> None:
        super().__init__()
        self.at = at

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict) -> str:
        if result["training_iteration"] == self.at and trial.trial_id not in PauseOnce.paused:
            PauseOnce.paused.append(trial.trial_id)
            return TrialScheduler.PAUSE
        return TrialScheduler.CONTINUE


@pytest.mark.slow
def test_tuner_pause_and_retry_continue_exactly(local_ray, tmp_path) -> None:
    """A tuned trial (lr adapted by hypergradient, open horizons in its checkpoints) paused by
    the scheduler after epoch 2 and failing after epoch 3 (retried by FailureConfig) ends
    exactly where the uninterrupted trial run in this process ends: same reported epochs,
    same final state bit for bit."""
    base = {**TUNED, "training": {**TUNED["training"], "epochs": 5}}
    config = {"optimizer.lr": 0.05}
    failed, restores = tmp_path / "failed", tmp_path / "restores"

    def flaky(config: dict) -> None:  # pickled by value to the trial's worker
        checkpoint = tune.get_checkpoint()
        if checkpoint is not None:
            with open(restores, "a") as fh:
                fh.write(f"{read_checkpoint(checkpoint)['tune']['epoch']}\n")

        def report(metrics: dict, checkpoint: Any = None) -> None:
            tune.report(metrics, checkpoint=checkpoint)
            if metrics["epoch"] == 3 and not failed.exists():
                failed.touch()
                raise RuntimeError("injected failure after epoch 3")

        run_trial(base, config, report=report, threads=1)

    PauseOnce.paused.clear()
    grid = tune.Tuner(
        flaky,
        param_space=config,
        tune_config=tune.TuneConfig(metric="val_loss", mode="min", scheduler=PauseOnce(2)),
        run_config=tune.RunConfig(
            storage_path=str(local_ray / "results"),
            name="pause",
            verbose=0,
            failure_config=tune.FailureConfig(max_failures=1),
        ),
    ).fit()
    assert grid.errors == [] and len(PauseOnce.paused) == 1 and failed.exists()
    assert restores.read_text().split() == ["2", "3"]  # resumed after the pause, the failure

    whole = Session(tmp_path / "whole")
    whole.run(base, config)
    result = grid[0]
    assert result.metrics["epoch"] == 5
    # Tune's log of the trial keeps the epochs it saw (the one reported just before the
    # failure may be dropped with the failed attempt); each equals the uninterrupted one.
    by_epoch = {m["epoch"]: m for m in whole.metrics}
    df = result.metrics_dataframe
    assert {1, 2, 4, 5} <= set(df["epoch"])
    for row in df.to_dict("records"):
        expected = by_epoch[row["epoch"]]
        for key in ("step", "train_loss", "val_loss", "val_accuracy", "hyper/lr"):
            assert row[key] == expected[key], (row["epoch"], key)
    assert_same(read_checkpoint(result.checkpoint), read_checkpoint(whole.checkpoints[-1]))
