"""A patched architecture under a timm model name, so that timm's own tools build it.

timm's ``train.py``, ``validate.py`` and ``inference.py`` build a model by name with
``timm.create_model(name, num_classes=..., drop_path_rate=..., checkpoint_path=...)``.
:func:`register_timm_model` registers, through timm's ``register_model``, a model function
under a new name that builds the base model a saved file records (with the caller's
builder arguments over the recorded ones), injects the file's recipes again, and, with
``pretrained=True``, loads the file's weights::

    >>> ai.register_timm_model("resnet18_se", "start.safetensors")
    >>> model = timm.create_model("resnet18_se", num_classes=10, checkpoint_path="start.safetensors")

The file is checked once, when it is registered, as ``ai.load`` checks it; each build then
repeats the injection recorded there. ``python -m attn_inject.timm_train`` registers and
runs an unmodified ``train.py``.
"""

from __future__ import annotations

import dataclasses
import os
import re
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..core.errors import InputError
from ..core.messages import cut, shown
from ..recipes.recipe import Recipe
from . import timm_entrypoints
from .checkpoint import CheckpointError, read_state_dict
from .file import REGISTERED_SOURCE, Manifest, check_file, checked_path, inject_recorded, weights_path

__all__ = ["register_timm_model"]

_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]{0,99}")  # a timm architecture name: no tag, no source


def register_timm_model(name: str, source: str | os.PathLike) -> str:
    """Register ``name`` in timm's model registry as the patched network that ``source`` (a
    file written by ``ai.save`` / ``attn-inject convert``, or an ``ai.save_pretrained``
    folder) records; returns ``name``.

    ``timm.create_model(name, **kwargs)`` then builds the recorded base model with ``kwargs``
    over the recorded builder arguments (``num_classes``, ``drop_rate``, ``drop_path_rate``,
    ``in_chans``... as timm's scripts pass them), injects the recorded recipes, and with
    ``pretrained=True`` loads ``source``'s weights (all but a classifier whose class count
    changed, which keeps its initialisation, as timm's pretrained loading does).
    ``checkpoint_path=source`` loads them strictly. A name timm already has for a model of
    its own is refused; registering a name again replaces the previous registration."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise InputError(
            f"register_timm_model: the name must be letters, digits and _ (a letter first, at most 100), "
            f"got {shown(name)}"
        )
    import timm.models

    if timm.models.is_model(name) and not hasattr(timm.models.model_entrypoint(name), REGISTERED_SOURCE):
        raise InputError(
            f"register_timm_model: {name!r} is a timm model of its own; pick another name, "
            f"e.g. {name + '_attn'!r}"
        )
    path = weights_path(checked_path(source, "register_timm_model(source)")).resolve()
    manifest, recipe, _ = check_file(path)
    if manifest.base_model is None or not manifest.base_model.startswith("timm:"):
        raise CheckpointError(
            f"{path}: its base model is {shown(manifest.base_model, 60)}; only a timm base model can be "
            "registered as a timm model (load this one with attn_inject.load)"
        )
    entrypoint = _entrypoint(name, path, manifest, recipe)
    with warnings.catch_warnings():
        # Registering a name of ours again replaces it; timm warns about any overwrite.
        warnings.filterwarnings("ignore", message=f"Overwriting {re.escape(name)} in registry")
        timm.models.register_model(entrypoint)
    return name


def _entrypoint(name: str, path: Path, manifest: Manifest, recipe: Recipe) -> Callable[..., nn.Module]:
    """timm's model function for ``name``: ``(pretrained=False, **kwargs) -> model``."""

    def build(
        pretrained: bool = False,
        pretrained_cfg: Any = None,
        pretrained_cfg_overlay: Mapping[str, Any] | None = None,
        cache_dir: Any = None,
        **kwargs: Any,
    ) -> nn.Module:
        if pretrained_cfg is not None:
            raise InputError(
                f"{name} is the network of {path}; it takes no pretrained tag or pretrained_cfg "
                f"(got {shown(pretrained_cfg, 60)}); pretrained=True loads that file's weights"
            )
        base = _build_base(manifest, kwargs, pretrained_cfg_overlay)
        patched = inject_recorded(base, _at_channels(manifest, kwargs.get("in_chans")), recipe, path)
        if pretrained:
            _load_pretrained(patched, path)
        dtype = kwargs.get("dtype")
        return patched.to(dtype) if isinstance(dtype, torch.dtype) else patched

    build.__name__ = build.__qualname__ = name
    build.__module__ = timm_entrypoints.__name__  # timm lists each entrypoint in its module's __all__
    build.__doc__ = f"{manifest.base_model} with the attention recipe of {path} (attn_inject)."
    setattr(build, REGISTERED_SOURCE, path)
    return build


def _build_base(
    manifest: Manifest, kwargs: Mapping[str, Any], overlay: Mapping[str, Any] | None
) -> nn.Module:
    """The recorded base model built with the caller's arguments over the recorded ones."""
    from ..models.build import ModelKwargsError, build_model

    given = {k: v for k, v in kwargs.items() if k not in ("device", "dtype")}
    merged: dict[str, Any] = {**manifest.base_kwargs, **given}
    if overlay:
        merged["pretrained_cfg_overlay"] = {
            **manifest.base_kwargs.get("pretrained_cfg_overlay", {}),
            **overlay,
        }
    device = kwargs.get("device") or "cpu"
    assert manifest.base_model is not None
    try:
        return build_model(manifest.base_model, device=device, **merged)  # records what rebuilds it
    except ModelKwargsError:
        pass  # an argument of the caller's that is no architecture argument (bn_momentum): timm takes it
    import timm

    from ..models.build import resolve

    with torch.device(device):
        return timm.create_model(resolve(manifest.base_model)[1], pretrained=False, **merged)


def _at_channels(manifest: Manifest, in_chans: Any) -> Manifest:
    """``manifest`` with every injection's input size at ``in_chans`` channels, when given."""
    if not isinstance(in_chans, int) or in_chans == manifest.input_size[0]:
        return manifest
    return dataclasses.replace(
        manifest,
        input_size=(in_chans, *manifest.input_size[1:]),
        later=tuple(dataclasses.replace(s, input_size=(in_chans, *s.input_size[1:])) for s in manifest.later),
    )


def _load_pretrained(patched: nn.Module, path: Path) -> None:
    """``path``'s weights into ``patched``; a classifier whose class count changed (or that
    ``num_classes=0`` removed) keeps its initialisation, and nothing else may differ."""
    state = read_state_dict(path)
    own = patched.state_dict()
    dropped = [k for k, v in state.items() if k not in own or tuple(own[k].shape) != tuple(v.shape)]
    classifier = getattr(patched, "pretrained_cfg", {}).get("classifier") or ()
    heads = tuple(f"{c}." for c in ((classifier,) if isinstance(classifier, str) else classifier))
    other = [k for k in dropped if not k.startswith(heads)]
    if other:
        raise CheckpointError(
            f"pretrained=True: {path} does not fit the model built: {len(other)} tensor(s) besides the "
            f"classifier differ ({', '.join(cut(k, 80) for k in other[:3])}); are the builder arguments "
            "the ones the file was saved with?"
        )
    kept = {k: v for k, v in state.items() if k not in dropped}
    result = patched.load_state_dict(kept, strict=False)
    left = [k for k in result.missing_keys if not k.startswith(heads)]
    if left or result.unexpected_keys:
        raise CheckpointError(
            f"pretrained=True: {path} lacks {', '.join(cut(k, 80) for k in left[:3])} of the model built"
        )
