"""What a fine-tune shows while an epoch runs: a rich progress bar on a terminal; in a pipe
or a file, a line every ``--log-interval`` optimizer steps, as timm's ``train.py`` prints
one per log interval::

    epoch 2/5 [ 40/120  33%] loss 0.4127 (0.4410), lr 9.51e-04, 812.4 images/s, ETA 0:01:05 epoch, 0:06:12 run

``loss`` is the interval's mean (the epoch's so far in brackets), ``lr`` the base learning
rate (the new blocks run at ``--attn-lr-scale`` times it), ``images/s`` the interval's
throughput over every process, ETA the epoch's rest and the run's (the epochs left at the
measured length of an epoch, its evaluation included). The same figures go to the
trackers (:mod:`.trackers`) at every interval, on the terminal too. Only the main process
shows or logs anything.
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from .trackers import Trackers

__all__ = ["RunClock", "duration", "epoch_progress"]

StepHook = Callable[[float, int], None]  # (loss, images on this process)


def duration(seconds: float) -> str:
    """``h:mm:ss`` (``?`` when not known)."""
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    whole = round(seconds)
    return f"{whole // 3600}:{whole % 3600 // 60:02d}:{whole % 60:02d}"


@dataclass
class RunClock:
    """The run's timing: how long each finished epoch took (training and evaluation), in
    this process; the epochs still to run after the current one."""

    epochs_left: int
    epoch_seconds: list[float] = field(default_factory=list)

    def run_eta(self, epoch_eta: float, epoch_estimate: float) -> float:
        """The current epoch's rest plus the epochs after it, at the mean measured epoch
        (``epoch_estimate`` before one has ended)."""
        seconds = self.epoch_seconds
        per_epoch = sum(seconds) / len(seconds) if seconds else epoch_estimate
        return epoch_eta + max(self.epochs_left - 1, 0) * per_epoch

    def epoch_done(self, seconds: float) -> None:
        self.epoch_seconds.append(seconds)
        self.epochs_left -= 1


@dataclass
class _Interval:
    """The figures of the steps since the last line, and of the epoch so far."""

    steps: int = 0
    loss: float = 0.0
    images: int = 0
    began: float = field(default_factory=time.perf_counter)
    epoch_loss: float = 0.0
    epoch_steps: int = 0


@contextlib.contextmanager
def epoch_progress(
    *,
    main: bool,
    world: int,
    label: str,
    total: int,
    interval: int,
    lr: Callable[[], float],
    first_update: int,
    clock: RunClock,
    trackers: Trackers,
) -> Iterator[StepHook]:
    """The step hook of one epoch of ``total`` steps: a bar on a terminal, a line every
    ``interval`` steps (and at the epoch's last) elsewhere; the trackers get the same
    figures at every interval, at the optimizer step ``first_update + steps``."""
    if not main:
        yield lambda loss, images: None
        return
    began = time.perf_counter()
    now = _Interval()
    with _bar(label, total) as advance:

        def on_step(loss: float, images: int) -> None:
            now.steps += 1
            now.epoch_steps += 1
            now.loss += loss
            now.epoch_loss += loss
            now.images += images * world
            done = now.epoch_steps
            if done % interval and done != total:
                advance(loss, None)
                return
            elapsed = time.perf_counter() - now.began
            rate = now.images / elapsed if elapsed > 0 else math.nan
            advance(loss, rate)
            per_step = (time.perf_counter() - began) / done
            epoch_eta = per_step * (total - done)
            run_eta = clock.run_eta(epoch_eta, per_step * total)
            mean, epoch_mean = now.loss / now.steps, now.epoch_loss / done
            if advance.plain:
                print(
                    f"{label} [{done:>{len(str(total))}}/{total} {100 * done / total:3.0f}%] "
                    f"loss {mean:.4f} ({epoch_mean:.4f}), lr {lr():.2e}, {rate:.1f} images/s, "
                    f"ETA {duration(epoch_eta)} epoch, {duration(run_eta)} run",
                    file=sys.stderr,
                    flush=True,
                )
            if trackers:
                trackers.log(
                    {"train/loss": mean, "train/lr": lr(), "train/images_per_s": rate}, first_update + done
                )
            now.steps, now.loss, now.images, now.began = 0, 0.0, 0, time.perf_counter()

        yield on_step


class _Advance:
    """Moves the bar on (on a terminal); ``plain`` when there is none and lines are printed."""

    def __init__(self, update: Callable[[float, float | None], None] | None) -> None:
        self.update = update
        self.plain = update is None

    def __call__(self, loss: float, rate: float | None) -> None:
        if self.update is not None:
            self.update(loss, rate)


@contextlib.contextmanager
def _bar(label: str, total: int) -> Iterator[_Advance]:
    """A rich progress bar on a terminal (loss, images/s, time left); nothing otherwise."""
    if not sys.stderr.isatty():
        yield _Advance(None)
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        TextColumn("loss {task.fields[loss]:.4f}, {task.fields[rate]:.1f} images/s"),
    )
    with Progress(*columns, transient=True) as progress:
        task = progress.add_task(label, total=total, loss=math.nan, rate=math.nan)

        def update(loss: float, rate: float | None) -> None:
            if rate is None:
                progress.update(task, advance=1, loss=loss)
            else:
                progress.update(task, advance=1, loss=loss, rate=rate)

        yield _Advance(update)
