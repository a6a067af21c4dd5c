"""``attn-inject search`` against a study database of another kind: a file another Optuna
version wrote, and a study of the search's name that is not to maximize its one objective."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from attn_inject.cli.main import main
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
