"""Online learning-rate adaptation.

* :mod:`gradhpo.optim.hd` - drop-in :class:`torch.optim.Optimizer` subclasses that adapt their
  own learning rate by hypergradient descent (Baydin et al., ICLR 2018).
* :mod:`gradhpo.optim.online` - :class:`OnlineHyperTuner`, multi-step hypergradient tuning of
  lr / weight decay / momentum against validation batches for a plain training loop.
"""

from gradhpo.optim.hd import (
    ADAPT_MODES,
    DEFAULT_LR_MIN,
    MAX_LR,
    RULES,
    SGDHD,
    SGDNHD,
    AdamHD,
    AdamWHD,
    HypergradientOptimizer,
)
from gradhpo.optim.online import TUNABLE, OnlineHyperTuner

__all__ = [
    "ADAPT_MODES",
    "DEFAULT_LR_MIN",
    "MAX_LR",
    "RULES",
    "SGDHD",
    "SGDNHD",
    "AdamHD",
    "AdamWHD",
    "HypergradientOptimizer",
    "OnlineHyperTuner",
    "TUNABLE",
]
