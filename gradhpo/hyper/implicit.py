"""Hypergradients by the implicit function theorem, with matrix-free inverse-Hessian products.

At a minimum ``w*`` of a training loss ``L_T(w, lam)`` the gradient ``dL_T/dw`` vanishes, so
the optimum moves with the hyperparameters as ``dw*/dlam = -H^-1 d2L_T/dw dlam``. The total
derivative of an outer (validation) loss ``L_V(w*(lam), lam)`` is therefore::

    dL_V/dlam = dL_V/dlam (direct) - (d2L_T/dlam dw) H^-1 grad_w L_V,   H = d2L_T/dw2 at w*.

``H^-1 grad_w L_V`` is never formed densely: it is solved from Hessian-vector products (one
double backward each) by conjugate gradient (:func:`inverse_hvp_cg`, as in HOAG, Pedregosa
2016) or by a truncated Neumann series (:func:`inverse_hvp_neumann`, as in Lorraine et al.
2020). Only *loss-side* hyperparameters (L2 coefficients, per-example weights, ...) can be
differentiated this way: a hyperparameter of the optimizer such as the learning rate does not
move the optimum, and :func:`implicit_hypergradient` says so with a :class:`ValueError`.

Parameters travel as ``dict[str, Tensor]`` (:data:`Params`); vectors in parameter space are
dicts of the same keys and shapes, and dot products are summed over the dict. Nothing is
flattened, so tensors keep their own dtype (float32 or float64) and device (CPU or CUDA).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

__all__ = [
    "ImplicitResult",
    "Params",
    "hvp",
    "implicit_hypergradient",
    "inverse_hvp_cg",
    "inverse_hvp_neumann",
]

Tensor = torch.Tensor
Params = dict[str, Tensor]

#: Solvers accepted by :func:`implicit_hypergradient`.
SOLVERS: tuple[str, ...] = ("cg", "neumann")


@dataclass
class ImplicitResult:
    """What :func:`implicit_hypergradient` returns.

    Attributes:
        grads: total derivative ``dL_V/dlam``, same keys, shapes, dtypes and devices as the
            ``hypers`` passed in; zeros for a hyperparameter that has no effect.
        outer_loss: ``L_V(w, lam)`` at the given parameters, detached.
        ihvp: the approximate solution ``v`` of ``(H + damping I) v = grad_w L_V``.
        residual: ``||(H + damping I) v - grad_w L_V|| / ||grad_w L_V||`` (``0.0`` when the
            outer gradient is zero); small means the linear solve converged.
    """

    grads: dict[str, Tensor]
    outer_loss: Tensor
    ihvp: Params
    residual: float


# --------------------------------------------------------------------------------------------
# validation and dict-vector arithmetic


def _check_iterations(iterations: int) -> None:
    if (
        isinstance(iterations, bool)
        or not isinstance(iterations, numbers.Integral)
        or iterations < 1
    ):
        raise ValueError(f"iterations must be an integer >= 1, got {iterations!r}")


def _check_damping(damping: float) -> None:
    if not isinstance(damping, numbers.Real) or not (0.0 <= damping < math.inf):
        raise ValueError(f"damping must be a finite number >= 0, got {damping!r}")


def _check_alpha(alpha: float) -> None:
    if not isinstance(alpha, numbers.Real) or not (0.0 < alpha < math.inf):
        raise ValueError(f"alpha must be a finite number > 0, got {alpha!r}")


def _check_tensor_dict(name: str, tensors: Mapping[str, Tensor]) -> None:
    if not isinstance(tensors, Mapping):
        raise TypeError(f"{name} must be a dict of tensors, got {type(tensors).__name__}")
    if len(tensors) == 0:
        raise ValueError(f"{name} must not be empty")
    for key, value in tensors.items():
        if not isinstance(value, Tensor):
            raise TypeError(f"{name}[{key!r}] must be a torch.Tensor, got {type(value).__name__}")
        if not value.is_floating_point():
            raise ValueError(f"{name}[{key!r}] must be a floating-point tensor, got {value.dtype}")


def _check_like(name: str, vector: Mapping[str, Tensor], reference: Mapping[str, Tensor]) -> None:
    """``vector`` must have exactly the keys and shapes of ``reference``."""
    if set(vector) != set(reference):
        raise ValueError(
            f"{name} must have the same keys as the parameters: got {sorted(vector)}, "
            f"expected {sorted(reference)}"
        )
    for key, ref in reference.items():
        if vector[key].shape != ref.shape:
            raise ValueError(
                f"{name}[{key!r}] has shape {tuple(vector[key].shape)}, expected {tuple(ref.shape)}"
            )


def _dot(a: Params, b: Params) -> Tensor:
    """Sum over the dict of the elementwise dot products, as a 0-dim tensor."""
    total: Tensor | None = None
    for key, x in a.items():
        term = (x * b[key]).sum()
        total = term if total is None else total + term
    assert total is not None
    return total


def _norm(a: Params) -> float:
    return math.sqrt(max(_dot(a, a).item(), 0.0))


def _detached(a: Mapping[str, Tensor]) -> Params:
    return {key: value.detach() for key, value in a.items()}


def _axpy(alpha: Tensor | float, x: Params, y: Params) -> Params:
    """``y + alpha * x`` per key."""
    return {key: y[key] + alpha * x[key] for key in y}


def _checked_hvp(hvp_fn: Callable[[Params], Params], vector: Params) -> Params:
    result = hvp_fn(vector)
    _check_like("hvp_fn(vector)", result, vector)
    return _detached(result)


# --------------------------------------------------------------------------------------------
# Hessian-vector products


def _grad_or_zeros(
    outputs: list[Tensor],
    inputs: list[Tensor],
    grad_outputs: list[Tensor] | None = None,
    *,
    create_graph: bool = False,
    retain_graph: bool | None = None,
) -> list[Tensor | None]:
    """``torch.autograd.grad`` that tolerates outputs without a graph (their term is zero).

    Returns ``None`` for every input that none of the outputs depends on.
    """
    live = [i for i, out in enumerate(outputs) if out.requires_grad]
    if not live:
        return [None] * len(inputs)
    outs = [outputs[i] for i in live]
    gouts = None if grad_outputs is None else [grad_outputs[i] for i in live]
    grads = torch.autograd.grad(
        outs,
        inputs,
        grad_outputs=gouts,
        create_graph=create_graph,
        retain_graph=retain_graph,
        allow_unused=True,
    )
    return list(grads)


def _fill_zeros(keys: list[str], leaves: list[Tensor], grads: list[Tensor | None]) -> Params:
    return {
        key: torch.zeros_like(leaf) if grad is None else grad.detach()
        for key, leaf, grad in zip(keys, leaves, grads, strict=True)
    }


def _hvp_from_gradient(
    keys: list[str], leaves: list[Tensor], first_grads: list[Tensor | None]
) -> Callable[[Params], Params]:
    """Hessian-vector products by backpropagating through an already built gradient graph.

    ``first_grads`` is ``d loss / d leaves`` computed with ``create_graph=True``; every call
    costs one backward pass through it and keeps the graph for the next call.
    """
    live = [(i, g) for i, g in enumerate(first_grads) if g is not None and g.requires_grad]

    def hvp_fn(vector: Params) -> Params:
        if not live:  # the gradient does not depend on the parameters: H = 0
            return {key: torch.zeros_like(leaf) for key, leaf in zip(keys, leaves, strict=True)}
        outputs = [g for _, g in live]
        grad_outputs = [vector[keys[i]].detach() for i, _ in live]
        second = torch.autograd.grad(
            outputs, leaves, grad_outputs=grad_outputs, retain_graph=True, allow_unused=True
        )
        return _fill_zeros(keys, leaves, list(second))

    return hvp_fn


def hvp(loss_fn: Callable[[Params], Tensor], params: Params, vector: Params) -> Params:
    """Hessian-vector product ``H v`` of the scalar ``loss_fn`` at ``params``.

    Computed by double backward: the gradient is built with ``create_graph=True`` and then
    differentiated once more along ``vector``; the Hessian is never formed. ``params`` may have
    any ``requires_grad`` state (they are detached internally) and ``vector`` must have the same
    keys and shapes. The result is detached; parameters the loss does not depend on get zeros.
    """
    _check_tensor_dict("params", params)
    _check_like("vector", vector, params)
    keys = list(params)
    with torch.enable_grad():
        leaves = [params[key].detach().requires_grad_(True) for key in keys]
        loss = loss_fn(dict(zip(keys, leaves, strict=True)))
        _check_scalar("loss_fn(params)", loss)
        first = _grad_or_zeros([loss], leaves, create_graph=True)
        return _hvp_from_gradient(keys, leaves, first)(_detached(vector))


def _check_scalar(name: str, value: object) -> None:
    if not isinstance(value, Tensor) or value.numel() != 1:
        shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
        raise ValueError(f"{name} must return a scalar tensor, got {shape}")


# --------------------------------------------------------------------------------------------
# inverse-Hessian-vector products


def inverse_hvp_cg(
    hvp_fn: Callable[[Params], Params],
    rhs: Params,
    *,
    iterations: int = 20,
    damping: float = 0.0,
    tol: float = 1e-10,
) -> Params:
    """Solve ``(H + damping I) v = rhs`` by conjugate gradient, using only ``hvp_fn(v) = H v``.

    Starts from ``v = 0`` and runs at most ``iterations`` steps (one Hessian-vector product
    each), stopping early when the recursive residual norm drops below ``tol * ||rhs||``. CG
    is exact after ``n`` steps for a symmetric positive-definite matrix of size ``n``; for an
    indefinite ``H`` (a saddle, a non-converged network) add ``damping``. The iteration also
    stops if the curvature along a search direction is zero or not finite. Returns a detached
    dict of the keys and shapes of ``rhs``.
    """
    _check_iterations(iterations)
    _check_damping(damping)
    if not isinstance(tol, numbers.Real) or not (0.0 <= tol < math.inf):
        raise ValueError(f"tol must be a finite number >= 0, got {tol!r}")
    _check_tensor_dict("rhs", rhs)

    # hvp_fn runs with grad mode as the caller left it (it may build its own graph); the
    # vectors here are detached, so the arithmetic records nothing.
    rhs = _detached(rhs)
    x = {key: torch.zeros_like(value) for key, value in rhs.items()}
    rhs_norm = _norm(rhs)
    if rhs_norm == 0.0:
        return x
    r = {key: value.clone() for key, value in rhs.items()}
    p = {key: value.clone() for key, value in rhs.items()}
    rs = _dot(r, r)
    for _ in range(iterations):
        ap = _checked_hvp(hvp_fn, p)
        if damping:
            ap = _axpy(damping, p, ap)
        curvature = _dot(p, ap)
        curvature_value = curvature.item()
        if curvature_value == 0.0 or not math.isfinite(curvature_value):
            break
        step = rs / curvature
        x = _axpy(step, p, x)
        r = _axpy(-step, ap, r)
        rs_new = _dot(r, r)
        rs_new_value = rs_new.item()
        if rs_new_value == 0.0 or math.sqrt(max(rs_new_value, 0.0)) < tol * rhs_norm:
            break
        p = _axpy(rs_new / rs, p, r)
        rs = rs_new
    return x


def inverse_hvp_neumann(
    hvp_fn: Callable[[Params], Params],
    rhs: Params,
    *,
    iterations: int = 20,
    alpha: float = 0.01,
    damping: float = 0.0,
) -> Params:
    """Approximate ``(H + damping I)^-1 rhs`` by a truncated Neumann series.

    ``v = alpha * sum_{j=0..iterations} (I - alpha (H + damping I))^j rhs`` (``iterations``
    Hessian-vector products). The series converges to the inverse if and only if every
    eigenvalue ``mu`` of ``H + damping I`` satisfies ``0 < alpha * mu < 2``, i.e. the damped
    Hessian is positive definite and ``alpha < 2 / lambda_max(H + damping I)``; the error
    shrinks like ``max |1 - alpha mu|^(iterations + 1)``, so a small ``alpha`` is safe but
    slow. For ``alpha * mu >= 2`` the terms grow and the result is meaningless. Truncating
    the series acts as a regularizer: directions of small curvature are under-inverted.
    Returns a detached dict of the keys and shapes of ``rhs``.
    """
    _check_iterations(iterations)
    _check_alpha(alpha)
    _check_damping(damping)
    _check_tensor_dict("rhs", rhs)

    term = _detached(rhs)
    total = {key: value.clone() for key, value in term.items()}
    for _ in range(iterations):
        h_term = _checked_hvp(hvp_fn, term)
        # term <- (I - alpha (H + damping I)) term
        term = {
            key: value * (1.0 - alpha * damping) - alpha * h_term[key]
            for key, value in term.items()
        }
        total = {key: total[key] + term[key] for key in total}
    return {key: alpha * value for key, value in total.items()}


# --------------------------------------------------------------------------------------------
# hypergradient


def implicit_hypergradient(
    train_loss: Callable[[Params, dict[str, Tensor]], Tensor],
    outer_loss: Callable[[Params, dict[str, Tensor]], Tensor],
    params: Params,
    hypers: dict[str, Tensor],
    *,
    solver: str = "cg",
    iterations: int = 20,
    damping: float = 0.0,
    alpha: float = 0.01,
) -> ImplicitResult:
    """Total derivative of ``outer_loss`` w.r.t. ``hypers`` at a minimum of ``train_loss``.

    Args:
        train_loss: ``L_T(w, lam)``, a scalar. ``params`` should (approximately) minimise it;
            the result is only as good as that minimum and the linear solve.
        outer_loss: ``L_V(w, lam)``, a scalar; it may ignore ``lam``.
        params: ``w ~ w*``; detached internally, any ``requires_grad`` state is fine.
        hypers: ``lam``, floating-point tensors of any shape (e.g. a log-L2 coefficient per
            parameter tensor, a weight per training example). Gradients are w.r.t. these raw
            values, so reparametrise (``exp``, ``sigmoid``) inside the losses.
        solver: ``"cg"`` (:func:`inverse_hvp_cg`) or ``"neumann"`` (:func:`inverse_hvp_neumann`).
        iterations: Hessian-vector products spent by the solver (at most, for CG).
        damping: adds ``damping * I`` to the Hessian; needed when it is not positive definite.
        alpha: Neumann step size; must satisfy ``alpha < 2 / lambda_max(H + damping I)``.

    Returns:
        :class:`ImplicitResult` with ``grads = dL_V/dlam_direct - (d2L_T/dlam dw) v`` where
        ``v ~ (H + damping I)^-1 grad_w L_V``. A hyperparameter that does not affect the
        optimum or the outer loss gets zeros.

    Raises:
        ValueError: on a bad ``solver``/``iterations``/``damping``/``alpha``, empty ``params``
            or ``hypers``, non-scalar losses, or when ``train_loss`` does not depend on any of
            the ``hypers`` at all (e.g. a learning rate): implicit differentiation only sees
            hyperparameters that change the training objective.

    Cost: one forward and one backward of each loss, one double-backward graph of
    ``train_loss`` kept alive during the solve, ``iterations + 2`` Hessian-vector-sized
    backward passes (solver, residual check, mixed derivative).
    """
    if solver not in SOLVERS:
        raise ValueError(f"solver must be one of {SOLVERS}, got {solver!r}")
    _check_iterations(iterations)
    _check_damping(damping)
    _check_alpha(alpha)
    _check_tensor_dict("params", params)
    _check_tensor_dict("hypers", hypers)

    w_keys = list(params)
    h_keys = list(hypers)
    with torch.enable_grad():
        w_leaves = [params[key].detach().requires_grad_(True) for key in w_keys]
        h_leaves = [hypers[key].detach().requires_grad_(True) for key in h_keys]
        w = dict(zip(w_keys, w_leaves, strict=True))
        lam = dict(zip(h_keys, h_leaves, strict=True))

        # outer loss: grad_w L_V (right-hand side) and the direct term dL_V/dlam
        l_v = outer_loss(w, lam)
        _check_scalar("outer_loss", l_v)
        outer_grads = _grad_or_zeros([l_v.reshape(())], w_leaves + h_leaves)
        g = _fill_zeros(w_keys, w_leaves, outer_grads[: len(w_keys)])
        direct = _fill_zeros(h_keys, h_leaves, outer_grads[len(w_keys) :])

        # training loss: first-order gradient graph, reused by every Hessian-vector product
        l_t = train_loss(w, lam)
        _check_scalar("train_loss", l_t)
        train_grads = _grad_or_zeros(
            [l_t.reshape(())], w_leaves + h_leaves, create_graph=True, retain_graph=True
        )
        if all(grad is None for grad in train_grads[len(w_keys) :]):
            raise ValueError(
                "train_loss does not depend on any of the hypers "
                f"{h_keys}: implicit differentiation needs loss-side hyperparameters "
                "(L2 coefficients, example weights, ...) that move the optimum of the "
                "training loss; optimizer settings such as the learning rate do not"
            )
        grad_w = train_grads[: len(w_keys)]
        hvp_fn = _hvp_from_gradient(w_keys, w_leaves, grad_w)

        if solver == "cg":
            v = inverse_hvp_cg(hvp_fn, g, iterations=iterations, damping=damping)
        else:
            v = inverse_hvp_neumann(hvp_fn, g, iterations=iterations, alpha=alpha, damping=damping)

        g_norm = _norm(g)
        if g_norm == 0.0:
            residual = 0.0
        else:
            hv = hvp_fn(v)
            with torch.no_grad():
                res = {key: hv[key] + damping * v[key] - g[key] for key in w_keys}
            residual = _norm(res) / g_norm

        # mixed term (d2L_T / dlam dw) v = d/dlam <grad_w L_T, v>
        mixed = _grad_or_zeros(
            [grad for grad in grad_w if grad is not None],
            h_leaves,
            [v[key] for key, grad in zip(w_keys, grad_w, strict=True) if grad is not None],
            retain_graph=False,
        )

    grads = {}
    for key, leaf, m in zip(h_keys, h_leaves, mixed, strict=True):
        total = direct[key] if m is None else direct[key] - m.detach()
        grads[key] = total.to(dtype=hypers[key].dtype).reshape(leaf.shape)
    return ImplicitResult(
        grads=grads,
        outer_loss=l_v.detach(),
        ihvp=v,
        residual=residual,
    )
