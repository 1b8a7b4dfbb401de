"""The random stream a device's random kernels draw from, as one value.

Dropout, random augmentation and the like draw from torch's global CPU generator and, on a
GPU, from that device's own generator. Replaying a step exactly (the engine's recomputation,
the online tuner's replayed horizon, a run's rolled-back horizon) needs both captured before
it and put back after: :class:`RngState` does the pair in one place.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["RngState"]


@dataclass(frozen=True)
class RngState:
    """torch's CPU generator state plus, for a CUDA ``device``, that device's (else None)."""

    cpu: torch.Tensor
    cuda: torch.Tensor | None = None
    device: torch.device | None = None

    @classmethod
    def capture(cls, device: torch.device | str) -> RngState:
        """The current state of the generators that random kernels on ``device`` use."""
        device = torch.device(device)
        if device.type == "cuda":
            return cls(torch.get_rng_state(), torch.cuda.get_rng_state(device), device)
        return cls(torch.get_rng_state())

    def restore(self) -> None:
        """Put the captured state back (the generators then replay the same draws)."""
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:  # captured with its device; else torch's current one
            torch.cuda.set_rng_state(self.cuda, "cuda" if self.device is None else self.device)
