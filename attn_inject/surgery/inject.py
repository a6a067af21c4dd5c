"""``inject()``: plan, then rewrite."""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import Any

from torch import nn

from ..blocks.proof import BlockProofError, shared_proofs
from ..core.errors import AttnInjectError
from ..core.randomness import check_seed, own_random_state
from ..graph.trace import fx_constants_dropped
from ..models.build import base_model_of
from ..planning.match import analyse
from ..planning.points import QuantizedModelError
from ..recipes.recipe import Recipe, positions_of
from .rewrite import RewriteError, rewrite

__all__ = ["InjectError", "inject"]


class InjectError(AttnInjectError, ValueError):
    """The recipe matched nothing in the model, or the model cannot be patched as it is."""


def inject(
    model: nn.Module,
    recipe: str | Mapping[str, Any] | Recipe,
    *,
    init: str | None = None,
    allow_empty: bool = False,
    input_size: Sequence[int] | None = None,
    target: str | None = None,
    seed: int | None = None,
) -> nn.Module:
    """Return ``model`` with the recipe's attention blocks inserted where they act.

    The result is the user's model: same class, same methods, same code, except the modules
    that hold an insertion point. Each block is a child of the module it acts in
    (``layer1.0.se``, ``layer1.cbam``); modules on the path to a changed one are shallow
    copies, everything else (weights included) is shared with ``model``, which is not
    changed. With ``init="identity"`` (the recipes' default) the result computes exactly
    what the original did until the blocks learn. ``init`` overrides the recipe's;
    ``input_size`` (C, H, W) is used for shape inference only; ``target`` (default: the
    recipe's; for torchvision detection and segmentation models their backbone) plans only
    in that submodule. ``result.attn_inject`` holds the plan; injecting into a patched
    model adds the new recipe's points to it.

    Each block is proved before it joins the model (:mod:`attn_inject.blocks.proof`): one
    that does not compute its input at ``init="identity"``, fails on its point's shape or is
    not deterministic in eval mode is refused, naming it; the blocks of one call share a
    probe per shape, and built-in blocks of one design one proof. Randomness is the caller's: the
    blocks' initial weights are drawn from a state forked from torch's global one, or from
    ``seed`` (one seed gives one model), and torch's, Python's and NumPy's global random
    states are as they were after the call.

        >>> patched = inject(timm.create_model("resnet50"), "se_resnet")
        >>> patched.layer1[0].se             # the new block, where timm's seresnet50 has it
    """
    seed = check_seed(seed)
    with own_random_state(seed), shared_proofs(), fx_constants_dropped(model):
        try:
            graph, plan = analyse(model, recipe, init=init, input_size=input_size, target=target)
        except QuantizedModelError as error:
            if not allow_empty:
                raise
            warnings.warn(f"{error}; the model is returned unchanged (allow_empty=True)", stacklevel=2)
            return model
        except BlockProofError as error:  # a block that fails on its point's shape while planned
            raise InjectError(str(error)) from None
        if not plan.points and not allow_empty:
            positions = positions_of(plan.recipe.all_rules)
            raise InjectError(
                f"recipe {plan.recipe.name!r} matches nothing in {plan.model_name} "
                f"(positions: {positions}): {plan.empty_reason}. Pass allow_empty=True to accept an "
                "unchanged model."
            )
        try:
            return rewrite(model, graph, plan, base_model_of(model))
        except (RewriteError, BlockProofError) as error:
            raise InjectError(str(error)) from None
