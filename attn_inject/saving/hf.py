"""Hugging Face transformers: a patched model saved to a folder and loaded back with its blocks.

transformers' own ``save_pretrained`` writes the blocks' tensors, but its ``from_pretrained``
builds the plain model from ``config.json`` and drops them, logging only that the unexpected
keys "can be ignored": a different network, silently. Here a folder holds:

- ``config.json``: the model's config as transformers writes it, plus an ``"attn_inject"``
  entry naming the weights file, the model's class and the line that loads it;
- ``attn_inject.safetensors``: every weight, blocks included, with attn-inject's manifest
  (the recipe, init, plan and architecture: the file :func:`attn_inject.save` writes).

There is no ``model.safetensors``, so ``ResNetModel.from_pretrained(folder)`` fails ("no
file named model.safetensors") instead of returning the model without its blocks.
:func:`from_pretrained` builds the base model from the config, injects the recorded recipe
again, checks it against the file's plan, architecture and tensor shapes, and loads every
weight strictly::

    import attn_inject as ai
    from transformers import ResNetConfig, ResNetModel

    model = ResNetModel(ResNetConfig()).eval()
    patched = ai.inject(model, "se_after_every_stage", input_size=(3, 224, 224))
    ai.hf.save_pretrained(patched, "out/")
    again = ai.hf.from_pretrained(ResNetModel, "out/")   # or AutoModel
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import nn

from ..core.files import write_text_atomic
from ..core.messages import shown
from ..core.randomness import own_random_state
from ..surgery.record import patched_record
from .checkpoint import CheckpointError
from .file import load, save

__all__ = ["CONFIG_KEY", "WEIGHTS", "from_pretrained", "save_pretrained"]

WEIGHTS = "attn_inject.safetensors"
CONFIG_KEY = "attn_inject"  # the entry of config.json that says how the folder loads
CONFIG = "config.json"
MAX_CONFIG_BYTES = 4 << 20


def _transformers() -> Any:
    try:
        import transformers
    except ImportError:
        raise CheckpointError(
            "attn_inject.hf needs Hugging Face transformers: pip install 'attn-inject[hf]'"
        ) from None
    return transformers


def _check_hf_model(model: nn.Module, where: str) -> None:
    transformers = _transformers()
    if not isinstance(model, transformers.PreTrainedModel):
        raise CheckpointError(
            f"{where} takes a Hugging Face transformers model (a PreTrainedModel), got "
            f"{type(model).__name__}; save other models with attn_inject.save"
        )


def save_pretrained(
    patched: nn.Module,
    folder: str | os.PathLike,
    *,
    force: bool = False,
    training: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``patched`` (a transformers model returned by ``inject``) to ``folder``: its
    ``config.json`` (with the ``"attn_inject"`` entry) and ``attn_inject.safetensors``.
    Files already there are kept unless ``force``. Returns the weights file's path."""
    _check_hf_model(patched, "save_pretrained()")
    if patched_record(patched) is None:
        raise CheckpointError(
            "save_pretrained() needs a model returned by attn_inject.inject (it has no attn_inject plan); "
            "save a plain model with its own save_pretrained"
        )
    root = Path(folder)
    if root.exists() and not root.is_dir():
        raise CheckpointError(f"cannot write {root}: it is a file, not a folder")
    root.mkdir(parents=True, exist_ok=True)
    config_path = root / CONFIG
    if config_path.exists() and not force:
        raise CheckpointError(f"{config_path} exists; pass force=True to overwrite")
    cls = type(patched)
    config: dict[str, Any] = patched.config.to_diff_dict()  # type: ignore[operator,union-attr]
    config.pop(CONFIG_KEY, None)
    config["architectures"] = [cls.__name__]
    config[CONFIG_KEY] = {
        "weights": WEIGHTS,
        "class": f"{cls.__module__}.{cls.__qualname__}",
        "load": f"attn_inject.hf.from_pretrained(transformers.{cls.__name__}, folder)",
        "note": "transformers' from_pretrained alone would drop the attention blocks",
    }
    weights = root / WEIGHTS
    save(patched, weights, model_name="", force=force, training=training)
    write_text_atomic(config_path, json.dumps(config, indent=2, sort_keys=True) + "\n")
    return weights


def from_pretrained(model_class: Any, folder: str | os.PathLike) -> nn.Module:
    """The patched model saved in ``folder`` by :func:`save_pretrained`, with its weights.
    ``model_class`` builds the base from the folder's config: the saved class
    (``ResNetModel``) or an auto class (``AutoModel``). Nothing is downloaded."""
    transformers = _transformers()
    root = Path(folder)
    entry = _entry(root)
    try:
        config = transformers.AutoConfig.from_pretrained(str(root), local_files_only=True)
    except Exception as error:
        raise CheckpointError(f"{root / CONFIG}: transformers cannot read it ({shown(str(error))})") from None
    if hasattr(config, CONFIG_KEY):
        delattr(config, CONFIG_KEY)
    with own_random_state():  # the base's random init is overwritten; the caller's RNG is kept
        try:
            if hasattr(model_class, "from_config"):
                base = model_class.from_config(config)
            else:
                base = model_class(config)
        except Exception as error:
            raise CheckpointError(
                f"{shown(getattr(model_class, '__name__', model_class))} cannot build the model of "
                f"{root / CONFIG} ({type(error).__name__}: {shown(str(error))})"
            ) from None
    saved = entry["class"].rpartition(".")[2]
    if type(base).__name__ != saved:
        raise CheckpointError(
            f"{root} holds a {shown(saved)}; {shown(getattr(model_class, '__name__', model_class))} built "
            f"a {type(base).__name__}: pass transformers.{saved} or the auto class that builds it"
        )
    return load(root / WEIGHTS, model=base.eval())


def _entry(root: Path) -> dict[str, str]:
    """The ``"attn_inject"`` entry of ``root/config.json``, checked (the folder is untrusted)."""
    path = root / CONFIG
    if not path.is_file():
        raise CheckpointError(f"{root} has no {CONFIG}: it was not written by attn_inject.hf.save_pretrained")
    if path.stat().st_size > MAX_CONFIG_BYTES:
        raise CheckpointError(f"{path} is over {MAX_CONFIG_BYTES} bytes; a config is a few kB")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, RecursionError) as error:
        raise CheckpointError(f"{path} is not valid JSON ({shown(str(error))})") from None
    entry = data.get(CONFIG_KEY) if isinstance(data, dict) else None
    if entry is None:
        raise CheckpointError(
            f"{path} has no {CONFIG_KEY!r} entry: the folder holds a plain model; load it with "
            "transformers' from_pretrained"
        )
    ok = (
        isinstance(entry, dict)
        and entry.get("weights") == WEIGHTS
        and isinstance(entry.get("class"), str)
        and 0 < len(entry["class"]) <= 200
    )
    if not ok:
        raise CheckpointError(
            f"{path}: entry {CONFIG_KEY!r} must name weights {WEIGHTS!r} and the model's class, "
            f"got {shown(entry)}"
        )
    return entry
