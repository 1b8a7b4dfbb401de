"""TensorBoard logging: a thin wrapper over ``torch.utils.tensorboard.SummaryWriter``.

Runs log under ``<tensorboard_dir>/<study>/<trial>``; the wrapper only adds a mapping-based
``scalars`` call, an ``hparams`` summary and context-manager closing.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = ["TensorBoardLogger"]


class TensorBoardLogger:
    """Write scalars and an hparams summary to one TensorBoard run directory."""

    def __init__(self, log_dir: str | os.PathLike[str]) -> None:
        from torch.utils.tensorboard import SummaryWriter  # imported lazily: slow import

        self.log_dir = Path(log_dir)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self._writer = SummaryWriter(log_dir=str(self.log_dir))

    def scalars(self, values: Mapping[str, float], step: int, prefix: str = "") -> None:
        """Log each ``name: value`` as the scalar ``prefix + name`` at ``step``."""
        for name, value in values.items():
            self._writer.add_scalar(f"{prefix}{name}", float(value), global_step=step)

    def hparams(self, hparams: Mapping[str, Any], metrics: Mapping[str, float]) -> None:
        """One hparams summary (TensorBoard's HPARAMS tab) for this run."""
        flat = {
            k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in hparams.items()
        }
        self._writer.add_hparams(
            flat, {f"hparam/{k}": float(v) for k, v in metrics.items()}, run_name="."
        )

    def flush(self) -> None:
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()

    def __enter__(self) -> TensorBoardLogger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
