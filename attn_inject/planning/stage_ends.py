"""Stage ends that the graph's stage finder (:mod:`attn_inject.graph.stages`) cannot see by
itself, read off the same annotated graph:

- a backbone that returns every stage's map (a segmentation-models-pytorch encoder:
  :func:`attn_inject.models.targets.returns_its_stages`) says where its stages end by what
  it returns: each returned feature map at reduction >= 4 is a stage end
  (:func:`returned_stage_entries`, given to ``find_stages`` as timm's ``feature_info`` is);
- a stage whose stretch runs on into a head that reads its map as other tokens (open_clip's
  ``ModifiedResNet``: the attention pool flattens layer4's map into sequence-first tokens,
  attends, and keeps the class token) ends at its last feature map, not at the head's
  output (:func:`ends_at_maps`)::

      layer4 -> reshape (B, C, HW) -> permute (HW, B, C) -> cat, add, attention -> x[0]
      ^ the stage ends here               (no layout: the stretch used to end at x[0])
"""

from __future__ import annotations

from dataclasses import replace

from torch import fx, nn

from ..core.layouts import CHANNEL_DIM
from ..graph.analysis import AnnotatedGraph
from ..graph.layout import NCHW, NCL, NHWC, NLC, grid_of, grid_size, layout_of
from ..graph.shapes import tensor_meta
from ..graph.stages import MIN_STAGE_REDUCTION, Stage, output_dominators

__all__ = ["declared_backbone_entries", "ends_at_maps", "returned_stage_entries"]


def _is_map(node: fx.Node) -> bool:
    """A 4-D feature map of known layout."""
    t = tensor_meta(node)
    return t is not None and t.dim() == 4 and layout_of(node) in (NCHW, NHWC)


def _is_grid_tokens(node: fx.Node) -> bool:
    """(B, N, C) tokens of a proven patch grid."""
    return layout_of(node) == NLC and grid_of(node) is not None


def _is_stage_value(node: fx.Node) -> bool:
    return _is_map(node) or _is_grid_tokens(node)


def _past_the_stage(stage: Stage) -> bool:
    """A stage end that is the stage's value moved on into a head's layout: a skipped end
    with no layout at all (a head's output), or tokens turned channels-first, (B, C, N), for a
    1-D pool (transformers' ``SwinModel``: ``layernorm`` -> ``transpose(1, 2)`` -> pooler)."""
    t = tensor_meta(stage.node)
    if t is not None and t.dim() == 3 and layout_of(stage.node) == NCL:
        return True
    return stage.skip_reason is not None and (t is None or t.dim() not in (3, 4))


def _channels(node: fx.Node) -> int:
    t, layout = tensor_meta(node), layout_of(node)
    assert t is not None and layout is not None
    return int(t.shape[CHANNEL_DIM[layout]])


def _reduction(graph: AnnotatedGraph, node: fx.Node) -> int | None:
    hw = grid_size(node)
    if hw is None or hw[0] == 0:
        return None
    return max(1, round(graph.input_shape[-2] / hw[0]))


def _returned(graph: AnnotatedGraph) -> list[fx.Node]:
    """The values the graph returns, in the order it returns them."""
    output = next((n for n in reversed(graph.nodes) if n.op == "output"), None)
    return list(output.all_input_nodes) if output is not None else []


def returned_stage_entries(graph: AnnotatedGraph) -> list[dict] | None:
    """``feature_info``-like entries (module, num_chs, reduction) for a graph that returns
    two or more feature maps at reduction >= 4, each the output of a module: one entry per
    map, in graph order (a dilated encoder's last stages share a resolution and are still
    two stages). None for any other graph (one such map, or a returned map that is not a
    module's output), whose stages the dominators find."""
    ends: list[fx.Node] = []
    for node in _returned(graph):
        if not _is_map(node) or not graph.depends_on_input(node) or node in ends:
            continue
        reduction = _reduction(graph, node)
        if reduction is None or reduction < MIN_STAGE_REDUCTION:
            continue
        if graph.module_outputs.get(graph.name_of(node)) is not node:
            return None
        ends.append(node)
    if len(ends) < 2:
        return None
    return [
        {"module": graph.name_of(node), "num_chs": _channels(node), "reduction": _reduction(graph, node)}
        for node in sorted(ends, key=graph.index.__getitem__)
    ]


def declared_backbone_entries(model: nn.Module, graph: AnnotatedGraph) -> list[dict] | None:
    """``feature_info``-like entries for a model built from a layer list that names its
    backbone (Ultralytics: ``model.yaml["backbone"]``, the layers ``model.model[0..n-1]``,
    run by the model's own forward through each layer's ``f`` routing): in the backbone, the
    last layer at each reduction >= 4 ends a stage (YOLO's P2 to P5). The neck and the heads
    after the backbone are no stage. None for any other model."""
    spec, layers = getattr(model, "yaml", None), getattr(model, "model", None)
    if not isinstance(spec, dict) or not isinstance(spec.get("backbone"), list):
        return None
    if not isinstance(layers, nn.Sequential) or not all(hasattr(m, "f") for m in layers):
        return None
    count = min(len(spec["backbone"]), len(layers))
    last: dict[int, fx.Node] = {}  # reduction -> the last backbone layer's output at it
    for i in range(count):
        node = graph.module_outputs.get(f"model.{i}")
        if node is None or not _is_map(node):
            continue
        reduction = _reduction(graph, node)
        if reduction is not None and reduction >= MIN_STAGE_REDUCTION:
            last[reduction] = node
    if not last:
        return None
    return [
        {"module": graph.name_of(node), "num_chs": _channels(node), "reduction": reduction}
        for reduction, node in sorted(last.items())
    ]


def ends_at_maps(graph: AnnotatedGraph, stages: list[Stage]) -> list[Stage]:
    """``stages`` with each end that is neither a feature map nor tokens (a head's output,
    reached through a map moved into a layout the graph does not know) moved back to the
    stage's last feature map on every path to the output, at the stage's reduction."""
    dominators = output_dominators(graph)
    position = {node: i for i, node in enumerate(dominators)}
    moved = []
    for stage in stages:
        if not _past_the_stage(stage) or stage.node not in position:
            moved.append(stage)
            continue
        earlier = reversed(dominators[: position[stage.node]])
        end = next(
            (n for n in earlier if _is_stage_value(n) and _reduction(graph, n) == stage.reduction),
            None,
        )
        if end is None:
            moved.append(stage)
            continue
        name = graph.name_of(end)
        moved.append(replace(stage, name=name, node=end, channels=_channels(end), skip_reason=None))
    return moved
