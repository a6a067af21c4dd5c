"""The settings of one fine-tuning run: what ``attn-inject finetune`` was given."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

from ..errors import InputError
from ..values import is_int

__all__ = ["RESUME_FREE", "FinetuneConfig"]

# Settings a resumed run may change: they do not change what is computed.
RESUME_FREE = ("resume", "force", "workers", "threads", "out")


@dataclass(frozen=True)
class FinetuneConfig:
    checkpoint: str
    data: str
    epochs: int
    out: str
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

    def check(self) -> None:
        """Raise ValueError (one line) for a setting out of range."""
        if self.epochs < 1:
            raise InputError(f"--epochs must be at least 1, got {self.epochs}")
        if self.batch_size < 1:
            raise InputError(f"--batch-size must be at least 1, got {self.batch_size}")
        if self.num_classes is not None and self.num_classes < 1:
            raise InputError(f"--num-classes must be at least 1, got {self.num_classes}")
        if not 0 <= self.frozen_epochs <= self.epochs:
            raise InputError(
                f"--frozen-epochs must be between 0 and --epochs ({self.epochs}), got {self.frozen_epochs}"
            )
        if not 0 <= self.warmup_epochs < self.epochs:
            raise InputError(f"--warmup-epochs must be between 0 and --epochs - 1, got {self.warmup_epochs}")
        if self.image_size is not None and self.image_size < 8:
            raise InputError(f"--image-size must be at least 8, got {self.image_size}")
        if not self.lr > 0:
            raise InputError(f"--lr must be positive, got {self.lr}")
        if self.workers < 0:
            raise InputError(f"--workers must be 0 or more, got {self.workers}")
        if self.threads is not None and self.threads < 1:
            raise InputError(f"--threads must be at least 1, got {self.threads}")
        if self.amp_dtype not in ("bfloat16", "float16"):
            raise InputError(f"--amp-dtype must be bfloat16 or float16, got {self.amp_dtype}")
        if not 0 <= self.hflip <= 1:
            raise InputError(f"--hflip must be a probability in [0, 1], got {self.hflip}")

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        if self.scale is not None:
            out["scale"] = list(self.scale)
        return out

    def differences(self, saved: dict[str, Any]) -> list[str]:
        """The settings that differ from a saved run's ``args.yaml`` (those that change what
        is computed). More ``epochs`` than the run's is not a difference: the run is extended
        (see :func:`attn_inject.finetune.run.check_out`)."""
        mine = self.to_dict()
        names = [f.name for f in fields(self) if f.name not in RESUME_FREE]
        extended = is_int(saved.get("epochs")) and self.epochs > saved["epochs"]
        return [n for n in names if saved.get(n) != mine[n] and not (n == "epochs" and extended)]
