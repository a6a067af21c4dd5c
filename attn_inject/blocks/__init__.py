"""Attention blocks and their registry.

Every block maps (B, C, H, W) to (B, C, H, W) and takes ``channels`` as its first argument,
so one registry builds any of them::

    >>> block = create_block("se", 256, ratio=16)
    >>> register_block("my_gate", MyGate)        # then ``kind: my_gate`` in a recipe

The built-in blocks also act natively on channels-last maps and on token grids (see
:mod:`attn_inject.blocks.layout`); ``layout_kwargs(point)`` gives the arguments for the
layout of an insertion point, and :func:`block_for_point` builds the block of a point::

    >>> block_for_point(
    ...     point.block.kind, point.channels, point.block.params, "identity", layout_kwargs(point))

timm's attention modules are kinds too (``create_block("timm:gc", 256)``, see
:mod:`attn_inject.blocks.timm_attention`); a block without a blend of its own is made
function-preserving at ``init="identity"``, and one that takes NCHW maps only runs on
other layouts through a permute (:mod:`attn_inject.blocks.wrapped`).
"""

from __future__ import annotations

import functools
import inspect
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn

from ..core.deprecation import deprecated_alias
from ..core.errors import InputError, InputTypeError
from ..core.messages import first_line, shown
from ..core.views import unregistered
from .cbam import CBAM
from .eca import EfficientChannelAttention, eca_kernel_size
from .layout import LAYOUT_PARAMS, LAYOUTS, NCHW, NHWC, TOKENS, LayoutBlock
from .params import BlockParamError
from .simam import SimAM
from .squeeze_excite import SqueezeExcite, hidden_width
from .timm_attention import PREFIX as TIMM_PREFIX
from .timm_attention import module_class, parameter_names, timm_block, timm_kind, timm_kinds
from .wrapped import Blended

__all__ = [
    "CBAM",
    "LAYOUTS",
    "Blended",
    "BlockInfo",
    "BlockParamError",
    "EfficientChannelAttention",
    "LayoutBlock",
    "SimAM",
    "SqueezeExcite",
    "accepts_layout",
    "accepts_order",
    "block_for_point",
    "block_param_names",
    "check_block_params",
    "create_block",
    "describe_blocks",
    "eca_kernel_size",
    "hidden_width",
    "layout_kwargs",
    "list_blocks",
    "permutes",
    "register_block",
    "takes_grid_at_call",
    "unregister_block",
    "uses_grid",
]

BlockFactory = Callable[..., nn.Module]

_BLOCKS: dict[str, BlockFactory] = {
    "se": SqueezeExcite,
    "eca": EfficientChannelAttention,
    "cbam": CBAM,
    "simam": SimAM,
}
_BUILT_IN_FACTORIES = dict(_BLOCKS)  # what unregister_block puts back over a replaced built-in kind
BUILT_IN = {
    "se": "Hu et al., Squeeze-and-Excitation Networks, https://arxiv.org/abs/1709.01507",
    "eca": "Wang et al., ECA-Net, https://arxiv.org/abs/1910.03151",
    "cbam": "Woo et al., CBAM, https://arxiv.org/abs/1807.06521",
    "simam": "Yang et al., SimAM, ICML 2021 (PMLR 139)",
}


def register_block(name: str, factory: BlockFactory, *, overwrite: bool = False) -> BlockFactory:
    """Make ``factory(channels, **params)`` available as block kind ``name``.

    The factory must return a module mapping (B, C, H, W) to (B, C, H, W). A factory says
    what it handles by naming it in its signature; ``**kwargs`` says nothing:

    - ``init``: the factory receives the recipe's ``init`` ("identity" or "paper") and its
      block must compute its input exactly at ``"identity"``; a factory without an explicit
      ``init`` parameter is blended with its input there (:class:`Blended`);
    - ``layout`` (with ``prefix``, ``grid``, ``order``): the block is given the point's
      layout; without, it is given NCHW maps, other layouts through a permute.

    ``inject`` proves each block at insertion (:mod:`attn_inject.blocks.proof`): one that
    raises, returns no tensor, changes its input's shape or dtype, is not deterministic in
    eval mode, or does not compute its input at ``init="identity"`` is refused by name.
    """
    if not isinstance(name, str) or not name.isidentifier():
        raise InputError(f"block name {name!r} must be a Python identifier ('timm:' names are timm's kinds)")
    if not callable(factory):
        raise InputTypeError(f"block factory for {name!r} must be callable, got {type(factory).__name__}")
    if name in _BLOCKS and not overwrite:
        raise InputError(f"block {name!r} is already registered; pass overwrite=True to replace it")
    _BLOCKS[name] = factory
    return factory


def unregister_block(name: str) -> BlockFactory:
    """Remove block kind ``name`` that :func:`register_block` added, and return its factory
    (so a test can put the registry back as it was). A built-in kind replaced with
    ``overwrite=True`` gets its own factory back; the built-in kinds and timm's stay."""
    return unregistered(_BLOCKS, name, _BUILT_IN_FACTORIES, "block", "kinds")


def list_blocks() -> list[str]:
    """Names of every block kind: built-in, registered, and the installed timm's offered
    attention kinds (``timm:gc``)."""
    return sorted([*_BLOCKS, *(k.kind for k in timm_kinds() if not k.refused)])


def block_factory(kind: str) -> BlockFactory:
    if kind in _BLOCKS:
        return _BLOCKS[kind]
    if isinstance(kind, str) and kind.startswith(TIMM_PREFIX):
        found = timm_kind(kind)
        if found is not None and found.refused:
            raise InputError(
                f"block kind {shown(kind)} is not offered: timm's {found.module} {found.refused}"
            )
        if found is not None:
            return timm_block(kind)
        offered = ", ".join(k.kind for k in timm_kinds() if not k.refused) or "none"
        raise InputError(
            f"unknown block kind {shown(kind)}: the installed timm has no such attention; it offers {offered}"
        )
    raise InputError(f"unknown block kind {shown(kind)}; registered kinds: {', '.join(list_blocks())}")


def _accepts(kind: str, argument: str) -> bool:
    """Whether block ``kind``'s factory names ``argument`` in its signature (``**kwargs``
    does not count: it declares nothing)."""
    factory = block_factory(kind)
    try:
        return argument in _named_parameters(factory)
    except TypeError:  # a factory that cannot be hashed is read every time
        return argument in _named_parameters.__wrapped__(factory)


@functools.lru_cache(maxsize=256)
def _named_parameters(factory: BlockFactory) -> frozenset[str]:
    """The parameters ``factory``'s signature names, ``**kwargs`` left out (read once per
    factory: a signature costs more than building a small block)."""
    parameters = inspect.signature(factory).parameters.values()
    return frozenset(p.name for p in parameters if p.kind is not inspect.Parameter.VAR_KEYWORD)


def accepts_init(kind: str) -> bool:
    """Whether the block kind's factory has an explicit ``init`` parameter (built-in and timm
    kinds do; a block whose factory has none, ``**kwargs`` included, is blended with its
    input at ``init="identity"``)."""
    return _accepts(kind, "init")


def accepts_layout(kind: str) -> bool:
    """Whether the block kind takes a ``layout`` argument (built-in and timm kinds do); a
    block that does not is given NCHW maps, or other layouts through a permute."""
    return _accepts(kind, "layout")


def accepts_order(kind: str) -> bool:
    """Whether the block kind takes an ``order`` argument: tokens holding the grid in
    another order than raster (built-in and timm kinds do)."""
    return _accepts(kind, "order")


def permutes(kind: str) -> bool:
    """Whether block ``kind`` acts on NCHW maps only, so that it runs on a channels-last map
    or a token grid through a permute (a rule's ``channels_last: permute``): timm's kinds,
    and a registered block whose factory takes no ``layout``."""
    return bool(getattr(block_factory(kind), "permutes", False)) or not accepts_layout(kind)


def uses_grid(kind: str) -> bool:
    """Whether block ``kind`` on tokens needs the grid's H' x W' shape (CBAM's spatial map):
    its planned grid, or on a grid that follows the input size the size given at each call
    (:func:`takes_grid_at_call`); SE and ECA only pool over the grid tokens. True for a block
    that does not say (``uses_grid = False`` on its class)."""
    return bool(getattr(block_factory(kind), "uses_grid", True))


def takes_grid_at_call(kind: str) -> bool:
    """Whether block ``kind`` on tokens takes the grid's height and width at each call
    (``block(x, height, width)``), so it can go on a grid that follows the input size: the
    built-in blocks, timm's kinds, and a registered block run through a permute; a
    registered block with a ``layout`` of its own only where its class says so
    (``grid_at_call = True``) and it takes an ``init`` (one without is blended with its input
    at ``init="identity"`` by a wrapper that would not pass the sizes on)."""
    if not accepts_layout(kind):
        return True
    return bool(getattr(block_factory(kind), "grid_at_call", False)) and accepts_init(kind)


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
    raise InputError(
        f"insertion point layout {point.layout!r} (grid {point.grid}) is not one a block can take; "
        f"allowed: {', '.join(LAYOUTS)} (tokens with a grid)"
    )


def create_block(kind: str, channels: int, **params: Any) -> nn.Module:
    """Build block ``kind`` for ``channels`` channels, e.g. ``create_block("cbam", 64)``,
    ``create_block("timm:gc", 256)``."""
    return block_factory(kind)(channels, **params)


def block_for_point(
    kind: str, channels: int, params: Mapping[str, Any], init: str, layout: Mapping[str, Any]
) -> nn.Module:
    """The block of an insertion point: ``kind`` with ``params``, for ``init`` and the
    point's ``layout`` arguments (:func:`layout_kwargs`). A block that takes no ``init`` is
    blended with its input at ``init="identity"``; one that takes no ``layout`` runs on
    other layouts through a permute (:class:`Blended`, its keys under ``block.``)."""
    native = accepts_layout(kind) or not layout
    takes_init = accepts_init(kind)
    kwargs = dict(params)
    if takes_init:
        kwargs["init"] = init
    if native:
        kwargs.update(layout)
    block = create_block(kind, channels, **kwargs)
    if native and (takes_init or init == "paper"):
        return block
    # a block on its own layout is only blended: the blend is elementwise on any shape
    return Blended(block, "paper" if takes_init else init, **({} if native else layout))


make_block = deprecated_alias(block_for_point, "make_block", since="0.2.0")


@dataclass(frozen=True)
class BlockInfo:
    """A block kind as ``attn-inject blocks`` lists it."""

    kind: str
    source: str  # "built-in", "timm" or "registered"
    paper: str
    parameters: tuple[str, ...] | None  # None: any (the factory takes **kwargs)
    offered: bool = True
    reason: str = ""  # why a timm kind is not offered


def describe_blocks() -> list[BlockInfo]:
    """Every block kind with its source, paper and parameters; timm's kinds that are not
    offered too, with the reason."""
    infos = [
        BlockInfo(
            kind, "built-in" if kind in BUILT_IN else "registered", BUILT_IN.get(kind, ""), _names(kind)
        )
        for kind in sorted(_BLOCKS)
    ]
    for k in timm_kinds():
        if k.refused:
            infos.append(BlockInfo(k.kind, "timm", _timm_paper(k.name), None, False, k.refused))
        else:
            infos.append(BlockInfo(k.kind, "timm", _timm_paper(k.name), parameter_names(k.name)))
    return infos


def _names(kind: str) -> tuple[str, ...] | None:
    names = block_param_names(kind)
    return None if names is None else tuple(names)


def _timm_paper(name: str) -> str:
    """The title line and arXiv address of the docstring of timm's module for kind ``name``."""
    doc = getattr(inspect.getmodule(module_class(name)), "__doc__", None) or ""
    found = re.search(r"https?://arxiv\.org/abs/[\d.]+", doc)
    title = first_line(doc)
    return ", ".join(s for s in (title, found.group(0) if found else "") if s)


def block_param_names(kind: str) -> list[str] | None:
    """The parameters block ``kind`` accepts besides ``channels`` and ``init`` (None: any)."""
    if isinstance(kind, str) and kind.startswith(TIMM_PREFIX):
        block_factory(kind)  # refuses a kind that is not offered
        return list(parameter_names(kind[len(TIMM_PREFIX) :]))
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
        line = first_line(error) or type(error).__name__
        raise InputError(f"block {shown(kind)} cannot be built with {shown(params)}: {line}") from None
