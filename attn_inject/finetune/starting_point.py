"""The model a fine-tuning run starts from: a file written by ``attn_inject.save`` /
``attn-inject convert``, optionally with a new number of classes.

With ``num_classes`` different from the file's, the base model is rebuilt from the
manifest with the new class count, the manifest's recipe injected again (identity
insertion kept), and every weight loaded but those whose shape changed (the classifier),
which stay at their initialisation and are reported.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..checkpoint import CheckpointError, read_state_dict

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


def load_for_finetuning(path: str | Path, num_classes: int | None = None) -> StartingPoint:
    """The patched model saved at ``path``; see the module docstring."""
    from .. import inject, load, read_manifest
    from ..models import build_model

    if num_classes is not None and num_classes < 1:
        raise ValueError(f"--num-classes must be at least 1, got {num_classes}")
    manifest = read_manifest(path)  # a file without a manifest fails here, with its name
    saved = manifest.base_kwargs.get("num_classes")
    if num_classes is None or num_classes == saved:
        model = load(path)
        count = _class_count(model)
        if count is None:
            raise CheckpointError(f"{path}: cannot tell how many classes its model has; pass --num-classes")
        return StartingPoint(model, count)
    if manifest.base_model is None:
        raise CheckpointError(
            f"{path} does not name its base model, so it cannot be rebuilt with new classes"
        )
    torch.manual_seed(0)
    base = build_model(manifest.base_model, **{**manifest.base_kwargs, "num_classes": num_classes})
    model = inject(
        base,
        manifest.recipe,
        init=manifest.init,
        input_size=manifest.input_size,
        target=manifest.target,
        allow_empty=True,
    )
    tensors = read_state_dict(path)
    expected = model.state_dict()
    missing = [k for k in expected if k not in tensors]
    unexpected = [k for k in tensors if k not in expected]
    if missing or unexpected:
        shown = ", ".join((missing + unexpected)[:3])
        raise CheckpointError(
            f"{path}: rebuilding {manifest.base_model} with num_classes={num_classes} gives other keys "
            f"than the file's ({len(missing)} missing, {len(unexpected)} unexpected: {shown})"
        )
    changed = tuple(k for k, v in expected.items() if tuple(tensors[k].shape) != tuple(v.shape))
    model.load_state_dict({k: v for k, v in tensors.items() if k not in changed}, strict=False)
    return StartingPoint(model, num_classes, changed)
