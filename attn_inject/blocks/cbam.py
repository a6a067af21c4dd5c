"""Convolutional Block Attention Module (Woo et al., "CBAM", arXiv 1807.06521).

Channel attention, then spatial attention (Eq. 1):

- channel: ``Mc = sigmoid(MLP(avgpool(x)) + MLP(maxpool(x)))``, one MLP of width ``C / ratio``
  (r = 16) shared by both pooled descriptors (Eq. 2);
- spatial: ``Ms = sigmoid(conv_kxk([max_c(x'), mean_c(x')]))``, a k x k convolution (k = 7)
  without bias over the channel-wise max and mean maps (Eq. 3), concatenated ``[max, mean]``
  as in the official code (the paper writes ``[avg; max]``).

Departures, each an option: ``channel="conv"`` replaces the MLP by ECA's 1-D convolution
shared over both descriptors (not in paper); ``spatial_norm=True`` adds the BatchNorm the
official code puts after the spatial convolution (not in paper); ``divisor`` rounds the MLP
width like timm (not in paper); ``init="identity"`` blends each map towards one (see
:mod:`attn_inject.blocks.gate`; not in paper).
"""

from __future__ import annotations

import torch
from torch import nn

from . import params as check
from .eca import ChannelConv
from .gate import gate, make_blend
from .squeeze_excite import hidden_width


class ChannelAttention(nn.Module):
    """CBAM's channel attention map over average- and max-pooled descriptors (Eq. 2)."""

    def __init__(
        self,
        channels: int,
        kind: str,
        ratio: float,
        bias: bool,
        divisor: int | None,
        kernel_size: int | None,
        gamma: float,
        b: float,
        init: str,
    ) -> None:
        super().__init__()
        self.kind = kind
        if kind == "fc":
            hidden = hidden_width(channels, ratio, divisor)
            self.fc1 = nn.Conv2d(channels, hidden, 1, bias=bias)
            self.act = nn.ReLU(inplace=True)
            self.fc2 = nn.Conv2d(hidden, channels, 1, bias=bias)
        else:
            self.channel_conv = ChannelConv(channels, kernel_size, gamma, b)
        self.blend = make_blend(init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Both descriptors go through the shared layers as one batch of 2B.
        pooled = torch.cat([x.mean((2, 3), keepdim=True), x.amax((2, 3), keepdim=True)])
        if self.kind == "fc":
            logits = self.fc2(self.act(self.fc1(pooled)))
        else:
            logits = self.channel_conv(pooled)
        avg_logits, max_logits = logits.chunk(2)
        return gate(x, avg_logits + max_logits, self.blend)


class SpatialAttention(nn.Module):
    """CBAM's spatial attention map from the channel-wise ``[max, mean]`` maps (Eq. 3)."""

    def __init__(self, kernel_size: int, norm: bool, init: str) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 1, kernel_size, padding=kernel_size // 2, bias=False)
        self.norm = nn.BatchNorm2d(1) if norm else nn.Identity()
        self.blend = make_blend(init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        maps = torch.cat([x.amax(1, keepdim=True), x.mean(1, keepdim=True)], dim=1)
        return gate(x, self.norm(self.conv(maps)), self.blend)


class CBAM(nn.Module):
    """CBAM block (arXiv 1807.06521, Fig. 1-2): (B, C, H, W) -> (B, C, H, W)."""

    def __init__(
        self,
        channels: int,
        ratio: float = 16,
        bias: bool = True,
        divisor: int | None = None,
        spatial_kernel: int = 7,
        channel: str = "fc",
        kernel_size: int | None = None,
        gamma: float = 2,
        b: float = 1,
        spatial_norm: bool = False,
        init: str = "paper",
    ) -> None:
        super().__init__()
        channels = check.channel_count(channels)
        check.ratio("ratio", ratio)
        check.boolean("bias", bias)
        if divisor is not None:
            check.positive_int("divisor", divisor)
        check.choice("spatial_kernel", spatial_kernel, (3, 5, 7))
        check.choice("channel", channel, ("fc", "conv"))
        check.boolean("spatial_norm", spatial_norm)
        check.positive_number("gamma", gamma)
        check.number("b", b)
        if kernel_size is not None:
            check.odd_int("kernel_size", kernel_size)
        self.init = check.init_mode(init)
        self.channel = ChannelAttention(channels, channel, ratio, bias, divisor, kernel_size, gamma, b, init)
        self.spatial = SpatialAttention(spatial_kernel, spatial_norm, init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.spatial(self.channel(x))
