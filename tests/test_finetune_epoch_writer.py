"""An epoch's files written on a thread of their own while the next epoch trains: what is
written is the epoch's state as it ended, a stop still finds every file whole and is
advised from them, and a write that fails fails the run."""

from __future__ import annotations

import os
import shutil
import signal
import threading
import time
from collections import OrderedDict
from pathlib import Path

import pytest
import safetensors.torch
import torch

import attn_inject.saving.file as saving_file
from attn_inject.cli.main import main
from attn_inject.finetune import run as run_module
from attn_inject.finetune.config import FinetuneConfig
from attn_inject.finetune.epoch_writer import copied, epoch_writer

from .test_finetune_run import PX, finetune_args, read_rows, save_patched, write_folder


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_folder(tmp_path_factory.mktemp("data"), {"train": 4, "val": 2})


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return save_patched(tmp_path_factory.mktemp("ckpt") / "cbam.safetensors")


# --- the copy ---------------------------------------------------------------------------


def _tree() -> dict:
    weights = OrderedDict(w=torch.arange(6.0).reshape(2, 3), n=torch.tensor(3))
    weights._metadata = {"": {"version": 2}}  # type: ignore[attr-defined]
    moments = [torch.ones(4), (torch.zeros(2), 0.5)]
    return {"model": weights, "moments": moments, "epoch": 1, "rows": [{"a": 1.0}]}


def test_a_copy_keeps_the_values_it_was_taken_with_when_the_originals_change_in_place():
    tree = _tree()
    copy = copied(tree)
    tree["model"]["w"].add_(100)
    tree["model"]["n"].add_(1)
    tree["moments"][0].mul_(7)
    tree["moments"][1][0].add_(1)
    tree["rows"][0]["a"] = 9.0
    assert torch.equal(copy["model"]["w"], torch.arange(6.0).reshape(2, 3))
    assert copy["model"]["n"].item() == 3 and copy["model"]["n"].dtype == torch.int64
    assert torch.equal(copy["moments"][0], torch.ones(4))
    assert torch.equal(copy["moments"][1][0], torch.zeros(2)) and copy["moments"][1][1] == 0.5
    assert copy["rows"] == [{"a": 1.0}] and copy["epoch"] == 1
    assert type(copy["model"]) is OrderedDict and copy["model"]._metadata == {"": {"version": 2}}
    assert isinstance(copy["moments"][1], tuple)


def test_a_copy_goes_into_the_last_copy_where_shape_and_dtype_match_and_nowhere_else():
    first = copied(_tree())
    kept = first["model"]["w"].data_ptr()
    tree = _tree()
    tree["model"]["w"] = torch.full((2, 3), 5.0)
    tree["moments"][0] = torch.ones(5)  # another shape: a new tensor
    second = copied(tree, first)
    weight, moment = second["model"]["w"], second["moments"][0]
    assert weight.data_ptr() == kept and torch.equal(weight, torch.full((2, 3), 5.0))
    assert moment.shape == (5,) and moment.data_ptr() != tree["moments"][0].data_ptr()
    assert weight.data_ptr() != tree["model"]["w"].data_ptr()


# --- the writer -------------------------------------------------------------------------


def test_a_write_that_fails_is_raised_when_the_writer_closes():
    with pytest.raises(OSError, match="disk full"), epoch_writer() as writer:

        def fail() -> None:
            raise OSError("disk full")

        writer.submit(fail)


def test_an_error_of_the_run_waits_for_the_write_under_way_and_goes_on():
    done = []

    def slow() -> None:
        time.sleep(0.3)
        done.append(True)

    with pytest.raises(ValueError, match="the run's"), epoch_writer() as writer:
        writer.submit(slow)
        raise ValueError("the run's")
    assert done == [True]


# --- in a run ---------------------------------------------------------------------------


class _Halt(Exception):
    pass


def _config(checkpoint: Path, data: Path, out: Path) -> FinetuneConfig:
    return FinetuneConfig(
        str(checkpoint), str(data), 2, str(out), batch_size=4, image_size=PX, workers=0, threads=1
    )


def test_the_files_of_an_epoch_hold_its_state_though_the_next_epoch_trains_before_they_are_written(
    checkpoint, data, tmp_path, monkeypatch
):
    """Epoch 1's files are held back until epoch 2 has trained; they must still equal those of
    a run stopped after epoch 1 (whose files nothing changed meanwhile)."""
    reference = tmp_path / "stopped"

    def halt(row: dict) -> None:
        raise _Halt

    with pytest.raises(_Halt):
        run_module.run(_config(checkpoint, data, reference), on_epoch=halt)

    trained, real_train, real_write, real_save_state = (
        threading.Event(),
        run_module.train_one_epoch,
        saving_file.write_weights,
        run_module.save_state,
    )
    calls: list[int] = []

    def train(*args, **kwargs):
        calls.append(1)
        result = real_train(*args, **kwargs)
        if len(calls) == 2:
            trained.set()
        return result

    def held_back(path, tensors, manifest, **kwargs):
        if manifest.training["epoch"] == 1:
            assert trained.wait(60), "epoch 2 never trained"
        real_write(path, tensors, manifest, **kwargs)

    def keep_epoch_1(path: Path, state: dict) -> None:
        real_save_state(path, state)
        if state["epoch"] == 1:
            shutil.copyfile(path, tmp_path / "epoch1.pth")
            shutil.copyfile(path.parent / "last.safetensors", tmp_path / "epoch1.safetensors")

    monkeypatch.setattr(run_module, "train_one_epoch", train)
    monkeypatch.setattr(saving_file, "write_weights", held_back)
    monkeypatch.setattr(run_module, "save_state", keep_epoch_1)
    run_module.run(_config(checkpoint, data, tmp_path / "full"))

    mine = torch.load(tmp_path / "epoch1.pth", weights_only=True)
    theirs = torch.load(reference / "resume.pth", weights_only=True)
    assert mine["epoch"] == theirs["epoch"] == 1
    for key, tensor in theirs["model"].items():
        assert torch.equal(mine["model"][key], tensor), key
    for index, moments in theirs["optimizer"]["state"].items():
        for name, tensor in moments.items():
            assert torch.equal(mine["optimizer"]["state"][index][name], tensor), (index, name)
    weights = safetensors.torch.load_file(tmp_path / "epoch1.safetensors")
    assert weights.keys() == theirs["model"].keys()
    assert all(torch.equal(weights[k], theirs["model"][k]) for k in weights)
    final = torch.load(tmp_path / "full" / "resume.pth", weights_only=True)
    assert final["epoch"] == 2
    assert any(not torch.equal(final["model"][k], t) for k, t in theirs["model"].items())


def test_a_sigterm_while_the_last_epoch_is_written_advises_resume_and_leaves_no_temporary(
    checkpoint, data, tmp_path, capsys, monkeypatch
):
    real_train, real_write = run_module.train_one_epoch, saving_file.write_weights
    calls: list[int] = []

    def train(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # epoch 1's files are being written, held back below
            os.kill(os.getpid(), signal.SIGTERM)
        return real_train(*args, **kwargs)

    def slow(*args, **kwargs):
        time.sleep(0.5)
        real_write(*args, **kwargs)

    monkeypatch.setattr(run_module, "train_one_epoch", train)
    monkeypatch.setattr(saving_file, "write_weights", slow)
    out = tmp_path / "run"
    assert main(finetune_args(checkpoint, data, out, epochs=2)) == 143
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert "stopped by SIGTERM" in last and "--resume" in last, last
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]
    assert len(read_rows(out / "summary.csv")) == 1
    monkeypatch.undo()
    assert main(finetune_args(checkpoint, data, out, "--resume", epochs=2)) == 0


def test_a_write_that_fails_fails_the_run_with_one_line_and_no_temporary(
    checkpoint, data, tmp_path, capsys, monkeypatch
):
    import attn_inject.finetune.curves as curves

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(curves, "plot_curves", full)
    out = tmp_path / "run"
    assert main(finetune_args(checkpoint, data, out, epochs=2)) == 1
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert "No space left on device" in last, last
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]


# --- when the curves are drawn ------------------------------------------------------------


def test_the_curves_schedule_draws_at_most_every_period_and_the_last_epoch(monkeypatch):
    from attn_inject.finetune import curves

    now = [100.0]
    monkeypatch.setattr(curves.time, "monotonic", lambda: now[0])
    schedule = curves.CurvesSchedule(every_s=60.0)
    now[0] += 30.0
    assert not schedule.due(1, last=False)  # half a period after the run began
    now[0] += 30.0
    assert schedule.due(1, last=False)
    schedule.drawn(1)
    now[0] += 59.0
    assert not schedule.due(2, last=False)
    assert schedule.due(2, last=True)  # the last epoch always
    now[0] += 1.0
    assert schedule.due(2, last=False)  # a period after the last drawing
    schedule.drawn(2)
    assert not schedule.due(2, last=True)  # nothing new to draw


def _drawn_rows(monkeypatch) -> list[int]:
    """The number of epochs each drawing of the curves showed, in order."""
    import attn_inject.finetune.curves as curves

    real, drawn = curves.plot_curves, []

    def counting(runs, path, **kwargs):
        drawn.append(len(next(iter(runs.values()))))
        real(runs, path, **kwargs)

    monkeypatch.setattr(curves, "plot_curves", counting)
    return drawn


def test_short_epochs_draw_the_curves_once_at_the_end(checkpoint, data, tmp_path, monkeypatch):
    drawn = _drawn_rows(monkeypatch)
    out = tmp_path / "run"
    assert main(finetune_args(checkpoint, data, out, epochs=3)) == 0
    assert drawn == [3] and (out / "curves.png").stat().st_size > 0
    assert len(read_rows(out / "summary.csv")) == 3  # the summary is written every epoch


def test_a_run_stopped_with_epochs_not_drawn_draws_them_before_it_ends(
    checkpoint, data, tmp_path, capsys, monkeypatch
):
    drawn = _drawn_rows(monkeypatch)
    real_train, calls = run_module.train_one_epoch, []

    def train(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:  # two epochs done in under a minute: not drawn yet
            os.kill(os.getpid(), signal.SIGTERM)
        return real_train(*args, **kwargs)

    monkeypatch.setattr(run_module, "train_one_epoch", train)
    out = tmp_path / "run"
    assert main(finetune_args(checkpoint, data, out, epochs=3)) == 143
    assert "stopped by SIGTERM" in capsys.readouterr().err
    assert drawn == [2] and len(read_rows(out / "summary.csv")) == 2
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]
