"""``attn-inject search`` against hostile and unlucky inputs: a study database altered by
hand (forged trials, values of any type and size), a second study in the same folder, names
that TeX would parse, and mistakes on the command line. The study logic is tested on real
SQLite studies; where a test is about the study alone, the per-trial fine-tune is a stub."""

from __future__ import annotations

import csv
import datetime
import math
import os
import shutil
import sqlite3
import statistics
import sys
import time
from pathlib import Path

import pytest

from attn_inject.cli.main import main
from attn_inject.search import leaderboard as board
from attn_inject.search.leaderboard import Row, t_quantile, t_quantile_exact, write_report
from attn_inject.search.study import StudySpec, open_study, safe_url, work
from attn_inject.search.study_files import StudyFiles

from .test_search import SEARCHED, args, data, optuna, study_of

__all__ = ["data"]  # the digits fixture, shared with test_search.py

TrialState = optuna.trial.TrialState


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def finished_study(data, tmp_path_factory) -> Path:
    """The --out of a finished search (the baseline and se_resnet, one seed each) on SQLite:
    tests take a copy of their own (the study reads its trial folders from where it is)."""
    out = tmp_path_factory.mktemp("finished") / "run"
    assert main(args(data, out, "se_resnet", repeats=1)) == 0
    return out


def copy_of(finished: Path, out: Path) -> Path:
    shutil.copytree(finished, out)
    return out


# --- a second study in the same --out ------------------------------------------------------


def test_a_second_study_in_the_same_out_keeps_its_own_trials_and_report(
    data, finished_study, tmp_path, capsys
):
    out = copy_of(finished_study, tmp_path / "run")
    first = {k: v for k, v in _tree(out).items() if k != "study.db"}
    assert "trials/0000-seed0/run/last.safetensors" in first and "leaderboard.md" in first
    assert main([*args(data, out, "eca_after_every_stage", repeats=1), "--study", "second"]) == 0
    after = _tree(out)
    for name, content in first.items():  # the first study's folders and report, untouched
        assert after[name] == content, name
    second = out / "second"
    assert sorted(p.name for p in (second / "trials").iterdir()) == ["0000-seed0", "0001-seed0"]
    with open(second / "leaderboard.csv") as f:
        assert {r["candidate"] for r in csv.DictReader(f)} == {"baseline", "eca_after_every_stage"}
    runs = [second / "trials" / n / "run" / "last.safetensors" for n in ("0000-seed0", "0001-seed0")]
    assert (second / "best.safetensors").read_bytes() in [r.read_bytes() for r in runs]
    assert "second/" in capsys.readouterr().out


@pytest.mark.parametrize("name", ["../x", "trials", "a/b", ".hidden", "", "x" * 65])
def test_a_study_name_that_is_not_a_plain_folder_name_is_a_usage_error(data, tmp_path, capsys, name):
    out = tmp_path / "run"
    assert main([*args(data, out, "se_resnet"), "--study", name]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--study" in err[0] and "letters, digits" in err[0]
    assert not out.exists()


# --- a running trial that never beat ---------------------------------------------------------


SET_START = "UPDATE trials SET datetime_start = ? WHERE trial_id = ?"


def _spec(tmp_path: Path, heartbeat: int = 60) -> StudySpec:
    from attn_inject.search.candidates import BASELINE

    storage = f"sqlite:///{tmp_path / 'study.db'}"
    return StudySpec("s", storage, "grid", "none", (BASELINE,), (0,), 1, None, heartbeat, {"k": "v"})


def test_a_running_trial_without_a_heartbeat_is_failed_two_intervals_after_its_start_and_rerun(
    tmp_path, capsys
):
    spec = _spec(tmp_path)  # a 60 s heartbeat: Optuna's own check would never fail it
    study = open_study(spec)
    (waiting,) = study.get_trials(states=(TrialState.WAITING,))
    # a worker killed between taking the trial and its first beat, 10 minutes ago
    study._storage.set_trial_state_values(waiting._trial_id, state=TrialState.RUNNING)
    started = datetime.datetime.now() - datetime.timedelta(minutes=10)
    with sqlite3.connect(tmp_path / "study.db") as db:
        db.execute(SET_START, (str(started), waiting._trial_id))
    seen = []
    ran = work(study, spec, lambda trial: seen.append(trial.number) or 50.0, timeout=30)
    assert ran == 1 and seen == [1]
    trials = study_of_spec(spec).trials
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.COMPLETE]
    assert trials[1].system_attrs["failed_trial"] == 0  # the retry of the dead trial
    err = capsys.readouterr().err
    assert "trial 0 has run since" in err and "without a heartbeat" in err and "failed after 120 s" in err


def test_a_running_trial_that_beats_is_left_to_its_worker(tmp_path):
    spec = _spec(tmp_path, heartbeat=2)
    study = open_study(spec)
    (waiting,) = study.get_trials(states=(TrialState.WAITING,))
    study._storage.set_trial_state_values(waiting._trial_id, state=TrialState.RUNNING)
    study._storage.record_heartbeat(waiting._trial_id)  # its worker is alive
    started = datetime.datetime.now() - datetime.timedelta(minutes=10)
    with sqlite3.connect(tmp_path / "study.db") as db:
        db.execute(SET_START, (str(started), waiting._trial_id))
    assert work(study, spec, lambda trial: 50.0, timeout=1) == 0
    assert [t.state for t in study_of_spec(spec).trials] == [TrialState.RUNNING]


def study_of_spec(spec: StudySpec):
    return optuna.load_study(study_name=spec.name, storage=spec.storage)


# --- forged trials: paths, values and sizes --------------------------------------------------


def _forge_complete(study, candidate, seeds, values, **attrs) -> None:
    study.add_trial(
        optuna.trial.create_trial(
            state=TrialState.COMPLETE,
            value=50.0,
            user_attrs={"candidate": candidate, "seeds": seeds, "values": values, **attrs},
        )
    )


def test_forged_trials_lead_nowhere_outside_out_and_the_report_skips_them_one_line_each(
    data, finished_study, tmp_path, capsys
):
    out = copy_of(finished_study, tmp_path / "nest" / "run")
    argv = args(data, out, "se_resnet", repeats=1)
    study = study_of(out)
    # waiting trials whose seeds would be paths, or too large for any generator
    for seeds in (["0/../../X"], [10**200], "0", []):
        study.enqueue_trial(
            {"candidate": "baseline", "seed": 0}, user_attrs={"candidate": "baseline", "seeds": seeds}
        )
    study.enqueue_trial(
        {"candidate": "baseline", "seed": 0}, user_attrs={"candidate": "x" * 5_000_000, "seeds": [0]}
    )
    # finished trials: a 200-digit seed, a NaN, a value above 100, a name no candidate has
    _forge_complete(study, "baseline", [10**200], [50.0])
    _forge_complete(study, "baseline", [0], [math.nan])
    _forge_complete(study, "se_resnet", [0], [1e9])
    _forge_complete(study, "y" * 5_000_000, [0], [50.0])
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert not (tmp_path / "X").exists() and not (tmp_path / "nest" / "X").exists()
    assert sorted(p.name for p in (out / "trials").iterdir()) == ["0000-seed0", "0001-seed0"]
    lines = captured.err.splitlines()
    for number in range(2, 7):  # each forged waiting trial failed, with a line
        assert any(
            line.startswith(f"attn-inject search: trial {number} failed: SearchError") for line in lines
        )
    for number in range(7, 11):  # each forged finished trial left out, with a line
        assert any(f"trial {number}: " in line and "left out" in line for line in lines), number
    assert max(map(len, lines)) < 600  # the 5 MB names are cut
    report = (out / "leaderboard.md").read_text()
    assert len(report) < 10_000 and "| baseline | 1 |" in report and "| se_resnet | 1 |" in report
    assert (out / "best.safetensors").is_file()


def test_a_best_run_whose_file_is_not_here_leaves_no_stale_best_file(data, finished_study, tmp_path, capsys):
    out = copy_of(finished_study, tmp_path / "run")
    argv = args(data, out, "se_resnet", repeats=1)
    assert (out / "best.safetensors").is_file()
    for weights in out.glob("trials/*/run/last.safetensors"):  # another machine's runs, say
        weights.unlink()
    assert main(argv) == 0
    assert not (out / "best.safetensors").exists()  # not the old one beside a new table
    report = (out / "leaderboard.md").read_text()
    assert "best.safetensors not written: " in report and "/last.safetensors here" in report


# --- the report: plain-text labels, written whole ---------------------------------------------


@pytest.fixture
def unchecked_weights(monkeypatch):
    """The best run's file taken as it is: these tests are about the table and the figure
    (their stand-in weights are a few bytes, not a file attn-inject wrote)."""
    import attn_inject.saving.file

    monkeypatch.setattr(attn_inject.saving.file, "check_file", lambda path: None)


def _rows(tmp_path: Path, names: list[str]) -> tuple[list[Row], StudyFiles]:
    study_files = StudyFiles.of(tmp_path / "out", "attn-inject-search")
    rows = []
    for k, name in enumerate(names):
        run = study_files.trial_folder(k, 0) / "run"
        run.mkdir(parents=True)
        (run / "last.safetensors").write_bytes(f"weights of {k}".encode())
        rows.append(Row(name, values=[50.0 + k, 52.0 + k], seeds=[0, 1], runs=[(52.0 + k, run)] * 2))
    return rows[::-1], study_files  # best first, as leaderboard() orders them


def test_candidate_names_with_tex_are_drawn_as_plain_text(tmp_path, monkeypatch, unchecked_weights):
    import matplotlib

    monkeypatch.setitem(matplotlib.rcParams, "text.usetex", True)  # a user's matplotlibrc
    rows, study_files = _rows(tmp_path, ["baseline", "se $x^{$", r"eca \frac{"])
    report = write_report(rows, study_files)
    assert study_files.pareto.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert study_files.best.read_bytes() == b"weights of 2"
    assert "se $x^{$" in study_files.leaderboard_md.read_text() and study_files.best in report.files


def test_a_report_that_fails_midway_leaves_the_previous_one_whole(tmp_path, monkeypatch, unchecked_weights):
    rows, study_files = _rows(tmp_path, ["baseline", "se"])
    write_report(rows, study_files)
    before = _tree(study_files.folder)

    def broken(rows):
        raise RuntimeError("the plot failed")

    monkeypatch.setattr(board, "_pareto", broken)
    rows[1].values = [90.0, 91.0]  # another table, never written
    with pytest.raises(RuntimeError):
        write_report(rows, study_files)
    assert _tree(study_files.folder) == before  # nothing new, no temporary file left


# --- the statistics ----------------------------------------------------------------------------


@pytest.mark.parametrize("df, expected", [(1, 12.7062), (31, 2.0395), (1000, 1.9623), (30, 2.0423)])
def test_t_quantiles_are_exact_at_every_df(df, expected):
    assert t_quantile(df) == pytest.approx(expected, abs=1e-4)
    assert t_quantile_exact(df) == pytest.approx(expected, abs=1e-4)


def test_fractional_df_is_kept_and_the_quantile_matches_scipy():
    stats = pytest.importorskip("scipy.stats")
    for df in (1.0, 1.5, 2.25, 4.7, 13.3, 29.9, 30.5, 57.0, 250.0, 1e5):
        assert t_quantile_exact(df) == pytest.approx(stats.t.ppf(0.975, df), rel=1e-9), df
        assert t_quantile(df) == t_quantile_exact(df)
    assert t_quantile(1.5) == pytest.approx(6.0167, abs=1e-4)  # not 12.71, df 1's
    assert math.isinf(t_quantile(0)) and math.isinf(t_quantile(-1.0))


def test_the_quantiles_need_no_scipy(monkeypatch):
    monkeypatch.setitem(sys.modules, "scipy", None)  # any import of scipy now fails
    monkeypatch.setitem(sys.modules, "scipy.stats", None)
    assert t_quantile(1.5) == pytest.approx(6.0167, abs=1e-4)


def _pair(candidate: list[float], baseline: list[float]) -> tuple[Row, Row]:
    seeds = list(range(len(candidate)))
    return Row("c", values=candidate, seeds=seeds), Row("baseline", values=baseline, seeds=seeds)


def test_beyond_noise_needs_three_seeds_a_side_and_a_spread():
    two = _pair([60.0, 70.0], [51.67, 61.67])  # equal differences: zero spread, two seeds
    assert two[0].difference(two[1])[1] == 0 and two[0].beyond_noise(two[1]) == "n/a"
    flat = _pair([60.0, 70.0, 65.0], [50.0, 60.0, 55.0])  # three seeds, zero spread
    assert flat[0].beyond_noise(flat[1]) == "n/a"
    candidate, baseline = _pair([60.0, 70.0, 65.0], [50.0, 61.0, 54.0])
    pairs = [10.0, 9.0, 11.0]
    stats = pytest.importorskip("scipy.stats")
    half = stats.t.ppf(0.975, 2) * statistics.stdev(pairs) / math.sqrt(3)
    assert candidate.difference(baseline) == pytest.approx((10.0, half))
    assert candidate.beyond_noise(baseline) == "yes"
    near, base = _pair([60.0, 70.0, 65.0], [59.0, 71.0, 64.0])
    assert near.beyond_noise(base) == "no"


# --- the search space ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, message",
    [
        (
            "block: [se]\nat: [stage_output]\nratio: [0.0001]\n",
            "ratio: 0.0001 is not allowed; numbers from 1 to 1024",
        ),
        (
            "block: [{kind: se}]\nat: [stage_output]\n",
            "block: {'kind': 'se'} is not allowed; block takes names",
        ),
        ("block: [se]\nat: [[1]]\n", "at: [1] is not allowed; at takes names"),
        (
            "block: [se]\nat: [stage_output]\nattn_lr_scale: [5000]\n",
            "attn_lr_scale: 5000 is not allowed; numbers from 0.001 to 1000",
        ),
        (
            "block: [se]\nat: [stage_output]\nratio: [8, 8.0]\n",
            "both read as 'se ratio=8 @stage_output identity'",
        ),
    ],
)
def test_a_space_with_a_value_out_of_range_or_of_another_type_is_refused_in_one_line(tmp_path, text, message):
    from attn_inject.search import SearchError, load_space

    space = tmp_path / "space.yaml"
    space.write_text(text)
    with pytest.raises(SearchError) as caught:
        load_space(space)
    line = str(caught.value)
    assert message in line and "\n" not in line and len(line) < 400


# --- storage URLs and the command line ----------------------------------------------------------


def test_a_storage_password_is_hidden_whole_and_a_long_url_is_cut():
    assert safe_url("postgresql://user:p@ss/w@rd@db.host:5432/x") == "postgresql://user:***@db.host:5432/x"
    assert (
        safe_url("postgresql://db/x?user=u&password=s3cr@t&ssl=1")
        == "postgresql://db/x?user=u&password=***&ssl=1"
    )
    assert safe_url("sqlite:////tmp/a@b/study.db") == "sqlite:////tmp/a@b/study.db"  # no credentials
    assert len(safe_url("sqlite:///" + "x" * 5000)) <= 120


def test_a_5000_character_storage_url_is_quoted_cut(data, tmp_path, capsys):
    url = "postgresql+psycopg2://u:secret@127.0.0.1:1/" + "x" * 5000
    assert main([*args(data, tmp_path / "run", "se_resnet"), "--storage", url]) == 1
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "cannot open it" in line and "secret" not in line and len(line) < 1000


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--repeats", "0"], "--repeats must be from 1 to 1000, got 0"),
        (["--sampler", "tpe", "--n-trials", "2"], "--sampler tpe searches a --space"),
        (["--heartbeat", "0"], "--heartbeat must be at least 1 second"),
    ],
)
def test_command_line_mistakes_exit_2_and_write_nothing(data, tmp_path, capsys, extra, message):
    out = tmp_path / "run"
    assert main([*args(data, out, "se_resnet"), *extra]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert message in line and not out.exists()


def test_a_base_checkpoint_without_model_exits_2(data, tmp_path, capsys):
    argv = [a for a in args(data, tmp_path / "run", "se_resnet") if a not in ("--model", f"timm:{SEARCHED}")]
    argv = [a for a in argv if a not in ("--model-kwargs", "num_classes=2")]
    argv += ["--checkpoint", str(tmp_path / "base.safetensors"), "--base-checkpoint", str(tmp_path / "x.pth")]
    assert main(argv) == 2
    assert "--base-checkpoint goes with --model" in capsys.readouterr().err


def test_a_waiting_trial_is_claimed_by_one_worker_only(tmp_path):
    from attn_inject.search.study import _claim

    spec = _spec(tmp_path)
    study = open_study(spec)
    (waiting,) = study.get_trials(states=(TrialState.WAITING,))
    other = study_of_spec(spec)  # a second worker's view of the same study
    assert _claim(study._storage, waiting._trial_id) is True
    assert _claim(other._storage, waiting._trial_id) is False  # it saw "waiting" too, once
    assert [t.state for t in study_of_spec(spec).trials] == [TrialState.RUNNING]


# --- links and special files in --out ----------------------------------------------------------


def _one_line(err: str) -> str:
    (line,) = err.strip().splitlines()
    return line


def _retry_of_the_baseline(out: Path) -> None:
    """The baseline's finished trial marked failed and a retry of it waiting (trial 2, in
    trials/0002-seed0), as Optuna's retry callback leaves them."""
    study = study_of(out)
    with sqlite3.connect(out / "study.db") as db:
        db.execute("UPDATE trials SET state = 'FAIL' WHERE number = 0")
    study.add_trial(
        optuna.trial.create_trial(
            state=TrialState.WAITING,
            user_attrs={"candidate": "baseline", "seeds": [0]},
            system_attrs={"fixed_params": {"candidate": "baseline"}, "failed_trial": 0},
        )
    )


@pytest.mark.parametrize("linked", ["run", "start.safetensors", "folder"])
def test_a_trial_whose_run_folder_or_start_file_is_a_link_fails_and_nothing_is_written_through_it(
    data, finished_study, tmp_path, capsys, linked
):
    out = copy_of(finished_study, tmp_path / "run")
    _retry_of_the_baseline(out)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "summary.csv").write_text("precious")
    folder = out / "trials" / "0002-seed0"
    if linked == "folder":  # even a link that stays inside --out
        (out / "elsewhere").mkdir()
        folder.symlink_to(out / "elsewhere")
    else:
        folder.mkdir()
        (folder / linked).symlink_to(outside / ("summary.csv" if linked != "run" else ""))
    main(args(data, out, "se_resnet", repeats=1))
    err = capsys.readouterr().err
    (line,) = [line for line in err.splitlines() if "trial 2 failed" in line]
    assert "is a symbolic link" in line and "(not links), or absent" in line
    assert [p.name for p in outside.iterdir()] == ["summary.csv"]
    assert (outside / "summary.csv").read_text() == "precious"


@pytest.mark.parametrize("how", ["link to a new file", "link to another database", "fifo", "journal link"])
def test_a_study_db_that_is_a_link_or_not_a_file_is_refused_and_nothing_outside_is_touched(
    data, tmp_path, capsys, how
):
    out, outside = tmp_path / "run", tmp_path / "outside"
    out.mkdir()
    outside.mkdir()
    app = outside / "app.db"
    with sqlite3.connect(app) as db:
        db.execute("CREATE TABLE notes(x)")
    before = app.read_bytes()
    if how == "link to a new file":
        (out / "study.db").symlink_to(outside / "created.db")
    elif how == "link to another database":
        (out / "study.db").symlink_to(app)
    elif how == "fifo":
        os.mkfifo(out / "study.db")
    else:
        (out / "study.db-journal").symlink_to(app)
    assert main(args(data, out, "se_resnet", repeats=1)) == 1
    line = _one_line(capsys.readouterr().err)
    assert f"{out.resolve()}/study.db" in line and "must be a regular file inside --out" in line
    assert sorted(p.name for p in outside.iterdir()) == ["app.db"] and app.read_bytes() == before
    assert not (out / "trials").exists()


# --- SQL the database carries ------------------------------------------------------------------

ENDLESS = "(WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT count(*) FROM c)"


@pytest.mark.parametrize(
    "sql, what",
    [
        (f"CREATE TRIGGER slow AFTER UPDATE ON trials BEGIN SELECT {ENDLESS}; END;", "trigger 'slow'"),
        (
            "ALTER TABLE study_user_attributes RENAME TO real; CREATE VIEW study_user_attributes AS "
            f"SELECT * FROM real WHERE {ENDLESS} > 0;",
            "view 'study_user_attributes'",
        ),
        (
            "ALTER TABLE study_user_attributes RENAME TO real; CREATE VIEW study_user_attributes AS "
            "SELECT study_user_attribute_id, study_id, key, hex(zeroblob(100000000)) AS value_json "
            "FROM real;",
            "view 'study_user_attributes'",
        ),
    ],
    ids=["endless trigger", "endless view", "amplifying view"],
)
def test_a_study_db_with_a_view_or_a_trigger_is_refused_before_any_of_its_sql_runs(
    data, finished_study, tmp_path, capsys, sql, what
):
    out = copy_of(finished_study, tmp_path / "run")
    with sqlite3.connect(out / "study.db") as db:
        db.executescript(sql)
    before = (out / "study.db").read_bytes()
    assert main(args(data, out, "se_resnet", repeats=1)) == 1  # at once: no hang, no 700 MB
    line = _one_line(capsys.readouterr().err)
    assert f"{out}/study.db: the study database holds {what}" in line
    assert "only Optuna's tables (alembic_version, studies," in line and "no view, no trigger" in line
    assert (out / "study.db").read_bytes() == before


def test_the_allowed_schema_is_the_installed_optunas_own(tmp_path):
    from attn_inject.search.database import optuna_schema

    optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 'fresh.db'}")  # an independent reference
    with sqlite3.connect(tmp_path / "fresh.db") as db:
        fresh = set(db.execute("SELECT type, name FROM sqlite_master").fetchall())
    assert optuna_schema() == fresh


def test_a_runaway_statement_on_the_storage_is_stopped_in_one_line_naming_the_file(tmp_path, monkeypatch):
    from attn_inject.search import database
    from attn_inject.search import study as study_module

    spec = _spec(tmp_path)
    open_study(spec)
    with sqlite3.connect(tmp_path / "study.db") as db:  # SQL the schema check would refuse
        db.execute(f"CREATE TRIGGER slow AFTER UPDATE ON trials BEGIN SELECT {ENDLESS}; END;")
    monkeypatch.setattr(study_module, "check_sqlite", lambda path: None)
    monkeypatch.setattr(database, "STATEMENT_SECONDS", 0.5)
    study = open_study(spec)
    with pytest.raises(database.StudyDatabaseError) as caught:
        work(study, spec, lambda trial: 50.0, timeout=30)  # claiming the trial updates it
    line = str(caught.value)
    assert line.startswith(str(tmp_path / "study.db")) and "ran past 0.5 s and was stopped" in line


def test_a_value_longer_than_the_limit_is_refused_before_it_is_read(tmp_path, monkeypatch):
    from attn_inject.search import database

    spec = _spec(tmp_path)
    open_study(spec)
    with sqlite3.connect(tmp_path / "study.db") as db:
        db.execute(
            "UPDATE study_user_attributes SET value_json = ? WHERE key = 'k'", ('"' + "x" * 5000 + '"',)
        )
    monkeypatch.setattr(database, "MAX_VALUE_BYTES", 1000)
    with pytest.raises(database.StudyDatabaseError) as caught:
        open_study(spec)
    assert str(caught.value).startswith(str(tmp_path / "study.db")) and "at most 1,000" in str(caught.value)


@pytest.mark.parametrize(
    "sql",
    [
        "UPDATE trials SET datetime_start = 'not a date' WHERE number = 0",
        "UPDATE trials SET state = 'EXPLODED' WHERE number = 0",
        "UPDATE trial_user_attributes SET value_json = '{bad' WHERE key = 'recipe'",
        "UPDATE study_user_attributes SET value_json = '"
        + "[" * 100_000
        + "]" * 100_000
        + "' WHERE key = 'base'",
    ],
    ids=["date", "state", "json", "deep json"],
)
def test_a_malformed_row_is_one_line_naming_the_study_db(data, finished_study, tmp_path, capsys, sql):
    out = copy_of(finished_study, tmp_path / "run")
    with sqlite3.connect(out / "study.db") as db:
        db.execute(sql)
    assert main(args(data, out, "se_resnet", repeats=1)) == 1
    line = _one_line(capsys.readouterr().err)
    assert f"{out}/study.db: cannot read the study in it: " in line and len(line) < 600


# --- heartbeats --------------------------------------------------------------------------------


def test_a_running_trial_whose_heartbeat_never_moves_is_failed_and_rerun(tmp_path, capsys):
    spec = _spec(tmp_path, heartbeat=1)
    study = open_study(spec)
    (waiting,) = study.get_trials(states=(TrialState.WAITING,))
    study._storage.set_trial_state_values(waiting._trial_id, state=TrialState.RUNNING)
    with sqlite3.connect(tmp_path / "study.db") as db:  # dated in the future: never stale by the date
        db.execute(
            "INSERT INTO trial_heartbeats(trial_id, heartbeat) VALUES (?, '9999-12-31 00:00:00')",
            (waiting._trial_id,),
        )
    began = time.monotonic()
    assert work(study, spec, lambda trial: 50.0, timeout=30) == 1
    assert time.monotonic() - began < 10
    trials = study_of_spec(spec).trials
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.COMPLETE]
    assert trials[1].system_attrs["failed_trial"] == 0
    assert "trial 0 has a heartbeat (9999-12-31 00:00:00) that has not moved for" in capsys.readouterr().err


def test_a_heartbeat_that_cannot_be_recorded_is_one_line_and_the_beats_go_on(capsys):
    from attn_inject.search.study import _heartbeat

    class Locked:
        calls = 0

        def record_heartbeat(self, trial_id: int) -> None:
            self.calls += 1
            raise RuntimeError("database is locked\n" + "  a traceback line\n" * 90)

    storage = Locked()
    with _heartbeat(storage, 7, 0.05):  # type: ignore[arg-type]
        time.sleep(0.3)
    assert storage.calls >= 3
    line = _one_line(capsys.readouterr().err)
    assert "recording the heartbeat of a trial failed: RuntimeError: database is locked" in line


# --- forged waiting trials choose no compute ---------------------------------------------------


def test_forged_waiting_trials_of_a_grid_run_nothing_the_command_did_not_ask_for(
    data, finished_study, tmp_path, capsys
):
    out = copy_of(finished_study, tmp_path / "run")
    study = study_of(out)
    study.enqueue_trial({}, user_attrs={"seeds": [0]})  # 2: no candidate
    study.enqueue_trial({"candidate": "../../evil"}, user_attrs={"candidate": "baseline", "seeds": [0]})
    study.enqueue_trial({"candidate": "baseline"}, user_attrs={"candidate": "baseline", "seeds": [7, 8]})
    study.enqueue_trial({"candidate": "baseline"}, user_attrs={"candidate": "baseline", "seeds": [0]})  # 5
    assert main(args(data, out, "se_resnet", repeats=1)) == 0
    lines = capsys.readouterr().err.splitlines()
    for number, message in [
        (2, "has no candidate; a grid's trial names one of this search's 2 candidates"),
        (3, "its parameter candidate '../../evil' is not its candidate 'baseline'"),
        (4, "seeds [7, 8] are not allowed; distinct seeds of this command's (0)"),
        (5, "baseline with seed 0 is run by trial 0 already; a study runs each candidate and seed once"),
    ]:
        (line,) = [line for line in lines if f"trial {number} failed" in line]
        assert message in line, line
    assert sorted(p.name for p in (out / "trials").iterdir()) == ["0000-seed0", "0001-seed0"]


# --- the report: written whole, from files attn-inject wrote ----------------------------------------


def test_a_report_file_that_is_a_folder_is_refused_before_any_file_is_replaced(
    data, finished_study, tmp_path, capsys
):
    out = copy_of(finished_study, tmp_path / "run")
    for name in ("leaderboard.csv", "pareto.png", "best.safetensors"):
        (out / name).write_text("OLD")
    (out / "leaderboard.md").unlink()
    (out / "leaderboard.md").mkdir()
    assert main(args(data, out, "se_resnet", repeats=1)) == 1
    line = _one_line(capsys.readouterr().err)
    assert f"{out}/leaderboard.md: a folder; the report's files" in line and "regular files or absent" in line
    for name in ("leaderboard.csv", "pareto.png", "best.safetensors"):
        assert (out / name).read_text() == "OLD", name
    assert not list(out.glob(".*.tmp*"))


def test_a_best_run_file_that_is_not_a_safetensors_file_is_not_copied(data, finished_study, tmp_path, capsys):
    out = copy_of(finished_study, tmp_path / "run")
    for weights in out.glob("trials/*/run/last.safetensors"):  # 1 GB of zeros, sparse on disk
        weights.unlink()
        with open(weights, "wb") as f:
            f.truncate(1 << 30)
    assert main(args(data, out, "se_resnet", repeats=1)) == 0
    assert not (out / "best.safetensors").exists()
    report = (out / "leaderboard.md").read_text()
    assert "/last.safetensors is not a file attn-inject wrote: " in report
