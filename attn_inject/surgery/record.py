"""What a patched model remembers, and the one way to read it: :func:`patched_record`; and the
blocks it was given, found by their flag (:func:`inserted_blocks`)."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..core.errors import InputError
from ..core.markers import BLOCK_FLAG, is_inserted_block
from ..planning.points import Plan, merge_plans

__all__ = [
    "BLOCK_FLAG",
    "RECORD_ATTRIBUTE",
    "InjectionInfo",
    "block_parameters",
    "blocks_digest",
    "inserted_blocks",
    "patched_record",
    "set_record",
]

RECORD_ATTRIBUTE = "attn_inject"  # a plain attribute of the patched model, not a module or a tensor


@dataclass(frozen=True)
class InjectionInfo:
    """What a patched model remembers: the plan of each injection, in order (recipe, init,
    model name, input size, where each block lives), the base model's builder, and what
    ``validate`` needs to know whether the model must still compute the original: whether it
    did when ``inject`` returned it, and the digest of its blocks then
    (:func:`blocks_digest`). ``patched.attn_inject`` holds it."""

    plans: tuple[Plan, ...]
    base_model: str | None = None  # e.g. "tv:resnet18": what ``ai.save`` records to rebuild it
    base_kwargs: tuple[tuple[str, Any], ...] = ()
    computes_original: bool = False  # every injection at init="identity", earlier blocks unchanged
    block_digest: str = ""  # of the blocks as inserted; '' where unknown (weights on the meta device)

    @property
    def plan(self) -> Plan:
        """Every point of every injection, in order, as one plan."""
        return self.plans[0] if len(self.plans) == 1 else merge_plans(self.plans)

    @property
    def block_keys(self) -> list[str]:
        """The inserted blocks' qualified names, from the model ``inject`` returned."""
        return [p.qualified_key(plan.target) for plan in self.plans for p in plan]


def blocks_digest(model: nn.Module, keys: Iterable[str]) -> str:
    """sha256 over the ``state_dict`` of each block of ``model`` named in ``keys``, in that
    order: every key, dtype, shape and the tensor's bytes; '' when a block is missing or its
    weights are on the meta device (nothing to digest)."""
    digest = hashlib.sha256()
    for key in keys:
        try:
            block = model.get_submodule(key)
        except AttributeError:
            return ""
        for name, tensor in block.state_dict().items():
            if tensor.is_meta:
                return ""
            digest.update(f"{key}.{name} {tensor.dtype} {tuple(tensor.shape)}\n".encode())
            digest.update(_tensor_bytes(tensor))
    return digest.hexdigest()


def _tensor_bytes(tensor: torch.Tensor) -> memoryview | bytes:
    """The tensor's bytes as a buffer over its (contiguous, CPU) storage: no copy to hash."""
    flat = tensor.detach().reshape(-1).contiguous().cpu()
    return flat.view(torch.uint8).numpy().data if flat.numel() else b""


def patched_record(model: nn.Module) -> InjectionInfo | None:
    """The record ``inject`` left on ``model``; None for a model it did not return."""
    info = vars(model).get(RECORD_ATTRIBUTE)
    return info if isinstance(info, InjectionInfo) else None


def set_record(model: nn.Module, info: InjectionInfo) -> None:
    vars(model)[RECORD_ATTRIBUTE] = info


def inserted_blocks(patched: nn.Module) -> dict[str, nn.Module]:
    """The attention blocks ``inject`` inserted into ``patched``, by qualified module name,
    in module order (e.g. ``{"layer1.0.se": SqueezeExcite(...), ...}``)."""
    if patched_record(patched) is None:
        raise InputError("not a patched model: it has no attn_inject plan")
    return {name: m for name, m in patched.named_modules() if is_inserted_block(m)}


def block_parameters(patched: nn.Module) -> Iterator[nn.Parameter]:
    """The parameters of the inserted blocks, e.g. for their own optimizer param group."""
    for block in inserted_blocks(patched).values():
        yield from block.parameters()
