"""What a search compares: candidates, each a recipe (or no block at all, the baseline)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ..recipes.recipe import load_recipe
from .errors import SearchError

__all__ = ["BASELINE", "Candidate", "from_recipes"]


@dataclass(frozen=True)
class Candidate:
    """A recipe to convert the base model with before the fine-tune, by name; ``recipe`` is
    its YAML text (recorded with every trial), None for the baseline (no block).
    ``attn_lr_scale``: the new blocks' learning-rate scale (None: the fine-tune's own)."""

    name: str
    recipe: str | None
    attn_lr_scale: float | None = None

    @property
    def baseline(self) -> bool:
        return self.recipe is None


BASELINE = Candidate("baseline", None)


def from_recipes(recipes: Sequence[str]) -> list[Candidate]:
    """A candidate per recipe (a built-in name or a YAML file), checked before anything runs."""
    out: list[Candidate] = []
    for given in recipes:
        recipe = load_recipe(given)
        if recipe.name == BASELINE.name:
            raise SearchError(f"--recipes {given}: 'baseline' names the run with no block; rename the recipe")
        if any(c.name == recipe.name for c in out):
            raise SearchError(f"--recipes: two recipes are named {recipe.name!r}; each needs its own name")
        out.append(Candidate(recipe.name, recipe.text))
    return out
