"""Option values the commands share, read and checked: ``--model-kwargs``, ``--checks``,
``--input-size``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..core.messages import cut, shown
from ..models.build import ModelKwargsError, check_model_kwargs, input_size_for
from ..planning.match import resolve_target
from ..validation import check_names
from .errors import UsageError

__all__ = [
    "check_positive_sizes",
    "default_input_size",
    "parse_checks",
    "parse_input_size",
    "parse_model_kwargs",
]


def parse_model_kwargs(pairs: Sequence[str]) -> dict[str, Any]:
    """``--model-kwargs K=V ...``: each V read as a YAML scalar or list, each K checked
    against the builder arguments that shape the architecture."""
    import yaml

    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise UsageError(f"--model-kwargs takes KEY=VALUE pairs, got {shown(pair)}")
        try:
            out[key] = yaml.safe_load(value)
        except yaml.YAMLError as error:
            problem = getattr(error, "problem", None) or "not a plain value"
            raise UsageError(
                f"--model-kwargs {shown(pair)}: the value must be a number, a string, true/false or a "
                f"list ({cut(problem, 100)})"
            ) from None
    try:
        return check_model_kwargs(out, "--model-kwargs")
    except ModelKwargsError as error:
        raise UsageError(str(error)) from None


def parse_checks(value: str | None) -> tuple[str, ...] | str | None:
    """``--checks``: 'all', a comma-separated list, or None (validate's default: all but compile)."""
    if value is None or value.strip() == "all":
        return value and "all"
    names = tuple(c.strip() for c in value.split(",") if c.strip())
    unknown = [c for c in names if c not in check_names()]
    if unknown or not names:
        raise UsageError(
            f"--checks {value}: unknown {', '.join(unknown) or 'empty'}; "
            f"allowed: all, {', '.join(check_names())}"
        )
    return names


def check_positive_sizes(values: Sequence[int] | None) -> None:
    """``--input-size``: every size from 1 to 8192."""
    if values is not None and (min(values) < 1 or max(values) > 8192):
        raise UsageError(f"--input-size takes sizes from 1 to 8192, got {' '.join(map(str, values))}")


def parse_input_size(
    values: Sequence[int] | None, like: Sequence[int] | None = None
) -> tuple[int, ...] | None:
    """``--input-size`` as a tuple: C H W, or C T H W for video; with ``like`` (the size the
    model was planned at), as many values and the same channel count."""
    if values is None:
        return None
    check_positive_sizes(values)
    got = " ".join(map(str, values))
    if like is not None:
        wanted = " ".join(map(str, like))
        if len(values) != len(like) or values[0] != like[0]:
            raise UsageError(
                f"--input-size {got}: the model takes {len(like)} sizes with {like[0]} channels first, "
                f"like its plan's {wanted}"
            )
    elif len(values) not in (3, 4):
        raise UsageError(f"--input-size takes C H W (or C T H W for video), got {got}")
    return tuple(values)


def default_input_size(name: str, model: Any, recipe: Any, target: str | None) -> tuple[int, ...] | None:
    """The whole model's input size for shape inference, or None when a submodule is
    patched (the API then infers the submodule's own)."""
    return None if resolve_target(model, recipe, target) else input_size_for(name, model)
