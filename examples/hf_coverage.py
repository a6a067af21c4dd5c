"""Which HF transformers vision models each recipe reaches: the table in docs/ecosystems.md.

Every model is built from a tiny config with random weights (nothing downloaded), injected
at ``init="identity"`` with each recipe, and its output compared field by field with the
original's (``torch.equal`` on every ``ModelOutput`` field).

    HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 python examples/hf_coverage.py   # a few minutes on one core
"""

from __future__ import annotations

import os
import sys

import torch

import attn_inject as ai
from attn_inject.core.messages import cut
from attn_inject.core.tables import markdown_table

os.environ.setdefault("HF_HUB_OFFLINE", "1")

RECIPES = ("se_resnet", "cbam_after_every_stage", "se_after_every_stage")


def configs() -> dict[str, tuple[type, object, int]]:
    import transformers as T

    stages = dict(hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 1, 1])
    vit = dict(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2)
    two = dict(num_encoder_blocks=2, depths=[1, 1], hidden_sizes=[16, 32], patch_sizes=[7, 3], strides=[4, 2])
    return {
        "ResNet": (T.ResNetModel, T.ResNetConfig(embedding_size=16, **stages), 64),
        "RegNet": (T.RegNetModel, T.RegNetConfig(embedding_size=16, groups_width=8, **stages), 64),
        "BiT": (T.BitModel, T.BitConfig(embedding_size=16, num_groups=4, **stages), 64),
        "EfficientNet": (
            T.EfficientNetModel,
            T.EfficientNetConfig(
                image_size=64, width_coefficient=0.25, depth_coefficient=0.25, hidden_dim=320
            ),
            64,
        ),
        "MobileNetV2": (T.MobileNetV2Model, T.MobileNetV2Config(image_size=64, depth_multiplier=0.25), 64),
        "ConvNext": (T.ConvNextModel, T.ConvNextConfig(image_size=64, **stages), 64),
        "ConvNextV2": (T.ConvNextV2Model, T.ConvNextV2Config(image_size=64, **stages), 64),
        "PoolFormer": (T.PoolFormerModel, T.PoolFormerConfig(padding=[2, 1], **two), 64),
        "Segformer": (
            T.SegformerModel,
            T.SegformerConfig(sr_ratios=[2, 1], num_attention_heads=[1, 2], mlp_ratios=[2, 2], **two),
            64,
        ),
        "ViT": (T.ViTModel, T.ViTConfig(intermediate_size=64, **vit), 32),
        "DeiT": (T.DeiTModel, T.DeiTConfig(intermediate_size=64, **vit), 32),
        "Dinov2": (T.Dinov2Model, T.Dinov2Config(**vit), 32),
        "Swin": (
            T.SwinModel,
            T.SwinConfig(
                image_size=32, patch_size=4, embed_dim=16, depths=[1, 1], num_heads=[1, 2], window_size=4
            ),
            32,
        ),
    }


def same_output(want: object, got: object) -> bool:
    if type(got) is not type(want) or list(got.keys()) != list(want.keys()):  # type: ignore[attr-defined]
        return False
    return all(torch.equal(got[k], want[k]) for k in want)  # type: ignore[attr-defined, index]


def row(name: str, cls: type, config: object, size: int) -> list[str]:
    torch.manual_seed(0)
    model = cls(config).eval()  # type: ignore[operator]
    cells, notes, identical = [], [], []
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    for recipe in RECIPES:
        try:
            plan = ai.plan(model, recipe, input_size=(3, size, size))
        except ai.AttnInjectError as error:
            cells.append("-")
            notes.append(cut(str(error), 160))
            continue
        cells.append(str(len(plan.points)))
        notes += [cut(str(s), 160) for s in plan.skipped[:1] if not plan.points]
        if plan.points:
            patched = ai.inject(model, recipe, input_size=(3, size, size))
            with torch.no_grad():
                identical.append(same_output(model(x), patched(x)))
    identity = "-" if not identical else ("exact" if all(identical) else "DIFFERS")
    opened = sorted(set(notes))
    return [name, *cells, identity, "; ".join(opened[:1]) or ""]


def main() -> int:
    rows = [row(name, *spec) for name, spec in configs().items()]
    header = ["model (HF transformers)", *RECIPES, "identity", "skipped, and why"]
    print("\n".join(markdown_table(header, rows)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
