"""What the PBT tests share: the quartic population's lr space and starting values, the tiny
digits CNN configs of the config-driven runs, and the readings of a run (its trace, its result,
its checkpoint references) that the tests compare."""

from __future__ import annotations

import copy
import math
import sqlite3
from pathlib import Path
from typing import Any

import numpy as np

from gradhpo.pbt.manager import PopulationBasedTraining
from gradhpo.pbt.store import PBTDatabase
from gradhpo.search.space import SearchSpace

#: The learning rate the quartic populations explore.
LR = SearchSpace.from_config(
    {"optimizer.lr": {"type": "float", "low": 1e-4, "high": 10.0, "log": True}}
)

#: The run sections of the tiny digits CNN that the config-driven PBT tests train.
DIGITS_CNN: dict[str, Any] = {
    "data": {"name": "digits", "seed": 0},
    "model": {"name": "cnn", "depth": 1, "width": 4, "norm": "none", "dropout": 0.1},
    "optimizer": {"name": "sgd", "lr": 0.1, "momentum": 0.9},
    "training": {"epochs": 1, "batch_size": 64, "device": "cpu", "seed": 0},
}

#: Four members, 20 steps in intervals of 5 (4 steps: an exploit after each of the first 3),
#: exploring lr, batch size and dropout.
PBT_SECTION: dict[str, Any] = {
    "population": 4,
    "interval": 5,
    "steps": 20,
    "space": {
        "optimizer.lr": {"type": "float", "low": 0.02, "high": 0.3, "log": True},
        "training.batch_size": {"type": "categorical", "choices": [32, 64]},
        "model.dropout": {"type": "float", "low": 0.05, "high": 0.5},
    },
    "fraction": 0.25,
    "seed": 1,
}

#: Hybrid PBT: every member also tunes a carried forward-mode lr schedule and its momentum by
#: hypergradient. A horizon of 3 in intervals of 5 leaves a tuner's horizon open at every
#: checkpoint.
HYBRID_TUNER: dict[str, Any] = {
    "hypers": [{"name": "lr", "schedule": {"segments": 3}}, {"name": "momentum"}],
    "method": "forward",
    "horizon": 3,
    "carry": True,
    "hyper_val_fraction": 0.1,
    "hyper_optimizer": "adam",
    "hyper_lr": 0.05,
}


def digits_pbt_config(name: str, **sections: Any) -> dict[str, Any]:
    """A new config (deep copies, free to change): ``name``, the sections of
    :data:`DIGITS_CNN`, ``pbt`` = :data:`PBT_SECTION`, then ``sections`` (a ``tuner``, or
    whole sections that replace those)."""
    return copy.deepcopy({"name": name, **DIGITS_CNN, "pbt": PBT_SECTION, **sections})


def initial_lrs(population: int, seed: int = 0, high: float = 0.05) -> list[dict[str, float]]:
    """Starting values of a quartic population: lrs log-uniform in [1e-4, high]."""
    lrs = np.exp(np.random.RandomState(seed).uniform(math.log(1e-4), math.log(high), population))
    return [{"optimizer.lr": float(x)} for x in lrs]


def trace(pbt: PopulationBasedTraining) -> tuple[list, list]:
    """Every score (with its values) and every exploit of a run, in order."""
    scores = [(s["step"], s["member"], s["score"], s["values"]) for s in pbt.db.scores()]
    lineage = [(e["step"], e["member"], e["source"], e["new"]) for e in pbt.db.lineage()]
    return scores, lineage


def run_result(run_dir: Path, best: bool = True) -> dict[str, Any]:
    """What a user gets from a finished config-driven run: every score, every exploit, every
    member, the best member (``best=False``: a run the CLI did not finish, without it)."""
    db = PBTDatabase(run_dir)
    try:
        result: dict[str, Any] = {
            "scores": [(s["step"], s["member"], s["score"], s["values"]) for s in db.scores()],
            "lineage": [
                (e["step"], e["member"], e["source"], e["old"], e["new"]) for e in db.lineage()
            ],
            "members": [(m["member"], m["step"], m["values"], m["score"]) for m in db.members()],
        }
        if best:
            result["best"] = dict(db.get_meta("best"))
            result["best"].pop("resumed")
        return result
    finally:
        db.close()


def members_per_checkpoint(db: PBTDatabase) -> dict[int, int]:
    """How many members point at each checkpoint (what its reference count must be)."""
    pointing: dict[int, int] = {}
    for m in db.members():
        pointing[m["checkpoint"]] = pointing.get(m["checkpoint"], 0) + 1
    return pointing


def check_references(db: PBTDatabase) -> None:
    """Every reference is a member that resumes from the checkpoint, nothing else, and the
    checkpoint files are those of the referenced checkpoints: none missing, none orphaned."""
    refs = db.refcounts()
    assert refs == members_per_checkpoint(db)
    files = {p.name for p in db.checkpoint_dir.iterdir()}
    assert files == {db.checkpoint_path(c).name for c in refs}


def count_scores(run_dir: Path) -> int:
    """The scores committed so far in the run directory's database, read while another process
    writes it (0 while it cannot be read)."""
    try:
        with sqlite3.connect(run_dir / "pbt.db", timeout=5) as conn:
            return conn.execute("SELECT COUNT(*) FROM scores").fetchone()[0]
    except sqlite3.Error:
        return 0
