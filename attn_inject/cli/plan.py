"""``attn-inject plan``: a recipe's insertion points in a model, optionally drawn."""

from __future__ import annotations

import argparse
import dataclasses

from ..models.build import build_for_planning, resolve
from ..planning.diagram import save_diagram
from ..planning.match import plan
from ..recipes.recipe import load_recipe
from .errors import UsageError
from .options import check_positive_sizes, default_input_size, parse_model_kwargs
from .output import emit

__all__ = ["command"]


def command(args: argparse.Namespace) -> int:
    if args.diagram and not args.diagram.lower().endswith((".svg", ".png")):
        raise UsageError(f"--diagram {args.diagram}: the file must end in .svg or .png")
    check_positive_sizes(args.input_size)
    model = build_for_planning(args.model, **parse_model_kwargs(args.model_kwargs))
    recipe = load_recipe(args.recipe)
    size = args.input_size or default_input_size(args.model, model, recipe, args.target)
    result = plan(model, recipe, init=args.init, input_size=size, target=args.target)
    result = dataclasses.replace(result, model_name=":".join(resolve(args.model)))
    text = f"{result.model_name} + {result.recipe.name}, input {tuple(result.input_size)}\n{result.table()}"
    if result.opaque:
        text += "\nkept whole (fx cannot trace through them):\n" + "\n".join(f"  {o}" for o in result.opaque)
    if result.assumptions:
        shown = "\n".join(f"  {a}" for a in result.assumptions[:5])
        more = len(result.assumptions) - 5
        text += (
            f"\ntraced with sizes fixed for input {tuple(result.input_size)} (a rewritten forward checks "
            f"them at every call):\n{shown}" + (f"\n  ... and {more} more" if more > 0 else "")
        )
    if result.skipped:
        text += "\nskipped:\n" + "\n".join(f"  {s}" for s in result.skipped)
    data = result.to_dict()
    if args.diagram:
        save_diagram(result, args.diagram)
        text += f"\ndiagram: {args.diagram}"
        data["diagram"] = args.diagram
    emit(args, text, data)
    return 0
