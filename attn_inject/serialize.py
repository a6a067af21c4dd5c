"""``save`` / ``load``: a patched model as one safetensors file with a manifest.

The file holds every weight of the patched model (the base model's keys unchanged, the
blocks' under ``attention.``) and, in its metadata, a JSON manifest: the base model's name
and builder arguments, the recipe's full text, init, target, input size, the plan, and the
versions that wrote it. ``load`` rebuilds the base model by name (or takes the one given),
injects again per the manifest, checks the plan is the same and loads the weights strictly.
Nothing is ever unpickled.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from .checkpoint import (
    CheckpointError,
    check_fits,
    read_safetensors_metadata,
    read_state_dict,
    write_safetensors,
)

__all__ = ["FORMAT", "Manifest", "load", "read_manifest", "save"]

FORMAT = 1
MANIFEST_KEY = "attn_inject.manifest"


@dataclass(frozen=True)
class Manifest:
    """What a saved file says about the model it holds."""

    base_model: str | None
    base_kwargs: Mapping[str, Any]
    recipe: str
    init: str
    target: str
    input_size: tuple[int, ...]
    plan: Mapping[str, Any]
    versions: Mapping[str, str]
    container: str = "attention"  # where the blocks' weights are: "<container>.<key>.*"
    format: int = FORMAT
    training: Mapping[str, Any] | None = None  # the fine-tuning run that wrote it, if any

    def to_json(self) -> str:
        out = asdict(self)
        out["input_size"] = list(self.input_size)
        return json.dumps(out, sort_keys=True)

    @property
    def block_keys(self) -> list[str]:
        return [p["key"] for p in self.plan.get("points", [])]


def versions() -> dict[str, str]:
    import torchvision

    from . import __version__

    out = {"attn_inject": __version__, "torch": torch.__version__, "torchvision": torchvision.__version__}
    try:
        import timm

        out["timm"] = timm.__version__
    except ImportError:
        pass
    return out


def save(
    patched: nn.Module,
    path: str | os.PathLike,
    *,
    model_name: str | None = None,
    model_kwargs: Mapping[str, Any] | None = None,
    force: bool = False,
    training: Mapping[str, Any] | None = None,
) -> Manifest:
    """Write ``patched`` (a model returned by ``inject``) to ``path`` (``.safetensors``),
    atomically; an existing file is kept unless ``force``. ``model_name`` / ``model_kwargs``
    name the base model when the patched model cannot tell (a torchvision model you built
    yourself: ``model_name="tv:resnet18"``). ``training`` (plain values) records the
    fine-tuning run that produced the weights in the manifest."""
    info = getattr(patched, "attn_inject", None)
    if info is None:
        raise CheckpointError(
            "save() needs a model returned by attn_inject.inject (it has no attn_inject plan)"
        )
    name = model_name or info.base_model
    kwargs = dict(model_kwargs if model_kwargs is not None else (info.base_kwargs if not model_name else {}))
    if name is not None:
        from .models import resolve

        name = ":".join(resolve(name))
    _check_json(kwargs, "model_kwargs")
    plan = info.plan
    manifest = Manifest(
        base_model=name,
        base_kwargs=kwargs,
        recipe=plan.recipe.text,
        init=plan.init,
        target=plan.target,
        input_size=tuple(plan.input_size),
        plan=plan.to_dict(),
        versions=versions(),
        container=info.container_path,
        training=dict(training) if training is not None else None,
    )
    if training is not None:
        _check_json(training, "training")
    write_safetensors(path, patched.state_dict(), {MANIFEST_KEY: manifest.to_json()}, force=force)
    return manifest


def _check_json(value: Any, what: str) -> None:
    try:
        json.dumps(value)
    except TypeError as error:
        raise CheckpointError(
            f"{what} must be plain values (numbers, strings, lists, dicts): {error}"
        ) from None


def read_manifest(path: str | os.PathLike) -> Manifest:
    """The manifest of a file written by :func:`save`, or a clear error."""
    metadata = read_safetensors_metadata(path)
    text = metadata.get(MANIFEST_KEY)
    if text is None:
        raise CheckpointError(
            f"{path} has no attn-inject manifest: it was not written by attn_inject.save / attn-inject convert"
        )
    try:
        data = json.loads(text)
        fmt = int(data.get("format", 0))
    except (ValueError, TypeError, AttributeError) as error:
        raise CheckpointError(f"{path}: its attn-inject manifest is not valid JSON ({error})") from None
    if fmt != FORMAT:
        wrote = data.get("versions", {}).get("attn_inject", "an unknown version")
        raise CheckpointError(
            f"{path} was written by attn-inject {wrote} in file format {fmt}; this attn-inject reads format {FORMAT}"
        )
    try:
        return Manifest(
            base_model=data["base_model"],
            base_kwargs=dict(data["base_kwargs"]),
            recipe=str(data["recipe"]),
            init=str(data["init"]),
            target=str(data["target"]),
            input_size=tuple(int(s) for s in data["input_size"]),
            plan=dict(data["plan"]),
            versions=dict(data["versions"]),
            container=str(data["container"]),
            format=fmt,
            training=_training(data.get("training")),
        )
    except (KeyError, TypeError, ValueError) as error:
        raise CheckpointError(f"{path}: its attn-inject manifest lacks or garbles {error}") from None


def _training(value: Any) -> dict[str, Any] | None:
    if value is not None and not isinstance(value, dict):
        raise TypeError("'training' (not a mapping)")
    return value


def build_base(manifest: Manifest, path: str | os.PathLike, model: nn.Module | None = None) -> nn.Module:
    """The base model a manifest names (random weights), or ``model`` when given."""
    if model is not None:
        return model
    if manifest.base_model is None:
        raise CheckpointError(
            f"{path} does not name its base model (it was saved from a model built outside timm / "
            "attn_inject.models); pass the base model: attn_inject.load(path, model=...)"
        )
    from .models import build_model

    return build_model(manifest.base_model, **manifest.base_kwargs)


def load(path: str | os.PathLike, model: nn.Module | None = None) -> nn.Module:
    """The patched model saved at ``path``, with its weights.

    The base model is rebuilt by name from the manifest, or ``model`` (the base, unpatched
    architecture) is used for a custom one; the manifest's recipe is injected again and the
    file's weights loaded strictly.
    """
    from .inject import inject

    manifest = read_manifest(path)
    base = build_base(manifest, path, model)
    patched = inject(
        base,
        manifest.recipe,
        init=manifest.init,
        input_size=manifest.input_size,
        target=manifest.target,
        allow_empty=True,
    )
    keys = [p.key for p in patched.attn_inject.plan]
    if keys != manifest.block_keys:
        raise CheckpointError(
            f"{path}: injecting its recipe into {manifest.base_model or type(base).__name__} gives "
            f"{len(keys)} blocks, the file has {len(manifest.block_keys)} "
            f"(written by attn-inject {manifest.versions.get('attn_inject', '?')}); is it the same model?"
        )
    tensors = read_state_dict(path)
    check_fits(patched, tensors, source=f"checkpoint {path}")
    patched.load_state_dict(tensors, strict=True)
    return patched


def load_base_weights(path: str | os.PathLike, model: nn.Module | None = None) -> nn.Module:
    """The base model with the file's base weights (the blocks' left out): the reference a
    saved patched model is validated against."""
    manifest = read_manifest(path)
    base = build_base(manifest, path, model)
    prefix = f"{manifest.container}."
    tensors = {k: v for k, v in read_state_dict(path).items() if not k.startswith(prefix)}
    check_fits(base, tensors, source=f"checkpoint {path}")
    base.load_state_dict(tensors, strict=True)
    return base
