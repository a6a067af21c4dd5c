"""Native channels-last blocks against the permute form on (B, H, W, C) maps.

The permute form is an NCHW block between ``permute(0, 3, 1, 2)`` and ``permute(0, 2, 3, 1)``,
as a block had to be inserted before blocks took a layout. Both compute the same values
(tests/test_layouts.py); this times them, interleaved, medians over rounds, forward only and
forward + backward, on Swin-T's stage shapes. Target: native at least as fast (ratio <= 1).
CUDA when there is one (batch 32), else CPU (batch 4). ``--smoke``: one tiny round.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import interleaved, report

import attn_inject as ai

KINDS = ("se", "eca", "cbam")
SWIN_T_STAGES = ((56, 56, 96), (28, 28, 192), (14, 14, 384), (7, 7, 768))


def permute_form(block: torch.nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda x: block(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)


def candidates(
    kind: str, shape: tuple[int, ...], device: torch.device, backward: bool
) -> dict[str, Callable[[], object]]:
    """Native and permute-form calls of block ``kind`` (paper weights) on a (B, H, W, C) map."""
    channels = shape[-1]
    torch.manual_seed(0)
    nchw = ai.create_block(kind, channels, init="paper").to(device)
    native = ai.create_block(kind, channels, init="paper", layout="NHWC").to(device)
    native.load_state_dict({k: v.reshape(native.state_dict()[k].shape) for k, v in nchw.state_dict().items()})
    x = torch.randn(shape, device=device, requires_grad=backward)
    forms = {"native NHWC": native, "permute + NCHW + permute": permute_form(nchw)}

    def call(fn: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[], object]:
        def run() -> object:
            if backward:
                fn(x).sum().backward()
                return None
            with torch.inference_mode():
                return fn(x)

        return run

    return {name: call(fn) for name, fn in forms.items()}


def main(argv: list[str] | None = None) -> dict[tuple[str, str, str], dict[str, float]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="one tiny round (a test that the script runs)")
    parser.add_argument(
        "--rounds", type=int, default=None, help="timed rounds (default: 50 on CUDA, 15 on CPU)"
    )
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    batch, rounds = (32, 50) if cuda else (4, 15)
    stages = SWIN_T_STAGES
    rounds = args.rounds or rounds
    if args.smoke:
        batch, rounds, stages = 1, 1, ((6, 5, 16),)
    results = {}
    for mode in ("forward", "forward + backward"):
        for kind in KINDS:
            for h, w, c in stages:
                shape = (batch, h, w, c)
                medians = interleaved(candidates(kind, shape, device, mode != "forward"), rounds, sync=cuda)
                report(f"{kind} {mode}, {shape} on {device}", medians, "permute + NCHW + permute")
                results[(mode, kind, str(shape))] = medians
    return results


if __name__ == "__main__":
    main()
