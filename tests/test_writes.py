"""Writing an output: nothing half-written survives a signal, a killed run's leftovers are
cleaned by the next one, and two writers racing for one name never both write."""

from __future__ import annotations

import os
import pathlib
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest
import safetensors.torch
import torch

from attn_inject.cli.main import main
from attn_inject.saving.checkpoint import CheckpointError, remove_stale_temporaries, write_safetensors

ROOT = pathlib.Path(__file__).resolve().parent.parent


def leftovers(folder: pathlib.Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


# A process that writes OUT and stops mid-write (after the data, before the move into place)
# until a file "go" appears next to READY, or it is signalled; READY is touched once the
# temporary file is complete on disk.
STALLED_WRITER = textwrap.dedent(
    """
    import pathlib, sys, time
    import safetensors.torch
    real = safetensors.torch.save_file
    def stalled(tensors, filename, metadata=None):
        real(tensors, filename, metadata=metadata)
        ready = pathlib.Path(sys.argv[2])
        ready.touch()
        deadline = time.monotonic() + 120
        while not (ready.parent / "go").exists() and time.monotonic() < deadline:
            time.sleep(0.02)
    safetensors.torch.save_file = stalled
    mode, out = sys.argv[1], sys.argv[3]
    if mode == "convert":
        from attn_inject.cli.main import main
        sys.exit(main(["convert", "--model", "timm:test_resnet", "--checkpoint", sys.argv[4],
                       "--recipe", "se_resnet", "--out", out, "--input-size", "3", "32", "32",
                       "--checks", "finite"]))
    import torch
    from attn_inject.saving.checkpoint import CheckpointError, write_safetensors
    try:
        write_safetensors(out, {"w": torch.zeros(1000, 1000)}, {"writer": sys.argv[2]})
    except CheckpointError as error:
        sys.exit(f"refused: {error}")
    print("wrote", out)
    """
)


def start_stalled_writer(
    tmp_path: pathlib.Path, mode: str, *extra: str, ready: str = "ready"
) -> subprocess.Popen:
    return subprocess.Popen(
        [
            sys.executable,
            "-c",
            STALLED_WRITER,
            mode,
            str(tmp_path / ready),
            str(tmp_path / "out.safetensors"),
            *extra,
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_until_stalled(process: subprocess.Popen, ready: pathlib.Path) -> None:
    deadline = time.monotonic() + 120
    while not ready.exists():
        assert process.poll() is None, process.stderr.read() if process.stderr else ""
        assert time.monotonic() < deadline, "the writer never got to the write"
        time.sleep(0.05)


def stalled_writer(tmp_path: pathlib.Path, mode: str, *extra: str) -> subprocess.Popen:
    process = start_stalled_writer(tmp_path, mode, *extra)
    wait_until_stalled(process, tmp_path / "ready")
    return process


def small_resnet_checkpoint(tmp_path: pathlib.Path) -> pathlib.Path:
    """timm's ``test_resnet`` (0.4 M parameters) as a PyTorch checkpoint."""
    import timm

    checkpoint = tmp_path / "in.pth"
    torch.save(timm.create_model("test_resnet").state_dict(), checkpoint)
    return checkpoint


@pytest.mark.processes
def test_sigterm_during_convert_leaves_no_file(tmp_path):
    process = stalled_writer(tmp_path, "convert", str(small_resnet_checkpoint(tmp_path)))
    assert len(leftovers(tmp_path)) == 1  # the complete temporary file, not yet renamed
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=60) == -signal.SIGTERM  # ended by the signal, as asked
    assert leftovers(tmp_path) == [] and not (tmp_path / "out.safetensors").exists()


def test_sigint_during_a_write_removes_the_temporary_file_and_raises_keyboard_interrupt(
    tmp_path, monkeypatch
):
    real = safetensors.torch.save_file

    def interrupted(tensors, filename, metadata=None):
        real(tensors, filename, metadata=metadata)
        os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C while the data is on disk

    monkeypatch.setattr(safetensors.torch, "save_file", interrupted)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal
    try:
        with pytest.raises(KeyboardInterrupt):
            write_safetensors(tmp_path / "out.safetensors", {"w": torch.ones(3)}, {})
        assert os.listdir(tmp_path) == []
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handler restored
    finally:
        signal.signal(signal.SIGINT, previous)


def test_a_sigint_the_process_ignores_leaves_the_write_to_finish(tmp_path, monkeypatch):
    real = safetensors.torch.save_file

    def interrupted(tensors, filename, metadata=None):
        real(tensors, filename, metadata=metadata)
        os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(safetensors.torch, "save_file", interrupted)
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)  # as in a background job
    try:
        write_safetensors(tmp_path / "out.safetensors", {"w": torch.ones(3)}, {})
        assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, previous)
    assert os.listdir(tmp_path) == ["out.safetensors"]


def test_a_signal_whose_handler_python_did_not_install_is_left_alone(tmp_path, monkeypatch):
    """A program embedding Python may set a SIGTERM handler before Python starts:
    ``signal.getsignal`` gives None for it, and Python could not put it back, so a write
    does not take that signal over (it still takes over SIGINT)."""
    real_getsignal, real_signal = signal.getsignal, signal.signal
    taken: list[int] = []

    def getsignal(number):
        return None if number == signal.SIGTERM else real_getsignal(number)

    def set_handler(number, handler):
        taken.append(number)
        return real_signal(number, handler)

    previous = real_signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal
    try:
        monkeypatch.setattr(signal, "getsignal", getsignal)
        monkeypatch.setattr(signal, "signal", set_handler)
        before = real_getsignal(signal.SIGTERM)
        write_safetensors(tmp_path / "out.safetensors", {"w": torch.ones(3)}, {})
        monkeypatch.undo()
    finally:
        real_signal(signal.SIGINT, previous)
    assert signal.SIGTERM not in taken and signal.SIGINT in taken
    assert real_getsignal(signal.SIGTERM) == before
    assert os.listdir(tmp_path) == ["out.safetensors"]


FAULTHANDLER_THEN_WRITE = textwrap.dedent(
    """
    import faulthandler, os, signal, sys
    import torch
    from attn_inject.saving.checkpoint import write_safetensors

    # a handler set below Python: signal.getsignal still says SIG_DFL
    faulthandler.register(signal.SIGTERM, file=sys.stderr, all_threads=False)
    if sys.argv[2] == "write":
        write_safetensors(sys.argv[1], {"w": torch.ones(3)}, {})
    os.kill(os.getpid(), signal.SIGTERM)  # faulthandler prints the stack and the process goes on
    print("alive after SIGTERM", flush=True)
    """
)


@pytest.mark.processes
@pytest.mark.skipif(not hasattr(signal, "SIGTERM") or sys.platform == "win32", reason="POSIX signals")
@pytest.mark.parametrize("first", ["nothing", "write"])
def test_a_handler_set_below_python_is_the_one_a_signal_meets_after_a_write(tmp_path, first):
    """A write takes over SIGTERM while it lasts; afterwards the signal meets the handler the
    process had, even one Python cannot see (``faulthandler.register``'s)."""
    done = subprocess.run(
        [sys.executable, "-c", FAULTHANDLER_THEN_WRITE, str(tmp_path / "out.safetensors"), first],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-500:]
    assert "alive after SIGTERM" in done.stdout
    assert (tmp_path / "out.safetensors").exists() == (first == "write")


@pytest.mark.processes
def test_a_killed_writers_temporary_file_is_removed_by_the_next_write(tmp_path):
    process = stalled_writer(tmp_path, "write")
    process.kill()  # SIGKILL: nothing can clean up
    process.wait(timeout=60)
    (stale,) = leftovers(tmp_path)
    live = tmp_path / f".out.safetensors.attn-inject-{os.getpid()}-abc.tmp"  # a writer still running
    live.write_bytes(b"")
    other = tmp_path / ".out.safetensors.someone-else.tmp"  # not ours: never touched
    other.write_bytes(b"")
    write_safetensors(tmp_path / "out.safetensors", {"w": torch.ones(1)}, {})
    assert leftovers(tmp_path) == sorted([live.name, other.name])
    assert stale not in leftovers(tmp_path)
    assert remove_stale_temporaries(tmp_path / "out.safetensors") == []


@pytest.mark.processes
def test_two_writer_processes_past_the_existence_check_never_both_write(tmp_path):
    # What two converts to one --out do at their last step: both found OUT absent and wrote
    # their temporary file; then both move it into place.
    first = start_stalled_writer(tmp_path, "write", ready="ready1")
    second = start_stalled_writer(tmp_path, "write", ready="ready2")
    wait_until_stalled(first, tmp_path / "ready1")
    wait_until_stalled(second, tmp_path / "ready2")
    (tmp_path / "go").touch()
    results = [(p.wait(timeout=120), *p.communicate()) for p in (first, second)]
    assert sorted(code for code, _, _ in results) == [0, 1], results
    (winner,) = [out for code, out, _ in results if code == 0]
    (loser,) = [err.strip() for code, _, err in results if code == 1]
    assert winner.startswith("wrote") and loser.endswith(
        "out.safetensors exists; pass force=True (attn-inject: --force) to overwrite"
    )
    metadata = safetensors.safe_open(tmp_path / "out.safetensors", "pt").metadata()
    assert metadata["writer"] == str(tmp_path / ("ready1" if results[0][0] == 0 else "ready2"))
    assert leftovers(tmp_path) == []


def test_a_file_appearing_mid_write_is_not_overwritten_without_force(tmp_path, monkeypatch):
    path = tmp_path / "out.safetensors"
    real = safetensors.torch.save_file

    def racing(tensors, filename, metadata=None):
        real(tensors, filename, metadata=metadata)
        path.write_bytes(b"the other writer's file")  # another convert finished first

    monkeypatch.setattr(safetensors.torch, "save_file", racing)
    with pytest.raises(CheckpointError, match="exists; pass force=True"):
        write_safetensors(path, {"w": torch.ones(1)}, {})
    assert path.read_bytes() == b"the other writer's file"
    assert os.listdir(tmp_path) == ["out.safetensors"]


def test_concurrent_writers_to_one_name_exactly_one_writes(tmp_path):
    path = tmp_path / "out.safetensors"
    start = threading.Barrier(8)
    results: list[str] = []

    def writer(i: int) -> None:
        start.wait()
        try:
            write_safetensors(path, {"w": torch.full((64, 64), float(i))}, {"writer": str(i)})
            results.append(f"wrote {i}")
        except CheckpointError as error:
            results.append("refused" if "exists" in str(error) else str(error))

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wrote = [r for r in results if r.startswith("wrote")]
    assert len(wrote) == 1 and results.count("refused") == 7, results
    winner = wrote[0].split()[1]
    assert safetensors.safe_open(path, "pt").metadata() == {"writer": winner}
    assert os.listdir(tmp_path) == ["out.safetensors"]


def test_an_unwritable_folder_is_one_line_naming_the_folder_not_the_temporary_file(tmp_path, monkeypatch):
    import tempfile

    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(tmp_path / ".out.safetensors.x.tmp"))

    monkeypatch.setattr(tempfile, "mkstemp", denied)
    with pytest.raises(CheckpointError) as info:
        write_safetensors(tmp_path / "out.safetensors", {"w": torch.ones(1)}, {})
    message = str(info.value)
    assert message == f"cannot write {tmp_path / 'out.safetensors'}: folder {tmp_path}: Permission denied"
    assert ".tmp" not in message and "Errno" not in message


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_convert_into_a_read_only_folder_fails_in_one_line(tmp_path, capsys):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        code = main(["convert", "--model", "timm:resnet10t", "--checkpoint", "x.pth", "--recipe", "se_resnet",
                     "--out", str(folder / "out.safetensors")])  # fmt: skip
    finally:
        folder.chmod(0o700)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1 and "is not writable" in err[0], err


def test_convert_where_the_output_folder_is_a_file_fails_in_one_line(tmp_path, capsys):
    """What a read-only folder tests for non-root users, in a way that holds as root too."""
    in_the_way = tmp_path / "results"
    in_the_way.write_text("a file, not a folder")
    code = main(["convert", "--model", "timm:resnet10t", "--checkpoint", "x.pth", "--recipe", "se_resnet",
                 "--out", str(in_the_way / "out.safetensors")])  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1 and f"folder {in_the_way} is a file, not a folder" in err[0], err
    assert in_the_way.read_text() == "a file, not a folder"
