"""The plan: every insertion point a recipe matches in a model, as plain typed data.

``plan(model, recipe)`` traces and annotates the model, matches each rule against the
candidates of its position, and returns a :class:`Plan`, a sequence of
:class:`InsertionPoint` in graph order, without changing the model::

    >>> p = plan(torchvision.models.resnet18(), "se_resnet")
    >>> [pt.channels for pt in p]
    [64, 64, 128, 128, 256, 256, 512, 512]
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn

from ..blocks import (
    accepts_order,
    block_for_point,
    layout_kwargs,
    permutes,
    takes_grid_at_call,
    uses_grid,
)
from ..blocks.costs import closed_form_macs, closed_forms_hold
from ..blocks.params import INIT_MODES
from ..blocks.proof import block_name, built_in_class, run_block
from ..core.errors import InputError
from ..core.kept import Kept
from ..core.markers import is_inserted_block
from ..graph import ops
from ..graph.analysis import AnnotatedGraph, MacCounter, annotate
from ..graph.layout import NCHW
from ..graph.node_layout import layout_of
from ..graph.shapes import tensor_meta
from ..graph.stages import Stage, find_stages
from ..graph.trace import fx_constants_dropped
from ..models.build import wrapper_of
from ..models.facts import count_params, default_input_size, model_name
from ..models.targets import default_target, get_target, returns_its_stages, target_input_size
from ..recipes.patterns import search
from ..recipes.recipe import BlockSpec, Recipe, Rule, load_recipe, positions_of
from .candidates import Candidate, find_candidates, stage_index
from .points import Attach, InsertionPoint, LazyCount, Plan, PlanError, QuantizedModelError, SkippedPoint
from .scopes import GridFrom, Placement, place
from .stage_ends import declared_backbone_entries, ends_at_maps, returned_stage_entries

__all__ = [
    "analyse",
    "build_plan",
    "plan",
    "plan_prepared",
    "prepare",
    "resolve_target",
]

BATCH = 2  # two samples: batch norm in training mode refuses one value per channel


def _meta_block(block: BlockSpec, channels: int, init: str, layout: Mapping[str, Any]) -> nn.Module:
    with torch.device("meta"):
        return block_for_point(block.kind, channels, block.params, init, layout)


# The costs of built-in blocks, kept across plans: a built-in block's parameters and
# multiply-adds follow from its class, arguments and input shape alone, and counting them
# runs the block on the meta device (a few milliseconds each, through torch's Python meta
# kernels). Bounded; keyed by the class itself, so a kind registered again is counted afresh.
_built_in_costs: Kept[int] = Kept(4096)


def _kept_cost(key: tuple[Any, ...] | None, count: Callable[[], int]) -> int:
    """``count()``, kept under ``key`` across plans (None: not kept)."""
    return count() if key is None else _built_in_costs.get(key, count)


class BlockCosts:
    """The parameters and multiply-adds each block adds, built once on the meta device per distinct
    block, size, init and layout, for the plan being built (a block kind registered again
    between two plans is counted afresh); a built-in block's, once per process."""

    def __init__(self) -> None:
        self._params: dict[tuple, int] = {}
        self._macs: dict[tuple, int] = {}
        self._blocks: dict[tuple, nn.Module] = {}  # each meta block, built once for both counts

    def _block(self, block: BlockSpec, channels: int, init: str, layout: Mapping[str, Any]) -> nn.Module:
        key = self._key(block, channels, init, layout)
        if key not in self._blocks:
            self._blocks[key] = _meta_block(block, channels, init, layout)
        return self._blocks[key]

    @staticmethod
    def _key(block: BlockSpec, size: Any, init: str, layout: Mapping[str, Any]) -> tuple:
        return (block.kind, repr(sorted(block.params.items())), size, init, repr(sorted(layout.items())))

    def params(self, block: BlockSpec, channels: int, init: str, layout: Mapping[str, Any]) -> int:
        """Parameters ``block`` adds at ``channels`` channels; ``layout``: its layout
        arguments (``blocks.layout_kwargs``)."""
        key = self._key(block, channels, init, layout)
        if key not in self._params:
            self._params[key] = _kept_cost(
                _built_in(block, ("params", *key)),
                lambda: count_params(self._block(block, channels, init, layout)),
            )
        return self._params[key]

    def macs(
        self,
        block: BlockSpec,
        shape: tuple[int, ...],
        channels: int,
        init: str,
        layout: Mapping[str, Any],
        key_name: str = "",
    ) -> int:
        """Multiply-adds of ``block`` on one sample of ``shape`` ((C, H, W), or its layout's shape);
        a block that fails there is refused naming it (``key_name``: its key)."""
        key = self._key(block, (shape, channels), init, layout)
        if key not in self._macs:
            counter = MacCounter()
            # a built-in block's count in closed form, while torch's formulas count what they did
            closed = _built_in(block, key) is not None and closed_forms_hold(counter.formulas)

            def count() -> int:
                module = self._block(block, channels, init, layout)
                known = closed_form_macs(module, shape) if closed else None
                if known is not None:
                    return known
                with counter:
                    run_block(
                        module, torch.empty((1, *shape), device="meta"), block_name(key_name, block.kind)
                    )
                return counter.total_macs()

            self._macs[key] = _kept_cost(_built_in(block, ("macs", closed, *key)), count)
        return self._macs[key]


def _built_in(block: BlockSpec, key: tuple[Any, ...]) -> tuple[Any, ...] | None:
    """``key`` with the block's class when its kind builds a built-in block (see
    :data:`~attn_inject.blocks.proof.GATED_BLOCKS`), else None: a registered factory's
    costs may depend on more than its arguments."""
    factory = built_in_class(block.kind)
    return (factory, *key) if factory is not None else None


def _keep(rule: Rule, candidate: Candidate, stage: int | None, n_stages: int) -> bool:
    if rule.stages is not None:
        wanted = {s % n_stages for s in rule.stages}
        if stage is None or stage not in wanted:
            return False
    channels = candidate.channels
    if channels is not None:
        if rule.min_channels is not None and channels < rule.min_channels:
            return False
        if rule.max_channels is not None and channels > rule.max_channels:
            return False
    if rule.include and not any(search(p, candidate.name) for p in rule.include):
        return False
    return not any(search(p, candidate.name) for p in rule.exclude)


def _earlier_block(candidate: Candidate, graph: AnnotatedGraph) -> bool:
    """Whether a block of an earlier injection already sits on the candidate's edge: the
    node is one, a consumer is one, or (an edge to every user) every user is one."""

    def is_block(node: fx.Node) -> bool:
        module = graph.module(node) if node.op == "call_module" else None
        return module is not None and is_inserted_block(module)

    if is_block(candidate.node):
        return True
    if candidate.consumers is not None:
        return any(is_block(n) for n in candidate.consumers)
    return bool(candidate.node.users) and all(is_block(n) for n in candidate.node.users)


def _unread(candidate: Candidate, graph: AnnotatedGraph) -> str | None:
    """Why the model's output would not depend on what a block at ``candidate`` returns (no
    reader of the node's values reaches an output), or None where it would."""
    node = candidate.node.name
    if candidate.consumers is None:
        if graph.reaches_output(candidate.node):
            return None
        return f"the model's output does not depend on node {node!r}"
    if any(graph.reaches_output(c) and not ops.reads_shape_only(c) for c in candidate.consumers):
        return None
    readers = ", ".join(repr(c.name) for c in candidate.consumers[:2])
    return f"the model's output does not depend on the values node {node!r} passes to {readers}"


def build_plan(
    graph: AnnotatedGraph,
    stages: list[Stage],
    recipe: Recipe,
    init: str,
    name: str,
    base_params: int,
    target: str = "",
) -> Plan:
    """Match every rule of ``recipe`` against the annotated graph; where they match nothing
    (no such position in the model, whether or not it could take a block), its ``fallback``
    rules (numbered after ``rules``). A point skipped for its layout, or taken by an earlier
    injection, still counts as a match: the fallback is for models without the position."""
    skipped: list[SkippedPoint] = []
    chosen, matched = _match_rules(graph, stages, recipe, name, recipe.rules, 0, skipped)
    used_fallback, refused = False, ""
    if not matched and recipe.fallback:
        hidden = _hidden_modules(graph, stages)
        if hidden:
            positions = positions_of(recipe.rules)
            more = f" and {len(hidden) - 2} more" if len(hidden) > 2 else ""
            refused = (
                f"no {positions} found, but {', '.join(hidden[:2])}{more} are kept whole and may hold "
                "them, so the recipe's fallback is not used"
            )
        else:
            chosen, _ = _match_rules(graph, stages, recipe, name, recipe.fallback, len(recipe.rules), skipped)
            used_fallback = bool(chosen)
    chosen.sort(key=lambda item: item[:2])
    placements = _placed(graph, chosen, skipped)
    used_fallback = used_fallback and bool(chosen)  # its points may all have been turned down
    costs = BlockCosts()
    points = tuple(
        _point(graph, stages, candidate, rule, r, init, placement, sized, costs)
        for (_, r, candidate, rule), (placement, sized) in zip(chosen, placements, strict=True)
    )
    return Plan(
        points=points,
        target=target,
        recipe=recipe,
        init=init,
        input_size=tuple(graph.input_shape[1:]),
        model_name=name,
        base_params=base_params,
        stages=tuple(s.name for s in stages),
        skipped=tuple(skipped),
        opaque=graph.opaque,
        assumptions=graph.assumptions,
        mac_count=LazyCount(graph.count_macs),
        used_fallback=used_fallback,
        fallback_refused=refused,
    )


def _placed(
    graph: AnnotatedGraph, chosen: list[tuple[int, int, Candidate, Rule]], skipped: list[SkippedPoint]
) -> list[tuple[Placement, GridFrom | None]]:
    """Where each chosen point's block goes, with the map giving its grid's size (for a block
    that needs the grid of tokens whose grid follows the input size). Such a block that the
    root's own forward would run (it alone can give the grid's H' x W', or it runs the module
    holding the block) is skipped, and dropped from ``chosen``, in a model with
    timm's other entry points: ``forward_features`` and ``forward_intermediates`` run its
    stages without the root's forward, so without the block."""
    edges = [(c.node, None if c.consumers is None else list(c.consumers)) for _, _, c, _ in chosen]
    names = [rule.block_name for _, _, _, rule in chosen]
    grids = [_grid_from(candidate, rule) for _, _, candidate, rule in chosen]
    entries = _other_entries(graph.root)

    def root_only(placement: Placement, grid: GridFrom | None) -> bool:
        return (
            bool(entries) and grid is not None and placement.owner == "" and placement.attach == Attach.GRAPH
        )

    placements = place(graph.root, graph, edges, names, grids, refuse=root_only)
    for (_, r, candidate, rule), placement, grid in zip(chosen, placements, grids, strict=True):
        if placement is None and grid is not None:
            reason = (
                f"its token grid follows the input size, and the block would run in "
                f"{type(graph.root).__name__}.forward, rewritten (no module below it gives the block "
                f"the grid's H' x W', the sizes of {grid[0].name}, or that forward holds the block's "
                f"module): {' and '.join(entries)} run the stages without it, so they would skip the block"
            )
            skipped.append(SkippedPoint(candidate.name, rule.at, candidate.node.name, r, reason))
    chosen[:] = [item for item, placement in zip(chosen, placements, strict=True) if placement is not None]
    return [(p, grid) for p, grid in zip(placements, grids, strict=True) if p is not None]


def _other_entries(model: nn.Module) -> list[str]:
    """timm's methods that run a model's stages besides its forward."""
    return [
        name for name in ("forward_features", "forward_intermediates") if callable(getattr(model, name, None))
    ]


def _point(
    graph: AnnotatedGraph,
    stages: list[Stage],
    candidate: Candidate,
    rule: Rule,
    r: int,
    init: str,
    placement: Placement,
    sized: GridFrom | None,
    costs: BlockCosts,
) -> InsertionPoint:
    """The point of ``rule`` (number ``r``) at ``candidate``, whole: its tensor, layout,
    block cost and where the block lives (``placement``)."""
    t, channels = tensor_meta(candidate.node), candidate.channels
    assert t is not None and channels is not None, "find_candidates skips points with no map or tokens"
    shape = tuple(int(s) for s in t.shape[1:])
    grid = candidate.token_grid
    layout = PointLayout(
        str(candidate.layout),
        grid.prefix if grid is not None else 0,
        (grid.height, grid.width) if grid is not None else None,
        grid.order if grid is not None and uses_grid(rule.block.kind) else None,
    )
    block_layout = layout_kwargs(layout)
    return InsertionPoint(
        name=candidate.name,
        position=rule.at,
        channels=channels,
        block=rule.block,
        params=costs.params(rule.block, channels, init, block_layout),
        node=candidate.node.name,
        consumers=candidate.edge[1],
        shape=shape,
        stage=stage_index(graph, stages, candidate.anchor),
        rule=r,
        key=placement.key,
        layout=layout.layout,
        macs=costs.macs(rule.block, shape, channels, init, block_layout, placement.key),
        prefix=layout.prefix,
        grid=layout.grid,
        reordered=grid is not None and grid.order is not None,
        order=layout.order,
        grid_from=None if sized is None else (sized[0].name, sized[1], sized[2]),
        grid_arguments=placement.grid_arguments,
        module=placement.module,
        block_name=placement.name,
        owner=placement.owner,
        attach=placement.attach,
        argument=placement.argument,
        scope_note=placement.note,
    )


@dataclass(frozen=True)
class PointLayout:
    """What a block's layout arguments are made of (:func:`blocks.layout_kwargs`)."""

    layout: str
    prefix: int
    grid: tuple[int, int] | None
    order: tuple[int, ...] | None


LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)  # where a block position can lie


def _hidden_modules(graph: AnnotatedGraph, stages: list[Stage]) -> list[str]:
    """Modules before the head that the trace keeps whole (fx could not trace them, or timm
    marks them not traceable) and that hold convolutions or linear layers: positions may
    lie inside them. A head's kept-whole MLP (timm VGG's ``pre_logits``) does not count."""
    opaque = {o.name for o in graph.opaque}
    last = max((graph.index[s.node] for s in stages), default=None)
    hidden = []
    for node in graph.nodes:
        module = graph.module(node)
        if module is None or is_inserted_block(module):
            continue
        if last is not None and graph.index[node] > last:
            break
        if str(node.target) in opaque:
            hidden.append(str(node.target))
            continue
        if isinstance(module, LAYERS):
            continue
        inner = module.modules()
        next(inner)  # the module itself
        if any(isinstance(m, LAYERS) for m in inner):
            hidden.append(f"{node.target} ({type(module).__name__})")
    return hidden


def _check_stages(rule: Rule, key: str, recipe: Recipe, model: str, stages: Sequence[Stage]) -> None:
    """Refuse a rule whose ``stages`` name a stage the model does not have."""
    if rule.stages is None:
        return
    bad = [s for s in rule.stages if not -len(stages) <= s < len(stages)]
    if bad:
        raise PlanError(
            f"recipe {recipe.name!r} {key}.stages: {bad} out of range; {model} has "
            f"{len(stages)} stages ({', '.join(s.name for s in stages) or 'none found'}): "
            f"use 0..{len(stages) - 1} or -{len(stages)}..-1"
        )


def _unusable(candidate: Candidate, rule: Rule) -> str | None:
    """Why ``rule``'s block cannot go at ``candidate`` (its layout, its token grid), or None."""
    kind, node = rule.block.kind, candidate.node.name
    if candidate.skip_reason:
        return candidate.skip_reason
    if candidate.layout != NCHW and rule.channels_last != "permute" and permutes(kind):
        return (
            f"node {node!r} is {candidate.layout} and block {kind!r} "
            "takes NCHW maps only; the rule's channels_last: permute applies it through a permute"
        )
    grid = candidate.token_grid
    if grid is None:
        return None
    if grid.prefix_varies:
        return (
            f"the number of tokens before the grid of node {node!r} ({grid}) changes "
            "with the input size; a block passes a fixed number of them through"
        )
    if grid.order is not None and uses_grid(kind) and not accepts_order(kind):
        return (
            f"node {node!r} holds its token grid ({grid}) in another order than "
            f"raster and block {kind!r} needs the grid but takes no 'order' argument"
        )
    if not grid.dynamic or not uses_grid(kind):
        return None
    changes = f"the token grid of node {node!r} ({grid}) changes with the input size (dynamic image size)"
    if grid.source is None:
        return f"{changes}, and the graph shows no map its H' x W' are read from; block {kind!r} needs them"
    if not takes_grid_at_call(kind):
        return (
            f"{changes}; block {kind!r} needs a fixed H' x W' grid (its forward takes no height and "
            "width: grid_at_call)"
        )
    return None


def _grid_from(candidate: Candidate, rule: Rule) -> GridFrom | None:
    """The map whose sizes give the grid's H' x W' at each call, with its height and width
    dims: for a block that needs the grid on tokens whose grid follows the input size."""
    grid = candidate.token_grid
    if grid is None or not grid.dynamic or not uses_grid(rule.block.kind) or grid.source is None:
        return None
    return (grid.source, *((2, 3) if layout_of(grid.source) == NCHW else (1, 2)))


def _match_rules(
    graph: AnnotatedGraph,
    stages: list[Stage],
    recipe: Recipe,
    model: str,
    rules: Sequence[Rule],
    first: int,
    skipped: list[SkippedPoint],
) -> tuple[list[tuple[int, int, Candidate, Rule]], int]:
    """(graph index, rule index, candidate, rule) of every point ``rules`` choose, their
    indices counted from ``first``, and how many candidates they matched; what they match
    but cannot use goes to ``skipped``."""
    chosen: list[tuple[int, int, Candidate, Rule]] = []
    matched = 0
    taken: dict[tuple, int] = {}
    for r, rule in enumerate(rules, start=first):
        key = f"rules[{r}]" if r < len(recipe.rules) else f"fallback[{r - len(recipe.rules)}]"
        _check_stages(rule, key, recipe, model, stages)
        matches = [
            c
            for c in find_candidates(graph, rule.at, stages, rule.channels_last)
            if _keep(rule, c, stage_index(graph, stages, c.anchor), len(stages))
        ]
        matched += len(matches)
        for k, candidate in enumerate(matches):
            if k % rule.every:
                continue
            reason = _unusable(candidate, rule)
            if reason is None and (unread := _unread(candidate, graph)):
                reason = f"{unread}, so a block there would change nothing and get no gradient"
            if reason is None and _earlier_block(candidate, graph):
                reason = "a block of an earlier injection already acts on this edge"
            if reason is None and candidate.edge in taken:
                reason = f"rule {taken[candidate.edge]} already puts a block on this edge"
            if reason:
                skipped.append(SkippedPoint(candidate.name, rule.at, candidate.node.name, r, reason))
                continue
            taken[candidate.edge] = r
            chosen.append((graph.index[candidate.node], r, candidate, rule))
    return chosen, matched


@dataclass(frozen=True)
class Prepared:
    """A model (or its target) traced and annotated, with its stages: what every recipe
    is matched against."""

    graph: AnnotatedGraph
    stages: tuple[Stage, ...]
    target: str
    model_name: str
    base_params: int


def prepare(model: nn.Module, *, input_size: Sequence[int] | None = None, target: str = "") -> Prepared:
    """Trace and annotate ``model``'s submodule ``target`` ('' for the whole model) at
    ``input_size`` (default: the model's own) and find its stages."""
    sub = get_target(model, target)
    with ops.modules_known(sub):  # one table of its submodules for the checks and the analysis
        _refuse_quantized(sub, model_name(model))
        size = default_input_size(sub if target else model, input_size or target_input_size(model, target))
        graph = annotate(sub, (BATCH, *size))
    if not target:
        feature_info = getattr(model, "feature_info", None) or declared_backbone_entries(model, graph)
    else:  # a backbone that returns every stage's map says where its stages end
        feature_info = returned_stage_entries(graph) if returns_its_stages(sub) else None
    stages = tuple(ends_at_maps(graph, find_stages(graph, feature_info)))
    return Prepared(graph, stages, target, model_name(model), count_params(model))


QUANTIZED_PACKAGES = ("torch.ao.nn.quantized.", "torch.ao.nn.intrinsic.quantized.")
FLOAT_IN_QUANTIZED = ("torch.ao.nn.quantized.reference.",)  # float modules that live there
FLOAT_CLASSES = ("FloatFunctional",)  # a quantizable model's float adds and concatenations


def quantized_modules(model: nn.Module) -> list[str]:
    """The modules of ``model`` that compute on quantized tensors (``torch.ao`` converted
    layers, ``QFunctional``, ``Quantize``), as "name (Class)"; a quantizable model still in
    float (its ``QuantStub`` and ``FloatFunctional``) has none."""
    found = []
    for name, module in ops.named_submodules(model):
        cls = type(module)
        where = f"{cls.__module__}."
        if (
            where.startswith(QUANTIZED_PACKAGES)
            and not where.startswith(FLOAT_IN_QUANTIZED)
            and cls.__name__ not in FLOAT_CLASSES
        ):
            found.append(f"{name or type(model).__name__} ({cls.__name__})")
    return found


def _refuse_quantized(model: nn.Module, name: str) -> None:
    """Refuse a quantized model: its layers run on quantized tensors, which neither the
    meta-device analysis nor a float block can take."""
    found = quantized_modules(model)
    if found:
        more = f" and {len(found) - 2} more" if len(found) > 2 else ""
        raise QuantizedModelError(
            f"{name} is quantized ({', '.join(found[:2])}{more} compute on quantized tensors); "
            "attention blocks go into float models: inject into the model before it is quantized "
            "(torchvision: quantize=False), then quantize the patched model with torch.ao's FX graph mode "
            "(prepare_fx, convert_fx)"
        )


def resolve_target(model: nn.Module, recipe: Recipe, target: str | None) -> str:
    """The target to use: the caller's, else the recipe's, else the model's default."""
    if target is not None:
        return target
    return recipe.target if recipe.target is not None else default_target(model) or ""


def plan_prepared(prepared: Prepared, recipe: Recipe, init: str | None = None) -> Plan:
    """The plan of ``recipe`` on an already prepared model."""
    if init is None:
        init = recipe.init
    elif init not in INIT_MODES:
        raise InputError(f"init={init!r} is not allowed; allowed: {', '.join(INIT_MODES)}")
    with ops.modules_known(prepared.graph.root):
        return build_plan(
            prepared.graph,
            list(prepared.stages),
            recipe,
            init,
            prepared.model_name,
            prepared.base_params,
            prepared.target,
        )


def analyse(
    model: nn.Module,
    recipe: str | Mapping[str, Any] | Recipe,
    *,
    init: str | None = None,
    input_size: Sequence[int] | None = None,
    target: str | None = None,
) -> tuple[AnnotatedGraph, Plan]:
    """Load the recipe, trace and annotate the model (or its target), and build the plan.
    The graph is the target's; the plan's ``target`` says which submodule that is."""
    hint = wrapper_of(model)
    if hint is not None:
        raise PlanError(f"got {hint} (fx traces the model itself, not its wrapper)")
    loaded = load_recipe(recipe)
    if init is not None and init not in INIT_MODES:  # before the work of tracing
        raise InputError(f"init={init!r} is not allowed; allowed: {', '.join(INIT_MODES)}")
    prepared = prepare(model, input_size=input_size, target=resolve_target(model, loaded, target))
    return prepared.graph, plan_prepared(prepared, loaded, init)


def plan(
    model: nn.Module,
    recipe: str | Mapping[str, Any] | Recipe,
    *,
    init: str | None = None,
    input_size: Sequence[int] | None = None,
    target: str | None = None,
) -> Plan:
    """The insertion points ``recipe`` matches in ``model``; the model is not changed.

    ``input_size`` is (C, H, W) (default: the model's own, else 224 x 224; (C, T, H, W)
    for video models). ``target`` names a submodule to plan in instead of the whole model
    (default: the recipe's ``target``, else a torchvision detection / segmentation model's
    backbone). Point names are relative to the target. An empty plan means nothing matched.
    """
    with fx_constants_dropped(model):
        return analyse(model, recipe, init=init, input_size=input_size, target=target)[1]
