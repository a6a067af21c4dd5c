"""planning/scopes.py on its own: where each block goes and how it runs (slot, after, before,
graph) in small hand-built modules, each expected placement written by hand."""

from __future__ import annotations

import operator

import pytest
import torch
from torch import fx, nn

from attn_inject.graph.analysis import AnnotatedGraph, annotate, scope_of
from attn_inject.planning.scopes import Attach, Placement, ScopeError, extract_scope, place

from .small_modules import SlotUnit

SHAPE = (1, 4, 8, 8)


class Stage(nn.Module):
    """A stage with code of its own: conv then relu, returning the relu's output."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.conv(x))


class PreActivation(nn.Module):
    """Reads its argument in its own code first (an inline relu), then a conv."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(torch.relu(x))


class InlineResidual(nn.Module):
    """A residual whose branch ends in an inline relu: no module returns the block's input."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn(self.conv(x)))
        return y + x


class Net(nn.Module):
    """stem, inline relu, pre-activation, stage, slot unit, inline residual, 3 stages."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(4, 4, 1)
        self.pre = PreActivation()
        self.stage = Stage()
        self.unit = SlotUnit()
        self.res = InlineResidual()
        self.stages = nn.Sequential(Stage(), Stage(), Stage())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.stem(x))
        return self.stages(self.res(self.unit(self.stage(self.pre(x)))))


class Starred(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 1)

    def forward(self, *xs: torch.Tensor) -> torch.Tensor:
        return self.conv(xs[0])


class TakesStar(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner = Starred()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x)


@pytest.fixture(scope="module")
def traced() -> tuple[Net, AnnotatedGraph]:
    torch.manual_seed(0)
    model = Net().eval()
    return model, annotate(model, SHAPE)


def _module_node(graph: AnnotatedGraph, path: str) -> fx.Node:
    """The call of layer ``path``."""
    (node,) = [n for n in graph.nodes if n.op == "call_module" and n.target == path]
    return node


def _function_node(graph: AnnotatedGraph, function: object, scope: str) -> fx.Node:
    """The one call of ``function`` traced in the code of module ``scope`` ('' the model's)."""
    (node,) = [
        n for n in graph.nodes if n.op == "call_function" and n.target is function and scope_of(n) == scope
    ]
    return node


def _place_one(traced, producer: fx.Node, consumers=None, name: str = "se") -> Placement:
    model, graph = traced
    (placement,) = place(model, graph, [(producer, consumers)], [name])
    return placement


def test_a_none_attribute_its_code_calls_at_the_point_is_a_slot_and_nothing_is_rewritten(traced):
    bn = _module_node(traced[1], "unit.bn")
    assert _place_one(traced, bn) == Placement("unit", "se", "unit", Attach.SLOT)


def test_a_block_on_what_a_module_returns_runs_after_that_module(traced):
    relu = _function_node(traced[1], torch.relu, "stage")
    placement = _place_one(traced, relu, name="cbam")
    assert placement == Placement("stage", "cbam", "stage", Attach.AFTER)
    assert placement.key == "stage.cbam"


def test_a_block_after_a_sequential_goes_after_its_last_member_so_the_container_keeps_its_length(traced):
    last = _function_node(traced[1], torch.relu, "stages.2")
    assert _place_one(traced, last, name="cbam") == Placement("stages.2", "cbam", "stages.2", Attach.AFTER)


def test_a_block_on_the_only_argument_of_a_module_runs_before_it_on_that_parameter(traced):
    relu = _function_node(traced[1], torch.relu, "")  # the model's own relu, read only by pre's relu
    placement = _place_one(traced, relu)
    assert placement == Placement("pre", "se", "pre", Attach.BEFORE, argument="x")


def test_a_block_inside_a_forward_with_an_inline_residual_is_placed_in_that_modules_graph(traced):
    relu = _function_node(traced[1], torch.relu, "res")  # read by the inline add, returned by nobody
    assert _place_one(traced, relu) == Placement("res", "se", "res", Attach.GRAPH)


def test_a_block_on_a_layers_output_read_by_the_next_layer_alone_runs_after_the_layer(traced):
    conv = _module_node(traced[1], "unit.conv")  # read by unit.bn only
    assert _place_one(traced, conv) == Placement("unit.conv", "se", "unit.conv", Attach.AFTER)


def test_a_block_on_the_shortcut_only_runs_in_the_graph_of_the_module_holding_the_add(traced):
    graph = traced[1]
    given = _function_node(graph, torch.relu, "unit")  # res's input: read by res.conv and res's add
    add = _function_node(graph, operator.add, "res")
    assert set(given.users) == {_module_node(graph, "res.conv"), add}
    assert _place_one(traced, given, [add]) == Placement("res", "se", "res", Attach.GRAPH)


def test_names_are_made_unique_in_their_module_and_never_shadow_an_attribute(traced):
    model, graph = traced
    relu = _function_node(graph, torch.relu, "res")
    conv = _module_node(graph, "res.conv")
    placements = place(model, graph, [(relu, None), (relu, None), (conv, None)], ["se", "se", "conv"])
    assert [p.name for p in placements[:2]] == ["se", "se_2"]
    assert placements[2].key.split(".")[-1] != "conv"  # res.conv is already a layer
    assert len({p.key for p in placements}) == 3


def test_extract_scope_gives_a_modules_own_graph_with_its_parameter_and_its_return_value(traced):
    model, graph = traced
    (call,) = [c for c in graph.calls if c.path == "res"]
    scope = extract_scope(model, graph, call)
    assert scope.path == "res" and scope.module is model.res
    placeholders = [n.target for n in scope.graph.nodes if n.op == "placeholder"]
    modules = [n.target for n in scope.graph.nodes if n.op == "call_module"]
    assert placeholders == ["x"] and modules == ["conv", "bn"]  # relative to res
    module = fx.GraphModule(model.res, scope.graph)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(module(x), model.res(x))


def test_extract_scope_refuses_a_module_that_takes_star_args():
    model = TakesStar().eval()
    graph = annotate(model, SHAPE)
    (call,) = [c for c in graph.calls if c.path == "inner"]
    with pytest.raises(ScopeError, match=r"inner takes \*args"):
        extract_scope(model, graph, call)


class Twice(nn.Module):
    """One inline residual called twice: its code cannot stand alone as one call."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = InlineResidual()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(self.inner(x))


def test_a_module_called_twice_cannot_run_the_block_a_wider_one_does_and_the_plan_says_why():
    model = Twice().eval()
    graph = annotate(model, SHAPE)
    first = next(n for n in graph.nodes if n.op == "call_function" and n.target is torch.relu)
    (placement,) = place(model, graph, [(first, None)], ["se"])
    assert (placement.module, placement.owner, placement.attach) == ("", "", Attach.GRAPH)
    assert placement.note == "inner is called 2 times"


# --- what planning keeps across calls --------------------------------------------------------


def test_slot_verdicts_are_kept_across_calls_and_give_the_plan_traced_afresh(build, monkeypatch):
    import attn_inject as ai
    from attn_inject.core.kept import forget_kept_results
    from attn_inject.planning import scopes

    model = build("timm:resnet18")  # BasicBlock's `se = None`: a slot, traced to be told
    real, traced = scopes._calls_slot, []

    def counting(*args, **kwargs):
        traced.append(args[1])
        return real(*args, **kwargs)

    monkeypatch.setattr(scopes, "_calls_slot", counting)
    forget_kept_results()
    fresh = ai.plan(model, "se_resnet")
    assert traced and {p.attach for p in fresh} == {Attach.SLOT}
    traced.clear()
    kept = ai.plan(model, "se_resnet")
    assert traced == []  # every verdict kept from the call before
    assert [(p.key, p.attach, p.owner) for p in kept] == [(p.key, p.attach, p.owner) for p in fresh]


def test_a_design_that_names_a_tensor_is_not_kept_across_calls(monkeypatch):
    from attn_inject.planning import scopes

    unit = SlotUnit()
    unit.scale = torch.ones(1)  # a plain attribute: keyed by identity, and not kept alive here
    design = scopes._code_design(unit)
    assert design is not None and any(v is unit.scale for v in design[1])
    scopes.slot_verdicts.clear()
    this_call: dict = {}
    scopes._slot_verdict(unit, "se", "bn", True, this_call)
    assert len(this_call) == 1 and len(scopes.slot_verdicts) == 0
