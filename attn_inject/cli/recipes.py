"""``attn-inject recipes``: list the built-in recipes, or show one's YAML."""

from __future__ import annotations

import argparse

from ..core.messages import cut, shown
from ..recipes.recipe import listed_recipes, load_recipe
from .errors import UsageError
from .output import emit

__all__ = ["command"]


def command(args: argparse.Namespace) -> int:
    if args.action == "show":
        if not args.name:
            raise UsageError("recipes show needs a recipe name")
        recipe = load_recipe(args.name)
        emit(args, recipe.text.rstrip(), recipe.to_dict())
        return 0
    if args.name:
        name = shown(args.name, 60)
        raise UsageError(f"unexpected argument {name}; did you mean 'recipes show {cut(args.name, 60)}'?")
    recipes = listed_recipes()
    width = max(len(r.name) for r in recipes)
    text = "\n".join(f"{r.name.ljust(width)}  {r.description}" for r in recipes)
    emit(args, text, [r.to_dict() for r in recipes])
    return 0
