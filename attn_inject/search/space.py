"""A search space (YAML): every dimension a list of values, each point a recipe.

    block: [se, eca, cbam, "timm:gc"]        # required: block kinds (names)
    at: [residual_branch, stage_output]      # required: positions (names)
    stages: [all, [-1], [-2, -1]]            # optional: "all" or stage indices (default: all)
    ratio: [8, 16]                           # optional: reduction ratio (1 to 1024), where the kind has one
    spatial_kernel: [3, 7]                   # optional: CBAM's spatial kernel (1 to 31)
    init: [identity, paper]                  # optional (default: identity)
    attn_lr_scale: [1, 10]                   # optional: the new blocks' lr scale (0.001 to 1000)

A dimension a kind does not have (``ratio`` of ECA) is left out of that kind's points, so
points that differ only there are one point. Timm's kinds get ``ratio`` as ``rd_ratio =
1/ratio`` and run through a permute on channels-last maps. Each point is checked as a
recipe; a space with no valid point is refused, and so is a space where two different
points would read as one name (``ratio: [8, 8.0]``).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from ..blocks import block_param_names, permutes
from ..core.messages import first_line, shown
from ..core.values import is_int, is_number
from ..recipes.recipe import RecipeError, load_recipe, read_recipe_file, read_yaml
from .candidates import Candidate
from .errors import SearchError

__all__ = ["DIMENSIONS", "MAX_POINTS", "load_space", "point_candidate", "read_space", "space_candidates"]

DIMENSIONS = ("block", "at", "stages", "ratio", "spatial_kernel", "init", "attn_lr_scale")
MAX_POINTS = 10_000  # a space larger than this is refused: each point is tens of fine-tunes
NAMES = ("block", "at", "init")  # dimensions whose values are names
# the numeric dimensions' ranges: a reduction ratio keeps at least channels/1024 hidden
# units (timm's kinds take rd_ratio = 1/ratio, so at most 1), a kernel fits a feature map,
# an lr scale keeps the blocks' learning rate within reason
RANGES = {"ratio": (1, 1024), "spatial_kernel": (1, 31), "attn_lr_scale": (1e-3, 1000)}


def _values(data: Mapping[str, Any], key: str, default: list[Any] | None, source: str) -> list[Any]:
    if key not in data:
        if default is None:
            raise SearchError(f"{source}: {key}: missing; a space needs {key!r} (a list of values)")
        return default
    value = data[key]
    values = value if isinstance(value, list) else [value]
    if not values:
        raise SearchError(f"{source}: {key}: an empty list; give at least one value")
    return values


def _stages(value: Any, source: str) -> tuple[int, ...] | None:
    if value == "all" or value is None:
        return None
    if isinstance(value, (list, tuple)) and value and all(is_int(s) for s in value):
        return tuple(int(s) for s in value)
    raise SearchError(f"{source}: stages: {shown(value)} is not allowed; 'all' or a list of stage indices")


def point_candidate(point: Mapping[str, Any]) -> Candidate:
    """The candidate of one point (a value per dimension; one it lacks or holds ``None`` for
    takes the space's default: every stage, ``init: identity``, the recipe's own values)."""
    kind = point["block"]
    stages = _stages(point.get("stages"), "a point")
    init = point.get("init") or "identity"
    names = block_param_names(kind) or []
    params: dict[str, Any] = {}
    if point.get("ratio") is not None:
        if "ratio" in names:
            params["ratio"] = point["ratio"]
        elif "rd_ratio" in names:
            params["rd_ratio"] = 1.0 / point["ratio"]
    if point.get("spatial_kernel") is not None:
        for name in ("spatial_kernel", "spatial_kernel_size"):
            if name in names:
                params[name] = point["spatial_kernel"]
    rule: dict[str, Any] = {"block": {"kind": kind, **params}, "at": point["at"]}
    if stages is not None:
        rule["stages"] = list(stages)
    if permutes(kind):
        rule["channels_last"] = "permute"
    label = kind + "".join(f" {k.replace('_size', '')}={v:g}" for k, v in params.items())
    label += f" @{point['at']}"
    if stages is not None:
        label += f" stages={list(stages)}"
    label += f" {init}"
    if point.get("attn_lr_scale") is not None:
        label += f" lr x{point['attn_lr_scale']:g}"
    recipe = {"name": label, "init": init, "rules": [rule]}
    text = yaml.safe_dump(recipe, sort_keys=False)
    load_recipe(text + "\n")  # checked as a recipe: raises RecipeError
    return Candidate(label, text, point.get("attn_lr_scale"))


def _points(data: Mapping[str, Any], source: str) -> list[dict[str, Any]]:
    dims = {
        "block": _values(data, "block", None, source),
        "at": _values(data, "at", None, source),
        "stages": [_stages(v, source) for v in _values(data, "stages", ["all"], source)],
        "ratio": _values(data, "ratio", [None], source),
        "spatial_kernel": _values(data, "spatial_kernel", [None], source),
        "init": _values(data, "init", ["identity"], source),
        "attn_lr_scale": _values(data, "attn_lr_scale", [None], source),
    }
    for key in NAMES:
        for v in dims[key]:
            if not isinstance(v, str) or not v or len(v) > 200:
                raise SearchError(f"{source}: {key}: {shown(v)} is not allowed; {key} takes names (strings)")
    for key, (low, high) in RANGES.items():
        for v in dims[key]:
            if v is not None and not (is_number(v) and math.isfinite(v) and low <= v <= high):
                raise SearchError(
                    f"{source}: {key}: {shown(v)} is not allowed; numbers from {low:g} to {high:g}"
                )
    size = math.prod(len(v) for v in dims.values())
    if size > MAX_POINTS:
        raise SearchError(f"{source}: {size} points; a space may hold at most {MAX_POINTS}")
    return [dict(zip(dims, values, strict=True)) for values in itertools.product(*dims.values())]


def read_space(path: str | Path) -> dict[str, list[Any]]:
    """The space file at ``path``: each dimension's values as a list, read with every limit
    of a recipe file; unknown keys refused."""
    source = str(path)
    try:
        data = read_yaml(read_recipe_file(Path(path)), source)
    except RecipeError as error:
        raise SearchError(str(error).replace("recipe", "space")) from None
    if not isinstance(data, Mapping):
        raise SearchError(f"{source}: a space is a mapping of dimension: [values]")
    unknown = sorted(str(k) for k in data if k not in DIMENSIONS)
    if unknown:
        raise SearchError(f"{source}: unknown key {unknown[0]!r}; allowed: {', '.join(DIMENSIONS)}")
    return {str(k): v if isinstance(v, list) else [v] for k, v in data.items()}


def space_candidates(space: Mapping[str, list[Any]], source: str) -> tuple[list[Candidate], list[str]]:
    """The distinct valid candidates of ``space``, and why the other points are not (one line
    each); a space with no valid point is refused."""
    candidates: dict[str, Candidate] = {}
    points: dict[str, dict[str, Any]] = {}
    invalid: list[str] = []
    for point in _points(space, source):
        try:
            candidate = point_candidate(point)
        except (RecipeError, ValueError) as error:
            invalid.append(f"{point['block']} @{point['at']}: {first_line(error) or type(error).__name__}")
            continue
        same = candidates.setdefault(candidate.name, candidate)
        first = points.setdefault(candidate.name, point)
        if same != candidate:  # the same name, another recipe or lr scale
            raise SearchError(
                f"{source}: the points {_shown_point(first)} and {_shown_point(point)} both read as "
                f"{candidate.name!r}; give values that differ as names (8 and 8.0 do not)"
            )
    if not candidates:
        why = invalid[0] if invalid else "no point"
        raise SearchError(f"{source}: the space has no valid point ({len(invalid)} invalid; first: {why})")
    return list(candidates.values()), invalid


def _shown_point(point: Mapping[str, Any]) -> str:
    return "{" + ", ".join(f"{k}: {shown(v, 40)}" for k, v in point.items() if v is not None) + "}"


def load_space(path: str | Path) -> tuple[list[Candidate], list[str]]:
    """:func:`space_candidates` of the space file at ``path``."""
    return space_candidates(read_space(path), str(path))
