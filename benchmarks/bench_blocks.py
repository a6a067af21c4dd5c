"""Each block's forward + backward against a plain implementation of its paper's formula.

SE (Hu et al., Eq. 2-4), ECA (Wang et al., Eq. 5 with the adaptive k), CBAM (Woo et al.,
Eq. 2-3) with its FC channel attention and with the 1-D convolution variant. The plain
versions take the block's own weights and run the formula as written: in CBAM the average-
and max-pooled descriptors go through the shared layers in two calls, where the block stacks
them and makes one. Each plain output is checked against the block's before timing. NCHW
and channels_last, at ``init="paper"`` (the formula) and ``init="identity"``.

    python benchmarks/bench_blocks.py [--quick] [--out build/bench/blocks.md]
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from common import Table, backward_step, block_workload, emit, interleaved, ms, parser

import attn_inject as ai


def plain_se(block: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    def forward(x: torch.Tensor) -> torch.Tensor:
        z = F.relu(F.conv2d(x.mean((2, 3), keepdim=True), block.fc1.weight, block.fc1.bias))
        return x * torch.sigmoid(F.conv2d(z, block.fc2.weight, block.fc2.bias))

    return forward


def _conv1d_channels(pooled: torch.Tensor, conv: nn.Conv1d) -> torch.Tensor:
    """(B, C) -> (B, C): the 1-D convolution across channels."""
    return F.conv1d(pooled.unsqueeze(1), conv.weight, padding=conv.padding).squeeze(1)


def plain_eca(block: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    conv = block.conv

    def forward(x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(_conv1d_channels(x.mean((2, 3)), conv))[:, :, None, None]

    return forward


def plain_cbam(block: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    channel, spatial = block.channel, block.spatial

    def mlp(v: torch.Tensor) -> torch.Tensor:
        if hasattr(channel, "fc1"):  # the MLP; else ECA's 1-D convolution
            hidden = F.relu(F.conv2d(v, channel.fc1.weight, channel.fc1.bias))
            return F.conv2d(hidden, channel.fc2.weight, channel.fc2.bias)
        return _conv1d_channels(v.flatten(1), channel.channel_conv)[:, :, None, None]

    def forward(x: torch.Tensor) -> torch.Tensor:
        x = x * torch.sigmoid(mlp(x.mean((2, 3), keepdim=True)) + mlp(x.amax((2, 3), keepdim=True)))
        maps = torch.cat([x.amax(1, keepdim=True), x.mean(1, keepdim=True)], dim=1)
        return x * torch.sigmoid(F.conv2d(maps, spatial.conv.weight, padding=spatial.conv.padding))

    return forward


BLOCKS = (
    ("se", {}, plain_se),
    ("eca", {}, plain_eca),
    ("cbam", {}, plain_cbam),
    ("cbam", {"channel": "conv"}, plain_cbam),
)


def bench(device: torch.device, batch: int, shapes: tuple[tuple[int, int, int], ...], rounds: int) -> Table:
    table = Table(
        f"Blocks, forward + backward, batch {batch}, on {device.type}",
        [
            "block",
            "map (C, H, W)",
            "layout",
            "plain formula ms",
            "block paper ms (ratio)",
            "block identity ms (ratio)",
        ],
        note=f"Medians of {rounds} interleaved rounds; ratio = block / plain formula.",
    )
    sync = device.type == "cuda"
    for kind, params, plain in BLOCKS:
        for shape in shapes:
            torch.manual_seed(0)
            paper = ai.create_block(kind, shape[0], init="paper", **params).to(device)
            identity = ai.create_block(kind, shape[0], init="identity", **params).to(device)
            identity.load_state_dict(paper.state_dict(), strict=False)
            formula = plain(paper)
            for layout in ("NCHW", "channels_last"):
                x = torch.randn(batch, *shape, device=device)
                if layout == "channels_last":
                    x = x.to(memory_format=torch.channels_last)
                x.requires_grad_()
                with torch.no_grad():
                    torch.testing.assert_close(formula(x), paper(x))
                medians = interleaved(
                    {
                        "plain": backward_step(formula, x),
                        "paper": backward_step(paper, x),
                        "identity": backward_step(identity, x),
                    },
                    rounds,
                    sync=sync,
                )
                name = kind + (
                    f" (channel={params['channel']})" if params else " (channel=fc)" if kind == "cbam" else ""
                )
                table.rows.append(
                    [
                        name,
                        str(shape),
                        layout,
                        ms(medians["plain"]),
                        f"{ms(medians['paper'])} ({medians['paper'] / medians['plain']:.3f})",
                        f"{ms(medians['identity'])} ({medians['identity'] / medians['plain']:.3f})",
                    ]
                )
    return table


def main(argv: list[str] | None = None) -> str:
    args = parser(__doc__.splitlines()[0]).parse_args(argv)
    device, batch, shapes, rounds = block_workload(args.quick)
    return emit("Blocks vs their formulas", [bench(device, batch, shapes, rounds)], args.out, args.quick)


if __name__ == "__main__":
    main()
