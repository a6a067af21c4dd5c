"""``attn-inject convert``: a timm / torchvision checkpoint into a patched safetensors file."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from ..models.build import build_model, resolve
from ..recipes.recipe import load_recipe
from ..saving.checkpoint import check_fits, read_state_dict
from ..saving.file import save
from ..surgery.inject import inject
from ..validation import validate
from .errors import CommandError, UsageError
from .options import default_input_size, parse_checks, parse_input_size, parse_model_kwargs
from .output import emit, plan_of, status

__all__ = ["command"]


def check_output(path: str, force: bool) -> None:
    """``--out``: a .safetensors file, new unless ``force``, in a writable folder."""
    out = Path(path)
    if out.suffix != ".safetensors":
        raise UsageError(f"--out {path}: the output must be a .safetensors file")
    if out.exists() and not force:
        raise CommandError(f"{path} exists; pass --force to overwrite it")
    if not out.parent.is_dir():
        what = "is a file, not a folder" if out.parent.exists() else "does not exist"
        raise CommandError(f"{path}: folder {out.parent} {what}")
    if not os.access(out.parent, os.W_OK | os.X_OK):
        raise CommandError(f"{path}: folder {out.parent} is not writable (permission denied)")


def command(args: argparse.Namespace) -> int:
    import torch

    check_output(args.out, args.force)
    checks = parse_checks(args.checks)  # bad input fails before any work
    kwargs = parse_model_kwargs(args.model_kwargs)
    size = parse_input_size(args.input_size)
    recipe = load_recipe(args.recipe)  # a bad recipe fails before any work
    name = ":".join(resolve(args.model))
    with status(f"reading {args.checkpoint}", quiet=args.json):
        state = read_state_dict(args.checkpoint, use_ema=args.use_ema)
    with status(f"building {name}", quiet=args.json):
        torch.manual_seed(0)
        model = build_model(name, **kwargs).eval()
        check_fits(model, state, source=f"checkpoint {args.checkpoint}")
        model.load_state_dict(state, strict=True)
        del state
    with status(f"injecting {recipe.name}", quiet=args.json):
        size = size or default_input_size(name, model, recipe, args.target)
        patched = inject(model, recipe, init=args.init, input_size=size, target=args.target)
    plan = plan_of(patched)
    report = None
    if args.validate:
        with status("validating", quiet=args.json):
            report = validate(model, patched, device=args.device, checks=checks)
        if not report.passed:
            data = {"plan": plan.to_dict(), "validation": report.to_dict(), "written": None}
            emit(args, f"{report}\nnothing written: validation failed", data)
            return 1
    with status(f"writing {args.out}", quiet=args.json):
        save(patched, args.out, model_name=name, model_kwargs=kwargs, force=args.force)
    text = f"{name} + {plan.recipe.name}\n{plan.table()}"
    if report is not None:
        text += f"\n{report}"
    text += f"\nwrote {args.out}"
    emit(args, text, {"plan": plan.to_dict(), "validation": report and report.to_dict(), "written": args.out})
    return 0
