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

import contextlib
import copy
import functools
import json
import math
import os
import re
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.modules.module import (
    register_module_buffer_registration_hook,
    register_module_module_registration_hook,
    register_module_parameter_registration_hook,
)

from ..core.files import write_text_atomic
from ..core.messages import cut, shown
from ..core.randomness import own_random_state
from ..core.values import is_int
from ..models.build import ModelKwargsError, check_model_kwargs
from ..surgery.record import patched_record
from .checkpoint import CheckpointError, read_safetensors_shapes
from .file import (
    check_base_against_file,
    checked_path,
    load_on_own_base,
    read_config_json,
    read_manifest,
    save,
)

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

# What a config.json may not say, wherever it says it: these keys choose code (a module to
# import, an attention kernel fetched from the Hub) rather than a shape.
CODE_KEYS = frozenset(
    {
        "auto_map",
        "custom_pipelines",
        "attn_implementation",
        "_attn_implementation",
        "_attn_implementation_internal",
        "experts_implementation",
        "_experts_implementation",
    }
)
# The dtypes a config may build its model in (transformers reads any other name as an
# attribute of torch).
CONFIG_DTYPES = frozenset({"float16", "bfloat16", "float32", "float64"})
# A timm model name, with or without its pretrained tag: no source ("hf-hub:", "local-dir:"),
# no path, nothing for timm to download or open.
_TIMM_NAME = re.compile(r"[A-Za-z0-9_]{1,100}(\.[A-Za-z0-9_]{1,100})?")
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


def _config_text(config: Mapping[str, Any], where: str) -> str:
    """``config`` as the JSON text written to ``config.json``: checked as
    :func:`from_pretrained` checks it, so a folder that would not load is not written."""
    _check_config_data(config, where)
    try:
        return json.dumps(config, indent=2, sort_keys=True) + "\n"
    except (TypeError, ValueError) as error:
        raise CheckpointError(
            f"{where}: the model's config cannot be written as JSON ({shown(str(error))}); keep only plain "
            "values (numbers, strings, lists, dicts) on model.config"
        ) from None


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
    root = checked_path(folder, "save_pretrained(folder)")
    if root.exists() and not root.is_dir():
        raise CheckpointError(f"cannot write {root}: it is a file, not a folder")
    config_path = root / CONFIG
    if config_path.exists() and not force:
        raise CheckpointError(f"{config_path} exists; pass force=True to overwrite")
    # Everything that can be refused is refused before anything is written.
    text = _config_text(_config_with_entry(patched, WEIGHTS), f"save_pretrained(): {config_path}")
    root.mkdir(parents=True, exist_ok=True)
    weights = root / WEIGHTS
    save(patched, weights, model_name="", force=force, training=training)
    write_text_atomic(config_path, text)
    return weights


def from_pretrained(model_class: Any, folder: str | os.PathLike) -> nn.Module:
    """The patched model saved in ``folder``, with its weights: a folder written by
    :func:`save_pretrained`, or a ``Trainer`` checkpoint kept by :class:`KeepBlocks`.
    ``model_class`` builds the base from the folder's config: the saved class
    (``ResNetModel``) or an auto class (``AutoModel``). Nothing is downloaded, no code the
    folder names is run, and nothing is allocated before the model the config describes,
    built on the meta device, is found to fit the weights file's tensors."""
    transformers = _transformers()
    root = checked_path(folder, "from_pretrained(folder)")
    config_path, entry, data = _entry(root)
    weights = root / entry["weights"]
    read_manifest(weights)  # a file written by attn_inject.save, before its tensors are listed
    shapes = read_safetensors_shapes(weights)
    _check_config_data(data, str(config_path), largest=_largest_size(shapes))
    try:
        config = transformers.AutoConfig.from_pretrained(
            str(config_path), local_files_only=True, trust_remote_code=False
        )
    except Exception as error:
        raise CheckpointError(f"{config_path}: transformers cannot read it ({shown(str(error))})") from None
    if hasattr(config, CONFIG_KEY):
        delattr(config, CONFIG_KEY)
    saved = entry["class"].rpartition(".")[2]
    with own_random_state():  # the base's random init is overwritten; the caller's RNG is kept
        twin = _shapes_only(model_class, config, shapes, config_path, weights)
        if type(twin).__name__ != saved:
            raise CheckpointError(
                f"{root} holds a {shown(saved)}; {_name(model_class)} builds a {type(twin).__name__}: pass "
                f"transformers.{saved} or the auto class that builds it"
            )
        check_base_against_file(twin, shapes, weights, f"the {type(twin).__name__} {config_path} describes")
        del twin
        base = _built(model_class, config, config_path)
    return load_on_own_base(weights, base.eval())


def _name(model_class: Any) -> str:
    return shown(getattr(model_class, "__name__", model_class))


def _build(model_class: Any, config: Any) -> nn.Module:
    if hasattr(model_class, "from_config"):
        return model_class.from_config(config)
    return model_class(config)


def _built(model_class: Any, config: Any, config_path: Path) -> nn.Module:
    try:
        return _build(model_class, config)
    except Exception as error:
        raise CheckpointError(
            f"{_name(model_class)} cannot build the model of {config_path} "
            f"({type(error).__name__}: {shown(str(error))})"
        ) from None


class _Budget:
    """How much a model built from a config may register, from the weights file it must fit:
    its own tensors, a margin for buffers a file does not hold (position indices), and the
    modules that hold them. Counted as modules register them, on this thread only."""

    def __init__(self, shapes: Mapping[str, tuple[int, ...]]) -> None:
        values = sum(math.prod(shape) for shape in shapes.values())
        self.limits = (2 * len(shapes) + 256, 2 * values + (1 << 22), 4 * len(shapes) + 1024)
        self.used = [0, 0, 0]
        self.exceeded = False
        self.thread = threading.get_ident()

    def count(self, tensors: int, values: int, modules: int) -> None:
        if threading.get_ident() != self.thread:
            return
        for i, n in enumerate((tensors, values, modules)):
            self.used[i] += n
        if any(used > limit for used, limit in zip(self.used, self.limits, strict=True)):
            self.exceeded = True
            raise _OverBudget


class _OverBudget(Exception):
    """A model being built registered more than its weights file justifies."""


@contextlib.contextmanager
def _counted(budget: _Budget, *, to_meta: bool) -> Iterator[None]:
    """``budget`` charged for every tensor and module registered while the block runs; with
    ``to_meta``, each parameter and buffer is moved to the meta device as it is registered."""

    def on_parameter(module: nn.Module, name: str, param: nn.Parameter | None) -> nn.Parameter | None:
        if param is None or threading.get_ident() != budget.thread:
            return None
        budget.count(1, param.numel(), 0)
        if to_meta and not param.is_meta:
            return nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        return None

    def on_buffer(module: nn.Module, name: str, buffer: torch.Tensor | None) -> torch.Tensor | None:
        if buffer is None or threading.get_ident() != budget.thread:
            return None
        budget.count(1, buffer.numel(), 0)
        return buffer.to("meta") if to_meta and not buffer.is_meta else None

    def on_module(module: nn.Module, name: str, child: nn.Module | None) -> None:
        if child is not None:
            budget.count(0, 0, 1)

    handles = [
        # torch's hints say these hooks return None; a returned tensor replaces the registered one
        register_module_parameter_registration_hook(on_parameter),  # type: ignore[arg-type]
        register_module_buffer_registration_hook(on_buffer),  # type: ignore[arg-type]
        register_module_module_registration_hook(on_module),
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _shapes_only(
    model_class: Any, config: Any, shapes: Mapping[str, tuple[int, ...]], config_path: Path, weights: Path
) -> nn.Module:
    """The model ``config`` describes, every tensor on the meta device, built only as far as
    ``weights``' tensors justify: a config that asks for more is refused while it is built.
    Built under ``torch.device("meta")``; a model that needs real values while it is built
    (a ``.item()`` of a drop-path schedule) is built on the CPU, each tensor moved to the meta
    device as it is registered."""
    last: Exception | None = None
    for to_meta in (False, True):
        budget = _Budget(shapes)
        try:
            with _counted(budget, to_meta=to_meta), torch.device("meta" if not to_meta else "cpu"):
                return _build(model_class, copy.deepcopy(config))
        except Exception as error:
            if budget.exceeded:
                tensors, values, _ = budget.limits
                raise CheckpointError(
                    f"{config_path} describes a larger model than {weights.name} holds (past {tensors:,} "
                    f"tensors or {values:,} values, {len(shapes):,} tensors in the file); the config and the "
                    "weights are not from one model"
                ) from None
            last = error
    assert last is not None
    raise CheckpointError(
        f"{_name(model_class)} cannot build the model of {config_path} "
        f"({type(last).__name__}: {shown(str(last))})"
    ) from None


def _entry(root: Path) -> tuple[Path, dict[str, str], dict[str, Any]]:
    """The config file of ``root``, its ``"attn_inject"`` entry, checked (the folder is
    untrusted): ``config.json`` naming ``attn_inject.safetensors``, or in a checkpoint kept
    by :class:`KeepBlocks`, ``attn_inject_config.json`` naming ``model.safetensors``; and
    the whole config as read, for :func:`_check_config_data`."""
    path, weights = root / CONFIG, WEIGHTS
    if not path.exists() and (root / CHECKPOINT_CONFIG).exists():
        path, weights = root / CHECKPOINT_CONFIG, CHECKPOINT_WEIGHTS
    data = read_config_json(
        path,
        f"{root} has no {CONFIG}: it was not written by attn_inject.hf.save_pretrained "
        "or kept by attn_inject.hf.KeepBlocks",
    )
    entry = data.get(CONFIG_KEY)
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
    return path, entry, data


def _largest_size(shapes: Mapping[str, tuple[int, ...]]) -> int:
    """The largest number a config of the model whose tensors have ``shapes`` needs: a width,
    a class count or a table length is a tensor's dimension, a layer count at most the number
    of tensors; sizes that are no dimension (an image size) fit under 65,536."""
    return max([1 << 16, len(shapes), *(max(shape, default=0) for shape in shapes.values())])


def _check_config_data(config: Mapping[str, Any], where: str, *, largest: int | None = None) -> None:
    """Refuse a config (and each config nested in it) that says more than shapes and
    settings: a key that names code to run (:data:`CODE_KEYS`), a backbone for transformers
    to look up on the Hub or on disk, pretrained backbone weights, a dtype that is not a
    float type, or a timm model behind a source or with arguments that load or download.
    With ``largest``, also an integer above it: transformers builds lists and dicts as long
    as a count (``num_labels`` gives ``id2label``, a layer count a list of layer types)
    before any weight is checked."""

    def refuse(key: str, why: str) -> CheckpointError:
        return CheckpointError(
            f"{where}: {cut(key, 120)} {why}; a config saved with a model holds only its shapes and settings"
        )

    stack: list[tuple[str, Any]] = [("", config)]  # a stack, not recursion: any nesting is walked
    while stack:
        prefix, value = stack.pop()
        if isinstance(value, list):
            stack.extend((f"{prefix}[{i}]", item) for i, item in enumerate(value))
            continue
        if largest is not None and is_int(value) and value > largest:
            raise refuse(
                prefix,
                f"is {value:,}, more than any size or count of the model its weights hold (at most "
                f"{largest:,})",
            )
        if not isinstance(value, Mapping):
            continue
        kind = value.get("model_type")
        for key, item in value.items():
            name = f"{prefix}.{key}" if prefix else str(key)
            named = isinstance(item, str) and _TIMM_NAME.fullmatch(item) is not None
            if key in CODE_KEYS:
                raise refuse(name, "names code to run (remote code or an attention kernel) and is not read")
            if key == "use_pretrained_backbone" and item:
                raise refuse(name, "asks for pretrained backbone weights, which would be downloaded")
            if key == "backbone" and item is not None and not (kind == "timm_backbone" and named):
                raise refuse(
                    name,
                    f"is {shown(item, 60)}: a named backbone is looked up on the Hugging Face Hub or on "
                    "disk; only a timm model name in a timm_backbone config is read",
                )
            if key in ("dtype", "torch_dtype") and not _is_config_dtype(item):
                raise refuse(name, f"is {shown(item, 40)}; allowed: null, {', '.join(sorted(CONFIG_DTYPES))}")
            if kind == "timm_wrapper" and key == "architecture" and not named:
                raise refuse(name, f"is {shown(item, 60)}; a timm model name is needed (no source, no path)")
            if kind == "timm_wrapper" and key == "model_args" and item is not None:
                try:
                    check_model_kwargs(item, name)
                except ModelKwargsError as error:
                    raise CheckpointError(f"{where}: {cut(str(error), 400)}") from None
            stack.append((name, item))


def _is_config_dtype(value: Any) -> bool:
    if isinstance(value, Mapping):
        return all(_is_config_dtype(v) and not isinstance(v, Mapping) for v in value.values())
    return value is None or (isinstance(value, str) and value in CONFIG_DTYPES)


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
    where = f"KeepBlocks: {root / CHECKPOINT_CONFIG}"
    text = _config_text(_config_with_entry(patched, CHECKPOINT_WEIGHTS), where)
    # The config with the entry is written before the plain one goes, and the plain one goes
    # before the weights are rewritten: the folder never holds neither (a write that fails
    # leaves the config), and from here on a plain from_pretrained finds no config to build.
    write_text_atomic(root / CHECKPOINT_CONFIG, text)
    (root / CONFIG).unlink(missing_ok=True)
    training = {"trainer": "transformers.Trainer"} | ({"global_step": step} if step is not None else {})
    save(patched, weights, model_name="", force=True, training=training)
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
