"""The search's report: per candidate, validation top-1 over seeds with its 95% interval,
the difference from the baseline and whether it exceeds the noise, what the blocks add, and
the time per epoch. Written as ``leaderboard.md`` and ``.csv``, ``pareto.png`` (accuracy
against multiply-adds added, the Pareto front marked) and ``best.safetensors``.

The interval is Student's t on the seeds' values (mean ± t(0.975, n-1) · s / √n). The
difference from the baseline is paired over the seeds both ran (a seed fixes the data order
and augmentation of every candidate alike), Welch's where they ran different seeds; it
exceeds the noise when its 95% interval leaves out zero, both sides ran at least three seeds
and the interval has a width (two seeds, or differences all equal, say nothing of the noise:
"n/a"). The quantile is exact for fractional degrees of freedom (Welch's).

The report is built whole in memory from checked trial records (:mod:`.records`), then its
files are written together, each atomically: a failure leaves the previous report as it was.
"""

from __future__ import annotations

import contextlib
import csv
import io
import math
import shutil
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..core.deprecation import warn_renamed
from ..core.files import atomic_path
from ..core.messages import cut, first_line
from ..graph.analysis import FLOPS_PER_MAC
from .candidates import BASELINE
from .errors import SearchError
from .records import Outcome, TrialRecord
from .study_files import StudyFiles, link_or_kind

__all__ = [
    "CSV_COLUMNS",
    "Report",
    "Row",
    "leaderboard",
    "numeric_csv",
    "pareto_figure",
    "t_quantile",
    "t_quantile_exact",
    "write_report",
]

T_LEVEL = 0.975  # two-sided 95%
MIN_SEEDS_BEYOND_NOISE = 3  # seeds a side needs before a difference is called beyond the noise


def t_quantile(df: float) -> float:
    """Student's t at 0.975 for ``df`` degrees of freedom, fractional ``df`` (Welch's) kept, by
    :func:`t_quantile_exact` (it agrees with ``scipy.stats.t.ppf`` to 1e-9, in under a
    millisecond, without importing scipy). Infinite for ``df <= 0`` (no interval)."""
    if not df > 0:
        return math.inf
    return t_quantile_exact(df)


def _incomplete_beta(a: float, b: float, x: float) -> float:
    """The regularized incomplete beta function I_x(a, b), by its continued fraction
    (Lentz's method), on the side of ``x`` where it converges fast."""
    if x <= 0:
        return 0.0
    if x >= 1:
        return 1.0
    if x > (a + 1) / (a + b + 2):
        return 1.0 - _incomplete_beta(b, a, 1.0 - x)
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    f = d
    for m in range(1, 10_000):
        for numerator in (
            m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
            -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1)),
        ):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            f *= c * d
        if abs(c * d - 1.0) < 1e-15:
            break
    return math.exp(log_front) * f / a


def t_quantile_exact(df: float, level: float = T_LEVEL) -> float:
    """Student's t quantile at ``level`` (above 0.5) for ``df > 0`` degrees of freedom,
    without scipy: P(T > t) = I_{df/(df+t²)}(df/2, 1/2) / 2, solved for x = df/(df+t²) by
    bisection (I is increasing in x) to the last bit."""
    tail = 2 * (1 - level)
    low, high = 0.0, 1.0
    for _ in range(200):
        middle = (low + high) / 2
        if middle in (low, high):
            break
        if _incomplete_beta(df / 2, 0.5, middle) < tail:
            low = middle
        else:
            high = middle
    x = (low + high) / 2
    return math.sqrt(df * (1 - x) / x)


@dataclass
class Row:
    """One candidate's trials, summarised."""

    candidate: str
    values: list[float] = field(default_factory=list)  # final validation top-1, one per finished seed
    seeds: list[int] = field(default_factory=list)  # the seed of each value
    runs: list[tuple[float, Path]] = field(default_factory=list)  # (top-1, run folder)
    pruned: int = 0
    failed: int = 0
    params_added: int = 0
    macs_added: int = 0  # multiply-adds per image
    seconds_per_epoch: list[float] = field(default_factory=list)

    @property
    def flops_added(self) -> int:
        """Deprecated since 0.2.0: ``2 * macs_added`` (use :attr:`macs_added`)."""
        warn_renamed("Row.flops_added", "Row.macs_added (flops = 2 x macs)", "0.2.0")
        return FLOPS_PER_MAC * self.macs_added

    @property
    def mean(self) -> float:
        return statistics.fmean(self.values) if self.values else math.nan

    @property
    def interval(self) -> float:
        """Half-width of the 95% interval of the mean (NaN with fewer than two values)."""
        n = len(self.values)
        return t_quantile(n - 1) * statistics.stdev(self.values) / math.sqrt(n) if n > 1 else math.nan

    def _paired(self, baseline: Row) -> list[float] | None:
        """The differences per seed, where both ran the same two or more seeds."""
        common = sorted(set(self.by_seed) & set(baseline.by_seed))
        if len(common) >= 2 and len(common) == len(self.by_seed) == len(baseline.by_seed):
            return [self.by_seed[s] - baseline.by_seed[s] for s in common]
        return None

    def difference(self, baseline: Row) -> tuple[float, float]:
        """(mean - the baseline's mean, half-width of the 95% interval of it). Paired over the
        seeds both ran where there are two or more: a seed fixes the data order and the
        augmentation of every candidate's fine-tune alike, so the seed-to-seed swing, most of
        the noise, cancels. Welch's interval otherwise."""
        diff = self.mean - baseline.mean
        pairs = self._paired(baseline)
        if pairs is not None:
            return diff, t_quantile(len(pairs) - 1) * statistics.stdev(pairs) / math.sqrt(len(pairs))
        a, b = self.values, baseline.values
        if len(a) < 2 or len(b) < 2:
            return diff, math.nan
        va, vb = statistics.variance(a) / len(a), statistics.variance(b) / len(b)
        se = math.sqrt(va + vb)
        if se == 0:
            return diff, 0.0
        df = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
        return diff, t_quantile(df) * se

    def beyond_noise(self, baseline: Row) -> str:
        """ "yes" when the difference's 95% interval leaves out zero, "no" when it holds zero,
        "n/a" when it cannot tell: fewer than three seeds a side, or no spread at all."""
        pairs = self._paired(baseline)
        sides = (len(pairs),) if pairs is not None else (len(self.by_seed), len(baseline.by_seed))
        diff, half = self.difference(baseline)
        if min(sides) < MIN_SEEDS_BEYOND_NOISE or not half > 0 or not math.isfinite(half):
            return "n/a"
        return "yes" if abs(diff) > half else "no"

    @property
    def by_seed(self) -> dict[int, float]:
        """Each seed's top-1 (averaged where a candidate ran a seed more than once)."""
        seen: dict[int, list[float]] = {}
        for seed, value in zip(self.seeds, self.values, strict=True):
            seen.setdefault(seed, []).append(value)
        return {seed: statistics.fmean(v) for seed, v in seen.items()}


def leaderboard(records: Sequence[TrialRecord]) -> list[Row]:
    """Rows from checked trial records, best mean first, the baseline included."""
    rows: dict[str, Row] = {}
    for t in records:
        row = rows.setdefault(t.candidate, Row(t.candidate))
        row.params_added, row.macs_added = t.params_added, t.macs_added
        if t.outcome is Outcome.COMPLETE:
            row.values += t.values
            row.seeds += t.seeds
            row.runs += zip(t.values, t.runs, strict=True)
            if not math.isnan(t.seconds_per_epoch):
                row.seconds_per_epoch.append(t.seconds_per_epoch)
        elif t.outcome is Outcome.PRUNED:
            row.pruned += 1
        else:
            row.failed += 1
    return sorted(rows.values(), key=lambda r: (-r.mean if r.values else math.inf, r.candidate))


def _fmt(value: float, digits: int = 2) -> str:
    return "n/a" if math.isnan(value) else f"{value:.{digits}f}"


def table_rows(rows: Sequence[Row]) -> tuple[list[str], list[list[str]]]:
    baseline = next((r for r in rows if r.candidate == BASELINE.name), None)
    header = [
        "candidate", "seeds", "top-1 mean ± 95%", "Δ baseline ± 95%", "beyond noise",
        "params added", "MACs added", "s/epoch", "pruned", "failed",
    ]  # fmt: skip
    out = []
    for r in rows:
        if baseline is None or r is baseline or not r.values or not baseline.values:
            delta, beyond = "-", "-"
        else:
            diff, half = r.difference(baseline)
            delta, beyond = f"{diff:+.2f} ± {_fmt(half)}", r.beyond_noise(baseline)
        out.append(
            [
                r.candidate,
                str(len(r.values)),
                f"{_fmt(r.mean)} ± {_fmt(r.interval)}",
                delta,
                beyond,
                f"{r.params_added:,}",
                f"{r.macs_added / 1e6:.2f} M",
                _fmt(statistics.fmean(r.seconds_per_epoch), 1) if r.seconds_per_epoch else "n/a",
                str(r.pruned),
                str(r.failed),
            ]
        )
    return header, out


CSV_COLUMNS = (
    "candidate", "seeds", "seed_values", "top1_mean", "top1_ci95", "delta", "delta_ci95",
    "beyond_noise", "params_added", "macs_added", "s_per_epoch", "pruned", "failed",
)  # fmt: skip


def _number(value: float) -> str:
    """A figure as a CSV cell: the shortest text that reads back as the same float; an
    empty cell where there is none (NaN), which pandas and ``float`` readers take as missing."""
    return "" if math.isnan(value) else repr(float(value))


def numeric_csv(rows: Sequence[Row]) -> str:
    """The leaderboard as CSV, one column per figure (:data:`CSV_COLUMNS`), each cell a plain
    number: top-1 and its 95% half-width in %, the difference from the baseline and its
    half-width in points (empty for the baseline itself), parameters and multiply-adds added per
    image as integers, seconds per epoch. ``seed_values`` lists each seed's top-1,
    space-separated; ``beyond_noise`` is yes, no or n/a."""
    baseline = next((r for r in rows if r.candidate == BASELINE.name), None)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for r in rows:
        diff, half, beyond = math.nan, math.nan, ""
        if baseline is not None and r is not baseline and r.values and baseline.values:
            (diff, half), beyond = r.difference(baseline), r.beyond_noise(baseline)
        seconds = statistics.fmean(r.seconds_per_epoch) if r.seconds_per_epoch else math.nan
        writer.writerow(
            [
                r.candidate,
                len(r.values),
                " ".join(repr(v) for v in r.values),
                _number(r.mean),
                _number(r.interval),
                _number(diff),
                _number(half),
                beyond,
                r.params_added,
                r.macs_added,
                _number(seconds),
                r.pruned,
                r.failed,
            ]
        )
    return buffer.getvalue()


def _markdown(header: list[str], body: list[list[str]], notes: Sequence[str]) -> str:
    from ..core.tables import markdown_table

    return "\n".join(markdown_table(header, body)) + "\n" + "".join(f"\n{n}\n" for n in notes)


def _pareto(rows: Sequence[Row]) -> bytes:
    """:func:`pareto_figure` as a PNG, in memory."""
    buffer = io.BytesIO()
    pareto_figure(rows).savefig(buffer, format="png", bbox_inches="tight")  # the label column too
    return buffer.getvalue()


LABEL_POINTS = 7  # the labels' font size
LINE_INCHES = 1.5 * LABEL_POINTS / 72  # a label's slot in the column: 1.5 lines
MAX_LABEL = 60  # characters of a name drawn


def pareto_figure(rows: Sequence[Row]) -> Any:
    """Mean top-1 against multiply-adds (MACs) added, with the intervals; the front (no candidate both more
    accurate and cheaper) joined and drawn in red. A matplotlib ``Figure``.

    - **Labels never overlap**: they stand in a column right of the axes, one slot each,
      in the order of the points' heights, each joined to its point by a thin line (the
      figure grows taller when the slots need it). Names are drawn as plain text (no TeX,
      no mathtext), so a ``$`` in a name is a dollar sign, whatever the matplotlibrc says.
    - **The axes follow the data**: the y axis spans the means, and each interval as far as
      it stays within [0, 100] and within the means' span (at least 2 points) of them, then
      a margin; an interval that runs further (two seeds give t = 12.7) is cut at the edge,
      and a triangle marks the cut end."""
    import matplotlib

    with matplotlib.rc_context({"text.usetex": False, "text.parse_math": False}):
        return _draw_pareto(rows)


def _y_limits(done: Sequence[Row]) -> tuple[float, float]:
    means = [r.mean for r in done]
    low, high = min(means), max(means)
    span = max(high - low, 2.0)
    floor, ceiling = max(0.0, low - span), min(100.0, high + span)
    for r in done:
        if not math.isnan(r.interval):
            low = min(low, max(r.mean - r.interval, floor))
            high = max(high, min(r.mean + r.interval, ceiling))
    margin = 0.08 * max(high - low, 2.0)
    return low - margin, high + margin


def _slots(wanted: Sequence[float], gap: float) -> list[float]:
    """Heights (axes fraction) for labels that want ``wanted`` (highest first): each at
    least ``gap`` below the one above, the column moved up where it runs below 0 and kept
    under 1 where it fits."""
    placed: list[float] = []
    for y in wanted:
        placed.append(min(y, placed[-1] - gap) if placed else min(y, 1.0))
    if placed and placed[-1] < 0:
        shift = -placed[-1]
        placed = [y + shift for y in placed]
    return placed


def _draw_pareto(rows: Sequence[Row]) -> Any:
    from matplotlib.figure import Figure

    done = [r for r in rows if r.values]
    front = [
        r
        for r in done
        if not any(o.mean >= r.mean and o.macs_added <= r.macs_added and o is not r and
                   (o.mean > r.mean or o.macs_added < r.macs_added) for o in done)
    ]  # fmt: skip
    plain: dict[str, Any] = {"usetex": False, "parse_math": False}
    top, bottom = 0.92, 0.13  # of the figure's height: the axes
    height = max(4.5, (len(done) * LINE_INCHES + 0.3) / (top - bottom))
    figure = Figure(figsize=(9, height), dpi=120)
    figure.subplots_adjust(left=0.09, right=0.66, top=top, bottom=bottom)
    ax = figure.subplots()
    if not done:
        return figure
    low, high = _y_limits(done)
    ax.set_ylim(low, high)
    for r in done:
        color = "#c0392b" if r in front else "#7f8c8d"
        x = r.macs_added / 1e6
        half = 0.0 if math.isnan(r.interval) else r.interval
        below, above = min(half, max(r.mean - low, 0.0)), min(half, max(high - r.mean, 0.0))
        ax.errorbar(x, r.mean, yerr=[[below], [above]] if half else None, fmt="o", color=color, capsize=3)
        for cut_end, edge, marker in ((below < half, low, "v"), (above < half, high, "^")):
            if cut_end:
                ax.plot([x], [edge], marker=marker, color=color, markersize=5, clip_on=False)
    line = sorted(front, key=lambda r: r.macs_added)
    ax.plot(
        [r.macs_added / 1e6 for r in line],
        [r.mean for r in line],
        "-",
        color="#c0392b",
        label="Pareto front",
    )
    gap = LINE_INCHES / (height * (top - bottom))
    order = sorted(done, key=lambda r: (-r.mean, r.macs_added, r.candidate))
    wanted = [(r.mean - low) / (high - low) for r in order]
    for r, y in zip(order, _slots(wanted, gap), strict=True):
        ax.annotate(
            cut(r.candidate, MAX_LABEL),
            (r.macs_added / 1e6, r.mean),
            xytext=(1.03, y),
            textcoords="axes fraction",
            va="center",
            fontsize=LABEL_POINTS,
            color="#c0392b" if r in front else "#333333",
            arrowprops={"arrowstyle": "-", "color": "#bbbbbb", "lw": 0.6, "shrinkA": 0, "shrinkB": 3},
            annotation_clip=False,
            **plain,
        )
    ax.set_xlabel("MACs added per image (M)", **plain)
    ax.set_ylabel("validation top-1 (%), mean ± 95%", **plain)
    ax.legend(loc="lower right", fontsize=8)
    return figure


@dataclass(frozen=True)
class Report:
    """What :func:`write_report` wrote: the table as text, the files, and the notes (one line
    each) under the table."""

    table: str
    files: tuple[Path, ...]
    notes: tuple[str, ...]


def _best_run(rows: Sequence[Row], study_files: StudyFiles) -> tuple[Path | None, str | None]:
    """The file of the best candidate's best seed (ties: the earliest trial), or None and a
    line saying why there is none here."""
    from ..saving.file import check_file

    best = next((r for r in rows if r.values), None)
    if best is None:
        return None, "best.safetensors: no finished trial"
    top1, folder = max(best.runs, key=lambda run: run[0])
    try:
        source = study_files.inside(folder / "last.safetensors", "the best run's file")
    except Exception as error:
        return None, f"best.safetensors not written: {error}"
    if not source.is_file():
        return None, (
            f"best.safetensors not written: {best.candidate}'s best run ({top1:.2f}) has no "
            f"{folder.name}/last.safetensors here (another machine's run folder, or removed)"
        )
    try:  # a file like any other in the run folder: its manifest and every tensor's shape
        check_file(source)  # against the model it names, so its size is that model's
    except Exception as error:
        return None, (
            f"best.safetensors not written: {best.candidate}'s best run ({top1:.2f}): "
            f"{folder.name}/last.safetensors is not a file attn-inject wrote: {cut(first_line(error), 200)}"
        )
    return source, None


def _check_targets(paths: Sequence[Path]) -> None:
    """Each of the report's files absent or a regular file (not a folder, a link, a FIFO), so
    that renaming the new ones into place cannot fail half-way for what is there."""
    for path in paths:
        kind = link_or_kind(path, "a regular file")
        if kind is not None:
            raise SearchError(
                f"{path}: {kind}; the report's files (leaderboard.md, leaderboard.csv, pareto.png, "
                "best.safetensors) must be regular files or absent: move it away; nothing was written"
            )


def write_report(
    rows: Sequence[Row], study_files: StudyFiles, notes: Sequence[str] = (), about: Sequence[str] = ()
) -> Report:
    """Write leaderboard.md / .csv, pareto.png and best.safetensors into the study's folder,
    all built first and written together; a best run whose file is not here leaves no
    best.safetensors (an older one is removed) and a note. ``about``: lines above the
    Markdown table (what was searched, on which data)."""
    from ..core.tables import render_table

    best, why = _best_run(rows, study_files)
    notes = [*notes, *([why] if why else [])]
    header, body = table_rows(rows)
    title = "# Search leaderboard\n\n" + "".join(f"{line}\n\n" for line in about)
    texts = {
        study_files.leaderboard_csv: numeric_csv(rows).encode(),
        study_files.leaderboard_md: (title + _markdown(header, body, notes)).encode(),
        study_files.pareto: _pareto(rows),
    }
    _check_targets([*texts, study_files.best])
    study_files.folder.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack:  # every file renamed into place when all are written
        for path, data in texts.items():
            stack.enter_context(atomic_path(path)).write_bytes(data)
        if best is not None:
            shutil.copyfile(best, stack.enter_context(atomic_path(study_files.best)))
    if best is None:
        study_files.best.unlink(missing_ok=True)
    files = (*texts, *([study_files.best] if best is not None else []))
    return Report(render_table(header, body) + "".join(f"\n{n}" for n in notes), files, tuple(notes))
