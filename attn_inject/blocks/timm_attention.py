"""timm's attention modules as block kinds: ``timm:gc``, ``timm:coord``, ...

The kinds come from the installed timm: the names its ``create_attn`` factory knows, read
from the code of ``timm.layers.create_attn.get_attn``. A kind is offered when it is an
attention over its input, by this rule, checked on the module itself:

1. its class takes no ``stride``: the kinds that do (``sk``, ``splat``, ``lambda``,
   ``bottleneck``, ``halo``) replace a convolution and may downsample;
2. it builds from the channel count alone, as a recipe gives it (no argument that no recipe
   can infer, such as a fixed feature size);
3. it maps a (2, 64, 8, 12) map to the same shape.

A kind that fails the rule is listed with the reason and refused. A recipe's parameters are
plain values, never negative, a kernel size odd (an even one changes the map's size), and
the module they build is counted on the meta device before it is built (which allocates
nothing): one that would hold more than :func:`parameter_budget` parameters for its channel
count (a two-layer MLP four times as wide as the channels, so ``rd_ratio`` up to 4) is
refused, naming the parameter. An offered kind is built
with timm's own ``create_attn(kind, channels, **params)``, wrapped in
:class:`~attn_inject.blocks.wrapped.Blended`: the identity blend at ``init="identity"``, and
a permute on channels-last maps and token grids (a rule's ``channels_last: permute``).
"""

from __future__ import annotations

import ast
import functools
import inspect
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..core.messages import error_line
from ..core.values import is_int, is_number
from .layout import NCHW
from .params import BlockParamError
from .wrapped import Blended

__all__ = [
    "PREFIX",
    "TimmKind",
    "block_size",
    "module_class",
    "parameter_budget",
    "parameter_names",
    "timm_block",
    "timm_kinds",
]

PREFIX = "timm:"
PROBE = (2, 64, 8, 12)  # the map the rule's shape check runs on
LARGEST_INT = 8192  # an integer parameter larger than this is refused (a recipe must not allocate unbounded)
WIDEST = 4  # a block holds at most the parameters of a two-layer MLP this many times as wide as its input


@dataclass(frozen=True)
class TimmKind:
    """One of timm's attention kinds: its module class, and why it is not offered ('' when it is)."""

    name: str
    module: str
    refused: str = ""

    @property
    def kind(self) -> str:
        return PREFIX + self.name


def _names() -> list[str]:
    """The kind names ``timm.layers.create_attn.get_attn`` compares its argument with."""
    import importlib

    factory = importlib.import_module("timm.layers.create_attn")
    tree = ast.parse(inspect.getsource(factory.get_attn))
    names: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare) and isinstance(node.left, ast.Name) and node.left.id == "attn_type":
            for value in node.comparators:
                if (
                    isinstance(value, ast.Constant)
                    and isinstance(value.value, str)
                    and value.value not in names
                ):
                    names.append(value.value)
    return names


def _classify(name: str) -> TimmKind:
    from timm.layers import create_attn

    target = module_class(name)
    label = getattr(target, "__name__", str(target))
    if "stride" in inspect.signature(target).parameters:
        return TimmKind(name, label, "takes a stride: it replaces a convolution and may downsample")
    try:
        with torch.no_grad():
            module = create_attn(name, PROBE[1])
            out = module(torch.randn(PROBE, generator=torch.Generator().manual_seed(0)))
    except Exception as error:
        why = error_line(error, 120)
        return TimmKind(name, label, f"does not build and run from the channel count alone ({why})")
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != PROBE:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        return TimmKind(name, label, f"maps {PROBE} to {shape}, not to the same shape")
    return TimmKind(name, label)


@functools.cache
def timm_kinds() -> tuple[TimmKind, ...]:
    """Every attention kind of the installed timm, offered or with the reason it is not."""
    try:
        names = _names()
    except (ImportError, OSError, TypeError, SyntaxError):
        return ()
    return tuple(_classify(name) for name in names)


@functools.cache
def _by_kind() -> dict[str, TimmKind]:
    return {k.kind: k for k in timm_kinds()}


def timm_kind(kind: str) -> TimmKind | None:
    """The installed timm's kind called ``kind`` (``"timm:gc"``), offered or refused; None
    when timm has no such kind."""
    return _by_kind().get(kind)


def module_class(name: str) -> Any:
    """The class (or function) timm's ``get_attn(name)`` builds, seen through a ``partial``."""
    from timm.layers import get_attn

    cls = get_attn(name)
    return getattr(cls, "func", cls)


def parameter_names(name: str) -> tuple[str, ...]:
    """The keyword arguments of timm's kind ``name`` a recipe may set: all but the channel
    count and where the module lives (``device``, ``dtype``: the model's, set on insertion)."""
    parameters = list(inspect.signature(module_class(name)).parameters.values())[1:]
    return tuple(
        p.name
        for p in parameters
        if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL) and p.name not in ("device", "dtype")
    )


@functools.cache
def _defaults(name: str) -> dict[str, Any]:
    """The default values of the keyword arguments of timm's kind ``name``."""
    parameters = inspect.signature(module_class(name)).parameters.values()
    return {p.name: p.default for p in parameters if p.default is not p.empty}


def _checked_params(kind: str, params: dict[str, Any]) -> None:
    """Its own parameters, plain values only, numbers never negative, integers bounded,
    kernel sizes odd: a recipe shapes the module, never its size unbounded, nor where it lives."""
    allowed = parameter_names(kind[len(PREFIX) :])
    defaults = _defaults(kind[len(PREFIX) :])
    for name, value in params.items():
        if name not in allowed:
            raise BlockParamError(
                name, value, f"one of the parameters of block {kind!r}: {', '.join(allowed)}"
            )
        if isinstance(value, bool) or value is None:
            continue
        if is_number(defaults.get(name)) and not is_number(value):
            raise BlockParamError(name, value, f"a number for block {kind!r}")
        if is_int(value) and not 0 <= value <= LARGEST_INT:
            raise BlockParamError(name, value, f"an integer from 0 to {LARGEST_INT} for block {kind!r}")
        if isinstance(value, float) and not (math.isfinite(value) and value >= 0):
            raise BlockParamError(name, value, f"a finite number >= 0 for block {kind!r}")
        if is_number(value) and value == 0 and name.endswith("ratio"):
            raise BlockParamError(
                name, value, f"a positive number for block {kind!r} (the width is channels x {name})"
            )
        if "kernel" in name and is_number(value) and not (is_int(value) and value % 2 == 1):
            raise BlockParamError(
                name,
                value,
                f"odd for block {kind!r}: odd kernel sizes keep the map's size (an even one changes it)",
            )
        if not isinstance(value, (int, float, str)):
            raise BlockParamError(name, value, f"a number, a string or a boolean for block {kind!r}")


def parameter_budget(channels: int) -> int:
    """The most parameters a timm block for ``channels`` channels may hold: the weights of a
    two-layer MLP ``WIDEST`` times as wide as the channels (2 x 4 x C x C), plus 64 a channel
    and 4096 for biases, norms and small convolutions. timm's defaults use at most an eighth."""
    return 2 * WIDEST * channels * channels + 64 * channels + 4096


def block_size(name: str, channels: int, params: dict[str, Any]) -> tuple[int, int]:
    """(parameters, bytes of parameters and buffers in float32) of timm's module ``name``
    for ``channels`` with ``params``, counted on the meta device: nothing is allocated."""
    from timm.layers import create_attn

    with torch.device("meta"):
        module = create_attn(name, channels, **params)
    parameters = sum(p.numel() for p in module.parameters())
    return parameters, 4 * (parameters + sum(b.numel() for b in module.buffers()))


def _checked_size(kind: str, channels: int, params: dict[str, Any]) -> None:
    """Refuse ``params`` that make the module larger than :func:`parameter_budget`, naming the
    parameter that does (the first that does alone, else the first number given)."""
    name = kind[len(PREFIX) :]
    size, memory = block_size(name, channels, params)
    budget = parameter_budget(channels)
    if size <= budget:
        return

    def too_large_alone(param: str) -> bool:
        try:
            return block_size(name, channels, {param: params[param]})[0] > budget
        except Exception:  # it builds only with the others: not the one to name
            return False

    numbers = [p for p, v in params.items() if is_number(v)]
    culprit = next((p for p in numbers if too_large_alone(p)), numbers[0] if numbers else None)
    allowed = (
        f"a value that keeps block {kind!r} within {budget:,} parameters for {channels} channels "
        f"(a two-layer MLP {WIDEST}x as wide as the channels); it would hold {size:,} "
        f"({memory / 2**20:,.1f} MiB)"
    )
    if culprit is None:
        raise BlockParamError("channels", channels, allowed)
    raise BlockParamError(culprit, params[culprit], allowed)


@functools.cache
def timm_block(kind: str) -> Any:
    """The factory of ``kind`` (an offered ``"timm:..."`` name, see :func:`timm_kind`):
    ``factory(channels, init=..., layout=..., **params)`` builds timm's module and wraps it."""
    found = _by_kind()[kind]

    def build(
        channels: int,
        init: str = "paper",
        layout: str = NCHW,
        prefix: int = 0,
        grid: tuple[int, int] | None = None,
        order: list[int] | None = None,
        **params: Any,
    ) -> nn.Module:
        from timm.layers import create_attn

        _checked_params(kind, params)
        _checked_size(kind, channels, params)
        return Blended(create_attn(found.name, channels, **params), init, layout, prefix, grid, order)

    build.__name__ = build.__qualname__ = f"timm_{found.name}"
    build.__doc__ = f"timm's {found.module} (``create_attn({found.name!r}, channels, **params)``)."
    build.permutes = True  # type: ignore[attr-defined]
    build.grid_at_call = True  # type: ignore[attr-defined]  # a Blended: forward(x, height, width)
    return build
