"""Which Ultralytics YOLO models each recipe reaches: the table in docs/ecosystems.md.

Every model is built from its YAML with random weights (nothing downloaded), injected at
``init="identity"`` with each recipe at 64 px, and every tensor of its eval output (nested
tuples and lists) compared with the original's by ``torch.equal``; "exact": all equal, the
class kept and ``ai.validate`` passed. Blocks placed in the head (the last layer) are listed.

    YOLO_OFFLINE=1 OMP_NUM_THREADS=1 python examples/ultralytics_coverage.py
"""

from __future__ import annotations

import os
import sys

import torch

import attn_inject as ai
from attn_inject.core.messages import cut
from attn_inject.core.tables import markdown_table
from attn_inject.validation.compare import tensors

os.environ.setdefault("YOLO_OFFLINE", "1")

MODELS = (
    "yolov8n.yaml",
    "yolov8n-seg.yaml",
    "yolov8n-cls.yaml",
    "yolov8n-pose.yaml",
    "yolov8n-obb.yaml",
    "yolo11n.yaml",
    "yolo11n-seg.yaml",
    "yolo11n-cls.yaml",
    "yolo11n-pose.yaml",
    "yolo11n-obb.yaml",
)
RECIPES = ("se_resnet", "cbam_after_every_stage")
SIZE = 64


def same_outputs(want: object, got: object) -> bool:
    a, b = tensors(want), tensors(got)
    return len(a) == len(b) > 0 and all(
        x.shape == y.shape and torch.equal(x, y) for x, y in zip(a, b, strict=True)
    )


def row(name: str) -> list[str]:
    from ultralytics import YOLO

    torch.manual_seed(0)
    model = YOLO(name).model.eval()
    head = f"model.{len(model.model) - 1}."
    x = torch.rand(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    cells, notes, checks, in_head = [], [], [], []
    for recipe in RECIPES:
        try:
            patched = ai.inject(model, recipe, input_size=(3, SIZE, SIZE), allow_empty=True)
        except ai.AttnInjectError as error:
            cells.append("-")
            notes.append(f"{recipe}: {cut(str(error), 160)}")
            continue
        keys = list(ai.inserted_blocks(patched)) if patched is not model else []
        cells.append(str(len(keys)))
        if not keys:
            plan = ai.plan(model, recipe, input_size=(3, SIZE, SIZE))
            notes += [f"{recipe}: {cut(str(s), 160)}" for s in plan.skipped[:1]]
            continue
        in_head += [f"{recipe}: {k}" for k in keys if k.startswith(head)]
        with torch.no_grad():
            identical = same_outputs(model(x), patched.eval()(x))
        report = ai.validate(model, patched, input_size=(3, SIZE, SIZE), checks=("reference", "identity"))
        checks.append(identical and type(patched) is type(model) and report.passed)
    identity = "-" if not checks else ("exact" if all(checks) else "DIFFERS")
    return [name.removesuffix(".yaml"), *cells, identity, ", ".join(in_head), "; ".join(notes[:1])]


def main() -> int:
    rows = [row(name) for name in MODELS]
    header = ["model (Ultralytics)", *RECIPES, "identity", "blocks in the head", "skipped, and why"]
    print("\n".join(markdown_table(header, rows)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
