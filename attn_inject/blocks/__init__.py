"""Attention blocks and their registry.

Every block maps (B, C, H, W) to (B, C, H, W) and takes ``channels`` as its first argument,
so one registry builds any of them::

    >>> block = create_block("se", 256, ratio=16)
    >>> register_block("my_gate", MyGate)        # then ``kind: my_gate`` in a recipe

The built-in blocks also act natively on channels-last maps and on token grids (see
:mod:`attn_inject.blocks.layout`); ``layout_kwargs(point)`` gives the arguments for the
layout of an insertion point::

    >>> create_block(point.block.kind, point.channels, **point.block.params, init="identity",
    ...              **layout_kwargs(point))
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, Protocol

import torch
from torch import nn

from .cbam import CBAM
from .eca import EfficientChannelAttention, eca_kernel_size
from .layout import LAYOUT_PARAMS, LAYOUTS, NCHW, NHWC, TOKENS, LayoutBlock
from .params import BlockParamError
from .squeeze_excite import SqueezeExcite, hidden_width

__all__ = [
    "CBAM",
    "LAYOUTS",
    "BlockParamError",
    "EfficientChannelAttention",
    "LayoutBlock",
    "SqueezeExcite",
    "accepts_layout",
    "accepts_order",
    "block_param_names",
    "check_block_params",
    "create_block",
    "eca_kernel_size",
    "hidden_width",
    "layout_kwargs",
    "list_blocks",
    "register_block",
    "uses_grid",
]

BlockFactory = Callable[..., nn.Module]

_BLOCKS: dict[str, BlockFactory] = {
    "se": SqueezeExcite,
    "eca": EfficientChannelAttention,
    "cbam": CBAM,
}


def register_block(name: str, factory: BlockFactory, *, overwrite: bool = False) -> BlockFactory:
    """Make ``factory(channels, **params)`` available as block kind ``name``.

    The factory must return a module mapping (B, C, H, W) to (B, C, H, W). Blocks that accept
    an ``init`` argument receive the recipe's ``init`` ("identity" or "paper").
    """
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"block name {name!r} must be a Python identifier")
    if not callable(factory):
        raise TypeError(f"block factory for {name!r} must be callable, got {type(factory).__name__}")
    if name in _BLOCKS and not overwrite:
        raise ValueError(f"block {name!r} is already registered; pass overwrite=True to replace it")
    _BLOCKS[name] = factory
    return factory


def list_blocks() -> list[str]:
    """Names of the registered block kinds."""
    return sorted(_BLOCKS)


def block_factory(kind: str) -> BlockFactory:
    try:
        return _BLOCKS[kind]
    except KeyError:
        raise ValueError(
            f"unknown block kind {kind!r}; registered kinds: {', '.join(list_blocks())}"
        ) from None


def accepts_init(kind: str) -> bool:
    """Whether the block kind takes an ``init`` argument (all built-in blocks do)."""
    signature = inspect.signature(block_factory(kind))
    return "init" in signature.parameters or any(
        p.kind is inspect.Parameter.VAR_KEYWORD for p in signature.parameters.values()
    )


def accepts_layout(kind: str) -> bool:
    """Whether the block kind takes a ``layout`` argument (all built-in blocks do); a block
    that does not is only given NCHW maps."""
    signature = inspect.signature(block_factory(kind))
    return "layout" in signature.parameters or any(
        p.kind is inspect.Parameter.VAR_KEYWORD for p in signature.parameters.values()
    )


def accepts_order(kind: str) -> bool:
    """Whether the block kind takes an ``order`` argument: tokens holding the grid in
    another order than raster (all built-in blocks do)."""
    signature = inspect.signature(block_factory(kind))
    return "order" in signature.parameters or any(
        p.kind is inspect.Parameter.VAR_KEYWORD for p in signature.parameters.values()
    )


def uses_grid(kind: str) -> bool:
    """Whether block ``kind`` on tokens needs the grid's H' x W' shape (CBAM's spatial map),
    so that the grid must be fixed; SE and ECA only pool over the grid tokens. True for a
    block that does not say (``uses_grid = False`` on its class)."""
    return bool(getattr(block_factory(kind), "uses_grid", True))


class HasLayout(Protocol):
    """What :func:`layout_kwargs` reads from an insertion point."""

    @property
    def layout(self) -> str: ...
    @property
    def prefix(self) -> int: ...
    @property
    def grid(self) -> tuple[int, int] | None: ...
    @property
    def order(self) -> tuple[int, ...] | None: ...


def layout_kwargs(point: HasLayout) -> dict[str, Any]:
    """The block arguments for the layout of ``point`` (an ``InsertionPoint``):

    - ``{}`` for an NCHW map (every block's default, so a block without a ``layout``
      argument can take it);
    - ``{"layout": "NHWC"}`` for a channels-last map (B, H, W, C);
    - ``{"layout": "tokens", "prefix": P, "grid": (H, W)}`` for tokens (B, P + H*W, C),
      with ``"order"`` (each token's raster position) where the tokens hold the grid in
      another order and the block uses the grid.
    """
    if point.layout == NCHW:
        return {}
    if point.layout == NHWC:
        return {"layout": NHWC}
    if point.layout == TOKENS and point.grid is not None:
        kwargs: dict[str, Any] = {
            "layout": TOKENS,
            "prefix": int(point.prefix),
            "grid": (int(point.grid[0]), int(point.grid[1])),
        }
        if point.order is not None:
            kwargs["order"] = [int(i) for i in point.order]
        return kwargs
    raise ValueError(
        f"insertion point layout {point.layout!r} (grid {point.grid}) is not one a block can take; "
        f"allowed: {', '.join(LAYOUTS)} (tokens with a grid)"
    )


def create_block(kind: str, channels: int, **params: Any) -> nn.Module:
    """Build block ``kind`` for ``channels`` channels, e.g. ``create_block("cbam", 64)``."""
    return block_factory(kind)(channels, **params)


def block_param_names(kind: str) -> list[str] | None:
    """The parameters block ``kind`` accepts besides ``channels`` and ``init`` (None: any)."""
    parameters = list(inspect.signature(block_factory(kind)).parameters.values())[1:]
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        return None
    return [p.name for p in parameters if p.name != "init" and p.name not in LAYOUT_PARAMS]


def check_block_params(kind: str, params: dict[str, Any]) -> None:
    """Raise ``BlockParamError`` unless block ``kind`` builds with ``params``.

    Unknown names are reported with the allowed ones; values are checked by building the
    block once on the meta device, which allocates nothing.
    """
    allowed = block_param_names(kind)
    for name, value in params.items():
        if name in LAYOUT_PARAMS:
            raise BlockParamError(
                name, value, "set by the planner from the graph (the layout at each point), not by a recipe"
            )
        if allowed is not None and name not in allowed:
            raise BlockParamError(
                name, value, f"one of the parameters of block {kind!r}: {', '.join(allowed)}"
            )
    try:
        with torch.device("meta"):
            create_block(kind, 64, **params)
    except BlockParamError:
        raise
    except Exception as error:  # a user block's own checks, or torch refusing a size
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ValueError(f"block {kind!r} cannot be built with {params}: {first_line}") from None
