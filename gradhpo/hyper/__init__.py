"""Hypergradient engine: the pure functional core of gradhpo.

* :mod:`~gradhpo.hyper.spec` - :class:`HyperSpec` / :class:`HyperParameters`: what is tuned,
  at which granularity, through which positivity-preserving parametrization.
* :mod:`~gradhpo.hyper.optimizers` - differentiable inner optimizers (SGD, momentum, Nesterov,
  Adam, AdamW) as ``init``/``update`` pairs over ``dict[str, Tensor]``.
* :mod:`~gradhpo.hyper.methods` - :func:`hypergradient` through K inner steps: ``reverse``
  (optionally truncated), ``checkpointed``, ``forward``, ``greedy``.
* :mod:`~gradhpo.hyper.implicit` - implicit differentiation at convergence (CG / Neumann).
* :mod:`~gradhpo.hyper.tuner` - :class:`HyperTuner`, the online loop used by training runs
  (``carry=True``: forward mode carried across the whole run).
* :mod:`~gradhpo.hyper.offline` - :class:`OfflineTuner`, long-horizon tuning: each outer step
  differentiates a whole training run (schedules against the short-horizon bias).
"""

from gradhpo.hyper.implicit import (
    ImplicitResult,
    implicit_hypergradient,
    inverse_hvp_cg,
    inverse_hvp_neumann,
)
from gradhpo.hyper.methods import (
    METHODS,
    HypergradResult,
    InnerProblem,
    Objective,
    hypergradient,
    inner_step,
)
from gradhpo.hyper.offline import OfflineReport, OfflineTuner
from gradhpo.hyper.optimizers import (
    INNER_OPTIMIZERS,
    SGD,
    Adam,
    AdamW,
    InnerOptimizer,
    make_optimizer,
)
from gradhpo.hyper.spec import HyperParameters, HyperSpec, Schedule
from gradhpo.hyper.tuner import HyperTuner, TunerReport

__all__ = [
    "Adam",
    "AdamW",
    "HyperParameters",
    "HyperSpec",
    "HyperTuner",
    "HypergradResult",
    "INNER_OPTIMIZERS",
    "ImplicitResult",
    "InnerOptimizer",
    "InnerProblem",
    "METHODS",
    "Objective",
    "OfflineReport",
    "OfflineTuner",
    "SGD",
    "Schedule",
    "TunerReport",
    "hypergradient",
    "implicit_hypergradient",
    "inner_step",
    "inverse_hvp_cg",
    "inverse_hvp_neumann",
    "make_optimizer",
]
