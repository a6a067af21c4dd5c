"""What is known of each node's output: its :class:`Layout` and, for tokens, their
:class:`TokenGrid`, recorded in ``node.meta[META_KEY]`` as a :class:`NodeLayout`.

The rules that infer them are in :mod:`.layout` (and :mod:`.grid_replay` for tokens moved by
reshapes and permutes); this module holds only the record and its readers.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
from torch import fx

from ..core.layouts import CHANNEL_DIM, Layout
from .shapes import tensor_meta

__all__ = [
    "CHANNEL_DIM",
    "META_KEY",
    "TOKEN_DIM",
    "Layout",
    "NodeLayout",
    "Reading",
    "TokenGrid",
    "grid_of",
    "grid_size",
    "layout_of",
    "reading_of",
    "record_of",
    "set_layout",
    "set_reading",
    "spatial_size",
]


NCHW, NHWC, NLC, NCL = Layout.NCHW, Layout.NHWC, Layout.NLC, Layout.NCL
TOKEN_DIM = {NLC: 1, NCL: 2}


@dataclass(frozen=True)
class TokenGrid:
    """Tokens (B, prefix + height * width, C): ``prefix`` tokens, then a height x width grid
    in raster order, or in ``order`` (then without a prefix, and the tokens may span more
    than one dimension: (B, T, N, C) with T * N = height * width). ``dynamic``: the grid's
    size follows the input size (a block with a fixed grid would break at another size);
    ``prefix_varies``: so does the number of tokens
    before it (a block passing a fixed prefix through would take some for grid tokens).
    ``source``: the map of this graph the raster grid was flattened from, whose spatial size
    is the grid's at any input size (where the graph shows one): a block that needs H' x W'
    on a dynamic grid reads them from it at each call."""

    prefix: int
    height: int
    width: int
    dynamic: bool = False
    prefix_varies: bool = False
    order: tuple[int, ...] | None = None  # raster position of each grid token; None: raster
    source: fx.Node | None = field(default=None, compare=False, repr=False)

    @property
    def tokens(self) -> int:
        return self.prefix + self.height * self.width

    def positions(self) -> torch.Tensor:
        """The raster position of each grid token, in token order."""
        count = self.height * self.width
        return torch.arange(count) if self.order is None else torch.tensor(self.order, dtype=torch.long)

    def __str__(self) -> str:
        front = f"{self.prefix} + " if self.prefix else ""
        reordered = " reordered" if self.order is not None else ""
        return f"{front}{self.height}x{self.width}{reordered}"


@dataclass(frozen=True)
class Reading:
    """What a rule proved of one tensor: its layout and, for tokens of a proven grid, the
    grid. A rule that proves nothing returns ``None`` instead of a reading."""

    layout: Layout
    grid: TokenGrid | None = None


META_KEY = "attn_inject_layout"  # the one ``node.meta`` key of what the layout rules infer


@dataclass(frozen=True)
class NodeLayout:
    """What is known of a node's output: its layout, the token grid of tokens, and, for a
    kept-whole module returning a tuple, the layout and grid of each item it returns."""

    kind: Layout | None = None
    grid: TokenGrid | None = None
    returned: tuple[Reading | None, ...] | None = None


def record_of(node: fx.Node) -> NodeLayout:
    return node.meta.get(META_KEY) or NodeLayout()


def set_layout(node: fx.Node, kind: str | None, grid: TokenGrid | None = None) -> None:
    """Record ``kind`` and ``grid`` for ``node`` (what it returns, if known, is kept)."""
    layout = Layout(kind) if kind is not None else None
    node.meta[META_KEY] = replace(record_of(node), kind=layout, grid=grid)


def set_reading(node: fx.Node, reading: Reading | None) -> None:
    """Record ``reading`` for ``node``; ``None``: neither a known map nor known tokens."""
    if reading is None:
        set_layout(node, None)
    else:
        set_layout(node, reading.layout, reading.grid)


def reading_of(node: fx.Node) -> Reading | None:
    """What is known of a node's output as one :class:`Reading`; None when its layout is not."""
    record = record_of(node)
    return None if record.kind is None else Reading(record.kind, record.grid)


def layout_of(node: fx.Node) -> Layout | None:
    return record_of(node).kind


def grid_of(node: fx.Node) -> TokenGrid | None:
    """The token grid of a node's (B, N, C) or (B, C, N) output, when proven."""
    return record_of(node).grid


def spatial_size(node: fx.Node) -> tuple[int, int] | None:
    """(H, W) of a node's 4-D output of known layout."""
    t = tensor_meta(node)
    lay = layout_of(node)
    if t is None or t.dim() != 4 or lay not in (NCHW, NHWC):
        return None
    return (t.shape[2], t.shape[3]) if lay == NCHW else (t.shape[1], t.shape[2])


def grid_size(node: fx.Node) -> tuple[int, int] | None:
    """(H', W') of tokens with a proven grid, else (H, W) of a map of known layout."""
    grid = grid_of(node)
    return (grid.height, grid.width) if grid is not None else spatial_size(node)
