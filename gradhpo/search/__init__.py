"""Search over discrete choices with Optuna samplers; hypergradients inside each trial.

* :mod:`~gradhpo.search.space`: search spaces from config (conditional, per-layer).
* :mod:`~gradhpo.search.samplers`: samplers/pruners by name; sampler state across restarts.
* :mod:`~gradhpo.search.evolution`: regularized (aging) evolution sampler.
* :mod:`~gradhpo.search.study`: :class:`Study`, a persistent Optuna study in a directory.
* :mod:`~gradhpo.jobs.tune`: config-driven studies (``gradhpo tune`` / ``resume``).

Python API for your own objective (define-by-run, as in Optuna)::

    study = gradhpo.search.create_study("runs/my_study", metric="val_accuracy",
                                        sampler="tpe", pruner="median")

    def objective(trial):
        width = trial.suggest_int("width", 8, 64, log=True)
        run = TrainingRun(model={"name": "cnn", "width": width}, data="digits",
                          tuner={"hypers": [{"name": "lr"}]})
        return gradhpo.search.fit_trial(trial, run, epochs=5, study=study)

    study.optimize(objective, n_trials=20)   # until the study holds 20 finished trials
    study.best_params, study.best_value, study.trials_dataframe()
    trial = study.ask(); ...; study.tell(trial, value)          # ask/tell works too
    study = gradhpo.search.load_study("runs/my_study")         # later, another process

Differences from Optuna, on purpose:

* ``optimize(f, n_trials=N)`` counts the study's **total** of finished trials, not this call's:
  a resumed study, or several drivers on one study, end with exactly N. Calling it twice with
  ``n_trials=20`` runs 20 trials in all; ``n_trials_mode="more"`` asks for Optuna's "N more".
* A study lives in a directory (``study.json``, sampler state, checkpoints). Its trials are in
  ``study.journal`` there (Optuna's journal storage) unless ``storage=`` names another:
  ``"sqlite"`` (``study.db`` there), a database URL (``"postgresql://user:pw@host/db"``; the
  password is never written down, so pass the URL again to ``load_study``), or an
  ``optuna.storages`` object. A URL as the directory is an error, never a folder.
* The direction defaults to maximize (validation accuracy); ``metric="val_loss"`` sets
  minimize, and ``fit_trial`` refuses a metric the study would optimize the wrong way.
  ``directions=[...]`` makes a multi-objective study (samplers tpe, nsga2, random, ...).
* ``best_trial`` is ``None`` before the first completed trial (``best_params`` and
  ``best_value`` raise ValueError then, as Optuna's).
* Each finished trial is one line on the ``gradhpo.search`` logger (INFO, failures WARNING);
  with no logging configured it goes to stderr at Optuna's verbosity.
"""

from gradhpo.search.evolution import RegularizedEvolutionSampler
from gradhpo.search.samplers import PRUNERS, SAMPLERS, make_pruner, make_sampler
from gradhpo.search.space import Parameter, SearchSpace
from gradhpo.search.study import Study, create_study, load_optuna_study, load_study
from gradhpo.search.trial import fit_trial

__all__ = [
    "PRUNERS",
    "Parameter",
    "RegularizedEvolutionSampler",
    "SAMPLERS",
    "SearchSpace",
    "Study",
    "create_study",
    "fit_trial",
    "load_optuna_study",
    "load_study",
    "make_pruner",
    "make_sampler",
]
