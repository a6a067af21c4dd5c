"""The zoo report: ``docs/zoo.csv`` (one row per model and recipe) and ``docs/zoo.md``
(the summary first: counts, percentages, failures with their reasons)."""

from __future__ import annotations

import csv
import io
import os
import platform
import re
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import astuple, fields
from pathlib import Path
from typing import Any

from ..core.errors import InputError, InputTypeError
from ..core.files import write_text_atomic
from ..core.tables import markdown_table
from .sweep import ZooRecord

__all__ = ["RESIDUAL_FAMILIES", "read_csv", "write_csv", "write_markdown"]

STAGE_RECIPE = "cbam_after_every_stage"
RESIDUAL_RECIPE = "se_resnet"
# Residual CNN families (name patterns) whose residual additions se_resnet must find.
RESIDUAL_FAMILIES = {
    "ResNet / ResNeXt": (
        r"^(resnet|resnext|wide_resnet|seresne|ecaresnet|skresne|gcresnet"
        r"|resnetrs|resnetv2|resnetaa|resnetblur)"
    ),
    "RegNet": r"^regnet",
    "MobileNetV2/V3/V4": r"^(mobilenetv2|mobilenetv3|mobilenetv4|mobilenet_v2|mobilenet_v3|tf_mobilenetv3)",
    "EfficientNet": r"^(efficientnet|tf_efficientnet|gc_efficientnet)",
    "ConvNeXt": r"^convnext",
    "DLA": r"^dla",
    "CSP": r"^(cspresnet|cspresnext|cspdarknet|cs3)",
    "DarkNet": r"^darknet",
}


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, text)


def _row_key(record: ZooRecord) -> tuple[str, str, str]:
    return (record.source, record.model, record.recipe)


def write_csv(records: Sequence[ZooRecord], path: str | os.PathLike) -> None:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(ZooRecord.columns())
    for r in sorted(records, key=_row_key):
        writer.writerow(
            ["" if v is None else (f"{v:.3g}" if isinstance(v, float) else v) for v in astuple(r)]
        )
    _atomic_write(Path(path), buffer.getvalue())


def _parse_cell(kind: str, text: str) -> str | int | float | bool | None:
    """One ``zoo.csv`` cell as its ``ZooRecord`` field type (``kind``, the annotation):
    an empty cell is None where the field allows it, else 0 for numbers."""
    optional = kind.endswith(" | None")
    base = kind.removesuffix(" | None")
    if base == "str":
        return text
    if text == "" and (optional or base == "bool"):
        return None
    if base == "bool":
        if text not in ("True", "False"):
            raise InputError(f"{text!r} is not a boolean (allowed: True, False or empty)")
        return text == "True"
    if base == "int":
        return int(text or 0)
    if base == "float":
        return float(text or 0)
    raise InputTypeError(f"ZooRecord field of type {kind!r} has no reader")


def read_csv(path: str | os.PathLike) -> list[ZooRecord]:
    """The records of a ``zoo.csv`` (to rewrite the report without sweeping again). A missing
    or unknown column, or a cell that does not read as its column's type, is a ValueError."""
    kinds = {f.name: str(f.type) for f in fields(ZooRecord)}
    records = []
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        header = list(reader.fieldnames or [])
        unknown = [c for c in header if c not in kinds]
        missing = [c for c in kinds if c not in header]
        if unknown or missing:
            problem = f"unknown column {unknown[0]!r}" if unknown else f"no column {missing[0]!r}"
            raise InputError(f"{path}: {problem} (the columns are: {', '.join(kinds)})")
        for row in reader:
            values: dict[str, Any] = {}
            for key, text in row.items():
                if key is None or text is None:
                    raise InputError(f"{path}, line {reader.line_num}: expected {len(kinds)} cells per row")
                try:
                    values[key] = _parse_cell(kinds[key], text)
                except ValueError as error:
                    raise InputError(f"{path}, line {reader.line_num}, column {key!r}: {error}") from None
            records.append(ZooRecord(**values))
    return records


def _pct(part: int, whole: int) -> str:
    return f"{100 * part / whole:.1f}%" if whole else "n/a"


def _by_model(records: Sequence[ZooRecord]) -> dict[tuple[str, str], list[ZooRecord]]:
    models: dict[tuple[str, str], list[ZooRecord]] = defaultdict(list)
    for r in records:
        models[(r.source, r.model)].append(r)
    return models


def _table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> list[str]:
    return [*markdown_table(header, rows), ""]


def write_markdown(
    records: Sequence[ZooRecord],
    path: str | os.PathLike,
    *,
    command: str,
    seconds: float,
    identity_seconds: float | None = None,
    identity_every: int | None = None,
    machine: str | None = None,
) -> None:
    """Write the report: summary first, then the exceptions, each with its reason. Rows are
    in the csv's order (source, model, recipe), whatever order the sweep finished in."""
    records = sorted(records, key=_row_key)
    models = _by_model(records)
    machine = machine or f"{platform.machine()}, {os.cpu_count()} CPU cores"
    lines = [
        "# Zoo report",
        "",
        _preamble(models, command, seconds, identity_seconds, identity_every, machine),
        "",
        "## Summary",
        "",
    ]
    lines += _source_summary(models)
    lines += _stage_summary(models)
    lines += _class_summary(models)
    lines += _agreement_summary(models)
    lines += _residual_summary(models)
    lines += _identity_summary(models)
    lines += _recipe_summary(records)
    lines += _uncovered(models)
    lines += _failures(models)
    _atomic_write(Path(path), "\n".join(lines).rstrip() + "\n")


def _preamble(
    models: dict,
    command: str,
    seconds: float,
    identity_seconds: float | None,
    identity_every: int | None,
    machine: str,
) -> str:
    """How the report was made: the command, its time and machine, the identity check's share."""
    return (
        f"Generated by `{command}` in {seconds / 60:.1f} min on {machine}"
        + (
            f" with the identity check (its share: {identity_seconds / 60:.1f} worker-minutes, "
            "summed over the worker processes)"
            if identity_seconds
            else ""
        )
        + ". Every model is built with random weights; plans use the meta device. "
        + (
            f"The identity check ran on one model in every {identity_every} of the sorted list "
            f"({sum(1 for v in models.values() if any(r.identity for r in v))} models), so the "
            "identity figures below count those models only. "
            if identity_every and identity_every > 1
            else ""
        )
        + "One row per model and recipe is in [zoo.csv](zoo.csv). Every block kind (timm's "
        "attention modules and SimAM) on a sample of models is in [zoo-kinds.md](zoo-kinds.md)."
    )


def _source_summary(models: dict) -> list[str]:
    """The table of timm and torchvision: models, plans, how they traced, plain fx."""
    rows = []
    for source, label in (("timm", "timm"), ("tv", "torchvision")):
        mine = {k: v for k, v in models.items() if k[0] == source}
        if not mine:
            continue
        planned = [v for v in mine.values() if all(r.status == "ok" for r in v)]
        whole = sum(1 for v in planned if v[0].tracing == "whole")
        specialised = sum(1 for v in planned if v[0].tracing == "specialised")
        opaque = sum(1 for v in planned if v[0].tracing == "opaque")
        targeted = sum(1 for v in planned if v[0].target)
        plain = [v for v in mine.values() if v[0].fx_plain is not None]
        rows.append(
            (
                label,
                len(mine),
                f"{len(planned)} ({_pct(len(planned), len(mine))})",
                whole,
                specialised,
                opaque,
                targeted,
                f"{sum(1 for v in plain if v[0].fx_plain)} of {len(plain)}",
            )
        )
    return _table(
        [
            "models",
            "architectures",
            "plan succeeds",
            "traced whole",
            "sizes specialised",
            "with opaque submodules",
            "backbone target",
            "plain `fx.symbolic_trace` succeeds",
        ],
        rows,
    )


def _stage_summary(models) -> list[str]:
    planned = [v for v in models.values() if v[0].status == "ok"]
    with_stage = [v for v in planned if v[0].nchw_stages]
    hits = [v for v in with_stage if any(r.recipe == STAGE_RECIPE and r.points for r in v)]
    misses = [
        f"{v[0].source}:{v[0].model}"
        for v in with_stage
        if not any(r.recipe == STAGE_RECIPE and r.points for r in v)
    ]
    lines = [
        f"**`{STAGE_RECIPE}`**: {len(hits)} of {len(with_stage)} models with an NCHW stage at stride >= 4 "
        f"get at least one block ({_pct(len(hits), len(with_stage))})"
        + (f"; missed: {', '.join(misses[:20])}" if misses else "")
        + ".",
        "",
    ]
    for recipe in (STAGE_RECIPE, RESIDUAL_RECIPE):
        rows = [r for v in planned for r in v if r.recipe == recipe]
        hit = [r for r in rows if r.points]
        lines += [
            f"**`{recipe}` on every planned model**: {len(hit)} of {len(rows)} get at least one block "
            f"({_pct(len(hit), len(rows))}).",
            "",
        ]
    return lines


def _uncovered(models) -> list[str]:
    """The planned models still without a block from the stage or the residual recipe, and why."""
    rows = [
        (f"{r.source}:{r.model}", f"`{r.recipe}`", r.reason.replace("|", "/"))
        for v in models.values()
        for r in v
        if r.status == "ok" and r.recipe in (STAGE_RECIPE, RESIDUAL_RECIPE) and not r.points
    ]
    if not rows:
        return []
    return [
        "**Models without a block**, with the reason:",
        "",
        *_table(["model", "recipe", "reason"], rows),
        "",
    ]


def _class_summary(models) -> list[str]:
    """How many models that get a block keep their class, and why the others do not."""
    with_block = [v for v in models.values() if any(r.keeps_class is not None for r in v)]
    kept = [v for v in with_block if all(r.keeps_class is not False for r in v)]
    reasons: dict[str, list[str]] = defaultdict(list)
    for v in with_block:
        lost = [r for r in v if r.keeps_class is False]
        if lost:
            reason = re.sub(r"\d+", "N", lost[0].class_reason)
            reasons[reason].append(f"{v[0].source}:{v[0].model}")
    lines = [
        f"**The model keeps its class** (no block in its own forward code, under every recipe): "
        f"{len(kept)} of {len(with_block)} models that get a block ({_pct(len(kept), len(with_block))}).",
        "",
    ]
    if reasons:
        rows = [
            (reason, len(names), ", ".join(names[:5]) + (" ..." if len(names) > 5 else ""))
            for reason, names in sorted(reasons.items(), key=lambda kv: -len(kv[1]))
        ]
        lines += ["Why the others do not:", "", *_table(["reason", "models", "e.g."], rows)]
    return lines


def _agreement_summary(models) -> list[str]:
    timm = [
        v[0] for v in models.values() if v[0].source == "timm" and v[0].stage_agreement not in ("", "n/a")
    ]
    unchecked = [r for r in timm if r.stage_agreement.startswith("unchecked")]
    rated = [r for r in timm if r not in unchecked]
    agree = [r for r in rated if r.stage_agreement == "agree"]
    lines = [
        f"**Stage agreement with timm `feature_info`** (reduction >= 4: the channels of every stage "
        f"equal `feature_info`'s): {len(agree)} of {len(rated)} models whose `feature_info` names their own "
        f"modules ({_pct(len(agree), len(rated))}); {len(agree)} of {len(timm)} counting every timm model "
        f"with `feature_info` ({_pct(len(agree), len(timm))}).",
        "",
    ]
    exceptions = [r for r in timm if r.stage_agreement != "agree"]
    if exceptions:
        lines += ["Exceptions:", ""]
        lines += _table(["model", "why"], [(r.model, r.stage_agreement) for r in exceptions])
    return lines


def _residual_summary(models) -> list[str]:
    rows = []
    misses = []
    for family, pattern in RESIDUAL_FAMILIES.items():
        members = [v for k, v in models.items() if re.search(pattern, k[1]) and v[0].status == "ok"]
        found = [v for v in members if any(r.recipe == RESIDUAL_RECIPE and r.points for r in v)]
        misses += [
            (family, v) for v in members if not any(r.recipe == RESIDUAL_RECIPE and r.points for r in v)
        ]
        rows.append((family, len(members), f"{len(found)} ({_pct(len(found), len(members))})"))
    lines = [f"**`{RESIDUAL_RECIPE}` (residual branch) on residual CNN families**:", ""]
    lines += _table(["family", "models planned", "with residual blocks found"], rows)
    if misses:
        lines += ["Without a residual block found:", ""]
        lines += _table(
            ["family", "model", "why"],
            [
                (
                    family,
                    f"{v[0].source}:{v[0].model}",
                    next((r.reason for r in v if r.recipe == RESIDUAL_RECIPE), "")
                    or "no residual addition of two feature maps in the graph",
                )
                for family, v in misses
            ],
        )
    return lines


def _identity_summary(models) -> list[str]:
    checked = [r for v in models.values() for r in v if r.identity]
    if not checked:
        return ["Identity check: not run in this sweep (`--identity-check`).", ""]
    ok = [r for r in checked if r.identity == "ok"]
    skipped = [r for r in checked if r.identity.startswith("skipped")]
    bad = [r for r in checked if r.identity != "ok" and not r.identity.startswith("skipped")]
    stage_models = {(r.source, r.model) for r in checked if r.recipe == STAGE_RECIPE}
    stage_ok = {(r.source, r.model) for r in ok if r.recipe == STAGE_RECIPE}
    worst = max((r.identity_rel_diff or 0.0) for r in ok) if ok else 0.0
    held = len(checked) - len(skipped)
    stage_skipped = {(r.source, r.model) for r in skipped if r.recipe == STAGE_RECIPE}
    lines = [
        "**Identity at insertion** (random weights, real tensors, CPU, at the smallest of "
        f"64/96/128/160/224 px the model accepts, its fixed size where it has one): {len(ok)} of {held} "
        f"model-recipe pairs hold ({_pct(len(ok), held)}), largest relative difference "
        f"{worst:.2g}; `{STAGE_RECIPE}`: {len(stage_ok)} of "
        f"{len(stage_models) - len(stage_skipped)} models; "
        f"{len(skipped)} pairs skipped (over 100M parameters or no small input size).",
        "",
    ]
    if bad:
        lines += _table(
            ["model", "recipe", "result"], [(f"{r.source}:{r.model}", r.recipe, r.identity) for r in bad]
        )
    return lines


def _recipe_summary(records) -> list[str]:
    by_recipe: dict[str, list[ZooRecord]] = defaultdict(list)
    for r in records:
        by_recipe[r.recipe].append(r)
    rows = []
    for recipe, rs in sorted(by_recipe.items()):
        ok = [r for r in rs if r.status == "ok"]
        hit = [r for r in ok if r.points]
        nhwc, tokens = sum(r.nhwc_points for r in ok), sum(r.token_points for r in ok)
        total = sum(r.points for r in ok)
        rows.append(
            (
                f"`{recipe}`",
                len(ok),
                f"{len(hit)} ({_pct(len(hit), len(ok))})",
                total,
                total - nhwc - tokens,
                nhwc,
                tokens,
            )
        )
    return [
        "**Per recipe** (blocks by layout: NCHW maps, NHWC maps, tokens):",
        "",
        *_table(["recipe", "models planned", "models with blocks", "blocks", "NCHW", "NHWC", "tokens"], rows),
    ]


def _failures(models) -> list[str]:
    failed = [v[0] for v in models.values() if v[0].status != "ok"]
    opaque = [v[0] for v in models.values() if v[0].status == "ok" and v[0].tracing == "opaque"]
    lines = ["## Failures", ""]
    if not failed:
        lines += ["None: every model planned.", ""]
    else:
        lines += _table(
            ["model", "step", "reason"], [(f"{r.source}:{r.model}", r.status, r.reason) for r in failed]
        )
    if opaque:
        lines += [
            "## Traced with opaque submodules",
            "",
            "fx could not trace through some submodules; they are kept whole (no block inside them).",
            "",
        ]
        lines += _table(["model", "opaque submodules"], [(f"{r.source}:{r.model}", r.opaque) for r in opaque])
    return lines
