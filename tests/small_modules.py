"""Small hand-built modules the unit tests share."""

from __future__ import annotations

import torch
from torch import nn


class SlotUnit(nn.Module):
    """timm's residual unit built without attention: ``self.se = None``, called when set."""

    def __init__(self, channels: int = 4) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.bn = nn.BatchNorm2d(channels)
        self.se = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn(self.conv(x))
        if self.se is not None:
            y = self.se(y)
        return torch.relu(y + x)
