"""``attn-inject search``: which attention, where, on the user's data.

checks (base, data, candidates planned on the base) ─ nothing written on failure
  └─ the Optuna study (created, or the same search continued)
       └─ trials: convert with the candidate ─ fine-tune (``finetune.run``) ─ per-epoch
          top-1 to the pruner ─ trials/NNNN-seedS/{start.safetensors, run/} (study_files.py)
            └─ the leaderboard, once no trial is left, from the checked trials (records.py,
               leaderboard.py)
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import statistics
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..core.messages import cut, first_line, shown
from ..finetune.config import RESUME_FREE, FinetuneConfig
from ..finetune.data import Folders, check_folders
from ..finetune.trackers import RunLabel
from ..planning.match import plan
from .candidates import BASELINE, Candidate
from .database import check_default_storage, naming
from .errors import SearchError
from .leaderboard import Row, leaderboard, write_report
from .progress import TrialClock
from .records import MAX_SEEDS, check_candidate, check_seeds, read_trials
from .space import point_candidate
from .study import (
    PRUNERS,
    SAMPLERS,
    Pruner,
    Sampler,
    StudySpec,
    import_optuna,
    open_study,
    safe_url,
    say,
    work,
)
from .study_files import DEFAULT_STUDY, StudyFiles
from .trial import Base, run_trial

__all__ = ["SearchConfig", "SearchResult", "search"]


@dataclass(frozen=True)
class SearchConfig:
    """A search: the base, the data, the candidates and how to run them."""

    base: Base
    base_identity: str  # what the base is: its file's hash, or its name and weights' hash
    candidates: tuple[Candidate, ...]  # without the baseline
    template: FinetuneConfig  # the fine-tune every trial runs (checkpoint, out and seed are set per trial)
    out: str
    repeats: int = 3
    sampler: str = "grid"
    pruner: str = "none"
    n_trials: int | None = None  # TPE: trials besides the baseline
    timeout: float | None = None
    storage: str | None = None  # default: sqlite:///OUT/study.db
    study: str = DEFAULT_STUDY  # its trials and report go to OUT (the default) or OUT/NAME
    heartbeat: int = 60
    space: Mapping[str, list[Any]] | None = None  # TPE: each dimension's values
    invalid: tuple[str, ...] = ()  # points of the space that are not valid recipes


@dataclass(frozen=True)
class SearchResult:
    rows: list[Row]
    table: str
    out: Path  # the study's folder: OUT, or OUT/NAME for --study NAME
    ran: int  # trials this process ran
    files: tuple[Path, ...] = ()  # the report's files written


def _check(config: SearchConfig) -> None:
    import_optuna()  # missing: one line naming the extra, before anything is written
    if not 1 <= config.repeats <= MAX_SEEDS:
        raise SearchError(f"--repeats must be from 1 to {MAX_SEEDS}, got {config.repeats}")
    StudyFiles.of(config.out, config.study)  # the study's name checked
    if config.sampler not in SAMPLERS:
        raise SearchError(f"--sampler {config.sampler!r} is not allowed; allowed: {', '.join(SAMPLERS)}")
    if config.pruner not in PRUNERS:
        raise SearchError(f"--pruner {config.pruner!r} is not allowed; allowed: {', '.join(PRUNERS)}")
    if config.sampler == Sampler.TPE and (config.space is None or not config.n_trials or config.n_trials < 1):
        raise SearchError("--sampler tpe searches a --space and needs --n-trials (at least 1)")
    if config.timeout is not None and not config.timeout > 0:
        raise SearchError(f"--timeout must be positive seconds, got {config.timeout}")
    if config.heartbeat < 1:
        raise SearchError(f"--heartbeat must be at least 1 second, got {config.heartbeat}")
    out = Path(config.out)
    if out.exists() and not out.is_dir():
        raise SearchError(f"--out {out}: exists and is not a folder")
    config.template.check()


def _data_identity(root: str) -> str:
    """A hash of the data folder's file names and sizes (what the study was made on)."""
    digest = hashlib.sha256()
    for split in ("train", "val"):
        for folder, dirs, files in sorted(os.walk(Path(root) / split, followlinks=True)):
            dirs.sort()
            for name in sorted(files):
                path = Path(folder) / name
                digest.update(f"{path.relative_to(root)}:{path.stat().st_size}\n".encode())
    return digest.hexdigest()[:16]


@dataclass(frozen=True)
class _Planned:
    candidate: Candidate
    params_added: int
    macs_added: int


def _plan_candidates(config: SearchConfig) -> tuple[list[_Planned], list[str]]:
    """Each candidate planned on the base: the ones that place a block, and why the others
    do not (one line each)."""
    model = config.base.build()
    kept, skipped = [], []
    for candidate in config.candidates:
        try:
            result = plan(model, (candidate.recipe or "") + "\n", input_size=config.base.input_size)
        except Exception as error:
            skipped.append(f"{candidate.name}: {first_line(error) or type(error).__name__}")
            continue
        if not len(result):
            skipped.append(f"{candidate.name}: places no block ({result.empty_reason or 'nothing matches'})")
            continue
        kept.append(_Planned(candidate, result.params_added, result.macs_added))
    return kept, skipped


def _about(folders: Folders) -> dict[str, Any]:
    """What the study records of its data beside the hash: where it was, its classes and
    images per split (not checked when the study is continued: a moved folder is the same
    data)."""
    return {
        "data_path": str(folders.root.resolve()),
        "data_classes": list(folders.classes[:MAX_CLASSES_RECORDED]),
        "data_class_count": len(folders.classes),
        "data_images": {split: int(n) for split, n in folders.counts.items()},
    }


MAX_CLASSES_RECORDED = 100  # class names a study records (the count is whole)


def _about_lines(config: SearchConfig, folders: Folders, identity: Mapping[str, Any]) -> list[str]:
    """The lines above the leaderboard: the base model and the data, as this search saw them."""
    classes = folders.classes
    names = ", ".join(classes[:10]) + (f", ... ({len(classes) - 10} more)" if len(classes) > 10 else "")
    counts = folders.counts
    return [
        f"Base: {cut(config.base_identity, 200)}.",
        f"Data: {cut(str(folders.root.resolve()), 200)}: {len(classes)} classes ({cut(names, 300)}), "
        f"{counts.get('train', 0):,} training and {counts.get('val', 0):,} validation images; "
        f"file names and sizes hash {identity['data']}.",
        f"Fine-tune: {config.template.epochs} epochs, seeds {cut(', '.join(map(str, _seeds(config))), 200)}; "
        "top-1: validation top-1 (%) after the last epoch.",
    ]


def _seeds(config: SearchConfig) -> list[int]:
    return [config.template.seed + k for k in range(config.repeats)]


def _identity(config: SearchConfig, planned: Sequence[_Planned]) -> dict[str, Any]:
    per_trial = (*RESUME_FREE, "checkpoint", "seed", "data")  # set per trial, or not computed
    template = {k: v for k, v in sorted(config.template.to_dict().items()) if k not in per_trial}
    recipes = {
        p.candidate.name: hashlib.sha256((p.candidate.recipe or "").encode()).hexdigest()[:12]
        for p in planned
    }
    return {
        "base": config.base_identity,
        "data": _data_identity(config.template.data),
        "candidates": (
            recipes if config.sampler == Sampler.GRID else sorted(map(str, (config.space or {}).items()))
        ),
        "fine-tune": template,
        "seeds": config.repeats,
        "sampler": config.sampler,
    }


class _Objective:
    """What one trial does: its candidate over its seeds, each a convert and a fine-tune."""

    def __init__(
        self,
        config: SearchConfig,
        planned: Sequence[_Planned],
        seeds: Sequence[int],
        study_files: StudyFiles,
        clock: TrialClock,
    ) -> None:
        self.config = config
        self.study_files = study_files
        self.clock = clock
        self.by_name = {BASELINE.name: _Planned(BASELINE, 0, 0), **{p.candidate.name: p for p in planned}}
        self.names = list(self.by_name)  # the grid's choices, in the order the study records them
        self.seeds = list(seeds)

    def _sampled(self, trial: Any) -> _Planned:
        """A TPE trial's point, dimension by dimension; its candidate planned on the base."""
        space = self.config.space or {}
        values = {}
        for dim, choices in space.items():
            picked = trial.suggest_categorical(dim, [str(v) for v in choices])  # a fixed one too
            found = [v for v in choices if str(v) == picked]
            if not found:  # enqueued with a value the space does not hold
                raise SearchError(f"trial {trial.number}: {dim} {shown(picked)} is not a value of the space")
            values[dim] = found[0]
        candidate = point_candidate(values)
        if candidate.name not in self.by_name:
            config = dataclasses.replace(self.config, candidates=(candidate,))
            kept, skipped = _plan_candidates(config)
            if not kept:
                trial.set_user_attr("skipped", skipped[0])
                raise SearchError(skipped[0])
            self.by_name[candidate.name] = kept[0]
        return self.by_name[candidate.name]

    def _enqueued(self, trial: Any, name: object) -> tuple[_Planned, list[int]]:
        """An enqueued trial's candidate and seeds, as the study records them, checked: one of
        this search's candidates (in a grid, its fixed parameter the same one), seeds of this
        command's, each (candidate, seed) run by one trial of the study (a retry replaces a
        failed one)."""
        from optuna.trial import TrialState

        what = f"trial {trial.number}"
        planned = self.by_name[check_candidate(name, self.by_name, f"{what}: candidate")]
        seeds = list(check_seeds(trial.user_attrs.get("seeds", self.seeds), f"{what}: seeds"))
        if not set(seeds) <= set(self.seeds) or len(set(seeds)) != len(seeds):
            raise SearchError(
                f"{what}: seeds {shown(seeds)} are not allowed; distinct seeds of this command's "
                f"({cut(', '.join(map(str, self.seeds)), 100)})"
            )
        if self.config.sampler == Sampler.GRID:  # the seed is an attribute, not a parameter
            fixed = trial.study._storage.get_trial_system_attrs(trial._trial_id).get("fixed_params")
            param = trial.params.get("candidate", fixed.get("candidate") if isinstance(fixed, dict) else None)
            if param != name:
                raise SearchError(
                    f"{what}: its parameter candidate {shown(param)} is not its candidate {shown(name)}; "
                    "a grid's trial fixes the candidate it names"
                )
            trial.suggest_categorical("candidate", self.names)
        if self.config.sampler != Sampler.GRID and name != BASELINE.name:
            return planned, seeds  # a retried TPE point: TPE may draw a point twice
        done = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING)
        for other in trial.study.get_trials(deepcopy=False, states=done):
            attrs = other.user_attrs
            theirs = attrs.get("seeds") if other.number != trial.number else None
            if attrs.get("candidate") == name and isinstance(theirs, list):
                again = [s for s in seeds if any(s == t for t in theirs[:MAX_SEEDS])]
                if again:
                    raise SearchError(
                        f"{what}: {cut(str(name), 100)} with seed {again[0]} is run by trial {other.number} "
                        "already; a study runs each candidate and seed once"
                    )
        return planned, seeds

    def __call__(self, trial: Any) -> float:
        import optuna

        name = trial.user_attrs.get("candidate")
        if name is None and self.config.sampler == Sampler.GRID:
            raise SearchError(
                f"trial {trial.number} has no candidate; a grid's trial names one of this search's "
                f"{len(self.names)} candidates"
            )
        if name is None:
            planned, seeds = self._sampled(trial), self.seeds
        else:  # an enqueued trial: what the study says it is, checked
            planned, seeds = self._enqueued(trial, name)
        folders = [self.study_files.trial_run(trial.number, seed) for seed in seeds]
        candidate = planned.candidate
        for key, value in {
            "candidate": candidate.name,
            "seeds": seeds,
            "recipe": candidate.recipe or "",
            "params_added": planned.params_added,
            "macs_added": planned.macs_added,
        }.items():
            trial.set_user_attr(key, value)
        self.clock.started(trial, candidate.name, seeds)
        epochs = self.config.template.epochs
        values, runs, seconds = [], [], []
        for k, (seed, folder) in enumerate(zip(seeds, folders, strict=True)):

            def report(row: dict[str, float], k: int = k) -> None:
                trial.report(row["eval_top1"], k * epochs + int(row["epoch"]) - 1)
                if trial.should_prune():
                    raise optuna.TrialPruned(f"epoch {int(row['epoch'])}: top-1 {row['eval_top1']:.2f}")

            label = RunLabel(
                f"{self.study_files.study}/{folder.name}",
                self.study_files.study,
                (("candidate", candidate.name), ("seed", str(seed)), ("trial", str(trial.number))),
            )
            outcome = run_trial(
                self.config.base, candidate, seed, folder, self.config.template, report, label
            )
            values.append(outcome.top1)
            runs.append(str(outcome.run))
            seconds.append(outcome.seconds_per_epoch)
        trial.set_user_attr("values", values)
        trial.set_user_attr("runs", runs)
        trial.set_user_attr("seconds_per_epoch", statistics.fmean(seconds))
        return statistics.fmean(values)


def search(config: SearchConfig) -> SearchResult:
    """Run the search ``config`` describes in this process, as one of its workers; when no
    trial is left, write and return the leaderboard."""
    _check(config)
    folders = check_folders(config.template.data, verify=config.template.verify_images)
    # grid: every candidate planned now; TPE: each sampled point when it is drawn
    planned, skipped = _plan_candidates(config) if config.sampler == Sampler.GRID else ([], [])
    if config.sampler == Sampler.GRID and not planned:
        raise SearchError("no candidate places a block in the base model: " + "; ".join(skipped)[:400])
    study_files = StudyFiles.of(config.out, config.study)
    out = study_files.out
    seeds = _seeds(config)
    identity = _identity(config, planned)
    spec = StudySpec(
        name=config.study,
        storage=f"sqlite:///{out / 'study.db'}" if config.storage is None else config.storage,
        sampler=Sampler(config.sampler),
        pruner=Pruner(config.pruner),
        candidates=(BASELINE, *(p.candidate for p in planned)),
        seeds=tuple(seeds),
        epochs=config.template.epochs,
        n_trials=config.n_trials,
        heartbeat=config.heartbeat,
        identity=identity,
        about=_about(folders),
    )
    if config.storage is None:  # a link would have SQLite create or change the file it leads to
        where = str(study_files.inside(check_default_storage(out), "study.db"))
        out.mkdir(parents=True, exist_ok=True)
    else:
        where = f"--storage {safe_url(config.storage)}"
    planned_trials = (
        len(spec.candidates) * len(seeds) if config.sampler == Sampler.GRID else 1 + (config.n_trials or 0)
    )
    clock = TrialClock(planned_trials, say)
    with naming(where):  # a malformed row: one line naming the file
        study = open_study(spec)
        out.mkdir(parents=True, exist_ok=True)
        ran = work(study, spec, _Objective(config, planned, seeds, study_files, clock), config.timeout, clock)
        trials = study.get_trials(deepcopy=False)
    known = {BASELINE.name, *(c.name for c in config.candidates)}
    records, left_out = read_trials(trials, study_files, known)
    for line in left_out:
        print(f"attn-inject search: {line}", file=sys.stderr)
    rows = leaderboard(records)
    notes = [f"skipped {line}" for line in skipped]
    notes += [f"not a valid point: {line}" for line in config.invalid]
    notes += sorted(
        {f"skipped {cut(str(t.user_attrs['skipped']), 200)}" for t in trials if "skipped" in t.user_attrs}
    )
    notes += left_out
    if not any(r.values for r in rows):
        raise SearchError(f"no trial of study {config.study!r} finished; nothing to report")
    report = write_report(rows, study_files, notes, _about_lines(config, folders, identity))
    return SearchResult(rows, report.table, study_files.folder, ran, report.files)
