"""``inject()`` on timm resnet50 against ``torch.fx.symbolic_trace`` alone (target: <= 2x)."""

from __future__ import annotations

import sys
from pathlib import Path

import timm
import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import interleaved, report

import attn_inject as ai


def main(rounds: int = 30) -> None:
    model = timm.create_model("resnet50").eval()
    medians = interleaved(
        {
            "torch.fx.symbolic_trace": lambda: torch.fx.symbolic_trace(model),
            "ai.plan(cbam_after_every_stage)": lambda: ai.plan(model, "cbam_after_every_stage"),
            "ai.inject(cbam_after_every_stage)": lambda: ai.inject(model, "cbam_after_every_stage"),
            "ai.inject(se_resnet)": lambda: ai.inject(model, "se_resnet"),
        },
        rounds,
    )
    report("inject() vs symbolic_trace, timm resnet50 (random init)", medians, "torch.fx.symbolic_trace")


if __name__ == "__main__":
    main()
