"""Facts read off a built model: the input size it expects, its name, its parameter count."""

from __future__ import annotations

import operator
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from torch import nn

from ..core.errors import InputError, InputTypeError
from ..core.messages import shown
from ..core.values import is_int
from ..surgery.record import patched_record

__all__ = ["count_params", "default_input_size", "model_name"]


VIDEO_FRAMES = 16


def default_input_size(model: nn.Module, input_size: Sequence[int] | None = None) -> tuple[int, ...]:
    """(C, H, W): the user's; else the size the model was built for, where timm records it
    (``in_chans``, ``patch_embed.img_size``, ``img_size``); else timm's ``pretrained_cfg["input_size"]``;
    else (C, 224, 224) with C the input channels of the model's first convolution;
    (C, 16, 224, 224) when that convolution is 3-D (a video model)."""
    first = _first_conv(model)
    channels = first.in_channels if first is not None else 3
    video = isinstance(first, nn.Conv3d)
    if input_size is not None:
        size = _sizes(input_size)
        spatial = 3 if video else 2
        if len(size) == spatial:
            size = (channels, *size)
        if len(size) != spatial + 1 or min(size) < 1:
            shape = "(C, T, H, W) or (T, H, W)" if video else "(C, H, W) or (H, W)"
            raise InputError(f"input_size must be {shape} with positive sizes, got {tuple(input_size)}")
        return size
    built = _built_size(model)
    for attr in ("pretrained_cfg", "default_cfg"):
        cfg = getattr(model, attr, None)
        if isinstance(cfg, Mapping) and cfg.get("input_size"):
            size = tuple(int(s) for s in cfg["input_size"])
            chans = getattr(model, "in_chans", None)  # timm records in_chans=
            if is_int(chans) and chans > 0:
                size = (chans, *size[1:])
            return (size[0], *built) if built is not None and len(size) == 3 else size
    if built is not None and not video:
        return (channels, *built)
    if video:
        return (channels, VIDEO_FRAMES, 224, 224)
    return (channels, 224, 224)


def _sizes(input_size: object) -> tuple[int, ...]:
    """``input_size`` as a tuple of ints: a tuple, list or ``torch.Size`` of integers (a bool,
    a float or a string is no size)."""
    items = input_size if isinstance(input_size, (tuple, list)) else None
    if items is None or len(items) > 8 or not all(_is_size(s) for s in items):
        raise InputTypeError(
            f"input_size must be a tuple or list of ints such as (3, 224, 224), got {shown(input_size, 60)}"
        )
    return tuple(operator.index(s) for s in items)


def _is_size(value: Any) -> bool:
    """An integer of any integer type (int, a NumPy or 0-dim torch integer), not a bool."""
    if isinstance(value, bool):
        return False
    try:
        operator.index(value)
    except TypeError:
        return False
    return True


def _built_size(model: nn.Module) -> tuple[int, int] | None:
    """(H, W) the model was built for, where timm records it (``img_size=`` at creation), on
    the model or, for timm's ``features_only`` getter (``FeatureGetterNet``), the model it wraps."""
    getter = getattr(sys.modules.get("timm.models._features"), "FeatureGetterNet", None)  # timm loaded
    inner = model._modules.get("model") if getter is not None and isinstance(model, getter) else None
    for owner in (getattr(model, "patch_embed", None), model, getattr(inner, "patch_embed", None), inner):
        size = getattr(owner, "img_size", None)
        if is_int(size) and size > 0:
            return (size, size)
        if isinstance(size, (tuple, list)) and len(size) == 2 and all(is_int(s) and s > 0 for s in size):
            return (int(size[0]), int(size[1]))
    return None


def _first_conv(model: nn.Module) -> nn.Conv2d | nn.Conv3d | None:
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Conv3d)):
            return m
    return None


def model_name(model: nn.Module) -> str:
    cfg = getattr(model, "pretrained_cfg", None)
    if isinstance(cfg, Mapping) and cfg.get("architecture"):
        return str(cfg["architecture"])
    info = patched_record(model)
    if info is not None:
        return info.plan.model_name
    return type(model).__name__


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
