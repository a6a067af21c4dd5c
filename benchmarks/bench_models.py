"""Run time of patched models against hand-built timm models with the same blocks.

- timm ``resnet50`` + ``se_resnet`` vs timm ``seresnet50``
- timm ``resnet50d`` + ``eca_resnet`` vs timm ``ecaresnet50d``
- timm ``resnet50`` + ``cbam_resnet`` vs ``timm.create_model("resnet50", block_args=dict(attn_layer="cbam"))``
  (timm's CBAM is not the paper's: MLP without biases, a BatchNorm after the spatial 7x7
  convolution as in the official code, the two pooled descriptors through the MLP in two calls)

each at ``init="paper"`` and ``init="identity"``: eval forward at batch 1 and 16, a training
step (forward, backward, SGD step) at batch 16, and the training step's peak memory. On the
CPU in fp32; on a GPU also bf16 autocast, channels_last and ``torch.compile``. Goals:
patched / hand-built at most 1.03 (paper) and 1.05 (identity), the median of the rounds'
ratios (each round times the three models one after another).

    python benchmarks/bench_models.py [--quick] [--out build/bench/models.md]
"""

from __future__ import annotations

import contextlib
import statistics
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import timm
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from common import Table, emit, interleaved_times, mib, ms, parser, peak_memory, round_ratio

import attn_inject as ai
from attn_inject.validation import cudnn_settings

QUICK_PAIR = ("resnet18", "se_resnet", "seresnet18", {})
PAIRS = (
    ("resnet50", "se_resnet", "seresnet50", {}),
    ("resnet50d", "eca_resnet", "ecaresnet50d", {}),
    ("resnet50", "cbam_resnet", "resnet50", {"block_args": {"attn_layer": "cbam"}}),
)


@dataclass(frozen=True)
class Variant:
    dtype: torch.dtype = torch.float32
    channels_last: bool = False
    compiled: bool = False

    def __str__(self) -> str:
        parts = ["bf16 autocast" if self.dtype == torch.bfloat16 else "fp32"]
        parts.append("channels_last" if self.channels_last else "NCHW")
        if self.compiled:
            parts.append("torch.compile")
        return ", ".join(parts)


GPU_VARIANTS = (
    Variant(),
    Variant(torch.bfloat16),
    Variant(torch.float32, True),
    Variant(torch.bfloat16, True),
    Variant(torch.float32, False, True),
    Variant(torch.bfloat16, True, True),
)


def _prepare(model: nn.Module, variant: Variant, device: torch.device) -> nn.Module:
    model = model.to(device)
    if variant.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def _autocast(variant: Variant, device: torch.device):
    if variant.dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=variant.dtype)


def _forward(
    model: nn.Module, x: torch.Tensor, variant: Variant, device: torch.device
) -> Callable[[], object]:
    def call() -> object:
        with torch.inference_mode(), _autocast(variant, device):
            return model(x)

    return call


def _train_step(
    model: nn.Module, x: torch.Tensor, variant: Variant, device: torch.device
) -> Callable[[], object]:
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
    target = torch.zeros(x.shape[0], dtype=torch.long, device=device)

    def call() -> object:
        with _autocast(variant, device):
            loss = nn.functional.cross_entropy(model(x), target)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    return call


def _input(batch: int, size: int, variant: Variant, device: torch.device) -> torch.Tensor:
    x = torch.randn(batch, 3, size, size, device=device)
    return x.to(memory_format=torch.channels_last) if variant.channels_last else x


def bench_pair(
    base: str,
    recipe: str,
    hand: str,
    hand_kwargs: dict,
    variant: Variant,
    device: torch.device,
    batches: tuple[int, int],
    size: int,
    rounds: int,
) -> list[list[str]]:
    torch.manual_seed(0)
    models = {
        f"timm {hand}{' + cbam' if hand_kwargs else ''}": timm.create_model(hand, **hand_kwargs),
        "paper": ai.inject(timm.create_model(base), recipe, init="paper"),
        "identity": ai.inject(timm.create_model(base), recipe, init="identity"),
    }
    models = {k: _prepare(m, variant, device) for k, m in models.items()}
    if variant.compiled:
        # The hand-built and patched models share timm's ResNet.forward, and dynamo's recompile
        # limit counts per code object: 3 models x 3 measures would exceed its default of 8 and
        # leave the last ones running eagerly.
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        models = {k: torch.compile(m) for k, m in models.items()}  # type: ignore[misc]
    sync = device.type == "cuda"
    label = f"{base} + {recipe}"
    rows = []
    measurements: list[tuple[str, Callable[[nn.Module], Callable[[], object]], bool]] = []
    for batch in (1, batches[1]):
        x = _input(batch, size, variant, device)
        measurements.append(
            (f"eval batch {batch}", lambda m, x=x: _forward(m.eval(), x, variant, device), False)
        )
    x = _input(batches[1], size, variant, device)
    measurements.append(
        (f"train step batch {batches[1]}", lambda m: _train_step(m.train(), x, variant, device), True)
    )
    for what, make, train in measurements:
        calls = {name: make(model) for name, model in models.items()}
        times = interleaved_times(calls, rounds, sync=sync, warmup=2 if variant.compiled else 1, rotate=True)
        hand_times = next(iter(times.values()))
        cells = [label, str(variant), what, ms(statistics.median(hand_times))]
        for name in ("paper", "identity"):
            cells.append(f"{ms(statistics.median(times[name]))} ({round_ratio(times[name], hand_times)})")
        if train:
            cells.append(" / ".join(mib(peak_memory(fn, device)) for fn in calls.values()))
        else:
            cells.append("")
        rows.append(cells)
    return rows


def main(argv: list[str] | None = None) -> str:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, help="interleaved rounds (default: 15 on a CPU, 30 on a GPU)")
    p.add_argument("--no-compile", action="store_true", help="leave out the torch.compile variants")
    p.add_argument("--compile-only", action="store_true", help="only the torch.compile variants")
    p.add_argument(
        "--recipes", nargs="+", metavar="RECIPE", help="only the pairs of these recipes (default: all)"
    )
    args = p.parse_args(argv)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    if args.quick:
        pairs, batches, size, rounds = (QUICK_PAIR,), (1, 2), 32, 1
    else:
        # a 2-core CPU's training step moves by a sixth from one round to the next: 15 rounds
        pairs, batches, size, rounds = PAIRS, (1, 16), 224, 15 if not cuda else 30
    rounds = args.rounds or rounds
    variants = GPU_VARIANTS if cuda and not args.quick else (Variant(),)
    if args.no_compile:
        variants = tuple(v for v in variants if not v.compiled)
    if args.compile_only:
        variants = tuple(v for v in variants if v.compiled)
    if args.recipes:
        pairs = tuple(pair for pair in pairs if pair[1] in args.recipes)
    table = Table(
        f"Patched vs hand-built, {size} px, on {'the GPU' if cuda else 'the CPU'}",
        [
            "model",
            "variant",
            "measure",
            "hand-built ms",
            "paper ms (ratio)",
            "identity ms (ratio)",
            "train peak MiB (hand / paper / identity)",
        ],
        note=(
            f"Medians of {rounds} interleaved rounds, each round starting one model later than the one "
            "before; ratio = patched / hand-built within each round, its median and interquartile range "
            "over the rounds (goals: <= 1.03 paper, <= 1.05 identity). Random init. timm's CBAM is not "
            "the paper's block (no MLP biases, a BatchNorm after the spatial convolution, two MLP "
            "calls): that row compares costs of different blocks."
            + (
                ""
                if cuda
                else " On a CPU the training peak is the rise of the process's resident set, which depends "
                "on what the allocator kept from earlier calls: a rough figure (a GPU's allocator counts "
                "exactly)."
            )
        ),
    )
    with cudnn_settings(benchmark=False) if not cuda else contextlib.nullcontext():
        for base, recipe, hand, kwargs in pairs:
            for variant in variants:
                table.rows += bench_pair(base, recipe, hand, kwargs, variant, device, batches, size, rounds)
    return emit("Patched vs hand-built models", [table], args.out, args.quick)


if __name__ == "__main__":
    main()
