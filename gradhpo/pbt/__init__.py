"""Population Based Training.

* :mod:`~gradhpo.pbt.manager`: :class:`PopulationBasedTraining` (sync/async), :class:`RunMember`.
* :mod:`~gradhpo.pbt.strategies`: exploit (truncation, tournament) and explore (perturb,
  resample, TPE proposal), one tie-break rule.
* :mod:`~gradhpo.pbt.store`: SQLite database of members, scores, lineage and
  reference-counted checkpoints.
* :mod:`~gradhpo.pbt.batched`: :class:`BatchedPopulation`, same-architecture members trained
  together in one vectorized step (``torch.func.vmap``).
* :mod:`~gradhpo.jobs.pbt`: config-driven runs (``gradhpo pbt``).
"""

from __future__ import annotations

from gradhpo.pbt.batched import BatchedPopulation
from gradhpo.pbt.manager import PopulationBasedTraining, RunMember

__all__ = ["BatchedPopulation", "PopulationBasedTraining", "RunMember"]
