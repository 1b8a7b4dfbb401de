"""``gradhpo train``: one model from a config, as prepare -> run -> summary.

:func:`prepare_train` validates the whole config and builds the run before anything is
written, so a bad config leaves no file behind; :func:`run_train` trains it, writes
``<output.dir>/<name>/{config.yaml, checkpoint.pt, metrics.json}`` (each atomically) and
TensorBoard events under ``<output.tensorboard_dir>/<name>``, and returns the summary.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tqdm import tqdm

from gradhpo.config import ConfigError, validate_train_config
from gradhpo.files import write_json
from gradhpo.jobs.rundir import create_run_dir, run_dir_of
from gradhpo.run import TrainingRun, train_epochs
from gradhpo.run.builder import build_run
from gradhpo.tensorboard_logger import TensorBoardLogger

__all__ = ["prepare_train", "run_train"]


def prepare_train(raw: Mapping[str, Any]) -> tuple[dict[str, Any], TrainingRun]:
    """Validate a train config and build its run; nothing is written."""
    config = validate_train_config(raw)
    directory = run_dir_of(config)
    if directory.exists():
        raise ConfigError(
            f"output: {str(directory)!r} already exists; choose another name (--name) "
            "so that the first run's checkpoint and curves stay as they are"
        )
    return config, build_run(config)


def run_train(
    config: Mapping[str, Any], run: TrainingRun, *, progress: bool = True
) -> dict[str, Any]:
    """Train for ``training.epochs``, evaluate on the test set once at the end, save the
    checkpoint and the metrics; returns the summary written to ``metrics.json``."""
    training, output = config["training"], config["output"]
    run_dir = create_run_dir(run_dir_of(config), "train", config)
    start = time.perf_counter()
    with TensorBoardLogger(Path(output["tensorboard_dir"]) / config["name"]) as tb:
        with tqdm(
            total=training["epochs"],
            desc=config["name"],
            unit="epoch",
            disable=not progress or None,
        ) as bar:
            history = train_epochs(run, training["epochs"], logger=tb, progress=bar)
        test = run.evaluate("test") if not run.diverged else {"loss": math.nan}
        # The hparams metrics are validation figures: the test split is for the final report,
        # never for choosing between runs.
        last = history[-1] if history else {}
        tb.hparams(
            {**run.hyperparameters, **config["model"]},
            {k: last[k] for k in ("val_loss", "val_accuracy") if last.get(k) is not None},
        )
    elapsed = time.perf_counter() - start
    checkpoint = run.save(run_dir / "checkpoint.pt")
    summary = {
        "name": config["name"],
        "hyperparameters": run.hyperparameters,
        "test_loss": test["loss"],
        # None without class labels (a regression loss); 0 for a diverged classifier.
        "test_accuracy": test.get("accuracy", 0.0 if run.data.classification else None),
        "steps": run.global_step,
        "seconds": elapsed,
        "diverged": run.diverged,
        "history": history,
    }
    write_json(run_dir / "metrics.json", summary)
    return {**summary, "checkpoint": str(checkpoint), "device": str(run.device)}
