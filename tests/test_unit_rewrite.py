"""surgery/rewrite.py on its own: blocks placed where the plan says, only the modules that run
one changed, each still its class, and shallow copies from the model down to them."""

from __future__ import annotations

import inspect

import pytest
import torch
from torch import nn

from attn_inject.graph.analysis import AnnotatedGraph
from attn_inject.planning.match import analyse
from attn_inject.planning.points import Plan
from attn_inject.surgery.derive import INNER_FORWARD, base_class, has_rewritten_forward
from attn_inject.surgery.record import patched_record
from attn_inject.surgery.rewrite import BLOCK_FLAG, build_block, rewrite

from .small_modules import SlotUnit

SIZE = (3, 32, 32)
X = torch.randn(2, *SIZE, generator=torch.Generator().manual_seed(0))


class InlineResidual(nn.Module):
    """A residual with layer scale, its add inline in its own forward."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(8, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.gamma = nn.Parameter(torch.full((8,), 0.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv2(torch.relu(self.conv1(x)))
        return torch.relu(x + self.gamma.view(1, -1, 1, 1) * y)


class Net(nn.Module):
    """A stem at reduction 4, a Sequential of the two units, a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, stride=4, padding=1)
        self.body = nn.Sequential(SlotUnit(8), InlineResidual())
        self.head = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(self.stem(x)).mean((2, 3)))


def _model() -> Net:
    torch.manual_seed(0)
    model = Net().eval()
    with torch.no_grad():  # running statistics of their own, so the norm is not an identity
        model.body[0].bn.running_mean.uniform_(-1, 1)
        model.body[0].bn.running_var.uniform_(0.5, 2)
    return model


def _plan(model: nn.Module, block: str, at: str) -> tuple[AnnotatedGraph, Plan]:
    return analyse(model, {"rules": [{"block": block, "at": at}]}, input_size=SIZE, init="identity")


RECIPES = {  # position -> (block, the modules the blocks are children of, how each runs)
    "residual_branch": ("se", {"body.0.se": "slot", "body.1.conv2.se": "after"}),
    "stage_output": ("cbam", {"body.1.cbam": "after"}),
    "identity_branch": ("eca", {"body.0.eca": "graph", "body.1.eca": "graph"}),
}


@pytest.mark.parametrize("at", list(RECIPES))
def test_each_block_is_a_child_where_the_plan_places_it_and_the_model_computes_the_same(at):
    model = _model()
    block, expected = RECIPES[at]
    graph, plan = _plan(model, block, at)
    assert {p.key: str(p.attach) for p in plan} == expected
    patched = rewrite(model, graph, plan)
    for key in expected:
        parent, _, name = key.rpartition(".")
        child = dict(patched.get_submodule(parent).named_children())[name]
        assert getattr(child, BLOCK_FLAG) is True
    with torch.no_grad():
        assert torch.equal(patched(X), model(X))  # identity blocks: the same values


@pytest.mark.parametrize("at", list(RECIPES))
def test_the_model_passed_in_is_not_changed(at):
    model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    modules = {name: (type(m), m) for name, m in model.named_modules()}
    graph, plan = _plan(model, *RECIPES[at][:1], at)
    rewrite(model, graph, plan)
    assert {name: (type(m), m) for name, m in model.named_modules()} == modules
    assert model.body[0].se is None and "se" in vars(model.body[0])
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], v) for k, v in before.items())


def test_a_slot_block_changes_no_code_its_module_stays_exactly_its_class():
    model = _model()
    patched = rewrite(model, *_plan(model, "se", "residual_branch"))
    unit = patched.body[0]
    assert type(unit) is SlotUnit and "se" not in vars(unit) and unit.se is dict(unit.named_children())["se"]
    original = model.body[0]  # a shallow copy: its children and parameters shared, its registry its own
    assert unit is not original and unit._modules is not original._modules
    assert unit.conv is original.conv and unit.bn is original.bn and "se" not in original._modules
    assert not any(has_rewritten_forward(m) for m in patched.modules())


def test_a_block_after_a_module_makes_it_a_subclass_running_its_own_forward_then_the_block():
    model = _model()
    patched = rewrite(model, *_plan(model, "cbam", "stage_output"))
    unit = patched.body[1]
    assert isinstance(unit, InlineResidual) and type(unit) is not InlineResidual
    assert base_class(unit) is InlineResidual and hasattr(unit, INNER_FORWARD)
    assert not has_rewritten_forward(unit)
    assert len(patched.body) == len(model.body) == 2  # the container keeps its length
    with torch.no_grad():
        x = torch.randn(1, 8, 8, 8, generator=torch.Generator().manual_seed(2))
        assert torch.equal(unit(x), unit.cbam(model.body[1](x)))


def test_a_block_in_a_modules_graph_rewrites_that_modules_forward_with_its_signature():
    model = _model()
    patched = rewrite(model, *_plan(model, "eca", "identity_branch"))
    for i, cls in enumerate((SlotUnit, InlineResidual)):
        unit = patched.body[i]
        assert has_rewritten_forward(unit) and isinstance(unit, cls) and base_class(unit) is cls
        assert inspect.signature(type(unit).forward) == inspect.signature(cls.forward)
    assert not has_rewritten_forward(patched) and type(patched) is Net


@pytest.mark.parametrize("at", list(RECIPES))
def test_modules_on_the_path_are_shallow_copies_sharing_parameters_and_the_rest_is_shared(at):
    model = _model()
    patched = rewrite(model, *_plan(model, RECIPES[at][0], at))
    # the model and the body are on every changed path: copies of their own class
    for path in ("", "body"):
        copied, original = patched.get_submodule(path), model.get_submodule(path)
        assert copied is not original and base_class(copied) is type(original)
        assert copied._modules is not original._modules and copied._parameters is not original._parameters
    assert patched.stem is model.stem and patched.head is model.head  # off the path: the same objects
    # every parameter and buffer of the model is the same tensor in the patched one
    params = dict(patched.named_parameters())
    buffers = dict(patched.named_buffers())
    for name, p in model.named_parameters():
        assert params[name] is p
    for name, b in model.named_buffers():
        assert buffers[name] is b
    keys, original = patched.state_dict().keys(), model.state_dict().keys()
    added = keys - original
    assert original <= keys and added
    assert all(any(k.startswith(f"{block}.") for block in RECIPES[at][1]) for k in added)


def test_the_patched_model_records_its_plan_and_that_it_computes_the_original():
    model = _model()
    graph, plan = _plan(model, "se", "residual_branch")
    record = patched_record(rewrite(model, graph, plan))
    assert record is not None and record.plans == (plan,) and record.computes_original
    assert patched_record(model) is None


def test_build_block_gives_a_flagged_block_in_the_models_dtype():
    model = _model()
    _, plan = _plan(model, "se", "residual_branch")
    point = plan[0]
    block = build_block(point, "identity", torch.device("cpu"), torch.float64)
    assert getattr(block, BLOCK_FLAG) is True
    assert all(p.dtype == torch.float64 for p in block.parameters())
    x = torch.randn(1, *point.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    assert torch.equal(block(x), x)  # at identity init a block computes what it is given
