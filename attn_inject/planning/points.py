"""The plan as plain typed data: each insertion point, each point skipped, and the plan that
holds them in graph order; a plan prints as a table and serializes to a dict."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from ..core.deprecation import warn_renamed
from ..core.errors import AttnInjectError
from ..core.vocabulary import Word
from ..graph.analysis import FLOPS_PER_MAC
from ..graph.trace import Assumption, OpaqueModule, tracing_strategy
from ..recipes.recipe import BlockSpec, Recipe, Rule, positions_of
from .table import plan_table

__all__ = [
    "InsertionPoint",
    "LazyCount",
    "Plan",
    "PlanError",
    "QuantizedModelError",
    "SkippedPoint",
    "merge_plans",
]


class PlanError(AttnInjectError, ValueError):
    """The recipe cannot be matched against this model (e.g. a stage index out of range)."""


class QuantizedModelError(PlanError):
    """The model computes on quantized tensors: no block can go into it."""


class Attach(Word):
    """How a block is run: in timm's ``None`` slot of its module's own code, after or before
    its module's own forward, or in the graph of a module's rewritten forward
    (:mod:`attn_inject.planning.scopes`)."""

    SLOT = "slot"
    AFTER = "after"
    BEFORE = "before"
    GRAPH = "graph"


@dataclass(frozen=True)
class InsertionPoint:
    """One block to insert: ``block`` on the output of fx node ``node``, read by ``consumers``
    (``None``: every user). ``key`` is the block's qualified module name (``layer1.0.se``).

    ``layout`` is what the block acts on: "NCHW" or "NHWC" maps (``shape`` (C, H, W) or
    (H, W, C)), or "tokens" (``shape`` (N, C), or (T, N, C) for tokens over two dimensions)
    with N = ``prefix`` + H' x W' (``grid``, None for maps), ``reordered`` where the tokens
    hold the grid in another order than raster (``order``, each token's raster position, for a
    block that needs the grid), ``grid_from`` where the grid follows the input size and the
    block needs it (the block is then called with the grid's H' and W' as the model computes
    them). ``blocks.layout_kwargs(point)`` gives the block's arguments."""

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
    macs: int = 0  # multiply-adds per sample, as timm and fvcore count them
    prefix: int = 0  # tokens before the grid (class, register, distillation tokens)
    grid: tuple[int, int] | None = None  # (H', W') of tokens
    reordered: bool = False  # tokens hold the grid in another order than raster (Hiera, Nest)
    order: tuple[int, ...] | None = None  # each token's raster position, for a block that needs it
    # (node, dim, dim): a grid that follows the input size, its H' and W' read at each call
    # from the sizes of that node's map (the grid's size at the planned input is ``grid``)
    grid_from: tuple[str, int, int] | None = None
    # attach "after": the module's parameters, or their items (``size[0]``), given the grid's
    # H' and W' (passed to the block)
    grid_arguments: tuple[str, str] | None = None

    def __post_init__(self) -> None:
        if self.grid is not None:  # from a manifest's lists: keep the tuple the dataclass declares
            object.__setattr__(self, "grid", tuple(int(s) for s in self.grid))
        if self.order is not None:
            object.__setattr__(self, "order", tuple(int(i) for i in self.order))
        if self.grid_from is not None:
            node, height, width = self.grid_from
            object.__setattr__(self, "grid_from", (str(node), int(height), int(width)))
        if self.grid_arguments is not None:
            object.__setattr__(self, "grid_arguments", tuple(str(n) for n in self.grid_arguments))

    @property
    def layout_text(self) -> str:
        """The layout as the plan's table shows it: "NHWC", "tokens 1+14x14"."""
        if self.grid is None:
            return self.layout
        front = f"{self.prefix}+" if self.prefix else ""
        reordered = " reordered" if self.reordered else ""
        sized = " (any size)" if self.grid_from is not None else ""
        return f"{self.layout} {front}{self.grid[0]}x{self.grid[1]}{reordered}{sized}"

    module: str = ""  # the module the block is a child of ('' is the model or its target)
    block_name: str = ""  # its attribute name there: ``key == f"{module}.{block_name}"``
    owner: str = ""  # the module whose forward runs it (``scopes.Attach`` says how)
    attach: Attach = Attach.GRAPH  # "slot", "after", "before" or "graph"
    argument: str = ""  # attach == "before": the parameter of the module's forward it acts on
    scope_note: str = ""  # why a wider module than the block's own runs it, if one does

    @property
    def flops(self) -> int:
        """Deprecated since 0.2.0: ``2 * macs`` (use :attr:`macs`)."""
        warn_renamed("InsertionPoint.flops", "InsertionPoint.macs (flops = 2 x macs)", "0.2.0")
        return FLOPS_PER_MAC * self.macs

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
        out["grid_from"] = None if self.grid_from is None else list(self.grid_from)
        out["grid_arguments"] = None if self.grid_arguments is None else list(self.grid_arguments)
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
    """A count computed on first use and kept: the model's multiply-adds take a second pass over the
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
    assumptions: tuple[Assumption, ...] = ()  # plain values the trace fixed for input_size
    used_fallback: bool = False  # the recipe's rules matched nothing here; its fallback placed the points
    fallback_refused: str = ""  # why the fallback was not used where the rules matched nothing
    mac_count: LazyCount = field(default_factory=lambda: LazyCount(0), compare=False, repr=False)

    @property
    def base_macs(self) -> int:
        """Multiply-adds per sample of the model (or its target), as timm and fvcore count
        them (one per multiply-add of convolutions, linear layers and matmuls), counted on
        first use."""
        return self.mac_count.value()

    @property
    def base_flops(self) -> int:
        """Deprecated since 0.2.0: ``2 * base_macs`` (use :attr:`base_macs`)."""
        warn_renamed("Plan.base_flops", "Plan.base_macs (flops = 2 x macs)", "0.2.0")
        return FLOPS_PER_MAC * self.base_macs

    @property
    def tracing(self) -> str:
        """How the model was traced: "whole"; "specialised" when sizes the code needed as
        plain values were fixed for ``input_size``; "opaque" when submodules were kept whole."""
        return tracing_strategy(self.opaque, self.assumptions)

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
    def macs_added(self) -> int:
        """Multiply-adds per sample the blocks add."""
        return sum(p.macs for p in self.points)

    @property
    def flops_added(self) -> int:
        """Deprecated since 0.2.0: ``2 * macs_added`` (use :attr:`macs_added`)."""
        warn_renamed("Plan.flops_added", "Plan.macs_added (flops = 2 x macs)", "0.2.0")
        return FLOPS_PER_MAC * self.macs_added

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model_name,
            "recipe": self.recipe.to_dict(),
            "init": self.init,
            "input_size": list(self.input_size),
            "base_params": self.base_params,
            "params_added": self.params_added,
            "base_macs": self.base_macs,
            "macs_added": self.macs_added,
            "stages": list(self.stages),
            "target": self.target,
            "tracing": self.tracing,
            "opaque": [asdict(o) for o in self.opaque],
            "assumptions": [str(a) for a in self.assumptions],
            "used_fallback": self.used_fallback,
            "fallback_refused": self.fallback_refused,
            "points": [p.to_dict() for p in self.points],
            "skipped": [asdict(s) for s in self.skipped],
        }

    def table(self) -> str:
        """The plan as a plain-text table (with a layout column when a block is not on an
        NCHW map), and where each block lives (:func:`attn_inject.planning.table.plan_table`)."""
        return plan_table(self)

    def __str__(self) -> str:
        return self.table()


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
        assumptions=tuple(a for p in plans for a in p.assumptions),
        used_fallback=any(p.used_fallback for p in plans),
        fallback_refused="; ".join(p.fallback_refused for p in plans if p.fallback_refused),
    )
