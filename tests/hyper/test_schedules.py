"""Hyperparameter schedules: segment arithmetic, spec errors, hypergradients of every method
against float64 central finite differences on a tiny tanh MLP, and carried forward mode
against reverse mode over the same full horizon."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from gradhpo.hyper.methods import InnerProblem, Objective, hypergradient, inner_step
from gradhpo.hyper.optimizers import STEP_KEY, make_optimizer
from gradhpo.hyper.spec import HyperParameters, HyperSpec, Schedule, parse_specs

DT = torch.float64
K = 6


def tiny_mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).to(DT)


def make_batches(k: int = K, n: int = 5, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(n, 3, generator=g, dtype=DT), torch.randint(0, 3, (n,), generator=g))
        for _ in range(k)
    ]


# ---------------------------------------------------------------------- the arithmetic
def test_constant_segments_split_the_steps_evenly() -> None:
    s = Schedule(3, steps=9)
    assert [s.weights(t)[0][0] for t in range(12)] == [0, 0, 0, 1, 1, 1, 2, 2, 2, 2, 2, 2]
    assert all(w == 1.0 for t in range(12) for _, w in s.weights(t))


def test_linear_knots_interpolate_and_hold_the_last_value() -> None:
    s = Schedule(3, "linear", steps=5)  # knots at steps 0, 2, 4
    assert s.weights(0) == ((0, 1.0),)
    assert s.weights(1) == ((0, 0.5), (1, 0.5))
    assert s.weights(2) == ((1, 1.0),)
    assert s.weights(3) == ((1, 0.5), (2, 0.5))
    assert s.weights(4) == s.weights(10) == ((2, 1.0),)


@pytest.mark.parametrize(
    ("schedule", "match"),
    [
        ({"segments": 0}, r"lr\.schedule\.segments: must be an integer >= 1, got 0"),
        ({"segments": 2.5}, r"lr\.schedule\.segments: must be an integer >= 1, got 2\.5"),
        ({"segments": 11, "steps": 10}, r"lr\.schedule\.segments: 11 segments .* steps=10"),
        (
            {"segments": 3, "interpolation": "cubic"},
            r"lr\.schedule\.interpolation: unknown 'cubic'",
        ),
        ({"segments": 3, "steps": 0}, r"lr\.schedule\.steps: must be an integer >= 1, got 0"),
        ({"segments": 3, "knots": 2}, r"lr\.schedule: unknown key\(s\) \['knots'\]"),
        ({"interpolation": "linear"}, r"lr\.schedule\.segments is required"),
        ("five", r"lr\.schedule: expected a mapping"),
    ],
)
def test_bad_schedule_specs_name_the_value(schedule, match) -> None:
    with pytest.raises((ValueError, TypeError), match=match):
        parse_specs([{"name": "lr", "init": 0.1, "schedule": schedule}])


def test_schedule_needs_scalar_or_per_tensor_granularity() -> None:
    with pytest.raises(ValueError, match=r"lr\.schedule: needs granularity .* 'per_element'"):
        HyperSpec("lr", 0.1, granularity="per_element", schedule={"segments": 2})


def test_schedule_length_comes_from_the_budget_or_fails_clearly() -> None:
    params = {n: p.detach() for n, p in tiny_mlp().named_parameters()}
    with pytest.raises(ValueError, match=r"lr\.schedule\.steps: unknown"):
        HyperParameters([{"name": "lr", "init": 0.1, "schedule": {"segments": 2}}], params)
    with pytest.raises(ValueError, match=r"lr\.schedule\.segments: 4 segments .* steps=3"):
        HyperParameters(
            [{"name": "lr", "init": 0.1, "schedule": {"segments": 4}}], params, budget=3
        )
    hypers = HyperParameters(
        [{"name": "lr", "init": 0.1, "schedule": {"segments": 2}}], params, budget=10
    )
    assert hypers.spec("lr").schedule.steps == 10
    assert hypers.raw["lr"].shape == (2,)
    with pytest.raises(ValueError, match="need the training step"):
        hypers.values()


def test_summary_and_set_values_address_segments() -> None:
    params = {n: p.detach() for n, p in tiny_mlp().named_parameters()}
    hypers = HyperParameters(
        [
            {"name": "lr", "init": 0.1, "schedule": {"segments": 3, "steps": 9}},
            {
                "name": "momentum",
                "init": 0.5,
                "granularity": "per_tensor",
                "schedule": {"segments": 2, "steps": 9},
            },
        ],
        params,
    )
    hypers.set_values({"lr[1]": 0.2, "momentum/0.weight[1]": 0.9})
    summary = hypers.summary()
    assert summary["lr[0]"] == pytest.approx(0.1) and summary["lr[1]"] == pytest.approx(0.2)
    assert summary["momentum/0.weight[1]"] == pytest.approx(0.9)
    assert summary["momentum/0.bias[1]"] == pytest.approx(0.5)
    assert hypers.current(4)["lr"] == pytest.approx(0.2)
    hypers.set_values({"lr": 0.05})  # a name without index sets every segment
    assert all(hypers.summary()[f"lr[{i}]"] == pytest.approx(0.05) for i in range(3))
    with pytest.raises(KeyError, match=r"lr has no segment 3"):
        hypers.set_values({"lr[3]": 0.1})


# ---------------------------------------------------------------------- hypergradients
CASES = [
    ("sgd", [{"name": "lr", "init": 0.3, "schedule": {"segments": 3}}]),
    ("sgd", [{"name": "lr", "init": 0.3, "schedule": {"segments": 3, "interpolation": "linear"}}]),
    (
        "momentum",
        [
            {"name": "lr", "init": 0.2, "schedule": {"segments": 2, "interpolation": "linear"}},
            {
                "name": "momentum",
                "init": 0.7,
                "granularity": "per_tensor",
                "schedule": {"segments": 2},
            },
        ],
    ),
    (
        "adamw",
        [
            {"name": "lr", "init": 0.05, "schedule": {"segments": 4}},
            {"name": "weight_decay", "init": 0.1, "schedule": {"segments": 2}},
        ],
    ),
]
START = 2  # the unroll starts at training step 2 of a schedule over 10 steps


def setup(optimizer: str, specs: list[dict]):
    model = tiny_mlp()
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    specs = [{**s, "schedule": {**s["schedule"], "steps": START + K + 2}} for s in specs]
    hypers = HyperParameters(specs, params)
    with torch.no_grad():  # distinct segment values, so a wrong segment shows
        for leaf in hypers.raw.values():
            leaf.add_(
                0.1 * torch.arange(leaf.shape[0], dtype=DT).reshape(-1, *[1] * (leaf.dim() - 1))
            )
    opt = make_optimizer(optimizer)
    state = opt.init(params)
    state[STEP_KEY] = state[STEP_KEY] + START
    return InnerProblem(model, opt, hypers), params, state


def objective_value(problem, params, state, batches, objective) -> torch.Tensor:
    with torch.no_grad():
        losses = []
        for k, batch in enumerate(batches):
            params, state, _, loss = inner_step(
                problem, params, state, {}, problem.hypers.raw, batch, step=START + k
            )
            losses.append(loss)
        return objective.final(params, {}) + objective.train_weight * torch.stack(losses).mean()


def finite_differences(problem, params, state, batches, objective, h=1e-6) -> dict:
    fd = {}
    for key, leaf in problem.hypers.raw.items():
        grad = torch.zeros_like(leaf)
        for i in range(leaf.numel()):
            out = []
            for sign in (1.0, -1.0):
                with torch.no_grad():
                    leaf.view(-1)[i] += sign * h
                out.append(objective_value(problem, params, state, batches, objective))
                with torch.no_grad():
                    leaf.view(-1)[i] -= sign * h
            grad.view(-1)[i] = (out[0] - out[1]) / (2 * h)
        fd[key] = grad
    return fd


def assert_close(got: dict, want: dict, rtol: float = 1e-6) -> None:
    assert got.keys() == want.keys()
    for key in want:
        scale = want[key].abs().max().clamp_min(1e-10)
        err = float((got[key] - want[key]).abs().max() / scale)
        assert err < rtol, f"{key}: relative error {err:.2e}: got {got[key]}, want {want[key]}"


@pytest.mark.parametrize("method", ["reverse", "checkpointed", "forward"])
@pytest.mark.parametrize(("optimizer", "specs"), CASES)
def test_schedule_hypergradients_match_finite_differences(method, optimizer, specs) -> None:
    problem, params, state = setup(optimizer, specs)
    batches = make_batches()
    val = make_batches(1, n=8, seed=9)[0]
    objective = Objective.validation(problem.model, *val)
    objective = Objective(final=objective.final, train_weight=0.5)
    result = hypergradient(method, problem, params, state, {}, batches, objective)
    fd = finite_differences(problem, params, state, batches, objective)
    assert_close(result.grads, fd)
    if method == "checkpointed":  # segments that span schedule positions
        kwargs = {"checkpoint_every": 3}
        segmented = hypergradient(method, problem, params, state, {}, batches, objective, **kwargs)
        assert_close(segmented.grads, fd)
    # Segments that no step of the unroll reads get exactly zero.
    lr_schedule = problem.hypers.spec("lr").schedule
    read = {i for k in range(K) for i, _ in lr_schedule.weights(START + k)}
    for i in set(range(lr_schedule.segments)) - read:
        assert float(result.grads["lr"][i]) == 0.0


@pytest.mark.parametrize(
    "specs",
    [
        [{"name": "lr", "init": 0.3, "schedule": {"segments": 3, "interpolation": "linear"}}],
        [
            {"name": "lr", "init": 0.2, "schedule": {"segments": 2}},
            {"name": "momentum", "init": 0.6, "schedule": {"segments": 3}},
        ],
    ],
)
def test_carried_forward_mode_equals_reverse_over_the_whole_horizon(specs) -> None:
    problem, params, state = setup("momentum", specs)
    batches = make_batches()
    val = make_batches(1, n=8, seed=9)[0]
    objective = Objective.validation(problem.model, *val)
    full = hypergradient("reverse", problem, params, state, {}, batches, objective)
    # The same horizon in three pieces of 2 steps, the tangents carried between them.
    tangents, p, s = None, params, state
    for piece in (batches[:2], batches[2:4], batches[4:]):
        part = hypergradient(
            "forward", problem, p, s, {}, piece, objective, tangents=tangents, chunk=2
        )
        tangents, p, s = part.tangents, part.params, part.state
    assert_close(part.grads, full.grads, rtol=1e-9)
    for name in full.params:
        torch.testing.assert_close(part.params[name], full.params[name], rtol=0, atol=1e-12)


def test_carried_tangents_are_checked() -> None:
    problem, params, state = setup("sgd", CASES[0][1])
    batches = make_batches(2)
    objective = Objective.validation(problem.model, *make_batches(1, seed=9)[0])
    result = hypergradient("forward", problem, params, state, {}, batches, objective)
    bad = dict(result.tangents)
    bad["params/0.weight"] = bad["params/0.weight"][:1]
    with pytest.raises(ValueError, match=r"tangents\['params/0.weight'\]: shape"):
        hypergradient("forward", problem, params, state, {}, batches, objective, tangents=bad)
    with pytest.raises(ValueError, match="only forward mode carries tangents"):
        hypergradient(
            "reverse", problem, params, state, {}, batches, objective, tangents=result.tangents
        )
    with pytest.raises(ValueError, match="compile: scheduled hyperparameters"):
        hypergradient("forward", problem, params, state, {}, batches, objective, compile=True)


# ---------------------------------------------------------------------- in the tuner and a run
def test_tuner_carry_equals_reverse_over_the_run_while_hypers_stand_still() -> None:
    """HyperTuner(carry=True): the third horizon's hypergradient is reverse mode's over all
    six steps (an outer step too small to move the hypers keeps them fixed)."""
    from gradhpo.hyper.tuner import HyperTuner

    batches = make_batches()
    val = make_batches(1, n=8, seed=9)[0]
    specs = [{"name": "lr", "init": 0.3, "schedule": {"segments": 3}}]
    tuner = HyperTuner(
        tiny_mlp(),
        specs,
        method="forward",
        horizon=2,
        carry=True,
        budget=K,
        hyper_optimizer="sgd",
        hyper_lr=1e-300,
    )
    model = tiny_mlp()
    problem = InnerProblem(
        model,
        make_optimizer("sgd"),
        HyperParameters(specs, dict(model.named_parameters()), budget=K),
    )
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    full = hypergradient(
        "reverse",
        problem,
        params,
        problem.optimizer.init(params),
        {},
        batches,
        Objective.validation(model, *val),
    )
    for i in range(3):
        report = tuner.step(batches[2 * i : 2 * i + 2], val)
    want = float(torch.linalg.vector_norm(full.grads["lr"]))
    assert report.hypergrad_norm == pytest.approx(want, rel=1e-9)
    # Without carrying, the last horizon alone sees only its own segment.
    fresh = HyperTuner(
        tiny_mlp(),
        specs,
        method="forward",
        horizon=2,
        budget=K,
        hyper_optimizer="sgd",
        hyper_lr=1e-300,
    )
    for i in range(3):
        short = fresh.step(batches[2 * i : 2 * i + 2], val)
    assert short.hypergrad_norm != pytest.approx(want, rel=1e-3)


def test_tuner_carry_options_are_checked() -> None:
    from gradhpo.hyper.tuner import HyperTuner

    specs = [{"name": "lr", "init": 0.3}]
    with pytest.raises(
        ValueError, match="carry: only forward mode carries tangents, got method 'reverse'"
    ):
        HyperTuner(tiny_mlp(), specs, method="reverse", carry=True)
    with pytest.raises(ValueError, match="carry: .* every=2"):
        HyperTuner(tiny_mlp(), specs, method="forward", carry=True, every=2)
    with pytest.raises(ValueError, match=r"carry_decay must be a number in \(0, 1\], got 0"):
        HyperTuner(tiny_mlp(), specs, method="forward", carry=True, carry_decay=0)


def run_config(method: str = "forward", carry: bool = True) -> dict:
    return {
        "data": {"name": "synthetic", "seed": 0},
        "model": {"name": "mlp", "depth": 1, "width": 8},
        "optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.9},
        "tuner": {
            "hypers": [
                {"name": "lr", "schedule": {"segments": 4, "interpolation": "linear"}},
                {"name": "momentum", "schedule": {"segments": 2}},
            ],
            "method": method,
            "horizon": 3,
            "carry": carry,
            "carry_decay": 0.9,
            "hyper_lr": 0.1,
        },
        "training": {"epochs": 2, "batch_size": 32, "seed": 1, "device": "cpu"},
    }


def test_scheduled_run_resumes_bit_identically(tmp_path) -> None:
    from gradhpo.run import TrainingRun

    uninterrupted = TrainingRun.from_config(run_config())
    budget = 2 * uninterrupted.steps_per_epoch
    assert uninterrupted.tuner.hypers.spec("lr").schedule.steps == budget
    uninterrupted.step(7)
    uninterrupted.step(8)
    first = TrainingRun.from_config(run_config())
    first.step(7)
    path = first.save(tmp_path / "run.pt")
    first.step(4)
    resumed = TrainingRun.from_checkpoint(path)
    assert resumed.tuner.tangents is not None
    resumed.step(8)
    for name, value in uninterrupted.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[name]), name
    assert uninterrupted.hyperparameters == resumed.hyperparameters
    values = resumed.hyperparameters
    assert {f"lr[{i}]" for i in range(4)} | {"momentum[0]", "momentum[1]"} <= set(values)
    # The first segments moved, the schedule is no longer flat.
    assert values["lr[0]"] != pytest.approx(0.05, rel=1e-6)


def test_schedule_errors_in_a_run_config_name_the_value() -> None:
    from gradhpo.run import TrainingRun

    config = run_config()
    config["tuner"]["hypers"][0]["schedule"] = {"segments": 0}
    with pytest.raises(ValueError, match=r"lr\.schedule\.segments: must be an integer >= 1, got 0"):
        TrainingRun.from_config(config)
    config = run_config()
    config["training"]["epochs"] = 1
    config["tuner"]["hypers"][0]["schedule"] = {"segments": 10_000}
    with pytest.raises(ValueError, match=r"lr\.schedule\.segments: 10000 segments .* steps="):
        TrainingRun.from_config(config)


@pytest.mark.parametrize("warm", [True, False])
def test_a_newly_reached_segment_starts_from_the_one_before(warm) -> None:
    from gradhpo.hyper.tuner import HyperTuner

    batches, val = make_batches(), make_batches(1, n=8, seed=9)[0]
    specs = [{"name": "lr", "init": 0.3, "schedule": {"segments": 3}}]

    def tuner_at(state=None):
        t = HyperTuner(
            tiny_mlp(),
            specs,
            method="reverse",
            horizon=2,
            budget=K,
            hyper_lr=0.2,
            every=2,
            warm_segments=warm,
        )
        if state is not None:
            t.load_state_dict(state)
        return t

    tuner = tuner_at()
    tuner.step(batches[:2], val)  # steps 0-1: segment 0 tuned, 1 and 2 untouched
    moved = tuner.hypers.summary()["lr[0]"]
    assert moved != pytest.approx(0.3) and tuner.hypers.summary()["lr[1]"] == pytest.approx(0.3)
    state = tuner.state_dict()
    tuner.step(batches[2:4], val)  # steps 2-3, a plain horizon: segment 1 reached, not tuned
    assert tuner.segments_reached == {"lr": 1}
    want = moved if warm else 0.3
    assert tuner.hypers.summary()["lr[1]"] == pytest.approx(want, rel=1e-12)
    assert tuner.hypers.summary()["lr[2]"] == pytest.approx(0.3)
    # The reached segments are part of the state: a resumed tuner does not warm twice.
    resumed = tuner_at(state)
    assert resumed.segments_reached == {"lr": 0}
    assert tuner_at(tuner.state_dict()).segments_reached == {"lr": 1}


def test_segment_keys_split_one_way_for_the_tuner_and_the_report() -> None:
    from gradhpo.hyper.spec import split_segment_key

    assert split_segment_key("lr[3]") == ("lr", 3)
    assert split_segment_key("lr/0.weight[12]") == ("lr/0.weight", 12)
    assert split_segment_key("lr/0.weight") == ("lr/0.weight", None)
    assert split_segment_key("lr[x]") == (None, None)
