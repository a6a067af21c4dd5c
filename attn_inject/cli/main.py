"""The ``attn-inject`` command line (also ``python -m attn_inject``).

Exit codes: 0 success; 2 the command line is wrong (an unknown option, a malformed or
disallowed option value such as ``--model-kwargs pretrained=true``, ``--input-size 64 64`` or
a fine-tune setting out of its range, ``--epochs 0``): fix the command; 1 a well-formed
request that could not be carried out (a model or recipe that does not exist, an input file
that is missing, invalid or refused, a failed validation, an output that exists or cannot
be written, a closed standard output); 130 interrupted (SIGINT); SIGTERM ends the
process as the signal does (143 in a shell), removing any partly written output. Errors are
one line on stderr; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .._version import __version__
from ..blocks import describe_blocks
from ..blocks.params import INIT_MODES
from ..core.errors import AttnInjectError, InputTypeError
from ..core.messages import cut, first_line, shown
from ..core.tables import render_table
from ..finetune.command import add_parser as add_finetune
from ..finetune.command import command as finetune_command
from ..finetune.config import SettingError
from ..models.build import (
    ModelKwargsError,
    build_for_planning,
    build_model,
    check_model_kwargs,
    input_size_for,
    resolve,
)
from ..planning.diagram import save_diagram
from ..planning.match import plan, resolve_target
from ..planning.points import Attach, Plan
from ..recipes.recipe import get_recipe, list_recipes, load_recipe
from ..saving.checkpoint import check_fits, read_state_dict
from ..saving.file import load, load_base_weights, read_manifest, save
from ..search.command import add_parser as add_search
from ..search.command import command as search_command
from ..search.errors import SearchUsageError
from ..surgery.inject import inject
from ..surgery.record import patched_record
from ..validation import check_names, validate
from ..zoo.report import write_csv, write_markdown
from ..zoo.sweep import ZooRecord, default_recipes, list_zoo, sweep

if TYPE_CHECKING:
    from torch import nn

__all__ = ["main"]

DEMO_MODEL = "timm:resnet50"
DEMO_RECIPE = "cbam_after_every_stage"


class UsageError(AttnInjectError):
    """Bad command-line input: exit code 2 (as is a fine-tune's ``SettingError``)."""


class CommandError(AttnInjectError):
    """The command cannot go on (e.g. its output exists): exit code 1."""


CHECKS_HELP = (
    "validation checks, comma-separated, or 'all' (default: all but compile, which takes minutes "
    "on a CPU): reference, identity, train, gradients, parameters, shapes, finite, compile, export, autocast"
)


def _common_flags(default: Any) -> argparse.ArgumentParser:
    """--json and --debug, accepted before and after the command. The command's copies
    default to SUPPRESS, so they never undo a flag given before the command."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", default=default, help="machine-readable output")
    common.add_argument("--debug", action="store_true", default=default, help="show tracebacks")
    return common


def _parser() -> argparse.ArgumentParser:
    """The command line, every command and option. Long on purpose: a flat declaration,
    one statement per option in the order ``--help`` shows them, reads better whole than
    split into helpers that each hold a few."""
    parser = argparse.ArgumentParser(
        prog="attn-inject",
        description="Insert SE / ECA / CBAM attention into timm and torchvision CNNs.",
        parents=[_common_flags(False)],
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    common = _common_flags(argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    recipes = sub.add_parser("recipes", parents=[common], help="list the built-in recipes, or show one")
    recipes.add_argument("action", nargs="?", choices=["show"], help="show one recipe's YAML")
    recipes.add_argument("name", nargs="?", help="recipe name (with 'show')")

    sub.add_parser("blocks", parents=[common], help="list the block kinds")

    for name, help_text in (
        ("plan", "print the insertion points of a recipe in a model"),
        ("demo", "plan, inject and check identity on a random-init model (default: timm resnet50)"),
    ):
        p = sub.add_parser(name, parents=[common], help=help_text)
        default_model = DEMO_MODEL if name == "demo" else None
        p.add_argument(
            "model",
            nargs="?" if name == "demo" else None,
            default=default_model,
            help="timm:NAME, tv:NAME or a bare name (timm first, then torchvision)",
        )
        p.add_argument(
            "--recipe",
            "-r",
            default=DEMO_RECIPE if name == "demo" else None,
            required=name == "plan",
            help="built-in recipe name or a YAML path",
        )
        p.add_argument(
            "--input-size",
            type=int,
            nargs=3,
            metavar=("C", "H", "W"),
            help="input size for shape inference (default: the model's own)",
        )
        p.add_argument("--init", choices=INIT_MODES, help="override the recipe's init")
        p.add_argument(
            "--model-kwargs",
            nargs="*",
            default=[],
            metavar="K=V",
            help="model builder arguments, e.g. num_classes=10",
        )
        p.add_argument(
            "--target",
            help="a submodule to patch, e.g. backbone.body (default: the recipe's, "
            "else a detection / segmentation model's backbone)",
        )
        if name == "demo":
            p.add_argument("--checks", help=CHECKS_HELP)
        if name == "plan":
            p.add_argument(
                "--diagram", metavar="OUT", help="draw the stages and blocks to OUT.svg or OUT.png"
            )

    convert = sub.add_parser(
        "convert",
        parents=[common],
        help="turn a timm / torchvision checkpoint into a patched safetensors file",
    )
    convert.add_argument(
        "--model", required=True, help="timm:NAME, tv:NAME or a bare name (timm first, then torchvision)"
    )
    convert.add_argument(
        "--model-kwargs", nargs="*", default=[], metavar="K=V", help="builder arguments, e.g. num_classes=3"
    )
    convert.add_argument(
        "--checkpoint",
        required=True,
        metavar="IN",
        help=(
            ".pth/.pt/.bin/.pth.tar (read with weights_only=True) or .safetensors; "
            "a state dict or a training checkpoint (timm's train.py: model_best.pth.tar)"
        ),
    )
    convert.add_argument(
        "--use-ema",
        action="store_true",
        help="read a training checkpoint's EMA weights (state_dict_ema) instead of its state_dict",
    )
    convert.add_argument("--recipe", "-r", required=True, help="built-in recipe name or a YAML path")
    convert.add_argument("--out", required=True, metavar="OUT.safetensors")
    convert.add_argument("--init", choices=INIT_MODES, help="override the recipe's init")
    convert.add_argument(
        "--target", help="a submodule to patch (default: the recipe's, else the model's backbone)"
    )
    convert.add_argument(
        "--input-size", type=int, nargs="+", metavar="N", help="C H W for shape inference and validation"
    )
    convert.add_argument(
        "--validate", action="store_true", help="check the patched model against the original before writing"
    )
    convert.add_argument(
        "--device",
        default="auto",
        choices=["auto", "cpu", "cuda"],
        help="where --validate runs (auto: CUDA if available)",
    )
    convert.add_argument("--force", action="store_true", help="overwrite OUT if it exists")
    convert.add_argument("--checks", help=CHECKS_HELP)

    check = sub.add_parser(
        "validate", parents=[common], help="check a converted file: rebuild, compare with its base weights"
    )
    check.add_argument("file", metavar="FILE.safetensors")
    check.add_argument(
        "--device", default="auto", choices=["auto", "cpu", "cuda"], help="auto: CUDA if available"
    )
    check.add_argument(
        "--input-size", type=int, nargs="+", metavar="N", help="input size to check at (default: the plan's)"
    )
    check.add_argument("--checks", help=CHECKS_HELP)

    zoo = sub.add_parser(
        "zoo",
        parents=[common],
        help=(
            "plan every shipped recipe on every timm / torchvision model; write docs/zoo.md and docs/zoo.csv"
        ),
    )
    zoo.add_argument("--source", choices=["timm", "torchvision", "all"], default="all")
    zoo.add_argument(
        "--recipes",
        nargs="+",
        metavar="R",
        help="recipes to plan (default: every shipped recipe of the built-in blocks)",
    )
    zoo.add_argument("--filter", metavar="GLOB", help="only models whose name matches, e.g. 'resnet*'")
    zoo.add_argument(
        "--identity-check",
        action="store_true",
        help="also build each model (up to 100M parameters) and check identity on real tensors",
    )
    zoo.add_argument(
        "--identity-every",
        type=int,
        default=1,
        metavar="N",
        help="with --identity-check, check every Nth model of the sorted list only (default: 1, all)",
    )
    zoo.add_argument("--jobs", type=int, help="worker processes (default: one per CPU)")
    zoo.add_argument(
        "--out", default="docs", metavar="DIR", help="where zoo.md and zoo.csv go (default: docs)"
    )

    add_finetune(sub, common)
    add_search(sub, common)
    return parser


def _model_kwargs(pairs: Sequence[str]) -> dict[str, Any]:
    """``--model-kwargs K=V ...``: each V read as a YAML scalar or list, each K checked
    against the builder arguments that shape the architecture."""
    import yaml

    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise UsageError(f"--model-kwargs takes KEY=VALUE pairs, got {shown(pair)}")
        try:
            out[key] = yaml.safe_load(value)
        except yaml.YAMLError as error:
            problem = getattr(error, "problem", None) or "not a plain value"
            raise UsageError(
                f"--model-kwargs {shown(pair)}: the value must be a number, a string, true/false or a "
                f"list ({cut(problem, 100)})"
            ) from None
    try:
        return check_model_kwargs(out, "--model-kwargs")
    except ModelKwargsError as error:
        raise UsageError(str(error)) from None


def _plan_of(patched: nn.Module) -> Plan:
    """The plan ``inject`` recorded on the model it returned."""

    info = patched_record(patched)
    if info is None:
        raise InputTypeError(f"{type(patched).__name__} has no attn_inject plan: not a model inject returned")
    return info.plan


def _emit(args: argparse.Namespace, text: str, data: Any) -> None:
    print(json.dumps(data, indent=2) if args.json else text)


def _cmd_recipes(args: argparse.Namespace) -> int:

    if args.action == "show":
        if not args.name:
            raise UsageError("recipes show needs a recipe name")
        recipe = load_recipe(args.name)
        _emit(args, recipe.text.rstrip(), recipe.to_dict())
        return 0
    if args.name:
        name = shown(args.name, 60)
        raise UsageError(f"unexpected argument {name}; did you mean 'recipes show {cut(args.name, 60)}'?")
    recipes = [get_recipe(name) for name in list_recipes()]
    width = max(len(r.name) for r in recipes)
    text = "\n".join(f"{r.name.ljust(width)}  {r.description}" for r in recipes)
    _emit(args, text, [r.to_dict() for r in recipes])
    return 0


def _cmd_blocks(args: argparse.Namespace) -> int:

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
    _emit(args, text, [dataclasses.asdict(i) for i in infos])
    return 0


def _cmd_plan(args: argparse.Namespace) -> int:

    if args.diagram and not args.diagram.lower().endswith((".svg", ".png")):
        raise UsageError(f"--diagram {args.diagram}: the file must end in .svg or .png")
    _positive_sizes(args.input_size)
    model = build_for_planning(args.model, **_model_kwargs(args.model_kwargs))
    recipe = load_recipe(args.recipe)
    size = args.input_size or _default_input_size(args.model, model, recipe, args.target)
    result = plan(model, recipe, init=args.init, input_size=size, target=args.target)
    result = dataclasses.replace(result, model_name=":".join(resolve(args.model)))
    text = f"{result.model_name} + {result.recipe.name}, input {tuple(result.input_size)}\n{result.table()}"
    if result.opaque:
        text += "\nkept whole (fx cannot trace through them):\n" + "\n".join(f"  {o}" for o in result.opaque)
    if result.skipped:
        text += "\nskipped:\n" + "\n".join(f"  {s}" for s in result.skipped)
    data = result.to_dict()
    if args.diagram:
        save_diagram(result, args.diagram)
        text += f"\ndiagram: {args.diagram}"
        data["diagram"] = args.diagram
    _emit(args, text, data)
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    import torch

    _positive_sizes(args.input_size)
    torch.manual_seed(0)
    model = build_model(args.model, **_model_kwargs(args.model_kwargs))
    patched = inject(model, args.recipe, init=args.init, input_size=args.input_size, target=args.target)
    report = validate(model, patched, input_size=args.input_size, checks=_checks(args.checks))
    plan = _plan_of(patched)
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
    _emit(args, text, {"plan": plan.to_dict(), "validation": report.to_dict()})
    return 0 if report.passed else 1


def _checks(value: str | None) -> tuple[str, ...] | str | None:
    """``--checks``: 'all', a comma-separated list, or None (validate's default: all but compile)."""

    if value is None or value.strip() == "all":
        return value and "all"
    names = tuple(c.strip() for c in value.split(",") if c.strip())
    unknown = [c for c in names if c not in check_names()]
    if unknown or not names:
        raise UsageError(
            f"--checks {value}: unknown {', '.join(unknown) or 'empty'}; "
            f"allowed: all, {', '.join(check_names())}"
        )
    return names


def _positive_sizes(values: Sequence[int] | None) -> None:
    if values is not None and (min(values) < 1 or max(values) > 8192):
        raise UsageError(f"--input-size takes sizes from 1 to 8192, got {' '.join(map(str, values))}")


def _input_size(values: Sequence[int] | None, like: Sequence[int] | None = None) -> tuple[int, ...] | None:
    """``--input-size`` as a tuple: C H W, or C T H W for video; with ``like`` (the size the
    model was planned at), as many values and the same channel count."""
    if values is None:
        return None
    _positive_sizes(values)
    got = " ".join(map(str, values))
    if like is not None:
        wanted = " ".join(map(str, like))
        if len(values) != len(like) or values[0] != like[0]:
            raise UsageError(
                f"--input-size {got}: the model takes {len(like)} sizes with {like[0]} channels first, "
                f"like its plan's {wanted}"
            )
    elif len(values) not in (3, 4):
        raise UsageError(f"--input-size takes C H W (or C T H W for video), got {got}")
    return tuple(values)


def _default_input_size(name: str, model: Any, recipe: Any, target: str | None) -> tuple[int, ...] | None:
    """The whole model's input size for shape inference, or None when a submodule is
    patched (the API then infers the submodule's own)."""

    return None if resolve_target(model, recipe, target) else input_size_for(name, model)


def _check_output(path: str, force: bool) -> None:
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


def _cmd_convert(args: argparse.Namespace) -> int:
    import torch

    _check_output(args.out, args.force)
    checks = _checks(args.checks)  # bad input fails before any work
    kwargs = _model_kwargs(args.model_kwargs)
    size = _input_size(args.input_size)
    recipe = load_recipe(args.recipe)  # a bad recipe fails before any work
    name = ":".join(resolve(args.model))
    with _status(f"reading {args.checkpoint}", quiet=args.json):
        state = read_state_dict(args.checkpoint, use_ema=args.use_ema)
    with _status(f"building {name}", quiet=args.json):
        torch.manual_seed(0)
        model = build_model(name, **kwargs).eval()
        check_fits(model, state, source=f"checkpoint {args.checkpoint}")
        model.load_state_dict(state, strict=True)
        del state
    with _status(f"injecting {recipe.name}", quiet=args.json):
        size = size or _default_input_size(name, model, recipe, args.target)
        patched = inject(model, recipe, init=args.init, input_size=size, target=args.target)
    plan = _plan_of(patched)
    report = None
    if args.validate:
        with _status("validating", quiet=args.json):
            report = validate(model, patched, device=args.device, checks=checks)
        if not report.passed:
            data = {"plan": plan.to_dict(), "validation": report.to_dict(), "written": None}
            _emit(args, f"{report}\nnothing written: validation failed", data)
            return 1
    with _status(f"writing {args.out}", quiet=args.json):
        save(patched, args.out, model_name=name, model_kwargs=kwargs, force=args.force)
    text = f"{name} + {plan.recipe.name}\n{plan.table()}"
    if report is not None:
        text += f"\n{report}"
    text += f"\nwrote {args.out}"
    _emit(
        args, text, {"plan": plan.to_dict(), "validation": report and report.to_dict(), "written": args.out}
    )
    return 0


def _cmd_validate(args: argparse.Namespace) -> int:

    checks = _checks(args.checks)
    with _status(f"reading {args.file}", quiet=args.json):
        manifest = read_manifest(args.file)
        size = _input_size(args.input_size, like=manifest.input_size)
        patched = load(args.file).eval()
        reference = load_base_weights(args.file).eval()
    with _status("validating", quiet=args.json):
        report = validate(reference, patched, input_size=size, device=args.device, checks=checks)
    plan = _plan_of(patched)
    text = (
        f"{args.file}: {manifest.base_model} + {plan.recipe.name} ({len(plan)} blocks), "
        f"written by attn-inject {manifest.versions.get('attn_inject', '?')}\n{report}"
    )
    _emit(args, text, {"manifest": json.loads(manifest.to_json()), "validation": report.to_dict()})
    return 0 if report.passed else 1


def _status(message: str, *, quiet: bool = False):
    """A spinner on stderr while a long step runs (nothing when quiet or without rich)."""
    import contextlib

    if quiet:
        return contextlib.nullcontext()
    try:
        from rich.console import Console
    except ImportError:
        return contextlib.nullcontext()
    return Console(stderr=True).status(message)


def _zoo_inputs(args: argparse.Namespace) -> tuple[list[str], list[str], Path]:
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
        raise UsageError(f"no model from {args.source!r} matches --filter {args.filter!r}")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is not a folder")
    return recipes, names, out


def _cmd_zoo(args: argparse.Namespace) -> int:
    import time

    recipes, names, out = _zoo_inputs(args)
    start = time.perf_counter()
    records: list[ZooRecord] = []
    with _progress(
        f"zoo: {len(names)} models x {len(recipes)} recipes", len(names), quiet=args.json
    ) as advance:
        for result in sweep(
            names,
            recipes,
            identity_check=args.identity_check,
            identity_every=args.identity_every,
            jobs=args.jobs,
        ):
            records.extend(result.records)
            advance(f"{result.source}:{result.model}")
    seconds = time.perf_counter() - start
    identity_seconds = sum(r.seconds for r in records if r.identity) if args.identity_check else None
    command = "attn-inject zoo " + " ".join(a for a in (sys.argv[2:] if len(sys.argv) > 2 else []))
    write_csv(records, out / "zoo.csv")
    write_markdown(
        records,
        out / "zoo.md",
        command=command.strip(),
        seconds=seconds,
        identity_seconds=identity_seconds,
        identity_every=args.identity_every if args.identity_check else None,
    )
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
    _emit(args, text, summary)
    return 0


def _progress(description: str, total: int, *, quiet: bool = False):
    """A context manager yielding ``advance(label)``: a progress bar on stderr."""
    import contextlib

    @contextlib.contextmanager
    def plain():
        """Not a terminal (a log file, CI): a line every 5%."""
        import time

        start, done, step = time.perf_counter(), [0], max(1, total // 20)

        def advance(label: str) -> None:
            done[0] += 1
            if not quiet and (done[0] % step == 0 or done[0] == total):
                elapsed = time.perf_counter() - start
                left = elapsed / done[0] * (total - done[0])
                print(
                    f"{description}: {done[0]}/{total} ({elapsed:.0f} s, about {left:.0f} s left) {label}",
                    file=sys.stderr,
                    flush=True,
                )

        yield advance

    @contextlib.contextmanager
    def bar():
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        columns = (
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            TextColumn("{task.fields[last]}"),
        )
        with Progress(*columns, console=Console(stderr=True), disable=quiet) as progress:
            task = progress.add_task(description, total=total, last="")
            yield lambda label: progress.update(task, advance=1, last=label)

    return bar() if sys.stderr.isatty() else plain()


def _cmd_search(args: argparse.Namespace) -> int:

    try:
        return search_command(args, _model_kwargs(args.model_kwargs))
    except SearchUsageError as error:
        raise UsageError(str(error)) from None


def _cmd_finetune(args: argparse.Namespace) -> int:

    return finetune_command(args)


COMMANDS = {
    "recipes": _cmd_recipes,
    "blocks": _cmd_blocks,
    "plan": _cmd_plan,
    "demo": _cmd_demo,
    "convert": _cmd_convert,
    "validate": _cmd_validate,
    "zoo": _cmd_zoo,
    "finetune": _cmd_finetune,
    "search": _cmd_search,
}


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:
        return int(exit_.code or 0)
    if sys.stdout is None:  # started with its standard output closed (``>&-``)
        print("attn-inject: error: standard output is closed; give it a file or /dev/null", file=sys.stderr)
        return 1
    try:
        code = COMMANDS[args.command](args)
        sys.stdout.flush()  # a full disk or a closed reader fails here, not silently at exit
        return code
    except BrokenPipeError:  # the reader went away (``| head``): end quietly, as git does
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0
    except (UsageError, SettingError) as error:
        print(f"attn-inject: error: {_one_line(error)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as error:
        print(f"attn-inject: {str(error).strip() or 'interrupted'}", file=sys.stderr)
        return int(getattr(error, "code", 130))
    except (AttnInjectError, OSError) as error:  # a refusal of ours, or a file: one line
        if args.debug:
            traceback.print_exc()
        print(f"attn-inject: error: {_one_line(error)}", file=sys.stderr)
        return 1
    except Exception as error:  # a library's error or a bug: one line with its type
        if args.debug:
            traceback.print_exc()
        print(
            f"attn-inject: error: {type(error).__name__}: {_one_line(error)} (--debug shows where)",
            file=sys.stderr,
        )
        return 1


def _one_line(error: BaseException) -> str:

    return first_line(error, 600) or type(error).__name__


if __name__ == "__main__":
    sys.exit(main())
