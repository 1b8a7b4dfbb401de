"""PBT members trained as executor tasks (serial, local processes, Ray) give the run that
in-process training gives: same scores, same exploits, same explored values, with the
checkpoints read and written by the tasks in the run directory (``checkpoints="files"``) or
moved as bytes through the executor, the driver alone writing them (``"executor"``)."""

from __future__ import annotations

import copy
import tempfile
from pathlib import Path
from typing import Any

import pytest
import yaml
from helpers import LR, check_references, digits_pbt_config, initial_lrs, run_result, trace
from run_dir_guard import ArgumentAudit, GuardedFactory

from gradhpo.execution import ProcessExecutor, SerialExecutor
from gradhpo.pbt.manager import PopulationBasedTraining
from gradhpo.testing.quartic import QuarticFactory


def _pbt(
    directory: Path,
    exploit: str = "truncation",
    checkpoints: str = "files",
    factory: Any = None,
    mode: str = "sync",
) -> PopulationBasedTraining:
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
        initial_values=initial_lrs(5),
        checkpoints=checkpoints,
        mode=mode,
    )


@pytest.mark.parametrize("exploit", ["truncation", "tournament"])
def test_remote_members_match_in_process_training(tmp_path: Path, exploit: str) -> None:
    local = _pbt(tmp_path / "local", exploit)
    expected = local.run()
    with ProcessExecutor(2, threads_per_worker=1) as procs:
        for name, executor in (("serial", SerialExecutor()), ("procs", procs)):
            for checkpoints in ("files", "executor"):
                remote = _pbt(tmp_path / f"{name}-{checkpoints}", exploit, checkpoints)
                best = remote.run(executor=executor)
                assert trace(remote) == trace(local), (name, checkpoints)
                assert best == expected, (name, checkpoints)
                assert len(remote.db.lineage()) > 0
                check_references(remote.db)
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
    assert trace(remote) == trace(local)
    check_references(remote.db)


@pytest.mark.parametrize(
    "exploit", ["truncation", pytest.param("tournament", marks=pytest.mark.slow)]
)
def test_async_members_on_executors_match_in_process_async(tmp_path: Path, exploit: str) -> None:
    """Async mode with a task per member in flight: on the serial executor (tasks run in
    submission order) and on one worker process (a pool of one runs them in that order too)
    the run is the in-process async run, score for score, exploit for exploit, with either
    checkpoint transport. On two workers the order of finishing is the workers': every
    member still trains every interval once, each score recorded once."""
    local = _pbt(tmp_path / "local", exploit, mode="async")
    expected = local.run()
    scores, lineage = trace(local)
    assert len(scores) == 5 * 12 and lineage
    for checkpoints in ("files", "executor"):
        for name, executor in (
            ("serial", SerialExecutor()),
            ("one", ProcessExecutor(1, threads_per_worker=1)),
        ):
            with executor:
                remote = _pbt(
                    tmp_path / f"{name}-{checkpoints}", exploit, checkpoints, mode="async"
                )
                best = remote.run(executor=executor)
            assert trace(remote) == (scores, lineage), (name, checkpoints)
            assert best == expected, (name, checkpoints)
            check_references(remote.db)
        with ProcessExecutor(2, threads_per_worker=1) as procs:
            remote = _pbt(tmp_path / f"two-{checkpoints}", exploit, checkpoints, mode="async")
            remote.run(executor=procs)
        got = sorted((step, member) for step, member, *_ in trace(remote)[0])
        assert got == sorted((step, member) for step, member, *_ in scores)
        assert [m["step"] for m in remote.db.members()] == [120] * 5
        check_references(remote.db)


def test_async_executor_checkpoints_keep_every_task_out_of_the_run_directory(
    tmp_path: Path,
) -> None:
    """Async mode, ``checkpoints="executor"``: submitted tasks (run one by one through the
    audited executor's ``run``, the base class's ``wait_any``) get no path into the run
    directory and touch nothing there, and the run is the in-process async one."""
    local = _pbt(tmp_path / "local", "tournament", mode="async")
    expected = local.run()
    run_dir = tmp_path / "run"
    factory = GuardedFactory(QuarticFactory(seed=100), run_dir)
    with ArgumentAudit(ProcessExecutor(2, threads_per_worker=1), run_dir) as executor:
        remote = _pbt(run_dir, "tournament", "executor", factory, mode="async")
        best = remote.run(executor=executor)
    assert executor.paths == []
    assert executor.tasks == 5 * 12 + len(remote.db.lineage()) > 5 * 12
    assert best == expected
    assert trace(remote) == trace(local)
    check_references(remote.db)


def test_sweep_repairs_a_pin_left_by_a_killed_step(tmp_path: Path) -> None:
    pbt = _pbt(tmp_path / "p")
    pbt.run(executor=SerialExecutor())
    ck = pbt.db.members()[0]["checkpoint"]
    with pbt.db.transaction():
        pbt.db.acquire(ck)  # a step that pinned a source and then died
    pbt.db.sweep()
    check_references(pbt.db)


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
            assert trace(remote) == trace(local), checkpoints
            # Async: a Ray task per member in flight, finishing in the workers' order.
            expected = [(step, m) for step in range(10, 121, 10) for m in range(5)]
            remote = _pbt(
                tmp_path / f"ray-async-{checkpoints}", checkpoints=checkpoints, mode="async"
            )
            remote.run(executor=executor)
            assert sorted((s, m) for s, m, *_ in trace(remote)[0]) == expected
            assert [m["step"] for m in remote.db.members()] == [120] * 5
            check_references(remote.db)
    finally:
        executor.close()


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
    config = digits_pbt_config("inprocess")
    path = tmp_path / "c.yaml"
    runs = tmp_path / "runs"
    path.write_text(yaml.safe_dump(config))
    assert main(["pbt", str(path), "--out", str(runs), "--no-progress"]) == 0
    expected = run_result(runs / "inprocess")
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
        assert run_result(runs / checkpoints) == expected, checkpoints
