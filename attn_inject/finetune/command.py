"""The ``attn-inject finetune`` subcommand: its arguments and its handler."""

from __future__ import annotations

import argparse
import dataclasses
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .config import FinetuneConfig

__all__ = ["add_parser", "add_training_options", "command", "config_from_args"]


def add_parser(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    """``attn-inject finetune`` and its options. Long on purpose: a flat declaration, one
    statement per option in the order ``--help`` shows them."""
    p = sub.add_parser(
        "finetune",
        parents=[common],
        help="fine-tune a patched model on an ImageFolder (one process, or DDP under torchrun)",
        description="Fine-tune a file written by convert / ai.save on DIR/train and DIR/val "
        "(ImageFolder layout). Under torchrun --nproc_per_node=N it runs DDP.",
    )
    p.add_argument(
        "--checkpoint",
        required=True,
        metavar="P.safetensors",
        help="a file written by convert / ai.save, or a timm train.py checkpoint (.pth.tar, weights only)",
    )
    p.add_argument(
        "--like",
        metavar="FILE",
        help="for a .pth.tar checkpoint: the file written by convert / ai.save its timm run started from, "
        "whose manifest describes the network (default: the file registered under its 'arch')",
    )
    p.add_argument(
        "--use-ema", action="store_true", help="for a .pth.tar checkpoint: its EMA weights (state_dict_ema)"
    )
    p.add_argument("--data", required=True, metavar="DIR", help="DIR/train and DIR/val, a folder per class")
    p.add_argument("--epochs", required=True, type=int, metavar="N")
    p.add_argument("--out", required=True, metavar="RUNDIR", help="where the results go")
    add_training_options(p)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true", help="continue the run in RUNDIR from its last epoch")
    p.add_argument("--force", action="store_true", help="start over in a RUNDIR that holds results")


def add_training_options(p: argparse.ArgumentParser) -> None:
    """The options of a fine-tune that ``finetune`` and ``search`` share. Long on purpose: a
    flat declaration, one statement per option in the order ``--help`` shows them."""
    p.add_argument("--batch-size", type=int, default=64, help="per process (default: 64)")
    p.add_argument("--image-size", type=int, metavar="PX", help="default: the model's own input size")
    p.add_argument("--lr", type=float, default=1e-3, help="base learning rate (default: 1e-3)")
    p.add_argument(
        "--attn-lr-scale",
        type=float,
        default=10.0,
        help="learning-rate multiplier of the new blocks (default: 10)",
    )
    p.add_argument(
        "--layer-decay",
        type=float,
        metavar="F",
        help="timm layer-wise lr decay (needs the model's group_matcher)",
    )
    p.add_argument(
        "--frozen-epochs",
        type=int,
        default=0,
        metavar="K",
        help="first train only the new blocks and the classifier for K epochs (default: 0)",
    )
    p.add_argument(
        "--opt", default="adamw", help="a timm optimizer name: adamw, sgd, lamb, ... (default: adamw)"
    )
    p.add_argument("--weight-decay", type=float, default=0.05, help="(default: 0.05)")
    p.add_argument(
        "--warmup-epochs", type=int, default=0, help="linear warm-up before cosine decay (default: 0)"
    )
    p.add_argument(
        "--num-classes",
        type=int,
        metavar="C",
        help="a new classifier with C classes (default: the checkpoint's)",
    )
    p.add_argument("--clip-grad", type=float, metavar="NORM", help="clip the gradient norm")
    p.add_argument("--amp", action="store_true", help="mixed precision (bfloat16; fp16 uses the loss scaler)")
    p.add_argument("--amp-dtype", choices=["bfloat16", "float16"], default="bfloat16")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument(
        "--model-ema", action="store_true", help="keep a timm ModelEmaV3 (with warm-up); evaluate and save it"
    )
    p.add_argument("--model-ema-decay", type=float, default=0.998)
    p.add_argument("--no-aug", action="store_true", help="no training augmentation (resize and crop only)")
    p.add_argument("--hflip", type=float, default=0.5, help="horizontal flip probability (default: 0.5)")
    p.add_argument(
        "--scale", type=float, nargs=2, metavar=("MIN", "MAX"), help="random-resized-crop scale range"
    )
    p.add_argument("--workers", type=int, default=2, help="data loader processes (default: 2)")
    p.add_argument(
        "--no-verify-images",
        dest="verify_images",
        action="store_false",
        help="skip decoding every image before training (a full pass over the data). Only for a "
        "dataset you trust: a truncated, corrupt or hostile image then fails mid-epoch, in a data "
        "loader worker, instead of before anything is written",
    )
    p.add_argument(
        "--threads",
        type=int,
        help="intra-op threads per process (default: the process's share of the cores, less one "
        "for the data loader workers)",
    )
    p.add_argument(
        "--log-interval",
        type=int,
        default=50,
        metavar="STEPS",
        help="in a pipe or a file: a line every STEPS optimizer steps with loss, lr, images/s and "
        "ETA (default: 50)",
    )
    p.add_argument(
        "--log-tensorboard",
        metavar="DIR",
        help="TensorBoard event files in DIR (pip install tensorboard)",
    )
    p.add_argument(
        "--log-mlflow",
        action="store_true",
        help="log to MLflow at MLFLOW_TRACKING_URI (pip install mlflow-skinny)",
    )
    p.add_argument(
        "--log-wandb",
        action="store_true",
        help="log to Weights & Biases, WANDB_PROJECT / WANDB_MODE from the environment (pip install wandb)",
    )


def config_from_args(args: argparse.Namespace, **fixed: Any) -> FinetuneConfig:
    """The fine-tune ``args`` describe; ``fixed`` sets the fields the caller decides
    (``checkpoint``, ``out``, ``seed``...)."""
    from .config import FinetuneConfig

    names = {f.name for f in dataclasses.fields(FinetuneConfig)}
    values = {name: getattr(args, name) for name in names if hasattr(args, name)}
    if values.get("scale"):
        values["scale"] = tuple(values["scale"])
    return FinetuneConfig(**{**values, **fixed})


def command(args: argparse.Namespace) -> int:
    from .run import run

    config = config_from_args(args)
    result = run(config)
    if args.json:
        import json

        print(
            json.dumps(
                {
                    "out": str(result.out),
                    "best_epoch": result.best_epoch + 1,
                    "best_top1": result.best_top1,
                    "history": result.history,
                },
                indent=2,
            )
        )
    return 0
