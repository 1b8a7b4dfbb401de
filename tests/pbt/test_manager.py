"""PBT manager: exploit/explore statistics, ties, reference-counted checkpoints under many
exploits, resume after a killed process, and the rising-then-falling learning-rate task."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from helpers import LR, check_references, initial_lrs

from gradhpo.pbt.manager import PopulationBasedTraining
from gradhpo.pbt.store import PBTDatabase
from gradhpo.pbt.strategies import explore, perturb, rank, resample, tournament, truncation
from gradhpo.search.space import SearchSpace
from gradhpo.testing.quartic import QuarticMember


def test_rank_ties_and_nan() -> None:
    assert rank([0.5, 0.9, 0.5, float("nan"), 0.9]) == [1, 4, 0, 2, 3]
    assert rank([0.5, 0.1, 0.5], maximize=False) == [1, 0, 2]


def test_truncation_fractions_and_uniform_sources() -> None:
    rng = np.random.RandomState(0)
    scores = [0.1 * i for i in range(8)]  # member 7 best, 0 worst
    counts = {6: 0, 7: 0}
    for _ in range(2000):
        copies = truncation(scores, 0.25, rng)
        assert set(copies) == {0, 1}  # bottom 25 % of 8
        for winner in copies.values():
            counts[winner] += 1
    share = counts[7] / 4000
    assert 0.46 < share < 0.54  # uniform over the top 25 %
    # All tied: the fixed tie-break puts the higher indices at the bottom.
    assert set(truncation([1.0] * 8, 0.25, rng)) == {6, 7}
    assert set(truncation(scores, 0.5, rng)) == {0, 1, 2, 3}
    with pytest.raises(ValueError, match="fraction must be in"):
        truncation(scores, 0.6, rng)


def test_tournament_copies_only_from_higher_ranked() -> None:
    rng = np.random.RandomState(1)
    scores = [0.3, 0.9, 0.5, 0.1]
    copied = {i: 0 for i in range(4)}
    for _ in range(3000):
        for loser, winner in tournament(scores, rng).items():
            assert rank(scores).index(winner) < rank(scores).index(loser)
            copied[loser] += 1
    assert copied[1] == 0 and copied[3] == 3000  # the best never copies, the worst always
    assert abs(copied[2] / 3000 - 1 / 3) < 0.04  # member 2 meets the best in 1/3 of draws


def test_perturb_and_resample_statistics() -> None:
    rng = np.random.RandomState(2)
    (p,) = LR.parameters
    values = [perturb(p, 0.1, (0.8, 1.2), rng) for _ in range(4000)]
    assert set(np.round(values, 12)) == {0.08, 0.12}
    assert abs(np.mean(np.isclose(values, 0.12)) - 0.5) < 0.03
    assert (
        perturb(p, 9.5, (1.2,), rng) == 10.0 and perturb(p, 1.1e-4, (0.8,), rng) == 1e-4
    )  # clipped
    space = SearchSpace.from_config(
        {
            "training.batch_size": {"type": "int", "low": 8, "high": 64},
            "model.norm": {"type": "categorical", "choices": ["a", "b", "c"]},
        }
    )
    bs, cat = space.parameters
    assert perturb(bs, 2, (1.2,), rng) == 8 and perturb(bs, 8, (1.2,), rng) == 10
    assert perturb(bs, 9, (1.05,), rng) == 10  # rounding would undo the move: one step instead
    assert perturb(cat, "a", (1.2,), rng) == "b" and perturb(cat, "c", (1.2,), rng) == "b"
    assert {perturb(cat, "b", (1.2,), rng) for _ in range(50)} == {"a", "c"}
    logs = np.log10([resample(p, rng) for _ in range(4000)])
    assert logs.min() >= -4 and logs.max() <= 1 and abs(logs.mean() - (-1.5)) < 0.1  # log-uniform
    hits = [
        explore([p], {"optimizer.lr": 0.1}, rng, resample_probability=0.3)["optimizer.lr"]
        for _ in range(3000)
    ]
    resampled = np.mean([not (np.isclose(h, 0.08) or np.isclose(h, 0.12)) for h in hits])
    assert abs(resampled - 0.3) < 0.04


def _toy_pbt(directory: Path, **kw) -> PopulationBasedTraining:
    settings = dict(population=6, interval=20, total_steps=200, seed=3, resample_probability=0.0)
    settings.update(kw)
    return PopulationBasedTraining(
        lambda i, v: QuarticMember(v["optimizer.lr"], seed=100 + i),
        LR.parameters,
        directory,
        initial_values=initial_lrs(settings["population"]),
        **settings,
    )


@pytest.mark.parametrize("exploit", ["truncation", "tournament"])
@pytest.mark.parametrize("mode", ["sync", "async"])
def test_checkpoint_reference_counts_under_many_exploits(
    tmp_path: Path, exploit: str, mode: str
) -> None:
    pbt = _toy_pbt(tmp_path, exploit=exploit, mode=mode, interval=2, total_steps=80, fraction=0.5)
    pbt.run()
    lineage = pbt.db.lineage()
    assert len(lineage) >= 40
    check_references(pbt.db)
    for event in lineage:  # a copier always takes a source's values, then explores them
        assert event["source"] != event["member"]


def test_refcounts_random_operations(tmp_path: Path) -> None:
    db = PBTDatabase(tmp_path)
    rng = np.random.RandomState(0)
    n = 5
    for step in range(1, 60):
        with db.transaction():
            if step == 1 or rng.rand() < 0.5:
                i = int(rng.randint(n)) if step > 1 else None
                for m in [i] if i is not None else range(n):
                    ck = db.add_checkpoint(m, step, db.write_checkpoint(m, step, {"x": step}))
                    db.set_member(m, step, ck, {}, 0.0)
            else:
                loser, winner = rng.choice(n, 2, replace=False)
                source = [m for m in db.members() if m["member"] == winner][0]["checkpoint"]
                db.set_member(int(loser), step, source, {}, 0.0)
        check_references(db)
    for m in db.members():  # every member can still restore its state
        assert db.load_checkpoint(m["checkpoint"])["x"] >= 1


def test_pbt_beats_every_fixed_learning_rate_on_the_quartic(tmp_path: Path) -> None:
    """The best lr rises (curvature falls) then falls (noise floor): PBT's best member beats
    every member of the same population trained with its initial lr kept fixed."""
    for seed in (0, 1):
        initial = initial_lrs(8, seed=seed, high=10.0)
        fixed = []
        for i, values in enumerate(initial):
            member = QuarticMember(values["optimizer.lr"], seed=100 + i)
            member.step(600)
            fixed.append(member.score())
        pbt = PopulationBasedTraining(
            lambda i, v: QuarticMember(v["optimizer.lr"], seed=100 + i),
            LR.parameters,
            tmp_path / f"s{seed}",
            population=8,
            interval=20,
            total_steps=600,
            seed=seed,
            resample_probability=0.0,
            initial_values=initial,
        )
        best = pbt.run()
        best_fixed = max(s for s in fixed if not math.isnan(s))
        assert best["score"] > best_fixed + 0.3, (best, fixed)


def test_pbt_arguments_are_checked(tmp_path: Path) -> None:
    for kwargs, message in [
        ({"population": 1}, "population must be an integer >= 2, got 1"),
        ({"interval": 0}, "interval must be an integer >= 1, got 0"),
        ({"exploit": "greedy"}, "exploit must be 'truncation' or 'tournament', got 'greedy'"),
        ({"explore": "mutate"}, "explore must be"),
        ({"mode": "batch"}, "mode must be 'sync' or 'async', got 'batch'"),
        ({"fraction": 0.9}, "fraction must be in"),
        ({"factors": [0.8, -1]}, "factors must be positive"),
        ({"checkpoints": "s3"}, "checkpoints must be 'files' or 'executor', got 's3'"),
    ]:
        with pytest.raises(ValueError, match=message):
            _toy_pbt(tmp_path / "bad", **kwargs)


SCRIPT = textwrap.dedent(
    """
    import math, sys, time
    import numpy as np
    from gradhpo.pbt.manager import PopulationBasedTraining
    from gradhpo.testing.quartic import QuarticMember
    from gradhpo.search.space import SearchSpace

    class Slow(QuarticMember):
        def step(self, n):
            time.sleep(0.002 * n)
            return super().step(n)

    lr = SearchSpace.from_config({"optimizer.lr": {"type": "float", "low": 1e-4, "high": 10.0, "log": True}})
    lrs = np.exp(np.random.RandomState(0).uniform(math.log(1e-4), math.log(0.05), 6))
    pbt = PopulationBasedTraining(
        lambda i, v: Slow(v["optimizer.lr"], seed=100 + i), lr.parameters, sys.argv[1],
        population=6, interval=10, total_steps=300, seed=3, resample_probability=0.0,
        mode=sys.argv[2], initial_values=[{"optimizer.lr": float(x)} for x in lrs])
    pbt.run()
    """
)


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_resume_after_killed_process_loses_at_most_one_interval(tmp_path: Path, mode: str) -> None:
    reference = _toy_pbt(tmp_path / "ref", interval=10, total_steps=300, mode=mode)
    expected = reference.run()

    script = tmp_path / "pbt_script.py"
    script.write_text(SCRIPT)
    run_dir = tmp_path / "killed"
    proc = subprocess.Popen(
        [sys.executable, str(script), str(run_dir), mode],
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if (run_dir / "pbt.db").is_file():
                db = PBTDatabase(run_dir)
                steps = [m["step"] for m in db.members()]
                db.close()
                if steps and min(steps) >= 100:
                    break
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    db = PBTDatabase(run_dir)
    committed = [m["step"] for m in db.members()]
    db.close()
    assert 100 <= min(committed) < 300  # killed mid-run

    resumed = _toy_pbt(run_dir, interval=10, total_steps=300, mode=mode)
    assert resumed.start() is True
    assert resumed.steps == committed  # continues from the last committed interval
    best = resumed.run()
    # Deterministic task: the resumed run ends exactly where the uninterrupted one did.
    assert best["member"] == expected["member"] and best["score"] == pytest.approx(
        expected["score"], rel=1e-12
    )
    assert resumed.values == reference.values
    assert len(resumed.db.lineage()) == len(reference.db.lineage())
    check_references(resumed.db)


@pytest.mark.parametrize("maximize", [True, False])
def test_report_best_member_curve_follows_the_direction(tmp_path: Path, maximize: bool) -> None:
    """best_score.png's "best member" is the max of the scores for an accuracy and the min
    for a loss (it was always the max: the worst member, for val_loss)."""
    import matplotlib.pyplot as plt

    from gradhpo.report import write_pbt_report

    pbt = _toy_pbt(tmp_path / "run", population=4, interval=5, total_steps=10, maximize=maximize)
    pbt.run()
    scores = PBTDatabase(tmp_path / "run").scores()
    plotted: list = []
    original = plt.Axes.plot

    def spy(self, xs, ys, *args, **kwargs):
        if kwargs.get("label") == "best member":
            plotted.append(list(ys))
        return original(self, xs, ys, *args, **kwargs)

    plt.Axes.plot = spy
    try:
        write_pbt_report(tmp_path / "run")
    finally:
        plt.Axes.plot = original
    by_step: dict[int, list[float]] = {}
    for s in scores:
        by_step.setdefault(s["step"], []).append(s["score"])
    pick = max if maximize else min
    assert plotted == [[pick(by_step[t]) for t in sorted(by_step)]]
    assert plotted[0] != [(min if maximize else max)(by_step[t]) for t in sorted(by_step)]


def test_a_garbage_database_is_one_clear_error_and_is_left_alone(tmp_path: Path) -> None:
    from gradhpo.config import ConfigError

    (tmp_path / "pbt.db").write_bytes(b"garbage, not SQLite\n")
    with pytest.raises(ConfigError, match="not a readable PBT database"):
        PBTDatabase(tmp_path)
    assert (tmp_path / "pbt.db").read_bytes() == b"garbage, not SQLite\n"
