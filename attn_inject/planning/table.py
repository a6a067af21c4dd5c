"""A plan as the plain-text table ``attn-inject plan`` prints: a row per insertion point,
then the totals (parameters and multiply-adds added, as a share of the base)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..blocks import NCHW
from ..core.tables import render_table
from ..recipes.recipe import positions_of

if TYPE_CHECKING:
    from .points import Plan

__all__ = ["plan_table"]


def _giga(count: int) -> str:
    return f"{count / 1e9:.3g} G" if count >= 1e8 else f"{count / 1e6:.3g} M"


def plan_table(plan: Plan) -> str:
    """``plan``'s points (a layout column when a block is not on an NCHW map), where each
    block lives, and the totals."""

    layouts = any(p.layout != NCHW for p in plan.points)
    header = (
        "#",
        "name",
        "position",
        "channels",
        *(("layout",) if layouts else ()),
        "block",
        "params",
        "lives in",
    )
    rows = [
        (
            str(i),
            p.name,
            p.position,
            str(p.channels),
            *((p.layout_text,) if layouts else ()),
            str(p.block),
            f"{p.params:,}",
            p.key,
        )
        for i, p in enumerate(plan.points)
    ]
    lines = render_table(header, rows).split("\n")
    share = 100 * plan.params_added / plan.base_params if plan.base_params else 0.0
    macs_share = 100 * plan.macs_added / plan.base_macs if plan.base_macs else 0.0
    if plan.target:
        lines.insert(0, f"in {plan.target}:")
    lines.append(
        f"{len(plan.points)} blocks, +{plan.params_added:,} parameters "
        f"({share:.2f}% of {plan.base_params:,}), +{_giga(plan.macs_added)} MACs "
        f"({macs_share:.2f}% of {_giga(plan.base_macs)} MACs per image), init={plan.init}"
    )
    if plan.used_fallback:
        primary = positions_of(plan.recipe.rules)
        lines.append(f"no block at {primary} in this model: the recipe's fallback rules placed these")
    return "\n".join(lines)
