"""``seeded_global_rng``: the one way a study seeds what only reads torch's global RNG."""

from __future__ import annotations

import pytest
import torch

from kexue.studies.base import seeded_global_rng


def test_seeded_block_is_reproducible_and_restores_the_callers_rng():
    torch.manual_seed(99)
    state = torch.get_rng_state()
    with seeded_global_rng(5):
        a = torch.nn.Linear(4, 3).weight.detach().clone()
        d = torch.nn.functional.dropout(torch.ones(50), 0.5)
    assert torch.equal(torch.get_rng_state(), state)
    with seeded_global_rng(5):
        b = torch.nn.Linear(4, 3).weight.detach().clone()
        assert torch.equal(torch.nn.functional.dropout(torch.ones(50), 0.5), d)
    assert torch.equal(a, b)
    torch.manual_seed(5)  # the same draws as the torch.manual_seed(seed) it replaces
    assert torch.equal(torch.nn.Linear(4, 3).weight.detach(), a)
    with seeded_global_rng(6):
        assert not torch.equal(torch.nn.Linear(4, 3).weight.detach(), a)


def test_seeded_block_restores_on_error_and_checks_the_seed():
    state = torch.get_rng_state()
    with pytest.raises(RuntimeError, match="boom"):
        with seeded_global_rng(1):
            torch.rand(3)
            raise RuntimeError("boom")
    assert torch.equal(torch.get_rng_state(), state)
    with pytest.raises(TypeError, match="seed"):
        with seeded_global_rng(1.5):
            pass


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_seeded_block_forks_and_seeds_the_cuda_generator():
    state = torch.cuda.get_rng_state()
    with seeded_global_rng(3, device="cuda"):
        a = torch.rand(4, device="cuda")
    with seeded_global_rng(3, device="cuda"):
        b = torch.rand(4, device="cuda")
    assert torch.equal(a, b) and torch.equal(torch.cuda.get_rng_state(), state)
