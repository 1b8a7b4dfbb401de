"""gradhpo inside other frameworks' loops: each module here imports its framework when it is
itself imported, so ``import gradhpo`` never needs them (they are optional extras).

* :mod:`gradhpo.integrations.lightning` (extra ``lightning``): online hypergradient tuning of
  a LightningModule's learning rate as a Trainer callback.
* :mod:`gradhpo.integrations.ray_tune` (extra ``tune``): gradhpo's training runs as a Ray Tune
  trainable, reporting and checkpointing every epoch, resumable exactly.
"""
