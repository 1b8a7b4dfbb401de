"""The bad-input table: every kind of mistake a user can make through the command line
(bad values per config field, files that are not UTF-8 or not YAML, duplicate keys, paths
that cannot be written, damaged or missing state files of a study or a PBT run, absurd
sizes), each asserting the promise of DESIGN.md: exit code 2, exactly one line on stderr
naming the field or file and the value, no traceback, and the file tree unchanged.

The CLI runs in this process (``gradhpo.cli.main``): fast. A finished study and a finished
PBT run are made once per module and copied for each damaged-state case. Cases that need
permissions (chmod) are skipped when running as root: root ignores file permissions, so
nothing can be made unwritable to it (the rest of each case kind is covered by the
"under a regular file" cases, which hold for root too).
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import io
import os
import shutil
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna
import pytest
import yaml

from gradhpo.cli import main
from gradhpo.search.study import load_optuna_study

pytestmark = pytest.mark.usefixtures("one_thread")
optuna.logging.set_verbosity(optuna.logging.WARNING)

IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0
needs_permissions = pytest.mark.skipif(
    IS_ROOT, reason="root ignores file permissions: nothing is unwritable to it"
)

TRAIN: dict[str, Any] = {
    "name": "t",
    "data": {"name": "digits", "seed": 0},
    "model": {"name": "cnn", "depth": 1, "width": 4, "norm": "none"},
    "optimizer": {"name": "sgd", "lr": 0.1, "momentum": 0.9},
    "training": {"epochs": 1, "batch_size": 128, "device": "cpu", "seed": 0},
    "output": {"dir": "runs", "tensorboard_dir": "tb"},
}
TUNE: dict[str, Any] = {
    **TRAIN,
    "name": "s",
    "search": {
        "space": {
            "model.width": {"type": "int", "low": 2, "high": 4},
            "optimizer.lr": {"type": "float", "low": 0.05, "high": 0.2, "log": True},
        },
        "sampler": {"name": "tpe", "n_startup_trials": 2},
        "pruner": None,
        "trials": 2,
    },
}
PBT: dict[str, Any] = {
    **TRAIN,
    "name": "p",
    "pbt": {
        "population": 2,
        "interval": 5,
        "space": {"optimizer.lr": {"type": "float", "low": 0.01, "high": 0.3, "log": True}},
    },
}
CONFIGS = {"train": TRAIN, "tune": TUNE, "pbt": PBT}


# ---------------------------------------------------------------- helpers
def snapshot(root: Path) -> dict[str, str]:
    """Every path under ``root`` with the hash of its bytes (folders: "dir")."""
    tree = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        tree[rel] = "dir" if path.is_dir() else hashlib.sha256(path.read_bytes()).hexdigest()
    return tree


def cli(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(argv))
    return code, out.getvalue(), err.getvalue()


def assert_refused(root: Path, argv: list[str], *fragments: str) -> str:
    """Run ``gradhpo argv``: exit 2, one stderr line with every fragment, no traceback,
    nothing under ``root`` changed. Returns the line."""
    before = snapshot(root)
    code, _, err = cli(*argv)
    lines = err.splitlines()
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("gradhpo: error: "), err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    assert snapshot(root) == before, "the file tree changed"
    return lines[0]


def _set(config: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    config = copy.deepcopy(config)
    *parents, leaf = path.split(".")
    node = config
    for key in parents:
        node = node.setdefault(key, {})
    node[leaf] = value
    return config


# ---------------------------------------------------------------- bad config values
# (command, dotted path in the config, bad value, fragments the one line must hold)
BAD_VALUES: list[tuple[str, str, Any, tuple[str, ...]]] = [
    ("train", "training.epochs", -3, ("training.epochs", "-3")),
    ("train", "training.seed", -1, ("training.seed", "-1")),
    ("train", "data.seed", -1, ("data.seed", "-1")),
    ("train", "data.download", "yes", ("data.download", "'yes'")),
    ("train", "data.normalize", 1, ("data.normalize", "1")),
    ("train", "model.depth", 0, ("depth", "0")),
    ("train", "model.name", "transformer", ("'transformer'",)),
    ("train", "optimizer.lr", -1.0, ("optimizer.lr", "-1.0")),
    ("train", "name", "../x", ("name", "'../x'")),
    ("train", "model.width", 100_000, ("model.width", "100000", "limit")),
    ("train", "model.width", 1_000_000_000, ("model.width", "1000000000")),
    ("train", "training.batch_size", 10**9, ("training.batch_size", "1000000000")),
    ("tune", "search.trials", 0, ("search.trials", "0")),
    ("tune", "search.metric", "accuracy", ("search.metric", "'accuracy'")),
    ("tune", "search.sampler", {"name": "tpe", "n_startup_trials": "x"}, ("search.sampler", "'x'")),
    ("tune", "search.sampler", {"name": "cmaes", "sigma0": "x"}, ("search.sampler", "sigma0")),
    ("tune", "search.sampler", "bayesian", ("search.sampler.name", "'bayesian'")),
    ("tune", "search.pruner", {"name": "median", "n_warmup_steps": "x"}, ("search.pruner", "'x'")),
    (
        "tune",
        "search.space.model.width",
        {"type": "int", "low": 2, "high": 100_000},
        ("search.space.model.width=100000", "model.width", "limit"),
    ),
    ("tune", "model.width", 100_000, ("model.width", "100000")),
    ("tune", "name", "../x", ("name", "'../x'")),
    ("tune", "data.seed", -1, ("data.seed", "-1")),
    ("pbt", "pbt.population", 0, ("pbt.population", "0")),
    ("pbt", "model.width", 100_000, ("model.width", "100000")),
    ("pbt", "name", "../x", ("name", "'../x'")),
]


@pytest.mark.parametrize(
    ("command", "path", "value", "fragments"),
    BAD_VALUES,
    ids=[f"{c}:{p}={v!r}"[:60] for c, p, v, _ in BAD_VALUES],
)
def test_a_bad_value_is_one_line_naming_field_and_value(
    tmp_path: Path, monkeypatch, command: str, path: str, value: Any, fragments: tuple[str, ...]
) -> None:
    monkeypatch.chdir(tmp_path)
    config = _set(CONFIGS[command], path, value)
    if path.startswith("search.space."):
        config["search"]["space"] = {"model.width": value}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
    assert_refused(tmp_path, [command, "c.yaml", "--no-progress"], *fragments)


# (command, extra arguments, fragments)
BAD_OPTIONS: list[tuple[str, list[str], tuple[str, ...]]] = [
    ("tune", ["--name", "../x"], ("name", "'../x'")),
    ("tune", ["--trials", "0"], ("--trials", "0")),
    ("tune", ["--seed", "-1"], ("training.seed", "-1")),
    ("tune", ["--timeout", "-1"], ("--timeout", "-1")),
    ("train", ["--name", "../x"], ("name", "'../x'")),
    ("train", ["--epochs", "0"], ("training.epochs", "0")),
    ("pbt", ["--name", "../x"], ("name", "'../x'")),
]


@pytest.mark.parametrize(
    ("command", "extra", "fragments"),
    BAD_OPTIONS,
    ids=[f"{c}:{' '.join(e)}" for c, e, _ in BAD_OPTIONS],
)
def test_a_bad_option_is_one_line(
    tmp_path: Path, monkeypatch, command: str, extra: list[str], fragments: tuple[str, ...]
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(CONFIGS[command]), encoding="utf-8")
    assert_refused(tmp_path, [command, "c.yaml", "--no-progress", *extra], *fragments)


# ---------------------------------------------------------------- config files
BAD_FILES: list[tuple[str, bytes, tuple[str, ...]]] = [
    ("non-utf8", b"name: t\nmodel: {name: cnn}\n# \xff\xfe\n", ("c.yaml", "not UTF-8")),
    ("yaml-syntax", b"data: {name: digits\nmodel: [", ("c.yaml", "invalid YAML", "line")),
    (
        "duplicate-key",
        b"name: t\ndata: {name: digits}\nmodel: {name: cnn}\nmodel: {name: mlp}\n",
        ("c.yaml", "duplicate key 'model'"),
    ),
    ("top-level-list", b"- 1\n- 2\n", ("c.yaml", "top level must be a mapping")),
    ("empty", b"", ("c.yaml", "top level must be a mapping")),
]


@pytest.mark.parametrize("command", ["train", "tune", "pbt"])
@pytest.mark.parametrize(
    ("kind", "content", "fragments"), BAD_FILES, ids=[k for k, _, _ in BAD_FILES]
)
def test_a_bad_config_file_is_one_line_naming_it(
    tmp_path: Path, monkeypatch, command: str, kind: str, content: bytes, fragments
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "c.yaml").write_bytes(content)
    assert_refused(tmp_path, [command, "c.yaml", "--no-progress"], *fragments)


@pytest.mark.parametrize("command", ["train", "tune", "pbt"])
def test_a_missing_config_file_is_one_line(tmp_path: Path, monkeypatch, command: str) -> None:
    monkeypatch.chdir(tmp_path)
    assert_refused(tmp_path, [command, "nope.yaml"], "config file not found", "nope.yaml")


# ---------------------------------------------------------------- paths that cannot be written
@pytest.mark.parametrize("command", ["train", "tune", "pbt"])
@pytest.mark.parametrize("field", ["dir", "tensorboard_dir"])
def test_an_output_folder_under_a_regular_file_is_one_line(
    tmp_path: Path, monkeypatch, command: str, field: str
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "afile").write_text("not a folder")
    config = _set(CONFIGS[command], f"output.{field}", "afile/sub")
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
    assert_refused(
        tmp_path,
        [command, "c.yaml", "--no-progress"],
        f"output.{field}",
        "'afile/sub'",
        "'afile' is a file",
    )


@needs_permissions
@pytest.mark.parametrize("command", ["train", "tune", "pbt"])
@pytest.mark.parametrize("field", ["dir", "tensorboard_dir"])
def test_an_unwritable_output_folder_is_one_line(
    tmp_path: Path, monkeypatch, command: str, field: str
) -> None:
    monkeypatch.chdir(tmp_path)
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(stat.S_IRUSR | stat.S_IXUSR)
    try:
        config = _set(CONFIGS[command], f"output.{field}", "locked/sub")
        (tmp_path / "c.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
        assert_refused(
            tmp_path, [command, "c.yaml", "--no-progress"], f"output.{field}", "not writable"
        )
    finally:
        locked.chmod(stat.S_IRWXU)


# ---------------------------------------------------------------- damaged run directories
@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> dict[str, Any]:
    """A finished study and a finished PBT run, made once; cases work on copies."""
    root = tmp_path_factory.mktemp("finished")
    cwd = Path.cwd()
    os.chdir(root)
    try:
        for command in ("tune", "pbt"):
            (root / f"{command}.yaml").write_text(
                yaml.safe_dump(CONFIGS[command]), encoding="utf-8"
            )
            code, _, err = cli(command, f"{command}.yaml", "--no-progress")
            assert code == 0, err
    finally:
        os.chdir(cwd)
    study = load_optuna_study(root / "runs" / "s")
    best = max((t for t in study.trials if t.value is not None), key=lambda t: t.value)
    checkpoints = sorted((root / "runs" / "p" / "checkpoints").glob("*.pt"))
    return {
        "study": root / "runs" / "s",
        "pbt": root / "runs" / "p",
        "best": f"trials/{best.number:04d}/best_0.pt",
        "member": f"checkpoints/{checkpoints[0].name}",
    }


def garbage(path: Path) -> None:
    path.write_bytes(b"\x00\x01garbage \xff\xfe{{ not what was written\n")


def truncated(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def zero_bytes(path: Path) -> None:
    path.write_bytes(b"")


def missing(path: Path) -> None:
    path.unlink()


def not_utf8(path: Path) -> None:
    path.write_bytes(path.read_bytes() + b"# \xff\xfe\n")


def yaml_error(path: Path) -> None:
    path.write_bytes(b"name: s\ndata: {name: digits\n")


DAMAGES: dict[str, Callable[[Path], None]] = {
    "garbage": garbage,
    "truncated": truncated,
    "zero-bytes": zero_bytes,
    "missing": missing,
    "not-utf8": not_utf8,
    "yaml-error": yaml_error,
}
# (run, file ("best"/"member": looked up in the fixture), damage, commands, fragments)
DAMAGED: list[tuple[str, str, str, tuple[str, ...], tuple[str, ...]]] = [
    ("study", "study.journal", "garbage", ("resume", "report"), ("study.journal", "damaged")),
    ("study", "study.journal", "truncated", ("resume", "report"), ("study.journal", "cut off")),
    ("study", "study.journal", "zero-bytes", ("resume", "report"), ("study.journal", "empty")),
    ("study", "study.journal", "missing", ("resume", "report"), ("no study.journal",)),
    ("study", "study.json", "garbage", ("resume", "report"), ("study.json",)),
    ("study", "study.json", "truncated", ("resume", "report"), ("study.json",)),
    ("study", "study.json", "zero-bytes", ("resume", "report"), ("study.json",)),
    ("study", "study.json", "missing", ("resume", "report"), ("no study.json",)),
    ("study", "sampler_state.bin", "garbage", ("resume",), ("sampler_state.bin", "not a gradhpo")),
    ("study", "sampler_state.bin", "truncated", ("resume",), ("sampler_state.bin", "cut off")),
    ("study", "sampler_state.bin", "zero-bytes", ("resume",), ("sampler_state.bin", "empty")),
    ("study", "config.yaml", "not-utf8", ("resume", "report"), ("config.yaml", "not UTF-8")),
    ("study", "config.yaml", "yaml-error", ("resume", "report"), ("config.yaml", "invalid YAML")),
    ("study", "config.yaml", "zero-bytes", ("resume", "report"), ("config.yaml", "mapping")),
    ("study", "config.yaml", "missing", ("resume", "report"), ("config.yaml", "missing")),
    ("study", "gradhpo.json", "garbage", ("resume", "report"), ("gradhpo.json", "marker")),
    ("study", "best", "garbage", ("resume",), ("best_0.pt", "unreadable")),
    ("study", "best", "truncated", ("resume",), ("best_0.pt", "unreadable")),
    ("study", "best", "zero-bytes", ("resume",), ("best_0.pt", "unreadable")),
    ("study", "best", "missing", ("resume",), ("best_0.pt", "missing")),
    ("pbt", "pbt.db", "garbage", ("resume", "report"), ("pbt.db", "not a readable")),
    ("pbt", "pbt.db", "truncated", ("resume", "report"), ("pbt.db",)),
    ("pbt", "pbt.db", "zero-bytes", ("resume", "report"), ("pbt.db", "empty")),
    ("pbt", "pbt.db", "missing", ("resume", "report"), ("pbt.db", "missing")),
    ("pbt", "member", "garbage", ("resume",), ("checkpoint", "unreadable")),
    ("pbt", "member", "truncated", ("resume",), ("checkpoint", "unreadable")),
    ("pbt", "member", "zero-bytes", ("resume",), ("checkpoint", "unreadable")),
    ("pbt", "member", "missing", ("resume",), ("checkpoint", "missing")),
    ("pbt", "config.yaml", "missing", ("resume", "report"), ("config.yaml", "missing")),
    ("pbt", "config.yaml", "not-utf8", ("resume", "report"), ("config.yaml", "not UTF-8")),
    ("pbt", "config.yaml", "yaml-error", ("resume", "report"), ("config.yaml", "invalid YAML")),
]
DAMAGED_CASES = [
    (run, name, damage, command, fragments)
    for run, name, damage, commands, fragments in DAMAGED
    for command in commands
]


@pytest.mark.parametrize(
    ("run", "name", "damage", "command", "fragments"),
    DAMAGED_CASES,
    ids=[f"{c}:{r}:{n}:{d}" for r, n, d, c, _ in DAMAGED_CASES],
)
def test_a_damaged_run_directory_is_one_line_naming_the_file_and_left_as_it_is(
    tmp_path: Path,
    monkeypatch,
    finished: dict[str, Any],
    run: str,
    name: str,
    damage: str,
    command: str,
    fragments: tuple[str, ...],
) -> None:
    monkeypatch.chdir(tmp_path)
    directory = tmp_path / run
    shutil.copytree(finished[run], directory)
    target = directory / finished.get(name, name)
    DAMAGES[damage](target)
    argv = [command, str(directory)] + (["--no-progress"] if command == "resume" else [])
    assert_refused(tmp_path, argv, *fragments)


@pytest.mark.parametrize("run", ["study", "pbt"])
def test_report_out_under_a_regular_file_is_one_line(
    tmp_path: Path, monkeypatch, finished: dict[str, Any], run: str
) -> None:
    monkeypatch.chdir(tmp_path)
    shutil.copytree(finished[run], tmp_path / run)
    (tmp_path / "afile").write_text("x")
    assert_refused(
        tmp_path, ["report", run, "--out", "afile/report"], "--out", "'afile/report'", "file"
    )


@needs_permissions
def test_report_out_unwritable_is_one_line(
    tmp_path: Path, monkeypatch, finished: dict[str, Any]
) -> None:
    monkeypatch.chdir(tmp_path)
    shutil.copytree(finished["study"], tmp_path / "study")
    (tmp_path / "locked").mkdir()
    (tmp_path / "locked").chmod(stat.S_IRUSR | stat.S_IXUSR)
    try:
        assert_refused(tmp_path, ["report", "study", "--out", "locked/r"], "--out", "writable")
    finally:
        (tmp_path / "locked").chmod(stat.S_IRWXU)


@pytest.mark.parametrize(
    ("argv", "fragments"),
    [
        (["--seed", "-1"], ("--seed", "-1")),
        (["--trials", "0"], ("--trials", "0")),
        (["--timeout", "0"], ("--timeout", "0")),
    ],
)
def test_bad_resume_options_are_one_line(
    tmp_path: Path, monkeypatch, finished: dict[str, Any], argv: list[str], fragments
) -> None:
    monkeypatch.chdir(tmp_path)
    shutil.copytree(finished["study"], tmp_path / "study")
    assert_refused(tmp_path, ["resume", "study", "--no-progress", *argv], *fragments)


# ---------------------------------------------------------------- what stays clean
@pytest.mark.parametrize(
    ("run", "name", "damage"),
    [
        ("study", "sampler_state.bin", "garbage"),  # report does not read it
        ("study", "best", "garbage"),  # nor the weights
        ("pbt", "member", "garbage"),
    ],
)
def test_report_does_not_need_what_it_does_not_read(
    tmp_path: Path, monkeypatch, finished: dict[str, Any], run: str, name: str, damage: str
) -> None:
    monkeypatch.chdir(tmp_path)
    shutil.copytree(finished[run], tmp_path / run)
    DAMAGES[damage](tmp_path / run / finished.get(name, name))
    code, out, err = cli("report", run)
    assert code == 0 and "Traceback" not in err, err
    assert "wrote" in out


def test_resume_of_a_finished_study_reports_its_counts(
    tmp_path: Path, monkeypatch, finished: dict[str, Any]
) -> None:
    monkeypatch.chdir(tmp_path)
    shutil.copytree(finished["study"], tmp_path / "study")
    code, out, err = cli("resume", "study", "--no-progress")
    assert code == 0, err
    assert "s: 2 of 2 trials finished: 2 complete, 0 pruned, 0 failed" in out
