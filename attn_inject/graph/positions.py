"""Where a block can go: the positions of SENet's integration study (Table 14) and more.

Each position yields candidates: an edge of the graph (a producer node and the consumers
that will read the block's output instead, ``None`` for all of them) with a name, a channel
count, and the reason it cannot take an NCHW block, if any::

    residual_branch   x ─┬─ conv..bn ─[B]─ (+) ─      the papers' placement
                         └────────────────┘
    pre_block         x ─┬─[B]─ conv..bn ── (+) ─     SE-PRE
    identity_branch   x ─┬─ conv..bn ────── (+) ─     SE-Identity
                         └──────────[B]────┘
    post_block        x ── residual unit ── (+) ─[B]─ SE-POST
    stage_output      ... last node of each stage ─[B]─
    conv_output       conv ─ norm ─ act ─[B]─
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import fx

from . import ops
from .analysis import AnnotatedGraph
from .layout import NCHW, NHWC, layout_of
from .residual import ResidualUnit, find_residual_units
from .shapes import tensor_meta
from .stages import Stage

__all__ = ["Candidate", "feature_map_problem", "find_candidates", "stage_index"]


@dataclass(frozen=True)
class Candidate:
    """A place a block could go: after ``node``, read by ``consumers`` (``None``: all users)."""

    position: str
    name: str
    node: fx.Node
    consumers: tuple[fx.Node, ...] | None
    anchor: fx.Node
    skip_reason: str | None = None

    @property
    def layout(self) -> str | None:
        return layout_of(self.node)

    @property
    def channels(self) -> int | None:
        t = tensor_meta(self.node)
        if t is None or t.dim() != 4:
            return None
        layout = self.layout
        if layout == NCHW:
            return int(t.shape[1])
        return int(t.shape[3]) if layout == NHWC else None

    @property
    def edge(self) -> tuple[str, tuple[str, ...] | None]:
        consumers = None if self.consumers is None else tuple(n.name for n in self.consumers)
        return self.node.name, consumers


def feature_map_problem(
    node: fx.Node, input_shape: tuple[int, ...], channels_last: str = "skip"
) -> str | None:
    """Why ``node``'s output cannot take a block, or None if it can. NHWC maps can when
    ``channels_last == "adapt"`` (the block is then wrapped in permutes)."""
    t = tensor_meta(node)
    if t is None or t.dim() != 4:
        return f"node {node.name!r} does not produce a 4-D feature map"
    layout = layout_of(node)
    if layout == NHWC and channels_last != "adapt":
        return f"node {node.name!r} is a channels-last (NHWC) map; the rule has channels_last: skip"
    if layout not in (NCHW, NHWC):
        return f"node {node.name!r} is a 4-D tensor of unknown layout, not a known feature map"
    h, w = (t.shape[2], t.shape[3]) if layout == NCHW else (t.shape[1], t.shape[2])
    if h * w == 1 and input_shape[-2] * input_shape[-1] > 1:
        return f"node {node.name!r} is a 1x1 pooled descriptor, not a spatial feature map"
    return None


def _candidate(
    graph, position, name, node, consumers, anchor, reason=None, channels_last="skip"
) -> Candidate:
    reason = reason or feature_map_problem(node, graph.input_shape, channels_last)
    return Candidate(position, name, node, consumers, anchor, reason)


def _residual(
    graph: AnnotatedGraph, units: list[ResidualUnit], position: str, channels_last: str
) -> list[Candidate]:
    out = []
    for unit in units:
        name = graph.name_of(unit.add)
        if position == "residual_branch":
            out.append(
                _candidate(
                    graph,
                    position,
                    name,
                    unit.branch_end,
                    (unit.branch_next,),
                    unit.add,
                    channels_last=channels_last,
                )
            )
        elif position == "identity_branch":
            out.append(
                _candidate(
                    graph, position, name, unit.shortcut, (unit.add,), unit.add, channels_last=channels_last
                )
            )
        elif position == "post_block":
            out.append(
                _candidate(graph, position, name, unit.add, None, unit.add, channels_last=channels_last)
            )
        elif position == "pre_block":
            reason = (
                None
                if unit.branch_entries
                else (f"the residual branch of {name!r} shares its first op with the shortcut")
            )
            out.append(
                _candidate(
                    graph, position, name, unit.fork, unit.branch_entries, unit.add, reason, channels_last
                )
            )
    return out


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


def find_candidates(
    graph: AnnotatedGraph, position: str, stages: list[Stage], channels_last: str = "skip"
) -> list[Candidate]:
    """Every candidate for ``position``, in graph order."""
    if position == "stage_output":
        found = [
            _candidate(
                graph,
                position,
                s.name,
                s.node,
                None,
                s.node,
                s.skip_reason and f"stage {s.index} {s.skip_reason}",
                channels_last,
            )
            for s in stages
        ]
    elif position == "conv_output":
        found = _conv_outputs(graph, channels_last)
    else:
        found = _residual(graph, find_residual_units(graph), position, channels_last)
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
