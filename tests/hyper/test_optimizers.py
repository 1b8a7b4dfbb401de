"""Tests for ``gradhpo.hyper.optimizers``: equality with torch.optim, hyper values given as
tensors (scalar, per tensor, per element), hypergradients (autograd, finite differences,
torch.func.jvp/grad/vmap) and input validation."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, jvp, vmap

from gradhpo.hyper.optimizers import (
    INNER_OPTIMIZERS,
    SGD,
    Adam,
    AdamW,
    InnerOptimizer,
    make_optimizer,
)

Tensor = torch.Tensor

# --------------------------------------------------------------------------------------------
# helpers


pytestmark = pytest.mark.usefixtures("one_thread")


def mlp(dtype: torch.dtype) -> nn.Module:
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).to(dtype)


class TinyConv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3)
        self.fc = nn.Linear(3 * 4 * 4, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(torch.tanh(self.conv(x)).flatten(1))


def tiny_conv(dtype: torch.dtype) -> nn.Module:
    return TinyConv().to(dtype)


MODELS: dict[str, tuple[Callable[[torch.dtype], nn.Module], tuple[int, ...]]] = {
    "mlp": (mlp, (5,)),
    "conv": (tiny_conv, (1, 6, 6)),
}


def batch(gen: torch.Generator, in_shape: tuple[int, ...], dtype: torch.dtype, n: int = 16):
    x = torch.randn((n, *in_shape), generator=gen, dtype=torch.float64).to(dtype)
    y = torch.randn((n, 3), generator=gen, dtype=torch.float64).to(dtype)
    return x, y


def mse(out: Tensor, y: Tensor) -> Tensor:
    return ((out - y) ** 2).mean()


def params_of(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def max_rel_err(a: Tensor, b: Tensor) -> float:
    """Inf-norm error relative to the inf norm of ``b``."""
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


# (id, inner optimizer name, inner kwargs, torch.optim class, torch kwargs)
CONFIGS: list[tuple[str, str, dict[str, Any], type[torch.optim.Optimizer], dict[str, Any]]] = [
    ("sgd", "sgd", {"lr": 0.1}, torch.optim.SGD, {"lr": 0.1}),
    (
        "sgd_wd",
        "sgd",
        {"lr": 0.1, "weight_decay": 0.05},
        torch.optim.SGD,
        {"lr": 0.1, "weight_decay": 0.05},
    ),
    ("momentum", "momentum", {"lr": 0.05}, torch.optim.SGD, {"lr": 0.05, "momentum": 0.9}),
    (
        "momentum_dampening",
        "momentum",
        {"lr": 0.05, "momentum": 0.8, "dampening": 0.3},
        torch.optim.SGD,
        {"lr": 0.05, "momentum": 0.8, "dampening": 0.3},
    ),
    (
        "nesterov",
        "nesterov",
        {"lr": 0.05, "weight_decay": 0.01},
        torch.optim.SGD,
        {"lr": 0.05, "momentum": 0.9, "nesterov": True, "weight_decay": 0.01},
    ),
    ("adam", "adam", {"lr": 0.01}, torch.optim.Adam, {"lr": 0.01}),
    (
        "adam_betas",
        "adam",
        {"lr": 0.01, "beta1": 0.7, "beta2": 0.95, "eps": 1e-3},
        torch.optim.Adam,
        {"lr": 0.01, "betas": (0.7, 0.95), "eps": 1e-3},
    ),
    (
        "adam_wd",
        "adam",
        {"lr": 0.01, "weight_decay": 0.1},
        torch.optim.Adam,
        {"lr": 0.01, "weight_decay": 0.1},
    ),
    ("adamw", "adamw", {"lr": 0.01}, torch.optim.AdamW, {"lr": 0.01}),
]
CONFIG_IDS = [c[0] for c in CONFIGS]
TOL = {torch.float64: 1e-12, torch.float32: 3e-6}


def run_against_torch(
    model_name: str,
    dtype: torch.dtype,
    inner: InnerOptimizer,
    make_torch: Callable[[nn.Module], torch.optim.Optimizer],
    hp: dict[str, dict[str, Tensor]] | None = None,
    steps: int = 20,
) -> None:
    build, in_shape = MODELS[model_name]
    torch.manual_seed(0)
    model = build(dtype)
    reference = copy.deepcopy(model)
    torch_opt = make_torch(reference)
    params = params_of(model)
    state = inner.init(params)
    gen = torch.Generator().manual_seed(1)

    def loss(p: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        return mse(functional_call(model, p, (x,)), y)

    for step in range(steps):
        x, y = batch(gen, in_shape, dtype)
        torch_opt.zero_grad()
        mse(reference(x), y).backward()
        torch_opt.step()
        grads = grad(loss)(params, x, y)
        params, state = inner.update(params, grads, state, hp)
        for name, p_ref in reference.named_parameters():
            err = max_rel_err(params[name], p_ref.detach())
            assert err <= TOL[dtype], f"step {step}, {name}: relative error {err:.3g}"
    assert float(state["step"]) == steps


# --------------------------------------------------------------------------------------------
# equality with torch.optim


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("model_name", list(MODELS))
@pytest.mark.parametrize("config", CONFIGS, ids=CONFIG_IDS)
def test_matches_torch_optim(config, model_name, dtype):
    _, name, kwargs, torch_cls, torch_kwargs = config
    run_against_torch(
        model_name,
        dtype,
        make_optimizer(name, **kwargs),
        lambda m: torch_cls(m.parameters(), **torch_kwargs),
    )


# Per-group settings: group 0 = weights, group 1 = biases. Each entry: (inner name, inner
# kwargs, torch class, torch kwargs shared by the groups, per-group torch overrides as
# (weights, biases)); torch names are mapped to inner hyper names by GROUP_KEYS.
GROUP_CONFIGS = [
    (
        "sgd",
        {},
        torch.optim.SGD,
        {},
        ({"lr": 0.2, "weight_decay": 0.05}, {"lr": 0.03, "weight_decay": 0.0}),
    ),
    (
        "momentum",
        {"dampening": 0.1},
        torch.optim.SGD,
        {"dampening": 0.1},
        ({"lr": 0.05, "momentum": 0.9}, {"lr": 0.1, "momentum": 0.5, "weight_decay": 0.02}),
    ),
    (
        "adam",
        {},
        torch.optim.Adam,
        {},
        (
            {"lr": 0.02, "betas": (0.8, 0.99), "weight_decay": 0.1},
            {"lr": 0.005, "betas": (0.9, 0.9), "eps": 1e-4},
        ),
    ),
    (
        "adamw",
        {},
        torch.optim.AdamW,
        {},
        ({"lr": 0.02, "weight_decay": 0.1}, {"lr": 0.005, "weight_decay": 0.0}),
    ),
]


def _group_hp(
    model: nn.Module, groups: tuple[dict[str, Any], dict[str, Any]], dtype: torch.dtype
) -> dict[str, dict[str, Tensor]]:
    hp: dict[str, dict[str, Tensor]] = {}
    for pname, _ in model.named_parameters():
        settings = groups[0] if pname.endswith("weight") else groups[1]
        for key, value in settings.items():
            pairs = {"beta1": value[0], "beta2": value[1]} if key == "betas" else {key: value}
            for hname, v in pairs.items():
                hp.setdefault(hname, {})[pname] = torch.tensor(v, dtype=dtype)
    return hp


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("config", GROUP_CONFIGS, ids=[c[0] for c in GROUP_CONFIGS])
def test_param_groups_match_per_tensor_hypers(config, dtype):
    name, kwargs, torch_cls, torch_kwargs, groups = config
    torch.manual_seed(0)
    hp = _group_hp(mlp(dtype), groups, dtype)

    def make_torch(m: nn.Module) -> torch.optim.Optimizer:
        weights = [p for n, p in m.named_parameters() if n.endswith("weight")]
        biases = [p for n, p in m.named_parameters() if not n.endswith("weight")]
        return torch_cls(
            [{"params": weights, **groups[0]}, {"params": biases, **groups[1]}], **torch_kwargs
        )

    run_against_torch("mlp", dtype, make_optimizer(name, **kwargs), make_torch, hp=hp)


# --------------------------------------------------------------------------------------------
# hyper values given as tensors


def _problem(dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    model = mlp(dtype)
    gen = torch.Generator().manual_seed(seed + 1)
    batches = [batch(gen, (5,), dtype) for _ in range(4)]

    def loss(p, x, y):
        return mse(functional_call(model, p, (x,)), y)

    return model, params_of(model), batches, loss


def _train(opt, params, batches, loss, hp=None, state=None):
    state = opt.init(params) if state is None else state
    for x, y in batches:
        params, state = opt.update(params, grad(loss)(params, x, y), state, hp)
    return params, state


@pytest.mark.parametrize("name", INNER_OPTIMIZERS)
def test_tensor_hypers_equal_constant_defaults_bitwise(name):
    opt = make_optimizer(name)
    _, params, batches, loss = _problem()
    hp = {
        h: {k: torch.tensor(opt.defaults[h], dtype=torch.float64) for k in params}
        for h in opt.hyper_names
    }
    p_const, s_const = _train(opt, params, batches, loss)
    p_tensor, s_tensor = _train(opt, params, batches, loss, hp)
    assert p_const.keys() == p_tensor.keys() and s_const.keys() == s_tensor.keys()
    for k in p_const:
        assert torch.equal(p_const[k], p_tensor[k]), k
    for k in s_const:
        assert torch.equal(s_const[k], s_tensor[k]), k


def test_hyper_helper_default_and_given():
    opt = SGD(lr=0.25)
    like = torch.zeros(2, 3, dtype=torch.float64)
    default = opt.hyper(None, "lr", "w", like)
    assert default.dtype == torch.float64 and default.shape == () and float(default) == 0.25
    given = torch.tensor(0.5, dtype=torch.float64)
    assert opt.hyper({"lr": {"w": given}}, "lr", "w", like) is given
    assert float(opt.hyper({"lr": {"other": given}}, "lr", "w", like)) == 0.25


def test_hyper_helper_shapes():
    """0-d and exact-shape values take the fast path; other broadcastable shapes are still
    accepted; shapes that would change the parameter's shape are refused."""
    opt = SGD(lr=0.25)
    like = torch.zeros(2, 3)
    for shape in [(), (2, 3), (3,), (1, 3), (2, 1), (1, 1)]:
        value = torch.full(shape, 0.5)
        assert opt.hyper({"lr": {"w": value}}, "lr", "w", like) is value
    for shape in [(3, 1), (2,), (1, 2, 3), (4, 3)]:
        with pytest.raises(
            ValueError, match=r"does not broadcast to the parameter's shape \(2, 3\)"
        ):
            opt.hyper({"lr": {"w": torch.ones(shape)}}, "lr", "w", like)


def test_per_element_lr_sgd_momentum_equals_manual():
    opt = make_optimizer("momentum", lr=0.1, dampening=0.2)
    _, params, batches, loss = _problem()
    gen = torch.Generator().manual_seed(3)
    lr = {
        k: 0.01 + 0.2 * torch.rand(p.shape, generator=gen, dtype=p.dtype) for k, p in params.items()
    }
    mu = {
        k: 0.5 + 0.4 * torch.rand(p.shape, generator=gen, dtype=p.dtype) for k, p in params.items()
    }
    got, _ = _train(opt, params, batches, loss, {"lr": lr, "momentum": mu})

    # manual reference: plain Python loop over steps with the documented formulas
    p_ref = dict(params)
    buf: dict[str, Tensor] = {}
    for x, y in batches:
        g = grad(loss)(p_ref, x, y)
        for k in p_ref:
            buf[k] = g[k] if k not in buf else mu[k] * buf[k] + 0.8 * g[k]
        p_ref = {k: p_ref[k] - lr[k] * buf[k] for k in p_ref}
    for k in params:
        assert max_rel_err(got[k], p_ref[k]) < 1e-13, k


def test_per_element_adam_lr_and_beta1_equal_manual():
    opt = Adam(lr=0.01, beta2=0.99)
    _, params, batches, loss = _problem()
    gen = torch.Generator().manual_seed(4)
    lr = {
        k: 0.001 + 0.05 * torch.rand(p.shape, generator=gen, dtype=p.dtype)
        for k, p in params.items()
    }
    b1 = {
        k: 0.5 + 0.45 * torch.rand(p.shape, generator=gen, dtype=p.dtype) for k, p in params.items()
    }
    got, _ = _train(opt, params, batches, loss, {"lr": lr, "beta1": b1})

    p_ref = dict(params)
    m = {k: torch.zeros_like(p) for k, p in params.items()}
    v = {k: torch.zeros_like(p) for k, p in params.items()}
    for t, (x, y) in enumerate(batches, start=1):
        g = grad(loss)(p_ref, x, y)
        new = {}
        for k in p_ref:
            m[k] = b1[k] * m[k] + (1 - b1[k]) * g[k]
            v[k] = 0.99 * v[k] + 0.01 * g[k] ** 2
            m_hat = m[k] / (1 - b1[k] ** t)
            v_hat = v[k] / (1 - 0.99**t)
            new[k] = p_ref[k] - lr[k] * m_hat / (v_hat.sqrt() + 1e-8)
        p_ref = new
    for k in params:
        assert max_rel_err(got[k], p_ref[k]) < 1e-12, k


@pytest.mark.parametrize("name", ["sgd", "adam"])
def test_constant_per_element_lr_equals_scalar_lr(name):
    opt = make_optimizer(name, lr=0.05)
    _, params, batches, loss = _problem()
    full = {k: torch.full(p.shape, 0.05, dtype=p.dtype) for k, p in params.items()}
    a, _ = _train(opt, params, batches, loss)
    b, _ = _train(opt, params, batches, loss, {"lr": full})
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_entries_not_consumed_are_ignored():
    """Loss-side hypers (and other optimizers' hypers) in ``hp`` leave the update unchanged."""
    opt = make_optimizer("adam", lr=0.01)
    _, params, batches, loss = _problem()
    hp = {
        "l2": {k: torch.tensor(3.0, dtype=torch.float64) for k in params},
        "example_weight": torch.ones(16, dtype=torch.float64),
        "momentum": {k: torch.tensor(0.5, dtype=torch.float64) for k in params},
        "lr": {"not_a_param": torch.tensor(1.0, dtype=torch.float64)},
    }
    a, _ = _train(opt, params, batches, loss)
    b, _ = _train(opt, params, batches, loss, hp)
    for k in a:
        assert torch.equal(a[k], b[k]), k


# --------------------------------------------------------------------------------------------
# state and purity


@pytest.mark.parametrize("name", INNER_OPTIMIZERS)
def test_init_layout_and_update_is_pure(name):
    opt = make_optimizer(name)
    _, params, batches, loss = _problem(dtype=torch.float32)
    state = opt.init(params)
    slots = {"sgd": ["momentum_buffer", "momentum_started"], "adam": ["exp_avg", "exp_avg_sq"]}[
        "sgd" if isinstance(opt, SGD) else "adam"
    ]
    assert set(state) == {f"{s}/{k}" for s in slots for k in params} | {"step"}
    if isinstance(opt, SGD):
        assert all(state[f"momentum_started/{k}"].dtype == torch.bool for k in params)
    assert state["step"].shape == () and state["step"].dtype == torch.float32
    assert float(state["step"]) == 0.0
    before_p = {k: v.clone() for k, v in params.items()}
    x, y = batches[0]
    grads = grad(loss)(params, x, y)
    new_params, new_state = opt.update(params, grads, state)
    new_params, new_state = opt.update(new_params, grads, new_state)
    assert float(new_state["step"]) == 2.0 and float(state["step"]) == 0.0
    for k in params:
        assert torch.equal(params[k], before_p[k])
        assert new_params[k] is not params[k]
    assert all(not bool(v.any()) for v in state.values())  # the fresh state is untouched


# --------------------------------------------------------------------------------------------
# hypergradients

DIFF_CASES = [
    ("sgd", {"lr": 0.3}, "lr"),
    ("sgd", {"lr": 0.3, "weight_decay": 0.1}, "weight_decay"),
    ("momentum", {"lr": 0.1}, "lr"),
    ("momentum", {"lr": 0.1, "dampening": 0.2}, "momentum"),
    ("nesterov", {"lr": 0.1}, "momentum"),
    ("adam", {"lr": 0.05}, "lr"),
    ("adam", {"lr": 0.05}, "beta1"),
    ("adam", {"lr": 0.05}, "beta2"),
    ("adam", {"lr": 0.05, "eps": 1e-2}, "eps"),
    ("adam", {"lr": 0.05, "weight_decay": 0.1, "eps": 1e-3}, "weight_decay"),
    ("adamw", {"lr": 0.05, "weight_decay": 0.5}, "weight_decay"),
]


def _final_val_loss_autograd(opt, params, batches, loss, val, hname, h):
    """Validation loss after the inner steps, differentiable in the scalar hyper ``h``."""
    hp = {hname: {k: h for k in params}}
    params = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    state = opt.init(params)
    for x, y in batches:
        keys = list(params)
        gs = torch.autograd.grad(loss(params, x, y), [params[k] for k in keys], create_graph=True)
        params, state = opt.update(params, dict(zip(keys, gs, strict=True)), state, hp)
    return loss(params, *val)


@pytest.mark.parametrize(
    "name,kwargs,hname", DIFF_CASES, ids=[f"{c[0]}-{c[2]}" for c in DIFF_CASES]
)
def test_hypergradient_matches_finite_difference(name, kwargs, hname):
    opt = make_optimizer(name, **kwargs)
    _, params, batches, loss = _problem()
    batches, val = batches[:3], batches[3]
    h0 = opt.defaults[hname]
    h = torch.tensor(h0, dtype=torch.float64, requires_grad=True)
    (dh,) = torch.autograd.grad(
        _final_val_loss_autograd(opt, params, batches, loss, val, hname, h), h
    )
    assert torch.isfinite(dh)

    def f(value: float) -> float:
        t = torch.tensor(value, dtype=torch.float64)
        with torch.no_grad():
            hp = {hname: {k: t for k in params}}
            p, _ = _train(opt, params, batches, loss, hp)
            return float(loss(p, *val))

    def central(step: float) -> float:
        return (f(h0 + step) - f(h0 - step)) / (2 * step)

    # Richardson-extrapolated central difference (error O(step**4)): Adam's normalized step
    # makes some of these functions strongly curved, beyond what a plain central
    # difference resolves to 1e-6.
    step = 1e-4 * h0
    fd = (4 * central(step) - central(2 * step)) / 3
    assert abs(float(dh) - fd) <= 1e-6 * abs(fd), (float(dh), fd)
    assert abs(fd) > 1e-4  # the hyper really matters, so the comparison means something


def test_adam_dead_unit_gives_finite_hypergradient():
    """A ReLU unit that never fires has exactly zero gradients (v = 0) inside the graph."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 3)).double()
    with torch.no_grad():
        model[0].bias[0] = -1e3  # unit 0 is dead for every input
    gen = torch.Generator().manual_seed(1)
    batches = [batch(gen, (5,), torch.float64) for _ in range(4)]

    def loss(p, x, y):
        return mse(functional_call(model, p, (x,)), y)

    params = params_of(model)
    g0 = grad(loss)(params, *batches[0])
    assert torch.equal(g0["2.weight"][:, 0], torch.zeros(3, dtype=torch.float64))
    assert torch.equal(g0["0.weight"][0], torch.zeros(5, dtype=torch.float64))

    opt = Adam(lr=0.01)
    h = torch.tensor(0.01, dtype=torch.float64, requires_grad=True)
    val_loss = _final_val_loss_autograd(opt, params, batches[:3], loss, batches[3], "lr", h)
    (dh,) = torch.autograd.grad(val_loss, h)
    assert torch.isfinite(dh) and float(dh) != 0.0


def _final_val_loss_func(opt, params, batches, loss, val, hname):
    """Same as the autograd version, with torch.func.grad inner gradients (for jvp/vmap)."""

    def run(h: Tensor) -> Tensor:
        hp = {hname: {k: h for k in params}}
        p, _ = _train(opt, params, batches, loss, hp)
        return loss(p, *val)

    return run


@pytest.mark.parametrize("name,hname", [("momentum", "momentum"), ("adam", "beta1")])
def test_jvp_and_func_grad_match_autograd(name, hname):
    opt = make_optimizer(name, lr=0.05)
    _, params, batches, loss = _problem()
    batches, val = batches[:3], batches[3]
    h0 = opt.defaults[hname]
    h = torch.tensor(h0, dtype=torch.float64, requires_grad=True)
    (dh,) = torch.autograd.grad(
        _final_val_loss_autograd(opt, params, batches, loss, val, hname, h), h
    )
    run = _final_val_loss_func(opt, params, batches, loss, val, hname)
    h_plain = torch.tensor(h0, dtype=torch.float64)
    value, tangent = jvp(run, (h_plain,), (torch.ones_like(h_plain),))
    assert torch.isfinite(tangent)
    assert abs(float(tangent) - float(dh)) <= 1e-10 * abs(float(dh))
    assert abs(float(grad(run)(h_plain)) - float(dh)) <= 1e-10 * abs(float(dh))
    assert float(value) == pytest.approx(float(run(h_plain)), rel=1e-14)


@pytest.mark.parametrize("name,hname", [("momentum", "lr"), ("adam", "lr"), ("adamw", "beta2")])
def test_vmap_over_hyper_values_equals_loop(name, hname):
    opt = make_optimizer(name)
    _, params, batches, loss = _problem()
    h0 = opt.defaults[hname]
    values = torch.tensor([0.5 * h0, h0, 0.9 * h0 + 0.1 * min(1.0, 2 * h0)], dtype=torch.float64)

    def final_params(h: Tensor) -> dict[str, Tensor]:
        p, _ = _train(opt, params, batches, loss, {hname: {k: h for k in params}})
        return p

    batched = vmap(final_params)(values)
    for i, v in enumerate(values):
        single = final_params(v)
        for k in params:
            assert batched[k].shape == (len(values), *params[k].shape)
            assert max_rel_err(batched[k][i], single[k]) < 1e-13, (i, k)
    # the hyper values really change the result
    assert not torch.allclose(batched["0.weight"][0], batched["0.weight"][1])


# --------------------------------------------------------------------------------------------
# make_optimizer and validation


def test_make_optimizer_presets():
    assert INNER_OPTIMIZERS == ("sgd", "momentum", "nesterov", "adam", "adamw")
    sgd = make_optimizer("sgd")
    assert isinstance(sgd, SGD) and sgd.defaults == {
        "lr": 0.1,
        "weight_decay": 0.0,
        "momentum": 0.0,
    }
    mom = make_optimizer("momentum")
    assert isinstance(mom, SGD) and mom.defaults["momentum"] == 0.9 and not mom.nesterov
    nes = make_optimizer("nesterov", momentum=0.5)
    assert nes.nesterov and nes.defaults["momentum"] == 0.5
    adam = make_optimizer("adam", beta1=0.8)
    assert (
        type(adam) is Adam and adam.defaults["beta1"] == 0.8 and adam.defaults["weight_decay"] == 0
    )
    adamw = make_optimizer("adamw")
    assert isinstance(adamw, AdamW) and adamw.defaults["weight_decay"] == 1e-2
    assert adam.hyper_names == ("lr", "beta1", "beta2", "eps", "weight_decay")
    assert sgd.hyper_names == ("lr", "weight_decay", "momentum")
    assert "nesterov=True" in repr(nes)


BAD_INPUTS = [
    ("sgd negative lr", lambda: SGD(lr=-0.5), ["lr", "-0.5"]),
    ("sgd zero lr", lambda: SGD(lr=0.0), ["lr", "0.0"]),
    ("sgd nan lr", lambda: SGD(lr=float("nan")), ["lr", "nan"]),
    ("sgd negative weight_decay", lambda: SGD(weight_decay=-0.25), ["weight_decay", "-0.25"]),
    ("sgd momentum 1", lambda: SGD(momentum=1.0), ["momentum", "1.0"]),
    ("sgd negative momentum", lambda: SGD(momentum=-0.1), ["momentum", "-0.1"]),
    ("sgd dampening > 1", lambda: SGD(momentum=0.5, dampening=1.5), ["dampening", "1.5"]),
    ("nesterov without momentum", lambda: SGD(nesterov=True), ["nesterov", "momentum=0.0"]),
    (
        "nesterov with dampening",
        lambda: SGD(momentum=0.9, nesterov=True, dampening=0.125),
        ["nesterov", "dampening=0.125"],
    ),
    ("adam negative lr", lambda: Adam(lr=-0.001), ["lr", "-0.001"]),
    ("adam beta1 1", lambda: Adam(beta1=1.0), ["beta1", "1.0"]),
    ("adam beta2 1", lambda: Adam(beta2=1.0), ["beta2", "1.0"]),
    ("adam negative beta1", lambda: Adam(beta1=-0.5), ["beta1", "-0.5"]),
    ("adam eps 0", lambda: Adam(eps=0.0), ["eps", "0.0"]),
    ("adam negative weight_decay", lambda: Adam(weight_decay=-0.75), ["weight_decay", "-0.75"]),
    ("adamw negative weight_decay", lambda: AdamW(weight_decay=-0.75), ["weight_decay", "-0.75"]),
    ("string lr", lambda: SGD(lr="fast"), ["lr", "fast"]),
    ("unknown optimizer", lambda: make_optimizer("rmsprop"), ["rmsprop", "sgd", "adamw"]),
    ("unknown kwarg", lambda: make_optimizer("sgd", betas=(0.9, 0.99)), ["betas"]),
    ("adam kwarg for sgd", lambda: make_optimizer("momentum", beta1=0.9), ["beta1"]),
    ("sgd kwarg for adam", lambda: make_optimizer("adam", momentum=0.9), ["momentum"]),
    ("preset value checked", lambda: make_optimizer("nesterov", momentum=0.0), ["momentum=0.0"]),
]


@pytest.mark.parametrize(
    "factory,needles", [b[1:] for b in BAD_INPUTS], ids=[b[0] for b in BAD_INPUTS]
)
def test_bad_constructor_inputs(factory, needles):
    with pytest.raises(ValueError) as info:
        factory()
    for needle in needles:
        assert needle in str(info.value)


def _one_step_inputs():
    params = {"w": torch.ones(2, 3), "b": torch.zeros(3)}
    grads = {"w": torch.ones(2, 3), "b": torch.ones(3)}
    return params, grads


@pytest.mark.parametrize(
    "mutate,exc,needle",
    [
        (lambda p, g, s, hp: g.pop("b"), KeyError, "'b'"),
        (lambda p, g, s, hp: s.pop("exp_avg/w"), KeyError, "exp_avg/w"),
        (lambda p, g, s, hp: s.pop("step"), KeyError, "step"),
        (lambda p, g, s, hp: hp.update(lr={"w": torch.ones(3, 1)}), ValueError, "(3, 1)"),
        (lambda p, g, s, hp: hp.update(lr={"w": 0.1}), ValueError, "float"),
        (lambda p, g, s, hp: hp.update(lr=torch.tensor(0.1)), ValueError, "hp['lr']"),
    ],
    ids=["missing grad", "missing slot", "missing step", "bad shape", "not tensor", "not mapping"],
)
def test_bad_update_inputs(mutate, exc, needle):
    opt = Adam()
    params, grads = _one_step_inputs()
    state = opt.init(params)
    hp: dict[str, Any] = {}
    mutate(params, grads, state, hp)
    with pytest.raises(exc) as info:
        opt.update(params, grads, state, hp)
    assert needle in str(info.value)
