"""An epoch of ``attn-inject finetune`` in one process against two under torchrun (DDP,
gloo on the CPU), on the digits (scikit-learn's, 1,437 training and 360 validation images,
32 px), timm ``resnet10t`` with ``cbam_after_every_stage``, batch 64 per process, the
default threads and data-loader workers of each.

An epoch's time is the steady one: (a 3-epoch run - a 1-epoch run) / 2, so that start-up
(imports, loading, the process group) is left out. The two forms run in alternation, round
after round; medians. Run it on an idle machine.

    python benchmarks/bench_finetune.py [--quick] [--out build/bench/finetune.md]
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parent.parent / "examples"))
from common import Table, emit, parser
from digits_finetune import write_digits

import attn_inject as ai
from attn_inject.models.build import build_model


def _run(command: list[str], out: Path) -> float:
    began = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    seconds = time.perf_counter() - began
    shutil.rmtree(out)
    return seconds


def main(argv: list[str] | None = None) -> str:
    args = parser(__doc__.splitlines()[0]).parse_args(argv)
    rounds, per_class = (1, 20) if args.quick else (3, None)
    work = Path(tempfile.mkdtemp(prefix="bench-finetune-"))
    data = write_digits(work / "digits", per_class=per_class)
    torch.manual_seed(0)
    patched = ai.inject(
        build_model("timm:resnet10t", num_classes=10), "cbam_after_every_stage", input_size=(3, 32, 32)
    )
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
    return emit("Fine-tuning: one process and torchrun", [table], args.out, args.quick)


if __name__ == "__main__":
    main()
