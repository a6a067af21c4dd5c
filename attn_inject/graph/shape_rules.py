"""Output shapes of the commonest nodes, computed from their inputs' sizes.

Many of torch's meta kernels are Python decompositions (``torch._refs``): a meta
``layer_norm`` costs about 1.8 ms here, a ``Linear`` on a token map 0.7 ms, a ``mean`` 0.35
ms, a ``Conv2d`` 0.1 ms, while its output's shape is a line of arithmetic. A rule gives the
meta tensor the kernel would give (shape, strides and dtype alike) for the inputs it knows,
and ``None`` for any other, which then go to the kernel as before. Each rule covers only
plain floating meta tensors of one dtype and the layouts it was checked on against the
kernel (``tests/test_unit_shape_rules.py``); anything rarer, and every input the kernel
would refuse, is left to the kernel, so its error is the one the user sees.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["STOOD_FOR", "function_shape", "method_shape", "module_shape"]

Rule = Callable[[tuple, dict], "torch.Tensor | None"]


def _plain(value: Any) -> bool:
    """A plain floating tensor on the meta device (no subclass, no complex), not empty (a
    kernel picks its own strides for an empty one) and not recording gradients (a result
    of one would record them too)."""
    return (
        type(value) is torch.Tensor
        and value.is_meta
        and value.is_floating_point()
        and not value.requires_grad
        and 0 not in value.shape
    )


def _dense(t: torch.Tensor) -> bool:
    """Non-overlapping and dense: a permutation of a contiguous tensor, whose strides an
    elementwise kernel's output keeps."""
    if t.is_contiguous():
        return True
    expected = 1
    for size, stride in sorted(zip(t.shape, t.stride(), strict=True), key=lambda p: p[1]):
        if size == 1:
            continue
        if stride != expected:
            return False
        expected *= size
    return True


def _number(value: Any) -> bool:
    """A Python float, or an int a kernel takes as a scalar (within int64)."""
    return type(value) is float or (type(value) is int and -(2**63) <= value < 2**63)


def _false(value: Any) -> bool:
    return value is False


def _contiguous(shape: tuple[int, ...] | torch.Size, dtype: torch.dtype) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype, device="meta")


def _canonical(t: torch.Tensor) -> bool:
    """Contiguous with the strides ``torch.empty`` gives its shape (``is_contiguous`` also
    accepts any stride on a dim of size 1, which a kernel may then keep)."""
    expected = 1
    for size, stride in zip(reversed(t.shape), reversed(t.stride()), strict=True):
        if stride != expected:
            return False
        expected *= size
    return True


def _like(t: torch.Tensor) -> torch.Tensor | None:
    """What an elementwise kernel gives a dense ``t``: its shape, dtype and order of dims in
    memory. ``None`` where a dim of size 1 makes that order ambiguous (the kernel then picks
    strides of its own for it)."""
    if _canonical(t):
        return _contiguous(t.shape, t.dtype)
    if 1 in t.shape or not _dense(t):
        return None
    return torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="meta")


Checks = tuple[tuple[str, Callable[[Any], bool]], ...]


def _unary(checks: Checks) -> Rule:
    """The rule of an elementwise function of one tensor (an activation) that takes the
    arguments ``checks`` names after the tensor, in its signature's order, each only with a
    value its check accepts: the input's shape and strides."""
    names = tuple(name for name, _ in checks)
    accepts = dict(checks)

    def rule(args: tuple, kwargs: dict) -> torch.Tensor | None:
        if not args or len(args) - 1 > len(names):
            return None
        given = dict(zip(names, args[1:], strict=False))
        for name, value in kwargs.items():
            if name in given or name not in accepts:
                return None
            given[name] = value
        x = args[0]
        if not all(accepts[name](value) for name, value in given.items()) or not _plain(x) or not _dense(x):
            return None
        return _like(x)

    return rule


def _binary(args: tuple, kwargs: dict) -> torch.Tensor | None:
    """``a + b``, ``a * b``, ``a - b``, ``a / b``: two tensors of one floating dtype, both
    contiguous (broadcast to a contiguous result), or one dense tensor and a Python number."""
    if kwargs or len(args) != 2:
        return None
    a, b = args
    if _plain(a) and _plain(b):
        if a.dtype != b.dtype:
            return None
        if a.shape == b.shape and a.stride() == b.stride() and _dense(a):
            return _like(a)
        if _canonical(a) and _canonical(b):
            try:
                shape = torch.broadcast_shapes(a.shape, b.shape)
            except RuntimeError:
                return None  # the kernel's own error
            return _contiguous(shape, a.dtype)
        # A dense map times a per-channel scale (``x.mul(gamma.reshape(1, -1, 1, 1))`` on a
        # channels-last map): an operand with one dim over 1 never decides the result's
        # order of dims, so the result keeps the map's strides.
        for full, other in ((a, b), (b, a)):
            if _broadcasts_into(other, full) and _canonical(other) and _dense(full):
                return _like(full)
        return None
    tensor, number = (a, b) if _plain(a) else (b, a)
    if _plain(tensor) and _number(number) and _dense(tensor):
        return _like(tensor)
    return None


def _broadcasts_into(small: torch.Tensor, full: torch.Tensor) -> bool:
    """``small`` broadcasts to ``full``'s shape and has at most one dim over 1."""
    if small.ndim > full.ndim:
        return False
    over_one = 0
    for size, target in zip(reversed(small.shape), reversed(full.shape), strict=False):
        if size != 1:
            if size != target:
                return False
            over_one += 1
    return over_one <= 1


def _reduced_dims(dim: Any, ndim: int) -> set[int] | None:
    dims = (dim,) if isinstance(dim, int) else dim
    if not isinstance(dims, (tuple, list)) or not dims or not all(type(d) is int for d in dims):
        return None
    found = {d % ndim for d in dims if -ndim <= d < ndim}
    return found if len(found) == len(dims) else None


def _mean(args: tuple, kwargs: dict) -> torch.Tensor | None:
    """``x.mean(dims, keepdim)`` of a contiguous tensor over the dims it names."""
    if not args or set(kwargs) - {"dim", "keepdim"}:
        return None
    x, *rest = args
    if not _plain(x) or not _canonical(x) or len(rest) > 2:
        return None
    if (rest and "dim" in kwargs) or (len(rest) > 1 and "keepdim" in kwargs):
        return None  # an argument given twice: the kernel's error
    dim = rest[0] if rest else kwargs.get("dim")
    keepdim = rest[1] if len(rest) > 1 else kwargs.get("keepdim", False)
    if type(keepdim) is not bool or x.ndim == 0:
        return None
    dims = _reduced_dims(dim, x.ndim)
    if dims is None:
        return None
    shape = [1 if i in dims else s for i, s in enumerate(x.shape) if keepdim or i not in dims]
    return _contiguous(tuple(shape), x.dtype)


def _layer_norm(args: tuple, kwargs: dict) -> torch.Tensor | None:
    """``F.layer_norm`` of a dense tensor over its trailing dims: a contiguous result (the
    kernel normalizes ``x.contiguous()``)."""
    names = ("input", "normalized_shape", "weight", "bias", "eps")
    given = dict(zip(names, args, strict=False)) | kwargs
    if len(args) > len(names) or set(given) - set(names):
        return None
    x: Any = given.get("input")
    shape = given.get("normalized_shape")
    if not _plain(x) or not isinstance(shape, (tuple, list, torch.Size)):
        return None
    if not _canonical(x) and (1 in x.shape or not _dense(x)):
        return None  # a kernel keeps what ``contiguous()`` leaves of a size-1 dim's stride
    shape = tuple(shape)
    if not all(type(size) is int for size in shape):
        return None
    if not shape or len(shape) > x.ndim or tuple(x.shape[-len(shape) :]) != shape:
        return None
    for name in ("weight", "bias"):
        t = given.get(name)
        if t is not None and (not _plain(t) or t.dtype != x.dtype or tuple(t.shape) != shape):
            return None
    return _contiguous(x.shape, x.dtype)


def _roll(args: tuple, kwargs: dict) -> torch.Tensor | None:
    """``torch.roll`` of a dense tensor: a contiguous result of its shape."""
    if not args or set(kwargs) - {"shifts", "dims"}:
        return None
    x = args[0]
    if not _plain(x) or not _dense(x) or len(args) > 3:
        return None
    shifts = args[1] if len(args) > 1 else kwargs.get("shifts")
    dims = args[2] if len(args) > 2 else kwargs.get("dims")
    as_tuple = lambda v: (v,) if type(v) is int else tuple(v) if isinstance(v, (tuple, list)) else None  # noqa: E731
    shifts, dims = as_tuple(shifts), as_tuple(dims)
    if (
        not shifts
        or not dims
        or len(shifts) != len(dims)
        or not all(_number(v) and type(v) is int for v in shifts + dims)
    ):
        return None
    if not all(-x.ndim <= d < x.ndim for d in dims):
        return None
    return _contiguous(x.shape, x.dtype)


def _finite(value: Any) -> bool:
    return _number(value) and math.isfinite(value)


_INPLACE: Checks = (("inplace", _false),)
# Each activation the rules know, with the arguments it takes after the tensor.
UNARY_ARGUMENTS: dict[Callable, Checks] = {
    torch.relu: (),
    F.relu: _INPLACE,
    F.relu6: _INPLACE,
    F.silu: _INPLACE,
    F.gelu: (("approximate", lambda v: v in ("none", "tanh")),),
    F.hardswish: _INPLACE,
    F.hardsigmoid: _INPLACE,
    F.leaky_relu: (("negative_slope", _finite), *_INPLACE),
    F.elu: (("alpha", _finite), *_INPLACE),
    F.mish: _INPLACE,
    torch.sigmoid: (),
    F.sigmoid: (),
    torch.tanh: (),
    F.tanh: (),
}
UNARY_FUNCTIONS = tuple(UNARY_ARGUMENTS)
BINARY_FUNCTIONS = (
    operator.add,
    operator.mul,
    operator.sub,
    operator.truediv,
    torch.add,
    torch.mul,
    torch.sub,
    torch.div,
)
FUNCTION_RULES: dict[Callable, Rule] = {
    **{f: _unary(checks) for f, checks in UNARY_ARGUMENTS.items()},
    **{f: _binary for f in BINARY_FUNCTIONS},
    torch.mean: _mean,
    F.layer_norm: _layer_norm,
    torch.roll: _roll,
}
METHOD_RULES: dict[str, Rule] = {
    **{name: _unary(()) for name in ("relu", "sigmoid", "tanh")},
    **{name: _binary for name in ("add", "mul", "sub", "div")},
    "mean": _mean,
    "roll": _roll,
}


# The operators the function and method rules stand for, as torch's dispatcher sees them
# (``F.relu6`` runs ``hardtanh``, ``F.layer_norm`` decomposes into ``native_layer_norm``):
# what a pass that lets these rules answer never dispatches (the tests record each rule's
# call and check that it dispatches nothing else).
aten = torch.ops.aten
STOOD_FOR = frozenset(
    {
        *(aten.relu, aten.hardtanh, aten.silu, aten.gelu, aten.hardswish, aten.hardsigmoid),
        *(aten.leaky_relu, aten.elu, aten.mish, aten.sigmoid, aten.tanh),
        *(aten.add, aten.mul, aten.sub, aten.div, aten.mean, aten.native_layer_norm, aten.roll),
    }
)


def function_shape(target: Any, args: tuple, kwargs: dict) -> torch.Tensor | None:
    """The meta output of ``target(*args, **kwargs)`` where a rule knows it, else ``None``."""
    try:
        rule = FUNCTION_RULES.get(target)
    except TypeError:  # an unhashable target
        return None
    return rule(args, kwargs) if rule is not None else None


def method_shape(name: str, args: tuple, kwargs: dict) -> torch.Tensor | None:
    """The meta output of ``args[0].name(*args[1:], **kwargs)`` where a rule knows it."""
    rule = METHOD_RULES.get(name)
    return rule(args, kwargs) if rule is not None else None


# torch's own convolutions by their forward: the class and its count of spatial dims.
CONV_CLASSES: dict[Callable, tuple[type[nn.modules.conv._ConvNd], int]] = {
    cls.forward: (cls, spatial) for spatial, cls in enumerate((nn.Conv1d, nn.Conv2d, nn.Conv3d), 1)
}


def _conv(module: nn.Conv1d | nn.Conv2d | nn.Conv3d, x: torch.Tensor, spatial: int) -> torch.Tensor | None:
    """A batched convolution's output: (N, out_channels, *sizes) by the usual formula, contiguous
    (the meta kernel's layout)."""
    weight, bias = module.weight, module.bias
    if (
        x.ndim != spatial + 2
        or type(weight) not in (torch.Tensor, nn.Parameter)
        or weight.dtype != x.dtype
        or (bias is not None and bias.dtype != x.dtype)
        or x.shape[1] != weight.shape[1] * module.groups
        or module.padding_mode != "zeros"
    ):
        return None
    padding = module.padding
    if isinstance(padding, str):
        if padding == "valid":
            padding = (0,) * spatial
        else:  # "same": stride 1 keeps every size
            return _contiguous((x.shape[0], weight.shape[0], *x.shape[2:]), x.dtype)
    sizes = []
    for size, kernel, stride, pad, dilation in zip(
        x.shape[2:], weight.shape[2:], module.stride, padding, module.dilation, strict=True
    ):
        out = math.floor((size + 2 * pad - dilation * (kernel - 1) - 1) / stride) + 1
        if out <= 0:
            return None
        sizes.append(out)
    return _contiguous((x.shape[0], weight.shape[0], *sizes), x.dtype)


def module_shape(module: nn.Module, args: tuple, kwargs: dict) -> torch.Tensor | None:
    """The meta output of a torch ``Conv1d/2d/3d`` or ``Linear`` called on one plain tensor
    (their own forward, not a subclass's), else ``None``."""
    if kwargs or len(args) != 1 or not _plain(args[0]):
        return None
    x = args[0]
    forward = type(module).forward
    conv = CONV_CLASSES.get(forward)
    if conv is not None:
        cls, spatial = conv
        if getattr(type(module), "_conv_forward", None) is not cls._conv_forward:  # own padding
            return None
        return _conv(module, x, spatial)  # type: ignore[arg-type]
    if forward is nn.Linear.forward:
        weight: Any = module.weight
        bias: Any = module.bias
        if (
            x.ndim == 0
            or type(weight) not in (torch.Tensor, nn.Parameter)
            or not _dense(x)
            or weight.dtype != x.dtype
            or (bias is not None and bias.dtype != x.dtype)
            or x.shape[-1] != weight.shape[1]
        ):
            return None
        return _contiguous((*x.shape[:-1], weight.shape[0]), x.dtype)
    return None
