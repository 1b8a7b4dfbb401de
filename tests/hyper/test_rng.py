"""RngState: capture and restore replay the same random draws (CPU; the CUDA generator is
checked where a GPU is present)."""

from __future__ import annotations

import pytest
import torch

from gradhpo.hyper.rng import RngState


def test_restore_replays_the_same_draws_and_capture_does_not_consume() -> None:
    torch.manual_seed(3)
    state = RngState.capture("cpu")
    first = torch.rand(5)
    after = torch.rand(5)
    state.restore()
    assert torch.equal(torch.rand(5), first) and torch.equal(torch.rand(5), after)
    assert state.cuda is None and state.device is None


def test_a_dropout_mask_is_replayed() -> None:
    torch.manual_seed(0)
    x = torch.ones(1000)
    state = RngState.capture(torch.device("cpu"))
    mask = torch.nn.functional.dropout(x, 0.5)
    state.restore()
    assert torch.equal(torch.nn.functional.dropout(x, 0.5), mask)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_generator_is_captured_and_restored() -> None:
    device = torch.device("cuda", torch.cuda.current_device())
    state = RngState.capture(device)
    assert state.cuda is not None and state.device == device
    cpu, gpu = torch.rand(3), torch.rand(3, device=device)
    state.restore()
    assert torch.equal(torch.rand(3), cpu) and torch.equal(torch.rand(3, device=device), gpu)
