"""Residual additions: ``y = branch(x) + shortcut(x)`` found by graph structure, not by name.

For an addition of two same-shape tensors, the *fork* is the latest node both inputs depend
on (the unit's input ``x``). The input with more convolutions since the fork is the residual
branch, the other the shortcut (identity, or a downsampling conv). Equal convolution counts
mean a merge of two peers (FPN, HRNet fusions), not a residual unit, unless the shortcut is
the fork itself (a conv-free branch such as PoolFormer's pooling mixer).

On the branch side, drop-path, dropout, identity and layer-scale multiplications that sit
just before the addition are stepped over, so a block goes where the paper puts it: after the
branch's last norm, before stochastic depth and layer scale.

Additions of (B, N, C) tokens count too: a transformer block has two residual units, the
attention branch ``x + attn(norm1(x))`` and the MLP branch ``x + mlp(norm2(x))``; neither
branch has a convolution, so the fork itself is the shortcut.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import fx, nn

from . import ops
from .analysis import AnnotatedGraph
from .layout import NLC, layout_of
from .shapes import tensor_meta

__all__ = ["ResidualUnit", "find_residual_units"]

TRANSPARENT_MODULE_NAMES = {"DropPath", "StochasticDepth", "LayerScale", "LayerScale2d", "Identity"}


@dataclass(frozen=True)
class ResidualUnit:
    """One residual addition. ``branch_end -> branch_next`` is the edge where the residual
    branch's last real op hands over to drop-path/layer-scale/the addition."""

    add: fx.Node
    branch: fx.Node
    shortcut: fx.Node
    fork: fx.Node
    branch_end: fx.Node
    branch_next: fx.Node
    branch_entries: tuple[fx.Node, ...]


def _is_transparent(node: fx.Node, graph: AnnotatedGraph) -> fx.Node | None:
    """If ``node`` only rescales or drops its tensor input, that input; else None."""
    if node.op == "call_module":
        module = graph.module(node)
        if isinstance(module, (nn.Identity, nn.modules.dropout._DropoutNd)) or (
            type(module).__name__ in TRANSPARENT_MODULE_NAMES
        ):
            arg = node.args[0] if node.args else None
            return arg if isinstance(arg, fx.Node) else None
        return None
    if node.op in ("call_function", "call_method") and getattr(node.target, "__name__", node.target) in (
        "mul",
        "mul_",
        "drop_path",
        "stochastic_depth",
    ):
        tensors = [a for a in node.args if isinstance(a, fx.Node)]
        dependent = [a for a in tensors if graph.depends_on_input(a)]
        if len(dependent) == 1:
            return dependent[0]
    return None


def find_residual_units(graph: AnnotatedGraph) -> list[ResidualUnit]:
    units = []
    for node in graph.nodes:
        if not ops.is_add(node) or len(node.args) < 2:
            continue
        a, b = node.args[0], node.args[1]
        if not (isinstance(a, fx.Node) and isinstance(b, fx.Node)):
            continue
        ta, tb = tensor_meta(a), tensor_meta(b)
        if ta is None or tb is None or ta.shape != tb.shape:
            continue
        if ta.dim() not in (3, 4) or (ta.dim() == 3 and layout_of(node) not in (NLC, None)):
            continue
        if not (graph.depends_on_input(a) and graph.depends_on_input(b)):
            continue
        fork = graph.common_ancestor(a, b)
        if fork is None:
            continue
        convs_a, convs_b = graph.convs_between(fork, a), graph.convs_between(fork, b)
        if convs_a != convs_b:
            branch, shortcut = (a, b) if convs_a > convs_b else (b, a)
        elif b is fork and a is not fork:
            branch, shortcut = a, b
        elif a is fork and b is not fork:
            branch, shortcut = b, a
        else:
            continue
        end, nxt = branch, node
        while len(end.users) == 1:
            inner = _is_transparent(end, graph)
            if inner is None or inner is fork:
                break
            end, nxt = inner, end
        entries = tuple(
            user
            for user in fork.users
            if user is not node
            and (user is branch or graph.is_ancestor(user, branch))
            and not (user is shortcut or graph.is_ancestor(user, shortcut))
        )
        units.append(ResidualUnit(node, branch, shortcut, fork, end, nxt, entries))
    return units
