"""Targets: the submodule a recipe patches.

``inject(model, recipe, target="backbone.body")`` plans and rewrites only that submodule;
torchvision detection, segmentation and optical-flow models get their backbone (the part
that is a CNN on images) when no target is given, and segmentation-models-pytorch models
their encoder (so a stage recipe acts on the encoder's stages, not on the decoder's blocks).
The rewrite (:mod:`attn_inject.surgery.rewrite`) puts the changed modules back into shallow
copies of their ancestors, so the model passed in is never changed and every ``state_dict``
key keeps its name.
"""

from __future__ import annotations

import inspect
import re

from torch import nn

from ..core.errors import AttnInjectError

__all__ = ["TargetError", "default_target", "get_target", "returns_its_stages", "target_input_size"]


class TargetError(AttnInjectError, ValueError):
    """The target names no submodule of the model."""


SMP_PACKAGE = "segmentation_models_pytorch."


def default_target(model: nn.Module) -> str | None:
    """The backbone of a torchvision detection / segmentation / optical-flow model, the
    encoder of a segmentation-models-pytorch model, else None."""
    module = type(model).__module__
    if module.startswith(SMP_PACKAGE):
        return "encoder" if isinstance(getattr(model, "encoder", None), nn.Module) else None
    if module.startswith("torchvision.models.optical_flow"):
        return "feature_encoder" if hasattr(model, "feature_encoder") else None
    if not module.startswith(("torchvision.models.detection", "torchvision.models.segmentation")):
        return None
    backbone = getattr(model, "backbone", None)
    if backbone is None:
        return None
    if isinstance(getattr(backbone, "body", None), nn.Module):
        return "backbone.body"  # BackboneWithFPN: the CNN under the FPN
    return "backbone"


def returns_its_stages(module: nn.Module) -> bool:
    """Whether ``module``'s forward returns every stage's map, so its stages end at what it
    returns: a segmentation-models-pytorch encoder (its ``out_channels`` lists one map per
    stage, the input first), which its decoder reads at each stage's end."""
    return type(module).__module__.startswith(SMP_PACKAGE) and isinstance(
        getattr(module, "out_channels", None), (list, tuple)
    )


def target_input_size(model: nn.Module, target: str) -> tuple[int, int, int] | None:
    """The size a torchvision detection model's transform resizes images to, which its
    backbone sees: (3, min_size, min_size); None otherwise."""
    if not target:
        return None
    min_size = getattr(getattr(model, "transform", None), "min_size", None)
    if isinstance(min_size, (tuple, list)) and min_size:
        min_size = min_size[0]
    return (3, int(min_size), int(min_size)) if isinstance(min_size, int) else None


def get_target(model: nn.Module, target: str) -> nn.Module:
    """The submodule ``target`` names ('' is the model itself), or a clear error."""
    if not target:
        return model
    try:
        sub = model.get_submodule(target)
    except AttributeError:
        parent, _, _ = target.rpartition(".")
        try:
            around = model.get_submodule(parent) if parent else model
            children = ", ".join(name for name, _ in around.named_children()) or "none"
        except AttributeError:
            children = ", ".join(name for name, _ in model.named_children()) or "none"
            parent = ""
        where = f"{parent!r}" if parent else type(model).__name__
        raise TargetError(
            f"target {target!r} is not a submodule of {type(model).__name__}; "
            f"the children of {where} are: {children}"
        ) from None
    _refuse_routed_container(model, target, sub)
    return sub


def _refuse_routed_container(model: nn.Module, target: str, sub: nn.Module) -> None:
    """A container its parent never calls but iterates, routing each layer's input itself
    (Ultralytics' ``for m in self.model: x = y[m.f] ...``): traced alone it would be a plain
    chain, which is not the network; refused, naming what to pass instead."""
    if not isinstance(sub, (nn.Sequential, nn.ModuleList)):
        return
    parent_path, _, attribute = target.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    if not _iterated_never_called(type(parent), attribute):
        return
    raise TargetError(
        f"target {target!r}: {type(parent).__name__} never calls this {type(sub).__name__}, it iterates it "
        f"(for ... in self.{attribute}) and routes each layer's input itself, so traced alone it is not "
        f"the network; pass the module that runs it: target={parent_path!r}"
    )


def _iterated_never_called(cls: type, attribute: str) -> bool:
    """Whether the code of ``cls`` (and of its bases outside torch) loops over
    ``self.<attribute>`` and never calls it."""
    sources = []
    for klass in cls.__mro__:
        if klass.__module__.startswith("torch.") or klass is object:
            continue
        try:
            sources.append(inspect.getsource(klass))
        except (OSError, TypeError):
            return False  # code we cannot read: nothing to say
    code = "\n".join(sources)
    name = re.escape(attribute)
    loops = re.search(rf"\bfor\b[^\n]*\bin\b[^\n]*\bself\.{name}\b(?!\s*[.(\[])", code)
    called = re.search(rf"self\.{name}\s*\(|\(\s*self\.{name}\s*[,)]", code)
    return loops is not None and called is None
