"""``attn-inject blocks``: the block kinds offered, and those refused with the reason."""

from __future__ import annotations

import argparse
import dataclasses

from ..blocks import describe_blocks
from ..core.tables import render_table
from .output import emit

__all__ = ["command"]


def command(args: argparse.Namespace) -> int:
    infos = describe_blocks()
    offered = [i for i in infos if i.offered]
    refused = [i for i in infos if not i.offered]
    rows = [
        (i.kind, i.source, "any" if i.parameters is None else ", ".join(i.parameters) or "-", i.paper)
        for i in offered
    ]
    text = render_table(("kind", "source", "parameters", "paper"), rows, rule_under_last=False)
    if refused:
        text += "\n\nnot offered (the installed timm's kinds that are not an attention over their input):\n"
        text += "\n".join(f"  {i.kind}: {i.reason}" for i in refused)
    emit(args, text, [dataclasses.asdict(i) for i in infos])
    return 0
