"""``attn-inject finetune``: fine-tune a patched model on an ImageFolder, on one process or
under torchrun (DDP), with timm's optimizer, scheduler, EMA, data config and summary.

    checks (data, checkpoint, RUNDIR) ─ nothing written on failure
      └─ load (new head if --num-classes) ─ timm data config + transforms
           └─ epochs: [frozen: blocks + head] train ─ evaluate ─ rank 0 writes
                RUNDIR/args.yaml, summary.csv, curves.png, last/best.safetensors, resume.pth
                (a copy of the epoch's state, written while the next epoch trains)

Randomness is re-seeded from (seed, epoch, rank) at every epoch start, so a resumed run
replays exactly what an uninterrupted one would have done.
"""

from __future__ import annotations

import contextlib
import copy
import math
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from ..core.files import write_atomic
from . import curves as drawing
from .config import FinetuneConfig
from .curves import CurvesSchedule
from .data import DataError, Folders, check_folders
from .distributed import Context, setup, teardown
from .epoch_writer import EpochWriter, epoch_writer
from .folder import check_out, prepare_out, write_summary
from .freeze import freeze_base
from .gates import mean_gate
from .loop import evaluate, train_one_epoch
from .outputs import BEST, CURVES, LAST, OUTPUTS, RESUME, SUMMARY, RunError
from .progress import RunClock, epoch_progress
from .resume import Progress, check_resume_fits, resumed, save_state
from .starting_point import StartingPoint, load_for_finetuning
from .stopping import stoppable
from .threads import threads_line, using_threads
from .trackers import UNLABELLED, RunLabel, Trackers, tracking
from .training import Training, build_training, check_optimizer, reseed, wrap

__all__ = ["OUTPUTS", "RunError", "RunResult", "run"]


@dataclass(frozen=True)
class RunResult:
    """What a finished run measured: the summary rows and the best epoch."""

    out: Path
    history: list[dict[str, float]]
    best_epoch: int
    best_top1: float
    reinitialised: tuple[str, ...]


EpochHook = Callable[[dict[str, float]], None]


def run(
    config: FinetuneConfig,
    on_epoch: EpochHook | None = None,
    *,
    images_checked: bool = False,
    label: RunLabel = UNLABELLED,
) -> RunResult:
    """Fine-tune per ``config`` (see the module docstring); returns what was measured.
    ``on_epoch(row)`` is called with each epoch's summary row once the epoch has ended
    (``attn-inject search`` reports it to its pruner, which may stop the run there); its
    files are written on a thread of their own while the next epoch trains (:mod:`.epoch_writer`),
    and all of them when the run returns or raises.
    ``images_checked``: the caller decoded every image of ``config.data`` already (a search
    does once for all its trials); the folders' layout is still checked. ``label`` names
    the run in the trackers ``config`` asks for (:mod:`.trackers`)."""
    with stoppable(config) as stop_if_requested, using_threads(config):
        return _run(config, on_epoch, stop_if_requested, images_checked, label)


def _run(
    config: FinetuneConfig,
    on_epoch: EpochHook | None = None,
    stop_if_requested: Callable[[], None] = lambda: None,
    images_checked: bool = False,
    label: RunLabel = UNLABELLED,
) -> RunResult:
    config.check()
    folders = check_folders(config.data, verify=config.verify_images and not images_checked)
    resume_state = check_out(config)
    start = load_for_finetuning(
        config.checkpoint, config.num_classes, like=config.like, use_ema=config.use_ema
    )
    if start.num_classes != len(folders.classes):
        raise RunError(
            f"the model has {start.num_classes} classes, --data {config.data} has {len(folders.classes)}; "
            f"pass --num-classes {len(folders.classes)} to train a new classifier"
        )
    check_optimizer(config, start.model)
    if resume_state is not None:
        check_resume_fits(resume_state, start.model, config)
        del resume_state
    context = setup()
    try:
        share = math.ceil(folders.counts["train"] / context.world)
        if share < 2:  # checked before anything is written
            raise DataError(
                f"--data {config.data}: each of the {context.world} processes gets {share} training image; "
                "BatchNorm needs at least 2 in a batch: add images or use fewer processes"
            )
        return _train(config, folders, start, context, on_epoch, stop_if_requested, label)
    finally:
        teardown(context)


def _write_epoch(
    config: FinetuneConfig,
    t: Training,
    p: Progress,
    epoch: int,
    improved: bool,
    eval_metrics: dict[str, float],
    folders: Folders,
    start: StartingPoint,
    writer: EpochWriter,
    curves: CurvesSchedule,
) -> None:
    """What the main process writes after an epoch: last (and best) weights with their
    manifest, the resume state, the summary and, when ``curves`` says so, the curves;
    copied now, written by ``writer`` while the next epoch trains."""
    from ..saving.file import manifest_of, write_weights

    out = Path(config.out)
    scored = t.ema.module if t.ema is not None else t.model
    training = {
        "source": str(config.checkpoint),
        "data": str(config.data),
        "classes": list(folders.classes),
        "epoch": epoch + 1,
        "epochs": config.epochs,
        "weights": "ema" if t.ema is not None else "model",
        "val": {k: round(v, 4) for k, v in eval_metrics.items()},
        "reinitialised": list(start.reinitialised),
        "data_config": {k: list(v) if isinstance(v, tuple) else v for k, v in t.cfg.items()},
        "args": config.to_dict(),
    }
    manifest = manifest_of(scored, training=training)
    state = {
        "epoch": epoch + 1,
        "num_updates": p.num_updates,
        "model": t.model.state_dict(),
        "optimizer": t.optimizer.state_dict(),
        "scheduler": t.scheduler.state_dict(),
        "history": p.history,
        "best_top1": p.best_top1,
        "best_epoch": p.best_epoch,
        "seed": config.seed,
    }
    if t.ema is not None:
        state["ema"] = t.ema.module.state_dict()
    if t.scaler is not None:
        state["scaler"] = t.scaler.state_dict()
    state = writer.snapshot(state)
    weights = state["ema"] if t.ema is not None else state["model"]
    draw = curves.due(len(p.history), last=epoch + 1 == config.epochs)
    if draw:
        curves.drawn(len(p.history))

    def write() -> None:
        write_weights(out / LAST, weights, manifest, force=True)
        if improved:  # the same bytes: copied, not serialised again
            write_atomic(out / BEST, lambda temporary: shutil.copyfile(out / LAST, temporary))
        save_state(out / RESUME, state)
        write_summary(state["history"], out / SUMMARY)
        if draw:
            _draw_curves(out, state["history"])

    writer.submit(write)


def _draw_curves_left(
    config: FinetuneConfig, p: Progress, writer: EpochWriter, curves: CurvesSchedule
) -> None:
    """A run that stops (a signal, an error) with epochs its curves do not show yet draws
    them before it ends; a failure to draw leaves the stop's own exception to go on."""
    if not curves.due(len(p.history), last=True):
        return
    out, history = Path(config.out), copy.deepcopy(p.history)
    curves.drawn(len(history))
    with contextlib.suppress(Exception):
        writer.submit(lambda: _draw_curves(out, history))


def _draw_curves(out: Path, history: list[dict[str, float]]) -> None:
    drawing.plot_curves({out.name or "run": history}, out / CURVES)


@contextlib.contextmanager
def _curves_drawn_on_stop(
    config: FinetuneConfig, p: Progress, writer: EpochWriter, curves: CurvesSchedule, main: bool
) -> Iterator[None]:
    try:
        yield
    except BaseException:
        if main:
            _draw_curves_left(config, p, writer, curves)
        raise


def _epoch(
    config: FinetuneConfig,
    t: Training,
    p: Progress,
    wrapped: nn.Module,
    epoch: int,
    label: str,
    context: Context,
    stop_if_requested: Callable[[], None],
    clock: RunClock,
    trackers: Trackers,
) -> dict[str, float]:
    """Train one epoch and evaluate: the epoch's summary row (``p.num_updates`` advanced)."""
    with epoch_progress(
        main=context.main,
        world=context.world,
        label=label,
        total=len(t.train_loader),
        interval=config.log_interval,
        lr=lambda: _base_lr(t.optimizer),
        first_update=p.num_updates,
        clock=clock,
        trackers=trackers,
    ) as advance:
        # Seeded once the bar is open: importing rich draws from ``random`` (rich.style), and
        # only a terminal gets a bar; nothing between here and the first batch depends on it.
        reseed(config, epoch, context.rank)
        t.sampler.set_epoch(epoch)

        def on_step(loss: float, images: int) -> None:
            advance(loss, images)
            stop_if_requested()

        train_metrics, p.num_updates = train_one_epoch(
            wrapped,
            t.train_loader,
            t.optimizer,
            context,
            scheduler=t.scheduler,
            num_updates=p.num_updates,
            precision=t.precision,
            scaler=t.scaler,
            clip_grad=config.clip_grad,
            ema=t.ema,
            channels_last=config.channels_last,
            on_step=on_step,
        )
    base_lr = _base_lr(t.optimizer)  # the epoch's last step's
    t.scheduler.step(epoch + 1)
    scored = t.ema.module if t.ema is not None else t.model
    eval_metrics = evaluate(
        scored, t.val_loader, context, precision=t.precision, channels_last=config.channels_last
    )
    return {
        "epoch": float(epoch + 1),  # numbered from 1, as the log and the manifest number them
        "train_loss": train_metrics["loss"],
        "train_gate": mean_gate(scored),
        **{f"eval_{k}": v for k, v in eval_metrics.items()},
        "lr": base_lr,
    }


def _base_lr(optimizer: Any) -> float:
    """The base learning rate of the step just taken (the new blocks run at attn_lr_scale x)."""
    group = optimizer.param_groups[0]
    return float(group["lr"] / group.get("lr_scale", 1.0))


def _tracked(row: dict[str, float]) -> dict[str, float]:
    """An epoch's summary row as the trackers name its figures."""
    names = {"train_loss": "train/epoch_loss", "train_gate": "train/gate"}
    return {names.get(k, k.replace("eval_", "eval/")): v for k, v in row.items()}


def _train(
    config: FinetuneConfig,
    folders: Folders,
    start: StartingPoint,
    context: Context,
    on_epoch: EpochHook | None = None,
    stop_if_requested: Callable[[], None] = lambda: None,
    label: RunLabel = UNLABELLED,
) -> RunResult:
    out = prepare_out(config, context)
    context.log(threads_line(config, context))
    t = build_training(config, folders, start, context)
    p = resumed(config, t, out, context)
    with tracking(config, label, context.main) as trackers:
        return _epochs(config, folders, start, context, on_epoch, stop_if_requested, t, p, trackers)


def _epochs(
    config: FinetuneConfig,
    folders: Folders,
    start: StartingPoint,
    context: Context,
    on_epoch: EpochHook | None,
    stop_if_requested: Callable[[], None],
    t: Training,
    p: Progress,
    trackers: Trackers,
) -> RunResult:
    """The epochs left to run, each trained, evaluated, written and logged."""
    out = Path(config.out)
    wrapped, frozen = None, None
    started = time.perf_counter()
    clock = RunClock(config.epochs - p.first_epoch)
    curves = CurvesSchedule()
    with epoch_writer() as writer, _curves_drawn_on_stop(config, p, writer, curves, context.main):
        for epoch in range(p.first_epoch, config.epochs):  # the last epoch's files written at the end
            epoch_began = time.perf_counter()
            want_frozen = epoch < config.frozen_epochs
            if want_frozen != frozen:
                freeze_base(t.model, want_frozen, head=True)
                frozen, wrapped = want_frozen, wrap(t.model, config, context)
            assert wrapped is not None
            label = f"epoch {epoch + 1}/{config.epochs}{' (base frozen)' if frozen else ''}"
            row = _epoch(config, t, p, wrapped, epoch, label, context, stop_if_requested, clock, trackers)
            p.history.append(row)
            improved = row["eval_top1"] > p.best_top1
            if improved:
                p.best_top1, p.best_epoch = row["eval_top1"], epoch
            context.log(
                f"{label}: train loss {row['train_loss']:.4f}, val loss {row['eval_loss']:.4f}, "
                f"top-1 {row['eval_top1']:.2f}, top-5 {row['eval_top5']:.2f}, lr {row['lr']:.3g}, "
                f"gate {row['train_gate']:.4f}{' (best)' if improved else ''}",
            )
            trackers.log(_tracked(row), p.num_updates)
            if context.main:
                metrics = {k[len("eval_") :]: v for k, v in row.items() if k.startswith("eval_")}
                _write_epoch(config, t, p, epoch, improved, metrics, folders, start, writer, curves)
            stop_if_requested()
            context.barrier()
            clock.epoch_done(time.perf_counter() - epoch_began)
            if on_epoch is not None:
                on_epoch(dict(row))
    context.log(
        f"done in {time.perf_counter() - started:.1f} s: best top-1 {p.best_top1:.2f} "
        f"at epoch {p.best_epoch + 1}; wrote {out}/{{{', '.join(OUTPUTS)}}}",
    )
    return RunResult(out, p.history, p.best_epoch, p.best_top1, start.reinitialised)
