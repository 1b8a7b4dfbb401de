"""Population Based Training.

For now this package holds :class:`BatchedPopulation`, N same-architecture members trained
together in one vectorized step (``torch.func.vmap``). The population manager and the
exploit/explore strategies will live beside it.
"""

from __future__ import annotations

from gradhpo.pbt.batched import BatchedPopulation

__all__ = ["BatchedPopulation"]
