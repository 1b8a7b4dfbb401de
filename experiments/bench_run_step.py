"""Time one plain TrainingRun step (digits CNN depth 2 width 16 with BatchNorm, SGD momentum,
batch 32, 2 torch threads): the median of 7 timings of ``run.step(50)`` after 20 warm-up
steps, printed in ms per step. Run it in alternating processes on two trees (e.g. a git
worktree of an older commit with PYTHONPATH pointing at it) to compare them:

    python experiments/bench_run_step.py
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # so that `python experiments/...` works without installing
    sys.path.insert(0, str(ROOT))

from gradhpo.run import TrainingRun  # noqa: E402


def main() -> None:
    torch.set_num_threads(2)
    torch.set_flush_denormal(True)
    run = TrainingRun(
        model={"name": "cnn", "depth": 2, "width": 16, "norm": "batch"},
        data={"name": "digits", "seed": 0},
        optimizer={"name": "sgd", "lr": 0.05, "momentum": 0.9},
        batch_size=32,
        device="cpu",
    )
    run.step(20)
    times = []
    for _ in range(7):
        start = time.perf_counter()
        run.step(50)
        times.append(time.perf_counter() - start)
    print(f"{sorted(times)[3] / 50 * 1e3:.3f}")


if __name__ == "__main__":
    main()
