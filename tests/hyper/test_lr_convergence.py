"""Small, fast version of experiments/lr_convergence_mnist1d.py.

An MLP on MNIST-1D whose lr is tuned by hypergradient (greedy validation hypergradient, SGD on
log(lr)) from one decade too high and one decade too low ends at the same lr; with the tuning
switched off (tiny hyper_lr) the same check fails, so it is not vacuous.

Settings, scaled down from the experiment (2000 steps, width 1024) to stay within ~20 s on two
CPU cores: 500 steps, width 512. Tolerance 10 % on the ratio of the final lrs (geometric mean
over the last 10 % of hyper steps). Why 10 % and not the experiment's 5 %: over seeds 0-9 this
configuration ended within 0.95-1.03 (worst 4.75 %, seed 0: 0.981), so 5 % would leave no margin
for a different torch build's float rounding, while 10 % is still 2 % of the 100x gap in log(lr)
the runs start from (log 1.1 = 0.095 vs log 100 = 4.6), and the untuned control ends ~100x apart.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest

from gradhpo.run import TrainingRun

REF_LR = 0.03  # where the tuner heads in its first ~100 steps from either start
STEPS = 500
TOLERANCE = 0.10
FINAL_FRACTION = 0.1
MODEL = {"name": "mlp", "depth": 1, "width": 512}
HYPER_LR = 10.0
TUNER: dict[str, Any] = {
    "method": "greedy",
    "hyper_optimizer": "sgd",
    "clip": 0.05,
    "objective": "val",
    "val_batch_size": 400,  # the whole MNIST-1D validation split
}


def final_lr(lrs: list[float]) -> float:
    """Geometric mean of the lr over the last FINAL_FRACTION of the hyper steps."""
    n = max(1, int(round(len(lrs) * FINAL_FRACTION)))
    tail = lrs[-n:]
    return math.exp(sum(math.log(v) for v in tail) / len(tail))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # MNIST-1D is generated (~4 s) into this folder by the first run, then read from its cache.
    return tmp_path_factory.mktemp("gradhpo_data")


pytestmark = pytest.mark.usefixtures("one_thread")


def tuned_lrs(data_dir: Path, init: float, hyper_lr: float) -> list[float]:
    """The lr before training and after each of the STEPS hyper steps."""
    run = TrainingRun(
        model=MODEL,
        data={"name": "mnist1d", "seed": 0, "data_dir": str(data_dir)},
        optimizer={"name": "sgd", "lr": init, "momentum": 0.9},
        batch_size=128,
        seed=0,
        device="cpu",
        tuner={"hypers": [{"name": "lr", "init": init}], "hyper_lr": hyper_lr, **TUNER},
    )
    lrs = [run.hyperparameters["lr"]]
    for _ in range(STEPS):
        run.step(1)
        lrs.append(run.hyperparameters["lr"])
    assert not run.diverged and run.global_step == STEPS
    return lrs


@pytest.fixture(scope="module")
def tuned(data_dir: Path) -> dict[str, list[float]]:
    return {
        "high": tuned_lrs(data_dir, 10 * REF_LR, HYPER_LR),
        "low": tuned_lrs(data_dir, 0.1 * REF_LR, HYPER_LR),
    }


@pytest.fixture(scope="module")
def untuned(data_dir: Path) -> dict[str, list[float]]:
    return {
        "high": tuned_lrs(data_dir, 10 * REF_LR, 1e-6),
        "low": tuned_lrs(data_dir, 0.1 * REF_LR, 1e-6),
    }


def test_lr_from_ten_times_too_high_and_too_low_meets(tuned: dict[str, list[float]]) -> None:
    high, low = tuned["high"], tuned["low"]
    # Not vacuous: the runs start 100x apart, and each moves by far more than the tolerance.
    assert math.isclose(high[0] / low[0], 100.0, rel_tol=1e-5)
    final_high, final_low = final_lr(high[1:]), final_lr(low[1:])
    assert final_high < high[0] / 2 and final_low > 2 * low[0]
    ratio = final_high / final_low
    assert abs(ratio - 1.0) <= TOLERANCE, (
        f"final lr {final_high:.5g} (from {high[0]:g}) vs {final_low:.5g} (from {low[0]:g}): "
        f"ratio {ratio:.4f}"
    )


def test_without_tuning_the_check_fails(untuned: dict[str, list[float]]) -> None:
    high, low = untuned["high"], untuned["low"]
    ratio = final_lr(high[1:]) / final_lr(low[1:])
    assert abs(ratio - 1.0) > TOLERANCE
    assert ratio > 50.0  # the lrs barely moved from their 100x gap
