"""Building a model by name: ``timm:NAME``, ``tv:NAME``, or a bare name (timm first, then
torchvision). Random init only: nothing is downloaded."""

from __future__ import annotations

import contextlib
import difflib
import functools
import inspect
import json
import math
import re
import threading
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import nn
from torch.nn.modules.module import (
    register_module_buffer_registration_hook,
    register_module_parameter_registration_hook,
)
from torch.overrides import TorchFunctionMode

from ..core.errors import AttnInjectError
from ..core.messages import shown
from ..core.values import is_int, is_number
from ..surgery.record import patched_record

__all__ = [
    "ARCHITECTURE_KWARGS",
    "ModelKwargsError",
    "ModelNameError",
    "base_model_of",
    "build_model",
    "build_shapes_only",
    "check_model_kwargs",
    "input_size_for",
    "timm_kwargs_of",
    "wrapper_of",
]

BASE_ATTRIBUTE = "_attn_inject_base"  # (qualified name, builder kwargs), set by build_model


class ModelNameError(AttnInjectError, ValueError):
    """No timm or torchvision model has that name."""


class ModelKwargsError(AttnInjectError, ValueError):
    """A builder argument that is not allowed: it does not shape the architecture (it loads,
    downloads or points at a file), or its value has the wrong type or range."""


_LARGEST = 1 << 24  # a count beyond this is no architecture anyone builds
_NAME = re.compile(r"[A-Za-z0-9_]{0,64}")  # a registered layer / pool name, never a path or module

# The builder arguments a model may be rebuilt with, by the kind of value each takes. Only
# arguments that shape the architecture or describe its data: none loads weights, downloads or
# names a file (``pretrained``, ``checkpoint_path``, ``weights``... are refused, and so are the
# keys of ``pretrained_cfg_overlay`` that say where weights come from).
ARCHITECTURE_KWARGS: dict[str, str] = {
    "num_classes": "count",
    "in_chans": "count",
    "output_stride": "count",
    "stem_width": "count",
    "groups": "count",
    "width_per_group": "count",
    "image_size": "count",
    "min_size": "count",
    "max_size": "count",
    "trainable_backbone_layers": "count",
    "patch_size": "count",
    "embed_dim": "count",
    "depth": "count",
    "num_heads": "count",
    "img_size": "size",
    "mlp_ratio": "factor",
    "channel_multiplier": "factor",
    "depth_multiplier": "factor",
    "width_mult": "factor",
    "global_pool": "name",
    "act_layer": "name",
    "norm_layer": "name",
    "stem_type": "name",
    "drop_rate": "rate",
    "drop_path_rate": "rate",
    "drop_block_rate": "rate",
    "pos_drop_rate": "rate",
    "proj_drop_rate": "rate",
    "attn_drop_rate": "rate",
    "dropout": "rate",
    "attention_dropout": "rate",
    "features_only": "flag",
    "feature_cls": "name",
    "class_token": "flag",
    "qkv_bias": "flag",
    "aux_logits": "flag",
    "transform_input": "flag",
    "zero_init_residual": "flag",
    "out_indices": "indices",
    "replace_stride_with_dilation": "flags",
    "pretrained_cfg_overlay": "config",
}
_KINDS = {
    "count": f"an integer from 0 to {_LARGEST}",
    "size": "an integer or a list of 2 integers from 1 to 8192",
    "name": "a layer name (letters, digits, _; at most 64)",
    "rate": "a number from 0 to 1",
    "factor": "a number above 0, at most 64",
    "flag": "true or false",
    "indices": "an integer or a list of up to 16 integers from -64 to 64",
    "flags": "a list of up to 8 true / false",
    "config": "a mapping of timm pretrained_cfg keys to plain values",
}

# The keys of timm's ``PretrainedCfg`` an overlay may set: the data it expects (size, crop,
# mean, std...), its head and its description. Never where weights come from or how they
# load (``url``, ``file``, ``state_dict``, ``hf_hub_id``, ``hf_hub_filename``, ``source``,
# ``custom_load``) nor the architecture's name (``architecture``).
PRETRAINED_CFG_KEYS = (
    "tag",
    "input_size",
    "test_input_size",
    "min_input_size",
    "fixed_input_size",
    "interpolation",
    "crop_pct",
    "test_crop_pct",
    "crop_mode",
    "mean",
    "std",
    "num_classes",
    "label_offset",
    "label_names",
    "label_descriptions",
    "pool_size",
    "test_pool_size",
    "first_conv",
    "classifier",
    "license",
    "description",
    "origin_url",
    "paper_name",
    "paper_ids",
    "notes",
)
MAX_OVERLAY_CHARS = 1 << 16  # an overlay as JSON; ImageNet-1k's 1,000 label names take about 13 kB
_MAX_TEXT = 1000
_MAX_ITEMS = 1024


def _is_int(value: Any, low: int, high: int) -> bool:
    return is_int(value) and low <= value <= high


def _fits(kind: str, value: Any) -> bool:
    if kind == "count":
        return _is_int(value, 0, _LARGEST)
    if kind == "size":
        items = value if isinstance(value, (list, tuple)) and len(value) == 2 else [value]
        return all(_is_int(v, 1, 8192) for v in items)
    if kind == "name":
        return isinstance(value, str) and _NAME.fullmatch(value) is not None
    if kind == "rate":
        return is_number(value) and math.isfinite(value) and 0 <= value <= 1
    if kind == "factor":
        return is_number(value) and math.isfinite(value) and 0 < value <= 64
    if kind == "flag":
        return isinstance(value, bool)
    if kind == "indices":
        items = value if isinstance(value, (list, tuple)) and len(value) <= 16 else [value]
        return all(_is_int(v, -64, 64) for v in items)
    if kind == "config":
        return isinstance(value, Mapping)  # each key and value: _check_overlay
    if kind == "flags":
        return (
            isinstance(value, (list, tuple)) and len(value) <= 8 and all(isinstance(v, bool) for v in value)
        )
    raise AssertionError(kind)


def check_model_kwargs(kwargs: Any, source: str = "model kwargs") -> dict[str, Any]:
    """``kwargs`` as a dict, if every argument is in :data:`ARCHITECTURE_KWARGS` with a value
    of its kind; else :class:`ModelKwargsError` naming ``source``, the argument and what is
    allowed. Checked before any builder sees them, for files and command lines alike."""
    if not isinstance(kwargs, Mapping):
        raise ModelKwargsError(f"{source} must be a mapping of argument names to values, got {shown(kwargs)}")
    for key, value in kwargs.items():
        kind = ARCHITECTURE_KWARGS.get(key) if isinstance(key, str) else None
        if kind is None:
            raise ModelKwargsError(
                f"{source}: {shown(key)} is not allowed: only arguments that shape the architecture are "
                f"(never ones that load, download or name a file); allowed: {', '.join(ARCHITECTURE_KWARGS)}"
            )
        if not _fits(kind, value):
            raise ModelKwargsError(
                f"{source}: {key}={shown(value)} is not allowed; {key} must be {_KINDS[kind]}"
            )
        if kind == "config":
            _check_overlay(value, source)
    return {key: _as_json(value) for key, value in kwargs.items()}


_SIZES = "null or 3 integers from 1 to 8192 (C H W)"
_PLAIN = (
    f"a plain value: null, true / false, a number, a string of at most {_MAX_TEXT} characters, "
    f"a list of up to {_MAX_ITEMS} of them, or a mapping of strings to them"
)
# The overlay keys timm's builder reads as architecture arguments (in_chans, img_size, num_classes).
_OVERLAY_KINDS = {
    "input_size": (_SIZES, lambda v: v is None or _sizes(v)),
    "num_classes": (f"an integer from 0 to {_LARGEST}", lambda v: _is_int(v, 0, _LARGEST)),
}


def _sizes(value: Any) -> bool:
    return isinstance(value, (list, tuple)) and len(value) == 3 and all(_is_int(v, 1, 8192) for v in value)


def _scalar(value: Any) -> bool:
    if value is None or isinstance(value, bool):
        return True
    if is_int(value):
        return abs(value) <= 1 << 53
    if isinstance(value, float):
        return math.isfinite(value)
    return isinstance(value, str) and len(value) <= _MAX_TEXT


def _plain_value(value: Any) -> bool:
    if isinstance(value, (list, tuple)):
        return len(value) <= _MAX_ITEMS and all(_scalar(v) for v in value)
    if isinstance(value, Mapping):
        return len(value) <= _MAX_ITEMS and all(
            isinstance(k, str) and len(k) <= _MAX_TEXT and _scalar(v) for k, v in value.items()
        )
    return _scalar(value)


def _check_overlay(overlay: Mapping[Any, Any], source: str) -> None:
    """Refuse a ``pretrained_cfg_overlay`` key that is not in :data:`PRETRAINED_CFG_KEYS`, or a
    value that is not plain data of bounded size."""
    for key, value in overlay.items():
        if key not in PRETRAINED_CFG_KEYS:
            raise ModelKwargsError(
                f"{source}: 'pretrained_cfg_overlay' is not allowed to set {shown(key)}: only timm's data, "
                "head and description settings are (never where weights come from or how they load); "
                f"allowed: {', '.join(PRETRAINED_CFG_KEYS)}"
            )
        what, fits = _OVERLAY_KINDS.get(key, (_PLAIN, _plain_value))
        if key in ("test_input_size", "min_input_size"):
            what, fits = _SIZES, _OVERLAY_KINDS["input_size"][1]
        if not fits(value):
            raise ModelKwargsError(
                f"{source}: pretrained_cfg_overlay[{key!r}]={shown(value)} is not allowed; it must be {what}"
            )
    if len(json.dumps(_as_json(overlay))) > MAX_OVERLAY_CHARS:
        raise ModelKwargsError(
            f"{source}: pretrained_cfg_overlay is not allowed: it takes more than {MAX_OVERLAY_CHARS} "
            "characters as JSON"
        )


def _as_json(value: Any) -> Any:
    """``value`` with its tuples as lists, as a manifest holds it."""
    if isinstance(value, (list, tuple)):
        return [_as_json(v) for v in value]
    if isinstance(value, Mapping):
        return {k: _as_json(v) for k, v in value.items()}
    return value


def _as_timm(kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """``kwargs`` as timm's builder takes them: an overlay's lists as tuples, as in timm's
    ``PretrainedCfg`` (so that the built model's ``pretrained_cfg`` equals one built from Python)."""
    overlay = kwargs.get("pretrained_cfg_overlay")
    if overlay is None:
        return dict(kwargs)
    as_tuples = {k: tuple(v) if isinstance(v, list) else v for k, v in overlay.items()}
    return {**kwargs, "pretrained_cfg_overlay": as_tuples}


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
    if not isinstance(name, str) or not 0 < len(name) <= 200:
        raise ModelNameError(f"a model name must be 'timm:NAME', 'tv:NAME' or a bare name, got {shown(name)}")
    source, _, bare = name.partition(":")
    if bare:
        if source not in ("timm", "tv"):
            raise ModelNameError(
                f"unknown model source {shown(source)} in {shown(name)}; use 'timm:NAME' or 'tv:NAME'"
            )
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
    return f"unknown model {shown(name)}: not a {where} model name{hint}"


def build_model(name: str, *, device: str | torch.device = "cpu", **kwargs: Any) -> nn.Module:
    """Build ``name`` with random weights on ``device`` ("meta" allocates nothing). The
    model remembers its name and ``kwargs``, so a checkpoint of it can be rebuilt.
    ``kwargs`` are limited to :data:`ARCHITECTURE_KWARGS` (nothing that loads or downloads)."""
    source, bare = resolve(name)
    given = check_model_kwargs(kwargs)
    on_meta = torch.device(device).type == "meta" or getattr(_ON_META, "depth", 0) > 0
    with torch.device(device), _RandomFillsSkippedOnMeta() if on_meta else contextlib.nullcontext():
        if source == "timm":
            import timm

            model = timm.create_model(bare, pretrained=False, **_as_timm(given))
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
    info = patched_record(model)  # patched again: the first patch's base
    if info is not None and info.base_model:
        return info.base_model, dict(info.base_kwargs)
    cfg = getattr(model, "pretrained_cfg", None)
    if isinstance(cfg, dict) and cfg.get("architecture") and type(model).__module__.startswith("timm."):
        kwargs = (
            {"num_classes": model.num_classes} if isinstance(getattr(model, "num_classes", None), int) else {}
        )
        return f"timm:{cfg['architecture']}", kwargs
    return None


def timm_kwargs_of(model: nn.Module, name: str, kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """The builder arguments that rebuild the timm model ``model`` as it is now: ``kwargs``
    (what ``model`` recorded of its builder) with what timm keeps on the model where it
    differs from what ``name(**kwargs)`` builds: ``features_only`` and ``out_indices`` of a
    ``FeatureListNet`` or a ``FeatureGetterNet`` (with ``feature_cls="getter"``),
    ``num_classes`` and ``global_pool`` (``reset_classifier`` changes them),
    ``drop_path_rate`` (from its ``DropPath`` rates), and the keys of its ``pretrained_cfg``
    in :data:`PRETRAINED_CFG_KEYS` as ``pretrained_cfg_overlay``. ``kwargs`` as given for
    another model, or when ``name`` cannot be built; the caller checks that the result
    rebuilds ``model``.

        >>> model = timm.create_model("resnet18", drop_path_rate=0.1); model.reset_classifier(5)
        >>> timm_kwargs_of(model, "timm:resnet18", {"num_classes": 1000})
        {'num_classes': 5, 'drop_path_rate': 0.1}
    """
    out = dict(kwargs)
    cfg = getattr(model, "pretrained_cfg", None)
    if resolve(name)[0] != "timm" or not isinstance(cfg, dict):
        return out
    from timm.models._features import FeatureGetterNet

    if _is_feature_net(model):
        out["features_only"] = True
    if isinstance(model, FeatureGetterNet):
        out["feature_cls"] = "getter"
    try:
        default = build_shapes_only(name, **out)
    except Exception:
        return out
    built = _timm_settings(default)
    for key, value in _timm_settings(model).items():
        if value is not None and value != built[key]:
            out[key] = value
    if out.get("drop_path_rate", 0) != kwargs.get("drop_path_rate", 0) and out["drop_path_rate"] > 0:
        out["drop_path_rate"] = _drop_path_rate(out["drop_path_rate"], name, out)
    default_cfg = getattr(default, "pretrained_cfg", None) or {}
    # Where its weights came from (url, file, hf_hub_id...) is not recorded: the file holds them.
    changed = {key: cfg.get(key) for key in PRETRAINED_CFG_KEYS if cfg.get(key) != default_cfg.get(key)}
    if changed:
        out["pretrained_cfg_overlay"] = {**out.get("pretrained_cfg_overlay", {}), **changed}
    return out


def _is_feature_net(model: nn.Module) -> bool:
    """A timm ``features_only`` model whose features are recorded: a ``FeatureListNet`` or a
    ``FeatureGetterNet`` (``feature_cls="getter"``: the model's ``forward_intermediates``)."""
    from timm.models import FeatureListNet
    from timm.models._features import FeatureGetterNet

    return isinstance(model, (FeatureListNet, FeatureGetterNet))


def _timm_settings(model: nn.Module) -> dict[str, Any]:
    """The builder arguments a timm model keeps: None where it does not keep one."""
    pool = getattr(model, "global_pool", None)
    pool = getattr(pool, "pool_type", pool)  # a SelectAdaptivePool2d, or a name (ViT)
    num_classes = getattr(model, "num_classes", None)
    indices = getattr(getattr(model, "feature_info", None), "out_indices", None)
    return {
        "num_classes": num_classes if is_int(num_classes) else None,
        "global_pool": pool if isinstance(pool, str) else None,
        "drop_path_rate": _largest_drop_path(model),
        "out_indices": list(indices) if _is_feature_net(model) and indices is not None else None,
    }


def _largest_drop_path(model: nn.Module) -> float:
    from timm.layers import DropPath

    return max((m.drop_prob for m in model.modules() if isinstance(m, DropPath)), default=0.0)


def _drop_path_rate(largest: float, name: str, kwargs: Mapping[str, Any]) -> float:
    """The ``drop_path_rate`` whose schedule ends at ``largest``: timm's schedules are
    proportional to the rate (the last block gets all of it in ResNet and ViT, (n-1)/n of it
    in EfficientNet), so a build at rate 1 gives the factor. 12 digits undo the float32 (ViT)
    and division rounding."""
    try:
        factor = _largest_drop_path(build_shapes_only(name, **{**kwargs, "drop_path_rate": 1.0}))
    except Exception:
        factor = 1.0
    return float(f"{largest / (factor or 1.0):.12g}")


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


def build_shapes_only(name: str, **kwargs: Any) -> nn.Module:
    """``name`` with every parameter and buffer on the meta device: its architecture and
    shapes, no weights. Built on the meta device; a builder that computes its layer widths
    from tensor values (torchvision RegNet) is run on the CPU instead, each parameter and
    buffer moved to the meta device as it is registered, before it is initialised. The
    initialisation's fills are skipped either way: a meta tensor has no values to fill."""
    try:
        return build_model(name, device="meta", **kwargs)
    except (ModelNameError, ModelKwargsError):
        raise
    except Exception:
        with _registered_on_meta():
            return build_model(name, device="cpu", **kwargs)


# The in-place random fills an initialisation makes (and every ``torch.nn.init`` function, all
# of them in-place fills). A meta tensor has no values for them to write, yet torch runs
# ``normal_`` on the meta device through its Python reference (about a millisecond a call: half
# of a ResNet-50's build there).
_RANDOM_FILLS = frozenset(
    {
        torch.Tensor.normal_,
        torch.Tensor.uniform_,
        torch.Tensor.exponential_,
        torch.Tensor.log_normal_,
        torch.Tensor.cauchy_,
        torch.Tensor.geometric_,
        torch.Tensor.random_,
        torch.Tensor.bernoulli_,
    }
)


class _RandomFillsSkippedOnMeta(TorchFunctionMode):
    """An in-place fill of a meta tensor (:data:`_RANDOM_FILLS`, ``torch.nn.init``) returns the
    tensor, as the fill does, without running it; every other call runs as it would. Entered
    by :func:`build_model` when it builds on the meta device or inside
    :func:`_registered_on_meta`; a mode of the calling thread only."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _RANDOM_FILLS or getattr(func, "__module__", None) == "torch.nn.init":
            filled = args[0] if args else kwargs.get("tensor")  # torch.nn.init passes it by name
            if isinstance(filled, torch.Tensor) and filled.is_meta:
                return filled
        return func(*args, **kwargs)


# Registration on the meta device, for this thread only: torch's global registration hooks
# are installed once and act while a thread is inside ``_registered_on_meta`` (another
# thread's modules, and every module after the context, register as they always do).
_ON_META = threading.local()
_META_HOOKS: list[Any] = []  # the two handles, while a build on meta runs in any thread
_META_BUILDS = [0]  # builds on meta running, in every thread
_HOOKS_LOCK = threading.Lock()


def _parameter_on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> nn.Parameter | None:
    if getattr(_ON_META, "depth", 0) and param is not None and not param.is_meta:
        return nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
    return None


def _buffer_on_meta(module: nn.Module, name: str, buffer: torch.Tensor | None) -> torch.Tensor | None:
    if getattr(_ON_META, "depth", 0) and buffer is not None and not buffer.is_meta:
        return buffer.to("meta")
    return None


@contextlib.contextmanager
def _registered_on_meta() -> Iterator[None]:
    """Move each parameter and buffer to the meta device as a module of this thread
    registers it (torch's module registration hooks; the process-wide ``nn.Module`` is not
    changed)."""
    with _HOOKS_LOCK:
        if not _META_HOOKS:
            # torch's hints say the hooks return None; a returned tensor replaces the registered one
            _META_HOOKS.append(register_module_parameter_registration_hook(_parameter_on_meta))  # type: ignore[arg-type]
            _META_HOOKS.append(register_module_buffer_registration_hook(_buffer_on_meta))  # type: ignore[arg-type]
        _META_BUILDS[0] += 1
    _ON_META.depth = getattr(_ON_META, "depth", 0) + 1
    try:
        yield
    finally:
        _ON_META.depth -= 1
        with _HOOKS_LOCK:  # the last build out removes the hooks: a global hook left would be seen by
            _META_BUILDS[0] -= 1  # every later module (a block's proof is then never shared)
            if not _META_BUILDS[0]:
                while _META_HOOKS:
                    _META_HOOKS.pop().remove()


def wrapper_of(model: nn.Module) -> str | None:
    """For a model inside a DataParallel / DistributedDataParallel / torch.compile wrapper,
    what to pass instead (``"a DataParallel wrapper; pass model.module"``); None otherwise."""
    from torch.nn.parallel import DataParallel, DistributedDataParallel

    if isinstance(model, (DataParallel, DistributedDataParallel)):
        return f"a {type(model).__name__} wrapper; pass the model inside it: model.module"
    if type(model).__name__ == "OptimizedModule" and isinstance(getattr(model, "_orig_mod", None), nn.Module):
        return "a torch.compile wrapper (OptimizedModule); pass the model inside it: model._orig_mod"
    return None
