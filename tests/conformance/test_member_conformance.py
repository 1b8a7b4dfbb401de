"""Every kind of PBT member honours the member protocol the manager relies on.

Kinds: a :class:`RunMember` (a TrainingRun), a :class:`BatchedMember` (a row of a
BatchedPopulation) and the quartic toy. For each: a saved state continues bit-identically in
a fresh member, ``keep_stream=True`` takes the weights but keeps the member's own batch
stream, ``apply`` sets what ``hyperparameters`` reports, and the score is finite."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch

from gradhpo.data import load_dataset
from gradhpo.pbt import BatchedPopulation
from gradhpo.pbt.manager import BatchedGroup, RunMember
from gradhpo.run.builder import build_run
from gradhpo.testing.quartic import QuarticMember

pytestmark = pytest.mark.usefixtures("one_thread")

CONFIG = {
    "data": {"name": "digits", "seed": 0},
    "model": {"name": "cnn", "depth": 1, "width": 4, "norm": "batch"},
    "optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.9},
    "tuner": None,
    "training": {"batch_size": 32, "seed": 7, "device": "cpu"},
}


@dataclass
class Kind:
    """How to make a population of one kind and advance it."""

    make: Callable[[int], list[Any]]  # n -> n fresh members
    advance: Callable[[list[Any], int], None]


def _digits():
    return load_dataset("digits", seed=0)


def run_kind() -> Kind:
    data = _digits()

    def make(n: int) -> list[Any]:
        return [RunMember(build_run(CONFIG, data=data, seed=7 + i), "val_loss") for i in range(n)]

    return Kind(make, lambda members, k: [m.step(k) for m in members])


def batched_kind() -> Kind:
    data = _digits()

    def make(n: int) -> list[Any]:
        group = BatchedGroup(BatchedPopulation.from_config(CONFIG, data, n), "val_loss")
        return [group.member(i) for i in range(n)]

    return Kind(make, lambda members, k: members[0].group.step(k))


def quartic_kind() -> Kind:
    return Kind(
        lambda n: [QuarticMember(0.01, seed=100 + i) for i in range(n)],
        lambda members, k: [m.step(k) for m in members],
    )


KINDS = {"run": run_kind, "batched": batched_kind, "quartic": quartic_kind}


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return a == b or (isinstance(a, float) and math.isnan(a) and math.isnan(b))


@pytest.mark.parametrize("kind", list(KINDS))
def test_saved_state_continues_identically_in_a_fresh_member(kind: str) -> None:
    k = KINDS[kind]()
    a = k.make(2)
    k.advance(a, 4)
    saved = a[0].state_dict()
    k.advance(a, 4)
    b = k.make(2)
    b[0].load_state_dict(saved)
    b[1].load_state_dict(a[1].state_dict())  # the partner only has to keep pace
    k.advance(b, 4)
    assert _same(
        b[0].state_dict()["model" if kind != "quartic" else "w"],
        a[0].state_dict()["model" if kind != "quartic" else "w"],
    )
    assert b[0].score() == a[0].score()


@pytest.mark.parametrize("kind", list(KINDS))
def test_keep_stream_takes_the_weights_but_not_the_batches(kind: str) -> None:
    k = KINDS[kind]()
    members = k.make(2)
    k.advance(members, 3)
    source = members[0].state_dict()
    members[1].load_state_dict(source, keep_stream=True)
    key = "model" if kind != "quartic" else "w"
    assert _same(members[1].state_dict()[key], source[key])
    twin = k.make(2)
    twin[0].load_state_dict(source)  # the source's own stream
    twin[1].load_state_dict(source)
    k.advance(members, 2)
    k.advance(twin, 2)
    # Same start, other batches: member 1 ends elsewhere than a copy that kept the stream.
    assert not _same(members[1].state_dict()[key], twin[1].state_dict()[key])


@pytest.mark.parametrize("kind", list(KINDS))
def test_apply_sets_what_hyperparameters_report(kind: str) -> None:
    members = KINDS[kind]().make(2)
    members[1].apply({"optimizer.lr": 0.0123})
    assert members[1].hyperparameters["lr"] == pytest.approx(0.0123)
    assert members[0].hyperparameters["lr"] != pytest.approx(0.0123)
    assert math.isfinite(members[1].score())
