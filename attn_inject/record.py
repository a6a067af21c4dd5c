"""What a patched model remembers, and the one way to read it: :func:`patched_record`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from .planning import Plan, merge_plans

__all__ = ["RECORD_ATTRIBUTE", "InjectionInfo", "patched_record", "set_record"]

RECORD_ATTRIBUTE = "attn_inject"  # a plain attribute of the patched model, not a module or a tensor


@dataclass(frozen=True)
class InjectionInfo:
    """What a patched model remembers: the plan of each injection, in order (recipe, init,
    model name, input size, where each block lives), and the base model's builder.
    ``patched.attn_inject`` holds it."""

    plans: tuple[Plan, ...]
    base_model: str | None = None  # e.g. "tv:resnet18": what ``ai.save`` records to rebuild it
    base_kwargs: tuple[tuple[str, Any], ...] = ()

    @property
    def plan(self) -> Plan:
        """Every point of every injection, in order, as one plan."""
        return self.plans[0] if len(self.plans) == 1 else merge_plans(self.plans)

    @property
    def block_keys(self) -> list[str]:
        """The inserted blocks' qualified names, from the model ``inject`` returned."""
        return [p.qualified_key(plan.target) for plan in self.plans for p in plan]


def patched_record(model: nn.Module) -> InjectionInfo | None:
    """The record ``inject`` left on ``model``; None for a model it did not return."""
    info = vars(model).get(RECORD_ATTRIBUTE)
    return info if isinstance(info, InjectionInfo) else None


def set_record(model: nn.Module, info: InjectionInfo) -> None:
    vars(model)[RECORD_ATTRIBUTE] = info
