"""experiments/bench_study_scaling.py: its summary arithmetic, its input checks, and a tiny run
end to end (the real config path on two process settings)."""

from __future__ import annotations

import csv
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "experiments" / "bench_study_scaling.py"


def _module():
    spec = importlib.util.spec_from_file_location("bench_study_scaling", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(executor: str, workers: int, seconds: float, best: float, epochs: int = 60) -> dict:
    return {
        "executor": executor,
        "workers": workers,
        "run_study_s": seconds,
        "span_s": seconds - 1.0,
        "process_s": seconds + 5.0,
        "finished": 12,
        "counts": {"pruned": 3},
        "trials_per_min": 60.0 * 12 / seconds,
        "mean_trial_s": 2.0,
        "epochs": epochs,
        "epochs_per_min": 60.0 * epochs / seconds,
        "s_per_epoch": 0.1,
        "best_value": best,
        "test_accuracy": 0.95,
    }


def test_summary_takes_medians_and_the_speedup_over_one_worker() -> None:
    bench = _module()
    runs = [
        _run("processes", 1, 60.0, 0.3),
        _run("processes", 2, 30.0, 0.2, epochs=90),
        _run("ray", 2, 36.0, 0.1),
        _run("processes", 1, 40.0, 0.5),
        _run("processes", 2, 20.0, 0.4, epochs=90),
        _run("ray", 2, 44.0, 0.3),
    ]
    rows = {(r["executor"], r["workers"]): r for r in bench.summarize(runs)}
    one, two, ray = rows["processes", 1], rows["processes", 2], rows["ray", 2]
    assert (one["run_study_s"], two["run_study_s"], ray["run_study_s"]) == (50.0, 25.0, 40.0)
    assert one["speedup"] == 1.0 and two["speedup"] == 2.0
    # epochs per minute: 1 worker median(60, 90) = 75, 2 workers median(180, 270) = 225
    assert one["epochs_per_min"] == 75.0 and two["epochs_per_min"] == 225.0
    assert two["epochs_speedup"] == 3.0 and two["epochs"] == 90
    assert ray["speedup"] is None and ray["epochs_speedup"] is None  # no 1-worker Ray run
    assert two["best_values"] == [0.2, 0.4] and two["best_value"] == pytest.approx(0.3)
    assert two["repeats"] == 2 and two["finished_pruned"] == [(12, 3), (12, 3)]
    table = bench.markdown(bench.summarize(runs), "val_loss")
    assert "| processes | 2 | 2 | 25.0 |" in table and "| 2.00 | 90 | 225.0 | 3.00 |" in table


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--workers", "1", "0"], "--workers: expected integers >= 1, got 0"),
        (["--trials", "0"], "--trials: expected integers >= 1, got 0"),
        (["--repeats", "-1"], "--repeats: expected integers >= 1, got -1"),
        (["--epochs", "0"], "--epochs: expected integers >= 1, got 0"),
        (["--timeout", "0"], "--timeout: expected seconds > 0, got 0.0"),
        (["--config", "no/such.yaml"], "--config: no such file: no/such.yaml"),
        (["--executors", "serial", "--workers", "1", "2"], "serial executor has one worker"),
    ],
)
def test_bad_arguments_name_the_option_and_value(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        _module().parse(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.slow
def test_a_tiny_scaling_run_writes_its_outputs(tmp_path: Path) -> None:
    cmd = [
        sys.executable,
        str(SCRIPT),
        "--trials",
        "2",
        "--epochs",
        "1",
        "--workers",
        "1",
        "2",
        "--executors",
        "processes",
        "--repeats",
        "1",
        "--fixed-work",
        "--out",
        str(tmp_path / "out"),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    payload = json.loads((tmp_path / "out" / "results.json").read_text())
    runs = payload["runs"]
    assert [(r["executor"], r["workers"]) for r in runs] == [("processes", 1), ("processes", 2)]
    for r in runs:
        assert r["finished"] == 2 and r["counts"]["failed"] == 0  # exactly the trials asked
        assert r["run_study_s"] > 0 and r["trials_per_min"] > 0
        assert 0 < r["span_s"] <= r["run_study_s"] < r["process_s"]
        assert r["metric"] == "val_loss" and r["best_value"] > 0
        assert r["epochs"] == 2  # --fixed-work: two trials of one epoch each
        assert r["counts"]["pruned"] == 0 and r["s_per_epoch"] > 0
        assert 0.0 <= r["test_accuracy"] <= 1.0
    rows = {r["workers"]: r for r in payload["summary"]}
    assert rows[1]["speedup"] == 1.0
    assert rows[2]["speedup"] == pytest.approx(rows[1]["run_study_s"] / rows[2]["run_study_s"])
    table = (tmp_path / "out" / "results.md").read_text()
    assert "| processes | 1 | 1 |" in table and "| processes | 2 | 1 |" in table
    with (tmp_path / "out" / "runs.csv").open() as f:
        assert [int(r["workers"]) for r in csv.DictReader(f)] == [1, 2]
