"""A built model's architecture as plain data, to tell whether two models are one network.

Two models are the same network here when they have the same modules, in order, each with
the same qualified name, class and ``extra_repr`` (kernel sizes, strides, dilations,
pooling and activation types...) and the same plain attributes (timm's ``drop_rate``,
``global_pool``: settings its ``extra_repr`` does not show), and the same parameter and
buffer names and shapes. Weight values are not compared. Both sides may live on the meta device::

    >>> diff = first_difference(architecture(saved), architecture(rebuilt))
    'global_pool.pool: saved AdaptiveMaxPool2d(output_size=1), rebuilt AdaptiveAvgPool2d(output_size=1)'
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..core.messages import shown

__all__ = ["Architecture", "ModuleEntry", "architecture", "first_difference"]

ModuleEntry = tuple[str, str, str]  # (qualified name, class name, extra_repr)
_SHOWN = 70  # characters of a module's description quoted in a difference
_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")  # a function's repr: differs from run to run


@dataclass(frozen=True)
class Architecture:
    """Every module (name, class, extra_repr) and every parameter and buffer (name, shape)."""

    modules: tuple[ModuleEntry, ...]
    tensors: tuple[tuple[str, tuple[int, ...]], ...] = ()
    attributes: tuple[tuple[str, str], ...] = ()  # (qualified name, its plain attributes) where it has any


# Plain attributes that do not change what a model computes (the head's size is compared by
# its tensors' shapes; checkpointing trades memory for time), or that a model sets as it runs
# (transformers' ``name_or_path``: the folder it was loaded from).
UNCOMPARED = frozenset({"training", "grad_checkpointing", "num_classes", "attn_inject", "name_or_path"})
_SIMPLE = (bool, int, float, str, type(None))


def _plain(value: object) -> bool:
    if isinstance(value, torch.Size):  # a shape seen while running (Ultralytics' Detect caches its input's)
        return False
    if isinstance(value, _SIMPLE):
        return True
    return (
        isinstance(value, (tuple, list)) and len(value) <= 16 and all(isinstance(v, _SIMPLE) for v in value)
    )


def plain_attributes(module: nn.Module) -> str:
    """The module's own plain settings (numbers, strings, flags and short tuples of them that
    it holds as attributes), as ``name=value`` in name order; for a module surgery changed,
    also what its generated class runs (``forward=`` a digest of a rewritten forward's code,
    ``around=`` the blocks it runs around its own)."""
    items = [
        f"{key}={value!r}"
        for key, value in sorted(vars(module).items())
        if not key.startswith("_") and key not in UNCOMPARED and _plain(value)
    ]
    return ", ".join(items + _changed_code(module))


def _changed_code(module: nn.Module) -> list[str]:
    from ..surgery.derive import derived_spec

    spec = derived_spec(module)
    if spec is None:
        return []
    if spec.graph is not None:
        return [f"forward={hashlib.sha256(spec.graph[0].encode()).hexdigest()[:16]}"]
    before = [f"{name}:{'+'.join(blocks)}" for name, blocks in spec.around.before]
    return [f"around=before({';'.join(before)}) after({'+'.join(spec.around.after)})"]


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
    attributes = tuple(
        (name, text) for name, module in model.named_modules() if (text := plain_attributes(module))
    )
    return Architecture(modules, tensors, attributes)


def _describe(entry: ModuleEntry | None, other: ModuleEntry | None) -> str:
    """``Class(extra_repr)``, cut around where it differs from ``other`` when long."""
    if entry is None:
        return "nothing"
    text = f"{entry[1]}({entry[2]})"
    if len(text) <= _SHOWN or other is None:
        return shown(text, _SHOWN)
    theirs = f"{other[1]}({other[2]})"
    pairs = enumerate(zip(text, theirs, strict=False))
    same = next((i for i, (a, b) in pairs if a != b), min(len(text), len(theirs)))
    start = max(0, same - _SHOWN // 2)
    cut = (
        ("..." if start else "")
        + text[start : start + _SHOWN]
        + ("..." if start + _SHOWN < len(text) else "")
    )
    return repr(cut)


def _differing(text: str, other: str) -> str:
    """The ``name=value`` items of ``text`` that ``other`` does not have ("nothing" if none)."""
    theirs = set(other.split(", "))
    return ", ".join(item for item in text.split(", ") if item and item not in theirs) or "nothing"


def first_difference(
    saved: Architecture,
    rebuilt: Architecture,
    *,
    names: Sequence[str] = ("saved", "rebuilt"),
    partial: bool = False,
) -> str | None:
    """The first module or tensor where ``rebuilt`` differs from ``saved``, in words; None if
    they are the same network. ``saved.tensors`` empty means tensors are not compared.
    ``partial``: ``rebuilt`` is part of ``saved`` (a base model without its blocks); only
    its own modules are compared."""
    first, second = names
    if partial:
        ours = dict((e[0], e) for e in saved.modules)
        for entry in rebuilt.modules:
            if entry[0] and ours.get(entry[0]) != entry:
                own = ours.get(entry[0])
                return f"{entry[0]}: {first} {_describe(own, entry)}, {second} {_describe(entry, own)}"
        return None
    theirs = dict((e[0], e) for e in rebuilt.modules)
    for entry in saved.modules:
        other = theirs.get(entry[0])
        if other != entry:
            where = entry[0] or "(root)"
            return f"{where}: {first} {_describe(entry, other)}, {second} {_describe(other, entry)}"
    names_saved = {e[0] for e in saved.modules}
    for entry in rebuilt.modules:
        if entry[0] not in names_saved:
            return f"{entry[0]}: {first} nothing, {second} {_describe(entry, None)}"
    if saved.attributes:
        other_attributes = dict(rebuilt.attributes)
        for name, text in saved.attributes:
            if other_attributes.get(name, "") != text:
                theirs_text = other_attributes.get(name, "")
                return (
                    f"{name or '(root)'}: {first} {shown(_differing(text, theirs_text), _SHOWN)}, "
                    f"{second} {shown(_differing(theirs_text, text), _SHOWN)}"
                )
    if saved.tensors:
        saved_tensors, other_tensors = dict(saved.tensors), dict(rebuilt.tensors)
        for name, shape in saved.tensors:
            if other_tensors.get(name) != shape:
                got = other_tensors.get(name)
                return (
                    f"{name}: {first} shape {shape}, {second} {'nothing' if got is None else f'shape {got}'}"
                )
        for name, shape in rebuilt.tensors:
            if name not in saved_tensors:
                return f"{name}: {first} nothing, {second} shape {shape}"
    return None
