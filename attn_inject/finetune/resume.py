"""The resume state: where the run stands, written, read back with its fields checked, and restored."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..core.files import write_atomic
from ..core.messages import error_line, first_line, shown
from ..core.values import is_int, is_number
from .config import FinetuneConfig
from .distributed import Context
from .groups import param_groups
from .outputs import RESUME, RunError
from .training import Training

__all__ = ["Progress", "check_resume_fits", "load_state", "resumed", "save_state"]


def save_state(path: Path, state: dict[str, Any]) -> None:
    write_atomic(path, lambda tmp: torch.save(state, tmp))


def load_state(path: Path, epochs: int | None = None) -> dict[str, Any]:
    """The resume state, read with ``weights_only=True`` (tensors and plain containers), its
    fields checked for type and range (``epochs``: the run's)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise RunError(f"--resume: cannot read {first_line(error) or type(error).__name__}") from None
    return _checked_state(state, path, epochs)


def _checked_state(state: Any, path: Path, epochs: int | None) -> dict[str, Any]:
    def fail(what: str) -> RunError:
        return RunError(f"--resume: {path} is not a resume state of this run: {what}")

    if not isinstance(state, dict):
        raise fail(f"it holds a {type(state).__name__}, not a mapping")
    for key in ("model", "optimizer", "scheduler"):
        if not isinstance(state.get(key), dict):
            raise fail(f"'{key}' is missing or not a mapping")

    def whole(key: str, low: int, high: int | None) -> int:
        value = state.get(key)
        if not is_int(value) or value < low or (high is not None and value > high):
            allowed = f"an integer from {low}" + (f" to {high}" if high is not None else "")
            raise fail(f"'{key}' must be {allowed}, got {shown(value)}")
        return value

    epoch = whole("epoch", 0, epochs)
    whole("num_updates", 0, None)
    whole("best_epoch", -1, max(epoch - 1, -1))
    if not is_number(state.get("best_top1")):
        raise fail(f"'best_top1' must be a number, got {shown(state.get('best_top1'))}")
    history = state.get("history")
    if (
        not isinstance(history, list)
        or len(history) != epoch
        or not all(
            isinstance(row, dict) and all(isinstance(v, (int, float)) for v in row.values())
            for row in history
        )
    ):
        raise fail(f"'history' must be {epoch} rows of numbers, one per epoch done")
    return state


def check_resume_fits(state: dict[str, Any], model: nn.Module, config: FinetuneConfig) -> None:
    """Refuse a resume state written for another model or run (another checkpoint's
    ``resume.pth`` copied in): its weights and optimizer groups must fit ``model``, the
    model this run trains. One line, before anything is written."""
    path = Path(config.out) / RESUME
    mine = model.state_dict()
    theirs = state["model"]

    def refuse(what: str) -> RunError:
        return RunError(
            f"--resume: {path} is the state of another model or run ({what}); resume the run "
            "that wrote it (its --out), or start over here with --force"
        )

    missing = [k for k in mine if k not in theirs]
    extra = [k for k in theirs if k not in mine]
    if missing or extra:
        name = missing[0] if missing else extra[0]
        where = "not in the state" if missing else "not in the model"
        raise refuse(f"{len(missing) + len(extra)} weight names differ, e.g. {shown(name, 60)} {where}")
    for key, tensor in mine.items():
        saved = theirs[key]
        if not isinstance(saved, torch.Tensor) or tuple(saved.shape) != tuple(tensor.shape):
            got = tuple(saved.shape) if isinstance(saved, torch.Tensor) else type(saved).__name__
            raise refuse(f"{shown(key, 60)} is {got} in the state, {tuple(tensor.shape)} in the model")
    groups = param_groups(
        model,
        config.lr,
        weight_decay=config.weight_decay,
        attn_lr_scale=config.attn_lr_scale,
        layer_decay=config.layer_decay,
    )
    saved_groups = state["optimizer"].get("param_groups")
    sizes = [len(g["params"]) for g in groups]
    saved_sizes = (
        [len(g.get("params", ())) if isinstance(g, dict) else -1 for g in saved_groups]
        if isinstance(saved_groups, list)
        else None
    )
    if saved_sizes != sizes:
        raise refuse(f"its optimizer holds parameter groups of {saved_sizes} parameters, this run's {sizes}")


@dataclass
class Progress:
    """Where the run stands: the next epoch, the optimizer steps taken, the epochs' rows and
    the best one."""

    first_epoch: int = 0
    num_updates: int = 0
    history: list[dict[str, float]] = field(default_factory=list)
    best_top1: float = -math.inf
    best_epoch: int = -1


def resumed(config: FinetuneConfig, t: Training, out: Path, context: Context) -> Progress:
    """The progress of a new run, or the saved state of the one ``--resume`` continues (its
    model, optimizer, schedule, EMA and scaler restored)."""
    if not config.resume:
        t.scheduler.step_update(num_updates=0)  # every group at its lr_scale from the first step
        return Progress()
    state = load_state(out / RESUME, config.epochs)
    try:
        t.model.load_state_dict(state["model"])
        t.optimizer.load_state_dict(state["optimizer"])
        t.scheduler.load_state_dict(state["scheduler"])
        if t.ema is not None:
            t.ema.module.load_state_dict(state["ema"])
        if t.scaler is not None and "scaler" in state:
            t.scaler.load_state_dict(state["scaler"])
    except (KeyError, RuntimeError, TypeError, ValueError) as error:  # a file changed since the check
        raise RunError(
            f"--resume: {out / RESUME} is the state of another model or run ({error_line(error, 160)}); "
            "resume the run that wrote it (its --out), or start over here with --force"
        ) from None
    progress = Progress(
        int(state["epoch"]),
        int(state["num_updates"]),
        [dict(r) for r in state["history"]],
        float(state["best_top1"]),
        int(state["best_epoch"]),
    )
    context.log(f"resuming {out} at epoch {progress.first_epoch + 1} of {config.epochs}")
    planned = int(t.scheduler.t_initial / max(len(t.train_loader), 1))  # the schedule's own length
    if config.epochs > planned:
        context.log(
            f"extended from {planned} to {config.epochs} epochs: the cosine schedule runs its "
            f"{planned} epochs as planned, then holds its floor (min lr {config.lr * 0.01:g})",
        )
    return progress
