"""The study's trials as the report reads them, each value checked first.

The study database is a file like any other: anyone who can write it can put any value in
any attribute. Nothing read from it is used before it is checked for type, range and length:
a trial that fails a check is left out of the report with one line saying why, its values
are never quoted uncut, and a trial's run folder is where this search puts it
(``StudyFiles.trial_folder``), never a path read from the study.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..core.messages import cut, shown
from ..core.values import is_int, is_number
from ..graph.analysis import FLOPS_PER_MAC
from .errors import SearchError
from .study_files import StudyFiles

__all__ = ["MAX_NAME", "MAX_SEEDS", "Outcome", "TrialRecord", "check_seeds", "read_trials"]

MAX_SEEDS = 1000  # seeds one trial may run (--repeats at most)
MAX_NAME = 200  # characters of a candidate's name
MAX_ADDED = 10**15  # parameters or multiply-adds a candidate's blocks may add


class Outcome(enum.Enum):
    """How a trial ended, as the report counts it."""

    COMPLETE = "COMPLETE"
    PRUNED = "PRUNED"
    FAIL = "FAIL"


@dataclass(frozen=True)
class TrialRecord:
    """One finished trial, every value checked."""

    number: int
    candidate: str
    outcome: Outcome
    seeds: tuple[int, ...]
    values: tuple[float, ...]  # final validation top-1 per seed (COMPLETE), else ()
    runs: tuple[Path, ...]  # the run folder per seed, where this search puts it
    params_added: int
    macs_added: int  # multiply-adds per image
    seconds_per_epoch: float  # NaN when not recorded


def check_seeds(value: Any, what: str) -> tuple[int, ...]:
    """``value`` as a trial's seeds: a list of 1 to MAX_SEEDS integers from 0 to 2**32 - 1."""
    from .study_files import MAX_SEED

    if not isinstance(value, (list, tuple)) or not 1 <= len(value) <= MAX_SEEDS:
        raise SearchError(f"{what} {shown(value)} is not allowed; a list of 1 to {MAX_SEEDS} seeds")
    for seed in value:
        if not is_int(seed) or not 0 <= seed <= MAX_SEED:
            raise SearchError(f"{what}: seed {shown(seed)} is not allowed; an integer 0 to {MAX_SEED}")
    return tuple(value)


def check_candidate(value: Any, known: Collection[str], what: str) -> str:
    """``value`` as a candidate's name: one of ``known``."""
    if not isinstance(value, str) or len(value) > MAX_NAME or value not in known:
        raise SearchError(f"{what} {shown(value)} is not one of this search's {len(known)} candidates")
    return value


def _count(attrs: dict[str, Any], key: str) -> int:
    value = attrs.get(key, 0)
    if not is_int(value) or not 0 <= value <= MAX_ADDED:
        raise SearchError(f"{key} {shown(value)} is not allowed; an integer 0 to {MAX_ADDED:.0e}")
    return value


def _macs(attrs: dict[str, Any]) -> int:
    """The multiply-adds a trial's blocks add: ``macs_added``, or in a study written before
    the figures were counted in MACs, its ``flops_added`` halved."""
    if "macs_added" not in attrs and "flops_added" in attrs:
        return _count(attrs, "flops_added") // FLOPS_PER_MAC
    return _count(attrs, "macs_added")


def _values(value: Any, n: int) -> tuple[float, ...]:
    if not isinstance(value, list) or len(value) != n:
        raise SearchError(f"values {shown(value)} is not allowed; one top-1 per seed ({n})")
    for v in value:
        if not is_number(v) or not 0 <= v <= 100:  # NaN fails both comparisons
            raise SearchError(f"value {shown(v)} is not allowed; a top-1 from 0 to 100")
    return tuple(float(v) for v in value)


def _seconds(value: Any) -> float:
    if value is None:
        return math.nan
    if not is_number(value) or not (math.isfinite(value) and value >= 0):
        raise SearchError(f"seconds_per_epoch {shown(value)} is not allowed; a finite number >= 0")
    return float(value)


def _record(trial: Any, study_files: StudyFiles, known: Collection[str]) -> TrialRecord:
    attrs = trial.user_attrs
    outcome = Outcome(trial.state.name)
    name = check_candidate(attrs.get("candidate"), known, "candidate")
    seeds = check_seeds(attrs.get("seeds"), "seeds")
    values = _values(attrs.get("values"), len(seeds)) if outcome is Outcome.COMPLETE else ()
    return TrialRecord(
        number=trial.number,
        candidate=name,
        outcome=outcome,
        seeds=seeds,
        values=values,
        runs=tuple(study_files.trial_folder(trial.number, s) / "run" for s in seeds),
        params_added=_count(attrs, "params_added"),
        macs_added=_macs(attrs),
        seconds_per_epoch=(
            _seconds(attrs.get("seconds_per_epoch")) if outcome is Outcome.COMPLETE else math.nan
        ),
    )


def read_trials(
    trials: Sequence[Any], study_files: StudyFiles, known: Collection[str]
) -> tuple[list[TrialRecord], list[str]]:
    """The finished trials (Optuna's ``FrozenTrial``) that pass every check, and a line for
    each that does not. A failed trial that was run again, or a sampled point that places no
    block (listed apart), is not a record; trials still waiting or running are not either."""
    failed = (t.system_attrs.get("failed_trial") for t in trials)
    retried = {number for number in failed if is_int(number)}  # a forged list is not hashable
    records, skipped = [], []
    for t in trials:
        if t.state.name not in Outcome.__members__:
            continue
        if t.state.name == "FAIL" and (t.number in retried or "skipped" in t.user_attrs):
            continue
        try:
            records.append(_record(t, study_files, known))
        except SearchError as error:
            skipped.append(f"trial {t.number}: {cut(str(error), 200)}; left out")
    return records, skipped
