"""The settings of one fine-tuning run: what ``attn-inject finetune`` was given."""

from __future__ import annotations

import importlib.util
import math
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from ..core.errors import InputError
from ..core.messages import cut
from ..core.values import is_int

__all__ = ["RESUME_FREE", "FinetuneConfig", "SettingError"]

# Settings a resumed run may change: they do not change what is computed.
RESUME_FREE = (
    "resume",
    "force",
    "workers",
    "threads",
    "out",
    "log_interval",
    "log_tensorboard",
    "log_mlflow",
    "log_wandb",
    "verify_images",
)


class SettingError(InputError):
    """A setting out of its range: the command line is wrong (``attn-inject`` exits 2)."""


@dataclass(frozen=True)
class FinetuneConfig:
    checkpoint: str
    data: str
    epochs: int
    out: str
    like: str | None = None  # for a timm training checkpoint: the file its run started from
    use_ema: bool = False  # for a timm training checkpoint: its EMA weights
    batch_size: int = 64
    image_size: int | None = None
    lr: float = 1e-3
    attn_lr_scale: float = 10.0
    frozen_epochs: int = 0
    opt: str = "adamw"
    weight_decay: float = 0.05
    warmup_epochs: int = 0
    layer_decay: float | None = None
    num_classes: int | None = None
    clip_grad: float | None = None
    amp: bool = False
    amp_dtype: str = "bfloat16"
    channels_last: bool = False
    compile: bool = False
    model_ema: bool = False
    model_ema_decay: float = 0.998
    no_aug: bool = False
    hflip: float = 0.5
    scale: tuple[float, float] | None = None
    workers: int = 2
    threads: int | None = None  # intra-op threads per process (None: the cores left for it)
    seed: int = 0
    resume: bool = False
    force: bool = False
    log_interval: int = 50  # optimizer steps between two progress lines in a pipe
    log_tensorboard: str | None = None  # a folder for TensorBoard's event files
    log_mlflow: bool = False  # to MLflow (MLFLOW_TRACKING_URI)
    log_wandb: bool = False  # to Weights & Biases (WANDB_* settings)
    verify_images: bool = True  # decode every image before training (False: a dataset you trust)

    def check(self) -> None:
        """Raise :class:`SettingError` (one line, naming the option) for a setting out of range."""
        whole = (
            ("--epochs", self.epochs, 1),
            ("--batch-size", self.batch_size, 1),
            ("--num-classes", self.num_classes, 1),
            ("--image-size", self.image_size, 8),
            ("--workers", self.workers, 0),
            ("--threads", self.threads, 1),
            ("--log-interval", self.log_interval, 1),
        )
        for option, value, low in whole:
            if value is not None and value < low:
                raise SettingError(f"{option} must be at least {low}, got {value}")
        if not 0 <= self.frozen_epochs <= self.epochs:
            raise SettingError(
                f"--frozen-epochs must be between 0 and --epochs ({self.epochs}), got {self.frozen_epochs}"
            )
        if not 0 <= self.warmup_epochs < self.epochs:
            raise SettingError(
                f"--warmup-epochs must be between 0 and --epochs - 1, got {self.warmup_epochs}"
            )
        self._check_numbers()
        if self.amp_dtype not in ("bfloat16", "float16"):
            raise SettingError(f"--amp-dtype must be bfloat16 or float16, got {self.amp_dtype}")
        self._check_places()
        check_installed(self)

    def _check_numbers(self) -> None:
        """The real-valued settings: finite, each in its range."""
        ranges = (
            ("--lr", self.lr, "a positive number", lambda v: v > 0),
            ("--attn-lr-scale", self.attn_lr_scale, "a positive number", lambda v: v > 0),
            ("--weight-decay", self.weight_decay, "zero or a positive number", lambda v: v >= 0),
            ("--layer-decay", self.layer_decay, "in (0, 1]", lambda v: 0 < v <= 1),
            ("--clip-grad", self.clip_grad, "a positive number", lambda v: v > 0),
            ("--model-ema-decay", self.model_ema_decay, "in [0, 1)", lambda v: 0 <= v < 1),
            ("--hflip", self.hflip, "a probability in [0, 1]", lambda v: 0 <= v <= 1),
        )
        for option, value, allowed, fits in ranges:
            if value is not None and not (math.isfinite(value) and fits(value)):
                raise SettingError(f"{option} must be {allowed}, got {value}")
        if self.scale is not None:
            low, high = self.scale
            if not (math.isfinite(low) and math.isfinite(high) and 0 < low <= high <= 1):
                raise SettingError(f"--scale takes MIN MAX with 0 < MIN <= MAX <= 1, got {low} {high}")

    def _check_places(self) -> None:
        """``--out`` may not lie inside ``--data``: its files (curves.png) would be read as
        training images by the next run."""
        out, data = Path(os.path.realpath(self.out)), Path(os.path.realpath(self.data))
        if out == data or data in out.parents:
            raise SettingError(
                f"--out {cut(self.out, 200)} is inside --data {cut(self.data, 200)}: the run's files would "
                "become training images; put RUNDIR outside the data folder"
            )

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        if self.scale is not None:
            out["scale"] = list(self.scale)
        return out

    def differences(self, saved: dict[str, Any]) -> list[str]:
        """The settings that differ from a saved run's ``args.yaml`` (those that change what
        is computed). More ``epochs`` than the run's is not a difference: the run is extended
        (see :func:`attn_inject.finetune.folder.check_out`)."""
        mine = self.to_dict()
        names = [f.name for f in fields(self) if f.name not in RESUME_FREE]
        extended = is_int(saved.get("epochs")) and self.epochs > saved["epochs"]
        return [n for n in names if saved.get(n) != mine[n] and not (n == "epochs" and extended)]


# flag, the module imported, what to install
TRACKER_PACKAGES = (
    ("--log-tensorboard", "tensorboard", "tensorboard"),
    ("--log-mlflow", "mlflow", "mlflow-skinny"),
    ("--log-wandb", "wandb", "wandb"),
)


def trackers_wanted(config: FinetuneConfig) -> dict[str, bool]:
    return {
        "--log-tensorboard": config.log_tensorboard is not None,
        "--log-mlflow": config.log_mlflow,
        "--log-wandb": config.log_wandb,
    }


def check_installed(config: FinetuneConfig) -> None:
    """Each tracker ``config`` asks for is installed; else one line naming the package to
    install (:class:`SettingError`: exit 2). Nothing is imported."""
    wanted = trackers_wanted(config)
    for flag, module, package in TRACKER_PACKAGES:
        if wanted[flag] and not _installed(module):
            raise SettingError(
                f"{flag} needs the {module} package, which is not installed: pip install {package}"
            )
    if config.log_tensorboard is not None and not config.log_tensorboard.strip():
        raise SettingError("--log-tensorboard takes a folder, got an empty name")


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a parent that fails to import, or a module set to None
        return False
