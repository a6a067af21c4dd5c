"""Building a model by name: ``timm:NAME``, ``tv:NAME``, or a bare name (timm first, then
torchvision). Random init only: nothing is downloaded."""

from __future__ import annotations

import difflib
import functools
import inspect
from typing import Any

import torch
from torch import nn

__all__ = ["ModelNameError", "base_model_of", "build_model", "input_size_for"]

BASE_ATTRIBUTE = "_attn_inject_base"  # (qualified name, builder kwargs), set by build_model


class ModelNameError(ValueError):
    """No timm or torchvision model has that name."""


@functools.lru_cache(maxsize=1)
def _timm_names() -> list[str]:
    import timm

    return timm.list_models()


@functools.lru_cache(maxsize=1)
def _tv_names() -> list[str]:
    import torchvision

    return torchvision.models.list_models()


def resolve(name: str) -> tuple[str, str]:
    """(source, name) for ``name``; source is "timm" or "tv"."""
    source, _, bare = name.partition(":")
    if bare:
        if source not in ("timm", "tv"):
            raise ModelNameError(f"unknown model source {source!r} in {name!r}; use 'timm:NAME' or 'tv:NAME'")
        names = _timm_names() if source == "timm" else _tv_names()
        if bare not in names:
            raise ModelNameError(_unknown(bare, names, source))
        return source, bare
    if name in _timm_names():
        return "timm", name
    if name in _tv_names():
        return "tv", name
    raise ModelNameError(_unknown(name, sorted(set(_timm_names()) | set(_tv_names())), "timm or torchvision"))


def _unknown(name: str, names: list[str], where: str) -> str:
    close = difflib.get_close_matches(name, names, n=3)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    return f"unknown model {name!r}: not a {where} model name{hint}"


def build_model(name: str, *, device: str | torch.device = "cpu", **kwargs: Any) -> nn.Module:
    """Build ``name`` with random weights on ``device`` ("meta" allocates nothing). The
    model remembers its name and ``kwargs``, so a checkpoint of it can be rebuilt."""
    source, bare = resolve(name)
    given = dict(kwargs)
    with torch.device(device):
        if source == "timm":
            import timm

            model = timm.create_model(bare, pretrained=False, **kwargs)
        else:
            import torchvision

            builder = torchvision.models.get_model_builder(bare)
            if "weights_backbone" in inspect.signature(builder).parameters:
                kwargs.setdefault("weights_backbone", None)  # else the backbone's weights are downloaded
            model = builder(weights=None, **kwargs)
    setattr(model, BASE_ATTRIBUTE, (f"{source}:{bare}", given))
    return model


def base_model_of(model: nn.Module) -> tuple[str, dict[str, Any]] | None:
    """(qualified name, builder kwargs) that rebuild ``model``'s architecture: recorded by
    :func:`build_model`, else a timm model's architecture and class count; None if unknown
    (a torchvision model built by the user: its class does not say which builder made it)."""
    recorded = getattr(model, BASE_ATTRIBUTE, None)
    if recorded is not None:
        return recorded[0], dict(recorded[1])
    info = getattr(model, "attn_inject", None)  # patched again: the first patch's base
    if info is not None and info.base_model:
        return info.base_model, dict(info.base_kwargs)
    cfg = getattr(model, "pretrained_cfg", None)
    if isinstance(cfg, dict) and cfg.get("architecture") and type(model).__module__.startswith("timm."):
        kwargs = (
            {"num_classes": model.num_classes} if isinstance(getattr(model, "num_classes", None), int) else {}
        )
        return f"timm:{cfg['architecture']}", kwargs
    return None


def input_size_for(name: str, model: nn.Module | None = None) -> tuple[int, ...] | None:
    """The input size a torchvision model's default weights were trained at: (3, H, W), or
    (3, T, H, W) for video; None for timm models (they carry ``pretrained_cfg``) and
    detection / segmentation models (their backbone takes any size). Given the built
    ``model``, a fixed ``image_size`` it was built with wins."""
    source, bare = resolve(name)
    if source != "tv":
        return None
    image_size = getattr(model, "image_size", None)
    if isinstance(image_size, int):  # a fixed-size model (ViT) as built, whatever its weights use
        return (3, image_size, image_size)
    import torchvision

    try:
        weights = torchvision.models.get_model_weights(bare).DEFAULT
    except (ValueError, AttributeError):
        return None
    crop = getattr(weights.transforms, "keywords", {}).get("crop_size")
    if crop is None:
        return None
    h, w = (crop, crop) if isinstance(crop, int) else tuple(crop)
    frames = weights.meta.get("min_temporal_size")
    if frames is not None or "video" in type(weights).__module__:
        return (3, max(int(frames or 0), 16), h, w)
    return (3, h, w)


def build_for_planning(name: str, **kwargs: Any) -> nn.Module:
    """The model on the meta device when it can be built there, else on the CPU."""
    try:
        return build_model(name, device="meta", **kwargs)
    except ModelNameError:
        raise
    except Exception:
        return build_model(name, device="cpu", **kwargs)
