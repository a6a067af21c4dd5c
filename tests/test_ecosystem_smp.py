"""segmentation-models-pytorch: stage recipes act on the encoder's stages (the model's default
target), identity-exact at insertion with every encoder family, and the save / load round
trip of a model saved unnamed and rebuilt by the user's builder."""

from __future__ import annotations

import pytest
import torch

import attn_inject as ai

from .ecosystem_checks import assert_identity_at_insertion, assert_save_load_round_trip

smp = pytest.importorskip(
    "segmentation_models_pytorch", reason="segmentation-models-pytorch is not installed (attn-inject[smp])"
)

SIZE = 64


def _model(arch: str, encoder: str):
    torch.manual_seed(0)
    return getattr(smp, arch)(encoder, encoder_weights=None).eval()


def _stage_channels(model) -> list[int]:
    """smp's own account of the encoder's stage widths: out_channels lists the input and the
    stride-2 stem first, then one entry per stage (reduction 4 and deeper)."""
    return list(model.encoder.out_channels[2:])


@pytest.mark.parametrize(("arch", "encoder"), [("Unet", "resnet18"), ("DeepLabV3Plus", "resnet18")])
def test_stage_recipe_acts_on_the_encoder_stages_not_the_decoder(arch, encoder):
    """DeepLabV3Plus dilates layer4 (its output stride is 16): layer3 and layer4 share a
    resolution and are still two stages, as the encoder returns them."""
    model = _model(arch, encoder)
    plan = ai.plan(model, "se_after_every_stage", input_size=(3, SIZE, SIZE))
    assert plan.target == "encoder"
    assert [p.name for p in plan] == ["layer1", "layer2", "layer3", "layer4"]
    assert [p.channels for p in plan] == _stage_channels(model)


def test_timm_universal_encoder_and_efficientnet_stages_are_the_maps_the_encoder_returns():
    """smp's EfficientNet returns blocks 2, 4, 8 and 15 (its ``_out_indexes``); a ``tu-``
    encoder wraps a timm ``features_only`` model."""
    model = _model("Unet", "efficientnet-b0")
    plan = ai.plan(model, "cbam_after_every_stage", input_size=(3, SIZE, SIZE))
    assert [p.name for p in plan] == [f"_blocks.{i}" for i in model.encoder._out_indexes]
    assert [p.channels for p in plan] == _stage_channels(model)
    timm_encoder = _model("FPN", "tu-resnet18")
    plan = ai.plan(timm_encoder, "cbam_after_every_stage", input_size=(3, SIZE, SIZE))
    assert plan.target == "encoder" and [p.channels for p in plan] == _stage_channels(timm_encoder)


@pytest.mark.parametrize(
    ("arch", "encoder", "recipe"),
    [
        ("Unet", "resnet18", "se_resnet"),
        ("FPN", "efficientnet-b0", "cbam_after_every_stage"),  # its root forward checks the input's size
        ("DeepLabV3Plus", "tu-resnet18", "se_after_every_stage"),
        ("PSPNet", "resnet18", "cbam_after_every_stage"),  # encoder_depth=3: two stages
    ],
)
def test_smp_model_injects_identity_exact_and_keeps_its_class(arch, encoder, recipe):
    model = _model(arch, encoder)
    patched = ai.inject(model, recipe, init="identity", input_size=(3, SIZE, SIZE))
    assert all(name.startswith("encoder.") for name in ai.inserted_blocks(patched))
    assert_identity_at_insertion(model, patched, SIZE)


def test_smp_model_saved_unnamed_loads_onto_the_users_builder(tmp_path):
    model = _model("Unet", "resnet18")
    patched = ai.inject(model, "se_after_every_stage", init="paper", input_size=(3, SIZE, SIZE))
    with pytest.raises(ai.AttnInjectError, match="model_name=''"):
        ai.save(patched, tmp_path / "named.safetensors")
    rebuilt = smp.Unet("resnet18", encoder_weights=None)
    assert_save_load_round_trip(patched, model, rebuilt, tmp_path, SIZE)
