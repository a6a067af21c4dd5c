"""open_clip image towers: a stage recipe reaches every stage of the ModifiedResNet (layer4
too, whose map the attention pool reads as sequence-first tokens), identity-exact at
insertion, and the save / load round trip of a tower saved unnamed. The towers are open_clip's
own classes built small (RN50's ModifiedResNet one block a stage and a quarter as wide, a
two-block ViT), as ``create_model`` builds them from a config."""

from __future__ import annotations

import pytest
import torch

import attn_inject as ai

from .ecosystem_checks import assert_identity_at_insertion, assert_save_load_round_trip

SIZE = 64


def _open_clip() -> None:
    """open_clip imported when a test runs (it takes a second), or the test skipped where it
    is not installed."""
    pytest.importorskip("open_clip", reason="open_clip is not installed (attn-inject[open_clip])")


def _modified_resnet():
    """RN50's tower class, one bottleneck a stage, width 16: stages of 64 to 512 channels."""
    _open_clip()
    from open_clip.modified_resnet import ModifiedResNet

    return ModifiedResNet(layers=[1, 1, 1, 1], output_dim=64, heads=2, image_size=SIZE, width=16)


def _vision_transformer():
    _open_clip()
    from open_clip.transformer import VisionTransformer

    return VisionTransformer(
        image_size=SIZE, patch_size=16, width=64, layers=2, heads=2, mlp_ratio=2.0, output_dim=32
    )


@pytest.fixture(scope="module")
def rn50():
    torch.manual_seed(0)
    return _modified_resnet().eval()


def test_stage_recipe_reaches_every_stage_of_the_modified_resnet_layer4_included(rn50):
    plan = ai.plan(rn50, "se_after_every_stage", input_size=(3, SIZE, SIZE))
    assert [p.name for p in plan] == ["layer1", "layer2", "layer3", "layer4"]
    widths = [getattr(rn50, f"layer{i}")[-1].conv3.out_channels for i in range(1, 5)]
    assert [p.channels for p in plan] == widths == [64, 128, 256, 512]
    assert not plan.skipped


@pytest.mark.parametrize("recipe", ["se_resnet", "cbam_after_every_stage"])
def test_modified_resnet_injects_identity_exact_and_keeps_its_class(rn50, recipe):
    patched = ai.inject(rn50, recipe, init="identity", input_size=(3, SIZE, SIZE))
    assert_identity_at_insertion(rn50, patched, SIZE)


def test_vision_transformer_injects_identity_exact_and_keeps_its_class():
    torch.manual_seed(0)
    tower = _vision_transformer().eval()
    patched = ai.inject(tower, "se_resnet", init="identity", input_size=(3, SIZE, SIZE))
    assert len(ai.inserted_blocks(patched)) == 2 * len(tower.transformer.resblocks)
    assert_identity_at_insertion(tower, patched, SIZE)


def test_open_clip_tower_saved_unnamed_loads_onto_the_users_builder(rn50, tmp_path):
    patched = ai.inject(rn50, "se_after_every_stage", init="paper", input_size=(3, SIZE, SIZE))
    rebuilt = _modified_resnet()
    assert_save_load_round_trip(patched, rn50, rebuilt, tmp_path, SIZE)
