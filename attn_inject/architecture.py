"""A built model's architecture as plain data, to tell whether two models are one network.

Two models are the same network here when they have the same modules, in order, each with
the same qualified name, class and ``extra_repr`` (kernel sizes, strides, dilations,
pooling and activation types...), and the same parameter and buffer names and shapes.
Weight values are not compared. Both sides may live on the meta device::

    >>> diff = first_difference(architecture(saved), architecture(rebuilt))
    'global_pool.pool: saved AdaptiveMaxPool2d(output_size=1), rebuilt AdaptiveAvgPool2d(output_size=1)'
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from torch import nn

from .messages import shown

__all__ = ["Architecture", "ModuleEntry", "architecture", "first_difference"]

ModuleEntry = tuple[str, str, str]  # (qualified name, class name, extra_repr)
_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")  # a function's repr: differs from run to run


@dataclass(frozen=True)
class Architecture:
    """Every module (name, class, extra_repr) and every parameter and buffer (name, shape)."""

    modules: tuple[ModuleEntry, ...]
    tensors: tuple[tuple[str, tuple[int, ...]], ...] = ()


def architecture(model: nn.Module) -> Architecture:
    """The architecture of ``model`` (see the module docstring)."""
    modules = tuple(
        (name, type(module).__name__, _ADDRESS.sub("", module.extra_repr()))
        for name, module in model.named_modules()
    )
    tensors = tuple(
        (name, tuple(t.shape))
        for name, t in [*model.named_parameters(remove_duplicate=False), *model.named_buffers()]
    )
    return Architecture(modules, tensors)


def _describe(entry: ModuleEntry | None) -> str:
    if entry is None:
        return "nothing"
    return shown(f"{entry[1]}({entry[2]})", 100)


def first_difference(
    saved: Architecture, rebuilt: Architecture, *, names: Sequence[str] = ("saved", "rebuilt")
) -> str | None:
    """The first module or tensor where ``rebuilt`` differs from ``saved``, in words; None if
    they are the same network. ``saved.tensors`` empty means tensors are not compared."""
    first, second = names
    theirs = dict((e[0], e) for e in rebuilt.modules)
    for entry in saved.modules:
        other = theirs.get(entry[0])
        if other != entry:
            return f"{entry[0] or '(root)'}: {first} {_describe(entry)}, {second} {_describe(other)}"
    ours = {e[0] for e in saved.modules}
    for entry in rebuilt.modules:
        if entry[0] not in ours:
            return f"{entry[0]}: {first} nothing, {second} {_describe(entry)}"
    if saved.tensors:
        mine, other_tensors = dict(saved.tensors), dict(rebuilt.tensors)
        for name, shape in saved.tensors:
            if other_tensors.get(name) != shape:
                got = other_tensors.get(name)
                return (
                    f"{name}: {first} shape {shape}, {second} {'nothing' if got is None else f'shape {got}'}"
                )
        for name, shape in rebuilt.tensors:
            if name not in mine:
                return f"{name}: {first} nothing, {second} shape {shape}"
    return None
