"""The plan: every insertion point a recipe matches in a model, as plain typed data.

``plan(model, recipe)`` traces and annotates the model, matches each rule against the
candidates of its position, and returns a :class:`Plan`, a sequence of
:class:`InsertionPoint` in graph order, without changing the model::

    >>> p = plan(torchvision.models.resnet18(), "se_resnet")
    >>> [pt.channels for pt in p]
    [64, 64, 128, 128, 256, 256, 512, 512]
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import fx, nn
from torch.utils.flop_counter import FlopCounterMode

from .blocks import accepts_order, layout_kwargs, make_block, permutes, uses_grid
from .blocks.proof import block_name, run_block
from .errors import AttnInjectError, InputError
from .graph import ops
from .graph.analysis import AnnotatedGraph, annotate
from .graph.layout import NCHW
from .graph.positions import Candidate, find_candidates, stage_index
from .graph.shapes import tensor_meta
from .graph.stages import Stage, find_stages
from .graph.trace import OpaqueModule, tracing_strategy
from .models import wrapper_of
from .patterns import search
from .recipe import BlockSpec, Recipe, Rule, load_recipe
from .scopes import Placement, place
from .targets import default_target, get_target, target_input_size
from .values import is_int

__all__ = [
    "InsertionPoint",
    "Plan",
    "PlanError",
    "QuantizedModelError",
    "SkippedPoint",
    "build_plan",
    "default_input_size",
    "merge_plans",
    "plan",
]

BATCH = 2  # two samples: batch norm in training mode refuses one value per channel


class PlanError(AttnInjectError, ValueError):
    """The recipe cannot be matched against this model (e.g. a stage index out of range)."""


class QuantizedModelError(PlanError):
    """The model computes on quantized tensors: no block can go into it."""


@dataclass(frozen=True)
class InsertionPoint:
    """One block to insert: ``block`` on the output of fx node ``node``, read by ``consumers``
    (``None``: every user). ``key`` is the block's qualified module name (``layer1.0.se``).

    ``layout`` is what the block acts on: "NCHW" or "NHWC" maps (``shape`` (C, H, W) or
    (H, W, C)), or "tokens" (``shape`` (N, C), or (T, N, C) for tokens over two dimensions)
    with N = ``prefix`` + H' x W' (``grid``, None for maps), ``reordered`` where the tokens
    hold the grid in another order than raster (``order``, each token's raster position, for a
    block that needs the grid). ``blocks.layout_kwargs(point)`` gives the block's arguments."""

    name: str
    position: str
    channels: int
    block: BlockSpec
    params: int
    node: str
    consumers: tuple[str, ...] | None
    shape: tuple[int, ...]
    stage: int | None
    rule: int
    key: str
    layout: str = "NCHW"
    flops: int = 0  # per sample
    prefix: int = 0  # tokens before the grid (class, register, distillation tokens)
    grid: tuple[int, int] | None = None  # (H', W') of tokens
    reordered: bool = False  # tokens hold the grid in another order than raster (Hiera, Nest)
    order: tuple[int, ...] | None = None  # each token's raster position, for a block that needs it

    def __post_init__(self) -> None:
        if self.grid is not None:  # from a manifest's lists: keep the tuple the dataclass declares
            object.__setattr__(self, "grid", tuple(int(s) for s in self.grid))
        if self.order is not None:
            object.__setattr__(self, "order", tuple(int(i) for i in self.order))

    @property
    def layout_text(self) -> str:
        """The layout as the plan's table shows it: "NHWC", "tokens 1+14x14"."""
        if self.grid is None:
            return self.layout
        front = f"{self.prefix}+" if self.prefix else ""
        reordered = " reordered" if self.reordered else ""
        return f"{self.layout} {front}{self.grid[0]}x{self.grid[1]}{reordered}"

    module: str = ""  # the module the block is a child of ('' is the model or its target)
    block_name: str = ""  # its attribute name there: ``key == f"{module}.{block_name}"``
    owner: str = ""  # the module whose forward runs it (``scopes.Attach`` says how)
    attach: str = "graph"  # a ``scopes.Attach`` value: "slot", "after", "before" or "graph"
    argument: str = ""  # attach == "before": the parameter of the module's forward it acts on
    scope_note: str = ""  # why a wider module than the block's own runs it, if one does

    def qualified_key(self, target: str = "") -> str:
        """The block's name from the model ``inject`` returned (its target included)."""
        return f"{target}.{self.key}" if target else self.key

    def __str__(self) -> str:
        return (
            f"{self.block} at {self.position} of {self.name} "
            f"({self.channels} channels, +{self.params:,} params)"
        )

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["block"] = self.block.to_dict()
        out["consumers"] = None if self.consumers is None else list(self.consumers)
        out["shape"] = list(self.shape)
        out["grid"] = None if self.grid is None else list(self.grid)
        out["order"] = None if self.order is None else list(self.order)
        return out


@dataclass(frozen=True)
class SkippedPoint:
    """A candidate a rule matched but could not use, and why."""

    name: str
    position: str
    node: str
    rule: int
    reason: str

    def __str__(self) -> str:
        return f"rule {self.rule} skipped {self.position} of {self.name}: {self.reason}"


class LazyCount:
    """A count computed on first use and kept: the model's FLOPs take a second pass over the
    graph, which injecting does not need. Pickling and copying compute it first, so a plan
    never carries the graph it came from."""

    def __init__(self, source: int | Callable[[], int]) -> None:
        self._value = source if isinstance(source, int) else None
        self._compute = None if isinstance(source, int) else source

    def value(self) -> int:
        if self._value is None:
            assert self._compute is not None
            self._value, self._compute = self._compute(), None
        return self._value

    def __reduce__(self) -> tuple[type[LazyCount], tuple[int]]:
        return LazyCount, (self.value(),)


@dataclass(frozen=True)
class Plan(Sequence[InsertionPoint]):
    """The insertion points of a recipe in a model, in graph order, and what was skipped."""

    points: tuple[InsertionPoint, ...]
    recipe: Recipe
    init: str
    input_size: tuple[int, ...]
    model_name: str
    base_params: int
    stages: tuple[str, ...] = ()
    skipped: tuple[SkippedPoint, ...] = field(default_factory=tuple)
    target: str = ""
    opaque: tuple[OpaqueModule, ...] = ()
    used_fallback: bool = False  # the recipe's rules matched nothing here; its fallback placed the points
    fallback_refused: str = ""  # why the fallback was not used where the rules matched nothing
    flop_count: LazyCount = field(default_factory=lambda: LazyCount(0), compare=False, repr=False)

    @property
    def base_flops(self) -> int:
        """FLOPs per sample of the model (or its target), counted on first use."""
        return self.flop_count.value()

    @property
    def tracing(self) -> str:
        """How the model was traced: "whole", or "opaque" when submodules were kept whole."""
        return tracing_strategy(self.opaque)

    def __len__(self) -> int:
        return len(self.points)

    def __getitem__(self, i):
        return self.points[i]

    def __iter__(self) -> Iterator[InsertionPoint]:
        return iter(self.points)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, (list, tuple)):
            return list(self.points) == list(other)
        if isinstance(other, Plan):
            return self.to_dict() == other.to_dict()
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    @property
    def empty_reason(self) -> str:
        """Why the plan has no point: its skipped points' reasons, else the modules kept whole
        (untraceable), else that the model has none of the recipe's positions."""
        if self.points:
            return ""
        if self.skipped:
            return "; ".join(sorted({s.reason for s in self.skipped})[:2])
        if self.fallback_refused:
            return self.fallback_refused
        positions = positions_of(self.recipe.all_rules)
        if self.opaque:
            whole = "; ".join(str(o) for o in self.opaque[:2])
            return f"no {positions} outside the modules kept whole, which fx cannot trace ({whole})"
        return f"the model has no {positions}"

    @property
    def params_added(self) -> int:
        return sum(p.params for p in self.points)

    @property
    def flops_added(self) -> int:
        return sum(p.flops for p in self.points)

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model_name,
            "recipe": self.recipe.to_dict(),
            "init": self.init,
            "input_size": list(self.input_size),
            "base_params": self.base_params,
            "params_added": self.params_added,
            "base_flops": self.base_flops,
            "flops_added": self.flops_added,
            "stages": list(self.stages),
            "target": self.target,
            "tracing": self.tracing,
            "opaque": [asdict(o) for o in self.opaque],
            "used_fallback": self.used_fallback,
            "fallback_refused": self.fallback_refused,
            "points": [p.to_dict() for p in self.points],
            "skipped": [asdict(s) for s in self.skipped],
        }

    def table(self) -> str:
        """The plan as a plain-text table (with a layout column when a block is not on an
        NCHW map), and where each block lives (:func:`attn_inject.plan_table.plan_table`)."""
        from .plan_table import plan_table

        return plan_table(self)

    def __str__(self) -> str:
        return self.table()


VIDEO_FRAMES = 16


def default_input_size(model: nn.Module, input_size: Sequence[int] | None = None) -> tuple[int, ...]:
    """(C, H, W): the user's; else the size the model was built for, where timm records it
    (``in_chans``, ``patch_embed.img_size``, ``img_size``); else timm's ``pretrained_cfg["input_size"]``;
    else (C, 224, 224) with C the input channels of the model's first convolution;
    (C, 16, 224, 224) when that convolution is 3-D (a video model)."""
    first = _first_conv(model)
    channels = first.in_channels if first is not None else 3
    video = isinstance(first, nn.Conv3d)
    if input_size is not None:
        size = tuple(int(s) for s in input_size)
        spatial = 3 if video else 2
        if len(size) == spatial:
            size = (channels, *size)
        if len(size) != spatial + 1 or min(size) < 1:
            shape = "(C, T, H, W) or (T, H, W)" if video else "(C, H, W) or (H, W)"
            raise InputError(f"input_size must be {shape} with positive sizes, got {tuple(input_size)}")
        return size
    built = _built_size(model)
    for attr in ("pretrained_cfg", "default_cfg"):
        cfg = getattr(model, attr, None)
        if isinstance(cfg, Mapping) and cfg.get("input_size"):
            size = tuple(int(s) for s in cfg["input_size"])
            chans = getattr(model, "in_chans", None)  # timm records in_chans=
            if is_int(chans) and chans > 0:
                size = (chans, *size[1:])
            return (size[0], *built) if built is not None and len(size) == 3 else size
    if built is not None and not video:
        return (channels, *built)
    if video:
        return (channels, VIDEO_FRAMES, 224, 224)
    return (channels, 224, 224)


def _built_size(model: nn.Module) -> tuple[int, int] | None:
    """(H, W) the model was built for, where timm records it (``img_size=`` at creation)."""
    for owner in (getattr(model, "patch_embed", None), model):
        size = getattr(owner, "img_size", None)
        if is_int(size) and size > 0:
            return (size, size)
        if isinstance(size, (tuple, list)) and len(size) == 2 and all(is_int(s) and s > 0 for s in size):
            return (int(size[0]), int(size[1]))
    return None


def _first_conv(model: nn.Module) -> nn.Conv2d | nn.Conv3d | None:
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Conv3d)):
            return m
    return None


def model_name(model: nn.Module) -> str:
    cfg = getattr(model, "pretrained_cfg", None)
    if isinstance(cfg, Mapping) and cfg.get("architecture"):
        return str(cfg["architecture"])
    from .record import patched_record  # the record holds plans

    info = patched_record(model)
    if info is not None:
        return info.plan.model_name
    return type(model).__name__


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _meta_block(block: BlockSpec, channels: int, init: str, layout: Mapping[str, Any]) -> nn.Module:
    with torch.device("meta"):
        return make_block(block.kind, channels, block.params, init, layout)


class BlockCosts:
    """The parameters and FLOPs each block adds, built once on the meta device per distinct
    block, size, init and layout, for the plan being built (a block kind registered again
    between two plans is counted afresh)."""

    def __init__(self) -> None:
        self._params: dict[tuple, int] = {}
        self._flops: dict[tuple, int] = {}

    @staticmethod
    def _key(block: BlockSpec, size: Any, init: str, layout: Mapping[str, Any]) -> tuple:
        return (block.kind, repr(sorted(block.params.items())), size, init, repr(sorted(layout.items())))

    def params(self, block: BlockSpec, channels: int, init: str, layout: Mapping[str, Any]) -> int:
        """Parameters ``block`` adds at ``channels`` channels; ``layout``: its layout
        arguments (``blocks.layout_kwargs``)."""
        key = self._key(block, channels, init, layout)
        if key not in self._params:
            self._params[key] = count_params(_meta_block(block, channels, init, layout))
        return self._params[key]

    def flops(
        self,
        block: BlockSpec,
        shape: tuple[int, ...],
        channels: int,
        init: str,
        layout: Mapping[str, Any],
        key_name: str = "",
    ) -> int:
        """FLOPs of ``block`` on one sample of ``shape`` ((C, H, W), or its layout's shape);
        a block that fails there is refused naming it (``key_name``: its key)."""
        key = self._key(block, (shape, channels), init, layout)
        if key not in self._flops:
            module = _meta_block(block, channels, init, layout)
            with FlopCounterMode(display=False) as counter:
                run_block(module, torch.empty((1, *shape), device="meta"), block_name(key_name, block.kind))
            self._flops[key] = counter.get_total_flops()
        return self._flops[key]


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


def positions_of(rules: Sequence[Rule]) -> str:
    """The positions ``rules`` name, each once, in order: "residual_branch, conv_output"."""
    return ", ".join(dict.fromkeys(r.at for r in rules))


def _earlier_block(candidate: Candidate, graph: AnnotatedGraph) -> bool:
    """Whether a block of an earlier injection already sits on the candidate's edge: the
    node is one, a consumer is one, or (an edge to every user) every user is one."""

    def is_block(node: fx.Node) -> bool:
        return node.op == "call_module" and getattr(graph.module(node), "_attn_inject_block", False)

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
    edges = [(c.node, None if c.consumers is None else list(c.consumers)) for _, _, c, _ in chosen]
    names = [rule.block_name for _, _, _, rule in chosen]
    placements = place(graph.root, graph, edges, names)
    costs = BlockCosts()
    points = tuple(
        _point(graph, stages, candidate, rule, r, init, placement, costs)
        for (_, r, candidate, rule), placement in zip(chosen, placements, strict=True)
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
        flop_count=LazyCount(graph.count_flops),
        used_fallback=used_fallback,
        fallback_refused=refused,
    )


def _point(
    graph: AnnotatedGraph,
    stages: list[Stage],
    candidate: Candidate,
    rule: Rule,
    r: int,
    init: str,
    placement: Placement,
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
        flops=costs.flops(rule.block, shape, channels, init, block_layout, placement.key),
        prefix=layout.prefix,
        grid=layout.grid,
        reordered=grid is not None and grid.order is not None,
        order=layout.order,
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
        if module is None or getattr(module, "_attn_inject_block", False):
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
    if grid.dynamic and uses_grid(kind):
        return (
            f"the token grid of node {node!r} ({grid}) changes with the input size "
            f"(dynamic image size); block {kind!r} needs a fixed H' x W' grid"
        )
    return None


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
    _refuse_quantized(sub, model_name(model))
    size = default_input_size(sub if target else model, input_size or target_input_size(model, target))
    graph = annotate(sub, (BATCH, *size))
    feature_info = getattr(model, "feature_info", None) if not target else None
    stages = tuple(find_stages(graph, feature_info))
    return Prepared(graph, stages, target, model_name(model), count_params(model))


QUANTIZED_PACKAGES = ("torch.ao.nn.quantized.", "torch.ao.nn.intrinsic.quantized.")
FLOAT_IN_QUANTIZED = ("torch.ao.nn.quantized.reference.",)  # float modules that live there
FLOAT_CLASSES = ("FloatFunctional",)  # a quantizable model's float adds and concatenations


def quantized_modules(model: nn.Module) -> list[str]:
    """The modules of ``model`` that compute on quantized tensors (``torch.ao`` converted
    layers, ``QFunctional``, ``Quantize``), as "name (Class)"; a quantizable model still in
    float (its ``QuantStub`` and ``FloatFunctional``) has none."""
    found = []
    for name, module in model.named_modules():
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
            "(torchvision: quantize=False)"
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
    elif init not in ("identity", "paper"):
        raise InputError(f"init={init!r} is not allowed; allowed: 'identity', 'paper'")
    return build_plan(
        prepared.graph,
        list(prepared.stages),
        recipe,
        init,
        prepared.model_name,
        prepared.base_params,
        prepared.target,
    )


def merge_plans(plans: Sequence[Plan]) -> Plan:
    """The plans of successive injections into one model as one plan: every point in order,
    the recipes' rules one after the other (each point's ``rule`` index shifted to match)."""
    first = plans[0]
    points: list[InsertionPoint] = []
    skipped: list[SkippedPoint] = []
    rules: list[Rule] = []
    for p in plans:
        points += [dataclasses.replace(pt, rule=pt.rule + len(rules)) for pt in p.points]
        skipped += [dataclasses.replace(sk, rule=sk.rule + len(rules)) for sk in p.skipped]
        rules += p.recipe.all_rules
    inits = {p.init for p in plans}
    recipe = Recipe(
        name=" + ".join(p.recipe.name for p in plans),
        rules=tuple(rules),
        init=first.init if len(inits) == 1 else "mixed",
        description="successive injections",
        source="<merged>",
    )
    return dataclasses.replace(
        first,
        points=tuple(points),
        skipped=tuple(skipped),
        recipe=recipe,
        init=recipe.init,
        opaque=tuple(o for p in plans for o in p.opaque),
        used_fallback=any(p.used_fallback for p in plans),
        fallback_refused="; ".join(p.fallback_refused for p in plans if p.fallback_refused),
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
    if init is not None and init not in ("identity", "paper"):  # before the work of tracing
        raise InputError(f"init={init!r} is not allowed; allowed: 'identity', 'paper'")
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
    return analyse(model, recipe, init=init, input_size=input_size, target=target)[1]
