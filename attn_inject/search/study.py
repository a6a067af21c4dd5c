"""The Optuna study a search runs on, and the worker loop every process runs.

- Storage: ``sqlite:///RUNDIR/study.db`` by default, or any SQLAlchemy URL (PostgreSQL for
  workers on many machines). Each worker records a heartbeat while its trial runs; a trial
  whose worker died is failed by the next worker that looks and retried once more by
  Optuna's ``RetryFailedTrialCallback``; so is a running trial that never recorded a
  heartbeat (its worker died before its first beat, or the row was forged), two heartbeat
  intervals after its start, and one whose heartbeat has not moved for two intervals of this
  worker's clock (a beat dated in the future). A SQLite file is checked before Optuna opens
  it, and every statement on it is bounded (database.py).
- Grid (an ablation): every (candidate, seed) is enqueued once when the study is created,
  the baseline's first; workers pop the queue (a trial goes to exactly one worker: the
  storage moves it from waiting to running in one conditional UPDATE) until it is empty and no
  trial runs. Optuna's ``GridSampler`` holds the same grid.
- TPE (a search over a space): the baseline's seeds are enqueued; then each trial samples
  a point dimension by dimension and fine-tunes it over every seed, until ``n_trials``.
- The study records what it was made for (base model, data, candidates, fine-tune); a
  command that does not match it is refused (so is a study of its name that does not
  maximize one objective, before any trial runs), and the same command continues it. It also
  records, unchecked, where the data was and what it held (``data_path``,
  ``data_classes``, ``data_images``), and names its objective (``val_top1_mean``). A
  trial's seeds are its attribute (``seeds``), not a parameter: Optuna's parameter
  importances credit the candidate alone.
"""

from __future__ import annotations

import contextlib
import datetime
import re
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from ..core.messages import cut, error_line, first_line, shown
from ..core.vocabulary import Word
from .candidates import BASELINE, Candidate
from .database import StudyDatabaseError, check_sqlite, engine_kwargs, sqlite_file
from .errors import SearchError
from .progress import TrialClock

__all__ = ["StudySpec", "import_optuna", "open_study", "safe_url", "work"]


class Sampler(Word):
    """How the study picks its next trial: every candidate in turn, or Optuna's TPE over a space."""

    GRID = "grid"
    TPE = "tpe"


class Pruner(Word):
    """Which Optuna pruner stops a trial early, if any."""

    NONE = "none"
    MEDIAN = "median"
    HYPERBAND = "hyperband"


SAMPLERS = Sampler.values()
PRUNERS = Pruner.values()
METRIC = "val_top1_mean"  # the objective: validation top-1 (%) after the last epoch, mean over seeds
MAX_RETRY = 2  # a trial whose worker died runs at most this many more times
CREATE_ATTEMPTS = 5  # opening a new database that another worker is creating


@dataclass(frozen=True)
class StudySpec:
    """What a study is for; ``identity`` must match to continue it."""

    name: str
    storage: str
    sampler: Sampler
    pruner: Pruner
    candidates: tuple[Candidate, ...]
    seeds: tuple[int, ...]
    epochs: int
    n_trials: int | None
    heartbeat: int
    identity: Mapping[str, Any]
    about: Mapping[str, Any] = field(default_factory=dict)  # recorded beside it, not checked


def import_optuna() -> Any:
    try:
        import optuna
    except ImportError:
        raise SearchError("attn-inject search needs Optuna: pip install 'attn-inject[search]'") from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    # heartbeats and their retry are marked experimental; they are what the search relies on
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    return optuna


MAX_URL_SHOWN = 120  # characters of a storage URL a message quotes


def safe_url(url: str) -> str:
    """The URL with its password hidden (all of it, ``@`` and ``/`` included: everything from
    the user name's ``:`` to the last ``@`` before the query) and a ``password=`` query value
    hidden, cut to one short line, for messages."""
    scheme, sep, rest = url.partition("://")
    if sep:
        rest, question, query = rest.partition("?")
        credentials, at, host = rest.rpartition("@")
        if at:
            user, colon, _ = credentials.partition(":")
            rest = f"{user}{':***' if colon else ''}@{host}"
        query = re.sub(r"(?i)(password=)[^&]*", r"\1***", query)
        url = f"{scheme}://{rest}{question}{query}"
    return cut(url, MAX_URL_SHOWN)


def _storage(spec: StudySpec) -> Any:
    optuna = import_optuna()
    if not spec.storage.strip():
        raise SearchError("--storage is empty; give a SQLAlchemy URL such as sqlite:///RUNDIR/study.db")
    storages = optuna.storages
    # Optuna 4.9 renamed RetryFailedTrialCallback (and the argument that takes it)
    if hasattr(storages, "RetryHeartbeatStaleTrialCallback"):
        retry = {
            "heartbeat_stale_trial_callback": storages.RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRY)
        }
    else:
        retry = {"failed_trial_callback": storages.RetryFailedTrialCallback(max_retry=MAX_RETRY)}
    sqlite = sqlite_file(spec.storage)
    if sqlite is not None:  # a file someone handed us: only Optuna's tables, before Optuna opens it
        check_sqlite(sqlite)
    attempt = 0
    while True:
        try:
            return storages.RDBStorage(
                spec.storage,
                heartbeat_interval=spec.heartbeat,
                grace_period=2 * spec.heartbeat,
                engine_kwargs=engine_kwargs(spec.storage),  # every statement bounded
                **retry,
            )
        except StudyDatabaseError:
            raise
        except Exception as error:
            if not _lost_creation_race(error):  # a bad URL, a missing driver, a server that is down
                raise _unopened(spec, error) from None
            # workers started together on a new database both create its tables: the one
            # that loses finds them made on its next try
            attempt += 1
            if attempt == CREATE_ATTEMPTS:
                raise _unopened(spec, error) from None
            time.sleep(0.2 * attempt)


def _lost_creation_race(error: Exception) -> bool:
    """Whether ``error`` is what a worker meets when another creates the same new database's
    tables at the same moment: PostgreSQL's duplicate key or object, SQLite's "table ...
    already exists" or "database is locked"."""
    from sqlalchemy.exc import IntegrityError, OperationalError, ProgrammingError

    if isinstance(error, (IntegrityError, ProgrammingError)):
        return True
    message = str(error)
    return isinstance(error, OperationalError) and ("already exists" in message or "is locked" in message)


def _unopened(spec: StudySpec, error: Exception) -> SearchError:
    line = first_line(error, 300) or type(error).__name__
    return SearchError(f"--storage {safe_url(spec.storage)}: cannot open it: {line}")


def _sampler(spec: StudySpec) -> Any:
    optuna = import_optuna()
    if spec.sampler == Sampler.GRID:
        # the seed is a trial attribute, not a searched parameter: the candidate alone is
        return optuna.samplers.GridSampler({"candidate": [c.name for c in spec.candidates]}, seed=0)
    return optuna.samplers.TPESampler(seed=0, n_startup_trials=min(10, spec.n_trials or 10))


def _pruner(spec: StudySpec) -> Any:
    optuna = import_optuna()
    if spec.pruner == Pruner.MEDIAN:  # after the baseline's seeds; not in a trial's first epoch
        return optuna.pruners.MedianPruner(n_startup_trials=len(spec.seeds), n_warmup_steps=1)
    if spec.pruner == Pruner.HYPERBAND:
        return optuna.pruners.HyperbandPruner(
            min_resource=1, max_resource=spec.epochs * _steps_per_epoch(spec)
        )
    return optuna.pruners.NopPruner()


def _steps_per_epoch(spec: StudySpec) -> int:
    return len(spec.seeds) if spec.sampler == Sampler.TPE else 1


def _enqueue(study: Any, spec: StudySpec) -> None:
    """The trials a new study starts with: the baseline's seeds first."""
    if spec.sampler == Sampler.GRID:
        for candidate in spec.candidates:
            for seed in spec.seeds:
                study.enqueue_trial(
                    {"candidate": candidate.name},
                    user_attrs={"candidate": candidate.name, "seeds": [seed]},
                )
    else:
        study.enqueue_trial({}, user_attrs={"candidate": BASELINE.name, "seeds": list(spec.seeds)})


def open_study(spec: StudySpec) -> Any:
    """The study ``spec`` names: created (and its trials enqueued) when new, else checked to
    be the same search and continued."""
    optuna = import_optuna()
    storage = _storage(spec)
    sampler, pruner = _sampler(spec), _pruner(spec)
    try:
        study = optuna.create_study(
            study_name=spec.name, storage=storage, sampler=sampler, pruner=pruner, direction="maximize"
        )
    except optuna.exceptions.DuplicatedStudyError:
        study = optuna.load_study(study_name=spec.name, storage=storage, sampler=sampler, pruner=pruner)
        _check_same(study, spec)
        return study
    study.set_metric_names([METRIC])
    for key, value in {**spec.about, **spec.identity}.items():
        study.set_user_attr(key, value)
    _enqueue(study, spec)
    study.set_user_attr("ready", True)
    return study


def _check_same(study: Any, spec: StudySpec) -> None:
    directions = [d.name.lower() for d in study.directions]
    if directions != ["maximize"]:  # a trial's top-1 refused after it ran, or the best pruned
        raise SearchError(
            f"study {spec.name!r} in {safe_url(spec.storage)} is to {cut(' and '.join(directions), 100)}; "
            f"a search's study maximizes one objective ({METRIC}): use another --study (or --out)"
        )
    recorded = _made(study, spec)
    for key, value in spec.identity.items():
        if recorded.get(key) != value:
            raise _made_for_another(spec, key, recorded.get(key))


CREATION_WAIT_S = 60  # how long a study without its ``ready`` record may be another worker's new one


def _made(study: Any, spec: StudySpec) -> dict[str, Any]:
    """The study's record, once another worker making it has recorded ``ready`` (last), or
    after ``CREATION_WAIT_S``; a study that cannot be one in the making is refused at once."""
    deadline = time.monotonic() + CREATION_WAIT_S
    while not (recorded := study.user_attrs).get("ready") and time.monotonic() < deadline:
        for key, value in spec.identity.items():  # a maker writes these values, or nothing yet
            if key in recorded and recorded[key] != value:
                raise _made_for_another(spec, key, recorded[key])
        if (why := _not_in_the_making(study)) is not None:
            raise SearchError(
                f"study {spec.name!r} in {safe_url(spec.storage)} is not a search's study ({why}); "
                "use another --study (or --out)"
            )
        time.sleep(0.2)
    return recorded


def _not_in_the_making(study: Any) -> str | None:
    """Why ``study`` (not ``ready``) cannot be a search's study that a worker is making: a
    maker names the one metric and enqueues trials only, each with its candidate."""
    names = study.metric_names
    if names is not None and list(names) != [METRIC]:
        return f"its objective is named {cut(', '.join(map(str, names)), 100)}, not {METRIC}"
    waiting = import_optuna().trial.TrialState.WAITING
    for trial in study.get_trials(deepcopy=False):
        if trial.state != waiting:
            return f"trial {trial.number} is {trial.state.name.lower()} before the study was ready"
        if "candidate" not in trial.user_attrs:
            return f"trial {trial.number} names no candidate"
    return None


def _made_for_another(spec: StudySpec, key: str, recorded: Any) -> SearchError:
    return SearchError(
        f"study {spec.name!r} in {safe_url(spec.storage)} was made for another {key} "
        f"({shown(recorded)}, here {shown(spec.identity[key])}); "
        "use another --study (or --out), or the command that made it"
    )


@contextlib.contextmanager
def _heartbeat(storage: Any, trial_id: int, interval: int) -> Iterator[None]:
    """Record a heartbeat for ``trial_id`` every ``interval`` seconds while the trial runs."""
    stop = threading.Event()

    def beat() -> None:
        told = False
        while True:
            try:
                storage.record_heartbeat(trial_id)
            except Exception as error:  # a locked or altered database: said once, tried again
                if not told:
                    say(f"recording the heartbeat of a trial failed: {error_line(error, 200)}; trying again")
                    told = True
            if stop.wait(interval):
                return

    thread = threading.Thread(target=beat, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def _claim(storage: Any, trial_id: int) -> bool:
    """Move ``trial_id`` from waiting to running in one conditional UPDATE, true for the one
    worker whose UPDATE changed the row. Optuna's own ``set_trial_state_values`` reads the
    state, then writes it: on SQLite (no row locks) two workers can both read "waiting" and
    both run the trial."""
    from optuna.storages._rdb import models
    from optuna.storages._rdb.storage import _create_scoped_session
    from optuna.trial import TrialState

    backend = getattr(storage, "_backend", storage)  # under Optuna's cache
    with _create_scoped_session(backend.scoped_session) as session:
        changed = (
            session.query(models.TrialModel)
            .filter(models.TrialModel.trial_id == trial_id, models.TrialModel.state == TrialState.WAITING)
            .update(
                {"state": TrialState.RUNNING, "datetime_start": datetime.datetime.now()},
                synchronize_session=False,
            )
        )
    return bool(changed == 1)


def _pop_waiting(study: Any) -> Any | None:
    """A waiting trial, moved to running for this worker alone; None when none waits."""
    optuna = import_optuna()
    from optuna.trial import TrialState

    storage = study._storage
    for frozen in storage.get_all_trials(study._study_id, deepcopy=False, states=(TrialState.WAITING,)):
        if _claim(storage, frozen._trial_id):
            return optuna.trial.Trial(study, frozen._trial_id)
    return None


def _tell(study: Any, trial: Any, value: float | None = None, state: Any = None) -> None:
    """Optuna's ``tell``, unless the trial was finished meanwhile (failed by another worker
    that took this one for dead): then a line, and the other trials go on."""
    optuna = import_optuna()
    try:
        study.tell(trial, value, state=state)
    except optuna.exceptions.UpdateFinishedTrialError:
        say(f"trial {trial.number} was finished by another worker meanwhile; its result is not recorded")


def _count(study: Any, *states: Any) -> int:
    return len(study.get_trials(deepcopy=False, states=states))


def say(line: str) -> None:
    """One line for the person running the search, on stderr."""
    print(f"attn-inject search: {line}", file=sys.stderr, flush=True)


def _heartbeats(storage: Any, study_id: int) -> dict[int, Any]:
    """The last heartbeat of each of the study's trials that has a heartbeat row, by trial id
    (Optuna keeps them in a table of their own, which its public API does not read)."""
    from optuna.storages._rdb import models
    from optuna.storages._rdb.storage import _create_scoped_session

    backend = getattr(storage, "_backend", storage)  # under Optuna's cache
    with _create_scoped_session(backend.scoped_session) as session:
        rows = (
            session.query(models.TrialHeartbeatModel.trial_id, models.TrialHeartbeatModel.heartbeat)
            .join(models.TrialModel, models.TrialModel.trial_id == models.TrialHeartbeatModel.trial_id)
            .filter(models.TrialModel.study_id == study_id)
            .all()
        )
    return {row[0]: row[1] for row in rows}


class _Stalled:
    """Fails the running trials whose heartbeat does not move: two heartbeat intervals of
    this worker's clock after it last changed, as this worker saw it. Optuna's own check
    compares the last beat with the time now, so a trial that never beat (its worker died
    before its first beat) or whose beat is dated in the future (a forged row, another
    machine's clock) would keep every other worker waiting for ever. A trial with no beat is
    timed from its ``datetime_start`` where that is in the past, else from when this worker
    first saw it."""

    def __init__(self, interval: int) -> None:
        self.grace = 2 * interval
        self.seen: dict[int, tuple[Any, float]] = {}  # trial id: (its beat, when first seen so)

    def __call__(self, study: Any) -> None:
        from optuna.trial import TrialState

        storage = study._storage
        running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        if not running:
            return
        beats = _heartbeats(storage, study._study_id)
        now, clock = datetime.datetime.now(), time.monotonic()
        for trial in running:
            beat = beats.get(trial._trial_id)
            last = self.seen.get(trial._trial_id)
            if last is None or last[0] != beat:
                self.seen[trial._trial_id] = last = (beat, clock)
            still = clock - last[1]
            if beat is None:
                start = trial.datetime_start
                age = (now - start).total_seconds() if isinstance(start, datetime.datetime) else -1.0
                if max(age, still) <= self.grace:
                    continue
                since = f"since {start:%Y-%m-%d %H:%M:%S}" if age >= 0 else "with no start time"
                why = (
                    f"has run {since} without a heartbeat (its worker died before its first beat, "
                    "or the row was written by hand)"
                )
            else:
                if still <= self.grace:
                    continue
                why = (
                    f"has a heartbeat ({cut(str(beat), 40)}) that has not moved for {still:.0f} s (its "
                    "worker died, or the row was written by hand)"
                )
            try:
                if not storage.set_trial_state_values(trial._trial_id, state=TrialState.FAIL):
                    continue
            except Exception:  # another worker failed or finished it first
                continue
            say(f"trial {trial.number} {why}; failed after {self.grace} s, to be run again")
            # Optuna 4.9 renamed the getter of the retry callback
            getter = getattr(storage, "get_heartbeat_stale_trial_callback", None)
            callback = getter() if getter else storage.get_failed_trial_callback()
            if callback is not None:
                callback(study, storage.get_trial(trial._trial_id))


Objective = Callable[[Any], float]


def work(
    study: Any,
    spec: StudySpec,
    objective: Objective,
    timeout: float | None = None,
    clock: TrialClock | None = None,
) -> int:
    """Run trials until the study is complete (or ``timeout`` seconds pass); returns how
    many this worker ran. A pruned trial is told as pruned, a trial that raised as failed.
    ``clock`` (started by the objective) says how each trial ended and where the search
    stands."""
    optuna = import_optuna()
    from optuna.trial import TrialState

    began, ran, waiting = time.monotonic(), 0, False
    stalled = _Stalled(spec.heartbeat)
    while timeout is None or time.monotonic() - began < timeout:
        optuna.storages.fail_stale_trials(study)  # a dead worker's trial: failed, then retried
        stalled(study)  # and one that never beat, or whose beat never moves
        trial = _pop_waiting(study)
        if trial is None and spec.sampler == Sampler.TPE and spec.n_trials is not None:
            searched = [
                t
                for t in study.get_trials(deepcopy=False)
                if t.user_attrs.get("candidate") != BASELINE.name and "retry_history" not in t.system_attrs
            ]
            if len(searched) < spec.n_trials:
                trial = study.ask()
        if trial is None:
            running = _count(study, TrialState.RUNNING)
            if running:
                if not waiting:
                    say(f"waiting for {running} running trial(s) of other workers (or of a worker that died)")
                    waiting = True
                time.sleep(min(5.0, spec.heartbeat))  # another worker's trial may yet need a retry
                continue
            break
        waiting = False
        ran += 1
        with _heartbeat(study._storage, trial._trial_id, spec.heartbeat):
            try:
                value = objective(trial)
            except StudyDatabaseError:
                raise  # the database's fault, not the trial's: the search stops
            except optuna.TrialPruned:
                _tell(study, trial, state=TrialState.PRUNED)
                _ended(clock, study, trial, "pruned")
                continue
            except Exception as error:  # recorded and counted; the other trials go on
                line = error_line(error, 300)
                say(f"trial {trial.number} failed: {line}")
                trial.set_user_attr("error", line)
                _tell(study, trial, state=TrialState.FAIL)
                _ended(clock, study, trial, "failed")
                continue
            # A stop (SIGINT, SIGTERM) leaves the trial running: its heartbeat ends, and the
            # next worker to look (or the rerun) fails it and runs it again.
        _tell(study, trial, value)
        _ended(clock, study, trial, f"top-1 {value:.2f}")
    return ran


def _ended(clock: TrialClock | None, study: Any, trial: Any, outcome: str) -> None:
    if clock is not None:
        clock.ended(study, trial.number, outcome)
