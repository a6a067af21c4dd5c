"""``validate(model, patched)``: build the context once, measure once, run each check
asked for in report order, and gather the report."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
from torch import nn

from ..core.deprecation import renamed_arguments
from ..core.errors import InputError
from ..core.messages import first_line
from ..core.names import join_names
from ..models.facts import count_params, default_input_size
from ..planning.points import Plan
from ..surgery.record import patched_record
from .context import Measurement, ValidationContext, identity_expected, measure
from .devices import cudnn_settings, device_name, on_device, resolve_device, tensors_of, where
from .reference import Reference
from .registry import TRACE, CheckSpec, checks_for, registered
from .report import SKIPPED, Check, ValidationError, ValidationReport

__all__ = ["validate"]


@renamed_arguments("0.2.0", original="model")
def validate(
    model: nn.Module,
    patched: nn.Module,
    *,
    input_size: Sequence[int] | None = None,
    device: str | torch.device = "auto",
    batch: int = 2,
    seeds: int = 3,
    dtypes: Sequence[torch.dtype] | None = None,
    checks: Sequence[str] | str | None = None,
) -> ValidationReport:
    """Check ``patched`` against ``model`` (the model it was injected into) and report each
    check (see :data:`CHECKS`). ``original=`` is the deprecated name of ``model``.

    ``seeds`` random batches of ``batch`` at ``input_size`` (C, H, W; default the plan's)
    run through the patched model, the plain model and the reference (the model with
    the patched model's blocks applied by hooks): patched vs reference within 1e-5 of the
    output scale in fp32 for any blend, and vs the plain model while every blend is 0;
    the same in train mode under one RNG state, BatchNorm statistics compared; gradients;
    parameters added vs the plan; shapes, dtypes, finiteness; ``torch.compile`` and
    ``torch.export`` against eager; bf16 / fp16 autocast (``dtypes``, default on CUDA).
    ``checks`` picks a subset; by default every check but ``compile`` (a compilation takes
    minutes on a CPU), which is then reported as skipped; ``checks="all"`` runs it too.
    Runs on CUDA when available (``device="auto"``); the models
    are not changed (modes, buffers and parameters are as they were). For a plan with a
    target, the targets are compared.
    """
    if patched_record(patched) is None:
        raise ValidationError("the second model is not a patched model (it has no attn_inject plan)")
    if any(t.is_meta for t in tensors_of(model, patched)):
        raise ValidationError(
            "the model's weights are on the meta device; materialise them before validating"
        )
    if batch < 1 or seeds < 1:
        raise InputError(f"batch and seeds must be at least 1, got batch={batch}, seeds={seeds}")
    specs = checks_for(checks)
    target = resolve_device(device)
    model, patched = on_device(model, patched, target)
    context = _context(model, patched, specs, target, input_size, batch, seeds, dtypes)
    results, measured = _run_checks(context, specs, batch)
    results = _reported(results, context, target, asked=checks is not None)
    root = context.reference.root
    return ValidationReport(
        device=device_name(target),
        input_shape=tuple(context.inputs[0].shape),
        init=_record_plan(patched).init,
        checks=tuple(results),
        unreachable=tuple((join_names(root, p.key), p.unreachable) for p in context.reference.unreachable),
        max_abs_diff=measured.identity_diff,
        output_scale=measured.identity_scale,
        identity_expected=context.identity,
        params_added=context.params_added,
        params_planned=context.params_planned,
        finite=measured.finite,
    )


def _reported(
    results: list[Check], context: ValidationContext, target: torch.device, asked: bool
) -> list[Check]:
    """The checks in the registry's order, those not run by default said so (unless the
    caller chose the checks), points named as in the model passed in."""
    if not asked:
        results = results + [
            Check(
                s.name, SKIPPED, where(target, context.dtype, "eval"), "not asked for: checks='all' runs it"
            )
            for s in registered()
            if not s.default
        ]
    order = {spec.name: i for i, spec in enumerate(registered())}
    results = sorted(results, key=lambda c: order.get(c.name.split()[0], len(order)))
    root = context.reference.root
    if root:
        results = [dataclasses.replace(c, point=f"{root}.{c.point}") if c.point else c for c in results]
    return results


def _record_plan(patched: nn.Module) -> Plan:
    record = patched_record(patched)
    assert record is not None
    return record.plan


def _context(
    original: nn.Module,
    patched: nn.Module,
    specs: Sequence[CheckSpec],
    device: torch.device,
    input_size: Sequence[int] | None,
    batch: int,
    seeds: int,
    dtypes: Sequence[torch.dtype] | None,
) -> ValidationContext:
    """The context every check reads: the compared roots, the reference (traced only when a
    check compares with it; else the blocks are enough), the inputs, identity or not."""
    plan = _record_plan(patched)
    reference = Reference.build(original, patched, trace=any(TRACE in s.needs for s in specs))
    root = reference.root
    original_root = original.get_submodule(root) if root else original
    patched_root = patched.get_submodule(root) if root else patched
    size = (
        tuple(input_size)
        if input_size is not None
        else tuple(plan.input_size) or default_input_size(original_root)
    )
    dtype = next((p.dtype for p in patched_root.parameters() if p.is_floating_point()), torch.float32)
    inputs = tuple(
        torch.randn((batch, *size), generator=torch.Generator().manual_seed(s)).to(device, dtype)
        for s in range(seeds)
    )
    blends = {
        key: [p for name, p in block.named_parameters() if name.split(".")[-1] == "blend"]
        for key, block in reference.blocks.items()
    }
    at_identity = {key: bool(b) and all(not bool(p.detach().any()) for p in b) for key, b in blends.items()}
    identity, identity_note = identity_expected(patched, blends)
    not_identity = [p.key for p in reference.unreachable if not (identity or at_identity.get(p.key, False))]
    if dtypes is None:
        dtypes = (torch.float32, torch.bfloat16, torch.float16) if device.type == "cuda" else (torch.float32,)
    return ValidationContext(
        original=original_root,
        patched=patched_root,
        reference=reference,
        inputs=inputs,
        device=device,
        dtype=dtype,
        dtypes=tuple(dtypes),
        identity=identity,
        identity_note=identity_note,
        skip=frozenset(p.key for p in reference.unreachable),
        unreachable=(
            f"no hook reaches {', '.join(not_identity[:3])}, whose blocks are not at identity"
            if not_identity
            else ""
        ),
        params_added=count_params(patched) - count_params(original),
        params_planned=plan.params_added,
    )


def _run_checks(
    context: ValidationContext, specs: Sequence[CheckSpec], batch: int
) -> tuple[list[Check], Measurement]:
    """Measure once, then run each check on the measured context; running out of memory is
    one error naming what ran."""
    current = "the forward passes"
    results: list[Check] = []
    try:
        with cudnn_settings(benchmark=False):
            measured = measure(context)
            context = dataclasses.replace(context, measurement=measured)
            for spec in specs:
                current = spec.name
                outcome = spec.run(context)
                results += [outcome] if isinstance(outcome, Check) else list(outcome)
    except torch.OutOfMemoryError as error:
        raise ValidationError(
            f"out of memory on {device_name(context.device)} during {current} at batch {batch}: "
            f"validate with batch=1 or device='cpu' ({first_line(error, 100)})"
        ) from None
    return results, measured
