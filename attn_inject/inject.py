"""``inject()``: plan, then rewrite."""
from __future__ import annotations

from typing import Any, Mapping, Sequence

from torch import fx, nn

from .plan import analyse
from .recipe import Recipe
from .rewrite import rewrite

__all__ = ["InjectError", "inject"]


class InjectError(ValueError):
    """The recipe matched nothing in the model."""


def inject(
    model: nn.Module,
    recipe: str | Mapping[str, Any] | Recipe,
    *,
    init: str | None = None,
    allow_empty: bool = False,
    input_size: Sequence[int] | None = None,
) -> fx.GraphModule:
    """Return ``model`` with the recipe's attention blocks inserted.

    The patched model shares the original's modules and weights (no copy; the original
    model is not changed and still runs as before). With ``init="identity"`` (the recipes'
    default) it computes exactly what the original did until the blocks learn. ``init``
    overrides the recipe's; ``input_size`` (C, H, W) is used for shape inference only.

        >>> patched = inject(timm.create_model("resnet50"), "cbam_after_every_stage")
        >>> patched.attention            # the new blocks, one per insertion point
    """
    graph, plan = analyse(model, recipe, init=init, input_size=input_size)
    if not plan.points and not allow_empty:
        reasons = sorted({s.reason for s in plan.skipped})[:3]
        why = f"; skipped: {'; '.join(reasons)}" if reasons else ""
        positions = ", ".join(sorted({r.at for r in plan.recipe.rules}))
        raise InjectError(
            f"recipe {plan.recipe.name!r} matches nothing in {plan.model_name} (positions: {positions}){why}. "
            "Pass allow_empty=True to accept an unchanged model."
        )
    return rewrite(graph.graph, plan, model)
