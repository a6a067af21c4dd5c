"""Optimizer parameter groups for fine-tuning a patched model.

The inserted blocks start from scratch while the rest is pretrained, so they get a larger
learning rate (``attn_lr_scale``, 10 by default). As in timm's ``param_groups_weight_decay``,
biases, norm weights and every other 1-D or scalar parameter (the blocks' blend gates
included) get no weight decay. With ``layer_decay`` the learning rate falls by that factor
per layer group from the head down (BEiT, arXiv 2106.08254, as in timm's
``param_groups_layer_decay``): the layers come from the model's ``group_matcher`` through
timm's ``group_parameters``, and each block joins the layer of the module it sits in.

Multipliers are carried as ``lr_scale``, which timm's schedulers apply to every group at
every update (warm-up and cosine included). Each group also holds ``lr`` (the scaled value,
for an optimizer used without a scheduler) and ``initial_lr`` (the unscaled base the timm
scheduler starts from)::

    >>> groups = ai.param_groups(patched, lr=1e-3, layer_decay=0.75)
    >>> optimizer = timm.optim.create_optimizer_v2(
    ...     patched, "adamw", lr=1e-3, param_group_fn=lambda m: ai.param_groups(m, 1e-3))
    >>> scheduler, _ = timm.scheduler.create_scheduler_v2(optimizer, "cosine", num_epochs=10)

torch's own ``lr_scheduler`` classes take ``initial_lr`` as each group's base and know
nothing of ``lr_scale``: remove ``initial_lr`` from the groups before building one of them.
Every parameter is in exactly one group, frozen ones included (they get no gradient, so
the optimizer leaves them alone until they are unfrozen).
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Any

from torch import nn

from ..core.deprecation import renamed_arguments
from ..core.errors import InputError
from .distributed import unwrap
from .gates import BLEND

__all__ = ["GroupKey", "param_groups"]


@dataclass(frozen=True, order=True)
class GroupKey:
    """What sets a parameter's group: its layer (None without layer decay), whether it is in
    an inserted block, and whether it gets weight decay."""

    layer: int | None
    attention: bool
    decay: bool

    @property
    def name(self) -> str:
        where = "attention" if self.attention else "base"
        layer = "" if self.layer is None else f"layer_{self.layer}_"
        return f"{layer}{where}_{'decay' if self.decay else 'no_decay'}"


@renamed_arguments("0.2.0", model="patched")
def param_groups(
    patched: nn.Module,
    lr: float,
    *,
    weight_decay: float = 0.05,
    attn_lr_scale: float = 10.0,
    layer_decay: float | None = None,
) -> list[dict[str, Any]]:
    """Parameter groups for ``patched`` (a model ``inject`` returned): see the module docstring. Each group
    is ``{"params", "param_names", "name", "lr", "initial_lr", "lr_scale", "weight_decay"}``."""
    from ..surgery.record import inserted_blocks

    model = unwrap(patched)
    for label, value in (("lr", lr), ("attn_lr_scale", attn_lr_scale)):
        if not value > 0:
            raise InputError(f"{label} must be positive, got {value}")
    if not weight_decay >= 0:
        raise InputError(f"weight_decay must be zero or positive, got {weight_decay}")
    if layer_decay is not None and not 0 < layer_decay <= 1:
        raise InputError(f"layer_decay must be in (0, 1], got {layer_decay}")

    blocks = inserted_blocks(model)
    block_of = {
        f"{block}.{name}": block for block, module in blocks.items() for name, _ in module.named_parameters()
    }
    gate_names = {n for n in block_of if n.rsplit(".", 1)[-1] == BLEND}
    no_decay_patterns = _no_weight_decay(model)
    layers, layer_max = _layers(model, blocks, block_of) if layer_decay is not None else ({}, 0)

    groups: dict[GroupKey, dict[str, Any]] = {}
    for name, param in model.named_parameters():
        attention = name in block_of
        decay = not (
            param.ndim <= 1
            or name.endswith(".bias")
            or name in gate_names
            or any(fnmatch.fnmatch(name, p) for p in no_decay_patterns)
        )
        layer = layers.get(name, layer_max) if layer_decay is not None else None
        key = GroupKey(layer, attention, decay and weight_decay > 0)
        group = groups.get(key)
        if group is None:
            scale = (attn_lr_scale if attention else 1.0) * (
                layer_decay ** (layer_max - layer) if layer_decay is not None and layer is not None else 1.0
            )
            group = groups[key] = {
                "name": key.name,
                "params": [],
                "param_names": [],
                "lr_scale": scale,
                "lr": lr * scale,
                "initial_lr": lr,
                "weight_decay": weight_decay if key.decay else 0.0,
            }
        group["params"].append(param)
        group["param_names"].append(name)
    return [groups[k] for k in sorted(groups)]


def _no_weight_decay(model: nn.Module) -> set[str]:
    """timm models name parameters that take no weight decay (``no_weight_decay()``)."""
    method = getattr(model, "no_weight_decay", None)
    return set(method()) if callable(method) else set()


def _layers(
    model: nn.Module, blocks: dict[str, nn.Module], block_of: dict[str, str]
) -> tuple[dict[str, int], int]:
    """Layer index per parameter name from the model's ``group_matcher`` (timm), the inserted
    blocks in the layer of the deepest base parameter of the module they sit in."""
    matcher = getattr(model, "group_matcher", None)
    if not callable(matcher):
        raise InputError(
            f"layer_decay needs the model's group_matcher() to tell its layers apart; "
            f"{type(model).__name__} has none (timm models have one); leave layer_decay unset"
        )
    from timm.models import group_parameters

    layers: dict[str, int] = group_parameters(model, matcher(coarse=False), reverse=True)
    layer_max = max(layers.values(), default=0)
    base = {n: i for n, i in layers.items() if n not in block_of}
    for block in blocks:
        host = block.rpartition(".")[0]
        inside = [i for n, i in base.items() if not host or n.startswith(host + ".")]
        layer = max(inside) if inside else layer_max
        for name, owner in block_of.items():
            if owner == block:
                layers[name] = layer
    return layers, layer_max
