"""``validate()``: the checks a user needs to trust a patched model, each passed, failed or
skipped with its reason, and where it ran.

The reference is independent of the rewrite: the original model run as written, with each
inserted block applied at its point by hooks on the original's modules
(:mod:`attn_inject.validation.reference`), calling the patched model's own blocks. Patched and
reference must agree for any blend and any weights (``init="paper"``, trained blocks); at
identity (every blend 0) the patched model must also match the plain original.

    >>> report = validate(model, patched, checks=("reference", "train", "gradients"))
    >>> print(report)            # a table: check, status, where, detail
    >>> report.passed, report.to_dict()

Each check is registered (:func:`register_check`) and reads one frozen
:class:`ValidationContext`, with the :class:`Measurement` of one evaluation pass.
"""

from __future__ import annotations

from .autocast_check import check_autocast
from .context import Measurement, ValidationContext
from .devices import cudnn_settings
from .gradients import GRADIENT_TOLERANCE, check_gradients, gradient_tolerance
from .output_checks import (
    check_deterministic,
    check_finite,
    check_identity,
    check_parameters,
    check_reference,
    check_shapes,
)
from .registry import (
    CHECKS,
    TRACE,
    CheckSpec,
    check_names,
    register_check,
    seal_built_in,
    unregister_check,
)
from .report import FAILED, IDENTITY_TOLERANCE, PASSED, SKIPPED, Check, ValidationError, ValidationReport
from .run import validate
from .runtimes import COMPILE_TOLERANCE, check_compile, check_export
from .train_check import check_train

__all__ = [
    "CHECKS",
    "COMPILE_TOLERANCE",
    "FAILED",
    "GRADIENT_TOLERANCE",
    "IDENTITY_TOLERANCE",
    "PASSED",
    "SKIPPED",
    "Check",
    "CheckSpec",
    "Measurement",
    "ValidationContext",
    "ValidationError",
    "ValidationReport",
    "check_names",
    "cudnn_settings",
    "gradient_tolerance",
    "register_check",
    "unregister_check",
    "validate",
]

register_check("reference", check_reference, needs=[TRACE])  # patched == original + blocks by hooks, eval
register_check("identity", check_identity)  # patched == plain original while every blend is 0
register_check("train", check_train, needs=[TRACE])  # the same in train mode; BatchNorm statistics
register_check("gradients", check_gradients)  # one backward; blends; inserted weights within two steps
register_check("parameters", check_parameters)  # parameters added == the plan's
register_check("shapes", check_shapes)  # output shapes and dtypes
register_check("finite", check_finite)
register_check("deterministic", check_deterministic)  # two eval runs under other random states agree
register_check("compile", check_compile, default=False)  # torch.compile matches eager (minutes on a CPU)
register_check("export", check_export)  # torch.export.export, its module matches eager
register_check("autocast", check_autocast, needs=[TRACE])  # bf16 / fp16 vs the reference (CUDA by default)

seal_built_in()  # the checks above stay registered; CHECKS is a live view of every name
