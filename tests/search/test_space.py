"""Search spaces from config: parsing, define-by-run suggestion, conditional and per-layer
parameters, grids, and one clear error per bad entry."""

from __future__ import annotations

import optuna
import pytest

from gradhpo.config import ConfigError
from gradhpo.search.space import SearchSpace

SPACE = {
    "model.depth": {"type": "int", "low": 1, "high": 3},
    "model.width": {"type": "int", "low": 4, "high": 32, "log": True, "per_layer": "model.depth"},
    "model.norm": {"type": "categorical", "choices": ["batch", "none"]},
    "model.dropout": {"type": "float", "low": 0.0, "high": 0.5, "when": {"model.norm": "none"}},
    "optimizer.lr": {"type": "float", "low": 1e-3, "high": 1.0, "log": True},
    "training.batch_size": {"type": "categorical", "choices": [16, 32]},
}


def test_suggest_is_define_by_run_with_conditions_and_layers() -> None:
    space = SearchSpace.from_config(SPACE)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen_depths, seen_dropout = set(), {True: 0, False: 0}
    for _ in range(40):
        trial = study.ask()
        params = space.suggest(trial)
        depth = params["model.depth"]
        seen_depths.add(depth)
        assert len(params["model.width"]) == depth
        assert all(4 <= w <= 32 for w in params["model.width"])
        # Optuna sees one parameter per existing layer and none beyond the depth.
        assert {k for k in trial.params if k.startswith("model.width.")} == {
            f"model.width.{i}" for i in range(depth)
        }
        has_dropout = "model.dropout" in params
        assert has_dropout == (params["model.norm"] == "none")
        seen_dropout[has_dropout] += 1
        study.tell(trial, 0.0)
    assert seen_depths == {1, 2, 3} and min(seen_dropout.values()) > 0


def test_apply_writes_into_the_sections_of_the_run_config() -> None:
    base = {
        "model": {"name": "cnn", "depth": 2},
        "optimizer": {"name": "sgd"},
        "training": {"batch_size": 64, "seed": 3},
    }
    out = SearchSpace.apply(
        base, {"model.depth": 3, "model.width": [4, 8, 16], "training.batch_size": 16}
    )
    assert out["model"] == {"name": "cnn", "depth": 3, "width": [4, 8, 16]}
    assert out["training"] == {"batch_size": 16, "seed": 3}
    assert base["training"]["batch_size"] == 64  # a copy: the base is untouched
    assert base["model"] == {"name": "cnn", "depth": 2}  # not modified


def test_grid_enumerates_ints_choices_and_float_grids() -> None:
    space = SearchSpace.from_config(
        {
            "model.depth": {"type": "int", "low": 1, "high": 2},
            "model.width": {
                "type": "int",
                "low": 4,
                "high": 8,
                "step": 4,
                "per_layer": "model.depth",
            },
            "optimizer.lr": {"type": "float", "low": 0.01, "high": 0.1, "grid": [0.01, 0.1]},
        }
    )
    assert space.grid() == {
        "model.depth": [1, 2],
        "model.width.0": [4, 8],
        "model.width.1": [4, 8],
        "optimizer.lr": [0.01, 0.1],
    }
    no_grid = SearchSpace.from_config({"optimizer.lr": {"type": "float", "low": 0.1, "high": 1}})
    with pytest.raises(ConfigError, match=r"search.space.optimizer.lr: the grid sampler needs"):
        no_grid.grid()


def test_corner_points_cover_every_choice_and_bound() -> None:
    space = SearchSpace.from_config(SPACE)
    points = dict(space.corner_params())
    assert points["base point"]["model.depth"] == 1
    assert points["search.space.model.depth=3"]["model.width"] == [4, 4, 4]
    assert points["search.space.model.norm='none'"]["model.dropout"] == 0.0
    assert "model.dropout" not in points["base point"]  # inactive when norm is batch


BAD = [
    ({"model.depth": 3}, r"search.space.model.depth: expected a mapping"),
    (
        {"model.depth": {"type": "integer", "low": 1, "high": 2}},
        r"model.depth.type: expected one of",
    ),
    (
        {"model.depth": {"type": "int", "low": 1, "high": 2, "color": 1}},
        r"unknown key\(s\) \['color'\]",
    ),
    (
        {"model.norm": {"type": "categorical", "choices": []}},
        r"model.norm.choices: expected at least one choice, got \[\]",
    ),
    (
        {"model.norm": {"type": "categorical", "choices": "batch"}},
        r"model.norm.choices: expected a list, got 'batch'",
    ),
    ({"model.norm": {"type": "categorical", "choices": [[1]]}}, r"each choice must be"),
    ({"model.norm": {"type": "categorical", "choices": ["a", "a"]}}, r"duplicate choices"),
    (
        {"model.depth": {"type": "int", "low": 4, "high": 2}},
        r"model.depth: low must be <= high, got low=4 > high=2",
    ),
    (
        {"optimizer.lr": {"type": "float", "low": 0.0, "high": 1.0, "log": True}},
        r"optimizer.lr.low: a log-scale range needs low > 0, got 0.0",
    ),
    (
        {"optimizer.lr": {"type": "float", "low": -1.0, "high": 1.0, "log": True}},
        r"needs low > 0, got -1.0",
    ),
    (
        {"optimizer.lr": {"type": "float", "low": "a", "high": 1.0}},
        r"optimizer.lr.low: expected a finite number, got 'a'",
    ),
    ({"optimizer.lr": {"type": "float", "high": 1.0}}, r"optimizer.lr.low is required"),
    (
        {"model.depth": {"type": "int", "low": 1.5, "high": 3}},
        r"model.depth.low: expected an integer, got 1.5",
    ),
    (
        {"optimizer.lr": {"type": "float", "low": 0.1, "high": 1, "log": True, "step": 0.1}},
        r"cannot be combined with log",
    ),
    (
        {"optimizer.lr": {"type": "float", "low": 0.1, "high": 1, "step": -0.1}},
        r"step: expected a positive number, got -0.1",
    ),
    (
        {"optimizer.lr": {"type": "float", "low": 0.1, "high": 1, "log": "yes"}},
        r"optimizer.lr.log: expected true or false, got 'yes'",
    ),
    (
        {"optimizer.lr": {"type": "float", "low": 0.1, "high": 1, "grid": [5.0]}},
        r"grid: values \[5.0\] lie outside",
    ),
    (
        {"model.depth": {"type": "int", "low": 1, "high": 3, "choices": [1]}},
        r"choices: only for type categorical",
    ),
    (
        {"model.norm": {"type": "categorical", "choices": ["a"], "low": 1}},
        r"model.norm.low: not allowed",
    ),
    ({"data.seed": {"type": "int", "low": 0, "high": 3}}, r"section 'data' cannot be searched"),
    (
        {"training.epochs": {"type": "int", "low": 1, "high": 3}},
        r"training.epochs cannot be searched",
    ),
    ({"depth": {"type": "int", "low": 1, "high": 3}}, r"expected a path '<section>.<key>'"),
    (
        {"model.width": {"type": "int", "low": 4, "high": 8, "per_layer": "model.depth"}},
        r"model.width.per_layer: expected an int parameter defined above this one, got 'model.depth'",
    ),
    (
        {
            "model.dropout": {"type": "float", "low": 0, "high": 1, "when": {"model.norm": "none"}},
            "model.norm": {"type": "categorical", "choices": ["none"]},
        },
        r"model.dropout.when: 'model.norm' is not a parameter defined above",
    ),
    ([1, 2], r"search.space: expected a mapping of parameters"),
]


@pytest.mark.parametrize(("space", "message"), BAD)
def test_bad_space_names_field_and_value(space, message) -> None:
    with pytest.raises(ConfigError, match=message):
        SearchSpace.from_config(space)
