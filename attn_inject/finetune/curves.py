"""Training curves drawn with matplotlib: loss, accuracy and the mean blend gate per epoch,
from the rows of ``summary.csv`` (timm's ``update_summary`` columns). Several runs can share
one figure (one colour per run)::

    >>> plot_curves({"identity": read_summary("runs/a/summary.csv")}, "runs/a/curves.png")
"""

from __future__ import annotations

import csv
import math
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..core.files import write_atomic

__all__ = ["CURVES_EVERY_S", "CurvesSchedule", "plot_curves", "read_summary"]

CURVES_EVERY_S = 60.0  # a run redraws its curves after an epoch at most this often, and at its end


@dataclass
class CurvesSchedule:
    """When a run draws ``curves.png``: after an epoch when ``every_s`` seconds have passed
    since the run began or since the last drawing, after its last epoch, and when it stops
    with epochs not drawn yet. Drawing takes a third of a second of matplotlib: on short
    epochs, drawing after every one would cost more than the epoch."""

    every_s: float = CURVES_EVERY_S
    drawn_rows: int = 0
    drawn_at: float = field(default_factory=lambda: time.monotonic())

    def due(self, rows: int, last: bool) -> bool:
        """Whether to draw the ``rows`` epochs so far (``last``: the run's final epoch)."""
        return rows > self.drawn_rows and (last or time.monotonic() - self.drawn_at >= self.every_s)

    def drawn(self, rows: int) -> None:
        self.drawn_rows, self.drawn_at = rows, time.monotonic()


def read_summary(path: str | os.PathLike) -> list[dict[str, float]]:
    """The rows of a ``summary.csv``, numbers as floats (empty cells as NaN)."""
    with open(path, newline="") as f:
        return [
            {k: float(v) if v not in ("", None) else math.nan for k, v in row.items()}
            for row in csv.DictReader(f)
        ]


def _column(rows: Sequence[Mapping[str, float]], key: str) -> list[float]:
    return [float(r.get(key, math.nan)) for r in rows]


def plot_curves(
    runs: Mapping[str, Sequence[Mapping[str, float]]],
    path: str | os.PathLike,
    *,
    baseline_top1: float | None = None,
) -> None:
    """Draw ``runs`` (label -> summary rows) to ``path`` (PNG or SVG), written atomically;
    ``baseline_top1`` adds a reference line to the accuracy panel."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(12, 3.6), dpi=120)
    figure.subplots_adjust(left=0.05, right=0.99, bottom=0.14, top=0.9, wspace=0.2)
    loss, accuracy, gate = figure.subplots(1, 3)
    colours = [f"C{i}" for i in range(10)]
    for i, (label, rows) in enumerate(runs.items()):
        colour = colours[i % len(colours)]
        prefix = f"{label}: " if len(runs) > 1 else ""
        epochs = [int(e) for e in _column(rows, "epoch")]
        loss.plot(epochs, _column(rows, "train_loss"), "--", color=colour, label=f"{prefix}train")
        loss.plot(epochs, _column(rows, "eval_loss"), "-o", color=colour, ms=3, label=f"{prefix}val")
        accuracy.plot(epochs, _column(rows, "eval_top1"), "-o", color=colour, ms=3, label=f"{prefix}top-1")
        accuracy.plot(epochs, _column(rows, "eval_top5"), ":", color=colour, label=f"{prefix}top-5")
        gates = _column(rows, "train_gate")
        if any(not math.isnan(g) for g in gates):
            gate.plot(epochs, gates, "-o", color=colour, ms=3, label=label)
    if baseline_top1 is not None:
        accuracy.axhline(baseline_top1, color="0.4", linewidth=1, linestyle="-.", label="baseline top-1")
    loss.set(title="loss", xlabel="epoch")
    accuracy.set(title="val accuracy (%)", xlabel="epoch")
    gate.set(title="mean blend gate (0 = identity, 1 = paper block)", xlabel="epoch")
    gate.title.set_fontsize(9)
    epochs_drawn = [
        int(r["epoch"]) for rows in runs.values() for r in rows if not math.isnan(r.get("epoch", math.nan))
    ]
    for axes in (loss, accuracy, gate):
        axes.grid(alpha=0.3)
        if epochs_drawn:  # whole epochs on the axis, a single one included
            axes.set_xlim(min(epochs_drawn) - 0.5, max(epochs_drawn) + 0.5)
        axes.xaxis.get_major_locator().set_params(integer=True)
        if axes.get_legend_handles_labels()[0]:
            axes.legend(fontsize=8)
    if not gate.get_lines():
        gate.text(0.5, 0.5, "no blend gates (init=paper)", ha="center", va="center", transform=gate.transAxes)
    target = Path(path)
    png = target.suffix.lower() == ".png"
    options: dict[str, Any] = (
        {"metadata": {"Software": None}, "pil_kwargs": {"compress_level": 1}} if png else {}
    )
    write_atomic(target, lambda tmp: figure.savefig(tmp, **options), suffix=target.suffix)
