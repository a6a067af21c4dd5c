"""Comparing outputs: every tensor a model returns, the largest difference relative to the
output's scale, the inputs each block saw, and the point where two runs part."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import nn

from ..graph.trace import mode
from .devices import tensors_of
from .reference import PointHooks
from .report import IDENTITY_TOLERANCE, ValidationError

__all__ = [
    "Buffers",
    "block_inputs",
    "locate",
    "max_diff",
    "outputs",
    "share_of_scale",
    "tensors",
    "train_mode",
]


@contextlib.contextmanager
def train_mode(*models: nn.Module) -> Iterator[None]:
    """Every module of ``models`` in train mode for the duration, then its own flag back."""
    with contextlib.ExitStack() as stack:
        for model in models:
            stack.enter_context(mode(model, training=True))
        yield


class Buffers:
    """A snapshot of every buffer (BatchNorm statistics), restored on demand."""

    def __init__(self, *models: nn.Module) -> None:
        self.saved = [(t, t.detach().clone()) for t in tensors_of(*models) if not isinstance(t, nn.Parameter)]

    def restore(self) -> None:
        with torch.no_grad():
            for t, value in self.saved:
                t.copy_(value)


def tensors(output: Any) -> list[torch.Tensor]:
    """Every tensor of a model's output (a tensor, or nested dicts / lists / tuples)."""
    if isinstance(output, torch.Tensor):
        return [output]
    if isinstance(output, dict):
        output = list(output.values())
    if isinstance(output, (list, tuple)):
        return [t for item in output for t in tensors(item)]
    return []


def outputs(model: Callable[[torch.Tensor], Any], x: torch.Tensor) -> list[torch.Tensor]:
    """The tensors ``model(x)`` returns; a model that returns none is refused."""
    found = tensors(model(x))
    if not found:
        raise ValidationError(f"{type(model).__name__} returned no tensor")
    return found


def max_diff(got: list[torch.Tensor], expected: list[torch.Tensor]) -> tuple[float, float]:
    """(max |got - expected|, max |expected|) over every output tensor, in fp32."""
    if [g.shape for g in got] != [e.shape for e in expected]:
        return float("inf"), 1.0
    diff = max(float((g.float() - e.float()).abs().max()) for g, e in zip(got, expected, strict=True))
    scale = max(float(e.float().abs().max()) for e in expected)
    return diff, scale


def share_of_scale(diff: float, scale: float) -> float:
    """``diff`` as a share of the output's scale (``diff`` itself for an all-zero output)."""
    return diff / scale if scale > 0 else diff


@contextlib.contextmanager
def block_inputs(blocks: dict[str, nn.Module], record: dict[str, torch.Tensor]) -> Iterator[None]:
    """Record each block's first input, by key, while the context is open."""

    def hook(key: str) -> Callable[..., None]:
        def pre(module: nn.Module, args: tuple) -> None:
            if args and isinstance(args[0], torch.Tensor):
                record.setdefault(key, args[0].detach().clone())

        return pre

    handles = [block.register_forward_pre_hook(hook(key)) for key, block in blocks.items()]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def locate(
    points: Sequence[PointHooks], expected: dict[str, torch.Tensor], got: dict[str, torch.Tensor]
) -> tuple[str, str]:
    """The point where the patched model departs from the reference, and how: the latest
    block upstream whose input still matches, before the first block whose input does not."""
    matching: list[str] = []
    for hooks in points:
        want = expected.get(hooks.key)
        if want is None:
            continue
        have = got.get(hooks.key)
        if have is None:
            return hooks.key, f"block {hooks.key} never ran in the patched model"
        if share_of_scale(*max_diff([have], [want])) > IDENTITY_TOLERANCE:
            before = [k for k in matching if k in hooks.upstream] or matching[-1:]
            if not before:
                return hooks.key, f"the input of {hooks.key} already differs (the model departs before it)"
            return before[-1], (
                f"{before[-1]}'s input matches, {hooks.key}'s does not: the model departs after "
                f"{before[-1]} (its output or its consumers' wiring)"
            )
        matching.append(hooks.key)
    if matching:
        sinks = [k for k in matching if not any(k in p.upstream for p in points if p.key != k)]
        last = (sinks or matching)[-1]
        return last, f"every block's input matches; the output departs after {last}"
    return "", "no block input was recorded"
