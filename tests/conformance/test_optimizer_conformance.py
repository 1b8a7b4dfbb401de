"""One optimizer arithmetic, every place that runs it.

The inner optimizer of :mod:`gradhpo.hyper.optimizers` is the one written SGD / Adam / AdamW.
Around it: ``torch.optim`` (what :class:`~gradhpo.run.TrainingRun` steps with, built by
:func:`torch_optimizer`), the drop-in HD shells of :mod:`gradhpo.optim` at
``hypergrad_lr=0``, and :class:`~gradhpo.pbt.BatchedPopulation` (the inner optimizer vmapped
over members). Every configuration below runs through each of them from the same start on
the same gradient function, and the trajectories must agree:

* the inner optimizer, hyperparameters given three ways (constructor constants, carried in
  the state, passed as tensors): equal to rounding (float64 1e-12, float32 1e-5 relative);
* torch.optim vs the inner optimizer: equal to rounding (torch fuses ``add(alpha=)`` and
  ``addcdiv(value=)`` into one rounding, a differentiable path cannot, so bit equality is
  not expected);
* the HD shells at ``hypergrad_lr=0`` vs torch.optim: bit for bit;
* vmapped over members with different hyperparameters vs each member alone: to rounding.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from torch.func import vmap

from gradhpo.hyper.optimizers import (
    HYPER_PREFIX,
    OPTIMIZER_HYPERPARAMETERS,
    from_torch_state,
    inner_optimizer,
    optimizer_config,
    to_torch_state,
    torch_optimizer,
)
from gradhpo.optim import SGDHD, SGDNHD, AdamHD, AdamWHD

pytestmark = pytest.mark.usefixtures("one_thread")

CONFIGS: dict[str, dict[str, Any]] = {
    "sgd": {"name": "sgd", "lr": 0.05},
    "sgd-wd": {"name": "sgd", "lr": 0.05, "weight_decay": 1e-2},
    "momentum": {"name": "sgd", "lr": 0.05, "momentum": 0.9, "weight_decay": 1e-3},
    "nesterov": {"name": "sgd", "lr": 0.05, "momentum": 0.8, "nesterov": True},
    "adam": {"name": "adam", "lr": 1e-2},
    "adam-wd": {"name": "adam", "lr": 1e-2, "weight_decay": 1e-2, "beta1": 0.8, "eps": 1e-6},
    "adamw": {"name": "adamw", "lr": 1e-2, "weight_decay": 0.1, "beta2": 0.99},
}
STEPS = 12
TOL = {torch.float64: {"rtol": 1e-12, "atol": 1e-14}, torch.float32: {"rtol": 1e-5, "atol": 1e-6}}


def start(dtype: torch.dtype) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {
        "w": torch.randn(5, 3, generator=gen, dtype=dtype),
        "b": torch.randn(3, generator=gen, dtype=dtype),
    }


def gradient(params: dict[str, torch.Tensor], t: int) -> dict[str, torch.Tensor]:
    """A gradient that depends on the parameters (so errors compound) and on the step."""
    return {
        k: p**3 - p + 0.1 * torch.cos(torch.arange(p.numel(), dtype=p.dtype).view_as(p) + t)
        for k, p in params.items()
    }


def run_torch(opt_cls: Any, spec: dict, dtype: torch.dtype, **kwargs: Any) -> dict:
    params = {k: torch.nn.Parameter(v) for k, v in start(dtype).items()}
    opt = opt_cls(list(params.values()), **kwargs)
    for t in range(STEPS):
        grads = gradient({k: p.detach() for k, p in params.items()}, t)
        for k, p in params.items():
            p.grad = grads[k]
        opt.step()
    return {k: p.detach() for k, p in params.items()}


def run_inner(spec: dict, dtype: torch.dtype, how: str) -> dict:
    params = start(dtype)
    names = OPTIMIZER_HYPERPARAMETERS[spec["name"]]
    if how == "constants":
        inner = inner_optimizer(spec)
        state, hp = inner.init(params), None
    elif how == "carried":
        inner = inner_optimizer({"name": spec["name"]})  # defaults differ: the state wins
        if spec.get("nesterov"):
            inner = inner_optimizer({"name": "sgd", "momentum": 0.5, "nesterov": True})
        state, hp = inner.init(params, hypers={n: spec[n] for n in names}), None
    else:  # tensors, as the hypergradient engine passes them
        inner = inner_optimizer(spec)
        state = inner.init(params)
        hp = {n: {k: torch.tensor(spec[n], dtype=dtype) for k in params} for n in names}
    for t in range(STEPS):
        params, state = inner.update(params, gradient(params, t), state, hp)
    return params


def assert_close(a: dict, b: dict, dtype: torch.dtype) -> None:
    for k in a:
        torch.testing.assert_close(a[k], b[k], **TOL[dtype], msg=k)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_every_path_follows_the_same_arithmetic(name: str, dtype: torch.dtype) -> None:
    spec = optimizer_config(CONFIGS[name])
    reference = run_torch(lambda p, **_: torch_optimizer(p, spec), spec, dtype)
    for how in ("constants", "carried", "tensors"):
        assert_close(run_inner(spec, dtype, how), reference, dtype)


HD_SHELLS = {
    "sgd": lambda p, s: SGDHD(p, lr=s["lr"], weight_decay=s["weight_decay"], hypergrad_lr=0.0),
    "sgd-wd": lambda p, s: SGDHD(p, lr=s["lr"], weight_decay=s["weight_decay"], hypergrad_lr=0.0),
    "momentum": lambda p, s: SGDHD(
        p, lr=s["lr"], momentum=s["momentum"], weight_decay=s["weight_decay"], hypergrad_lr=0.0
    ),
    "nesterov": lambda p, s: SGDNHD(p, lr=s["lr"], momentum=s["momentum"], hypergrad_lr=0.0),
    "adam": lambda p, s: AdamHD(
        p, lr=s["lr"], betas=(s["beta1"], s["beta2"]), eps=s["eps"], hypergrad_lr=0.0
    ),
    "adam-wd": lambda p, s: AdamHD(
        p,
        lr=s["lr"],
        betas=(s["beta1"], s["beta2"]),
        eps=s["eps"],
        weight_decay=s["weight_decay"],
        hypergrad_lr=0.0,
    ),
    "adamw": lambda p, s: AdamWHD(
        p,
        lr=s["lr"],
        betas=(s["beta1"], s["beta2"]),
        eps=s["eps"],
        weight_decay=s["weight_decay"],
        hypergrad_lr=0.0,
    ),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_hd_shells_without_adaptation_are_torch_optim_bit_for_bit(name: str) -> None:
    spec = optimizer_config(CONFIGS[name])
    reference = run_torch(lambda p, **_: torch_optimizer(p, spec), spec, torch.float32)
    shell = run_torch(lambda p, **_: HD_SHELLS[name](p, spec), spec, torch.float32)
    for k in reference:
        assert torch.equal(shell[k], reference[k]), k


@pytest.mark.parametrize("name", ["momentum", "adam-wd", "adamw"])
def test_vmapped_members_with_their_own_hyperparameters(name: str) -> None:
    """BatchedPopulation's step: the inner optimizer vmapped over stacked members whose
    hyperparameters live in their own rows of the state."""
    spec = optimizer_config(CONFIGS[name])
    scales = [1.0, 0.5, 2.0]
    members = [{**spec, "lr": spec["lr"] * s} for s in scales]
    inner = inner_optimizer(spec)
    names = OPTIMIZER_HYPERPARAMETERS[spec["name"]]
    one = start(torch.float32)
    states = [inner.init(one, hypers={n: m[n] for n in names}) for m in members]
    params = {k: torch.stack([v] * len(members)) for k, v in one.items()}
    state = {k: torch.stack([s[k] for s in states]) for k in states[0]}
    update = vmap(inner.update)
    for t in range(STEPS):
        grads = vmap(lambda p, t=t: gradient(p, t))(params)
        params, state = update(params, grads, state)
    for i, member in enumerate(members):
        alone = run_torch(lambda p, m=member, **_: torch_optimizer(p, m), member, torch.float32)
        assert_close({k: v[i] for k, v in params.items()}, alone, torch.float32)


def test_momentum_switched_on_mid_run_starts_its_buffer_as_torch_does() -> None:
    """torch.optim creates SGD's buffer at the first step with momentum != 0 (PBT may switch
    momentum on late); the inner optimizer with the value carried in its state does too."""
    spec = optimizer_config({"name": "sgd", "lr": 0.05, "momentum": 0.0})
    params_t = {k: torch.nn.Parameter(v) for k, v in start(torch.float64).items()}
    opt = torch_optimizer(list(params_t.values()), spec)
    inner = inner_optimizer(spec)
    params = start(torch.float64)
    state = inner.init(params, hypers={"lr": 0.05, "momentum": 0.0})
    for t in range(2 * STEPS):
        if t == STEPS // 2:
            for group in opt.param_groups:
                group["momentum"] = 0.9
            state[HYPER_PREFIX + "momentum"] = torch.tensor(0.9, dtype=torch.float64)
        grads = gradient(params, t)
        for k, p in params_t.items():
            p.grad = grads[k].clone()
        opt.step()
        params, state = inner.update(params, grads, state)
        for k, p in params_t.items():
            torch.testing.assert_close(params[k], p.detach(), **TOL[torch.float64])


@pytest.mark.parametrize("name", list(CONFIGS))
def test_state_converts_to_torch_optim_and_back(name: str) -> None:
    """to_torch_state / from_torch_state: a run moves between the two formats mid-training
    (a BatchedPopulation member exported to a TrainingRun) and continues identically."""
    spec = optimizer_config(CONFIGS[name])
    inner = inner_optimizer(spec)
    names = OPTIMIZER_HYPERPARAMETERS[spec["name"]]
    params = start(torch.float64)
    state = inner.init(params, hypers={n: spec[n] for n in names})
    for t in range(3):
        params, state = inner.update(params, gradient(params, t), state)
    exported = to_torch_state(spec, state, list(params))
    back = from_torch_state(spec, copy.deepcopy(exported), params)
    assert set(back) == set(state)
    for k in state:
        if k == "step" and spec["name"] == "sgd":
            continue  # torch's SGD keeps no step count, and SGD's arithmetic reads none
        assert torch.equal(back[k].to(state[k].dtype), state[k]), k
    # torch.optim continues from the exported state exactly as the inner optimizer does
    torch_params = {k: torch.nn.Parameter(v.clone()) for k, v in params.items()}
    opt = torch_optimizer(list(torch_params.values()), spec)
    opt.load_state_dict(exported)
    for t in range(3, 6):
        grads = gradient(params, t)
        for k, p in torch_params.items():
            p.grad = grads[k].clone()
        opt.step()
        params, state = inner.update(params, grads, state)
    assert_close(params, {k: p.detach() for k, p in torch_params.items()}, torch.float64)
