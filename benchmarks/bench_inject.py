"""The engine: ``ai.inject()`` against ``torch.fx.symbolic_trace`` and ``timm.create_model``.

Goals: ``inject`` at most 0.5x ``timm.create_model`` of the same model, and linear in the
size of its graph; a model of over 1B parameters
built on the meta device (timm ``regnety_2560``, 1.28 B) injected in seconds with no
parameter memory. Peak memory is the rise of the process's peak resident set during one call.

    python benchmarks/bench_inject.py [--quick] [--out build/bench/inject.md]
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import timm
import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import Table, emit, interleaved, mib, ms, parser, peak_memory

import attn_inject as ai
from attn_inject.blocks.proof import proved_designs, shared_proofs
from attn_inject.core.kept import forget_kept_results
from attn_inject.graph.analysis import MacCounter
from attn_inject.graph.shapes import propagate_shapes
from attn_inject.planning import match, scopes
from attn_inject.planning.match import plan_prepared, prepare
from attn_inject.recipes.recipe import load_recipe
from attn_inject.surgery.rewrite import build_block, rewrite

MODELS = (
    ("resnet50", ("se_resnet", "cbam_after_every_stage")),
    ("convnext_base", ("se_after_every_stage",)),
    ("efficientnet_b3", ("cbam_after_every_stage",)),
    ("regnety_160", ("cbam_after_every_stage",)),
    ("swin_base_patch4_window7_224", ("se_after_every_stage",)),
)
META_MODEL = ("regnety_2560", ("cbam_after_every_stage",))  # 1.28 B parameters
QUICK_MODELS = (("resnet18", ("se_resnet",)),)
QUICK_META_MODEL = ("regnety_008", ("cbam_after_every_stage",))
FIRST_CALL_MODELS = (("efficientnet_b3", "cbam_after_every_stage"), ("resnet50", "se_resnet"))
QUICK_FIRST_CALL_MODELS = (("resnet18", "se_resnet"),)
# What a first call computes that a repeated one finds kept, table by table.
KEPT_TABLES = {
    "built-in blocks' costs": match._built_in_costs,
    "slot verdicts": scopes.slot_verdicts,
    "proved block designs": proved_designs,
}
MAC_COUNT_MODELS = ("resnet50", "convnext_base", "efficientnet_b3", "swin_base_patch4_window7_224")
QUICK_MAC_COUNT_MODELS = ("resnet18",)
PHASES = (("resnet50", "se_resnet"), ("resnet50", "cbam_after_every_stage"))
QUICK_PHASES = (("resnet18", "se_resnet"),)


def _symbolic_trace(model: torch.nn.Module) -> Callable[[], object]:
    return lambda: torch.fx.symbolic_trace(model)


def _first_call(model: torch.nn.Module, recipe: str) -> object:
    """``inject`` as a process's first call for this architecture does it: every result kept
    across calls (``forget_kept_results``) dropped first."""
    forget_kept_results()
    return ai.inject(model, recipe, allow_empty=True)


def _runs(fn: Callable[[], object]) -> str:
    try:
        fn()
    except Exception as error:
        return f"fails: {type(error).__name__}: {str(error).splitlines()[0][:80]}"
    return ""


def bench_model(name: str, recipes: tuple[str, ...], rounds: int, meta: bool = False) -> list[list[str]]:
    """Each recipe's ``inject`` against ``symbolic_trace`` and ``create_model``, interleaved;
    a process's first injection (nothing kept) in a second interleaved run of its own, so
    that its dropping what calls keep never reaches the repeated calls of the first."""

    def build() -> torch.nn.Module:
        if meta:
            with torch.device("meta"):
                return timm.create_model(name)
        return timm.create_model(name)

    model = build().eval()
    params = sum(p.numel() for p in model.parameters())
    builder = f"timm.create_model{' (meta)' if meta else ''}"
    peers: dict[str, Callable[[], object]] = {builder: build}
    peers["torch.fx.symbolic_trace"] = _symbolic_trace(model)
    repeated = {f"ai.inject({r})": (lambda r=r: ai.inject(model, r, allow_empty=True)) for r in recipes}
    runs = [peers | repeated]
    if not meta:  # a process's first injection of this architecture: nothing kept from before
        runs.append(
            peers
            | {
                f"{label}, first call": (lambda r=r: _first_call(model, r))
                for label, r in zip(repeated, recipes, strict=True)
            }
        )
    blocks = {f"ai.inject({r})": str(len(ai.plan(model, r))) for r in recipes}
    blocks |= {f"{label}, first call": count for label, count in blocks.items()}
    rows = []
    for i, run in enumerate(runs):
        failed = {label: why for label, fn in run.items() if (why := _runs(fn))}
        working = {label: fn for label, fn in run.items() if label not in failed}
        medians = interleaved(working, rounds, warmup=0, collect_garbage=True)
        peer, built = medians.get("torch.fx.symbolic_trace"), medians.get(builder)
        for label in run:
            if i and label in peers:  # the peers' rows are those of the first run
                continue
            size = f"{params / 1e6:.1f} M"
            if label in failed:
                rows.append([name, size, label, "", failed[label], "", "", ""])
                continue
            peak = peak_memory(working[label])
            ratio = f"{medians[label] / peer:.2f}" if peer else "n/a"
            to_builder = f"{medians[label] / built:.2f}" if built else "n/a"
            rows.append(
                [name, size, label, blocks.get(label, ""), ms(medians[label]), ratio, to_builder, mib(peak)]
            )
    return rows


def bench_first_call(name: str, recipe: str, rounds: int) -> list[list[str]]:
    """What a first call adds to a repeated one: ``inject`` with one kept table emptied before
    each call, then with every one (a process's first call), against a repeated call."""
    model = timm.create_model(name).eval()

    def dropping(tables: list[Any]) -> Callable[[], object]:
        def call() -> object:
            for table in tables:
                table.clear()
            return ai.inject(model, recipe, allow_empty=True)

        return call

    calls = {"repeated call": dropping([])}
    calls |= {f"{label} dropped": dropping([table]) for label, table in KEPT_TABLES.items()}
    calls["first call (every kept table dropped)"] = lambda: _first_call(model, recipe)
    medians = interleaved(calls, rounds, collect_garbage=True)
    repeated = medians["repeated call"]
    return [
        [
            name,
            recipe,
            label,
            ms(seconds),
            "" if label == "repeated call" else f"{(seconds - repeated) * 1e3:+.2f}",
        ]
        for label, seconds in medians.items()
    ]


def bench_mac_count(name: str, rounds: int) -> list[str]:
    """A plan's multiply-add count (``plan.base_macs``, its pass over the meta graph: the
    function and method shape rules answer, torch's convolutions and linear layers run the
    kernels the counter counts) against the same count without shape rules."""
    graph = prepare(timm.create_model(name).eval()).graph

    def without_rules() -> int:
        with MacCounter() as counter:
            propagate_shapes(graph.root, graph.graph, graph.input_shape, rules=False)
        return counter.total_macs() // graph.input_shape[0]

    count = graph.count_macs()
    same = "yes" if without_rules() == count else "NO"
    medians = interleaved({"pass": graph.count_macs, "kernels": without_rules}, rounds, collect_garbage=True)
    ratio = f"{medians['pass'] / medians['kernels']:.2f}"
    return [name, f"{count / 1e9:.2f} G", ms(medians["pass"]), ms(medians["kernels"]), ratio, same]


def _proved_together(fn: Callable[[], object]) -> Callable[[], object]:
    """``fn`` with the proofs of the blocks it builds shared, as inside ``inject``."""

    def call() -> object:
        with shared_proofs():
            return fn()

    return call


def bench_phases(name: str, recipe: str, rounds: int) -> list[list[str]]:
    """Where ``inject``'s time goes: tracing and shape inference, matching and placing, the
    rewrite, and inside the rewrite the construction of the blocks alone (their weights'
    random init, which a hand-built model with the same blocks pays in ``create_model``, and
    their proof at insertion)."""
    model = timm.create_model(name).eval()
    loaded = load_recipe(recipe)
    prepared = prepare(model)
    plan = plan_prepared(prepared, loaded)
    device, dtype = torch.device("cpu"), torch.float32
    phases: dict[str, Callable[[], object]] = {
        "torch.fx.symbolic_trace": _symbolic_trace(model),
        "trace + shapes + stages": lambda: prepare(model),
        "match + place": lambda: plan_prepared(prepared, loaded),
        "rewrite": _proved_together(lambda: rewrite(model, prepared.graph, plan)),
        "  of which: building the blocks": _proved_together(
            lambda: [build_block(p, plan.init, device, dtype) for p in plan]
        ),
        "ai.inject (all of it)": lambda: ai.inject(model, recipe),
    }
    medians = interleaved(phases, rounds, collect_garbage=True)
    peer = medians["torch.fx.symbolic_trace"]
    return [[name, recipe, label, ms(seconds), f"{seconds / peer:.2f}"] for label, seconds in medians.items()]


def main(argv: list[str] | None = None) -> str:
    args = parser(__doc__.splitlines()[0]).parse_args(argv)
    models = QUICK_MODELS if args.quick else MODELS
    meta_name, meta_recipes = QUICK_META_MODEL if args.quick else META_MODEL
    rounds = 1 if args.quick else 15
    table = Table(
        "inject() vs symbolic_trace vs create_model (CPU, random init, eval)",
        [
            "model",
            "params",
            "call",
            "blocks",
            "median ms",
            "ratio to symbolic_trace",
            "ratio to create_model",
            "peak MiB",
        ],
        note=(
            f"Medians of {rounds} interleaved rounds, Python's cyclic garbage collected before each "
            "timed call. `ai.inject` traces the whole model, infers shapes on the meta device, plans, "
            "and rewrites only the modules that run a block; a first call has nothing kept from an "
            "earlier one (slot verdicts, built-in blocks' costs, proved block designs, the code read "
            "for unpacking traced values), timed in a "
            "second interleaved run with the same peers, its ratios against that run's peers."
        ),
    )
    for name, recipes in models:
        table.rows += bench_model(name, recipes, rounds)
    table.rows += bench_model(meta_name, meta_recipes, max(1, rounds // 5), meta=True)
    phases = Table(
        "Where inject's time goes (CPU)",
        ["model", "recipe", "phase", "median ms", "ratio to symbolic_trace"],
        note=f"Medians of {rounds} interleaved rounds of each phase alone, garbage collected before each.",
    )
    for name, recipe in QUICK_PHASES if args.quick else PHASES:
        phases.rows += bench_phases(name, recipe, rounds)
    first = Table(
        "What a first call adds (CPU)",
        ["model", "recipe", "call", "median ms", "added to a repeated call, ms"],
        note=(
            f"Medians of {rounds} interleaved rounds, garbage collected before each: `inject` with one table "
            "of results kept across calls emptied before each call, and with every one (a process's first "
            "call), against a repeated call."
        ),
    )
    for name, recipe in QUICK_FIRST_CALL_MODELS if args.quick else FIRST_CALL_MODELS:
        first.rows += bench_first_call(name, recipe, rounds)
    counts = Table(
        "A plan's multiply-add count (CPU)",
        [
            "model",
            "MACs per image",
            "its pass, median ms",
            "without shape rules, ms",
            "ratio",
            "same count",
        ],
        note=(
            f"Medians of {rounds} interleaved rounds, garbage collected before each. `plan.base_macs` is "
            "counted when a figure asks for it (a plan's table, a saved manifest), in a pass over the meta "
            "graph where the shape rules answer for the functions and methods the counter counts nothing "
            "of and torch's convolutions and linear layers run the kernels it counts."
        ),
    )
    counts.rows = [
        bench_mac_count(name, rounds) for name in (QUICK_MAC_COUNT_MODELS if args.quick else MAC_COUNT_MODELS)
    ]
    return emit("Engine", [table, phases, first, counts], args.out, args.quick)


if __name__ == "__main__":
    main()
