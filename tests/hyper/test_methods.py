"""Hypergradient methods against truth: float64 central finite differences on a tiny tanh MLP,
``higher`` on a small ReLU CNN, and the methods against each other."""

from __future__ import annotations

import pytest
import torch
from gradhpo.models import build_model
from torch import nn

from gradhpo.hyper.methods import InnerProblem, Objective, hypergradient, inner_step, unroll
from gradhpo.hyper.optimizers import make_optimizer
from gradhpo.hyper.spec import HyperParameters

DT = torch.float64
K = 4


def tiny_mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).to(DT)


def make_batches(k: int = K, n: int = 6, shape=(3,), seed: int = 1, classes: int = 3):
    g = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randn(n, *shape, generator=g, dtype=DT),
            torch.randint(0, classes, (n,), generator=g),
            torch.arange(n) + i * n,
        )
        for i in range(k)
    ]


def setup(
    model: nn.Module,
    optimizer: str,
    specs: list[dict],
    num_examples: int | None = None,
    **opt_kwargs,
):
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    buffers = {n: b.detach().clone() for n, b in model.named_buffers()}
    opt = make_optimizer(optimizer, **opt_kwargs)
    hypers = HyperParameters(specs, params, num_examples=num_examples)
    problem = InnerProblem(model, opt, hypers)
    return problem, params, opt.init(params), buffers


@torch.no_grad()
def unrolled_objective(problem, params, state, buffers, batches, objective) -> torch.Tensor:
    """The objective by plain forward computation (no hypergradient machinery)."""
    losses = []
    for batch in batches:
        params, state, buffers, loss = inner_step(
            problem, params, state, buffers, problem.hypers.raw, batch
        )
        losses.append(loss)
    total = torch.zeros((), dtype=DT)
    if objective.final is not None:
        total = total + objective.final_weight * objective.final(params, buffers)
    return total + objective.train_weight * torch.stack(losses).mean()


def finite_difference(problem, params, state, buffers, batches, objective, truncate=None, h=1e-6):
    """Central differences of the objective w.r.t. every raw hyperparameter element.

    With ``truncate``, the untracked prefix is computed once at the unperturbed hypers (that is
    what truncation differentiates)."""
    if truncate is not None and truncate < len(batches):
        prefix = hypergradient(
            "reverse",
            problem,
            params,
            state,
            buffers,
            batches[: len(batches) - truncate],
            Objective.train_mean(),
        )
        params, state, buffers = prefix.params, prefix.state, prefix.buffers
        batches = batches[len(batches) - truncate :]
    fd = {}
    for key, leaf in problem.hypers.raw.items():
        grad = torch.zeros_like(leaf)
        for i in range(leaf.numel()):
            values = []
            for sign in (1.0, -1.0):
                with torch.no_grad():
                    leaf.view(-1)[i] += sign * h
                rng = torch.get_rng_state()
                values.append(
                    unrolled_objective(problem, params, state, buffers, batches, objective)
                )
                torch.set_rng_state(rng)
                with torch.no_grad():
                    leaf.view(-1)[i] -= sign * h
            grad.view(-1)[i] = (values[0] - values[1]) / (2 * h)
        fd[key] = grad
    return fd


def assert_close(got: dict, want: dict, rtol: float) -> None:
    assert got.keys() == want.keys()
    for key in want:
        scale = want[key].abs().max().clamp_min(1e-8)
        err = (got[key] - want[key]).abs().max() / scale
        assert err < rtol, (
            f"{key}: relative error {float(err):.2e} (got {got[key]}, want {want[key]})"
        )


CASES = [
    ("sgd", [{"name": "lr", "init": 0.3}], {}),
    (
        "sgd",
        [
            {"name": "lr", "init": 0.3, "granularity": "per_tensor"},
            {"name": "weight_decay", "init": 0.05},
        ],
        {},
    ),
    ("sgd", [{"name": "lr", "init": 0.3, "granularity": "per_element"}], {}),
    ("momentum", [{"name": "lr", "init": 0.2}, {"name": "momentum", "init": 0.7}], {}),
    (
        "nesterov",
        [
            {"name": "momentum", "init": 0.6, "granularity": "per_tensor"},
            {"name": "lr", "init": 0.2, "low": 1e-3, "high": 1.0},
        ],
        {},
    ),
    (
        "adam",
        [
            {"name": "lr", "init": 0.05},
            {"name": "beta1", "init": 0.8},
            {"name": "beta2", "init": 0.9},
            {"name": "eps", "init": 1e-2},
        ],
        {},
    ),
    (
        "adamw",
        [
            {"name": "lr", "init": 0.05, "transform": "softplus"},
            {"name": "weight_decay", "init": 0.1, "granularity": "per_tensor"},
        ],
        {},
    ),
    ("sgd", [{"name": "l2", "init": 0.05, "granularity": "per_element"}], {"lr": 0.3}),
    (
        "sgd",
        [
            {"name": "l2", "init": 0.05, "granularity": "per_tensor"},
            {"name": "example_weight", "init": 1.0, "granularity": "per_example"},
        ],
        {"lr": 0.3},
    ),
]


@pytest.mark.parametrize("objective_kind", ["val", "train_mean"])
@pytest.mark.parametrize(("optimizer", "specs", "opt_kwargs"), CASES)
def test_methods_match_finite_differences(objective_kind, optimizer, specs, opt_kwargs) -> None:
    model = tiny_mlp()
    problem, params, state, buffers = setup(
        model, optimizer, specs, num_examples=K * 6, **opt_kwargs
    )
    batches = make_batches()
    xv, yv, _ = make_batches(1, n=10, seed=7)[0]
    objective = (
        Objective.validation(model, xv, yv) if objective_kind == "val" else Objective.train_mean()
    )
    want = finite_difference(problem, params, state, buffers, batches, objective)
    assert any(float(g.abs().max()) > 1e-6 for g in want.values())  # not a vacuous comparison
    # Forward mode pays one tangent per scalar: checked here on the small cases, and on a
    # per-element case against reverse mode in test_forward_per_element_equals_reverse.
    methods = ["reverse", "checkpointed"] + (["forward"] if problem.hypers.numel() <= 8 else [])
    for method in methods:
        got = hypergradient(method, problem, params, state, buffers, batches, objective).grads
        assert_close(got, want, rtol=1e-6)


def test_forward_per_element_equals_reverse() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 2), nn.Tanh(), nn.Linear(2, 3)).to(DT)
    specs = [{"name": "lr", "init": 0.3, "granularity": "per_element"}]
    problem, params, state, buffers = setup(model, "momentum", specs)
    batches = make_batches()
    xv, yv, _ = make_batches(1, n=10, seed=7)[0]
    objective = Objective.validation(model, xv, yv)
    fwd = hypergradient("forward", problem, params, state, buffers, batches, objective)
    rev = hypergradient("reverse", problem, params, state, buffers, batches, objective)
    assert problem.hypers.numel() == 17
    assert_close(fwd.grads, rev.grads, 1e-10)


def test_greedy_is_one_step_reverse_and_matches_fd() -> None:
    model = tiny_mlp()
    problem, params, state, buffers = setup(
        model, "momentum", [{"name": "lr", "init": 0.3}, {"name": "momentum", "init": 0.5}]
    )
    batch = make_batches(1)
    xv, yv, _ = make_batches(1, n=10, seed=7)[0]
    objective = Objective.validation(model, xv, yv)
    greedy = hypergradient("greedy", problem, params, state, buffers, batch, objective).grads
    assert_close(greedy, finite_difference(problem, params, state, buffers, batch, objective), 1e-6)
    with pytest.raises(ValueError, match="K must be 1, got K=4"):
        hypergradient("greedy", problem, params, state, buffers, make_batches(), objective)


@pytest.mark.parametrize("truncate", [1, 2, K])
def test_truncated_reverse(truncate: int) -> None:
    model = tiny_mlp()
    problem, params, state, buffers = setup(
        model, "momentum", [{"name": "lr", "init": 0.3}, {"name": "weight_decay", "init": 0.01}]
    )
    batches = make_batches()
    xv, yv, _ = make_batches(1, n=10, seed=7)[0]
    objective = Objective.validation(model, xv, yv)
    rev = hypergradient(
        "reverse", problem, params, state, buffers, batches, objective, truncate=truncate
    )
    ckpt = hypergradient(
        "checkpointed", problem, params, state, buffers, batches, objective, truncate=truncate
    )
    assert_close(rev.grads, ckpt.grads, 1e-10)
    assert_close(
        rev.grads,
        finite_difference(problem, params, state, buffers, batches, objective, truncate),
        1e-6,
    )
    full = hypergradient("reverse", problem, params, state, buffers, batches, objective)
    if truncate == K:
        assert_close(rev.grads, full.grads, 1e-12)
    else:
        assert not torch.allclose(rev.grads["lr"], full.grads["lr"])
    # Truncation changes only the gradient, not the trajectory.
    for name in full.params:
        assert torch.equal(rev.params[name], full.params[name])


def cnn_with_bn_and_dropout() -> nn.Module:
    torch.manual_seed(0)
    config = {
        "name": "cnn",
        "depth": 2,
        "width": 4,
        "norm": "batch",
        "dropout": 0.3,
        "activation": "tanh",
    }
    return build_model(config, (1, 8, 8), 3).to(DT)


@pytest.mark.parametrize("method", ["checkpointed", "forward"])
def test_methods_agree_with_batchnorm_and_dropout(method: str) -> None:
    """Recomputation and tangents replay dropout masks and BN statistics exactly."""
    model = cnn_with_bn_and_dropout()
    specs = [{"name": "lr", "init": 0.1}, {"name": "momentum", "init": 0.5}]
    problem, params, state, buffers = setup(model, "momentum", specs)
    batches = make_batches(5, n=8, shape=(1, 8, 8))
    xv, yv, _ = make_batches(1, n=12, shape=(1, 8, 8), seed=9)[0]
    objective = Objective.validation(model, xv, yv)
    torch.manual_seed(123)
    rev = hypergradient("reverse", problem, params, state, buffers, batches, objective)
    rng_after_reverse = torch.get_rng_state()
    torch.manual_seed(123)
    other = hypergradient(method, problem, params, state, buffers, batches, objective)
    assert torch.equal(torch.get_rng_state(), rng_after_reverse)  # same randomness consumed
    assert_close(other.grads, rev.grads, 1e-9)
    for name in rev.params:
        torch.testing.assert_close(other.params[name], rev.params[name], rtol=1e-12, atol=1e-12)
    for name in rev.buffers:
        torch.testing.assert_close(other.buffers[name], rev.buffers[name], rtol=1e-12, atol=1e-12)
    assert not torch.equal(
        rev.buffers["features.0.norm.running_mean"], buffers["features.0.norm.running_mean"]
    )


@pytest.mark.parametrize("every", [2, 3, 5, 9])
@pytest.mark.parametrize("truncate", [None, 3])
def test_checkpointed_segments_agree_with_reverse(every: int, truncate: int | None) -> None:
    """Segments of several steps (recomputed together, one vector-Jacobian product each;
    ``every`` > K is one segment) give reverse mode's hypergradient, weights, buffers and RNG
    consumption, with BatchNorm, dropout, a train-loss term and truncation."""
    model = cnn_with_bn_and_dropout()
    specs = [{"name": "lr", "init": 0.1}, {"name": "momentum", "init": 0.5}]
    problem, params, state, buffers = setup(model, "momentum", specs)
    batches = make_batches(7, n=8, shape=(1, 8, 8))
    xv, yv, _ = make_batches(1, n=12, shape=(1, 8, 8), seed=9)[0]
    objective = Objective(Objective.validation(model, xv, yv).final, train_weight=0.5)
    runs = {}
    for method, kwargs in [("reverse", {}), ("checkpointed", {"checkpoint_every": every})]:
        torch.manual_seed(123)
        args = (problem, params, state, buffers, batches, objective)
        runs[method] = hypergradient(method, *args, truncate=truncate, **kwargs)
        runs[method + " rng"] = torch.get_rng_state()
    rev, ckpt = runs["reverse"], runs["checkpointed"]
    assert torch.equal(runs["reverse rng"], runs["checkpointed rng"])
    assert_close(ckpt.grads, rev.grads, 1e-9)
    torch.testing.assert_close(ckpt.objective, rev.objective, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ckpt.train_losses, rev.train_losses, rtol=1e-12, atol=1e-12)
    for name in rev.params:
        torch.testing.assert_close(ckpt.params[name], rev.params[name], rtol=1e-12, atol=1e-12)
    for name in rev.buffers:
        torch.testing.assert_close(ckpt.buffers[name], rev.buffers[name], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "2"])
def test_checkpoint_every_must_be_a_positive_integer(bad) -> None:
    problem, params, state, buffers = setup(tiny_mlp(), "momentum", [{"name": "lr", "init": 0.3}])
    args = (problem, params, state, buffers, make_batches(), Objective.train_mean())
    with pytest.raises(ValueError, match=rf"checkpoint_every must be an integer >= 1, got {bad!r}"):
        hypergradient("checkpointed", *args, checkpoint_every=bad)
    with pytest.raises(ValueError, match="only the checkpointed method has segments"):
        hypergradient("reverse", *args, checkpoint_every=2)


@pytest.mark.parametrize("chunk", [None, 1, 2])
def test_forward_chunks_agree_with_reverse_under_batchnorm_and_dropout(chunk) -> None:
    """Vectorized tangents (one vmapped pass, or chunks of them) and the per-direction loop
    give reverse mode's hypergradient, weights, buffers and RNG consumption; Adam's float
    step counter and SGD's boolean momentum flags carry no tangent."""
    model = cnn_with_bn_and_dropout()
    for optimizer, specs in [
        (
            "momentum",
            [
                {"name": "lr", "init": 0.1},
                {"name": "momentum", "init": 0.5},
                {"name": "weight_decay", "init": 0.01},
            ],
        ),
        ("adam", [{"name": "lr", "init": 0.01}, {"name": "beta1", "init": 0.8}]),
    ]:
        problem, params, state, buffers = setup(model, optimizer, specs)
        batches = make_batches(4, n=8, shape=(1, 8, 8))
        xv, yv, _ = make_batches(1, n=12, shape=(1, 8, 8), seed=9)[0]
        objective = Objective.validation(model, xv, yv)
        torch.manual_seed(7)
        rev = hypergradient("reverse", problem, params, state, buffers, batches, objective)
        rng_after_reverse = torch.get_rng_state()
        torch.manual_seed(7)
        fwd = hypergradient(
            "forward", problem, params, state, buffers, batches, objective, chunk=chunk
        )
        assert torch.equal(torch.get_rng_state(), rng_after_reverse)
        assert_close(fwd.grads, rev.grads, 1e-9)
        assert fwd.state.keys() == rev.state.keys()
        for name in rev.params:
            torch.testing.assert_close(fwd.params[name], rev.params[name], rtol=1e-12, atol=1e-12)
        for name in rev.state:
            torch.testing.assert_close(fwd.state[name], rev.state[name], rtol=1e-12, atol=1e-12)
        for name in rev.buffers:
            torch.testing.assert_close(fwd.buffers[name], rev.buffers[name], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("chunk", [None, 1, 2])
@pytest.mark.parametrize("objective_kind", ["val", "train_mean"])
def test_forward_mode_with_loss_side_hypers_matches_finite_differences(chunk, objective_kind):
    """Hypers that enter the training loss (an L2 penalty, example weights) reach the inner
    gradient directly: forward mode must carry d(grad)/d(lambda), and the train-mean term the
    data loss's own tangent (which the penalty and the weights do not enter). Few examples, so
    that the per-example weights stay within forward mode's direction budget."""
    model = tiny_mlp()
    specs = [
        {"name": "l2", "init": 0.05, "granularity": "per_tensor"},
        {"name": "example_weight", "init": 1.0, "granularity": "per_example"},
        {"name": "lr", "init": 0.3},
    ]
    problem, params, state, buffers = setup(model, "momentum", specs, num_examples=3, momentum=0.5)
    g = torch.Generator().manual_seed(3)
    batches = [
        (
            torch.randn(3, 3, generator=g, dtype=DT),
            torch.randint(0, 3, (3,), generator=g),
            torch.randperm(3, generator=g),
        )
        for _ in range(K)
    ]
    xv, yv, _ = make_batches(1, n=10, seed=7)[0]
    objective = (
        Objective.validation(model, xv, yv) if objective_kind == "val" else Objective.train_mean()
    )
    assert problem.hypers.numel() == 8
    want = finite_difference(problem, params, state, buffers, batches, objective)
    fwd = hypergradient("forward", problem, params, state, buffers, batches, objective, chunk=chunk)
    assert_close(fwd.grads, want, rtol=1e-6)
    rev = hypergradient("reverse", problem, params, state, buffers, batches, objective)
    assert_close(fwd.grads, rev.grads, rtol=1e-10)


def test_forward_chunk_must_be_positive() -> None:
    model = tiny_mlp()
    problem, params, state, buffers = setup(model, "sgd", [{"name": "lr", "init": 0.1}])
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="chunk must be an integer >= 1 or None"):
            hypergradient(
                "forward",
                problem,
                params,
                state,
                buffers,
                make_batches(),
                Objective.train_mean(),
                chunk=bad,
            )


def test_compile_is_for_forward_mode_only() -> None:
    model = tiny_mlp()
    problem, params, state, buffers = setup(model, "sgd", [{"name": "lr", "init": 0.1}])
    for method in ("reverse", "checkpointed", "greedy"):
        with pytest.raises(
            ValueError, match=f"only forward mode steps are compiled, got method '{method}'"
        ):
            hypergradient(
                method,
                problem,
                params,
                state,
                buffers,
                make_batches(1),
                Objective.train_mean(),
                compile=True,
            )


@pytest.mark.slow
def test_compiled_forward_mode_agrees_with_reverse() -> None:
    """torch.compile'd forward-mode steps (one vmapped chunk, and one jvp per direction):
    reverse mode's hypergradient, trajectory, BatchNorm statistics and dropout masks."""
    model = cnn_with_bn_and_dropout()
    specs = [{"name": "lr", "init": 0.1}, {"name": "momentum", "init": 0.5}]
    problem, params, state, buffers = setup(model, "momentum", specs)
    batches = make_batches(3, n=8, shape=(1, 8, 8))
    xv, yv, _ = make_batches(1, n=12, shape=(1, 8, 8), seed=9)[0]
    objective = Objective.validation(model, xv, yv)
    torch.manual_seed(11)
    rev = hypergradient("reverse", problem, params, state, buffers, batches, objective)
    rng_after_reverse = torch.get_rng_state()
    for chunk in (None, 1):
        torch.manual_seed(11)
        fwd = hypergradient(
            "forward",
            problem,
            params,
            state,
            buffers,
            batches,
            objective,
            chunk=chunk,
            compile=True,
        )
        assert torch.equal(torch.get_rng_state(), rng_after_reverse)
        assert_close(fwd.grads, rev.grads, 1e-9)
        for got, want in ((fwd.params, rev.params), (fwd.buffers, rev.buffers)):
            for name in want:
                torch.testing.assert_close(got[name], want[name], rtol=1e-12, atol=1e-12)


def test_unroll_follows_the_hypergradient_trajectory() -> None:
    """unroll: the steps of a hypergradient horizon without the hypergradient (amortized
    tuning's plain horizons), with dropout and BatchNorm."""
    model = cnn_with_bn_and_dropout()
    specs = [{"name": "lr", "init": 0.1}, {"name": "momentum", "init": 0.5}]
    problem, params, state, buffers = setup(model, "momentum", specs)
    batches = make_batches(3, n=8, shape=(1, 8, 8))
    xv, yv, _ = make_batches(1, n=12, shape=(1, 8, 8), seed=9)[0]
    torch.manual_seed(5)
    rev = hypergradient(
        "reverse", problem, params, state, buffers, batches, Objective.validation(model, xv, yv)
    )
    torch.manual_seed(5)
    new_params, new_state, new_buffers, losses = unroll(problem, params, state, buffers, batches)
    torch.testing.assert_close(losses, rev.train_losses, rtol=1e-12, atol=1e-12)
    for got, want in ((new_params, rev.params), (new_state, rev.state), (new_buffers, rev.buffers)):
        assert got.keys() == want.keys()
        for name in want:
            assert not got[name].requires_grad
            torch.testing.assert_close(got[name], want[name], rtol=1e-12, atol=1e-12)


def test_hypergradient_trains_in_train_mode_and_restores_the_mode() -> None:
    """The unroll runs in train mode (dropout, batch statistics) whatever the model's mode,
    the objective in eval mode, and the model's mode is the same afterwards."""
    model = cnn_with_bn_and_dropout()
    specs = [{"name": "lr", "init": 0.1}]
    problem, params, state, buffers = setup(model, "sgd", specs)
    batches = make_batches(2, n=8, shape=(1, 8, 8))
    xv, yv, _ = make_batches(1, n=12, shape=(1, 8, 8), seed=9)[0]
    objective = Objective.validation(model, xv, yv)
    results = {}
    for mode in ("train", "eval"):
        model.train(mode == "train")
        for method in ("reverse", "checkpointed", "forward"):
            torch.manual_seed(3)
            results[mode, method] = hypergradient(
                method, problem, params, state, buffers, batches, objective
            )
            assert all(m.training == (mode == "train") for m in model.modules())
    for method in ("reverse", "checkpointed", "forward"):
        assert_close(results["eval", method].grads, results["train", "reverse"].grads, 1e-9)
    # A submodule left in eval mode by the caller is put in train mode for the unroll and
    # the whole model comes back in the caller's (root) mode, as before.
    model.train()
    model.features[0].eval()
    torch.manual_seed(3)
    mixed = hypergradient("reverse", problem, params, state, buffers, batches, objective)
    assert_close(mixed.grads, results["train", "reverse"].grads, 1e-12)


class TiedMLP(nn.Module):
    """Two layers sharing one weight matrix (registered under two names)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(3, 3)
        self.b = nn.Linear(3, 3)
        self.b.weight = self.a.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.tanh(self.a(x)))


def test_tied_weights_are_tied_in_the_inner_steps() -> None:
    """A weight shared by two layers is one parameter: the inner steps equal torch.optim
    training of the module itself (where the tie is real)."""
    torch.manual_seed(0)
    model = TiedMLP().to(DT)
    twin = TiedMLP().to(DT)
    twin.load_state_dict(model.state_dict())
    problem, params, state, buffers = setup(model, "sgd", [{"name": "lr", "init": 0.2}])
    assert problem.tie_weights() and "b.weight" not in params
    assert not InnerProblem(tiny_mlp(), problem.optimizer, problem.hypers).tie_weights()
    batches = make_batches(3)
    _, _, _, losses = unroll(problem, params, state, buffers, batches)
    opt = torch.optim.SGD(twin.parameters(), lr=0.2)
    want = []
    for x, y, _ in batches:
        opt.zero_grad()
        loss = nn.functional.cross_entropy(twin(x), y)
        loss.backward()
        opt.step()
        want.append(loss.detach())
    torch.testing.assert_close(losses, torch.stack(want), rtol=1e-12, atol=1e-12)


def test_reverse_matches_higher_on_relu_cnn() -> None:
    """Oracle: ``higher`` unrolls the same SGD-with-momentum training of a ReLU CNN."""
    higher = pytest.importorskip("higher")
    torch.manual_seed(0)
    model = build_model(
        {"name": "cnn", "depth": 2, "width": 4, "norm": "none", "pooling": "max"}, (1, 8, 8), 3
    ).to(DT)
    batches = make_batches(6, n=8, shape=(1, 8, 8))
    xv, yv, _ = make_batches(1, n=12, shape=(1, 8, 8), seed=9)[0]
    lr0, momentum = 0.1, 0.9

    lr = torch.tensor(lr0, dtype=DT, requires_grad=True)
    opt = torch.optim.SGD(model.parameters(), lr=lr0, momentum=momentum)
    with higher.innerloop_ctx(model, opt, copy_initial_weights=True, override={"lr": [lr]}) as (
        fmodel,
        diffopt,
    ):
        for x, y, _ in batches:
            diffopt.step(nn.functional.cross_entropy(fmodel(x), y))
        val = nn.functional.cross_entropy(fmodel(xv), yv)
        (d_lr,) = torch.autograd.grad(val, lr)

    problem, params, state, buffers = setup(
        model, "momentum", [{"name": "lr", "init": lr0}], momentum=momentum
    )
    ours = hypergradient(
        "reverse", problem, params, state, buffers, batches, Objective.validation(model, xv, yv)
    )
    # raw = log(lr): d/draw = lr * d/dlr
    torch.testing.assert_close(ours.grads["lr"], lr0 * d_lr, rtol=1e-6, atol=0)
    assert torch.allclose(ours.objective, val.detach(), rtol=1e-12)


def test_forward_mode_direction_budget() -> None:
    model = tiny_mlp()
    problem, params, state, buffers = setup(
        model, "sgd", [{"name": "lr", "init": 0.1, "granularity": "per_element"}]
    )
    with pytest.raises(ValueError, match="31 > max_directions=8"):
        hypergradient(
            "forward",
            problem,
            params,
            state,
            buffers,
            make_batches(),
            Objective.train_mean(),
            max_directions=8,
        )


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"method": "backprop"}, "unknown 'backprop'"),
        ({"batches": []}, "K .* must be >= 1, got 0"),
        ({"truncate": 5}, r"truncate \(T\) must be an integer in \[1, K=4\], got 5"),
        ({"truncate": 0}, r"got 0"),
        ({"method": "forward", "truncate": 2}, "forward mode differentiates every step"),
    ],
)
def test_bad_arguments(kwargs, match) -> None:
    model = tiny_mlp()
    problem, params, state, buffers = setup(model, "sgd", [{"name": "lr", "init": 0.1}])
    args = {"method": "reverse", "batches": make_batches(), "truncate": None, **kwargs}
    with pytest.raises(ValueError, match=match):
        hypergradient(
            args["method"],
            problem,
            params,
            state,
            buffers,
            args["batches"],
            Objective.train_mean(),
            truncate=args["truncate"],
        )


def test_example_weights_need_indices() -> None:
    model = tiny_mlp()
    problem, params, state, buffers = setup(
        model,
        "sgd",
        [{"name": "example_weight", "init": 1.0, "granularity": "per_example"}],
        num_examples=24,
    )
    batches = [(x, y) for x, y, _ in make_batches()]
    with pytest.raises(ValueError, match="example_indices"):
        hypergradient("reverse", problem, params, state, buffers, batches, Objective.train_mean())


def test_objective_without_dependence_gives_zero_hypergradient() -> None:
    """train_mean over one step: the step's loss is taken before the hypers act."""
    model = tiny_mlp()
    problem, params, state, buffers = setup(model, "sgd", [{"name": "lr", "init": 0.1}])
    for method in ("greedy", "checkpointed", "forward"):
        result = hypergradient(
            method, problem, params, state, buffers, make_batches(1), Objective.train_mean()
        )
        assert torch.equal(result.grads["lr"], torch.zeros(()).to(DT)), method
