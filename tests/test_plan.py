"""Planning: which insertion points a recipe finds in the common timm and torchvision CNNs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision
from torch import nn

import attn_inject as ai

from .conftest import SIZE, meta_model

RESNET50 = [256] * 3 + [512] * 4 + [1024] * 6 + [2048] * 3

# Channel counts written down from each architecture's definition.
RESIDUAL_CHANNELS = {
    "tv:resnet18": [64, 64, 128, 128, 256, 256, 512, 512],
    "tv:resnet50": RESNET50,
    "timm:resnet50": RESNET50,
    "timm:convnext_tiny": [96] * 3 + [192] * 3 + [384] * 9 + [768] * 3,
    "timm:efficientnet_b0": [24, 40, 80, 80, 112, 112, 192, 192, 192],
    "timm:mobilenetv3_large_100": [16, 24, 40, 40, 80, 80, 80, 112, 160, 160],
    "timm:densenet121": [],
    "timm:nf_resnet26": [256] * 2 + [512] * 2 + [1024] * 2 + [2048] * 2,  # NormFreeBlock traced through
    "timm:dm_nfnet_f0": [256, 512, 512] + [1536] * 9,  # skipinit's in-place gain threaded through
}
STAGE_CHANNELS = {
    "tv:resnet18": [64, 128, 256, 512],
    "tv:resnet50": [256, 512, 1024, 2048],
    "timm:resnet50": [256, 512, 1024, 2048],
    "timm:convnext_tiny": [96, 192, 384, 768],
    "timm:efficientnet_b0": [24, 40, 112, 320],
    "timm:mobilenetv3_large_100": [24, 40, 112, 960],
    "timm:densenet121": [256, 512, 1024, 1024],
}


@pytest.mark.parametrize("name", RESIDUAL_CHANNELS)
def test_residual_branch_finds_every_residual_addition(name):
    plan = ai.plan(meta_model(name), "se_resnet", input_size=SIZE)
    if not RESIDUAL_CHANNELS[name]:  # no residual unit: the recipe's fallback, after each conv
        assert plan.used_fallback and {p.position for p in plan} == {"conv_output"}
        return
    assert [p.channels for p in plan] == RESIDUAL_CHANNELS[name]
    assert all(p.position == "residual_branch" for p in plan) and not plan.used_fallback


@pytest.mark.parametrize("name", STAGE_CHANNELS)
def test_stage_output_finds_each_stage_end(name):
    plan = ai.plan(meta_model(name), "cbam_after_every_stage", input_size=SIZE)
    assert [p.channels for p in plan] == STAGE_CHANNELS[name]
    assert [p.stage for p in plan] == list(range(len(STAGE_CHANNELS[name])))


def test_stage_output_in_torchvision_resnet50_ends_at_layer_outputs_not_next_conv():
    plan = ai.plan(meta_model("tv:resnet50"), "se_after_every_stage")
    assert [p.name for p in plan] == ["layer1", "layer2", "layer3", "layer4"]
    assert [p.shape[1:] for p in plan] == [(56, 56), (28, 28), (14, 14), (7, 7)]


def test_stage_output_without_feature_info_uses_dominators_for_torchvision_models():
    cases = {
        "tv:mobilenet_v3_large": [24, 40, 112, 960],
        "tv:densenet121": [256, 512, 1024, 1024],
        "tv:convnext_tiny": [96, 192, 384, 768],
        "tv:regnet_y_400mf": [48, 104, 208, 440],
    }
    for name, channels in cases.items():
        model = (
            meta_model(name) if "regnet" not in name else __import__("torchvision").models.regnet_y_400mf()
        )
        plan = ai.plan(model, "se_after_every_stage", input_size=SIZE)
        assert [p.channels for p in plan] == channels, name


def test_plan_leaves_model_unchanged_and_is_plain_data():
    model = meta_model("tv:resnet18")
    before = {k: v for k, v in model.state_dict().items()}
    modules = list(model.modules())
    plan = ai.plan(model, "cbam_resnet")
    assert list(model.state_dict()) == list(before)
    assert list(model.modules()) == modules
    assert not any(getattr(m, "_attn_inject_block", False) for m in model.modules())
    first = plan[0]
    assert isinstance(first, ai.InsertionPoint)
    assert (first.name, first.position, first.channels, first.block.kind) == (
        "layer1.0",
        "residual_branch",
        64,
        "cbam",
    )
    assert first.params == 2 * 64 * 4 + 4 + 64 + 2 * 7 * 7 + 2  # MLP with biases, 7x7 conv, two blends
    assert plan.to_dict()["points"][0]["name"] == "layer1.0"
    assert "layer1.0" in plan.table()


def test_plan_is_empty_list_when_nothing_matches():
    plan = ai.plan(meta_model("timm:densenet121"), "se_pre", input_size=SIZE)
    assert plan == []
    assert len(plan) == 0


def test_plan_is_in_graph_order_across_rules():
    recipe = {
        "rules": [
            {"block": "se", "at": "stage_output"},
            {"block": "eca", "at": "residual_branch", "stages": [0]},
        ]
    }
    plan = ai.plan(meta_model("tv:resnet18"), recipe)
    assert [(p.name, p.block.kind) for p in plan] == [
        ("layer1.0", "eca"),
        ("layer1.1", "eca"),
        ("layer1", "se"),
        ("layer2", "se"),
        ("layer3", "se"),
        ("layer4", "se"),
    ]


@pytest.mark.parametrize(
    "rule, names",
    [
        ({"stages": [-1]}, ["layer4.0", "layer4.1"]),
        ({"stages": [0, 2]}, ["layer1.0", "layer1.1", "layer3.0", "layer3.1"]),
        ({"min_channels": 256}, ["layer3.0", "layer3.1", "layer4.0", "layer4.1"]),
        ({"max_channels": 64}, ["layer1.0", "layer1.1"]),
        ({"include": r"^layer2"}, ["layer2.0", "layer2.1"]),
        ({"exclude": [r"\.0$"]}, ["layer1.1", "layer2.1", "layer3.1", "layer4.1"]),
        ({"every": 3}, ["layer1.0", "layer2.1", "layer4.0"]),
    ],
)
def test_rule_filters_select_points(rule, names):
    recipe = {"rules": [{"block": "se", "at": "residual_branch", **rule}]}
    assert [p.name for p in ai.plan(meta_model("tv:resnet18"), recipe)] == names


def test_stage_index_out_of_range_is_a_clear_error():
    recipe = {"rules": [{"block": "se", "at": "residual_branch", "stages": [4]}]}
    with pytest.raises(ai.PlanError, match=r"stages: \[4\] out of range.*4 stages.*layer1"):
        ai.plan(meta_model("tv:resnet18"), recipe)


def test_channels_last_stretches_get_native_nhwc_blocks_or_are_skipped():
    # torchvision Swin keeps its stages NHWC, and permutes the last one back to NCHW.
    plan = ai.plan(meta_model("tv:swin_t"), "cbam_after_every_stage", input_size=(3, 224, 224))
    assert [(p.channels, p.layout, p.shape) for p in plan] == [
        (96, "NHWC", (56, 56, 96)),
        (192, "NHWC", (28, 28, 192)),
        (384, "NHWC", (14, 14, 384)),
        (768, "NCHW", (768, 7, 7)),
    ]
    skipped = ai.plan(
        meta_model("tv:swin_t"),
        {"rules": [{"block": "cbam", "at": "stage_output", "channels_last": "skip"}]},
    )
    assert [(p.name, p.channels, p.shape) for p in skipped] == [("permute", 768, (768, 7, 7))]
    assert len(skipped.skipped) == 3 and all("channels-last (NHWC)" in s.reason for s in skipped.skipped)
    # ConvNeXt blocks permute to NHWC inside; the residual block goes after the permute back.
    plan = ai.plan(meta_model("tv:convnext_tiny"), "se_resnet", input_size=SIZE)
    assert [p.channels for p in plan] == [96] * 3 + [192] * 3 + [384] * 9 + [768] * 3


def test_conv_output_follows_conv_norm_activation():
    plan = ai.plan(
        meta_model("tv:resnet18"), {"rules": [{"block": "eca", "at": "conv_output"}]}, input_size=SIZE
    )
    convs = [n for n, m in meta_model("tv:resnet18").named_modules() if isinstance(m, torch.nn.Conv2d)]
    assert [p.name for p in plan] == convs
    by_name = {p.name: p for p in plan}
    assert by_name["conv1"].node == "relu"  # conv1 -> bn1 -> relu
    assert by_name["layer1.0.conv2"].node == "layer1_0_bn2"  # no activation before the addition


def test_default_input_size_comes_from_the_model():
    assert ai.plan(meta_model("timm:resnet50"), "se_resnet").input_size == (3, 224, 224)
    assert ai.plan(meta_model("tv:resnet18"), "se_resnet", input_size=(3, 96, 96)).input_size == (3, 96, 96)


class _FilledBuffer(torch.nn.Module):
    """A buffer made from the input's shape, then filled with its values in place."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = torch.nn.Conv2d(3, 32, 3, stride=4, padding=1)
        self.mix = torch.nn.Conv2d(48, 48, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.stem(x)
        out = y.new_zeros(y.shape[0], 48, y.shape[2], y.shape[3])
        out.narrow(1, 0, 32).copy_(y)
        return self.mix(out).mean((2, 3))


def test_a_buffer_filled_in_place_with_the_input_carries_it():
    model = _FilledBuffer().eval()
    plan = ai.plan(model, "cbam_after_every_stage", input_size=SIZE)
    assert [(p.node, p.channels) for p in plan] == [("mix", 48)]
    patched = ai.inject(model, "cbam_after_every_stage", input_size=SIZE)
    x = torch.randn(2, *SIZE)
    with torch.no_grad():
        assert torch.equal(patched(x), model(x))


class _Untraceable(nn.Module):
    """A body fx cannot trace (control flow on a tensor's value), so it is kept whole."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return y if bool(y.sum() > 0) else -y


class _Wrapper(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = _Untraceable()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x).mean((2, 3))


def test_an_empty_plan_says_why_when_nothing_was_skipped():
    plan = ai.plan(_Wrapper(), "se_pre", input_size=SIZE)
    assert plan == [] and not plan.skipped and [o.name for o in plan.opaque] == ["body"]
    assert plan.empty_reason.startswith(
        "no pre_block outside the modules kept whole, which fx cannot trace (body: "
    )
    with pytest.raises(ai.InjectError, match="kept whole"):
        ai.inject(_Wrapper(), "se_pre", input_size=SIZE)
    assert ai.plan(meta_model("timm:densenet121"), "se_pre", input_size=SIZE).empty_reason == (
        "the model has no pre_block"
    )


class _HiddenResidual(nn.Module):
    """A residual unit fx cannot trace into (control flow on a value), kept whole."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return x + (y if bool(y.sum() > 0) else -y)


def test_no_fallback_where_the_rules_positions_may_hide_in_modules_kept_whole():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), _HiddenResidual(), _HiddenResidual())
    plan = ai.plan(model, "se_resnet", input_size=SIZE)
    assert [o.name for o in plan.opaque] == ["2", "3"]
    assert plan == [] and not plan.used_fallback
    assert plan.empty_reason == (
        "no residual_branch found, but 2, 3 are kept whole and may hold them, so the recipe's "
        "fallback is not used"
    )
    with pytest.raises(ai.InjectError, match="fallback is not used"):
        ai.inject(model, "se_resnet", input_size=SIZE)


def test_a_block_on_one_edge_leaves_the_other_users_edge_free():
    model = torchvision.models.resnet18().eval()
    pre = ai.inject(model, "se_pre", input_size=SIZE)  # SE-PRE on x -> conv1 of every unit
    stages = ai.plan(pre, "cbam_after_every_stage", input_size=SIZE)
    assert [p.name for p in stages] == ["layer1", "layer2", "layer3", "layer4"]


@pytest.mark.parametrize("input_size", [5, "364", ("a", 64, 64), (3.5, 64, 64), (True, 64, 64), None])
def test_an_input_size_that_is_no_tuple_of_ints_is_refused_in_one_line(input_size):
    model = torchvision.models.resnet18()
    if input_size is None:  # the sizes that are allowed: a tuple, a list, a torch.Size, NumPy integers
        for allowed in ((3, 64, 64), [64, 64], torch.Size([3, 64, 64]), (np.int64(3), 64, 64)):
            assert ai.plan(model, "se_resnet", input_size=allowed).input_size == (3, 64, 64)
        return
    with pytest.raises(TypeError, match=r"^input_size must be a tuple or list of ints") as info:
        ai.plan(model, "se_resnet", input_size=input_size)
    assert isinstance(info.value, ai.AttnInjectError) and "\n" not in str(info.value)
