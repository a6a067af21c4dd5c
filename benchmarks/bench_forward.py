"""Forward time of a patched resnet50 against timm's hand-built ``seresnet50``.

Targets: within 1.03x at init="paper", 1.05x at init="identity". Runs on CUDA when there is
one (batch 32 at 224 px), else on the CPU (batch 4 at 160 px).
"""

from __future__ import annotations

import sys
from pathlib import Path

import timm
import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import interleaved, report

import attn_inject as ai


def main() -> None:
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    batch, size, rounds = (32, 224, 50) if cuda else (4, 160, 15)
    torch.manual_seed(0)
    reference = timm.create_model("seresnet50").eval().to(device)
    base = timm.create_model("resnet50").eval().to(device)
    paper = ai.inject(base, "se_resnet", init="paper")
    identity = ai.inject(base, "se_resnet", init="identity")
    x = torch.randn(batch, 3, size, size, device=device)

    def run(model):
        def call():
            with torch.inference_mode():
                model(x)

        return call

    medians = interleaved(
        {
            "timm seresnet50": run(reference),
            "resnet50 + se_resnet (paper)": run(paper),
            "resnet50 + se_resnet (identity)": run(identity),
        },
        rounds,
        sync=cuda,
    )
    report(f"forward, batch {batch} x 3 x {size} x {size} on {device}", medians, "timm seresnet50")


if __name__ == "__main__":
    main()
