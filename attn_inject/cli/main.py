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
import os
import sys
import traceback
from collections.abc import Sequence
from typing import Any

from .._version import __version__
from ..blocks.params import INIT_MODES
from ..core.errors import AttnInjectError
from ..core.messages import first_line
from ..finetune.command import add_parser as add_finetune
from ..finetune.command import command as finetune_command
from ..finetune.config import SettingError
from ..search.command import add_parser as add_search
from ..search.command import command as search_command
from ..search.errors import SearchUsageError
from .blocks import command as blocks_command
from .convert import command as convert_command
from .demo import command as demo_command
from .errors import UsageError
from .options import parse_model_kwargs
from .plan import command as plan_command
from .recipes import command as recipes_command
from .validate import command as validate_command
from .zoo import command as zoo_command

__all__ = ["main"]

DEMO_MODEL = "timm:resnet50"
DEMO_RECIPE = "cbam_after_every_stage"


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
    zoo.add_argument(
        "--filter",
        nargs="+",
        metavar="GLOB",
        help="only models whose name matches one of these, e.g. 'resnet*' 'hrnet*'",
    )
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
        "--update",
        action="store_true",
        help="sweep only the models --filter names and replace their rows in DIR/zoo.csv, then "
        "rewrite DIR/zoo.md from every row (the identity sample stays every Nth of the full list)",
    )
    zoo.add_argument(
        "--out", default="docs", metavar="DIR", help="where zoo.md and zoo.csv go (default: docs)"
    )

    add_finetune(sub, common)
    add_search(sub, common)
    return parser


def _search(args: argparse.Namespace) -> int:
    """``attn-inject search``, its own usage errors read as the command line's."""
    try:
        return search_command(args, parse_model_kwargs(args.model_kwargs))
    except SearchUsageError as error:
        raise UsageError(str(error)) from None


COMMANDS = {
    "recipes": recipes_command,
    "blocks": blocks_command,
    "plan": plan_command,
    "demo": demo_command,
    "convert": convert_command,
    "validate": validate_command,
    "zoo": zoo_command,
    "finetune": finetune_command,
    "search": _search,
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
