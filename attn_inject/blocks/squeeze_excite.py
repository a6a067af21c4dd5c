"""Squeeze-and-Excitation (Hu et al., "Squeeze-and-Excitation Networks", arXiv 1709.01507).

``out = x * sigmoid(W2 relu(W1 squeeze(x)))``: squeeze by global average pooling, an
excitation MLP of width ``C / ratio`` (r = 16 in the paper), a sigmoid gate, a channel-wise
scale. The fully connected layers are 1x1 convolutions, so weights have timm's ``SEModule``
layout (``fc1``, ``fc2``).

Options that depart from the paper's default: ``pool="max"`` (the paper's squeeze ablation,
Table 11), ``bias=False``, ``divisor`` (hidden width rounded to a multiple, as timm does; not
in paper), ``init="identity"`` (see :mod:`attn_inject.blocks.gate`; not in paper).
"""

from __future__ import annotations

import torch
from torch import nn

from . import params as check
from .gate import gate, make_blend


def hidden_width(channels: int, ratio: float, divisor: int | None = None) -> int:
    """Width of the excitation MLP: ``max(1, C // ratio)``, or rounded to ``divisor`` like timm."""
    if divisor is None:
        return max(1, int(channels // ratio))
    rounded = int(channels / ratio + divisor / 2) // divisor * divisor
    return max(divisor, rounded)


class SqueezeExcite(nn.Module):
    """SE block (arXiv 1709.01507, Fig. 2 and Eq. 2-4): (B, C, H, W) -> (B, C, H, W)."""

    def __init__(
        self,
        channels: int,
        ratio: float = 16,
        pool: str = "avg",
        bias: bool = True,
        divisor: int | None = None,
        init: str = "paper",
    ) -> None:
        super().__init__()
        channels = check.channel_count(channels)
        check.ratio("ratio", ratio)
        self.pool = check.choice("pool", pool, ("avg", "max"))
        check.boolean("bias", bias)
        if divisor is not None:
            check.positive_int("divisor", divisor)
        self.init = check.init_mode(init)
        hidden = hidden_width(channels, ratio, divisor)
        self.fc1 = nn.Conv2d(channels, hidden, 1, bias=bias)
        self.act = nn.ReLU(inplace=True)
        self.fc2 = nn.Conv2d(hidden, channels, 1, bias=bias)
        self.blend = make_blend(init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pool == "avg":
            squeezed = x.mean((2, 3), keepdim=True)
        else:
            squeezed = x.amax((2, 3), keepdim=True)
        return gate(x, self.fc2(self.act(self.fc1(squeezed))), self.blend)
