"""Tests for ``gradhpo.optim.hd``: the hypergradient-descent optimizers SGDHD, SGDNHD, AdamHD,
AdamWHD.

* differential: ``hypergrad_lr=0`` reproduces torch.optim bit for bit (``torch.equal``), on
  the per-tensor path against torch's ``foreach=False`` and on the multi-tensor path against
  its ``foreach=True``; the two paths agree with each other (float64, to rounding) with every
  option, across a state dict, and in the hand computations and references below;
* the hypergradient: hand computations (SGD, both rules) and a plain reference implementation
  of every optimizer (float64), one lr per unit and step, the number of distinct lrs per
  ``adapt`` mode, the sign on a quadratic;
* the torch.optim contract: state_dict round trip, ``group["lr"]``, schedulers,
  ``add_param_group``, closures;
* safety: NaN gradients, non-finite hypergradients, the lr floor (hypothesis), bad arguments.
"""

from __future__ import annotations

import copy
import io
import math
from typing import Any

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from torch import nn

from gradhpo.optim import MAX_LR, SGDHD, SGDNHD, AdamHD, AdamWHD, HypergradientOptimizer, hd

Tensor = torch.Tensor


pytestmark = pytest.mark.usefixtures("one_thread")


# --------------------------------------------------------------------------------------------
# models and data


def make_mlp(dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).to(dtype)


def make_cnn(dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 3, 3), nn.Tanh(), nn.Flatten(), nn.Linear(3 * 4 * 4, 3)).to(
        dtype
    )


def batches(model_name: str, n: int, dtype: torch.dtype = torch.float32) -> list:
    gen = torch.Generator().manual_seed(1)
    shape = (5, 6) if model_name == "mlp" else (5, 1, 6, 6)
    return [
        (torch.randn(shape, generator=gen, dtype=dtype), torch.randint(0, 3, (5,), generator=gen))
        for _ in range(n)
    ]


class WithUnused(nn.Module):
    """A model plus a parameter that never gets a gradient."""

    def __init__(self, body: nn.Module) -> None:
        super().__init__()
        self.body = body
        self.unused = nn.Parameter(torch.ones(4))

    def forward(self, x: Tensor) -> Tensor:
        return self.body(x)


def param_groups(model: nn.Module, layout: str, shared_lr: bool) -> list[dict[str, Any]]:
    params = list(model.parameters())
    if layout == "one":
        return [{"params": params}]
    if layout == "two":  # different lr and weight decay
        return [
            {"params": params[:2], "lr": 0.05, "weight_decay": 0.03},
            {"params": params[2:], "lr": 0.05 if shared_lr else 0.02, "weight_decay": 0.0},
        ]
    assert layout == "unused"
    return [{"params": params}]


# each case: (HD class, torch class, shared kwargs, torch-only kwargs)
CASES = {
    "sgd": (SGDHD, torch.optim.SGD, {"lr": 0.1, "weight_decay": 0.01}, {}),
    "momentum": (
        SGDHD,
        torch.optim.SGD,
        {"lr": 0.1, "momentum": 0.9, "dampening": 0.1, "weight_decay": 0.01},
        {},
    ),
    "nesterov": (
        SGDNHD,
        torch.optim.SGD,
        {"lr": 0.1, "momentum": 0.9, "weight_decay": 0.01},
        {"nesterov": True},
    ),
    "adam": (
        AdamHD,
        torch.optim.Adam,
        {"lr": 0.01, "betas": (0.8, 0.99), "weight_decay": 0.01},
        {},
    ),
    "adamw": (AdamWHD, torch.optim.AdamW, {"lr": 0.01, "weight_decay": 0.1}, {}),
}


def train(model: nn.Module, opt: torch.optim.Optimizer, data: list, after_step=None) -> None:
    for x, y in data:
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        if after_step is not None:
            after_step()


# --------------------------------------------------------------------------------------------
# differential: hypergrad_lr = 0 is torch.optim


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("layout", ["one", "two", "unused"])
@pytest.mark.parametrize("model_name", ["mlp", "cnn"])
@pytest.mark.parametrize("adapt", ["optimizer", "group", "tensor"])
@pytest.mark.parametrize("foreach", [False, True])
def test_zero_hypergrad_lr_reproduces_torch_exactly(case, layout, model_name, adapt, foreach):
    hd_cls, torch_cls, kwargs, torch_only = CASES[case]
    body = make_mlp() if model_name == "mlp" else make_cnn()
    ours = WithUnused(body) if layout == "unused" else body
    theirs = copy.deepcopy(ours)
    shared = adapt == "optimizer"
    opt = hd_cls(
        param_groups(ours, layout, shared), hypergrad_lr=0.0, adapt=adapt, foreach=foreach, **kwargs
    )
    ref = torch_cls(param_groups(theirs, layout, shared), foreach=foreach, **kwargs, **torch_only)
    data = batches(model_name, 15)
    for x, y in data:
        for model, o in ((ours, opt), (theirs, ref)):
            o.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            o.step()
        for a, b in zip(ours.parameters(), theirs.parameters(), strict=True):
            assert torch.equal(a, b)
    assert [g["lr"] for g in opt.param_groups] == [g["lr"] for g in ref.param_groups]
    # the hypergradients were still computed (diagnostics), the lrs never moved
    assert any(math.isfinite(h) for h in opt.hypergradients)
    assert not opt.diverged and opt.skipped_lr_updates == 0
    if layout == "unused":
        assert ours.unused not in opt.state and torch.equal(ours.unused, torch.ones(4))


# --------------------------------------------------------------------------------------------
# the hypergradient


def flat_dot(a: list[Tensor], b: list[Tensor]) -> float:
    return sum(float((x.double() * y.double()).sum()) for x, y in zip(a, b, strict=True))


def flat_norm(a: list[Tensor]) -> float:
    return math.sqrt(flat_dot(a, a))


@pytest.mark.parametrize("rule", ["additive", "multiplicative"])
@pytest.mark.parametrize("adapt", ["optimizer", "group", "tensor"])
@pytest.mark.parametrize("foreach", [False, True])
def test_sgd_hd_lr_matches_hand_computation(rule, adapt, foreach):
    """SGD-HD: lr_t = lr_{t-1} + beta g_t.g_{t-1} (additive) or lr_{t-1} (1 + beta cos(g_t,
    g_{t-1})) (multiplicative), g including the L2 term, dot products over each unit: all
    parameters, one group, one tensor."""
    model = make_mlp(torch.float64)
    groups = param_groups(model, "two", shared_lr=adapt == "optimizer")
    beta = 0.01 if rule == "additive" else 0.2
    opt = SGDHD(groups, hypergrad_lr=beta, rule=rule, adapt=adapt, foreach=foreach)
    members = [(grp["weight_decay"], p) for grp in opt.param_groups for p in grp["params"]]
    if adapt == "optimizer":
        units = [members]
    elif adapt == "group":
        units = [members[:2], members[2:]]
    else:
        units = [[m] for m in members]
    initial = opt.learning_rates
    previous: list[list[Tensor] | None] = [None] * len(units)
    for step, (x, y) in enumerate(batches("mlp", 12, torch.float64)):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        expected = []
        for k, (unit, lr) in enumerate(zip(units, opt.learning_rates, strict=True)):
            g = [(p.grad + wd * p).detach() for wd, p in unit]
            if previous[k] is not None:
                dot = flat_dot(g, previous[k])
                if rule == "additive":
                    lr = lr + beta * dot
                else:
                    lr = lr * (1 + beta * dot / (flat_norm(g) * flat_norm(previous[k])))
            previous[k] = [t.clone() for t in g]
            expected.append(lr)
        opt.step()
        assert opt.learning_rates == pytest.approx(expected, rel=1e-12, abs=0)
        if step == 0:  # no previous direction: nothing changes at the first step
            assert opt.learning_rates == initial
    assert all(lr not in initial for lr in opt.learning_rates)  # they did move


def reference_run(kind: str, init: list[Tensor], data: list, *, lr: float, beta: float, rule: str,
                  momentum: float = 0.0, dampening: float = 0.0, weight_decay: float = 0.0,
                  betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                  lr_min: float = 1e-10) -> list[dict[str, Any]]:  # fmt: skip
    """Plain hypergradient descent written from the paper: one lr for all tensors, updated once
    per step from the dot product over all tensors, then the base optimizer's step."""
    params = [p.clone() for p in init]
    buffers: list[Tensor | None] = [None] * len(params)
    m = [torch.zeros_like(p) for p in params]
    v = [torch.zeros_like(p) for p in params]
    prev_u: list[Tensor] | None = None
    history = []
    for t, (x, y) in enumerate(data, start=1):
        ps = [p.clone().requires_grad_(True) for p in params]
        loss = nn.functional.cross_entropy(mlp_forward(ps, x), y)
        raw = list(torch.autograd.grad(loss, ps))
        coupled = kind != "adamw"
        g = [r + weight_decay * p for r, p in zip(raw, params)] if coupled else raw  # noqa: B905
        if prev_u is not None:
            dot = flat_dot(g, prev_u)
            if rule == "additive":
                lr = lr + beta * dot
            else:
                lr = lr * (1 + beta * dot / (flat_norm(g) * flat_norm(prev_u)))
            lr = max(lr, lr_min)
        if kind in ("sgd", "momentum", "nesterov"):
            if momentum:
                for i, gi in enumerate(g):
                    buf = buffers[i]
                    buffers[i] = (
                        gi.clone() if buf is None else momentum * buf + (1 - dampening) * gi
                    )
            if kind == "sgd":
                u = g
            elif kind == "momentum":
                u = buffers
            else:
                u = [gi + momentum * b for gi, b in zip(g, buffers)]  # noqa: B905
        else:
            b1, b2 = betas
            u = []
            for i, gi in enumerate(g):
                m[i] = b1 * m[i] + (1 - b1) * gi
                v[i] = b2 * v[i] + (1 - b2) * gi * gi
                m_hat, v_hat = m[i] / (1 - b1**t), v[i] / (1 - b2**t)
                ui = m_hat / (v_hat.sqrt() + eps)
                u.append(ui + weight_decay * params[i] if kind == "adamw" else ui)
        new = [p - lr * ui for p, ui in zip(params, u)]  # noqa: B905
        history.append({"lr": lr, "u": [ui.clone() for ui in u], "params": new, "old": params})
        params, prev_u = new, [ui.clone() for ui in u]
    return history


def mlp_forward(ps: list[Tensor], x: Tensor) -> Tensor:
    w1, b1, w2, b2 = ps
    return torch.tanh(x @ w1.T + b1) @ w2.T + b2


REFERENCE_CASES = {
    "sgd": (SGDHD, {"weight_decay": 0.02}),
    "momentum": (SGDHD, {"momentum": 0.9, "dampening": 0.2, "weight_decay": 0.02}),
    "nesterov": (SGDNHD, {"momentum": 0.8, "weight_decay": 0.02}),
    "adam": (AdamHD, {"betas": (0.8, 0.95), "eps": 1e-6, "weight_decay": 0.02}),
    "adamw": (AdamWHD, {"betas": (0.8, 0.95), "eps": 1e-6, "weight_decay": 0.1}),
}


@pytest.mark.parametrize("rule", ["additive", "multiplicative"])
@pytest.mark.parametrize("kind", list(REFERENCE_CASES))
@pytest.mark.parametrize("foreach", [False, True])
def test_matches_plain_reference_and_uses_one_lr_per_step(kind, rule, foreach):
    cls, kwargs = REFERENCE_CASES[kind]
    adam = kind.startswith("adam")
    lr = 0.01 if adam else 0.1
    beta = (1e-4 if adam else 1e-2) if rule == "additive" else 0.1
    model = make_mlp(torch.float64)
    init = [p.detach().clone() for p in model.parameters()]
    data = batches("mlp", 12, torch.float64)
    history = reference_run(kind, init, data, lr=lr, beta=beta, rule=rule, **kwargs)

    params = [nn.Parameter(p.clone()) for p in init]
    opt = cls(
        params, lr=lr, hypergrad_lr=beta, rule=rule, adapt="optimizer", foreach=foreach, **kwargs
    )
    for (x, y), ref in zip(data, history, strict=True):
        before = [p.detach().clone() for p in params]
        opt.zero_grad()
        nn.functional.cross_entropy(mlp_forward(params, x), y).backward()
        opt.step()
        assert opt.param_groups[0]["lr"] == pytest.approx(ref["lr"], rel=1e-9)
        for p, q in zip(params, ref["params"], strict=True):
            torch.testing.assert_close(p.detach(), q, rtol=1e-9, atol=1e-12)
        # every tensor moved with the same lr: lr_i = -(delta_i . u_i) / |u_i|^2
        implied = [
            -flat_dot([p.detach() - b], [u]) / flat_dot([u], [u])
            for p, b, u in zip(params, before, ref["u"], strict=True)
        ]
        assert implied == pytest.approx([opt.param_groups[0]["lr"]] * len(params), rel=1e-7)
    assert opt.param_groups[0]["lr"] != lr  # the lr did adapt (else the test shows nothing)


@pytest.mark.parametrize("cls", [SGDHD, AdamHD])
def test_adapt_modes_give_documented_number_of_lrs(cls):
    results = {}
    for adapt in ("optimizer", "group", "tensor"):
        model = make_mlp(torch.float64)
        groups = param_groups(model, "two", shared_lr=adapt == "optimizer")
        beta = 1e-2 if cls is SGDHD else 1e-4
        opt = cls(groups, hypergrad_lr=beta, adapt=adapt)
        train(model, opt, batches("mlp", 6, torch.float64))
        lrs = opt.learning_rates
        results[adapt] = lrs
        assert len(opt.hypergradients) == len(lrs)
        assert all(math.isfinite(h) for h in opt.hypergradients)
        if adapt == "optimizer":
            assert len(lrs) == 1
            assert opt.param_groups[0]["lr"] == opt.param_groups[1]["lr"] == lrs[0] != 0.05
        elif adapt == "group":
            assert lrs == [g["lr"] for g in opt.param_groups]
            assert len(set(lrs)) == 2 and 0.05 not in lrs and 0.02 not in lrs
        else:
            assert lrs == [opt.state[p]["lr"] for p in model.parameters()]
            assert len(set(lrs)) == 4
            for group in opt.param_groups:  # group["lr"] is the mean of its tensors' lrs
                mean = sum(opt.state[p]["lr"] for p in group["params"]) / len(group["params"])
                assert group["lr"] == mean
    assert len(results) == 3


@pytest.mark.parametrize("rule", ["additive", "multiplicative"])
@pytest.mark.parametrize(
    ("cls", "kwargs", "too_small", "too_large", "beta"),
    [
        (SGDHD, {}, 1e-3, 0.95, 1e-3),
        (SGDHD, {"momentum": 0.9}, 1e-4, 1.5, 1e-4),
        (SGDNHD, {"momentum": 0.9}, 1e-4, 0.6, 1e-4),
        (AdamHD, {}, 1e-4, 1.0, 1e-3),
        (AdamWHD, {}, 1e-4, 1.0, 1e-3),
    ],
)
def test_lr_grows_when_far_too_small_and_shrinks_when_far_too_large(
    cls, kwargs, too_small, too_large, beta, rule
):
    """f = 0.5 sum a_i theta_i^2 with curvatures in [1, 2]: with a tiny lr successive
    gradients agree (lr grows); with an lr near the stability limit they alternate (it
    shrinks)."""
    curvature = torch.linspace(1.0, 2.0, 10, dtype=torch.float64)
    if rule == "multiplicative":
        beta = 0.05

    def final_lr(lr: float) -> float:
        theta = nn.Parameter(torch.linspace(-1, 1, 10, dtype=torch.float64) + 0.3)
        opt = cls([theta], lr=lr, hypergrad_lr=beta, rule=rule, **kwargs)
        for _ in range(10):
            opt.zero_grad()
            (0.5 * (curvature * theta**2).sum()).backward()
            opt.step()
            assert math.isfinite(theta.sum().item())
        return opt.param_groups[0]["lr"]

    assert final_lr(too_small) > 1.2 * too_small
    assert final_lr(too_large) < too_large


# --------------------------------------------------------------------------------------------
# torch.optim contract


def save_load(obj: dict) -> dict:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize("adapt", ["optimizer", "group", "tensor"])
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("foreach", [False, True])
def test_state_dict_round_trip_continues_bit_identically(case, adapt, foreach):
    hd_cls, _, kwargs, _ = CASES[case]
    beta = 1e-2 if hd_cls in (SGDHD, SGDNHD) else 1e-4
    kwargs = {**kwargs, "foreach": foreach}
    model = make_cnn()
    groups = param_groups(model, "two", shared_lr=adapt == "optimizer")
    opt = hd_cls(groups, hypergrad_lr=beta, adapt=adapt, **kwargs)
    data = batches("cnn", 10)
    train(model, opt, data[:5])
    checkpoint = save_load({"model": model.state_dict(), "opt": opt.state_dict()})
    assert checkpoint["opt"]["hd"]["applied_steps"] == 5

    resumed = make_cnn()
    resumed.load_state_dict(checkpoint["model"])
    opt2 = hd_cls(
        param_groups(resumed, "two", shared_lr=adapt == "optimizer"),
        hypergrad_lr=beta,
        adapt=adapt,
        **kwargs,
    )
    opt2.load_state_dict(checkpoint["opt"])
    assert opt2.learning_rates == opt.learning_rates
    train(model, opt, data[5:])
    train(resumed, opt2, data[5:])
    for a, b in zip(model.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b)
    assert opt2.learning_rates == opt.learning_rates
    assert opt2.hypergradients == opt.hypergradients
    clone = copy.deepcopy(opt)  # pickling keeps the HD attributes too
    assert (clone.adapt, clone.learning_rates) == (adapt, opt.learning_rates)
    assert clone.state_dict()["hd"] == opt.state_dict()["hd"]
    assert opt.param_groups[0]["lr"] != 0.05  # adapted, and written back to the group


def test_load_state_dict_checks_adapt_and_accepts_torch_state():
    model = make_mlp()
    opt = SGDHD(model.parameters(), lr=0.1, momentum=0.9, adapt="tensor")
    train(model, opt, batches("mlp", 2))
    other = SGDHD(model.parameters(), lr=0.1, momentum=0.9, adapt="group")
    with pytest.raises(ValueError, match="adapt='tensor'"):
        other.load_state_dict(opt.state_dict())
    # a torch.optim.SGD state dict loads; the first step then adapts nothing
    plain = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    train(model, plain, batches("mlp", 2))
    other.load_state_dict(plain.state_dict())
    train(model, other, batches("mlp", 1))
    assert other.param_groups[0]["lr"] == 0.1
    train(model, other, batches("mlp", 1))
    assert other.param_groups[0]["lr"] != 0.1


def test_step_lr_scheduler_rescales_the_adapted_lr():
    model = make_mlp(torch.float64)
    beta = 1e-2
    opt = SGDHD(model.parameters(), lr=0.1, hypergrad_lr=beta)
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)
    for i, (x, y) in enumerate(batches("mlp", 9, torch.float64), start=1):
        lr_before = opt.param_groups[0]["lr"]  # what this step adapts from
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        adapted = opt.param_groups[0]["lr"]
        if i > 1:  # the step continued from the (possibly rescheduled) value
            assert adapted == pytest.approx(lr_before - beta * opt.hypergradients[0], rel=1e-12)
        scheduler.step()
        expected = adapted * 0.5 if i % 3 == 0 else adapted
        assert opt.param_groups[0]["lr"] == pytest.approx(expected, rel=1e-12)
        assert scheduler.get_last_lr() == [opt.param_groups[0]["lr"]]


def test_scheduler_with_per_tensor_lrs_rescales_all_of_them():
    model = make_mlp(torch.float64)
    opt = SGDHD(model.parameters(), lr=0.1, hypergrad_lr=1e-2, adapt="tensor")
    data = batches("mlp", 5, torch.float64)
    train(model, opt, data[:4])
    before = opt.learning_rates
    assert len(set(before)) == 4
    opt.param_groups[0]["lr"] *= 0.1  # what StepLR does
    opt.zero_grad()
    nn.functional.cross_entropy(model(data[4][0]), data[4][1]).backward()
    opt.param_groups[0]["hypergrad_lr"] = 0.0  # so only the rescaling shows
    opt.step()
    assert opt.learning_rates == pytest.approx([lr * 0.1 for lr in before], rel=1e-12)


@pytest.mark.parametrize("foreach", [False, True])
def test_tensor_mode_group_lr_is_the_exact_common_value(foreach):
    """The group shows the mean of its tensors' lrs; where they are all equal, exactly their
    value (three lrs of 0.1 sum to 0.30000000000000004), as torch.optim would show it; a new
    group value sets them all to it exactly."""
    params = [nn.Parameter(torch.randn(3)) for _ in range(3)]
    opt = SGDHD(params, lr=0.1, hypergrad_lr=0.0, adapt="tensor", foreach=foreach)
    for _ in range(2):
        for p in params:
            p.grad = torch.ones(3)
        opt.step()
        assert opt.param_groups[0]["lr"] == 0.1 and opt.learning_rates == [0.1] * 3
    opt.param_groups[0]["lr"] = 0.07
    opt.step()
    assert opt.param_groups[0]["lr"] == 0.07 and opt.learning_rates == [0.07] * 3


def test_optimizer_mode_rejects_groups_that_disagree():
    model = make_mlp()
    params = list(model.parameters())
    with pytest.raises(ValueError, match="0.02"):
        SGDHD([{"params": params[:2], "lr": 0.05}, {"params": params[2:], "lr": 0.02}],
              adapt="optimizer")  # fmt: skip
    opt = SGDHD([{"params": params[:2], "lr": 0.05}], adapt="optimizer", hypergrad_lr=1e-2)
    train(model, opt, batches("mlp", 3))
    opt.add_param_group({"params": params[2:]})  # takes the current shared lr
    assert opt.param_groups[1]["lr"] == opt.param_groups[0]["lr"] != 0.05
    opt.param_groups[1]["lr"] = 0.3
    with pytest.raises(ValueError, match="different values"):
        train(model, opt, batches("mlp", 1))


def test_add_param_group_validates_and_works():
    model = make_mlp()
    params = list(model.parameters())
    opt = AdamHD(params[:2], lr=0.01, hypergrad_lr=1e-4)
    with pytest.raises(ValueError, match="-0.5"):
        opt.add_param_group({"params": params[2:], "lr": -0.5})
    assert len(opt.param_groups) == 1  # the bad group was not kept
    opt.add_param_group({"params": params[2:], "lr": 0.02, "betas": (0.5, 0.9)})
    train(model, opt, batches("mlp", 4))
    assert all(len(opt.state[p]) > 0 for p in params)
    assert opt.param_groups[1]["lr"] != 0.02


def test_closure_loss_is_returned_and_zero_grad_sets_none():
    model = make_mlp()
    opt = SGDNHD(model.parameters(), lr=0.1, momentum=0.9)
    x, y = batches("mlp", 1)[0]

    def closure():
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert isinstance(loss, Tensor) and loss.item() > 0
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())
    assert isinstance(opt, torch.optim.Optimizer) and isinstance(opt, HypergradientOptimizer)
    assert opt.step() is None  # nothing to do, no closure


# --------------------------------------------------------------------------------------------
# safety


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("at_step", [0, 3])
@pytest.mark.parametrize("foreach", [False, True])
def test_nan_gradient_changes_nothing_and_flags_divergence(case, at_step, foreach):
    hd_cls, _, kwargs, _ = CASES[case]
    model = make_mlp()
    opt = hd_cls(model.parameters(), hypergrad_lr=1e-3, foreach=foreach, **kwargs)
    data = batches("mlp", at_step + 2)
    train(model, opt, data[:at_step])
    params = [p.detach().clone() for p in model.parameters()]
    state = copy.deepcopy(opt.state_dict())
    opt.zero_grad()
    nn.functional.cross_entropy(model(data[at_step][0]), data[at_step][1]).backward()
    first = next(model.parameters())
    first.grad[0, 0] = float("nan")
    opt.step()
    assert opt.diverged and opt.diverged_steps == 1
    for p, q in zip(model.parameters(), params, strict=True):
        assert torch.equal(p, q)
    after = opt.state_dict()
    assert after["param_groups"] == state["param_groups"]
    for key, values in state["state"].items():
        for name, value in values.items():
            if isinstance(value, Tensor):
                assert torch.equal(after["state"][key][name], value), name
            else:
                assert after["state"][key][name] == value, name
    assert after["hd"]["diverged"] and after["hd"]["diverged_steps"] == 1
    assert all(math.isnan(h) for h in opt.hypergradients)
    train(model, opt, data[at_step + 1 :])  # a finite step afterwards is applied
    assert not torch.equal(next(model.parameters()), params[0])
    assert opt.diverged  # the flag stays


@pytest.mark.parametrize("foreach", [False, True])
def test_non_finite_hypergradient_keeps_lr_and_is_counted(foreach):
    theta = nn.Parameter(torch.zeros(8))
    opt = SGDHD([theta], lr=1e-3, hypergrad_lr=1e-3, foreach=foreach)
    for _ in range(2):  # g . g_prev = 8e60 overflows float32
        theta.grad = torch.full((8,), 1e30)
        opt.step()
    assert opt.param_groups[0]["lr"] == 1e-3
    assert opt.skipped_lr_updates == 1 and not opt.diverged
    assert math.isinf(opt.hypergradients[0])
    assert torch.isfinite(theta).all()
    assert opt.state_dict()["hd"]["skipped_lr_updates"] == 1


@settings(max_examples=12, deadline=None, derandomize=True, database=None)
@example(seed=8, cls=SGDHD, rule="additive", adapt="tensor", foreach=False)  # lr > float32 once
@example(seed=8, cls=SGDHD, rule="additive", adapt="tensor", foreach=True)
@given(
    seed=st.integers(0, 2**16),
    cls=st.sampled_from([SGDHD, SGDNHD, AdamHD, AdamWHD]),
    rule=st.sampled_from(["additive", "multiplicative"]),
    adapt=st.sampled_from(["optimizer", "group", "tensor"]),
    foreach=st.booleans(),
)
def test_lr_stays_positive_and_finite_with_huge_beta(seed, cls, rule, adapt, foreach):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 2))
    beta = 1e6 if rule == "additive" else 50.0
    kwargs = {"momentum": 0.9} if cls is SGDNHD else {}
    opt = cls(model.parameters(), lr=0.1, hypergrad_lr=beta, rule=rule, adapt=adapt,
              lr_min=1e-8, foreach=foreach, **kwargs)  # fmt: skip
    x, y = torch.randn(6, 4), torch.randn(6, 2)
    for _ in range(8):
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        lrs = opt.learning_rates + [g["lr"] for g in opt.param_groups]
        assert all(1e-8 <= lr <= MAX_LR for lr in lrs), lrs


def test_additive_update_is_floored_at_lr_min():
    theta = nn.Parameter(torch.zeros(3))
    opt = SGDHD([theta], lr=0.1, hypergrad_lr=10.0, lr_min=1e-6)
    for g in (1.0, -1.0):  # g_2 . g_1 = -3: 0.1 - 30 -> floored
        theta.grad = torch.full((3,), g)
        opt.step()
    assert opt.param_groups[0]["lr"] == 1e-6


# --------------------------------------------------------------------------------------------
# bad arguments


BAD_ARGUMENTS = [
    (SGDHD, {"lr": -0.1}, "lr", "-0.1"),
    (SGDHD, {"lr": float("nan")}, "lr", "nan"),
    (SGDHD, {"hypergrad_lr": -1e-3}, "hypergrad_lr", "-0.001"),
    (SGDHD, {"rule": "cubic"}, "rule", "cubic"),
    (SGDHD, {"adapt": "layer"}, "adapt", "layer"),
    (SGDHD, {"momentum": -0.5}, "momentum", "-0.5"),
    (SGDHD, {"weight_decay": -1.0}, "weight_decay", "-1.0"),
    (SGDHD, {"lr_min": 0.0}, "lr_min", "0.0"),
    (SGDHD, {"lr_min": -1e-9}, "lr_min", "-1e-09"),
    (SGDHD, {"dampening": float("inf")}, "dampening", "inf"),
    (SGDNHD, {"momentum": 0.0}, "momentum", "0.0"),
    (SGDNHD, {"momentum": 0.9, "dampening": 0.1}, "dampening", "0.1"),
    (AdamHD, {"betas": (1.0, 0.999)}, "betas", "1.0"),
    (AdamHD, {"betas": (0.9, -0.1)}, "betas", "-0.1"),
    (AdamHD, {"betas": (0.9,)}, "betas", "(0.9,)"),
    (AdamHD, {"eps": -1e-8}, "eps", "-1e-08"),
    (AdamHD, {"weight_decay": -0.01}, "weight_decay", "-0.01"),
    (AdamWHD, {"lr": "fast"}, "lr", "fast"),
    (AdamWHD, {"hypergrad_lr": float("inf")}, "hypergrad_lr", "inf"),
    (AdamWHD, {"rule": None}, "rule", "None"),
    (SGDHD, {"hypergrad_lrs": (-0.1,)}, "hypergrad_lrs", "-0.1"),
    (SGDHD, {"hypergrad_lrs": (1e-3, -2.0)}, "hypergrad_lrs", "-2.0"),
    (SGDHD, {"hypergrad_lrs": (1e-3,), "rule": "multiplicative"}, "hypergrad_lrs", "0.001"),
    (SGDNHD, {"momentum": 0.9, "hypergrad_lrs": 0.5}, "hypergrad_lrs", "0.5"),
    (AdamHD, {"hypergrad_lrs": (float("nan"),)}, "hypergrad_lrs", "nan"),
    (AdamWHD, {"hypergrad_lrs": "0.1"}, "hypergrad_lrs", "'0.1'"),
    (SGDHD, {"foreach": "yes"}, "foreach", "'yes'"),
    (AdamHD, {"foreach": 1}, "foreach", "1"),
]


@pytest.mark.parametrize(("cls", "kwargs", "name", "shown"), BAD_ARGUMENTS)
def test_bad_argument_is_rejected_with_name_and_value(cls, kwargs, name, shown):
    params = [nn.Parameter(torch.zeros(2))]
    with pytest.raises(ValueError) as info:
        cls(params, **kwargs)
    assert name in str(info.value) and shown in str(info.value)
    # the same check applies to a value given per param group
    if name != "adapt":
        valid = {"momentum": 0.9} if cls is SGDNHD else {}
        with pytest.raises(ValueError) as info:
            cls([{"params": params, **kwargs}], **valid)
        assert name in str(info.value) and shown in str(info.value)


def test_complex_and_sparse_are_refused():
    with pytest.raises(ValueError, match="complex"):
        SGDHD([nn.Parameter(torch.zeros(2, dtype=torch.complex64))])
    emb = nn.Embedding(4, 2, sparse=True)
    opt = SGDHD(emb.parameters())
    emb(torch.tensor([1])).sum().backward()
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()


# --------------------------------------------------------------------------------------------
# stacked levels (hypergrad_lrs): the hyper-learning rate adapted by a higher level


def hand_directions(kind: str, grads: list[Tensor], moments: list[list[Tensor]], t: int,
                    betas: tuple[float, float], eps: float) -> list[Tensor]:  # fmt: skip
    """u_t per tensor written from the definitions (float64); ``moments`` is updated."""
    if kind == "sgd":
        return [g.clone() for g in grads]
    b1, b2 = betas
    u = []
    for g, mv in zip(grads, moments, strict=True):
        mv[0] = b1 * mv[0] + (1 - b1) * g
        mv[1] = b2 * mv[1] + (1 - b2) * g * g
        u.append((mv[0] / (1 - b1**t)) / ((mv[1] / (1 - b2**t)).sqrt() + eps))
    return u


STACK_CASES = {  # kind: (class, lr, beta, kappa, extra kwargs)
    "sgd": (SGDHD, 0.1, 1e-2, 0.1, {}),
    "adam": (AdamHD, 0.01, 1e-4, 1e-2, {"betas": (0.8, 0.95), "eps": 1e-6}),
}


@pytest.mark.parametrize("adapt", ["optimizer", "group", "tensor"])
@pytest.mark.parametrize("kind", list(STACK_CASES))
@pytest.mark.parametrize("foreach", [False, True])
def test_two_levels_match_hand_computation(kind, adapt, foreach):
    """Per unit: h = -g_t . u_{t-1}; beta <- max(beta + kappa h h_prev, 0) once h_prev exists;
    lr <- lr - beta h with the new beta; dot products over the unit's tensors."""
    cls, lr0, beta0, kappa, kwargs = STACK_CASES[kind]
    model = make_mlp(torch.float64)
    shared = adapt == "optimizer"
    groups = param_groups(model, "two", shared_lr=shared)
    for group in groups:
        group["lr"] = lr0 if shared or group["weight_decay"] else lr0 / 2
    opt = cls(
        groups, hypergrad_lr=beta0, hypergrad_lrs=(kappa,), adapt=adapt, foreach=foreach, **kwargs
    )
    members = [(grp["weight_decay"], p) for grp in opt.param_groups for p in grp["params"]]
    if adapt == "optimizer":
        units = [members]
    elif adapt == "group":
        units = [members[:2], members[2:]]
    else:
        units = [[m] for m in members]
    lrs = list(opt.learning_rates)
    betas = [beta0] * len(units)
    prev_u: list[list[Tensor] | None] = [None] * len(units)
    prev_h: list[float | None] = [None] * len(units)
    moments_of = [[[torch.zeros_like(p), torch.zeros_like(p)] for _, p in unit] for unit in units]
    for t, (x, y) in enumerate(batches("mlp", 15, torch.float64), start=1):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        for k, unit in enumerate(units):
            g = [(p.grad + wd * p).detach() for wd, p in unit]
            if prev_u[k] is not None:
                h = -flat_dot(g, prev_u[k])
                if prev_h[k] is not None:
                    betas[k] = max(betas[k] + kappa * h * prev_h[k], 0.0)
                lrs[k] = lrs[k] - betas[k] * h
                prev_h[k] = h
            prev_u[k] = hand_directions(
                kind, g, moments_of[k], t, kwargs.get("betas", (0, 0)), kwargs.get("eps", 0)
            )
        opt.step()
        assert [r[0] for r in opt.hypergrad_rates] == pytest.approx(betas, rel=1e-10, abs=0)
        assert opt.learning_rates == pytest.approx(lrs, rel=1e-10, abs=0)
        assert all(r[1] == kappa for r in opt.hypergrad_rates)  # the top level is fixed
        assert all(lr > 1e-10 for lr in lrs)  # no clamp (the hand computation has none)
        if t <= 2:  # no h_prev yet: beta has not moved
            assert betas == [beta0] * len(units)
    # beta did adapt, materially, in every unit
    assert all(abs(b / beta0 - 1) > 0.02 for b in betas), betas
    # where the values live, for loggers
    if adapt == "tensor":
        assert opt.hypergrad_rates == [
            (opt.state[p]["hypergrad_lr"], *opt.state[p]["hypergrad_lrs"]) for _, p in members
        ]
        for group in opt.param_groups:
            values = [opt.state[p]["hypergrad_lr"] for p in group["params"]]
            assert group["hypergrad_lr"] == sum(values) / len(values)
            assert group["hypergrad_lrs"] == (kappa,)
            assert "hd_prev_hypergrads" not in group
    else:
        unit_of_group = [0, 0] if shared else [0, 1]
        for group, k in zip(opt.param_groups, unit_of_group, strict=True):
            assert group["hypergrad_lr"] == opt.hypergrad_rates[k][0]  # every group, if shared
            assert group["hd_prev_hypergrads"] == (pytest.approx(prev_h[k], rel=1e-10),)


def tower_reference(init: list[Tensor], data: list, values: list[float], wd: float) -> list:
    """Chandra et al.'s stacked SGD (no momentum) by autograd: each step rebuilds the previous
    step of every level as a differentiable function of the values used then (the values one
    step older and the hypergradients detached), differentiates the current loss by them, and
    updates the levels top down, each with the new rate above it. ``values = [lr, beta_1, ...,
    beta_n]``, ``beta_n`` fixed. The floors (lr in [1e-10, MAX_LR], betas >= 0) are clamps in
    the graph too, so autograd gives 0 through a clamped value."""
    top = len(values) - 1
    bounds = [(1e-10, MAX_LR)] + [(0.0, math.inf)] * top

    def clamp(value, k):
        low, high = bounds[k]
        if isinstance(value, Tensor):
            return value.clamp(low, high)
        return min(max(value, low), high)

    params = [p.clone() for p in init]
    previous = None  # (values before the last update, its hypergradients, params, direction)
    history = []
    for x, y in data:
        leaves = [torch.tensor(v, dtype=torch.float64, requires_grad=True) for v in values]
        if previous is None:
            theta = [p.clone().requires_grad_(True) for p in params]
            nodes: list[Tensor] = []
        else:
            old, grads, old_params, direction = previous
            nodes = [leaves[top]]
            for k in range(top - 1, -1, -1):  # the value used last step, as a function above
                if grads[k] is None:
                    nodes.insert(0, leaves[k])
                else:
                    nodes.insert(0, clamp(old[k] - nodes[0] * grads[k], k))
            theta = [p - nodes[0] * u for p, u in zip(old_params, direction, strict=True)]
        loss = nn.functional.cross_entropy(mlp_forward(theta, x), y)
        loss = loss + 0.5 * wd * sum((p * p).sum() for p in theta)
        wanted = [n for n in nodes[:top] if n.requires_grad]
        found = torch.autograd.grad(loss, theta + wanted, allow_unused=True)
        g = [t.detach() for t in found[: len(theta)]]
        level_grads: list[float | None] = [None] * top
        for n, d in zip(wanted, found[len(theta) :], strict=True):
            if d is not None:
                level_grads[next(i for i, m in enumerate(nodes) if m is n)] = float(d)
        new = list(values)
        for k in range(top - 1, -1, -1):
            if level_grads[k] is not None:
                new[k] = clamp(values[k] - new[k + 1] * level_grads[k], k)
        current = [p.detach() for p in theta]
        previous = (values, level_grads, current, g)
        values = new
        params = [p - values[0] * u for p, u in zip(current, g, strict=True)]
        history.append((list(values), params))
    return history


@pytest.mark.parametrize("foreach", [False, True])
def test_three_levels_match_one_step_autograd_of_chandra_et_al(foreach):
    """The recursion H_k = -H_{k-1} * H_{k-1}(previous update) is the derivative autograd gives
    through one step of every level; beta and kappa adapt, nu is fixed. beta hits its floor
    (chain broken) and comes back."""
    model = make_mlp(torch.float64)
    init = [p.detach().clone() for p in model.parameters()]
    data = batches("mlp", 15, torch.float64)
    wd, values = 0.02, [0.1, 1e-2, 0.2, 1.0]
    history = tower_reference(init, data, values, wd)
    params = [nn.Parameter(p.clone()) for p in init]
    opt = SGDHD(params, lr=values[0], weight_decay=wd, hypergrad_lr=values[1],
                hypergrad_lrs=values[2:], adapt="optimizer", foreach=foreach)  # fmt: skip
    trajectory = []
    for t, ((x, y), (expected, ref_params)) in enumerate(zip(data, history, strict=True), 1):
        opt.zero_grad()
        nn.functional.cross_entropy(mlp_forward(params, x), y).backward()
        opt.step()
        got = [opt.param_groups[0]["lr"], *opt.hypergrad_rates[0]]
        assert got == pytest.approx(expected, rel=1e-9, abs=0), t
        for p, q in zip(params, ref_params, strict=True):
            torch.testing.assert_close(p.detach(), q, rtol=1e-9, atol=1e-12)
        if t <= 3:  # each level needs one more step of history than the one below it
            assert got[t - 1 :] == values[t - 1 :]
        trajectory.append(got)
    assert got[3] == values[3]
    assert all(abs(got[k] / values[k] - 1) > 0.05 for k in range(3)), got  # all adapted
    assert min(g[1] for g in trajectory) == 0.0 < got[1]  # floored, then back up
    assert min(g[0] for g in trajectory) > 1e-10  # the lr was not clamped
    assert opt.skipped_lr_updates == 0


@pytest.mark.parametrize("adapt", ["optimizer", "group", "tensor"])
@pytest.mark.parametrize("case", list(CASES))
def test_zero_higher_rates_reproduce_one_level_exactly(case, adapt):
    hd_cls, _, kwargs, _ = CASES[case]
    beta = 1e-2 if hd_cls in (SGDHD, SGDNHD) else 1e-4
    data = batches("mlp", 12)
    runs = []
    for rates in ((), (0.0,), (0.0, 0.0)):
        model = make_mlp()
        groups = param_groups(model, "two", shared_lr=adapt == "optimizer")
        opt = hd_cls(groups, hypergrad_lr=beta, hypergrad_lrs=rates, adapt=adapt, **kwargs)
        trace = []

        def record(model=model, opt=opt, trace=trace):
            trace.append(
                (
                    [p.detach().clone() for p in model.parameters()],
                    opt.learning_rates,
                    [g["lr"] for g in opt.param_groups],
                    [g["hypergrad_lr"] for g in opt.param_groups],
                    [h if math.isfinite(h) else str(h) for h in opt.hypergradients],
                )
            )

        train(model, opt, data, after_step=record)
        runs.append((trace, opt.skipped_lr_updates, [r[0] for r in opt.hypergrad_rates]))
    one_level = runs[0]
    for trace, skipped, betas in runs[1:]:
        assert skipped == one_level[1] and betas == one_level[2] == [beta] * len(betas)
        for (ps, *rest), (qs, *expected) in zip(trace, one_level[0], strict=True):
            assert all(torch.equal(p, q) for p, q in zip(ps, qs, strict=True))
            assert rest == expected
    assert one_level[0][-1][1] != one_level[0][0][1]  # the lrs did adapt


@settings(max_examples=15, deadline=None, derandomize=True, database=None)
@given(
    seed=st.integers(0, 2**16),
    cls=st.sampled_from([SGDHD, SGDNHD, AdamHD, AdamWHD]),
    adapt=st.sampled_from(["optimizer", "group", "tensor"]),
    levels=st.sampled_from([1, 2]),
)
def test_hypergrad_lrs_stay_non_negative_and_finite(seed, cls, adapt, levels):
    """Huge higher rates drive every beta into its floor and out again."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 2))
    sgd = cls in (SGDHD, SGDNHD)
    kwargs = {"momentum": 0.9} if cls is SGDNHD else {}
    rates = (1e3, 1e6)[:levels] if sgd else (1e2, 1e4)[:levels]
    opt = cls(model.parameters(), lr=0.1, hypergrad_lr=1e-2 if sgd else 1e-3,
              hypergrad_lrs=rates, adapt=adapt, lr_min=1e-8, **kwargs)  # fmt: skip
    x, y = torch.randn(6, 4), torch.randn(6, 2)
    for _ in range(10):
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        values = [v for r in opt.hypergrad_rates for v in r[:-1]]
        values += [g["hypergrad_lr"] for g in opt.param_groups]
        assert all(math.isfinite(v) and v >= 0 for v in values), values
        assert all(r[-1] == rates[-1] for r in opt.hypergrad_rates)
        lrs = opt.learning_rates + [g["lr"] for g in opt.param_groups]
        assert all(1e-8 <= lr <= MAX_LR for lr in lrs), lrs


def test_beta_is_floored_at_zero_and_comes_back_up():
    theta = nn.Parameter(torch.zeros(1, dtype=torch.float64))
    opt = SGDHD([theta], lr=0.1, hypergrad_lr=0.5, hypergrad_lrs=(1.0,))
    betas, lrs = [], []
    for g in (1.0, 1.0, -1.0, -1.0, -1.0):
        theta.grad = torch.tensor([g], dtype=torch.float64)
        opt.step()
        betas.append(opt.param_groups[0]["hypergrad_lr"])
        lrs.append(opt.param_groups[0]["lr"])
    # h: -, -1, +1, -1, -1; beta += h h_prev from step 3: 0.5 - 1 -> 0, 0 - 1 -> 0, 0 + 1
    assert betas == [0.5, 0.5, 0.0, 0.0, 1.0]
    # lr: 0.1, 0.1 + 0.5, unchanged (beta 0), unchanged, + 1
    assert lrs == pytest.approx([0.1, 0.6, 0.6, 0.6, 1.6], abs=1e-15)
    assert opt.skipped_lr_updates == 0


def test_clamped_lr_or_missing_h_breaks_the_chain():
    """d lr / d beta = 0 where the lr was clamped: the next step leaves beta alone."""
    theta = nn.Parameter(torch.zeros(1, dtype=torch.float64))
    opt = SGDHD([theta], lr=0.1, hypergrad_lr=1.0, hypergrad_lrs=(1.0,), lr_min=1e-6)
    for g in (1.0, -1.0):  # h_2 = +1: 0.1 - 1 -> floored at lr_min
        theta.grad = torch.tensor([g], dtype=torch.float64)
        opt.step()
    assert opt.param_groups[0]["lr"] == 1e-6
    assert opt.param_groups[0]["hd_prev_hypergrads"] == (None,)
    theta.grad = torch.tensor([1.0], dtype=torch.float64)  # h_3 = +1
    opt.step()
    assert opt.param_groups[0]["hypergrad_lr"] == 1.0  # not updated: no chain through the floor
    assert opt.param_groups[0]["hd_prev_hypergrads"] == (None,)  # clamped again
    theta.grad = torch.tensor([-1.0], dtype=torch.float64)  # h_4 = +1
    opt.step()  # 1e-6 - 1 * 1 clamps again; beta still untouched
    assert opt.param_groups[0]["hypergrad_lr"] == 1.0
    theta.grad = torch.tensor([-1.0], dtype=torch.float64)  # h_5 = -1: lr 1e-6 + 1, unclamped
    opt.step()
    assert opt.param_groups[0]["hd_prev_hypergrads"] == (-1.0,)
    theta.grad = torch.tensor([-1.0], dtype=torch.float64)  # h_6 = -1: beta += 1 * (-1)(-1)
    opt.step()
    assert opt.param_groups[0]["hypergrad_lr"] == 2.0


@pytest.mark.parametrize("kappa", [1.0, 0.0])
def test_non_finite_level_product_is_skipped_and_counted(kappa):
    theta = nn.Parameter(torch.zeros(1, dtype=torch.float64))
    # beta_1 = 0 keeps the lr (and its chain) intact; h = -1e200 is finite, h h_prev is not
    opt = SGDHD([theta], lr=1e-3, hypergrad_lr=0.0, hypergrad_lrs=(kappa,))
    for _ in range(3):
        theta.grad = torch.tensor([1e100], dtype=torch.float64)
        opt.step()
    assert opt.hypergradients[0] == -1e200
    assert opt.param_groups[0]["hypergrad_lr"] == 0.0
    assert opt.param_groups[0]["lr"] == 1e-3
    assert opt.skipped_lr_updates == (1 if kappa else 0)  # a zero rate is not even counted


@pytest.mark.parametrize(
    ("cls", "kwargs", "lr", "beta", "kappa"),
    [
        (SGDHD, {}, 1e-3, 1e-5, 1e-7),
        (SGDHD, {"momentum": 0.9}, 1e-4, 1e-6, 3e-8),
        (AdamHD, {}, 1e-4, 1e-5, 1e-6),
    ],
)
def test_too_small_beta_grows_while_the_lr_is_too_small(cls, kwargs, lr, beta, kappa):
    """f = 0.5 sum a_i theta_i^2, a_i in [1, 2], lr and beta far too small: successive
    hypergradients agree in sign (h_t h_{t-1} > 0), so beta grows, and the lr with it faster
    than with beta fixed."""
    curvature = torch.linspace(1.0, 2.0, 10, dtype=torch.float64)

    def run(rates):
        theta = nn.Parameter(torch.linspace(-1, 1, 10, dtype=torch.float64) + 0.3)
        opt = cls([theta], lr=lr, hypergrad_lr=beta, hypergrad_lrs=rates, **kwargs)
        betas, hs = [], []
        for _ in range(12):
            opt.zero_grad()
            (0.5 * (curvature * theta**2).sum()).backward()
            opt.step()
            betas.append(opt.param_groups[0]["hypergrad_lr"])
            hs.append(opt.hypergradients[0])
        return opt.param_groups[0]["lr"], betas, hs

    lr_fixed, betas_fixed, _ = run(())
    lr_two, betas, hs = run((kappa,))
    assert betas_fixed == [beta] * 12
    grew = 0
    for t in range(2, 12):  # the first two steps have no h_t h_{t-1}
        product = hs[t] * hs[t - 1]
        assert (betas[t] - betas[t - 1]) == pytest.approx(kappa * product, rel=1e-9)
        grew += product > 0
    assert grew >= 6 and all(h < 0 for h in hs[1:6])  # lr too small: h < 0, steadily
    assert betas[-1] > 10 * beta
    assert lr_two > 3 * lr_fixed


@pytest.mark.parametrize("adapt", ["optimizer", "group", "tensor"])
@pytest.mark.parametrize("case", list(CASES))
def test_stacked_state_dict_round_trip_continues_bit_identically(case, adapt):
    hd_cls, _, kwargs, _ = CASES[case]
    sgd = hd_cls in (SGDHD, SGDNHD)
    options = {
        "hypergrad_lr": 1e-2 if sgd else 1e-4,
        "hypergrad_lrs": (1.0, 10.0) if sgd else (1e-2, 1.0),
        "adapt": adapt,
        **kwargs,
    }
    model = make_cnn()
    opt = hd_cls(param_groups(model, "two", shared_lr=adapt == "optimizer"), **options)
    data = batches("cnn", 12)
    train(model, opt, data[:6])
    checkpoint = save_load({"model": model.state_dict(), "opt": opt.state_dict()})
    resumed = make_cnn()
    resumed.load_state_dict(checkpoint["model"])
    opt2 = hd_cls(param_groups(resumed, "two", shared_lr=adapt == "optimizer"), **options)
    opt2.load_state_dict(checkpoint["opt"])
    assert opt2.hypergrad_rates == opt.hypergrad_rates
    assert opt2.hypergrad_rates != [(options["hypergrad_lr"], *options["hypergrad_lrs"])] * len(
        opt2.hypergrad_rates
    )  # adapted before the checkpoint
    for x, y in data[6:]:
        for m, o in ((model, opt), (resumed, opt2)):
            o.zero_grad()
            nn.functional.cross_entropy(m(x), y).backward()
            o.step()
        for a, b in zip(model.parameters(), resumed.parameters(), strict=True):
            assert torch.equal(a, b)
        assert opt2.learning_rates == opt.learning_rates
        assert opt2.hypergrad_rates == opt.hypergrad_rates
        assert opt2.param_groups[0]["hypergrad_lrs"] == opt.param_groups[0]["hypergrad_lrs"]
    assert opt2.skipped_lr_updates == opt.skipped_lr_updates
    clone = copy.deepcopy(opt)
    assert clone.hypergrad_rates == opt.hypergrad_rates


def test_stacked_rates_are_shared_in_optimizer_mode_and_means_in_tensor_mode():
    model = make_mlp(torch.float64)
    params = list(model.parameters())
    opt = SGDHD([{"params": params[:2], "lr": 0.05}], adapt="optimizer", hypergrad_lr=1e-2,
                hypergrad_lrs=(1.0,))  # fmt: skip
    train(model, opt, batches("mlp", 4, torch.float64))
    opt.add_param_group({"params": params[2:]})  # takes the current shared rates and chain
    for key in ("lr", "hypergrad_lr", "hypergrad_lrs", "hd_prev_hypergrads"):
        assert opt.param_groups[1][key] == opt.param_groups[0][key], key
    assert opt.param_groups[0]["hypergrad_lr"] != 1e-2
    train(model, opt, batches("mlp", 2, torch.float64))
    assert opt.param_groups[1]["hypergrad_lr"] == opt.param_groups[0]["hypergrad_lr"]
    opt.param_groups[1]["hypergrad_lr"] = 0.5
    with pytest.raises(ValueError, match="hypergrad_lr"):
        train(model, opt, batches("mlp", 1, torch.float64))

    # tensor mode: the group shows the means; a value written there rescales the tensors'
    model = make_mlp(torch.float64)
    opt = SGDHD(model.parameters(), lr=0.1, hypergrad_lr=1e-2, hypergrad_lrs=(1.0, 5.0),
                adapt="tensor")  # fmt: skip
    data = batches("mlp", 6, torch.float64)
    train(model, opt, data[:5])
    rates = opt.hypergrad_rates
    assert len(set(rates)) == 4
    group = opt.param_groups[0]
    assert group["hypergrad_lr"] == sum(r[0] for r in rates) / 4
    assert group["hypergrad_lrs"] == (sum(r[1] for r in rates) / 4, 5.0)
    group["hypergrad_lr"] *= 0.5
    group["hypergrad_lrs"] = (0.0, 0.0)  # stops the adaptation of beta (and of kappa)
    opt.zero_grad()
    nn.functional.cross_entropy(model(data[5][0]), data[5][1]).backward()
    opt.step()
    assert [r[0] for r in opt.hypergrad_rates] == pytest.approx(
        [r[0] * 0.5 for r in rates], rel=1e-12
    )
    assert all(r[1:] == (0.0, 0.0) for r in opt.hypergrad_rates)


def test_multiplicative_rule_refuses_stacked_levels():
    params = [nn.Parameter(torch.zeros(2))]
    with pytest.raises(ValueError, match="multiplicative") as info:
        SGDHD(params, rule="multiplicative", hypergrad_lrs=(1e-3,))
    assert "(0.001,)" in str(info.value)
    SGDHD(params, rule="multiplicative", hypergrad_lrs=())  # no higher level: fine


def test_sgdhd_takes_nesterov_like_torch() -> None:
    """SGDHD(nesterov=True) is SGDNHD (torch.optim.SGD spells Nesterov as a flag)."""
    torch.manual_seed(0)
    start = [torch.randn(4, 3), torch.randn(3)]
    kwargs = {"lr": 0.05, "momentum": 0.9, "weight_decay": 0.01, "hypergrad_lr": 1e-3}
    a = [torch.nn.Parameter(t.clone()) for t in start]
    b = [torch.nn.Parameter(t.clone()) for t in start]
    flag, cls = SGDHD(a, nesterov=True, **kwargs), SGDNHD(b, **kwargs)
    for step in range(6):
        for p, q in zip(a, b, strict=True):
            g = torch.cos(p.detach() * (step + 1))
            p.grad, q.grad = g.clone(), g.clone()
        flag.step()
        cls.step()
    for p, q in zip(a, b, strict=True):
        assert torch.equal(p, q)
    assert flag.param_groups[0]["lr"] == cls.param_groups[0]["lr"] != 0.05
    with pytest.raises(ValueError, match="needs momentum > 0"):
        SGDHD([torch.nn.Parameter(torch.zeros(2))], nesterov=True)
    with pytest.raises(ValueError, match="Invalid nesterov: 'yes'"):
        SGDHD([torch.nn.Parameter(torch.zeros(2))], momentum=0.9, nesterov="yes")


# --------------------------------------------------------------------------------------------
# the two paths (foreach): per-tensor and multi-tensor agree; torch.optim's default rule

PATH_TOL = {"rel": 1e-12, "abs": 0}  # float64: the dot products differ in summation order only


def run_path(case: str, adapt: str, foreach: bool, *, rule: str = "additive", layout: str = "two",
             levels: tuple[float, ...] = (), steps: int = 12) -> dict[str, Any]:  # fmt: skip
    """Train the float64 CNN with one HD optimizer of ``CASES``; the trajectory of everything."""
    hd_cls, _, kwargs, _ = CASES[case]
    sgd = hd_cls in (SGDHD, SGDNHD)
    beta = (1e-2 if sgd else 1e-4) if rule == "additive" else 0.1
    if levels:
        levels = levels if sgd else (1e-2, 1.0)[: len(levels)]
    body = make_cnn(torch.float64)
    model = WithUnused(body) if layout == "unused" else body
    opt = hd_cls(param_groups(model, layout, adapt == "optimizer"), hypergrad_lr=beta,
                 hypergrad_lrs=levels, rule=rule, adapt=adapt, foreach=foreach,
                 **kwargs)  # fmt: skip
    trace: dict[str, list] = {"lrs": [], "h": [], "rates": [], "params": []}
    for x, y in batches("cnn", steps, torch.float64):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        trace["lrs"].append(opt.learning_rates + [g["lr"] for g in opt.param_groups])
        trace["h"].append([h if math.isfinite(h) else str(h) for h in opt.hypergradients])
        trace["rates"].append([r for rates in opt.hypergrad_rates for r in rates])
        trace["params"].append([p.detach().clone() for p in model.parameters()])
    trace["counters"] = [opt.skipped_lr_updates, opt.diverged_steps]
    return trace


def assert_same_trajectory(a: dict[str, Any], b: dict[str, Any]) -> None:
    assert a["counters"] == b["counters"]
    for key in ("lrs", "rates"):
        for x, y in zip(a[key], b[key], strict=True):
            assert x == pytest.approx(y, **PATH_TOL), key
    for x, y in zip(a["h"], b["h"], strict=True):
        assert [str(v) if isinstance(v, str) else pytest.approx(v, **PATH_TOL) for v in y] == x
    for ps, qs in zip(a["params"], b["params"], strict=True):
        for p, q in zip(ps, qs, strict=True):
            torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("rule", ["additive", "multiplicative"])
@pytest.mark.parametrize("adapt", ["optimizer", "group", "tensor"])
@pytest.mark.parametrize("case", list(CASES))
def test_multi_tensor_path_matches_per_tensor_path(case, adapt, rule):
    """Every option of every optimizer (weight decay, heavy-ball momentum with dampening,
    Nesterov, Adam's betas, AdamW's decoupled decay), both rules, every adaptation unit; two
    param groups with different lrs and weight decays."""
    per_tensor = run_path(case, adapt, False, rule=rule)
    multi = run_path(case, adapt, True, rule=rule)
    assert_same_trajectory(multi, per_tensor)
    first, last = per_tensor["lrs"][0], per_tensor["lrs"][-1]
    assert all(abs(b / a - 1) > 1e-4 for a, b in zip(first, last, strict=True))  # they adapted


@pytest.mark.parametrize("adapt", ["optimizer", "group", "tensor"])
@pytest.mark.parametrize("case", list(CASES))
def test_paths_agree_with_stacked_levels_and_an_unused_parameter(case, adapt):
    for layout, levels in (("unused", ()), ("two", (1.0, 10.0))):
        per_tensor = run_path(case, adapt, False, layout=layout, levels=levels)
        assert_same_trajectory(
            run_path(case, adapt, True, layout=layout, levels=levels), per_tensor
        )


@pytest.mark.parametrize("adapt", ["optimizer", "group", "tensor"])
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("saved_on", [False, True])
def test_state_dict_continues_on_the_other_path(case, adapt, saved_on):
    """A state dict saved on one path continues on the other (the state is the same); the
    loaded groups take ``foreach`` from the state dict, as torch.optim's do."""
    hd_cls, _, kwargs, _ = CASES[case]
    beta = 1e-2 if hd_cls in (SGDHD, SGDNHD) else 1e-4
    options = {"hypergrad_lr": beta, "hypergrad_lrs": (1.0,) if beta == 1e-2 else (1e-2,),
               "adapt": adapt, **kwargs}  # fmt: skip
    data = batches("cnn", 10, torch.float64)

    def build(foreach: bool) -> tuple[nn.Module, HypergradientOptimizer]:
        model = make_cnn(torch.float64)
        groups = param_groups(model, "two", shared_lr=adapt == "optimizer")
        return model, hd_cls(groups, foreach=foreach, **options)

    model, opt = build(saved_on)
    train(model, opt, data[:5])
    checkpoint = save_load({"model": model.state_dict(), "opt": opt.state_dict()})
    resumed, other = build(not saved_on)
    resumed.load_state_dict(checkpoint["model"])
    other.load_state_dict(checkpoint["opt"])
    assert [g["foreach"] for g in other.param_groups] == [saved_on] * 2
    for group in other.param_groups:
        group["foreach"] = not saved_on
    assert other.learning_rates == opt.learning_rates
    for x, y in data[5:]:
        for m, o in ((model, opt), (resumed, other)):
            o.zero_grad()
            nn.functional.cross_entropy(m(x), y).backward()
            o.step()
        assert other.learning_rates == pytest.approx(opt.learning_rates, **PATH_TOL)
        assert other.hypergrad_rates == [pytest.approx(r, **PATH_TOL) for r in opt.hypergrad_rates]
        for a, b in zip(resumed.parameters(), model.parameters(), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    assert other.state_dict()["hd"] == opt.state_dict()["hd"]
    assert opt.learning_rates != [0.05] * len(opt.learning_rates)


def count_dot_sets(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Records, per dot product the step takes on the device, how many tensors it spans."""
    sizes: list[int] = []
    original = hd._dot_sum

    def spy(grads: list[Tensor], directions: list[Tensor]) -> Tensor:
        sizes.append(len(grads))
        return original(grads, directions)

    monkeypatch.setattr(hd, "_dot_sum", spy)
    return sizes


@pytest.mark.parametrize("adapt", ["optimizer", "group", "tensor"])
def test_foreach_none_follows_torch_default_rule(monkeypatch, adapt):
    """``foreach=None``: the per-tensor path on the CPU; the multi-tensor path where torch.optim
    would take its foreach path (stood in for by patching its rule, as there is no GPU here):
    one dot product per param group (per unit share) instead of one per tensor."""
    sizes = count_dot_sets(monkeypatch)
    model = make_mlp()
    opt = SGDHD(param_groups(model, "two", adapt == "optimizer"), hypergrad_lr=1e-3, adapt=adapt)
    assert [g["foreach"] for g in opt.param_groups] == [None, None]
    train(model, opt, batches("mlp", 2))
    assert sizes == [1, 1, 1, 1]  # step 2: one per tensor

    asked: list[list[Tensor]] = []

    def cuda_like(params: list[Tensor], differentiable: bool) -> tuple[bool, bool]:
        asked.append(params)
        return False, True

    monkeypatch.setattr(hd, "_default_to_fused_or_foreach", cuda_like)
    sizes.clear()
    train(model, opt, batches("mlp", 1))
    assert sizes == ([1, 1, 1, 1] if adapt == "tensor" else [2, 2])
    assert [len(params) for params in asked] == [2, 2]  # asked per group, tensors with a grad
    opt.param_groups[0]["foreach"] = False  # an explicit value wins
    sizes.clear()
    train(model, opt, batches("mlp", 1))
    assert sizes == ([1, 1, 1, 1] if adapt == "tensor" else [1, 1, 2])


def test_large_tensors_take_their_own_dot_product(monkeypatch):
    """Above ``_CAT_LIMIT`` elements a tensor is not copied into the concatenation."""
    sizes = count_dot_sets(monkeypatch)
    monkeypatch.setattr(hd, "_CAT_LIMIT", 20)
    model = make_mlp(torch.float64)  # tensors of 48, 8, 24 and 3 elements
    opt = SGDHD(model.parameters(), lr=0.1, hypergrad_lr=1e-2, foreach=True)
    reference = copy.deepcopy(model)
    ref = SGDHD(reference.parameters(), lr=0.1, hypergrad_lr=1e-2, foreach=False)
    data = batches("mlp", 4, torch.float64)
    train(model, opt, data)
    assert sizes == [1, 2, 1] * 3  # steps 2-4: 48 alone, 8 and 3 together, 24 alone
    train(reference, ref, data)
    assert opt.learning_rates == pytest.approx(ref.learning_rates, **PATH_TOL)


def test_multi_tensor_path_splits_a_group_by_dtype():
    """One group of float32 and float64 tensors: the multi-tensor path takes one dot product and
    one update per dtype (torch's foreach path groups the same way) and matches torch's
    ``foreach=True`` bit for bit at ``hypergrad_lr=0``, and the per-tensor path to float32
    rounding with adaptation."""
    torch.manual_seed(0)
    start = [torch.randn(4, 3), torch.randn(3, dtype=torch.float64), torch.randn(5),
             torch.randn(2, 2, dtype=torch.float64)]  # fmt: skip

    def gradient(p: Tensor, t: int) -> Tensor:
        return torch.cos(3 * p.detach() + t) + 0.1 * p.detach()

    def run(make):
        params = [nn.Parameter(t.clone()) for t in start]
        opt = make(params)
        for t in range(8):
            for p in params:
                p.grad = gradient(p, t)
            opt.step()
        return params, opt

    for hd_cls, torch_cls, kwargs in (
        (SGDNHD, torch.optim.SGD, {"lr": 0.05, "momentum": 0.9, "weight_decay": 1e-2}),
        (AdamWHD, torch.optim.AdamW, {"lr": 1e-2, "weight_decay": 0.1}),
    ):
        torch_only = {"nesterov": True} if hd_cls is SGDNHD else {}
        ours, _ = run(lambda p: hd_cls(p, hypergrad_lr=0.0, foreach=True, **kwargs))  # noqa: B023
        theirs, _ = run(lambda p: torch_cls(p, foreach=True, **kwargs, **torch_only))  # noqa: B023
        for a, b in zip(ours, theirs, strict=True):
            assert a.dtype == b.dtype and torch.equal(a, b)
        beta = 1e-2 if hd_cls is SGDNHD else 1e-4
        multi, opt_m = run(lambda p: hd_cls(p, hypergrad_lr=beta, foreach=True, **kwargs))  # noqa: B023
        single, opt_s = run(lambda p: hd_cls(p, hypergrad_lr=beta, foreach=False, **kwargs))  # noqa: B023
        assert opt_m.learning_rates == pytest.approx(opt_s.learning_rates, rel=1e-6)
        assert opt_m.learning_rates != [kwargs["lr"]]
        for a, b in zip(multi, single, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------------------
# CUDA (skipped without a GPU): the multi-tensor path is the default there

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@cuda
@pytest.mark.parametrize("case", list(CASES))
def test_cuda_default_path_is_torch_foreach_bit_for_bit(case):
    """On CUDA both sides default to their multi-tensor path; hypergrad_lr=0 is torch."""
    hd_cls, torch_cls, kwargs, torch_only = CASES[case]
    ours = make_cnn().cuda()
    theirs = copy.deepcopy(ours)
    opt = hd_cls(param_groups(ours, "two", False), hypergrad_lr=0.0, **kwargs)
    ref = torch_cls(param_groups(theirs, "two", False), **kwargs, **torch_only)
    for x, y in batches("cnn", 10):
        for model, o in ((ours, opt), (theirs, ref)):
            o.zero_grad()
            nn.functional.cross_entropy(model(x.cuda()), y.cuda()).backward()
            o.step()
    for a, b in zip(ours.parameters(), theirs.parameters(), strict=True):
        assert torch.equal(a, b)


@cuda
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("adapt", ["optimizer", "group", "tensor"])
def test_cuda_paths_agree_with_each_other_and_the_cpu(case, adapt):
    """float64 on CUDA, both paths, against the per-tensor path on the CPU."""
    hd_cls, _, kwargs, _ = CASES[case]
    beta = 1e-2 if hd_cls in (SGDHD, SGDNHD) else 1e-4
    results = []
    for device, foreach in (("cpu", False), ("cuda", False), ("cuda", True)):
        model = make_cnn(torch.float64).to(device)
        opt = hd_cls(param_groups(model, "two", adapt == "optimizer"), hypergrad_lr=beta,
                     adapt=adapt, foreach=foreach, **kwargs)  # fmt: skip
        for x, y in batches("cnn", 10, torch.float64):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x.to(device)), y.to(device)).backward()
            opt.step()
        results.append((opt.learning_rates, [p.detach().cpu() for p in model.parameters()]))
    (lrs, params), others = results[0], results[1:]
    for other_lrs, other_params in others:
        assert other_lrs == pytest.approx(lrs, rel=1e-10)
        for a, b in zip(other_params, params, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-13)
