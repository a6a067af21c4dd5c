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


class Inner(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.conv(x)) + x


class WithInner(nn.Module):
    def __init__(self, block: nn.Module | None = None) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.inner = block if block is not None else Inner()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(self.stem(x))


def called_modules(model: nn.Module) -> list[str]:
    from attn_inject.graph.trace import trace

    return [str(n.target) for n in trace(model).graph.nodes if n.op == "call_module"]


@pytest.mark.parametrize("named_by", ["class", "dotted name"])
def test_a_registered_leaf_module_is_traced_whole_until_unregistered(named_by):
    model = WithInner().eval()
    assert called_modules(model) == ["stem", "inner.conv", "inner.act"]  # traced through
    leaf = Inner if named_by == "class" else f"{__name__}.Inner"
    assert ai.register_leaf_module(leaf) == f"{__name__}.Inner"
    try:
        assert called_modules(model) == ["stem", "inner"]
        points = ai.plan(model, {"rules": [{"block": "se", "at": "conv_output"}]}, input_size=(3, 8, 8))
        assert [p.node for p in points] == ["stem"]  # none inside the leaf
    finally:
        ai.unregister_leaf_module(leaf)
    assert called_modules(model) == ["stem", "inner.conv", "inner.act"]
    with pytest.raises(ValueError, match="is not registered"):
        ai.unregister_leaf_module(leaf)


@pytest.mark.parametrize("kind", ["se", "eca", "cbam", "simam", "timm:gc"])
def test_every_block_of_the_package_is_a_leaf_inserted_or_not(kind):
    block = ai.create_block(kind, 8)  # SimAM, and Blended for timm's kinds: no list names them
    assert called_modules(WithInner(block).eval()) == ["stem", "inner"]


@pytest.mark.parametrize("leaf", [Inner(), "Inner", "no such.Class", 3])
def test_a_leaf_module_that_is_no_module_class_is_refused_in_one_line(leaf):
    with pytest.raises(ValueError, match=r"must be an nn\.Module class or its dotted name"):
        ai.register_leaf_module(leaf)


def test_the_packages_blocks_stay_leaves():
    from attn_inject.blocks import LayoutBlock

    with pytest.raises(ValueError, match="is built in and cannot be unregistered"):
        ai.unregister_leaf_module(LayoutBlock)
    assert called_modules(WithInner(ai.create_block("simam", 8)).eval()) == ["stem", "inner"]


# --- built-in block kinds and checks replaced, then put back ----------------------------------


def test_a_built_in_block_kind_replaced_is_put_back_by_unregister():
    from attn_inject.blocks import SqueezeExcite, block_factory

    def wider(channels, **kwargs):
        return SqueezeExcite(channels, **{**kwargs, "ratio": 4})

    before = ai.list_blocks()
    ai.register_block("se", wider, overwrite=True)
    try:
        assert block_factory("se") is wider
    finally:
        assert ai.unregister_block("se") is wider
    assert block_factory("se") is SqueezeExcite and ai.list_blocks() == before
    with pytest.raises(ai.InputError, match="'se' is built in and cannot be unregistered"):
        ai.unregister_block("se")  # its own factory again: nothing to put back


def test_a_built_in_check_replaced_is_put_back_by_unregister_in_its_place():
    from attn_inject.validation.registry import registered

    before = registered()
    spec = ai.register_check("reference", lambda context: [], overwrite=True)
    try:
        assert [s.name for s in registered()] == [s.name for s in before]  # replaced in its place
    finally:
        assert ai.unregister_check("reference") is spec
    assert registered() == before
    with pytest.raises(ai.InputError, match="'reference' is built in and cannot be unregistered"):
        ai.unregister_check("reference")
