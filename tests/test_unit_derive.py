"""surgery/derive.py on its own: a changed module is an instance of a generated subclass of
its own class, with the same name, methods and forward signature."""

from __future__ import annotations

import copy
import inspect
import operator
import pickle

import pytest
import torch
from torch import fx, nn

from attn_inject.core.errors import InputError
from attn_inject.surgery.derive import (
    INNER_FORWARD,
    Around,
    base_class,
    derive_around,
    derive_graph,
    derived_spec,
    has_rewritten_forward,
)


class Unit(nn.Module):
    """A module with optional and keyword-only arguments and a method of its own."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1, bias=False)
        with torch.no_grad():
            self.conv.weight.copy_(torch.eye(3).view(3, 3, 1, 1))

    def forward(self, x: torch.Tensor, scale: float = 1.0, *, shift: float = 0.0) -> torch.Tensor:
        return self.conv(x) * scale + shift

    def describe(self) -> str:
        return "unit"


class Times(nn.Module):
    """A block that multiplies by ``k``: what it did is visible in the output."""

    def __init__(self, k: float) -> None:
        super().__init__()
        self.k = k

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.k


X = torch.arange(12, dtype=torch.float32).view(1, 3, 2, 2)


def _with_blocks(**blocks: nn.Module) -> Unit:
    module = Unit()
    for name, block in blocks.items():
        module.add_module(name, block)
    return module


def _methods(cls: type) -> set[str]:
    return {name for name in dir(cls) if callable(getattr(cls, name, None))}


def test_a_module_with_a_block_after_it_is_still_its_class_with_its_signature_and_methods():
    module = _with_blocks(after=Times(2.0))
    derive_around(module, Around(after=("after",)))
    cls = type(module)
    assert cls is not Unit and isinstance(module, Unit) and issubclass(cls, Unit)
    assert (cls.__name__, cls.__qualname__, cls.__module__) == ("Unit", "Unit", Unit.__module__)
    assert inspect.signature(cls.forward) == inspect.signature(Unit.forward)
    assert _methods(cls) >= _methods(Unit) | {INNER_FORWARD}
    assert module.describe() == "unit"
    assert base_class(module) is Unit and not has_rewritten_forward(module)
    spec = derived_spec(module)
    assert spec is not None and spec.base is Unit and spec.around == Around(after=("after",))


def test_the_block_runs_on_what_the_forward_returns_and_its_arguments_still_reach_it():
    module = _with_blocks(after=Times(2.0))
    derive_around(module, Around(after=("after",)))
    assert torch.equal(module(X, 3.0, shift=1.0), (X * 3.0 + 1.0) * 2.0)
    assert torch.equal(module(X), X * 2.0)


def test_a_block_before_runs_on_its_argument_only():
    module = _with_blocks(pre=Times(5.0))
    derive_around(module, Around().add(before="x", block="pre"))
    assert torch.equal(module(X, 2.0, shift=1.0), X * 5.0 * 2.0 + 1.0)


def test_deriving_again_keeps_the_earlier_blocks_and_the_class_stays_the_users():
    module = _with_blocks(a=Times(2.0), b=Times(3.0), p=Times(7.0))
    derive_around(module, Around(after=("a",)))
    derive_around(module, Around(after=("b",)).add(before="x", block="p"))
    assert base_class(module) is Unit and type(module).__bases__ == (Unit,)
    assert derived_spec(module).around == Around(before=(("x", ("p",)),), after=("a", "b"))
    assert torch.equal(module(X), X * 7.0 * 2.0 * 3.0)


def test_the_same_blocks_on_the_same_class_share_one_generated_class():
    one, two = _with_blocks(after=Times(2.0)), _with_blocks(after=Times(2.0))
    derive_around(one, Around(after=("after",)))
    derive_around(two, Around(after=("after",)))
    assert type(one) is type(two)


def test_a_block_before_a_parameter_the_forward_does_not_take_is_refused():
    module = _with_blocks(pre=Times(2.0))
    with pytest.raises(InputError, match=r"Unit.forward has no parameter 'y'"):
        derive_around(module, Around().add(before="y", block="pre"))
    assert type(module) is Unit


def test_a_derived_module_copies_and_pickles_as_its_generated_class():
    module = _with_blocks(after=Times(2.0))
    derive_around(module, Around(after=("after",)))
    for clone in (copy.deepcopy(module), pickle.loads(pickle.dumps(module))):
        assert isinstance(clone, Unit) and base_class(clone) is Unit
        assert clone.after is not module.after
        assert torch.equal(clone(X, 2.0), X * 4.0)
    assert "self.after(out)" in inspect.getsource(type(module).forward)


def _graph_with_negation() -> tuple[fx.Graph, tuple[tuple[str, object], ...]]:
    """Unit's forward as traced at scale=2.0 (shift left at its default), its output negated:
    the graph a scope trace gives: a placeholder for each argument of the call it was traced at."""
    graph = fx.Graph()
    x = graph.placeholder("x")
    graph.placeholder("scale")  # passed as the constant 2.0, which the graph holds
    scaled = graph.call_function(operator.mul, (graph.call_module("conv", (x,)), 2.0))
    graph.output(graph.call_function(torch.neg, (scaled,)))
    graph.lint()
    return graph, (("x", x), ("scale", 2.0))


def test_a_graph_forward_keeps_the_class_and_signature_and_runs_the_graph():
    module = Unit()
    graph, arguments = _graph_with_negation()
    derive_graph(module, graph, arguments, "unit")
    assert isinstance(module, Unit) and type(module) is not Unit and base_class(module) is Unit
    assert has_rewritten_forward(module)
    assert inspect.signature(type(module).forward) == inspect.signature(Unit.forward)
    assert _methods(type(module)) >= _methods(Unit)
    assert torch.equal(module(X, 2.0), -(X * 2.0))
    assert torch.equal(module(X, scale=2.0, shift=0.0), -(X * 2.0))


def test_a_graph_forward_refuses_arguments_other_than_those_the_trace_fixed():
    module = Unit()
    graph, arguments = _graph_with_negation()
    derive_graph(module, graph, arguments, "unit")
    with pytest.raises(RuntimeError, match=r"unit's forward was rewritten with scale=2.0"):
        module(X, 3.0)
    with pytest.raises(RuntimeError, match=r"rewritten with shift=0.0"):
        module(X, 2.0, shift=1.0)


def test_a_module_with_a_graph_forward_takes_no_blocks_around_it():
    module = _with_blocks(after=Times(2.0))
    graph, arguments = _graph_with_negation()
    derive_graph(module, graph, arguments, "unit")
    with pytest.raises(InputError, match="already rewritten"):
        derive_around(module, Around(after=("after",)))


def test_an_unchanged_module_is_its_own_base_class():
    module = Unit()
    assert derived_spec(module) is None and base_class(module) is Unit and not has_rewritten_forward(module)


class Dense(nn.ModuleDict):
    """A dict of layers whose forward runs each of its items (torchvision's dense block)."""

    def __init__(self) -> None:
        super().__init__({"a": Times(2.0), "b": Times(3.0)})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for _, layer in self.items():
            x = layer(x)
        return x


def test_a_dict_of_layers_with_a_block_keeps_its_length_keys_and_iteration():
    module = Dense()
    module.add_module("after", Times(5.0))
    derive_around(module, Around(after=("after",)))
    assert isinstance(module, Dense) and isinstance(module, nn.ModuleDict)
    assert len(module) == 2 and list(module) == ["a", "b"] and list(module.keys()) == ["a", "b"]
    assert "after" not in module and [name for name, _ in module.named_children()] == ["a", "b", "after"]
    assert torch.equal(module(X), X * 2.0 * 3.0 * 5.0)  # the forward's loop did not run the block twice


class Sized(nn.Module):
    """A block given two sizes besides its input: it adds their product, so the sizes it was
    given are visible in the output."""

    def forward(self, x: torch.Tensor, height: int | None = None, width: int | None = None) -> torch.Tensor:
        return x + (height or 0) * (width or 0)


class TakesSizes(nn.Module):
    """A module called with its tokens' grid size, as XCiT's blocks are (``blk(x, H, W)``)."""

    def forward(self, x: torch.Tensor, H: int, W: int) -> torch.Tensor:
        return x * 2


def test_a_block_after_is_given_the_parameters_its_sizes_name():
    module = TakesSizes()
    module.add_module("cbam", Sized())
    module.add_module("plain", Times(3.0))
    derive_around(module, Around().add(after="", block="cbam", sizes=("H", "W")).add(after="", block="plain"))
    assert torch.equal(module(X, 4, 5), (X * 2 + 20) * 3.0)
    assert torch.equal(module(X, W=2, H=3), (X * 2 + 6) * 3.0)  # by name, as the call gives them
    # deriving again keeps the first block's sizes
    module.add_module("more", Sized())
    derive_around(module, Around().add(after="", block="more", sizes=("W", "H")))
    assert dict(derived_spec(module).around.sizes) == {"cbam": ("H", "W"), "more": ("W", "H")}
    assert torch.equal(module(X, 4, 5), (X * 2 + 20) * 3.0 + 20)


def test_sizes_from_a_parameter_the_forward_does_not_take_are_refused():
    module = TakesSizes()
    module.add_module("cbam", Sized())
    with pytest.raises(InputError, match="has no parameter 'height'"):
        derive_around(module, Around().add(after="", block="cbam", sizes=("height", "W")))


class TakesASize(nn.Module):
    """A module called with its grid's size as one tuple, as timm's Twins blocks are."""

    def forward(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        return x * 2


def test_a_block_after_is_given_the_items_of_a_tuple_parameter():
    module = TakesASize()
    module.add_module("cbam", Sized())
    derive_around(module, Around().add(after="", block="cbam", sizes=("size[0]", "size[1]")))
    assert torch.equal(module(X, (4, 5)), X * 2 + 20)
    assert torch.equal(module(X, size=(3, 2)), X * 2 + 6)


@pytest.mark.parametrize(
    "given", ["size[0]; import os", "size[-1]", "size[0][1]", "size.real", "out", "out[0]"]
)
def test_sizes_that_are_not_a_parameter_or_its_item_are_refused_before_any_code_is_made(given):
    module = TakesASize()
    module.add_module("cbam", Sized())
    with pytest.raises(InputError, match="must be a parameter or its item"):
        derive_around(module, Around().add(after="", block="cbam", sizes=(given, "size[1]")))
