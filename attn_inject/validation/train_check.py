"""The train-mode check: patched against the reference under one RNG state per batch, and
the buffers (BatchNorm statistics) each leaves behind."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..core.randomness import cuda_devices, seed_torch
from .compare import Buffers, block_inputs, locate, max_diff, outputs, share_of_scale, train_mode
from .context import ValidationContext
from .devices import where
from .report import FAILED, PASSED, SKIPPED, Check

__all__ = ["check_train"]


@dataclass
class _Worst:
    """The largest difference seen so far, and what it was measured against."""

    diff: float = 0.0
    scale: float = 0.0
    buffers: float = 0.0
    buffer_name: str = ""
    located: tuple[str, str] | None = None


def check_train(context: ValidationContext) -> Check:
    """The same comparison as the reference check, in train mode (same RNG seed per batch);
    modes and buffers are restored after."""
    place = where(context.device, context.dtype, "train")
    if context.reference_problem:
        return Check("train", SKIPPED, place, context.reference_problem)
    tol = context.tolerance()
    worst = _Worst()
    buffers = Buffers(context.original, context.patched)
    try:
        with train_mode(context.original, context.patched), torch.no_grad():
            for seed, x in enumerate(context.inputs):
                _one_batch(context, seed, x, buffers, worst, tol)
    finally:
        buffers.restore()
    share = share_of_scale(worst.diff, worst.scale)
    agree = worst.buffers <= tol
    detail = (
        f"max |patched - reference| = {worst.diff:.3g} ({share:.3g} of {worst.scale:.3g}); buffers after the "
        f"step (BatchNorm statistics) "
        f"{'agree' if agree else f'DIFFER ({worst.buffer_name}: {worst.buffers:.3g})'}"
        f"; same RNG seed per batch; modes and buffers restored"
    )
    point = ""
    if share > tol and worst.located is not None:
        point, why = worst.located
        detail += f"; {why}"
    values = {"relative_diff": share, "buffers_relative_diff": worst.buffers}
    return Check("train", PASSED if share <= tol and agree else FAILED, place, detail, point, values)


def _one_batch(
    context: ValidationContext, seed: int, x: torch.Tensor, buffers: Buffers, worst: _Worst, tol: float
) -> None:
    devices = cuda_devices(context.device)
    ref_record: dict[str, torch.Tensor] = {}
    with torch.random.fork_rng(devices=devices):
        seed_torch(seed, devices)
        expected = context.expected(x, ref_record)
    ref_stats = {n: b.detach().clone() for n, b in context.original.named_buffers()}
    buffers.restore()
    got_record: dict[str, torch.Tensor] = {}
    with torch.random.fork_rng(devices=devices), block_inputs(context.reference.blocks, got_record):
        seed_torch(seed, devices)
        got = outputs(context.patched, x)
    got_stats = {n: b.detach().clone() for n, b in context.patched.named_buffers()}
    buffers.restore()
    diff, scale = max_diff(got, expected)
    if diff >= worst.diff:
        worst.diff, worst.scale = diff, scale
    if share_of_scale(diff, scale) > tol and worst.located is None:
        worst.located = locate(context.reference.points, ref_record, got_record)
    for name, a in ref_stats.items():
        b = got_stats.get(name)
        share = share_of_scale(*max_diff([b], [a])) if b is not None else float("inf")
        if share > worst.buffers:
            worst.buffers, worst.buffer_name = share, name
