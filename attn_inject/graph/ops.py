"""What a node does, by module type, function identity and method name (as torch.ao's matchers)."""

from __future__ import annotations

import contextlib
import operator
import types
from collections.abc import Iterable, Iterator
from contextvars import ContextVar

import torch
import torch.nn.functional as F
from torch import fx, nn

__all__ = [
    "gives_size",
    "is_activation",
    "is_add",
    "is_conv",
    "is_global_pool",
    "is_norm",
    "is_permute",
    "module_of",
    "permute_dims",
]

ADD_FUNCTIONS = {operator.add, operator.iadd, torch.add}
ADD_METHODS = {"add", "add_"}
CONV_MODULES = (nn.Conv2d, nn.ConvTranspose2d)
CONV_FUNCTIONS = {F.conv2d, torch.conv2d, F.conv_transpose2d, torch.conv_transpose2d}
NORM_MODULES = (
    nn.modules.batchnorm._BatchNorm,
    nn.GroupNorm,
    nn.InstanceNorm2d,
    nn.LayerNorm,
    nn.LocalResponseNorm,
)
NORM_FUNCTIONS = {F.batch_norm, torch.batch_norm, F.group_norm, F.layer_norm, F.instance_norm}
ACTIVATION_MODULES = (
    nn.ReLU,
    nn.ReLU6,
    nn.SiLU,
    nn.GELU,
    nn.Hardswish,
    nn.Hardtanh,
    nn.LeakyReLU,
    nn.ELU,
    nn.CELU,
    nn.SELU,
    nn.Mish,
    nn.PReLU,
    nn.Tanh,
    nn.Softplus,
)
ACTIVATION_FUNCTIONS = {
    F.relu,
    torch.relu,
    F.relu6,
    F.silu,
    F.gelu,
    F.hardswish,
    F.leaky_relu,
    F.elu,
    F.mish,
    torch.tanh,
    F.hardtanh,
}
ACTIVATION_METHODS = {"relu", "relu_", "tanh"}
SPATIAL_MODULES = (
    nn.modules.pooling._MaxPoolNd,
    nn.modules.pooling._AvgPoolNd,
    nn.modules.pooling._AdaptiveAvgPoolNd,
    nn.modules.pooling._AdaptiveMaxPoolNd,
    nn.Upsample,
    nn.PixelShuffle,
    nn.PixelUnshuffle,
    nn.ZeroPad2d,
    nn.ReflectionPad2d,
    nn.ReplicationPad2d,
    nn.ConstantPad2d,
)
SPATIAL_FUNCTIONS = {
    F.max_pool2d,
    F.avg_pool2d,
    F.adaptive_avg_pool2d,
    F.adaptive_max_pool2d,
    F.interpolate,
    F.pad,
    F.pixel_shuffle,
    F.pixel_unshuffle,
    torch.max_pool2d,
}


_KNOWN: ContextVar[tuple[nn.Module, dict[str, nn.Module]] | None] = ContextVar(
    "attn_inject_known_modules", default=None
)


@contextlib.contextmanager
def modules_known(root: nn.Module) -> Iterator[None]:
    """Within: :func:`module_of` finds ``root``'s submodules in a table made once, not by
    walking each dotted name (an analysis asks hundreds of times; ``root`` must not gain or
    lose a submodule meanwhile). Nested: the outer table, when its root is ``root``."""
    known = _KNOWN.get()
    if known is not None and known[0] is root:
        yield
        return
    token = _KNOWN.set((root, dict(root.named_modules())))
    try:
        yield
    finally:
        _KNOWN.reset(token)


def named_submodules(root: nn.Module) -> Iterable[tuple[str, nn.Module]]:
    """``root.named_modules()``, from the table of :func:`modules_known` when ``root`` is its."""
    known = _KNOWN.get()
    if known is not None and known[0] is root:
        return known[1].items()
    return root.named_modules()


def submodule(root: nn.Module, path: str) -> nn.Module:
    """``root.get_submodule(path)``, from the table of :func:`modules_known` when ``root`` is its."""
    known = _KNOWN.get()
    if known is not None and known[0] is root:
        found = known[1].get(path)
        if found is not None:
            return found
    return root.get_submodule(path)


def module_of(node: fx.Node, root: nn.Module) -> nn.Module | None:
    if node.op != "call_module":
        return None
    return submodule(root, str(node.target))


def _matches(node: fx.Node, root: nn.Module, modules, functions, methods=frozenset()) -> bool:
    if node.op == "call_module":
        return isinstance(module_of(node, root), modules)
    if node.op == "call_function":
        return node.target in functions
    if node.op == "call_method":
        return node.target in methods
    return False


def is_conv(node: fx.Node, root: nn.Module) -> bool:
    return _matches(node, root, CONV_MODULES, CONV_FUNCTIONS)


def is_norm(node: fx.Node, root: nn.Module) -> bool:
    return _matches(node, root, NORM_MODULES, NORM_FUNCTIONS)


def is_activation(node: fx.Node, root: nn.Module) -> bool:
    return _matches(node, root, ACTIVATION_MODULES, ACTIVATION_FUNCTIONS, ACTIVATION_METHODS)


def is_spatial(node: fx.Node, root: nn.Module) -> bool:
    """Pooling, resampling and padding: NCHW in, NCHW out."""
    return _matches(node, root, SPATIAL_MODULES, SPATIAL_FUNCTIONS)


def is_adaptive_pool(node: fx.Node, root: nn.Module) -> bool:
    """A pool to a fixed output size, whatever the input's (torchvision VGG's 7 x 7)."""
    return _matches(
        node,
        root,
        (nn.modules.pooling._AdaptiveAvgPoolNd, nn.modules.pooling._AdaptiveMaxPoolNd),
        {F.adaptive_avg_pool2d, F.adaptive_max_pool2d},
    )


def is_linear(node: fx.Node, root: nn.Module) -> bool:
    return _matches(node, root, (nn.Linear,), {F.linear})


def is_add(node: fx.Node) -> bool:
    if node.op == "call_function":
        return node.target in ADD_FUNCTIONS
    return node.op == "call_method" and node.target in ADD_METHODS


def is_permute(node: fx.Node) -> bool:
    return (node.op == "call_method" and node.target == "permute") or (
        node.op == "call_function" and node.target is torch.permute
    )


def permute_dims(node: fx.Node) -> tuple[int, ...] | None:
    """The permutation of a permute node, when it is given as constants."""
    args = node.args[1:]
    if "dims" in node.kwargs:
        args = (node.kwargs["dims"],)
    if len(args) == 1 and isinstance(args[0], (tuple, list)):
        args = tuple(args[0])
    dims = [a for a in args if isinstance(a, int)]
    return tuple(dims) if args and len(dims) == len(args) else None


SHAPE_METHODS = {"size", "dim", "numel", "new_ones", "new_zeros", "new_empty", "new_full"}
SHAPE_ATTRIBUTES = {"shape", "ndim", "dtype", "device"}
SHAPE_FUNCTIONS = {
    torch.zeros_like,
    torch.ones_like,
    torch.empty_like,
    torch.full_like,
    torch.rand_like,
    torch.randn_like,
}


def reads_shape_only(node: fx.Node) -> bool:
    """``x.shape``, ``x.size()``, ``x.new_zeros(...)``, ``torch.ones_like(x)`` and the like:
    what the node gives depends on its tensor's shape, not on its values."""
    if node.op == "call_method":
        return node.target in SHAPE_METHODS
    if node.op != "call_function":
        return False
    if node.target is getattr:
        return len(node.args) == 2 and node.args[1] in SHAPE_ATTRIBUTES
    return node.target in SHAPE_FUNCTIONS


def reads_size(node: fx.Node, tensor: fx.Node, dim: int) -> bool:
    """Whether ``node`` is size ``dim`` of ``tensor``'s output (a 4-D map): ``x.shape[d]``,
    ``x.size(d)`` or ``x.size()[d]``, ``d`` counted from either end."""
    read = _size_read(node)
    return read is not None and read[0] is tensor and read[1] % 4 == dim


def _size_read(node: fx.Node) -> tuple[fx.Node, int] | None:
    """The tensor and the dim whose size ``node`` reads (``x.shape[d]``, ``x.size(d)``,
    ``x.size()[d]``), or None."""
    if node.op == "call_method" and node.target == "size" and len(node.args) == 2 and not node.kwargs:
        whole, index = node.args
        return (whole, index) if isinstance(whole, fx.Node) and isinstance(index, int) else None
    if node.op != "call_function" or node.target is not operator.getitem or len(node.args) != 2:
        return None
    whole, index = node.args
    if not isinstance(whole, fx.Node) or not isinstance(index, int):
        return None
    shape = whole.op == "call_function" and whole.target is getattr and whole.args[1:] == ("shape",)
    sizes = whole.op == "call_method" and whole.target == "size" and len(whole.args) == 1 and not whole.kwargs
    tensor = whole.args[0] if shape or sizes else None
    return (tensor, index) if isinstance(tensor, fx.Node) else None


def gives_size(node: fx.Node, tensor: fx.Node, dim: int, root: nn.Module) -> bool:
    """Whether ``node`` is, for every input, size ``dim`` (2 or 3) of ``tensor``'s output, a
    4-D map, as the graph proves it:

    - read from it (:func:`reads_size`), or set by it: ``y.view(B, C, *size)`` (timm's Twins);
    - a patch embedding's: its input's size floor-divided by the stride ``s`` of a convolution
      whose kernel equals its stride, with no padding or dilation: ``(H - s) // s + 1`` is
      ``H // s`` for every ``H >= s``;
    - the size of every input of a node that keeps it (followed back at most
      :data:`SIZE_DEPTH` nodes): a sum of 4-D maps (broadcasting equal sizes), a norm or
      activation, a convolution of stride 1 padded to its reach (``2 * padding == dilation *
      (kernel - 1)``).

    torch's own modules only, without hooks, and no map on the way changed in place by a
    method that moves its dimensions (``transpose_``)."""
    if isinstance(node.meta.get("val"), torch.Tensor):  # a size is a number
        return False
    if dim not in (2, 3) or not _four_d(tensor):
        return reads_size(node, tensor, dim)
    return _gives_size(node, tensor, dim, root, SIZE_DEPTH, {})


SIZE_DEPTH = 8
# In-place methods that change a tensor's shape: a map they reach holds no proven size.
RESHAPING_IN_PLACE = {"transpose_", "t_", "squeeze_", "unsqueeze_", "resize_", "resize_as_", "as_strided_"}
RESHAPING_IN_PLACE |= {"swapdims_", "swapaxes_", "set_"}


def _gives_size(
    node: fx.Node, tensor: fx.Node, dim: int, root: nn.Module, depth: int, known: dict[fx.Node, bool]
) -> bool:
    if tensor in known:
        return known[tensor]
    known[tensor] = False  # while deciding: a cycle proves nothing
    if any(u.op == "call_method" and u.target in RESHAPING_IN_PLACE for u in tensor.users):
        return False
    if reads_size(node, tensor, dim) or _shaped_by(node, tensor, dim) or _patches(node, tensor, dim, root):
        known[tensor] = True
        return True
    inputs = _size_keeping_inputs(tensor, dim, root) if depth else []
    known[tensor] = (
        bool(inputs)
        and all(_four_d(i) for i in inputs)  # broadcasting aligns every input's dims with the output's
        and all(_gives_size(node, i, dim, root, depth - 1, known) for i in inputs)
    )
    return known[tensor]


def _four_d(node: fx.Node) -> bool:
    """Whether the shape inference gave ``node`` a 4-D tensor."""
    value = node.meta.get("val")
    return isinstance(value, torch.Tensor) and value.dim() == 4


def _shaped_by(node: fx.Node, tensor: fx.Node, dim: int) -> bool:
    """``tensor`` is a view or reshape to a 4-D shape whose size ``dim`` is ``node``, a size
    (a read of one, or one floor-divided by a positive constant: never the -1 a view infers)."""
    if not (tensor.op == "call_method" and tensor.target in ("view", "reshape")) or tensor.kwargs:
        return False
    shape = tensor.args[1:]
    if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
        shape = tuple(shape[0])
    return len(shape) == 4 and shape[dim] is node and _a_size(node)


def _a_size(node: fx.Node) -> bool:
    """Whether ``node`` is a tensor's size (:func:`_size_read`) or one floor-divided by a
    positive integer."""
    if node.op == "call_function" and node.target is operator.floordiv and len(node.args) == 2:
        size, divisor = node.args
        return isinstance(size, fx.Node) and type(divisor) is int and divisor > 0 and _a_size(size)
    return _size_read(node) is not None


def _patches(node: fx.Node, tensor: fx.Node, dim: int, root: nn.Module) -> bool:
    """``node`` is ``H // s`` of a patch embedding's input, ``tensor`` its output."""
    if node.op != "call_function" or node.target is not operator.floordiv or node.kwargs:
        return False
    size, stride = node.args
    conv = _conv2d(tensor, root)
    if conv is None or not isinstance(size, fx.Node) or type(stride) is not int:
        return False
    kernel, conv_stride, padding, dilation = _along(conv, dim)
    given = tensor.args[0]
    patches = padding == 0 and kernel == conv_stride == stride and dilation == 1
    return patches and isinstance(given, fx.Node) and _four_d(given) and reads_size(size, given, dim)


def _size_keeping_inputs(tensor: fx.Node, dim: int, root: nn.Module) -> list[fx.Node]:
    """The inputs whose size ``dim`` is ``tensor``'s own by what ``tensor`` computes (none
    where that is not known)."""
    if is_add(tensor):
        given = [*tensor.args, *tensor.kwargs.values()]
        inputs = [i for i in given if isinstance(i, fx.Node)]
        return inputs if len(inputs) == len(given) else []
    first = tensor.args[0] if tensor.args and isinstance(tensor.args[0], fx.Node) else None
    if first is None:
        return []
    if is_norm(tensor, root) or is_activation(tensor, root):
        module = module_of(tensor, root)
        return [first] if module is None or _torchs_own(module) else []
    conv = _conv2d(tensor, root)
    if conv is None:
        return []
    kernel, stride, padding, dilation = _along(conv, dim)
    same = padding is None or 2 * padding == dilation * (kernel - 1)  # None: padding="same"
    return [first] if stride == 1 and same else []


def _along(conv: nn.Conv2d, dim: int) -> tuple[int, int, int | None, int]:
    """``conv``'s kernel (from the weight it runs, whatever ``kernel_size`` says), stride,
    padding (None for ``"same"``) and dilation along dim ``dim`` (2 or 3) of its map."""
    axis = dim - 2
    if isinstance(conv.padding, str):
        padding = 0 if conv.padding == "valid" else None
    else:
        padding = conv.padding[axis]
    return conv.weight.shape[dim], conv.stride[axis], padding, conv.dilation[axis]


def _conv2d(tensor: fx.Node, root: nn.Module) -> nn.Conv2d | None:
    """The ``nn.Conv2d`` (torch's own code) that ``tensor`` is the one-input call of."""
    if tensor.op != "call_module" or len(tensor.args) != 1 or tensor.kwargs:
        return None
    conv = module_of(tensor, root)
    if not isinstance(conv, nn.Conv2d) or not _torchs_own(conv):
        return None
    return conv if type(conv)._conv_forward is nn.Conv2d._conv_forward else None


def _torchs_own(module: nn.Module) -> bool:
    """Whether ``module`` runs torch's own ``forward`` for its class, with no hook around it."""
    hooked = module._forward_hooks or module._forward_pre_hooks
    everywhere = nn.modules.module._global_forward_hooks or nn.modules.module._global_forward_pre_hooks
    return type(module).forward.__module__.startswith("torch.nn.") and not (hooked or everywhere)


DATA_MOVEMENT_METHODS = {"view", "reshape", "transpose", "contiguous", "flatten", "unflatten", "permute"}
DATA_MOVEMENT_METHODS |= {"swapaxes", "swapdims", "movedim", "moveaxis"}
DATA_MOVEMENT_FUNCTIONS = {torch.reshape, torch.transpose, torch.flatten, torch.permute}
DATA_MOVEMENT_FUNCTIONS |= {torch.swapaxes, torch.swapdims, torch.movedim, torch.moveaxis}
# Splits of one tensor into pieces of its rank along one dimension: each piece keeps the
# tensor's layout (a channel split of a map is still a map).
SPLIT_METHODS = {"chunk", "split", "tensor_split"}
SPLIT_FUNCTIONS = {torch.chunk, torch.split, torch.tensor_split, torch.functional.split}
# Those and ``unbind`` (pieces one rank lower), by name: an item of any of them split off
# the channels of tokens still holds the tokens' grid.
SPLIT_NAMES = SPLIT_METHODS | {"unbind"}
# What an in-place write can go through to reach the tensor it writes into.
VIEW_METHODS = DATA_MOVEMENT_METHODS | {"narrow", "select", "squeeze", "unsqueeze", "expand", "__getitem__"}
VIEW_METHODS |= {"chunk", "split", "unbind"}
VIEW_FUNCTIONS = DATA_MOVEMENT_FUNCTIONS | {operator.getitem, torch.narrow, torch.select}


def written_in_place(node: fx.Node) -> fx.Node | None:
    """The tensor an in-place op writes into: ``buf`` for ``buf.copy_(y)``,
    ``buf.narrow(1, 0, 32).copy_(y)`` or ``buf[:, :32] = y``; None for any other node."""
    name = str(node.target)
    in_place = node.op == "call_method" and name.endswith("_") and not name.startswith("_")
    if not (in_place or (node.op == "call_function" and node.target is operator.setitem)):
        return None
    target = node.args[0] if node.args else None
    while isinstance(target, fx.Node) and (
        (target.op == "call_method" and target.target in VIEW_METHODS)
        or (target.op == "call_function" and target.target in VIEW_FUNCTIONS)
    ):
        target = target.args[0] if target.args else None
    return target if isinstance(target, fx.Node) else None


# The names a function may use and still only move its tensor's elements (timm's leaf
# functions such as Nest's ``deblockify`` or Swin's ``window_reverse``).
MOVES = frozenset({"view", "reshape", "permute", "transpose", "flatten", "unflatten", "roll"})
MOVING_NAMES = MOVES | {"shape", "size", "dim", "contiguous", "torch", "int", "len", "math", "sqrt"}
MOVING_NAMES |= {"floor", "ceil", "_assert"}


def moves_data_only(node: fx.Node) -> bool:
    """A call of a plain Python function (a leaf the trace kept whole) whose code names
    reshapes or permutes and nothing but shape arithmetic besides: it moves its first
    argument's elements. (Arithmetic on the values names nothing; replaying the call on
    numbered elements exposes it.)"""
    if node.op != "call_function" or not isinstance(node.target, types.FunctionType):
        return False
    code = node.target.__code__
    names = set(code.co_names)
    nested = any(isinstance(c, types.CodeType) for c in code.co_consts)
    return not nested and bool(names & MOVES) and names <= MOVING_NAMES


def is_data_movement(node: fx.Node) -> bool:
    if node.op == "call_method":
        return node.target in DATA_MOVEMENT_METHODS
    return node.op == "call_function" and node.target in DATA_MOVEMENT_FUNCTIONS


def is_global_pool(node: fx.Node, source: torch.Tensor | None, result: torch.Tensor | None) -> bool:
    """A reduction of a spatial map to 1x1 or to fewer dimensions (global pooling, flatten)."""
    if source is None or source.dim() != 4 or source.shape[2] * source.shape[3] <= 1:
        return False
    if result is None:
        return False
    return result.dim() < 4 or result.shape[2] * result.shape[3] == 1
