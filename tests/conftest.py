"""Fixtures shared by the whole suite."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """One torch thread for a module of tiny models: faster than two here, and it leaves the
    other core to whatever else runs (use with ``pytestmark = pytest.mark.usefixtures``)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def write_yaml(tmp_path: Path) -> Callable[..., Path]:
    """``write_yaml(config, name="config.yaml")`` writes a config mapping under ``tmp_path``
    with ``yaml.safe_dump`` and returns its path."""

    def write(config: Any, name: str = "config.yaml") -> Path:
        path = tmp_path / name
        path.write_text(yaml.safe_dump(config), encoding="utf-8")
        return path

    return write


def _node_running(cluster: Any, pid: int) -> Any:
    """The worker node of ``cluster`` whose raylet started process ``pid`` (a Ray worker
    running a task), or None."""
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as f:
            parent = int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None
    for node in cluster.workers:
        if node.all_processes["raylet"][0].process.pid == parent:
            return node
    return None


@pytest.fixture
def ray_cluster(monkeypatch) -> Iterator[Any]:
    """Ray's multi-node test cluster on this machine (``ray.cluster_utils.Cluster``): a head
    node without CPUs (it runs no task) and three one-CPU worker nodes (``.workers``) on
    127.0.0.1 with small object stores (``.node_running(pid)``: the node a task's worker
    process runs on); the driver connected; all shut down and removed
    after. Slow (a few seconds to start): for tests marked slow."""
    import os
    import shutil
    import tempfile

    # Before the first `import ray`: 127.0.0.1 stays the loopback address (see RayExecutor).
    monkeypatch.setenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    ray = pytest.importorskip("ray")
    from ray.cluster_utils import Cluster

    # Short paths (Ray's socket names have a length limit); RAY_TMPDIR also holds the
    # address file the test cluster writes.
    root = tempfile.mkdtemp(prefix="rc", dir="/tmp")
    monkeypatch.setenv("RAY_TMPDIR", root)
    os.makedirs(os.path.join(root, "ray"))
    common = {"node_ip_address": "127.0.0.1", "object_store_memory": 80 * 1024 * 1024}
    made = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": 0,
            "include_dashboard": False,
            "temp_dir": os.path.join(root, "ray"),
            **common,
        },
    )
    try:
        made.workers = [made.add_node(num_cpus=1, **common) for _ in range(3)]
        made.wait_for_nodes()
        made.node_running = lambda pid: _node_running(made, pid)
        ray.init(address=made.address, log_to_driver=False, configure_logging=False)
        yield made
    finally:
        ray.shutdown()
        made.shutdown()
        shutil.rmtree(root, ignore_errors=True)
