"""Hugging Face transformers: a patched model saved to a folder and loaded back with its blocks,
and ``transformers.Trainer`` checkpoints that keep them.

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

A ``Trainer`` checkpoint (``checkpoint-N``) is written by the model's own ``save_pretrained``
and must keep ``model.safetensors``, which ``resume_from_checkpoint`` reads. The callback
:class:`KeepBlocks` turns each one, as it is saved, into the other form this module reads:

- ``model.safetensors``: rewritten as :func:`attn_inject.save` writes it (the same weights,
  with the manifest), so ``resume_from_checkpoint`` loads it as before;
- ``attn_inject_config.json`` in place of ``config.json``: the config with its
  ``"attn_inject"`` entry. Without ``config.json``, ``AutoModel.from_pretrained(checkpoint)``
  fails ("Unrecognized model") instead of dropping the blocks; an explicit class builds its
  default config and fails on the first weight whose shape differs from it::

    trainer = Trainer(model=patched, args=args, train_dataset=data, callbacks=[ai.hf.KeepBlocks()])
    trainer.train()
    again = ai.hf.from_pretrained(ResNetForImageClassification, "out/checkpoint-500")
"""

from __future__ import annotations

import functools
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

__all__ = ["CHECKPOINT_CONFIG", "CONFIG_KEY", "WEIGHTS", "KeepBlocks", "from_pretrained", "save_pretrained"]

WEIGHTS = "attn_inject.safetensors"
CONFIG_KEY = "attn_inject"  # the entry of config.json that says how the folder loads
CONFIG = "config.json"
# A Trainer checkpoint kept by KeepBlocks: its config (with the entry) under this name, and
# its weights where the Trainer reads them back.
CHECKPOINT_CONFIG = "attn_inject_config.json"
CHECKPOINT_WEIGHTS = "model.safetensors"
CHECKPOINT_PREFIX = "checkpoint"  # transformers.trainer_utils.PREFIX_CHECKPOINT_DIR
TRAINER_STATE = "trainer_state.json"  # what marks a folder as a Trainer checkpoint
MAX_CONFIG_BYTES = 4 << 20
# A transformers TrainerCallback, made on first use by __getattr__ below (declared, not
# assigned: importing attn_inject does not import transformers).
KeepBlocks: type


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


def _check_patched(model: nn.Module, where: str) -> None:
    if patched_record(model) is None:
        raise CheckpointError(
            f"{where} needs a model returned by attn_inject.inject (it has no attn_inject plan); "
            "save a plain model with its own save_pretrained"
        )


def _config_with_entry(patched: nn.Module, weights: str) -> dict[str, Any]:
    """``patched``'s config as transformers writes it, with the ``"attn_inject"`` entry."""
    cls = type(patched)
    config: dict[str, Any] = patched.config.to_diff_dict()  # type: ignore[operator,union-attr]
    config.pop(CONFIG_KEY, None)
    config["architectures"] = [cls.__name__]
    config[CONFIG_KEY] = {
        "weights": weights,
        "class": f"{cls.__module__}.{cls.__qualname__}",
        "load": f"attn_inject.hf.from_pretrained(transformers.{cls.__name__}, folder)",
        "note": "transformers' from_pretrained alone would drop the attention blocks",
    }
    return config


def _write_config(path: Path, config: Mapping[str, Any]) -> None:
    write_text_atomic(path, json.dumps(config, indent=2, sort_keys=True) + "\n")


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
    _check_patched(patched, "save_pretrained()")
    root = Path(folder)
    if root.exists() and not root.is_dir():
        raise CheckpointError(f"cannot write {root}: it is a file, not a folder")
    root.mkdir(parents=True, exist_ok=True)
    config_path = root / CONFIG
    if config_path.exists() and not force:
        raise CheckpointError(f"{config_path} exists; pass force=True to overwrite")
    config = _config_with_entry(patched, WEIGHTS)
    weights = root / WEIGHTS
    save(patched, weights, model_name="", force=force, training=training)
    _write_config(config_path, config)
    return weights


def from_pretrained(model_class: Any, folder: str | os.PathLike) -> nn.Module:
    """The patched model saved in ``folder``, with its weights: a folder written by
    :func:`save_pretrained`, or a ``Trainer`` checkpoint kept by :class:`KeepBlocks`.
    ``model_class`` builds the base from the folder's config: the saved class
    (``ResNetModel``) or an auto class (``AutoModel``). Nothing is downloaded."""
    transformers = _transformers()
    root = Path(folder)
    config_path, entry = _entry(root)
    try:
        config = transformers.AutoConfig.from_pretrained(str(config_path), local_files_only=True)
    except Exception as error:
        raise CheckpointError(f"{config_path}: transformers cannot read it ({shown(str(error))})") from None
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
                f"{config_path} ({type(error).__name__}: {shown(str(error))})"
            ) from None
    saved = entry["class"].rpartition(".")[2]
    if type(base).__name__ != saved:
        raise CheckpointError(
            f"{root} holds a {shown(saved)}; {shown(getattr(model_class, '__name__', model_class))} built "
            f"a {type(base).__name__}: pass transformers.{saved} or the auto class that builds it"
        )
    return load(root / entry["weights"], model=base.eval())


def _entry(root: Path) -> tuple[Path, dict[str, str]]:
    """The config file of ``root`` and its ``"attn_inject"`` entry, checked (the folder is
    untrusted): ``config.json`` naming ``attn_inject.safetensors``, or in a checkpoint kept
    by :class:`KeepBlocks`, ``attn_inject_config.json`` naming ``model.safetensors``."""
    path, weights = root / CONFIG, WEIGHTS
    if not path.is_file() and (root / CHECKPOINT_CONFIG).is_file():
        path, weights = root / CHECKPOINT_CONFIG, CHECKPOINT_WEIGHTS
    if not path.is_file():
        raise CheckpointError(
            f"{root} has no {CONFIG}: it was not written by attn_inject.hf.save_pretrained "
            "or kept by attn_inject.hf.KeepBlocks"
        )
    if path.stat().st_size > MAX_CONFIG_BYTES:
        raise CheckpointError(f"{path} is over {MAX_CONFIG_BYTES} bytes; a config is a few kB")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, RecursionError) as error:
        raise CheckpointError(f"{path} is not valid JSON ({shown(str(error))})") from None
    entry = data.get(CONFIG_KEY) if isinstance(data, dict) else None
    if entry is None and (root / TRAINER_STATE).is_file():
        raise CheckpointError(
            f"{root} is a transformers Trainer checkpoint saved without attn_inject.hf.KeepBlocks: its "
            f"{CONFIG} records no attention blocks; train with Trainer(..., callbacks=[ai.hf.KeepBlocks()])"
        )
    if entry is None:
        raise CheckpointError(
            f"{path} has no {CONFIG_KEY!r} entry: the folder holds a plain model; load it with "
            "transformers' from_pretrained"
        )
    ok = (
        isinstance(entry, dict)
        and entry.get("weights") == weights
        and isinstance(entry.get("class"), str)
        and 0 < len(entry["class"]) <= 200
    )
    if not ok:
        raise CheckpointError(
            f"{path}: entry {CONFIG_KEY!r} must name weights {weights!r} and the model's class, "
            f"got {shown(entry)}"
        )
    return path, entry


def _keep_checkpoint(patched: nn.Module, folder: str | os.PathLike, *, step: int | None = None) -> Path:
    """Turn ``folder``, a checkpoint the ``Trainer`` just wrote for ``patched``, into one that
    keeps its blocks: ``config.json`` moved to ``attn_inject_config.json`` with the
    ``"attn_inject"`` entry, ``model.safetensors`` rewritten with the manifest. Returns the
    weights file's path."""
    _check_hf_model(patched, "KeepBlocks")
    _check_patched(patched, "KeepBlocks")
    root = Path(folder)
    weights = root / CHECKPOINT_WEIGHTS
    if not weights.is_file():
        raise CheckpointError(
            f"{root} has no {CHECKPOINT_WEIGHTS}: KeepBlocks keeps the checkpoint the Trainer writes in "
            f"args.output_dir/{CHECKPOINT_PREFIX}-STEP as one {CHECKPOINT_WEIGHTS} (not sharded weights, "
            "not a hyperparameter search's run folders)"
        )
    config = _config_with_entry(patched, CHECKPOINT_WEIGHTS)
    # First the config goes: from here on a plain from_pretrained finds no config to build.
    (root / CONFIG).unlink(missing_ok=True)
    training = {"trainer": "transformers.Trainer"} | ({"global_step": step} if step is not None else {})
    save(patched, weights, model_name="", force=True, training=training)
    _write_config(root / CHECKPOINT_CONFIG, config)
    return weights


@functools.cache
def _keep_blocks_class() -> type:
    transformers = _transformers()

    class KeepBlocks(transformers.TrainerCallback):  # type: ignore[name-defined]
        """A ``transformers.Trainer`` callback whose checkpoints keep the attention blocks::

            trainer = Trainer(model=patched, args=args, ..., callbacks=[ai.hf.KeepBlocks()])

        Each ``checkpoint-N`` is kept as it is saved (see :func:`_keep_checkpoint`):
        ``ai.hf.from_pretrained(ModelClass, checkpoint)`` rebuilds the patched model with
        the trained weights, ``trainer.train(resume_from_checkpoint=...)`` resumes from it
        as before, and a plain ``from_pretrained`` finds no ``config.json``. The
        run is refused at its start if the model is not patched, or if ``push_to_hub`` is
        on (the Trainer pushes a checkpoint before any callback sees it)."""

        def on_train_begin(
            self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any
        ) -> None:
            if model is None:
                return
            _check_hf_model(model, "KeepBlocks")
            if patched_record(model) is None:
                raise CheckpointError(
                    f"KeepBlocks: the Trainer's model ({type(model).__name__}) has no attention blocks; "
                    "train the model attn_inject.inject returned"
                )
            if getattr(args, "push_to_hub", False):
                raise CheckpointError(
                    "KeepBlocks cannot keep the blocks in checkpoints the Trainer pushes (push_to_hub=True "
                    "pushes them before callbacks run); train without it and push a folder written by "
                    "attn_inject.hf.save_pretrained"
                )

        def on_save(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
            if not args.should_save or model is None:
                return
            folder = Path(args.output_dir) / f"{CHECKPOINT_PREFIX}-{state.global_step}"
            _keep_checkpoint(model, folder, step=state.global_step)

    KeepBlocks.__module__ = __name__
    KeepBlocks.__qualname__ = "KeepBlocks"
    return KeepBlocks


def __getattr__(name: str) -> Any:
    # KeepBlocks subclasses transformers' TrainerCallback: made on first use, so that
    # importing attn_inject does not import transformers.
    if name == "KeepBlocks":
        return _keep_blocks_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
