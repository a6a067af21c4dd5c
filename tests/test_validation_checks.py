"""Each validation check fails on a model built to break it, and only there; a user's own
check runs from the registry on a context it cannot change."""

from __future__ import annotations

import copy
import dataclasses
import types

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import attn_inject as ai
import attn_inject.validation.runtimes as runtimes

SIZE = (3, 16, 16)
RECIPE = {"name": "se_branch", "rules": [{"at": "residual_branch", "block": {"kind": "se", "ratio": 4}}]}


class Unit(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.bn(self.conv(x))


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.body = nn.Sequential(Unit(), Unit())
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(self.stem(x)).mean((2, 3)))


def _head(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return F.linear(x, m.weight, m.bias)


def _data_dependent(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    if x.mean() > 100:  # a branch on a value: torch.export refuses it
        x = x * 2
    return _head(m, x)


# check -> (module given another forward in the patched model only, that forward)
BREAKS = {
    "reference": ("body.0.bn", lambda m, x: -m.se(m.forward_without_attention(x))),
    "identity": ("body.0.bn", lambda m, x: 1.01 * m.se(m.forward_without_attention(x))),
    "train": ("head", lambda m, x: _head(m, x) * (2.0 if m.training else 1.0)),
    "gradients": ("body.0.bn", lambda m, x: m.se(m.forward_without_attention(x).detach())),
    "shapes": ("head", lambda m, x: _head(m, x).double()),
    "finite": ("head", lambda m, x: _head(m, x) * float("inf")),
    "compile": ("head", lambda m, x: _head(m, x) + float(torch.compiler.is_compiling())),
    "export": ("head", _data_dependent),
    "autocast": ("head", lambda m, x: _head(m, x) + float(torch.is_autocast_enabled("cpu"))),
}


def _models() -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    model = Net().eval()
    return model, ai.inject(model, RECIPE, input_size=SIZE)


def _validate(model: nn.Module, patched: nn.Module, check: str) -> ai.ValidationReport:
    dtypes = (torch.float32, torch.bfloat16) if check == "autocast" else None
    return ai.validate(model, patched, device="cpu", seeds=1, checks=(check,), dtypes=dtypes)


@pytest.fixture(autouse=True)
def _eager_compiler(monkeypatch):
    """torch.compile's eager backend: dynamo still captures the graph, without minutes of C++."""
    monkeypatch.setattr(runtimes, "compile_backend", lambda device: ("eager", "eager in this test"))


@pytest.mark.parametrize("check", sorted(BREAKS))
def test_each_check_passes_on_a_sound_model_and_fails_on_one_built_to_break_it(check):
    model, patched = _models()
    assert _validate(model, patched, check).check(check).status == "passed"
    host, forward = BREAKS[check]
    module = patched.get_submodule(host)
    if module is model.get_submodule(host):  # a module the patched model shares: its own copy
        module = copy.deepcopy(module)
        parent, _, name = host.rpartition(".")
        setattr(patched.get_submodule(parent), name, module)
    module.forward = types.MethodType(forward, module)
    outcome = _validate(model, patched, check).check(check)
    assert outcome.status == "failed", outcome


def test_the_parameter_check_fails_on_a_parameter_the_plan_did_not_add():
    model, patched = _models()
    assert _validate(model, patched, "parameters").check("parameters").status == "passed"
    patched.body[0].extra = nn.Parameter(torch.zeros(3))
    outcome = _validate(model, patched, "parameters").check("parameters")
    assert outcome.status == "failed" and "DIFFERS from the plan's" in outcome.detail


@pytest.fixture
def checks_kept():
    """Checks registered in a test are unregistered after it."""
    before = ai.validation.check_names()
    yield
    for name in ai.validation.check_names():
        if name not in before:
            ai.unregister_check(name)
    assert ai.validation.check_names() == before


def test_a_registered_check_runs_on_a_context_it_cannot_change(checks_kept):
    seen = []

    def blends_at_zero(context):
        seen.append(context)
        with pytest.raises(dataclasses.FrozenInstanceError):
            context.identity = False
        zero = all(not p.any() for ps in context.blends().values() for p in ps)
        return ai.validation.Check("blends", "passed" if zero else "failed", "model", "blends at 0")

    ai.register_check("blends", blends_at_zero)
    assert "blends" in ai.validation.check_names()
    model, patched = _models()
    report = ai.validate(model, patched, device="cpu", seeds=1, checks=("identity", "blends"))
    assert [c.name for c in report.checks] == ["identity", "blends"] and report.passed
    assert seen[0].measurement is not None  # measured once, before any check ran
    with pytest.raises(ValueError, match="already registered"):
        ai.register_check("blends", blends_at_zero)
    with pytest.raises(ai.AttnInjectError, match="allowed: 'trace'"):
        ai.register_check("other", blends_at_zero, needs=["gpu"])


BUILT_IN_CHECKS = (
    "reference",
    "identity",
    "train",
    "gradients",
    "parameters",
    "shapes",
    "finite",
    "deterministic",
    "compile",
    "export",
    "autocast",
)


def test_an_unregistered_check_is_gone_from_the_names_and_refused_when_asked(checks_kept):
    def always(context):
        return ai.validation.Check("always", "passed", "model", "")

    spec = ai.register_check("always", always)
    assert (*BUILT_IN_CHECKS, "always") == ai.validation.CHECKS  # the view follows the registry
    assert "always" in ai.validation.CHECKS and ai.validation.CHECKS[-1] == "always"
    assert ai.unregister_check("always") is spec
    assert ai.validation.CHECKS == BUILT_IN_CHECKS and "always" not in ai.validation.CHECKS
    model, patched = _models()
    with pytest.raises(ValueError, match="unknown checks \\['always'\\]"):
        ai.validate(model, patched, device="cpu", seeds=1, checks=("always",))
    with pytest.raises(ValueError, match="check 'always' is not registered"):
        ai.unregister_check("always")


@pytest.mark.parametrize("name", ["identity", "export"])
def test_a_built_in_check_cannot_be_unregistered(name):
    with pytest.raises(ValueError) as info:
        ai.unregister_check(name)
    assert f"check '{name}' is built in" in str(info.value) and "\n" not in str(info.value)
    assert name in ai.validation.CHECKS
