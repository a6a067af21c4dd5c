"""Recipes: the YAML files that say where attention goes (:mod:`.recipe`), and the RE2
patterns their rules match module names with (:mod:`.patterns`)."""

from .recipe import Recipe, RecipeError, get_recipe, list_recipes, load_recipe

__all__ = ["Recipe", "RecipeError", "get_recipe", "list_recipes", "load_recipe"]
