"""gradhpo: gradient-based hyperparameter optimization for PyTorch.

Layers, bottom to top (arrows point down only):

* :mod:`gradhpo.data` - offline data sets, splits, device-resident batch iterator.
* :mod:`gradhpo.run` - :class:`~gradhpo.run.TrainingRun`, the one interface that the tuner,
  search, PBT and the CLI drive.
* :mod:`gradhpo.config`, :mod:`gradhpo.cli` - YAML configs and the ``gradhpo`` command.
"""

__version__ = "0.1.0"
