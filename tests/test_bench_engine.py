"""experiments/bench_engine.py runs end to end on its smoke-test size, and every method's
hypergradient agrees with gradhpo reverse (no timing assertions)."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "experiments" / "bench_engine.py"
HYPERGRADIENT_METHODS = {
    "gradhpo checkpointed",
    "gradhpo forward-1",
    "gradhpo forward-8",
    "bare",
    "higher",
}  # checked against gradhpo reverse (torchopt too, when it is installed)


def test_bench_engine_quick_problem_a(tmp_path: Path) -> None:
    out = tmp_path / "out"
    cmd = [sys.executable, str(SCRIPT), "--quick", "--rounds", "1", "--problems", "a"]
    cmd += ["--threads", "1", "--out", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for name in ("results.csv", "summary.csv", "checks.csv", "results.md"):
        assert (out / name).is_file(), name

    checks = list(csv.DictReader((out / "checks.csv").open(encoding="utf-8")))
    checked = {row["method"] for row in checks}
    assert HYPERGRADIENT_METHODS <= checked, checked
    for row in checks:
        assert row["problem"] == "a"
        assert row["passed"] == "True", row
        assert float(row["relative_error"]) <= 1e-6, row

    rows = list(csv.DictReader((out / "results.csv").open(encoding="utf-8")))
    timed = {row["method"] for row in rows}
    assert {"plain", "gradhpo reverse"} | HYPERGRADIENT_METHODS <= timed, timed
    assert timed - {"plain", "gradhpo reverse"} == checked  # every timed method was checked
    for row in rows:
        assert float(row["median_ms"]) > 0 and row["rounds"] == "1"
    summary = list(csv.DictReader((out / "summary.csv").open(encoding="utf-8")))
    assert [s["problem"] for s in summary] == ["a"]
