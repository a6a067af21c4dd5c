"""Sizes the meta pass knows, specialised where a model's code needs a plain value
(attn_inject/graph/specialise.py): iterated chunks, int() of a size, rank and dtype checks,
each assumption recorded in the plan and checked at every call of a rewritten forward."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import attn_inject as ai

SIZE = (3, 32, 32)


def conv(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


class Bottleneck(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.cv1, self.cv2 = conv(c, c), conv(c, c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.cv2(self.cv1(x))


class SplitBlock(nn.Module):
    """Ultralytics' C2f in miniature: the map split in two by ``chunk``, iterated as a list."""

    def __init__(self, c: int, n: int = 2) -> None:
        super().__init__()
        self.cv1 = conv(c, c)
        self.m = nn.ModuleList(Bottleneck(c // 2) for _ in range(n))
        self.cv2 = conv(c // 2 * (2 + n), c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = list(self.cv1(x).chunk(2, 1))
        y.extend(m(y[-1]) for m in self.m)
        return self.cv2(torch.cat(y, 1))


class SamePad(nn.Module):
    """TensorFlow's "same" padding (Hugging Face's MobileNetV2): sizes read with int()."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        height, width = int(x.shape[-2]), int(x.shape[-1])
        return F.pad(x, (0, width % 2, 0, height % 2))


class Checked(nn.Module):
    """A model whose forward checks its input's rank, size and dtype first (as
    segmentation-models-pytorch and transformers' ViT do), then splits and pads."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = conv(3, 16, 2)
        self.pad = SamePad()
        self.stage = SplitBlock(16)
        self.head = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[-1] % 16 != 0:
            raise ValueError("expected an image whose width divides by 16")
        if x.dtype != self.stem[0].weight.dtype:
            x = x.to(self.stem[0].weight.dtype)
        x = self.stage(self.pad(self.stem(x)))
        return self.head(x.mean((2, 3)))


def test_a_forward_fx_cannot_follow_is_traced_with_its_sizes_specialised():
    torch.manual_seed(0)
    model = Checked().eval()
    plan = ai.plan(model, "se_resnet", input_size=SIZE)
    assert plan.tracing == "specialised" and plan.opaque == ()
    assert [p.name for p in plan] == ["stage.m.0", "stage.m.1"]  # every residual inside the split block
    uses = {(a.module, a.use) for a in plan.assumptions}
    assert {("", "bool"), ("pad", "int"), ("stage", "len")} <= uses
    assert any(str(a).startswith("int(") and "in pad" in str(a) for a in plan.assumptions)
    assert plan.to_dict()["assumptions"] == [str(a) for a in plan.assumptions]
    patched = ai.inject(model, "se_resnet", input_size=SIZE, init="identity")
    assert type(patched) is Checked
    for size in (32, 64):  # the modules' own code runs: any size still works
        x = torch.randn(2, 3, size, size)
        assert torch.equal(patched(x), model(x))


class RootHosted(nn.Module):
    """A block point in the root's own code, after a size read with int(): the root's forward
    is rewritten, and the size it was planned for is checked at every call."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = conv(3, 8), conv(8, 8)
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.a(x)
        x = F.pad(x, (0, int(x.shape[-1]) % 3))
        x = x + torch.sigmoid(self.b(x))  # the branch ends in the root's own code
        return self.head(x.mean((2, 3)))


def test_a_rewritten_forward_checks_the_sizes_it_was_specialised_for():
    torch.manual_seed(0)
    model = RootHosted().eval()
    plan = ai.plan(model, "se_resnet", input_size=SIZE)
    assert plan.tracing == "specialised" and [p.name for p in plan] == ["add"]
    patched = ai.inject(model, "se_resnet", input_size=SIZE, init="identity")
    assert ai.has_rewritten_forward(patched)
    x = torch.randn(2, *SIZE)
    assert torch.equal(patched(x), model(x))
    other = torch.randn(2, 3, 31, 31)  # 31 % 3 = 1, where 32 % 3 = 2: another padding
    model(other)
    with pytest.raises(Exception, match="rewritten for an input where int"):
        patched(other)
    assert ai.validate(model, patched, input_size=SIZE).passed


class ValueBranch(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = conv(3, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.a(x)
        if y.sum() > 0:  # the values: no meta pass knows them
            y = y * 2
        return y + self.a(x)


def test_a_branch_on_values_is_still_refused_with_the_reason():
    reason = r"control flow; traced again with its sizes specialised: .*does not give"
    with pytest.raises(ai.TraceError, match=reason):
        ai.plan(ValueBranch().eval(), "se_resnet", input_size=SIZE)


class Remembering(nn.Module):
    """Keeps what its forward computed on itself (Ultralytics' Detect keeps its anchors and
    the shape they were made for): tracing and the meta pass must leave no proxy or meta
    tensor behind."""

    shape = None

    def __init__(self) -> None:
        super().__init__()
        self.conv = conv(3, 8)
        self.calls = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.shape != x.shape:
            self.grid = torch.arange(x.shape[-1], dtype=x.dtype, device=x.device)
            self.shape = x.shape
            self.calls["grid"] = self.grid
        y = self.conv(x)
        return y + self.conv(x) * self.grid


def test_planning_leaves_what_a_forward_stores_on_the_model_as_it_was():
    model = Remembering().eval()
    before = dict(vars(model))
    plan = ai.plan(model, "se_resnet", input_size=SIZE)
    assert plan.tracing == "specialised"
    assert dict(vars(model)) == before and model.calls == {} and "grid" not in vars(model)
    x = torch.randn(2, *SIZE)
    assert model(x).shape == (2, 8, 32, 32) and model.grid.device.type == "cpu"


def test_a_model_fx_traces_as_written_keeps_the_plain_trace():
    model = nn.Sequential(conv(3, 8), nn.AdaptiveAvgPool2d(1))
    plan = ai.plan(model, "cbam_after_every_stage", input_size=SIZE)
    assert plan.tracing == "whole" and plan.assumptions == ()
