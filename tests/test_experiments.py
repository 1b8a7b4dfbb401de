"""The experiment scripts run end to end on tiny budgets (they must not rot between runs)."""

from __future__ import annotations

import csv
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_ablation_runner_writes_its_outputs(tmp_path: Path) -> None:
    cmd = [
        sys.executable,
        str(ROOT / "experiments" / "ablation.py"),
        "--budget",
        "80",
        "--seeds",
        "1",
        "--trial-epochs",
        "1",
        "--methods",
        "random",
        "tpe_hyperband",
        "hg_greedy",
        "sgd_hd",
        "pbt",
        "--out",
        str(tmp_path / "out"),
        "--results",
        str(tmp_path / "RESULTS.md"),
        "--threads",
        "1",
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = list(csv.DictReader((tmp_path / "out" / "runs.csv").open()))
    assert [r["method"] for r in rows] == ["random", "tpe_hyperband", "hg_greedy", "sgd_hd", "pbt"]
    for r in rows:  # every method stays within its budget of training steps
        assert 0 < int(r["steps"]) <= 80 and 0.0 <= float(r["best_val_accuracy"]) <= 1.0
    assert (tmp_path / "out" / "best_so_far.png").read_bytes()[:4] == b"\x89PNG"
    assert "| hg_greedy |" in (tmp_path / "RESULTS.md").read_text()


def test_short_horizon_bias_writes_its_outputs(tmp_path: Path) -> None:
    cmd = [
        sys.executable,
        str(ROOT / "experiments" / "short_horizon_bias.py"),
        "--seeds",
        "0,1",
        "--steps",
        "24",
        "--outer",
        "2",
        "--width",
        "16",
        "--threads",
        "1",
        "--out",
        str(tmp_path / "out"),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = list(csv.DictReader((tmp_path / "out" / "results.csv").open()))
    methods = ["constant", "greedy", "reverse_k10", "carried_forward", "long_horizon"]
    assert [r["method"] for r in rows] == methods * 2
    for r in rows:
        assert float(r["test_loss"]) > 0 and 0.0 <= float(r["test_accuracy"]) <= 1.0
        assert float(r["lr_10%"]) > 0
    constant = [r for r in rows if r["method"] == "constant"]
    assert all(float(r["lr_90%"]) == 0.05 for r in constant)  # untuned: the starting lr
    lrs = list(csv.DictReader((tmp_path / "out" / "lr.csv").open()))
    assert len(lrs) == 2 * len(methods) * 24
    assert (tmp_path / "out" / "short_horizon_bias.png").read_bytes()[:4] == b"\x89PNG"
    assert "| long_horizon |" in (tmp_path / "out" / "summary.md").read_text()


def test_schedule_benchmark_runs() -> None:
    cmd = [
        sys.executable,
        str(ROOT / "experiments" / "bench_schedules.py"),
        "--rounds",
        "1",
        "--k",
        "8",
        "--t",
        "8",
        "--threads",
        "1",
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [line for line in done.stdout.splitlines() if line.startswith("| mlp |")]
    assert len(rows) == 8
    assert all(float(row.split("|")[4]) > 0 for row in rows)


def test_ablation_at_equal_wall_clock_seconds(tmp_path: Path) -> None:
    cmd = [
        sys.executable,
        str(ROOT / "experiments" / "ablation.py"),
        "--seconds",
        "3",
        "--seeds",
        "1",
        "--trial-epochs",
        "1",
        "--methods",
        "random",
        "hg_greedy",
        "pbt",
        "--out",
        str(tmp_path / "out"),
        "--results",
        str(tmp_path / "RESULTS.md"),
        "--threads",
        "1",
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = list(csv.DictReader((tmp_path / "out" / "runs.csv").open()))
    assert [r["method"] for r in rows] == ["random", "hg_greedy", "pbt"]
    for r in rows:  # a method stops only once its seconds are spent (at its next evaluation)
        assert float(r["seconds"]) >= 3.0 and int(r["steps"]) > 0
    curves = list(csv.DictReader((tmp_path / "out" / "curves.csv").open()))
    assert {"seconds", "test_of_best"} <= set(curves[0])
    assert (tmp_path / "out" / "anytime_test_vs_seconds.png").read_bytes()[:4] == b"\x89PNG"
    assert "3 wall-clock seconds" in (tmp_path / "RESULTS.md").read_text()


def test_a_finished_methods_clock_is_frozen() -> None:
    """The headline hands each mode 1/5 of TPE's seconds: TPE's figure must not keep growing
    while the modes run (it did, giving later modes larger budgets)."""
    import time

    ablation = _load_ablation()
    tracker = ablation.Tracker(None, 10.0)
    tracker.finish()
    before = tracker.elapsed
    time.sleep(0.05)
    assert tracker.elapsed == before


def _load_ablation():
    spec = importlib.util.spec_from_file_location("ablation", ROOT / "experiments" / "ablation.py")
    ablation = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ablation)
    return ablation


def test_headline_table_joins_seed_files_and_refuses_mixed_setups(tmp_path: Path) -> None:
    """Headline seeds run in separate processes, each writing seed<k>.csv; the table counts a
    mode as reaching TPE only against TPE of the same seed, and files of another setup (task,
    epochs, threads) are an error, not silently averaged."""
    import argparse

    ablation = _load_ablation()
    rows = {  # seed: [(method, test accuracy)]
        0: [(ablation.TPE_ROW, 0.80), ("plain", 0.81), ("hg_truncated", 0.79)],
        1: [(ablation.TPE_ROW, 0.85), ("plain", 0.82), ("hg_truncated", 0.86)],
    }
    for seed, items in rows.items():
        ablation.write_csv(
            tmp_path / f"seed{seed}.csv",
            [
                {
                    "method": m,
                    "seed": seed,
                    "steps": 10,
                    "seconds": 1.5,
                    "best_val": t,
                    "test_of_best": t,
                    "setup": "S",
                }
                for m, t in items
            ],
        )
    args = argparse.Namespace(headline_task="digits")
    assert ablation.headline_table(args, tmp_path, {}) == 0
    table = (tmp_path / "table.md").read_text()
    assert "seeds [0, 1]" in table
    assert "| plain | 2 | 10 | 1.5 | 0.8150 ± 0.0071 | 0.8150 ± 0.0071 | 1/2 seeds |" in table
    assert "| hg_truncated | 2 |" in table and "| 1/2 seeds |" in table.split("hg_truncated")[1]
    ablation.write_csv(
        tmp_path / "seed2.csv",
        [
            {
                "method": "plain",
                "seed": 2,
                "steps": 1,
                "seconds": 1.0,
                "best_val": 0.5,
                "test_of_best": 0.5,
                "setup": "other",
            }
        ],
    )
    assert ablation.headline_table(args, tmp_path, {}) == 2


def test_fmnist_retrain_runs(tmp_path: Path) -> None:
    """experiments/fmnist_retrain.py on 300 Fashion-MNIST images for one epoch (skipped where
    Debian's dataset-fashion-mnist is not installed; .ci/run installs it)."""
    import json

    import pytest

    from gradhpo.data import SYSTEM_DATA_DIRS

    if not any(
        (d / "train-images-idx3-ubyte.gz").is_file() for d in SYSTEM_DATA_DIRS["fashion_mnist"]
    ):
        pytest.skip("Fashion-MNIST is not installed (apt-get install -y dataset-fashion-mnist)")
    out = tmp_path / "retrain.json"
    model = '{"name": "cnn", "depth": 1, "width": 4, "head": "flatten"}'
    done = subprocess.run(
        [
            sys.executable,
            str(ROOT / "experiments/fmnist_retrain.py"),
            "--model",
            model,
            "--epochs",
            "1",
            "--train-size",
            "300",
            "--device",
            "cpu",
            "--threads",
            "1",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(out.read_text())
    summary = result["summary"]
    assert summary["train_images"] == 300 and len(result["epochs"]) == 1
    assert 0.0 <= summary["final_test_accuracy"] <= 1.0 and summary["parameters"] > 0


@pytest.mark.slow
def test_fmnist_study_retrain_selects_through_a_full_budget_rung(tmp_path: Path) -> None:
    """experiments/fmnist_study_retrain.py end to end on 300 images: a 3-trial study, its two
    best trials promoted to the retrain budget and selected on validation, the pick retrained
    over two seeds; every selected model is under the 100k-parameter limit."""
    import json

    from gradhpo.data import SYSTEM_DATA_DIRS

    if not any(
        (d / "train-images-idx3-ubyte.gz").is_file() for d in SYSTEM_DATA_DIRS["fashion_mnist"]
    ):
        pytest.skip("Fashion-MNIST is not installed (apt-get install -y dataset-fashion-mnist)")
    out = tmp_path / "study"
    args = "--device cpu --workers 1 --threads 1 --trials 3 --startup-trials 2 --trial-epochs 1"
    args += " --epochs 1 --seeds 2 --promote 2 --train-size 300 --study-seconds 120"
    done = subprocess.run(
        [sys.executable, str(ROOT / "experiments/fmnist_study_retrain.py"), *args.split()]
        + ["--out", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    trials = [json.loads(line) for line in (out / "trials.jsonl").read_text().splitlines()]
    assert len(trials) == 3
    complete = {t["number"]: t for t in trials if t["state"] == "COMPLETE"}
    promoted = summary["study"]["promoted"]
    assert set(map(int, promoted["val_accuracy"])) <= set(complete)
    assert promoted["selected_trial"] in complete
    best = max(promoted["val_accuracy"].items(), key=lambda kv: (kv[1], -int(kv[0])))
    assert int(best[0]) == promoted["selected_trial"]
    selected = summary["selected"]
    assert selected["parameters"] < 100_000 and len(selected["test_accuracy"]) == 2
    assert all(0.0 <= a <= 1.0 for a in selected["test_accuracy"])


def test_fmnist_study_parameter_count_matches_the_retrained_reference() -> None:
    """The study's parameter guard counts what the retrain builds: the hand-picked CNN of
    RESULTS.md has 93,482 parameters (its retrain logs say so)."""
    spec = importlib.util.spec_from_file_location(
        "fmnist_study_retrain", ROOT / "experiments/fmnist_study_retrain.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.parameters_of(module.REFERENCE["model"]) == 93_482
    widest = {"name": "cnn", "depth": 3, "width": 64, "head": "flatten", "head_width": 128}
    assert module.parameters_of(widest) >= module.MAX_PARAMETERS  # the space holds what is pruned
