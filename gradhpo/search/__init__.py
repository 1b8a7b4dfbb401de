"""Search over discrete choices with Optuna samplers; hypergradients inside each trial.

* :mod:`~gradhpo.search.space`: search spaces from config (conditional, per-layer).
* :mod:`~gradhpo.search.samplers`: samplers/pruners by name; sampler state across restarts.
* :mod:`~gradhpo.search.evolution`: regularized (aging) evolution sampler.
* :mod:`~gradhpo.search.study`: :class:`Study`, a persistent Optuna study in a directory.
* :mod:`~gradhpo.jobs.tune`: config-driven studies (``gradhpo tune`` / ``resume``).

Python API for your own objective (define-by-run, as in Optuna)::

    study = gradhpo.search.create_study("runs/my_study", sampler="tpe", pruner="median")

    def objective(trial):
        width = trial.suggest_int("width", 8, 64, log=True)
        run = TrainingRun(model={"name": "cnn", "width": width}, data="digits",
                          tuner={"hypers": [{"name": "lr"}]})
        return gradhpo.search.fit_trial(trial, run, epochs=5, study=study)

    study.optimize(objective, n_trials=20)
    trial = study.ask(); ...; study.tell(trial, value)          # ask/tell works too
"""

from gradhpo.search.evolution import RegularizedEvolutionSampler
from gradhpo.search.samplers import PRUNERS, SAMPLERS, make_pruner, make_sampler
from gradhpo.search.space import Parameter, SearchSpace
from gradhpo.search.study import Study, create_study, load_study
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
    "load_study",
    "make_pruner",
    "make_sampler",
]
