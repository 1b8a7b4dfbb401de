"""The HD optimizers in a user's own loop (issue 15: "your own optimizer, AMP, gradient
accumulation"): under a GradScaler with autocast, with gradient accumulation, and read by an
lr scheduler, they behave as the torch.optim optimizers they extend and still adapt."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from gradhpo.optim import SGDHD, AdamHD


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))


def _batches(n: int, size: int = 32):
    gen = torch.Generator().manual_seed(1)
    for _ in range(n):
        x = torch.randn(size, 6, generator=gen)
        yield x, (x[:, :3].sum(1) > 0).long() + (x[:, 3] > 1).long()


def test_gradient_accumulation_equals_the_whole_batch() -> None:
    """Two half-batches with loss/2 accumulated give the whole batch's gradient, so the lr
    trajectory and the weights match one step per whole batch (to rounding)."""
    whole, split = _model(), _model()
    opt_w = SGDHD(whole.parameters(), lr=0.1, momentum=0.9, hypergrad_lr=0.01)
    opt_s = SGDHD(split.parameters(), lr=0.1, momentum=0.9, hypergrad_lr=0.01)
    loss_fn = nn.CrossEntropyLoss()
    for x, y in _batches(20):
        opt_w.zero_grad()
        loss_fn(whole(x), y).backward()
        opt_w.step()
        opt_s.zero_grad()
        for xs, ys in zip(x.chunk(2), y.chunk(2), strict=True):
            (loss_fn(split(xs), ys) / 2).backward()
        opt_s.step()
    assert opt_w.param_groups[0]["lr"] != 0.1  # it adapted
    assert opt_s.param_groups[0]["lr"] == pytest.approx(opt_w.param_groups[0]["lr"], rel=1e-5)
    for a, b in zip(whole.parameters(), split.parameters(), strict=True):
        assert torch.allclose(a, b, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_under_autocast_and_a_grad_scaler(dtype: torch.dtype) -> None:
    """scaler.step unscales the gradients before the HD step (the hypergradient sees the true
    gradient: the lr trajectory equals the unscaled run's), and a step whose scaled gradients
    overflow is skipped without touching the lr."""
    model = _model()
    reference = copy.deepcopy(model)
    opt = AdamHD(model.parameters(), lr=1e-2, hypergrad_lr=1e-6)
    ref_opt = AdamHD(reference.parameters(), lr=1e-2, hypergrad_lr=1e-6)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    loss_fn = nn.CrossEntropyLoss()
    for i, (x, y) in enumerate(_batches(15)):
        with torch.autocast("cpu", dtype=dtype):
            loss = loss_fn(model(x), y)
        opt.zero_grad()
        scaler.scale(loss).backward()
        if i == 7:  # an overflow: this step must be skipped, lr untouched
            next(model.parameters()).grad[0, 0] = float("inf")
            lr_before = opt.param_groups[0]["lr"]
        scaler.step(opt)
        scaler.update()
        if i == 7:
            assert opt.param_groups[0]["lr"] == lr_before
            assert scaler.get_scale() == 2.0**9
        else:
            with torch.autocast("cpu", dtype=dtype):
                ref_loss = loss_fn(reference(x), y)
            ref_opt.zero_grad()
            ref_loss.backward()
            ref_opt.step()
    assert opt.param_groups[0]["lr"] != 1e-2
    # same steps taken (the skipped one in neither): the lr trajectories agree closely (the
    # scaled backward rounds differently in half precision)
    assert opt.param_groups[0]["lr"] == pytest.approx(ref_opt.param_groups[0]["lr"], rel=1e-2)


def test_a_multiplicative_scheduler_composes_with_the_adaptation() -> None:
    """StepLR multiplies the adapted lr (documented in gradhpo.optim.hd: schedulers that
    scale group['lr'] compose; those that recompute it from base values overwrite it)."""
    model = _model()
    opt = SGDHD(model.parameters(), lr=0.1, hypergrad_lr=0.01)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=5, gamma=0.5)
    loss_fn = nn.CrossEntropyLoss()
    for i, (x, y) in enumerate(_batches(5)):
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        opt.step()
        if i == 4:
            adapted = opt.param_groups[0]["lr"]
        sched.step()
    assert adapted != 0.1
    assert opt.param_groups[0]["lr"] == pytest.approx(adapted * 0.5)
