"""The ``gradhpo`` command.

User mistakes (bad config, unknown model, missing data files...) are printed as one line on
stderr and exit with code 2; nothing is written to disk before the config has been checked.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from gradhpo.config import ConfigError, load_yaml, validate_train_config

__all__ = ["main"]

EXIT_USAGE = 2


class UserError(Exception):
    """An error caused by the user's input: reported in one line, exit code 2."""


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gradhpo", description="Gradient-based hyperparameter optimization for PyTorch."
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    train = sub.add_parser(
        "train",
        help="train one model from a YAML config",
        description="Train one model from a YAML config (data, model, optimizer, training, output).",
    )
    train.add_argument("config", type=Path, help="path to a YAML config")
    train.add_argument("--epochs", type=int, default=None, help="override training.epochs")
    train.add_argument("--device", default=None, help="override training.device (auto, cpu, cuda)")
    train.add_argument("--out", type=Path, default=None, help="override output.dir")
    train.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    train.set_defaults(func=_cmd_train)
    return parser


def run_config_from_train_config(config: dict[str, Any]) -> dict[str, Any]:
    """The :meth:`TrainingRun.from_config` mapping of a validated train/tune config."""
    training = config["training"]
    return {
        "model": config["model"],
        "data": config["data"],
        "optimizer": config["optimizer"],
        "tuner": config["tuner"],
        "batch_size": training["batch_size"],
        "seed": training["seed"],
        "device": training["device"],
        "augment": training["augment"],
    }


def build_run(run_config: dict[str, Any], data: Any = None) -> Any:
    """Build a TrainingRun; the user's mistakes become :class:`UserError`."""
    from gradhpo.data import DatasetNotFoundError
    from gradhpo.run import TrainingRun
    from models import ModelConfigError

    try:
        return TrainingRun.from_config(run_config, data=data)
    except (ModelConfigError, DatasetNotFoundError) as exc:
        raise UserError(str(exc)) from exc
    except (ValueError, TypeError) as exc:
        raise UserError(f"invalid config: {exc}") from exc


def _prepare_train(args: argparse.Namespace) -> tuple[dict[str, Any], Any]:
    """Validate the config and build the run; every failure here is the user's input."""
    raw = load_yaml(args.config)
    if args.epochs is not None:
        raw.setdefault("training", {})["epochs"] = args.epochs
    if args.device is not None:
        raw.setdefault("training", {})["device"] = args.device
    if args.out is not None:
        raw.setdefault("output", {})["dir"] = str(args.out)
    config = validate_train_config(raw)
    return config, build_run(run_config_from_train_config(config))


def _cmd_train(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from gradhpo.logging import TensorBoardLogger
    from gradhpo.training import train_epochs

    config, run = _prepare_train(args)
    training, output = config["training"], config["output"]
    run_dir = Path(output["dir"]) / config["name"]
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")

    start = time.perf_counter()
    with TensorBoardLogger(Path(output["tensorboard_dir"]) / config["name"]) as tb:
        with tqdm(
            total=training["epochs"],
            desc=config["name"],
            unit="epoch",
            disable=args.no_progress or None,
        ) as bar:
            history = train_epochs(run, training["epochs"], logger=tb, progress=bar)
        if run.diverged:
            print(
                f"{config['name']}: training diverged (non-finite loss) in epoch "
                f"{history[-1]['epoch']}; stopping",
                file=sys.stderr,
            )
        test = run.evaluate("test") if not run.diverged else {"loss": float("nan"), "accuracy": 0.0}
        tb.hparams({**run.hyperparameters, **config["model"]}, {"test_accuracy": test["accuracy"]})
    elapsed = time.perf_counter() - start

    checkpoint = run.save(run_dir / "checkpoint.pt")
    summary = {
        "name": config["name"],
        "hyperparameters": run.hyperparameters,
        "test_loss": test["loss"],
        "test_accuracy": test["accuracy"],
        "steps": run.global_step,
        "seconds": elapsed,
        "diverged": run.diverged,
        "history": history,
    }
    (run_dir / "metrics.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
    if run.tuner is not None:
        tuned = ", ".join(f"{k}={v:.3g}" for k, v in run.hyperparameters.items())
        print(
            f"{config['name']}: tuned hyperparameters {tuned} ({run.tuner.rejected_steps} rejected hyper steps)"
        )
    print(
        f"{config['name']}: test accuracy {test['accuracy']:.4f}, test loss {test['loss']:.4f} "
        f"after {run.global_step} steps in {elapsed:.1f} s on {run.device}; "
        f"checkpoint {checkpoint}"
    )
    return 1 if run.diverged else 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = _build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except (ConfigError, UserError) as exc:
        print(f"gradhpo: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("gradhpo: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
