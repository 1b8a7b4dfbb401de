"""Quick version of ``experiments/repro_hypergradient_descent.py`` (Baydin et al., ICLR 2018):
the script's own functions on digits with logistic regression and a short budget.

At alpha0 = 1e-3 plain SGD barely moves; SGD-HD (beta = 1e-3) must raise its lr and end with a
lower mean training loss over the last epoch. With beta = 0 the HD optimizer must retrace SGD
exactly (same initial weights, same batches), which shows that the comparison is controlled.
"""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[2] / "experiments" / "repro_hypergradient_descent.py"
EPOCHS = 5  # 5 x 9 = 45 iterations of batch 128


@pytest.fixture(scope="module")
def repro():
    name = "repro_hypergradient_descent"
    spec = importlib.util.spec_from_file_location(name, SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(name, None)


@pytest.fixture(scope="module")
def setup(repro):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    data = repro.load_dataset("digits", seed=0)
    model0 = repro.initial_model(data, repro.model_config("digits", "logreg"), seed=0)
    yield data, model0
    torch.set_num_threads(threads)


def test_sgd_hd_beats_sgd_at_small_alpha0(repro, setup):
    data, model0 = setup
    base, hd, verdict = repro.compare_pair(
        data, model0, "SGD", epochs=EPOCHS, dataset="digits", model_name="logreg", seed=0
    )
    assert (base.optimizer, hd.optimizer) == ("SGD", "SGD-HD")
    assert (base.alpha0, hd.alpha0, base.beta, hd.beta) == (1e-3, 1e-3, 0.0, 1e-3)
    assert len(hd.losses) == len(base.losses) == EPOCHS * hd.steps_per_epoch
    assert not base.diverged and not hd.diverged
    # same initial weights and first batch: the first losses agree
    assert hd.losses[0] == pytest.approx(base.losses[0], rel=1e-6)
    # plain SGD keeps its lr, SGD-HD raises it well above alpha0
    assert set(base.lrs) == {1e-3}
    assert hd.final_lr > 5e-3
    assert hd.lrs[-1] == hd.final_lr and max(hd.lrs) > hd.lrs[0]
    # the criterion of the reproduction, with a margin
    assert math.isfinite(hd.last_epoch_mean)
    assert hd.last_epoch_mean < 0.9 * base.last_epoch_mean
    assert verdict.met
    assert hd.final_train_loss < base.final_train_loss


def test_beta_zero_retraces_sgd(repro, setup):
    data, model0 = setup
    base = repro.train_run(data, model0, "SGD", epochs=2, seed=0)
    hd0 = repro.train_run(data, model0, "SGD-HD", epochs=2, seed=0, beta=0.0)
    assert hd0.losses == base.losses
    assert hd0.lrs == base.lrs


def test_verdict_fails_when_hd_is_worse(repro):
    verdict = repro.PairVerdict("d", "m", "SGD", "SGD-HD", base_score=0.5, hd_score=0.6)
    assert not verdict.met
    diverged = repro.PairVerdict("d", "m", "SGD", "SGD-HD", base_score=0.5, hd_score=math.inf)
    assert not diverged.met
