"""The ``attn-inject search`` subcommand: its arguments and its handler."""

from __future__ import annotations

import argparse
import hashlib
import json
from collections.abc import Callable
from typing import Any

from torch import nn

from .study import PRUNERS, SAMPLERS, Pruner, Sampler

__all__ = ["add_parser", "command"]


def add_parser(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    """``attn-inject search`` and its options. Long on purpose: a flat declaration, one
    statement per option in the order ``--help`` shows them."""
    from ..finetune.command import add_training_options

    p = sub.add_parser(
        "search",
        parents=[common],
        help="which attention, where: fine-tune each candidate over seeds next to a baseline (Optuna)",
        description="Convert the base model with each candidate recipe (or each point of a space), "
        "fine-tune it on DIR over several seeds, next to a baseline with no block, and rank them "
        "with 95% intervals. Run the same command on more processes or machines (a shared "
        "--storage) to share the trials; rerun it to continue.",
    )
    base = p.add_mutually_exclusive_group(required=True)
    base.add_argument("--checkpoint", metavar="BASE.safetensors", help="a file written by convert / ai.save")
    base.add_argument("--model", metavar="NAME", help="timm:NAME or tv:NAME, with --base-checkpoint")
    p.add_argument("--base-checkpoint", metavar="X.pth", help="the --model's weights (default: random init)")
    p.add_argument(
        "--model-kwargs", nargs="+", default=[], metavar="K=V", help="builder arguments of --model"
    )
    p.add_argument("--data", required=True, metavar="DIR", help="DIR/train and DIR/val, a folder per class")
    p.add_argument(
        "--out",
        required=True,
        metavar="RUNDIR",
        help="study.db; the trials and the leaderboard (in RUNDIR/NAME for a --study NAME of your own)",
    )
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--recipes", nargs="+", metavar="R", help="an ablation: these recipes (names or files)")
    what.add_argument("--space", metavar="SPACE.yaml", help="a search space (docs/search.md)")
    p.add_argument("--epochs", type=int, default=5, metavar="N", help="per fine-tune (default: 5)")
    p.add_argument("--repeats", type=int, default=3, metavar="K", help="seeds per candidate (default: 3)")
    p.add_argument("--n-trials", type=int, metavar="T", help="--sampler tpe: trials besides the baseline")
    p.add_argument("--timeout", type=float, metavar="S", help="start no trial after S seconds")
    p.add_argument("--sampler", choices=SAMPLERS, default=Sampler.GRID.value, help="(default: grid)")
    p.add_argument("--pruner", choices=PRUNERS, default=Pruner.NONE.value, help="(default: none)")
    p.add_argument("--storage", metavar="URL", help="SQLAlchemy URL (default: sqlite:///RUNDIR/study.db)")
    p.add_argument(
        "--study",
        default="attn-inject-search",
        metavar="NAME",
        help="letters, digits, '.', '_', '-' (default: attn-inject-search)",
    )
    p.add_argument(
        "--heartbeat", type=int, default=60, metavar="S", help="a dead worker's trial is retried after 2 S"
    )
    add_training_options(p)
    p.add_argument("--seed", type=int, default=0, help="the first seed; the others follow (default: 0)")


def _digest(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()[:16]


def _base(
    args: argparse.Namespace, kwargs: dict[str, Any], input_size: tuple[int, ...] | None
) -> tuple[Any, str]:
    from ..models.build import build_model, resolve
    from ..saving.checkpoint import check_fits, read_state_dict
    from ..saving.file import load_base_weights, read_manifest
    from .trial import Base

    if args.checkpoint:
        manifest = read_manifest(args.checkpoint)
        if not manifest.base_model:
            raise ValueError(f"--checkpoint {args.checkpoint}: the file names no model to rebuild")
        path = args.checkpoint
        build: Callable[[], nn.Module] = lambda: load_base_weights(path)  # noqa: E731
        return Base(build, manifest.base_model, dict(manifest.base_kwargs), input_size), _digest(path)
    name = ":".join(resolve(args.model))
    state = read_state_dict(args.base_checkpoint) if args.base_checkpoint else None

    def build_base() -> nn.Module:
        model = build_model(name, **kwargs)
        if state is not None:
            check_fits(model, state, source=f"--base-checkpoint {args.base_checkpoint}")
            model.load_state_dict(state, strict=True)
        return model

    weights = _digest(args.base_checkpoint) if args.base_checkpoint else "random init"
    identity = f"{name} {json.dumps(kwargs, sort_keys=True)} {weights}"
    return Base(build_base, name, kwargs, input_size), identity


def _check_usage(args: argparse.Namespace, model_kwargs: dict[str, Any]) -> None:
    """The mistakes of the command line itself, refused before anything is read: exit 2."""
    from .errors import SearchError, SearchUsageError
    from .records import MAX_SEEDS
    from .study_files import check_study_name

    if args.base_checkpoint and not args.model:
        raise SearchUsageError("--base-checkpoint goes with --model (a --checkpoint file holds its weights)")
    if model_kwargs and not args.model:
        raise SearchUsageError("--model-kwargs goes with --model (a --checkpoint file records its own)")
    if not 1 <= args.repeats <= MAX_SEEDS:
        raise SearchUsageError(f"--repeats must be from 1 to {MAX_SEEDS}, got {args.repeats}")
    if args.sampler == Sampler.TPE and (not args.space or args.n_trials is None or args.n_trials < 1):
        raise SearchUsageError("--sampler tpe searches a --space and needs --n-trials (at least 1)")
    if args.heartbeat < 1:
        raise SearchUsageError(f"--heartbeat must be at least 1 second, got {args.heartbeat}")
    if args.timeout is not None and not args.timeout > 0:
        raise SearchUsageError(f"--timeout must be positive seconds, got {args.timeout}")
    try:
        check_study_name(args.study)
    except SearchError as error:
        raise SearchUsageError(str(error)) from None


def command(args: argparse.Namespace, model_kwargs: dict[str, Any]) -> int:
    from ..finetune.command import config_from_args
    from .candidates import from_recipes
    from .run import SearchConfig, search
    from .space import read_space, space_candidates

    _check_usage(args, model_kwargs)
    invalid: list[str] = []
    space = None
    if args.space:
        space = read_space(args.space)
        candidates, invalid = space_candidates(space, args.space)
    else:
        candidates = from_recipes(args.recipes)
    size = (3, args.image_size, args.image_size) if args.image_size else None
    base, identity = _base(args, model_kwargs, size)
    template = config_from_args(args, checkpoint="", out="", resume=False, force=True)
    config = SearchConfig(
        base=base,
        base_identity=identity,
        candidates=tuple(candidates),
        template=template,
        out=args.out,
        repeats=args.repeats,
        sampler=args.sampler,
        pruner=args.pruner,
        n_trials=args.n_trials,
        timeout=args.timeout,
        storage=args.storage,
        study=args.study,
        heartbeat=args.heartbeat,
        space=space,
        invalid=tuple(invalid),
    )
    result = search(config)
    if args.json:
        print(
            json.dumps(
                {
                    "out": str(result.out),
                    "leaderboard": str(result.out / "leaderboard.md"),
                    "files": [str(f) for f in result.files],
                    "ran": result.ran,
                }
            )
        )
    else:
        print(result.table)
        print(f"\nwrote {result.out}/: {', '.join(f.name for f in result.files)}")
    return 0
