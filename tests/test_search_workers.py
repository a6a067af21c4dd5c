"""``attn-inject search`` across processes: worker processes sharing one study, on SQLite and
on a PostgreSQL server the test starts, and a worker killed mid-trial. In each test one worker
is a process of its own and the other runs in the test's process, beside it."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from attn_inject.cli.main import main

from .test_search import REPO, args, data, finished, optuna, study_of

__all__ = ["data"]  # the digits fixture, shared with test_search.py

pytestmark = pytest.mark.processes


def _worker(data: Path, out: Path, *extra: str, recipes=("se_resnet",), **kw):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    return subprocess.Popen(
        [sys.executable, "-m", "attn_inject", "--json", *args(data, out, *recipes, **kw), *extra],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _ran(process) -> int:
    stdout, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, stderr[-2000:]
    return json.loads(stdout.strip().splitlines()[-1])["ran"]


def _started_a_trial(process, out: Path) -> None:
    """Wait until the worker ``process`` has begun its first trial under ``out``."""
    deadline = time.monotonic() + 120
    while not (out / "trials").is_dir() and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.1)


def _ran_here(capsys, data: Path, out: Path, *extra: str, recipes=("se_resnet",), **kw) -> int:
    """A worker in this test's own process (the other workers are processes of their own):
    the number of trials it ran."""
    capsys.readouterr()
    assert main(["--json", *args(data, out, *recipes, **kw), *extra]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])["ran"]


def test_two_workers_on_one_sqlite_study_run_every_trial_exactly_once(data, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    other = _worker(data, out)
    _started_a_trial(other, out)  # the study is shared while both work
    ran = [_ran_here(capsys, data, out), _ran(other)]
    study = study_of(out)
    grid = sorted((n, (s,)) for n in ("baseline", "se_resnet") for s in (0, 1))
    assert finished(study) == grid and sum(ran) == len(grid) == len(study.trials)


def test_a_worker_killed_mid_trial_has_its_trial_retried_and_the_study_completes(data, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    # two epochs: the kill lands after the first epoch's files, inside the trial
    first = _worker(data, out, "--heartbeat", "1", recipes=("se_resnet",), repeats=1, epochs=2)
    deadline = time.monotonic() + 120
    while not list(out.glob("trials/*/run/summary.csv")) and time.monotonic() < deadline:
        time.sleep(0.1)  # killed once a fine-tune is under way
    first.send_signal(signal.SIGKILL)
    first.communicate()
    _ran_here(capsys, data, out, "--heartbeat", "1", recipes=("se_resnet",), repeats=1, epochs=2)
    study = study_of(out)
    states = [t.state for t in study.trials]
    assert finished(study) == [("baseline", (0,)), ("se_resnet", (0,))]
    assert states.count(optuna.trial.TrialState.FAIL) == 1  # the killed worker's, then retried
    failed = next(t for t in study.trials if t.state == optuna.trial.TrialState.FAIL)
    retry = [t for t in study.trials if t.system_attrs.get("failed_trial") == failed.number]
    assert len(retry) == 1 and retry[0].state == optuna.trial.TrialState.COMPLETE


def _postgres_bin(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found

    def version(path: Path) -> tuple[int, ...]:  # /usr/lib/postgresql/15/bin/NAME: 15 above 9.6
        return tuple(int(part) for part in path.parent.parent.name.split(".") if part.isdigit())

    candidates = sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"), key=version)
    return str(candidates[-1]) if candidates else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def postgres():
    """A PostgreSQL server of Debian's ``postgresql`` package on a free local port, stopped
    afterwards (run as the ``postgres`` user when the tests run as root)."""
    initdb, pg_ctl = _postgres_bin("initdb"), _postgres_bin("pg_ctl")
    if not initdb or not pg_ctl:
        pytest.skip("no PostgreSQL server binaries (initdb, pg_ctl): apt-get install postgresql")
    pytest.importorskip("psycopg2", reason="the PostgreSQL driver psycopg2 is not installed")
    as_user: list[str] = []
    folder = Path(tempfile.mkdtemp(prefix="attn-inject-pg-"))
    if os.geteuid() == 0:
        import pwd

        try:
            user = pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root and there is no 'postgres' user to run the server as")
        os.chown(folder, user.pw_uid, user.pw_gid)
        as_user = ["runuser", "-u", "postgres", "--"]
    port = _free_port()
    data = folder / "data"
    subprocess.run(
        [*as_user, initdb, "-D", str(data), "-A", "trust", "-U", "postgres"], check=True, capture_output=True
    )
    options = f"-p {port} -k {folder} -c listen_addresses=127.0.0.1"
    subprocess.run(
        [*as_user, pg_ctl, "-D", str(data), "-o", options, "-l", str(folder / "log"), "-w", "start"],
        check=True,
        capture_output=True,
    )
    try:
        yield f"postgresql+psycopg2://postgres@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run([*as_user, pg_ctl, "-D", str(data), "-m", "immediate", "stop"], capture_output=True)
        shutil.rmtree(folder, ignore_errors=True)


def test_two_workers_on_one_postgresql_study_run_every_trial_exactly_once(data, tmp_path, postgres, capsys):
    out = tmp_path / "run"
    out.mkdir()
    other = _worker(data, out, "--storage", postgres)
    _started_a_trial(other, out)
    ran = [_ran_here(capsys, data, out, "--storage", postgres), _ran(other)]
    study = optuna.load_study(study_name="attn-inject-search", storage=postgres)
    grid = sorted((n, (s,)) for n in ("baseline", "se_resnet") for s in (0, 1))
    assert finished(study) == grid and sum(ran) == len(grid) == len(study.trials)
    assert not (out / "study.db").exists()  # the study lives on the server
