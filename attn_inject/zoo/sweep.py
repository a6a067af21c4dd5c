"""The zoo sweep: every timm and torchvision model, every shipped recipe, one report.

For each model: build it on the meta device (on the CPU when it cannot be), trace and
annotate it once, plan every recipe, compare its stages with timm's ``feature_info``, and,
with ``identity_check``, build it for real and check identity at a small input size. The
results are :class:`ZooRecord` rows (one per model and recipe) that :mod:`.report`
turns into ``docs/zoo.md`` and ``docs/zoo.csv``.
"""

from __future__ import annotations

import fnmatch
import multiprocessing
import os
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, fields, replace
from typing import TypedDict

import torch
from torch import nn

from ..core.errors import InputError
from ..core.layouts import Layout
from ..planning.points import Attach

__all__ = [
    "IDENTITY_MAX_PARAMS",
    "ModelResult",
    "ZooRecord",
    "default_recipes",
    "list_zoo",
    "sweep",
    "sweep_model",
]

IDENTITY_MAX_PARAMS = 100_000_000
IDENTITY_SIZES = (64, 96, 128, 160, 224)  # tried in turn until the model accepts one


@dataclass(frozen=True)
class ZooRecord:
    """One model and one recipe. ``status`` is "ok" or the step that failed ("build",
    "trace", "shapes", "plan", "inject"); ``reason`` says why."""

    source: str
    model: str
    recipe: str
    status: str
    reason: str = ""
    tracing: str = ""
    opaque: str = ""  # the submodules kept whole, '; '-separated
    fx_plain: bool | None = None
    target: str = ""
    input_size: str = ""
    stages: int = 0
    nchw_stages: int = 0
    points: int = 0
    nhwc_points: int = 0  # of ``points``: blocks on channels-last maps
    token_points: int = 0  # of ``points``: blocks on token grids
    params_added: int = 0
    base_params: int = 0
    stage_agreement: str = ""
    identity: str = ""
    identity_rel_diff: float | None = None
    seconds: float = 0.0
    keeps_class: bool | None = None  # None: no block; False: the planned module itself is rewritten
    rewritten: int = 0  # modules whose forward is rewritten (the rest keep their code)
    class_reason: str = ""  # why the planned module itself is rewritten

    @classmethod
    def columns(cls) -> list[str]:
        return [f.name for f in fields(cls)]


@dataclass(frozen=True)
class ModelResult:
    """Every record of one model, and how long it took."""

    source: str
    model: str
    records: tuple[ZooRecord, ...] = field(default_factory=tuple)
    seconds: float = 0.0


def default_recipes() -> list[str]:
    """The recipes a sweep plans by default: every shipped recipe of the built-in blocks. The
    shipped recipes of timm's kinds run on a sample with ``--recipes`` (docs/zoo.md)."""
    from ..blocks import BUILT_IN
    from ..recipes.recipe import get_recipe, list_recipes

    def built_in(name: str) -> bool:
        recipe = get_recipe(name)
        return all(rule.block.kind in BUILT_IN for rule in recipe.all_rules)

    return [name for name in list_recipes() if built_in(name)]


def list_zoo(source: str = "all", patterns: Sequence[str] | str | None = None) -> list[str]:
    """Qualified names (``timm:NAME`` / ``tv:NAME``) of the models to sweep, in the sweep's
    order; with ``patterns``, those whose name matches one of them."""
    if source not in ("timm", "torchvision", "all"):
        raise InputError(f"source {source!r} is not allowed; allowed: timm, torchvision, all")
    names: list[str] = []
    if source in ("timm", "all"):
        import timm

        names += [f"timm:{n}" for n in timm.list_models()]
    if source in ("torchvision", "all"):
        import torchvision

        names += [f"tv:{n}" for n in torchvision.models.list_models()]
    if patterns:
        chosen = [patterns] if isinstance(patterns, str) else list(patterns)
        names = [
            n
            for n in names
            if any(fnmatch.fnmatchcase(n.partition(":")[2], p) or fnmatch.fnmatchcase(n, p) for p in chosen)
        ]
    return names


def _reason(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0] if lines else ''}"[:300]


def _fx_plain(model: nn.Module) -> bool:
    from ..graph.trace import eval_mode

    try:
        with eval_mode(model):
            torch.fx.symbolic_trace(model)
        return True
    except Exception:
        return False


def _stage_channels(stage) -> int | None:
    """A stage's channels: of its feature map (NCHW or NHWC), or of its tokens (B, N, C)."""
    from ..graph.shapes import tensor_meta

    if stage.channels is not None:
        return int(stage.channels)
    t = tensor_meta(stage.node)
    return int(t.shape[-1]) if t is not None and t.dim() == 3 else None


def stage_agreement(model: nn.Module, stages: Sequence, target: str) -> str:
    """Whether the stages found match timm's ``feature_info`` at reduction >= 4:
    "agree", "n/a" (no feature_info), "unchecked: why" (feature_info names modules the model
    does not have, so there is nothing to compare with), or "differs: why"."""
    from ..graph.stages import stage_entries

    info = getattr(model, "feature_info", None)
    if info is None or target:
        return "n/a"
    entries = stage_entries(info)
    if not entries:
        return "n/a"
    expected = [(e.get("module", ""), e.get("num_chs")) for e in entries]
    found = [(s.name, _stage_channels(s)) for s in stages]
    if found == expected:
        return "agree"
    if [c for _, c in found] == [c for _, c in expected]:
        return "agree"
    names = {s.name for s in stages}
    missing = [m for m, _ in expected if m not in names]
    if missing:
        try:
            model.get_submodule(missing[0])
        except AttributeError:
            return f"unchecked: feature_info names module {missing[0]!r}, which the model does not have"
        return f"differs: feature_info module {missing[0]!r} is not in the traced graph"
    # Every listed module is a stage here: compare each by name, not by position (an extra
    # stage in the graph would shift every later pair).
    channels = dict(found)
    wrong = next(((m, c) for m, c in expected if channels[m] != c), None)
    if wrong is not None:
        module, listed = wrong
        return f"differs: {module} has {channels[module]} channels in the graph, feature_info says {listed}"
    return f"differs: {len(found)} stages found, feature_info lists {len(expected)}"


def _identity_size(
    model: nn.Module, planned: tuple[int, ...], fits: Callable[[tuple[int, ...]], bool] = lambda size: True
) -> tuple[int, ...] | None:
    """A small input size ``model`` runs at and ``fits`` (every plan keeps its points): its
    fixed size where it has one, else the first of IDENTITY_SIZES that works."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    if cfg.get("fixed_input_size") or len(planned) != 3:
        candidates = [tuple(planned)]
    else:
        candidates = [(planned[0], s, s) for s in IDENTITY_SIZES if s < max(planned[1:])] + [tuple(planned)]
    for size in candidates:
        try:
            with torch.no_grad():
                model(torch.zeros((1, *size)))
        except Exception:
            continue
        if fits(size):
            return size
    return None


def sweep_model(
    name: str,
    recipes: Sequence[str],
    *,
    identity_check: bool = False,
    identity_max_params: int = IDENTITY_MAX_PARAMS,
) -> ModelResult:
    """Every record of one model (``timm:NAME`` or ``tv:NAME``)."""
    from ..graph.shapes import ShapeError
    from ..models.build import build_for_planning, input_size_for
    from ..planning.match import prepare, resolve_target
    from ..recipes.recipe import load_recipe

    warnings.filterwarnings("ignore")
    source, _, bare = name.partition(":")
    start = time.perf_counter()
    loaded = [load_recipe(r) for r in recipes]

    def fail(status: str, reason: str, **extra) -> ModelResult:
        seconds = time.perf_counter() - start
        rows = tuple(
            ZooRecord(source, bare, r.name, status, reason, seconds=seconds, **extra) for r in loaded
        )
        return ModelResult(source, bare, rows, seconds)

    try:
        model = build_for_planning(name)
    except Exception as error:
        return fail("build", _reason(error))
    target = resolve_target(model, loaded[0], None) if loaded else ""
    size = input_size_for(name, model)
    try:
        prepared = prepare(model, input_size=size, target=target)
    except Exception as error:
        status = "shapes" if isinstance(error, ShapeError) else "trace"
        return fail(status, _reason(error), fx_plain=_fx_plain(model), target=target)
    common = _common_record(source, bare, model, prepared, target)
    plans: dict = {}
    rows = [_recipe_record(common, prepared, recipe, plans) for recipe in loaded]
    if identity_check:
        rows = _check_identity(name, rows, plans, prepared.base_params, identity_max_params, target)
    seconds = time.perf_counter() - start
    return ModelResult(source, bare, tuple(rows), seconds)


def _common_record(source: str, bare: str, model: nn.Module, prepared, target: str) -> ZooRecord:
    """What every recipe's row of a model shares: how it traced, its stages and parameters."""
    from ..graph.layout import NCHW, layout_of
    from ..graph.trace import tracing_strategy

    graph = prepared.graph
    return ZooRecord(
        source,
        bare,
        recipe="",
        status="",
        tracing=tracing_strategy(graph.opaque, graph.assumptions),
        opaque="; ".join(o.name for o in graph.opaque),
        fx_plain=_fx_plain(model) if not target else None,
        target=target,
        input_size="x".join(str(s) for s in graph.input_shape[1:]),
        stages=len(prepared.stages),
        nchw_stages=sum(1 for s in prepared.stages if s.skip_reason is None and layout_of(s.node) == NCHW),
        base_params=prepared.base_params,
        stage_agreement=stage_agreement(model, prepared.stages, target),
    )


def _recipe_record(common: ZooRecord, prepared, recipe, plans: dict) -> ZooRecord:
    """One recipe's row: its plan's points by layout and what they add (``plans`` gets the plan)."""
    from ..planning.match import plan_prepared

    t0 = time.perf_counter()
    try:
        plans[recipe.name] = plan_prepared(prepared, recipe)
    except Exception as error:
        return replace(common, recipe=recipe.name, status="plan", reason=_reason(error))
    p = plans[recipe.name]
    return replace(
        common,
        recipe=recipe.name,
        status="ok",
        reason=p.empty_reason,
        points=len(p),
        nhwc_points=sum(1 for point in p if point.layout == Layout.NHWC),
        token_points=sum(1 for point in p if point.layout == Layout.TOKENS),
        params_added=p.params_added,
        seconds=time.perf_counter() - t0,
        **_class_kept(p),
    )


class _ClassKept(TypedDict, total=False):
    keeps_class: bool
    rewritten: int
    class_reason: str


def _class_kept(plan) -> _ClassKept:
    """Whether the planned model (or target) keeps its class: no point is run by its own
    rewritten forward; and if not, why (the first scope note)."""
    if not plan.points:
        return _ClassKept()
    owners = {p.owner for p in plan if p.attach == Attach.GRAPH}
    root = [p for p in plan if p.attach == Attach.GRAPH and p.owner == ""]
    reason = ""
    if root:
        notes = [p.scope_note for p in root if p.scope_note]
        reason = notes[0][:200] if notes else "a point lies in the model's own forward"
    return _ClassKept(keeps_class=not root, rewritten=len(owners), class_reason=reason)


IDENTITY_CHECKS = ("identity", "parameters", "shapes", "finite")


def _check_identity(name, rows, plans, base_params, max_params, target) -> list[ZooRecord]:
    from ..models.build import build_model
    from ..planning.match import plan_prepared, prepare

    wanted = [r for r in rows if r.status == "ok" and r.points]
    if not wanted:
        return rows
    if base_params > max_params:
        skip = f"skipped: {base_params / 1e6:.0f}M parameters > {max_params / 1e6:.0f}M"
        return [replace(r, identity=skip) if r in wanted else r for r in rows]
    torch.manual_seed(0)
    try:
        model = build_model(name).eval()
    except Exception as error:
        return [replace(r, identity=f"error: {_reason(error)}") if r in wanted else r for r in rows]
    planned = tuple(plans[wanted[0].recipe].input_size)
    runs_on = model.get_submodule(target) if target else model

    def fits(size: tuple[int, ...]) -> bool:  # deep stages of 1x1 at a small size lose their points
        try:
            prepared = prepare(model, input_size=size, target=target)
            return all(len(plan_prepared(prepared, plans[r.recipe].recipe)) == r.points for r in wanted)
        except Exception:
            return False

    size = _identity_size(runs_on, planned, fits)
    if size is None:
        skip = "skipped: no input size up to the planned one that the model accepts with the same points"
        return [replace(r, identity=skip) if r in wanted else r for r in rows]
    return [_identity_of(model, row, plans, size, target) if row in wanted else row for row in rows]


def _identity_of(
    model: nn.Module, row: ZooRecord, plans: dict, size: tuple[int, ...], target: str
) -> ZooRecord:
    """``row`` with its recipe injected into the real ``model`` at ``size`` and checked for
    identity (and parameters, finiteness) against it."""
    from ..surgery.inject import inject
    from ..validation import validate

    t0 = time.perf_counter()
    try:
        patched = inject(model, plans[row.recipe].recipe, input_size=size, target=target)
        report = validate(model, patched, input_size=size, device="cpu", seeds=1, checks=IDENTITY_CHECKS)
    except Exception as error:
        return replace(row, identity=f"error: {_reason(error)}")
    verdict = (
        "ok" if report.passed else "failed: " + ("identity" if not report.identity_ok else "params/finite")
    )
    return replace(
        row,
        identity=verdict,
        identity_rel_diff=report.relative_diff,
        seconds=row.seconds + time.perf_counter() - t0,
    )


def _worker(args: tuple) -> ModelResult:
    name, recipes, identity_check, max_params = args
    torch.set_num_threads(1)
    return sweep_model(name, recipes, identity_check=identity_check, identity_max_params=max_params)


def sweep(
    names: Iterable[str],
    recipes: Sequence[str],
    *,
    identity_check: bool = False,
    identity_every: int = 1,
    identity_max_params: int = IDENTITY_MAX_PARAMS,
    jobs: int | None = None,
    sample_from: Sequence[str] | None = None,
) -> Iterator[ModelResult]:
    """Sweep ``names`` in ``jobs`` worker processes (default: one per CPU), yielding each
    model's result as it finishes. With ``identity_check``, models 0, N, 2N... of ``names``
    (N = ``identity_every``), or of ``sample_from`` when given (the full list a partial
    sweep updates), are also built and checked for identity."""
    names = list(names)
    jobs = max(1, jobs or os.cpu_count() or 1)
    positions = {n: i for i, n in enumerate(sample_from or names)}
    tasks = [
        (n, tuple(recipes), identity_check and positions.get(n, 1) % identity_every == 0, identity_max_params)
        for n in names
    ]
    if jobs == 1:
        for task in tasks:
            yield _worker(task)
        return
    context = multiprocessing.get_context("spawn")
    with context.Pool(jobs, maxtasksperchild=25) as pool:
        yield from pool.imap_unordered(_worker, tasks, chunksize=1)
        # every model swept: the workers end on their own (leaving the block terminates them,
        # which can leave a semaphore behind for the resource tracker to warn about)
        pool.close()
        pool.join()
