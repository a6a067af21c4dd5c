"""Squeeze-and-Excitation (Hu et al., "Squeeze-and-Excitation Networks", arXiv 1709.01507).

``out = x * sigmoid(W2 relu(W1 squeeze(x)))``: squeeze by global average pooling, an
excitation MLP of width ``C / ratio`` (r = 16 in the paper), a sigmoid gate, a channel-wise
scale. The fully connected layers are 1x1 convolutions, so weights have timm's ``SEModule``
layout (``fc1``, ``fc2``).

Options that depart from the paper's default: ``pool="max"`` (the paper's squeeze ablation,
Table 11), ``bias=False``, ``divisor`` (hidden width rounded to a multiple, as timm does; not
in paper), ``init="identity"`` (see :mod:`attn_inject.blocks.gate`; not in paper).
``layout`` (see :mod:`attn_inject.blocks.layout`): on a channels-last map or tokens, the
fully connected layers are ``nn.Linear`` on the last dimension (the same weights, stored
without the 1x1 kernel dimensions).
"""

from __future__ import annotations

import torch
from torch import nn

from . import params as check
from .gate import gate, make_blend
from .layout import NCHW, LayoutBlock


def hidden_width(channels: int, ratio: float, divisor: int | None = None) -> int:
    """Width of the excitation MLP: ``max(1, C // ratio)``, or rounded to ``divisor`` like timm."""
    if divisor is None:
        return max(1, int(channels // ratio))
    rounded = int(channels / ratio + divisor / 2) // divisor * divisor
    return max(divisor, rounded)


def channel_layer(channels_in: int, channels_out: int, bias: bool, channels_last: bool) -> nn.Module:
    """A fully connected layer over the channels of a pooled descriptor: a 1x1 convolution on
    (B, C, 1, 1), a linear layer on channels-last (B, 1, 1, C)."""
    if channels_last:
        return nn.Linear(channels_in, channels_out, bias=bias)
    return nn.Conv2d(channels_in, channels_out, 1, bias=bias)


class SqueezeExcite(LayoutBlock):
    """SE block (arXiv 1709.01507, Fig. 2 and Eq. 2-4): (B, C, H, W) -> (B, C, H, W), or the
    same on (B, H, W, C) or (B, N, C) tokens (``layout``; the grid's shape is not needed)."""

    uses_grid = False

    def __init__(
        self,
        channels: int,
        ratio: float = 16,
        pool: str = "avg",
        bias: bool = True,
        divisor: int | None = None,
        init: str = "paper",
        layout: str = NCHW,
        prefix: int = 0,
        grid: tuple[int, int] | None = None,
        order: list[int] | None = None,
    ) -> None:
        super().__init__(layout, prefix, grid, order)
        channels = check.channel_count(channels)
        check.ratio("ratio", ratio)
        self.pool = check.choice("pool", pool, ("avg", "max"))
        check.boolean("bias", bias)
        if divisor is not None:
            check.positive_int("divisor", divisor)
        self.init = check.init_mode(init)
        hidden = hidden_width(channels, ratio, divisor)
        self.fc1 = channel_layer(channels, hidden, bias, self.channels_last)
        self.act = nn.ReLU(inplace=True)
        self.fc2 = channel_layer(hidden, channels, bias, self.channels_last)
        self.blend = make_blend(init)

    def attend(self, x: torch.Tensor) -> torch.Tensor:
        if self.pool == "avg":
            squeezed = x.mean(self.map_dims, keepdim=True)
        else:
            squeezed = x.amax(self.map_dims, keepdim=True)
        return gate(x, self.fc2(self.act(self.fc1(squeezed))), self.blend)
