"""Stages: the stretches of a network at one resolution, and the node that ends each.

timm models say where their stages end (``feature_info``; entries at reduction >= 4 are
used). For any other model, a stage is a stretch of the graph at one spatial resolution at
stride >= 4, ending at its last node through which every path to the output passes (a
dominator of the output), before the next downsampling or the global pool. In torchvision's
ResNet-50 those are the outputs of layer1..layer4, not the first 1x1 conv of the next stage,
which the downsampling shortcut bypasses. Tokens of a proven grid are at the grid's
resolution, so a single-resolution vision transformer's blocks make one stretch (timm's
``feature_info`` lists each block as a stage, and those are used when given).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

from torch import fx

from ..core.layouts import CHANNEL_DIM
from ..core.values import is_int
from . import ops
from .analysis import AnnotatedGraph, module_stack
from .layout import NCHW, NHWC, NLC, grid_of, grid_size, layout_of
from .shapes import tensor_meta

__all__ = ["Stage", "find_stages", "output_dominators", "stage_entries"]

MIN_STAGE_REDUCTION = 4


@dataclass(frozen=True)
class Stage:
    """A stage's last node. ``skip_reason`` says why no block can go there, if so."""

    index: int
    name: str
    node: fx.Node
    channels: int | None
    reduction: int
    skip_reason: str | None = None


def _deepest_output(graph: AnnotatedGraph) -> fx.Node | None:
    """The output value computed last: the model's output, or of several (a backbone
    returning every stage's map), the deepest one."""
    output = next((n for n in reversed(graph.nodes) if n.op == "output"), None)
    if output is None:
        return None
    values = [n for n in output.all_input_nodes if graph.depends_on_input(n)]
    return max(values, key=graph.index.__getitem__) if values else None


def output_dominators(graph: AnnotatedGraph) -> list[fx.Node]:
    """Nodes on every path from the model input to its (deepest) output, in graph order."""
    idom: dict[int, int] = {}
    source = None
    for node in graph.nodes:
        i = graph.index[node]
        if not graph.from_input >> i & 1:
            continue
        if node.op == "placeholder":
            if source is None:
                source = i
                idom[i] = i
            continue
        preds = [graph.index[p] for p in node.all_input_nodes if graph.index[p] in idom]
        if not preds:
            continue
        dom = preds[0]
        for p in preds[1:]:
            a, b = dom, p
            while a != b:
                while a > b:
                    a = idom[a]
                while b > a:
                    b = idom[b]
            dom = a
        idom[i] = dom
    sink = _deepest_output(graph)
    if sink is None or graph.index[sink] not in idom:
        return []
    chain = [sink]
    i = idom[graph.index[sink]]
    while True:
        chain.append(graph.nodes[i])
        if idom[i] == i:
            break
        i = idom[i]
    return chain[::-1]


def _reduction(graph: AnnotatedGraph, node: fx.Node) -> int | None:
    hw = grid_size(node)
    if hw is None or hw[0] == 0:
        return None
    return max(1, round(graph.input_shape[-2] / hw[0]))


def _channels(node: fx.Node) -> int | None:
    """The channels of a 4-D map, or of (B, N, C) tokens (also (B, T, N, C)); else None."""
    t, layout = tensor_meta(node), layout_of(node)
    if t is None or layout is None:
        return None
    known = t.dim() == 4 if layout in (NCHW, NHWC) else layout == NLC and t.dim() in (3, 4)
    return int(t.shape[CHANNEL_DIM[layout]]) if known else None


def _check(node: fx.Node, expected_channels: int | None = None) -> str | None:
    """Why the stage's end cannot take a block, other than being channels-last or tokens
    (which the positions judge, with the rule), or None."""
    t = tensor_meta(node)
    if t is not None and t.dim() == 3:
        pass  # tokens: whether they are (B, N, C) of a proven grid is the position's to say
    elif t is None or t.dim() != 4:
        return f"ends at node {node.name!r}, which is not a 4-D feature map or (B, N, C) tokens"
    elif layout_of(node) is None:
        return f"ends at node {node.name!r}, a 4-D tensor of unknown layout"
    channels = _channels(node)
    if expected_channels is not None and channels is not None and channels != expected_channels:
        return (
            f"feature_info says {expected_channels} channels, the graph has {channels} at node {node.name!r}"
        )
    return None


def stage_entries(feature_info) -> list[dict]:
    """timm ``feature_info`` entries (a list of dicts or a ``FeatureInfo``) at reduction >= 4.

    A features-only model's ``FeatureInfo`` lists every feature of the model it wraps, with
    ``out_indices`` naming those it returns; the layers after the last of them are cut off or
    pruned to ``nn.Identity`` (``features_only=True, out_indices=(1, 2)``), so their entries,
    which no longer describe a stage the model runs, are left out."""
    try:
        entries = [dict(e) for e in feature_info]
    except TypeError:
        entries = [dict(e) for e in getattr(feature_info, "info", [])]
    indices = getattr(feature_info, "out_indices", None)
    if isinstance(indices, (tuple, list)) and indices and all(is_int(i) for i in indices):
        last = max(i % len(entries) for i in indices) if entries else -1
        entries = entries[: last + 1]
    return [e for e in entries if e.get("reduction", 0) >= MIN_STAGE_REDUCTION]


def _module_prefix(graph: AnnotatedGraph, modules: list[str]) -> str | None:
    """The path under which every one of ``modules`` is a module with an output in the graph:
    '' when they are the model's own; a child's path (with its dot) when the model wraps the
    one they name (timm's ``FeatureGetterNet`` lists ``stages.0`` of its ``model``); else None.
    """
    if all(m in graph.module_outputs for m in modules):
        return ""
    first = "." + modules[0]
    prefixes = sorted(
        {path[: -len(modules[0])] for path in graph.module_outputs if path.endswith(first)}, key=len
    )
    return next((p for p in prefixes if all(p + m in graph.module_outputs for m in modules)), None)


def _stages_from_feature_info(graph: AnnotatedGraph, feature_info) -> list[Stage] | None:
    entries = stage_entries(feature_info)
    if not entries:
        return None
    prefix = _module_prefix(graph, [str(e.get("module", "")) for e in entries])
    if prefix is None:
        return None
    stages: list[Stage] = []
    for entry in entries:
        name = prefix + str(entry.get("module", ""))
        node = graph.module_outputs[name]
        stages.append(
            Stage(
                len(stages),
                name,
                node,
                _channels(node),
                int(entry["reduction"]),
                _check(node, entry.get("num_chs")),
            )
        )
    return stages


def _input_size(node: fx.Node) -> tuple[int, int] | None:
    inputs = node.all_input_nodes
    return grid_size(inputs[0]) if inputs else None


def _straddles_downsampling(
    graph: AnnotatedGraph, node: fx.Node, hw: tuple[int, int], next_hw: tuple[int, int] | None
) -> bool:
    """Whether ``node`` lies in a module that takes a map at ``hw`` and returns one at the next
    resolution: the first layers of the next stage's downsampling block (an expansion conv, a
    transition's norm), which belong to that stage, not this one."""
    if next_hw is None:
        return False
    for path in module_stack(node):
        first, last = graph.module_inputs.get(path), graph.module_outputs.get(path)
        if last is None or last is node or first is None:
            continue
        if _input_size(first) == hw and grid_size(last) == next_hw:
            return True
    return False


def _stages_from_dominators(graph: AnnotatedGraph) -> list[Stage]:
    groups: list[list] = []  # [resolution, last node, reduction]
    dominators = output_dominators(graph)
    resolutions: list[tuple[int, int]] = []
    for node in dominators:
        hw = grid_size(node)
        if hw is not None and (not resolutions or resolutions[-1] != hw):
            resolutions.append(hw)
    next_resolution = {a: b for a, b in itertools.pairwise(resolutions)}
    for node in dominators:
        source = node.all_input_nodes[0] if node.all_input_nodes else None
        # a map flattened into the tokens of its grid is not pooled (a patch embedding)
        pooled = source is not None and ops.is_global_pool(node, tensor_meta(source), tensor_meta(node))
        if pooled and grid_of(node) is None and groups:
            break
        if groups and ops.is_adaptive_pool(node, graph.root):
            break  # a pool to a fixed size starts the head, even where it keeps the resolution
        hw = grid_size(node)
        moved = ops.is_data_movement(node) or ops.moves_data_only(node)  # e.g. a window reversed
        if hw is None and source is not None and grid_of(source) is not None and groups and not moved:
            break  # tokens pooled or sliced off their grid: the head
        if hw is None:
            if groups:
                groups[-1][1] = node
            continue
        reduction = _reduction(graph, node)
        if reduction is None or reduction < MIN_STAGE_REDUCTION:
            continue
        if _straddles_downsampling(graph, node, hw, next_resolution.get(hw)):
            continue
        if groups and groups[-1][0] == hw:
            groups[-1][1] = node
        else:
            groups.append([hw, node, reduction])
    ends = [(_as_map(node), reduction) for _, node, reduction in groups]
    return [
        Stage(i, graph.name_of(node), node, _channels(node), reduction, _check(node))
        for i, (node, reduction) in enumerate(ends)
    ]


def _as_map(node: fx.Node) -> fx.Node:
    """A stage end that is only its map flattened into tokens (a patch embedding's
    ``proj(x).flatten(2).transpose(1, 2)``) whose grid follows the input size: the map
    itself. Same values, and a block on a map needs no grid at run time."""
    end = node
    while ops.is_data_movement(end) and (grid := grid_of(end)) is not None and grid.dynamic:
        source = end.all_input_nodes[0] if end.all_input_nodes else None
        if source is None or sum(1 for u in source.users if not ops.reads_shape_only(u)) != 1:
            break
        t = tensor_meta(source)
        if t is not None and t.dim() == 4 and layout_of(source) in (NCHW, NHWC):
            return source
        end = source
    return node


def find_stages(graph: AnnotatedGraph, feature_info=None) -> list[Stage]:
    """The model's stages, from timm's ``feature_info`` when given and resolvable."""
    if feature_info is not None:
        stages = _stages_from_feature_info(graph, feature_info)
        if stages is not None:
            return stages
    return _stages_from_dominators(graph)
