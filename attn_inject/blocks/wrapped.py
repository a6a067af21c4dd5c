"""Any shape-preserving block on any layout, and function-preserving at insertion.

A block that acts on NCHW maps only (timm's attention modules, a user's registered module)
runs on a channels-last map or a token grid through a permute: the map (or the grid tokens,
prefix tokens passed through, viewed as (B, H', W', C)) is permuted to (B, C, H', W') and
back. A block without a blend of its own is made function-preserving at
``init="identity"`` by blending its output with its input::

    out = x + blend * (block(x) - x)        blend: one learnable scalar, initialised to 0

so ``out == x`` exactly at insertion and ``blend == 1`` is the block. The blend acts on the
full feature map (a built-in block blends its small attention map instead, see
:mod:`attn_inject.blocks.gate`). Not in any paper.
"""

from __future__ import annotations

import torch
from torch import nn

from . import params as check
from .gate import make_blend
from .layout import NCHW, LayoutBlock

__all__ = ["Blended"]


class Blended(LayoutBlock):
    """``block`` (held as ``self.block``, its own ``state_dict`` keys under that one name) on
    the point's layout, blended with its input at ``init="identity"``."""

    uses_grid = True  # a grid-token point is viewed as a map: its planned grid, or the size given at a call

    def __init__(
        self,
        block: nn.Module,
        init: str = "paper",
        layout: str = NCHW,
        prefix: int = 0,
        grid: tuple[int, int] | None = None,
        order: list[int] | None = None,
    ) -> None:
        super().__init__(layout, prefix, grid, order)
        self.block = block
        self.init = check.init_mode(init)
        self.blend = make_blend(init)

    def attend(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            out = self.block(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        else:
            out = self.block(x)
        if self.blend is None:
            return out
        return torch.lerp(x, out.to(x.dtype), self.blend)
