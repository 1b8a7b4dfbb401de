"""Benchmark: the shipped digits CNN config, time to train and test accuracy.

Goal (foundation issue): >= 95 % test accuracy in under a minute on 2 CPU cores.
Runs the config of ``make run`` (with its hypergradient tuner, or without it with
``--no-tuner``) several times with different seeds and reports medians.

    python experiments/bench_digits_cnn.py [--repeats 3] [--config experiments/configs/digits_cnn.yaml]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path

import torch

from gradhpo.config import load_yaml, validate_train_config
from gradhpo.run.builder import build_run

ROOT = Path(__file__).resolve().parents[1]


def train_once(config: dict, seed: int, device: str, plain: bool) -> tuple[float, float]:
    """Returns (seconds, test accuracy) of one full training run."""
    training = config["training"]
    start = time.perf_counter()
    run_config = {**config, "data": {**config["data"], "seed": seed}}
    if plain:
        run_config["tuner"] = None
    run = build_run(run_config, seed=seed, device=device)
    run.step(training["epochs"] * run.steps_per_epoch)
    accuracy = run.evaluate("test")["accuracy"]
    if run.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, accuracy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=ROOT / "experiments/configs/digits_cnn.yaml")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="auto")
    parser.add_argument(
        "--no-tuner", action="store_true", help="train without the config's hypergradient tuner"
    )
    args = parser.parse_args()

    config = validate_train_config(load_yaml(args.config))
    results = [train_once(config, seed, args.device, args.no_tuner) for seed in range(args.repeats)]
    for seed, (seconds, accuracy) in enumerate(results):
        print(f"seed {seed}: {seconds:6.2f} s  test accuracy {accuracy:.4f}")
    seconds = statistics.median(r[0] for r in results)
    accuracy = statistics.median(r[1] for r in results)
    print(
        f"median of {args.repeats}: {seconds:.2f} s, test accuracy {accuracy:.4f} "
        f"(min {min(r[1] for r in results):.4f}); torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, {platform.processor() or platform.machine()}"
    )


if __name__ == "__main__":
    main()
