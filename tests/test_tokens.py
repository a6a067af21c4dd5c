"""Token models: grids proven by the layout analysis, blocks on the grid, residual branches of
transformer blocks, and skips with their reason where a grid cannot be proven."""

from __future__ import annotations

import json
import warnings
from collections import Counter

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

import attn_inject as ai
from attn_inject.blocks import layout_kwargs

from .conftest import meta_model

DIM, GRID, PATCH = 32, 4, 8
SIZE = (3, GRID * PATCH, GRID * PATCH)


class Block(nn.Module):
    """A pre-norm transformer block: attention and MLP, each a residual branch."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.fc1, self.fc2 = nn.Linear(dim, 2 * dim), nn.Linear(2 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(self.norm1(x)).chunk(3, dim=-1)
        x = x + self.proj((q @ k.transpose(1, 2) / DIM**0.5).softmax(-1) @ v)
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class TinyViT(nn.Module):
    """Patches flattened to tokens, ``prefix`` class/register tokens in front (or
    ``suffix`` tokens behind), two blocks, the first token to the head."""

    def __init__(self, prefix: int = 1, suffix: int = 0) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, DIM, PATCH, PATCH)
        self.prefix_tokens = nn.Parameter(torch.randn(1, prefix, DIM))
        self.suffix_tokens = nn.Parameter(torch.randn(1, suffix, DIM)) if suffix else None
        self.pos = nn.Parameter(torch.randn(1, prefix + suffix + GRID * GRID, DIM))
        self.blocks = nn.Sequential(Block(DIM), Block(DIM))
        self.norm, self.head = nn.LayerNorm(DIM), nn.Linear(DIM, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch(x).flatten(2).transpose(1, 2)
        parts = [self.prefix_tokens.expand(x.shape[0], -1, -1), x]
        if self.suffix_tokens is not None:
            parts.append(self.suffix_tokens.expand(x.shape[0], -1, -1))
        x = self.blocks(torch.cat(parts, dim=1) + self.pos)
        return self.head(self.norm(x)[:, 0])


def patched_model(model: nn.Module, recipe, input_size=SIZE, init=None) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        patched = ai.inject(model, recipe, input_size=input_size, init=init)
    for point in patched.attn_inject.plan:  # each block was built for its point's layout
        assert patched.get_submodule(point.key).layout == point.layout
    return patched


def test_transformer_blocks_give_attention_and_mlp_branches_on_the_token_grid():
    torch.manual_seed(0)
    plan = ai.plan(TinyViT().eval(), "se_resnet", input_size=SIZE)
    assert [(p.name, p.node) for p in plan] == [
        ("blocks.0", "blocks_0_proj"),
        ("blocks.0", "blocks_0_fc2"),
        ("blocks.1", "blocks_1_proj"),
        ("blocks.1", "blocks_1_fc2"),
    ]
    assert {(p.layout, p.prefix, p.grid, p.channels, p.shape) for p in plan} == {
        ("tokens", 1, (GRID, GRID), DIM, (1 + GRID * GRID, DIM))
    }
    assert layout_kwargs(plan[0]) == {"layout": "tokens", "prefix": 1, "grid": (GRID, GRID)}
    # the point's serialised form carries the grid, and reads back the same
    data = json.loads(json.dumps(plan[0].to_dict()))
    assert (data["layout"], data["prefix"], data["grid"]) == ("tokens", 1, [GRID, GRID])


@pytest.mark.parametrize(
    "recipe", ["se_resnet", "eca_resnet", "cbam_resnet", "se_pre", "se_post", "se_identity"]
)
def test_token_blocks_are_identity_at_insertion_and_act_once_trained(recipe):
    torch.manual_seed(0)
    model = TinyViT(prefix=3).eval()  # a class token and two registers
    patched = patched_model(model, recipe)
    plan = patched.attn_inject.plan
    assert len(plan) == 4 and {(p.prefix, p.grid) for p in plan} == {(3, (GRID, GRID))}
    report = ai.validate(model, patched, input_size=SIZE)
    assert report.passed and report.max_abs_diff == 0
    # The head reads the class token only: the last block's blocks act on grid tokens that
    # never reach the output, which the gradient check says rather than fails.
    gradients = next(c for c in report.checks if c.name == "gradients")
    assert "cannot reach the output" in gradients.detail and "blocks.1." in gradients.detail
    with torch.no_grad():
        blocks = ai.inserted_blocks(patched)
        assert {b.layout for b in blocks.values()} == {"tokens"}  # built for the grid, no permutes
        for block in blocks.values():
            for name, parameter in block.named_parameters():
                if name.endswith("blend"):
                    parameter.fill_(1.0)  # the papers' blocks
        x = torch.randn(2, *SIZE)
        assert not torch.allclose(patched(x), model(x))


def test_single_resolution_token_model_has_one_stage_ending_before_the_class_token_is_taken():
    plan = ai.plan(TinyViT().eval(), "cbam_after_every_stage", input_size=SIZE)
    assert [(p.name, p.layout, p.prefix, p.grid) for p in plan] == [("norm", "tokens", 1, (GRID, GRID))]


def test_tokens_after_the_grid_are_not_guessed_at():
    plan = ai.plan(TinyViT(suffix=1).eval(), "se_resnet", input_size=SIZE, init="identity")
    assert plan == [] and len(plan.skipped) == 4
    assert all("not proven to be prefix + H' x W'" in s.reason for s in plan.skipped)


def test_channels_last_skip_leaves_tokens_alone():
    recipe = {"rules": [{"block": "se", "at": "residual_branch", "channels_last": "skip"}]}
    plan = ai.plan(TinyViT().eval(), recipe, input_size=SIZE)
    assert plan == [] and all("channels_last: skip" in s.reason for s in plan.skipped)


class MapsOnlyGate(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(channels, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale


def test_a_block_without_a_layout_argument_is_kept_off_tokens(monkeypatch):
    from attn_inject import blocks

    monkeypatch.setattr(blocks, "_BLOCKS", dict(blocks._BLOCKS))  # registered for this test only
    ai.register_block("maps_only_gate", MapsOnlyGate)
    plan = ai.plan(
        TinyViT().eval(), {"rules": [{"block": "maps_only_gate", "at": "residual_branch"}]}, input_size=SIZE
    )
    assert plan == [] and len(plan.skipped) == 4
    assert "block 'maps_only_gate' takes NCHW maps only" in plan.skipped[0].reason


def small_vit(**kwargs) -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", img_size=32, depth=2, **kwargs).eval()


def test_timm_vit_blocks_get_se_on_both_branches_and_cbam_after_each_block():
    model = small_vit()
    se = ai.plan(model, "se_resnet", input_size=SIZE)
    assert [(p.name, p.layout, p.prefix, p.grid, p.channels) for p in se] == [
        (name, "tokens", 1, (2, 2), 192) for name in ("blocks.0", "blocks.0", "blocks.1", "blocks.1")
    ]
    cbam = ai.plan(model, "cbam_after_every_stage", input_size=SIZE)
    assert [(p.name, p.channels) for p in cbam] == [(e["module"], e["num_chs"]) for e in model.feature_info]


def test_dynamic_grid_skips_cbam_with_the_reason_and_se_runs_at_any_size():
    model = small_vit(dynamic_img_size=True)
    cbam = ai.plan(model, "cbam_after_every_stage", input_size=SIZE)
    assert cbam == [] and len(cbam.skipped) == 2
    assert all("changes with the input size (dynamic image size)" in s.reason for s in cbam.skipped)
    patched = patched_model(model, "se_resnet")
    assert Counter(p.layout for p in patched.attn_inject.plan) == {"tokens": 4}
    for size in (32, 64):  # SE squeezes over however many grid tokens there are
        x = torch.randn(2, 3, size, size)
        assert torch.equal(patched(x), model(x))


FAMILIES = [  # name, builder arguments, input size, layouts se_resnet and cbam_after_every_stage get
    ("vit_tiny_patch16_224", {"img_size": 64}, 64, {"tokens"}, {"tokens"}),
    ("deit_tiny_distilled_patch16_224", {"img_size": 64}, 64, {"tokens"}, {"tokens"}),
    ("eva02_tiny_patch14_224", {"img_size": 56}, 56, {"tokens"}, {"tokens"}),
    ("cait_xxs24_224", {"img_size": 64}, 64, {"tokens"}, {"tokens"}),
    ("xcit_nano_12_p16_224", {"img_size": 64}, 64, {"tokens"}, set()),  # a dynamic grid: no CBAM
    ("levit_128s", {"img_size": 128}, 128, {"tokens"}, {"tokens"}),
    ("mvitv2_tiny", {}, 224, {"tokens"}, {"NCHW"}),  # CBAM on the patch embedding's map (grid dynamic)
    ("swin_tiny_patch4_window7_224", {}, 224, {"tokens", "NHWC"}, {"NHWC"}),  # windowed attention: NHWC
    ("mambaout_femto", {}, 64, {"NHWC"}, {"NHWC"}),
    ("volo_d1_224", {"img_size": 64}, 64, {"NHWC"}, {"NHWC"}),
    ("samvit_base_patch16", {"img_size": 64}, 64, {"tokens", "NHWC"}, {"NHWC"}),  # SAM's image encoder
    ("hiera_tiny_224", {}, 224, set(), set()),  # unrolled tokens: no grid, every point skipped
]


@pytest.mark.zoo
@pytest.mark.parametrize(
    ("name", "kwargs", "size", "se_layouts", "cbam_layouts"), FAMILIES, ids=[f[0] for f in FAMILIES]
)
def test_token_and_channels_last_families_plan_with_identity(name, kwargs, size, se_layouts, cbam_layouts):
    torch.manual_seed(0)
    model = timm.create_model(name, **kwargs).eval()
    input_size = (3, size, size)
    for recipe, layouts in (("se_resnet", se_layouts), ("cbam_after_every_stage", cbam_layouts)):
        plan = ai.plan(model, recipe, input_size=input_size)
        assert {p.layout for p in plan} == layouts, (recipe, plan.skipped[:3])
        if not layouts:
            assert plan.skipped and all(s.reason for s in plan.skipped)
            continue
        for point in plan:  # channels are the real widths: the block builds and runs on the tensor
            assert point.channels == point.shape[{"NCHW": 0, "NHWC": 2, "tokens": 1}[point.layout]]
        patched = patched_model(model, recipe, input_size)
        report = ai.validate(model, patched, input_size=input_size)
        assert report.passed and report.max_abs_diff == 0, (recipe, report)


def test_torchvision_vit_attention_output_joins_the_grid_of_the_stream_it_is_added_to():
    """torchvision's encoder block adds nn.MultiheadAttention's output (a tuple item, whose
    grid is not known by itself) to its input: the sum keeps the input's grid."""
    from torchvision.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    model = VisionTransformer(
        image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=DIM, mlp_dim=2 * DIM
    ).eval()
    patched = patched_model(model, "se_resnet", input_size=SIZE)
    plan = patched.attn_inject.plan
    assert [(p.name, p.layout, p.prefix, p.grid) for p in plan] == [
        (f"encoder.layers.encoder_layer_{i}", "tokens", 1, (GRID, GRID)) for i in (0, 0, 1, 1)
    ]
    assert ai.validate(model, patched, input_size=SIZE).max_abs_diff == 0


def test_an_item_of_a_function_returning_a_tuple_does_not_take_its_arguments_layout():
    """MViTv2's ``reshape_post_pool(x, ...)`` returns (attention heads' tokens, size): its first
    item is (B, heads, N, d), not the NCHW map it was given, and gets no block."""
    plan = ai.plan(meta_model("timm:mvitv2_tiny"), "se_resnet")
    assert plan and {p.layout for p in plan} == {"tokens"}
    assert all(p.channels == p.shape[1] for p in plan)


class ComputedPrefixViT(nn.Module):
    """A class token computed from the tokens (CrossViT takes it from the other branch), put
    in front of the grid: the grid still comes last, so its positions are known."""

    def __init__(self) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, DIM, PATCH, PATCH)
        self.summary = nn.Linear(DIM, DIM)
        self.blocks = nn.Sequential(Block(DIM), Block(DIM))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch(x).flatten(2).transpose(1, 2)
        cls = self.summary(x[:, :1])  # tokens, but no grid's positions
        return self.blocks(torch.cat([cls, x], dim=1))[:, 0]


def test_a_computed_token_before_the_grid_is_a_prefix_and_passes_through():
    torch.manual_seed(0)
    model = ComputedPrefixViT().eval()
    plan = ai.plan(model, "se_resnet", input_size=SIZE)
    assert len(plan) == 4 and {(p.layout, p.prefix, p.grid) for p in plan} == {("tokens", 1, (GRID, GRID))}
    patched = patched_model(model, "se_resnet")
    x = torch.randn(2, *SIZE)
    with torch.no_grad():
        assert torch.equal(patched(x), model(x))


class PooledPrefixViT(nn.Module):
    """Pooled summary tokens in front of the grid: their number grows with the input size, so
    the prefix a block would pass through is not fixed."""

    def __init__(self) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, DIM, PATCH, PATCH)
        self.blocks = nn.Sequential(Block(DIM), Block(DIM))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch(x).flatten(2).transpose(1, 2)
        front = F.avg_pool1d(x.transpose(1, 2), 4).transpose(1, 2)
        return self.blocks(torch.cat([front, x], dim=1)).mean(1)


def test_a_prefix_that_grows_with_the_input_is_not_guessed_at():
    plan = ai.plan(PooledPrefixViT().eval(), "se_resnet", input_size=SIZE)
    assert plan == [] and len(plan.skipped) == 4
    assert all("tokens before the grid" in s.reason for s in plan.skipped)
