"""What the identity blend costs: on the full feature map (a block without a blend of its own,
wrapped) against on the block's small attention map (the built-in blocks' own blend).

A built-in block at ``init="identity"`` blends its attention map, (B, C, 1, 1) or
(B, 1, H, W), with one before it scales the map (``attn_inject.blocks.gate``). A block
without a blend (timm's modules, a user's) is wrapped at ``init="identity"`` and blended on
its output, ``torch.lerp(x, block(x), blend)``: one more elementwise pass over the full map,
forward and backward (``attn_inject.blocks.wrapped``). Both run the same block with the same
weights, their blends at 1, where each equals the paper block (checked before timing); the
peer is the block at ``init="paper"``, with no blend. Forward + backward, medians of interleaved rounds.

    python benchmarks/bench_blend.py [--quick] [--out build/bench/blend.md]
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import Table, backward_step, block_workload, emit, interleaved, ms, parser

import attn_inject as ai
from attn_inject.blocks import Blended

KINDS = ("se", "eca", "cbam")


def forms(kind: str, channels: int, device: torch.device) -> dict[str, torch.nn.Module]:
    """The paper block, the same block with its own map-level blend, and wrapped with the
    full-map blend; the blends at 1, so that all three compute the paper block."""
    torch.manual_seed(0)
    paper = ai.create_block(kind, channels, init="paper").to(device)
    own = ai.create_block(kind, channels, init="identity").to(device)
    own.load_state_dict(paper.state_dict(), strict=False)
    wrapped = Blended(ai.create_block(kind, channels, init="paper"), "identity").to(device)
    wrapped.block.load_state_dict(paper.state_dict())
    with torch.no_grad():
        for name, param in [*own.named_parameters(), *wrapped.named_parameters()]:
            if name.endswith("blend"):
                param.fill_(1.0)
    return {"paper": paper, "map-level blend": own, "full-map blend": wrapped}


def bench(device: torch.device, batch: int, shapes: tuple[tuple[int, int, int], ...], rounds: int) -> Table:
    table = Table(
        f"Identity blend, forward + backward, batch {batch}, on {device.type}",
        ["block", "map (C, H, W)", "paper ms", "map-level blend ms (ratio)", "full-map blend ms (ratio)"],
        note=f"Medians of {rounds} interleaved rounds; ratio = form / the paper block (no blend).",
    )
    for kind in KINDS:
        for shape in shapes:
            blocks = forms(kind, shape[0], device)
            x = torch.randn(batch, *shape, device=device, requires_grad=True)
            with torch.no_grad():
                for name in ("map-level blend", "full-map blend"):
                    torch.testing.assert_close(blocks[name](x), blocks["paper"](x))
            medians = interleaved(
                {name: backward_step(block, x) for name, block in blocks.items()},
                rounds,
                sync=device.type == "cuda",
            )
            base = medians["paper"]
            table.rows.append(
                [
                    kind,
                    str(shape),
                    ms(base),
                    f"{ms(medians['map-level blend'])} ({medians['map-level blend'] / base:.3f})",
                    f"{ms(medians['full-map blend'])} ({medians['full-map blend'] / base:.3f})",
                ]
            )
    return table


def main(argv: list[str] | None = None) -> str:
    args = parser(__doc__.splitlines()[0]).parse_args(argv)
    device, batch, shapes, rounds = block_workload(args.quick)
    table = bench(device, batch, shapes, rounds)
    return emit("The identity blend: full map against attention map", [table], args.out, args.quick)


if __name__ == "__main__":
    main()
