"""``attn-inject finetune`` on a tiny ImageFolder written here: one process, torchrun DDP
(gloo), resume, a new class count, and each bad input."""

from __future__ import annotations

import csv
import dataclasses
import functools
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch
import yaml
from PIL import Image

import attn_inject as ai
from attn_inject.cli.main import main
from attn_inject.finetune import run as run_module
from attn_inject.finetune import threads as threads_module
from attn_inject.finetune.data import check_folders, data_config, image_folders
from attn_inject.finetune.distributed import Context
from attn_inject.finetune.loop import evaluate, predict
from attn_inject.finetune.starting_point import load_for_finetuning
from attn_inject.models.build import build_model

PX = 32
MODEL = "timm:test_resnet"  # a 0.4 M-parameter timm ResNet: fast on two cores
CLASSES = ("cat", "dog", "fox")
REPO = Path(__file__).resolve().parents[1]
SUMMARY_COLUMNS = ["epoch", "train_loss", "train_gate", "eval_loss", "eval_top1", "eval_top5", "lr"]


def write_folder(root: Path, per_class: dict[str, int], seed: int = 0) -> Path:
    """``root/<split>/<class>/*.png``: each class a different mean colour plus noise."""
    rng = np.random.default_rng(seed)
    for split, count in per_class.items():
        for c, name in enumerate(CLASSES):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                pixels = rng.normal(60 + 60 * c, 40, size=(PX, PX, 3)).clip(0, 255).astype("uint8")
                Image.fromarray(pixels).save(folder / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_folder(tmp_path_factory.mktemp("data"), {"train": 4, "val": 3})


@functools.cache
def _patched_bytes(num_classes: int, init: str, recipe: str) -> bytes:
    """The file ``save_patched`` writes, built once per session for each argument set (the
    build is seeded, so every build gives these bytes)."""
    torch.manual_seed(0)
    base = build_model(MODEL, num_classes=num_classes)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "patched.safetensors"
        ai.save(ai.inject(base, recipe, init=init, input_size=(3, PX, PX)), path)
        return path.read_bytes()


def save_patched(
    path: Path,
    num_classes: int = len(CLASSES),
    init: str = "identity",
    recipe: str = "cbam_after_every_stage",
) -> Path:
    """``MODEL`` (seed 0) patched with ``recipe``, saved at ``path``: a file of the test's own."""
    path.write_bytes(_patched_bytes(num_classes, init, recipe))
    return path


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return save_patched(tmp_path_factory.mktemp("ckpt") / "cbam.safetensors")


def finetune_args(checkpoint: Path, data: Path, out: Path, *extra: str, epochs: int = 1) -> list[str]:
    return [
        "finetune",
        "--checkpoint",
        str(checkpoint),
        "--data",
        str(data),
        "--epochs",
        str(epochs),
        "--out",
        str(out),
        "--batch-size",
        "4",
        "--image-size",
        str(PX),
        "--workers",
        "0",
        "--threads",  # one intra-op thread: the suite's processes share the cores
        "1",
        *extra,
    ]


def read_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def val_top1(model: torch.nn.Module, data: Path) -> float:
    """Top-1 of ``model`` over every val image, computed here on one process."""
    folders = check_folders(data)
    _, val = image_folders(folders, data_config(model, PX))
    loader = torch.utils.data.DataLoader(val, batch_size=5)
    return evaluate(model, loader, Context(0, 1, 0, torch.device("cpu")))["top1"]


# --- one process -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "recipe, init", [("se_resnet", "identity"), ("eca_resnet", "paper"), ("cbam_resnet", "identity")]
)
def test_model_ema_trains_and_saves_every_recipe_that_changes_modules(recipe, init, data, tmp_path):
    checkpoint = save_patched(tmp_path / "in.safetensors", init=init, recipe=recipe)
    out = tmp_path / "run"
    assert main(finetune_args(checkpoint, data, out, "--model-ema", epochs=2)) == 0
    saved = ai.load(out / "last.safetensors")
    assert ai.read_manifest(out / "last.safetensors").training["weights"] == "ema"
    assert list(ai.inserted_blocks(saved)) == list(ai.inserted_blocks(ai.load(checkpoint)))


def test_one_epoch_writes_summary_curves_and_checkpoints_that_load(checkpoint, data, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(finetune_args(checkpoint, data, out, "--frozen-epochs", "1", "--model-ema")) == 0
    assert sorted(p.name for p in out.iterdir()) == sorted(run_module.OUTPUTS)
    rows = read_rows(out / "summary.csv")
    assert len(rows) == 1 and list(rows[0]) == SUMMARY_COLUMNS
    assert rows[0]["epoch"] == "1"  # numbered from 1, as the log ("epoch 1/1") and the manifest
    with Image.open(out / "curves.png") as image:
        assert image.format == "PNG" and image.size[0] > 400
    best, last = ai.load(out / "best.safetensors"), ai.load(out / "last.safetensors")
    manifest = ai.read_manifest(out / "last.safetensors")
    assert manifest.training["epoch"] == 1 and manifest.training["weights"] == "ema"
    assert manifest.training["classes"] == list(CLASSES)
    # the file holds what was scored: its top-1, measured again here, is the summary's
    assert val_top1(last.eval(), data) == pytest.approx(float(rows[0]["eval_top1"]))
    assert set(best.state_dict()) == set(last.state_dict())
    assert main(["validate", str(out / "last.safetensors"), "--device", "cpu"]) == 0
    state = torch.load(out / "resume.pth", weights_only=True)
    assert state["epoch"] == 1 and {"model", "optimizer", "scheduler", "ema"} <= set(state)
    err = capsys.readouterr().err
    assert "epoch 1/1 (base frozen)" in err and "top-1" in err


def test_resume_gives_the_same_result_as_an_uninterrupted_run(checkpoint, data, tmp_path, monkeypatch):
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    assert main(finetune_args(checkpoint, data, whole, epochs=2)) == 0

    calls = []
    real = run_module.train_one_epoch

    def stop_in_second_epoch(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(run_module, "train_one_epoch", stop_in_second_epoch)
    assert main(finetune_args(checkpoint, data, parts, epochs=2)) == 130
    assert len(read_rows(parts / "summary.csv")) == 1
    monkeypatch.setattr(run_module, "train_one_epoch", real)
    assert main(finetune_args(checkpoint, data, parts, "--resume", epochs=2)) == 0

    assert read_rows(parts / "summary.csv") == read_rows(whole / "summary.csv")
    a = safetensors.torch.load_file(whole / "last.safetensors")
    b = safetensors.torch.load_file(parts / "last.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_new_class_count_keeps_every_weight_but_the_head(tmp_path, data, capsys):
    five = save_patched(tmp_path / "five.safetensors", num_classes=5)
    start = load_for_finetuning(five, num_classes=3)
    assert start.num_classes == 3 and start.reinitialised == ("fc.weight", "fc.bias")
    saved = safetensors.torch.load_file(five)
    state = start.model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in saved.items() if not k.startswith("fc."))
    assert state["fc.weight"].shape == (3, start.model.num_features)
    # identity insertion kept: the rebuilt model computes what its base (same weights) does
    base = build_model(MODEL, num_classes=3).eval()
    base.load_state_dict({k: v for k, v in state.items() if k in base.state_dict()})
    x = torch.randn(2, 3, PX, PX)
    assert torch.equal(start.model.eval()(x), base(x))

    out = tmp_path / "run"
    assert main(finetune_args(five, data, out, "--num-classes", "3")) == 0
    assert "left at init" in capsys.readouterr().err
    assert ai.load(out / "last.safetensors").num_classes == 3


def test_digits_accuracy_at_step_zero_equals_the_base_model(tmp_path):
    pytest.importorskip("sklearn")
    sys.path.insert(0, str(REPO / "examples"))
    try:
        import digits_finetune
    finally:
        sys.path.remove(str(REPO / "examples"))
    root = digits_finetune.write_digits(tmp_path / "digits", size=PX, per_class=25)
    torch.manual_seed(0)
    base = build_model(MODEL, num_classes=10)
    train_loader, val_loader = digits_finetune.loaders(root, base, batch_size=25)
    # two short epochs so the base model predicts more than one class
    optimizer = torch.optim.AdamW(base.parameters(), lr=3e-3)
    base.train()
    for _ in range(2):
        for images, targets in train_loader:
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(base(images), targets).backward()
            optimizer.step()
    base.eval()
    path = tmp_path / "base.safetensors"
    ai.save(ai.inject(base, "cbam_after_every_stage", input_size=(3, PX, PX)), path)
    patched = ai.load(path).eval()
    context = Context(0, 1, 0, torch.device("cpu"))
    expected = predict(base, val_loader)
    assert len(expected.unique()) > 1
    assert torch.equal(predict(patched, val_loader), expected)
    assert evaluate(patched, val_loader, context) == evaluate(base, val_loader, context)


def test_bfloat16_autocast_channels_last_and_clipping_run_on_the_cpu(checkpoint, data, tmp_path):
    out = tmp_path / "run"
    args = finetune_args(
        checkpoint, data, out, "--amp", "--channels-last", "--clip-grad", "1.0", "--opt", "sgd"
    )
    assert main(args) == 0
    row = read_rows(out / "summary.csv")[0]
    assert all(math.isfinite(float(row[k])) for k in ("train_loss", "eval_loss", "eval_top1"))
    assert "scaler" not in torch.load(out / "resume.pth", weights_only=True)  # bf16 needs no loss scaler


# --- bad input: one line, nothing written ------------------------------------------------


def _bad_data(tmp_path: Path, case: str) -> Path:
    root = tmp_path / "bad"
    if case == "missing":
        return root
    root.mkdir()
    if case == "empty":
        return root
    if case == "no val":
        write_folder(root, {"train": 1})
    elif case == "different classes":
        write_folder(root, {"train": 1, "val": 1})
        (root / "val" / "fox").rename(root / "val" / "wolf")
    elif case == "undecodable image":
        write_folder(root, {"train": 1, "val": 1})
        (root / "train" / "dog" / "0.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    elif case == "truncated jpeg":  # its header is whole: Image.verify() passes it
        write_folder(root, {"train": 1, "val": 1})
        jpeg = root / "train" / "dog" / "0.jpg"
        Image.fromarray(np.full((PX, PX, 3), 90, "uint8")).save(jpeg, quality=95)
        jpeg.write_bytes(jpeg.read_bytes()[: len(jpeg.read_bytes()) // 2])
    elif case == "fifo":
        write_folder(root, {"train": 1, "val": 1})
        os.mkfifo(root / "train" / "dog" / "x.png")
    elif case == "link loop":
        write_folder(root, {"train": 1, "val": 1})
        (root / "train" / "dog" / "again").symlink_to("..")
    elif case == "one folder twice":
        write_folder(root, {"train": 1, "val": 1})
        (root / "train" / "dog" / "copy").symlink_to(root / "train" / "cat")
    elif case == "dangling link":
        write_folder(root, {"train": 1, "val": 1})
        (root / "train" / "dog" / "gone.png").symlink_to(root / "nowhere.png")
    elif case == "link to a device":
        write_folder(root, {"train": 1, "val": 1})
        (root / "train" / "dog" / "zero.png").symlink_to("/dev/zero")
    return root


@pytest.mark.parametrize(
    "case, expected",
    [
        ("missing", "no such folder"),
        ("empty", "the folder is empty"),
        ("no val", "no val/ folder"),
        ("different classes", "only in train/: fox; only in val/: wolf"),
        ("undecodable image", "cannot decode image"),
        ("truncated jpeg", "cannot decode image"),
        ("fifo", "x.png is not a regular file"),
        ("link loop", "leads to the folder"),
        ("one folder twice", "leads to the folder"),
        ("dangling link", "gone.png cannot be read"),
        ("link to a device", "zero.png is not a regular file"),
    ],
)
def test_bad_data_is_one_line_and_writes_nothing(checkpoint, tmp_path, capsys, case, expected):
    data = _bad_data(tmp_path, case)
    out = tmp_path / "run"
    assert main(finetune_args(checkpoint, data, out)) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and expected in err, err
    if case in ("undecodable image", "truncated jpeg"):
        assert "dog/0." in err
    assert not out.exists()


def test_a_last_training_batch_of_one_image_is_dropped(checkpoint, tmp_path):
    data = write_folder(tmp_path / "data", {"train": 3, "val": 1})  # 9 images: batches of 4, 4 and 1
    out = tmp_path / "run"
    assert main(finetune_args(checkpoint, data, out, "--batch-size", "4")) == 0  # BatchNorm needs 2
    assert (out / "last.safetensors").is_file()


def test_a_pytorch_checkpoint_given_to_finetune_says_to_convert_it(data, tmp_path, capsys):
    path = tmp_path / "resnet.pth"
    torch.save(build_model(MODEL, num_classes=3).state_dict(), path)
    assert main(finetune_args(path, data, tmp_path / "run")) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "is a PyTorch checkpoint" in err and "attn-inject convert" in err, (
        err
    )
    assert not (tmp_path / "run").exists()


def test_a_checkpoint_without_manifest_is_one_line(data, tmp_path, capsys):
    plain = tmp_path / "plain.safetensors"
    safetensors.torch.save_file(build_model(MODEL, num_classes=3).state_dict(), plain)
    assert main(finetune_args(plain, data, tmp_path / "run")) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no attn-inject manifest" in err
    assert not (tmp_path / "run").exists()


def test_zero_classes_and_a_wrong_class_count_are_refused(checkpoint, data, tmp_path, capsys):
    assert main(finetune_args(checkpoint, data, tmp_path / "run", "--num-classes", "0")) == 2  # usage
    assert "--num-classes must be at least 1" in capsys.readouterr().err
    four = save_patched(tmp_path / "four.safetensors", num_classes=4)
    assert main(finetune_args(four, data, tmp_path / "run")) == 1
    assert "pass --num-classes 3" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_an_unknown_optimizer_and_layer_decay_without_group_matcher_write_nothing(
    checkpoint, data, tmp_path, capsys
):
    out = tmp_path / "run"
    assert main(finetune_args(checkpoint, data, out, "--opt", "nosuchopt")) == 2  # a usage error
    assert "--opt nosuchopt: not a timm optimizer" in capsys.readouterr().err
    torchvision_file = tmp_path / "tv.safetensors"
    base = build_model("tv:resnet18", num_classes=len(CLASSES))  # torchvision: no group_matcher
    ai.save(ai.inject(base, "cbam_after_every_stage", input_size=(3, PX, PX)), torchvision_file)
    assert main(finetune_args(torchvision_file, data, out, "--layer-decay", "0.75")) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "group_matcher" in err
    assert not out.exists()


def test_an_earlier_run_is_kept_unless_resume_or_force(checkpoint, data, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "summary.csv").write_text("earlier\n")
    assert main(finetune_args(checkpoint, data, out)) == 1
    err = capsys.readouterr().err
    assert "--resume" in err and "--force" in err
    assert [p.name for p in out.iterdir()] == ["summary.csv"] and (
        out / "summary.csv"
    ).read_text() == "earlier\n"
    assert main(finetune_args(checkpoint, data, out, "--resume")) == 1
    assert "no run to resume" in capsys.readouterr().err
    assert main(finetune_args(checkpoint, data, out, "--force")) == 0
    assert len(read_rows(out / "summary.csv")) == 1


@pytest.fixture(scope="module")
def finished_run(checkpoint, data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("done") / "run"
    assert main(finetune_args(checkpoint, data, out)) == 0
    return out


def test_resume_with_more_epochs_extends_the_run_at_the_schedules_floor(
    checkpoint, data, finished_run, tmp_path, capsys
):
    import shutil

    out = tmp_path / "run"
    shutil.copytree(finished_run, out)  # a run of one epoch of its own
    first = read_rows(out / "summary.csv")
    assert main(finetune_args(checkpoint, data, out, "--resume", epochs=3)) == 0
    err = capsys.readouterr().err
    assert "extended from 1 to 3 epochs" in err and "holds its floor (min lr 1e-05)" in err
    rows = read_rows(out / "summary.csv")
    assert [r["epoch"] for r in rows] == ["1", "2", "3"] and rows[0] == first[0]  # the first epoch kept
    assert [float(r["lr"]) for r in rows[1:]] == pytest.approx([1e-05, 1e-05])  # past the cosine's end
    assert yaml.safe_load((out / "args.yaml").read_text())["epochs"] == 3  # resumable again as extended
    assert main(finetune_args(checkpoint, data, out, "--resume", epochs=3)) == 0  # nothing left: no error
    assert main(finetune_args(checkpoint, data, out, "--resume", epochs=2)) == 1  # fewer: refused
    assert "epochs=3 in the run, 2 now" in capsys.readouterr().err


def test_resume_with_other_settings_is_refused(checkpoint, data, finished_run, tmp_path, capsys):
    import shutil

    out = tmp_path / "run"
    shutil.copytree(finished_run, out)  # a finished run of its own
    assert main(finetune_args(checkpoint, data, out, "--resume", "--lr", "0.5")) == 1
    assert "lr=0.001 in the run, 0.5 now" in capsys.readouterr().err


def _resume_refused(checkpoint, data, run: Path, tmp_path: Path, capsys, edit) -> str:
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    edit(copy)
    before = {p.name: p.read_bytes() for p in copy.iterdir()}
    assert main(finetune_args(checkpoint, data, copy, "--resume")) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and len(err) < 1000, err
    assert {p.name: p.read_bytes() for p in copy.iterdir()} == before  # nothing written
    return err


def test_an_alias_bomb_in_args_yaml_is_refused_in_one_line(checkpoint, data, finished_run, tmp_path, capsys):
    levels = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    levels += [f"a{i}: &a{i} [*a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}]" for i in range(1, 12)]
    bomb = "\n".join(levels) + "\nlr: *a11\n"
    err = _resume_refused(
        checkpoint, data, finished_run, tmp_path, capsys, lambda d: (d / "args.yaml").write_text(bomb)
    )
    assert "expands to more than 10000 values" in err


@pytest.mark.parametrize(
    "change, says",
    [
        ({"model": None}, "'model' is missing or not a mapping"),
        ({"epoch": -5}, "'epoch' must be an integer from 0 to 1, got -5"),
        ({"epoch": 1, "history": []}, "'history' must be 1 rows of numbers"),
        ({"best_top1": "high"}, "'best_top1' must be a number"),
    ],
)
def test_a_resume_state_with_wrong_fields_is_refused_in_one_line(
    checkpoint, data, finished_run, tmp_path, capsys, change, says
):
    def edit(folder: Path) -> None:
        state = torch.load(folder / "resume.pth", weights_only=True)
        state.update(change)
        state = {k: v for k, v in state.items() if v is not None}
        torch.save(state, folder / "resume.pth")

    assert says in _resume_refused(checkpoint, data, finished_run, tmp_path, capsys, edit)


@pytest.mark.processes
def test_sigterm_ends_the_run_with_how_to_resume_and_no_temporary_file(checkpoint, data, tmp_path):
    import signal
    import time

    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    args = finetune_args(checkpoint, data, out, epochs=200)
    process = subprocess.Popen(
        [sys.executable, "-m", "attn_inject", *args], env=env, stderr=subprocess.PIPE, text=True
    )
    deadline = time.monotonic() + 120
    while not (out / "resume.pth").exists() and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 143, err[-2000:]
    last = err.strip().splitlines()[-1]
    assert "stopped by SIGTERM" in last and "--resume" in last, last
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]


def test_temporary_files_of_a_killed_run_are_removed_at_the_next_start(
    checkpoint, data, finished_run, tmp_path
):
    import shutil

    out = tmp_path / "run"
    shutil.copytree(finished_run, out)  # a finished run of its own
    stale = [
        out / ".resume.pth.0badf00d.tmp",
        out / ".curves.png.0badf00d.tmp.png",
        out / ".summary.csv.1.tmp",
    ]
    for path in stale:
        path.write_bytes(b"half written")
    assert main(finetune_args(checkpoint, data, out, "--force")) == 0
    assert not any(path.exists() for path in stale)


# --- many processes ------------------------------------------------------------------------


@pytest.mark.processes
def test_torchrun_two_processes_on_gloo(checkpoint, data, tmp_path):
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    args = finetune_args(checkpoint, data, out, "--frozen-epochs", "1", epochs=2)
    run = ["-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone", "-m", "attn_inject"]
    done = subprocess.run([sys.executable, *run, *args], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = read_rows(out / "summary.csv")
    assert len(rows) == 2
    # Metrics reduced over both ranks, each evaluating its own share with its own copy of the
    # weights (DDP keeps them equal, in the frozen epoch and after): the same top-1 as one
    # process evaluating rank 0's weights over every val image.
    top1 = val_top1(ai.load(out / "last.safetensors").eval(), data)
    assert top1 == pytest.approx(float(rows[1]["eval_top1"]))
    assert done.stderr.count("epoch 1/2 (base frozen):") == 1  # only rank 0 reports
    assert done.stderr.count("epoch 2/2:") == 1


# --- CUDA ------------------------------------------------------------------------------------


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_amp_channels_last_and_compile(checkpoint, data, tmp_path):
    out = tmp_path / "cuda"
    assert main(finetune_args(checkpoint, data, out, "--amp", "--channels-last", "--compile")) == 0
    assert len(read_rows(out / "summary.csv")) == 1


@pytest.mark.processes
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_torchrun_two_processes_on_nccl(checkpoint, data, tmp_path):
    out = tmp_path / "nccl"
    run = ["-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone", "-m", "attn_inject"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    args = finetune_args(checkpoint, data, out, "--amp")
    done = subprocess.run([sys.executable, *run, *args], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert len(read_rows(out / "summary.csv")) == 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_fp16_uses_the_loss_scaler(checkpoint, data, tmp_path):
    out = tmp_path / "fp16"
    assert main(finetune_args(checkpoint, data, out, "--amp", "--amp-dtype", "float16")) == 0
    assert "scaler" in torch.load(out / "resume.pth", weights_only=True)


def test_threads_are_chosen_stated_first_and_put_back(checkpoint, data, tmp_path, capsys, monkeypatch):
    before = torch.get_num_threads()
    seen = []
    real = run_module._train

    def spy(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return real(*args, **kwargs)

    monkeypatch.setattr(run_module, "_train", spy)
    assert main(finetune_args(checkpoint, data, tmp_path / "one", "--threads", "1", "--workers", "0")) == 0
    first = capsys.readouterr().err.strip().splitlines()[0]
    assert first.startswith("finetune: 1 intra-op thread and 0 data loader workers per process, 1 process on")
    assert seen == [1] and torch.get_num_threads() == before
    monkeypatch.setattr(threads_module.os, "sched_getaffinity", lambda pid: set(range(8)))
    assert threads_module.default_threads(workers=2) == (7, 8)  # a core left for the workers
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert threads_module.default_threads(workers=0) == (4, 8)  # torchrun's two processes share them


def test_sigterm_inside_code_that_wraps_the_exception_still_stops_as_sigterm(tmp_path):
    import signal
    import types

    from attn_inject.finetune.stopping import Stopped
    from attn_inject.finetune.stopping import stoppable as _stoppable

    def import_like() -> None:  # a class body's __set_name__ wraps what it raises
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)
        except Stopped as error:
            raise RuntimeError("Error calling __set_name__") from error

    import time

    (tmp_path / "resume.pth").write_bytes(b"")  # a finished epoch: the stop advises --resume
    with pytest.raises(Stopped) as stopped, _stoppable(types.SimpleNamespace(out=tmp_path)):
        import_like()
    assert stopped.value.code == 143 and "--resume" in str(stopped.value)
    with pytest.raises(RuntimeError), _stoppable(types.SimpleNamespace(out=tmp_path)):
        raise RuntimeError("a real error stays one")


def test_sigterm_whose_exception_a_library_swallows_still_stops_the_run(checkpoint, data, tmp_path):
    """A signal that lands in a finaliser is printed as "Exception ignored" and lost: the run
    raises the stop again after its next step, and keeps every finished epoch."""
    import signal

    from attn_inject.finetune.config import FinetuneConfig
    from attn_inject.finetune.run import run
    from attn_inject.finetune.stopping import Stopped

    def swallowing_hook(row: dict) -> None:  # as a finaliser or an `except BaseException` would
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)
        except BaseException:
            pass

    import time

    out = tmp_path / "run"
    config = FinetuneConfig(
        str(checkpoint), str(data), 5, str(out), batch_size=4, image_size=PX, workers=0, threads=1
    )
    with pytest.raises(Stopped) as stopped:
        run(config, on_epoch=swallowing_hook)
    assert stopped.value.code == 143 and "--resume" in str(stopped.value)
    assert len(read_rows(out / "summary.csv")) == 1  # the first epoch kept, the second stopped
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]


def test_a_caller_that_decoded_the_images_is_not_made_to_decode_them_again(
    checkpoint, data, tmp_path, monkeypatch
):
    """A search decodes the data once for all its trials; each trial's run checks the layout
    only."""
    from attn_inject.finetune import data as data_module
    from attn_inject.finetune.config import FinetuneConfig
    from attn_inject.finetune.run import run

    decoded = []
    monkeypatch.setattr(data_module, "_decode", decoded.append)
    config = FinetuneConfig(
        str(checkpoint), str(data), 1, str(tmp_path / "a"), batch_size=4, image_size=PX, workers=0, threads=1
    )
    run(config, images_checked=True)
    assert decoded == []
    run(dataclasses.replace(config, out=str(tmp_path / "b")))
    images = sorted(p for p in Path(data).rglob("*") if p.is_file())
    assert sorted(decoded) == images  # every image of train/ and val/, each decoded once
