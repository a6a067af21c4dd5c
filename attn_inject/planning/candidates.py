"""Where a block can go: the positions of SENet's integration study (Table 14) and more.

Each position yields candidates: an edge of the graph (a producer node and the consumers
that will read the block's output instead, ``None`` for all of them) with a name, a channel
count, the layout a block there acts on (an NCHW map, an NHWC map, or tokens of a proven
grid), and the reason it cannot take a block, if any::

    residual_branch   x ─┬─ conv..bn ─[B]─ (+) ─      the papers' placement
                         └────────────────┘
    pre_block         x ─┬─[B]─ conv..bn ── (+) ─     SE-PRE
    identity_branch   x ─┬─ conv..bn ────── (+) ─     SE-Identity
                         └──────────[B]────┘
    post_block        x ── residual unit ── (+) ─[B]─ SE-POST
    stage_output      ... last node of each stage ─[B]─
    conv_output       conv ─ norm ─ act ─[B]─

In a transformer block the attention and the MLP are two residual branches:
``x + attn(norm1(x))`` and ``x + mlp(norm2(x))``; their outputs are tokens of the same grid as
the residual stream they are added to.

Each position is a handler in one table, as torch.ao's backend_config maps a pattern to how
it is handled: ``handler(query)`` yields the candidates of a :class:`PositionQuery` (the
annotated graph, its stages, the rule's ``channels_last``). A new position is one
registration away, and then a recipe's ``at:`` may name it::

    >>> def after_every_pool(query):
    ...     for node in query.graph.nodes:
    ...         if node.op == "call_module" and isinstance(query.graph.module(node), nn.MaxPool2d):
    ...             yield query.candidate(str(node.target), node)
    >>> register_position("after_pool", after_every_pool)
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

from torch import fx

from ..core.errors import InputError, InputTypeError
from ..core.layouts import BLOCK_LAYOUTS, CHANNEL_DIM, Layout
from ..core.messages import shown
from ..core.views import NamesView, unregistered
from ..graph import ops
from ..graph.analysis import AnnotatedGraph, scope_of
from ..graph.layout import NCHW, NHWC, NLC, TokenGrid, grid_of, layout_of
from ..graph.residual import ResidualUnit, find_residual_units
from ..graph.shapes import tensor_meta
from ..graph.stages import Stage

__all__ = [
    "POSITIONS",
    "TOKENS",
    "Candidate",
    "PositionHandler",
    "PositionQuery",
    "block_layout",
    "feature_map_problem",
    "find_candidates",
    "position_names",
    "register_position",
    "stage_index",
    "unregister_position",
]

TOKENS = Layout.TOKENS  # the block layout of (B, prefix + H' * W', C) tokens, or (B, T, N, C) reordered


def block_layout(node: fx.Node) -> str | None:
    """The layout a block on ``node``'s output acts on: "NCHW", "NHWC", "tokens" (B, N, C)
    of a proven grid, or None."""
    t, layout = tensor_meta(node), layout_of(node)
    if t is None:
        return None
    if t.dim() == 4 and layout in (NCHW, NHWC):
        return layout
    grid = grid_of(node)
    if layout == NLC and grid is not None and (t.dim() == 3 or (t.dim() == 4 and grid.order is not None)):
        return TOKENS
    return None


@dataclass(frozen=True)
class Candidate:
    """A place a block could go: after ``node``, read by ``consumers`` (``None``: all users).
    ``like``: a node whose layout (and token grid) ``node``'s output shares, when its own is
    not known but the position proves it (a residual branch added to its stream)."""

    position: str
    name: str
    node: fx.Node
    consumers: tuple[fx.Node, ...] | None
    anchor: fx.Node
    skip_reason: str | None = None
    like: fx.Node | None = None

    @property
    def layout(self) -> str | None:
        return block_layout(self.like or self.node)

    @property
    def token_grid(self) -> TokenGrid | None:
        return grid_of(self.like or self.node) if self.layout == TOKENS else None

    @property
    def channels(self) -> int | None:
        t = tensor_meta(self.node)
        dim = CHANNEL_DIM.get(Layout(self.layout)) if self.layout in BLOCK_LAYOUTS else None
        return None if t is None or dim is None else int(t.shape[dim])

    @property
    def edge(self) -> tuple[str, tuple[str, ...] | None]:
        consumers = None if self.consumers is None else tuple(n.name for n in self.consumers)
        return self.node.name, consumers


def _tokens_problem(node: fx.Node, like: fx.Node, channels_last: str) -> str | None:
    t, layout, grid = tensor_meta(node), layout_of(like), grid_of(like)
    if layout != NLC:
        what = "(B, C, N) tokens" if layout else "a 3-D tensor of unknown layout"
        return f"node {node.name!r} is {what}, not (B, N, C) tokens of a known grid"
    if grid is None:
        size = "" if t is None else f" (B, {', '.join(str(n) for n in t.shape[1:])})"
        return (
            f"node {node.name!r} is{size} tokens whose count is not proven to be "
            "prefix + H' x W' of a patch grid (pooled, windowed or reordered tokens)"
        )
    if channels_last == "skip":
        return f"node {node.name!r} is tokens ({grid} grid, channels last); the rule has channels_last: skip"
    if grid.height * grid.width == 1:
        return f"node {node.name!r} has a 1x1 token grid, not spatial positions"
    return None


def feature_map_problem(
    node: fx.Node, input_shape: tuple[int, ...], channels_last: str = "native", like: fx.Node | None = None
) -> str | None:
    """Why ``node``'s output cannot take a block, or None if it can: an NCHW map, an NHWC
    map or (B, N, C) tokens of a proven grid (the layout of ``like`` when given, else the
    node's own), the last two unless ``channels_last == "skip"``."""
    t, like = tensor_meta(node), like or node
    if t is not None and (t.dim() == 3 or (t.dim() == 4 and layout_of(like) == NLC)):
        return _tokens_problem(node, like, channels_last)
    if t is None or t.dim() != 4:
        return f"node {node.name!r} does not produce a 4-D feature map or (B, N, C) tokens"
    layout = layout_of(like)
    if layout == NHWC and channels_last == "skip":
        return f"node {node.name!r} is a channels-last (NHWC) map; the rule has channels_last: skip"
    if layout not in (NCHW, NHWC):
        return f"node {node.name!r} is a 4-D tensor of unknown layout, not a known feature map"
    h, w = (t.shape[2], t.shape[3]) if layout == NCHW else (t.shape[1], t.shape[2])
    if h * w == 1 and input_shape[-2] * input_shape[-1] > 1:
        return f"node {node.name!r} is a 1x1 pooled descriptor, not a spatial feature map"
    return None


def _candidate(
    graph, position, name, node, consumers, anchor, reason=None, channels_last="native", like=None
) -> Candidate:
    reason = reason or feature_map_problem(node, graph.input_shape, channels_last, like)
    return Candidate(position, name, node, consumers, anchor, reason, like)


def _stream(unit: ResidualUnit) -> fx.Node | None:
    """The addition, when the branch's output layout is not known but is the residual
    stream's: the two are added element by element, so they share their layout (Swin's
    windowed attention reversed to a map, a transformer's attention output on the tokens'
    grid)."""
    end, add = tensor_meta(unit.branch_end), tensor_meta(unit.add)
    if block_layout(unit.branch_end) is not None or end is None or add is None or end.shape != add.shape:
        return None
    return unit.add if block_layout(unit.add) is not None else None


@dataclass(frozen=True)
class PositionQuery:
    """What a position handler reads: the annotated graph, its stages, the position's name and
    the rule's ``channels_last`` ("native", "permute" or "skip")."""

    graph: AnnotatedGraph
    stages: tuple[Stage, ...]
    position: str
    channels_last: str = "native"

    def candidate(
        self,
        name: str,
        node: fx.Node,
        consumers: tuple[fx.Node, ...] | None = None,
        anchor: fx.Node | None = None,
        reason: str | None = None,
        like: fx.Node | None = None,
    ) -> Candidate:
        """A candidate after ``node`` named ``name``, read by ``consumers`` (None: every user);
        ``anchor`` (default: ``node``) places it in the graph; ``reason``, or the reason
        ``node``'s output is no feature map or tokens (:func:`feature_map_problem`), skips it."""
        return _candidate(
            self.graph,
            self.position,
            name,
            node,
            consumers,
            node if anchor is None else anchor,
            reason,
            self.channels_last,
            like,
        )


PositionHandler = Callable[[PositionQuery], Iterable[Candidate]]


def _unit_name(graph: AnnotatedGraph, unit: ResidualUnit) -> str:
    # the innermost module of the addition: the block, not a container it happens to end
    return scope_of(unit.add) or graph.name_of(unit.add)


def _residual_branch(query: PositionQuery) -> list[Candidate]:
    graph = query.graph
    return [
        query.candidate(
            _unit_name(graph, unit), unit.branch_end, (unit.branch_next,), unit.add, like=_stream(unit)
        )
        for unit in find_residual_units(graph)
    ]


def _identity_branch(query: PositionQuery) -> list[Candidate]:
    graph = query.graph
    return [
        query.candidate(_unit_name(graph, unit), unit.shortcut, (unit.add,), unit.add)
        for unit in find_residual_units(graph)
    ]


def _post_block(query: PositionQuery) -> list[Candidate]:
    graph = query.graph
    return [
        query.candidate(_unit_name(graph, unit), unit.add, None, unit.add)
        for unit in find_residual_units(graph)
    ]


def _pre_block(query: PositionQuery) -> list[Candidate]:
    out = []
    for unit in find_residual_units(query.graph):
        name = _unit_name(query.graph, unit)
        reason = (
            None
            if unit.branch_entries
            else (f"the residual branch of {name!r} shares its first op with the shortcut")
        )
        out.append(query.candidate(name, unit.fork, unit.branch_entries, unit.add, reason))
    return out


def _stage_outputs(query: PositionQuery) -> list[Candidate]:
    return [
        query.candidate(s.name, s.node, None, s.node, s.skip_reason and f"stage {s.index} {s.skip_reason}")
        for s in query.stages
    ]


def _conv_outputs(graph: AnnotatedGraph, channels_last: str) -> list[Candidate]:
    out = []
    for node in graph.nodes:
        if not ops.is_conv(node, graph.root):
            continue
        end = node
        for follows in (ops.is_norm, ops.is_activation):
            if len(end.users) == 1:
                user = next(iter(end.users))
                if follows(user, graph.root):
                    end = user
        name = str(node.target) if node.op == "call_module" else graph.name_of(node)
        out.append(_candidate(graph, "conv_output", name, end, None, node, channels_last=channels_last))
    return out


def _conv_output(query: PositionQuery) -> list[Candidate]:
    return _conv_outputs(query.graph, query.channels_last)


# The positions, in the order an error lists them: each name and its handler.
_POSITIONS: dict[str, PositionHandler] = {
    "residual_branch": _residual_branch,
    "pre_block": _pre_block,
    "post_block": _post_block,
    "identity_branch": _identity_branch,
    "stage_output": _stage_outputs,
    "conv_output": _conv_output,
}
BUILT_IN = frozenset(_POSITIONS)


def position_names() -> tuple[str, ...]:
    """Every position a recipe's ``at:`` may name: the built-in ones, then the registered."""
    return tuple(_POSITIONS)


POSITIONS = NamesView(position_names)  # live: follows register_position and unregister_position


def register_position(name: str, handler: PositionHandler, *, overwrite: bool = False) -> PositionHandler:
    """Make ``handler(query) -> [Candidate, ...]`` the position called ``name`` (a recipe's
    ``at: name``). The handler reads a :class:`PositionQuery` and builds each candidate with
    ``query.candidate(...)``; the candidates are sorted into graph order."""
    if not isinstance(name, str) or not name.isidentifier():
        raise InputError(f"position name {shown(name)} must be a Python identifier")
    if not callable(handler):
        raise InputTypeError(f"position handler for {name!r} must be callable, got {type(handler).__name__}")
    if name in BUILT_IN:
        raise InputError(f"position {name!r} is built in and cannot be replaced; register another name")
    if name in _POSITIONS and not overwrite:
        raise InputError(f"position {name!r} is already registered; pass overwrite=True to replace it")
    _POSITIONS[name] = handler
    return handler


def unregister_position(name: str) -> PositionHandler:
    """Remove position ``name`` that :func:`register_position` added, and return its handler.
    The built-in positions stay."""
    return unregistered(_POSITIONS, name, BUILT_IN, "position", "positions")


def find_candidates(
    graph: AnnotatedGraph, position: str, stages: list[Stage], channels_last: str = "native"
) -> list[Candidate]:
    """Every candidate for ``position``, in graph order."""
    handler = _POSITIONS.get(position)
    if handler is None:
        raise InputError(f"unknown position {shown(position)}; allowed: {', '.join(_POSITIONS)}")
    found = list(handler(PositionQuery(graph, tuple(stages), position, channels_last)))
    wrong = [c for c in found if not isinstance(c, Candidate)]
    if wrong:
        raise InputTypeError(
            f"position {position!r} gave a {type(wrong[0]).__name__}; a handler yields query.candidate(...)"
        )
    return sorted(found, key=lambda c: graph.index[c.node])


def stage_index(graph: AnnotatedGraph, stages: list[Stage], node: fx.Node) -> int | None:
    """The stage a node belongs to: the first whose end is at or after it (None: the head,
    or the stem before the first stage's resolution)."""
    i = graph.index[node]
    for stage in stages:
        if i <= graph.index[stage.node]:
            if stage.index == 0:
                t, first = tensor_meta(node), tensor_meta(stage.node)
                if (
                    t is not None
                    and first is not None
                    and t.dim() == 4
                    and first.dim() == 4
                    and layout_of(node) == NCHW
                    and t.shape[2] > first.shape[2]
                ):
                    return None
            return stage.index
    return None
