"""Ridge regression, where the best-response derivative has a closed form: the unrolled
hypergradient of the L2 coefficient converges to it as the inner problem converges, and the
implicit hypergradient at the converged weights matches it."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from gradhpo.hyper.methods import (
    InnerProblem,
    Objective,
    hypergradient,
    implicit_at,
    squared_error_per_example,
)
from gradhpo.hyper.optimizers import make_optimizer
from gradhpo.hyper.spec import HyperParameters

DT = torch.float64
D, N, NV = 5, 40, 30
L2 = 0.1


def data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, D, generator=g, dtype=DT)
    w_true = torch.randn(D, 1, generator=g, dtype=DT)
    y = x @ w_true + 0.3 * torch.randn(N, 1, generator=g, dtype=DT)
    xv = torch.randn(NV, D, generator=g, dtype=DT)
    yv = xv @ w_true + 0.3 * torch.randn(NV, 1, generator=g, dtype=DT)
    return x, y, xv, yv


def closed_form(x, y, xv, yv, l2: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(w*, dL_V/d log(l2)) for L_T = mean 0.5 (xw - y)^2 + 0.5 l2 |w|^2."""
    a = x.T @ x / N + l2 * torch.eye(D, dtype=DT)
    w = torch.linalg.solve(a, x.T @ y / N)
    grad_val = xv.T @ (xv @ w - yv) / NV
    dw_dl2 = -torch.linalg.solve(a, w)
    return w, l2 * (grad_val * dw_dl2).sum()


def problem():
    model = nn.Linear(D, 1, bias=False).to(DT)
    with torch.no_grad():
        model.weight.zero_()
    params = {"weight": model.weight.detach().clone()}
    hypers = HyperParameters([{"name": "l2", "init": L2}], params)
    opt = make_optimizer("sgd", lr=0.5)
    return InnerProblem(model, opt, hypers, loss_fn=squared_error_per_example), params, opt


def test_unrolled_converges_to_closed_form() -> None:
    x, y, xv, yv = data()
    w_star, want = closed_form(x, y, xv, yv, L2)
    prob, params, opt = problem()
    objective = Objective.validation(prob.model, xv, yv, loss_fn=squared_error_per_example)
    errors = []
    for k in (5, 20, 80, 300):
        result = hypergradient(
            "checkpointed", prob, params, opt.init(params), {}, [(x, y)] * k, objective
        )
        errors.append(float((result.grads["l2"] - want).abs() / want.abs()))
    assert errors == sorted(errors, reverse=True), errors
    assert errors[0] > 1e-2 and errors[-1] < 1e-8, errors
    torch.testing.assert_close(result.params["weight"], w_star.T, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("solver", ["cg", "neumann"])
def test_implicit_at_converged_weights_matches_closed_form(solver: str) -> None:
    x, y, xv, yv = data()
    w_star, want = closed_form(x, y, xv, yv, L2)
    prob, _, _ = problem()
    objective = Objective.validation(prob.model, xv, yv, loss_fn=squared_error_per_example)
    result = implicit_at(
        prob,
        {"weight": w_star.T.clone()},
        {},
        [(x, y)],
        objective,
        solver=solver,
        iterations=200,
        alpha=0.5,
    )
    torch.testing.assert_close(result.grads["l2"], want, rtol=1e-8, atol=0)


def test_implicit_approaches_unrolled_as_inner_problem_converges() -> None:
    """Both are evaluated at the weights after K steps; they agree better as K grows."""
    x, y, xv, yv = data()
    prob, params, opt = problem()
    objective = Objective.validation(prob.model, xv, yv, loss_fn=squared_error_per_example)
    gaps = []
    for k in (5, 20, 80, 300):
        unrolled = hypergradient(
            "reverse", prob, params, opt.init(params), {}, [(x, y)] * k, objective
        )
        implicit = implicit_at(prob, unrolled.params, {}, [(x, y)], objective, iterations=50)
        gaps.append(
            float((unrolled.grads["l2"] - implicit.grads["l2"]).abs() / implicit.grads["l2"].abs())
        )
    assert gaps == sorted(gaps, reverse=True), gaps
    assert gaps[0] > 1e-2 and gaps[-1] < 1e-8, gaps


def test_implicit_rejects_optimizer_hypers() -> None:
    x, y, xv, yv = data()
    model = nn.Linear(D, 1, bias=False).to(DT)
    params = {"weight": model.weight.detach().clone()}
    prob = InnerProblem(
        model,
        make_optimizer("sgd"),
        HyperParameters([{"name": "lr", "init": 0.1}], params),
        squared_error_per_example,
    )
    objective = Objective.validation(model, xv, yv, loss_fn=squared_error_per_example)
    with pytest.raises(ValueError, match=r"loss-side hyperparameters.*\['lr'\]"):
        implicit_at(prob, params, {}, [(x, y)], objective)
