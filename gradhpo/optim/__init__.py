"""Drop-in :class:`torch.optim.Optimizer` subclasses that adapt their own learning rate online
by hypergradient descent (Baydin et al., ICLR 2018). See :mod:`gradhpo.optim.hd`."""

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
]
