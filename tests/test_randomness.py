"""Randomness is the caller's: ``inject`` leaves torch's, Python's and NumPy's global random
states as they were, draws the blocks' weights from a state of its own (forked from the
global one, or from ``seed=``), so one seed gives one model."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
import torchvision
from torch import nn

import attn_inject as ai

SIZE = (3, 64, 64)
RECIPE = {"rules": [{"block": "se", "at": "stage_output", "stages": [0, 1]}]}


@pytest.fixture(scope="module")
def resnet() -> nn.Module:
    torch.manual_seed(0)
    return torchvision.models.resnet18().eval()


def block_weights(patched: nn.Module) -> dict[str, torch.Tensor]:
    blocks = ai.inserted_blocks(patched).items()
    return {f"{key}.{name}": t for key, b in blocks for name, t in b.state_dict().items()}


def same_weights(a: nn.Module, b: nn.Module) -> bool:
    wa, wb = block_weights(a), block_weights(b)
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def global_states() -> tuple:
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else []
    return torch.random.get_rng_state(), cuda, random.getstate(), np.random.get_state()


def assert_same_states(before: tuple, after: tuple) -> None:
    assert torch.equal(before[0], after[0])
    assert len(before[1]) == len(after[1])
    assert all(torch.equal(a, b) for a, b in zip(before[1], after[1], strict=True))
    assert before[2] == after[2]
    b, a = before[3], after[3]
    assert b[0] == a[0] and np.array_equal(b[1], a[1]) and b[2:] == a[2:]


@pytest.mark.parametrize("seed", [None, 7])
def test_inject_leaves_every_global_random_state_as_it_was(resnet, seed):
    torch.manual_seed(123)
    random.seed(123)
    np.random.seed(123)
    before = global_states()
    ai.inject(resnet, RECIPE, input_size=SIZE, seed=seed)
    assert_same_states(before, global_states())


def test_torchvisions_test_pattern_draws_the_same_input_with_and_without_inject():
    def draw(with_inject: bool) -> torch.Tensor:
        torch.manual_seed(0)
        model = torchvision.models.resnet18()
        if with_inject:
            ai.inject(model, "se_resnet", input_size=SIZE)
        return torch.rand(2, *SIZE)

    assert torch.equal(draw(True), draw(False))


def test_one_seed_gives_one_model_whatever_the_global_state(resnet):
    torch.manual_seed(1)
    first = ai.inject(resnet, RECIPE, input_size=SIZE, seed=3)
    torch.manual_seed(2)
    second = ai.inject(resnet, RECIPE, input_size=SIZE, seed=3)
    other = ai.inject(resnet, RECIPE, input_size=SIZE, seed=4)
    assert same_weights(first, second)
    assert not same_weights(first, other)


def test_without_a_seed_the_blocks_are_drawn_from_the_callers_state(resnet):
    torch.manual_seed(5)
    first = ai.inject(resnet, RECIPE, input_size=SIZE)
    second = ai.inject(resnet, RECIPE, input_size=SIZE)  # the global state did not move: the same draw
    torch.manual_seed(6)
    third = ai.inject(resnet, RECIPE, input_size=SIZE)
    assert same_weights(first, second)
    assert not same_weights(first, third)


@pytest.mark.parametrize("seed", [-1, 2**32, 1.5, "3", True])
def test_a_seed_that_is_not_a_small_natural_number_is_refused(resnet, seed):
    with pytest.raises(ai.AttnInjectError, match="seed"):
        ai.inject(resnet, RECIPE, input_size=SIZE, seed=seed)


def test_a_refused_injection_leaves_the_random_states_too(resnet):
    before = global_states()
    with pytest.raises(ai.AttnInjectError):
        ai.inject(resnet, {"rules": [{"block": "se", "at": "stage_output", "stages": [9]}]}, input_size=SIZE)
    assert_same_states(before, global_states())
