"""Stage recipes on the timm families where users expect a block in every stage (HGNetV2,
TinyViT, Twins, XCiT), and timm's ``FeatureGetterNet`` (``features_only=True,
feature_cls="getter"``: the features of the model's ``forward_intermediates``).

The reference for the stages is timm's own ``feature_info`` (its entries at reduction >= 4,
their channels); for placement, the outputs of the untouched model: equal at insertion, and,
once a block is no longer the identity, changed from that stage's feature map on and not
before it.
"""

from __future__ import annotations

import pytest
import timm
import torch

import attn_inject as ai
from attn_inject.blocks import block_for_point

SIZE = 64
STAGE_RECIPES = ("se_after_every_stage", "eca_after_every_stage", "cbam_after_every_stage")

# name, builder arguments, the stages whose tokens' grid follows the input size (CBAM there is
# given the grid's height and width at each call), and those where only the root's forward could
# give them (skipped with the reason: timm's forward_features / forward_intermediates would not
# run the block); the transformers are built shallower: TinyViT one block a stage, Twins a local
# and a global attention block a stage, XCiT three blocks (a stage each)
TINY_VIT = {"depths": (1, 1, 1, 1)}
XCIT = {"img_size": SIZE, "depth": 3}
FAMILIES = [
    ("hgnetv2_b0", {}, set(), set()),
    ("tiny_vit_5m_224", TINY_VIT, set(), set()),
    # the last stage ends as tokens, then the norm, in the root's forward
    ("twins_svt_small", {"img_size": SIZE, "depths": (2, 2, 2, 2)}, set(), {3}),
    ("xcit_nano_12_p16_224", XCIT, set(range(3)), set()),  # every block is given H, W
]
# why CBAM cannot go where only the root gives the grid's size
ROOT_ONLY = "the block would run in Twins.forward, rewritten"
SIZED = [f for f in FAMILIES if f[2]]


def feature_info_stages(model: torch.nn.Module) -> list[dict]:
    """timm's stages of ``model``: its ``feature_info`` entries at reduction >= 4."""
    return [dict(e) for e in model.feature_info if e["reduction"] >= 4]


def x_batch() -> torch.Tensor:
    return torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))


def as_list(out) -> list[torch.Tensor]:
    return list(out) if isinstance(out, (list, tuple)) else [out]


@pytest.fixture(scope="module", params=FAMILIES, ids=[f[0] for f in FAMILIES])
def family(request):
    name, kwargs, sized, root_only = request.param
    torch.manual_seed(0)
    return name, timm.create_model(name, **kwargs).eval(), sized, root_only


@pytest.mark.parametrize("recipe", STAGE_RECIPES)
def test_every_feature_info_stage_gets_one_block_or_a_reason(family, recipe):
    name, model, sized, root_only = family
    expected = feature_info_stages(model)
    plan = ai.plan(model, recipe, input_size=(3, SIZE, SIZE))
    assert len(plan.stages) == len(expected), plan.stages
    skipped = {s.name: s.reason for s in plan.skipped}
    cannot = root_only if recipe == "cbam_after_every_stage" else set()
    for i, (stage, entry) in enumerate(zip(plan.stages, expected, strict=True)):
        points = [p for p in plan.points if p.stage == i]
        if i in cannot:
            assert points == [] and ROOT_ONLY in skipped[stage], (name, stage)
            continue
        assert [p.channels for p in points] == [entry["num_chs"]], (name, stage)
        assert stage not in skipped
        # only CBAM needs the grid's H' x W': where it follows the input, given at each call
        reads_size = recipe == "cbam_after_every_stage" and i in sized
        assert [p.grid_from is not None for p in points] == [reads_size], (name, stage)
    assert len(plan.points) == len(expected) - len(cannot)


def test_stage_blocks_are_the_identity_at_insertion_and_keep_each_class(family):
    _, model, sized, root_only = family
    patched = ai.inject(model, "cbam_after_every_stage", input_size=(3, SIZE, SIZE))
    assert len(ai.inserted_blocks(patched)) == len(feature_info_stages(model)) - len(root_only)
    assert isinstance(patched, type(model)) and type(patched).__name__ == type(model).__name__
    for key in ai.inserted_blocks(patched):
        owner = key.rpartition(".")[0]
        changed, original = patched.get_submodule(owner), model.get_submodule(owner)
        assert isinstance(changed, type(original)) and type(changed).__name__ == type(original).__name__
    # a model whose grids follow the input runs at another size too, non-square
    sizes = [(SIZE, SIZE), (2 * SIZE, SIZE)] if sized or root_only else [(SIZE, SIZE)]
    for height, width in sizes:
        x = torch.randn(2, 3, height, width, generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            assert torch.equal(patched(x), model(x)), (height, width)


@pytest.mark.parametrize(("name", "kwargs", "sized", "root_only"), SIZED, ids=[f[0] for f in SIZED])
def test_cbam_on_a_grid_that_follows_the_input_is_given_its_size_at_each_call(name, kwargs, sized, root_only):
    """A trained block at a non-square size the plan was not made at: it is given the grid's
    H' x W' of that size (H / reduction, W / reduction), and computes what a block built for
    that fixed grid computes with the same weights."""
    torch.manual_seed(0)
    model = timm.create_model(name, **kwargs).eval()
    patched = ai.inject(model, "cbam_after_every_stage", input_size=(3, SIZE, SIZE), init="paper")
    reductions = [e["reduction"] for e in feature_info_stages(model)]
    blocks = ai.inserted_blocks(patched)
    seen: dict[str, tuple] = {}
    points = [p for p in patched.attn_inject.plan if p.stage in sized]
    for point in points:
        record = lambda module, args, out, key=point.key: seen.__setitem__(key, (args, out))  # noqa: E731
        blocks[point.key].register_forward_hook(record)
    height, width = 2 * SIZE, SIZE
    with torch.no_grad():
        patched(torch.randn(2, 3, height, width))
    assert sorted(seen) == sorted(p.key for p in points)
    for point in points:
        (tokens, grid_height, grid_width), out = seen[point.key]
        reduction = reductions[point.stage]
        assert (grid_height, grid_width) == (height // reduction, width // reduction), point.key
        fixed = block_for_point(
            point.block.kind,
            point.channels,
            point.block.params,
            "paper",
            {"layout": "tokens", "prefix": point.prefix, "grid": (grid_height, grid_width)},
        )
        fixed.load_state_dict(blocks[point.key].state_dict())
        with torch.no_grad():
            assert torch.equal(fixed(tokens), out), point.key


def test_xcit_branches_keep_their_blocks_when_the_class_attention_points_are_skipped():
    """XCiT's class-attention blocks are not given the grid's size, so only the root's forward
    could run a CBAM block there: those points are skipped. That must not take the branch
    points of the blocks given ``H, W`` with them: those run in their own block's forward."""
    torch.manual_seed(0)
    model = timm.create_model("xcit_nano_12_p16_224", **XCIT).eval()
    plan = ai.plan(model, "cbam_resnet", input_size=(3, SIZE, SIZE))
    assert len(plan) == 9 and {p.owner for p in plan} == {"blocks.0", "blocks.1", "blocks.2"}
    assert plan.skipped and {s.name for s in plan.skipped} == {"cls_attn_blocks.0", "cls_attn_blocks.1"}
    patched = ai.inject(model, "cbam_resnet", input_size=(3, SIZE, SIZE))
    for height, width in ((SIZE, SIZE), (2 * SIZE, SIZE)):
        x = torch.randn(2, 3, height, width, generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            assert torch.equal(patched(x), model(x)), (height, width)


def test_twins_residual_branches_take_cbam_given_the_patch_embeddings_grid_size():
    """Twins' blocks are called ``blk(x, size)`` with ``size = (H // p, W // p)`` from the
    patch embedding, which the graph proves equal to the size of the map their tokens were
    flattened from (a patch convolution, then a position convolution added to its input).
    CBAM on every residual branch runs in its block's forward given ``size[0], size[1]``: the
    branches SE reaches, none skipped; identity at insertion, and the sizes of each call, at
    sizes the plan was not made at."""
    torch.manual_seed(0)
    model = timm.create_model("twins_svt_small", img_size=SIZE, depths=(2, 2, 2, 2)).eval()
    se = ai.plan(model, "se_resnet", input_size=(3, SIZE, SIZE))
    cbam = ai.plan(model, "cbam_resnet", input_size=(3, SIZE, SIZE))
    assert [p.name for p in cbam] == [p.name for p in se] and not cbam.skipped
    dynamic = [p for p in cbam if p.grid_from is not None]
    owners = {f"blocks.{stage}.{block}" for stage in range(4) for block in (0, 1)}
    assert len(dynamic) == 16 and {p.owner for p in dynamic} == owners
    patched = ai.inject(model, "cbam_resnet", input_size=(3, SIZE, SIZE))
    blocks = ai.inserted_blocks(patched)
    seen: dict[str, tuple[int, int]] = {}
    for point in dynamic:
        record = lambda module, args, out, key=point.key: seen.__setitem__(key, tuple(args[1:]))  # noqa: E731
        blocks[point.key].register_forward_hook(record)
    reductions = [e["reduction"] for e in feature_info_stages(model)]
    for height, width in ((SIZE, SIZE), (2 * SIZE, SIZE), (96, 160)):
        seen.clear()
        x = torch.randn(2, 3, height, width, generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            assert torch.equal(patched(x), model(x)), (height, width)
        for point in dynamic:
            reduction = reductions[point.stage]
            assert seen[point.key] == (height // reduction, width // reduction), (point.key, height, width)


def test_hgnetv2_se_resnet_puts_one_block_in_each_residual_hgblock():
    # In HGNetV2 only the blocks after a stage's first add their input back (residual=True);
    # the first of each stage changes the channels and has no shortcut.
    from timm.models.hgnet import HighPerfGpuBlock

    model = timm.create_model("hgnetv2_b0").eval()
    residual = {n for n, m in model.named_modules() if isinstance(m, HighPerfGpuBlock) and m.residual}
    plan = ai.plan(model, "se_resnet", input_size=(3, SIZE, SIZE))
    assert residual and {p.name for p in plan.points} == residual
    assert not plan.used_fallback


# FeatureGetterNet -----------------------------------------------------------------------------


def getter(name: str, **kwargs) -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model(name, features_only=True, feature_cls="getter", **kwargs).eval()


GETTERS = [
    ("resnet10t", {}, "cbam_after_every_stage"),
    ("resnet10t", {"out_indices": (1, 3)}, "cbam_after_every_stage"),
    ("hgnetv2_b0", {}, "cbam_after_every_stage"),
    ("tiny_vit_5m_224", TINY_VIT, "cbam_after_every_stage"),
    # its stem runs a slice of its stem Sequential (self.stem[:-1](x)): traced through to its members
    ("ese_vovnet19b_slim_dw", {}, "cbam_after_every_stage"),
    # feature_info names each block ("blocks.3") of the wrapped model ("model.blocks.3")
    ("xcit_nano_12_p16_224", XCIT, "se_after_every_stage"),
]


@pytest.mark.parametrize(("name", "kwargs", "recipe"), GETTERS, ids=[f"{n}-{k}" for n, k, _ in GETTERS])
def test_feature_getter_gets_a_block_per_stage_it_runs_identity_on_every_map(name, kwargs, recipe):
    model = getter(name, **kwargs)
    info = model.feature_info
    last = max(info.out_indices)
    # every stage up to the last one returned: the later ones are pruned away
    expected = [e["num_chs"] for e in list(info)[: last + 1] if e["reduction"] >= 4]
    patched = ai.inject(model, recipe, input_size=(3, SIZE, SIZE))
    points = patched.attn_inject.plan.points
    assert [p.channels for p in points] == expected
    assert all(p.name.startswith("model.") for p in points)  # the stages of the wrapped model
    assert type(patched) is type(model)
    x = x_batch()
    with torch.no_grad():
        got, want = as_list(patched(x)), as_list(model(x))
    assert len(got) == len(want) == len(info.out_indices)
    assert all(torch.equal(g, w) for g, w in zip(got, want, strict=True))


def test_feature_getter_block_changes_its_own_map_and_the_later_ones_only():
    model = getter("resnet10t")
    patched = ai.inject(model, "se_after_every_stage", input_size=(3, SIZE, SIZE))
    blocks = ai.inserted_blocks(patched)
    key = next(k for k in blocks if k.startswith("model.layer2."))
    with torch.no_grad():
        for name, p in blocks[key].named_parameters():
            if name.endswith("blend"):
                p.fill_(0.5)
        got, want = as_list(patched(x_batch())), as_list(model(x_batch()))
    modules = model.feature_info.module_name()  # the module of each returned map
    changed = [m for m, g, w in zip(modules, got, want, strict=True) if not torch.equal(g, w)]
    assert changed == ["layer2", "layer3", "layer4"]


def test_feature_getter_with_chosen_outputs_loads_as_saved(tmp_path):
    model = getter("resnet10t", out_indices=(1, 3))
    patched = ai.inject(model, "se_after_every_stage", input_size=(3, SIZE, SIZE))
    with torch.no_grad():
        for block in ai.inserted_blocks(patched).values():
            for name, p in block.named_parameters():
                if name.endswith("blend"):
                    p.fill_(0.5)
    ai.save(patched, tmp_path / "m.safetensors")
    manifest = ai.read_manifest(tmp_path / "m.safetensors")
    assert manifest.base_kwargs == {"features_only": True, "feature_cls": "getter", "out_indices": [1, 3]}
    loaded = ai.load(tmp_path / "m.safetensors").eval()
    assert type(loaded) is type(patched) and repr(loaded) == repr(patched)
    assert loaded.feature_info.out_indices == (1, 3)
    with torch.no_grad():
        got, want = as_list(loaded(x_batch())), as_list(patched(x_batch()))
    assert [g.shape[1] for g in got] == [64, 256]  # layer1 and layer3
    assert all(torch.equal(g, w) for g, w in zip(got, want, strict=True))


def test_a_feature_getter_is_planned_at_the_size_its_model_was_built_for():
    """timm's test_pruned_features_torchscript builds ``img_size=64`` getters: the size is read
    off the wrapped model's patch embedding, not its pretrained configuration's 224."""
    model = getter("convit_tiny", img_size=SIZE, out_indices=(0,))
    patched = ai.inject(model, "se_resnet", init="identity")
    assert patched.attn_inject.plan.input_size == (3, SIZE, SIZE)
    x = x_batch()
    with torch.no_grad():
        assert all(torch.equal(g, w) for g, w in zip(as_list(patched(x)), as_list(model(x)), strict=True))


def test_a_model_moving_a_tensor_to_a_buffers_device_is_planned_on_the_cpu():
    """DINOv3's rotary embeddings go ``.to(device=<a buffer's device>)``: the trace keeps the
    device as a constant, which a meta tensor cannot be copied to; the meta pass keeps it."""
    model = timm.create_model("vit_tiny_patch16_dinov3_qkvb", depth=2).eval()
    patched = ai.inject(model, "se_resnet", init="identity", input_size=(3, SIZE, SIZE))
    assert len(ai.inserted_blocks(patched)) == 4
    x = x_batch()
    with torch.no_grad():
        assert torch.equal(patched(x), model(x))
