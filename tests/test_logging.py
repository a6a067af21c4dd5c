"""What a fine-tune reports while it runs: a line every ``--log-interval`` steps in a pipe
(loss, lr, images/s, ETA), and the same figures in TensorBoard, MLflow and W&B, read back
with each tool's own reader and compared with the run's ``summary.csv``."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import re
import sys
from pathlib import Path

import pytest

from attn_inject.cli.main import main
from attn_inject.finetune import trackers as trackers_module

from .test_finetune_run import finetune_args, read_rows, save_patched, write_folder

STEPS = 3  # 3 classes x 4 training images, batches of 4
LINE = re.compile(
    r"^epoch (\d)/(\d) \[\s*(\d+)/(\d+)\s+(\d+)%\] loss ([\d.]+) \(([\d.]+)\), lr ([\d.e+-]+), "
    r"([\d.]+) images/s, ETA (\d+:\d\d:\d\d) epoch, (\d+:\d\d:\d\d) run$"
)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_folder(tmp_path_factory.mktemp("data"), {"train": 4, "val": 3})


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return save_patched(tmp_path_factory.mktemp("ckpt") / "cbam.safetensors")


def step_lines(err: str) -> list[re.Match]:
    return [m for m in map(LINE.match, err.splitlines()) if m]


@dataclasses.dataclass(frozen=True)
class LoggedRun:
    """A finished two-epoch fine-tune: its folder, what it printed, and where it logged."""

    out: Path
    err: str
    board: Path | None = None
    mlflow_uri: str | None = None


def _logged_run(checkpoint: Path, data: Path, folder: Path, interval: int, trackers: bool) -> LoggedRun:
    out, board, uri = folder / "run", folder / "tb", (folder / "mlruns").as_uri()
    extra = ["--log-interval", str(interval)]
    if trackers:
        extra += ["--log-tensorboard", str(board), "--log-mlflow"]
    with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stderr(io.StringIO()) as err:
        patch.setenv("MLFLOW_TRACKING_URI", uri)
        patch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # the file store, kept for tests
        patch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
        assert main(finetune_args(checkpoint, data, out, *extra, epochs=2)) == 0
    if not trackers:
        return LoggedRun(out, err.getvalue())
    return LoggedRun(out, err.getvalue(), board, uri)


@pytest.fixture(scope="module")
def every_step(checkpoint, data, tmp_path_factory) -> LoggedRun:
    """A run printing into a pipe (not a terminal: lines, no bar) at every step."""
    return _logged_run(checkpoint, data, tmp_path_factory.mktemp("every"), 1, trackers=False)


@pytest.fixture(scope="module")
def tracked(checkpoint, data, tmp_path_factory) -> LoggedRun:
    """One run read by several tests: every 2 steps into a pipe, TensorBoard and MLflow."""
    pytest.importorskip("tensorboard")
    pytest.importorskip("mlflow")
    return _logged_run(checkpoint, data, tmp_path_factory.mktemp("tracked"), 2, trackers=True)


@pytest.mark.parametrize("run, logged_steps", [("every_step", [1, 2, 3]), ("tracked", [2, 3])])
def test_a_pipe_gets_a_line_every_log_interval_with_loss_lr_throughput_and_eta(request, run, logged_steps):
    """``--log-interval 1`` and ``2``: a line at every step, and every other step plus the last."""
    done: LoggedRun = request.getfixturevalue(run)
    lines = step_lines(done.err)
    assert [(int(m[1]), int(m[3])) for m in lines] == [(e, s) for e in (1, 2) for s in logged_steps]
    summary = read_rows(done.out / "summary.csv")
    for epoch, row in enumerate(summary, start=1):
        last = [m for m in lines if int(m[1]) == epoch][-1]
        assert int(last[4]) == STEPS and int(last[5]) == 100
        # the epoch's mean loss so far, at its last step, is the summary's train loss (equal batches)
        assert float(last[7]) == pytest.approx(float(row["train_loss"]), abs=1e-4)
        assert float(last[8]) == pytest.approx(float(row["lr"]), rel=1e-2)
        assert last[10] == "0:00:00"  # nothing left of the epoch
    assert all(float(m[9]) > 0 for m in lines)
    assert lines[-1][11] == "0:00:00"  # nothing left of the run


def test_a_log_interval_below_one_exits_2(checkpoint, data, tmp_path, capsys):
    assert main(finetune_args(checkpoint, data, tmp_path / "run", "--log-interval", "0")) == 2
    assert "--log-interval must be at least 1" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_tensorboard_event_files_hold_the_summary_per_epoch_and_the_steps(tracked):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tracked.board))
    events.Reload()
    summary = read_rows(tracked.out / "summary.csv")
    top1 = [(e.step, e.value) for e in events.Scalars("eval/top1")]
    assert top1 == [(STEPS * k, pytest.approx(float(r["eval_top1"]))) for k, r in enumerate(summary, 1)]
    losses = [(e.step, e.value) for e in events.Scalars("train/epoch_loss")]
    assert [v for _, v in losses] == pytest.approx([float(r["train_loss"]) for r in summary], rel=1e-5)
    # every 2 steps and each epoch's last
    assert [e.step for e in events.Scalars("train/loss")] == [2, 3, 5, 6]
    assert all(e.value > 0 for e in events.Scalars("train/images_per_s"))
    assert "settings" in "".join(events.Tags()["tensors"])


def test_mlflow_records_params_metrics_and_a_finished_run(tracked):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracked.mlflow_uri)
    experiment = client.get_experiment_by_name("attn-inject")
    (found,) = client.search_runs([experiment.experiment_id])
    assert found.info.status == "FINISHED"
    assert found.data.params["lr"] == "0.001" and found.data.params["epochs"] == "2"
    summary = read_rows(tracked.out / "summary.csv")
    history = client.get_metric_history(found.info.run_id, "eval/top1")
    assert [(m.step, m.value) for m in history] == [
        (STEPS * k, pytest.approx(float(r["eval_top1"]))) for k, r in enumerate(summary, 1)
    ]
    steps = [m.step for m in client.get_metric_history(found.info.run_id, "train/loss")]
    assert steps == [2, 3, 5, 6]  # --log-interval 2: every 2 steps and each epoch's last


@pytest.mark.parametrize("flag, module, package", [("--log-mlflow", "mlflow", "mlflow-skinny"),
                                                  ("--log-wandb", "wandb", "wandb")])  # fmt: skip
def test_a_tracker_whose_package_is_missing_exits_2_in_one_line_before_anything_is_written(
    checkpoint, data, tmp_path, capsys, monkeypatch, flag, module, package
):
    monkeypatch.setitem(sys.modules, module, None)  # import fails, as when not installed
    out = tmp_path / "run"
    assert main(finetune_args(checkpoint, data, out, flag)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    needs = f"{flag} needs the {module} package, which is not installed: pip install {package}"
    assert err == [f"attn-inject: error: {needs}"]
    assert not out.exists()


def test_a_tracker_that_fails_mid_run_is_dropped_with_one_line_and_the_run_finishes(
    checkpoint, data, tmp_path, capsys, monkeypatch
):
    pytest.importorskip("tensorboard")

    def broken(self, metrics, step):
        raise OSError("disk full")

    monkeypatch.setattr(trackers_module._TensorBoard, "log", broken)
    out = tmp_path / "run"
    assert (
        main(finetune_args(checkpoint, data, out, "--log-tensorboard", str(tmp_path / "tb"), epochs=2)) == 0
    )
    err = capsys.readouterr().err
    assert err.count("TensorBoard stopped logging (OSError: disk full); the run goes on") == 1
    assert len(read_rows(out / "summary.csv")) == 2


def test_wandb_offline_run_is_written_on_the_machine(checkpoint, data, tmp_path, monkeypatch):
    pytest.importorskip("wandb", reason="wandb is not installed (not a test dependency)")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "run"
    assert main(finetune_args(checkpoint, data, out, "--log-wandb")) == 0
    assert list((tmp_path / "wandb").rglob("offline-run-*")) or list(out.rglob("offline-run-*"))
