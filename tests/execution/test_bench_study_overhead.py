"""experiments/bench_study_overhead.py runs end to end on a tiny budget (it must not rot
between measurements); the real figures come from the command in BENCHMARKS.md."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _bench(name: str = "bench_study_overhead"):
    spec = importlib.util.spec_from_file_location(name, ROOT / "experiments" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_study_overhead_benchmark_writes_its_rows(tmp_path: Path, capsys) -> None:
    bench = _bench()
    bench.main(
        [
            "--trials", "2", "3",
            "--repeats", "1",
            "--samplers", "random",
            "--storages", "memory", "journal", "sqlite",
            "--executors", "serial",
            "--out", str(tmp_path),
        ]
    )  # fmt: skip
    payload = json.loads((tmp_path / "results.json").read_text())
    rows = [(r["trials"], r["storage"]) for r in payload["storages"]]
    assert rows == [(t, s) for t in (2, 3) for s in ("memory", "journal", "sqlite")]
    for r in payload["storages"]:
        assert r["median_s"]["plain optuna"] > 0 and r["median_s"]["gradhpo Study"] > 0
    assert [(r["trials"], r["executor"]) for r in payload["executors"]] == [
        (2, "serial"),
        (3, "serial"),
    ]
    table = (tmp_path / "results.md").read_text()
    assert "| 3 | random | sqlite |" in table and "| 3 | serial | 1 |" in table
    assert "3 trials random     sqlite: plain optuna" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exc:
        bench.main(["--trials", "0", "--out", str(tmp_path)])
    assert exc.value.code == 2
    assert "--trials: expected integers >= 1, got [0]" in capsys.readouterr().err


def test_the_journal_lock_benchmark_times_all_three_locks(capsys) -> None:
    _bench("bench_journal_lock").main(["--rounds", "1", "--n", "20"])
    out = capsys.readouterr().out
    for lock in ("OwnedFileLock", "JournalFileSymlinkLock", "JournalFileOpenLock"):
        assert lock in out
    assert "1.00x symlink" in out


def test_the_sql_count_shows_what_a_study_adds_per_trial(tmp_path: Path, capsys) -> None:
    """On SQLite (no server needed): gradhpo's trial has the driver record's INSERT that plain
    Optuna's has not, and both sides report their statements and commits per trial."""
    _bench("count_study_sql").main(["--trials", "5", "--url", f"sqlite:///{tmp_path / 'c.db'}"])
    out = capsys.readouterr().out
    assert "plain Optuna:" in out and "gradhpo Study:" in out
    assert "0.00 ->  1.00  INSERT INTO trial_system_attributes" in out
