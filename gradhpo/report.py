"""Reports of a study directory: a results table (CSV + Markdown) and PNG plots.

``write_report(directory)`` reads the study from its storage and the per-trial
``progress.json`` files and writes, under ``<directory>/report/``:

* ``results.csv`` and ``results.md``: one row per trial (state, value, epochs, seconds, the
  sampled parameters and the final values of the hypergradient-tuned hyperparameters);
* ``optimization_history.png``: each trial's value and the best so far, the y-axis named by
  the metric and scaled to the finished trials (a pruned trial's last report, from an earlier
  epoch, or a diverged value is drawn at the edge when it lies outside);
* ``hyperparameters.png``: every tuned hyperparameter's trajectory over epochs, one line per
  trial (per layer where the tuner was granular), the best trial in bold, pruned trials grey;
* ``parallel_coordinates.png``: sampled parameters of finished trials in the order of the
  search space, categorical axes labelled with their choices, coloured by value with a colour
  bar (the best trial in yellow and drawn on top);
* ``schedules.png`` (only when a tuned hyperparameter is a schedule, keys ``name[i]``): each
  trial's learned schedule at its last epoch, value against segment, the best trial in bold.

``write_pbt_report`` writes the same kind of files for a PBT run. "Best" follows the
direction of the metric everywhere (the lowest ``val_loss``, the highest ``val_accuracy``).
The numbers each plot draws come from :func:`history_data`, :func:`hyper_data`,
:func:`parallel_data` and :func:`pbt_data`, so the choices (best, limits, scales) are tested
without looking at pixels.
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib
import yaml

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import optuna  # noqa: E402
from matplotlib.cm import ScalarMappable  # noqa: E402
from matplotlib.colors import Normalize  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from gradhpo.config import ConfigError  # noqa: E402
from gradhpo.files import atomic_write, write_text  # noqa: E402
from gradhpo.hyper.spec import split_segment_key  # noqa: E402
from gradhpo.pbt.store import PBTDatabase  # noqa: E402
from gradhpo.run.loop import METRICS  # noqa: E402
from gradhpo.search.study import is_retried, load_optuna_study  # noqa: E402

__all__ = [
    "Objective",
    "history_data",
    "hyper_data",
    "objectives_of",
    "parallel_data",
    "pbt_data",
    "trial_rows",
    "write_pbt_report",
    "write_report",
]

#: A trajectory is drawn on a log axis only when its positive values span at least this ratio
#: (on a narrower range a log axis has no readable ticks and shows nothing linear would not).
LOG_RATIO = 10.0
#: Trials named one by one in a legend; beyond it they are grouped.
LEGEND_TRIALS = 8


@dataclass(frozen=True)
class Objective:
    """One objective of a study: its name (the metric, e.g. ``val_loss``) and direction."""

    name: str
    maximize: bool

    @property
    def label(self) -> str:
        return f"{self.name} ({'higher' if self.maximize else 'lower'} is better)"

    def best(self, values: Iterable[float]) -> float:
        """The best of ``values`` in this objective's direction."""
        return (max if self.maximize else min)(values)

    def better(self, a: float, b: float) -> bool:
        return a > b if self.maximize else a < b


# ---------------------------------------------------------------------- reading
def _open(directory: Path) -> tuple[optuna.Study, dict[str, Any]]:
    meta_path = directory / "study.json"
    if not meta_path.is_file():
        raise ConfigError(f"{str(directory)!r} is not a study directory (no study.json)")
    try:
        study = load_optuna_study(directory)  # a damaged study.json is named by its reader
        return study, json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{str(directory)!r}: cannot open the study: {exc}") from exc


def _read_config(directory: Path) -> dict[str, Any]:
    """The run's ``config.yaml`` as a mapping ({} when absent or unreadable: a report of an
    API-made study has none, and the config only names things here)."""
    path = directory / "config.yaml"
    try:
        config = yaml.safe_load(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except (OSError, ValueError, yaml.YAMLError):
        return {}
    return config if isinstance(config, dict) else {}


def _history(directory: Path, number: int) -> list[dict[str, Any]]:
    path = directory / "trials" / f"{number:04d}" / "progress.json"
    if not path.is_file():
        return []
    try:  # a damaged progress file costs that trial's curve, not the report
        history = json.loads(path.read_text(encoding="utf-8")).get("history", [])
    except (OSError, ValueError, AttributeError):
        return []
    return history if isinstance(history, list) else []


def objectives_of(
    study: optuna.Study,
    meta: Mapping[str, Any] | None = None,
    config: Mapping[str, Any] | None = None,
) -> list[Objective]:
    """The study's objectives, direction from the study itself. Names: Optuna's metric names
    when set, else the metric in ``study.json`` (``create_study(metric=...)``), the config's
    ``search.metric`` or the stored best summary; else ``objective`` (``objective i`` for
    several)."""
    directions = [d == optuna.study.StudyDirection.MAXIMIZE for d in study.directions]
    names = getattr(study, "metric_names", None)
    if not names or len(names) != len(directions):
        names = [f"objective {i}" for i in range(len(directions))]
        if len(directions) == 1:
            search = (config or {}).get("search")
            best = study.user_attrs.get("best_test")
            found = [
                (meta or {}).get("metric"),
                search.get("metric") if isinstance(search, Mapping) else None,
                best.get("metric") if isinstance(best, Mapping) else None,
            ]
            names = [next((m for m in found if isinstance(m, str) and m), "objective")]
    return [Objective(str(n), d) for n, d in zip(names, directions, strict=True)]


def _complete(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    return [
        t
        for t in study.get_trials(deepcopy=False)
        if t.state.name == "COMPLETE" and t.values is not None
    ]


def _best_number(study: optuna.Study, objectives: Sequence[Objective]) -> int | None:
    """The best finished trial's number (direction-aware, finite values only); None for a
    multi-objective study or without one."""
    if len(objectives) != 1:
        return None
    done = [t for t in _complete(study) if math.isfinite(t.values[0])]
    if not done:
        return None
    best = done[0]
    for t in done[1:]:
        if objectives[0].better(t.values[0], best.values[0]):
            best = t
    return best.number


def _best_label(study: optuna.Study, objectives: Sequence[Objective], best: int | None) -> str:
    if best is None:
        return ""
    trial = next(t for t in study.get_trials(deepcopy=False) if t.number == best)
    value = trial.values[0] if trial.values else None
    return f"best: trial {best} ({objectives[0].name} {_fmt(value)})"


def trial_rows(study: optuna.Study) -> list[dict[str, Any]]:
    """One flat dict per trial (retried dead trials left out); a multi-objective study has
    ``value 0``, ``value 1``, ... instead of ``value``."""
    multi = len(study.directions) > 1
    rows = []
    for t in study.get_trials(deepcopy=False):
        if is_retried(t):
            continue
        seconds = (
            (t.datetime_complete - t.datetime_start).total_seconds()
            if t.datetime_complete and t.datetime_start
            else None
        )
        row: dict[str, Any] = {"trial": t.number, "state": t.state.name.lower()}
        if multi:
            values = t.values or [None] * len(study.directions)
            row.update({f"value {i}": v for i, v in enumerate(values)})
        else:
            row["value"] = t.values[0] if t.values else None
        row["epochs"] = t.user_attrs.get("epochs", len(t.intermediate_values))
        row["seconds"] = None if seconds is None else round(seconds, 2)
        row.update(t.params)
        row.update({f"final {k}": v for k, v in t.user_attrs.get("hyperparameters", {}).items()})
        rows.append(row)
    return rows


# ---------------------------------------------------------------------- drawing helpers
def _save_figure(fig: Any, path: Path) -> None:
    """Write a figure as PNG atomically (a reader never sees half an image); closes it."""
    try:
        with atomic_write(path) as fh:
            fig.savefig(fh, format="png", dpi=100)
    finally:
        plt.close(fig)


def _mark_best(ax: Any, x: Any, y: Any, label: str, color: str = "C3") -> None:
    """The best point of a plot: a large star above the other marks."""
    ax.scatter([x], [y], marker="*", s=140, color=color, zorder=4, label=label)


def _fmt(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _log_scale(values: Iterable[float]) -> bool:
    """Log axis: every value positive and the values span at least :data:`LOG_RATIO`."""
    finite = [v for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    return bool(finite) and min(finite) > 0 and max(finite) / min(finite) >= LOG_RATIO


def _set_scale(ax: Any, log: bool) -> None:
    if log:
        ax.set_yscale("log")
    else:
        ax.ticklabel_format(axis="y", useOffset=False)


def _margin(lo: float, hi: float, share: float = 0.06) -> tuple[float, float]:
    pad = (hi - lo) * share if hi > lo else (abs(hi) * share or 1.0)
    return lo - pad, hi + pad


def _write_tables(
    rows: list[dict[str, Any]],
    out: Path,
    best: Mapping[str, Any] | None,
    objectives: Sequence[Objective],
) -> None:
    columns: list[str] = []
    for row in rows:
        columns.extend(c for c in row if c not in columns)
    with atomic_write(out / "results.csv", "w") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    lines = []
    if best:
        name = best.get("metric") or objectives[0].name
        text = f"Best trial {best['trial']}: {name} {_fmt(best.get('value'))}"
        if best.get("test_accuracy") is not None:
            text += f", test accuracy {best['test_accuracy']:.4f}"
        if best.get("test_loss") is not None:
            text += f", test loss {best['test_loss']:.4f}"
        lines.append(text + "\n")
    if len(objectives) == 1:
        lines.append(f"value: {objectives[0].label}\n")
    else:
        lines.extend(f"value {i}: {o.label}  " for i, o in enumerate(objectives))
        lines.append("")
    lines.append("| " + " | ".join(columns) + " |")
    lines.append("|" + "---|" * len(columns))
    for row in rows:
        lines.append("| " + " | ".join(_fmt(row.get(c)) for c in columns) + " |")
    write_text(out / "results.md", "\n".join(lines) + "\n")


# ---------------------------------------------------------------------- optimization history
def history_data(study: optuna.Study, objectives: Sequence[Objective]) -> list[dict[str, Any]]:
    """What ``optimization_history.png`` draws, one panel per objective:

    ``complete`` (trial, value) of finished trials; ``best_so_far`` the running best in the
    objective's direction as (trial, value) steps, carried on to the last trial; ``best`` the
    best (trial, value) (single objective) and ``pareto`` the Pareto-optimal trials (several);
    ``pruned`` (trial, last reported value); ``ylim`` the y-range, set by the finite values of
    the finished trials (pruned trials' last values come from earlier epochs and must not
    squash them), by the pruned ones only when nothing finished; ``off_scale`` (trial, kind,
    edge) for each point outside ``ylim`` (``edge``: "top" or "bottom"), drawn at the edge."""
    trials = [t for t in study.get_trials(deepcopy=False) if not is_retried(t)]
    last = max((t.number for t in trials), default=0)
    done = _complete(study)
    pareto = sorted(t.number for t in study.best_trials) if len(objectives) > 1 and done else []
    panels = []
    for i, objective in enumerate(objectives):
        complete = [(t.number, float(t.values[i])) for t in done]
        finite = [(n, v) for n, v in complete if math.isfinite(v)]
        pruned = []
        if len(objectives) == 1:
            for t in trials:
                if t.state.name == "PRUNED" and t.intermediate_values:
                    pruned.append(
                        (t.number, float(t.intermediate_values[max(t.intermediate_values)]))
                    )
        best_so_far: list[tuple[int, float]] = []
        running: float | None = None
        for n, v in finite:
            if running is None or objective.better(v, running):
                running = v
            best_so_far.append((n, running))
        if best_so_far and best_so_far[-1][0] < last:
            best_so_far.append((last, best_so_far[-1][1]))
        best = None
        if len(objectives) == 1 and finite:
            pick = max if objective.maximize else min  # the first of equal values
            best = pick(finite, key=lambda point: point[1])
        scale = [v for _, v in finite] or [v for _, v in pruned if math.isfinite(v)]
        ylim = _margin(min(scale), max(scale)) if scale else None
        off_scale = []
        if ylim is not None:
            for kind, points in (("complete", complete), ("pruned", pruned)):
                for n, v in points:
                    if v < ylim[0]:
                        off_scale.append((n, kind, "bottom"))
                    elif not v <= ylim[1]:  # above, +inf and NaN
                        off_scale.append((n, kind, "top"))
        panels.append(
            {
                "objective": objective,
                "complete": complete,
                "best_so_far": best_so_far,
                "best": best,
                "pareto": pareto,
                "pruned": pruned,
                "ylim": ylim,
                "off_scale": off_scale,
            }
        )
    return panels


def _plot_history(study: optuna.Study, objectives: Sequence[Objective], path: Path) -> None:
    panels = history_data(study, objectives)
    fig, axes = plt.subplots(
        len(panels), 1, figsize=(6.5, 4 * len(panels)), squeeze=False, sharex=True
    )
    for ax, panel in zip(axes[:, 0], panels, strict=True):
        ylim = panel["ylim"]
        off = {(n, kind): edge for n, kind, edge in panel["off_scale"]}
        shown = [
            (n, v) for n, v in panel["complete"] if (n, "complete") not in off and math.isfinite(v)
        ]
        if shown:
            ax.scatter(
                *zip(*shown, strict=True), s=20, color="C0", label="finished trial", zorder=3
            )
        if panel["best_so_far"]:
            xs, ys = zip(*panel["best_so_far"], strict=True)
            ax.step(xs, ys, where="post", color="C3", label="best so far", zorder=2)
        if panel["best"] is not None:
            n, v = panel["best"]
            _mark_best(ax, n, v, f"best: trial {n} ({_fmt(v)})")
        if panel["pareto"]:
            pts = [(n, v) for n, v in shown if n in set(panel["pareto"])]
            if pts:
                ax.scatter(
                    *zip(*pts, strict=True),
                    s=80,
                    facecolors="none",
                    edgecolors="C3",
                    zorder=4,
                    label="Pareto-optimal",
                )
        shown_pruned = [(n, v) for n, v in panel["pruned"] if (n, "pruned") not in off]
        if shown_pruned:
            ax.scatter(
                *zip(*shown_pruned, strict=True),
                s=16,
                marker="x",
                color="gray",
                label="pruned (last report)",
                zorder=2,
            )
        if ylim is not None:
            ax.set_ylim(*ylim)
            if off:
                for edge, marker, y in (("top", "^", ylim[1]), ("bottom", "v", ylim[0])):
                    at = [n for (n, _), e in off.items() if e == edge]
                    if at:
                        ax.scatter(
                            at,
                            [y] * len(at),
                            marker=marker,
                            s=30,
                            color="gray",
                            clip_on=False,
                            zorder=5,
                            label=f"{'above' if edge == 'top' else 'below'} the scale",
                        )
        ax.set_ylabel(panel["objective"].label)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if ylim is not None:
            ax.legend(fontsize=8)
        else:
            diverged = len(panel["complete"])
            ax.text(
                0.5,
                0.5,
                f"no finite value: {diverged} finished trial(s) diverged"
                if diverged
                else "no finished trial yet",
                ha="center",
                va="center",
                transform=ax.transAxes,
            )
    axes[-1, 0].set_xlabel("trial")
    axes[0, 0].set_title(f"{study.study_name}: optimization history")
    fig.tight_layout()
    _save_figure(fig, path)


# ---------------------------------------------------------------------- hyperparameters
def hyper_data(
    directory: Path, study: optuna.Study, objectives: Sequence[Objective]
) -> dict[str, Any]:
    """What ``hyperparameters.png`` draws: ``names`` (tuned hyperparameters that moved),
    ``series`` {name: {trial: [(epoch, value)]}}, ``log`` {name: log axis?} (see
    :func:`_log_scale`), ``best`` the best trial's number (direction-aware) and ``pruned`` the
    numbers of pruned trials."""
    series: dict[str, dict[int, list[tuple[int, float]]]] = {}
    for t in study.get_trials(deepcopy=False):
        for record in _history(directory, t.number):
            folds = record.get("folds") or [{}]
            for name, value in (folds[0].get("hypers") or {}).items():
                series.setdefault(name, {}).setdefault(t.number, []).append(
                    (record["epoch"], value)
                )
    # Constant hyperparameters (not tuned) would only add flat lines.
    names = sorted(
        name
        for name, per_trial in series.items()
        if len({v for pts in per_trial.values() for _, v in pts}) > 1
    )
    return {
        "names": names,
        "series": {n: series[n] for n in names},
        "log": {n: _log_scale(v for pts in series[n].values() for _, v in pts) for n in names},
        "best": _best_number(study, objectives),
        "pruned": {t.number for t in study.get_trials(deepcopy=False) if t.state.name == "PRUNED"},
    }


def _trial_styles(
    numbers: Sequence[int], best: int | None, pruned: set[int], best_label: str
) -> dict[int, dict[str, Any]]:
    """Line style per trial: the best bold black, pruned dashed grey, the others in colour;
    named one by one in the legend up to :data:`LEGEND_TRIALS`, else grouped."""
    others = [n for n in numbers if n != best and n not in pruned]
    named = len(others) <= LEGEND_TRIALS
    styles: dict[int, dict[str, Any]] = {}
    for i, n in enumerate(others):
        styles[n] = {
            "color": f"C{i % 10}",
            "linewidth": 1.0,
            "alpha": 0.8,
            "label": f"trial {n}" if named else ("other trials" if i == 0 else None),
        }
    first_pruned = True
    for n in numbers:
        if n in pruned and n != best:
            styles[n] = {
                "color": "gray",
                "linewidth": 0.8,
                "alpha": 0.5,
                "linestyle": "--",
                "label": "pruned trials" if first_pruned else None,
            }
            first_pruned = False
    if best is not None and best in numbers:
        styles[best] = {
            "color": "black",
            "linewidth": 2.5,
            "alpha": 1.0,
            "zorder": 5,
            "label": best_label,
        }
    return styles


def _layout_with_legend(fig: Any, axes: Iterable[Any]) -> None:
    """``tight_layout`` leaving room at the bottom for one legend of every labelled line in
    ``axes`` (each label once), wrapped to the figure's width."""
    handles: dict[str, Any] = {}
    for ax in axes:
        for h, label in zip(*ax.get_legend_handles_labels(), strict=True):
            handles.setdefault(label, h)
    if not handles:
        fig.tight_layout()
        return
    width, height = fig.get_size_inches()
    longest = max(len(label) for label in handles)
    ncol = max(1, min(len(handles), int(width // (0.8 + 0.075 * longest))))
    rows = math.ceil(len(handles) / ncol)
    bottom = min(0.5, (0.15 + 0.25 * rows) / height)
    fig.tight_layout(rect=(0, bottom, 1, 1))
    fig.legend(
        list(handles.values()),
        list(handles),
        loc="lower center",
        ncol=ncol,
        fontsize=8,
        frameon=False,
    )


def _plot_hypers(
    directory: Path, study: optuna.Study, objectives: Sequence[Objective], path: Path
) -> None:
    data = hyper_data(directory, study, objectives)
    names = data["names"]
    n = max(1, len(names))
    cols = min(3, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.5 * cols, 3.2 * rows + 0.9), squeeze=False)
    for ax in axes.flat[len(names) :]:
        ax.axis("off")
    if not names:
        axes[0][0].text(0.5, 0.5, "no tuned hyperparameter moved", ha="center", va="center")
    numbers = sorted({t for name in names for t in data["series"][name]})
    styles = _trial_styles(
        numbers, data["best"], data["pruned"], _best_label(study, objectives, data["best"])
    )
    for ax, name in zip(axes.flat, names, strict=False):
        for number, points in sorted(data["series"][name].items()):
            xs, ys = zip(*points, strict=True)
            ax.plot(xs, ys, marker=".", **styles[number])
        _set_scale(ax, data["log"][name])
        ax.set_title(name + (" (log scale)" if data["log"][name] else ""), fontsize=9)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.suptitle(f"{study.study_name}: hyperparameter trajectories")
    _layout_with_legend(fig, axes.flat)
    _save_figure(fig, path)


def _plot_schedules(
    directory: Path, study: optuna.Study, objectives: Sequence[Objective], path: Path
) -> bool:
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
    best = _best_number(study, objectives)
    pruned = {t.number for t in study.get_trials(deepcopy=False) if t.state.name == "PRUNED"}
    names = sorted(schedules)
    fig, axes = plt.subplots(1, len(names), figsize=(4.5 * len(names), 4.0), squeeze=False)
    numbers = sorted({n for per_trial in schedules.values() for n in per_trial})
    styles = _trial_styles(numbers, best, pruned, _best_label(study, objectives, best))
    for ax, name in zip(axes[0], names, strict=True):
        for number, segments in sorted(schedules[name].items()):
            xs = sorted(segments)
            ax.plot(xs, [segments[i] for i in xs], marker="o", **styles[number])
        log = _log_scale(v for seg in schedules[name].values() for v in seg.values())
        _set_scale(ax, log)
        ax.set_xlabel("segment (training progress)")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(f"learned {name} schedule" + (" (log scale)" if log else ""), fontsize=9)
    fig.suptitle(f"{study.study_name}: learned schedules at the last epoch")
    _layout_with_legend(fig, axes[0])
    _save_figure(fig, path)
    return True


# ---------------------------------------------------------------------- parallel coordinates
def _ordered_params(trials: Sequence[optuna.trial.FrozenTrial]) -> list[str]:
    """Parameter names in the order the objective suggests them (the search space's order;
    a conditional parameter where it first appears)."""
    names: list[str] = []
    for t in sorted(trials, key=lambda t: t.number):
        names.extend(k for k in t.params if k not in names)
    return names


def _unit_scale(lo: float, hi: float, log: bool) -> Any:
    """The map of [lo, hi] onto [0, 1] (logarithmic when ``log``; 0.5 for a single value)."""

    def f(v: float) -> float:
        return math.log(v) if log else float(v)

    span = f(hi) - f(lo)
    return lambda v: 0.5 if span == 0 else (f(v) - f(lo)) / span


def parallel_data(study: optuna.Study, objectives: Sequence[Objective]) -> dict[str, Any]:
    """What ``parallel_coordinates.png`` draws, for the finished trials with finite values:

    ``trials`` their numbers; ``axes`` one per parameter in search-space order, then one per
    objective, each ``{"name", "kind": "categorical"|"numeric"|"objective", "log",
    "positions": per trial a height in [0, 1] (None: parameter absent), "ticks": [(height,
    label)]}``: a categorical axis has one tick per choice in the distribution's order, a
    numeric one its low and high values; ``values`` their values of the first objective;
    ``order`` trial indices from worst to best (drawn in that order, the best on top); ``cmap``/``vmin``/``vmax`` the colouring by the first
    objective (``viridis`` for maximize, ``viridis_r`` for minimize: the best is always
    yellow); ``best`` the best trial's number; ``left_out`` the finished trials not drawn
    (a non-finite value)."""
    done = _complete(study)
    kept = [t for t in done if all(math.isfinite(v) for v in t.values)]
    names = _ordered_params(kept)
    axes: list[dict[str, Any]] = []
    for name in names:
        raw = [t.params.get(name) for t in kept]
        present = [v for v in raw if v is not None]
        dist = next(t.distributions[name] for t in kept if name in t.distributions)
        numeric = not isinstance(dist, optuna.distributions.CategoricalDistribution) and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in present
        )
        if numeric:
            lo, hi = min(present), max(present)
            log = bool(getattr(dist, "log", False)) and lo > 0
            where = _unit_scale(lo, hi, log)
            ticks = [(0.5, _fmt(lo))] if lo == hi else [(0.0, _fmt(lo)), (1.0, _fmt(hi))]
            axes.append(
                {
                    "name": name,
                    "kind": "numeric",
                    "log": log,
                    "positions": [None if v is None else where(v) for v in raw],
                    "ticks": ticks,
                }
            )
        else:
            choices = [str(c) for c in getattr(dist, "choices", ())]
            choices += sorted({str(v) for v in present} - set(choices))
            step = 1 / max(1, len(choices) - 1)
            pos = {c: (0.5 if len(choices) == 1 else i * step) for i, c in enumerate(choices)}
            axes.append(
                {
                    "name": name,
                    "kind": "categorical",
                    "log": False,
                    "positions": [None if v is None else pos[str(v)] for v in raw],
                    "ticks": [(pos[c], c) for c in choices],
                }
            )
    for i, objective in enumerate(objectives):
        values = [t.values[i] for t in kept]
        lo, hi = (min(values), max(values)) if values else (0.0, 1.0)
        where = _unit_scale(lo, hi, False)
        axes.append(
            {
                "name": objective.label,
                "kind": "objective",
                "log": False,
                "positions": [where(v) for v in values],
                "ticks": [(0.5, _fmt(lo))] if lo == hi else [(0.0, _fmt(lo)), (1.0, _fmt(hi))],
            }
        )
    first = objectives[0]
    values = [t.values[0] for t in kept]
    order = sorted(range(len(kept)), key=lambda i: values[i], reverse=not first.maximize)
    return {
        "trials": [t.number for t in kept],
        "values": values,
        "axes": axes,
        "order": order,
        "cmap": "viridis" if first.maximize else "viridis_r",
        "vmin": min(values) if values else None,
        "vmax": max(values) if values else None,
        "colour_by": first,
        "best": _best_number(study, objectives),
        "left_out": [t.number for t in done if t not in kept],
    }


def _plot_parallel(study: optuna.Study, objectives: Sequence[Objective], path: Path) -> None:
    data = parallel_data(study, objectives)
    axes_data = data["axes"]
    params = [a for a in axes_data if a["kind"] != "objective"]
    fig, ax = plt.subplots(figsize=(max(6, 1.5 * len(axes_data) + 1.5), 4.5))
    title = f"{study.study_name}: parallel coordinates of finished trials"
    if data["left_out"]:
        title += f" ({len(data['left_out'])} with a non-finite value left out)"
    if not data["trials"] or not params:
        ax.text(0.5, 0.5, "no finished trials with parameters", ha="center", va="center")
        ax.axis("off")
    else:
        cmap = plt.get_cmap(data["cmap"])
        lo, hi = data["vmin"], data["vmax"]
        norm = Normalize(*((lo, hi) if hi > lo else _margin(lo, hi)))
        values, first = data["values"], data["colour_by"]
        for i in data["order"]:
            xs = [j for j, a in enumerate(axes_data) if a["positions"][i] is not None]
            ys = [axes_data[j]["positions"][i] for j in xs]
            is_best = data["trials"][i] == data["best"]
            ax.plot(
                xs,
                ys,
                color=cmap(norm(values[i])),
                alpha=1.0 if is_best else 0.75,
                linewidth=2.8 if is_best else 1.2,
                zorder=3 if is_best else 2,
                label=f"best: trial {data['best']} ({first.name} {_fmt(values[i])})"
                if is_best
                else None,
            )
        for j, a in enumerate(axes_data):
            ax.axvline(j, color="gray", linewidth=0.6, zorder=1)
            for y, label in a["ticks"]:
                ax.text(
                    j - 0.04,
                    y,
                    label,
                    ha="right",
                    va="center",
                    fontsize=7,
                    bbox={"facecolor": "white", "edgecolor": "none", "alpha": 0.7, "pad": 1},
                )
        ax.set_xticks(range(len(axes_data)))
        ax.set_xticklabels(
            [a["name"].replace(" (", "\n(") + ("\n(log)" if a["log"] else "") for a in axes_data],
            fontsize=7,
        )
        ax.set_xlim(-0.6, len(axes_data) - 0.8)
        ax.set_ylim(-0.05, 1.05)
        ax.set_yticks([])
        for side in ("left", "right", "top"):
            ax.spines[side].set_visible(False)
        bar = fig.colorbar(ScalarMappable(norm=norm, cmap=cmap), ax=ax, pad=0.02)
        bar.set_label(first.label, fontsize=8)
        if data["best"] is not None:
            ax.legend(loc="upper left", bbox_to_anchor=(0.0, 1.12), fontsize=7, frameon=False)
    ax.set_title(title, fontsize=10, pad=18)
    fig.tight_layout()
    _save_figure(fig, path)


# ---------------------------------------------------------------------- write_report
def write_report(
    directory: str | os.PathLike[str], out: str | os.PathLike[str] | None = None
) -> dict[str, Any]:
    """Write the tables and plots; returns ``{"best": ..., "files": [...], "rows": [...]}``."""
    directory = Path(directory)
    study, meta = _open(directory)
    objectives = objectives_of(study, meta, _read_config(directory))
    out = Path(out) if out is not None else directory / "report"
    out.mkdir(parents=True, exist_ok=True)
    rows = trial_rows(study)
    best = study.user_attrs.get("best_test")
    _write_tables(rows, out, best, objectives)
    _plot_history(study, objectives, out / "optimization_history.png")
    _plot_hypers(directory, study, objectives, out / "hyperparameters.png")
    _plot_parallel(study, objectives, out / "parallel_coordinates.png")
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
    if _plot_schedules(directory, study, objectives, out / "schedules.png"):
        files.append(out / "schedules.png")
    return {"best": best, "files": files, "rows": rows}


# ---------------------------------------------------------------------- PBT
def _pbt_maximize(directory: Path, db: PBTDatabase) -> bool:
    """Whether the PBT run in ``directory`` maximizes its score: stored by the manager; for
    runs made before it was, from the config's metric (best = min for a loss)."""
    stored = db.get_meta("maximize")
    if stored is not None:
        return bool(stored)
    metric = (_read_config(directory).get("pbt") or {}).get("metric", "val_accuracy")
    return METRICS.get(metric, "maximize") == "maximize"


def pbt_data(
    scores: Sequence[Mapping[str, Any]],
    maximize: bool,
    config: Mapping[str, Any] | None = None,
    best: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """What the PBT plots draw: ``objective`` (the metric's name and direction); ``steps``,
    ``best`` (the best member's score at each step, in the metric's direction) and ``mean``;
    ``members``; ``best_member`` (the run's best, from ``best``); ``names`` the explored
    hyperparameters in the order of ``pbt.space``; ``scale`` per name: ``"log"`` only where
    the space says ``log: true``, ``"categorical"`` for a categorical (``choices`` holds its
    ticks: a batch size is one of its choices, not a point on a log axis), else ``"linear"``
    (a name the space does not list: log when its positive values span a decade)."""
    pbt = (config or {}).get("pbt") or {}
    space: Mapping[str, Any] = pbt["space"] if isinstance(pbt.get("space"), Mapping) else {}
    metric = pbt.get("metric") or (best or {}).get("metric") or "score"
    objective = Objective(str(metric), bool(maximize))
    by_step: dict[int, list[float]] = {}
    for s in scores:
        if s["score"] is not None and math.isfinite(s["score"]):
            by_step.setdefault(s["step"], []).append(s["score"])
    steps = sorted(by_step)
    names = [n for n in space if any(n in s["values"] for s in scores)]
    for s in scores:
        names.extend(n for n in s["values"] if n not in names)
    scale: dict[str, str] = {}
    choices: dict[str, list[Any]] = {}
    for name in names:
        spec = space.get(name) if isinstance(space.get(name), Mapping) else None
        seen = [s["values"][name] for s in scores if name in s["values"]]
        numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in seen)
        if (spec is not None and spec.get("type") == "categorical") or not numeric:
            scale[name] = "categorical"
            listed = list(spec.get("choices") or []) if spec is not None else []
            choices[name] = listed + [v for v in dict.fromkeys(seen) if v not in listed]
        elif spec is not None:
            scale[name] = "log" if spec.get("log") else "linear"
        else:
            scale[name] = "log" if _log_scale(seen) else "linear"
    return {
        "objective": objective,
        "steps": steps,
        "best": [objective.best(by_step[t]) for t in steps],
        "mean": [sum(by_step[t]) / len(by_step[t]) for t in steps],
        "members": sorted({s["member"] for s in scores}),
        "best_member": (best or {}).get("member"),
        "best_step": (best or {}).get("step"),
        "best_score": (best or {}).get("score"),
        "names": names,
        "scale": scale,
        "choices": choices,
    }


def _member_styles(members: Sequence[int], best: int | None) -> dict[int, dict[str, Any]]:
    named = len(members) <= 2 * LEGEND_TRIALS
    styles = {}
    for i, m in enumerate(members):
        styles[m] = {
            "color": f"C{i % 10}",
            "linewidth": 1.0,
            "alpha": 0.8,
            "label": f"member {m}" if named else None,
        }
    if best in styles:
        styles[best] = {
            "color": "black",
            "linewidth": 2.5,
            "alpha": 1.0,
            "zorder": 5,
            "label": f"member {best} (best)",
        }
    return styles


def write_pbt_report(
    directory: str | os.PathLike[str], out: str | os.PathLike[str] | None = None
) -> dict[str, Any]:
    """PBT run report: ``scores.csv``, ``best_score.png`` (the population's best and mean
    score per step, the y-axis named by the metric), ``lineage.png`` (members over steps, an
    arrow source -> copier for each exploit, the best member marked) and
    ``hyperparameters.png`` (each member's explored values over steps, on the scale of its
    search space, the best member in bold)."""
    directory = Path(directory)
    db = PBTDatabase(directory)
    try:
        scores, lineage = db.scores(), db.lineage()
        meta_best = db.get_meta("best")
        maximize = _pbt_maximize(directory, db)
    finally:
        db.close()
    data = pbt_data(scores, maximize, _read_config(directory), meta_best)
    objective: Objective = data["objective"]
    out = Path(out) if out is not None else directory / "report"
    out.mkdir(parents=True, exist_ok=True)
    names = data["names"]
    with atomic_write(out / "scores.csv", "w") as fh:
        writer = csv.writer(fh)
        writer.writerow(["step", "member", "score", *names])
        for s in scores:
            writer.writerow(
                [s["step"], s["member"], s["score"], *(s["values"].get(n) for n in names)]
            )

    fig, ax = plt.subplots(figsize=(6.5, 4))
    ax.plot(data["steps"], data["best"], color="C3", label="best member")
    ax.plot(data["steps"], data["mean"], color="C0", alpha=0.7, label="population mean")
    if data["best_step"] is not None and data["best_score"] is not None:
        _mark_best(
            ax,
            data["best_step"],
            data["best_score"],
            f"best: member {data['best_member']} at step {data['best_step']} "
            f"({_fmt(data['best_score'])})",
        )
    ax.set_xlabel("step")
    ax.set_ylabel(objective.label)
    ax.set_title(f"{directory.name}: population score")
    ax.legend(fontsize=8)
    fig.tight_layout()
    _save_figure(fig, out / "best_score.png")

    members = data["members"]
    styles = _member_styles(members, data["best_member"])
    fig, ax = plt.subplots(figsize=(7, 4))
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
    if data["best_member"] is not None and data["best_step"] is not None:
        _mark_best(
            ax,
            data["best_step"],
            data["best_member"],
            f"best: member {data['best_member']}",
            "black",
        )
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.set_yticks(members)
    ax.set_xlabel("step")
    ax.set_ylabel("member")
    ax.set_title(f"{directory.name}: lineage ({len(lineage)} exploits, arrow: source -> copier)")
    fig.tight_layout()
    _save_figure(fig, out / "lineage.png")

    cols = max(1, len(names))
    fig, axes = plt.subplots(1, cols, figsize=(4.5 * cols, 4.0), squeeze=False)
    for ax, name in zip(axes[0], names, strict=False):
        kind = data["scale"][name]
        index = {repr(c): i for i, c in enumerate(data["choices"].get(name, []))}
        for m in members:
            pts = [
                (s["step"], s["values"][name])
                for s in scores
                if s["member"] == m and name in s["values"]
            ]
            if not pts:
                continue
            # A score row's values are those the member trained with up to that step: held
            # back to the previous step (steps-pre), the first ones from step 0.
            pts.insert(0, (0, pts[0][1]))
            ys = [index[repr(v)] if kind == "categorical" else v for _, v in pts]
            ax.plot([p[0] for p in pts], ys, drawstyle="steps-pre", **styles[m])
        if kind == "categorical":
            ax.set_yticks(range(len(index)))
            ax.set_yticklabels([_fmt(c) for c in data["choices"][name]])
            ax.set_ylim(-0.5, len(index) - 0.5)
        else:
            _set_scale(ax, kind == "log")
        ax.set_title(name + (" (log scale)" if kind == "log" else ""), fontsize=9)
        ax.set_xlabel("step")
    if not names:
        axes[0][0].text(0.5, 0.5, "nothing explored", ha="center", va="center")
    fig.suptitle(f"{directory.name}: explored values per member")
    _layout_with_legend(fig, axes[0])
    _save_figure(fig, out / "hyperparameters.png")
    files = [
        out / n for n in ("scores.csv", "best_score.png", "lineage.png", "hyperparameters.png")
    ]
    return {"best": meta_best, "files": files, "scores": scores, "lineage": lineage}
