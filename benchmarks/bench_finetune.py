"""Fine-tuning: ``attn-inject finetune`` against timm's own ``train.py``, and one process
against two under torchrun.

**Against timm's train.py** (``--against timm``): the same patched model (timm
``resnet50`` and ``vit_tiny_patch16_224`` at 64 px, each with ``cbam_after_every_stage``,
random init, saved once with ``ai.save``) fine-tuned by both on the same ImageFolder
(scikit-learn's digits upscaled to 64 px, 320 training and 80 validation images, written
here), batch 32, AdamW at lr 1e-3 and weight decay 0.05 for every parameter group, the
same cosine schedule stepped per update (no warm-up, floor lr / 100), no augmentation
(resize and crop), no label smoothing, mixup or random erasing, float32, no EMA, the same
data-loader workers and intra-op threads. ``train.py`` runs unmodified through ``python -m
attn_inject.timm_train --register NAME=FILE`` (the patched model under a timm name,
``--initial-checkpoint`` the same file), on the CPU without timm's prefetcher (the same
data path as ours: transforms normalise in the loader). Each epoch both validate once and
write ``summary.csv`` and a checkpoint with the model and the optimizer's moments
(``train.py``: ``last.pth.tar``, hard-linked as ``checkpoint-N`` and, improved, ``model_best``;
attn-inject: ``resume.pth``, with ``last.safetensors``, ``best.safetensors`` and
``curves.png``, copied at the epoch's end and written while the next epoch trains).
``train.py`` is not in timm's
package: pass a checkout's file with ``--timm-train`` (for the installed timm,
``https://raw.githubusercontent.com/huggingface/pytorch-image-models/v<version>/train.py``).

**One process against torchrun** (``--against torchrun``): an epoch of ``attn-inject
finetune`` in one process against two under torchrun (DDP, gloo on the CPU), on the
digits at 32 px (1,437 training and 360 validation images), timm ``resnet10t`` with
``cbam_after_every_stage``, batch 64 per process, the default threads and workers of each.

An epoch's time is the steady one, the difference between a longer and a shorter run
(start-up, imports, loading and the process group left out): against timm (2-epoch run -
1-epoch run), seed r in round r for both; against torchrun (3-epoch run - 1-epoch run) / 2.
The forms run in alternation, round after round; medians. Run it on an idle machine.

    python benchmarks/bench_finetune.py [--quick] [--against timm torchrun]
        [--timm-train PATH/train.py] [--out build/bench/finetune.md]
"""

from __future__ import annotations

import csv
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parent.parent / "examples"))
from common import Table, emit, parser
from digits_finetune import write_digits

import attn_inject as ai
from attn_inject.models.build import build_model

RECIPE = "cbam_after_every_stage"
TIMM_TRAIN = Path(__file__).parent.parent / "build" / "timm-train" / "train.py"


@dataclass(frozen=True)
class Workload:
    """One model both trainers fine-tune: its name, the timm name it is registered under
    for train.py, and its constructor's arguments."""

    model: str
    timm_name: str
    kwargs: tuple[tuple[str, object], ...]


WORKLOADS = (
    Workload("timm:resnet50", "resnet50_cbam_bench", (("num_classes", 10),)),
    Workload("timm:vit_tiny_patch16_224", "vit_tiny_cbam_bench", (("num_classes", 10), ("img_size", 64))),
)


@dataclass(frozen=True)
class Settings:
    """What both trainers are given alike."""

    image_size: int = 64
    batch: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.05
    workers: int = 0
    threads: int = 1


def _run(command: list[str], out: Path, threads: int | None = None) -> float:
    """Seconds ``command`` took (``out`` removed afterwards); its output shown if it fails."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "HF_HUB_OFFLINE": "1"}
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)  # torch's default intra-op threads in train.py
    began = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - began
    if done.returncode:
        raise SystemExit(f"{' '.join(command[:6])} ... failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return seconds


def _final_top1(summary: Path) -> float:
    """The last epoch's validation top-1 of a ``summary.csv`` (timm's format, both write it)."""
    with open(summary, newline="") as f:
        rows = list(csv.DictReader(f))
    return float(rows[-1]["eval_top1"])


def _ours(s: Settings, start: Path, data: Path, epochs: int, seed: int, out: Path) -> list[str]:
    return [
        sys.executable, "-m", "attn_inject", "finetune", "--checkpoint", str(start), "--data", str(data),
        "--epochs", str(epochs), "--out", str(out), "--batch-size", str(s.batch),
        "--image-size", str(s.image_size), "--opt", "adamw", "--lr", str(s.lr), "--attn-lr-scale", "1",
        "--weight-decay", str(s.weight_decay), "--warmup-epochs", "0", "--no-aug",
        "--workers", str(s.workers), "--threads", str(s.threads), "--no-verify-images",
        "--seed", str(seed),
    ]  # fmt: skip


def _timm(
    s: Settings, w: Workload, train_py: Path, start: Path, data: Path, epochs: int, seed: int, out: Path
) -> list[str]:
    """train.py's flags for what ``_ours`` runs: its defaults that differ set to ours
    (warm-up 5 epochs, per-epoch steps, label smoothing 0.1, random interpolation, CUDA)."""
    from timm.data import resolve_data_config

    with torch.device("meta"):
        model = build_model(w.model, **dict(w.kwargs))
    interpolation = resolve_data_config({}, model=model)["interpolation"]
    floor = s.lr * 0.01  # attn-inject's warm-up start and cosine floor
    return [
        sys.executable, "-m", "attn_inject.timm_train", "--register", f"{w.timm_name}={start}", str(train_py),
        "--model", w.timm_name, "--initial-checkpoint", str(start), "--num-classes", "10",
        "--data-dir", str(data), "--train-split", "train", "--val-split", "val",
        "--img-size", str(s.image_size), "-b", str(s.batch), "--epochs", str(epochs),
        "--opt", "adamw", "--lr", str(s.lr), "--weight-decay", str(s.weight_decay),
        "--sched", "cosine", "--sched-on-updates", "--warmup-epochs", "0", "--warmup-lr", str(floor),
        "--min-lr", str(floor), "--cooldown-epochs", "0",
        "--no-aug", "--train-interpolation", interpolation, "--smoothing", "0", "--reprob", "0",
        "--mixup", "0", "--cutmix", "0", "--workers", str(s.workers), "--device", "cpu", "--no-prefetcher",
        "--seed", str(seed), "--output", str(out), "--experiment", "run",
    ]  # fmt: skip


def against_timm(work: Path, train_py: Path, rounds: int, quick: bool) -> Table:
    s = Settings(image_size=32 if quick else 64, batch=10 if quick else 32)
    data = write_digits(work / "digits-timm", size=s.image_size, per_class=5 if quick else 40)
    table = Table(
        "attn-inject finetune against timm's train.py",
        ["model", "attn-inject epoch s", "timm train.py epoch s", "ratio", "top-1 attn-inject", "top-1 timm"],
        note=(
            f"{rounds} interleaved rounds (seed r in round r, both); an epoch = 2-epoch run - 1-epoch run, "
            f"medians; top-1 after 2 epochs, mean ± spread (half the range) over the rounds. "
            f"{RECIPE}, random init, batch {s.batch}, {s.image_size} px, AdamW lr {s.lr:g} wd "
            f"{s.weight_decay:g}, {s.workers} workers, {s.threads} intra-op thread(s) each."
        ),
    )
    for w in WORKLOADS:
        kwargs = dict(w.kwargs)
        if quick and "img_size" in kwargs:
            kwargs["img_size"] = s.image_size
        w = Workload(w.model, w.timm_name, tuple(kwargs.items()))
        torch.manual_seed(0)
        base = build_model(w.model, **kwargs)
        patched = ai.inject(base, RECIPE, input_size=(3, s.image_size, s.image_size))
        start = work / f"{w.timm_name}.safetensors"
        ai.save(patched, start, model_name=w.model, model_kwargs=kwargs)
        seconds: dict[str, list[float]] = {"ours": [], "timm": []}
        top1: dict[str, list[float]] = {"ours": [], "timm": []}
        for r in range(rounds):
            for form in ("ours", "timm"):
                spent = {}
                for epochs in (1, 2):
                    out = work / f"{form}-{r}-{epochs}"
                    if form == "ours":
                        spent[epochs] = _run(_ours(s, start, data, epochs, r, out), out)
                        summary = out / "summary.csv"
                    else:
                        command = _timm(s, w, train_py, start, data, epochs, r, out)
                        spent[epochs] = _run(command, out, threads=s.threads)
                        summary = out / "run" / "summary.csv"
                    if epochs == 2:
                        top1[form].append(_final_top1(summary))
                    shutil.rmtree(out)
                seconds[form].append(spent[2] - spent[1])
        ours, theirs = statistics.median(seconds["ours"]), statistics.median(seconds["timm"])
        table.rows.append(
            [
                w.model.split(":")[1],
                f"{ours:.2f}",
                f"{theirs:.2f}",
                f"{ours / theirs:.3f}",
                _spread(top1["ours"]),
                _spread(top1["timm"]),
            ]
        )
    return table


def _spread(values: list[float]) -> str:
    half = (max(values) - min(values)) / 2
    return f"{statistics.fmean(values):.1f} ± {half:.1f}"


def against_torchrun(work: Path, rounds: int, quick: bool) -> Table:
    data = write_digits(work / "digits", per_class=20 if quick else None)
    torch.manual_seed(0)
    patched = ai.inject(build_model("timm:resnet10t", num_classes=10), RECIPE, input_size=(3, 32, 32))
    checkpoint = work / "start.safetensors"
    ai.save(patched, checkpoint, model_name="timm:resnet10t", model_kwargs={"num_classes": 10})
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    forms = {
        "one process": [sys.executable, "-m", "attn_inject"],
        "torchrun, 2 processes": [*torchrun, "-m", "attn_inject"],
    }
    times: dict[str, list[float]] = {name: [] for name in forms}
    for r in range(rounds):
        for name, prefix in forms.items():
            spent = {}
            for epochs in (1, 3):
                out = work / f"run-{r}-{epochs}"
                command = [*prefix, "finetune", "--checkpoint", str(checkpoint), "--data", str(data),
                           "--epochs", str(epochs), "--out", str(out), "--batch-size", "64",
                           "--image-size", "32"]  # fmt: skip
                spent[epochs] = _run(command, out)
                shutil.rmtree(out)
            times[name].append((spent[3] - spent[1]) / 2)
    table = Table(
        "Fine-tuning epoch, one process against torchrun",
        ["form", "epoch s (median)", "rounds", "ratio to one process"],
        note=f"{rounds} interleaved rounds; an epoch = (3-epoch run - 1-epoch run) / 2.",
    )
    one = statistics.median(times["one process"])
    for name, values in times.items():
        median = statistics.median(values)
        table.rows.append([name, f"{median:.2f}", str(len(values)), f"{median / one:.3f}"])
    return table


def main(argv: list[str] | None = None) -> str:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--against", nargs="+", choices=("timm", "torchrun"), default=["timm", "torchrun"])
    p.add_argument("--timm-train", type=Path, default=TIMM_TRAIN, metavar="PATH", help="timm's train.py")
    p.add_argument("--rounds", type=int, help="interleaved rounds (default 3; --quick: 1)")
    args = p.parse_args(argv)
    rounds = args.rounds or (1 if args.quick else 3)
    work = Path(tempfile.mkdtemp(prefix="bench-finetune-"))
    tables = []
    try:
        if "timm" in args.against:
            if not args.timm_train.is_file():
                raise SystemExit(f"{args.timm_train}: no such file; pass timm's train.py with --timm-train")
            tables.append(against_timm(work, args.timm_train.resolve(), rounds, args.quick))
        if "torchrun" in args.against:
            tables.append(against_torchrun(work, rounds, args.quick))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    titles = {"timm": "against timm's train.py", "torchrun": "one process and torchrun"}
    section = "Fine-tuning: " + "; ".join(titles[a] for a in dict.fromkeys(args.against))
    return emit(section, tables, args.out, args.quick)


if __name__ == "__main__":
    main()
