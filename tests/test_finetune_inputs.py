"""``attn-inject finetune`` given unlucky or hostile inputs: one seed gives one run on a
terminal and in a pipe; command-line mistakes exit 2; a stop, a foreign resume state, a
long differing setting and a 16-bit image each get one line that says what to do."""

from __future__ import annotations

import contextlib
import io
import os
import pty
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch
from PIL import Image

from attn_inject.cli.main import main
from attn_inject.finetune import run as run_module

from .test_finetune_run import CLASSES, PX, REPO, finetune_args, save_patched, write_folder


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_folder(tmp_path_factory.mktemp("data"), {"train": 4, "val": 2})


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return save_patched(tmp_path_factory.mktemp("ckpt") / "cbam.safetensors")


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


# --- one seed, one run ------------------------------------------------------------------


def _command(args: list[str]) -> tuple[list[str], dict[str, str]]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "TERM": "xterm", "COLUMNS": "100"}
    return [sys.executable, "-m", "attn_inject", *args], env


def run_here(args: list[str]) -> str:
    """The command in this process, printing into a buffer (no terminal); what it printed to
    stderr. A fresh interpreter is not needed on this side: the terminal's run is the one
    that imports rich."""
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()) as err:
        code = main(args)
    assert code == 0, err.getvalue()[-2000:]
    return err.getvalue()


def run_on_a_terminal(args: list[str]) -> bytes:
    """The command with a pseudo-terminal as its stdin, stdout and stderr; what it printed."""
    command, env = _command(args)
    leader, follower = pty.openpty()
    process = subprocess.Popen(command, env=env, stdin=follower, stdout=follower, stderr=follower)
    os.close(follower)
    printed = b""
    while True:
        try:
            chunk = os.read(leader, 1 << 16)
        except OSError:  # EIO: the terminal's other side closed
            break
        if not chunk:
            break
        printed += chunk
    os.close(leader)
    assert process.wait(timeout=300) == 0, printed[-2000:]
    return printed


@pytest.mark.processes
def test_one_seed_gives_the_same_run_in_a_pipe_and_on_a_terminal(checkpoint, data, tmp_path):
    """Only a terminal shows a progress bar, and importing rich draws from ``random``: the
    run is seeded after it, so the bar changes nothing that is computed. The terminal's run is
    a fresh interpreter on a pseudo-terminal; the other prints into a buffer here."""
    piped, terminal = tmp_path / "piped", tmp_path / "terminal"
    log = run_here(finetune_args(checkpoint, data, piped, "--seed", "3"))
    screen = run_on_a_terminal(finetune_args(checkpoint, data, terminal, "--seed", "3"))
    assert b"\x1b[?25l" in screen and "\x1b[?25l" not in log  # rich hid the cursor: a bar ran
    assert (piped / "summary.csv").read_bytes() == (terminal / "summary.csv").read_bytes()
    a = safetensors.torch.load_file(piped / "last.safetensors")
    b = safetensors.torch.load_file(terminal / "last.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# --- command-line mistakes exit 2 ---------------------------------------------------------


@pytest.mark.parametrize(
    "extra, says",
    [
        (("--epochs", "0"), "--epochs must be at least 1, got 0"),
        (("--batch-size", "0"), "--batch-size must be at least 1, got 0"),
        (("--lr", "-1"), "--lr must be a positive number, got -1.0"),
        (("--lr", "inf"), "--lr must be a positive number, got inf"),
        (("--hflip", "2"), "--hflip must be a probability in [0, 1], got 2.0"),
        (("--model-ema-decay", "1.5"), "--model-ema-decay must be in [0, 1), got 1.5"),
        (("--weight-decay", "-0.1"), "--weight-decay must be zero or a positive number"),
        (("--scale", "0.9", "0.1"), "--scale takes MIN MAX with 0 < MIN <= MAX <= 1, got 0.9 0.1"),
        (("--opt", "nosuchopt"), "--opt nosuchopt: not a timm optimizer"),
    ],
)
def test_a_setting_out_of_range_is_a_usage_error_and_writes_nothing(
    checkpoint, data, tmp_path, capsys, extra, says
):
    args = finetune_args(checkpoint, data, tmp_path / "run", *extra)
    if "--epochs" in extra:  # the helper's own --epochs replaced
        at = args.index("--epochs")
        del args[at : at + 2]
    assert main(args) == 2
    assert says in one_error_line(capsys)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("where", ["inside", "the same", "through a link"])
def test_an_output_folder_inside_the_data_is_refused(checkpoint, tmp_path, capsys, where):
    data = write_folder(tmp_path / "data", {"train": 2, "val": 1})
    out = {
        "inside": data / "train" / "runs" / "a",
        "the same": data,
        "through a link": tmp_path / "link" / "run",
    }[where]
    (tmp_path / "link").symlink_to(data / "val")
    assert main(finetune_args(checkpoint, data, out)) == 2
    line = one_error_line(capsys)
    assert "is inside --data" in line and "put RUNDIR outside the data folder" in line, line
    written = sorted(p.name for p in data.rglob("*") if not p.name.endswith(".png") and p.is_file())
    assert written == []


# --- stops, resume states, settings ---------------------------------------------------------


def _stop_in_epoch(monkeypatch, stopped_epoch: int) -> None:
    """SIGTERM delivered inside the training step of epoch ``stopped_epoch`` (from 1)."""
    real, calls = run_module.train_one_epoch, []

    def step(*args, **kwargs):
        calls.append(1)
        if len(calls) == stopped_epoch:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(*args, **kwargs)

    monkeypatch.setattr(run_module, "train_one_epoch", step)


def test_sigterm_before_the_first_epoch_ends_says_nothing_was_saved(
    checkpoint, data, tmp_path, capsys, monkeypatch
):
    _stop_in_epoch(monkeypatch, 1)
    out = tmp_path / "run"
    assert main(finetune_args(checkpoint, data, out, epochs=2)) == 143
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert "stopped by SIGTERM" in last and "nothing was saved" in last and "--resume" not in last, last
    assert not (out / "resume.pth").exists()
    monkeypatch.undo()
    assert main(finetune_args(checkpoint, data, out, "--force", epochs=2)) == 0  # what it advised


def test_sigterm_after_an_epoch_advises_the_resume_that_then_works(
    checkpoint, data, tmp_path, capsys, monkeypatch
):
    _stop_in_epoch(monkeypatch, 2)
    out = tmp_path / "run"
    assert main(finetune_args(checkpoint, data, out, epochs=2)) == 143
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert "stopped by SIGTERM" in last and "--resume" in last, last
    monkeypatch.undo()
    assert main(finetune_args(checkpoint, data, out, "--resume", epochs=2)) == 0


def test_another_models_resume_state_is_refused_in_one_line(checkpoint, data, tmp_path, capsys):
    other = save_patched(tmp_path / "se.safetensors", recipe="se_resnet")  # other blocks, same classes
    theirs, mine = tmp_path / "theirs", tmp_path / "mine"
    assert main(finetune_args(other, data, theirs)) == 0
    assert main(finetune_args(checkpoint, data, mine)) == 0
    capsys.readouterr()
    (mine / "resume.pth").write_bytes((theirs / "resume.pth").read_bytes())
    before = {p.name: p.read_bytes() for p in mine.iterdir()}
    assert main(finetune_args(checkpoint, data, mine, "--resume", epochs=2)) == 1
    line = one_error_line(capsys)
    assert "is the state of another model or run" in line and "--force" in line, line
    assert "Error(s) in loading" not in line
    assert {p.name: p.read_bytes() for p in mine.iterdir()} == before  # nothing written


def test_a_differing_setting_is_shown_where_it_differs(checkpoint, data, tmp_path, capsys):
    deep = tmp_path.joinpath(*["a-long-folder-name"] * 8)
    deep.mkdir(parents=True)
    first, second = deep / "first.safetensors", deep / "second.safetensors"
    first.write_bytes(checkpoint.read_bytes())
    second.write_bytes(checkpoint.read_bytes())
    out = tmp_path / "run"
    assert main(finetune_args(first, data, out)) == 0
    capsys.readouterr()
    assert main(finetune_args(second, data, out, "--resume", epochs=2)) == 1
    line = one_error_line(capsys)
    assert "first.safetensors" in line and "second.safetensors" in line, line
    assert len(line) < 600


def test_a_16_bit_image_is_refused_naming_the_file_and_its_mode(tmp_path, checkpoint, capsys):
    data = write_folder(tmp_path / "data", {"train": 2, "val": 1})
    wide = data / "train" / CLASSES[1] / "wide.png"
    Image.fromarray((np.arange(PX * PX).reshape(PX, PX) * 60).astype("uint16")).save(wide)
    with Image.open(wide) as image:  # what the loader would make of it: white
        assert image.mode.startswith("I") and (np.asarray(image.convert("RGB")) == 255).mean() > 0.9
    assert main(finetune_args(checkpoint, data, tmp_path / "run")) == 1
    line = one_error_line(capsys)
    assert str(wide) in line and "mode I;16" in line and "8 bits" in line, line
    assert not (tmp_path / "run").exists()
