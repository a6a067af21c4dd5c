"""``attn-inject finetune``: fine-tune a patched model on an ImageFolder, on one process or
under torchrun (DDP), with timm's optimizer, scheduler, EMA, data config and summary.

    checks (data, checkpoint, RUNDIR) ─ nothing written on failure
      └─ load (new head if --num-classes) ─ timm data config + transforms
           └─ epochs: [frozen: blocks + head] train ─ evaluate ─ rank 0 writes
                RUNDIR/args.yaml, summary.csv, curves.png, last/best.safetensors, resume.pth

Randomness is re-seeded from (seed, epoch, rank) at every epoch start, so a resumed run
replays exactly what an uninterrupted one would have done.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..core.errors import AttnInjectError
from ..core.files import write_atomic
from ..core.messages import cut, error_line, first_line, shown, shown_apart
from ..core.values import is_int, is_number
from .config import FinetuneConfig, SettingError
from .data import DataError, Folders, check_folders, data_config, image_folders
from .distributed import Context, setup, teardown
from .freeze import freeze_base
from .gates import mean_gate
from .groups import param_groups
from .loop import Precision, evaluate, train_one_epoch
from .progress import RunClock, epoch_progress
from .starting_point import StartingPoint, load_for_finetuning
from .trackers import UNLABELLED, RunLabel, Trackers, tracking

__all__ = ["OUTPUTS", "RunError", "RunResult", "run"]

ARGS, SUMMARY, CURVES, LAST, BEST, RESUME = (
    "args.yaml",
    "summary.csv",
    "curves.png",
    "last.safetensors",
    "best.safetensors",
    "resume.pth",
)
OUTPUTS = (ARGS, SUMMARY, CURVES, LAST, BEST, RESUME)


class RunError(AttnInjectError, ValueError):
    """The run cannot start: its output folder or resume state is not what it should be."""


@dataclass(frozen=True)
class RunResult:
    """What a finished run measured: the summary rows and the best epoch."""

    out: Path
    history: list[dict[str, float]]
    best_epoch: int
    best_top1: float
    reinitialised: tuple[str, ...]


# ---------------------------------------------------------------------------------------
# checks before anything is written


def check_out(config: FinetuneConfig) -> dict[str, Any] | None:
    """Refuse an output folder that is not one the run may write (one line, before anything
    is written); under ``--resume``, the checked resume state (else None)."""
    out = Path(config.out)
    if out.exists() and not out.is_dir():
        raise RunError(f"--out {out}: exists and is not a folder")
    found = [name for name in OUTPUTS if (out / name).exists()]
    if config.resume:
        if not (out / RESUME).is_file() or not (out / ARGS).is_file():
            raise RunError(f"--resume: {out} holds no run to resume (no {RESUME} and {ARGS})")
        from ..recipes.recipe import MAX_RECIPE_BYTES, RecipeError, read_yaml

        with open(out / ARGS, "rb") as f:
            raw = f.read(MAX_RECIPE_BYTES + 1)
        if len(raw) > MAX_RECIPE_BYTES:
            raise RunError(f"--resume: {out / ARGS} is over {MAX_RECIPE_BYTES} bytes; it is not this run's")
        try:
            saved = read_yaml(raw.decode("utf-8", "replace"), f"--resume: {out / ARGS}")
        except RecipeError as error:
            raise RunError(str(error)) from None
        if not isinstance(saved, dict):
            raise RunError(f"--resume: {out / ARGS} does not hold the run's settings")
        differ = config.differences(saved)
        if differ:
            now = config.to_dict()
            pairs = [(k, *shown_apart(saved.get(k), now[k], 60)) for k in differ]
            listed = ", ".join(f"{k}={was} in the run, {given} now" for k, was, given in pairs[:3])
            more = f" and {len(differ) - 3} more" if len(differ) > 3 else ""
            raise RunError(
                f"--resume: settings differ from the run in {out} ({listed}{more}); resume with the same ones"
                + (" (more --epochs extend the run)" if "epochs" in differ else "")
            )
        return load_state(out / RESUME, config.epochs)  # its fields too, before anything is written
    if found and not config.force:
        raise RunError(
            f"--out {out} holds the results of an earlier run ({', '.join(found)}); "
            "pass --resume to continue it or --force to start over"
        )
    return None


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


# ---------------------------------------------------------------------------------------
# writing


def write_summary(history: list[dict[str, float]], path: Path) -> None:
    """All rows so far, in timm's ``update_summary`` format, replacing ``path`` atomically."""
    from timm.utils import update_summary

    def write(tmp: Path) -> None:
        for i, row in enumerate(history):
            train = {k[len("train_") :]: v for k, v in row.items() if k.startswith("train_")}
            evaluation = {k[len("eval_") :]: v for k, v in row.items() if k.startswith("eval_")}
            update_summary(int(row["epoch"]), train, evaluation, str(tmp), lr=row["lr"], write_header=i == 0)

    write_atomic(path, write)


def save_state(path: Path, state: dict[str, Any]) -> None:
    write_atomic(path, lambda tmp: torch.save(state, tmp))


def _saved_epochs(out: Path) -> int:
    """The ``epochs`` an earlier run in ``out`` recorded (0 when there is none readable)."""
    from ..recipes.recipe import MAX_RECIPE_BYTES, RecipeError, read_yaml

    try:
        with open(out / ARGS, "rb") as f:
            saved = read_yaml(f.read(MAX_RECIPE_BYTES).decode("utf-8", "replace"), str(out / ARGS))
    except (OSError, RecipeError):
        return 0
    epochs = saved.get("epochs") if isinstance(saved, dict) else None
    return epochs if is_int(epochs) else 0


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


# ---------------------------------------------------------------------------------------
# the run


def _seed(config: FinetuneConfig, epoch: int, rank: int) -> None:
    value = config.seed + 1000 * epoch + rank
    random.seed(value)
    torch.manual_seed(value)
    with contextlib.suppress(ImportError):
        import numpy

        numpy.random.seed(value % 2**32)


def _loaders(config: FinetuneConfig, folders: Folders, model: nn.Module, context: Context):
    from torch.utils.data import DataLoader, DistributedSampler, Subset

    cfg = data_config(model, config.image_size)
    train, val = image_folders(folders, cfg, no_aug=config.no_aug, hflip=config.hflip, scale=config.scale)
    sampler: DistributedSampler = DistributedSampler(
        train, num_replicas=context.world, rank=context.rank, shuffle=True, seed=config.seed
    )
    pin = context.device.type == "cuda"
    # A last batch of one image stops BatchNorm in training: drop it, as timm's loader drops
    # an incomplete last batch.
    train_loader = DataLoader(
        train,
        batch_size=config.batch_size,
        sampler=sampler,
        num_workers=config.workers,
        pin_memory=pin,
        drop_last=len(sampler) % config.batch_size == 1,
    )
    # Each rank evaluates its own images (no padding, none twice); the sums are reduced.
    val_share = Subset(val, range(context.rank, len(val), context.world))
    val_loader = DataLoader(
        val_share, batch_size=config.batch_size, num_workers=config.workers, pin_memory=pin
    )
    return cfg, sampler, train_loader, val_loader


def _log(context: Context, text: str) -> None:
    if context.main:
        print(text, file=sys.stderr, flush=True)


def _wrap(model: nn.Module, config: FinetuneConfig, context: Context) -> nn.Module:
    """DDP around the model under torchrun (rebuilt whenever the trainable set changes),
    then torch.compile when asked."""
    wrapped = model
    if context.distributed:
        from torch.nn.parallel import DistributedDataParallel

        ids = [context.device.index] if context.device.type == "cuda" else None
        wrapped = DistributedDataParallel(model, device_ids=ids)
    if config.compile:
        wrapped = torch.compile(wrapped)  # type: ignore[assignment]
    return wrapped


def _check_optimizer(config: FinetuneConfig, model: nn.Module) -> None:
    """The optimizer name and the parameter groups, checked before anything is written."""
    from timm.optim import get_optimizer_info

    try:
        get_optimizer_info(config.opt.lower().split("_")[-1])
    except ValueError:
        raise SettingError(
            f"--opt {cut(config.opt, 60)}: not a timm optimizer; e.g. adamw, sgd, lamb, lion "
            "(timm.optim.list_optimizers() lists them)"
        ) from None
    param_groups(
        model,
        config.lr,
        weight_decay=config.weight_decay,
        attn_lr_scale=config.attn_lr_scale,
        layer_decay=config.layer_decay,
    )


class Stopped(KeyboardInterrupt):
    """The run was stopped by a signal (SIGTERM, SIGINT); its message says how to go on."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


@contextlib.contextmanager
def _stoppable(config: FinetuneConfig) -> Iterator[Callable[[], None]]:
    """SIGTERM and SIGINT end the run as an exception, so that no temporary file is left
    and the message says how to resume, or that nothing was saved when no epoch had ended
    (SIGTERM would otherwise kill the process as is).

    Yields ``stop_if_requested``, which the run calls after every step and epoch: a signal
    that lands in a finaliser (printed as "Exception ignored") or in a library that catches
    everything loses its exception, and the stop is raised again there."""

    def hint() -> str:
        """Read when the signal lands: ``--resume`` needs a resume state to continue from."""
        if (Path(config.out) / RESUME).is_file():
            return (
                "the last finished epoch is kept: continue with the same command and --resume "
                f"(--out {cut(config.out, 200)})"
            )
        return (
            "no epoch had ended, so nothing was saved to resume from; "
            "start again with the same command and --force"
        )

    received: list[Stopped] = []

    def on_term(signum: int, frame: Any) -> None:
        received.append(Stopped(f"stopped by SIGTERM; {hint()}", 143))
        raise received[-1]

    def stop_if_requested() -> None:
        if received:
            raise received[0]

    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, on_term) if main_thread else None
    try:
        yield stop_if_requested
    except Stopped:
        raise
    except KeyboardInterrupt:
        raise Stopped(f"interrupted (SIGINT); {hint()}", 130) from None
    except Exception:
        # the signal arrived in code that wraps what it raises (an import's class body
        # turns it into a RuntimeError): still the signal's stop, not an error
        if received:
            raise received[0] from None
        raise
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)


EpochHook = Callable[[dict[str, float]], None]


def run(
    config: FinetuneConfig,
    on_epoch: EpochHook | None = None,
    *,
    images_checked: bool = False,
    label: RunLabel = UNLABELLED,
) -> RunResult:
    """Fine-tune per ``config`` (see the module docstring); returns what was measured.
    ``on_epoch(row)`` is called with each epoch's summary row once its files are written
    (``attn-inject search`` reports it to its pruner, which may stop the run there).
    ``images_checked``: the caller decoded every image of ``config.data`` already (a search
    does once for all its trials); the folders' layout is still checked. ``label`` names
    the run in the trackers ``config`` asks for (:mod:`.trackers`)."""
    with _stoppable(config) as stop_if_requested, _threads(config):
        return _run(config, on_epoch, stop_if_requested, images_checked, label)


def default_threads(workers: int) -> tuple[int, int]:
    """(intra-op threads per process, cores): this process's share of the cores it may run
    on (torchrun's processes on one machine share them), less one for the data loader
    workers when there are any."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    share = max(1, cores // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))
    return max(1, share - (1 if workers > 0 and share > 1 else 0)), cores


def _count(n: int, noun: str, plural: str = "s") -> str:
    return f"{n} {noun}{plural if n != 1 else ''}"


@contextlib.contextmanager
def _threads(config: FinetuneConfig) -> Iterator[None]:
    """Run with the chosen intra-op threads; the caller's setting is put back afterwards."""
    previous = torch.get_num_threads()
    torch.set_num_threads(config.threads or default_threads(config.workers)[0])
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _threads_line(config: FinetuneConfig, context: Context) -> str:
    """The log's first line: how the run uses the machine's cores."""
    _, cores = default_threads(config.workers)
    threads, processes = torch.get_num_threads(), int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    workers = _count(config.workers, "data loader worker")
    where = f"{_count(processes, 'process', 'es')} on {_count(cores, 'core')}"
    threads_text = _count(threads, "intra-op thread")
    return f"finetune: {threads_text} and {workers} per process, {where} (--threads, --workers)"


def _run(
    config: FinetuneConfig,
    on_epoch: EpochHook | None = None,
    stop_if_requested: Callable[[], None] = lambda: None,
    images_checked: bool = False,
    label: RunLabel = UNLABELLED,
) -> RunResult:
    config.check()
    folders = check_folders(config.data, verify=not images_checked)
    resume_state = check_out(config)
    start = load_for_finetuning(config.checkpoint, config.num_classes)
    if start.num_classes != len(folders.classes):
        raise RunError(
            f"the model has {start.num_classes} classes, --data {config.data} has {len(folders.classes)}; "
            f"pass --num-classes {len(folders.classes)} to train a new classifier"
        )
    _check_optimizer(config, start.model)
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


def _prepare_out(config: FinetuneConfig, context: Context) -> Path:
    """RUNDIR made ready by the main process: a killed run's temporaries removed, old results
    removed under ``--force``, ``args.yaml`` written for a new or extended run."""
    import yaml

    out = Path(config.out)
    if context.main:
        out.mkdir(parents=True, exist_ok=True)
        for name in OUTPUTS:  # left by a run killed while writing (as convert cleans its own)
            for stale in out.glob(f".{name}.*.tmp*"):
                stale.unlink(missing_ok=True)
        if config.force and not config.resume:
            for name in OUTPUTS:
                (out / name).unlink(missing_ok=True)
        if not config.resume or config.epochs > _saved_epochs(out):  # a new run, or one extended
            text = yaml.safe_dump(config.to_dict(), sort_keys=False)
            write_atomic(out / ARGS, lambda tmp: tmp.write_text(text))
    context.barrier()
    return out


@dataclass
class _Training:
    """What trains: the model, its data, optimizer, schedule, EMA and precision."""

    model: nn.Module
    cfg: dict[str, Any]
    sampler: Any
    train_loader: Any
    val_loader: Any
    optimizer: Any
    scheduler: Any
    ema: Any
    precision: Precision
    scaler: Any


def _training(config: FinetuneConfig, folders: Folders, start: StartingPoint, context: Context) -> _Training:
    """The model on its device with timm's data config, optimizer (the param groups of
    :func:`param_groups`), cosine schedule, EMA and loss scaler, as ``config`` asks."""
    from timm.optim import create_optimizer_v2
    from timm.scheduler import create_scheduler_v2
    from timm.utils import ModelEmaV3, NativeScaler

    model = start.model.to(context.device)
    if start.reinitialised:
        _log(
            context,
            f"left at init (shape changed for {start.num_classes} classes): {', '.join(start.reinitialised)}",
        )
    if config.channels_last:
        model = model.to(memory_format=torch.channels_last)
    _seed(config, 0, context.rank)
    cfg, sampler, train_loader, val_loader = _loaders(config, folders, model, context)
    dtype = torch.float16 if config.amp_dtype == "float16" else torch.bfloat16
    scaler = NativeScaler(device=context.device.type) if config.amp and dtype == torch.float16 else None
    optimizer = create_optimizer_v2(
        model,
        config.opt,
        lr=config.lr,
        weight_decay=config.weight_decay,
        param_group_fn=lambda m: param_groups(
            m,
            config.lr,
            weight_decay=config.weight_decay,
            attn_lr_scale=config.attn_lr_scale,
            layer_decay=config.layer_decay,
        ),
    )
    scheduler, _ = create_scheduler_v2(
        optimizer,
        "cosine",
        num_epochs=config.epochs,
        warmup_epochs=config.warmup_epochs,
        warmup_lr=config.lr * 0.01,
        min_lr=config.lr * 0.01,
        step_on_epochs=False,
        updates_per_epoch=len(train_loader),
    )
    ema = ModelEmaV3(model, decay=config.model_ema_decay, use_warmup=True) if config.model_ema else None
    return _Training(
        model,
        cfg,
        sampler,
        train_loader,
        val_loader,
        optimizer,
        scheduler,
        ema,
        Precision(config.amp, dtype),
        scaler,
    )


@dataclass
class _Progress:
    """Where the run stands: the next epoch, the optimizer steps taken, the epochs' rows and
    the best one."""

    first_epoch: int = 0
    num_updates: int = 0
    history: list[dict[str, float]] = field(default_factory=list)
    best_top1: float = -math.inf
    best_epoch: int = -1


def _resumed(config: FinetuneConfig, t: _Training, out: Path, context: Context) -> _Progress:
    """The progress of a new run, or the saved state of the one ``--resume`` continues (its
    model, optimizer, schedule, EMA and scaler restored)."""
    if not config.resume:
        t.scheduler.step_update(num_updates=0)  # every group at its lr_scale from the first step
        return _Progress()
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
    progress = _Progress(
        int(state["epoch"]),
        int(state["num_updates"]),
        [dict(r) for r in state["history"]],
        float(state["best_top1"]),
        int(state["best_epoch"]),
    )
    _log(context, f"resuming {out} at epoch {progress.first_epoch + 1} of {config.epochs}")
    planned = int(t.scheduler.t_initial / max(len(t.train_loader), 1))  # the schedule's own length
    if config.epochs > planned:
        _log(
            context,
            f"extended from {planned} to {config.epochs} epochs: the cosine schedule runs its "
            f"{planned} epochs as planned, then holds its floor (min lr {config.lr * 0.01:g})",
        )
    return progress


def _write_epoch(
    config: FinetuneConfig,
    t: _Training,
    p: _Progress,
    epoch: int,
    improved: bool,
    eval_metrics: dict[str, float],
    folders: Folders,
    start: StartingPoint,
) -> None:
    """What the main process writes after an epoch: last (and best) weights with their
    manifest, the resume state, the summary and the curves."""
    from ..saving.file import save
    from .curves import plot_curves

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
    save(scored, out / LAST, force=True, training=training)
    if improved:
        save(scored, out / BEST, force=True, training=training)
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
    save_state(out / RESUME, state)
    write_summary(p.history, out / SUMMARY)
    plot_curves({out.name or "run": p.history}, out / CURVES)


def _epoch(
    config: FinetuneConfig,
    t: _Training,
    p: _Progress,
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
        _seed(config, epoch, context.rank)
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
    out = _prepare_out(config, context)
    _log(context, _threads_line(config, context))
    t = _training(config, folders, start, context)
    p = _resumed(config, t, out, context)
    with tracking(config, label, context.main) as trackers:
        return _epochs(config, folders, start, context, on_epoch, stop_if_requested, t, p, trackers)


def _epochs(
    config: FinetuneConfig,
    folders: Folders,
    start: StartingPoint,
    context: Context,
    on_epoch: EpochHook | None,
    stop_if_requested: Callable[[], None],
    t: _Training,
    p: _Progress,
    trackers: Trackers,
) -> RunResult:
    """The epochs left to run, each trained, evaluated, written and logged."""
    out = Path(config.out)
    wrapped, frozen = None, None
    started = time.perf_counter()
    clock = RunClock(config.epochs - p.first_epoch)
    for epoch in range(p.first_epoch, config.epochs):
        epoch_began = time.perf_counter()
        want_frozen = epoch < config.frozen_epochs
        if want_frozen != frozen:
            freeze_base(t.model, want_frozen, head=True)
            frozen, wrapped = want_frozen, _wrap(t.model, config, context)
        assert wrapped is not None
        label = f"epoch {epoch + 1}/{config.epochs}{' (base frozen)' if frozen else ''}"
        row = _epoch(config, t, p, wrapped, epoch, label, context, stop_if_requested, clock, trackers)
        p.history.append(row)
        improved = row["eval_top1"] > p.best_top1
        if improved:
            p.best_top1, p.best_epoch = row["eval_top1"], epoch
        _log(
            context,
            f"{label}: train loss {row['train_loss']:.4f}, val loss {row['eval_loss']:.4f}, "
            f"top-1 {row['eval_top1']:.2f}, top-5 {row['eval_top5']:.2f}, lr {row['lr']:.3g}, "
            f"gate {row['train_gate']:.4f}{' (best)' if improved else ''}",
        )
        trackers.log(_tracked(row), p.num_updates)
        if context.main:
            metrics = {k[len("eval_") :]: v for k, v in row.items() if k.startswith("eval_")}
            _write_epoch(config, t, p, epoch, improved, metrics, folders, start)
        stop_if_requested()
        context.barrier()
        clock.epoch_done(time.perf_counter() - epoch_began)
        if on_epoch is not None:
            on_epoch(dict(row))
    _log(
        context,
        f"done in {time.perf_counter() - started:.1f} s: best top-1 {p.best_top1:.2f} "
        f"at epoch {p.best_epoch + 1}; wrote {out}/{{{', '.join(OUTPUTS)}}}",
    )
    return RunResult(out, p.history, p.best_epoch, p.best_top1, start.reinitialised)
