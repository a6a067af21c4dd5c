"""A model's shapes without its weights: ``build_shapes_only`` against timm's and torchvision's
own builders under ``torch.device("meta")``.

``ai.load``, ``ai.save`` (the check that a file rebuilds its network), fine-tuning with new
classes and planning a model by name build the network on the meta device: its
architecture and shapes, nothing allocated. An initialisation's fills have no values to write
there, and torch runs ``normal_`` on the meta device through its Python reference (about a
millisecond a call); ``build_shapes_only`` skips the fills. The peer is the library's
builder in ``with torch.device("meta")``, the same build with its fills run (torchvision's
RegNet computes its widths from tensor values and cannot be built on the meta device: there,
both fall back to the build with each tensor moved to the meta device as it is registered).
Both builds are checked to give the same modules, keys, shapes and dtypes before timing.
Medians of interleaved rounds.

    python benchmarks/bench_build.py [--quick] [--out build/bench/6-build.md]
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import timm
import torch
import torchvision
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from common import Table, emit, interleaved, ms, parser

from attn_inject.models import build

MODELS = (
    "timm:resnet50",
    "timm:efficientnet_b3",
    "timm:convnext_base",
    "timm:vit_base_patch16_224",
    "timm:regnety_160",
    "tv:resnet50",
    "tv:regnet_y_16gf",
)
QUICK_MODELS = ("timm:resnet10t", "tv:resnet18")


def _fills_run(name: str) -> Callable[[], nn.Module]:
    """The peer: the library's own build of ``name`` on the meta device, its fills run; where
    the builder cannot run there, each tensor moved there as it is registered (what
    ``build_shapes_only`` falls back to)."""
    source, _, bare = name.partition(":")

    def library_build() -> nn.Module:
        if source == "timm":
            return timm.create_model(bare, pretrained=False)
        return torchvision.models.get_model(bare, weights=None)

    def peer() -> nn.Module:
        try:
            with torch.device("meta"):
                return library_build()
        except Exception:
            with build._registered_on_meta():
                return library_build()

    return peer


def _network(model: nn.Module) -> tuple[str, dict[str, tuple[tuple[int, ...], torch.dtype]]]:
    return repr(model), {k: (tuple(v.shape), v.dtype) for k, v in model.state_dict().items()}


def bench(models: tuple[str, ...], rounds: int) -> Table:
    table = Table(
        "build_shapes_only vs the library's builder on the meta device (CPU)",
        ["model", "params", "library builder, fills run ms", "build_shapes_only ms", "ratio"],
        note=f"Medians of {rounds} interleaved rounds, Python's garbage collected before each; "
        "ratio = build_shapes_only / the library's builder. Both give the same modules, keys, shapes "
        "and dtypes (checked).",
    )
    for name in models:
        peer = _fills_run(name)
        ours = lambda name=name: build.build_shapes_only(name)  # noqa: E731
        shapes = ours()
        if _network(shapes) != _network(peer()):
            raise SystemExit(f"{name}: build_shapes_only builds another network than the library's builder")
        medians = interleaved({"peer": peer, "ours": ours}, rounds, collect_garbage=True)
        params = sum(p.numel() for p in shapes.parameters())
        table.rows.append(
            [
                name,
                f"{params / 1e6:.1f} M",
                ms(medians["peer"]),
                ms(medians["ours"]),
                f"{medians['ours'] / medians['peer']:.2f}",
            ]
        )
    return table


def main(argv: list[str] | None = None) -> str:
    args = parser(__doc__.splitlines()[0]).parse_args(argv)
    models, rounds = (QUICK_MODELS, 1) if args.quick else (MODELS, 15)
    table = bench(models, rounds)
    return emit("Building a model's shapes only", [table], args.out, args.quick)


if __name__ == "__main__":
    main()
