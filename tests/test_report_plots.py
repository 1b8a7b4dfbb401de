"""What the report's plots decide, read from the numbers and axes they draw (not pixels):
best follows the metric's direction (min for a loss, max for accuracy) in every plot, the
optimization history is scaled to the finished trials and names its metric, parallel
coordinates follow the search space's order with labelled categorical axes and a colour bar,
the hyperparameter plots have a legend with the best trial, and a PBT run's momentum and
batch size are not drawn on log axes."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import optuna
import pytest
import yaml
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState, create_trial

from gradhpo import report
from gradhpo.pbt.store import PBTDatabase
from gradhpo.report import (
    Objective,
    history_data,
    hyper_data,
    objectives_of,
    parallel_data,
    pbt_data,
    write_pbt_report,
    write_report,
)
from gradhpo.search import create_study
from gradhpo.search.study import load_optuna_study

SPACE = {
    "optimizer.lr": FloatDistribution(0.001, 0.3, log=True),
    "model.depth": IntDistribution(1, 3),
    "model.pooling": CategoricalDistribution(["max", "avg", "stride"]),
    "model.kernel_size": CategoricalDistribution([3, 5]),
}


@pytest.fixture
def figures(monkeypatch: pytest.MonkeyPatch) -> Any:
    """The report's figures by file name, kept open instead of written."""
    kept: dict[str, Any] = {}
    monkeypatch.setattr(report, "_save_figure", lambda fig, path: kept.__setitem__(path.name, fig))
    yield kept
    for fig in kept.values():
        plt.close(fig)


def params_of(i: int) -> dict[str, Any]:
    return {
        "optimizer.lr": [0.01, 0.1, 0.003, 0.2, 0.05, 0.02][i % 6],
        "model.depth": 1 + i % 3,
        "model.pooling": ["stride", "max", "avg"][i % 3],
        "model.kernel_size": [5, 3][i % 2],
    }


def make_study(
    directory: Path,
    values: list[float | None],
    *,
    metric: str | None = "val_loss",
    direction: str | None = None,
    pruned: dict[int, float] | None = None,
) -> Any:
    """A study in ``directory`` with finished trials of ``values`` (None: pruned, its last
    report from ``pruned``), every trial with the parameters of :func:`params_of`."""
    study = create_study(
        directory, metric=metric, direction=direction, sampler="random", pruner=None
    )
    for i, value in enumerate(values):
        params = params_of(i)
        if value is None:
            trial = create_trial(
                state=TrialState.PRUNED,
                params=params,
                distributions=SPACE,
                intermediate_values={0: (pruned or {}).get(i, 2.3)},
            )
        else:
            trial = create_trial(
                value=value,
                params=params,
                distributions=SPACE,
                intermediate_values={0: value, 1: value},
            )
        study.optuna.add_trial(trial)
    return study


def write_progress(directory: Path, number: int, hypers: list[dict[str, float]]) -> None:
    """A trial's progress.json as the tune job writes it: one record per epoch."""
    trial_dir = directory / "trials" / f"{number:04d}"
    trial_dir.mkdir(parents=True, exist_ok=True)
    history = [
        {"epoch": e + 1, "value": 0.0, "folds": [{"epoch": e + 1, "hypers": h}]}
        for e, h in enumerate(hypers)
    ]
    (trial_dir / "progress.json").write_text(json.dumps({"history": history}), encoding="utf-8")


def load(directory: Path) -> optuna.Study:
    return load_optuna_study(directory)


# ---------------------------------------------------------------------- direction


@pytest.mark.parametrize(
    ("metric", "best"),
    [("val_loss", 2), ("val_accuracy", 1)],  # values below: min at trial 2, max at trial 1
)
def test_best_follows_the_metrics_direction_in_every_study_plot(
    tmp_path: Path, figures: dict[str, Any], metric: str, best: int
) -> None:
    directory = tmp_path / "study"
    make_study(directory, [0.5, 0.9, 0.1, 0.7], metric=metric)
    for number, lr in enumerate([0.05, 0.2, 0.01, 0.1]):
        write_progress(directory, number, [{"lr": lr}, {"lr": lr * 1.5}])
    study = load(directory)
    objectives = objectives_of(study, json.loads((directory / "study.json").read_text()))
    assert objectives == [Objective(metric, metric == "val_accuracy")]

    (panel,) = history_data(study, objectives)
    assert panel["best"] == (best, [0.5, 0.9, 0.1, 0.7][best])
    assert panel["best_so_far"][-1][1] == [0.5, 0.9, 0.1, 0.7][best]
    assert hyper_data(directory, study, objectives)["best"] == best
    parallel = parallel_data(study, objectives)
    assert parallel["best"] == best
    assert parallel["trials"][parallel["order"][-1]] == best  # drawn last: on top
    # The colour map puts the best at the bright (yellow) end whichever the direction.
    assert parallel["cmap"] == ("viridis" if metric == "val_accuracy" else "viridis_r")

    write_report(directory)
    (ax,) = figures["hyperparameters.png"].axes
    bold = [line for line in ax.get_lines() if line.get_label().startswith("best: trial")]
    assert [line.get_label() for line in bold] == [
        f"best: trial {best} ({metric} {[0.5, 0.9, 0.1, 0.7][best]})"
    ]
    assert bold[0].get_linewidth() > max(
        line.get_linewidth() for line in ax.get_lines() if line is not bold[0]
    )
    legend = figures["hyperparameters.png"].legends
    assert legend and bold[0].get_label() in [t.get_text() for t in legend[0].get_texts()]
    history_labels = figures["optimization_history.png"].axes[0].get_legend_handles_labels()[1]
    assert any(label.startswith(f"best: trial {best} ") for label in history_labels)


def test_pbt_best_and_mean_follow_the_metrics_direction() -> None:
    scores = [
        {"step": 10, "member": m, "score": s, "values": {}} for m, s in enumerate([0.9, 0.2, 0.5])
    ]
    loss = pbt_data(scores, maximize=False, config={"pbt": {"metric": "val_loss"}})
    accuracy = pbt_data(scores, maximize=True, config={"pbt": {"metric": "val_accuracy"}})
    assert loss["best"] == [0.2] and accuracy["best"] == [0.9]
    assert loss["objective"].label == "val_loss (lower is better)"
    assert accuracy["objective"].label == "val_accuracy (higher is better)"


# ---------------------------------------------------------------------- optimization history


def test_history_is_scaled_to_finished_trials_and_names_the_metric(
    tmp_path: Path, figures: dict[str, Any]
) -> None:
    directory = tmp_path / "study"
    # Finished trials between 0.22 and 0.30; two pruned at epoch 1 with losses of 2.3 and a
    # diverged finished trial (an infinite loss) must not squash them into a line.
    make_study(directory, [0.30, None, 0.25, None, 0.22, math.inf, 0.28])
    study = load(directory)
    objectives = objectives_of(study, {"metric": "val_loss"})
    (panel,) = history_data(study, objectives)
    lo, hi = panel["ylim"]
    assert 0.15 < lo < 0.22 and 0.30 < hi < 0.4
    assert sorted(panel["off_scale"]) == [
        (1, "pruned", "top"),
        (3, "pruned", "top"),
        (5, "complete", "top"),
    ]
    assert panel["best"] == (4, 0.22)
    assert panel["best_so_far"][-1] == (6, 0.22)  # carried on to the last trial

    write_report(directory)
    (ax,) = figures["optimization_history.png"].axes
    assert ax.get_ylim() == pytest.approx((lo, hi))
    assert ax.get_ylabel() == "val_loss (lower is better)"


def test_a_cli_study_takes_its_metric_name_from_the_config(
    tmp_path: Path, figures: dict[str, Any]
) -> None:
    """`gradhpo tune` stores a direction, not a metric, in study.json: the name comes from
    config.yaml's search.metric."""
    directory = tmp_path / "study"
    make_study(directory, [0.6, 0.8], metric=None, direction="maximize")
    (directory / "config.yaml").write_text(
        yaml.safe_dump({"search": {"metric": "val_accuracy"}}), encoding="utf-8"
    )
    write_report(directory)
    (ax,) = figures["optimization_history.png"].axes
    assert ax.get_ylabel() == "val_accuracy (higher is better)"
    bar = figures["parallel_coordinates.png"].axes[1]
    assert bar.get_ylabel() == "val_accuracy (higher is better)"


# ---------------------------------------------------------------------- parallel coordinates


def test_parallel_coordinates_follow_the_space_and_label_choices(
    tmp_path: Path, figures: dict[str, Any]
) -> None:
    directory = tmp_path / "study"
    make_study(directory, [0.5, 0.4, 0.3, 0.6])
    study = load(directory)
    objectives = objectives_of(study, {"metric": "val_loss"})
    data = parallel_data(study, objectives)
    names = [a["name"] for a in data["axes"]]
    # The order the objective suggests them in (not alphabetical), then the objective.
    assert names == [*SPACE, "val_loss (lower is better)"]
    axes = {a["name"]: a for a in data["axes"]}
    # Categorical axes: one tick per choice, in the distribution's order; integer choices
    # (a kernel size) are categories too.
    assert axes["model.pooling"]["kind"] == "categorical"
    assert [label for _, label in axes["model.pooling"]["ticks"]] == ["max", "avg", "stride"]
    assert [label for _, label in axes["model.kernel_size"]["ticks"]] == ["3", "5"]
    assert axes["optimizer.lr"]["log"] and axes["optimizer.lr"]["kind"] == "numeric"
    assert [label for _, label in axes["optimizer.lr"]["ticks"]] == ["0.003", "0.2"]

    write_report(directory)
    fig = figures["parallel_coordinates.png"]
    ax, bar = fig.axes  # the plot and its colour bar
    assert bar.get_ylabel() == "val_loss (lower is better)"
    assert bar.get_ylim() == pytest.approx((0.3, 0.6))
    assert [t.get_text().split("\n")[0] for t in ax.get_xticklabels()] == [*SPACE, "val_loss"]
    written = {t.get_text() for t in ax.texts}
    assert {"max", "avg", "stride", "3", "5"} <= written


# ---------------------------------------------------------------------- hyperparameter plots


def test_hyperparameter_axes_are_log_only_across_decades(
    tmp_path: Path, figures: dict[str, Any]
) -> None:
    directory = tmp_path / "study"
    make_study(directory, [0.5, 0.4, None])
    series = [
        [
            {"lr": 0.01, "momentum": 0.9, "weight_decay": 4e-4},
            {"lr": 0.2, "momentum": 0.95, "weight_decay": 5e-4},
        ],
        [
            {"lr": 0.03, "momentum": 0.85, "weight_decay": 4.5e-4},
            {"lr": 0.05, "momentum": 0.9, "weight_decay": 4.2e-4},
        ],
        [{"lr": 0.05, "momentum": 0.9, "weight_decay": 4.4e-4}],
    ]
    for number, hypers in enumerate(series):
        write_progress(directory, number, hypers)
    study = load(directory)
    data = hyper_data(directory, study, objectives_of(study, {"metric": "val_loss"}))
    assert data["log"] == {"lr": True, "momentum": False, "weight_decay": False}
    assert data["best"] == 1 and data["pruned"] == {2}

    write_report(directory)
    fig = figures["hyperparameters.png"]
    scales = {ax.get_title(): ax.get_yscale() for ax in fig.axes if ax.get_title()}
    assert scales == {"lr (log scale)": "log", "momentum": "linear", "weight_decay": "linear"}
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert labels == ["trial 0", "best: trial 1 (val_loss 0.4)", "pruned trials"]


# ---------------------------------------------------------------------- PBT


def make_pbt(directory: Path, maximize: bool, metric: str) -> None:
    db = PBTDatabase(directory)
    try:
        for step in (10, 20):
            for member in range(3):
                values = {
                    "optimizer.lr": [0.003, 0.05, 0.3][member] * step / 10,
                    "optimizer.momentum": [0.6, 0.8, 0.95][member],
                    "training.batch_size": [16, 32, 64][member],
                }
                db.record_score(step, member, [0.9, 0.4, 0.6][member] / step, values)
        db.set_meta("maximize", maximize)
        db.set_meta("best", {"member": 1, "step": 20, "score": 0.02, "metric": metric})
    finally:
        db.close()
    config = {
        "pbt": {
            "metric": metric,
            "space": {
                "optimizer.lr": {"type": "float", "low": 0.003, "high": 0.5, "log": True},
                "optimizer.momentum": {"type": "float", "low": 0.5, "high": 0.95},
                "training.batch_size": {"type": "categorical", "choices": [16, 32, 64]},
            },
        }
    }
    (directory / "config.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")


def test_pbt_hyperparameters_use_the_scale_of_their_space(
    tmp_path: Path, figures: dict[str, Any]
) -> None:
    make_pbt(tmp_path, maximize=False, metric="val_loss")
    write_pbt_report(tmp_path)
    fig = figures["hyperparameters.png"]
    axes = {ax.get_title(): ax for ax in fig.axes}
    assert list(axes) == [
        "optimizer.lr (log scale)",
        "optimizer.momentum",
        "training.batch_size",
    ]
    assert axes["optimizer.lr (log scale)"].get_yscale() == "log"
    assert axes["optimizer.momentum"].get_yscale() == "linear"
    batch = axes["training.batch_size"]
    assert batch.get_yscale() == "linear"
    assert [t.get_text() for t in batch.get_yticklabels()] == ["16", "32", "64"]
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert labels == ["member 0", "member 1 (best)", "member 2"]

    (score_ax,) = figures["best_score.png"].axes
    assert score_ax.get_ylabel() == "val_loss (lower is better)"
    best_line = next(line for line in score_ax.get_lines() if line.get_label() == "best member")
    assert list(best_line.get_ydata()) == pytest.approx([0.04, 0.02])  # the minimum per step


# ---------------------------------------------------------------------- studies that crashed


def test_a_multi_objective_study_is_reported(tmp_path: Path, figures: dict[str, Any]) -> None:
    directory = tmp_path / "study"
    study = create_study(directory, directions=["maximize", "minimize"], sampler="random")
    for i, values in enumerate([(0.9, 3.0), (0.8, 1.0), (0.7, 2.0)]):
        study.optuna.add_trial(
            create_trial(values=list(values), params=params_of(i), distributions=SPACE)
        )
    result = write_report(directory)
    assert [(r["value 0"], r["value 1"]) for r in result["rows"]] == [
        (0.9, 3.0),
        (0.8, 1.0),
        (0.7, 2.0),
    ]
    panels = history_data(load(directory), objectives_of(load(directory)))
    assert [p["objective"].label for p in panels] == [
        "objective 0 (higher is better)",
        "objective 1 (lower is better)",
    ]
    assert panels[0]["pareto"] == [0, 1] and panels[0]["best"] is None
    assert len(figures["optimization_history.png"].axes) == 2


def test_results_md_without_a_test_accuracy(tmp_path: Path, figures: dict[str, Any]) -> None:
    """A regression loss has no accuracy: the best trial's summary holds None there."""
    directory = tmp_path / "study"
    study = make_study(directory, [0.5, 0.2])
    study.optuna.set_user_attr(
        "best_test",
        {"trial": 1, "metric": "val_loss", "value": 0.2, "test_accuracy": None, "test_loss": 0.25},
    )
    write_report(directory)
    text = (directory / "report" / "results.md").read_text(encoding="utf-8")
    assert text.startswith("Best trial 1: val_loss 0.2, test loss 0.2500\n")
