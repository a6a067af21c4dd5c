"""The search's report: per candidate, validation top-1 over seeds with its 95% interval,
the difference from the baseline and whether it exceeds the noise, what the blocks add, and
the time per epoch. Written as ``leaderboard.md`` and ``.csv``, ``pareto.png`` (accuracy
against FLOPs added, the Pareto front marked) and ``best.safetensors``.

The interval is Student's t on the seeds' values (mean ± t(0.975, n-1) · s / √n). The
difference from the baseline is paired over the seeds both ran (a seed fixes the data order
and augmentation of every candidate alike), Welch's where they ran different seeds; it
exceeds the noise when its 95% interval leaves out zero. With one seed there is no interval,
and nothing is called beyond the noise.
"""

from __future__ import annotations

import csv
import io
import math
import shutil
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..files import write_atomic, write_text_atomic
from .candidates import BASELINE

__all__ = ["Row", "leaderboard", "t_quantile", "write_report"]

# t(0.975, df) for df = 1..30; beyond, the normal's 1.96 is within 2%.
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
         2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
         2.045, 2.042)  # fmt: skip


def t_quantile(df: float) -> float:
    """Student's t at 0.975 for ``df`` degrees of freedom (rounded down: conservative)."""
    if df < 1:
        return math.inf
    return _T975[int(df) - 1] if df < len(_T975) + 1 else 1.96


@dataclass
class Row:
    """One candidate's trials, summarised."""

    candidate: str
    values: list[float] = field(default_factory=list)  # final validation top-1, one per finished seed
    seeds: list[int] = field(default_factory=list)  # the seed of each value
    runs: list[tuple[float, str]] = field(default_factory=list)  # (top-1, run folder)
    pruned: int = 0
    failed: int = 0
    params_added: int = 0
    flops_added: int = 0
    seconds_per_epoch: list[float] = field(default_factory=list)

    @property
    def mean(self) -> float:
        return statistics.fmean(self.values) if self.values else math.nan

    @property
    def interval(self) -> float:
        """Half-width of the 95% interval of the mean (NaN with fewer than two values)."""
        n = len(self.values)
        return t_quantile(n - 1) * statistics.stdev(self.values) / math.sqrt(n) if n > 1 else math.nan

    def difference(self, baseline: Row) -> tuple[float, float]:
        """(mean - the baseline's mean, half-width of the 95% interval of it). Paired over the
        seeds both ran where there are two or more: a seed fixes the data order and the
        augmentation of every candidate's fine-tune alike, so the seed-to-seed swing, most of
        the noise, cancels. Welch's interval otherwise."""
        diff = self.mean - baseline.mean
        common = sorted(set(self.by_seed) & set(baseline.by_seed))
        if len(common) >= 2 and len(common) == len(self.by_seed) == len(baseline.by_seed):
            pairs = [self.by_seed[s] - baseline.by_seed[s] for s in common]
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

    @property
    def by_seed(self) -> dict[int, float]:
        """Each seed's top-1 (averaged where a candidate ran a seed more than once)."""
        seen: dict[int, list[float]] = {}
        for seed, value in zip(self.seeds, self.values, strict=True):
            seen.setdefault(seed, []).append(value)
        return {seed: statistics.fmean(v) for seed, v in seen.items()}


def leaderboard(trials: Sequence[Mapping]) -> list[Row]:
    """Rows from trial records (``candidate``, ``state``, ``values``, ``runs``, ``params_added``,
    ``flops_added``, ``seconds_per_epoch``), best mean first, the baseline included."""
    rows: dict[str, Row] = {}
    for t in trials:
        row = rows.setdefault(t["candidate"], Row(t["candidate"]))
        row.params_added = t.get("params_added", row.params_added)
        row.flops_added = t.get("flops_added", row.flops_added)
        if t["state"] == "COMPLETE":
            row.values += list(t["values"])
            row.seeds += list(t["seeds"])
            row.runs += list(zip(t["values"], t["runs"], strict=True))
            row.seconds_per_epoch.append(t["seconds_per_epoch"])
        elif t["state"] == "PRUNED":
            row.pruned += 1
        elif t["state"] == "FAIL":
            row.failed += 1
    return sorted(rows.values(), key=lambda r: (-r.mean if r.values else math.inf, r.candidate))


def _fmt(value: float, digits: int = 2) -> str:
    return "n/a" if math.isnan(value) else f"{value:.{digits}f}"


def table_rows(rows: Sequence[Row]) -> tuple[list[str], list[list[str]]]:
    baseline = next((r for r in rows if r.candidate == BASELINE.name), None)
    header = [
        "candidate", "seeds", "top-1 mean ± 95%", "Δ baseline ± 95%", "beyond noise",
        "params added", "FLOPs added", "s/epoch", "pruned", "failed",
    ]  # fmt: skip
    out = []
    for r in rows:
        if baseline is None or r is baseline or not r.values or not baseline.values:
            delta, beyond = "-", "-"
        else:
            diff, half = r.difference(baseline)
            delta = f"{diff:+.2f} ± {_fmt(half)}"
            beyond = "n/a" if math.isnan(half) else ("yes" if abs(diff) > half else "no")
        out.append(
            [
                r.candidate,
                str(len(r.values)),
                f"{_fmt(r.mean)} ± {_fmt(r.interval)}",
                delta,
                beyond,
                f"{r.params_added:,}",
                f"{r.flops_added / 1e6:.2f} M",
                _fmt(statistics.fmean(r.seconds_per_epoch), 1) if r.seconds_per_epoch else "n/a",
                str(r.pruned),
                str(r.failed),
            ]
        )
    return header, out


def _markdown(header: list[str], body: list[list[str]], notes: Sequence[str]) -> str:
    from ..tables import markdown_table

    return "\n".join(markdown_table(header, body)) + "\n" + "".join(f"\n{n}\n" for n in notes)


def _pareto(rows: Sequence[Row], path: Path) -> None:
    """Mean top-1 against FLOPs added, with the intervals; the front (no candidate both
    more accurate and cheaper) joined and labelled."""
    from matplotlib.figure import Figure

    done = [r for r in rows if r.values]
    front = [
        r
        for r in done
        if not any(o.mean >= r.mean and o.flops_added <= r.flops_added and o is not r and
                   (o.mean > r.mean or o.flops_added < r.flops_added) for o in done)
    ]  # fmt: skip
    figure = Figure(figsize=(7, 4.5), dpi=120)
    ax = figure.subplots()
    for r in done:
        on = r in front
        ax.errorbar(
            r.flops_added / 1e6,
            r.mean,
            yerr=None if math.isnan(r.interval) else r.interval,
            fmt="o",
            color="#c0392b" if on else "#7f8c8d",
            capsize=3,
        )
        ax.annotate(
            r.candidate, (r.flops_added / 1e6, r.mean), fontsize=7, xytext=(4, 3), textcoords="offset points"
        )
    line = sorted(front, key=lambda r: r.flops_added)
    ax.plot(
        [r.flops_added / 1e6 for r in line],
        [r.mean for r in line],
        "-",
        color="#c0392b",
        label="Pareto front",
    )
    ax.set_xlabel("FLOPs added per image (M)")
    ax.set_ylabel("validation top-1 (%), mean ± 95%")
    ax.legend(loc="lower right", fontsize=8)
    figure.tight_layout()
    write_atomic(path, lambda tmp: figure.savefig(tmp, format="png"))


def write_report(rows: Sequence[Row], out: Path, notes: Sequence[str] = ()) -> str:
    """Write leaderboard.md / .csv, pareto.png and best.safetensors into ``out``; returns the
    table as text."""
    from ..tables import render_table

    header, body = table_rows(rows)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["candidate", "seed_values", *header[1:]])
    for r, cells in zip(rows, body, strict=True):
        writer.writerow([r.candidate, " ".join(f"{v:.4f}" for v in r.values), *cells[1:]])
    write_text_atomic(out / "leaderboard.csv", buffer.getvalue())
    write_text_atomic(out / "leaderboard.md", "# Search leaderboard\n\n" + _markdown(header, body, notes))
    _pareto(rows, out / "pareto.png")
    best = next((r for r in rows if r.values), None)
    if best is not None:
        _, folder = max(best.runs, key=lambda run: run[0])  # ties: the earliest trial
        source = Path(folder) / "last.safetensors"
        write_atomic(out / "best.safetensors", lambda tmp: shutil.copyfile(source, tmp))
    return render_table(header, body) + "".join(f"\n{n}" for n in notes)
