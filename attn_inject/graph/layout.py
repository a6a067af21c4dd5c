"""Which 4-D tensors are NCHW feature maps.

Every node with a 4-D output gets ``meta["layout"]``: ``"NCHW"``, ``"NHWC"`` (after a
``permute(0, 2, 3, 1)``, as inside ConvNeXt or Swin blocks) or ``None`` (unknown); 3-D
token tensors get ``"NLC"`` (B, H*W, C) or ``"NCL"`` (B, C, H*W) when they come from a
feature map by flatten / reshape / transpose, so a vision transformer's tokens reshaped back
to a map (Swin, PiT, DaViT, SAM) are known maps again. Only NCHW maps (and NHWC ones, where
a rule adapts) are candidates for a block; a map of unknown layout is never guessed at.
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
NLC = "NLC"  # tokens: (B, H*W, C)
NCL = "NCL"  # (B, C, H*W)
TO_NHWC = (0, 2, 3, 1)
TO_NCHW = (0, 3, 1, 2)
PERMUTES: dict[tuple[str | None, tuple[int, ...] | None], str] = {
    (NCHW, TO_NHWC): NHWC,
    (NHWC, TO_NCHW): NCHW,
    (NLC, (0, 2, 1)): NCL,
    (NCL, (0, 2, 1)): NLC,
}
CHANNEL_DIM = {NCHW: 1, NHWC: 3}
TRANSPOSED = {NLC: NCL, NCL: NLC}


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
    if out is None or out.dim() not in (3, 4):
        return None
    if node.op == "placeholder":
        return NCHW if out.dim() == 4 else None
    if node.op == "get_attr":
        return None
    if ops.is_conv(node, root):
        return NCHW if out.dim() == 4 else None
    inputs = _tensor_inputs(node)
    first = inputs[0] if inputs else None
    if ops.is_spatial(node, root):
        if first is None or out.dim() != 4:
            return None
        if _is_pad(node):  # padding keeps any known layout that keeps its channel count
            t, layout = tensor_meta(first), layout_of(first)
            channel = CHANNEL_DIM.get(layout) if layout is not None else None
            if channel is None or t is None or t.dim() != 4:
                return None
            return layout if t.shape[channel] == out.shape[channel] else None
        return NCHW if layout_of(first) == NCHW else None
    if ops.is_permute(node):
        source = layout_of(node.args[0]) if isinstance(node.args[0], fx.Node) else None
        return PERMUTES.get((source, _normalised(ops.permute_dims(node), out.dim())))
    if ops.is_data_movement(node):
        return _reshaped(node) or _through_data_movement(node) or _space_to_depth(node)
    if node.op == "call_function" and node.target is operator.getitem:
        container = node.args[0]
        if isinstance(container, fx.Node):
            if tensor_meta(container) is None and container.args and isinstance(container.args[0], fx.Node):
                container = container.args[0]  # an item of chunk()/split()
            t = tensor_meta(container)
            if t is not None and t.dim() == out.dim():
                return layout_of(container)
        return None
    if node.op == "call_function" and node.target is torch.cat:
        tensors = node.args[0] if node.args else node.kwargs.get("tensors", ())
        if not isinstance(tensors, (list, tuple)):
            return None
        layouts = {layout_of(t) for t in tensors if isinstance(t, fx.Node)} - {None}
        return layouts.pop() if len(layouts) == 1 else None  # e.g. a class token before the NLC tokens
    if ops.is_linear(node, root):
        # A linear layer maps the last dimension: channels when the map is NHWC / tokens NLC.
        source = layout_of(first) if first is not None else None
        return source if source in (NHWC, NLC) else None
    same_shape = {layout_of(n) for n in inputs if (t := tensor_meta(n)) is not None and t.shape == out.shape}
    known = same_shape - {None}
    if len(known) == 1:
        return known.pop()
    if first is not None and len(inputs) == 1 and out.dim() == 4:
        return _resampled(first, out)
    if node.op == "call_module" and first is not None and layout_of(first) == NCHW:
        name = type(ops.module_of(node, root)).__name__.lower()
        if name.endswith("2d"):
            return NCHW
    return None


def _is_pad(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target is torch.nn.functional.pad


def _normalised(dims: tuple[int, ...] | None, rank: int) -> tuple[int, ...] | None:
    return None if dims is None else tuple(d % rank for d in dims)


def _spatial_match(before: tuple[int, int], after: tuple[int, int]) -> bool:
    """Whether ``after`` is ``before`` scaled by one integer factor (down or up)."""
    (h, w), (h2, w2) = before, after
    if min(h, w, h2, w2) < 1:
        return False
    if (h2, w2) == (h, w):
        return True
    return any((h2, w2) in {(-(-h // f), -(-w // f)), (h // f, w // f), (h * f, w * f)} for f in range(2, 65))


def _resampled(source: fx.Node, out: torch.Tensor) -> str | None:
    """A module or wrapped function that maps one known map to another 4-D tensor (a whole
    CNN block kept as a leaf): the same layout when only that reading of the output's
    dimensions matches the input's spatial size."""
    layout, t = layout_of(source), tensor_meta(source)
    if t is None or layout not in (NCHW, NHWC) or t.dim() != 4 or out.shape[0] != t.shape[0]:
        return None
    hw = (t.shape[2], t.shape[3]) if layout == NCHW else (t.shape[1], t.shape[2])
    as_nchw = _spatial_match(hw, (out.shape[2], out.shape[3]))
    as_nhwc = _spatial_match(hw, (out.shape[1], out.shape[2]))
    if as_nchw and not as_nhwc:
        return NCHW if layout == NCHW else None
    if as_nhwc and not as_nchw:
        return NHWC if layout == NHWC else None
    return None


def _reshaped(node: fx.Node) -> str | None:
    """One reshape / flatten / transpose between a map and its tokens."""
    source = node.args[0] if node.args else None
    if not isinstance(source, fx.Node):
        return None
    source_meta, node_meta = tensor_meta(source), tensor_meta(node)
    if source_meta is None or node_meta is None:
        return None
    layout, t, out = layout_of(source), source_meta.shape, node_meta.shape
    if node.target in ("transpose", torch.transpose):
        dims = tuple(a for a in node.args[1:3] if isinstance(a, int))
        if len(t) == 3 and len(dims) == 2 and sorted(d % 3 for d in dims) == [1, 2] and layout is not None:
            return TRANSPOSED.get(layout)
        return None
    if len(t) == 4 and len(out) == 3 and out[0] == t[0]:
        if layout == NCHW and tuple(out) == (t[0], t[1], t[2] * t[3]):
            return NCL
        if layout == NHWC and tuple(out) == (t[0], t[1] * t[2], t[3]):
            return NLC
    if len(t) == 3 and len(out) == 4 and out[0] == t[0]:
        if layout == NCL and out[1] == t[1] and out[2] * out[3] == t[2]:
            return NCHW
        if layout == NLC and out[3] == t[2] and out[1] * out[2] == t[1]:
            return NHWC
    return None


def _space_to_depth(node: fx.Node, depth: int = 8) -> str | None:
    """A reshape / permute chain from a known map to a 4-D tensor at a scaled spatial size
    (patch merging: (B, H, W, C) -> (B, H/2, W/2, 4C)) keeps the map's layout, when only
    that reading of the output's dimensions matches."""
    out = tensor_meta(node)
    if out is None or out.dim() != 4:
        return None
    current = node
    for _ in range(depth):
        if not ops.is_data_movement(current):
            return None
        source = current.args[0] if current.args else None
        if not isinstance(source, fx.Node) or (t := tensor_meta(source)) is None:
            return None
        if t.dim() == 4 and layout_of(source) in (NCHW, NHWC):
            return _resampled(source, out) if t.numel() == out.numel() else None
        current = source
    return None


def _through_data_movement(node: fx.Node) -> str | None:
    """A view/reshape chain that ends in the shape it started from keeps the start's layout."""
    out = tensor_meta(node)
    if out is None:
        return None
    out_shape = out.shape
    current = node
    while ops.is_data_movement(current) and not ops.is_permute(current):
        source = current.args[0] if current.args else None
        if not isinstance(source, fx.Node) or (t := tensor_meta(source)) is None:
            return None
        if t.dim() == len(out_shape) and layout_of(source) is not None:
            return layout_of(source) if t.shape == out_shape else None
        current = source
    return None


def annotate_layouts(model: nn.Module, graph: fx.Graph) -> None:
    """Write ``meta["layout"]`` on every node (``None`` for what is neither a known map nor
    known tokens)."""
    for node in graph.nodes:
        node.meta["layout"] = _infer(node, model)
