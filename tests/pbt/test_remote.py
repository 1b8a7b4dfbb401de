"""PBT members trained as executor tasks (serial, local processes, Ray) give the run that
in-process training gives: same scores, same exploits, same explored values, with the
checkpoints read and written by the tasks in the run directory (``checkpoints="files"``) or
moved as bytes through the executor, the driver alone writing them (``"executor"``)."""

from __future__ import annotations

import copy
import math
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from run_dir_guard import ArgumentAudit, GuardedFactory

from gradhpo.execution import ProcessExecutor, SerialExecutor
from gradhpo.pbt.manager import PopulationBasedTraining
from gradhpo.pbt.store import PBTDatabase
from gradhpo.search.space import SearchSpace
from gradhpo.testing.quartic import QuarticFactory

LR = SearchSpace.from_config(
    {"optimizer.lr": {"type": "float", "low": 1e-4, "high": 10.0, "log": True}}
)


def _pbt(
    directory: Path, exploit: str = "truncation", checkpoints: str = "files", factory: Any = None
) -> PopulationBasedTraining:
    lrs = np.exp(np.random.RandomState(0).uniform(math.log(1e-4), math.log(0.05), 5))
    return PopulationBasedTraining(
        factory or QuarticFactory(seed=100),
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
        checkpoints=checkpoints,
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
    with ProcessExecutor(2, threads_per_worker=1) as procs:
        for name, executor in (("serial", SerialExecutor()), ("procs", procs)):
            for checkpoints in ("files", "executor"):
                remote = _pbt(tmp_path / f"{name}-{checkpoints}", exploit, checkpoints)
                best = remote.run(executor=executor)
                assert _trace(remote) == _trace(local), (name, checkpoints)
                assert best == expected, (name, checkpoints)
                assert len(remote.db.lineage()) > 0
                _references_consistent(remote.db)
                rebuilt = remote.build_member(best["member"])
                assert rebuilt.score() == expected["score"]


@pytest.mark.parametrize("checkpoints", ["executor", "files"])
def test_executor_checkpoints_keep_every_task_out_of_the_run_directory(
    tmp_path: Path, checkpoints: str
) -> None:
    """Under ``checkpoints="executor"`` no task is given a path into the run directory and no
    worker opens, lists, writes or deletes anything there (an audit hook in each worker
    raises if it does), and the run is the in-process one. The same guard makes the files
    transport fail: its tasks are given paths there and write their checkpoints there."""
    local = _pbt(tmp_path / "local", "tournament")
    expected = local.run()
    run_dir = tmp_path / "run"
    factory = GuardedFactory(QuarticFactory(seed=100), run_dir)
    with ArgumentAudit(ProcessExecutor(2, threads_per_worker=1), run_dir) as executor:
        remote = _pbt(run_dir, "tournament", checkpoints, factory)
        if checkpoints == "files":
            with pytest.raises(PermissionError, match="touched the run directory"):
                remote.run(executor=executor)
            assert executor.paths
            return
        best = remote.run(executor=executor)
    assert executor.paths == []
    assert executor.tasks == 5 * 12 + len(remote.db.lineage())  # every interval, every copy
    assert executor.argument_bytes > 0  # the starting states went as bytes
    assert best == expected
    assert _trace(remote) == _trace(local)
    _references_consistent(remote.db)


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
        for checkpoints in ("files", "executor"):
            remote = _pbt(tmp_path / f"ray-{checkpoints}", "tournament", checkpoints)
            remote.run(executor=executor)
            assert _trace(remote) == _trace(local), checkpoints
    finally:
        executor.close()


def _run_result(run_dir: Path) -> dict[str, Any]:
    """Every score, exploit and member of a finished config-driven run, and its best member."""
    db = PBTDatabase(run_dir)
    try:
        best = dict(db.get_meta("best"))
        best.pop("resumed")
        return {
            "scores": [(s["step"], s["member"], s["score"], s["values"]) for s in db.scores()],
            "lineage": [
                (e["step"], e["member"], e["source"], e["old"], e["new"]) for e in db.lineage()
            ],
            "members": [(m["member"], m["step"], m["values"], m["score"]) for m in db.members()],
            "best": best,
        }
    finally:
        db.close()


@pytest.mark.slow
@pytest.mark.usefixtures("one_thread")  # as in the workers: the same sums, to the last bit
def test_cli_pbt_on_processes(tmp_path: Path, monkeypatch, capsys) -> None:
    """A digits CNN population exploring lr, batch size and dropout on two processes, with
    either checkpoint transport, is the in-process run (scores, exploits, members, the best
    member's test accuracy). A copier whose batch size is explored is built with the values
    it trained with, then given the new ones (it was built with the new batch size and could
    not restore its own batch stream: 'state is for batch_size 32, this iterator has 64')."""
    from gradhpo.cli import main

    monkeypatch.chdir(tmp_path)
    config = {
        "name": "inprocess",
        "data": {"name": "digits", "seed": 0},
        "model": {"name": "cnn", "depth": 1, "width": 4, "norm": "none", "dropout": 0.1},
        "optimizer": {"name": "sgd", "lr": 0.1, "momentum": 0.9},
        "training": {"epochs": 1, "batch_size": 64, "device": "cpu", "seed": 0},
        "pbt": {
            "population": 4,
            "interval": 5,
            "steps": 20,
            "space": {
                "optimizer.lr": {"type": "float", "low": 0.02, "high": 0.3, "log": True},
                "training.batch_size": {"type": "categorical", "choices": [32, 64]},
                "model.dropout": {"type": "float", "low": 0.05, "high": 0.5},
            },
            "fraction": 0.25,
            "seed": 1,
        },
    }
    path = tmp_path / "c.yaml"
    runs = tmp_path / "runs"
    path.write_text(yaml.safe_dump(config))
    assert main(["pbt", str(path), "--out", str(runs), "--no-progress"]) == 0
    expected = _run_result(runs / "inprocess")
    assert any(
        e[3]["training.batch_size"] != e[4]["training.batch_size"] for e in expected["lineage"]
    )
    for checkpoints in ("files", "executor"):
        remote = copy.deepcopy(config)
        remote["name"] = checkpoints
        remote["pbt"]["executor"] = {"name": "processes", "workers": 2, "threads_per_worker": 1}
        remote["pbt"]["checkpoints"] = checkpoints
        path.write_text(yaml.safe_dump(remote))
        assert main(["pbt", str(path), "--out", str(runs), "--no-progress"]) == 0
        assert f"{checkpoints}: best member" in capsys.readouterr().out
        assert _run_result(runs / checkpoints) == expected, checkpoints
