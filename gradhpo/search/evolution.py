"""Regularized (aging) evolution as an Optuna sampler.

Optuna ships no implementation of the aging evolution of Real et al. (2019),
"Regularized Evolution for Image Classifier Architecture Search", which works well for
discrete architecture choices. :class:`RegularizedEvolutionSampler` provides it.

Algorithm, per new trial:

* While fewer than ``population_size`` trials have completed, sample every parameter
  uniformly at random (start-up phase).
* Afterwards the *population* is the ``population_size`` most recently completed trials.
  Age is completion order (``datetime_complete``, trial number breaking ties): in the
  paper a model joins the population queue when its evaluation finishes and the oldest
  member dies regardless of its fitness, so a long-running trial becomes a young member
  when it finishes, not an old one because of its low trial number. In a sequential run
  completion order and trial-number order coincide. Pruned, failed, running and waiting
  trials are never members.
* ``sample_size`` members are drawn uniformly without replacement; the best of them by
  the study direction is the parent (equal values: the lower trial number wins, so the
  choice never depends on storage iteration order).
* The child copies the parent's parameters and mutates exactly one of them, chosen
  uniformly among the parent's parameters that can take another value. With
  ``mutation_prob`` set, each such parameter mutates independently with that
  probability instead; if none was drawn, one is chosen uniformly, so a child always has
  at least one mutation.

Mutation draws a value different from the parent's: categorical -> another choice,
uniformly; int -> another value of the range (uniform over the other grid points, or
log-uniform for ``log=True``); float -> a fresh draw from the distribution (log-uniform
for ``log=True``, on the ``step`` grid when a step is given), again never the parent's
value.

Define-by-run and conditional search spaces: everything goes through
:meth:`~RegularizedEvolutionSampler.sample_independent`. The parent and the names of the
parameters to mutate are chosen in :meth:`~RegularizedEvolutionSampler.before_trial`
and written to the child's trial system attributes (:data:`PARENT_ATTR`,
:data:`PARENT_TRIAL_ID_ATTR`, :data:`MUTATED_ATTR`), so the decisions live in the
storage (in-memory or RDB) next to the trial. The sampler keeps only a cache of them in
memory, refilled from the storage on a miss; its only genuine in-memory state is
``self._rng``. When a parameter is suggested, the child takes the parent's value if the
parent has the parameter with a distribution of the same kind that contains the value
and the parameter is not marked for mutation; a marked parameter gets a different value;
every other parameter (new in this branch of the space, or the parent's value out of
range) gets a uniformly random value.

Conditional spaces and "the child differs from its parent": the child follows the
parent's path through the objective until the first mutated parameter, because every
earlier suggestion returns the parent's value. So for an objective whose search space
depends only on the values suggested so far, each mutated parameter that the path still
reaches is suggested and gets a new value. A mutated parameter that is never suggested
(an earlier mutation switched branches, or the objective branches on something other
than its parameters) means the child lacks a parameter the parent had, so the two
configurations still differ; no fallback mutation is needed. The exceptions are
parameters that Optuna fixes before asking any sampler (``enqueue_trial``/fixed params,
or a distribution that collapsed to a single value), which no sampler can change.

Reproducibility: all randomness comes from ``self._rng``, a plain
:class:`numpy.random.RandomState` attribute, so code that saves and restores the states
of samplers by walking their attributes captures it. A new process that loads the same
storage and restores that state continues with the same proposals as an uninterrupted
run.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any

import numpy as np
from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)
from optuna.samplers import BaseSampler
from optuna.study import StudyDirection
from optuna.trial import FrozenTrial, TrialState

if TYPE_CHECKING:
    from optuna.study import Study

__all__ = [
    "MUTATED_ATTR",
    "PARENT_ATTR",
    "PARENT_TRIAL_ID_ATTR",
    "RegularizedEvolutionSampler",
]

#: Trial system attribute holding the parent's trial number (absent for random trials).
PARENT_ATTR = "evolution:parent"
#: Trial system attribute holding the parent's storage trial id, used to fetch its params.
PARENT_TRIAL_ID_ATTR = "evolution:parent_trial_id"
#: Trial system attribute holding the sorted names of the parameters chosen to mutate.
MUTATED_ATTR = "evolution:mutated"

# Rejection sampling for "a value different from the parent's" on continuous or
# log-integer ranges almost always succeeds at the first draw (for log ints the parent
# takes at most ~68% of the mass, for floats it has measure zero); the cap only guards
# against pathological ranges so that a trial can never hang.
_MAX_REJECTIONS = 100

# Decisions taken in before_trial: (parent trial, names to mutate), or None for a random
# (start-up) trial.
_Plan = tuple[FrozenTrial, frozenset[str]] | None


class RegularizedEvolutionSampler(BaseSampler):
    """Aging evolution (Real et al., 2019) for single-objective Optuna studies.

    See the module docstring for the algorithm and for how conditional search spaces
    are handled.

    Args:
        population_size: Number of most recently completed trials that form the
            population; also the number of random start-up trials. At least 2.
        sample_size: Number of population members drawn (without replacement) to pick a
            parent from; larger means stronger selection pressure. Between 1 and
            ``population_size``.
        mutation_prob: ``None`` (default, as in the paper) mutates exactly one parameter
            per child. A float in ``(0, 1]`` mutates each parameter independently with
            that probability, at least one.
        seed: Seed of the sampler's :class:`numpy.random.RandomState`.

    Raises:
        ValueError: An argument is out of range; the message names it and its value.
    """

    def __init__(
        self,
        *,
        population_size: int = 20,
        sample_size: int = 5,
        mutation_prob: float | None = None,
        seed: int | None = None,
    ) -> None:
        _require_int("population_size", population_size)
        if population_size < 2:
            raise ValueError(f"population_size must be >= 2, got {population_size!r}.")
        _require_int("sample_size", sample_size)
        if not 1 <= sample_size <= population_size:
            raise ValueError(
                f"sample_size must satisfy 1 <= sample_size <= population_size "
                f"({population_size}), got {sample_size!r}."
            )
        if mutation_prob is not None:
            if isinstance(mutation_prob, bool) or not isinstance(
                mutation_prob, (int, float, np.integer, np.floating)
            ):
                raise ValueError(
                    f"mutation_prob must be a float in (0, 1] or None, got {mutation_prob!r}."
                )
            if not 0.0 < float(mutation_prob) <= 1.0:  # also rejects NaN
                raise ValueError(f"mutation_prob must be in (0, 1] or None, got {mutation_prob!r}.")

        self._population_size = int(population_size)
        self._sample_size = int(sample_size)
        self._mutation_prob = None if mutation_prob is None else float(mutation_prob)
        # Plain attribute on purpose: checkpointing code finds it by walking attributes.
        self._rng = np.random.RandomState(seed)
        # Cache of the decisions stored in the trials' system attrs, keyed by trial id.
        # Derived data only: a miss is refilled from the storage.
        self._plans: dict[int, _Plan] = {}

    @property
    def population_size(self) -> int:
        """Size of the aging population (and of the random start-up phase)."""
        return self._population_size

    @property
    def sample_size(self) -> int:
        """Number of population members compared to select a parent."""
        return self._sample_size

    @property
    def mutation_prob(self) -> float | None:
        """Per-parameter mutation probability, or ``None`` for exactly one mutation."""
        return self._mutation_prob

    def reseed_rng(self) -> None:
        """Reseed from OS entropy (Optuna calls this for parallel copies of a sampler)."""
        self._rng.seed()

    def infer_relative_search_space(
        self, study: Study, trial: FrozenTrial
    ) -> dict[str, BaseDistribution]:
        """Return ``{}``: every parameter is decided in :meth:`sample_independent`.

        This is what makes define-by-run and conditional spaces work: the sampler never
        needs to know the search space in advance.
        """
        return {}

    def sample_relative(
        self, study: Study, trial: FrozenTrial, search_space: dict[str, BaseDistribution]
    ) -> dict[str, Any]:
        """Return ``{}`` (no relative sampling, see :meth:`infer_relative_search_space`)."""
        return {}

    def before_trial(self, study: Study, trial: FrozenTrial) -> None:
        """Choose the parent and the parameters to mutate, and store them on the trial.

        Runs once per trial, before any parameter is suggested, so that the decisions do
        not depend on the order in which the objective suggests parameters.
        """
        self._check_single_objective(study)
        completed = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if len(completed) < self._population_size:
            self._plans[trial._trial_id] = None
            return

        population = sorted(completed, key=_age_key)[-self._population_size :]
        picked = self._rng.choice(len(population), size=self._sample_size, replace=False)
        sign = -1.0 if study.direction == StudyDirection.MAXIMIZE else 1.0
        parent = min(
            (population[int(i)] for i in picked),
            key=lambda t: (sign * float(t.value), t.number),  # type: ignore[arg-type]
        )
        mutated = self._choose_mutations(parent)

        storage = study._storage
        storage.set_trial_system_attr(trial._trial_id, PARENT_ATTR, parent.number)
        storage.set_trial_system_attr(trial._trial_id, PARENT_TRIAL_ID_ATTR, parent._trial_id)
        storage.set_trial_system_attr(trial._trial_id, MUTATED_ATTR, mutated)
        self._plans[trial._trial_id] = (parent, frozenset(mutated))

    def sample_independent(
        self,
        study: Study,
        trial: FrozenTrial,
        param_name: str,
        param_distribution: BaseDistribution,
    ) -> Any:
        """Return the parent's value, a mutated value, or a random value (see module doc)."""
        self._check_single_objective(study)
        plan = self._get_plan(study, trial)
        if plan is None:
            return _sample(param_distribution, self._rng, exclude=None)

        parent, mutated = plan
        inherited = _inherited_internal(parent, param_name, param_distribution)
        if inherited is None:
            # New parameter in this branch, or the parent's value does not fit here.
            return _sample(param_distribution, self._rng, exclude=None)
        if param_name in mutated:
            return _sample(param_distribution, self._rng, exclude=inherited)
        return param_distribution.to_external_repr(inherited)

    def after_trial(
        self,
        study: Study,
        trial: FrozenTrial,
        state: TrialState,
        values: Sequence[float] | None,
    ) -> None:
        """Drop the cached decisions of the finished trial (they stay in the storage)."""
        self._plans.pop(trial._trial_id, None)

    def _check_single_objective(self, study: Study) -> None:
        """Fail early: aging evolution needs a total order on trials."""
        if study._is_multi_objective():
            raise ValueError(
                f"{type(self).__name__} supports only single-objective studies, but the "
                f"study has {len(study.directions)} objectives."
            )

    def _choose_mutations(self, parent: FrozenTrial) -> list[str]:
        """Names of the parent's parameters the child must change.

        Sorted names make the choice independent of the storage's dict ordering; single
        valued distributions are skipped because they cannot change.
        """
        names = sorted(name for name, d in parent.distributions.items() if not d.single())
        if not names:
            return []
        if self._mutation_prob is None:
            return [names[int(self._rng.randint(len(names)))]]
        mask = self._rng.random_sample(len(names)) < self._mutation_prob
        if not mask.any():
            mask[int(self._rng.randint(len(names)))] = True
        return [name for name, m in zip(names, mask, strict=True) if m]

    def _get_plan(self, study: Study, trial: FrozenTrial) -> _Plan:
        """Decisions for ``trial``: from the cache, else from its system attrs."""
        if trial._trial_id in self._plans:
            return self._plans[trial._trial_id]
        storage = study._storage
        attrs = storage.get_trial_system_attrs(trial._trial_id)
        plan: _Plan = None
        if PARENT_TRIAL_ID_ATTR in attrs:
            parent = storage.get_trial(int(attrs[PARENT_TRIAL_ID_ATTR]))
            plan = (parent, frozenset(attrs.get(MUTATED_ATTR, ())))
        self._plans[trial._trial_id] = plan
        return plan


def _require_int(name: str, value: Any) -> None:
    """Reject floats and bools early, where the error message is clearest."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an int, got {value!r}.")


def _age_key(trial: FrozenTrial) -> tuple[datetime, int]:
    """Completion order; trial number breaks ties (and orders trials lacking a time)."""
    return (trial.datetime_complete or datetime.min, trial.number)


def _kind(distribution: BaseDistribution) -> type[BaseDistribution]:
    """Distribution family; deprecated subclasses map onto their modern base class."""
    for cls in (CategoricalDistribution, IntDistribution, FloatDistribution):
        if isinstance(distribution, cls):
            return cls
    return type(distribution)


def _inherited_internal(
    parent: FrozenTrial, name: str, distribution: BaseDistribution
) -> float | None:
    """The parent's value of ``name`` in ``distribution``'s internal repr, if it fits.

    ``None`` when the parent lacks the parameter, used another kind of distribution, or
    its value is outside ``distribution`` (e.g. a range that depends on another,
    mutated, parameter). Categorical values are matched by value, not by index.
    """
    if name not in parent.params:
        return None
    if _kind(parent.distributions[name]) is not _kind(distribution):
        return None
    try:
        internal = distribution.to_internal_repr(parent.params[name])
    except ValueError:
        return None
    return internal if distribution._contains(internal) else None


def _sample(
    distribution: BaseDistribution, rng: np.random.RandomState, exclude: float | None
) -> Any:
    """Draw a random value of ``distribution``, different from ``exclude`` if possible.

    ``exclude`` is an internal representation contained in ``distribution`` (or ``None``
    for a plain random draw). Returns the external representation.
    """
    if isinstance(distribution, CategoricalDistribution):
        ex = None if exclude is None else int(exclude)
        index = _grid_index(len(distribution.choices), ex, rng)
        return distribution.choices[index]

    if isinstance(distribution, IntDistribution):
        return _sample_int(distribution, rng, exclude)
    if isinstance(distribution, FloatDistribution):
        return _sample_float(distribution, rng, exclude)
    raise NotImplementedError(
        f"{type(distribution).__name__} is not supported by RegularizedEvolutionSampler."
    )


def _sample_int(
    distribution: IntDistribution, rng: np.random.RandomState, exclude: float | None
) -> int:
    low, high, step = distribution.low, distribution.high, distribution.step
    if distribution.log:
        ex_int = None if exclude is None else int(exclude)
        return _sample_log_int(low, high, ex_int, rng)
    n = (high - low) // step + 1
    ex = None if exclude is None else int((int(exclude) - low) // step)
    return int(low + step * _grid_index(n, ex, rng))


def _sample_float(
    distribution: FloatDistribution, rng: np.random.RandomState, exclude: float | None
) -> float:
    low, high = distribution.low, distribution.high
    if distribution.step is not None:
        step = distribution.step
        n = int(round((high - low) / step)) + 1
        ex = None if exclude is None else int(round((exclude - low) / step))
        return float(min(low + step * _grid_index(n, ex, rng), high))
    for _ in range(_MAX_REJECTIONS):
        if distribution.log:
            value = math.exp(rng.uniform(math.log(low), math.log(high)))
        else:
            value = rng.uniform(low, high)
        value = float(min(max(value, low), high))
        if exclude is None or value != exclude or low == high:
            return value
    return high if exclude != high else low


def _grid_index(n: int, exclude: int | None, rng: np.random.RandomState) -> int:
    """Uniform index in ``range(n)``, uniform over the others when ``exclude`` is set."""
    if exclude is None or n <= 1 or not 0 <= exclude < n:
        return int(rng.randint(n))
    index = int(rng.randint(n - 1))
    return index + 1 if index >= exclude else index


def _sample_log_int(low: int, high: int, exclude: int | None, rng: np.random.RandomState) -> int:
    """Log-uniform integer in ``[low, high]`` (as Optuna's samplers draw them), != exclude.

    Each integer ``k`` gets the mass of ``[k - 0.5, k + 0.5]`` on the log scale.
    Rejection keeps those relative masses for the remaining values.
    """
    log_low, log_high = math.log(low - 0.5), math.log(high + 0.5)
    for _ in range(_MAX_REJECTIONS):
        value = int(round(math.exp(rng.uniform(log_low, log_high))))
        value = min(max(value, low), high)
        if value != exclude or low == high:
            return value
    assert exclude is not None
    return exclude + 1 if exclude < high else exclude - 1
