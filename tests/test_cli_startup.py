"""The command line starts without torch: ``--version``, ``--help``, every ``<command> --help``
and the mistakes found before a job is loaded (arguments, a missing or broken YAML file)
answer without importing torch, optuna or matplotlib (issue 15: they took seconds).

Checked by what a fresh interpreter has in ``sys.modules`` after ``main`` returns, not by
timing, so the machine's load cannot make it flaky."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

HEAVY = ("torch", "optuna", "matplotlib", "numpy")

COMMANDS = ("train", "tune", "pbt", "resume", "worker", "storage-proxy", "report", "export")

#: One fresh interpreter runs every case in turn and reports, per case, the exit code, the
#: output and the heavy modules loaded so far.
PROBE = """
import contextlib, io, json, sys
from gradhpo.cli import main

heavy, cases = json.loads(sys.argv[1])
results = []
for argv in cases:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = main(argv)
        except SystemExit as exc:
            rc = exc.code
    loaded = sorted(m for m in heavy if m in sys.modules)
    results.append({"argv": argv, "rc": rc, "out": out.getvalue(), "err": err.getvalue(),
                    "loaded": loaded})
print(json.dumps(results))
"""


def probe(cases: list[list[str]], cwd: Path) -> list[dict]:
    done = subprocess.run(
        [sys.executable, "-c", PROBE, json.dumps([HEAVY, cases])],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_version_and_help_do_not_import_torch(tmp_path: Path) -> None:
    from gradhpo import __version__

    cases = [["--version"], ["--help"], *([c, "--help"] for c in COMMANDS)]
    results = probe(cases, tmp_path)
    for result in results:
        assert result["loaded"] == [], f"{result['argv']} imported {result['loaded']}"
        assert result["rc"] == 0, result
    assert results[0]["out"] == f"gradhpo {__version__}\n"
    assert results[1]["out"].startswith("usage: gradhpo")
    for result, command in zip(results[2:], COMMANDS, strict=True):
        assert result["out"].startswith(f"usage: gradhpo {command}"), result


def test_cheap_mistakes_answer_without_torch(tmp_path: Path) -> None:
    missing = str(tmp_path / "missing.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("name: [unclosed\n", encoding="utf-8")
    run_dir = str(tmp_path / "no_such_run")
    cases = [
        ["train", missing],
        ["tune", missing],
        ["pbt", missing],
        ["tune", str(broken)],
        ["tune", missing, "--trials", "0"],
        ["tune", missing, "--timeout", "-1"],
        ["worker", run_dir, "--threads", "0"],
        ["report", run_dir],
        ["export", run_dir, "--fold", "-1"],
        ["export", run_dir, "--trial", "-1"],
        ["no-such-command"],
    ]
    for result in probe(cases, tmp_path):
        assert result["loaded"] == [], f"{result['argv']} imported {result['loaded']}"
        assert result["rc"] == 2, result
        assert result["out"] == "", result
        lines = result["err"].splitlines()
        if result["argv"] == ["no-such-command"]:  # argparse's usage and its error line
            assert lines[-1].startswith("gradhpo: error: argument COMMAND: invalid choice")
        else:
            assert len(lines) == 1 and lines[0].startswith("gradhpo: error: "), result


@pytest.mark.parametrize(
    ("command", "message"),
    [
        ("train", "config file not found"),
        ("tune", "--trials: expected an integer >= 1, got 0"),
        ("report", "study directory not found"),
    ],
)
def test_mistake_messages_unchanged(tmp_path: Path, capsys, command: str, message: str) -> None:
    from gradhpo.cli import main

    argv = {
        "train": ["train", str(tmp_path / "missing.yaml")],
        "tune": ["tune", str(tmp_path / "missing.yaml"), "--trials", "0"],
        "report": ["report", str(tmp_path / "missing")],
    }[command]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("gradhpo: error: ") and message in err


def test_help_names_the_storage_variable_that_is_read(tmp_path: Path) -> None:
    """The help texts name the variable without importing its home (it loads torch)."""
    from gradhpo.jobs.worker import STORAGE_ENV

    results = probe([[c, "--help"] for c in ("tune", "resume", "worker", "export")], tmp_path)
    for result in results:
        # argparse wraps help lines; the name itself is never split
        assert f"${STORAGE_ENV}" in result["out"], result["argv"]


def test_package_exports_resolve_without_torch(tmp_path: Path) -> None:
    """Every name the package exports still imports (and ``import gradhpo`` stays light)."""
    code = (
        "import json, sys, gradhpo, gradhpo.cli\n"
        "names = list(getattr(gradhpo, '__all__', None) or "
        "[n for n in vars(gradhpo) if not n.startswith('_')] + ['__version__'])\n"
        "for name in names:\n"
        "    exec(f'from gradhpo import {name}')\n"
        "for name in gradhpo.cli.__all__:\n"
        "    exec(f'from gradhpo.cli import {name}')\n"
        f"print(json.dumps([names, sorted(m for m in {HEAVY!r} if m in sys.modules)]))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=120
    )
    assert done.returncode == 0, done.stderr
    names, loaded = json.loads(done.stdout)
    assert "__version__" in names
    assert loaded == []
