"""Efficient Channel Attention (Wang et al., "ECA-Net", arXiv 1910.03151).

``out = x * sigmoid(conv1d_k(avgpool(x)))``: global average pooling, a 1-D convolution of
size ``k`` across neighbouring channels without bias and without dimensionality reduction,
a sigmoid gate, a channel-wise scale. ``k`` adapts to the channel count (Eq. 12):
``k = |(log2(C) + b) / gamma|_odd`` with ``gamma = 2, b = 1`` (integer part, plus one if even).

Departures: ``kernel_size`` fixes ``k`` (the paper's fixed-k ablation); timm additionally
clamps ``k >= 3``, which this block does not (the paper's formula gives ``k = 1`` for C <= 4);
``init="identity"`` (see :mod:`attn_inject.blocks.gate`; not in paper). ``layout`` (see
:mod:`attn_inject.blocks.layout`): the same 1-D convolution over the last dimension of a
channels-last descriptor.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from . import params as check
from .gate import gate, make_blend
from .layout import NCHW, LayoutBlock


def eca_kernel_size(channels: int, gamma: float = 2, b: float = 1) -> int:
    """The paper's adaptive kernel size: ``int(|(log2 C + b) / gamma|)``, plus one if even."""
    t = int(abs((math.log2(channels) + b) / gamma))
    return t if t % 2 else t + 1


class ChannelConv(nn.Conv1d):
    """The 1-D convolution across channels shared by ECA and CBAM's ``channel="conv"``: a
    ``Conv1d(1, 1, k)`` without bias, so its weight is ``conv.weight`` as in timm's
    ``EcaModule`` (``ecaresnet50d`` checkpoints load as they are)."""

    def __init__(self, channels: int, kernel_size: int | None, gamma: float, b: float) -> None:
        check.positive_number("gamma", gamma)
        check.number("b", b)
        if kernel_size is None:
            kernel_size = eca_kernel_size(channels, gamma, b)
        else:
            check.odd_int("kernel_size", kernel_size)
        super().__init__(1, 1, kernel_size, padding=(kernel_size - 1) // 2, bias=False)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        """(N, C, 1, 1) or (N, 1, 1, C) pooled descriptors -> logits of the same shape."""
        flat = pooled.reshape(pooled.shape[0], 1, -1)
        return self._conv_forward(flat, self.weight, self.bias).reshape(pooled.shape)


class EfficientChannelAttention(LayoutBlock):
    """ECA block (arXiv 1910.03151, Fig. 2): (B, C, H, W) -> (B, C, H, W), or the same on
    (B, H, W, C) or (B, N, C) tokens (``layout``; the grid's shape is not needed)."""

    uses_grid = False

    def __init__(
        self,
        channels: int,
        kernel_size: int | None = None,
        gamma: float = 2,
        b: float = 1,
        init: str = "paper",
        layout: str = NCHW,
        prefix: int = 0,
        grid: tuple[int, int] | None = None,
        order: list[int] | None = None,
    ) -> None:
        super().__init__(layout, prefix, grid, order)
        channels = check.channel_count(channels)
        self.init = check.init_mode(init)
        self.conv = ChannelConv(channels, kernel_size, gamma, b)
        self.blend = make_blend(init)

    def attend(self, x: torch.Tensor) -> torch.Tensor:
        return gate(x, self.conv(x.mean(self.map_dims, keepdim=True)), self.blend)
