"""The checks against eager of the patched model under another runtime: ``torch.compile``
and ``torch.export``."""

from __future__ import annotations

import torch

from ..graph.trace import eval_mode
from ..messages import error_line, first_line
from .compare import max_diff, outputs, share_of_scale
from .context import ValidationContext
from .devices import where
from .report import FAILED, PASSED, SKIPPED, Check

__all__ = ["COMPILE_TOLERANCE", "check_compile", "check_export", "compile_backend"]

COMPILE_TOLERANCE = 1e-4  # fp32: a compiler may fuse and reorder


def compile_backend(device: torch.device) -> tuple[str, str]:
    """The default backend (inductor) when its compiler works here, else "eager" and why."""
    if device.type == "cuda":
        from torch.utils._triton import has_triton

        return ("inductor", "") if has_triton() else ("eager", "no Triton for inductor on this GPU")
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler

        get_cpp_compiler()
    except Exception as error:
        return "eager", f"no C++ compiler for inductor ({first_line(error, 80)})"
    return "inductor", ""


def check_compile(context: ValidationContext) -> Check:
    """``torch.compile`` of the patched model matches eager."""
    import torch._dynamo

    backend, why = compile_backend(context.device)
    place = where(context.device, context.dtype, "eval") + f", backend {backend}"
    x = context.inputs[0]
    torch._dynamo.reset()
    try:
        with eval_mode(context.patched), torch.no_grad():
            eager = outputs(context.patched, x)
            try:
                compiled = outputs(torch.compile(context.patched, backend=backend), x)
            except Exception as error:
                return Check("compile", FAILED, place, f"torch.compile failed: {error_line(error, 160)}")
    finally:
        torch._dynamo.reset()
    tol = COMPILE_TOLERANCE if context.dtype == torch.float32 else context.tolerance()
    note = f"; {why}, so backend='eager'" if why else ""
    return against_eager("compile", place, compiled, eager, tol, "compiled vs eager", note)


def check_export(context: ValidationContext) -> Check:
    """``torch.export.export`` of the patched model runs and its module matches eager;
    skipped when the original does not export either."""
    place = where(context.device, context.dtype, "eval")
    x = context.inputs[0]
    with eval_mode(context.original), eval_mode(context.patched):
        try:
            program = torch.export.export(context.patched, (x,))
        except Exception as error:
            failure = error_line(error, 160)
            try:  # only now is the original's own export worth its time
                torch.export.export(context.original, (x,))
            except Exception as original_error:
                why = error_line(original_error, 120)
                return Check("export", SKIPPED, place, f"the original does not export: {why}")
            return Check(
                "export", FAILED, place, f"the original exports, the patched model does not: {failure}"
            )
        with torch.no_grad():
            eager = outputs(context.patched, x)
            exported = outputs(program.module(), x)
    what = "torch.export.export runs; its module vs eager"
    return against_eager("export", place, exported, eager, context.tolerance(), what)


def against_eager(
    name: str,
    place: str,
    got: list[torch.Tensor],
    eager: list[torch.Tensor],
    tol: float,
    what: str,
    note: str = "",
) -> Check:
    """A check comparing another runtime's outputs with eager, relative to the output scale."""
    diff, scale = max_diff(got, eager)
    share = share_of_scale(diff, scale)
    return Check(
        name,
        PASSED if share <= tol else FAILED,
        place,
        f"{what}: {share:.3g} of output scale {scale:.3g} (tolerance {tol:g}){note}",
        values={"relative_diff": share},
    )
