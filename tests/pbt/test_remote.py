"""PBT members trained as executor tasks (serial, local processes, Ray) give the run that
in-process training gives: same scores, same exploits, same explored values."""

from __future__ import annotations

import copy
import math
import tempfile
from pathlib import Path

import numpy as np
import pytest
import yaml

from gradhpo.execution import ProcessExecutor, SerialExecutor
from gradhpo.pbt.manager import PopulationBasedTraining
from gradhpo.pbt.store import PBTDatabase
from gradhpo.search.space import SearchSpace
from gradhpo.testing.quartic import QuarticFactory

LR = SearchSpace.from_config(
    {"optimizer.lr": {"type": "float", "low": 1e-4, "high": 10.0, "log": True}}
)


def _pbt(directory: Path, exploit: str = "truncation") -> PopulationBasedTraining:
    lrs = np.exp(np.random.RandomState(0).uniform(math.log(1e-4), math.log(0.05), 5))
    return PopulationBasedTraining(
        QuarticFactory(seed=100),
        LR.parameters,
        directory,
        population=5,
        interval=10,
        total_steps=120,
        seed=2,
        exploit=exploit,
        fraction=0.4,
        resample_probability=0.0,
        initial_values=[{"optimizer.lr": float(x)} for x in lrs],
    )


def _trace(pbt: PopulationBasedTraining) -> tuple[list, list]:
    scores = [(s["step"], s["member"], s["score"], s["values"]) for s in pbt.db.scores()]
    lineage = [(e["step"], e["member"], e["source"], e["new"]) for e in pbt.db.lineage()]
    return scores, lineage


def _references_consistent(db: PBTDatabase) -> None:
    pointing: dict[int, int] = {}
    for m in db.members():
        pointing[m["checkpoint"]] = pointing.get(m["checkpoint"], 0) + 1
    assert db.refcounts() == pointing
    assert {p.name for p in db.checkpoint_dir.iterdir()} == {
        db.checkpoint_path(c).name for c in pointing
    }


@pytest.mark.parametrize("exploit", ["truncation", "tournament"])
def test_remote_members_match_in_process_training(tmp_path: Path, exploit: str) -> None:
    local = _pbt(tmp_path / "local", exploit)
    expected = local.run()
    for name, executor in (
        ("serial", SerialExecutor()),
        ("procs", ProcessExecutor(2, threads_per_worker=1)),
    ):
        remote = _pbt(tmp_path / name, exploit)
        best = remote.run(executor=executor)
        assert _trace(remote) == _trace(local), name
        assert best["member"] == expected["member"] and best["score"] == expected["score"]
        assert len(remote.db.lineage()) > 0
        _references_consistent(remote.db)
        rebuilt = remote.build_member(best["member"])
        assert rebuilt.score() == expected["score"]


def test_sweep_repairs_a_pin_left_by_a_killed_step(tmp_path: Path) -> None:
    pbt = _pbt(tmp_path / "p")
    pbt.run(executor=SerialExecutor())
    ck = pbt.db.members()[0]["checkpoint"]
    with pbt.db.transaction():
        pbt.db.acquire(ck)  # a step that pinned a source and then died
    pbt.db.sweep()
    _references_consistent(pbt.db)


@pytest.mark.slow
def test_ray_members_match_in_process_training(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    pytest.importorskip("ray")
    from gradhpo.execution import RayExecutor

    local = _pbt(tmp_path / "local", "tournament")
    local.run()
    executor = RayExecutor(2, num_cpus=2, temp_dir=tempfile.mkdtemp(prefix="rp", dir="/tmp"))
    try:
        remote = _pbt(tmp_path / "ray", "tournament")
        remote.run(executor=executor)
    finally:
        executor.close()
    assert _trace(remote) == _trace(local)


@pytest.mark.slow
def test_cli_pbt_on_processes(tmp_path: Path, monkeypatch, capsys) -> None:
    from gradhpo.cli import main

    monkeypatch.chdir(tmp_path)
    config = {
        "name": "procpop",
        "data": {"name": "digits", "seed": 0},
        "model": {"name": "cnn", "depth": 1, "width": 4, "norm": "none"},
        "optimizer": {"name": "sgd", "lr": 0.1, "momentum": 0.9},
        "training": {"epochs": 1, "batch_size": 64, "device": "cpu", "seed": 0},
        "pbt": {
            "population": 3,
            "interval": 5,
            "steps": 15,
            "space": {"optimizer.lr": {"type": "float", "low": 0.01, "high": 0.5, "log": True}},
            "fraction": 0.34,
            "executor": {"name": "processes", "workers": 2, "threads_per_worker": 1},
        },
    }
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["pbt", str(path), "--out", str(tmp_path / "runs"), "--no-progress"]) == 0
    assert "procpop: best member" in capsys.readouterr().out
    serial = copy.deepcopy(config)
    serial["name"] = "serialpop"
    del serial["pbt"]["executor"]
    path.write_text(yaml.safe_dump(serial))
    assert main(["pbt", str(path), "--out", str(tmp_path / "runs"), "--no-progress"]) == 0
    a, b = PBTDatabase(tmp_path / "runs" / "procpop"), PBTDatabase(tmp_path / "runs" / "serialpop")
    assert [(s["member"], s["score"]) for s in a.scores()] == [
        (s["member"], s["score"]) for s in b.scores()
    ]
    assert [(e["member"], e["source"]) for e in a.lineage()] == [
        (e["member"], e["source"]) for e in b.lineage()
    ]
