"""A batched population split into groups (``pbt.groups``): each group is one vmapped model
with its own dropout stream, so the run is the same whether the groups train in this process
or as executor tasks (one per group per round), with checkpoints in the run directory or
through the executor; and a batched run with dropout, stopped mid-run and resumed, is the
uninterrupted run (a resume restores each group's dropout stream with its members)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from helpers import digits_pbt_config, run_result

from gradhpo.execution import ProcessExecutor, SerialExecutor
from gradhpo.jobs.pbt import prepare_pbt, run_pbt
from gradhpo.pbt.manager import PopulationBasedTraining, contiguous_groups

pytestmark = pytest.mark.usefixtures("one_thread")


def batched_config(name: str, groups: int, tmp_path: Path, **pbt: Any) -> dict[str, Any]:
    """Four members of the tiny digits CNN (dropout 0.1) exploring lr and momentum, batched
    in ``groups`` groups."""
    config = digits_pbt_config(name)
    config["pbt"].update(
        batched=True,
        groups=groups,
        space={
            "optimizer.lr": {"type": "float", "low": 0.02, "high": 0.3, "log": True},
            "optimizer.momentum": {"type": "float", "low": 0.5, "high": 0.95},
        },
        **pbt,
    )
    config["output"] = {"dir": str(tmp_path / "runs"), "tensorboard_dir": str(tmp_path / "tb")}
    return config


def _run(config: dict[str, Any], executor: Any = None) -> dict[str, Any]:
    manager, config, population = prepare_pbt(config)
    try:
        if executor is None:
            run_pbt(manager, config, population, progress=False)
        else:  # the remote path, whatever the executor (run_pbt keeps serial in process)
            manager.start(build=False)
            manager.run(executor=executor)
    finally:
        manager.close()
    return run_result(Path(config["output"]["dir"]) / config["name"], best=executor is None)


def test_contiguous_groups() -> None:
    assert contiguous_groups(4, 1) == [[0, 1, 2, 3]]
    assert contiguous_groups(4, 2) == [[0, 1], [2, 3]]
    assert contiguous_groups(5, 2) == [[0, 1], [2, 3, 4]]
    assert contiguous_groups(3, 3) == [[0], [1], [2]]
    for bad in (0, 4, 1.5, True):
        with pytest.raises(ValueError, match="groups must be an integer in \\[1, 3\\]"):
            contiguous_groups(3, bad)


def test_together_must_partition_the_members(tmp_path: Path) -> None:
    from helpers import LR, initial_lrs

    from gradhpo.testing.quartic import QuarticFactory

    def make(together: Any, mode: str = "sync") -> PopulationBasedTraining:
        return PopulationBasedTraining(
            QuarticFactory(seed=1),
            LR.parameters,
            tmp_path,
            population=3,
            interval=2,
            total_steps=4,
            initial_values=initial_lrs(3),
            together=together,
            mode=mode,
        )

    for bad in ([[0, 1]], [[0, 1], [1, 2]], [[0, 1, 2], []], [[0, 1, 3]]):
        with pytest.raises(ValueError, match="together must split the members 0..2"):
            make(bad)
    with pytest.raises(ValueError, match="groups need mode 'sync'"):
        make([[0, 1], [2]], mode="async")


@pytest.mark.parametrize("groups", [1, 2])
def test_batched_run_with_dropout_stopped_and_resumed_is_the_uninterrupted_run(
    tmp_path: Path, groups: int
) -> None:
    """Stopped inside the third round's evaluations (nothing of that round committed), then
    resumed: every score, exploit and member equals the uninterrupted run's. Before the
    resume restored the groups' dropout streams, the last round's scores differed."""
    reference = _run(batched_config("ref", groups, tmp_path))
    assert len(reference["lineage"]) == 3
    manager, config, population = prepare_pbt(batched_config("cut", groups, tmp_path))
    evaluate = population.on_evaluate

    def stop_in_round_three(i: int, step: int, *rest: Any) -> None:
        if step == 15 and i == 2:
            raise KeyboardInterrupt
        evaluate(i, step, *rest)

    manager.on_evaluate = stop_in_round_three
    with pytest.raises(KeyboardInterrupt):
        run_pbt(manager, config, population, progress=False)
    manager.close()
    run_dir = tmp_path / "runs" / "cut"
    assert {step for _, step, *_ in run_result(run_dir, best=False)["members"]} == {10}
    manager, config, population = prepare_pbt(resume_dir=run_dir)
    run_pbt(manager, config, population, progress=False)
    manager.close()
    assert run_result(run_dir) == reference


@pytest.mark.parametrize("executor", ["serial", pytest.param("processes", marks=pytest.mark.slow)])
def test_batched_groups_on_an_executor_give_the_in_process_run(
    tmp_path: Path, executor: str
) -> None:
    """Two groups of two members: one task per group per round on the executor, states in
    the run directory or through the executor; every score, exploit and member of the
    in-process run (which steps the two groups in turn)."""
    reference = _run(batched_config("local", 2, tmp_path))
    trace = {k: reference[k] for k in ("scores", "lineage", "members")}
    assert len(reference["lineage"]) == 3
    one_group = _run(batched_config("one", 1, tmp_path))
    assert one_group["scores"] != reference["scores"]  # the groups' own dropout streams
    for checkpoints in ("files", "executor"):
        config = batched_config(f"remote-{checkpoints}", 2, tmp_path, checkpoints=checkpoints)
        pool = (
            SerialExecutor() if executor == "serial" else ProcessExecutor(2, threads_per_worker=1)
        )
        with pool:
            assert _run(config, pool) == trace, checkpoints
