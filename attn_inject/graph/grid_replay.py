"""Tokens moved by reshapes and permutes, followed by replaying the data movement.

Nest's blocks of (B, T, N, C), Hiera's unrolled order, windows reversed to a map: a chain of
data-movement ops from a tensor of known layout is replayed on an index tensor that numbers
each element by its batch, grid position and channel (:func:`_encoding`). Where the result
keeps batch and channels and holds each grid position once, its tokens are that grid in a
known ``order`` (or the map itself, NHWC, when the order is raster; NCHW when the channels
come first). A patchify (B, N, p * p * C) gives the grid at stride p, and Hiera's token
pooling (``amax`` over a token dimension) the coarser grid, when every group is an aligned
window. Anything else that moves tokens proves nothing (``None``).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx

from . import ops
from .node_layout import (
    CHANNEL_DIM,
    NCHW,
    NHWC,
    NLC,
    Reading,
    TokenGrid,
    grid_of,
    grid_size,
    layout_of,
    spatial_size,
)
from .shapes import tensor_meta

__all__ = ["MAX_REPLAY_ELEMENTS", "REPLAY_DEPTH", "pooled", "replayed"]

REPLAY_DEPTH = 16  # data-movement ops followed back from a node to a tensor of known layout
MAX_REPLAY_ELEMENTS = 1 << 24  # a larger tensor is not replayed (its int64 numbering: 128 MB)


class _NotReplayable(Exception):
    pass


@dataclass(frozen=True)
class _Numbering:
    """The sizes an :func:`_encoding` numbers: batch, grid positions, channels."""

    batch: int
    count: int
    channels: int


@dataclass(frozen=True)
class _Chain:
    """Data-movement ops from ``source`` (a tensor whose elements can be numbered) to the
    node read, that node first."""

    steps: tuple[fx.Node, ...]
    source: fx.Node
    numbering: _Numbering


class _Channels(enum.Enum):
    """Where a replayed result holds the source's channels."""

    LAST = "last"  # (B, *tokens, C): tokens or an NHWC map
    FIRST = "first"  # (B, C, H, W): a map put back channels first
    PATCHES = "patches"  # (B, N, p * p * C): a patchify


def _encodable(node: fx.Node) -> _Numbering | None:
    """The numbering of a map, or of tokens of a fixed grid without a prefix, whose elements
    :func:`_encoding` can number."""
    t, layout = tensor_meta(node), layout_of(node)
    if t is None or t.dim() < 3:
        return None
    if layout in (NCHW, NHWC) and t.dim() == 4:
        h, w = spatial_size(node) or (0, 0)
        return _Numbering(int(t.shape[0]), h * w, int(t.shape[CHANNEL_DIM[layout]]))
    grid = grid_of(node)
    if layout == NLC and grid is not None and grid.prefix == 0 and not grid.dynamic:
        return _Numbering(int(t.shape[0]), grid.height * grid.width, int(t.shape[-1]))
    return None


def _encoding(node: fx.Node, numbering: _Numbering) -> torch.Tensor:
    """Every element of an :func:`_encodable` node's output (its batch, grid positions and
    channels) numbered ``(batch * positions + grid position) * channels + channel``."""
    t, layout = tensor_meta(node), layout_of(node)
    assert t is not None
    batch, count, channels = numbering.batch, numbering.count, numbering.channels
    b = torch.arange(batch).view(batch, *[1] * (t.dim() - 1))
    if layout == NCHW:
        position = torch.arange(count).view(1, 1, *t.shape[2:])
        channel = torch.arange(channels).view(1, channels, 1, 1)
    else:
        grid = grid_of(node)
        position = torch.arange(count) if grid is None else grid.positions()
        position = position.view(1, *t.shape[1:-1], 1)
        channel = torch.arange(channels)
    return ((b * count + position) * channels + channel).expand(*t.shape).contiguous()


def _replay(node: fx.Node, values: dict[fx.Node, torch.Tensor]) -> torch.Tensor:
    """Run a data-movement node on the encodings in ``values`` (constants from the shape
    probe for its other arguments)."""

    def value(arg: fx.Node) -> Any:
        if arg in values:
            return values[arg]
        known = arg.meta.get("val")
        if isinstance(known, (int, torch.Size)) or (
            isinstance(known, (tuple, list)) and all(isinstance(i, int) for i in known)
        ):
            return known
        raise _NotReplayable(arg.name)

    args = fx.node.map_arg(node.args, value)
    kwargs = fx.node.map_arg(node.kwargs, value)
    if node.op == "call_method":
        return getattr(args[0], str(node.target))(*args[1:], **kwargs)
    assert callable(node.target)
    return node.target(*args, **kwargs)


def _is_moved_numbering(encoded: torch.Tensor, total: int) -> bool:
    """Whether a replayed result holds elements of the :func:`_encoding` of ``total``
    elements, each at most once: a chain that changed values (``* 2``) or repeated elements
    moved no data."""
    flat = encoded.flatten()
    if encoded.dtype != torch.long or flat.numel() > total:
        return False
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= total):
        return False
    seen = torch.zeros(total, dtype=torch.bool)
    seen[flat] = True
    return int(seen.sum()) == flat.numel()


def _decoded(encoded: torch.Tensor, count: int, channels: int) -> tuple[torch.Tensor, ...]:
    """(batch, grid position, channel) of every element of an :func:`_encoding`."""
    rest = encoded // channels
    return rest // count, rest % count, encoded % channels


def _batch_in_place(b: torch.Tensor) -> bool:
    return torch.equal(b, torch.arange(b.shape[0]).view(-1, *[1] * (b.dim() - 1)).expand_as(b))


def _positions_of(encoded: torch.Tensor, numbering: _Numbering) -> torch.Tensor | None:
    """The grid position of each token of a replayed (B, *tokens, C) encoding, when batch
    and channels are where they were and every token holds one position."""
    batch, count, channels = numbering.batch, numbering.count, numbering.channels
    if encoded.dim() < 3 or encoded.shape[0] != batch or encoded.shape[-1] != channels:
        return None
    b, position, channel = _decoded(encoded, count, channels)
    if not torch.equal(channel, torch.arange(channels).expand_as(channel)) or not _batch_in_place(b):
        return None
    tokens = position[0, ..., 0]
    if not torch.equal(position, tokens[None, ..., None].expand_as(position)):
        return None
    return tokens


def _as_layout(tokens: torch.Tensor, height: int, width: int, rank: int) -> Reading | None:
    """The layout of a (B, *tokens, C) tensor whose tokens hold these grid positions: an
    NHWC map, tokens in raster order, or tokens in another order; None unless each position
    of the height x width grid is held once."""
    count = height * width
    flat = tokens.flatten()
    if rank not in (3, 4) or flat.numel() != count:
        return None
    raster = torch.arange(count)
    if not torch.equal(flat.sort().values, raster):
        return None
    if torch.equal(flat, raster):
        if rank == 4 and tuple(tokens.shape) == (height, width):
            return Reading(NHWC)
        if rank == 3:
            return Reading(NLC, TokenGrid(0, height, width))
    return Reading(NLC, TokenGrid(0, height, width, order=tuple(int(i) for i in flat)))


def _moves(node: fx.Node) -> bool:
    return ops.is_data_movement(node) or ops.moves_data_only(node)


def _chain_to_encodable(node: fx.Node) -> _Chain | None:
    """The data-movement ops from ``node`` back to the nearest tensor that
    :func:`_encodable` numbers, at most :data:`REPLAY_DEPTH` of them."""
    steps, current = [], node
    for _ in range(REPLAY_DEPTH):
        if not _moves(current):
            return None
        steps.append(current)
        source = current.args[0] if current.args else None
        if not isinstance(source, fx.Node):
            return None
        numbering = _encodable(source)
        if numbering is not None:
            return _Chain(tuple(steps), source, numbering)
        current = source
    return None


def _channels_of(out: torch.Tensor, numbering: _Numbering) -> _Channels | None:
    """Where the node's output can hold the source's channels; None where the batch moved or
    the channels are split or moved (neither tokens of the grid nor its map)."""
    channels = numbering.channels
    if out.shape[0] != numbering.batch:
        return None
    if out.shape[-1] == channels:
        return _Channels.LAST
    if out.dim() == 4 and out.shape[1] == channels:
        return _Channels.FIRST
    if out.dim() == 3 and out.shape[-1] % channels == 0:
        return _Channels.PATCHES
    return None


def _replayed_encoding(chain: _Chain) -> torch.Tensor | None:
    """The chain replayed on its source's encoding, when it only moved elements."""
    values = {chain.source: _encoding(chain.source, chain.numbering)}
    try:
        for step in reversed(chain.steps):
            values[step] = _replay(step, values)
    except (_NotReplayable, RuntimeError, TypeError, ValueError, IndexError):
        return None
    encoded = values[chain.steps[0]]
    source_meta = tensor_meta(chain.source)
    assert source_meta is not None  # _encodable read it
    return encoded if _is_moved_numbering(encoded, source_meta.numel()) else None


def replayed(node: fx.Node) -> Reading | None:
    """The layout of a chain of reshapes / permutes from a tensor of known layout, found by
    replaying the chain on that tensor's :func:`_encoding`."""
    out = tensor_meta(node)
    if out is None or out.dim() not in (3, 4) or not _moves(node):
        return None
    chain = _chain_to_encodable(node)
    if chain is None:
        return None
    source_meta = tensor_meta(chain.source)
    if source_meta is None or source_meta.numel() > MAX_REPLAY_ELEMENTS:
        return None
    where = _channels_of(out, chain.numbering)
    if where is None:
        return None
    encoded = _replayed_encoding(chain)
    if encoded is None:
        return None
    size = grid_size(chain.source) or (0, 0)
    if where is _Channels.PATCHES:
        return _patches(encoded, chain.numbering, size)
    if where is _Channels.FIRST:  # a map put back as (B, C, H, W): NCHW when its positions are raster
        tokens = _positions_of(encoded.movedim(1, -1), chain.numbering)
        moved = None if tokens is None else _as_layout(tokens, *size, 4)
        return Reading(NCHW) if moved == Reading(NHWC) else None
    tokens = _positions_of(encoded, chain.numbering)
    return None if tokens is None else _as_layout(tokens, *size, out.dim())


def _patches(encoded: torch.Tensor, numbering: _Numbering, size: tuple[int, int]) -> Reading | None:
    """Tokens (B, N, K) of a patchify (NaFlex's ``batch_patchify``: (B, C, H, W) viewed as
    p x p patches, permuted and flattened): the grid at stride p when every element of the
    source is held once, batch in place, and each token holds every channel of one aligned
    window."""
    height, width = size
    batch, count, channels = numbering.batch, numbering.count, numbering.channels
    if encoded.numel() != batch * count * channels or count != height * width:
        return None  # with each element at most once: unless every element is held
    b, position, _ = _decoded(encoded, count, channels)
    if encoded.shape[0] != batch or not _batch_in_place(b):
        return None
    if not torch.equal(position, position[:1].expand_as(position)):
        return None
    return _windowed(position[0], height, width, per_position=channels)


def _windowed(groups: torch.Tensor, height: int, width: int, per_position: int = 1) -> Reading | None:
    """The coarse grid of groups of distinct elements (the last dimension; each grid
    position ``per_position`` times) that each fill one aligned window of the same size."""
    rows, columns = groups // width, groups % width
    top, left = rows.amin(-1), columns.amin(-1)
    spans = {
        (int(h), int(w))
        for h, w in zip(
            (rows.amax(-1) - top + 1).flatten(), (columns.amax(-1) - left + 1).flatten(), strict=True
        )
    }
    if len(spans) != 1:
        return None
    ((window_h, window_w),) = spans
    if window_h * window_w * per_position != groups.shape[-1] or window_h * window_w < 2:
        return None  # distinct elements in an aligned box of as many positions: exactly that window
    if height % window_h or width % window_w or bool((top % window_h).any()) or bool((left % window_w).any()):
        return None
    if (height // window_h) * (width // window_w) < 2:
        return None  # one token holding every position is no grid
    coarse_width = width // window_w
    coarse = (top // window_h) * coarse_width + left // window_w
    return _as_layout(coarse, height // window_h, coarse_width, groups.dim() + 1)


def pooled(node: fx.Node) -> Reading | None:
    """Max pooling over one token dimension of reordered tokens (Hiera's
    ``x.view(B, 4, -1, C).amax(dim=1)``): the coarser grid when each pooled group of
    tokens is an aligned window."""
    if not (node.op == "call_method" and node.target == "amax") or len(node.args) > 2:
        return None
    if node.kwargs.get("keepdim", False):
        return None
    source, dim = node.args[0], node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    if not isinstance(source, fx.Node) or layout_of(source) != NLC or not isinstance(dim, int):
        return None
    t, grid = tensor_meta(source), grid_of(source)
    if t is None or grid is None or grid.prefix or grid.dynamic or t.dim() < 4:
        return None
    dim %= t.dim()
    if not 1 <= dim <= t.dim() - 2:
        return None
    groups = grid.positions().view(*t.shape[1:-1]).movedim(dim - 1, -1)
    return _windowed(groups, grid.height, grid.width)
