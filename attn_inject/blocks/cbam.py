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
:mod:`attn_inject.blocks.gate`; not in paper). ``layout`` (see :mod:`attn_inject.blocks.layout`):
on a channels-last map the channel MLP is linear on the last dimension and the spatial map
pools over it; on tokens both maps are over the H' x W' grid.
"""

from __future__ import annotations

import torch
from torch import nn

from . import params as check
from .eca import ChannelConv
from .gate import gate, make_blend
from .layout import NCHW, LayoutBlock
from .squeeze_excite import channel_layer, hidden_width


class ChannelAttention(nn.Module):
    """CBAM's channel attention map over average- and max-pooled descriptors (Eq. 2), through
    a shared MLP. ``excite`` maps the pooled descriptors to logits."""

    def __init__(
        self, channels: int, ratio: float, bias: bool, divisor: int | None, init: str, channels_last: bool
    ) -> None:
        super().__init__()
        hidden = hidden_width(channels, ratio, divisor)
        self.fc1 = channel_layer(channels, hidden, bias, channels_last)
        self.act = nn.ReLU(inplace=True)
        self.fc2 = channel_layer(hidden, channels, bias, channels_last)
        self.blend = make_blend(init)
        self.dims = [1, 2] if channels_last else [2, 3]

    def excite(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(pooled)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Both descriptors go through the shared layers as one batch of 2B, stacked on a new
        # leading axis and split on it again: no size of 2 is ever read off the batch
        # dimension, so the block exports with a dynamic batch (torch.export, ONNX).
        pooled = torch.stack([x.mean(self.dims, keepdim=True), x.amax(self.dims, keepdim=True)])
        logits = self.excite(pooled.flatten(0, 1))
        avg_logits, max_logits = logits.unflatten(0, (2, -1)).unbind(0)
        return gate(x, avg_logits + max_logits, self.blend)


class ConvChannelAttention(ChannelAttention):
    """CBAM's channel map with ECA's 1-D convolution instead of the MLP (``channel="conv"``,
    not in paper)."""

    def __init__(
        self, channels: int, kernel_size: int | None, gamma: float, b: float, init: str, channels_last: bool
    ) -> None:
        nn.Module.__init__(self)
        self.channel_conv = ChannelConv(channels, kernel_size, gamma, b)
        self.blend = make_blend(init)
        self.dims = [1, 2] if channels_last else [2, 3]

    def excite(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.channel_conv(pooled)


class SpatialAttention(nn.Module):
    """CBAM's spatial attention map from the channel-wise ``[max, mean]`` maps (Eq. 3)."""

    def __init__(self, kernel_size: int, norm: bool, init: str, channels_last: bool) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 1, kernel_size, padding=kernel_size // 2, bias=False)
        self.norm = nn.BatchNorm2d(1) if norm else nn.Identity()
        self.blend = make_blend(init)
        self.channel_dim = 3 if channels_last else 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (B, 2, H, W) whatever the layout: the maps are small, the feature map is not moved.
        maps = torch.stack([x.amax(self.channel_dim), x.mean(self.channel_dim)], dim=1)
        logits = self.norm(self.conv(maps))
        if self.channel_dim == 3:
            logits = logits.reshape(x.shape[0], x.shape[1], x.shape[2], 1)  # (B, 1, H, W) as (B, H, W, 1)
        return gate(x, logits, self.blend)


class CBAM(LayoutBlock):
    """CBAM block (arXiv 1807.06521, Fig. 1-2): (B, C, H, W) -> (B, C, H, W), or the same on
    (B, H, W, C) or (B, N, C) tokens (``layout``; the spatial map needs the grid's shape)."""

    uses_grid = True

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
        layout: str = NCHW,
        prefix: int = 0,
        grid: tuple[int, int] | None = None,
        order: list[int] | None = None,
    ) -> None:
        super().__init__(layout, prefix, grid, order)
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
        self.channel: ChannelAttention
        if channel == "fc":
            self.channel = ChannelAttention(channels, ratio, bias, divisor, init, self.channels_last)
        else:
            self.channel = ConvChannelAttention(channels, kernel_size, gamma, b, init, self.channels_last)
        self.spatial = SpatialAttention(spatial_kernel, spatial_norm, init, self.channels_last)

    def attend(self, x: torch.Tensor) -> torch.Tensor:
        return self.spatial(self.channel(x))
