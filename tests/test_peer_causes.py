"""What timm's and torchvision's own model tests do to a patched model: build it on the meta
device, script it, quantize it, and back-propagate into every parameter."""

from __future__ import annotations

import warnings

import pytest
import timm
import torch
import torchvision
from torch import nn

import attn_inject as ai
from attn_inject.core.errors import AttnInjectError

from .conftest import meta_model

CONV_OUTPUT = {
    "name": "se_after_each_conv",
    "rules": [{"block": {"kind": "se", "ratio": 4}, "name": "se", "at": "conv_output"}],
}


# Hiera's four stages, one block each, 16 channels wide: the layout of hiera_tiny_224 at a
# fraction of its cost (what is planned depends on the stages, not on their depth or width)
TINY_HIERA = {"stages": (1, 1, 1, 1), "embed_dim": 16, "num_heads": 1}


def _keys(plan: ai.Plan) -> list[tuple[str, str, str]]:
    return [(p.name, p.node, p.key) for p in plan]


@pytest.fixture(scope="module")
def hiera_cpu_plan() -> ai.Plan:
    """The plan of the tiny Hiera built on the CPU: the reference the meta-device tests compare to."""
    return ai.plan(timm.create_model("hiera_tiny_224", **TINY_HIERA), "cbam_after_every_stage")


def test_inject_inside_a_meta_default_device_places_what_it_places_on_the_cpu(hiera_cpu_plan):
    cpu_plan = hiera_cpu_plan
    with torch.device("meta"):  # timm's tests build their models this way
        model = timm.create_model("hiera_tiny_224", **TINY_HIERA)
        patched = ai.inject(model, "cbam_after_every_stage")
    plan = patched.attn_inject.plan
    assert len(cpu_plan) == 4  # one block after each of Hiera's four stages
    assert _keys(plan) == _keys(cpu_plan)
    blocks = ai.inserted_blocks(patched)
    assert sorted(blocks) == sorted(p.key for p in cpu_plan)
    assert all(t.is_meta for b in blocks.values() for t in b.parameters())


def test_a_model_on_the_meta_device_plans_like_the_same_model_on_the_cpu(hiera_cpu_plan):
    on_cpu = hiera_cpu_plan
    on_meta = ai.plan(meta_model("timm:hiera_tiny_224", **TINY_HIERA), "cbam_after_every_stage")
    assert _keys(on_meta) == _keys(on_cpu)
    with torch.device("meta"):
        tiny = meta_model("timm:hiera_tiny_224", **TINY_HIERA)
        assert _keys(ai.plan(tiny, "cbam_after_every_stage")) == _keys(on_cpu)
        assert on_meta.base_macs > 0  # the lazy MAC count also runs under a meta default


def _scripted(model: nn.Module) -> torch.jit.ScriptModule:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.script is deprecated, still supported
        return torch.jit.script(model)


def test_densenet_with_se_blocks_scripts_and_the_script_computes_what_the_model_does():
    # _DenseLayer.forward declares TorchScript overloads (a tensor or a list of tensors).
    # A DenseNet of four blocks of two narrow layers: densenet121's classes at a tenth of its script.
    torch.manual_seed(0)
    model = torchvision.models.DenseNet(
        growth_rate=8, block_config=(2, 2, 2, 2), num_init_features=16, bn_size=2
    ).eval()
    patched = ai.inject(model, "se_resnet", init="paper").eval()
    assert len(ai.inserted_blocks(patched)) > 0
    scripted = _scripted(patched)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        expected, got, original = patched(x), scripted(x), model(x)
    torch.testing.assert_close(got, expected)
    assert not torch.allclose(expected, original)  # the paper's init: the blocks act


def test_a_quantized_model_is_refused_in_one_line_naming_why():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao's deprecation notes
        model = torchvision.models.quantization.resnet18(quantize=True)
    with pytest.raises(AttnInjectError) as caught:
        ai.inject(model, "se_resnet")
    message = str(caught.value)
    assert "\n" not in message
    assert "quantized" in message and "quantize=False" in message
    with pytest.warns(UserWarning, match="quantized.*returned unchanged") as warned:
        same = ai.inject(model, "se_resnet", allow_empty=True)
    assert same is model and "\n" not in str(warned[0].message)
    with pytest.raises(ai.PlanError, match="quantized"):
        ai.plan(model, "se_resnet")


def test_a_quantizable_model_still_in_float_takes_a_block_in_every_residual_unit():
    model = torchvision.models.quantization.resnet18(quantize=False).eval()
    units = [n for n, m in model.named_modules() if type(m).__name__ == "QuantizableBasicBlock"]
    # its eager-mode fuse_model cannot (see test_quantization)
    with pytest.warns(UserWarning, match="prepare_fx"):
        patched = ai.inject(model, "se_resnet").eval()
    assert [p.name for p in patched.attn_inject.plan] == units
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(patched(x), model(x), rtol=0, atol=0)


def test_pit_takes_no_block_on_the_last_tokens_its_head_never_reads():
    # PiT's head reads the class token only: the last stage's grid of tokens reaches no output.
    plan = ai.plan(meta_model("timm:pit_ti_224"), "cbam_after_every_stage")
    assert [p.name for p in plan] == ["transformers.0", "transformers.1"]
    (skipped,) = plan.skipped
    assert skipped.name == "transformers.2" and "output does not depend" in skipped.reason


def test_every_block_inserted_into_pit_gets_a_gradient():
    torch.manual_seed(0)
    model = timm.create_model("pit_ti_224", img_size=112)
    patched = ai.inject(model, "cbam_after_every_stage", init="paper").train()
    patched(torch.randn(2, 3, 112, 112)).sum().backward()
    blocks = ai.inserted_blocks(patched)
    assert len(blocks) == 2
    for name, block in blocks.items():
        grads = [p.grad for p in block.parameters()]
        assert all(g is not None for g in grads), name
        assert all(g.abs().sum() > 0 for g in grads), name


class Discards(nn.Module):
    """Computes ``side`` and drops it; writes ``kept`` into the buffer it returns."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU())
        self.side = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU())
        self.kept = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        self.side(x)  # a result nothing reads
        out = x.new_zeros(x.shape[0], 16, x.shape[2], x.shape[3])
        out.narrow(1, 8, 8).copy_(self.kept(x))  # read through the buffer written in place
        return out + x.sum(1, keepdim=True)


def test_a_convolution_whose_result_is_dropped_takes_no_block_and_one_written_in_place_does():
    plan = ai.plan(Discards(), CONV_OUTPUT, input_size=(3, 16, 16))
    assert sorted(p.name for p in plan) == ["kept.0", "stem.0"]
    assert [s.name for s in plan.skipped] == ["side.0"]
    assert "output does not depend" in plan.skipped[0].reason


def test_no_block_on_an_edge_whose_reader_takes_only_the_shape():
    # hieradet's pooled shortcut is read by ``shortcut.shape`` on SE-PRE's edge: a block there
    # would change nothing; its real readers are the additions.
    plan = ai.plan(meta_model("timm:hieradet_small"), "se_pre")
    unread = [s for s in plan.skipped if "passes to" in s.reason]
    assert [s.name for s in unread] == ["blocks.1", "blocks.3", "blocks.14"]
    assert all("getattr" in s.reason and "no gradient" in s.reason for s in unread)
    assert len(plan) == 29
