"""``attn-inject zoo``: plan every shipped recipe on every model; write zoo.md and zoo.csv."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from ..recipes.recipe import load_recipe
from ..zoo.report import Update, previous_sweep, read_csv, write_csv, write_markdown
from ..zoo.sweep import ZooRecord, default_recipes, list_zoo, sweep
from .errors import UsageError
from .output import emit, progress

__all__ = ["command"]


def zoo_inputs(args: argparse.Namespace) -> tuple[list[str], list[str], Path]:
    """The zoo's recipes, model names and output folder, each checked before any model is built."""
    recipes = args.recipes or default_recipes()
    for recipe in recipes:
        load_recipe(recipe)  # a bad name fails here, before any model is built
    if args.identity_every < 1:
        raise UsageError(f"--identity-every must be at least 1, got {args.identity_every}")
    if args.jobs is not None and args.jobs < 1:
        raise UsageError(f"--jobs must be at least 1, got {args.jobs}")
    names = list_zoo(args.source, args.filter)
    if not names:
        shown = " ".join(repr(p) for p in args.filter or [])
        raise UsageError(f"no model from {args.source!r} matches --filter {shown}")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is not a folder")
    if args.update and not args.filter:
        raise UsageError("--update sweeps the models --filter names: give --filter GLOB [GLOB ...]")
    if args.update and not (out / "zoo.csv").is_file():
        raise UsageError(
            f"--update replaces rows of {out / 'zoo.csv'}, which does not exist: run the full sweep first"
        )
    return recipes, names, out


def _command_line(args: argparse.Namespace) -> str:
    """The sweep's command as the report names it: the options it was given, from the parsed
    arguments (not ``sys.argv``: ``main`` may be called with other arguments than the
    process's own)."""
    parts = ["attn-inject zoo"]
    if args.source != "all":
        parts += ["--source", args.source]
    if args.recipes:
        parts += ["--recipes", *args.recipes]
    if args.identity_check:
        parts.append("--identity-check")
    if args.identity_every != 1:
        parts += ["--identity-every", str(args.identity_every)]
    if args.jobs is not None:
        parts += ["--jobs", str(args.jobs)]
    if args.update:
        parts.append("--update")
    if args.filter:
        parts += ["--filter", *args.filter]
    if str(args.out) != "docs":
        parts += ["--out", str(args.out)]
    return " ".join(parts)


def command(args: argparse.Namespace) -> int:
    recipes, names, out = zoo_inputs(args)
    kept = read_csv(out / "zoo.csv") if args.update else []
    full_sweep = previous_sweep(out / "zoo.md") if args.update else None  # read before any work
    swept = {tuple(n.split(":", 1)) for n in names}
    kept = [r for r in kept if (r.source, r.model) not in swept]
    start = time.perf_counter()
    records: list[ZooRecord] = []
    with progress(
        f"zoo: {len(names)} models x {len(recipes)} recipes", len(names), quiet=args.json
    ) as advance:
        for result in sweep(
            names,
            recipes,
            identity_check=args.identity_check,
            identity_every=args.identity_every,
            jobs=args.jobs,
            sample_from=list_zoo(args.source) if args.update else None,
        ):
            records.extend(result.records)
            advance(f"{result.source}:{result.model}")
    seconds = time.perf_counter() - start
    failed = sorted({f"{r.source}:{r.model}" for r in records if r.status != "ok"})
    summary = {
        "models": len(names),
        "records": len(records),
        "failed_models": failed,
        "seconds": round(seconds, 1),
        "report": str(out / "zoo.md"),
        "csv": str(out / "zoo.csv"),
    }
    text = (
        f"{len(names) - len(failed)} of {len(names)} models planned in {seconds / 60:.1f} min; "
        f"report: {out / 'zoo.md'}, rows: {out / 'zoo.csv'}"
    )
    identity_seconds = sum(r.seconds for r in records if r.identity) if args.identity_check else None
    command_line = _command_line(args)
    update = None
    if full_sweep is not None:  # the report keeps saying how the rows not swept here were made
        update = Update(command_line.strip(), len(names), seconds)
        records = kept + records
        command_line, seconds, identity_seconds = full_sweep
    write_csv(records, out / "zoo.csv")
    write_markdown(
        records,
        out / "zoo.md",
        command=command_line.strip(),
        seconds=seconds,
        identity_seconds=identity_seconds,
        identity_every=args.identity_every if args.identity_check else None,
        update=update,
    )
    emit(args, text, summary)
    return 0
