"""The checks that read the evaluation pass's :class:`~.context.Measurement`: the reference,
identity, shapes and finiteness, and the parameter count against the plan."""

from __future__ import annotations

from .compare import share_of_scale
from .context import Measurement, ValidationContext
from .devices import where
from .report import FAILED, PASSED, SKIPPED, Check

__all__ = ["check_finite", "check_identity", "check_parameters", "check_reference", "check_shapes"]


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
    """Patched == the plain original while every blend is 0."""
    m, tol = _measured(context), context.tolerance()
    share = share_of_scale(m.identity_diff, m.identity_scale)
    if not context.identity:
        return Check(
            "identity",
            SKIPPED,
            _eval_where(context),
            f"not every blend is 0 (init=paper or trained blocks): max |patched - original| = "
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
