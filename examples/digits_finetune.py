"""Fine-tuning with inserted attention on a real dataset: scikit-learn's UCI handwritten
digits (1,797 images of 8x8, shipped with scikit-learn, nothing downloaded).

1. write the digits as an ImageFolder (upscaled to 32 px, a fixed stratified 80/20 split);
2. train a baseline timm ``resnet10t`` (random init) on it and save its weights;
3. convert the baseline with ``cbam_after_every_stage`` at ``init="identity"`` and at
   ``init="paper"`` (``attn-inject convert``), and measure top-1 right after insertion
   (identity must give the baseline's predictions, every one);
4. fine-tune both (``attn-inject finetune``) and report top-1 after fine-tuning;
5. write the table (Markdown) and the curves of both runs (``curves.png``).

    python examples/digits_finetune.py --out build/digits [--docs docs]

``make finetune-demo`` runs it (and copies the curves to ``docs/curves.png``).
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import time
from pathlib import Path

import torch

import attn_inject as ai
from attn_inject.finetune.curves import plot_curves, read_summary
from attn_inject.finetune.data import check_folders, data_config, image_folders
from attn_inject.finetune.distributed import Context
from attn_inject.finetune.loop import evaluate, predict, train_one_epoch
from attn_inject.models.build import build_model

MODEL = "timm:resnet10t"
RECIPE = "cbam_after_every_stage"
SIZE = 32
SEED = 0


def write_digits(root: Path, size: int = SIZE, seed: int = SEED, per_class: int | None = None) -> Path:
    """The digits as ``root/train/<digit>/*.png`` and ``root/val/<digit>/*.png`` (grey as
    RGB, upscaled with bicubic resampling), a stratified 80/20 split fixed by ``seed``;
    ``per_class`` keeps the first images of each digit only (for quick checks)."""
    from PIL import Image
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    index = list(range(len(digits.target)))
    if per_class is not None:
        counts: dict[int, int] = {}
        kept = []
        for i in index:
            label = int(digits.target[i])
            if counts.get(label, 0) < per_class:
                kept.append(i)
                counts[label] = counts.get(label, 0) + 1
        index = kept
    train, val = train_test_split(index, test_size=0.2, random_state=seed, stratify=digits.target[index])
    for split, chosen in (("train", train), ("val", val)):
        for i in chosen:
            folder = root / split / str(digits.target[i])
            folder.mkdir(parents=True, exist_ok=True)
            pixels = (digits.images[i] * (255 / 16)).clip(0, 255).astype("uint8")
            image = Image.fromarray(pixels, mode="L").resize((size, size), Image.BICUBIC).convert("RGB")
            image.save(folder / f"{i:04d}.png")
    return root


def loaders(root: Path, model: torch.nn.Module, batch_size: int = 64):
    folders = check_folders(root)
    cfg = data_config(model, SIZE)
    train, val = image_folders(folders, cfg, hflip=0.0, scale=(0.6, 1.0))
    g = torch.Generator().manual_seed(SEED)
    train_loader = torch.utils.data.DataLoader(train, batch_size=batch_size, shuffle=True, generator=g)
    val_loader = torch.utils.data.DataLoader(val, batch_size=256)
    return train_loader, val_loader


def train_from_scratch(
    root: Path, epochs: int, num_classes: int, seed: int = SEED, label: str = "baseline"
) -> tuple[torch.nn.Module, float]:
    """A random-init resnet10t trained on ``root`` with timm's AdamW and cosine schedule; the
    model and its last validation top-1."""
    from timm.optim import create_optimizer_v2
    from timm.scheduler import create_scheduler_v2

    random.seed(seed)  # timm's random-resized crop draws from Python's RNG
    torch.manual_seed(seed)  # weights, colour jitter, shuffling
    model = build_model(MODEL, num_classes=num_classes)
    train_loader, val_loader = loaders(root, model)
    context = Context(0, 1, 0, torch.device("cpu"))
    optimizer = create_optimizer_v2(model, "adamw", lr=3e-3, weight_decay=0.05)
    scheduler, _ = create_scheduler_v2(
        optimizer, "cosine", num_epochs=epochs, step_on_epochs=False, updates_per_epoch=len(train_loader)
    )
    updates, top1 = 0, 0.0
    for epoch in range(epochs):
        metrics, updates = train_one_epoch(
            model, train_loader, optimizer, context, scheduler=scheduler, num_updates=updates
        )
        top1 = evaluate(model, val_loader, context)["top1"]
        print(
            f"{label} epoch {epoch + 1}/{epochs}: train loss {metrics['loss']:.4f}, val top-1 {top1:.2f}",
            flush=True,
        )
    return model, top1


def train_baseline(root: Path, out: Path, epochs: int) -> tuple[torch.nn.Module, float]:
    """The baseline: a random-init resnet10t trained on the ten digits, saved to ``out``."""
    import safetensors.torch

    model, top1 = train_from_scratch(root, epochs, num_classes=10)
    safetensors.torch.save_file({k: v.contiguous() for k, v in model.state_dict().items()}, out)
    return model.eval(), top1


def attn_inject(*args: str) -> None:
    command = [sys.executable, "-m", "attn_inject", *args]
    print("$ attn-inject " + " ".join(args), flush=True)
    subprocess.run(command, check=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="build/digits", type=Path)
    parser.add_argument(
        "--docs", type=Path, help="also draw curves.png into this folder (make finetune-demo: docs)"
    )
    parser.add_argument("--baseline-epochs", type=int, default=3)
    parser.add_argument("--finetune-epochs", type=int, default=3)
    args = parser.parse_args()
    started = time.perf_counter()
    out: Path = args.out
    data = out / "data"
    if not (data / "train").is_dir():
        write_digits(data)
    folders = check_folders(data)
    print(
        f"digits: {folders.counts['train']} train, {folders.counts['val']} val images, {SIZE} px", flush=True
    )

    base_path = out / "resnet10t_digits.safetensors"
    baseline, baseline_top1 = train_baseline(data, base_path, args.baseline_epochs)
    _, val_loader = loaders(data, baseline)
    baseline_pred = predict(baseline, val_loader)

    rows = {}
    runs = {}
    for init in ("identity", "paper"):
        converted = out / f"cbam_{init}.safetensors"
        attn_inject(
            "convert",
            "--model",
            MODEL,
            "--model-kwargs",
            "num_classes=10",
            "--checkpoint",
            str(base_path),
            "--recipe",
            RECIPE,
            "--init",
            init,
            "--input-size",
            "3",
            str(SIZE),
            str(SIZE),
            "--out",
            str(converted),
            "--force",
        )
        patched = ai.load(converted).eval()
        pred = predict(patched, val_loader)
        targets = torch.as_tensor([t for _, t in val_loader.dataset.samples])
        inserted = 100 * float((pred == targets).double().mean())
        same = int((pred == baseline_pred).sum())
        run_dir = out / f"finetune_{init}"
        attn_inject(
            "finetune",
            "--checkpoint",
            str(converted),
            "--data",
            str(data),
            "--epochs",
            str(args.finetune_epochs),
            "--out",
            str(run_dir),
            "--image-size",
            str(SIZE),
            "--lr",
            "1e-3",
            "--attn-lr-scale",
            "10",
            "--hflip",
            "0",
            "--scale",
            "0.6",
            "1.0",
            "--workers",
            "0",
            "--seed",
            str(SEED),
            "--force",
        )
        history = read_summary(run_dir / "summary.csv")
        runs[f"init={init}"] = history
        rows[init] = {
            "inserted_top1": inserted,
            "same_predictions": same,
            "finetuned_top1": history[-1]["eval_top1"],
            "best_top1": max(r["eval_top1"] for r in history),
            "gate": history[-1]["train_gate"],
            "blocks": len(patched.attn_inject.plan),
        }
    total = time.perf_counter() - started
    n = len(baseline_pred)
    lines = [
        f"| model | val top-1 (%) | predictions equal to the baseline's (of {n}) |",
        "|---|---|---|",
        f"| baseline resnet10t, {args.baseline_epochs} epochs from random init | {baseline_top1:.2f} | {n} |",
    ]
    for init, r in rows.items():
        lines.append(
            f"| + CBAM, init={init}, right after insertion | "
            f"{r['inserted_top1']:.2f} | {r['same_predictions']} |"
        )
    for init, r in rows.items():
        gate = "" if r["gate"] != r["gate"] else f" (mean blend gate {r['gate']:.3f})"
        lines.append(
            f"| + CBAM, init={init}, after {args.finetune_epochs} fine-tuning epochs{gate} | "
            f"{r['finetuned_top1']:.2f} | – |"
        )
    table = "\n".join(lines)
    print(table)
    print(f"total time {total / 60:.1f} min")
    (out / "results.md").write_text(
        table + f"\n\ntotal time {total / 60:.1f} min, {torch.get_num_threads()} threads\n"
    )
    (out / "results.json").write_text(
        json.dumps({"baseline_top1": baseline_top1, **rows, "seconds": total}, indent=2)
    )
    plot_curves(runs, out / "curves.png", baseline_top1=baseline_top1)
    if args.docs:
        args.docs.mkdir(parents=True, exist_ok=True)
        plot_curves(runs, args.docs / "curves.png", baseline_top1=baseline_top1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
