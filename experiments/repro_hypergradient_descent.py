"""Reproduction: Baydin et al., "Online Learning Rate Adaptation with Hypergradient Descent"
(ICLR 2018), on the offline data sets of gradhpo, with :mod:`gradhpo.optim.hd`.

Part 1 - HD variant against its base optimizer
    Data sets ``digits`` (8x8 images) and ``mnist1d`` (length-40 signals); models logistic
    regression (``mlp`` with depth 0), an MLP (2 hidden layers of 128, ReLU) and a small CNN
    (``cnn`` on digits, ``cnn1d`` on mnist1d: 2 conv blocks of width 32 with BatchNorm and max
    pooling). The paper's settings: minibatch 128, L2 weight decay 1e-4 (coupled, i.e. torch's
    ``weight_decay``), initial lr ``alpha0 = 1e-3`` for every optimizer, hypergradient lr
    ``beta = 1e-3`` for SGD-HD and SGDN-HD and ``1e-7`` for Adam-HD, one lr shared by all
    parameters (``adapt="optimizer"``), additive rule. Pairs: SGD vs SGD-HD, SGD-Nesterov
    (momentum 0.9) vs SGDN-HD, Adam vs Adam-HD. Every optimizer of a data set x model starts from
    the same initial weights (one model built with a fixed seed, copied) and sees the same batch
    order (a :class:`~gradhpo.data.BatchIterator` with the same seed, ``drop_last=True``, so
    every batch has 128 samples). A fixed number of epochs (``--epochs``).

    Logged every iteration: the minibatch training loss (cross-entropy, without the L2 term,
    measured at the parameters *before* the step) and the lr used by the step (for the HD
    variants the lr is adapted before the parameters move, so this is the adapted value).

    Per run: "final train loss" = cross-entropy over the whole training split after training
    (model in eval mode), "last-epoch mean loss" = mean of the minibatch losses of the last
    epoch, validation accuracy (eval mode) and final lr.

    Verdict per pair: **"HD variant ends with training loss <= its baseline's"**, decided on the
    last-epoch mean loss (a diverged run counts as +inf). Pairs that fail are reported as such.
    Expected (checked; exit code 1 if not met): at least 85 % of the pairs meet it (the paper
    reports HD <= baseline for every optimizer and model; measured here: 18/18 on seed 0).

Part 2 - sensitivity grid (like the paper's Figure 4)
    Logistic regression on digits. For each ``alpha0`` in a log grid, the base optimizer, and
    for each ``alpha0 x beta`` the HD variant, is trained until the cross-entropy over the whole
    training split (evaluated after every step) falls below a threshold; the figure is the
    number of iterations needed (capped: ">cap" when not reached). SGD vs SGD-HD, and Adam vs
    Adam-HD unless ``--no-adam-grid``. Same initial weights and batch order everywhere.

Usage (from the repository root)::

    .venv/bin/python experiments/repro_hypergradient_descent.py            # 2-6 min on 2 cores
    .venv/bin/python experiments/repro_hypergradient_descent.py --quick    # < 1 min smoke run

Outputs in ``--out`` (default ``experiments/results/repro_hd/``): ``curves.csv`` (every logged
iteration of every run), ``summary.csv`` + ``summary.md`` (table and verdicts), ``loss.png``,
``lr.png``, ``sensitivity_<opt>.csv``, ``sensitivity.md`` and ``sensitivity_<opt>.png``.

The functions (:func:`train_run`, :func:`compare_pair`, :func:`iterations_to_threshold`, ...)
are importable; ``tests/optim/test_repro_quick.py`` runs the same code on a short budget.
"""

from __future__ import annotations

import argparse
import copy
import csv
import math
import platform
import statistics
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from gradhpo.models import build_model
from torch import nn

from gradhpo.data import BatchIterator, DataSplits, load_dataset
from gradhpo.optim import SGDHD, SGDNHD, AdamHD

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "experiments" / "results" / "repro_hd"

# ---------------------------------------------------------------------------------- settings
BATCH_SIZE = 128
WEIGHT_DECAY = 1e-4
ALPHA0 = 1e-3
MOMENTUM = 0.9
BETA_SGD = 1e-3  # SGD-HD and SGDN-HD
BETA_ADAM = 1e-7  # Adam-HD

DATASET_NAMES = ("digits", "mnist1d")
MODEL_NAMES = ("logreg", "mlp", "cnn")
OPTIMIZER_NAMES = ("SGD", "SGD-HD", "SGDN", "SGDN-HD", "Adam", "Adam-HD")
PAIRS: tuple[tuple[str, str], ...] = (("SGD", "SGD-HD"), ("SGDN", "SGDN-HD"), ("Adam", "Adam-HD"))
HD_OF = {base: hd for base, hd in PAIRS}
# about 900 iterations on both (digits: 9 batches of 128 per epoch, mnist1d: 28)
DEFAULT_EPOCHS = {"digits": 100, "mnist1d": 30}
QUICK_EPOCHS = {"digits": 5, "mnist1d": 2}


def model_config(dataset: str, model: str) -> dict[str, Any]:
    """The ``build_model`` config of ``model`` (``logreg``/``mlp``/``cnn``) for ``dataset``."""
    if model == "logreg":
        return {"name": "mlp", "depth": 0}
    if model == "mlp":
        return {"name": "mlp", "depth": 2, "width": 128, "activation": "relu"}
    if model == "cnn":
        name = "cnn1d" if dataset == "mnist1d" else "cnn"
        return {"name": name, "depth": 2, "width": 32, "norm": "batch", "pooling": "max"}
    raise ValueError(f"unknown model {model!r}; one of {MODEL_NAMES}")


def default_beta(optimizer: str) -> float:
    """The paper's hypergradient lr for an HD variant (0 for a base optimizer)."""
    if optimizer in ("SGD-HD", "SGDN-HD"):
        return BETA_SGD
    if optimizer == "Adam-HD":
        return BETA_ADAM
    return 0.0


def make_optimizer(
    name: str,
    params: Iterable[torch.Tensor],
    *,
    lr: float = ALPHA0,
    beta: float | None = None,
    weight_decay: float = WEIGHT_DECAY,
) -> torch.optim.Optimizer:
    """One of :data:`OPTIMIZER_NAMES`; ``beta`` (HD variants only) defaults to the paper's."""
    if beta is None:
        beta = default_beta(name)
    hd: dict[str, Any] = {"hypergrad_lr": beta, "adapt": "optimizer", "rule": "additive"}
    if name == "SGD":
        return torch.optim.SGD(params, lr=lr, weight_decay=weight_decay)
    if name == "SGD-HD":
        return SGDHD(params, lr=lr, weight_decay=weight_decay, **hd)
    if name == "SGDN":
        return torch.optim.SGD(
            params, lr=lr, momentum=MOMENTUM, nesterov=True, weight_decay=weight_decay
        )
    if name == "SGDN-HD":
        return SGDNHD(params, lr=lr, momentum=MOMENTUM, weight_decay=weight_decay, **hd)
    if name == "Adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    if name == "Adam-HD":
        return AdamHD(params, lr=lr, weight_decay=weight_decay, **hd)
    raise ValueError(f"unknown optimizer {name!r}; one of {OPTIMIZER_NAMES}")


def initial_model(data: DataSplits, config: dict[str, Any], seed: int) -> nn.Module:
    """The model every optimizer of a comparison starts from (copy it with ``copy.deepcopy``)."""
    torch.manual_seed(seed)
    return build_model(config, data.input_shape, data.num_classes)


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, chunk: int = 2048) -> tuple:
    """(mean cross-entropy, accuracy) of ``model`` in eval mode over ``x``, ``y``."""
    was_training = model.training
    model.eval()
    total, correct = 0.0, 0
    for start in range(0, len(y), chunk):
        logits = model(x[start : start + chunk])
        yy = y[start : start + chunk]
        total += float(F.cross_entropy(logits, yy, reduction="sum"))
        correct += int((logits.argmax(1) == yy).sum())
    model.train(was_training)
    return total / len(y), correct / len(y)


# ---------------------------------------------------------------------------------- part 1
@dataclass
class RunResult:
    """One training run: curves (one entry per logged iteration) and end-of-run figures."""

    dataset: str
    model: str
    optimizer: str
    alpha0: float
    beta: float
    steps_per_epoch: int
    iterations: list[int] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    lrs: list[float] = field(default_factory=list)
    epoch_means: list[float] = field(default_factory=list)
    final_train_loss: float = math.nan
    last_epoch_mean: float = math.nan
    val_accuracy: float = math.nan
    final_lr: float = math.nan
    diverged: bool = False
    seconds: float = 0.0

    @property
    def score(self) -> float:
        """The verdict's figure: last-epoch mean loss, +inf if the run diverged."""
        if self.diverged or not math.isfinite(self.last_epoch_mean):
            return math.inf
        return self.last_epoch_mean


def train_run(
    data: DataSplits,
    model0: nn.Module,
    optimizer: str,
    *,
    epochs: int,
    dataset: str = "",
    model_name: str = "",
    lr: float = ALPHA0,
    beta: float | None = None,
    weight_decay: float = WEIGHT_DECAY,
    batch_size: int = BATCH_SIZE,
    seed: int = 0,
    log_every: int = 1,
) -> RunResult:
    """Trains a copy of ``model0`` for ``epochs`` epochs with ``optimizer``.

    The batch order depends on ``seed`` only, so runs with the same seed see the same batches.
    A run stops early (``diverged``) when the minibatch loss becomes non-finite.
    """
    if beta is None:
        beta = default_beta(optimizer)
    model = copy.deepcopy(model0)
    model.train()
    opt = make_optimizer(optimizer, model.parameters(), lr=lr, beta=beta, weight_decay=weight_decay)
    batches = BatchIterator(data.train.x, data.train.y, batch_size, seed=seed, drop_last=True)
    steps_per_epoch = len(batches)
    result = RunResult(dataset, model_name, optimizer, lr, beta, steps_per_epoch)
    start = time.perf_counter()
    epoch_losses: list[float] = []
    for it in range(epochs * steps_per_epoch):
        xb, yb = next(batches)
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(xb), yb)
        loss.backward()
        opt.step()
        value = loss.item()
        current_lr = float(opt.param_groups[0]["lr"])
        if not math.isfinite(value):
            result.diverged = True
            result.iterations.append(it)
            result.losses.append(value)
            result.lrs.append(current_lr)
            break
        epoch_losses.append(value)
        if it % log_every == 0 or it == epochs * steps_per_epoch - 1:
            result.iterations.append(it)
            result.losses.append(value)
            result.lrs.append(current_lr)
        if len(epoch_losses) == steps_per_epoch:
            result.epoch_means.append(statistics.fmean(epoch_losses))
            epoch_losses = []
    result.seconds = time.perf_counter() - start
    result.final_lr = float(opt.param_groups[0]["lr"])
    if getattr(opt, "diverged", False):  # an HD optimizer that skipped non-finite steps
        result.diverged = True
    if not result.diverged and result.epoch_means:
        result.last_epoch_mean = result.epoch_means[-1]
    result.final_train_loss, _ = evaluate(model, data.train.x, data.train.y)
    _, result.val_accuracy = evaluate(model, data.val.x, data.val.y)
    return result


@dataclass
class PairVerdict:
    dataset: str
    model: str
    base: str
    hd: str
    base_score: float
    hd_score: float

    @property
    def met(self) -> bool:
        """HD variant ends with training loss (last-epoch mean) <= its baseline's."""
        return self.hd_score <= self.base_score and math.isfinite(self.hd_score)

    def line(self) -> str:
        verdict = "MET" if self.met else "FAILED"
        return (
            f"{self.dataset:8s} {self.model:6s} {self.hd:8s} {self.hd_score:.4f} <= "
            f"{self.base:5s} {self.base_score:.4f} ? {verdict}"
        )


def compare_pair(
    data: DataSplits,
    model0: nn.Module,
    base: str,
    *,
    epochs: int,
    dataset: str = "",
    model_name: str = "",
    seed: int = 0,
    log_every: int = 1,
) -> tuple[RunResult, RunResult, PairVerdict]:
    """Base optimizer and its HD variant from the same weights on the same batches."""
    hd = HD_OF[base]
    kwargs: dict[str, Any] = dict(
        epochs=epochs, dataset=dataset, model_name=model_name, seed=seed, log_every=log_every
    )
    base_run = train_run(data, model0, base, **kwargs)
    hd_run = train_run(data, model0, hd, **kwargs)
    verdict = PairVerdict(dataset, model_name, base, hd, base_run.score, hd_run.score)
    return base_run, hd_run, verdict


# ---------------------------------------------------------------------------------- part 2
def iterations_to_threshold(
    data: DataSplits,
    model0: nn.Module,
    optimizer: str,
    *,
    lr: float,
    beta: float,
    threshold: float,
    cap: int,
    seed: int = 0,
    weight_decay: float = WEIGHT_DECAY,
    batch_size: int = BATCH_SIZE,
) -> int | None:
    """Steps until the full-training-split cross-entropy is <= ``threshold``; None if not
    within ``cap`` steps (or on divergence)."""
    model = copy.deepcopy(model0)
    model.train()
    opt = make_optimizer(optimizer, model.parameters(), lr=lr, beta=beta, weight_decay=weight_decay)
    batches = BatchIterator(data.train.x, data.train.y, batch_size, seed=seed, drop_last=True)
    for it in range(1, cap + 1):
        xb, yb = next(batches)
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(xb), yb).backward()
        opt.step()
        loss, _ = evaluate(model, data.train.x, data.train.y)
        if not math.isfinite(loss):
            return None
        if loss <= threshold:
            return it
    return None


@dataclass
class Grid:
    base: str
    hd: str
    alphas: list[float]
    betas: list[float]
    threshold: float
    cap: int
    base_iters: dict[float, int | None]
    hd_iters: dict[tuple[float, float], int | None]


def sensitivity_grid(
    data: DataSplits,
    model0: nn.Module,
    base: str,
    alphas: Sequence[float],
    betas: Sequence[float],
    *,
    threshold: float,
    cap: int,
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
) -> Grid:
    hd = HD_OF[base]
    grid = Grid(base, hd, list(alphas), list(betas), threshold, cap, {}, {})
    for a in alphas:
        grid.base_iters[a] = iterations_to_threshold(
            data, model0, base, lr=a, beta=0.0, threshold=threshold, cap=cap, seed=seed
        )
        for b in betas:
            grid.hd_iters[(a, b)] = iterations_to_threshold(
                data, model0, hd, lr=a, beta=b, threshold=threshold, cap=cap, seed=seed
            )
        if progress:
            row = " ".join(_fmt_iters(grid.hd_iters[(a, b)], cap) for b in betas)
            progress(f"  {hd} alpha0={a:g}: {base} {_fmt_iters(grid.base_iters[a], cap)} | {row}")
    return grid


def _fmt_iters(value: int | None, cap: int) -> str:
    return f">{cap}" if value is None else str(value)


# ---------------------------------------------------------------------------------- outputs
def write_curves(path: Path, runs: Sequence[RunResult]) -> None:
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["dataset", "model", "optimizer", "iteration", "epoch", "train_loss", "lr"])
        for r in runs:
            for it, loss, lr in zip(r.iterations, r.losses, r.lrs, strict=True):
                w.writerow(
                    [
                        r.dataset,
                        r.model,
                        r.optimizer,
                        it,
                        it // r.steps_per_epoch,
                        f"{loss:.6g}",
                        f"{lr:.6g}",
                    ]
                )


def summary_markdown(
    runs: Sequence[RunResult], verdicts: Sequence[PairVerdict], header: str
) -> str:
    lines = [
        header,
        "",
        "| data set | model | optimizer | beta | final train loss | last-epoch mean loss "
        "| val accuracy | final lr | seconds |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        last = "diverged" if r.diverged else f"{r.last_epoch_mean:.4f}"
        lines.append(
            f"| {r.dataset} | {r.model} | {r.optimizer} | {r.beta:g} | {r.final_train_loss:.4f} "
            f"| {last} | {r.val_accuracy:.4f} | {r.final_lr:.4g} | {r.seconds:.1f} |"
        )
    lines += [
        "",
        'Verdict per pair: "HD variant ends with training loss <= its baseline\'s" '
        "(last-epoch mean minibatch loss):",
        "",
        "| data set | model | pair | HD | baseline | HD / baseline | verdict |",
        "|---|---|---|---|---|---|---|",
    ]
    for v in verdicts:
        ratio = v.hd_score / v.base_score if math.isfinite(v.base_score) else math.nan
        lines.append(
            f"| {v.dataset} | {v.model} | {v.hd} vs {v.base} | {v.hd_score:.4f} "
            f"| {v.base_score:.4f} | {ratio:.3f} | {'met' if v.met else '**FAILED**'} |"
        )
    met = sum(v.met for v in verdicts)
    lines += ["", f"{met} of {len(verdicts)} pairs met the criterion."]
    return "\n".join(lines) + "\n"


def write_summary_csv(path: Path, runs: Sequence[RunResult], verdicts: Sequence[PairVerdict]):
    met = {(v.dataset, v.model, v.hd): v.met for v in verdicts}
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(
            [
                "dataset",
                "model",
                "optimizer",
                "alpha0",
                "beta",
                "epochs",
                "iterations",
                "final_train_loss",
                "last_epoch_mean_loss",
                "val_accuracy",
                "final_lr",
                "diverged",
                "seconds",
                "hd_le_baseline",
            ]
        )
        for r in runs:
            w.writerow(
                [
                    r.dataset,
                    r.model,
                    r.optimizer,
                    r.alpha0,
                    r.beta,
                    len(r.epoch_means),
                    r.iterations[-1] + 1 if r.iterations else 0,
                    f"{r.final_train_loss:.6g}",
                    f"{r.last_epoch_mean:.6g}",
                    f"{r.val_accuracy:.6g}",
                    f"{r.final_lr:.6g}",
                    r.diverged,
                    f"{r.seconds:.3f}",
                    met.get((r.dataset, r.model, r.optimizer), ""),
                ]
            )


_COLORS = {"SGD": "tab:blue", "SGDN": "tab:green", "Adam": "tab:red"}


def plot_curves(path: Path, runs: Sequence[RunResult], what: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = list(dict.fromkeys((r.dataset, r.model) for r in runs))
    datasets = list(dict.fromkeys(k[0] for k in keys))
    models = list(dict.fromkeys(k[1] for k in keys))
    fig, axes = plt.subplots(
        len(datasets), len(models), figsize=(4.6 * len(models), 3.4 * len(datasets)), squeeze=False
    )
    for i, ds in enumerate(datasets):
        for j, mo in enumerate(models):
            ax = axes[i][j]
            for r in runs:
                if (r.dataset, r.model) != (ds, mo) or not r.iterations:
                    continue
                base = r.optimizer.removesuffix("-HD")
                style = "-" if r.optimizer.endswith("-HD") else "--"
                ys = r.losses if what == "loss" else r.lrs
                if what == "loss":  # moving average over one epoch for readability
                    k = max(1, r.steps_per_epoch)
                    ys = _moving_average(ys, k)
                ax.plot(r.iterations, ys, style, color=_COLORS[base], label=r.optimizer, lw=1.2)
            ax.set_yscale("log")
            ax.set_title(f"{ds} / {mo}")
            ax.set_xlabel("iteration")
            ax.set_ylabel("training loss (1-epoch moving avg)" if what == "loss" else "lr")
            ax.grid(True, which="both", alpha=0.3)
            if i == 0 and j == 0:
                ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _moving_average(values: Sequence[float], k: int) -> list[float]:
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= k:
            acc -= values[i - k]
        out.append(acc / min(i + 1, k))
    return out


def grid_rows(grid: Grid) -> list[list[Any]]:
    rows = [[grid.base, a, 0.0, grid.base_iters[a]] for a in grid.alphas]
    rows += [[grid.hd, a, b, grid.hd_iters[(a, b)]] for a in grid.alphas for b in grid.betas]
    return rows


def write_grid_csv(path: Path, grid: Grid) -> None:
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(
            [
                "optimizer",
                "alpha0",
                "beta",
                "iterations_to_threshold",
                "threshold",
                "cap",
                "hd_le_baseline",
            ]
        )
        for opt, a, b, it in grid_rows(grid):
            le = "" if b == 0.0 else _le(it, grid.base_iters[a])
            w.writerow([opt, a, b, "" if it is None else it, grid.threshold, grid.cap, le])


def _le(hd: int | None, base: int | None) -> bool:
    """HD reached the threshold in no more iterations than the baseline (never = infinity)."""
    h = math.inf if hd is None else hd
    b = math.inf if base is None else base
    return h <= b and not (hd is None and base is None)


def grid_markdown(grid: Grid, title: str) -> str:
    head = "| beta \\ alpha0 | " + " | ".join(f"{a:g}" for a in grid.alphas) + " |"
    lines = [title, "", head, "|---" * (len(grid.alphas) + 1) + "|"]
    lines.append(
        f"| {grid.base} (no HD) | "
        + " | ".join(_fmt_iters(grid.base_iters[a], grid.cap) for a in grid.alphas)
        + " |"
    )
    for b in grid.betas:
        cells = []
        for a in grid.alphas:
            text = _fmt_iters(grid.hd_iters[(a, b)], grid.cap)
            cells.append(f"**{text}**" if _le(grid.hd_iters[(a, b)], grid.base_iters[a]) else text)
        lines.append(f"| {grid.hd} beta={b:g} | " + " | ".join(cells) + " |")
    pairs = [(grid.hd_iters[(a, b)], grid.base_iters[a]) for a in grid.alphas for b in grid.betas]
    n_le = sum(_le(h, b) for h, b in pairs)
    n_none = sum(h is None and b is None for h, b in pairs)
    slower = [
        f"alpha0={a:g}, beta={b:g}: {_fmt_iters(grid.hd_iters[(a, b)], grid.cap)} vs "
        f"{_fmt_iters(grid.base_iters[a], grid.cap)}"
        for a in grid.alphas
        for b in grid.betas
        if not _le(grid.hd_iters[(a, b)], grid.base_iters[a])
        and not (grid.hd_iters[(a, b)] is None and grid.base_iters[a] is None)
    ]
    lines += [
        "",
        f"Bold: {grid.hd} reached the threshold in no more iterations than {grid.base} "
        f"at the same alpha0 ({n_le} of {len(pairs)} cells); neither reached it in {n_none}; "
        f"{grid.hd} was slower in {len(slower)}" + (f" ({'; '.join(slower)})." if slower else "."),
    ]
    return "\n".join(lines) + "\n"


def plot_grid(path: Path, grid: Grid, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    labels = [f"{grid.base}"] + [f"beta={b:g}" for b in grid.betas]
    values = [[grid.base_iters[a] for a in grid.alphas]]
    values += [[grid.hd_iters[(a, b)] for a in grid.alphas] for b in grid.betas]
    arr = np.array(
        [[grid.cap * 1.25 if v is None else v for v in row] for row in values], dtype=float
    )
    fig, ax = plt.subplots(figsize=(1.1 * len(grid.alphas) + 2.5, 0.5 * len(labels) + 1.8))
    logs = np.log10(arr)
    im = ax.imshow(logs, cmap="viridis_r", aspect="auto")
    middle = (logs.min() + logs.max()) / 2
    for i, row in enumerate(values):
        for j, v in enumerate(row):
            le = i > 0 and _le(v, values[0][j])
            ax.text(
                j,
                i,
                _fmt_iters(v, grid.cap) + (" *" if le else ""),
                ha="center",
                va="center",
                fontsize=8,
                color="white" if logs[i, j] > middle else "black",
                fontweight="bold" if le else "normal",
            )
    ax.axhline(0.5, color="black", lw=2)
    ax.set_xticks(range(len(grid.alphas)), [f"{a:g}" for a in grid.alphas])
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel(f"alpha0 (initial lr);  * = {grid.hd} needs <= iterations than {grid.base}")
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, label="log10 iterations to threshold")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------- main
#: Share of HD-vs-baseline pairs that must meet the verdict for the reproduction to count.
EXPECTED_PAIR_FRACTION = 0.85


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--epochs",
        type=int,
        default=None,
        help="epochs per run on every data set (default: digits 100, mnist1d "
        "30, i.e. 900 / 840 iterations; with --quick 5 / 2)",
    )
    parser.add_argument("--quick", action="store_true", help="a short smoke run (< 1 min)")
    parser.add_argument("--datasets", nargs="+", default=list(DATASET_NAMES), choices=DATASET_NAMES)
    parser.add_argument("--models", nargs="+", default=list(MODEL_NAMES), choices=MODEL_NAMES)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (1: the models are tiny and other jobs share cores)",
    )
    parser.add_argument("--log-every", type=int, default=1)
    parser.add_argument("--no-grid", action="store_true", help="skip the sensitivity grid")
    parser.add_argument("--no-adam-grid", action="store_true", help="SGD-HD grid only")
    parser.add_argument(
        "--grid-threshold",
        type=float,
        default=0.25,
        help="training-loss threshold of the sensitivity grid",
    )
    parser.add_argument(
        "--grid-cap",
        type=int,
        default=None,
        help="iteration cap of the grid (default 1000, 200 with --quick)",
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    default_epochs = QUICK_EPOCHS if args.quick else DEFAULT_EPOCHS
    epochs_of = {ds: args.epochs or default_epochs[ds] for ds in DATASET_NAMES}
    cap = args.grid_cap if args.grid_cap is not None else (200 if args.quick else 1000)
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    print(
        f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} thread(s); epochs={epochs_of}, seed={args.seed}"
    )

    # ---- part 1
    runs: list[RunResult] = []
    verdicts: list[PairVerdict] = []
    datas: dict[str, DataSplits] = {}
    for ds in args.datasets:
        datas[ds] = load_dataset(ds, seed=args.seed)
        for mo in args.models:
            config = model_config(ds, mo)
            model0 = initial_model(datas[ds], config, args.seed)
            for base, _ in PAIRS:
                base_run, hd_run, verdict = compare_pair(
                    datas[ds],
                    model0,
                    base,
                    epochs=epochs_of[ds],
                    dataset=ds,
                    model_name=mo,
                    seed=args.seed,
                    log_every=args.log_every,
                )
                runs += [base_run, hd_run]
                verdicts.append(verdict)
                print(
                    f"{verdict.line()}   (final lr {hd_run.final_lr:.4g}; "
                    f"{base_run.seconds + hd_run.seconds:.1f} s)",
                    flush=True,
                )
    write_curves(args.out / "curves.csv", runs)
    write_summary_csv(args.out / "summary.csv", runs, verdicts)
    steps = {
        ds: len(BatchIterator(d.train.x, d.train.y, BATCH_SIZE, drop_last=True))
        for ds, d in datas.items()
    }
    header = (
        "## HD variants vs base optimizers (epochs x iterations per epoch: "
        + ", ".join(f"{ds} {epochs_of[ds]} x {n}" for ds, n in steps.items())
        + f"; batch {BATCH_SIZE}, L2 {WEIGHT_DECAY:g}, alpha0 {ALPHA0:g}, beta {BETA_SGD:g} "
        f"(SGD-HD, SGDN-HD) / {BETA_ADAM:g} (Adam-HD), seed {args.seed})\n\n"
        "final train loss: cross-entropy over the whole training split after training (eval "
        "mode); last-epoch mean loss: mean minibatch cross-entropy of the last epoch (the "
        "verdict's figure); val accuracy on the validation split; final lr: lr of the last step."
    )
    summary = summary_markdown(runs, verdicts, header)
    plot_curves(args.out / "loss.png", runs, "loss")
    plot_curves(args.out / "lr.png", runs, "lr")
    met = sum(v.met for v in verdicts)
    reproduced = met >= EXPECTED_PAIR_FRACTION * len(verdicts)
    print(
        f"\n{met} of {len(verdicts)} pairs met 'HD variant ends with training loss <= its "
        f"baseline's'; failed: "
        + (", ".join(f"{v.dataset}/{v.model}/{v.hd}" for v in verdicts if not v.met) or "none")
    )

    # ---- part 2
    grid_md = []
    if not args.no_grid:
        data = datas.get("digits") or load_dataset("digits", seed=args.seed)
        model0 = initial_model(data, model_config("digits", "logreg"), args.seed)
        if args.quick:
            alphas, sgd_betas, adam_betas = [1e-3, 1e-2, 1e-1], [1e-4, 1e-3], [1e-6, 1e-4]
        else:
            alphas = [1e-4, 1e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0]
            sgd_betas = [1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1]
            adam_betas = [1e-7, 1e-6, 1e-5, 1e-4, 1e-3, 1e-2]
        specs = [("SGD", sgd_betas)] + ([] if args.no_adam_grid else [("Adam", adam_betas)])
        for base, betas in specs:
            print(
                f"\nsensitivity grid {HD_OF[base]} (digits / logreg, threshold "
                f"{args.grid_threshold}, cap {cap}):",
                flush=True,
            )
            grid = sensitivity_grid(
                data,
                model0,
                base,
                alphas,
                betas,
                threshold=args.grid_threshold,
                cap=cap,
                seed=args.seed,
                progress=lambda s: print(s, flush=True),
            )
            tag = HD_OF[base].lower().replace("-", "")
            title = (
                f"### Sensitivity: iterations to full-training-set loss <= "
                f"{args.grid_threshold:g} (cap {cap}), {HD_OF[base]} vs {base}, "
                f"digits / logistic regression"
            )
            write_grid_csv(args.out / f"sensitivity_{tag}.csv", grid)
            grid_md.append(grid_markdown(grid, title))
            plot_grid(args.out / f"sensitivity_{tag}.png", grid, title.removeprefix("### "))
        (args.out / "sensitivity.md").write_text("\n".join(grid_md))
    elapsed = time.perf_counter() - started
    (args.out / "summary.md").write_text(
        "# Reproduction: online learning rate adaptation with hypergradient descent\n\n"
        f"Command: `.venv/bin/python experiments/repro_hypergradient_descent.py"
        f"{' --quick' if args.quick else ''}{'' if args.epochs is None else f' --epochs {args.epochs}'}`"
        f" ({elapsed:.0f} s; torch {torch.__version__}, {torch.get_num_threads()} thread(s))\n\n"
        + summary
        + ("\n" + "\n".join(grid_md) if grid_md else "")
    )
    print(f"\noutputs in {args.out} ({elapsed:.0f} s)")
    print(
        f"expected >= {EXPECTED_PAIR_FRACTION:.0%} of pairs with HD <= baseline: "
        f"{met}/{len(verdicts)} -> {'REPRODUCED' if reproduced else 'NOT reproduced'}"
    )
    return 0 if reproduced else 1


if __name__ == "__main__":
    raise SystemExit(main())
