"""Studies on a multi-node Ray cluster: Ray's own test cluster (ray.cluster_utils.Cluster)
starts a head node without CPUs and three worker nodes with one CPU each, in this process
(each node its own raylet and worker processes). A config-driven study runs one driver per
node with exact counts; removing a node in the middle of a trial kills its driver, Ray
retries the task, and another driver continues the dead trial from its last epoch
checkpoint: nothing finished is lost or repeated.

All nodes share this machine, so the study directory (journal, checkpoints) is shared as on
a cluster with a shared file system, and a dead driver's process is seen to be gone at once
(on separate hosts its trial is recovered after ``stale_after`` seconds without heartbeat)."""

from __future__ import annotations

import copy
import sys
import threading
import time
from pathlib import Path
from typing import Any

import optuna
import pytest

from gradhpo.jobs.tune import config_study_worker, validate_tune_config
from gradhpo.search import load_study
from gradhpo.search.study import create_study

optuna.logging.set_verbosity(optuna.logging.WARNING)

pytestmark = pytest.mark.slow


def node_worker(*args: Any) -> dict[str, Any]:
    """A study driver (config_study_worker) that also says on which Ray node it ran."""
    import ray

    result = config_study_worker(*args)
    return {**result, "node": ray.get_runtime_context().get_node_id()}


@pytest.fixture
def cluster(ray_cluster: Any) -> Any:
    """The shared three-node cluster (tests/conftest.py), with this module's node_worker
    pickled by value (the workers cannot import tests/)."""
    import ray

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    try:
        yield ray_cluster
    finally:
        ray.cloudpickle.unregister_pickle_by_value(sys.modules[__name__])


def _config(tmp_path: Path, trials: int, epochs: int) -> dict[str, Any]:
    raw = {
        "name": "cluster",
        "data": {"name": "digits", "seed": 0},
        "model": {"name": "cnn", "depth": 2, "width": 16, "norm": "none"},
        "optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.9},
        "training": {"epochs": epochs, "batch_size": 16, "device": "cpu", "seed": 0},
        "output": {"dir": str(tmp_path / "runs"), "tensorboard_dir": str(tmp_path / "tb")},
        "search": {
            "space": {"model.width": {"type": "int", "low": 12, "high": 28}},
            "sampler": "random",
            "pruner": None,
            "trials": trials,
            "keep_checkpoints": "all",
        },
    }
    config, _ = validate_tune_config(copy.deepcopy(raw))
    return config


def _new_study(directory: Path, config: dict[str, Any]) -> None:
    create_study(
        directory,
        name=config["name"],
        direction="maximize",
        sampler="random",
        pruner=None,
        seed=0,
        max_resource=config["training"]["epochs"],
        search_space=config["search"]["space"],
    )


def _run(executor, directory: Path, config: dict[str, Any], workers: int) -> list[dict]:
    n = config["search"]["trials"]
    args = [(str(directory), config, n, None, k, workers) for k in range(workers)]
    return executor.run(node_worker, args)


def _check_exactly(study, n: int) -> None:
    done = study.finished_trials()
    assert len(done) == n and len({t.number for t in done}) == n
    assert all(t.state.name == "COMPLETE" for t in done)
    assert not [t for t in study.trials if t.state.name in ("RUNNING", "WAITING")]


def test_a_study_runs_one_driver_per_node_with_exact_counts(tmp_path: Path, cluster) -> None:
    import ray

    from gradhpo.execution import RayExecutor

    assert {n["NodeManagerAddress"] for n in ray.nodes()} == {"127.0.0.1"}
    assert ray.cluster_resources()["CPU"] == 3
    config = _config(tmp_path, trials=9, epochs=2)
    directory = tmp_path / "study"
    _new_study(directory, config)
    executor = RayExecutor(3, address=cluster.address, max_failures=0)
    results = _run(executor, directory, config, workers=3)
    study = load_study(directory)
    _check_exactly(study, 9)
    worker_nodes = {n.node_id for n in cluster.workers}
    assert {r["node"] for r in results} == worker_nodes  # one driver on each worker node
    assert sorted(t for r in results for t in r["trials"]) == sorted(
        t.number for t in study.finished_trials()
    )
    assert len({t.params["model.width"] for t in study.finished_trials()}) > 1  # distinct draws


def test_removing_a_node_mid_trial_retries_the_trial_from_its_checkpoint(
    tmp_path: Path, cluster
) -> None:
    from gradhpo.execution import RayExecutor

    n, epochs = 9, 8
    config = _config(tmp_path, trials=n, epochs=epochs)
    directory = tmp_path / "study"
    _new_study(directory, config)
    executor = RayExecutor(3, address=cluster.address, max_failures=2)
    out: dict[str, Any] = {}

    def drive() -> None:
        try:
            out["results"] = _run(executor, directory, config, workers=3)
        except BaseException as exc:  # noqa: BLE001 - handed to the test thread
            out["error"] = exc

    thread = threading.Thread(target=drive)
    thread.start()
    # Wait for a trial that checkpointed its first epoch and has several to go, then remove
    # the node its driver runs on (SIGKILL, as a machine that dies).
    victim = removed = None
    before: dict[int, Any] = {}
    deadline = time.monotonic() + 180
    while victim is None and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.05)
        study = load_study(directory)
        for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
            progress = study.trial_dir(trial.number) / "progress.json"
            if not progress.is_file() or '"epoch": 1,' not in progress.read_text():
                continue
            node = cluster.node_running(trial.system_attrs["gradhpo:driver"]["pid"])
            if node is None:
                continue
            before = {t.number: (t.params, t.value) for t in study.finished_trials()}
            cluster.remove_node(node, allow_graceful=False)
            victim, removed = trial.number, node
            break
    thread.join(timeout=300)
    assert victim is not None, "no trial was caught between its first and last epoch"
    assert not thread.is_alive() and "error" not in out, out.get("error")
    study = load_study(directory)
    _check_exactly(study, n)
    # Nothing finished before the removal is lost or changed.
    after = {t.number: (t.params, t.value) for t in study.finished_trials()}
    assert all(after[k] == v for k, v in before.items())
    # The dead trial is retried exactly once, with its parameters, from its checkpoint.
    dead = next(t for t in study.trials if t.number == victim)
    assert dead.state.name == "FAIL" and dead.system_attrs["gradhpo:retried"] is True
    (retry,) = [
        t for t in study.finished_trials() if t.user_attrs.get("gradhpo:retry_of") == victim
    ]
    assert retry.params == dead.params
    assert retry.user_attrs["gradhpo:resume_from"] == victim
    assert retry.user_attrs["gradhpo:resumed_at_epoch"] >= 1
    assert retry.user_attrs["epochs"] == epochs  # its history holds every epoch once
    assert [t.number for t in study.trials if t.system_attrs.get("gradhpo:retried")] == [victim]
    # The removed node's driver task was retried by Ray on another node.
    assert removed.node_id not in {r["node"] for r in out["results"]}
