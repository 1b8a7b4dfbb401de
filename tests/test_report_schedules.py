"""A study whose trials tune an lr schedule: the schedule is logged per segment, reported as
``schedules.png`` and travels through the YAML config (training.epochs sizes it)."""

from __future__ import annotations

from pathlib import Path

import yaml

from gradhpo.cli import main
from gradhpo.report import write_report

CONFIG = {
    "name": "sched",
    "data": {"name": "digits", "seed": 0},
    "model": {"name": "cnn", "depth": 1, "width": 4, "norm": "none"},
    "optimizer": {"name": "sgd", "lr": 0.1, "momentum": 0.9},
    "tuner": {
        "hypers": [{"name": "lr", "schedule": {"segments": 3}}],
        "method": "forward",
        "carry": True,
        "horizon": 3,
        "hyper_lr": 0.1,
        "hyper_val_fraction": 0.1,
    },
    "training": {"epochs": 2, "batch_size": 128, "device": "cpu", "seed": 0},
    "search": {
        "space": {"optimizer.lr": {"type": "float", "low": 0.02, "high": 0.3, "log": True}},
        "sampler": "random",
        "pruner": None,
        "trials": 2,
    },
}


def test_a_study_of_scheduled_runs_reports_the_learned_schedules(
    tmp_path: Path, capsys, monkeypatch
) -> None:
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(CONFIG), encoding="utf-8")
    assert main(["tune", str(path), "--out", str(tmp_path / "runs"), "--no-progress"]) == 0
    run_dir = tmp_path / "runs" / "sched"
    result = write_report(run_dir)
    schedules = run_dir / "report" / "schedules.png"
    assert schedules in result["files"] and schedules.read_bytes()[:4] == b"\x89PNG"
    rows = (run_dir / "report" / "results.csv").read_text()
    assert "lr[0]" in rows and "lr[2]" in rows
    # A study without schedules writes no schedules.png.
    config = dict(CONFIG, name="plain", tuner={**CONFIG["tuner"], "hypers": [{"name": "lr"}]})
    config["tuner"].pop("carry")
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    assert main(["tune", str(path), "--out", str(tmp_path / "runs"), "--no-progress"]) == 0
    plain = write_report(tmp_path / "runs" / "plain")
    assert not any(p.name == "schedules.png" for p in plain["files"])
