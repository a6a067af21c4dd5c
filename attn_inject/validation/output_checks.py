"""The checks that read the evaluation pass's :class:`~.context.Measurement`: the reference,
identity, shapes and finiteness, and the parameter count against the plan; and the one that
runs the models twice more: determinism in eval mode."""

from __future__ import annotations

import torch
from torch import nn

from ..blocks.gate import blends_at_one
from ..core.randomness import cuda_devices, seed_torch
from ..graph.trace import eval_mode
from .compare import max_diff, outputs, share_of_scale
from .context import Measurement, ValidationContext
from .devices import where
from .report import FAILED, PASSED, SKIPPED, Check

__all__ = [
    "check_deterministic",
    "check_finite",
    "check_identity",
    "check_parameters",
    "check_reference",
    "check_shapes",
]


def _measured(context: ValidationContext) -> Measurement:
    assert context.measurement is not None, "validate measures before it runs a check"
    return context.measurement


def _eval_where(context: ValidationContext) -> str:
    return where(context.device, context.dtype, "eval")


def _batches(context: ValidationContext) -> str:
    return f"{len(context.inputs)} batches"


def check_reference(context: ValidationContext) -> Check:
    """Patched == the original with the blocks applied by hooks, eval mode, any blend."""
    m, tol = _measured(context), context.tolerance()
    if context.reference_problem:
        return Check("reference", SKIPPED, _eval_where(context), context.reference_problem)
    share = share_of_scale(m.reference_diff, m.reference_scale)
    ok = share <= tol
    detail = (
        f"max |patched - reference| = {m.reference_diff:.3g} ({share:.3g} of output scale "
        f"{m.reference_scale:.3g}, tolerance {tol:g}; {_batches(context)})"
    )
    point = ""
    if not ok and m.located is not None:
        point, why = m.located
        detail += f"; {why}"
    values = {"max_abs_diff": m.reference_diff, "relative_diff": share}
    return Check("reference", PASSED if ok else FAILED, _eval_where(context), detail, point, values)


def check_identity(context: ValidationContext) -> Check:
    """Patched == the plain original while its blocks are as inserted at identity, or every
    blend is 0; skipped, saying which, when the blocks changed since or were inserted at
    ``init="paper"``."""
    m, tol = _measured(context), context.tolerance()
    share = share_of_scale(m.identity_diff, m.identity_scale)
    if not context.identity:
        return Check(
            "identity",
            SKIPPED,
            _eval_where(context),
            f"{context.identity_note or 'not every blend is 0'}: max |patched - original| = "
            f"{m.identity_diff:.3g}; the reference check covers it",
        )
    ok = share <= tol
    exact = (
        "bit for bit"
        if m.identity_diff == 0
        else f"max |patched - original| = {m.identity_diff:.3g} ({share:.3g} of {m.identity_scale:.3g}, "
        f"tolerance {tol:g})"
    )
    point, why = m.located if (not ok and m.located is not None) else ("", "")
    detail = f"{exact}; {_batches(context)}" + (f"; {why}" if why else "")
    if context.identity_note:
        detail += f" ({context.identity_note})"
    values = {"max_abs_diff": m.identity_diff, "relative_diff": share}
    return Check("identity", PASSED if ok else FAILED, _eval_where(context), detail, point, values)


def check_shapes(context: ValidationContext) -> Check:
    """The outputs' shapes and dtypes equal the original's."""
    note = _measured(context).shape_note
    detail = note or "output shapes and dtypes equal the original's"
    return Check("shapes", FAILED if note else PASSED, _eval_where(context), detail)


def check_finite(context: ValidationContext) -> Check:
    """Every output of the patched model is finite."""
    finite = _measured(context).finite
    detail = "every output finite" if finite else "NON-FINITE outputs"
    return Check("finite", PASSED if finite else FAILED, _eval_where(context), detail)


def check_parameters(context: ValidationContext) -> Check:
    """The parameters added equal the plan's count."""
    ok = context.params_added == context.params_planned
    detail = (
        f"added {context.params_added:,} ({'matches' if ok else 'DIFFERS from'} the plan's "
        f"{context.params_planned:,})"
    )
    return Check("parameters", PASSED if ok else FAILED, "model", detail)


def check_deterministic(context: ValidationContext) -> Check:
    """Two eval runs of the patched model on the same input under different global random
    states agree exactly, where the original's do; every blend is set to 1 for the check
    (so a blend of 0 does not hide a noisy block) and put back, and the caller's random
    states are restored."""
    x = context.inputs[0]
    where_ = _eval_where(context)
    plain = _two_runs(context.original, x, context.device)
    if not _same(*plain):
        return Check("deterministic", SKIPPED, where_, "the original itself differs between two eval runs")
    with blends_at_one(p for ps in context.blends().values() for p in ps):
        first, second = _two_runs(context.patched, x, context.device)
    ok = _same(first, second)
    diff, _ = max_diff(first, second)
    detail = (
        "two eval runs under different random states agree exactly, every blend at 1"
        if ok
        else f"two eval runs under different random states differ by up to {diff:.3g} (every blend at 1): "
        "a block draws random numbers in eval mode"
    )
    return Check("deterministic", PASSED if ok else FAILED, where_, detail, values={"max_abs_diff": diff})


def _two_runs(model: nn.Module, x: torch.Tensor, device: torch.device) -> list[list[torch.Tensor]]:
    """``model``'s outputs for ``x`` in eval mode, under global seed 1 then 2."""
    cuda = cuda_devices(device)
    runs = []
    with torch.random.fork_rng(devices=cuda), eval_mode(model), torch.no_grad():
        for seed in (1, 2):
            seed_torch(seed, cuda)
            runs.append(outputs(model, x))
    return runs


def _same(first: list[torch.Tensor], second: list[torch.Tensor]) -> bool:
    return len(first) == len(second) and all(
        a.shape == b.shape and torch.allclose(a, b, rtol=0.0, atol=0.0, equal_nan=True)
        for a, b in zip(first, second, strict=True)
    )
