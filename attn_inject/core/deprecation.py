"""Old public names kept for one release: each use warns with a ``DeprecationWarning``
naming the new one.

    >>> gates = deprecated_alias(blends, "gates", since="0.2")   # ai.gates(...) warns, then runs blends
    >>> @renamed_arguments(original="model")                     # validate(original=...) warns
    ... def validate(model, patched): ...
"""

from __future__ import annotations

import functools
import inspect
import warnings
from collections.abc import Callable
from typing import Any, TypeVar

__all__ = ["deprecated_alias", "module_aliases", "renamed_arguments", "warn_renamed"]

F = TypeVar("F", bound=Callable[..., Any])


def warn_renamed(old: str, new: str, since: str, *, stacklevel: int = 3) -> None:
    """Warn that ``old`` is now ``new`` (the old name works until the release after ``since``)."""
    warnings.warn(
        f"{old} is deprecated since {since} and will be removed in the next release; use {new}",
        DeprecationWarning,
        stacklevel=stacklevel,
    )


def deprecated_alias(func: F, old: str, *, since: str) -> F:
    """``func`` under its old name ``old``: the same call, with a warning naming ``func``."""

    @functools.wraps(func)
    def alias(*args: Any, **kwargs: Any) -> Any:
        warn_renamed(f"{old}()", f"{func.__name__}()", since)
        return func(*args, **kwargs)

    alias.__name__ = alias.__qualname__ = old
    alias.__doc__ = f"Deprecated since {since}: use :func:`{func.__name__}` (the same function)."
    return alias  # type: ignore[return-value]


def renamed_arguments(since: str, **old_to_new: str) -> Callable[[F], F]:
    """A decorator that accepts each old keyword argument name for its new one, with a
    warning; giving both is a ``TypeError``, as a repeated argument is."""

    def decorate(func: F) -> F:
        order = list(inspect.signature(func).parameters)

        @functools.wraps(func)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            for old, new in old_to_new.items():
                if old in kwargs:
                    if new in kwargs or order.index(new) < len(args):
                        raise TypeError(f"{func.__name__}() got both {old}= and {new}=; pass {new}= only")
                    warn_renamed(f"{func.__name__}({old}=...)", f"{func.__name__}({new}=...)", since)
                    kwargs[new] = kwargs.pop(old)
            return func(*args, **kwargs)

        return wrapper  # type: ignore[return-value]

    return decorate


def module_aliases(module: str, aliases: dict[str, tuple[str, Callable[[], Any]]], since: str) -> Any:
    """A module ``__getattr__`` serving each old name in ``aliases`` (old -> (new name, a
    function returning the new object)) with a warning; any other name is an AttributeError."""

    def __getattr__(name: str) -> Any:
        if name in aliases:
            new, get = aliases[name]
            warn_renamed(f"{module}.{name}", f"{module}.{new}", since)
            return get()
        raise AttributeError(f"module {module!r} has no attribute {name!r}")

    return __getattr__
