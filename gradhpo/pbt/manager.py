"""The Population Based Training manager (Jaderberg et al. 2017).

A population of members trains in steps of ``interval`` optimizer steps. After each, every
member is evaluated; in ``exploit`` a weak member copies the weights, optimizer (and
hypergradient tuner) state and hyperparameters of a strong one, then ``explore`` changes the
copied hyperparameters. Everything goes through :class:`~gradhpo.pbt.store.PBTDatabase`, so a
killed run resumes from the last finished interval.

Modes:

* ``sync``: all members train an interval, then exploit/explore is decided on that round's
  scores (one transaction per round).
* ``async``: members are served one at a time, always the one furthest behind (lowest step,
  then lowest index); right after its own evaluation a member decides against the latest
  score of every other member, without waiting for a round to end (one transaction per member
  step). With one process this reproduces the decisions asynchronous workers make. On an
  executor each member's interval is a task, one per member in flight; each is decided,
  committed and resubmitted as it finishes (a serial executor gives the in-process run).

Members are anything with the :class:`Member` interface; :class:`RunMember` adapts a
:class:`~gradhpo.run.TrainingRun`. With a run that has a hypergradient ``tuner`` the member
adapts its continuous hyperparameters by gradient between exploits, while PBT explores what
gradients cannot reach (batch size, dropout, discrete choices) — the hybrid mode.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol, TypeGuard

import numpy as np
import torch

from gradhpo.files import write_torch
from gradhpo.pbt.store import PBTDatabase
from gradhpo.pbt.strategies import explore, rank, resample, sampler_proposal, tournament, truncation
from gradhpo.run.loop import check_metric
from gradhpo.search.space import Parameter

__all__ = [
    "CHECKPOINTS",
    "Member",
    "RunMember",
    "BatchedGroup",
    "BatchedMember",
    "PopulationBasedTraining",
    "contiguous_groups",
    "step_together",
    "member_task",
    "member_state_task",
    "group_task",
    "group_state_task",
]

# How the checkpoints of members trained on an executor move (see PopulationBasedTraining):
# "files": the tasks read and write them in the run directory (shared by every worker);
# "executor": as bytes in the tasks' arguments and results, the driver alone touches the files.
CHECKPOINTS = ("files", "executor")


class Member(Protocol):
    """What the manager needs from a population member."""

    def step(self, n: int) -> float: ...

    def score(self) -> float: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: Mapping[str, Any], *, keep_stream: bool = False) -> None: ...

    def apply(self, values: Mapping[str, Any]) -> None: ...

    @property
    def hyperparameters(self) -> dict[str, float]: ...


class Evaluated(Protocol):
    """What ``on_evaluate`` gets of a member: its hyperparameters (the member itself, or for
    a member trained on an executor a stand-in that holds only them)."""

    @property
    def hyperparameters(self) -> Mapping[str, float]: ...


def _positive(value: Any) -> TypeGuard[float]:
    return (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and math.isfinite(value)
        and value > 0
    )


class RunMember:
    """A :class:`~gradhpo.run.TrainingRun` as a PBT member.

    ``apply`` understands ``optimizer.<hyper>``, ``training.batch_size`` and ``model.dropout``.
    An ``optimizer.<hyper>`` that the run's tuner tunes (hybrid PBT) is moved by the ratio of
    the new PBT value to the old one: its learned values (every schedule segment, every
    per-tensor entry) are scaled alike, so exploring changes the level and keeps what the
    hypergradients learned; ``values`` (the PBT-side record this member was built or last
    explored with) is part of the member's state dict (``pbt_values``) for that reason. Other
    hyperparameters are set to the new value (``set_hyperparameters``).
    ``load_state_dict(..., keep_stream=True)`` takes weights, optimizer/tuner state and step
    from the source but keeps this member's own batch order and random stream, as an
    independent worker restoring someone else's checkpoint would."""

    _OWN = ("iterator", "val_iterator", "rng")

    def __init__(
        self, run: Any, metric: str = "val_accuracy", values: Mapping[str, Any] | None = None
    ) -> None:
        check_metric(metric)
        self.run = run
        self.metric = metric
        self.values: dict[str, Any] = dict(values or {})

    def step(self, n: int) -> float:
        return self.run.step(n)

    def score(self) -> float:
        if self.run.diverged:
            return math.nan
        result = self.run.evaluate("val")
        return result["accuracy"] if self.metric == "val_accuracy" else result["loss"]

    def state_dict(self) -> dict[str, Any]:
        return {**self.run.state_dict(), "pbt_values": dict(self.values)}

    def load_state_dict(self, state: Mapping[str, Any], *, keep_stream: bool = False) -> None:
        state = dict(state)
        if "pbt_values" in state:
            self.values = dict(state.pop("pbt_values"))
        if keep_stream:
            own = self.run.state_dict()
            for key in self._OWN:
                state[key] = own[key]
            if int(state["iterator"]["batch_size"]) != self.run.batch_size:
                state["iterator"] = own["iterator"]
        self.run.load_state_dict(state)

    def apply(self, values: Mapping[str, Any]) -> None:
        """Set the values that differ from this member's record (a resume re-applies the
        record to a rebuilt member: that must change nothing, not even close a tuner's open
        horizon)."""
        hypers, factors = {}, {}
        tuned = set(self.run.tuner.hypers.names) if self.run.tuner is not None else set()
        for path, value in values.items():
            if path in self.values and self.values[path] == value:
                continue
            section, key = path.split(".", 1)
            old = self.values.get(path)
            if section == "optimizer" and key in tuned and _positive(old) and _positive(value):
                factors[key] = float(value) / float(old)
            elif section == "optimizer":
                hypers[key] = value
            elif path == "training.batch_size":
                self.run.set_batch_size(int(value))
            elif path == "model.dropout":
                self.run.set_dropout(float(value))
            else:
                raise ValueError(f"{path}: PBT cannot change this during training")
        if hypers:
            self.run.set_hyperparameters(**hypers)
        if factors:
            self.run.scale_hyperparameters(**factors)
        self.values.update(values)

    @property
    def hyperparameters(self) -> dict[str, float]:
        return self.run.hyperparameters

    @property
    def diverged(self) -> bool:
        return bool(self.run.diverged)


class _Hypers:
    """Stands in for a remote member in ``on_evaluate`` callbacks (only its hyperparameters)."""

    def __init__(self, hyperparameters: Mapping[str, float]) -> None:
        self.hyperparameters = dict(hyperparameters)


def _load_state(source: str | bytes) -> dict[str, Any]:
    """A member state from a checkpoint file (its path) or from its bytes; untrusted either
    way: ``weights_only=True``."""
    where: Any = io.BytesIO(source) if isinstance(source, bytes) else source
    return torch.load(where, map_location="cpu", weights_only=True)


def _state_bytes(state: Mapping[str, Any]) -> bytes:
    """A member state as the bytes of its checkpoint file (what ``torch.save`` writes)."""
    buffer = io.BytesIO()
    torch.save(dict(state), buffer)
    return buffer.getvalue()


def contiguous_groups(population: int, groups: int) -> list[list[int]]:
    """``population`` members in ``groups`` runs of consecutive indices whose sizes differ
    by at most one (the first groups are the smaller): the batched groups of a population."""
    if isinstance(groups, bool) or not isinstance(groups, int) or not 1 <= groups <= population:
        raise ValueError(f"groups must be an integer in [1, {population}], got {groups!r}")
    bounds = [k * population // groups for k in range(groups + 1)]
    return [list(range(bounds[k], bounds[k + 1])) for k in range(groups)]


def step_together(members: Sequence[Member], n: int) -> None:
    """Train ``members`` ``n`` steps each: batched members with one vmapped step per group
    (once per group, however many of its members are listed), the others one by one."""
    groups: dict[int, BatchedGroup] = {}
    for member in members:
        if isinstance(member, BatchedMember):
            groups.setdefault(id(member.group), member.group)
        else:
            member.step(n)
    for group in groups.values():
        group.step(n)


def _train_members(
    factory: Callable[[int, dict[str, Any]], Member],
    indices: Sequence[int],
    values: Sequence[Mapping[str, Any]],
    states: Sequence[str | bytes | None],
    steps: int,
) -> tuple[list[Member], list[float]]:
    """What a training task does for the members ``indices`` (a batched group, or one
    member): build each with its values, restore it fully from its checkpoint (``states``:
    paths or bytes, None for a fresh member), apply its values, train them ``steps`` steps
    together (:func:`step_together`) and score each."""
    members = [factory(i, dict(v)) for i, v in zip(indices, values, strict=True)]
    for member, state in zip(members, states, strict=True):
        if state is not None:
            member.load_state_dict(_load_state(state))
    for member, v in zip(members, values, strict=True):
        member.apply(v)
    step_together(members, steps)
    return members, [float(member.score()) for member in members]


def group_task(
    factory: Callable[[int, dict[str, Any]], Member],
    indices: Sequence[int],
    values: Sequence[Mapping[str, Any]],
    state_paths: Sequence[str | None],
    steps: int,
    out_paths: Sequence[str],
) -> list[tuple[float, dict[str, float]]]:
    """One interval of the members ``indices`` on an executor, checkpoints as files
    (``checkpoints="files"``): see :func:`_train_members`; each new state is written to its
    ``out_paths`` entry atomically. Returns ``(score, hyperparameters)`` per member."""
    members, scores = _train_members(factory, indices, values, state_paths, steps)
    for member, out in zip(members, out_paths, strict=True):
        write_torch(out, member.state_dict())
    return [(score, dict(m.hyperparameters)) for m, score in zip(members, scores, strict=True)]


def group_state_task(
    factory: Callable[[int, dict[str, Any]], Member],
    indices: Sequence[int],
    values: Sequence[Mapping[str, Any]],
    states: Sequence[bytes | None],
    steps: int,
) -> list[tuple[float, dict[str, float], bytes]]:
    """One interval of the members ``indices`` on an executor, checkpoints through the
    executor (``checkpoints="executor"``): the starting states are checkpoint bytes, and the
    new ones come back as such, per member with its score and hyperparameters."""
    members, scores = _train_members(factory, indices, values, states, steps)
    return [
        (score, dict(m.hyperparameters), _state_bytes(m.state_dict()))
        for m, score in zip(members, scores, strict=True)
    ]


def _train_interval(
    factory: Callable[[int, dict[str, Any]], Member],
    index: int,
    values: Mapping[str, Any],
    state: str | bytes | None,
    stream: str | bytes | None,
    steps: int,
    built_with: Mapping[str, Any] | None,
) -> tuple[Member, float | None]:
    """What every member task does, whatever carries its checkpoints: build member ``index``
    with ``built_with`` (default ``values``), restore ``state`` (with ``stream``: restore
    that fully first, then take ``state``'s weights keeping the stream, as an exploit does),
    apply ``values``, train ``steps`` and score (``steps`` 0: no training, no score).

    A copier is built with the values it trained with (``built_with``), which its own
    ``stream`` was saved under (its batch size, among others), and then given the explored
    ``values``: the in-process exploit's sequence on the live member. Built with the explored
    values, a member whose batch size was explored could not restore its own stream."""
    member = factory(index, dict(values if built_with is None else built_with))
    if stream is not None:
        member.load_state_dict(_load_state(stream))
        if state is not None:
            member.load_state_dict(_load_state(state), keep_stream=True)
    elif state is not None:
        member.load_state_dict(_load_state(state))
    member.apply(values)
    score = None
    if steps > 0:
        member.step(steps)
        score = float(member.score())
    return member, score


def member_task(
    factory: Callable[[int, dict[str, Any]], Member],
    index: int,
    values: Mapping[str, Any],
    state_path: str | None,
    stream_path: str | None,
    steps: int,
    out_path: str,
    built_with: Mapping[str, Any] | None = None,
) -> tuple[float | None, dict[str, float]]:
    """One member's work on an executor, checkpoints as files (``checkpoints="files"``): the
    member's interval from the checkpoint files ``state_path`` / ``stream_path`` (see
    :func:`_train_interval`), its new state written to ``out_path`` atomically."""
    member, score = _train_interval(
        factory, index, values, state_path, stream_path, steps, built_with
    )
    write_torch(out_path, member.state_dict())
    return score, dict(member.hyperparameters)


def member_state_task(
    factory: Callable[[int, dict[str, Any]], Member],
    index: int,
    values: Mapping[str, Any],
    state: bytes | None,
    stream: bytes | None,
    steps: int,
    built_with: Mapping[str, Any] | None = None,
) -> tuple[float | None, dict[str, float], bytes]:
    """One member's work on an executor, checkpoints through the executor
    (``checkpoints="executor"``): ``state`` / ``stream`` are the bytes of checkpoint files
    (see :func:`_train_interval`), the new state comes back as such bytes, for the driver to
    write. No path, no file: the task needs nothing of the run directory, and running it
    twice changes nothing."""
    member, score = _train_interval(factory, index, values, state, stream, steps, built_with)
    return score, dict(member.hyperparameters), _state_bytes(member.state_dict())


class BatchedGroup:
    """A :class:`~gradhpo.pbt.batched.BatchedPopulation` seen by the manager: one ``step`` for
    all members, validation scores computed once per step for all members."""

    def __init__(self, population: Any, metric: str = "val_accuracy") -> None:
        check_metric(metric)
        self.population = population
        self.metric = metric
        self._scores: list[float] | None = None

    def step(self, n: int) -> None:
        self.population.step(n)
        self._scores = None

    def invalidate(self) -> None:
        self._scores = None

    def score(self, i: int) -> float:
        if self._scores is None:
            result = self.population.evaluate("val")
            values = result["accuracy"] if self.metric == "val_accuracy" else result["loss"]
            diverged = self.population.diverged
            self._scores = [
                math.nan if bool(diverged[k]) else float(values[k]) for k in range(len(values))
            ]
        return self._scores[i]

    def member(self, i: int) -> BatchedMember:
        return BatchedMember(self, i)


class BatchedMember:
    """Member ``i`` of a :class:`BatchedGroup`. The manager steps the whole group at once
    (sync mode); exploit copies slices (``load_member_state_dict``), explore sets the member's
    entries of the batched hyperparameter tensors. Only ``optimizer.*`` values can be applied."""

    def __init__(self, group: BatchedGroup, index: int) -> None:
        self.group = group
        self.index = index

    def step(self, n: int) -> float:
        raise RuntimeError("batched members are trained together: step their group")

    def score(self) -> float:
        return self.group.score(self.index)

    def state_dict(self) -> dict[str, Any]:
        return self.group.population.member_state_dict(self.index)

    def load_state_dict(self, state: Mapping[str, Any], *, keep_stream: bool = False) -> None:
        """Load this member's row. A full restore (``keep_stream=False``: a resume, a task
        starting from the member's checkpoint) also restores the group's dropout stream
        saved with it; the members of a group are saved at the same step, so they carry the
        same stream. An exploit (``keep_stream=True``) takes only the source's weights."""
        population = self.group.population
        population.load_member_state_dict(self.index, state, load_iterator=not keep_stream)
        if not keep_stream and state.get("rng") is not None:
            population.load_rng_state(state["rng"])
        self.group.invalidate()

    def apply(self, values: Mapping[str, Any]) -> None:
        hypers = {}
        for path, value in values.items():
            section, key = path.split(".", 1)
            if section != "optimizer":
                raise ValueError(
                    f"{path}: a batched population can only change optimizer.* hyperparameters"
                )
            hypers[key] = value
        if hypers:
            self.group.population.set_hyperparameters(self.index, **hypers)

    @property
    def hyperparameters(self) -> dict[str, float]:
        return self.group.population.get_hyperparameters(self.index)


class PopulationBasedTraining:
    """Run PBT in ``directory`` (see module docstring).

    Args:
        factory: ``factory(index, values) -> Member`` builds member ``index`` with initial
            hyperparameter values ``{path: value}``.
        parameters: what PBT explores (:class:`~gradhpo.search.space.Parameter` s).
        directory: where ``pbt.db`` and ``checkpoints/`` live.
        population: number of members (>= 2).
        interval: optimizer steps between evaluations.
        total_steps: steps each member trains in all.
        exploit: ``"truncation"`` (bottom ``fraction`` copies a uniformly drawn member of the
            top ``fraction``) or ``"tournament"`` (binary tournament).
        explore: ``"perturb"`` (factors, with ``resample_probability`` of resampling the prior),
            ``"resample"`` (always from the prior) or ``"sampler"`` (Optuna's TPE fitted on all
            scores so far).
        mode: ``"sync"`` or ``"async"``.
        maximize: whether higher scores are better.
        seed: seeds initial values and every exploit/explore choice.
        initial_values: optional list of initial values per member (else drawn from the prior).
        on_evaluate: ``callback(member_index, step, score, member, values)`` after each
            evaluation (TensorBoard logging).
        checkpoints: how checkpoints move when members train on an executor
            (``run(executor=...)``): ``"files"`` (each task reads its starting checkpoint and
            writes its new one in ``directory``, which every worker must then reach: a shared
            file system on a multi-node cluster) or ``"executor"`` (as bytes in the tasks'
            arguments and results, through Ray's object store or the process pool's pipes;
            only this process reads and writes ``directory``). Both give the same run; without
            an executor there is nothing to move.
        together: members that train together in one task on an executor (a partition of
            the indices, e.g. :func:`contiguous_groups`: the batched groups of a population);
            default: one task per member.
    """

    def __init__(
        self,
        factory: Callable[[int, dict[str, Any]], Member],
        parameters: Sequence[Parameter],
        directory: Any,
        *,
        population: int,
        interval: int,
        total_steps: int,
        exploit: str = "truncation",
        fraction: float = 0.25,
        explore: str = "perturb",
        factors: Sequence[float] = (0.8, 1.2),
        resample_probability: float = 0.25,
        mode: str = "sync",
        maximize: bool = True,
        seed: int = 0,
        initial_values: Sequence[Mapping[str, Any]] | None = None,
        on_evaluate: Callable[[int, int, float, Evaluated, dict[str, Any]], None] | None = None,
        checkpoints: str = "files",
        together: Sequence[Sequence[int]] | None = None,
    ) -> None:
        for name, value, low in (
            ("population", population, 2),
            ("interval", interval, 1),
            ("total_steps", total_steps, 1),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        if exploit not in ("truncation", "tournament"):
            raise ValueError(f"exploit must be 'truncation' or 'tournament', got {exploit!r}")
        if explore not in ("perturb", "resample", "sampler"):
            raise ValueError(f"explore must be 'perturb', 'resample' or 'sampler', got {explore!r}")
        if mode not in ("sync", "async"):
            raise ValueError(f"mode must be 'sync' or 'async', got {mode!r}")
        if checkpoints not in CHECKPOINTS:
            raise ValueError(f"checkpoints must be 'files' or 'executor', got {checkpoints!r}")
        if not 0 < fraction <= 0.5:
            raise ValueError(f"fraction must be in (0, 0.5], got {fraction!r}")
        if not 0 <= resample_probability <= 1:
            raise ValueError(
                f"resample_probability must be in [0, 1], got {resample_probability!r}"
            )
        if not factors or any(not isinstance(f, (int, float)) or f <= 0 for f in factors):
            raise ValueError(f"factors must be positive numbers, got {list(factors)!r}")
        if initial_values is not None and len(initial_values) != population:
            raise ValueError(
                f"initial_values must have {population} entries, got {len(initial_values)}"
            )
        if together is None:
            together = [[i] for i in range(population)]
        together = [[int(i) for i in group] for group in together]
        if sorted(i for group in together for i in group) != list(range(population)) or not all(
            together
        ):
            raise ValueError(
                f"together must split the members 0..{population - 1} into non-empty groups, "
                f"got {together!r}"
            )
        if mode == "async" and any(len(group) > 1 for group in together):
            raise ValueError(
                "together: async members are served one at a time; groups need mode 'sync'"
            )
        self.together = together
        self.factory = factory
        self.parameters = list(parameters)
        self.db = PBTDatabase(directory)
        self.population = population
        self.interval = interval
        self.total_steps = total_steps
        self.exploit = exploit
        self.fraction = fraction
        self.explore_method = explore
        self.factors = tuple(float(f) for f in factors)
        self.resample_probability = float(resample_probability)
        self.mode = mode
        self.checkpoint_transport = checkpoints
        self.maximize = maximize
        self.on_evaluate = on_evaluate
        self.rng = np.random.RandomState(seed)
        self._initial_values = initial_values
        self.members: list[Member] = []
        self.values: list[dict[str, Any]] = []
        self.steps: list[int] = []
        self.checkpoints: list[int | None] = []
        self.latest: list[float | None] = []

    # ------------------------------------------------------------------ set-up / resume
    def _rng_state(self) -> list[Any]:
        state = self.rng.get_state(legacy=True)
        assert isinstance(state, tuple)  # a RandomState(seed) is MT19937: the legacy tuple
        kind, keys, pos, has_gauss, cached = state
        return [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)]

    def _set_rng_state(self, state: Sequence[Any]) -> None:
        kind, keys, pos, has_gauss, cached = state
        self.rng.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))

    def start(self, *, build: bool = True) -> bool:
        """Build the population: fresh, or from the database (resume). Returns True when
        resumed. Work after the last committed interval is lost and redone. With
        ``build=False`` (members trained by an executor) only the bookkeeping is loaded."""
        rows = self.db.members()
        if rows:
            if len(rows) != self.population:
                raise ValueError(
                    f"the database holds {len(rows)} members, the config asks for {self.population}"
                )
            self.db.sweep()
            self._set_rng_state(self.db.get_meta("rng"))
            self.members, self.values, self.steps, self.checkpoints, self.latest = (
                [],
                [],
                [],
                [],
                [],
            )
            for row in rows:
                if not build:
                    self.values.append(dict(row["values"]))
                    self.steps.append(int(row["step"]))
                    self.checkpoints.append(row["checkpoint"])
                    self.latest.append(row["score"])
                    continue
                member = self.factory(row["member"], dict(row["values"]))
                if row["checkpoint"] is not None:
                    member.load_state_dict(
                        self.db.load_checkpoint(row["checkpoint"]), keep_stream=False
                    )
                    member.apply(row["values"])
                self.members.append(member)
                self.values.append(dict(row["values"]))
                self.steps.append(int(row["step"]))
                self.checkpoints.append(row["checkpoint"])
                self.latest.append(row["score"])
            return True
        if self._initial_values is not None:
            self.values = [dict(v) for v in self._initial_values]
        else:
            self.values = [
                {p.path: resample(p, self.rng) for p in self.parameters}
                for _ in range(self.population)
            ]
        self.members = (
            [self.factory(i, dict(v)) for i, v in enumerate(self.values)] if build else []
        )
        self.steps = [0] * self.population
        self.checkpoints = [None] * self.population
        self.latest = [None] * self.population
        with self.db.transaction():
            for i in range(self.population):
                self.db.set_member(i, 0, None, self.values[i], None)
            self.db.set_meta("rng", self._rng_state())
            self.db.set_meta("maximize", self.maximize)  # read by the report
        return False

    # ------------------------------------------------------------------ exploit / explore
    def _new_values(self, source: int) -> dict[str, Any]:
        if self.explore_method == "resample":
            return {p.path: resample(p, self.rng) for p in self.parameters}
        if self.explore_method == "sampler":
            history = [(s["values"], s["score"]) for s in self.db.scores()]
            return sampler_proposal(
                self.parameters,
                history,
                maximize=self.maximize,
                seed=int(self.rng.randint(2**31 - 1)),
            )
        return explore(
            self.parameters,
            self.values[source],
            self.rng,
            factors=self.factors,
            resample_probability=self.resample_probability,
        )

    def _decide(self, scores: Sequence[float], only: int | None = None) -> dict[int, int]:
        if self.exploit == "truncation":
            copies = truncation(scores, self.fraction, self.rng, self.maximize)
        else:
            copies = tournament(scores, self.rng, self.maximize)
        if only is not None:
            copies = {k: v for k, v in copies.items() if k == only}
        return copies

    def _async_decision(self, i: int, score: float) -> dict[int, int]:
        """Async mode: exploit/explore for member ``i`` alone, against the latest scores of
        the others; nothing until every member has a score, or once ``i`` has finished."""
        known = [score if k == i else self.latest[k] for k in range(self.population)]
        if any(s is None for s in known) or self.steps[i] >= self.total_steps:
            return {}
        return self._decide([math.nan if s is None else s for s in known], only=i)

    def _evaluate(self, i: int) -> float:
        score = float(self.members[i].score())
        if self.on_evaluate is not None:
            self.on_evaluate(i, self.steps[i], score, self.members[i], self.values[i])
        return score

    def _commit(
        self, trained: Sequence[int], scores: Mapping[int, float], copies: Mapping[int, int]
    ) -> list[tuple[int, int, dict[str, Any]]]:
        """Checkpoint the trained members, carry out the exploit decisions, and record it all
        in ONE transaction; returns ``(copier, source, new values)``.

        Everything is prepared before the transaction: explored values are drawn, each copier
        takes its source's trained state (keeping its own batch stream and RNG, as an
        independent worker restoring a checkpoint would), gets the new values and its own
        checkpoint file. A process killed before the commit leaves the database at the
        previous step, and a resume redoes exactly this step: the resumed run equals the
        uninterrupted one."""
        trained = list(trained)
        copies = {
            loser: winner
            for loser, winner in copies.items()
            if winner in trained or self.checkpoints[winner] is not None
        }
        winners = set(copies.values())
        # Snapshot every source before anyone changes: in a tournament a source can be a
        # copier too. A source that did not train this step (async) is read from its file.
        snapshots = {
            w: self.members[w].state_dict()
            if w in trained
            else self.db.load_checkpoint(self._checkpoint_of(w))
            for w in winners
        }
        own = [i for i in trained if i not in copies or i in winners]
        paths = {
            i: self.db.write_checkpoint(i, self.steps[i], self.members[i].state_dict()) for i in own
        }
        new_values = {loser: self._new_values(winner) for loser, winner in sorted(copies.items())}
        for loser, winner in sorted(copies.items()):
            self.members[loser].load_state_dict(snapshots[winner], keep_stream=True)
            self.members[loser].apply(new_values[loser])
        copied = {
            loser: self.db.write_checkpoint(
                loser, self.steps[loser], self.members[loser].state_dict()
            )
            for loser in copies
        }
        return self._record_step(trained, scores, paths, copies, copied, new_values)

    def _record_step(
        self,
        trained: Sequence[int],
        scores: Mapping[int, float],
        paths: Mapping[int, Any],
        copies: Mapping[int, int],
        copied: Mapping[int, Any],
        new_values: Mapping[int, dict[str, Any]],
    ) -> list[tuple[int, int, dict[str, Any]]]:
        """The single transaction of a step (in-process and on executors alike): scores of
        the ``trained`` members, their new checkpoint files ``paths``, each copier pointed at
        its own prepared file ``copied[loser]`` with its new values, the lineage, and the
        manager's RNG state. Nothing before it is visible to a resume."""
        loads = []
        with self.db.transaction():
            for i in trained:
                self.db.record_score(self.steps[i], i, scores[i], self.values[i])
            for i, path in paths.items():
                ck = self.db.add_checkpoint(i, self.steps[i], path)
                self.db.set_member(i, self.steps[i], ck, self.values[i], scores[i])
                self.checkpoints[i] = ck
            sources = {w: self._checkpoint_of(w) for w in set(copies.values())}
            for loser, winner in sorted(copies.items()):
                ck = self.db.add_checkpoint(loser, self.steps[loser], copied[loser])
                self.db.set_member(
                    loser, self.steps[loser], ck, new_values[loser], scores.get(loser)
                )
                self.db.record_exploit(
                    self.steps[loser],
                    loser,
                    winner,
                    sources[winner],
                    self.values[loser],
                    new_values[loser],
                )
                self.checkpoints[loser] = ck
                loads.append((loser, sources[winner], new_values[loser]))
            self.db.set_meta("rng", self._rng_state())
        for loser, value in new_values.items():
            self.values[loser] = value
        for i in trained:
            self.latest[i] = scores[i]
        return loads

    # ------------------------------------------------------------------ main loop
    def run(self, progress: Any = None, executor: Any = None) -> dict[str, Any]:
        """Train until every member reached ``total_steps``; returns the best member.

        With an ``executor`` (:mod:`gradhpo.execution`) each member's interval runs as a task
        on it (sync: a round of tasks at a time; async: see :meth:`_run_remote_async`): the
        task builds the member with ``factory`` (which must then be picklable), restores its
        checkpoint, trains, scores and writes a new checkpoint file (``checkpoints="files"``)
        or returns its new state as bytes, which this process writes (``"executor"``: the
        tasks never touch ``directory``); the driver keeps the database. Same decisions and
        results as in-process training (async: where the tasks finish in submission order)."""
        if executor is not None:
            return self._run_remote(executor, progress)
        if not self.members:
            self.start()
        if self.mode == "sync":
            while min(self.steps) < self.total_steps:
                n = min(self.interval, self.total_steps - min(self.steps))
                step_together(self.members, n)
                for i in range(self.population):
                    self.steps[i] += n
                scores = {i: self._evaluate(i) for i in range(self.population)}
                final = min(self.steps) >= self.total_steps
                copies = {} if final else self._decide([scores[i] for i in range(self.population)])
                self._commit(range(self.population), scores, copies)
                if progress is not None:
                    progress.update(n)
        else:
            if any(isinstance(m, BatchedMember) for m in self.members):
                raise ValueError("mode: batched members train in lockstep; use mode 'sync'")
            while min(self.steps) < self.total_steps:
                i = min(range(self.population), key=lambda k: (self.steps[k], k))
                n = min(self.interval, self.total_steps - self.steps[i])
                self.members[i].step(n)
                self.steps[i] += n
                score = self._evaluate(i)
                copies = self._async_decision(i, score)
                self._commit([i], {i: score}, copies)
                if progress is not None and i == self.population - 1:
                    progress.update(n)
        return self.best()

    def _run_remote(self, executor: Any, progress: Any) -> dict[str, Any]:
        if not self.values:
            self.start(build=False)
        self._remote_hypers: dict[int, dict[str, float]] = {}
        if self.mode == "async":
            return self._run_remote_async(executor, progress)
        as_bytes = self.checkpoint_transport == "executor"
        while min(self.steps) < self.total_steps:
            n = min(self.interval, self.total_steps - min(self.steps))
            outs = [
                self.db.new_checkpoint_path(i, self.steps[i] + n) for i in range(self.population)
            ]
            tasks: list[tuple[Any, ...]] = [
                (self.factory, group, [self.values[i] for i in group], self._starts(group), n)
                + (() if as_bytes else ([str(outs[i]) for i in group],))
                for group in self.together
            ]
            done = executor.run(group_state_task if as_bytes else group_task, tasks)
            del tasks  # the starting states: nobody needs them any more
            results: list[tuple[Any, ...]] = [()] * self.population
            for group, rows in zip(self.together, done, strict=True):
                for i, row in zip(group, rows, strict=True):
                    results[i] = row
            states: list[bytes] | None = None
            if as_bytes:
                states = [state for _, _, state in results]
                for i, state in enumerate(states):  # what a files task writes before it returns
                    self.db.write_checkpoint_bytes(outs[i], state)
            scores = {}
            for i, (score, hypers, *_) in enumerate(results):
                self.steps[i] += n
                scores[i] = float(score)
                self._remote_hypers[i] = hypers
                if self.on_evaluate is not None:
                    self.on_evaluate(i, self.steps[i], scores[i], _Hypers(hypers), self.values[i])
            final = min(self.steps) >= self.total_steps
            copies = {} if final else self._decide([scores[i] for i in range(self.population)])
            self._commit_remote(
                scores,
                copies,
                dict(enumerate(outs)),
                executor,
                None if states is None else dict(enumerate(states)),
            )
            if progress is not None:
                progress.update(n)
        return self.best()

    def _starts(self, group: Sequence[int]) -> list[str | bytes | None]:
        """The committed checkpoints the members ``group`` start their next interval from:
        bytes (``checkpoints="executor"``) or paths for the tasks to read; None for a member
        that has not trained yet."""
        as_bytes = self.checkpoint_transport == "executor"
        return [
            None
            if (ck := self.checkpoints[i]) is None
            else (self.db.checkpoint_bytes(ck) if as_bytes else str(self.db.checkpoint_path(ck)))
            for i in group
        ]

    def _submit_interval(self, executor: Any, i: int) -> tuple[Any, int, Any]:
        """Submit member ``i``'s next interval from its committed checkpoint (async mode);
        returns ``(task, steps, the file its trained state goes to)``."""
        n = min(self.interval, self.total_steps - self.steps[i])
        out = self.db.new_checkpoint_path(i, self.steps[i] + n)
        (start,) = self._starts([i])
        if self.checkpoint_transport == "executor":
            task = executor.submit(
                member_state_task, (self.factory, i, self.values[i], start, None, n)
            )
        else:
            task = executor.submit(
                member_task, (self.factory, i, self.values[i], start, None, n, str(out))
            )
        return task, n, out

    def _run_remote_async(self, executor: Any, progress: Any) -> dict[str, Any]:
        """Async mode on an executor: one task per unfinished member in flight. Whenever
        tasks finish (``executor.wait_any``), each, in submission order, is scored, decides
        exploit/explore for its member alone against the latest committed scores of the
        others (as in-process async mode does), is committed (one transaction, an exploit's
        copy made by a step-free task first) and its member's next interval is submitted at
        once. Tasks are first submitted furthest behind first (lowest step, then index), so a
        serial executor, which runs them in submission order, serves the members in the
        in-process order: the same run."""
        as_bytes = self.checkpoint_transport == "executor"
        in_flight: dict[Any, tuple[int, int, Any]] = {}
        for i in sorted(range(self.population), key=lambda k: (self.steps[k], k)):
            if self.steps[i] < self.total_steps:
                task, n, out = self._submit_interval(executor, i)
                in_flight[task] = (i, n, out)
        while in_flight:
            for task in executor.wait_any(list(in_flight)):
                i, n, out = in_flight.pop(task)
                score, hypers, *state = task.result()
                if as_bytes:  # what a files task writes before it returns
                    self.db.write_checkpoint_bytes(out, state[0])
                self.steps[i] += n
                score = float(score)
                self._remote_hypers[i] = hypers
                if self.on_evaluate is not None:
                    self.on_evaluate(i, self.steps[i], score, _Hypers(hypers), self.values[i])
                copies = self._async_decision(i, score)
                self._commit_remote(
                    {i: score}, copies, {i: out}, executor, {i: state[0]} if as_bytes else None
                )
                if progress is not None and i == self.population - 1:
                    progress.update(n)
                if self.steps[i] < self.total_steps:
                    task, n, out = self._submit_interval(executor, i)
                    in_flight[task] = (i, n, out)
        return self.best()

    def _commit_remote(
        self,
        scores: Mapping[int, float],
        copies: Mapping[int, int],
        outs: Mapping[int, Any],
        executor: Any,
        states: Mapping[int, bytes] | None = None,
    ) -> None:
        """The remote twin of :meth:`_commit`: every trained member ``i`` (a key of
        ``scores``) has its trained state in its file ``outs[i]`` (written by the task, or from
        ``states``, the bytes the tasks returned, by this process); step-free tasks give each
        copier its own checkpoint (the source's weights - its file from this step, or in async
        mode its committed checkpoint -, its own stream, the explored values); then one
        transaction records it all."""
        copies = {
            loser: winner
            for loser, winner in copies.items()
            if winner in outs or self.checkpoints[winner] is not None
        }
        new_values = {loser: self._new_values(winner) for loser, winner in sorted(copies.items())}
        mine = {loser: self.db.new_checkpoint_path(loser, self.steps[loser]) for loser in copies}
        order = sorted(copies.items())

        def source(w: int) -> str | bytes:
            if w in outs:
                return str(outs[w]) if states is None else states[w]
            ck = self._checkpoint_of(w)
            return (
                str(self.db.checkpoint_path(ck)) if states is None else self.db.checkpoint_bytes(ck)
            )

        if states is None:
            tasks: list[tuple[Any, ...]] = [
                (
                    self.factory,
                    loser,
                    new_values[loser],
                    source(winner),
                    str(outs[loser]),
                    0,
                    str(mine[loser]),
                    self.values[loser],
                )
                for loser, winner in order
            ]
            if tasks:
                executor.run(member_task, tasks)
        else:
            tasks = [
                (
                    self.factory,
                    loser,
                    new_values[loser],
                    source(winner),
                    states[loser],
                    0,
                    self.values[loser],
                )
                for loser, winner in order
            ]
            copied = executor.run(member_state_task, tasks) if tasks else []
            for (loser, _), (_, _, state) in zip(order, copied, strict=True):
                self.db.write_checkpoint_bytes(mine[loser], state)
        self._record_step(sorted(scores), scores, outs, copies, mine, new_values)

    def best(self) -> dict[str, Any]:
        """The best member by its latest score (ties: lower index)."""
        scores = [math.nan if s is None else s for s in self.latest]
        i = rank(scores, self.maximize)[0]
        if self.members:
            hypers = dict(self.members[i].hyperparameters)
        elif i in getattr(self, "_remote_hypers", {}):
            hypers = dict(self._remote_hypers[i])
        else:  # members on an executor, no task ran in this process (a resume after the end)
            hypers = dict(self.build_member(i).hyperparameters)
        return {
            "member": i,
            "score": scores[i],
            "values": dict(self.values[i]),
            "hyperparameters": hypers,
            "step": self.steps[i],
        }

    def _checkpoint_of(self, i: int) -> int:
        """Member ``i``'s checkpoint, which it has: it trained, or a resume restored it."""
        ck = self.checkpoints[i]
        if ck is None:
            raise RuntimeError(f"PBT: member {i} has no checkpoint to copy from")
        return ck

    def build_member(self, i: int) -> Member:
        """Member ``i`` rebuilt in this process from its current checkpoint."""
        member = self.factory(i, dict(self.values[i]))
        ck = self.checkpoints[i]
        if ck is not None:
            member.load_state_dict(self.db.load_checkpoint(ck))
            member.apply(self.values[i])
        return member

    def close(self) -> None:
        self.db.close()
