"""``attn-inject search`` against a study database of another kind: a file another Optuna
version wrote, a study of the search's name that is not to maximize its one objective, and
one that no worker can be making."""

from __future__ import annotations

import sqlite3
import warnings
from pathlib import Path

import pytest

from attn_inject.cli.main import main
from attn_inject.search import study as study_module
from attn_inject.search.candidates import BASELINE
from attn_inject.search.errors import SearchError
from attn_inject.search.study import StudySpec, open_study, work

from .test_search import args, data, optuna

__all__ = ["data"]  # the digits fixture, shared with test_search.py

TrialState = optuna.trial.TrialState


def _spec(tmp_path: Path) -> StudySpec:
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    return StudySpec("s", storage, "grid", "median", (BASELINE,), (0,), 1, None, 60, {"k": "v"})


@pytest.mark.parametrize(
    "sql, message",
    [
        (
            "UPDATE alembic_version SET version_num = 'v3.0.0.a'; DROP TABLE trial_heartbeats;",
            "has Optuna schema revision 'v3.0.0.a', not this Optuna's",
        ),
        (
            "DROP TABLE alembic_version; UPDATE version_info SET schema_version = 11;",
            "has Optuna schema version 11, not this Optuna's 12",
        ),
    ],
    ids=["older revision", "before alembic"],
)
def test_a_study_db_of_another_optuna_schema_is_refused_and_left_unchanged(
    data, tmp_path, capsys, sql, message
):
    out = tmp_path / "run"
    out.mkdir()
    db = out / "study.db"
    optuna.storages.RDBStorage(f"sqlite:///{db}")
    with sqlite3.connect(db) as connection:  # as an older Optuna left it
        connection.executescript(sql)
    before = db.read_bytes()
    assert main(args(data, out, "se_resnet", repeats=1)) == 1
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert f"{db}: the study database {message}" in line and "never migrated" in line
    assert db.read_bytes() == before  # no table added, nothing stamped
    assert sorted(p.name for p in out.iterdir()) == ["study.db"]


@pytest.mark.parametrize("directions", [["minimize"], ["maximize", "maximize"]], ids=["minimize", "two"])
def test_a_study_that_does_not_maximize_one_objective_is_refused_before_any_trial_runs(tmp_path, directions):
    spec = _spec(tmp_path)
    forged = optuna.create_study(study_name="s", storage=spec.storage, directions=directions)
    for key, value in {"k": "v", "ready": True}.items():  # the search's own record, copied
        forged.set_user_attr(key, value)
    forged.enqueue_trial({"candidate": "baseline"}, user_attrs={"candidate": "baseline", "seeds": [0]})
    ran: list[int] = []
    with pytest.raises(SearchError) as caught:
        work(open_study(spec), spec, lambda trial: ran.append(trial.number) or 50.0, timeout=10)
    line = str(caught.value)
    assert "\n" not in line and f"is to {' and '.join(directions)}; a search's study maximizes one" in line
    assert ran == []  # no fine-tune spent on a trial whose top-1 would be refused, or pruned for it
    assert [t.state for t in optuna.load_study(study_name="s", storage=spec.storage).trials] == [
        TrialState.WAITING
    ]


def _unready(
    storage: str, attrs: dict, trials: list[tuple[TrialState, dict]], metric: str | None = None
) -> None:
    """A study named as the search's, never recorded ``ready``."""
    study = optuna.create_study(study_name="s", storage=storage, direction="maximize")
    if metric is not None:
        with warnings.catch_warnings():  # Optuna calls naming the metrics experimental
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.set_metric_names([metric])
    for key, value in attrs.items():
        study.set_user_attr(key, value)
    for state, user_attrs in trials:
        if state == TrialState.WAITING:
            study.enqueue_trial({}, user_attrs=user_attrs)
        else:
            study.add_trial(optuna.trial.create_trial(state=state, value=1.0, user_attrs=user_attrs))


@pytest.mark.parametrize(
    "attrs, trials, metric, message",
    [
        ({"k": "w"}, [], None, "was made for another k ('w', here 'v')"),
        ({}, [], "loss", "is not a search's study (its objective is named loss, not val_top1_mean)"),
        ({}, [(TrialState.COMPLETE, {})], None, "(trial 0 is complete before the study was ready)"),
        ({}, [(TrialState.WAITING, {"note": 1})], None, "(trial 0 names no candidate)"),
    ],
    ids=["another identity", "another objective", "a finished trial", "a trial of no candidate"],
)
def test_a_study_that_cannot_be_in_the_making_is_refused_without_waiting_for_it(
    tmp_path, monkeypatch, attrs, trials, metric, message
):
    spec = _spec(tmp_path)
    _unready(spec.storage, attrs, trials, metric)
    waits: list[float] = []
    monkeypatch.setattr(study_module.time, "sleep", waits.append)
    with pytest.raises(SearchError) as caught:
        open_study(spec)
    line = str(caught.value)
    assert "\n" not in line and message in line and "use another --study" in line
    assert waits == []  # refused at once, not after the wait for a worker making the study


def test_a_study_another_worker_is_making_is_waited_for(tmp_path, monkeypatch):
    spec = _spec(tmp_path)
    # what a maker has written so far: the objective, its identity, a trial enqueued; not ready
    _unready(spec.storage, {"k": "v"}, [(TrialState.WAITING, {"candidate": "baseline"})], "val_top1_mean")
    waits: list[float] = []

    def sleep(seconds: float) -> None:
        waits.append(seconds)
        if len(waits) == 3:  # the maker finishes
            optuna.load_study(study_name="s", storage=spec.storage).set_user_attr("ready", True)

    monkeypatch.setattr(study_module.time, "sleep", sleep)
    study = open_study(spec)
    assert len(waits) == 3 and study.user_attrs["ready"] is True
