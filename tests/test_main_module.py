"""``python -m gradhpo`` runs the ``gradhpo`` command: same output and exit codes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from gradhpo import __version__


def _run_module(*argv: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gradhpo", *argv],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=cwd,
    )


def test_version(tmp_path: Path) -> None:
    result = _run_module("--version", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"gradhpo {__version__}"


def test_bad_input_is_one_line_and_exit_code_2(tmp_path: Path) -> None:
    missing = tmp_path / "missing.yaml"
    result = _run_module("train", str(missing), cwd=tmp_path)
    assert result.returncode == 2, (result.stdout, result.stderr)
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("gradhpo: error: ") and "missing.yaml" in lines[0]
    assert result.stdout == ""
