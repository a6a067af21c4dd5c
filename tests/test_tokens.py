"""Token models: grids proven by the layout analysis, blocks on the grid, residual branches of
transformer blocks, and skips with their reason where a grid cannot be proven."""

from __future__ import annotations

import json
import warnings
from collections import Counter
from typing import Any

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import fx, nn

import attn_inject as ai
from attn_inject.blocks import layout_kwargs
from attn_inject.graph.analysis import annotate
from attn_inject.graph.layout import layout_of
from attn_inject.validation.registry import checks_for

from .conftest import meta_model

DIM, GRID, PATCH = 32, 4, 8
SIZE = (3, GRID * PATCH, GRID * PATCH)
# Every default check of ai.validate but export (torch.export of the whole model, most of a
# validation's cost): for the calls whose model another call of the same test, or a case of
# the same block on the same tokens, already exports.
BUT_EXPORT = tuple(spec.name for spec in checks_for(None) if spec.name != "export")
# the recipes whose token blocks validate with every check, export included: one per block kind
EXPORTED = {"se_resnet", "eca_resnet", "cbam_resnet"}


class Block(nn.Module):
    """A pre-norm transformer block: attention and MLP, each a residual branch."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.fc1, self.fc2 = nn.Linear(dim, 2 * dim), nn.Linear(2 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(self.norm1(x)).chunk(3, dim=-1)
        x = x + self.proj((q @ k.transpose(-2, -1) / DIM**0.5).softmax(-1) @ v)
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
    checks = None if recipe in EXPORTED else BUT_EXPORT  # SE's other places: the SE block exported
    report = ai.validate(model, patched, input_size=SIZE, checks=checks)
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
    assert plan == [] and plan.skipped and all("channels_last: skip" in s.reason for s in plan.skipped)


class MapsOnlyGate(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(channels, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale


def test_a_block_without_a_layout_argument_is_kept_off_tokens():
    ai.register_block("maps_only_gate", MapsOnlyGate)
    try:
        plan = ai.plan(
            TinyViT().eval(),
            {"rules": [{"block": "maps_only_gate", "at": "residual_branch"}]},
            input_size=SIZE,
        )
    finally:
        ai.unregister_block("maps_only_gate")  # registered for this test only
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


def test_dynamic_grid_in_timm_vit_skips_cbam_with_the_reason_and_se_runs_at_any_size():
    """timm's ``dynamic_img_size``: the grid follows the input, and only the root's forward
    computes the patch map (the blocks are given tokens only). A CBAM block there would be
    run by the root's forward alone, which timm's forward_features and forward_intermediates
    do not call: skipped with that reason. SE needs no grid and runs at any size."""
    model = small_vit(dynamic_img_size=True)
    cbam = ai.plan(model, "cbam_after_every_stage", input_size=SIZE)
    assert cbam == [] and len(cbam.skipped) == 2
    assert all(
        "follows the input size" in s.reason and "forward_intermediates" in s.reason for s in cbam.skipped
    )
    patched = patched_model(model, "se_resnet")
    assert Counter(p.layout for p in patched.attn_inject.plan) == {"tokens": 4}
    for size in (32, 64):  # SE squeezes over however many grid tokens there are
        x = torch.randn(2, 3, size, size)
        assert torch.equal(patched(x), model(x))


class GridFollowsInput(nn.Module):
    """Patches flattened to tokens with no position embedding: the grid follows the input
    size, and only the root's forward computes the patch map."""

    def __init__(self) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, DIM, PATCH, PATCH)
        self.blocks = nn.Sequential(Block(DIM), Block(DIM))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.patch(x).flatten(2).transpose(1, 2)
        return self.blocks(tokens).mean(1)


def test_dynamic_grid_cbam_is_given_its_size_at_each_call_by_the_graph_that_computes_the_map():
    torch.manual_seed(0)
    model = GridFollowsInput().eval()
    plan = ai.plan(model, "cbam_resnet", input_size=SIZE)  # on both branches of each block
    assert len(plan) == 4 and not plan.skipped
    assert all(p.grid_from is not None and p.attach == "graph" and p.owner == "" for p in plan)
    assert [p.layout_text for p in plan] == [f"tokens {GRID}x{GRID} (any size)"] * 4
    patched = patched_model(model, "cbam_resnet")  # at identity
    for height, width in ((32, 32), (64, 64), (64, 32)):
        x = torch.randn(2, 3, height, width)
        assert torch.equal(patched(x), model(x)), (height, width)
    trained = ai.inject(model, "cbam_resnet", input_size=SIZE, init="paper")
    seen: list[tuple] = []
    for block in ai.inserted_blocks(trained).values():
        block.register_forward_hook(lambda module, args, out: seen.append((module, args, out)))
    with torch.no_grad():
        trained(torch.randn(2, 3, 64, 32))
    assert len(seen) == 4
    for block, (tokens, height, width), out in seen:
        assert (height, width) == (64 // PATCH, 32 // PATCH)  # the patch map's, not the planned grid
        fixed = ai.blocks.CBAM(DIM, layout="tokens", grid=(height, width))
        fixed.load_state_dict(block.state_dict())
        with torch.no_grad():
            assert torch.equal(fixed(tokens), out)


class HalvesInTraining(nn.Module):
    """Reads ``self.training`` in its code, as a dropout written inline does (with a layer of
    its own, so the trace goes through it)."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(DIM, DIM)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(x)
        return x * 0.5 if self.training else x


class GridFollowsInputThenHalves(GridFollowsInput):
    def __init__(self) -> None:
        super().__init__()
        self.halves = HalvesInTraining()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.halves(super().forward(x))


def test_the_roots_rewritten_forward_keeps_a_submodule_without_a_point_as_its_own_call():
    """The blocks run in the root's graph; ``halves`` holds no point, so the graph calls it and
    its own code runs (in training too) instead of being inlined as traced in eval mode."""
    torch.manual_seed(0)
    model = GridFollowsInputThenHalves().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "reads self.training" warning
        patched = ai.inject(model, "cbam_resnet", input_size=SIZE)
    assert {p.owner for p in patched.attn_inject.plan} == {""}
    x = torch.randn(2, 3, 64, 32)
    for training in (False, True):
        patched.train(training), model.train(training)
        with torch.no_grad():
            assert torch.equal(patched(x), model(x)), training


class GivenItsGrid(Block):
    """A transformer block called with its grid's size, as XCiT's are (``blk(x, H, W)``); it
    mixes the tokens on their map, so a wrong size would show."""

    def __init__(self, dim: int) -> None:
        super().__init__(dim)
        self.local = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)

    def forward(self, x: torch.Tensor, H: int, W: int) -> torch.Tensor:
        x = super().forward(x)
        b, c = x.shape[0], x.shape[2]
        return x + self.local(x.transpose(1, 2).reshape(b, c, H, W)).flatten(2).transpose(1, 2)


class GridGivenToBlocks(nn.Module):
    """Patches flattened to tokens whose grid follows the input; the blocks are given its
    size as the patch map's ``shape[2]``, ``shape[3]``; ``forward_features`` as timm's models
    have it, and with ``root_branch`` a residual unit on the map in the root's own forward."""

    def __init__(self, root_branch: bool = False) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, DIM, PATCH, PATCH)
        self.mix = nn.Conv2d(DIM, DIM, 3, padding=1) if root_branch else None
        self.blocks = nn.ModuleList([GivenItsGrid(DIM), GivenItsGrid(DIM)])

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        grid = self.patch(x)
        if self.mix is not None:
            grid = grid + F.relu(self.mix(grid))
        height, width = grid.shape[2], grid.shape[3]
        x = grid.flatten(2).transpose(1, 2)
        for block in self.blocks:
            x = block(x, height, width)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x).mean(1)


GRID_POSITIONS = ["stage_output", "residual_branch", "pre_block", "identity_branch"]


@pytest.mark.parametrize("position", GRID_POSITIONS)
def test_cbam_in_blocks_given_their_grid_runs_at_every_size_with_the_sizes_of_that_call(position):
    """Each position on blocks given their grid's size: after the block (its parameters passed
    on), on a branch or at the block's input (its rewritten forward, given them too)."""
    torch.manual_seed(0)
    model = GridGivenToBlocks().eval()
    recipe = {"rules": [{"block": "cbam", "at": position}]}
    plan = ai.plan(model, recipe, input_size=SIZE)
    assert plan and not plan.skipped and all(p.grid_from is not None for p in plan)
    assert all(p.owner.startswith("blocks.") for p in plan), [(p.key, p.owner) for p in plan]
    identity = patched_model(model, recipe)
    trained = ai.inject(model, recipe, input_size=SIZE, init="paper")
    seen: list[tuple[int, int]] = []
    for block in ai.inserted_blocks(trained).values():
        block.register_forward_hook(lambda module, args, out: seen.append(tuple(args[1:])))
    for height, width in ((32, 32), (64, 32), (32, 64)):
        x = torch.randn(2, 3, height, width)
        with torch.no_grad():
            assert torch.equal(identity(x), model(x)), (position, height, width)
            trained(x)
        assert set(seen) == {(height // PATCH, width // PATCH)}, (position, height, width)
        seen.clear()


def test_a_dynamic_grid_block_drawn_into_the_roots_forward_is_skipped_on_a_model_with_other_entries():
    """A residual unit on the map in the root's own forward makes the root rewrite its graph,
    which would run every block inside it: the CBAM blocks on the grid would then be invisible
    to ``forward_features``; they are skipped with the reason, and the unit's own block is not."""
    torch.manual_seed(0)
    model = GridGivenToBlocks(root_branch=True).eval()
    plan = ai.plan(model, "cbam_resnet", input_size=SIZE)
    assert [p.grid_from for p in plan] == [None]  # the root's unit on the map
    assert plan.skipped and all("forward_features" in s.reason for s in plan.skipped)
    patched = patched_model(model, "cbam_resnet")
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(patched(x), model(x))


FAMILIES = [  # name, builder arguments, input size, layouts se_resnet and cbam_after_every_stage get
    ("vit_tiny_patch16_224", {"img_size": 64}, 64, {"tokens"}, {"tokens"}),
    ("deit_tiny_distilled_patch16_224", {"img_size": 64}, 64, {"tokens"}, {"tokens"}),
    ("eva02_tiny_patch14_224", {"img_size": 56}, 56, {"tokens"}, {"tokens"}),
    ("cait_xxs24_224", {"img_size": 64}, 64, {"tokens"}, {"tokens"}),
    ("xcit_nano_12_p16_224", {"img_size": 64}, 64, {"tokens"}, {"tokens"}),  # CBAM given the grid's size
    ("levit_128s", {"img_size": 128}, 128, {"tokens"}, {"tokens"}),
    ("mvitv2_tiny", {}, 224, {"tokens"}, {"NCHW"}),  # CBAM on the patch embedding's map (grid dynamic)
    ("swin_tiny_patch4_window7_224", {}, 224, {"tokens", "NHWC"}, {"NHWC"}),  # windowed attention: NHWC
    ("mambaout_femto", {}, 64, {"NHWC"}, {"NHWC"}),
    ("volo_d1_224", {"img_size": 64}, 64, {"NHWC"}, {"NHWC"}),
    ("samvit_base_patch16", {"img_size": 64}, 64, {"tokens", "NHWC"}, {"NHWC"}),  # SAM's image encoder
    ("hiera_tiny_224", {}, 224, {"tokens"}, {"tokens"}),  # unrolled and pooled tokens, reordered
    ("nest_tiny", {}, 224, {"tokens"}, {"NCHW"}),  # (B, T, N, C) blocks of tokens; stages end in maps
    (
        "naflexvit_base_patch16_gap",
        {},
        64,
        {"tokens"},
        set(),
    ),  # patchified in a kept-whole module; dynamic grid
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
            assert point.channels == point.shape[{"NCHW": 0, "NHWC": 2, "tokens": -1}[point.layout]]
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
    assert ai.validate(model, patched, input_size=SIZE, checks=("reference", "identity")).max_abs_diff == 0


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


class Unrolled(nn.Module):
    """Hiera in miniature: the patch grid unrolled so that the four tokens of each 2 x 2
    window lie N/4 apart, a block, the tokens max-pooled over those windows (or over four
    neighbouring tokens, which are not a window), a block on the coarser grid."""

    def __init__(self, windows: bool = True, fixed_size: bool = True) -> None:
        super().__init__()
        self.windows = windows
        self.patch = nn.Conv2d(3, DIM, PATCH, PATCH)
        # a position embedding fixes the input size, as Hiera's does
        self.pos = nn.Parameter(torch.randn(1, GRID * GRID, DIM)) if fixed_size else None
        self.block1, self.proj, self.block2 = Block(DIM), nn.Linear(DIM, 2 * DIM), Block(2 * DIM)
        self.head = nn.Linear(2 * DIM, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch(x).permute(0, 2, 3, 1)
        b, h, w, c = x.shape
        x = x.reshape(b, h // 2, 2, w // 2, 2, c).permute(0, 2, 4, 1, 3, 5).reshape(b, h * w, c)
        if self.pos is not None:
            x = x + self.pos
        x = self.proj(self.block1(x))
        x = x.view(b, 4, -1, 2 * c).amax(dim=1) if self.windows else x.view(b, -1, 4, 2 * c).amax(dim=2)
        return self.head(self.block2(x).mean(1))


def unrolled_order() -> list[int]:
    """The raster position of each token of :class:`Unrolled`: token (dy, dx, i, j)."""
    steps = range(GRID // 2)
    return [(2 * i + dy) * GRID + 2 * j + dx for dy in (0, 1) for dx in (0, 1) for i in steps for j in steps]


def test_unrolled_tokens_are_followed_through_reshapes_and_window_pooling():
    plan = ai.plan(Unrolled().eval(), "cbam_resnet", input_size=SIZE)
    assert [(p.name, p.grid, p.reordered) for p in plan] == [
        ("block1", (GRID, GRID), True),
        ("block1", (GRID, GRID), True),
        ("block2", (GRID // 2, GRID // 2), False),  # each 2 x 2 window pooled: the coarse grid, raster
        ("block2", (GRID // 2, GRID // 2), False),
    ]
    assert plan[0].order == tuple(unrolled_order()) and plan[2].order is None
    assert "tokens 4x4 reordered" in str(plan)


@pytest.mark.parametrize("recipe", ["se_resnet", "cbam_resnet"])
def test_blocks_on_unrolled_tokens_are_identity_at_insertion_and_match_the_reference(recipe):
    torch.manual_seed(0)
    model = Unrolled().eval()
    report = ai.validate(model, patched_model(model, recipe), input_size=SIZE, checks=BUT_EXPORT)
    assert report.passed and report.max_abs_diff == 0, report
    report = ai.validate(model, patched_model(model, recipe, init="paper"), input_size=SIZE)  # exported
    assert report.passed, report


def test_reordered_tokens_of_a_model_that_runs_at_any_size_are_proven_again_at_twice_it():
    model = Unrolled(fixed_size=False).eval()
    se = ai.plan(model, "se_resnet", input_size=SIZE)
    assert [(p.name, p.reordered, p.order) for p in se][:2] == [("block1", True, None)] * 2
    cbam = ai.plan(model, "cbam_resnet", input_size=SIZE)
    assert [p.name for p in cbam] == []  # CBAM needs a fixed grid
    assert all("changes with the input size" in s.reason for s in cbam.skipped)
    x = torch.randn(2, 3, 2 * SIZE[1], 2 * SIZE[2])  # SE pools over every token at any size
    assert torch.equal(patched_model(model, "se_resnet")(x), model(x))


def test_pooled_tokens_that_are_not_windows_are_not_guessed_at():
    plan = ai.plan(Unrolled(windows=False).eval(), "se_resnet", input_size=SIZE)
    assert [p.name for p in plan] == ["block1", "block1"]
    assert [s.node for s in plan.skipped] == ["block2_proj", "block2_fc2"]
    assert all("not (B, N, C) tokens of a known grid" in s.reason for s in plan.skipped)


def blockify(x: torch.Tensor, size: int) -> torch.Tensor:
    """(B, H, W, C) -> (B, T, N, C): T blocks of size x size tokens, as timm's Nest."""
    b, h, w, c = x.shape
    x = x.reshape(b, h // size, size, w // size, size, c).transpose(2, 3)
    return x.reshape(b, (h // size) * (w // size), -1, c)


def deblockify(x: torch.Tensor, size: int) -> torch.Tensor:
    b, t, _, c = x.shape
    side = int(t**0.5)
    return x.reshape(b, side, side, size, size, c).transpose(2, 3).reshape(b, side * size, side * size, c)


torch.fx.wrap("blockify")  # kept whole by the trace, as timm registers Nest's
torch.fx.wrap("deblockify")


def doubled(x: torch.Tensor) -> torch.Tensor:
    return x * 2


def sorted_tokens(x: torch.Tensor) -> torch.Tensor:
    return x.sort(dim=1).values.reshape(x.shape)


@pytest.mark.parametrize(
    ("function", "moves"), [(blockify, True), (deblockify, True), (doubled, False), (sorted_tokens, False)]
)
def test_a_kept_whole_function_is_replayed_only_when_its_code_only_moves_elements(function, moves):
    from attn_inject.graph.ops import moves_data_only

    graph = fx.Graph()
    node = graph.call_function(function, (graph.placeholder("x"),))
    assert moves_data_only(node) is moves


class Blocked(nn.Module):
    """Nest in miniature: the map cut into 2 x 2 blocks of tokens (B, T, N, C), a transformer
    block within each, the blocks put back into the map, a convolution on it."""

    def __init__(self) -> None:
        super().__init__()
        self.patch, self.block = nn.Conv2d(3, DIM, PATCH, PATCH), Block(DIM)
        self.pos = nn.Parameter(torch.randn(1, 4, 4, DIM))  # per block, as Nest's
        self.conv, self.head = nn.Conv2d(DIM, DIM, 3, padding=1), nn.Linear(DIM, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = blockify(self.patch(x).permute(0, 2, 3, 1), 2) + self.pos
        x = deblockify(self.block(x), 2).permute(0, 3, 1, 2)
        return self.head(self.conv(x).mean((2, 3)))


def test_blocks_of_tokens_are_a_reordered_grid_and_the_map_they_are_put_back_into_is_known():
    torch.manual_seed(0)
    model = Blocked().eval()
    plan = ai.plan(model, "cbam_resnet", input_size=SIZE)
    assert [(p.grid, p.reordered, p.shape) for p in plan] == [((GRID, GRID), True, (4, 4, DIM))] * 2
    steps = range(2)  # token (block row a, block column b, row r, column c in the block)
    order = [(2 * a + r) * GRID + 2 * b + c for a in steps for b in steps for r in steps for c in steps]
    assert plan[0].order == tuple(order)
    stages = ai.plan(model, "cbam_after_every_stage", input_size=SIZE)
    assert [(p.node, p.layout) for p in stages] == [("conv", "NCHW")]
    graph = annotate(model, (1, *SIZE))
    layouts = {n.name: layout_of(n) for n in graph.nodes}
    assert (layouts["deblockify"], layouts["permute_1"]) == ("NHWC", "NCHW")  # the map put back
    # 8 hidden units each: at the recipes' ratio 16 the 32 channels give 2, which one draw of
    # weights can leave both dead (no gradient through the ReLU), failing the gradients check
    # for a reason of the draw, not of the layout under test
    cbam = {"rules": [{"block": {"kind": "cbam", "ratio": 4}, "at": "residual_branch"}]}
    se = {"rules": [{"block": {"kind": "se", "ratio": 4}, "at": "residual_branch"}]}
    for recipe in (cbam, se):
        for init in ("identity", "paper"):
            checks = None if init == "paper" else BUT_EXPORT  # the same network exported once, blocks acting
            patched = patched_model(model, recipe, init=init)
            report = ai.validate(model, patched, input_size=SIZE, checks=checks)
            assert report.passed and (init == "paper" or report.max_abs_diff == 0), report


def test_maxvit_windows_and_grids_are_followed_back_to_the_map():
    model = meta_model("tv:maxvit_t")  # partitions swapped with swapaxes, put back as (B, C, H, W)
    stages = ai.plan(model, "cbam_after_every_stage", input_size=(3, 224, 224))
    assert [(p.layout, p.channels) for p in stages] == [("NCHW", c) for c in (64, 128, 256, 512)]
    se = ai.plan(model, "se_resnet", input_size=(3, 224, 224))
    assert len(se) == 55 and {p.layout_text for p in se if p.layout == "tokens"} == {
        f"tokens {s}x{s} reordered" for s in (56, 28, 14, 7)
    }


@pytest.mark.zoo
def test_hiera_token_order_is_the_one_timm_rerolls_its_maps_with():
    torch.manual_seed(0)
    model = timm.create_model("hiera_tiny_224").eval()
    plan = ai.plan(model, "cbam_after_every_stage", input_size=(3, 224, 224))
    assert [p.name for p in plan] == [f"blocks.{i}" for i in model.stage_ends]
    captured = {}
    hooks = [
        model.get_submodule(p.name).register_forward_hook(lambda m, i, o, k=p.name: captured.setdefault(k, o))
        for p in plan
    ]
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        maps = model.forward_intermediates(x, indices=len(plan), output_fmt="NHWC", intermediates_only=True)
    for hook in hooks:
        hook.remove()
    for point, expected in zip(plan, maps, strict=True):
        tokens = captured[point.name]  # token i holds raster position order[i]
        order = torch.tensor(point.order) if point.reordered else torch.arange(tokens.shape[1])
        raster = tokens[:, torch.argsort(order)]
        assert torch.equal(raster.reshape(expected.shape), expected), point.name


def patchify(x: torch.Tensor, patch: int, channels_last: bool) -> torch.Tensor:
    """(B, C, H, W) cut into p x p patches, each flattened to one token (as timm's
    ``batch_patchify``): (B, H/p * W/p, p * p * C)."""
    b, c, h, w = x.shape
    x = x.view(b, c, h // patch, patch, w // patch, patch)
    x = x.permute(0, 2, 4, 3, 5, 1) if channels_last else x.permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // patch) * (w // patch), patch * patch * c)


class PatchEmbed(nn.Module):
    """NaFlex's embedding in miniature: an image cut into patches by a reshape, a linear
    layer, a class token in front. Its code branches on the input's rank (cut patches come
    in as 3-D), which fx cannot follow, so the trace keeps it whole. ``cut="strips"``
    reshapes the image's memory into tokens instead, which are not patches."""

    def __init__(self, channels_last: bool = True, cut: str = "patches") -> None:
        super().__init__()
        self.channels_last, self.cut = channels_last, cut
        self.proj = nn.Linear(3 * PATCH * PATCH, DIM)
        self.cls = nn.Parameter(torch.randn(1, 1, DIM))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        if x.ndim == 4:
            b, _, h, w = x.shape
            if self.cut == "patches":
                x = patchify(x, PATCH, self.channels_last)
            else:
                x = x.reshape(b, (h // PATCH) * (w // PATCH), -1)
        x = self.proj(x)
        return torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1), (GRID, GRID)


class PatchifiedViT(nn.Module):
    def __init__(self, **embed: Any) -> None:
        super().__init__()
        self.embed = PatchEmbed(**embed)
        self.blocks = nn.Sequential(Block(DIM), Block(DIM))
        self.head = nn.Linear(DIM, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, _ = self.embed(x)
        return self.head(self.blocks(x)[:, 0])


@pytest.fixture
def embed_kept_whole():
    """PatchEmbed registered as a leaf, as timm registers NaFlex's embedding: kept whole
    (fx would otherwise trace its rank branch with the sizes specialised)."""
    ai.register_leaf_module(PatchEmbed)
    yield
    ai.unregister_leaf_module(PatchEmbed)


def test_a_rank_branch_is_traced_with_the_rank_specialised_and_checked():
    torch.manual_seed(0)
    model = PatchifiedViT().eval()
    plan = ai.plan(model, "se_resnet", input_size=SIZE)
    assert plan.opaque == () and plan.tracing == "specialised"
    assert any(a.use == "bool" and a.module == "embed" and a.value is True for a in plan.assumptions)
    assert [(p.name, p.prefix, p.grid) for p in plan] == [
        (f"blocks.{i}", 1, (GRID, GRID)) for i in (0, 0, 1, 1)
    ]
    patched = patched_model(model, "se_resnet")
    x = torch.randn(2, *SIZE)
    assert torch.equal(patched(x), model(x))


@pytest.mark.parametrize("channels_last", [True, False])
def test_a_kept_whole_module_is_read_inside_for_the_patch_grid_it_returns(channels_last, embed_kept_whole):
    torch.manual_seed(0)
    model = PatchifiedViT(channels_last=channels_last).eval()
    plan = ai.plan(model, "se_resnet", input_size=SIZE)
    assert plan.tracing == "whole" and not any(p.name.startswith("embed") for p in plan)  # no block inside it
    assert [(p.name, p.prefix, p.grid) for p in plan] == [
        (f"blocks.{i}", 1, (GRID, GRID)) for i in (0, 0, 1, 1)
    ]
    patched = patched_model(model, "se_resnet")
    assert type(patched.embed) is PatchEmbed and patched.embed.forward.__func__ is PatchEmbed.forward
    checks = None if channels_last else BUT_EXPORT  # one of the two embeds exported
    report = ai.validate(model, patched, input_size=SIZE, checks=checks)
    assert report.passed and report.max_abs_diff == 0, report
    x = torch.randn(2, 3, 2 * SIZE[1], 2 * SIZE[2])  # the grid follows the input size
    assert torch.equal(patched(x), model(x))
    cbam = ai.plan(model, "cbam_resnet", input_size=SIZE)
    assert (
        cbam == [] and cbam.skipped and all("changes with the input size" in s.reason for s in cbam.skipped)
    )


def test_tokens_cut_from_the_image_memory_are_not_a_patch_grid():
    plan = ai.plan(PatchifiedViT(cut="strips").eval(), "se_resnet", input_size=SIZE)
    assert plan == [] and plan.skipped and all("unknown layout" in s.reason for s in plan.skipped)


def test_timm_naflex_vit_gets_se_on_the_grid_of_its_patchified_image():
    model = meta_model("timm:naflexvit_base_patch16_gap")
    plan = ai.plan(model, "se_resnet", input_size=(3, 64, 64))
    assert len(plan) == 24 and {(p.layout, p.prefix, p.grid) for p in plan} == {("tokens", 4, (4, 4))}
    cbam = ai.plan(model, "cbam_after_every_stage", input_size=(3, 64, 64))
    assert (
        cbam == [] and cbam.skipped and all("changes with the input size" in s.reason for s in cbam.skipped)
    )


class ValueBranch(PatchEmbed):
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        if x.sum() > 0:  # a branch on the values: no trace at these shapes decides it
            x = x.flip(-1)
        return super().forward(x)


def test_a_kept_whole_module_that_branches_on_values_stays_unread():
    model = PatchifiedViT()
    model.embed = ValueBranch()
    plan = ai.plan(model.eval(), "se_resnet", input_size=SIZE)
    assert [o.name for o in plan.opaque] == ["embed"]
    assert plan == [] and plan.skipped and all("unknown layout" in s.reason for s in plan.skipped)


class CachingEmbed(PatchEmbed):
    """Keeps a value it computed, keyed by device (as timm's LeViT keeps attention biases)."""

    def __init__(self) -> None:
        super().__init__()
        self.cache: dict[str, torch.Tensor] = {}

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        key = str(x.device)
        if key not in self.cache:
            self.cache[key] = self.cls * 1
        tokens, grid = super().forward(x)
        return tokens + self.cache[key], grid


def test_reading_a_kept_whole_module_leaves_its_caches_as_they_were(embed_kept_whole):
    torch.manual_seed(0)
    model = PatchifiedViT()
    model.embed = CachingEmbed()
    model.eval()
    plan = ai.plan(model, "se_resnet", input_size=SIZE)
    assert len(plan) == 4 and model.embed.cache == {}  # no proxy or meta tensor kept
    patched = patched_model(model, "se_resnet")
    x = torch.randn(2, *SIZE)
    assert torch.equal(patched(x), model(x))


class ArgumentEmbed(PatchEmbed):
    """Takes the patch size as a plain argument, which the trace of it fixes."""

    def forward(
        self, x: torch.Tensor, patch: int = 0, scale: float = 1.0
    ) -> tuple[torch.Tensor, tuple[int, int]]:
        assert patch == PATCH and scale == 1.0
        return super().forward(x)


class ArgumentViT(PatchifiedViT):
    def __init__(self) -> None:
        super().__init__()
        self.embed = ArgumentEmbed()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, _ = self.embed(x, PATCH)
        return self.head(self.blocks(x)[:, 0])


def test_a_kept_whole_module_given_plain_arguments_is_read_with_them(embed_kept_whole):
    plan = ai.plan(ArgumentViT().eval(), "se_resnet", input_size=SIZE)
    assert plan.tracing == "whole"
    assert [(p.prefix, p.grid) for p in plan] == [(1, (GRID, GRID))] * 4


class DroppingEmbed(PatchEmbed):
    """Keeps a random half of the patch tokens in training (as timm's PatchDropout)."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        tokens, grid = super().forward(x)
        if self.training:
            keep = torch.randperm(tokens.shape[1] - 1, device=tokens.device)[: tokens.shape[1] // 2] + 1
            tokens = torch.cat([tokens[:, :1], tokens[:, keep]], dim=1)
        return tokens, grid


def test_a_kept_whole_module_whose_tokens_differ_in_training_gives_no_grid(embed_kept_whole):
    model = PatchifiedViT()
    model.embed = DroppingEmbed()
    plan = ai.plan(model.eval(), "se_resnet", input_size=SIZE)
    assert plan == [] and plan.skipped and all("unknown layout" in s.reason for s in plan.skipped)
    assert not model.training and not model.embed.training  # the modes are put back


def doubled_patches(x: torch.Tensor) -> torch.Tensor:
    b, c, h, w = x.shape
    return x.view(b, c, h // 8, 8, w // 8, 8).permute(0, 2, 4, 3, 5, 1).reshape(b, -1, 64 * c) * 2


torch.fx.wrap("doubled_patches")  # names only data movement, but changes the values


class DoubledPatchViT(PatchifiedViT):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed.proj(doubled_patches(x))
        return self.head(self.blocks(x)[:, 0])


def test_a_kept_whole_function_that_changes_values_is_no_patch_grid():
    plan = ai.plan(DoubledPatchViT().eval(), "se_resnet", input_size=SIZE)
    assert plan == [] and plan.skipped and all("unknown layout" in s.reason for s in plan.skipped)
