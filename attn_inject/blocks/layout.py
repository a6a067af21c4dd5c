"""The tensor layouts a block acts on natively, with no permute of the feature map.

- ``"NCHW"``: a convolutional map (B, C, H, W), the papers' layout;
- ``"NHWC"``: a channels-last map (B, H, W, C), as inside ConvNeXt, Swin or MambaOut blocks:
  pooling over dimensions 1 and 2, the channel MLP as a linear layer on the last dimension;
- ``"tokens"``: a transformer's tokens (B, N, C) with ``N = prefix + H' * W'``: ``prefix``
  class / register / distillation tokens in front of the H' x W' patch grid in raster order.
  The block acts on the grid tokens and passes the prefix tokens through unchanged:
  squeezing over the grid tokens is the papers' global average pooling over spatial
  positions (not in the papers, which only treat maps). A block that needs the grid's shape
  (``uses_grid``: CBAM's spatial convolution) views the grid tokens (no copy) as a
  (B, H', W', C) map; one that does not (SE, ECA) pools over the token dimension, so it
  also runs at another input size.

  Tokens may also hold the grid in another ``order`` (token i holds raster position
  ``order[i]``, as after Hiera's unrolling) and span more than one dimension (Nest's
  (B, T, N, C) blocks), with no prefix: SE and ECA pool over all of them, a block that needs
  the grid gathers the tokens into raster order and puts its output back in theirs.

:class:`LayoutBlock` holds the layout and does the token bookkeeping; a block implements
``attend`` for an NCHW map, an NHWC one (``self.channels_last``), or (B, N', C) grid tokens
(pooling over ``self.map_dims``). Everything here compiles with ``torch.jit.script``.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from ..core.layouts import BLOCK_LAYOUTS, Layout
from ..core.values import is_int
from .params import BlockParamError

__all__ = [
    "LAYOUTS",
    "LAYOUT_PARAMS",
    "NCHW",
    "NHWC",
    "TOKENS",
    "LayoutBlock",
    "check_layout",
]

NCHW, NHWC, TOKENS = Layout.NCHW, Layout.NHWC, Layout.TOKENS
LAYOUTS = BLOCK_LAYOUTS
LAYOUT_PARAMS = ("layout", "prefix", "grid", "order")  # set by the planner from the graph, never by a recipe


def check_layout(
    layout: Any, prefix: Any, grid: Any, uses_grid: bool = True, order: Any = None
) -> tuple[Layout, int, tuple[int, int], list[int] | None]:
    """The validated ``(layout, prefix, grid, order)``; grid is (0, 0) for a map layout, and
    for tokens given no grid when the block does not use one."""
    if not isinstance(layout, str) or layout not in LAYOUTS:
        raise BlockParamError("layout", layout, "one of " + ", ".join(repr(a) for a in LAYOUTS))
    layout = Layout(layout)
    if not is_int(prefix) or prefix < 0:
        raise BlockParamError("prefix", prefix, "a non-negative integer (tokens before the grid)")
    if layout != TOKENS:
        if prefix or grid is not None or order is not None:
            raise BlockParamError(
                "layout", layout, "'tokens' when prefix, grid or order is given (maps have none)"
            )
        return layout, 0, (0, 0), None
    if grid is None and not uses_grid and order is None:
        return layout, prefix, (0, 0), None
    if not isinstance(grid, (tuple, list)) or len(grid) != 2 or not all(is_int(s) and s > 0 for s in grid):
        raise BlockParamError("grid", grid, "two positive integers (H', W') for layout='tokens'")
    size = (int(grid[0]), int(grid[1]))
    return layout, prefix, size, _checked_order(order, prefix, size[0] * size[1])


def _checked_order(order: Any, prefix: int, count: int) -> list[int] | None:
    if order is None:
        return None
    valid = (
        not prefix
        and isinstance(order, (tuple, list))
        and len(order) == count
        and all(is_int(i) for i in order)
        and sorted(order) == list(range(count))
    )
    if not valid:
        allowed = f"a permutation of 0..{count - 1} (the raster position of each grid token), with prefix 0"
        raise BlockParamError("order", order, allowed)
    return [int(i) for i in order]


class LayoutBlock(nn.Module):
    """Base of the built-in blocks: the layout, and the prefix / grid bookkeeping of tokens
    around ``attend``. ``uses_grid``: the block needs the grid's H' x W' shape."""

    uses_grid = True
    grid_at_call = True  # forward takes the grid's height and width, for a grid that follows the input size
    __constants__: ClassVar[list[str]] = ["reordered"]  # TorchScript compiles the gathers only where used

    def __init__(
        self, layout: str, prefix: int, grid: tuple[int, int] | None, order: list[int] | None = None
    ) -> None:
        super().__init__()
        self.layout, self.prefix, self.grid, order = check_layout(
            layout, prefix, grid, type(self).uses_grid, order
        )
        self.channels_last = self.layout != NCHW
        self.tokens = self.layout == TOKENS
        self.grid_view = self.tokens and type(self).uses_grid
        # the spatial dimensions of what ``attend`` gets: H, W of a map, or the grid tokens
        self.map_dims = (
            [1] if self.tokens and not self.grid_view else [1, 2] if self.channels_last else [2, 3]
        )
        # tokens in another order: ``order[i]`` is token i's raster position; ``raster[j]``
        # the token at raster position j (derived from the point, not state: not saved)
        self.reordered = order is not None and self.grid_view
        if self.reordered:
            positions = torch.tensor(order, dtype=torch.long)
            self.register_buffer("order", positions, persistent=False)
            self.register_buffer("raster", torch.argsort(positions), persistent=False)

    def attend(self, x: torch.Tensor) -> torch.Tensor:
        """The block on an NCHW map, an NHWC one (``self.channels_last``) or (B, N', C) grid
        tokens (``self.tokens`` without ``self.grid_view``)."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor, height: int | None = None, width: int | None = None) -> torch.Tensor:
        """The block on ``x``; ``height`` and ``width``: the grid's H' x W' at this call, for
        tokens whose grid follows the input size (the planned grid where not given)."""
        if not self.tokens:
            return self.attend(x)
        shape = x.shape
        x = x.flatten(1, -2)  # tokens over more than one dimension, (B, T, N, C), as (B, T * N, C)
        tokens = x[:, self.prefix :]
        if self.grid_view:
            b, n, c = tokens.shape[0], tokens.shape[1], tokens.shape[2]
            if height is not None and width is not None:
                grid_height, grid_width = height, width
                torch._assert(
                    n == grid_height * grid_width,
                    "the grid's height x width this block was given do not hold its tokens",
                )
            else:
                grid_height, grid_width = self.grid[0], self.grid[1]
                torch._assert(
                    n == grid_height * grid_width,
                    "this block was planned for a token grid of a size the model no longer gives (after "
                    "set_input_size or at another input size): inject into the model as it is now",
                )
            if self.reordered:
                assert isinstance(self.raster, torch.Tensor)
                tokens = tokens.index_select(1, self.raster)
            out = self.attend(tokens.reshape(b, grid_height, grid_width, c)).reshape(b, n, c)
            if self.reordered:
                assert isinstance(self.order, torch.Tensor)
                out = out.index_select(1, self.order)
        else:
            out = self.attend(tokens)
        if self.prefix:
            out = torch.cat([x[:, : self.prefix], out], dim=1)
        return out.reshape(shape)

    def extra_repr(self) -> str:
        if self.layout == TOKENS:
            grid = f", grid={self.grid}" if self.grid != (0, 0) else ""
            order = ", reordered" if self.reordered else ""
            return f"layout={self.layout!r}, prefix={self.prefix}{grid}{order}"
        return "" if self.layout == NCHW else f"layout={self.layout!r}"
