"""What every check reads: the two models on the device, the reference, the inputs, and the
:class:`Measurement` of one evaluation pass. Both are frozen: no check changes what another
sees."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..blocks.gate import blend_parameters
from ..graph.trace import eval_mode
from ..surgery.record import blocks_digest, patched_record
from .compare import block_inputs, locate, max_diff, outputs, share_of_scale
from .reference import HookError, Reference
from .report import IDENTITY_TOLERANCE

__all__ = ["Measurement", "ValidationContext", "identity_expected", "measure"]


@dataclass(frozen=True)
class Measurement:
    """One pass of every input through the plain original, the reference and the patched
    model, in eval mode: the worst differences over the inputs and what they show."""

    reference_diff: float  # max |patched - reference|
    reference_scale: float
    identity_diff: float  # max |patched - plain original|
    identity_scale: float
    shape_note: str  # '' when shapes and dtypes agree, else both
    finite: bool
    located: tuple[str, str] | None  # (point, how) where a failing batch departs first
    reference_error: str  # why the reference could not run ('' when it ran)


@dataclass(frozen=True)
class ValidationContext:
    """Both compared modules on the device (the plan's target, or the models), the
    reference, the random inputs, and what validation was asked for."""

    original: nn.Module
    patched: nn.Module
    reference: Reference
    inputs: tuple[torch.Tensor, ...]
    device: torch.device
    dtype: torch.dtype
    dtypes: tuple[torch.dtype, ...]  # autocast dtypes asked for, with the models' own
    identity: bool  # patched must compute the plain original (see identity_expected)
    skip: frozenset[str]  # unreachable points, skipped by the reference (identity there)
    unreachable: str  # why no reference can be built ('' when it can)
    params_added: int
    params_planned: int
    measurement: Measurement | None = None
    identity_note: str = ""  # why identity is expected, or why not (identity_expected)

    @property
    def reference_problem(self) -> str:
        """Why the reference cannot be compared with ('' when it can)."""
        if self.unreachable:
            return self.unreachable
        return self.measurement.reference_error if self.measurement is not None else ""

    def expected(self, x: torch.Tensor, record: dict[str, torch.Tensor] | None = None) -> list[torch.Tensor]:
        """What the patched model must return for ``x``: the original with the blocks hooked in."""
        with self.reference.hooked(self.original, record, self.skip):
            return outputs(self.original, x)

    def tolerance(self) -> float:
        return IDENTITY_TOLERANCE if self.dtype == torch.float32 else torch.finfo(self.dtype).eps * 8

    def blends(self) -> dict[str, list[nn.Parameter]]:
        """Each block's blend parameters, by block key."""
        return {key: blend_parameters(block) for key, block in self.reference.blocks.items()}


def identity_expected(patched: nn.Module, blends: Mapping[str, Sequence[torch.Tensor]]) -> tuple[bool, str]:
    """Whether ``patched`` (the model ``inject`` returned) must compute the plain original,
    and why or why not: yes while its blocks are those ``inject`` proved at
    ``init="identity"`` (their digest unchanged since), or every block has a blend and every
    blend is 0 (``blends``: each block's blend parameters, by key)."""
    record = patched_record(patched)
    assert record is not None, "validate refuses a model inject did not return"
    unchanged = bool(record.block_digest) and blocks_digest(patched, record.block_keys) == record.block_digest
    if record.computes_original and unchanged:
        return True, "the blocks are as inserted at init='identity'"
    if blends and all(bool(b) and not any(bool(p.detach().any()) for p in b) for b in blends.values()):
        return True, "every blend is 0"
    if not record.computes_original:
        return False, "inserted at init='paper' and not every blend is 0"
    if not record.block_digest:
        return (
            False,
            "no digest of the blocks was recorded (meta device) and not every blend is 0",
        )
    return False, "the blocks changed since insertion (their digest differs) and not every blend is 0"


def measure(context: ValidationContext) -> Measurement:
    """Run every input once through the three models (see :class:`Measurement`)."""
    tol = context.tolerance()
    worst_ref = worst_id = ref_scale = id_scale = 0.0
    located: tuple[str, str] | None = None
    shape_note, finite, error = "", True, context.unreachable
    for x in context.inputs:
        plain, expected, ref_record, error = _expected(context, x, error)
        got_record: dict[str, torch.Tensor] = {}
        with eval_mode(context.patched), torch.no_grad(), block_inputs(context.reference.blocks, got_record):
            got = outputs(context.patched, x)
        if [(g.shape, g.dtype) for g in got] != [(p.shape, p.dtype) for p in plain]:
            shape_note = (
                f"patched {[(tuple(g.shape), str(g.dtype)) for g in got]} vs "
                f"original {[(tuple(p.shape), str(p.dtype)) for p in plain]}"
            )
        finite = finite and all(bool(torch.isfinite(g).all()) for g in got)
        diff, scale = max_diff(got, plain)
        if diff >= worst_id:
            worst_id, id_scale = diff, scale
        diff, scale = max_diff(got, expected)
        if diff >= worst_ref:
            worst_ref, ref_scale = diff, scale
        failing = share_of_scale(diff, scale) > tol or (
            context.identity and share_of_scale(*max_diff(got, plain)) > tol
        )
        if failing and located is None:
            located = locate(context.reference.points, ref_record, got_record)
    reference_error = "" if error == context.unreachable else error
    return Measurement(worst_ref, ref_scale, worst_id, id_scale, shape_note, finite, located, reference_error)


def _expected(
    context: ValidationContext, x: torch.Tensor, error: str
) -> tuple[list[torch.Tensor], list[torch.Tensor], dict[str, torch.Tensor], str]:
    """The plain original's outputs for ``x``, the reference's (the plain ones when the
    reference cannot run), the blocks' inputs the reference saw, and why it could not run."""
    record: dict[str, torch.Tensor] = {}
    with eval_mode(context.original), eval_mode(context.patched), torch.no_grad():  # blocks: the patched's
        plain = outputs(context.original, x)
        if error:
            return plain, plain, record, error
        try:
            return plain, context.expected(x, record), record, ""
        except HookError as hook_error:  # a hook met what the trace did not show
            return plain, plain, record, f"the reference could not run: {hook_error}"
