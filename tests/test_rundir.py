"""gradhpo.jobs.rundir: one layout with a kind marker, created whole, opened with clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from gradhpo.cli import main
from gradhpo.config import ConfigError
from gradhpo.jobs.rundir import MARKER, create_run_dir, open_run_dir, run_dir_of

CONFIG = {"name": "x", "output": {"dir": "runs"}}


def test_created_whole_with_marker_and_config(tmp_path: Path) -> None:
    seen = []
    directory = create_run_dir(
        tmp_path / "x", "study", CONFIG, populate=lambda tmp: seen.append(tmp.name)
    )
    assert seen and seen[0].startswith(".x.")  # populated in a hidden sibling
    assert json.loads((directory / MARKER).read_text())["kind"] == "study"
    assert yaml.safe_load((directory / "config.yaml").read_text()) == CONFIG
    assert open_run_dir(directory) == ("study", CONFIG)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x"]


def test_failure_during_creation_leaves_nothing(tmp_path: Path) -> None:
    def populate(tmp: Path) -> None:
        (tmp / "study.db").write_bytes(b"half")
        raise KeyboardInterrupt  # a kill between the database and the rest

    with pytest.raises(KeyboardInterrupt):
        create_run_dir(tmp_path / "x", "study", CONFIG, populate=populate)
    assert list(tmp_path.iterdir()) == []


def test_build_folders_of_killed_creators_are_removed(tmp_path: Path) -> None:
    """A SIGKILL inside creation leaves the hidden build folder: the next creation removes
    it when its process (named in the folder) is gone; live or foreign ones stay."""
    import os
    import socket
    import subprocess
    import sys

    host = socket.gethostname()
    dead_pid = subprocess.Popen([sys.executable, "-c", "pass"])
    dead_pid.wait()
    dead = tmp_path / f".x.{host}.{dead_pid.pid}.k1ll3d.tmp"
    live = tmp_path / f".x.{host}.{os.getppid()}.al1ve.tmp"
    foreign = tmp_path / ".x.another-host.1.f0re1gn.tmp"
    for folder in (dead, live, foreign):
        (folder / "study.db").parent.mkdir()
        (folder / "study.db").write_bytes(b"half")
    create_run_dir(tmp_path / "x", "study", CONFIG)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, foreign.name, "x"])


def test_existing_directory_is_refused_with_the_fix(tmp_path: Path) -> None:
    create_run_dir(tmp_path / "x", "pbt", CONFIG)
    with pytest.raises(
        ConfigError, match=r"already holds a PBT run; continue it with `gradhpo resume"
    ):
        create_run_dir(tmp_path / "x", "pbt", CONFIG)


def test_legacy_directories_are_recognised_by_their_files(tmp_path: Path) -> None:
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "study.db").write_bytes(b"")
    (tmp_path / "old" / "config.yaml").write_text("name: old\n")
    assert open_run_dir(tmp_path / "old") == ("study", {"name": "old"})


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"name: \xff\xfe\n", "not UTF-8"),
        (b"name: [unclosed\n", "invalid YAML"),
        (b"- a list\n", "top level must be a mapping"),
    ],
)
def test_unreadable_config_is_one_clear_error(tmp_path: Path, content: bytes, message: str) -> None:
    directory = create_run_dir(tmp_path / "x", "pbt", CONFIG)
    (directory / "config.yaml").write_bytes(content)
    with pytest.raises(ConfigError, match=message):
        open_run_dir(directory)


def test_not_a_run_directory_and_wrong_kind(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        open_run_dir(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="not a gradhpo run directory"):
        open_run_dir(tmp_path / "empty")
    create_run_dir(tmp_path / "t", "train", CONFIG)
    with pytest.raises(ConfigError, match="holds a train run, not a study run"):
        open_run_dir(tmp_path / "t", "study")


@pytest.mark.parametrize("name", ["../x", "a/b", "..", ".hidden"])
def test_names_stay_inside_the_output_folder(name: str) -> None:
    with pytest.raises(ConfigError, match="name: must be a plain folder name"):
        run_dir_of({"name": name, "output": {"dir": "runs"}})


def test_train_twice_refuses_the_second_run_and_keeps_the_first(
    tmp_path: Path, write_yaml, capsys, monkeypatch
) -> None:
    monkeypatch.chdir(tmp_path)
    config = {
        "name": "tiny",
        "data": {"name": "synthetic", "seed": 0},
        "model": {"name": "cnn", "depth": 1, "width": 4},
        "training": {"epochs": 1, "batch_size": 16, "device": "cpu"},
    }
    path = write_yaml(config)
    assert main(["train", str(path), "--out", "runs", "--no-progress"]) == 0
    first = (tmp_path / "runs" / "tiny" / "checkpoint.pt").read_bytes()
    capsys.readouterr()
    assert main(["train", str(path), "--out", "runs", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "already exists" in err[0] and "--name" in err[0]
    assert (tmp_path / "runs" / "tiny" / "checkpoint.pt").read_bytes() == first
    assert main(["train", str(path), "--out", "runs", "--name", "tiny2", "--no-progress"]) == 0
    assert open_run_dir(tmp_path / "runs" / "tiny2")[0] == "train"


@pytest.mark.parametrize(
    ("content", "message"),
    [("{", "unreadable kind marker"), ('{"kind": "zoo"}', "unknown kind 'zoo'")],
)
def test_a_damaged_marker_is_named(tmp_path: Path, content: str, message: str) -> None:
    directory = create_run_dir(tmp_path / "x", "study", CONFIG)
    (directory / MARKER).write_text(content)
    with pytest.raises(ConfigError, match=message):
        open_run_dir(directory)
