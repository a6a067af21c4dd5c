"""Which 4-D tensors are NCHW feature maps.

Every node with a 4-D output gets ``meta["layout"]``: ``"NCHW"``, ``"NHWC"`` (after a
``permute(0, 2, 3, 1)``, as inside ConvNeXt or Swin blocks) or ``None`` (unknown). Only
NCHW maps are candidates for a block; a map of unknown layout is never guessed at.
"""
from __future__ import annotations

import operator

import torch
from torch import fx, nn

from . import ops
from .shapes import tensor_meta

__all__ = ["annotate_layouts", "layout_of", "spatial_size"]

NCHW = "NCHW"
NHWC = "NHWC"
TO_NHWC = (0, 2, 3, 1)
TO_NCHW = (0, 3, 1, 2)


def layout_of(node: fx.Node) -> str | None:
    return node.meta.get("layout")


def spatial_size(node: fx.Node) -> tuple[int, int] | None:
    """(H, W) of a node's 4-D output of known layout."""
    t = tensor_meta(node)
    lay = layout_of(node)
    if t is None or t.dim() != 4 or lay is None:
        return None
    return (t.shape[2], t.shape[3]) if lay == NCHW else (t.shape[1], t.shape[2])


def _tensor_inputs(node: fx.Node) -> list[fx.Node]:
    return [n for n in node.all_input_nodes if tensor_meta(n) is not None]


def _infer(node: fx.Node, root: nn.Module) -> str | None:
    out = tensor_meta(node)
    if out is None or out.dim() != 4:
        return None
    if node.op == "placeholder":
        return NCHW
    if node.op == "get_attr":
        return None
    if ops.is_conv(node, root):
        return NCHW
    inputs = _tensor_inputs(node)
    first = inputs[0] if inputs else None
    if ops.is_spatial(node, root):
        return NCHW if first is not None and layout_of(first) == NCHW else None
    if ops.is_permute(node):
        dims = ops.permute_dims(node)
        source = layout_of(node.args[0]) if isinstance(node.args[0], fx.Node) else None
        if source == NCHW and dims == TO_NHWC:
            return NHWC
        if source == NHWC and dims == TO_NCHW:
            return NCHW
        return None
    if ops.is_data_movement(node):
        return _through_data_movement(node)
    if node.op == "call_function" and node.target is operator.getitem:
        source = node.args[0]
        if isinstance(source, fx.Node):
            if tensor_meta(source) is None and source.args and isinstance(source.args[0], fx.Node):
                source = source.args[0]  # an item of chunk()/split()
            t = tensor_meta(source)
            if t is not None and t.dim() == 4:
                return layout_of(source)
        return None
    if node.op == "call_function" and node.target is torch.cat:
        tensors = node.args[0] if node.args else node.kwargs.get("tensors", ())
        layouts = {layout_of(t) for t in tensors if isinstance(t, fx.Node)}
        return layouts.pop() if len(layouts) == 1 else None
    if ops.is_linear(node, root):
        # A linear layer maps the last dimension: channels when the map is NHWC.
        return NHWC if first is not None and layout_of(first) == NHWC else None
    same_shape = {layout_of(n) for n in inputs if tensor_meta(n).shape == out.shape}
    known = same_shape - {None}
    if len(known) == 1:
        return known.pop()
    if node.op == "call_module" and first is not None and layout_of(first) == NCHW:
        name = type(ops.module_of(node, root)).__name__.lower()
        if name.endswith("2d"):
            return NCHW
    return None


def _through_data_movement(node: fx.Node) -> str | None:
    """A view/reshape chain that ends in the shape it started from keeps the start's layout."""
    out_shape = tensor_meta(node).shape
    current = node
    while ops.is_data_movement(current) and not ops.is_permute(current):
        source = current.args[0] if current.args else None
        if not isinstance(source, fx.Node) or tensor_meta(source) is None:
            return None
        t = tensor_meta(source)
        if t.dim() == 4 and layout_of(source) is not None:
            return layout_of(source) if t.shape == out_shape else None
        current = source
    return None


def annotate_layouts(model: nn.Module, graph: fx.Graph) -> None:
    """Write ``meta["layout"]`` on every node (``None`` for what is not a 4-D map)."""
    for node in graph.nodes:
        node.meta["layout"] = _infer(node, model)
