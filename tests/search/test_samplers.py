"""Samplers and pruners by name, argument checking, and the sampler state that survives a
restart (optuna issue #3255)."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest

from gradhpo.config import ConfigError
from gradhpo.search import (
    SAMPLERS,
    SearchSpace,
    create_study,
    load_study,
    make_pruner,
    make_sampler,
)
from gradhpo.search.samplers import restore_sampler_rng_states, sampler_rng_states

optuna.logging.set_verbosity(optuna.logging.WARNING)

SPACE = SearchSpace.from_config(
    {
        "model.depth": {"type": "int", "low": 1, "high": 3},
        "model.pooling": {"type": "categorical", "choices": ["max", "avg"]},
        "optimizer.lr": {
            "type": "float",
            "low": 0.01,
            "high": 1.0,
            "log": True,
            "grid": [0.01, 0.1],
        },
    }
)


def toy(trial: optuna.trial.Trial) -> float:
    p = SPACE.suggest(trial)
    return (
        (p["model.depth"] - 2) ** 2 + (p["model.pooling"] == "avg") + abs(p["optimizer.lr"] - 0.1)
    )


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_every_sampler_by_name_runs_a_study(tmp_path: Path, name: str) -> None:
    study = create_study(
        tmp_path / name, sampler=name, pruner=None, direction="minimize", search_space=SPACE
    )
    assert type(study.sampler) is SAMPLERS[name]
    if name == "bruteforce":  # needs a finite space: no continuous parameter
        study.optimize(lambda t: t.suggest_int("model.depth", 1, 3) + 0.0, n_trials=6)
        assert sorted(t.params["model.depth"] for t in study.finished_trials()) == [1, 2, 3]
        return
    study.optimize(toy, n_trials=6)
    done = study.finished_trials()
    assert len(done) == 6 and all(t.state.name == "COMPLETE" for t in done)
    for t in done:
        assert 1 <= t.params["model.depth"] <= 3 and 0.01 <= t.params["optimizer.lr"] <= 1.0
    if name == "grid":  # 3 x 2 x 2 = 12 points; no point twice
        keys = {tuple(sorted(t.params.items())) for t in done}
        assert len(keys) == 6


def test_sampler_arguments_are_checked() -> None:
    assert make_sampler({"name": "tpe", "n_startup_trials": 3}, seed=1)._n_startup_trials == 3
    with pytest.raises(ConfigError, match=r"search.sampler.name: unknown sampler 'bayes'"):
        make_sampler("bayes")
    with pytest.raises(
        ConfigError, match=r"search.sampler: unknown key\(s\) \['n_startup'\] for TPESampler"
    ):
        make_sampler({"name": "tpe", "n_startup": 3})
    with pytest.raises(ConfigError, match=r"search.sampler: expected a name or a mapping"):
        make_sampler(3)
    with pytest.raises(ConfigError, match=r"population_size"):
        make_sampler({"name": "evolution", "population_size": 1})
    obj = optuna.samplers.RandomSampler(seed=3)
    assert make_sampler(obj) is obj  # any Optuna sampler object is accepted


@pytest.mark.parametrize(
    "spec",
    [
        "none",
        "median",
        {"name": "percentile", "percentile": 25.0},
        "sha",
        "asha",
        "hyperband",
        {"name": "threshold", "lower": 0.5},
        {"name": "patient", "patience": 2, "wrapped": "median"},
    ],
)
def test_every_pruner_by_name(spec) -> None:
    name = spec if isinstance(spec, str) else spec["name"]
    pruner = make_pruner(spec, max_resource=5)
    expected = {
        "none": "NopPruner",
        "median": "MedianPruner",
        "percentile": "PercentilePruner",
        "sha": "SuccessiveHalvingPruner",
        "asha": "SuccessiveHalvingPruner",
        "hyperband": "HyperbandPruner",
        "threshold": "ThresholdPruner",
        "patient": "PatientPruner",
    }
    assert type(pruner).__name__ == expected[name]


def test_pruner_errors_and_hyperband_resource() -> None:
    assert make_pruner("hyperband", max_resource=7)._max_resource == 7
    with pytest.raises(ConfigError, match=r"search.pruner.name: unknown pruner 'early'"):
        make_pruner("early")
    with pytest.raises(
        ConfigError, match=r"search.pruner: unknown key\(s\) \['warmup'\] for MedianPruner"
    ):
        make_pruner({"name": "median", "warmup": 2})
    with pytest.raises(ConfigError, match=r"search.pruner: PercentilePruner"):
        make_pruner({"name": "percentile", "percentile": 250.0})


def test_median_pruner_stops_a_clearly_worse_trial(tmp_path: Path) -> None:
    study = create_study(
        tmp_path / "s", sampler="random", pruner={"name": "median", "n_startup_trials": 2}
    )
    pruned_at = []

    def objective(trial):
        good = trial.number < 2
        for epoch in range(1, 6):
            value = 0.9 if good else 0.1
            trial.report(value, epoch)
            if trial.should_prune():
                pruned_at.append(epoch)
                raise optuna.TrialPruned()
        return value

    study.optimize(objective, n_trials=3)
    states = [t.state.name for t in study.optuna.trials]
    assert states == ["COMPLETE", "COMPLETE", "PRUNED"] and pruned_at == [1]


def test_rng_state_round_trip_reproduces_the_next_proposal() -> None:
    sampler = make_sampler("tpe", seed=5)
    study = optuna.create_study(sampler=sampler)
    study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=3)
    saved = sampler_rng_states(sampler)
    first = study.sampler.sample_independent(
        study, study.ask(), "x", optuna.distributions.FloatDistribution(0, 1)
    )
    restore_sampler_rng_states(sampler, saved)
    again = study.sampler.sample_independent(
        study, study.ask(), "x", optuna.distributions.FloatDistribution(0, 1)
    )
    assert first == again
    with pytest.raises(ValueError, match="does not fit this sampler"):
        restore_sampler_rng_states(make_sampler("random", seed=0), saved)


def _params(study) -> list[dict]:
    return [t.params for t in sorted(study.finished_trials(), key=lambda t: t.number)]


@pytest.mark.parametrize("name", ["random", "tpe", "evolution", "cmaes", "nsga2", "qmc"])
def test_resumed_study_continues_the_sampler_sequence(tmp_path: Path, name: str) -> None:
    spec = {"name": name, "n_startup_trials": 3} if name == "tpe" else name
    if name == "evolution":
        spec = {"name": "evolution", "population_size": 3, "sample_size": 2}
    whole = create_study(
        tmp_path / "whole", sampler=spec, pruner=None, seed=11, direction="minimize"
    )
    whole.optimize(toy, n_trials=8)

    part = create_study(tmp_path / "part", sampler=spec, pruner=None, seed=11, direction="minimize")
    part.optimize(toy, n_trials=4)
    del part
    resumed = load_study(tmp_path / "part")  # a new sampler from study.json + its saved state
    resumed.optimize(toy, n_trials=8)
    assert _params(resumed) == _params(whole)


def test_a_study_directory_of_an_older_version_resumes_from_its_json_state(
    tmp_path: Path,
) -> None:
    """Study directories written before sampler_state.bin keep their state in
    sampler_state.json: a resume continues the sampler's sequence from it, and the first
    state written replaces it (one state file in the directory, never two that disagree)."""
    from gradhpo.files import read_slot_file

    whole = create_study(tmp_path / "whole", sampler="tpe", pruner=None, seed=11)
    whole.optimize(toy, n_trials=8)
    part = create_study(tmp_path / "part", sampler="tpe", pruner=None, seed=11)
    part.optimize(toy, n_trials=4)
    del part
    current = tmp_path / "part" / "sampler_state.bin"
    (tmp_path / "part" / "sampler_state.json").write_bytes(read_slot_file(current))
    current.unlink()
    resumed = load_study(tmp_path / "part")
    resumed.optimize(toy, n_trials=8)
    assert _params(resumed) == _params(whole)
    names = {p.name for p in (tmp_path / "part").iterdir()}
    assert "sampler_state.bin" in names and "sampler_state.json" not in names


def test_a_torn_last_state_resumes_from_the_state_before(tmp_path: Path) -> None:
    """A driver killed while writing the state after trial 3's draw leaves that slot torn:
    the resume restores the state after trial 2 and knows it (its trial number), so trial 3,
    which died without finishing here, is drawn again and the sequence is the uninterrupted
    one."""
    import gc

    whole = create_study(tmp_path / "whole", sampler="random", pruner=None, seed=11)
    whole.optimize(toy, n_trials=6)
    part = create_study(tmp_path / "part", sampler="random", pruner=None, seed=11)
    part.optimize(toy, n_trials=3)
    trial = part.ask()
    toy(trial)
    part.heartbeat(trial)  # saves the state after trial 3's draw in the other slot
    path = tmp_path / "part" / "sampler_state.bin"
    data = bytearray(path.read_bytes())
    newest = max(
        (0, len(data) // 2),
        key=lambda start: int.from_bytes(data[start + 8 : start + 16], "little"),
    )
    data[newest + 40 : newest + 80] = bytes(40)  # the write stopped part way
    path.write_bytes(bytes(data))
    del part, trial
    gc.collect()
    resumed = load_study(tmp_path / "part")
    assert resumed.recover_stale_trials() == [3]
    resumed.optimize(toy, n_trials=6)
    assert _params(resumed) == _params(whole)


def test_without_the_saved_state_a_restart_repeats_random_points(tmp_path: Path) -> None:
    """The control for the test above: Optuna alone (fresh sampler, same seed) repeats itself."""
    part = create_study(tmp_path / "part", sampler="random", pruner=None, seed=11)
    part.optimize(toy, n_trials=4)
    (tmp_path / "part" / "sampler_state.bin").unlink()
    resumed = load_study(tmp_path / "part")
    resumed.optimize(toy, n_trials=8)
    params = _params(resumed)
    assert params[4:] == params[:4]
