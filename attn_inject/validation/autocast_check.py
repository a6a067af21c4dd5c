"""The autocast check: the patched model against the reference under each lower-precision
dtype asked for (bf16 and fp16 on CUDA by default), within ``torch.testing``'s tolerances."""

from __future__ import annotations

import torch

from ..core.messages import first_line
from ..graph.trace import eval_mode
from .compare import outputs
from .context import ValidationContext
from .devices import where
from .report import FAILED, PASSED, SKIPPED, Check

__all__ = ["check_autocast"]


def check_autocast(context: ValidationContext) -> list[Check]:
    """One check per dtype other than the models' own; skipped where there is none."""
    low = [d for d in context.dtypes if d != context.dtype]
    if not low:
        place = where(context.device, context.dtype, "eval")
        why = (
            "no CUDA: only fp32 runs on the CPU"
            if context.device.type == "cpu"
            else f"dtypes={list(context.dtypes)}"
        )
        return [Check("autocast", SKIPPED, place, why)]
    return [_under(context, dtype) for dtype in low]


def _under(context: ValidationContext, dtype: torch.dtype) -> Check:
    name = f"autocast {str(dtype).replace('torch.', '')}"
    place = where(context.device, dtype, "eval autocast")
    if context.reference_problem:
        return Check(name, SKIPPED, place, context.reference_problem)
    rtol, atol = torch.testing._comparison.default_tolerances(dtype)
    x = context.inputs[0]
    with eval_mode(context.original), eval_mode(context.patched), torch.no_grad():
        try:
            with torch.autocast(context.device.type, dtype=dtype):
                expected = context.expected(x)
        except Exception as error:
            return Check(name, SKIPPED, place, f"the original fails under autocast: {first_line(error, 120)}")
        with torch.autocast(context.device.type, dtype=dtype):
            got = outputs(context.patched, x)
    try:
        for g, e in zip(got, expected, strict=True):
            torch.testing.assert_close(g, e, rtol=rtol, atol=atol)
    except (AssertionError, ValueError) as error:
        return Check(name, FAILED, place, first_line(error, 200))
    detail = f"patched vs reference within rtol {rtol:g}, atol {atol:g} (torch.testing's {dtype} defaults)"
    return Check(name, PASSED, place, detail)
