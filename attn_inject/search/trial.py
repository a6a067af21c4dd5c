"""One trial: the base model converted with a candidate, then a real fine-tune, on the same
code path as ``attn-inject finetune`` (``finetune.run``), its run folder kept."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..finetune.config import FinetuneConfig
from ..finetune.run import run
from ..finetune.trackers import UNLABELLED, RunLabel
from ..saving.file import save
from ..surgery.inject import inject
from .candidates import Candidate

__all__ = ["BASELINE_RECIPE", "Base", "TrialOutcome", "run_trial"]

# The baseline's file holds the base model through the same save/load path as every other
# trial's: a recipe whose one rule can match no map, so that no block is placed.
BASELINE_RECIPE: dict[str, Any] = {
    "name": "baseline",
    "description": "no block: the baseline of attn-inject search",
    "rules": [{"block": "se", "at": "stage_output", "min_channels": 1_000_000_000}],
}


@dataclass(frozen=True)
class Base:
    """How to build the base model afresh: ``build()`` gives it with its weights."""

    build: Callable[[], nn.Module]
    model_name: str
    model_kwargs: dict
    input_size: tuple[int, ...] | None = None


@dataclass(frozen=True)
class TrialOutcome:
    """What one fine-tune measured."""

    top1: float  # validation top-1 after the last epoch
    seconds_per_epoch: float  # training and evaluation
    run: Path


def convert(base: Base, candidate: Candidate, seed: int, path: Path) -> None:
    """The base model with ``candidate``'s blocks (blocks at paper init drawn from ``seed``),
    saved at ``path`` as ``attn-inject convert`` writes it."""
    torch.manual_seed(seed)
    model = base.build().eval()
    recipe = BASELINE_RECIPE if candidate.recipe is None else candidate.recipe
    patched = inject(model, recipe, input_size=base.input_size, allow_empty=candidate.baseline)
    save(patched, path, model_name=base.model_name, model_kwargs=base.model_kwargs, force=True)


def run_trial(
    base: Base,
    candidate: Candidate,
    seed: int,
    folder: Path,
    template: FinetuneConfig,
    on_epoch: Callable[[dict[str, float]], None] | None = None,
    label: RunLabel = UNLABELLED,
) -> TrialOutcome:
    """Convert and fine-tune into ``folder`` (``start.safetensors`` and ``run/``); ``label``
    names the fine-tune in the trackers the template asks for."""
    folder.mkdir(parents=True, exist_ok=True)
    start = folder / "start.safetensors"
    convert(base, candidate, seed, start)
    config = dataclasses.replace(
        template,
        checkpoint=str(start),
        out=str(folder / "run"),
        seed=seed,
        attn_lr_scale=candidate.attn_lr_scale or template.attn_lr_scale,
        resume=False,
        force=True,
    )
    began = time.perf_counter()
    result = run(config, on_epoch=on_epoch, images_checked=True, label=label)  # search() decoded them once
    seconds = (time.perf_counter() - began) / max(1, len(result.history))
    return TrialOutcome(float(result.history[-1]["eval_top1"]), seconds, Path(config.out))
