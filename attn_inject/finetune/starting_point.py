"""The model a fine-tuning run starts from: a file written by ``attn_inject.save`` /
``attn-inject convert``, optionally with a new number of classes.

With ``num_classes`` different from the file's, the base model is rebuilt from the
manifest with the new class count, the manifest's recipe injected again (identity
insertion kept), and every weight loaded but those whose shape changed (the classifier),
which stay at their initialisation and are reported.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import nn

from ..core.errors import InputError
from ..saving.checkpoint import CheckpointError, is_torch_file_name, read_state_dict

__all__ = ["StartingPoint", "load_for_finetuning"]


@dataclass(frozen=True)
class StartingPoint:
    """The model to fine-tune, its class count and the keys left at their initialisation."""

    model: nn.Module
    num_classes: int
    reinitialised: tuple[str, ...] = ()


def _class_count(model: nn.Module) -> int | None:
    count = getattr(model, "num_classes", None)
    if isinstance(count, int):
        return count
    from .freeze import head_names

    heads = head_names(model)
    if heads:
        head = model.get_submodule(heads[-1])
        if isinstance(head, nn.Linear):
            return head.out_features
    return None


def load_for_finetuning(
    path: str | os.PathLike,
    num_classes: int | None = None,
    *,
    like: str | os.PathLike | None = None,
    use_ema: bool = False,
) -> StartingPoint:
    """The patched model saved at ``path``; see the module docstring. Every path goes through
    ``load``'s checks first: the file is checked on the meta device, and the model rebuilt
    with new classes is checked there too, before any real weight is allocated. A timm
    training checkpoint (``.pth.tar``) is read as ``load(path, like=like, use_ema=use_ema)``
    does: weights only, the network from ``like``'s manifest."""
    from ..models.build import build_model, build_shapes_only, resolve
    from ..saving.file import check_file, inject_recorded, load, read_manifest

    if num_classes is not None and num_classes < 1:
        raise InputError(f"--num-classes must be at least 1, got {num_classes}")
    if is_torch_file_name(path) and (like is not None or use_ema or str(path).endswith(".pth.tar")):
        return _from_training_checkpoint(path, num_classes, like, use_ema)
    if like is not None or use_ema:
        given = "--like" if like is not None else "--use-ema"
        raise InputError(f"{given} is for a timm training checkpoint (.pth.tar, .pth); {path} is not one")
    manifest = read_manifest(path)  # a file without a manifest fails here, with its name
    if num_classes is None or num_classes == manifest.base_kwargs.get("num_classes"):
        model = load(path)
        count = _class_count(model)
        if count is None:
            raise CheckpointError(f"{path}: cannot tell how many classes its model has; pass --num-classes")
        return StartingPoint(model, count)
    if manifest.base_model is None:
        raise CheckpointError(
            f"{path} does not name its base model, so it cannot be rebuilt with new classes"
        )
    manifest, recipe, shapes = check_file(path)  # everything load checks, on the meta device
    name = ":".join(resolve(manifest.base_model or ""))
    kwargs = {**manifest.base_kwargs, "num_classes": num_classes}
    twin = inject_recorded(build_shapes_only(name, **kwargs), manifest, recipe, path)
    expected = {k: tuple(v.shape) for k, v in twin.state_dict().items()}
    missing = [k for k in expected if k not in shapes]
    unexpected = [k for k in shapes if k not in expected]
    if missing or unexpected:
        shown = ", ".join((missing + unexpected)[:3])
        raise CheckpointError(
            f"{path}: rebuilding {name} with num_classes={num_classes} gives other keys "
            f"than the file's ({len(missing)} missing, {len(unexpected)} unexpected: {shown})"
        )
    changed = tuple(k for k, shape in expected.items() if tuple(shapes[k]) != shape)
    torch.manual_seed(0)
    model = inject_recorded(build_model(name, **kwargs), manifest, recipe, path)
    tensors = read_state_dict(path)
    model.load_state_dict({k: v for k, v in tensors.items() if k not in changed}, strict=False)
    return StartingPoint(model, num_classes, changed)


def _from_training_checkpoint(
    path: str | os.PathLike, num_classes: int | None, like: str | os.PathLike | None, use_ema: bool
) -> StartingPoint:
    """A timm ``train.py`` checkpoint's weights in the network ``like`` describes."""
    from ..saving.file import load

    model = load(path, like=like, use_ema=use_ema)
    count = _class_count(model)
    if count is None:
        raise CheckpointError(f"{path}: cannot tell how many classes its model has")
    if num_classes is not None and num_classes != count:
        raise CheckpointError(
            f"{path} holds a {count}-class model; --num-classes {num_classes} is for a file written by "
            "convert / ai.save: write this one as such first (ai.save(ai.load(CKPT, like=START), OUT))"
        )
    return StartingPoint(model, count)
