"""The gradient check: one backward through the original and the patched model under one
seed. Every parameter of the original keeps its gradient (unchanged at identity), every
blend that reaches the output gets one, and every inserted weight gets one within two small
SGD steps."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from ..core.randomness import cuda_devices, seed_torch
from .compare import Buffers, max_diff, outputs, share_of_scale, tensors, train_mode
from .context import ValidationContext
from .devices import cudnn_settings, where
from .report import FAILED, PASSED, Check

__all__ = ["GRADIENT_TOLERANCE", "STEP", "check_gradients", "gradient_tolerance"]

GRADIENT_TOLERANCE = 1e-4  # fp32, of the largest gradient: backward sums in a different order
STEP = 1e-2  # the largest move of an inserted weight in the second step

Grads = list[torch.Tensor | None]
Named = list[tuple[str, nn.Parameter]]


def _loss(outs: list[torch.Tensor], seed: int = 1234) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    total = outs[0].new_zeros((), dtype=torch.float32)
    for out in outs:
        if out.is_floating_point():
            weight = torch.randn(out.shape, generator=generator).to(out.device)
            total = total + (out.float() * weight).sum()
    return total


def _seeded_grads(model: nn.Module, x: torch.Tensor, params: list[nn.Parameter], devices: list) -> Grads:
    """The gradients of ``params`` after one forward under seed 0 (no ``.grad`` written)."""
    with torch.random.fork_rng(devices=devices):
        seed_torch(0, devices)
        loss = _loss(outputs(model, x))
    if not params or not loss.requires_grad:
        return [None] * len(params)
    return list(torch.autograd.grad(loss, params, allow_unused=True))


def gradient_tolerance(first: Grads, second: Grads) -> float:
    """The tolerance for the original's gradients at identity, given two backward passes of
    the original alone: ``GRADIENT_TOLERANCE``, or 4 times the passes' own relative spread
    where that is larger (a device whose backward kernels sum in a varying order)."""
    runs = [(a, b) for a, b in zip(first, second, strict=True) if a is not None and b is not None]
    if not runs:
        return GRADIENT_TOLERANCE
    spread = share_of_scale(*max_diff([b for _, b in runs], [a for a, _ in runs]))
    return max(GRADIENT_TOLERANCE, 4 * spread)


def _nonzero(grad: torch.Tensor | None) -> bool:
    return grad is not None and bool(grad.abs().max() > 0)


def check_gradients(context: ValidationContext) -> Check:
    """See the module's docstring; modes and buffers are restored after."""
    x = context.inputs[0]
    devices = cuda_devices(context.device)
    own = [(n, p) for n, p in context.original.named_parameters() if p.requires_grad]
    patched = [(n, p) for n, p in context.patched.named_parameters() if p.requires_grad]
    buffers = Buffers(context.original, context.patched)
    try:
        with train_mode(context.original, context.patched), cudnn_settings(deterministic=True):
            reference, tolerance = _original_grads(context, x, own, devices, buffers)
            grads = _seeded_grads(context.patched, x, [p for _, p in patched], devices)
            buffers.restore()
            by_id = {id(p): g for (_, p), g in zip(patched, grads, strict=False)}
            by_name = {n: g for (n, _), g in zip(patched, grads, strict=False)}
            problems = _original_problems(context, own, reference, by_name, tolerance)
            late = _late_weights(context, x, by_id, devices, buffers)
            unreached = _unreached(context, late, by_id)
            found, point = _block_problems(context, late, unreached, by_id)
            problems += found
    finally:
        buffers.restore()
    return _gradient_report(context, own, problems, point, unreached)


def _original_grads(
    context: ValidationContext, x: torch.Tensor, own: Named, devices: list, buffers: Buffers
) -> tuple[Grads, float]:
    """The original's gradients, and the tolerance for comparing with them (wider on a device
    whose backward kernels sum in a varying order: measured by a second pass)."""
    reference = _seeded_grads(context.original, x, [p for _, p in own], devices)
    buffers.restore()
    if context.device.type != "cuda":
        return reference, GRADIENT_TOLERANCE
    again = _seeded_grads(context.original, x, [p for _, p in own], devices)
    buffers.restore()
    return reference, gradient_tolerance(reference, again)


def _original_problems(
    context: ValidationContext,
    own: Named,
    reference: Grads,
    by_name: Mapping[str, torch.Tensor | None],
    tolerance: float,
) -> list[str]:
    """The original's parameters that lost their gradient, and at identity whether the
    gradients changed."""
    problems = []
    lost = [n for (n, _), g in zip(own, reference, strict=True) if g is not None and by_name.get(n) is None]
    if lost:
        problems.append(f"{len(lost)} parameters of the original get no gradient ({', '.join(lost[:3])})")
    if not (context.identity and reference):
        return problems
    pairs = [
        (have, g)
        for (n, _), g in zip(own, reference, strict=True)
        if g is not None and (have := by_name.get(n)) is not None
    ]
    if pairs:
        share = share_of_scale(*max_diff([a for a, _ in pairs], [b for _, b in pairs]))
        if share > tolerance:
            _, scale = max_diff([a for a, _ in pairs], [b for _, b in pairs])
            problems.append(
                f"the original's gradients changed at identity ({share:.3g} of {scale:.3g}; "
                f"tolerance {tolerance:.3g})"
            )
    return problems


def _unreached(
    context: ValidationContext, late: list[tuple[str, str]], by_id: Mapping[int, torch.Tensor | None]
) -> list[str]:
    """Blocks nothing of which reaches the output: their blend gets no gradient and their
    weights none within two steps (the grid tokens of a class-token model's last block)."""
    late_keys = {k for k, _ in late}
    blends = context.blends()
    return sorted(
        k
        for k in context.reference.blocks
        if k in late_keys and not any(_nonzero(by_id.get(id(p))) for p in blends[k])
    )


def _block_problems(
    context: ValidationContext,
    late: list[tuple[str, str]],
    unreached: list[str],
    by_id: Mapping[int, torch.Tensor | None],
) -> tuple[list[str], str]:
    """Blends without a gradient (a zero one at identity) and inserted weights without one
    after two steps, in blocks that reach the output; and the first such block."""
    problems: list[str] = []
    point = ""
    for key, params in context.blends().items():
        if key in unreached:
            continue
        for p in params:
            g = by_id.get(id(p))
            if g is None or (context.identity and not bool(g.abs().max() > 0)):
                problems.append(f"the blend of {key} gets {'no' if g is None else 'a zero'} gradient")
                point = point or key
    for key, name in late:
        if key not in unreached:
            problems.append(f"{key}.{name} gets no gradient within two SGD steps")
            point = point or key
    return problems, point


def _gradient_report(
    context: ValidationContext, own: Named, problems: list[str], point: str, unreached: list[str]
) -> Check:
    place = where(context.device, context.dtype, "train")
    n_blends = sum(len(b) for b in context.blends().values())
    counted = f"{len(own)} trainable parameters of the original, {n_blends} blends"
    if unreached:
        counted += (
            f"; {len(unreached)} blocks cannot reach the output (no gradient for their blend or weights): "
            f"{', '.join(unreached[:3])}{' ...' if len(unreached) > 3 else ''}"
        )
    if problems:
        return Check("gradients", FAILED, place, "; ".join(problems[:4]) + f" ({counted})", point)
    return Check(
        "gradients",
        PASSED,
        place,
        f"{counted}: every original parameter gets its gradient, every blend that reaches the output "
        f"{'a non-zero one' if context.identity else 'one'}, every inserted weight one within two SGD steps",
    )


def _late_weights(
    context: ValidationContext,
    x: torch.Tensor,
    grads: Mapping[int, torch.Tensor | None],
    devices: list,
    buffers: Buffers,
) -> list[tuple[str, str]]:
    """The inserted weights with no non-zero gradient after one step on the blocks' parameters
    (each moved against its gradient by ``STEP`` at most: small, so no activation overflows
    in a deep model), run functionally: the models' own parameters are not changed."""
    from torch.func import functional_call

    blocks = context.reference.blocks
    prefix = {key: f"{key}." for key in blocks}
    stepped: dict[str, torch.Tensor] = {}
    first: dict[str, bool] = {}
    for key, block in blocks.items():
        for name, p in block.named_parameters():
            if not p.requires_grad:
                continue
            g = grads.get(id(p))
            full = prefix[key] + name
            first[full] = _nonzero(g)
            step = p.detach() - (g.detach() * (STEP / g.abs().max()) if g is not None and first[full] else 0)
            stepped[full] = step.requires_grad_()
    if all(first.values()):
        return []
    with torch.random.fork_rng(devices=devices):
        seed_torch(0, devices)
        loss = _loss(tensors(functional_call(context.patched, stepped, (x,), strict=False)))
    second = torch.autograd.grad(loss, list(stepped.values()), allow_unused=True)
    buffers.restore()
    late = []
    for (full, _), g in zip(stepped.items(), second, strict=True):
        if not first[full] and not _nonzero(g):
            key = next(k for k in blocks if full.startswith(prefix[k]))
            late.append((key, full[len(prefix[key]) :]))
    return late
