"""PBT on a task whose best learning rate first rises, then falls (gradhpo.testing.quartic).

For several seeds: a population of 8 members with log-uniform initial learning rates in
[1e-4, 10] is trained (a) with every learning rate kept fixed and (b) with PBT (truncation
25 %, perturb x0.8 / x1.2, an interval of 25 steps). PBT should beat every fixed member of the
same population. Also plots the learning rate of the final best member's ancestry over time
(the schedule PBT discovered) and the best score over time.

    python experiments/pbt_lr_schedule.py --seeds 5

Writes experiments/results/pbt_lr_schedule/{results.csv, results.md, schedule.png}.
Expected (checked): PBT's best score beats the best fixed member on every seed.
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
import tempfile
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from gradhpo.pbt.manager import PopulationBasedTraining  # noqa: E402
from gradhpo.search.space import SearchSpace  # noqa: E402
from gradhpo.testing.quartic import QuarticMember  # noqa: E402

SPACE = SearchSpace.from_config(
    {"optimizer.lr": {"type": "float", "low": 1e-4, "high": 10.0, "log": True}}
)


def ancestry_lr(pbt: PopulationBasedTraining, member: int) -> list[tuple[int, float]]:
    """The lr the final best member's line of ancestors trained with, step by step."""
    scores = pbt.db.scores()
    lineage = pbt.db.lineage()
    points = []
    current = member
    step = pbt.total_steps
    # Walk back: at each exploit of `current`, switch to its source before that step.
    events = sorted(lineage, key=lambda e: e["step"], reverse=True)
    for s in sorted({r["step"] for r in scores}, reverse=True):
        for e in events:
            if e["step"] == s and e["member"] == current:
                current = e["source"]
        row = [r for r in scores if r["step"] == s and r["member"] == current]
        if row:
            points.append((s, row[0]["values"]["optimizer.lr"]))
        step = s
    del step
    return sorted(points)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--population", type=int, default=8)
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--interval", type=int, default=25)
    parser.add_argument("--out", type=Path, default=Path("experiments/results/pbt_lr_schedule"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    rows, schedules, curves = [], [], []
    for seed in range(args.seeds):
        lrs = np.exp(
            np.random.RandomState(seed).uniform(math.log(1e-4), math.log(10), args.population)
        )
        fixed = []
        for i, lr in enumerate(lrs):
            member = QuarticMember(float(lr), seed=100 + i)
            member.step(args.steps)
            fixed.append(member.score())
        with tempfile.TemporaryDirectory() as tmp:
            pbt = PopulationBasedTraining(
                lambda i, v: QuarticMember(v["optimizer.lr"], seed=100 + i),
                SPACE.parameters,
                tmp,
                population=args.population,
                interval=args.interval,
                total_steps=args.steps,
                seed=seed,
                resample_probability=0.0,
                initial_values=[{"optimizer.lr": float(lr)} for lr in lrs],
            )
            best = pbt.run()
            schedules.append(ancestry_lr(pbt, best["member"]))
            by_step: dict[int, float] = {}
            for r in pbt.db.scores():
                if r["score"] is not None and math.isfinite(r["score"]):
                    by_step[r["step"]] = max(by_step.get(r["step"], -math.inf), r["score"])
            curves.append(sorted(by_step.items()))
            exploits = len(pbt.db.lineage())
            pbt.close()
        finite = [s for s in fixed if not math.isnan(s)]
        best_fixed = max(finite) if finite else math.nan
        best_lr = float(lrs[int(np.nanargmax(np.where(np.isnan(fixed), -np.inf, fixed)))])
        lr_path = [p[1] for p in schedules[-1]]
        peak = int(np.argmax(lr_path))
        rows.append(
            {
                "seed": seed,
                "schedule_start_lr": lr_path[0],
                "schedule_peak_lr": lr_path[peak],
                "schedule_peak_step": schedules[-1][peak][0],
                "schedule_end_lr": lr_path[-1],
                "rises_then_falls": lr_path[peak] > 1.2 * lr_path[0]
                and lr_path[-1] < lr_path[peak] / 1.2,
                "pbt_score": best["score"],
                "best_fixed_score": best_fixed,
                "best_fixed_lr": best_lr,
                "fixed_diverged": sum(math.isnan(s) for s in fixed),
                "pbt_final_lr": best["values"]["optimizer.lr"],
                "exploits": exploits,
                "pbt_wins": best["score"] > best_fixed,
            }
        )
        print(
            f"seed {seed}: PBT -log10(loss) {best['score']:.3f} vs best fixed {best_fixed:.3f} "
            f"(lr {best_lr:.3g}); {rows[-1]['fixed_diverged']} fixed members diverged; PBT's lr "
            f"{lr_path[0]:.3g} -> peak {lr_path[peak]:.3g} at step {schedules[-1][peak][0]} -> {lr_path[-1]:.3g}"
        )

    with (args.out / "results.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    lines = [
        "# PBT on the rising-then-falling learning-rate task",
        "",
        f"`python experiments/pbt_lr_schedule.py --seeds {args.seeds}`: population {args.population}, "
        f"{args.steps} steps, interval {args.interval}; score = -log10(loss), higher is better.",
        "",
        "| seed | PBT | best fixed lr member | its lr | fixed diverged | PBT lr: start -> peak (step) -> end | exploits |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['seed']} | {r['pbt_score']:.3f} | {r['best_fixed_score']:.3f} | {r['best_fixed_lr']:.3g} | "
            f"{r['fixed_diverged']} | {r['schedule_start_lr']:.3g} -> {r['schedule_peak_lr']:.3g} "
            f"({r['schedule_peak_step']}) -> {r['schedule_end_lr']:.3g} | {r['exploits']} |"
        )
    wins = sum(r["pbt_wins"] for r in rows)
    shaped = sum(r["rises_then_falls"] for r in rows)
    lines += [
        "",
        f"PBT beats every fixed-lr member on {wins}/{len(rows)} seeds (expected: all).",
        f"The schedule PBT found rises (>1.2x) then falls (>1.2x) on {shaped}/{len(rows)} seeds.",
    ]
    (args.out / "results.md").write_text("\n".join(lines) + "\n")

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for seed, points in enumerate(schedules):
        axes[0].plot([p[0] for p in points], [p[1] for p in points], label=f"seed {seed}")
    axes[0].set_yscale("log")
    axes[0].set_xlabel("step")
    axes[0].set_ylabel("lr of the best member's ancestry")
    axes[0].set_title("schedule found by PBT (rises, then falls)")
    for seed, curve in enumerate(curves):
        axes[1].plot([c[0] for c in curve], [c[1] for c in curve], label=f"seed {seed}")
        axes[1].axhline(rows[seed]["best_fixed_score"], linestyle=":", color=f"C{seed}")
    axes[1].set_xlabel("step")
    axes[1].set_ylabel("-log10(loss), best member")
    axes[1].set_title("PBT (solid) vs best fixed lr (dotted)")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(args.out / "schedule.png", dpi=100)
    print(
        f"PBT beats every fixed-lr member on {wins}/{len(rows)} seeds; schedule rises then falls on {shaped}; wrote {args.out}"
    )
    return 0 if wins == len(rows) else 1


if __name__ == "__main__":
    sys.exit(main())
