"""Hybrid PBT (members also tune lr and weight decay by hypergradient) vs plain PBT.

Three arms train the same population (same initial values drawn from the same prior, same seeds,
same number of optimizer steps, same exploit/explore settings) on the digits CNN; the hybrid
arm adds a ``tuner`` section, so between exploits each member adapts its learning rate and
weight decay by reverse-mode hypergradients against validation batches, while PBT explores
momentum and batch size and restarts weak members from strong ones. Reported: best member's
validation loss and test accuracy, and wall time (the hypergradient costs extra compute per
step, so equal steps is not equal seconds: a third arm gives plain PBT the hybrid's wall time
as extra epochs).

    python experiments/pbt_hybrid_vs_plain.py --seeds 3

Writes experiments/results/pbt_hybrid_vs_plain/{results.csv, results.md}.
"""

from __future__ import annotations

import argparse
import copy
import csv
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from gradhpo.config import load_yaml
from gradhpo.jobs.pbt import prepare_pbt, run_pbt

ROOT = Path(__file__).resolve().parents[1]


def arm(config: dict, hybrid: bool, seed: int, out: Path, epochs: int | None = None) -> dict:
    config = copy.deepcopy(config)
    label = "hybrid" if hybrid else ("plain" if epochs is None else "plain, equal time")
    config["name"] = f"{label.replace(', ', '_').replace(' ', '_')}_s{seed}"
    if epochs is not None:
        config["training"]["epochs"] = epochs
    config["training"]["seed"] = seed
    config["pbt"]["seed"] = seed
    config["output"] = {"dir": str(out), "tensorboard_dir": str(out / "tb")}
    if not hybrid:
        config["tuner"] = None
    manager, resolved, population = prepare_pbt(config)
    start = time.perf_counter()
    best = run_pbt(manager, resolved, population, progress=False)
    seconds = time.perf_counter() - start
    manager.close()
    return {
        "arm": label,
        "epochs": config["training"]["epochs"],
        "seed": seed,
        "val_loss": best["score"],
        "test_accuracy": best["test_accuracy"],
        "seconds": seconds,
        "final_lr": best["hyperparameters"].get("lr"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=ROOT / "experiments/configs/digits_pbt.yaml")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--out", type=Path, default=ROOT / "experiments/results/pbt_hybrid_vs_plain"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    config = load_yaml(args.config)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in range(args.seeds):
            plain = arm(config, False, seed, Path(tmp))
            hybrid = arm(config, True, seed, Path(tmp))
            # Plain PBT given the hybrid's wall time: more epochs, same everything else.
            scale = hybrid["seconds"] / max(plain["seconds"], 1e-9)
            epochs = max(plain["epochs"], round(plain["epochs"] * scale))
            long = arm(config, False, seed, Path(tmp), epochs=epochs)
            for row in (plain, hybrid, long):
                rows.append(row)
                print(
                    f"seed {seed} {row['arm']:>17} ({row['epochs']} epochs): val loss "
                    f"{row['val_loss']:.4f}, test acc {row['test_accuracy']:.4f}, {row['seconds']:.1f} s"
                )
    args.out.mkdir(parents=True, exist_ok=True)
    with (args.out / "results.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    lines = [
        "# Hybrid PBT (hypergradient-tuned lr/wd inside members) vs plain PBT",
        "",
        f"`python experiments/pbt_hybrid_vs_plain.py --seeds {args.seeds}` on {platform.machine()}, "
        f"torch threads {args.threads}, config `{args.config.relative_to(ROOT)}`, {time.strftime('%Y-%m-%d')}.",
        "",
        "| arm | val loss (median) | test accuracy (median) | per seed test accuracy | seconds (median) |",
        "|---|---|---|---|---|",
    ]
    for name in ("plain", "hybrid", "plain, equal time"):
        sel = [r for r in rows if r["arm"] == name]
        per_seed = ", ".join(f"{r['test_accuracy']:.4f}" for r in sel)
        lines.append(
            f"| {name} | {statistics.median(r['val_loss'] for r in sel):.4f} | "
            f"{statistics.median(r['test_accuracy'] for r in sel):.4f} | "
            f"{per_seed} | "
            f"{statistics.median(r['seconds'] for r in sel):.1f} |"
        )
    (args.out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
