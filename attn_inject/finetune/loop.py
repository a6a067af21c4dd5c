"""One training epoch and one evaluation, on any classifier, on one process or under DDP
(metrics summed over ranks). Used by ``attn-inject finetune`` and by the examples."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .distributed import Context, unwrap

__all__ = ["Precision", "evaluate", "predict", "train_one_epoch"]


@dataclass(frozen=True)
class Precision:
    """Mixed precision: autocast to ``dtype`` when ``enabled``; fp16 needs the loss scaler."""

    enabled: bool = False
    dtype: torch.dtype = torch.bfloat16

    def autocast(self, device: torch.device) -> contextlib.AbstractContextManager:
        if not self.enabled:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=self.dtype)


def _batches(loader: Iterable, device: torch.device, channels_last: bool):
    for images, targets in loader:
        images = images.to(device, non_blocking=True)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        yield images, targets.to(device, non_blocking=True)


def train_one_epoch(
    model: nn.Module,
    loader: Iterable,
    optimizer: torch.optim.Optimizer,
    context: Context,
    *,
    loss_fn: nn.Module | None = None,
    scheduler: Any = None,
    num_updates: int = 0,
    precision: Precision = Precision(),
    scaler: Any = None,
    clip_grad: float | None = None,
    ema: Any = None,
    channels_last: bool = False,
    on_step: Callable[[float, int], None] | None = None,
) -> tuple[dict[str, float], int]:
    """Train one pass over ``loader``. ``scheduler`` (timm) gets ``step_update`` after
    every optimizer step, ``ema`` (timm ``ModelEmaV3``) ``update``; ``scaler`` is timm's
    ``NativeScaler`` for fp16; ``on_step(loss, images)`` is called after every step with
    the step's loss and its number of images (this process's). Returns
    ``({"loss": mean over all ranks}, num_updates)``."""
    loss_fn = loss_fn or nn.CrossEntropyLoss()
    model.train()
    total, count = 0.0, 0.0
    for images, targets in _batches(loader, context.device, channels_last):
        with precision.autocast(context.device):
            loss = loss_fn(model(images), targets)
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            params = [p for g in optimizer.param_groups for p in g["params"]]
            scaler(loss, optimizer, clip_grad=clip_grad, parameters=params)
        else:
            loss.backward()
            if clip_grad is not None:
                torch.nn.utils.clip_grad_norm_(
                    [p for g in optimizer.param_groups for p in g["params"]], clip_grad
                )
            optimizer.step()
        num_updates += 1
        if ema is not None:
            ema.update(unwrap(model), step=num_updates)
        if scheduler is not None:
            scheduler.step_update(num_updates=num_updates)
        value = float(loss.detach())  # the step's one host sync, as train.py's loss.item()
        total += value * len(targets)
        count += len(targets)
        if on_step is not None:
            on_step(value, len(targets))
    total, count = context.sum([total, count])
    return {"loss": total / max(count, 1)}, num_updates


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: Iterable,
    context: Context,
    *,
    precision: Precision = Precision(),
    channels_last: bool = False,
) -> dict[str, float]:
    """Loss, top-1 and top-5 accuracy (%) over ``loader``, summed over ranks (each rank
    sees its own share of the images, none twice)."""
    loss_fn = nn.CrossEntropyLoss(reduction="sum")
    model.eval()
    loss = correct1 = correct5 = count = 0.0
    for images, targets in _batches(loader, context.device, channels_last):
        with precision.autocast(context.device):
            output = model(images)
        output = output.float()
        loss += float(loss_fn(output, targets))
        top = output.topk(min(5, output.shape[1]), dim=1).indices
        hits = top == targets[:, None]
        correct1 += float(hits[:, 0].sum())
        correct5 += float(hits.any(dim=1).sum())
        count += len(targets)
    loss, correct1, correct5, count = context.sum([loss, correct1, correct5, count])
    count = max(count, 1)
    return {"loss": loss / count, "top1": 100 * correct1 / count, "top5": 100 * correct5 / count}


@torch.no_grad()
def predict(model: nn.Module, loader: Iterable, device: torch.device | str = "cpu") -> torch.Tensor:
    """The predicted class of every image in ``loader``, in order (one process)."""
    model.eval()
    out = [model(images.to(device)).argmax(dim=1).cpu() for images, _ in loader]
    return torch.cat(out) if out else torch.empty(0, dtype=torch.long)
