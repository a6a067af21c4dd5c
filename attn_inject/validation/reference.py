"""An independent reference for a patched model: the original model run as written, each
inserted block applied at its point by hooks on the original's own modules.

The planner's whole-model trace of the original names every point's producer node and its
consumers. A point whose readers all take the block becomes a forward hook on a module that
returns the producer's value (``layer1.0.bn3`` for an SE block in a bottleneck, ``layer1.2``
for a block on a stage's output); a point on an edge to some readers only becomes forward
pre-hooks on the consumer modules, replacing that one input. The hooks call the patched
model's own block objects (no weight is copied); they exist only inside :meth:`Reference.hooked`.
A point no hook can reach (its producer is a function whose readers are functions too, or
a module called more than once) is listed with the reason, never approximated.

    >>> ref = Reference.build(original, patched)
    >>> with ref.hooked(original_root):
    ...     expected = original_root(x)    # what patched(x) must compute
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn

from ..core.errors import AttnInjectError, InputError
from ..core.names import join_names, relative_name
from ..graph.analysis import AnnotatedGraph
from ..graph.shapes import tensor_meta
from ..planning.match import prepare
from ..planning.points import InsertionPoint, Plan
from ..surgery.record import inserted_blocks, patched_record

__all__ = ["HookError", "PointHooks", "Reference", "common_target"]

OUTPUT = "output"  # a forward hook: the module's output goes through the block
INPUT = "input"  # a forward pre-hook: the module's input(s) at ``slots`` go through the block


class HookError(AttnInjectError, RuntimeError):
    """A hook met something at run time that the trace did not show (e.g. no tensor input)."""


@dataclass(frozen=True)
class HookSite:
    """One hook: on module ``module`` (relative to the compared root), of ``kind`` OUTPUT or
    INPUT; ``slots`` the positional indices / keyword names of the input that carry the
    producer's value (empty: the one tensor the module is given)."""

    kind: str
    module: str
    slots: tuple[int | str, ...] = ()


@dataclass(frozen=True)
class PointHooks:
    """How the reference applies one point's block: its block (qualified name in the compared
    root), the hooks, or why no hook reaches it."""

    key: str
    point: InsertionPoint
    sites: tuple[HookSite, ...] = ()
    unreachable: str = ""
    upstream: tuple[str, ...] = ()  # keys of the points whose block output this point's input depends on


def common_target(plans: tuple[Plan, ...]) -> str:
    """The deepest module every injection's target lies in ('' is the model)."""
    parts = [p.target.split(".") if p.target else [] for p in plans]
    common: list[str] = []
    for names in zip(*parts, strict=False):
        if len(set(names)) != 1:
            break
        common.append(names[0])
    if any(len(p) < len(common) for p in parts):
        common = common[: min(len(p) for p in parts)]
    return ".".join(common)


class _Sites:
    """Hook placement on one trace of the original."""

    def __init__(self, graph: AnnotatedGraph) -> None:
        self.graph = graph
        self.by_name = {node.name: node for node in graph.graph.nodes}
        counts: Counter[int] = Counter()
        for call in graph.calls:
            with contextlib.suppress(AttributeError):
                counts[id(graph.root.get_submodule(call.path))] += 1
        self.once = {c.path for c in graph.calls if counts[id(graph.root.get_submodule(c.path))] == 1}
        self.calls = [c for c in graph.calls if c.path in self.once]

    def output_site(self, producer: fx.Node) -> HookSite | None:
        """A module, called once, whose own forward produced ``producer`` and returns it."""
        for call in self.calls:  # innermost first: calls are listed in the order they ended
            if call.output is producer and producer in call.nodes:
                return HookSite(OUTPUT, call.path)
        return None

    def input_sites(self, producer: fx.Node, consumers: list[fx.Node]) -> tuple[list[HookSite], str]:
        """Pre-hooks on modules (called once) that take ``producer`` and hold the consumers,
        with no other reader of ``producer`` inside."""
        readers = set(producer.users)
        wanted = set(consumers)
        sites: list[HookSite] = []
        covered: set[fx.Node] = set()
        for consumer in consumers:
            if consumer in covered:
                continue
            site = None
            for call in self.calls:
                if consumer not in call.nodes or producer not in call.inputs or producer in call.nodes:
                    continue
                inside = readers & set(call.nodes)
                if not inside <= wanted:
                    continue
                slots = _slots(consumer, producer) if call.leaf else ()
                if (call.leaf and not slots) or (not call.leaf and set(call.inputs) != {producer}):
                    continue
                site = HookSite(INPUT, call.path, slots)
                covered |= inside
                break
            if site is None:
                return [], self._why_not(consumer)
            sites.append(site)
        return sites, ""

    def _why_not(self, consumer: fx.Node) -> str:
        if consumer.op == "call_module" and str(consumer.target) not in self.once:
            return (
                f"its consumer {str(consumer.target)!r} is a module called more than once: a hook on it "
                "would act at every call"
            )
        what = f"{consumer.op} {getattr(consumer.target, '__name__', consumer.target)}"
        return (
            f"its consumer {consumer.name!r} ({what}) is not a module input a pre-hook can replace "
            "without changing the producer's other readers"
        )


def _slots(consumer: fx.Node, producer: fx.Node) -> tuple[int | str, ...]:
    """Where ``producer`` is a top-level argument of a ``call_module`` node."""
    slots: list[int | str] = [i for i, a in enumerate(consumer.args) if a is producer]
    slots += [k for k, v in consumer.kwargs.items() if v is producer]
    return tuple(slots)


@dataclass
class Reference:
    """The hooks that turn the original model into the reference of the patched one."""

    root: str  # the compared module ('' is the model): the common target of the injections
    points: tuple[PointHooks, ...]
    blocks: dict[str, nn.Module]  # the patched model's blocks, by key relative to ``root``

    @property
    def unreachable(self) -> tuple[PointHooks, ...]:
        return tuple(p for p in self.points if p.unreachable)

    @classmethod
    def build(cls, original: nn.Module, patched: nn.Module, *, trace: bool = True) -> Reference:
        """The hooks for every point of every injection into ``patched`` (``trace=False``:
        the blocks only, no hook)."""
        info = patched_record(patched)
        if info is None:
            raise InputError("not a patched model: it has no attn_inject plan")
        root = common_target(info.plans)
        prefix = f"{root}." if root else ""
        blocks = {
            name[len(prefix) :]: block
            for name, block in inserted_blocks(patched).items()
            if name.startswith(prefix)
        }
        if not trace:
            return cls(root, (), blocks)
        traces: dict[tuple[str, tuple[int, ...]], _Sites] = {}
        earlier: set[str] = set()
        points: list[PointHooks] = []
        for plan in info.plans:
            where = (plan.target, tuple(plan.input_size))
            if where not in traces:
                size = plan.input_size or None
                traces[where] = _Sites(prepare(original, input_size=size, target=plan.target).graph)
            sites = traces[where]
            inner = relative_name(plan.target, root)
            producers: list[tuple[str, fx.Node]] = []
            for point in plan:
                key = join_names(inner, point.key)
                hooks, reason = _place(sites, point, earlier)
                hooks = tuple(HookSite(h.kind, join_names(inner, h.module), h.slots) for h in hooks)
                if key not in blocks:
                    reason = reason or f"the patched model has no block {key!r}"
                producer = sites.by_name.get(point.node)
                upstream = (
                    tuple(k for k, n in producers if n is producer or sites.graph.is_ancestor(n, producer))
                    if producer is not None
                    else ()
                )
                if producer is not None:
                    producers.append((key, producer))
                points.append(PointHooks(key, point, hooks, reason, upstream))
            earlier |= {join_names(inner, p.key) for p in plan}
        return cls(root, tuple(points), blocks)

    @contextlib.contextmanager
    def hooked(
        self,
        model: nn.Module,
        record: dict[str, torch.Tensor] | None = None,
        skip: set[str] | frozenset[str] = frozenset(),
    ) -> Iterator[nn.Module]:
        """``model`` (the original's compared root) with every reachable block applied, except
        those in ``skip`` (keys); ``record`` receives each block's input, by key."""
        handles = []
        try:
            for hooks in self.points:
                if hooks.unreachable or hooks.key in skip:
                    continue
                apply = _applier(self.blocks[hooks.key], hooks.key, record)
                for site in hooks.sites:
                    module = model.get_submodule(site.module) if site.module else model
                    if site.kind == OUTPUT:
                        handles.append(module.register_forward_hook(_output_hook(apply)))
                    else:
                        handles.append(
                            module.register_forward_pre_hook(_input_hook(apply, site), with_kwargs=True)
                        )
            yield model
        finally:
            for handle in handles:
                handle.remove()


def _place(sites: _Sites, point: InsertionPoint, earlier: set[str]) -> tuple[tuple[HookSite, ...], str]:
    producer = sites.by_name.get(point.node)
    names = [point.node, *(point.consumers or ())]
    missing = [n for n in names if n not in sites.by_name]
    if producer is None or missing:
        return (), (
            f"node {missing[0]!r} is not in the original model's trace (it reads or feeds a block of an "
            "earlier injection)"
            if missing
            else "its producer is not in the original model's trace"
        )
    value = tensor_meta(producer)
    if value is not None and tuple(value.shape[1:]) != tuple(point.shape):
        return (
            (),
            f"node {point.node!r} has shape {tuple(value.shape[1:])} in the original, "
            f"{point.shape} in the plan",
        )
    readers = list(producer.users)
    consumers = readers if point.consumers is None else [sites.by_name[c] for c in point.consumers]
    if set(consumers) == set(readers):
        site = sites.output_site(producer)
        if site is not None:
            return (site,), ""
    found, reason = sites.input_sites(producer, consumers)
    if found:
        return tuple(found), ""
    return (), reason or "no module returns or takes the producer's value"


def _applier(
    block: nn.Module, key: str, record: dict[str, torch.Tensor] | None
) -> Callable[[Any], torch.Tensor]:
    def apply(value: Any) -> torch.Tensor:
        if not isinstance(value, torch.Tensor):
            raise HookError(f"the hook for {key} met a {type(value).__name__}, not a tensor")
        if record is not None:
            record.setdefault(key, value.detach().clone())
        return block(value)  # a block takes its point's layout as it is (NCHW, NHWC, tokens)

    return apply


def _output_hook(apply: Callable[[Any], torch.Tensor]) -> Callable[..., Any]:
    def hook(module: nn.Module, args: Any, output: Any) -> Any:
        return apply(output)

    return hook


def _input_hook(apply: Callable[[Any], torch.Tensor], site: HookSite) -> Callable[..., Any]:
    def hook(module: nn.Module, given: tuple, named: dict) -> tuple[tuple, dict]:
        args, kwargs = list(given), dict(named)
        if site.slots:
            for slot in site.slots:
                if isinstance(slot, int) and slot < len(args):
                    args[slot] = apply(args[slot])
                elif isinstance(slot, str) and slot in kwargs:
                    kwargs[slot] = apply(kwargs[slot])
                else:
                    raise HookError(f"{site.module or 'the model'} was not given input {slot!r}")
            return tuple(args), kwargs
        tensors = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor)]
        tensor_keys = [k for k, v in kwargs.items() if isinstance(v, torch.Tensor)]
        if len(tensors) + len(tensor_keys) != 1:
            raise HookError(
                f"{site.module or 'the model'} was given {len(tensors) + len(tensor_keys)} tensors; "
                "the hook expected exactly one"
            )
        for i in tensors:
            args[i] = apply(args[i])
        for k in tensor_keys:
            kwargs[k] = apply(kwargs[k])
        return tuple(args), kwargs

    return hook
