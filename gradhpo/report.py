"""Reports of a study directory: a results table (CSV + Markdown) and PNG plots.

``write_report(directory)`` reads the study from its SQLite storage and the per-trial
``progress.json`` files and writes, under ``<directory>/report/``:

* ``results.csv`` and ``results.md``: one row per trial (state, value, epochs, seconds, the
  sampled parameters and the final values of the hypergradient-tuned hyperparameters);
* ``optimization_history.png``: each trial's value and the best so far;
* ``hyperparameters.png``: every tuned hyperparameter's trajectory over epochs, one line per
  trial (per layer where the tuner was granular);
* ``parallel_coordinates.png``: sampled parameters of finished trials, coloured by value;
* ``schedules.png`` (only when a tuned hyperparameter is a schedule, keys ``name[i]``): each
  trial's learned schedule at its last epoch, value against segment, the best trial in bold.
"""

from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path
from typing import Any

import matplotlib
import yaml

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import optuna  # noqa: E402

from gradhpo.config import ConfigError  # noqa: E402
from gradhpo.files import atomic_write, write_text  # noqa: E402
from gradhpo.hyper.spec import split_segment_key  # noqa: E402
from gradhpo.pbt.store import PBTDatabase  # noqa: E402
from gradhpo.run.loop import METRICS  # noqa: E402
from gradhpo.search.study import is_retried, load_optuna_study  # noqa: E402

__all__ = ["write_report", "trial_rows"]


def _open(directory: Path) -> tuple[optuna.Study, dict[str, Any]]:
    meta_path = directory / "study.json"
    if not meta_path.is_file():
        raise ConfigError(f"{str(directory)!r} is not a study directory (no study.json)")
    try:
        study = load_optuna_study(directory)  # a damaged study.json is named by its reader
        return study, json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{str(directory)!r}: cannot open the study: {exc}") from exc


def _history(directory: Path, number: int) -> list[dict[str, Any]]:
    path = directory / "trials" / f"{number:04d}" / "progress.json"
    if not path.is_file():
        return []
    try:  # a damaged progress file costs that trial's curve, not the report
        history = json.loads(path.read_text(encoding="utf-8")).get("history", [])
    except (OSError, ValueError, AttributeError):
        return []
    return history if isinstance(history, list) else []


def trial_rows(study: optuna.Study) -> list[dict[str, Any]]:
    """One flat dict per trial (retried dead trials left out)."""
    rows = []
    for t in study.get_trials(deepcopy=False):
        if is_retried(t):
            continue
        seconds = (
            (t.datetime_complete - t.datetime_start).total_seconds()
            if t.datetime_complete and t.datetime_start
            else None
        )
        row: dict[str, Any] = {
            "trial": t.number,
            "state": t.state.name.lower(),
            "value": t.value,
            "epochs": t.user_attrs.get("epochs", len(t.intermediate_values)),
            "seconds": None if seconds is None else round(seconds, 2),
        }
        row.update(t.params)
        row.update({f"final {k}": v for k, v in t.user_attrs.get("hyperparameters", {}).items()})
        rows.append(row)
    return rows


def _save_figure(fig: Any, path: Path) -> None:
    """Write a figure as PNG atomically (a reader never sees half an image)."""
    with atomic_write(path) as fh:
        fig.savefig(fh, format="png", dpi=100)


def _fmt(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _write_tables(rows: list[dict[str, Any]], out: Path, best: dict[str, Any] | None) -> None:
    columns: list[str] = []
    for row in rows:
        columns.extend(c for c in row if c not in columns)
    with atomic_write(out / "results.csv", "w") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    lines = []
    if best:
        lines.append(
            f"Best trial {best['trial']}: validation {best['value']:.4f}, "
            f"test accuracy {best['test_accuracy']:.4f}\n"
        )
    lines.append("| " + " | ".join(columns) + " |")
    lines.append("|" + "---|" * len(columns))
    for row in rows:
        lines.append("| " + " | ".join(_fmt(row.get(c)) for c in columns) + " |")
    write_text(out / "results.md", "\n".join(lines) + "\n")


def _plot_history(study: optuna.Study, path: Path) -> None:
    done = [
        t
        for t in study.get_trials(deepcopy=False)
        if t.state.name == "COMPLETE" and t.value is not None
    ]
    fig, ax = plt.subplots(figsize=(6, 4))
    if done:
        xs = [t.number for t in done]
        ys = [t.value for t in done]
        pick = max if study.direction.name == "MAXIMIZE" else min
        best = [pick(ys[: i + 1]) for i in range(len(ys))]
        ax.scatter(xs, ys, s=18, label="trial value")
        ax.step(xs, best, where="post", color="C3", label="best so far")
        ax.legend()
    pruned = [
        t
        for t in study.get_trials(deepcopy=False)
        if t.state.name == "PRUNED" and t.intermediate_values
    ]
    for t in pruned:
        last = t.intermediate_values[max(t.intermediate_values)]
        ax.scatter([t.number], [last], s=14, marker="x", color="gray")
    ax.set_xlabel("trial")
    ax.set_ylabel("objective (x: pruned, last report)")
    ax.set_title(f"{study.study_name}: optimization history")
    fig.tight_layout()
    _save_figure(fig, path)
    plt.close(fig)


def _plot_hypers(directory: Path, study: optuna.Study, path: Path) -> None:
    trajectories: dict[str, dict[int, list[tuple[int, float]]]] = {}
    for t in study.get_trials(deepcopy=False):
        for record in _history(directory, t.number):
            folds = record.get("folds") or [{}]
            for name, value in (folds[0].get("hypers") or {}).items():
                trajectories.setdefault(name, {}).setdefault(t.number, []).append(
                    (record["epoch"], value)
                )
    # Constant hyperparameters (not tuned) would only add flat lines.
    names = sorted(
        name
        for name, per_trial in trajectories.items()
        if len({v for pts in per_trial.values() for _, v in pts}) > 1
    )
    n = max(1, len(names))
    cols = min(3, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.5 * cols, 3.2 * rows), squeeze=False)
    for ax in axes.flat[len(names) :]:
        ax.axis("off")
    if not names:
        axes[0][0].text(0.5, 0.5, "no tuned hyperparameter moved", ha="center", va="center")
    for ax, name in zip(axes.flat, names, strict=False):
        for number, points in sorted(trajectories[name].items()):
            xs, ys = zip(*points, strict=True)
            ax.plot(xs, ys, marker=".", linewidth=1, label=f"trial {number}")
        positive = all(v > 0 for pts in trajectories[name].values() for _, v in pts)
        if positive:
            ax.set_yscale("log")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("epoch")
    fig.suptitle(f"{study.study_name}: hyperparameter trajectories")
    fig.tight_layout()
    _save_figure(fig, path)
    plt.close(fig)


def _plot_schedules(directory: Path, study: optuna.Study, path: Path) -> bool:
    """The learned schedules (see module docstring); False (nothing written) without any."""
    schedules: dict[str, dict[int, dict[int, float]]] = {}
    for t in study.get_trials(deepcopy=False):
        history = _history(directory, t.number)
        folds = (history[-1].get("folds") or [{}]) if history else [{}]
        for key, value in (folds[0].get("hypers") or {}).items():
            name, index = split_segment_key(key)
            if name is not None and index is not None:
                schedules.setdefault(name, {}).setdefault(t.number, {})[index] = value
    if not schedules:
        return False
    try:
        best = study.best_trial.number
    except ValueError:  # no finished trial (or several objectives)
        best = None
    names = sorted(schedules)
    fig, axes = plt.subplots(1, len(names), figsize=(4.5 * len(names), 3.2), squeeze=False)
    for ax, name in zip(axes[0], names, strict=True):
        for number, segments in sorted(schedules[name].items()):
            xs = sorted(segments)
            bold = number == best
            ax.plot(
                xs,
                [segments[i] for i in xs],
                marker="o",
                linewidth=2.5 if bold else 0.8,
                alpha=1.0 if bold else 0.5,
                label=f"trial {number} (best)" if bold else None,
            )
        if all(v > 0 for seg in schedules[name].values() for v in seg.values()):
            ax.set_yscale("log")
        ax.set_xlabel("segment (training progress)")
        ax.set_title(f"learned {name} schedule", fontsize=9)
        if best is not None and best in schedules[name]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    _save_figure(fig, path)
    plt.close(fig)
    return True


def _plot_parallel(study: optuna.Study, path: Path) -> None:
    done = [
        t
        for t in study.get_trials(deepcopy=False)
        if t.state.name == "COMPLETE" and t.value is not None
    ]
    names = sorted({k for t in done for k in t.params})
    fig, ax = plt.subplots(figsize=(max(5, 1.4 * (len(names) + 1)), 4))
    if not done or not names:
        ax.text(0.5, 0.5, "no finished trials with parameters", ha="center", va="center")
    else:
        axes_values: list[list[float | None]] = []
        labels = []
        for name in names:
            raw = [t.params.get(name) for t in done]
            present = [v for v in raw if v is not None]
            if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in present):
                lo, hi = min(present), max(present)
                dist = next(t.distributions[name] for t in done if name in t.distributions)
                log = getattr(dist, "log", False) and lo > 0
                f = (lambda v: math.log(v)) if log else (lambda v: float(v))
                span = (f(hi) - f(lo)) or 1.0
                axes_values.append([None if v is None else (f(v) - f(lo)) / span for v in raw])
                labels.append(f"{name}\n[{lo:.3g}, {hi:.3g}]{' log' if log else ''}")
            else:
                choices = sorted({str(v) for v in present})
                pos = {c: i / max(1, len(choices) - 1) for i, c in enumerate(choices)}
                axes_values.append([None if v is None else pos[str(v)] for v in raw])
                labels.append(f"{name}\n{{{', '.join(choices)}}}")
        values = [t.value for t in done]
        lo, hi = min(values), max(values)
        axes_values.append([(v - lo) / ((hi - lo) or 1.0) for v in values])
        labels.append(f"objective\n[{lo:.3g}, {hi:.3g}]")
        cmap = plt.get_cmap("viridis")
        order = sorted(range(len(done)), key=lambda i: values[i])
        for i in order:
            xs = [j for j, col in enumerate(axes_values) if col[i] is not None]
            ys = [axes_values[j][i] for j in xs]
            ax.plot(xs, ys, color=cmap(axes_values[-1][i]), alpha=0.8, linewidth=1.2)
        ax.set_xticks(range(len(labels)))
        ax.set_xticklabels(labels, fontsize=7)
        ax.set_yticks([])
        for j in range(len(labels)):
            ax.axvline(j, color="gray", linewidth=0.5)
    ax.set_title(f"{study.study_name}: parallel coordinates (colour = objective)")
    fig.tight_layout()
    _save_figure(fig, path)
    plt.close(fig)


def write_report(
    directory: str | os.PathLike[str], out: str | os.PathLike[str] | None = None
) -> dict[str, Any]:
    """Write the tables and plots; returns ``{"best": ..., "files": [...], "rows": [...]}``."""
    directory = Path(directory)
    study, _ = _open(directory)
    out = Path(out) if out is not None else directory / "report"
    out.mkdir(parents=True, exist_ok=True)
    rows = trial_rows(study)
    best = study.user_attrs.get("best_test")
    _write_tables(rows, out, best)
    _plot_history(study, out / "optimization_history.png")
    _plot_hypers(directory, study, out / "hyperparameters.png")
    _plot_parallel(study, out / "parallel_coordinates.png")
    files = [
        out / n
        for n in (
            "results.csv",
            "results.md",
            "optimization_history.png",
            "hyperparameters.png",
            "parallel_coordinates.png",
        )
    ]
    if _plot_schedules(directory, study, out / "schedules.png"):
        files.append(out / "schedules.png")
    return {"best": best, "files": files, "rows": rows}


def _pbt_maximize(directory: Path, db: PBTDatabase) -> bool:
    """Whether the PBT run in ``directory`` maximizes its score: stored by the manager; for
    runs made before it was, from the config's metric (best = min for a loss)."""
    stored = db.get_meta("maximize")
    if stored is not None:
        return bool(stored)
    config_file = directory / "config.yaml"
    if config_file.is_file():
        config = yaml.safe_load(config_file.read_text(encoding="utf-8")) or {}
        metric = (config.get("pbt") or {}).get("metric", "val_accuracy")
        return METRICS.get(metric, "maximize") == "maximize"
    return True


def write_pbt_report(
    directory: str | os.PathLike[str], out: str | os.PathLike[str] | None = None
) -> dict[str, Any]:
    """PBT run report: ``scores.csv``, ``best_score.png`` (the population's best and mean
    score per step), ``lineage.png`` (members over steps, an arrow source -> copier for each
    exploit) and ``hyperparameters.png`` (each member's explored values over steps)."""
    directory = Path(directory)
    db = PBTDatabase(directory)
    try:
        scores, lineage = db.scores(), db.lineage()
        meta_best = db.get_meta("best")
        maximize = _pbt_maximize(directory, db)
    finally:
        db.close()
    out = Path(out) if out is not None else directory / "report"
    out.mkdir(parents=True, exist_ok=True)
    names = sorted({k for s in scores for k in s["values"]})
    with atomic_write(out / "scores.csv", "w") as fh:
        writer = csv.writer(fh)
        writer.writerow(["step", "member", "score", *names])
        for s in scores:
            writer.writerow(
                [s["step"], s["member"], s["score"], *(s["values"].get(n) for n in names)]
            )

    fig, ax = plt.subplots(figsize=(6, 4))
    by_step: dict[int, list[float]] = {}
    for s in scores:
        if s["score"] is not None and math.isfinite(s["score"]):
            by_step.setdefault(s["step"], []).append(s["score"])
    steps = sorted(by_step)
    best_of = max if maximize else min
    ax.plot(steps, [best_of(by_step[t]) for t in steps], label="best member")
    ax.plot(
        steps,
        [sum(by_step[t]) / len(by_step[t]) for t in steps],
        label="population mean",
        alpha=0.7,
    )
    ax.set_xlabel("step")
    ax.set_ylabel("score")
    ax.set_title(f"{directory.name}: population score")
    ax.legend()
    fig.tight_layout()
    _save_figure(fig, out / "best_score.png")
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4))
    members = sorted({s["member"] for s in scores})
    for m in members:
        xs = [s["step"] for s in scores if s["member"] == m]
        ax.plot(xs, [m] * len(xs), color="lightgray", linewidth=1, zorder=1)
    for e in lineage:
        ax.annotate(
            "",
            xy=(e["step"], e["member"]),
            xytext=(e["step"], e["source"]),
            arrowprops={"arrowstyle": "->", "color": "C3", "alpha": 0.6, "linewidth": 0.8},
        )
    ax.set_yticks(members)
    ax.set_xlabel("step")
    ax.set_ylabel("member")
    ax.set_title(f"{directory.name}: lineage ({len(lineage)} exploits, arrow: source -> copier)")
    fig.tight_layout()
    _save_figure(fig, out / "lineage.png")
    plt.close(fig)

    numeric = [
        n
        for n in names
        if all(
            isinstance(s["values"].get(n), (int, float))
            and not isinstance(s["values"].get(n), bool)
            for s in scores
        )
    ]
    cols = max(1, len(numeric))
    fig, axes = plt.subplots(1, cols, figsize=(4.5 * cols, 3.2), squeeze=False)
    for ax, name in zip(axes[0], numeric, strict=False):
        for m in members:
            pts = [(s["step"], s["values"][name]) for s in scores if s["member"] == m]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], linewidth=1)
        if all(s["values"][name] > 0 for s in scores):
            ax.set_yscale("log")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("step")
    fig.suptitle(f"{directory.name}: explored values per member")
    fig.tight_layout()
    _save_figure(fig, out / "hyperparameters.png")
    plt.close(fig)
    files = [
        out / n for n in ("scores.csv", "best_score.png", "lineage.png", "hyperparameters.png")
    ]
    return {"best": meta_best, "files": files, "scores": scores, "lineage": lineage}
