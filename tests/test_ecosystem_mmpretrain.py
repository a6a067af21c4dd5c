"""mmpretrain (on mmcv-lite): its ResNet backbone takes every recipe identity-exact at
insertion, keeps its class, and round-trips through save / load saved unnamed."""

from __future__ import annotations

import warnings

import pytest
import torch

import attn_inject as ai

from .ecosystem_checks import assert_identity_at_insertion, assert_save_load_round_trip


def _models():
    """``mmpretrain.models``, imported when a test runs (it takes a second), or the test
    skipped where mmpretrain is not installed."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # mmcv-lite: "Fail to import MultiScaleDeformableAttention" (unused)
        return pytest.importorskip(
            "mmpretrain.models", reason="mmpretrain is not installed (attn-inject[mmpretrain])"
        )


SIZE = 64


def _resnet(depth: int = 18):
    torch.manual_seed(0)
    model = _models().ResNet(depth=depth)
    model.eval()  # mmpretrain's ResNet.train() returns None: not models.ResNet(...).eval()
    return model


def test_stage_recipe_reaches_the_four_stages_of_mmpretrain_resnet():
    model = _resnet()
    plan = ai.plan(model, "cbam_after_every_stage", input_size=(3, SIZE, SIZE))
    assert [p.name for p in plan] == ["layer1", "layer2", "layer3", "layer4"]
    widths = [getattr(model, f"layer{i}")[-1].conv2.out_channels for i in range(1, 5)]
    assert [p.channels for p in plan] == widths == [64, 128, 256, 512]


@pytest.mark.parametrize("recipe", ["se_resnet", "cbam_after_every_stage", "se_after_every_stage"])
def test_mmpretrain_resnet_injects_identity_exact_and_keeps_its_class(recipe):
    model = _resnet()
    patched = ai.inject(model, recipe, init="identity", input_size=(3, SIZE, SIZE))
    assert_identity_at_insertion(model, patched, SIZE)


def test_mmpretrain_resnet_saved_unnamed_loads_onto_the_users_builder(tmp_path):
    model = _resnet()
    patched = ai.inject(model, "se_resnet", init="paper", input_size=(3, SIZE, SIZE))
    assert_save_load_round_trip(patched, model, _models().ResNet(depth=18), tmp_path, SIZE)
