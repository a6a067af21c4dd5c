"""Ultralytics YOLO: a patched model trained with Ultralytics' own ``YOLO.train``, blocks kept.

``YOLO.train`` hands the model to its task's trainer, whose ``get_model`` builds a fresh
network from the model's YAML and copies the weights whose names match: the inserted blocks
are not in the YAML, so they vanish without a word, and ``last.pt`` / ``best.pt`` hold the
plain network. :func:`trainer` returns a subclass of the task's own trainer whose
``get_model`` returns the patched model instead (rebuilt with the recorded recipes when the
data's class count differs from the model's), and which, resuming from a ``.pt``, keeps the
patched model that file holds::

    import attn_inject as ai
    from ultralytics import YOLO

    yolo = ai.ultralytics.inject(YOLO("yolov8n.pt"), "se_resnet")   # a new YOLO; the first unchanged
    yolo.train(data="data.yaml", epochs=50, trainer=ai.ultralytics.trainer(yolo))
    best = YOLO("runs/detect/train/weights/best.pt")                  # blocks and trained blends
    YOLO("runs/detect/train/weights/last.pt").train(resume=True, trainer=ai.ultralytics.trainer(best))

A YOLO that :func:`inject` returned also refuses to train without the bridge: its set-up
ends with a check that the trainer's model still has the blocks, which fails in one line
instead of training the plain network.

Ultralytics is AGPL-3.0 and optional (``pip install 'attn-inject[ultralytics]'``): it is
imported only by these functions. Its ``.pt`` files are pickles; attn-inject's command line
never reads them (the Python API works on the model you loaded yourself).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

from torch import nn

from ..core.errors import AttnInjectError
from ..surgery.inject import inject as inject_model
from ..surgery.record import InjectionInfo, inserted_blocks, patched_record

__all__ = ["UltralyticsError", "inject", "trainer"]

CHECK_EVENT = "on_pretrain_routine_end"  # the trainer's model, EMA and optimizer are set up


class UltralyticsError(AttnInjectError, ValueError):
    """A YOLO given where a patched one is needed, or a training set-up that drops the blocks."""


def _model_class() -> Any:
    """Ultralytics' ``Model`` (the class of ``YOLO(...)``), typed loosely: its attributes are
    Ultralytics' own."""
    try:
        from ultralytics.engine.model import Model
    except ImportError:
        raise UltralyticsError(
            "attn_inject.ultralytics needs Ultralytics: pip install 'attn-inject[ultralytics]'"
        ) from None
    return Model


def _patched_network(yolo: Any, where: str) -> Any:
    """The patched network a YOLO holds, or a one-line refusal."""
    network = yolo.model
    if not isinstance(network, nn.Module) or patched_record(network) is None:
        raise UltralyticsError(
            f"{where} needs a YOLO whose model attn_inject.inject patched, got "
            f"{type(network).__name__} without attention blocks; patch it first: "
            "yolo = ai.ultralytics.inject(yolo, RECIPE)"
        )
    return network


def inject(yolo: Any, recipe: Any, *, input_size: Sequence[int] | None = None, **kwargs: Any) -> Any:
    """A new YOLO whose model is ``yolo.model`` with the recipe's blocks (see
    :func:`attn_inject.inject`; ``kwargs`` are its keywords); ``yolo`` is not changed.

    ``input_size`` defaults to (3, 640, 640), the size YOLO trains at. The new YOLO's training
    set-up checks that the trainer kept the blocks: ``train(...)`` without
    ``trainer=ai.ultralytics.trainer(yolo)`` fails in one line instead of training the plain
    network."""
    model_class = _model_class()
    if not isinstance(yolo, model_class):
        raise UltralyticsError(
            "ai.ultralytics.inject takes an Ultralytics YOLO (ultralytics.YOLO(...)), got "
            f"{type(yolo).__name__}; for the bare network use ai.inject(yolo.model, RECIPE)"
        )
    size = tuple(input_size) if input_size is not None else (3, 640, 640)
    patched = inject_model(yolo.model, recipe, input_size=size, **kwargs)
    new = copy.copy(yolo)  # YOLO is an nn.Module: its containers are copied, never shared
    new.__dict__ = {k: copy.copy(v) if isinstance(v, dict) else v for k, v in yolo.__dict__.items()}
    new.callbacks = {event: list(functions) for event, functions in yolo.callbacks.items()}
    new.model = patched
    new.predictor = None  # a cached predictor wraps the old network
    new.add_callback(CHECK_EVENT, _check_blocks_kept)
    return new


def _check_blocks_kept(task_trainer: Any) -> None:
    """A callback: refuse a trainer whose model lost the attention blocks."""
    from ultralytics.utils.torch_utils import unwrap_model

    if patched_record(unwrap_model(task_trainer.model)) is None:
        raise UltralyticsError(
            f"{type(task_trainer).__name__} rebuilt the model from its YAML and dropped the attention "
            "blocks; train with the bridge: yolo.train(..., trainer=ai.ultralytics.trainer(yolo))"
        )


def trainer(yolo: Any) -> type:
    """The task's own trainer class (``DetectionTrainer``, ``SegmentationTrainer``, ...) with
    a ``get_model`` that keeps ``yolo``'s patched model, for ``yolo.train(trainer=...)``.

    - a new run trains the patched model itself (with the weights ``pretrained=`` names loaded
      where their names and shapes match, as Ultralytics does); where the data has another
      class count, the network is built from its YAML for that count, the recorded recipes are
      injected again and every weight whose name and shape match is copied over;
    - ``resume=True`` continues with the patched model the ``.pt`` holds (EMA, optimizer and
      epoch as Ultralytics restores them).

    ``yolo`` is a YOLO that :func:`inject` returned, or one whose ``model`` is patched, such
    as ``YOLO("best.pt")`` from an earlier run."""
    if not isinstance(yolo, _model_class()):
        raise UltralyticsError(
            "ai.ultralytics.trainer takes an Ultralytics YOLO (ultralytics.YOLO(...)), got "
            f"{type(yolo).__name__}"
        )
    network = _patched_network(yolo, "ai.ultralytics.trainer")
    base = yolo.task_map[yolo.task]["trainer"]
    return type(base.__name__, (base,), {"get_model": _get_model_keeping(network), "__module__": __name__})


def _get_model_keeping(network: Any) -> Any:
    def get_model(self: Any, cfg: Any = None, weights: Any = None, verbose: bool = True) -> Any:
        if isinstance(weights, nn.Module) and patched_record(weights) is not None:
            model = weights  # resuming: the patched model the .pt holds, or the YOLO's own
        else:
            model = network
            if isinstance(weights, nn.Module):
                model.load(weights)  # pretrained=: Ultralytics' copy of matching weights
        model = _for_class_count(self, model, verbose)
        setter = getattr(self, "set_model_names_for_load", None)
        if setter is not None:
            model = setter(model)
        for p in model.parameters():
            p.requires_grad_(p.dtype.is_floating_point)
        return model

    get_model.__doc__ = "The patched model (blocks kept), not one built afresh from the YAML."
    return get_model


def _for_class_count(task_trainer: Any, model: Any, verbose: bool) -> Any:
    """``model``, or where the data's class count differs: the network built for it by the
    task's own ``get_model``, the recorded recipes injected again, matching weights copied."""
    nc = task_trainer.data.get("nc")
    built = getattr(model, "yaml", {}).get("nc", nc)  # the class count the network was built for
    if nc is None or built == nc:
        return model
    info = patched_record(model)
    assert info is not None
    fresh = super(type(task_trainer), task_trainer).get_model(cfg=model.yaml, weights=None, verbose=verbose)
    rebuilt = _inject_recorded(fresh, info)
    lost = sorted(set(inserted_blocks(model)) - set(inserted_blocks(rebuilt)))
    if lost:
        raise UltralyticsError(
            f"the network built for {nc} classes has no place for the block {lost[0]!r}; "
            "inject into a model built for the data's classes: YOLO('NAME.yaml') with nc set in the YAML"
        )
    rebuilt.load(model)  # every weight whose name and shape match: the class heads start afresh
    return rebuilt


def _inject_recorded(base: nn.Module, info: InjectionInfo) -> Any:
    patched = base
    for plan in info.plans:
        patched = inject_model(
            patched,
            plan.recipe,
            init=plan.init,
            input_size=tuple(plan.input_size),
            target=plan.target,
            allow_empty=True,
        )
    return patched
