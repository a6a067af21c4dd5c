"""The checks against eager of the patched model under another runtime: ``torch.compile``
and ``torch.export``."""

from __future__ import annotations

import itertools
import types
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..core.messages import cut, error_line, first_line
from ..graph.trace import eval_mode
from .compare import max_diff, outputs, share_of_scale
from .context import ValidationContext
from .devices import where
from .report import FAILED, PASSED, SKIPPED, Check

__all__ = [
    "COMPILE_TOLERANCE",
    "check_compile",
    "check_export",
    "compile_backend",
    "compiled_apart",
    "export_any_batch",
    "export_batches",
]

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
    """``torch.compile`` of the patched model matches eager. The compiled code is the check's
    own (see :func:`compiled_apart`): the caller's compiled code stays as it was."""
    backend, why = compile_backend(context.device)
    place = where(context.device, context.dtype, "eval") + f", backend {backend}"
    x = context.inputs[0]
    with eval_mode(context.patched), torch.no_grad():
        eager = outputs(context.patched, x)
        try:
            compiled = outputs(torch.compile(compiled_apart(context.patched), backend=backend), x)
        except Exception as error:
            return Check("compile", FAILED, place, f"torch.compile failed: {error_line(error, 160)}")
    tol = COMPILE_TOLERANCE if context.dtype == torch.float32 else context.tolerance()
    note = f"; {why}, so backend='eager'" if why else ""
    return against_eager("compile", place, compiled, eager, tol, "compiled vs eager", note)


_CALLS = itertools.count()


def compiled_apart(model: nn.Module) -> Callable[[torch.Tensor], Any]:
    """A function that calls ``model``, with code of its own, for ``torch.compile``. Dynamo
    keeps what it compiles on the code object of the frame it starts from (for a module, its
    class's ``forward``, shared with every model of that class), and its only way to drop it is
    ``torch._dynamo.reset()``, which drops every compiled frame of the process. From a code
    object of its own, what the check compiles is kept apart from the caller's compiled code
    (which neither recompiles nor loses a recompile of its budget) and goes with the function."""

    def call(x: torch.Tensor) -> Any:
        return model(x)

    code = call.__code__.replace(co_name=f"_compile_check_{next(_CALLS)}")
    return types.FunctionType(code, call.__globals__, code.co_name, None, call.__closure__)


def check_export(context: ValidationContext) -> Check:
    """``torch.export.export`` of the patched model with a dynamic batch dimension runs, and
    its module matches eager at two batch sizes (see :func:`export_batches`); failed when the
    patched model exports only at a fixed batch while the original exports with any, skipped
    when the original does not export (at all, or with a dynamic batch) either."""
    place = where(context.device, context.dtype, "eval")
    first, second = export_batches(context.inputs[0])
    example = max(first, second, key=len)  # a batch of 1 would be specialised, never dynamic
    with eval_mode(context.original), eval_mode(context.patched):
        try:
            program = export_any_batch(context.patched, example)
        except Exception as error:
            return _export_failure(context, example, error, place)
        with torch.no_grad():
            got = [outputs(program.module(), x) for x in (first, second)]
            eager = [outputs(context.patched, x) for x in (first, second)]
    tol = context.tolerance()
    shares = [share_of_scale(*max_diff(g, e)) for g, e in zip(got, eager, strict=True)]
    at = ", ".join(f"{share:.3g} at batch {len(x)}" for x, share in zip((first, second), shares, strict=True))
    return Check(
        "export",
        PASSED if max(shares) <= tol else FAILED,
        place,
        f"torch.export.export with a dynamic batch runs; its module vs eager: {at} "
        f"(shares of the output scale, tolerance {tol:g})",
        values={"relative_diff": max(shares)},
    )


def export_batches(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The two batches an export is compared at: ``x`` and its first sample, or for a batch of
    one, ``x`` and ``x`` three times over."""
    if len(x) > 1:
        return x, x[:1]
    return x, x.repeat((3,) + (1,) * (x.dim() - 1))


def export_any_batch(model: nn.Module, x: torch.Tensor) -> torch.export.ExportedProgram:
    """``torch.export.export`` of ``model`` on ``x`` with dimension 0 dynamic; raises when the
    export would fix the batch to the example's (a guard that specialises it)."""
    return torch.export.export(model, (x,), dynamic_shapes=({0: torch.export.Dim("batch")},))


def _export_failure(context: ValidationContext, x: torch.Tensor, error: Exception, place: str) -> Check:
    """The export check when the patched model does not export with a dynamic batch: failed
    where the original does export (with a dynamic batch, or at all where the patched model
    does not export at all), skipped where the original does not either."""
    failure = _why(error)
    # only now are the original's own exports, and the patched model's static one, worth their time
    original_any = _export_error(context.original, x, dynamic=True)
    if original_any:
        original_fixed = _export_error(context.original, x, dynamic=False)
        if original_fixed:
            return Check("export", SKIPPED, place, f"the original does not export: {original_fixed}")
    if _export_error(context.patched, x, dynamic=False):
        return Check("export", FAILED, place, f"the original exports, the patched model does not: {failure}")
    if original_any:
        why = f"the original does not export with a dynamic batch either: {original_any}"
        return Check("export", SKIPPED, place, why)
    why = f"the patched model exports only at batch {len(x)}, the original with any batch: {failure}"
    return Check("export", FAILED, place, why)


def _export_error(model: nn.Module, x: torch.Tensor, dynamic: bool) -> str:
    """Why ``model`` does not export on ``x`` (with a dynamic batch or at its fixed one); ''
    when it does."""
    try:
        if dynamic:
            export_any_batch(model, x)
        else:
            torch.export.export(model, (x,))
    except Exception as error:
        return _why(error, 120)
    return ""


def _why(error: Exception, limit: int = 160) -> str:
    """An export error on one line: where a guard fixed a dynamic dimension, the sentence that
    says so (the first line of such an error only points at a log)."""
    sentences = [part.strip(" -") for line in str(error).splitlines() for part in line.split(". ")]
    said = next((part for part in sentences if "specialized" in part), "")
    return f"{type(error).__name__}: {cut(said, limit)}" if said else error_line(error, limit)


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
