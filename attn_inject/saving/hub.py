"""A patched timm model in timm's hub folder layout, as ``push_to_hf_hub`` uploads it.

timm's ``save_for_hf`` writes a folder of ``config.json`` (architecture, num_classes,
pretrained_cfg, model_args) and ``model.safetensors``. :func:`save_pretrained` writes the
same two files for a patched model: the weights file is the one ``ai.save`` writes (its
manifest included), and ``config.json`` is timm's own, with what timm cannot record under an
``"attn_inject"`` key (base model, builder arguments, recipes, plan). ``ai.load(folder)``
rebuilds the model from it, once the two files are found to describe the same model.

``"architecture"`` names no timm model: ``timm.create_model("local-dir:FOLDER")`` fails
with ``Unknown model (... load it with attn_inject.load(folder) ...)`` instead of building
the base model and failing on the blocks' weights. To build it by a timm name,
``ai.register_timm_model("resnet18_se", folder)``, then ``timm.create_model("resnet18_se",
pretrained=True)``.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import nn

from ..core.files import write_text_atomic
from ..core.messages import error_line, shown
from .checkpoint import CheckpointError
from .file import HUB_CONFIG, HUB_FIELDS, HUB_KEY, HUB_WEIGHTS, Manifest, checked_path, refuse_wrapper, save

__all__ = ["save_pretrained"]


def save_pretrained(
    patched: nn.Module,
    folder: str | os.PathLike,
    *,
    model_kwargs: Mapping[str, Any] | None = None,
    force: bool = False,
) -> Manifest:
    """Write ``patched`` (a timm model returned by ``inject``) to ``folder`` in timm's hub
    layout: ``model.safetensors`` (as :func:`attn_inject.save` writes it) and timm's
    ``config.json`` with an ``"attn_inject"`` entry. ``folder`` is created if missing (its
    parent must exist); files of an earlier save there are replaced only with ``force``.
    ``model_kwargs`` as for ``ai.save``. Nothing is uploaded: push the folder with
    ``huggingface_hub.upload_folder(repo_id=..., folder_path=folder)``."""
    refuse_wrapper(patched, "save_pretrained()")
    if not isinstance(getattr(patched, "pretrained_cfg", None), dict):
        raise CheckpointError(
            f"save_pretrained() writes timm's hub layout, for a timm model; this {type(patched).__name__} "
            "has no pretrained_cfg; save it with attn_inject.save(model, 'model.safetensors')"
        )
    target = checked_path(folder, "save_pretrained(folder)")
    config = _timm_config(patched)  # before anything is written: a model timm cannot describe fails here
    out = _folder(target, force)
    manifest = save(patched, out / HUB_WEIGHTS, model_kwargs=model_kwargs, force=force)
    recorded = json.loads(manifest.to_json())
    base = (manifest.base_model or "").partition(":")[2]
    config["architecture"] = (
        f"{base}+{_recipe_name(patched)} (attention inserted by attn-inject: load it with "
        "attn_inject.load(folder))"
    )
    config[HUB_KEY] = {
        **{field: recorded[field] for field in HUB_FIELDS},
        "weights": HUB_WEIGHTS,
        "load": "import attn_inject; model = attn_inject.load(folder)",
        "versions": recorded["versions"],
    }
    write_text_atomic(out / HUB_CONFIG, json.dumps(config, indent=2) + "\n")
    return manifest


def _recipe_name(patched: nn.Module) -> str:
    from ..surgery.record import patched_record

    info = patched_record(patched)
    plans = getattr(info, "plans", None) or ((info.plan,) if info is not None else ())
    return "+".join(dict.fromkeys(p.recipe.name for p in plans)) or "attention"


def _folder(folder: Path, force: bool) -> Path:
    """``folder``, created if missing; refused when it holds a save and not ``force``."""
    if folder.exists() and not folder.is_dir():
        raise CheckpointError(f"cannot write {folder}: it is a file, not a folder")
    if not folder.parent.is_dir():
        raise CheckpointError(f"cannot write {folder}: folder {folder.parent} does not exist")
    taken = [n for n in (HUB_CONFIG, HUB_WEIGHTS) if (folder / n).exists()]
    if taken and not force:
        raise CheckpointError(
            f"{folder} already holds {', '.join(taken)}; pass force=True to overwrite, or another folder"
        )
    try:
        folder.mkdir(exist_ok=True)
    except OSError as error:
        raise CheckpointError(f"cannot write {folder}: {error.strerror or error}") from None
    return folder


def _timm_config(patched: nn.Module) -> dict[str, Any]:
    """The ``config.json`` timm's ``save_for_hf`` writes for ``patched``, as a dict."""
    from timm.models._hub import save_config_for_hf

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / HUB_CONFIG
        try:
            save_config_for_hf(patched, str(path))
        except Exception as error:
            raise CheckpointError(
                f"save_pretrained(): timm cannot describe this {type(patched).__name__} in a config.json "
                f"({shown(error_line(error), 200)})"
            ) from None
        config = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(config, dict):
        raise CheckpointError(
            f"save_pretrained(): timm wrote a config.json that is not an object: {shown(config)}"
        )
    return config
