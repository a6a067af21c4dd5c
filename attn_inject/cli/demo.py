"""``attn-inject demo``: plan, inject and validate on a random-init model."""

from __future__ import annotations

import argparse

from ..models.build import build_model
from ..planning.points import Attach
from ..surgery.inject import inject
from ..validation import validate
from .options import check_positive_sizes, parse_checks, parse_model_kwargs
from .output import emit, plan_of

__all__ = ["command"]


def command(args: argparse.Namespace) -> int:
    import torch

    check_positive_sizes(args.input_size)
    torch.manual_seed(0)
    model = build_model(args.model, **parse_model_kwargs(args.model_kwargs))
    patched = inject(model, args.recipe, init=args.init, input_size=args.input_size, target=args.target)
    report = validate(model, patched, input_size=args.input_size, checks=parse_checks(args.checks))
    plan = plan_of(patched)
    kept = "keeps its class" if isinstance(patched, type(model)) else "lost its class"
    owners = sorted({p.owner for p in plan if p.attach == Attach.GRAPH})
    around = sorted({p.owner for p in plan if p.attach in (Attach.AFTER, Attach.BEFORE)})
    surgery = (
        f"{type(model).__name__} {kept}; blocks in a slot of the module's own code: "
        f"{sum(p.attach == Attach.SLOT for p in plan)}; modules running blocks around their own forward: "
        f"{len(around)}; modules with a rewritten forward: {', '.join(owners) or 'none'}"
    )
    text = (
        f"{plan.model_name} + {plan.recipe.name}, input {tuple(plan.input_size)}\n{plan.table()}\n"
        f"{surgery}\n{report}"
    )
    emit(args, text, {"plan": plan.to_dict(), "validation": report.to_dict()})
    return 0 if report.passed else 1
