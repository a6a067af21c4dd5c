"""``save`` / ``load``: a patched model as one safetensors file with a manifest.

The file holds every weight of the patched model (the base model's keys unchanged, the
blocks' next to them) and, in its metadata, a JSON manifest: the base model's name and
builder arguments, the recipe's full text, init, target, input size, the plan, the
architecture (every module's name, class and ``extra_repr``) and the versions that wrote it.

A saved file rebuilds exactly the saved network, or nothing:

- ``save`` rebuilds the model from what it records, on the meta device, and refuses when
  that is not the network being saved (a builder argument it could not know);
- ``load`` treats the file as untrusted data: the manifest is checked field by field, its
  recipe is parsed as recipe text only (never as a name or a path), its builder arguments
  are limited to those that shape the architecture or describe its data (never ones that
  load, download or name a file), and the model is rebuilt on the meta device and compared
  with the file's tensor shapes and recorded architecture before anything is allocated.
  Nothing is unpickled.

``load`` also reads the two other forms a patched model takes outside this package: a folder
in timm's hub layout (``config.json`` + ``model.safetensors``, written by
``attn_inject.saving.hub.save_pretrained``), and a timm training checkpoint (``.pth.tar``), whose
weights are loaded into the network that the file its run started from describes.
"""

from __future__ import annotations

import copy
import json
import os
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..core.errors import InputError, InputTypeError
from ..core.files import NotRegularFileError, file_kind, open_regular
from ..core.messages import cut, shown
from ..core.randomness import own_random_state
from ..core.values import is_int
from ..recipes.recipe import INIT_MODES, Recipe, RecipeError, parse_recipe_text
from ..surgery.record import patched_record
from .architecture import Architecture, ModuleEntry, architecture, first_difference
from .checkpoint import (
    TORCH_SUFFIXES,
    CheckpointError,
    check_fits,
    is_torch_file_name,
    read_safetensors_metadata,
    read_safetensors_shapes,
    read_state_dict,
    read_training_checkpoint,
    write_safetensors,
)

__all__ = [
    "FORMAT",
    "HUB_CONFIG",
    "HUB_KEY",
    "HUB_WEIGHTS",
    "Manifest",
    "checked_path",
    "load",
    "manifest_of",
    "read_config_json",
    "read_manifest",
    "save",
    "weights_path",
    "write_weights",
]

FORMAT = 1
MANIFEST_KEY = "attn_inject.manifest"
MAX_MANIFEST_CHARS = 4 << 20  # a manifest is a few kB per hundred modules
MAX_RECIPE_CHARS = 1 << 16
MAX_INPUT_ELEMENTS = 1 << 24  # one sample of the shape-inference input: 64 MB in float32
_TARGET = re.compile(r"[\w.]{0,200}")

# timm's hub layout (timm.models._hub: save_for_hf, push_to_hf_hub): a folder holding these.
HUB_CONFIG = "config.json"
HUB_WEIGHTS = "model.safetensors"
HUB_KEY = "attn_inject"  # config.json's entry for what timm's own fields cannot say
MAX_CONFIG_BYTES = 8 << 20  # ImageNet-21k's label names and descriptions fit in a few MB
# What config.json records of the manifest, each equal to model.safetensors' own.
HUB_FIELDS = (
    "base_model",
    "base_kwargs",
    "recipe",
    "init",
    "target",
    "input_size",
    "plan",
    "blocks",
    "later",
)
# The attribute of a timm model entrypoint made by register_timm_model: the file it rebuilds.
REGISTERED_SOURCE = "attn_inject_source"


@dataclass(frozen=True)
class Injection:
    """One ``inject`` call a saved model went through: recipe text, init, target, input size."""

    recipe: str
    init: str
    target: str
    input_size: tuple[int, ...]


MAX_INJECTIONS = 16


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
    architecture: tuple[ModuleEntry, ...] = ()  # the patched model's modules, in order
    attributes: tuple[tuple[str, str], ...] = ()  # their plain attributes (see architecture.py)
    blocks: tuple[str, ...] = ()  # the inserted blocks' qualified module names
    later: tuple[Injection, ...] = ()  # injections into the patched model after the first
    format: int = FORMAT
    training: Mapping[str, Any] | None = None  # the fine-tuning run that wrote it, if any

    def to_json(self) -> str:
        out = asdict(self)
        out["input_size"] = list(self.input_size)
        out["architecture"] = [list(entry) for entry in self.architecture]
        out["attributes"] = [list(entry) for entry in self.attributes]
        out["blocks"] = list(self.blocks)
        out["later"] = [{**asdict(step), "input_size": list(step.input_size)} for step in self.later]
        return json.dumps(out, sort_keys=True)

    @property
    def injections(self) -> tuple[Injection, ...]:
        """Every injection the saved model went through, in order."""
        return (Injection(self.recipe, self.init, self.target, self.input_size), *self.later)

    @property
    def block_keys(self) -> list[str]:
        return [p["key"] for p in self.plan.get("points", [])]


def versions() -> dict[str, str]:
    import torchvision

    from .._version import __version__

    out = {"attn_inject": __version__, "torch": torch.__version__, "torchvision": torchvision.__version__}
    try:
        import timm

        out["timm"] = timm.__version__
    except ImportError:
        pass
    return out


def refuse_wrapper(model: nn.Module, where: str) -> None:
    """A clear error for a model inside a DataParallel / DDP / torch.compile wrapper."""
    from ..models.build import wrapper_of

    hint = wrapper_of(model)
    if hint is not None:
        raise CheckpointError(f"{where} got {hint}")


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
    yourself: ``model_name="tv:resnet18"``; a timm model built with ``act_layer="gelu"``:
    ``model_kwargs={"act_layer": "gelu"}``). Without ``model_kwargs``, what timm keeps on a
    timm model is recorded as it is now: its class count and pooling (``reset_classifier``
    before or after ``inject``), ``features_only`` and ``out_indices``, its drop-path rate
    and its ``pretrained_cfg`` (as ``pretrained_cfg_overlay``). A model whose builder is not
    known is refused unless ``model_name=""``, which records no name: the file is then
    loaded with ``load(path, model=...)``.

    The model named is rebuilt on the meta device and compared with ``patched``; if they
    differ the file is not written and the error says where. ``training`` (plain values)
    records the fine-tuning run that produced the weights in the manifest."""
    manifest = manifest_of(patched, model_name=model_name, model_kwargs=model_kwargs, training=training)
    write_weights(path, patched.state_dict(), manifest, force=force)
    return manifest


def manifest_of(
    patched: nn.Module,
    *,
    model_name: str | None = None,
    model_kwargs: Mapping[str, Any] | None = None,
    training: Mapping[str, Any] | None = None,
) -> Manifest:
    """The manifest :func:`save` writes for ``patched``, checked as ``save`` checks it, nothing
    written. With :func:`write_weights`, a caller can write weights it copied earlier (a
    fine-tuning run writes an epoch's weights while the next one trains)."""
    from ..surgery.record import inserted_blocks

    refuse_wrapper(patched, "save()")
    info = patched_record(patched)
    if info is None:
        raise CheckpointError(
            "save() needs a model returned by attn_inject.inject (it has no attn_inject plan)"
        )
    name, kwargs = _base_named(patched, info, model_name, model_kwargs)
    steps = [
        Injection(p.recipe.text, p.init, p.target, tuple(p.input_size))
        for p in getattr(info, "plans", (info.plan,))
    ]
    saved = architecture(patched)
    if name is not None:
        _check_rebuilds_once(saved, name, kwargs, steps)
    first = steps[0]
    manifest = Manifest(
        base_model=name,
        base_kwargs=kwargs,
        recipe=first.recipe,
        init=first.init,
        target=first.target,
        input_size=first.input_size,
        plan=info.plan.to_dict(),
        versions=versions(),
        architecture=saved.modules,
        attributes=saved.attributes,
        blocks=tuple(inserted_blocks(patched)),
        later=tuple(steps[1:]),
        training=dict(training) if training is not None else None,
    )
    _check_plain(training)
    return manifest


def write_weights(
    path: str | os.PathLike, tensors: Mapping[str, torch.Tensor], manifest: Manifest, *, force: bool = False
) -> None:
    """``tensors`` (the state dict of the model ``manifest`` describes) and ``manifest`` to
    ``path``, atomically, as :func:`save` writes them."""
    write_safetensors(path, tensors, {MANIFEST_KEY: manifest.to_json()}, force=force)


def _check_plain(training: Mapping[str, Any] | None) -> None:
    if training is None:
        return
    try:
        json.dumps(training)
    except (TypeError, ValueError) as error:
        raise CheckpointError(
            f"save(training=...) must be plain values (numbers, strings, lists, dicts): {shown(str(error))}"
        ) from None


def _base_named(
    patched: nn.Module, info: Any, model_name: str | None, model_kwargs: Mapping[str, Any] | None
) -> tuple[str | None, dict[str, Any]]:
    """The base model's qualified name (None: saved unnamed) and builder arguments, from the
    caller or the patched model's record; refused when no builder is known."""
    from ..models.build import ModelKwargsError, check_model_kwargs, resolve, timm_kwargs_of

    name = getattr(info, "base_model", None) if model_name is None else model_name or None
    if name is None and model_name is None:
        raise CheckpointError(
            f"cannot save: which builder made this {type(patched).__name__} is not known (it was not built "
            "by timm.create_model or attn_inject.models.build_model), so ai.load(path) could not rebuild "
            "it; pass model_name='tv:NAME' or 'timm:NAME' (and model_kwargs=), or model_name='' to save it "
            "unnamed and load it with ai.load(path, model=...)"
        )
    recorded = dict(getattr(info, "base_kwargs", ()) or ()) if model_name is None else {}
    qualified = ":".join(resolve(name)) if name is not None else None
    try:
        if model_kwargs is None and qualified is not None:
            # What timm keeps on the model: changes made after it was built (reset_classifier) too.
            recorded = timm_kwargs_of(patched, qualified, recorded)
        kwargs = check_model_kwargs(model_kwargs if model_kwargs is not None else recorded, "model_kwargs")
    except ModelKwargsError as error:
        raise CheckpointError(f"cannot save: {error}") from None
    return qualified, kwargs


_REBUILDS_CHECKED: dict[tuple[Any, ...], None] = {}  # the last few architectures found to rebuild
_REBUILDS_KEPT = 8


def _check_rebuilds_once(
    saved: Architecture, name: str, kwargs: dict[str, Any], steps: list[Injection]
) -> None:
    """:func:`_check_rebuilds`, skipped for an architecture, builder and recipes it passed
    already (a fine-tuning run saves the same network after every epoch)."""
    try:
        key: tuple[Any, ...] | None = (saved, name, json.dumps(kwargs, sort_keys=True), tuple(steps))
        hash(key)
    except TypeError:  # values json or hash cannot take: check every time
        key = None
    if key is not None and key in _REBUILDS_CHECKED:
        return
    _check_rebuilds(saved, name, kwargs, steps)
    if key is not None:
        _REBUILDS_CHECKED[key] = None
        while len(_REBUILDS_CHECKED) > _REBUILDS_KEPT:
            del _REBUILDS_CHECKED[next(iter(_REBUILDS_CHECKED))]


def _check_rebuilds(saved: Architecture, name: str, kwargs: dict[str, Any], steps: list[Injection]) -> None:
    """Refuse to save what ``name(**kwargs)`` + the recipe would not rebuild."""
    fix = (
        "pass the arguments it was built with: ai.save(model, path, model_kwargs={...}), "
        "or build it with attn_inject.models.build_model, which records them, "
        'or save it unnamed (model_name="") and load it with ai.load(path, model=...)'
    )
    from ..models.build import build_shapes_only

    given = shown(kwargs, 200)
    try:
        base = build_shapes_only(name, **kwargs)
    except Exception as error:
        raise CheckpointError(
            f"cannot save: {name} with {given} cannot be built on the meta device to check that the file "
            f"will rebuild this model ({type(error).__name__}: {shown(str(error))}); {fix}"
        ) from None
    names = ("this model has", "the rebuilt one")
    try:
        rebuilt = _inject_all(base, [(parse_recipe_text(st.recipe, source="<saved>"), st) for st in steps])
    except Exception as error:
        # Most often the base itself differs (in_chans): say where, else why injection failed.
        diff = first_difference(saved, architecture(base), names=names, partial=True)
        if diff is None:
            raise CheckpointError(
                f"cannot save: {name} with {given}, rebuilt on the meta device, does not take the recipe "
                f"({type(error).__name__}: {shown(str(error))}); {fix}"
            ) from None
    else:
        diff = first_difference(saved, architecture(rebuilt), names=names)
    if diff is not None:
        raise CheckpointError(
            f"cannot save: rebuilding {name} with {given} gives a different network ({diff}); {fix}"
        )


def _inject_all(base: nn.Module, steps: list[tuple[Recipe, Injection]]) -> nn.Module:
    """``base`` with each injection repeated, in order."""
    from ..surgery.inject import inject

    patched = base
    for recipe, step in steps:
        patched = inject(
            patched, recipe, init=step.init, input_size=step.input_size, target=step.target, allow_empty=True
        )
    return patched


# --- reading: every field is untrusted --------------------------------------------------------


def _refuse_torch_file(path: str | os.PathLike) -> None:
    """A PyTorch checkpoint given where a converted file is expected: say how to convert it."""
    p = Path(path)
    try:
        with open_regular(p) as f:  # a FIFO is never opened for reading: it would wait for a writer
            head = f.read(4)
    except NotRegularFileError as error:
        raise CheckpointError(
            f"{p}: is {file_kind(error.mode)}, not a regular file; a saved model is a .safetensors file"
        ) from None
    except OSError:
        return  # the safetensors reader says what is wrong with the path
    # A zip (torch.save) cannot be a safetensors file (its header would be 67 MB); a pickle's
    # first byte (0x80) can start a safetensors header length, so it counts only by suffix.
    pickled = head[:1] == b"\x80" and p.suffix.lower() != ".safetensors"
    if p.suffix.lower() in TORCH_SUFFIXES or head.startswith(b"PK\x03\x04") or pickled:
        raise CheckpointError(
            f"{p} is a PyTorch checkpoint, not a file written by attn-inject; convert it first: "
            f"attn-inject convert --model NAME --checkpoint {p} --recipe RECIPE --out OUT.safetensors"
        )


def _bounded_int(text: str) -> int:
    if len(text) > 40:
        raise InputError(f"an integer of {len(text):,} digits; at most 40 are read")
    return int(text)


def read_manifest(path: str | os.PathLike) -> Manifest:
    """The manifest of a file written by :func:`save` (or of a hub folder's weights), checked
    field by field, or a clear error."""
    path = weights_path(path)
    _refuse_torch_file(path)
    metadata = read_safetensors_metadata(path)
    text = metadata.get(MANIFEST_KEY)
    if text is None:
        raise CheckpointError(
            f"{path} has no attn-inject manifest: "
            "it was not written by attn_inject.save / attn-inject convert"
        )
    if len(text) > MAX_MANIFEST_CHARS:
        raise CheckpointError(
            f"{path}: its attn-inject manifest is {len(text)} characters; "
            f"at most {MAX_MANIFEST_CHARS} are read"
        )
    try:
        data = json.loads(text, parse_int=_bounded_int)
    except RecursionError:
        raise CheckpointError(
            f"{path}: its attn-inject manifest is not valid JSON (nested too deeply)"
        ) from None
    except ValueError as error:
        raise CheckpointError(
            f"{path}: its attn-inject manifest is not valid JSON ({shown(str(error))})"
        ) from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: its attn-inject manifest must be a JSON object, got {shown(data)}")
    fmt = data.get("format")
    if not is_int(fmt) or fmt != FORMAT:
        wrote = (
            data.get("versions", {}).get("attn_inject") if isinstance(data.get("versions"), dict) else None
        )
        wrote = shown(wrote, 40) if isinstance(wrote, str) else "an unknown version"
        wrote = wrote.strip("'")
        raise CheckpointError(
            f"{path} was written by attn-inject {wrote} in file format {shown(fmt, 40)}; "
            f"this attn-inject reads format {FORMAT}"
        )
    return _ManifestReader(str(path), data).manifest()


class _ManifestReader:
    """Checks each manifest field's type and range; errors name the file and the field."""

    def __init__(self, path: str, data: dict[str, Any]) -> None:
        self.path = path
        self.data = data

    def fail(self, key: str, message: str) -> CheckpointError:
        return CheckpointError(f"{self.path}: manifest field {key!r}: {message}")

    def get(self, key: str, default: Any = ...) -> Any:
        if key not in self.data:
            if default is ...:
                raise self.fail(key, "missing; the file is damaged or was not written by attn-inject")
            return default
        return self.data[key]

    def string(self, key: str, limit: int, pattern: re.Pattern[str] | None = None) -> str:
        value = self.get(key)
        if not isinstance(value, str) or len(value) > limit:
            raise self.fail(key, f"must be a string of at most {limit} characters, got {shown(value)}")
        if pattern is not None and not pattern.fullmatch(value):
            raise self.fail(key, f"must be a dotted module name, got {shown(value)}")
        return value

    def manifest(self) -> Manifest:
        from ..models.build import ModelKwargsError, check_model_kwargs

        base_model = self.get("base_model")
        if base_model is not None and (not isinstance(base_model, str) or not 0 < len(base_model) <= 200):
            raise self.fail(
                "base_model", f"must be a model name such as 'timm:resnet50' or null, got {shown(base_model)}"
            )
        try:
            base_kwargs = check_model_kwargs(
                self.get("base_kwargs"), f"{self.path}: manifest field 'base_kwargs'"
            )
        except ModelKwargsError as error:
            raise CheckpointError(str(error)) from None
        init = self.get("init")
        if init not in INIT_MODES or not isinstance(init, str):
            raise self.fail("init", f"must be one of {', '.join(INIT_MODES)}, got {shown(init)}")
        return Manifest(
            base_model=base_model,
            base_kwargs=base_kwargs,
            recipe=self.string("recipe", MAX_RECIPE_CHARS),
            init=init,
            target=self.string("target", 200, _TARGET),
            input_size=self.input_size(),
            plan=self.plan(),
            versions=self.versions(),
            architecture=self.architecture(),
            attributes=self.attributes(),
            blocks=self.blocks(),
            later=self.later(),
            training=self.training(),
            format=FORMAT,
        )

    def later(self) -> tuple[Injection, ...]:
        value = self.get("later", [])
        if not isinstance(value, list) or len(value) > MAX_INJECTIONS:
            raise self.fail(
                "later", f"must be a list of at most {MAX_INJECTIONS} injections, got {shown(value)}"
            )
        steps = []
        for i, step in enumerate(value):
            if not isinstance(step, dict) or set(step) != {"recipe", "init", "target", "input_size"}:
                raise self.fail(
                    f"later[{i}]",
                    f"must be an object with recipe, init, target, input_size; got {shown(step)}",
                )
            reader = _ManifestReader(self.path, step)
            init = step["init"]
            if init not in INIT_MODES or not isinstance(init, str):
                raise reader.fail("init", f"must be one of {', '.join(INIT_MODES)}, got {shown(init)}")
            steps.append(
                Injection(
                    reader.string("recipe", MAX_RECIPE_CHARS),
                    init,
                    reader.string("target", 200, _TARGET),
                    reader.input_size(),
                )
            )
        return tuple(steps)

    def input_size(self) -> tuple[int, ...]:
        value = self.get("input_size")
        ok = (
            isinstance(value, list)
            and 2 <= len(value) <= 4
            and all(is_int(v) and 1 <= v <= 8192 for v in value)
        )
        if not ok or _product(value) > MAX_INPUT_ELEMENTS:
            raise self.fail(
                "input_size",
                f"must be 2 to 4 sizes from 1 to 8192 (C H W) with at most {MAX_INPUT_ELEMENTS} elements, "
                f"got {shown(value)}",
            )
        return tuple(value)

    def plan(self) -> dict[str, Any]:
        value = self.get("plan")
        points = value.get("points") if isinstance(value, dict) else None
        if not isinstance(points, list) or len(points) > 100_000:
            raise self.fail("plan", f"must be an object whose 'points' is a list, got {shown(value)}")
        for i, point in enumerate(points):
            if not isinstance(point, dict) or not isinstance(point.get("key"), str):
                raise self.fail(
                    "plan", f"points[{i}] must be an object with a string 'key', got {shown(point)}"
                )
        return value

    def versions(self) -> dict[str, str]:
        value = self.get("versions")
        if (
            not isinstance(value, dict)
            or len(value) > 16
            or not all(isinstance(k, str) and isinstance(v, str) and len(v) <= 64 for k, v in value.items())
        ):
            raise self.fail("versions", f"must map package names to version strings, got {shown(value)}")
        return value

    def architecture(self) -> tuple[ModuleEntry, ...]:
        value = self.get("architecture", [])
        ok = isinstance(value, list) and all(
            isinstance(e, list) and len(e) == 3 and all(isinstance(s, str) for s in e) for e in value
        )
        if not ok:
            raise self.fail(
                "architecture", f"must be a list of [name, class, extra_repr] strings, got {shown(value)}"
            )
        return tuple((e[0], e[1], e[2]) for e in value)

    def attributes(self) -> tuple[tuple[str, str], ...]:
        value = self.get("attributes", [])
        ok = isinstance(value, list) and all(
            isinstance(e, list) and len(e) == 2 and all(isinstance(s, str) for s in e) for e in value
        )
        if not ok:
            raise self.fail("attributes", f"must be a list of [name, attributes] strings, got {shown(value)}")
        return tuple((e[0], e[1]) for e in value)

    def training(self) -> dict[str, Any] | None:
        value = self.get("training", None)
        if value is not None and not isinstance(value, dict):
            raise self.fail("training", f"must be an object or null, got {shown(value)}")
        return value

    def blocks(self) -> tuple[str, ...]:
        value = self.get("blocks", [])
        if not isinstance(value, list) or not all(isinstance(b, str) for b in value):
            raise self.fail("blocks", f"must be a list of module names, got {shown(value)}")
        return tuple(value)


def _product(values: list[int]) -> int:
    out = 1
    for v in values:
        out *= v
    return out


def _recipe_of(manifest: Manifest, path: str | os.PathLike) -> Recipe:
    """The manifest's recipe, parsed as recipe text only: never a built-in name or a path."""
    return _recipe_text(manifest.recipe, path)


def _recipe_text(text: str, path: str | os.PathLike) -> Recipe:
    try:
        return parse_recipe_text(text, source=f"{path}: manifest recipe")
    except RecipeError as error:
        raise CheckpointError(str(error)) from None


def inject_recorded(
    base: nn.Module, manifest: Manifest, recipe: Recipe, path: str | os.PathLike
) -> nn.Module:
    """Every injection of the manifest repeated on ``base`` (the first recipe already parsed)."""
    later = [(_recipe_text(step.recipe, path), step) for step in manifest.later]
    return _inject_all(base, [(recipe, manifest.injections[0]), *later])


def _check_against_file(
    patched: nn.Module,
    manifest: Manifest,
    shapes: Mapping[str, tuple[int, ...]],
    path: str | os.PathLike,
    what: str,
) -> None:
    """Refuse unless ``patched`` (meta or real) has the file's blocks, tensor names and
    shapes, and the architecture its manifest records."""
    written = f"written by attn-inject {manifest.versions.get('attn_inject', '?')}"
    info = patched_record(patched)
    assert info is not None, "checked against a model built from the manifest's plan"
    keys = [p.key for p in info.plan]
    if keys != manifest.block_keys:
        if len(keys) != len(manifest.block_keys):
            why = f"gives {len(keys)} blocks, the file has {len(manifest.block_keys)}"
        else:
            i = next(i for i, (a, b) in enumerate(zip(keys, manifest.block_keys, strict=True)) if a != b)
            why = (
                f"places block {i} at {cut(keys[i])}, the file has it at {cut(manifest.block_keys[i])} "
                "(the model, or where this version places blocks, differs)"
            )
        raise CheckpointError(
            f"{path}: injecting its recipe into {what} {why} ({written}); is it the same model?"
        )
    as_meta = {k: torch.empty(s, device="meta") for k, s in shapes.items()}
    check_fits(patched, as_meta, source=f"checkpoint {path}")
    _check_plan(info.plan, manifest, path, what, written)
    if manifest.architecture:
        diff = first_difference(
            Architecture(manifest.architecture, attributes=manifest.attributes),
            architecture(patched),
            names=("the file has", "the rebuilt model"),
        )
        if diff is not None:
            drift = _version_drift(manifest)
            raise CheckpointError(
                f"{path}: {what} is not the network saved in the file ({diff}){drift}; "
                "pass the model it was saved from: attn_inject.load(path, model=...)"
            )


# What a point says about the network: where its block acts, how it is run, what it is.
NETWORK_FIELDS = ("key", "node", "consumers", "position", "attach", "argument", "block", "channels", "layout")


def _check_plan(plan: Any, manifest: Manifest, path: str | os.PathLike, what: str, written: str) -> None:
    """Refuse a file whose plan is not the plan its recipe gives: its weights were trained
    for blocks acting elsewhere, or differently, than the rebuilt network's."""
    saved = manifest.plan.get("points", [])
    for i, (ours, theirs) in enumerate(zip((p.to_dict() for p in plan), saved, strict=False)):
        for field in NETWORK_FIELDS:
            if not isinstance(theirs, Mapping) or theirs.get(field) != ours[field]:
                given = theirs.get(field) if isinstance(theirs, Mapping) else theirs
                raise CheckpointError(
                    f"{path}: plan point {i} ({cut(ours['key'])}) has {field}={shown(given, 80)}, but its "
                    f"recipe gives {field}={shown(ours[field], 80)} on {what} ({written}); the weights were "
                    "saved for another network"
                )


def check_base_against_file(
    base: nn.Module, shapes: Mapping[str, tuple[int, ...]], path: str | os.PathLike, what: str
) -> None:
    """Every tensor of the (meta) base model must be in the file with the same shape."""
    wrong = [
        cut(f"{k}: file {shapes.get(k, 'nothing')}, model {tuple(t.shape)}", 160)
        for k, t in base.state_dict().items()
        if shapes.get(k) != tuple(t.shape)
    ]
    if wrong:
        shown_wrong = "; ".join(wrong[:3]) + ("; ..." if len(wrong) > 3 else "")
        raise CheckpointError(
            f"{path}: {what} does not fit the file's tensors ({len(wrong)} differ: {shown_wrong}); "
            "the manifest does not describe these weights"
        )


def _version_drift(manifest: Manifest) -> str:
    changed = [
        f"{name} {shown(wrote, 40).strip(chr(39))} -> {now}"
        for name, now in versions().items()
        if name != "attn_inject" and (wrote := manifest.versions.get(name)) is not None and wrote != now
    ]
    return f" (written with other versions: {', '.join(changed)})" if changed else ""


def _checked_base(
    path: str | os.PathLike, model: nn.Module | None, *, build: bool = True
) -> tuple[Manifest, Recipe, nn.Module | None, Mapping[str, tuple[int, ...]]]:
    """The manifest, its recipe, and the base model to load into: ``model`` when given, else
    the model it names, built (unless ``build`` is false) only after its meta-device twin has
    matched the file."""
    from ..models.build import ModelNameError, build_model, build_shapes_only, resolve

    manifest = read_manifest(path)
    recipe = _recipe_of(manifest, path)
    shapes = read_safetensors_shapes(path)
    if model is not None:
        refuse_wrapper(model, "load(model=...)")
        check_base_against_file(model, shapes, path, f"the model given ({type(model).__name__})")
        return manifest, recipe, model, shapes
    if manifest.base_model is None:
        raise CheckpointError(
            f"{path} does not name its base model (it was saved from a model built outside timm / "
            "attn_inject.models); pass the base model: attn_inject.load(path, model=...)"
        )
    try:
        name = ":".join(resolve(manifest.base_model))
    except ModelNameError as error:
        raise CheckpointError(f"{path}: manifest field 'base_model': {error}") from None
    what = f"{name} with {shown(dict(manifest.base_kwargs), 200)}"
    try:
        twin_base = build_shapes_only(name, **manifest.base_kwargs)
    except Exception as error:
        raise CheckpointError(
            f"{path}: {what} cannot be built on the meta device, where the file is checked before anything "
            f"is allocated ({type(error).__name__}: {shown(str(error))}); "
            "pass the base model: attn_inject.load(path, model=...)"
        ) from None
    check_base_against_file(twin_base, shapes, path, what)
    try:
        twin = inject_recorded(twin_base, manifest, recipe, path)
    except Exception as error:
        raise CheckpointError(
            f"{path}: its recipe cannot be injected into {what} at input size {manifest.input_size} "
            f"({type(error).__name__}: {shown(str(error))})"
        ) from None
    _check_against_file(twin, manifest, shapes, path, what)
    return manifest, recipe, build_model(name, **manifest.base_kwargs) if build else None, shapes


def check_file(path: str | os.PathLike) -> tuple[Manifest, Recipe, Mapping[str, tuple[int, ...]]]:
    """Every check ``load`` makes before it allocates anything: the manifest, its recipe (from
    its text only), the base model it names rebuilt on the meta device and patched, against
    every tensor shape, the plan and the architecture the file records."""
    manifest, recipe, _, shapes = _checked_base(weights_path(path), None, build=False)
    return manifest, recipe, shapes


def load(
    path: str | os.PathLike,
    model: nn.Module | None = None,
    *,
    like: str | os.PathLike | None = None,
    use_ema: bool = False,
) -> nn.Module:
    """The patched model saved at ``path``, with its weights.

    ``path`` is a file written by :func:`save`, a folder in timm's hub layout
    (``attn_inject.save_pretrained``), or a timm training checkpoint (``.pth.tar``: weights
    only). The base model is rebuilt by name from the manifest (checked first on the meta
    device against every tensor shape and the recorded architecture), or ``model`` (the
    base, unpatched architecture) is used for a custom one: a deep copy of it, so that the
    model given stays as it was; the manifest's recipe is injected again and the weights
    loaded strictly.

    A training checkpoint holds no manifest: ``like`` names the file (or folder) its run
    started from, whose manifest describes the network (with the class count of the run's
    ``--num-classes``); without it, a checkpoint whose ``arch`` is a name registered with
    ``register_timm_model`` uses the file registered. ``use_ema``: its EMA weights
    (``state_dict_ema``).
    """
    return _load(path, model, like, use_ema, copy_model=True)


def load_on_own_base(path: str | os.PathLike, base: nn.Module) -> nn.Module:
    """``load(path, model=base)`` for a base built for this load alone: not copied, so the
    returned model shares its untouched modules and parameters (see :func:`load`)."""
    return _load(path, base, None, False, copy_model=False)


def _load(
    path: str | os.PathLike,
    model: nn.Module | None,
    like: str | os.PathLike | None,
    use_ema: bool,
    *,
    copy_model: bool,
) -> nn.Module:
    path = checked_path(path, "load(path)")
    if like is not None:
        like = checked_path(like, "load(like=...)")
    with own_random_state():  # the rebuilt model's random init is overwritten; the caller's RNG is kept
        if is_torch_file_name(path):
            return _load_training_checkpoint(path, model, like, use_ema, copy_model)
        if like is not None or use_ema:
            given = "like=" if like is not None else "use_ema=True"
            raise InputError(
                f"load({given}) is for a training checkpoint (.pth.tar, .pth); {path} is not one"
            )
        path = weights_path(path)
        manifest, recipe, base, shapes = _checked_base(path, model)
        assert base is not None
        if model is not None and copy_model:
            base = _copied(model)
        patched = inject_recorded(base, manifest, recipe, path)
        _check_against_file(patched, manifest, shapes, path, manifest.base_model or type(base).__name__)
        patched.load_state_dict(read_state_dict(path), strict=True)
        return patched


def _copied(model: nn.Module) -> nn.Module:
    """A deep copy of the model given to ``load``, which stays as it was: the patched model
    shares the untouched modules and parameters of the model it is made from, and the file's
    weights are loaded into them."""
    try:
        return copy.deepcopy(model)
    except Exception as error:
        raise InputError(
            f"load(model=...) builds on a copy of the model it is given, so that the model stays as it "
            f"was; a {type(model).__name__} cannot be copied with copy.deepcopy ({type(error).__name__}: "
            f"{shown(str(error), 120)})"
        ) from None


def _load_training_checkpoint(
    path: str | os.PathLike,
    model: nn.Module | None,
    like: str | os.PathLike | None,
    use_ema: bool,
    copy_model: bool,
) -> nn.Module:
    """A training checkpoint's weights in the network the file ``like`` (or the one registered
    under the checkpoint's ``arch``) describes, rebuilt with the run's class count."""
    from ..models.build import ModelKwargsError, build_model, build_shapes_only, check_model_kwargs, resolve

    checkpoint = read_training_checkpoint(path, use_ema=use_ema)
    source = like if like is not None else _registered_source(checkpoint.arch)
    if source is None:
        arch = f" of {shown(checkpoint.arch, 60)}" if checkpoint.arch else ""
        raise CheckpointError(
            f"{path} is a training checkpoint{arch}: weights only, with no attn-inject manifest; pass the "
            "file (or folder) its run started from: attn_inject.load(path, like='start.safetensors'), or "
            "register that file under the checkpoint's model name first (attn_inject.register_timm_model)"
        )
    source = weights_path(source)
    manifest, recipe, _, _ = _checked_base(source, model, build=False)
    kwargs = dict(manifest.base_kwargs)
    classes = checkpoint.args.get("num_classes")  # the run's --num-classes, when it gave one
    if is_int(classes) and classes != kwargs.get("num_classes"):
        try:
            kwargs = check_model_kwargs({**kwargs, "num_classes": classes}, f"{path}: args.num_classes")
        except ModelKwargsError as error:
            raise CheckpointError(str(error)) from None
    what = f"the network {source} describes"
    if model is None:
        if manifest.base_model is None:
            raise CheckpointError(
                f"{source} does not name its base model; pass it: attn_inject.load(path, like=..., model=...)"
            )
        name = ":".join(resolve(manifest.base_model))
        what = f"{name} with {shown(kwargs, 200)} and the recipe of {source}"
        twin = inject_recorded(build_shapes_only(name, **kwargs), manifest, recipe, source)
        meta = {k: torch.empty(v.shape, device="meta") for k, v in checkpoint.state_dict.items()}
        check_fits(twin, meta, source=f"checkpoint {path} ({what})")
        model = build_model(name, **kwargs)
    elif copy_model:
        model = _copied(model)
    patched = inject_recorded(model, manifest, recipe, source)
    info = patched_record(patched)
    assert info is not None
    _check_plan(info.plan, manifest, source, what, f"the file {source}")
    check_fits(patched, checkpoint.state_dict, source=f"checkpoint {path} ({what})")
    patched.load_state_dict(checkpoint.state_dict, strict=True)
    return patched


def _registered_source(arch: str | None) -> Path | None:
    """The file a timm model name was registered from by ``register_timm_model``; None for
    a name that is not one (the name is only looked up, never run)."""
    if arch is None:
        return None
    try:
        import timm.models
    except ImportError:
        return None
    if not timm.models.is_model(arch):
        return None
    source = getattr(timm.models.model_entrypoint(arch), REGISTERED_SOURCE, None)
    return source if isinstance(source, Path) else None


def checked_path(path: Any, where: str) -> Path:
    """``path`` (a ``str`` or an ``os.PathLike``) as a ``Path``; any other value is refused
    in one line naming ``where`` it was given."""
    if not isinstance(path, (str, os.PathLike)) or (isinstance(path, str) and not path):
        raise InputTypeError(f"{where}: a path (a str or a pathlib.Path) is needed, got {shown(path)}")
    return Path(path)


def weights_path(path: str | os.PathLike) -> Path:
    """The safetensors file ``path`` names: ``path`` itself, or, for a folder in timm's hub
    layout, its ``model.safetensors`` once its ``config.json`` is found to describe it."""
    p = checked_path(path, "a saved model")
    if not p.is_dir():
        return p
    config_path, weights = p / HUB_CONFIG, p / HUB_WEIGHTS
    if not weights.is_file():
        raise CheckpointError(
            f"{p} is a folder without {HUB_WEIGHTS}; a saved model is a .safetensors file or a folder "
            f"written by attn_inject.save_pretrained ({HUB_CONFIG} + {HUB_WEIGHTS})"
        )
    config = read_config_json(config_path, f"{config_path.parent} is a folder without {HUB_CONFIG}")
    recorded = config.get(HUB_KEY)
    if not isinstance(recorded, dict):
        raise CheckpointError(
            f"{config_path} has no {HUB_KEY!r} entry: it was not written by attn_inject.save_pretrained "
            "(a timm model folder holds no attention recipe: timm.create_model('local-dir:...') builds it)"
        )
    saved = json.loads(read_manifest(weights).to_json())
    for field in HUB_FIELDS:
        if recorded.get(field) != saved.get(field):
            raise CheckpointError(
                f"{config_path}: {HUB_KEY}.{field} is {shown(recorded.get(field), 60)}, but {HUB_WEIGHTS} "
                f"records {shown(saved.get(field), 60)}; the folder's files are from different models"
            )
    return weights


def read_config_json(path: Path, missing: str) -> dict[str, Any]:
    """A ``config.json`` (a hub folder's, a transformers folder's): a JSON object of at most
    ``MAX_CONFIG_BYTES``, read only if it is a regular file, its integers bounded; ``missing``:
    what to say when there is none."""
    try:
        with open_regular(path) as f:
            data = f.read(MAX_CONFIG_BYTES + 1)
    except FileNotFoundError:
        raise CheckpointError(missing) from None
    except (OSError, NotRegularFileError) as error:
        raise CheckpointError(f"cannot read {path}: {getattr(error, 'strerror', None) or error}") from None
    if len(data) > MAX_CONFIG_BYTES:
        raise CheckpointError(f"{path} is over {MAX_CONFIG_BYTES:,} bytes; a model's config is a few kB")
    try:
        config = json.loads(data.decode("utf-8"), parse_int=_bounded_int)
    except (ValueError, RecursionError, InputError) as error:
        raise CheckpointError(f"{path} is not valid JSON ({shown(str(error))})") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{path} must hold a JSON object, got {shown(config)}")
    return config


def block_weight_names(patched: nn.Module) -> tuple[str, ...]:
    """The prefixes (``"<module>."``) of the inserted blocks' weights in ``patched``."""
    from ..surgery.record import inserted_blocks

    return tuple(f"{name}." for name in inserted_blocks(patched))


def load_base_weights(path: str | os.PathLike, model: nn.Module | None = None) -> nn.Module:
    """The base model with the file's base weights (the blocks' left out): the reference a
    saved patched model is validated against."""
    path = weights_path(path)
    with own_random_state():  # as in load: the base's random init is overwritten
        manifest, recipe, base, _ = _checked_base(path, model)
        assert base is not None
        prefixes = block_weight_names(inject_recorded(base, manifest, recipe, path))
    tensors = {k: v for k, v in read_state_dict(path).items() if not k.startswith(prefixes)}
    check_fits(base, tensors, source=f"checkpoint {path}")
    base.load_state_dict(tensors, strict=True)
    return base
