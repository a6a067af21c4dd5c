"""The wider sweep, outside the default run (``make zoo-test`` / ``pytest -m zoo``): identity
at insertion for every shipped recipe over more torchvision and timm CNNs."""

from __future__ import annotations

import pytest
import timm
import torch
import torchvision

import attn_inject as ai

pytestmark = pytest.mark.zoo

TORCHVISION = [
    "alexnet",
    "vgg11_bn",
    "resnet34",
    "resnet101",
    "resnext50_32x4d",
    "wide_resnet50_2",
    "mobilenet_v2",
    "mobilenet_v3_small",
    "efficientnet_b3",
    "efficientnet_v2_s",
    "regnet_x_400mf",
    "regnet_y_800mf",
    "convnext_small",
    "densenet169",
    "shufflenet_v2_x0_5",
    "mnasnet1_0",
    "squeezenet1_1",
    "googlenet",
    "inception_v3",
]
TIMM = [
    "resnet18d",
    "resnet101",
    "resnext50_32x4d",
    "seresnet50",
    "regnetx_002",
    "regnety_004",
    "efficientnet_b2",
    "tf_efficientnet_b0",
    "mobilenetv2_100",
    "mobilenetv4_conv_small",
    "convnext_nano",
    "convnextv2_atto",
    "dla34",
    "cspresnet50",
    "cspdarknet53",
    "darknet53",
    "dpn68",
    "ghostnet_100",
    "hrnet_w18_small",
    "rexnet_100",
    "res2net50_26w_4s",
    "resnest14d",
    "dm_nfnet_f0",
    "repvgg_a0",
    "vovnet39a",
    "poolformer_s12",
    "mixnet_s",
    "fbnetc_100",
]
RECIPES = ["se_resnet", "cbam_after_every_stage", "se_pre", "se_identity", "se_post"]


def _model(source: str, name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if source == "tv":
        kwargs = {"aux_logits": False, "init_weights": True} if name in ("googlenet", "inception_v3") else {}
        return torchvision.models.get_model(name, weights=None, **kwargs).eval()
    return timm.create_model(name, pretrained=False).eval()


@pytest.mark.parametrize("source, name", [("tv", n) for n in TORCHVISION] + [("timm", n) for n in TIMM])
def test_identity_for_every_recipe(source, name):
    model = _model(source, name)
    size = (3, 299, 299) if name == "inception_v3" else (3, 96, 96)
    x = torch.randn((2, *size), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = model(x)
    inserted = 0
    for recipe in RECIPES:
        patched = ai.inject(model, recipe, input_size=size, allow_empty=True)
        inserted += len(patched.attn_inject.plan)
        with torch.no_grad():
            output = patched(x)
        assert (output - reference).abs().max() <= 1e-5 * reference.abs().max(), recipe
    assert inserted > 0
