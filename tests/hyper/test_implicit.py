"""Tests of gradhpo.hyper.implicit: hypergradients by the implicit function theorem.

Every hypergradient is checked against a truth computed independently of the module: ridge
regression in closed form, or central finite differences of ``L_V(w*(lam))`` where ``w*`` is
re-solved exactly (linear least squares) or retrained to convergence (a small tanh MLP).
"""

from __future__ import annotations

import math
import re

import pytest
import torch

from gradhpo.hyper.implicit import (
    ImplicitResult,
    hvp,
    implicit_hypergradient,
    inverse_hvp_cg,
    inverse_hvp_neumann,
)

F64 = torch.float64

# --------------------------------------------------------------------------------------------
# helpers


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a = a.detach().to(F64).cpu()
    b = b.detach().to(F64).cpu()
    return ((a - b).norm() / b.norm()).item()


def _flat(vec: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([value.reshape(-1) for value in vec.values()])


def _unflat(flat: torch.Tensor, like: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out, start = {}, 0
    for key, value in like.items():
        out[key] = flat[start : start + value.numel()].reshape(value.shape)
        start += value.numel()
    assert start == flat.numel()
    return out


def _dense_hvp_fn(matrix: torch.Tensor, like: dict[str, torch.Tensor]):
    """``hvp_fn`` of a dense matrix acting on dict-vectors shaped like ``like``."""

    def fn(vec):
        return _unflat(matrix @ _flat(vec), like)

    return fn


class Ridge:
    """Ridge regression with a log-L2 coefficient (scalar or one per weight), solved exactly.

    ``L_T(w, lam) = 0.5/n ||X w - y||^2 + 0.5 sum_j exp(lam_j) w_j^2``,
    ``L_V(w) = 0.5/m ||Xv w - yv||^2``.

    ``w*(lam) = A^-1 X^T y / n`` with ``A = X^T X / n + diag(exp(lam))``. Differentiating
    ``A w* = X^T y / n`` gives ``dA/dlam_j w* + A dw*/dlam_j = 0``, i.e.
    ``dw*/dlam_j = -exp(lam_j) w*_j A^-1 e_j``, hence
    ``dL_V/dlam_j = -exp(lam_j) w*_j (A^-1 grad L_V(w*))_j`` (A symmetric); for a scalar
    ``lam`` the sum over ``j``: ``-exp(lam) w*^T A^-1 grad L_V(w*)``.
    """

    def __init__(self, dtype=F64, device="cpu", n=40, m=30, d=5, seed=0):
        gen = torch.Generator().manual_seed(seed)
        w_true = torch.randn(d, generator=gen, dtype=F64)
        self.X = torch.randn(n, d, generator=gen, dtype=F64)
        self.y = self.X @ w_true + 0.3 * torch.randn(n, generator=gen, dtype=F64)
        self.Xv = torch.randn(m, d, generator=gen, dtype=F64)
        self.yv = self.Xv @ w_true + 0.3 * torch.randn(m, generator=gen, dtype=F64)
        for name in ("X", "y", "Xv", "yv"):
            setattr(self, name, getattr(self, name).to(dtype=dtype, device=device))
        self.n, self.d = n, d

    def train_loss(self, w, lam):
        fit = 0.5 / self.n * ((self.X @ w["w"] - self.y) ** 2).sum()
        return fit + 0.5 * (lam["log_l2"].exp() * w["w"] ** 2).sum()

    def outer_loss(self, w, lam=None):
        return 0.5 / self.yv.numel() * ((self.Xv @ w["w"] - self.yv) ** 2).sum()

    def hessian(self, log_l2):
        coef = torch.as_tensor(log_l2, dtype=F64).exp() * torch.ones(self.d, dtype=F64)
        X = self.X.to("cpu", F64)  # the closed forms are references: float64 on the CPU
        return X.T @ X / self.n + torch.diag(coef)

    def solve(self, log_l2):
        """Exact ``w*`` in float64."""
        X, y = self.X.to("cpu", F64), self.y.to("cpu", F64)
        return torch.linalg.solve(self.hessian(log_l2), X.T @ y / self.n)

    def outer_grad(self, w):
        Xv, yv = self.Xv.to("cpu", F64), self.yv.to("cpu", F64)
        return Xv.T @ (Xv @ w - yv) / yv.numel()

    def closed_form(self, log_l2):
        log_l2 = torch.as_tensor(log_l2, dtype=F64)
        w = self.solve(log_l2)
        u = torch.linalg.solve(self.hessian(log_l2), self.outer_grad(w))
        per_element = -log_l2.exp() * w * u
        return per_element.sum() if log_l2.ndim == 0 else per_element

    def outer_at_optimum(self, log_l2):
        w = self.solve(log_l2).to(self.X.device, self.X.dtype)
        return self.outer_loss({"w": w}).item()


def _central_fd(fn, lam: torch.Tensor, h: float) -> torch.Tensor:
    """Central finite differences of a scalar function of ``lam`` (float64), per element."""
    out = torch.zeros_like(lam, dtype=F64)
    flat = out.reshape(-1)
    for i in range(lam.numel()):
        step = torch.zeros(lam.numel(), dtype=lam.dtype)
        step[i] = h
        step = step.reshape(lam.shape)
        flat[i] = (fn(lam + step) - fn(lam - step)) / (2 * h)
    return out


# --------------------------------------------------------------------------------------------
# Hessian-vector products


def test_hvp_matches_dense_hessian_over_a_dict_of_tensors():
    gen = torch.Generator().manual_seed(3)
    params = {
        "a": torch.randn(2, 3, generator=gen, dtype=F64),
        "b": torch.randn(4, generator=gen, dtype=F64),
        "unused": torch.randn(2, generator=gen, dtype=F64),
    }
    mat = torch.randn(4, 6, generator=gen, dtype=F64)

    def loss_fn(p):
        return (torch.tanh(mat @ p["a"].reshape(-1)) * p["b"]).sum() + (p["a"] ** 4).sum()

    vector = {
        key: torch.randn(value.shape, generator=gen, dtype=F64) for key, value in params.items()
    }
    got = hvp(loss_fn, params, vector)

    dense = torch.autograd.functional.hessian(lambda f: loss_fn(_unflat(f, params)), _flat(params))
    want = _unflat(dense @ _flat(vector), params)
    assert set(got) == set(params)
    for key in params:
        assert got[key].shape == params[key].shape
        assert not got[key].requires_grad
        torch.testing.assert_close(got[key], want[key], rtol=1e-12, atol=1e-12)
    assert torch.count_nonzero(got["unused"]) == 0


# --------------------------------------------------------------------------------------------
# ridge regression: closed form


def test_ridge_scalar_cg_matches_closed_form():
    prob = Ridge()
    log_l2 = torch.tensor(-1.3, dtype=F64)
    w_star = prob.solve(log_l2)
    result = implicit_hypergradient(
        prob.train_loss, prob.outer_loss, {"w": w_star}, {"log_l2": log_l2}, iterations=20
    )
    assert isinstance(result, ImplicitResult)
    truth = prob.closed_form(log_l2)
    assert truth.abs() > 1e-4  # a non-trivial value, whose sign is checked too
    assert result.grads["log_l2"].shape == ()
    assert result.grads["log_l2"].dtype == F64
    assert abs(result.grads["log_l2"].item() - truth.item()) <= 1e-10 * abs(truth.item())
    # v = A^-1 grad L_V, and the reported outer loss is L_V(w*)
    want_v = torch.linalg.solve(prob.hessian(log_l2), prob.outer_grad(w_star))
    assert _rel_err(result.ihvp["w"], want_v) < 1e-10
    assert result.outer_loss.item() == pytest.approx(prob.outer_at_optimum(log_l2), rel=1e-14)
    assert not result.outer_loss.requires_grad


def test_ridge_scalar_neumann_matches_closed_form():
    prob = Ridge()
    log_l2 = torch.tensor(-1.3, dtype=F64)
    eig = torch.linalg.eigvalsh(prob.hessian(log_l2))
    alpha = 1.0 / eig.max().item()  # safe: alpha * lambda_max = 1 < 2
    result = implicit_hypergradient(
        prob.train_loss,
        prob.outer_loss,
        {"w": prob.solve(log_l2)},
        {"log_l2": log_l2},
        solver="neumann",
        iterations=300,
        alpha=alpha,
    )
    truth = prob.closed_form(log_l2)
    assert abs(result.grads["log_l2"].item() - truth.item()) <= 1e-6 * abs(truth.item())
    assert result.residual < 1e-6


def test_per_element_l2_matches_closed_form_and_finite_differences():
    prob = Ridge(d=6, seed=1)
    log_l2 = torch.tensor([-2.0, -1.0, -0.5, -3.0, 0.0, -1.5], dtype=F64)
    result = implicit_hypergradient(
        prob.train_loss,
        prob.outer_loss,
        {"w": prob.solve(log_l2)},
        {"log_l2": log_l2},
        iterations=30,
    )
    got = result.grads["log_l2"]
    assert got.shape == log_l2.shape
    truth = prob.closed_form(log_l2)
    assert (truth.abs() > 1e-5).all()
    torch.testing.assert_close(got, truth, rtol=1e-10, atol=0)
    fd = _central_fd(prob.outer_at_optimum, log_l2, h=1e-5)
    torch.testing.assert_close(got, fd, rtol=1e-6, atol=1e-12)


def test_per_example_weights_match_finite_differences():
    """Weighted least squares: L_T = 0.5/n sum_i sigmoid(s_i) r_i^2 + 0.5 mu ||w||^2."""
    gen = torch.Generator().manual_seed(4)
    n, d, mu = 12, 3, 0.05
    X = torch.randn(n, d, generator=gen, dtype=F64)
    y = X @ torch.randn(d, generator=gen, dtype=F64) + 0.5 * torch.randn(
        n, generator=gen, dtype=F64
    )
    y[:3] += 3.0  # a few outliers, whose weights matter
    Xv = torch.randn(20, d, generator=gen, dtype=F64)
    yv = Xv @ torch.linalg.lstsq(X[3:], y[3:]).solution

    def train_loss(w, lam):
        return (
            0.5 / n * (torch.sigmoid(lam["s"]) * (X @ w["w"] - y) ** 2).sum()
            + 0.5 * mu * (w["w"] ** 2).sum()
        )

    def outer_loss(w, lam):
        return 0.5 * ((Xv @ w["w"] - yv) ** 2).mean()

    def solve(s):
        weights = torch.sigmoid(s)
        a = X.T @ (weights[:, None] * X) / n + mu * torch.eye(d, dtype=F64)
        return torch.linalg.solve(a, X.T @ (weights * y) / n)

    s = torch.linspace(-1.0, 1.5, n, dtype=F64)
    result = implicit_hypergradient(train_loss, outer_loss, {"w": solve(s)}, {"s": s})
    fd = _central_fd(lambda t: outer_loss({"w": solve(t)}, None).item(), s, h=1e-5)
    assert (fd.abs() > 1e-6).any()
    torch.testing.assert_close(result.grads["s"], fd, rtol=1e-6, atol=1e-10)
    assert result.residual < 1e-10


# --------------------------------------------------------------------------------------------
# a small non-linear model trained to convergence


class TinyMLP:
    """2 -> 4 -> 1 tanh network with one log-L2 coefficient per layer (float64)."""

    shapes = {"W1": (2, 4), "b1": (4,), "W2": (4,), "b2": ()}

    def __init__(self):
        gen = torch.Generator().manual_seed(5)
        x = torch.randn(60, 2, generator=gen, dtype=F64)
        y = torch.sin(2 * x[:, 0]) + 0.5 * x[:, 1] + 0.1 * torch.randn(60, generator=gen, dtype=F64)
        self.x, self.y = x[:40], y[:40]
        self.xv, self.yv = x[40:], y[40:]
        self.init = 0.5 * torch.randn(
            sum(torch.Size(s).numel() for s in self.shapes.values()), generator=gen, dtype=F64
        )

    def unflat(self, flat):
        out, start = {}, 0
        for key, shape in self.shapes.items():
            size = torch.Size(shape).numel()
            out[key] = flat[start : start + size].reshape(shape)
            start += size
        return out

    @staticmethod
    def net(w, x):
        return torch.tanh(x @ w["W1"] + w["b1"]) @ w["W2"] + w["b2"]

    def train_loss(self, w, lam):
        fit = 0.5 * ((self.net(w, self.x) - self.y) ** 2).mean()
        first = (w["W1"] ** 2).sum() + (w["b1"] ** 2).sum()
        second = (w["W2"] ** 2).sum() + w["b2"] ** 2
        return fit + 0.5 * lam["log_l2"][0].exp() * first + 0.5 * lam["log_l2"][1].exp() * second

    def outer_loss(self, w, lam=None):
        return 0.5 * ((self.net(w, self.xv) - self.yv) ** 2).mean()

    def train(self, log_l2, start):
        """Full-batch LBFGS, then two Newton steps (dense 21x21 Hessian) to machine precision."""
        lam = {"log_l2": log_l2}
        flat = start.clone().requires_grad_(True)
        opt = torch.optim.LBFGS(
            [flat],
            lr=1.0,
            max_iter=200,
            tolerance_grad=1e-7,
            tolerance_change=0.0,
            history_size=30,
            line_search_fn="strong_wolfe",
        )

        def closure():
            opt.zero_grad()
            loss = self.train_loss(self.unflat(flat), lam)
            loss.backward()
            return loss

        opt.step(closure)

        def objective(f):
            return self.train_loss(self.unflat(f), lam)

        flat = flat.detach()
        for _ in range(2):  # quadratic convergence from |grad| ~ 1e-7
            grad = torch.func.grad(objective)(flat)
            hess = torch.autograd.functional.hessian(objective, flat, vectorize=True)
            flat = flat - torch.linalg.solve(hess, grad)
        assert torch.func.grad(objective)(flat).norm() < 1e-13
        return flat


def test_tiny_mlp_matches_finite_differences_of_retraining():
    mlp = TinyMLP()
    log_l2 = torch.tensor([-2.0, -2.5], dtype=F64)
    w_star = mlp.train(log_l2, mlp.init)
    params = mlp.unflat(w_star)
    hess = torch.autograd.functional.hessian(
        lambda f: mlp.train_loss(mlp.unflat(f), {"log_l2": log_l2}), w_star
    )
    assert torch.linalg.eigvalsh(hess).min() > 0  # a strict local minimum

    result = implicit_hypergradient(
        mlp.train_loss, mlp.outer_loss, params, {"log_l2": log_l2}, iterations=100
    )
    assert result.residual < 1e-8
    assert set(result.ihvp) == set(TinyMLP.shapes)

    def retrained_outer(lam):
        return mlp.outer_loss(mlp.unflat(mlp.train(lam, w_star))).item()

    fd = _central_fd(retrained_outer, log_l2, h=1e-3)
    assert (fd.abs() > 1e-4).all()
    torch.testing.assert_close(result.grads["log_l2"], fd, rtol=1e-5, atol=0)


# --------------------------------------------------------------------------------------------
# solvers


def _spd_problem(seed=6, size=7, min_eig=0.5, max_eig=4.0):
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(size, size, generator=gen, dtype=F64))
    eig = torch.linspace(min_eig, max_eig, size, dtype=F64)
    matrix = q @ torch.diag(eig) @ q.T
    like = {"a": torch.zeros(2, 2, dtype=F64), "b": torch.zeros(3, dtype=F64)}
    rhs = _unflat(torch.randn(size, generator=gen, dtype=F64), like)
    return matrix, rhs


def test_cg_with_damping_solves_the_damped_system():
    # an indefinite matrix made positive definite by the damping
    matrix, rhs = _spd_problem(min_eig=-0.4, max_eig=3.0)
    damping = 0.7
    got = inverse_hvp_cg(_dense_hvp_fn(matrix, rhs), rhs, iterations=50, damping=damping)
    want = torch.linalg.solve(matrix + damping * torch.eye(7, dtype=F64), _flat(rhs))
    assert set(got) == {"a", "b"} and got["a"].shape == (2, 2)
    assert _rel_err(_flat(got), want) < 1e-12
    undamped = torch.linalg.solve(matrix, _flat(rhs))
    assert _rel_err(want, undamped) > 0.1  # the damping really changes the answer


def test_implicit_hypergradient_with_damping_uses_damped_hessian():
    prob = Ridge()
    log_l2 = torch.tensor(-1.0, dtype=F64)
    w_star = prob.solve(log_l2)
    damping = 0.5
    result = implicit_hypergradient(
        prob.train_loss, prob.outer_loss, {"w": w_star}, {"log_l2": log_l2}, damping=damping
    )
    damped = prob.hessian(log_l2) + damping * torch.eye(prob.d, dtype=F64)
    v = torch.linalg.solve(damped, prob.outer_grad(w_star))
    assert _rel_err(result.ihvp["w"], v) < 1e-10
    want = -log_l2.exp() * (w_star @ v)
    assert abs(result.grads["log_l2"].item() - want.item()) <= 1e-10 * abs(want.item())
    assert result.residual < 1e-10  # residual of the damped system


def test_cg_stops_early_and_is_exact_in_n_steps():
    matrix, rhs = _spd_problem()
    calls = []
    base = _dense_hvp_fn(matrix, rhs)

    def counting(vec):
        calls.append(1)
        return base(vec)

    got = inverse_hvp_cg(counting, rhs, iterations=100, tol=1e-10)
    assert len(calls) <= 8  # 7 distinct eigenvalues: exact after 7 steps (+ rounding slack)
    assert _rel_err(_flat(got), torch.linalg.solve(matrix, _flat(rhs))) < 1e-10
    zero = {key: torch.zeros_like(value) for key, value in rhs.items()}
    calls.clear()
    out = inverse_hvp_cg(counting, zero)
    assert len(calls) == 0 and all(torch.count_nonzero(t) == 0 for t in out.values())


def test_neumann_is_the_truncated_series():
    matrix, rhs = _spd_problem(size=7)
    alpha, damping, iterations = 0.2, 0.3, 3
    got = inverse_hvp_neumann(
        _dense_hvp_fn(matrix, rhs), rhs, iterations=iterations, alpha=alpha, damping=damping
    )
    step = torch.eye(7, dtype=F64) - alpha * (matrix + damping * torch.eye(7, dtype=F64))
    want = alpha * sum(torch.linalg.matrix_power(step, j) for j in range(iterations + 1))
    want = want @ _flat(rhs)
    assert _rel_err(_flat(got), want) < 1e-13


def test_neumann_converges_toward_cg_as_iterations_grow():
    prob = Ridge(seed=2)
    log_l2 = torch.tensor(-1.0, dtype=F64)
    args = (prob.train_loss, prob.outer_loss, {"w": prob.solve(log_l2)}, {"log_l2": log_l2})
    cg = implicit_hypergradient(*args, solver="cg").grads["log_l2"]
    alpha = 1.0 / torch.linalg.eigvalsh(prob.hessian(log_l2)).max().item()
    errors, residuals = [], []
    for iterations in (1, 4, 16, 64):
        res = implicit_hypergradient(*args, solver="neumann", iterations=iterations, alpha=alpha)
        errors.append(abs(res.grads["log_l2"].item() - cg.item()))
        residuals.append(res.residual)
    assert all(a > b for a, b in zip(errors, errors[1:], strict=False)), errors
    assert all(a > b for a, b in zip(residuals, residuals[1:], strict=False)), residuals
    assert errors[-1] < 1e-8 * abs(cg.item())


def test_residual_is_small_when_converged_and_large_after_one_iteration():
    prob = Ridge(d=8, seed=3)
    log_l2 = torch.tensor(-3.0, dtype=F64)  # badly conditioned enough that 1 step is poor
    args = (prob.train_loss, prob.outer_loss, {"w": prob.solve(log_l2)}, {"log_l2": log_l2})
    converged = implicit_hypergradient(*args, iterations=50)
    one_step = implicit_hypergradient(*args, iterations=1)
    assert converged.residual < 1e-12
    assert one_step.residual > 1e-2
    # the reported residual is the true relative residual of the returned v
    hess = prob.hessian(log_l2)
    g = prob.outer_grad(prob.solve(log_l2))
    want = ((hess @ one_step.ihvp["w"] - g).norm() / g.norm()).item()
    assert one_step.residual == pytest.approx(want, rel=1e-10)


# --------------------------------------------------------------------------------------------
# dtypes and devices

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("solver", ["cg", "neumann"])
def test_float32(solver, device):
    prob = Ridge(dtype=torch.float32, device=device)
    log_l2 = torch.tensor([-1.0, -0.5, -2.0, -1.0, 0.0], dtype=F64)
    w_star = prob.solve(log_l2).to(device=device, dtype=torch.float32)
    hypers = {"log_l2": log_l2.to(device=device, dtype=torch.float32)}
    alpha = 1.0 / torch.linalg.eigvalsh(prob.hessian(log_l2)).max().item()
    result = implicit_hypergradient(
        prob.train_loss,
        prob.outer_loss,
        {"w": w_star},
        hypers,
        solver=solver,
        iterations=100,
        alpha=alpha,
    )
    got = result.grads["log_l2"]
    assert got.dtype == torch.float32 and got.device.type == device
    assert result.ihvp["w"].dtype == torch.float32 and result.ihvp["w"].device.type == device
    assert _rel_err(got, prob.closed_form(log_l2)) < 1e-5
    assert result.residual < 1e-4


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu_in_float64():
    log_l2 = torch.tensor(-1.0, dtype=F64)
    out = {}
    for device in ("cpu", "cuda"):
        prob = Ridge(device=device)
        w_star = prob.solve(log_l2).to(device)
        out[device] = implicit_hypergradient(
            prob.train_loss, prob.outer_loss, {"w": w_star}, {"log_l2": log_l2.to(device)}
        ).grads["log_l2"]
    assert out["cuda"].device.type == "cuda"
    assert _rel_err(out["cuda"], out["cpu"]) < 1e-10


# --------------------------------------------------------------------------------------------
# hyperparameters with partial or no effect


def test_hyper_without_effect_gets_zeros_and_direct_outer_term_is_added():
    prob = Ridge()
    log_l2 = torch.tensor(-1.3, dtype=F64)
    c = 0.25

    def train_loss(w, lam):
        # "offset" enters additively: it changes L_T but not its minimiser
        return prob.train_loss(w, lam) + lam["offset"] ** 2

    def outer_loss(w, lam):
        return prob.outer_loss(w) + c * lam["log_l2"] ** 2

    hypers = {
        "log_l2": log_l2,
        "unused": torch.ones(3, 2, dtype=F64),
        "offset": torch.tensor([1.0], dtype=F64),
    }
    result = implicit_hypergradient(train_loss, outer_loss, {"w": prob.solve(log_l2)}, hypers)
    assert set(result.grads) == set(hypers)
    for key in ("unused", "offset"):
        assert result.grads[key].shape == hypers[key].shape
        assert torch.count_nonzero(result.grads[key]) == 0
    want = prob.closed_form(log_l2) + 2 * c * log_l2
    assert abs(result.grads["log_l2"].item() - want.item()) <= 1e-10 * abs(want.item())


def test_no_loss_side_hyper_raises():
    prob = Ridge()
    log_l2 = torch.tensor(-1.0, dtype=F64)

    def train_loss(w, lam):
        return prob.train_loss(w, {"log_l2": log_l2})  # lr never enters the objective

    def outer_loss(w, lam):
        return prob.outer_loss(w) + lam["lr"]  # even a direct outer path is not enough

    with pytest.raises(ValueError, match="loss-side"):
        implicit_hypergradient(
            train_loss, outer_loss, {"w": prob.solve(log_l2)}, {"lr": torch.tensor(0.1)}
        )


def test_params_and_hypers_are_left_untouched_and_grad_mode_does_not_matter():
    prob = Ridge()
    log_l2 = torch.tensor(-1.3, dtype=F64, requires_grad=True)
    w = torch.nn.Parameter(prob.solve(log_l2.detach()))
    before = w.detach().clone()
    with torch.no_grad():
        result = implicit_hypergradient(
            prob.train_loss, prob.outer_loss, {"w": w}, {"log_l2": log_l2}
        )
    truth = prob.closed_form(log_l2.detach())
    assert abs(result.grads["log_l2"].item() - truth.item()) <= 1e-10 * abs(truth.item())
    assert w.grad is None and log_l2.grad is None
    assert torch.equal(w.detach(), before)
    assert not result.grads["log_l2"].requires_grad
    assert not result.ihvp["w"].requires_grad


# --------------------------------------------------------------------------------------------
# bad inputs


def _ridge_call(**kwargs):
    prob = Ridge()
    log_l2 = torch.tensor(-1.0, dtype=F64)
    call = {
        "train_loss": prob.train_loss,
        "outer_loss": prob.outer_loss,
        "params": {"w": prob.solve(log_l2)},
        "hypers": {"log_l2": log_l2},
    }
    call.update(kwargs)
    return implicit_hypergradient(**call)


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"solver": "adam"}, "'adam'"),
        ({"solver": "CG"}, "'CG'"),
        ({"iterations": 0}, "iterations.*0"),
        ({"iterations": -3}, "iterations.*-3"),
        ({"iterations": 2.5}, "iterations.*2.5"),
        ({"damping": -0.1}, "damping.*-0.1"),
        ({"damping": math.nan}, "damping.*nan"),
        ({"alpha": 0.0}, "alpha.*0.0"),
        ({"alpha": -0.5}, "alpha.*-0.5"),
        ({"params": {}}, "params"),
        ({"hypers": {}}, "hypers"),
    ],
)
def test_bad_arguments_raise(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        _ridge_call(**kwargs)


@pytest.mark.parametrize(
    ("solver_fn", "kwargs", "pattern"),
    [
        (inverse_hvp_cg, {"iterations": 0}, "iterations.*0"),
        (inverse_hvp_cg, {"damping": -1.0}, "damping.*-1.0"),
        (inverse_hvp_cg, {"tol": -1e-3}, "tol.*-0.001"),
        (inverse_hvp_neumann, {"iterations": -1}, "iterations.*-1"),
        (inverse_hvp_neumann, {"alpha": 0}, "alpha.*0"),
        (inverse_hvp_neumann, {"damping": -2.0}, "damping.*-2.0"),
    ],
)
def test_solver_bad_arguments_raise(solver_fn, kwargs, pattern):
    matrix, rhs = _spd_problem()
    with pytest.raises(ValueError, match=pattern):
        solver_fn(_dense_hvp_fn(matrix, rhs), rhs, **kwargs)


def test_non_scalar_losses_and_mismatched_vectors_raise():
    prob = Ridge()

    def vector_loss(w, lam):
        return prob.X @ w["w"] * lam["log_l2"].exp()

    with pytest.raises(ValueError, match=re.escape("train_loss must return a scalar")):
        _ridge_call(train_loss=vector_loss)
    with pytest.raises(ValueError, match=re.escape("outer_loss must return a scalar")):
        _ridge_call(outer_loss=vector_loss)
    params = {"w": torch.zeros(3, dtype=F64)}
    with pytest.raises(ValueError, match="same keys"):
        hvp(lambda p: (p["w"] ** 2).sum(), params, {"v": torch.zeros(3, dtype=F64)})
    with pytest.raises(ValueError, match="shape"):
        hvp(lambda p: (p["w"] ** 2).sum(), params, {"w": torch.zeros(4, dtype=F64)})
