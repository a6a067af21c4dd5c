"""Extension points: a position, a leaf module, a check and a block are each one registration
away, and each unregistration puts the registry back as it was."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

import attn_inject as ai

SIZE = (3, 64, 64)


def resnet18() -> nn.Module:
    return torchvision.models.resnet18(weights=None, num_classes=10).eval()


def after_every_pool(query):
    """A position of the user's own: after each max pooling."""
    for node in query.graph.nodes:
        if node.op == "call_module" and isinstance(query.graph.module(node), nn.MaxPool2d):
            yield query.candidate(str(node.target), node)


@pytest.fixture
def after_pool():
    ai.register_position("after_pool", after_every_pool)
    yield "after_pool"
    ai.unregister_position("after_pool")
    assert "after_pool" not in ai.POSITIONS


def test_a_registered_position_is_named_by_a_recipe_and_planned_where_its_handler_says(after_pool):
    assert after_pool in ai.POSITIONS  # the live table, as a recipe reads it
    plan = ai.plan(resnet18(), {"rules": [{"block": "se", "at": after_pool}]}, input_size=SIZE)
    # resnet18 has one max pooling, the stem's: 64 channels at a quarter of 64 px
    assert [(p.position, p.node, p.channels, p.shape) for p in plan] == [
        (after_pool, "maxpool", 64, (64, 16, 16))
    ]


def test_a_block_at_a_registered_position_computes_the_original_at_identity(after_pool):
    model, x = resnet18(), torch.randn(2, *SIZE)
    patched = ai.inject(model, {"rules": [{"block": "se", "at": after_pool}]}, input_size=SIZE).eval()
    assert len(ai.inserted_blocks(patched)) == 1
    with torch.no_grad():
        assert torch.equal(patched(x), model(x))


def test_an_unregistered_position_is_refused_by_a_recipe_again():
    ai.register_position("after_pool", after_every_pool)
    assert ai.unregister_position("after_pool") is after_every_pool
    with pytest.raises(ai.RecipeError, match="unknown position 'after_pool'"):
        ai.load_recipe({"rules": [{"block": "se", "at": "after_pool"}]})
    with pytest.raises(ValueError, match="position 'after_pool' is not registered"):
        ai.unregister_position("after_pool")


@pytest.mark.parametrize("name", ["residual_branch", "stage_output"])
def test_a_built_in_position_cannot_be_replaced_or_unregistered(name):
    with pytest.raises(ValueError, match=f"position '{name}' is built in"):
        ai.register_position(name, after_every_pool, overwrite=True)
    with pytest.raises(ValueError, match=f"position '{name}' is built in"):
        ai.unregister_position(name)
    assert name in ai.POSITIONS


def test_a_position_handler_that_yields_no_candidates_is_named():
    ai.register_position("broken", lambda query: [query.graph.nodes[0].name])
    try:
        with pytest.raises(TypeError, match="position 'broken' gave a str"):
            ai.plan(resnet18(), {"rules": [{"block": "se", "at": "broken"}]}, input_size=SIZE)
    finally:
        ai.unregister_position("broken")
