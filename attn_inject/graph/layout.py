"""Which tensors are feature maps, and which are tokens of a known patch grid.

Every node with a 4-D output gets a :class:`Layout`: ``NCHW``, ``NHWC`` (after a
``permute(0, 2, 3, 1)``, as inside ConvNeXt or Swin blocks) or ``None`` (unknown); 3-D
token tensors get ``"NLC"`` (B, N, C) or ``"NCL"`` (B, C, N) when they come from a
feature map by flatten / reshape / transpose, so a vision transformer's tokens reshaped back
to a map (Swin, PiT, DaViT, SAM) are known maps again.

Tokens also get a :class:`TokenGrid`, where the graph proves that
``N = prefix + H' * W'``: the H' x W' map's positions in raster order (a patch embedding
flattened), after ``prefix`` tokens concatenated in front (class, register, distillation
tokens, as in timm's ViT, DeiT, EVA, CaiT; or any tokens that are not a grid's, such as
CrossViT's class token from the other branch: blocks pass them through). Element-wise ops,
norms and linear layers keep the grid; slicing the prefix off (``x[:, 1:]``) shortens it.

Tokens moved by reshapes and permutes (Nest's blocks of (B, T, N, C), Hiera's unrolled
order, windows reversed to a map) are followed by replaying the chain of data movement on an
index tensor that encodes each element's batch, grid position and channel: where the result
keeps batch and channels and holds each grid position once, its tokens are that grid in a
known ``order`` (or the map itself, NHWC, when the order is raster). Hiera's token pooling
(``amax`` over a token dimension) gives the coarser grid when every pooled group is an
aligned s x s window. Anything else that moves tokens loses the grid.
``annotate_grid_dynamics`` marks grids whose size depends on the input size. Blocks go on
NCHW maps, NHWC maps and tokens with a grid; a tensor of unknown layout is never guessed at.
"""

from __future__ import annotations

import inspect
import operator
from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Any

import torch
from torch import fx, nn

from ..core.layouts import CHANNEL_DIM, Layout
from . import ops
from .grid_replay import pooled, replayed
from .inside import trace_at
from .node_layout import (
    META_KEY,
    NCHW,
    NCL,
    NHWC,
    NLC,
    TOKEN_DIM,
    NodeLayout,
    Reading,
    TokenGrid,
    grid_of,
    grid_size,
    layout_of,
    reading_of,
    record_of,
    set_layout,
    set_reading,
    spatial_size,
)
from .shapes import propagate_shapes, tensor_meta

__all__ = [
    "META_KEY",
    "Layout",
    "NodeLayout",
    "Reading",
    "TokenGrid",
    "annotate_grid_dynamics",
    "annotate_layouts",
    "grid_of",
    "grid_size",
    "layout_of",
    "spatial_size",
]


TO_NHWC = (0, 2, 3, 1)
TO_NCHW = (0, 3, 1, 2)
PERMUTES: dict[tuple[str | None, tuple[int, ...] | None], str] = {
    (NCHW, TO_NHWC): NHWC,
    (NHWC, TO_NCHW): NCHW,
    (NLC, (0, 2, 1)): NCL,
    (NCL, (0, 2, 1)): NLC,
}
TRANSPOSED = {NLC: NCL, NCL: NLC}


def _tensor_inputs(node: fx.Node) -> list[fx.Node]:
    return [n for n in node.all_input_nodes if tensor_meta(n) is not None]


def _is_item(node: fx.Node, root: nn.Module) -> bool:
    return node.op == "call_function" and node.target is operator.getitem


def _is_cat(node: fx.Node, root: nn.Module) -> bool:
    return node.op == "call_function" and node.target is torch.cat


def _input_layout(node: fx.Node, out: torch.Tensor, root: nn.Module) -> str | None:
    return NCHW if out.dim() == 4 else None  # an image; a convolution's output


def _unknown(node: fx.Node, out: torch.Tensor, root: nn.Module) -> str | None:
    return None  # a constant; a function that only moves elements (replayed, never read by its shape)


def _spatial(node: fx.Node, out: torch.Tensor, root: nn.Module) -> str | None:
    """Pooling, padding, resampling: NCHW stays NCHW; padding keeps any known layout that
    keeps its channel count."""
    inputs = _tensor_inputs(node)
    if not inputs or out.dim() != 4:
        return None
    first = inputs[0]
    if _is_pad(node):
        t, layout = tensor_meta(first), layout_of(first)
        channel = CHANNEL_DIM[layout] if layout in (NCHW, NHWC) else None
        if channel is None or t is None or t.dim() != 4:
            return None
        return layout if t.shape[channel] == out.shape[channel] else None
    return NCHW if layout_of(first) == NCHW else None


def _permuted(node: fx.Node, out: torch.Tensor, root: nn.Module) -> str | None:
    source = layout_of(node.args[0]) if isinstance(node.args[0], fx.Node) else None
    return PERMUTES.get((source, _normalised(ops.permute_dims(node), out.dim())))


def _moved(node: fx.Node, out: torch.Tensor, root: nn.Module) -> str | None:
    return _reshaped(node) or _through_data_movement(node) or _space_to_depth(node)


def _item(node: fx.Node, out: torch.Tensor, root: nn.Module) -> str | None:
    """An item of a kept-whole module's returned tuple, or of a chunk()/split(): its layout."""
    container = node.args[0]
    if not isinstance(container, fx.Node):
        return None
    if (returned := _returned_item(node)) is not None:
        return returned.layout
    if tensor_meta(container) is None and _splits(container):
        assert isinstance(container.args[0], fx.Node)
        container = container.args[0]  # an item of chunk()/split()
    t = tensor_meta(container)
    return layout_of(container) if t is not None and t.dim() == out.dim() else None


def _concatenated(node: fx.Node, out: torch.Tensor, root: nn.Module) -> str | None:
    tensors = node.args[0] if node.args else node.kwargs.get("tensors", ())
    if not isinstance(tensors, (list, tuple)):
        return None
    layouts = {layout_of(t) for t in tensors if isinstance(t, fx.Node)} - {None}
    return layouts.pop() if len(layouts) == 1 else None  # e.g. a class token before the NLC tokens


def _linear(node: fx.Node, out: torch.Tensor, root: nn.Module) -> str | None:
    """A linear layer maps the last dimension: channels when the map is NHWC / tokens NLC."""
    inputs = _tensor_inputs(node)
    source = layout_of(inputs[0]) if inputs else None
    return source if source in (NHWC, NLC) else None


def _elementwise(node: fx.Node, out: torch.Tensor, root: nn.Module) -> str | None:
    """Anything else: the one layout of its inputs of the output's shape; a module mapping one
    map to another; a ``...2d`` module on an NCHW map."""
    inputs = _tensor_inputs(node)
    first = inputs[0] if inputs else None
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


Rule = tuple[Callable[[fx.Node, nn.Module], bool], Callable[[fx.Node, torch.Tensor, nn.Module], "str | None"]]
# How a node's layout follows from its inputs': the first rule whose test holds decides (as
# torch.ao maps patterns to handlers); a node no rule claims is read as element-wise.
RULES: tuple[Rule, ...] = (
    (lambda node, root: node.op == "placeholder", _input_layout),
    (lambda node, root: node.op == "get_attr", _unknown),
    (ops.is_conv, _input_layout),
    (ops.is_spatial, _spatial),
    (lambda node, root: ops.is_permute(node), _permuted),
    (lambda node, root: ops.is_data_movement(node), _moved),
    (_is_item, _item),
    (_is_cat, _concatenated),
    (ops.is_linear, _linear),
    (lambda node, root: ops.moves_data_only(node), _unknown),
)


def _infer(node: fx.Node, root: nn.Module) -> str | None:
    """The layout of a node's 3-D or 4-D output, by the first of :data:`RULES` that applies."""
    out = tensor_meta(node)
    if out is None or out.dim() not in (3, 4):
        return None
    for applies, layout in RULES:
        if applies(node, root):
            return layout(node, out, root)
    return _elementwise(node, out, root)


def _splits(node: fx.Node) -> bool:
    """A chunk()/split() of a tensor, whose items keep its layout (not any function that
    returns a tuple, such as MViTv2's ``reshape_post_pool``, whose first item is reshaped)."""
    if not node.args or not isinstance(node.args[0], fx.Node):
        return False
    if node.op == "call_method":
        return node.target in ops.SPLIT_METHODS
    return node.op == "call_function" and node.target in ops.SPLIT_FUNCTIONS


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


def _reshaped(node: fx.Node) -> Layout | None:
    """One reshape / flatten / transpose between a map and its tokens."""
    source = node.args[0] if node.args else None
    if not isinstance(source, fx.Node):
        return None
    source_meta, node_meta = tensor_meta(source), tensor_meta(node)
    if source_meta is None or node_meta is None:
        return None
    layout, t, out = layout_of(source), source_meta.shape, node_meta.shape
    if layout is None:
        return None
    if node.target in ("transpose", torch.transpose):
        return _transposed(node, layout, t)
    if len(out) == 0 or len(t) == 0 or out[0] != t[0]:
        return None
    if len(t) == 4 and len(out) == 3:
        return _flattened(layout, t, out)
    if len(t) == 3 and len(out) == 4:
        return _unflattened(layout, t, out)
    return None


def _transposed(node: fx.Node, layout: Layout, t: torch.Size) -> Layout | None:
    """``transpose(1, 2)`` of (B, N, C) or (B, C, N) tokens: the other token layout."""
    dims = tuple(a for a in node.args[1:3] if isinstance(a, int))
    if len(t) == 3 and len(dims) == 2 and sorted(d % 3 for d in dims) == [1, 2]:
        return TRANSPOSED.get(layout)
    return None


def _flattened(layout: Layout, t: torch.Size, out: torch.Size) -> Layout | None:
    """A map's positions flattened into one token dimension: NCHW -> NCL, NHWC -> NLC."""
    if layout == NCHW and tuple(out) == (t[0], t[1], t[2] * t[3]):
        return NCL
    if layout == NHWC and tuple(out) == (t[0], t[1] * t[2], t[3]):
        return NLC
    return None


def _unflattened(layout: Layout, t: torch.Size, out: torch.Size) -> Layout | None:
    """Tokens split into a map's two spatial dimensions: NCL -> NCHW, NLC -> NHWC."""
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


def _token_count(node: fx.Node) -> int | None:
    t, layout = tensor_meta(node), layout_of(node)
    if t is None or layout is None or layout not in TOKEN_DIM:
        return None
    if layout == NLC and t.dim() >= 3:  # (B, N, C), or reordered tokens over more dimensions
        return int(torch.Size(t.shape[1:-1]).numel())
    return int(t.shape[TOKEN_DIM[layout]]) if t.dim() == 3 else None


def _fits(grid: TokenGrid | None, node: fx.Node) -> TokenGrid | None:
    """``grid`` if it accounts for exactly the node's tokens."""
    return grid if grid is not None and _token_count(node) == grid.tokens else None


def _same_grid(nodes: list[fx.Node]) -> TokenGrid | None:
    """The one grid of tokens combined element by element (a residual addition), where the
    others' is not known: token i of the result is token i of each input."""
    grids = {grid_of(n) for n in nodes if layout_of(n) in TOKEN_DIM} - {None}
    return grids.pop() if len(grids) == 1 else None


def _concatenated_grid(node: fx.Node) -> TokenGrid | None:
    """``cat([prefix tokens..., grid tokens], token dim)``: the grid with a longer prefix;
    ``cat`` over channels of tokens on one grid: that grid."""
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    out, layout = tensor_meta(node), layout_of(node)
    if out is None or layout not in TOKEN_DIM or not isinstance(dim, int):
        return None
    parts = _concatenated_parts(node)
    if parts is None:
        return None
    token_dim = TOKEN_DIM[layout]
    if dim % out.dim() != token_dim:
        return _same_grid(parts) if all(layout_of(t) == layout for t in parts) else None
    *front, last = parts
    grid = grid_of(last)
    if grid is None or any(grid_of(t) is not None for t in front):
        return None  # one grid, last: what comes before it is passed through as prefix tokens
    extra = sum(int(meta.shape[token_dim]) for t in front if (meta := tensor_meta(t)) is not None)
    return TokenGrid(grid.prefix + extra, grid.height, grid.width, source=grid.source)


def _concatenated_parts(node: fx.Node) -> list[fx.Node] | None:
    """The tensors a ``cat`` joins, when there are some and each is a node of known shape."""
    tensors = node.args[0] if node.args else node.kwargs.get("tensors", ())
    if not isinstance(tensors, (list, tuple)) or not tensors:
        return None
    parts = [t for t in tensors if isinstance(t, fx.Node)]
    if len(parts) != len(tensors) or any(tensor_meta(t) is None for t in parts):
        return None
    return parts


def _sliced_grid(node: fx.Node) -> TokenGrid | None:
    """``x[:, k:]`` on (B, N, C) tokens with ``k <= prefix``: the prefix shortened by ``k``."""
    source, index = node.args[0], node.args[1]
    if not isinstance(source, fx.Node) or layout_of(source) != NLC:
        return None
    grid = grid_of(source)
    if grid is None or not isinstance(index, tuple) or len(index) < 2:
        return None
    if index[0] != slice(None) or any(i != slice(None) and i is not Ellipsis for i in index[2:]):
        return None
    cut = index[1]
    if not isinstance(cut, slice) or cut.stop is not None or cut.step not in (None, 1):
        return None
    start = cut.start or 0
    if not isinstance(start, int) or not 0 <= start <= grid.prefix:
        return None
    return TokenGrid(grid.prefix - start, grid.height, grid.width, source=grid.source)


def _is_split(node: fx.Node) -> bool:
    return (
        node.op in ("call_method", "call_function")
        and getattr(node.target, "__name__", node.target) in ops.SPLIT_NAMES
    )


def _infer_grid(node: fx.Node, root: nn.Module) -> TokenGrid | None:
    """The token grid of a node already given an NLC or NCL layout."""
    t = tensor_meta(node)
    inputs = _tensor_inputs(node)
    source = inputs[0] if inputs else None
    if t is None:
        return None
    if ops.is_data_movement(node) and source is not None:
        return _fits(_moved_grid(source), node)
    if node.op == "call_function" and node.target is torch.cat:
        return _fits(_concatenated_grid(node), node)
    if node.op == "call_function" and node.target is operator.getitem:
        return _fits(_item_grid(node), node)
    if ops.is_linear(node, root) and source is not None:
        return _fits(grid_of(source), node)
    same_shape = [n for n in inputs if (m := tensor_meta(n)) is not None and m.shape == t.shape]
    return _fits(_same_grid(same_shape), node)


def _moved_grid(source: fx.Node) -> TokenGrid | None:
    """The grid of tokens made by one data-movement op from ``source``: a map flattened
    into tokens, or tokens transposed between NLC and NCL or reshaped keeping them."""
    s = tensor_meta(source)
    hw = spatial_size(source)
    if s is not None and s.dim() == 4 and hw is not None:
        return TokenGrid(0, hw[0], hw[1], source=source)
    if s is not None and s.dim() == 3:
        return grid_of(source)
    return None


def _item_grid(node: fx.Node) -> TokenGrid | None:
    """The grid of ``container[index]``: an item a kept-whole module returns, a chunk of
    tokens over channels, or tokens with part of their prefix sliced off."""
    whole = node.args[0]
    if (returned := _returned_item(node)) is not None:
        return returned.grid
    if isinstance(whole, fx.Node) and tensor_meta(whole) is None:
        split = whole.args[0] if _is_split(whole) else None  # chunk() over channels keeps the tokens
        return grid_of(split) if isinstance(split, fx.Node) else None
    return _sliced_grid(node)


def _grid_reshaped_to_map(node: fx.Node) -> bool:
    """Whether a token-to-map reshape splits the tokens along their proven grid, in raster
    order (or has no grid to contradict)."""
    source = node.args[0] if node.args else None
    if not isinstance(source, fx.Node):
        return True
    s, out, grid = tensor_meta(source), tensor_meta(node), grid_of(source)
    if s is None or out is None or grid is None or s.dim() != 3 or out.dim() != 4:
        return True
    hw = (out.shape[1], out.shape[2]) if layout_of(node) == NHWC else (out.shape[2], out.shape[3])
    return grid.prefix == 0 and grid.order is None and tuple(hw) == (grid.height, grid.width)


def annotate_layouts(
    model: nn.Module, graph: fx.Graph, inputs: Mapping[str, Reading | None] | None = None
) -> None:
    """Record a :class:`NodeLayout` on every node, under ``meta[META_KEY]``: its layout
    (``None`` for what is neither a known map nor known tokens) and the grid of tokens of a
    proven grid. ``inputs``: the layout and grid of each placeholder by name, for a graph
    traced from one module of a larger model (by default a 4-D input is an NCHW image)."""
    for node in graph.nodes:
        node.meta.pop(META_KEY, None)
        if inputs is not None and node.op == "placeholder":
            set_reading(node, inputs.get(str(node.target)))
            continue
        layout = _infer(node, model)
        if layout is None and (returned := _read_inside(node, model)) is not None:
            if tensor_meta(node) is not None:
                set_reading(node, returned[0])
                continue
            node.meta[META_KEY] = NodeLayout(returned=returned)
        set_layout(node, layout)
        if layout in TOKEN_DIM:  # the grid is read from the node's own layout
            set_layout(node, layout, _infer_grid(node, model))
        if layout in (NCHW, NHWC) and ops.is_data_movement(node) and not _grid_reshaped_to_map(node):
            set_layout(node, layout := None)
        if layout is None and (moved := replayed(node) or pooled(node)) is not None:
            set_layout(node, moved.layout, moved.grid)


def _read_inside(node: fx.Node, root: nn.Module) -> tuple[Reading | None, ...] | None:
    """The layout and grid of each tensor a kept-whole module returns (one item for a
    tensor, one per item for a tuple), read from its graph traced at this node's shapes
    (:mod:`.inside`), in eval and in train mode, which must agree: for a module of the
    model's own code given a map or tokens of known layout, whose output is 3-D or 4-D (or
    a tuple holding such)."""
    module = ops.module_of(node, root)
    if module is None or type(module).__module__.startswith("torch."):
        return None
    value = node.meta.get("val")
    items = value if isinstance(value, (tuple, list)) else (value,)
    if not any(isinstance(v, torch.Tensor) and v.dim() in (3, 4) for v in items):
        return None
    if not any(layout_of(n) is not None for n in _tensor_inputs(node)):
        return None
    args, kwargs = fx.node.map_arg((node.args, node.kwargs), lambda n: n.meta.get("val"))
    names = inspect.signature(module.forward).bind(*node.args, **node.kwargs).arguments
    known = {name: reading_of(outer) for name, outer in names.items() if isinstance(outer, fx.Node)}
    in_eval = _read_traced(module, args, kwargs, known, len(items), training=False)
    if in_eval is None:
        return None
    in_training = _read_traced(module, args, kwargs, known, len(items), training=True)
    return in_eval if in_eval == in_training else None  # a module dropping tokens in training: no grid


def _read_traced(
    module: nn.Module,
    args: Any,
    kwargs: Any,
    known: Mapping[str, Reading | None],
    count: int,
    *,
    training: bool,
) -> tuple[Reading | None, ...] | None:
    """The reading of each of the ``count`` tensors ``module`` returns, from its graph traced
    at these arguments in one mode; None when it cannot be traced or returns another count."""
    graph = trace_at(module, args, kwargs, training=training)
    if graph is None:
        return None
    annotate_layouts(module, graph, inputs=known)
    output = next(n for n in reversed(graph.nodes) if n.op == "output")
    result = output.args[0]
    returned = result if isinstance(result, (tuple, list)) else (result,)
    if len(returned) != count:
        return None
    return tuple(reading_of(r) if isinstance(r, fx.Node) else None for r in returned)


def _returned_item(node: fx.Node) -> Reading | None:
    """``(layout, grid)`` of ``module(...)[i]``, where the kept-whole module's tuple output
    was read from inside it."""
    container, index = node.args[0], node.args[1] if len(node.args) > 1 else None
    if not isinstance(container, fx.Node) or not isinstance(index, int):
        return None
    returned = record_of(container).returned
    if returned is None or not -len(returned) <= index < len(returned):
        return None
    reading = returned[index]
    if reading is None or reading.grid is None:
        return reading
    return replace(reading, grid=replace(reading.grid, source=None))  # its map is in the module's graph


def annotate_grid_dynamics(model: nn.Module, graph: fx.Graph, input_shape: tuple[int, ...]) -> None:
    """Mark the token grids whose size follows the input size (``TokenGrid.dynamic``).

    Shapes are propagated once more at twice the input's height and width: a grid whose
    token count changes there is dynamic (a timm ViT built with ``dynamic_img_size``), and
    its ``prefix_varies`` where the grids inferred at that size put a different number of
    tokens before it; a model that cannot run at that size (a fixed position embedding) has
    fixed grids. Reordered tokens whose grid is not proven again at that size lose it. The
    shapes, layouts and grids of the planned size are restored.
    """
    gridded = [n for n in graph.nodes if grid_of(n) is not None]
    if not gridded:
        return
    saved = {n: (n.meta.get("val"), n.meta.get(META_KEY)) for n in graph.nodes}
    probe = (*input_shape[:-2], 2 * input_shape[-2], 2 * input_shape[-1])
    probed: dict[fx.Node, TokenGrid | None] = {}
    try:
        try:
            propagate_shapes(model, graph, probe)
            changed = [n for n in gridded if _shape(n) not in (None, _shape_of(saved[n][0]))]
        except Exception:  # the model runs at its own size only: its grids are fixed
            changed = []
        if changed:  # the grids at the probe size: does the prefix stay?
            annotate_layouts(model, graph)
            probed = {n: grid_of(n) for n in changed}
    finally:
        for node, (value, record) in saved.items():
            node.meta["val"] = value
            if record is None:
                node.meta.pop(META_KEY, None)
            else:
                node.meta[META_KEY] = record
    for node in changed:
        grid, at_probe = grid_of(node), probed.get(node)
        if grid is not None and grid.order is not None and at_probe is None:
            set_layout(node, layout_of(node), None)  # reordered tokens proven at the planned size only
        elif grid is not None:
            varies = at_probe is not None and at_probe.prefix != grid.prefix
            # the grid's map, where the probe size proves it too: H' x W' read from it at a call
            source = grid.source if at_probe is not None and at_probe.source is grid.source else None
            dynamic = replace(grid, dynamic=True, prefix_varies=varies, source=source)
            set_layout(node, layout_of(node), dynamic)


def _shape(node: fx.Node) -> tuple[int, ...] | None:
    return _shape_of(node.meta.get("val"))


def _shape_of(value: object) -> tuple[int, ...] | None:
    return tuple(value.shape) if isinstance(value, torch.Tensor) else None
