"""``attn-inject validate``: rebuild a converted file and check it against its base weights."""

from __future__ import annotations

import argparse
import json

from ..saving.file import load, load_base_weights, read_manifest
from ..validation import validate
from .options import parse_checks, parse_input_size
from .output import emit, plan_of, status

__all__ = ["command"]


def command(args: argparse.Namespace) -> int:
    checks = parse_checks(args.checks)
    with status(f"reading {args.file}", quiet=args.json):
        manifest = read_manifest(args.file)
        size = parse_input_size(args.input_size, like=manifest.input_size)
        patched = load(args.file).eval()
        reference = load_base_weights(args.file).eval()
    with status("validating", quiet=args.json):
        report = validate(reference, patched, input_size=size, device=args.device, checks=checks)
    plan = plan_of(patched)
    text = (
        f"{args.file}: {manifest.base_model} + {plan.recipe.name} ({len(plan)} blocks), "
        f"written by attn-inject {manifest.versions.get('attn_inject', '?')}\n{report}"
    )
    emit(args, text, {"manifest": json.loads(manifest.to_json()), "validation": report.to_dict()})
    return 0 if report.passed else 1
