"""``inject()``: plan, then rewrite."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from torch import nn

from .models import base_model_of
from .plan import analyse
from .recipe import Recipe
from .rewrite import rewrite
from .targets import get_target, replace_submodule

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
    target: str | None = None,
) -> nn.Module:
    """Return ``model`` with the recipe's attention blocks inserted.

    The patched model shares the original's modules and weights (no copy; the original
    model is not changed and still runs as before). With ``init="identity"`` (the recipes'
    default) it computes exactly what the original did until the blocks learn. ``init``
    overrides the recipe's; ``input_size`` (C, H, W) is used for shape inference only.

    ``target`` (default: the recipe's; for torchvision detection and segmentation models
    their backbone) patches only that submodule: the result is then a shallow copy of
    ``model`` with the patched submodule (an ``fx.GraphModule``) in its place. Without a
    target the result is the patched ``fx.GraphModule`` itself. Either way
    ``result.attn_inject`` holds the plan.

        >>> patched = inject(timm.create_model("resnet50"), "cbam_after_every_stage")
        >>> patched.attention            # the new blocks, one per insertion point
    """
    graph, plan = analyse(model, recipe, init=init, input_size=input_size, target=target)
    if not plan.points and not allow_empty:
        reasons = sorted({s.reason for s in plan.skipped})[:3]
        why = f"; skipped: {'; '.join(reasons)}" if reasons else ""
        positions = ", ".join(sorted({r.at for r in plan.recipe.rules}))
        raise InjectError(
            f"recipe {plan.recipe.name!r} matches nothing in {plan.model_name} "
            f"(positions: {positions}){why}. "
            "Pass allow_empty=True to accept an unchanged model."
        )
    patched = rewrite(graph.graph, plan, get_target(model, plan.target), base_model_of(model))
    if not plan.target:
        return patched
    outer = replace_submodule(model, plan.target, patched)
    outer.attn_inject = patched.attn_inject
    return outer
