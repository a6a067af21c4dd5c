"""Where a search stands, one line as each trial starts and ends::

    attn-inject search: trial 3 of 8 (study trial 2): se_resnet, seed 1: started; 0:02:10 elapsed, ...
    attn-inject search: trial 3 of 8 (study trial 2): se_resnet, seed 1: top-1 71.25 in 0:00:45; ...

``k of N``: N is the trials the search plans (grid: candidates x seeds, the baseline's
included; TPE: the baseline's trial and ``--n-trials``), k the trials finished or running
in the study, this one included (so every worker counts the others' too; a failed trial run
again counts once). Elapsed is this worker's time; the ETA is the trials left at the mean
length of the trials this worker finished, shared among the trials running now (one per
worker), and unknown until this worker has finished one.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from ..core.messages import cut
from ..core.values import is_int
from ..finetune.progress import duration

__all__ = ["TrialClock"]


@dataclass(frozen=True)
class _Started:
    began: float
    k: int
    what: str


class TrialClock:
    """Counts a worker's trials and says where the search stands (``say``: one line)."""

    def __init__(self, planned: int, say: Callable[[str], None]) -> None:
        self.planned = planned
        self.say = say
        self.began = time.monotonic()
        self.seconds: list[float] = []
        self.running: dict[int, _Started] = {}

    def _counts(self, study: Any) -> tuple[int, int]:
        """(trials finished, trials running) in the study; a failed trial that was run again
        is not counted (its retry is)."""
        trials = study.get_trials(deepcopy=False)
        retried = {n for n in (t.system_attrs.get("failed_trial") for t in trials) if is_int(n)}
        finished = sum(
            t.state.name in ("COMPLETE", "PRUNED", "FAIL") and t.number not in retried for t in trials
        )
        return finished, sum(t.state.name == "RUNNING" for t in trials)

    def _where(self, study: Any) -> str:
        finished, running = self._counts(study)
        elapsed = duration(time.monotonic() - self.began)
        if not self.seconds:
            return f"{elapsed} elapsed, ETA unknown until this worker ends a trial"
        left = max(self.planned - finished, 0)
        eta = sum(self.seconds) / len(self.seconds) * left / max(running, 1)
        return f"{elapsed} elapsed, ETA {duration(eta)}"

    def started(self, trial: Any, candidate: str, seeds: Sequence[int]) -> None:
        finished, running = self._counts(trial.study)
        k = finished + max(running, 1)
        shown_seeds = cut(", ".join(map(str, seeds)), 60)
        what = f"{cut(candidate, 120)}, seed{'s' if len(seeds) != 1 else ''} {shown_seeds}"
        self.running[trial.number] = _Started(time.monotonic(), k, what)
        self.say(f"{self._name(trial.number, k)}: {what}: started; {self._where(trial.study)}")

    def ended(self, study: Any, number: int, outcome: str) -> None:
        """``outcome``: "top-1 71.25", "pruned", "failed"."""
        start = self.running.pop(number, None)
        if start is None:  # refused before it started (a forged waiting trial)
            return
        took = time.monotonic() - start.began
        if outcome.startswith("top-1"):
            self.seconds.append(took)
        where = self._where(study)
        self.say(f"{self._name(number, start.k)}: {start.what}: {outcome} in {duration(took)}; {where}")

    def _name(self, number: int, k: int) -> str:
        return f"trial {k} of {max(self.planned, k)} (study trial {number})"
