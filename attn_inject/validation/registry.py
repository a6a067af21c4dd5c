"""The checks :func:`validate` knows, in the order it reports them. A user registers a
check as they register a block::

    >>> def no_nan_blends(context):
    ...     bad = [k for k, ps in context.blends().items() if any(p.isnan().any() for p in ps)]
    ...     return Check("blends", FAILED if bad else PASSED, "model", ", ".join(bad) or "no NaN")
    >>> register_check("blends", no_nan_blends)
    >>> unregister_check("blends")                 # and gone again

:data:`CHECKS` is a live view of the registered names: it follows every registration.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ..core.errors import InputError
from ..core.views import NamesView, unregistered
from .context import ValidationContext
from .report import Check

__all__ = [
    "CHECKS",
    "TRACE",
    "CheckSpec",
    "check_names",
    "checks_for",
    "register_check",
    "registered",
    "unregister_check",
]

TRACE = "trace"  # the check compares with the reference, so the original must be traced

CheckRun = Callable[[ValidationContext], "Check | Sequence[Check]"]


@dataclass(frozen=True)
class CheckSpec:
    """A check: its name, what it needs besides the context (``TRACE``), whether it runs
    when no checks are named, and ``run(context)``, returning one check or several (one per
    dtype)."""

    name: str
    run: CheckRun
    needs: frozenset[str] = frozenset()
    default: bool = True


_CHECKS: dict[str, CheckSpec] = {}
_BUILT_IN: dict[str, CheckSpec] = {}  # the package's own checks, which stay registered


def register_check(
    name: str,
    run: CheckRun,
    *,
    needs: Sequence[str] = (),
    default: bool = True,
    overwrite: bool = False,
) -> CheckSpec:
    """Make ``run(context) -> Check | [Check, ...]`` the check called ``name``; it runs after
    the checks registered before it, on a :class:`ValidationContext` it cannot change."""
    if not isinstance(name, str) or not name.isidentifier():
        raise InputError(f"check name {name!r} must be a Python identifier")
    if not callable(run):
        raise InputError(f"check {name!r}: run must be callable, got {type(run).__name__}")
    unknown = sorted(set(needs) - {TRACE})
    if unknown:
        raise InputError(f"check {name!r} needs {unknown}; allowed: {TRACE!r}")
    if name in _CHECKS and not overwrite:
        raise InputError(f"check {name!r} is already registered; pass overwrite=True to replace it")
    spec = CheckSpec(name, run, frozenset(needs), default)
    _CHECKS[name] = spec
    return spec


def unregister_check(name: str) -> CheckSpec:
    """Remove check ``name`` that :func:`register_check` added, and return it (so a test can
    put the registry back as it was). A built-in check replaced with ``overwrite=True`` gets
    its own back; the built-in checks stay."""
    return unregistered(_CHECKS, name, _BUILT_IN, "check", "checks")


def seal_built_in() -> None:
    """Mark the checks registered so far as the package's own (called once, by the package)."""
    _BUILT_IN.update(_CHECKS)


def registered() -> tuple[CheckSpec, ...]:
    return tuple(_CHECKS.values())


def check_names() -> tuple[str, ...]:
    """The registered checks' names, in report order."""
    return tuple(_CHECKS)


CHECKS = NamesView(check_names)  # live: follows register_check and unregister_check


def checks_for(asked: Sequence[str] | str | None) -> tuple[CheckSpec, ...]:
    """The checks to run: the default ones for ``None``, every one for ``"all"``, else the
    ones named (unknown names refused with the allowed ones)."""
    if asked is None:
        return tuple(spec for spec in _CHECKS.values() if spec.default)
    if asked == "all":
        return registered()
    names = [asked] if isinstance(asked, str) else list(asked)
    unknown = [n for n in names if n not in _CHECKS]
    if unknown:
        raise InputError(f"unknown checks {unknown}; allowed: {', '.join(_CHECKS)}")
    return tuple(spec for spec in _CHECKS.values() if spec.name in names)
