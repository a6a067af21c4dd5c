"""``attn-inject search`` on a transfer task with real data: scikit-learn's digits (shipped
with scikit-learn, nothing downloaded).

1. pretrain a timm ``resnet10t`` (random init) on the digits 0-4 and save its weights;
2. search on the digits 5-9 with few training images per class (so that accuracy is not
   saturated): the baseline (no block) and SE-standard, SE-PRE, SE-POST, SE-Identity
   (SENet Table 14), ECA and CBAM after every stage, all at identity, each fine-tuned over
   three seeds (``attn-inject search``, SQLite study in the run folder);
3. the leaderboard, the Pareto plot and the best candidate's weights are in the run folder;
   ``--docs`` copies the leaderboard and the plot there.

    python examples/search_demo.py --out build/search [--docs docs]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parent.parent / "benchmarks"))
from common import cpu_model
from digits_finetune import train_from_scratch

MODEL = "timm:resnet10t"
SIZE = 32
CANDIDATES = ("se_resnet", "se_pre", "se_post", "se_identity", "eca_resnet", "cbam_after_every_stage")


def write_split(root: Path, digits: range, train_per_class: int, val_per_class: int | None) -> Path:
    """``digits`` as an ImageFolder: the first ``train_per_class`` images of each in train/,
    the next ``val_per_class`` (None: all the rest) in val/; grey as RGB, upscaled."""
    from PIL import Image
    from sklearn.datasets import load_digits

    data = load_digits()
    seen: dict[int, int] = {}
    for i, label in enumerate(data.target.tolist()):
        if label not in digits:
            continue
        k = seen[label] = seen.get(label, 0) + 1
        if val_per_class is not None and k > train_per_class + val_per_class:
            continue
        folder = root / ("train" if k <= train_per_class else "val") / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        pixels = (data.images[i] * (255 / 16)).clip(0, 255).astype("uint8")
        image = Image.fromarray(pixels, mode="L").resize((SIZE, SIZE), Image.BICUBIC).convert("RGB")
        image.save(folder / f"{i:04d}.png")
    return root


def pretrain(root: Path, out: Path, epochs: int) -> float:
    """resnet10t from random init on ``root`` (digits_finetune's recipe, five classes); its
    weights to ``out``; returns the last validation top-1."""
    model, top1 = train_from_scratch(root, epochs, num_classes=5, seed=0, label="pretrain")
    torch.save(model.state_dict(), out)
    return top1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="build/search", type=Path)
    parser.add_argument("--docs", type=Path, help="copy the leaderboard and the Pareto plot into this folder")
    parser.add_argument("--pretrain-epochs", type=int, default=6)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--train-per-class", type=int, default=16)
    args = parser.parse_args()
    started = time.perf_counter()
    out: Path = args.out
    source, target, weights = out / "digits0-4", out / "digits5-9", out / "resnet10t_digits0-4.pth"
    if not (source / "train").is_dir():
        write_split(source, range(0, 5), train_per_class=140, val_per_class=None)
    if not (target / "train").is_dir():
        write_split(target, range(5, 10), train_per_class=args.train_per_class, val_per_class=None)
    if not weights.is_file():
        top1 = pretrain(source, weights, args.pretrain_epochs)
        print(f"pretrained on digits 0-4: val top-1 {top1:.2f}", flush=True)
    command = [
        sys.executable, "-m", "attn_inject", "search", "--model", MODEL, "--model-kwargs", "num_classes=5",
        "--base-checkpoint", str(weights), "--data", str(target), "--out", str(out / "run"),
        "--recipes", *CANDIDATES, "--epochs", str(args.epochs), "--repeats", str(args.repeats),
        "--image-size", str(SIZE), "--batch-size", "16", "--lr", "2e-3", "--workers", "0",
    ]  # fmt: skip
    print("$ attn-inject " + " ".join(command[3:]), flush=True)
    subprocess.run(command, check=True)
    minutes = (time.perf_counter() - started) / 60
    print(f"done in {minutes:.1f} min on {cpu_model()}, {os.cpu_count()} cores", flush=True)
    if args.docs:
        board = path_free((out / "run" / "leaderboard.md").read_text().split("\n", 2)[2].strip(), target)
        machine = f"{cpu_model()}, {os.cpu_count()} cores, torch {torch.__version__}, no GPU"
        section = f"Measured by `make search-demo` in {minutes:.1f} min on {machine}.\n\n{board}\n"
        page = args.docs / "search.md"
        text = page.read_text()
        start, end = text.index(START) + len(START), text.index(END)
        page.write_text(text[:start] + "\n" + section + text[end:])
        shutil.copyfile(out / "run" / "pareto.png", args.docs / "search-pareto.png")
    return 0


def path_free(board: str, data: Path) -> str:
    """The leaderboard with its data folder named for what it holds, not for where this run
    wrote it (a page in the repository names no folder of one machine)."""
    return board.replace(str(data.resolve()), f"the digits 5-9 as {Path(__file__).name} writes them")


START, END = "<!-- search-demo:start -->", "<!-- search-demo:end -->"


if __name__ == "__main__":
    raise SystemExit(main())
