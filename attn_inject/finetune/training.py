"""What trains: the model on its device, its data loaders, optimizer, schedule, EMA and scaler."""

from __future__ import annotations

import contextlib
import random
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..core.messages import cut
from .config import FinetuneConfig, SettingError
from .data import Folders, data_config, image_folders
from .distributed import Context
from .groups import param_groups
from .loop import Precision
from .starting_point import StartingPoint

__all__ = ["Training", "build_training", "check_optimizer", "reseed", "wrap"]


def check_optimizer(config: FinetuneConfig, model: nn.Module) -> None:
    """The optimizer name and the parameter groups, checked before anything is written."""
    from timm.optim import get_optimizer_info

    try:
        get_optimizer_info(config.opt.lower().split("_")[-1])
    except ValueError:
        raise SettingError(
            f"--opt {cut(config.opt, 60)}: not a timm optimizer; e.g. adamw, sgd, lamb, lion "
            "(timm.optim.list_optimizers() lists them)"
        ) from None
    param_groups(
        model,
        config.lr,
        weight_decay=config.weight_decay,
        attn_lr_scale=config.attn_lr_scale,
        layer_decay=config.layer_decay,
    )


@dataclass
class Training:
    """What trains: the model, its data, optimizer, schedule, EMA and precision."""

    model: nn.Module
    cfg: dict[str, Any]
    sampler: Any
    train_loader: Any
    val_loader: Any
    optimizer: Any
    scheduler: Any
    ema: Any
    precision: Precision
    scaler: Any


def build_training(
    config: FinetuneConfig, folders: Folders, start: StartingPoint, context: Context
) -> Training:
    """The model on its device with timm's data config, optimizer (the param groups of
    :func:`param_groups`), cosine schedule, EMA and loss scaler, as ``config`` asks."""
    from timm.optim import create_optimizer_v2
    from timm.scheduler import create_scheduler_v2
    from timm.utils import ModelEmaV3, NativeScaler

    model = start.model.to(context.device)
    if start.reinitialised:
        context.log(
            f"left at init (shape changed for {start.num_classes} classes): {', '.join(start.reinitialised)}",
        )
    if config.channels_last:
        model = model.to(memory_format=torch.channels_last)
    reseed(config, 0, context.rank)
    cfg, sampler, train_loader, val_loader = _loaders(config, folders, model, context)
    dtype = torch.float16 if config.amp_dtype == "float16" else torch.bfloat16
    scaler = NativeScaler(device=context.device.type) if config.amp and dtype == torch.float16 else None
    optimizer = create_optimizer_v2(
        model,
        config.opt,
        lr=config.lr,
        weight_decay=config.weight_decay,
        param_group_fn=lambda m: param_groups(
            m,
            config.lr,
            weight_decay=config.weight_decay,
            attn_lr_scale=config.attn_lr_scale,
            layer_decay=config.layer_decay,
        ),
    )
    scheduler, _ = create_scheduler_v2(
        optimizer,
        "cosine",
        num_epochs=config.epochs,
        warmup_epochs=config.warmup_epochs,
        warmup_lr=config.lr * 0.01,
        min_lr=config.lr * 0.01,
        step_on_epochs=False,
        updates_per_epoch=len(train_loader),
    )
    ema = ModelEmaV3(model, decay=config.model_ema_decay, use_warmup=True) if config.model_ema else None
    return Training(
        model,
        cfg,
        sampler,
        train_loader,
        val_loader,
        optimizer,
        scheduler,
        ema,
        Precision(config.amp, dtype),
        scaler,
    )


def reseed(config: FinetuneConfig, epoch: int, rank: int) -> None:
    value = config.seed + 1000 * epoch + rank
    random.seed(value)
    torch.manual_seed(value)
    with contextlib.suppress(ImportError):
        import numpy

        numpy.random.seed(value % 2**32)


def _loaders(config: FinetuneConfig, folders: Folders, model: nn.Module, context: Context):
    from torch.utils.data import DataLoader, DistributedSampler, Subset

    cfg = data_config(model, config.image_size)
    train, val = image_folders(folders, cfg, no_aug=config.no_aug, hflip=config.hflip, scale=config.scale)
    sampler: DistributedSampler = DistributedSampler(
        train, num_replicas=context.world, rank=context.rank, shuffle=True, seed=config.seed
    )
    pin = context.device.type == "cuda"
    # A last batch of one image stops BatchNorm in training: drop it, as timm's loader drops
    # an incomplete last batch.
    train_loader = DataLoader(
        train,
        batch_size=config.batch_size,
        sampler=sampler,
        num_workers=config.workers,
        pin_memory=pin,
        drop_last=len(sampler) % config.batch_size == 1,
    )
    # Each rank evaluates its own images (no padding, none twice); the sums are reduced.
    val_share = Subset(val, range(context.rank, len(val), context.world))
    val_loader = DataLoader(
        val_share, batch_size=config.batch_size, num_workers=config.workers, pin_memory=pin
    )
    return cfg, sampler, train_loader, val_loader


def wrap(model: nn.Module, config: FinetuneConfig, context: Context) -> nn.Module:
    """DDP around the model under torchrun (rebuilt whenever the trainable set changes),
    then torch.compile when asked."""
    wrapped = model
    if context.distributed:
        from torch.nn.parallel import DistributedDataParallel

        ids = [context.device.index] if context.device.type == "cuda" else None
        wrapped = DistributedDataParallel(model, device_ids=ids)
    if config.compile:
        wrapped = torch.compile(wrapped)  # type: ignore[assignment]
    return wrapped
