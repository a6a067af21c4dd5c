"""The rewrite pass: local surgery.

Each planned block becomes a child of the module where it acts (``layer1.0.se``), as in a
hand-built model. Only the modules that run a block change (see :mod:`attn_inject.planning.scopes`),
and each stays an instance of its own class (:mod:`attn_inject.surgery.derive`):

- a slot: the block takes the module's None attribute, and its code calls it as written;
- after / before: the module becomes a generated subclass that runs the block on what it
  returns, or on one argument, around its own forward;
- graph: the module is traced alone, the block is inserted following torch.ao's recipe
  (``graph.inserting_after(producer)``, ``call_module``, rewire the planned consumers, lint)
  and the graph's code becomes the forward of a generated subclass, with the same signature.

Every module on the path from the model to a changed module is a shallow copy (its other
children, parameters and buffers are the original's, its registries its own: see
:mod:`attn_inject.surgery.copies`), so the model passed in is not changed, every ``state_dict`` key
stays, and everything else keeps its class and its code. Each block is proved before it
joins the model (:mod:`attn_inject.blocks.proof`): at ``init="identity"`` the patched model
computes exactly what the original does.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import itertools
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import fx, nn

from ..blocks import block_for_point, layout_kwargs
from ..blocks.proof import prove_block
from ..core.errors import AttnInjectError
from ..graph import ops
from ..graph.analysis import AnnotatedGraph
from ..graph.layout import META_KEY as LAYOUT_KEY
from ..graph.trace import HOOK_DICTS
from ..planning.points import InsertionPoint, Plan
from ..planning.scopes import AFTER, BEFORE, GRAPH, ScopeTrace, extract_scope, reads_training, root_scope
from .copies import shallow_copy
from .derive import Around, derive_around, derive_graph
from .quantization import EAGER_QUANTIZATION_NOTE, eager_quantization_ready
from .record import BLOCK_FLAG, InjectionInfo, blocks_digest, patched_record, set_record

__all__ = ["BLOCK_FLAG", "InjectionInfo", "RewriteError", "rewrite"]

ANNOTATIONS = ("val", LAYOUT_KEY, "tensor_meta")  # what the analysis wrote on each node


class RewriteError(AttnInjectError, ValueError):
    """A module that must be rewritten cannot be, e.g. a hook would be baked into its trace."""


def _reference_tensor(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    """The device and dtype of the model's first floating parameter (else buffer)."""
    for p in itertools.chain(model.parameters(), model.buffers()):
        if p.is_floating_point():
            return p.device, p.dtype
    return torch.device("cpu"), torch.float32


def build_block(
    point: InsertionPoint, init: str, device: torch.device, dtype: torch.dtype, key: str = ""
) -> nn.Module:
    """The block of ``point`` for its layout, on ``device`` in ``dtype``, flagged as inserted,
    proved (:func:`~attn_inject.blocks.proof.prove_block`; ``key`` names it in an error)."""
    # A device context routes every torch call of the block's __init__ through Python: only
    # when the default device is not already the model's.
    on_device = contextlib.nullcontext() if torch.get_default_device() == device else torch.device(device)
    with on_device:
        block = block_for_point(
            point.block.kind, point.channels, point.block.params, init, layout_kwargs(point)
        )
    if any(t.dtype != dtype for t in (*block.parameters(), *block.buffers()) if t.is_floating_point()):
        block = block.to(dtype=dtype)
    setattr(block, BLOCK_FLAG, True)
    prove_block(block, key or point.key, point.block.kind, point.shape, init, device, dtype)
    return block


class _Tree:
    """The patched model under construction: modules on a changed path are copied once."""

    def __init__(self, model: nn.Module) -> None:
        self.root = shallow_copy(model)
        self.fresh = {id(self.root)}

    def writable(self, path: str) -> nn.Module:
        module = self.root
        for part in path.split(".") if path else []:
            child = module._modules[part]
            assert child is not None
            if id(child) not in self.fresh:
                child = shallow_copy(child)
                self.fresh.add(id(child))
                module._modules[part] = child
            module = child
        return module

    def replace(self, path: str, new: nn.Module) -> None:
        self.fresh.add(id(new))
        if not path:
            self.root = new
            return
        parent, _, name = path.rpartition(".")
        self.writable(parent)._modules[name] = new


def _all_but(reader: fx.Node) -> Callable[[fx.Node], bool]:
    """A ``replace_all_uses_with`` filter keeping ``reader`` (the block's own input) as it is."""
    return lambda user: user is not reader


def _insert(
    scope: ScopeTrace,
    points: list[tuple[InsertionPoint, fx.Node, list[fx.Node] | None]],
    model_nodes: dict[str, fx.Node],
    root: nn.Module,
) -> None:
    """Add a ``call_module`` node for each point to the scope's own graph and rewire
    (``model_nodes``: the model's trace by node name, of the module ``root``)."""
    graph = scope.graph
    sizes = _GridSizes(scope, model_nodes, root)
    # Edge insertions first: an all-users insertion on the same producer then wraps them.
    for point, producer_in_model, consumers_in_model in sorted(points, key=lambda p: p[2] is None):
        producer = scope.node_map[producer_in_model]
        target = point.key[len(scope.path) + 1 :] if scope.path else point.key
        arguments = (producer, *sizes.of(point, producer))
        after = _latest(graph, arguments) if len(arguments) > 1 else producer
        with graph.inserting_after(after):  # the block acts on the point's layout natively
            node = graph.call_module(target, arguments)
        if consumers_in_model is None:
            producer.replace_all_uses_with(node, delete_user_cb=_all_but(node))
        else:
            for consumer in consumers_in_model:
                if consumer in scope.node_map:
                    scope.node_map[consumer].replace_input_with(producer, node)
            if any(c not in scope.node_map for c in consumers_in_model):
                _returned_through(scope, producer_in_model, consumers_in_model, producer, node)
    graph.lint()


class _GridSizes:
    """The nodes giving a dynamic grid's H' and W' in a scope's graph: the model's own
    values of its map's sizes where the scope has them before the block (a module's parameters
    given them, ``x.shape[d]`` in its code, a patch embedding's ``H // patch``:
    :func:`~attn_inject.graph.ops.gives_size`), else ``size(d)`` of the map, read right after
    it is made. One pair per map and dims, shared by its blocks."""

    def __init__(self, scope: ScopeTrace, model_nodes: dict[str, fx.Node], root: nn.Module) -> None:
        self.scope = scope
        self.model_nodes = model_nodes
        self.root = root
        self.made: dict[tuple[str, int, int], tuple[fx.Node, fx.Node]] = {}

    @functools.cached_property
    def position(self) -> dict[fx.Node, int]:
        """Each node's place in the scope's graph as copied (read only for a dynamic grid)."""
        return {node: i for i, node in enumerate(self.scope.graph.nodes)}

    def of(self, point: InsertionPoint, producer: fx.Node) -> tuple[fx.Node, ...]:
        """``()`` for a point of fixed layout, else the (height, width) nodes of its grid."""
        if point.grid_from is None:
            return ()
        name, height_dim, width_dim = point.grid_from
        source = self.model_nodes[name]
        reads = [self._read(source, dim, producer) for dim in (height_dim, width_dim)]
        if reads[0] is not None and reads[1] is not None:
            return reads[0], reads[1]
        if point.grid_from not in self.made:
            if source not in self.scope.node_map:
                raise RewriteError(
                    f"the block at {point.node} reads its grid's size from node {name!r}, which "
                    f"{self.scope.path or 'the model'} neither computes nor reads the sizes of before it"
                )
            mapped = self.scope.node_map[source]
            graph = self.scope.graph
            with graph.inserting_after(mapped):
                height = graph.call_method("size", (mapped, height_dim))
            with graph.inserting_after(height):
                width = graph.call_method("size", (mapped, width_dim))
            self.made[point.grid_from] = (height, width)
        return self.made[point.grid_from]

    def _read(self, source: fx.Node, dim: int, producer: fx.Node) -> fx.Node | None:
        """The scope's node for the model's read of size ``dim`` of ``source``, where one
        comes before ``producer`` in the scope's graph or is one of the scope's arguments
        (the block then goes after the last argument it reads)."""
        before = self.position.get(producer, -1)
        for node, mapped in self.scope.node_map.items():
            if not ops.gives_size(node, source, dim, self.root):
                continue
            if mapped.op == "placeholder" or self.position.get(mapped, before) < before:
                return mapped
        return None


def _latest(graph: fx.Graph, nodes: tuple[fx.Node, ...]) -> fx.Node:
    """The one of ``nodes`` that comes last in ``graph``."""
    wanted, last = set(nodes), nodes[0]
    for node in graph.nodes:
        if node in wanted:
            last = node
    return last


def _returned_through(
    scope: ScopeTrace, producer_in_model: fx.Node, consumers: list[fx.Node], producer: fx.Node, node: fx.Node
) -> None:
    """Readers outside the scope read the block through what the scope returns: only when
    every reader outside it takes the block."""
    outside = [u for u in producer_in_model.users if u not in scope.node_map]
    if not set(outside) <= set(consumers):
        raise RewriteError(
            f"a block on {producer_in_model.name} is read outside {scope.path or 'the model'} by some of "
            "its readers only"
        )
    output = next(n for n in scope.graph.nodes if n.op == "output")
    output.replace_input_with(producer, node)


def _rewritten(original: nn.Module, scope: ScopeTrace, where: str) -> nn.Module:
    """A copy of ``original`` whose forward runs the scope's graph; the graph's tensor
    constants become non-persistent buffers (they move with the module, and ``state_dict``
    gains nothing but the blocks)."""
    module = shallow_copy(original)
    own = module.__dict__.pop("forward", None)  # a forward set on the instance: the graph replaces it
    for name, value in scope.constants.items():
        if isinstance(value, torch.Tensor):
            module.register_buffer(name, value, persistent=False)
        else:
            setattr(module, name, value)
    call_arguments = scope.arguments if scope.arguments is not None else ()
    derive_graph(
        module, scope.graph, call_arguments, where or type(original).__name__, getattr(own, "__func__", None)
    )
    return module


def _reading_training(scope: ScopeTrace, where: str) -> list[str]:
    """The modules whose code the rewritten scope inlines and that read ``self.training``."""
    names = ["", *scope.traced_through]
    return [
        ".".join(p for p in (where, name) if p) or type(scope.module).__name__
        for name in names
        if reads_training(scope.module.get_submodule(name) if name else scope.module)
    ]


def _refuse_hooks(scope: ScopeTrace, where: str) -> None:
    for name in scope.traced_through:
        module = scope.module.get_submodule(name)
        if any(getattr(module, key, None) for key in HOOK_DICTS):
            full = f"{where}.{name}" if where else name
            raise RewriteError(
                f"module {full!r} has hooks, and its code is traced into the rewritten {where or 'model'}, "
                "where they would not run: remove them before inject and register them on the patched model"
            )


def rewrite(
    model: nn.Module,
    graph: AnnotatedGraph,
    plan: Plan,
    base: tuple[str, dict[str, Any]] | None = None,
) -> nn.Module:
    """``model`` with the planned blocks inserted where ``plan`` places them. ``graph`` is the
    whole trace of ``model`` (or of its ``plan.target``) the plan was made on."""
    sub = model.get_submodule(plan.target) if plan.target else model
    device, dtype = _reference_tensor(sub)
    prefix = f"{plan.target}." if plan.target else ""
    tree = _Tree(model)
    blocks = {point.key: build_block(point, plan.init, device, dtype, prefix + point.key) for point in plan}
    model_nodes = {node.name: node for node in graph.nodes}
    owners, around = _by_attach(plan, model_nodes)
    baked: list[str] = []
    for owner, points in owners.items():
        scope = _owner_scope(sub, graph, owner, points, model_nodes)
        _refuse_hooks(scope, prefix + owner)
        baked += _reading_training(scope, prefix + owner)
        _insert(scope, points, model_nodes, sub)
        tree.replace(prefix + owner, _rewritten(scope.module, scope, prefix + owner))
    for point in plan:
        host = tree.writable(prefix + point.module)
        host._modules[point.block_name] = blocks[point.key]
        host.__dict__.pop(point.block_name, None)  # a plain attribute of that name (e.g. se = None)
    for module, wrapped in around.items():
        derive_around(tree.writable(prefix + module), wrapped)
    if baked:
        more = " ..." if len(baked) > 3 else ""
        warnings.warn(
            f"the forward of {', '.join(baked[:3])}{more} reads self.training and holds an insertion point, "
            "so its rewritten code runs as in eval mode (e.g. an inline dropout is off in training)",
            stacklevel=3,
        )
    if len(plan) and eager_quantization_ready(model):
        warnings.warn(f"{plan.model_name}: {EAGER_QUANTIZATION_NOTE}", stacklevel=3)
    patched = tree.root
    set_record(patched, _record(model, patched, plan, base))
    return patched


GraphPoints = dict[str, list[tuple[InsertionPoint, fx.Node, "list[fx.Node] | None"]]]


def _by_attach(plan: Plan, by_name: dict[str, fx.Node]) -> tuple[GraphPoints, dict[str, Around]]:
    """The points each rewritten owner runs in its graph (with their producer and readers,
    found in ``by_name``, the model's trace by node name), and the blocks each module runs
    around its own forward."""
    owners: GraphPoints = {}
    around: dict[str, Around] = {}
    for point in plan:
        if point.attach == GRAPH:
            consumers = None if point.consumers is None else [by_name[c] for c in point.consumers]
            owners.setdefault(point.owner, []).append((point, by_name[point.node], consumers))
        elif point.attach == AFTER:
            wrapped = around.get(point.module, Around())
            around[point.module] = wrapped.add(after="", block=point.block_name, sizes=point.grid_arguments)
        elif point.attach == BEFORE:
            wrapped = around.get(point.module, Around())
            around[point.module] = wrapped.add(before=point.argument, block=point.block_name)
    return owners, around


def _owner_scope(
    sub: nn.Module,
    graph: AnnotatedGraph,
    owner: str,
    points: list[tuple[InsertionPoint, fx.Node, list[fx.Node] | None]],
    model_nodes: dict[str, fx.Node],
) -> ScopeTrace:
    """The graph ``owner``'s forward becomes: its own call traced alone, or for the root
    ('') the whole trace without the analysis' annotations; in both, submodules that hold
    none of the points stay calls."""
    producers = {producer for _, producer, _ in points}
    readers = {r for _, producer, consumers in points for r in (consumers or producer.users)}
    # the maps a dynamic grid's size is read from stay in the scope's own graph too
    readers |= {model_nodes[point.grid_from[0]] for point, _, _ in points if point.grid_from is not None}
    if owner:
        calls = {c.path: c for c in graph.calls if not c.leaf}
        return extract_scope(sub, graph, calls[owner], producers, readers)
    scope = root_scope(sub, graph, producers, readers)
    for node in scope.graph.nodes:
        for key in ANNOTATIONS:
            node.meta.pop(key, None)
    return scope


def _record(
    model: nn.Module, patched: nn.Module, plan: Plan, base: tuple[str, dict[str, Any]] | None
) -> InjectionInfo:
    """What the patched model remembers: the plans of earlier injections into ``model``,
    then this one, the base model's builder, and whether it computes the model first passed
    to ``inject`` (every injection at identity, earlier blocks unchanged since), with the
    digest of its blocks as they are now."""
    earlier = patched_record(model)
    plans = (*earlier.plans, plan) if earlier is not None else (plan,)
    if base is None and earlier is not None and earlier.base_model:
        base = (earlier.base_model, dict(earlier.base_kwargs))
    earlier_kept = earlier is None or (
        earlier.computes_original
        and bool(earlier.block_digest)
        and blocks_digest(model, earlier.block_keys) == earlier.block_digest
    )
    info = InjectionInfo(plans, *(base[0], tuple(sorted(base[1].items()))) if base else ())
    return dataclasses.replace(
        info,
        computes_original=earlier_kept and (plan.init == "identity" or not plan.points),
        block_digest=blocks_digest(patched, info.block_keys),
    )
