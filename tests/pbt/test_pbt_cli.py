"""`gradhpo pbt` end to end on a tiny CNN (hybrid: members also tune lr by hypergradient),
resume of a finished run, report, and one-line config errors."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import yaml
from helpers import digits_pbt_config

from gradhpo.cli import main
from gradhpo.pbt.store import PBTDatabase

TINY = digits_pbt_config(
    "pop",
    tuner={"hypers": [{"name": "lr"}], "method": "greedy", "horizon": 1, "hyper_lr": 0.05},
    pbt={
        "population": 3,
        "interval": 5,
        "steps": 20,
        "space": {
            "optimizer.momentum": {"type": "float", "low": 0.5, "high": 0.95},
            "training.batch_size": {"type": "categorical", "choices": [32, 64, 128]},
            "model.dropout": {"type": "float", "low": 0.05, "high": 0.5},
        },
        "fraction": 0.34,
        "seed": 1,
    },
)


def pbt(tmp_path: Path, config: dict) -> int:
    path = tmp_path / "pbt.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return main(["pbt", str(path), "--out", str(tmp_path / "runs"), "--no-progress"])


def test_pbt_cli_hybrid_run_report_and_resume(tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert pbt(tmp_path, TINY) == 0
    out = capsys.readouterr().out
    assert "pop: best member" in out and "test accuracy" in out
    run_dir = tmp_path / "runs" / "pop"
    db = PBTDatabase(run_dir)
    members = db.members()
    assert [m["step"] for m in members] == [20, 20, 20]
    assert len(db.scores()) == 12 and len(db.lineage()) == 3  # one copier per round, 3 rounds
    for m in members:  # explored values are applied to the live runs
        assert 32 <= m["values"]["training.batch_size"] <= 128
    best = db.get_meta("best")
    assert best["hyperparameters"]["lr"] != 0.1  # the hypergradient moved the lr (hybrid)
    db.close()
    assert list(
        (tmp_path / "tensorboard_logs" / "pop" / "member_000").glob("events.out.tfevents.*")
    )

    assert main(["report", str(run_dir)]) == 0
    for png in ("best_score.png", "lineage.png", "hyperparameters.png"):
        assert (run_dir / "report" / png).read_bytes()[:4] == b"\x89PNG"
    capsys.readouterr()
    assert main(["resume", str(run_dir), "--no-progress"]) == 0  # finished: nothing to redo
    assert "best member" in capsys.readouterr().out
    assert pbt(tmp_path, TINY) == 2
    assert "already holds a PBT run" in capsys.readouterr().err


def _with(path: str, value) -> dict:
    config = copy.deepcopy(TINY)
    *parents, leaf = path.split("/")
    node = config
    for key in parents:
        node = node[key]
    node[leaf] = value
    return config


BAD = [
    ("pbt/population", 1, r"pbt.population: expected an integer >= 2, got 1"),
    (
        "pbt/exploit",
        "best",
        r"pbt.exploit: expected one of \['truncation', 'tournament'\], got 'best'",
    ),
    ("pbt/fraction", 0.7, r"pbt.fraction: expected a number in \(0.0, 0.5\], got 0.7"),
    ("pbt/factors", [], r"pbt.factors: expected a non-empty list"),
    ("pbt/groups", 0, r"pbt.groups: expected an integer >= 1, got 0"),
    ("pbt/groups", "2", r"pbt.groups: expected an integer, got '2'"),
    ("pbt/groups", 4, r"pbt.groups: at most one group per member \(3\), got 4"),
    ("pbt/groups", 2, r"pbt.groups: splits a batched population \(pbt.batched: true\), got 2"),
    ("pbt/space", {}, r"pbt.space: expected at least one parameter"),
    (
        "pbt/space/model.depth",
        {"type": "int", "low": 1, "high": 2},
        r"pbt.space.model.depth: PBT can change",
    ),
    (
        "pbt/space/model.dropout",
        {"type": "float", "low": 0.0, "high": 0.5},
        r"pbt.space.model.dropout.low: must be > 0",
    ),
    (
        "pbt/checkpoints",
        "shared",
        r"pbt.checkpoints: expected one of \['files', 'executor'\], got 'shared'",
    ),
    ("pbt/colour", 1, r"pbt: unknown key\(s\) \['colour'\]"),
    ("model/name", "vit", r"gives an invalid member: .*'vit'"),
]


@pytest.mark.parametrize(("path", "value", "message"), BAD, ids=[b[0] for b in BAD])
def test_bad_pbt_config_one_line_exit_2(
    tmp_path: Path, capsys, monkeypatch, path, value, message
) -> None:
    monkeypatch.chdir(tmp_path)
    assert pbt(tmp_path, _with(path, value)) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("gradhpo: error:") and "\n" not in err and re.search(message, err), err
    assert not (tmp_path / "runs").exists()


def test_batched_population_pbt_matches_one_by_one(tmp_path: Path, monkeypatch) -> None:
    """`pbt.batched: true` trains the members in one vmapped step; the PBT run it gives is the
    one the unbatched members give (same seeds: same exploit decisions and explored values,
    scores equal to float32 rounding)."""
    monkeypatch.chdir(tmp_path)
    config = copy.deepcopy(TINY)
    config["tuner"] = None
    config["model"] = {"name": "cnn", "depth": 1, "width": 4, "norm": "none"}
    config["pbt"]["space"] = {
        "optimizer.lr": {"type": "float", "low": 0.01, "high": 0.5, "log": True}
    }
    results = {}
    for batched in (False, True):
        config["pbt"]["batched"] = batched
        config["name"] = f"pop_{batched}"
        assert pbt(tmp_path, config) == 0
        db = PBTDatabase(tmp_path / "runs" / config["name"])
        results[batched] = (db.scores(), db.lineage())
        db.close()
    (plain_scores, plain_lineage), (batch_scores, batch_lineage) = results[False], results[True]
    assert [(e["step"], e["member"], e["source"]) for e in batch_lineage] == [
        (e["step"], e["member"], e["source"]) for e in plain_lineage
    ]
    assert len(batch_lineage) == 3
    for a, b in zip(plain_scores, batch_scores, strict=True):
        assert (a["step"], a["member"]) == (b["step"], b["member"])
        assert b["score"] == pytest.approx(a["score"], abs=1e-6)
        assert b["values"]["optimizer.lr"] == pytest.approx(a["values"]["optimizer.lr"], rel=1e-12)


def test_batched_pbt_config_limits(tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    config = copy.deepcopy(TINY)
    config["pbt"]["batched"] = True
    assert pbt(tmp_path, config) == 2
    assert (
        "pbt.batched: a batched population cannot run a hypergradient tuner"
        in capsys.readouterr().err
    )
    config["tuner"] = None
    assert pbt(tmp_path, config) == 2
    assert "a batched population can only explore optimizer.* values" in capsys.readouterr().err
    # Batched groups train in lockstep, in process or one task per group on an executor.
    config["pbt"]["space"] = {"optimizer.lr": {"type": "float", "low": 0.01, "high": 0.5}}
    config["pbt"]["executor"] = {"name": "processes", "workers": 2}
    config["pbt"]["mode"] = "async"
    assert pbt(tmp_path, config) == 2
    err = capsys.readouterr().err.strip()
    assert err == "gradhpo: error: pbt.batched: needs mode 'sync', got 'async'", err


def test_pbt_hybrid_with_a_learned_lr_schedule(tmp_path: Path, capsys, monkeypatch) -> None:
    """A schedule is a hyperparameter like any other: members tune an lr schedule by
    hypergradient between exploits, and the copied state carries it."""
    monkeypatch.chdir(tmp_path)
    config = copy.deepcopy(TINY)
    config["tuner"]["hypers"] = [{"name": "lr", "schedule": {"segments": 2}}]
    assert pbt(tmp_path, config) == 0
    db = PBTDatabase(tmp_path / "runs" / "pop")
    best = db.get_meta("best")["hyperparameters"]
    db.close()
    assert {"lr[0]", "lr[1]"} <= set(best) and "lr" not in best
    assert best["lr[0]"] != 0.1  # the first segment was tuned
