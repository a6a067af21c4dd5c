"""Which segmentation-models-pytorch, open_clip and mmpretrain models each recipe reaches:
the tables in docs/ecosystems.md.

Every model is built with random weights (nothing downloaded), injected at
``init="identity"`` with each recipe, and compared with the original on every output tensor
(``torch.equal``); the patched model must keep its class and pass ``ai.validate``.

    HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 python examples/ecosystem_coverage.py [smp|open_clip|mmpretrain]
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from collections.abc import Callable, Iterator

import torch
from torch import nn

import attn_inject as ai
from attn_inject.core.messages import cut
from attn_inject.core.tables import markdown_table
from attn_inject.surgery.record import patched_record
from attn_inject.validation.compare import tensors

os.environ.setdefault("HF_HUB_OFFLINE", "1")

RECIPES = ("se_resnet", "cbam_after_every_stage", "se_after_every_stage")
SIZE = 64

SMP_ARCHS = ("Unet", "FPN", "DeepLabV3Plus", "Linknet", "PSPNet", "UnetPlusPlus")
SMP_ENCODERS = ("resnet34", "efficientnet-b0", "tu-resnet18")
CLIP_MODELS = ("RN50", "ViT-B-32")

Builder = Callable[[], nn.Module]


def smp_models() -> Iterator[tuple[str, Builder]]:
    import segmentation_models_pytorch as smp

    for arch in SMP_ARCHS:
        for encoder in SMP_ENCODERS:
            yield (
                f"{arch}({encoder})",
                lambda arch=arch, encoder=encoder: getattr(smp, arch)(encoder, encoder_weights=None),
            )


def open_clip_models() -> Iterator[tuple[str, Builder]]:
    import open_clip

    for name in CLIP_MODELS:
        yield (
            f"{name}.visual",
            lambda name=name: open_clip.create_model(name, pretrained=None, force_image_size=SIZE).visual,
        )


def mmpretrain_models() -> Iterator[tuple[str, Builder]]:
    from mmpretrain.models import ResNet

    yield "ResNet(depth=18)", lambda: ResNet(depth=18)
    yield "ResNet(depth=50)", lambda: ResNet(depth=50)


LIBRARIES: dict[str, Callable[[], Iterator[tuple[str, Builder]]]] = {
    "smp": smp_models,
    "open_clip": open_clip_models,
    "mmpretrain": mmpretrain_models,
}


def same_output(want: object, got: object) -> bool:
    a, b = tensors(want), tensors(got)
    return len(a) == len(b) > 0 and all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def row(name: str, build: Builder) -> list[str]:
    torch.manual_seed(0)
    model = build()
    model.eval()  # mmpretrain's ResNet.train() returns None, so not build().eval()
    size = (3, SIZE, SIZE)
    cells, notes, checks = [], [], []
    x = torch.randn(2, *size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model(x)
    for recipe in RECIPES:
        try:
            patched = ai.inject(model, recipe, init="identity", input_size=size, allow_empty=True)
        except ai.AttnInjectError as error:
            cells.append("-")
            notes.append(cut(str(error), 160))
            continue
        info = patched_record(patched)
        plan = info.plan if info is not None else None
        blocks = ai.inserted_blocks(patched)
        cells.append(str(len(blocks)))
        if plan is not None:
            notes += [cut(str(s), 160) for s in plan.skipped[:1]]
        if not blocks:
            continue
        with torch.no_grad():
            exact = same_output(want, patched(x))
        kept = ai.base_class(patched) is type(model) and type(patched).__name__ == type(model).__name__
        report = ai.validate(model, patched, checks=("reference", "identity"), seeds=1, device="cpu")
        checks.append(exact and kept and report.passed)
    identity = "-" if not checks else ("exact" if all(checks) else "DIFFERS")
    return [name, *cells, identity, "; ".join(sorted(set(notes))[:1])]


def table(library: str) -> list[str]:
    rows = [row(name, build) for name, build in LIBRARIES[library]()]
    header = [f"model ({library})", *RECIPES, "identity", "skipped, and why"]
    return markdown_table(header, rows)


def main(argv: list[str]) -> int:
    logging.disable(logging.WARNING)  # open_clip: "No pretrained weights loaded", as asked
    warnings.simplefilter("ignore")  # mmcv-lite: its compiled ops are missing, none are used
    for library in argv or list(LIBRARIES):
        if library not in LIBRARIES:
            print(f"unknown library {library!r}; allowed: {', '.join(LIBRARIES)}", file=sys.stderr)
            return 2
        print("\n".join(table(library)) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
