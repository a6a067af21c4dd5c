"""Scopes: which module runs each block, and which module holds it.

The whole model is traced once to find the insertion points; the surgery itself is local and
every module it changes stays an instance of its own class (:mod:`attn_inject.surgery.derive`). For
each point (a producer node and the consumers that read the block's output), the first of
these that applies:

- **slot**: the module whose code holds the point already calls an attribute that is None
  there (timm's ``self.se = None`` in a bottleneck built without attention), at exactly this
  point: the block takes that attribute and no code changes at all (``layer1.0.se``, as in
  timm's ``seresnet50``);
- **after**: the block applies to every reader of what a module (called once) returns: that
  module runs its own forward as written, then the block (a stage's output: ``layer1.2.cbam``
  in the stage's last block, so containers keep their length and ``checkpoint_seq``,
  ``forward_intermediates`` and ``prune_intermediate_layers`` see it where they see the stage);
- **before**: the block applies to one argument of a module (called once) that is the only
  reader: that module runs the block on the argument, then its own forward;
- **graph**: otherwise the block lives in the deepest module whose forward holds the
  producer and the consumers, or, for a module's return value read only outside it, the
  outermost module that returns it. That module's own graph is cut out of the model's trace
  (the nodes its one call created, its parameters as placeholders, its return value as the
  output) and becomes its forward, with its signature. Where that module cannot stand alone
  (it is called more than once, takes ``*args``, is given graph values inside a container,
  or reads a value it is not given), a wider one is used, up to the root, and the reason is
  recorded in the plan.

Every other module keeps its code, and every module its class.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import inspect
import operator
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn

from ..core.errors import AttnInjectError
from ..core.kept import Kept
from ..core.names import relative_name
from ..core.values import CONSTANT_TYPES
from ..graph import ops
from ..graph.analysis import AnnotatedGraph, module_stack
from ..graph.trace import HOOK_DICTS, ModuleCall, reads_training
from ..surgery.derive import RESULT, derived_spec, holds_nodes
from .points import Attach

__all__ = [
    "Attach",
    "Placement",
    "Refusal",
    "ScopeError",
    "ScopeTrace",
    "extract_scope",
    "place",
    "reads_training",
    "root_scope",
]


SLOT, AFTER, BEFORE, GRAPH = Attach.SLOT, Attach.AFTER, Attach.BEFORE, Attach.GRAPH
GridFrom = tuple[fx.Node, int, int]  # a map and its height and width dims: a dynamic grid's size


class ScopeError(AttnInjectError, RuntimeError):
    """A module cannot be rewritten on its own."""


@dataclass(frozen=True)
class Refusal:
    """Why one module cannot run a block's graph: a line naming the module and what is wrong
    (the plan records it as the point's note when a wider module is used)."""

    reason: str

    def __str__(self) -> str:
        return self.reason


@dataclass(frozen=True)
class _Owner:
    """The module whose graph runs a block, and why each narrower candidate could not."""

    module: str
    refusals: tuple[Refusal, ...] = ()

    @property
    def note(self) -> str:
        return "; ".join(str(r) for r in self.refusals)


@dataclass(frozen=True)
class Placement:
    """Where one block goes: a child ``name`` of module ``module`` ('' is the model), run by
    the code of ``owner`` as ``attach`` says (``argument``: the parameter a "before" block
    takes; ``grid_arguments``: the parameters of an "after" block's module, or their items
    (``size[0]``), that give its dynamic grid's height and width)."""

    module: str
    name: str
    owner: str
    attach: Attach
    note: str = ""
    argument: str = ""
    grid_arguments: tuple[str, str] | None = None

    @property
    def key(self) -> str:
        return f"{self.module}.{self.name}" if self.module else self.name


@dataclass
class ScopeTrace:
    """A module traced alone, and the map from the model's trace nodes to its own."""

    path: str
    module: nn.Module
    graph: fx.Graph
    node_map: dict[fx.Node, fx.Node]
    traced_through: tuple[str, ...]  # submodules (relative names) whose code was inlined
    constants: dict[str, Any] = field(default_factory=dict)  # tensor constants its graph reads
    arguments: tuple[tuple[str, Any], ...] | None = None  # the call's, by parameter (see ModuleCall)


def _unpack(
    graph: fx.Graph, source: fx.Node, value: Any, node_map: dict[fx.Node, fx.Node], what: str
) -> None:
    """Map the graph values inside an argument (a node, or lists, tuples and dicts of them,
    as HRNet's branches pass) to ``source`` or the items taken from it."""
    if isinstance(value, fx.Node):
        node_map.setdefault(value, source)
    elif isinstance(value, (list, tuple)) and holds_nodes(value):
        for i, item in enumerate(value):
            _unpack(graph, graph.call_function(operator.getitem, (source, i)), item, node_map, what)
    elif isinstance(value, dict) and holds_nodes(value):
        for key, item in value.items():
            if not isinstance(key, (str, int)):
                raise ScopeError(f"{what} is a dict with {type(key).__name__} keys")
            _unpack(graph, graph.call_function(operator.getitem, (source, key)), item, node_map, what)
    elif holds_nodes(value):
        raise ScopeError(f"{what} holds graph values in a {type(value).__name__}")


def _simple(value: Any) -> bool:
    """A value a graph can hold as an argument: a node, a plain constant, or tuples/lists of them."""
    if isinstance(value, (fx.Node, *CONSTANT_TYPES)):
        return True
    if isinstance(value, (tuple, list)):
        return all(_simple(v) for v in value)
    return False


def _result_nodes(result: Any) -> list[tuple[fx.Node, tuple[int, ...]]]:
    """Each graph value a call returned, with its index path in the returned structure."""
    if isinstance(result, fx.Node):
        return [(result, ())]
    if isinstance(result, (tuple, list)):
        out: list[tuple[fx.Node, tuple[int, ...]]] = []
        for i, item in enumerate(result):
            out += [(node, (i, *path)) for node, path in _result_nodes(item)]
        return out
    return []


def _kept_whole(
    graph: AnnotatedGraph, call: ModuleCall, producers: set[fx.Node], readers: set[fx.Node]
) -> list[ModuleCall]:
    """The outermost submodule calls inside ``call`` that can stay calls of the submodule (its
    own code runs as written): no block's reader lies inside and no block's producer except
    what it returns, values leave it only through what it returns, and its arguments are
    graph values or plain constants."""
    prefix = call.path + "." if call.path else ""
    span = set(call.nodes)
    kept: list[ModuleCall] = []
    covered: set[fx.Node] = set()
    inner = [
        c for c in graph.calls if not c.leaf and c.nodes and c.nodes[0] in span and c.path.startswith(prefix)
    ]
    for child in sorted(inner, key=lambda c: c.path.count(".")):
        if child.nodes[0] in covered or child.arguments is None:
            continue
        if sum(1 for c in graph.calls if c.path == child.path) != 1:
            continue
        if _stays_whole(child, producers, readers):
            kept.append(child)
            covered |= set(child.nodes)
    return kept


def _stays_whole(child: ModuleCall, producers: set[fx.Node], readers: set[fx.Node]) -> bool:
    """Whether a submodule's one call can stay a call: no block's reader inside, no block's
    producer but what it returns, values leaving only through what it returns, and graph
    values or plain constants as its arguments."""
    results = {node for node, _ in _result_nodes(child.result)}
    own = set(child.nodes)
    if not results or not results <= own or own & readers or (own - results) & producers:
        return False
    if any(u not in own for n in own - results for u in n.users):
        return False
    return all(_simple(v) for _, v in child.arguments or ())


# The module itself, as a graph of its own forward reads it (``self.forward.__self__`` is
# ``self``): the owner of a size-only method call recorded by the trace.
ITSELF = "forward.__self__"


def extract_scope(
    root: nn.Module,
    graph: AnnotatedGraph,
    call: ModuleCall,
    producers: set[fx.Node] | None = None,
    readers: set[fx.Node] | None = None,
) -> ScopeTrace:
    """The module of ``call`` as a graph of its own: the nodes its call created in the
    model's trace, copied with its parameters as placeholders (values the caller passed as
    constants stay constants) and what it returned as the output. Submodules that hold no
    block's reader and no producer but their result stay single ``call_module`` nodes, so
    their own code runs as written. Raises :class:`ScopeError` when the call cannot stand
    alone."""
    module = ops.submodule(root, call.path)
    if call.arguments is None:
        raise ScopeError(f"{call.path} takes *args or **kwargs")
    return _copied(root, graph, call, module, producers, readers)


def root_scope(
    root: nn.Module, graph: AnnotatedGraph, producers: set[fx.Node], readers: set[fx.Node]
) -> ScopeTrace:
    """The whole trace as the root's own graph, with its inputs: as :func:`extract_scope`
    for a module, submodules holding no block's reader and no producer but their result stay
    single calls."""
    call = _root_call(graph)
    scope = _copied(root, graph, call, root, producers, readers)
    scope.graph.set_codegen(graph.graph._codegen)  # the output's type, where the trace kept it
    arguments = tuple((str(n.target), scope.node_map[n]) for n in call.nodes if n.op == "placeholder")
    return dataclasses.replace(scope, arguments=arguments)


def _root_call(graph: AnnotatedGraph) -> ModuleCall:
    """The whole trace as one call of the root (its nodes, what it returns)."""
    nodes = tuple(n for n in graph.graph.nodes if n.op != "output")
    output = next(n for n in reversed(graph.graph.nodes) if n.op == "output")
    return ModuleCall("", False, nodes, (), None, result=output.args[0])


def _copied(
    root: nn.Module,
    graph: AnnotatedGraph,
    call: ModuleCall,
    module: nn.Module,
    producers: set[fx.Node] | None,
    readers: set[fx.Node] | None,
) -> ScopeTrace:
    copy = _ScopeCopy(root, call)
    kept = _kept_whole(graph, call, producers or set(), readers or set())
    whole = {child.nodes[0]: child for child in kept}
    skip: set[fx.Node] = set()
    for node in call.nodes:
        if node in skip:
            continue
        child = whole.get(node)
        if child is not None:
            copy.call_whole(child)
            skip |= set(child.nodes)
        else:
            copy.copy(node)
    copy.own.output(copy.mapped(call.result))
    span = set(call.nodes) - skip
    inner = tuple(
        c.path[len(copy.prefix) :]
        for c in graph.calls
        if not c.leaf and c.nodes and c.nodes[0] in span and c.path.startswith(copy.prefix)
    )
    return ScopeTrace(call.path, module, copy.own, copy.node_map, inner, copy.constants, call.arguments)


class _ScopeCopy:
    """The graph of one module's call being copied out of the model's trace: each node of
    the trace mapped to its copy, targets made relative to the module."""

    def __init__(self, root: nn.Module, call: ModuleCall) -> None:
        self.root, self.call, self.prefix = root, call, call.path + "." if call.path else ""
        self.own = fx.Graph()
        self.node_map: dict[fx.Node, fx.Node] = {}
        self.constants: dict[str, Any] = {}
        for name, value in call.arguments or ():
            _unpack(
                self.own, self.own.placeholder(name), value, self.node_map, f"{call.path} argument {name}"
            )

    def value_of(self, node: fx.Node) -> fx.Node:
        if node in self.node_map:
            return self.node_map[node]
        if not self.call.path:
            raise ScopeError(f"the model's graph reads {node.name} before it is made")
        if node.op == "get_attr" and str(node.target).startswith(self.prefix):  # fetched before the call
            self.node_map[node] = self.own.get_attr(str(node.target)[len(self.prefix) :])
            return self.node_map[node]
        if node.op == "get_attr" and node.target == self.call.path:  # the module itself (a size-only call)
            self.node_map[node] = self.own.get_attr(ITSELF)
            return self.node_map[node]
        raise ScopeError(f"{self.call.path} reads {node.name}, which it is not given")

    def mapped(self, value: Any) -> Any:
        return fx.node.map_aggregate(value, lambda v: self.value_of(v) if isinstance(v, fx.Node) else v)

    def call_whole(self, child: ModuleCall) -> None:
        """A submodule's call as one ``call_module`` node, its results unpacked."""
        assert child.arguments is not None
        called = self.own.call_module(
            child.path[len(self.prefix) :], kwargs={k: self.mapped(v) for k, v in child.arguments}
        )
        for result, path in _result_nodes(child.result):
            item = called
            for index in path:
                item = self.own.call_function(operator.getitem, (item, index))
            self.node_map[result] = item

    def copy(self, node: fx.Node) -> None:
        """One node, its module or attribute named from inside the module."""
        copied = self.own.node_copy(node, self.value_of)
        if node.op in ("call_module", "get_attr"):
            target = str(node.target)
            if target.startswith(self.prefix):
                copied.target = target[len(self.prefix) :]
            elif node.op == "get_attr" and target == self.call.path:
                copied.target = ITSELF
            elif node.op == "get_attr" and "." not in target and hasattr(self.root, target):
                self.constants[target] = getattr(self.root, target)  # a tensor constant the tracer stored
            else:
                raise ScopeError(f"{self.call.path} uses {target}, which is not its own")
        self.node_map[node] = copied


class _Calls:
    """The module calls of a trace, indexed for scope questions."""

    def __init__(self, graph: AnnotatedGraph) -> None:
        self.count: dict[str, int] = {}
        self.single: dict[str, ModuleCall] = {}
        self.span: dict[str, set[fx.Node]] = {}
        self.returned_by: dict[fx.Node, list[str]] = {}
        for call in graph.calls:
            self.count[call.path] = self.count.get(call.path, 0) + 1
            if call.leaf:
                continue
            self.single[call.path] = call
            self.span[call.path] = set(call.nodes)
            if call.output is not None:
                self.returned_by.setdefault(call.output, []).append(call.path)
        for path, n in self.count.items():
            if n > 1:
                self.single.pop(path, None)

    def why_not(self, path: str) -> Refusal | None:
        if self.count.get(path, 0) > 1:
            return Refusal(f"{path} is called {self.count[path]} times")
        if path not in self.single:
            return Refusal(f"{path} is kept whole")
        return None


def _argument_values(arguments: tuple[tuple[str, Any], ...]) -> Iterator[tuple[str, fx.Node]]:
    """The graph values a call is given, each with the expression that reads it in the
    module's forward: ``name``, or ``name[i]`` for an item of a tuple (not of a list, which the
    forward may change before a block after it reads it)."""
    for name, value in arguments:
        if name == RESULT:  # the generated forward keeps the module's result in that name
            continue
        if isinstance(value, fx.Node):
            yield name, value
        elif isinstance(value, tuple):
            yield from ((f"{name}[{i}]", item) for i, item in enumerate(value) if isinstance(item, fx.Node))


def _module_path(node: fx.Node, leaf_calls: dict[fx.Node, str]) -> str:
    """The innermost module whose forward created ``node`` (a leaf's call is in its parent)."""
    paths = module_stack(node)
    if node in leaf_calls and paths and paths[-1] == leaf_calls[node]:
        paths = paths[:-1]
    return paths[-1] if paths else ""


def _ancestors(path: str) -> list[str]:
    """``path`` and every module above it, innermost first, the root '' left out."""
    parts = path.split(".") if path else []
    return [".".join(parts[:i]) for i in range(len(parts), 0, -1)]


def _common(paths: list[str]) -> str:
    parts = [p.split(".") if p else [] for p in paths]
    common: list[str] = []
    for level in zip(*parts, strict=False):
        if len(set(level)) != 1:
            break
        common.append(level[0])
    return ".".join(common)


CHILD_LOOPS = ("self.children()", "self.named_children()", "self.items()", "self.values()", "in self:")


def _loops_children(module: nn.Module) -> bool:
    """Whether the module's forward walks ``self.children()`` (which sees every child)."""
    try:
        source = inspect.getsource(type(module).forward)
    except (OSError, TypeError):
        return True
    return "self.children()" in source or "self.named_children()" in source or "self._modules" in source


def iterates_children(module: nn.Module) -> bool:
    """Whether code walks the module's children as a list (a container, or a forward that
    loops over them, as timm's RegStage and DenseNet's dense block do): a block added as its
    child would be run, counted or dropped with them."""
    if isinstance(module, (nn.Sequential, nn.ModuleList, nn.ModuleDict)):
        return True
    try:
        source = inspect.getsource(type(module).forward)
    except (OSError, TypeError):
        return False
    return any(loop in source for loop in CHILD_LOOPS)


class _SlotTracer(fx.Tracer):
    """Traces one module alone, torch.nn's layers and ``marker`` kept as calls."""

    def __init__(self, marker: nn.Module) -> None:
        super().__init__()
        self.marker = marker

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return m is self.marker or super().is_leaf_module(m, module_qualified_name)


class _Marker(nn.Identity):
    """Stands in a slot while its owner is traced, to see where its code calls it."""


class Placer:
    """Chooses a scope for each point of one traced model (or target)."""

    def __init__(self, root: nn.Module, graph: AnnotatedGraph) -> None:
        self.root = root
        self.graph = graph
        self.calls = _Calls(graph)
        self.leaf_calls = {c.output: c.path for c in graph.calls if c.leaf and c.output is not None}
        self.traceable: dict[str, Refusal | None] = {}  # path -> None, or why it cannot be traced alone
        objects: dict[int, int] = {}
        for call in graph.calls:
            with contextlib.suppress(AttributeError):
                key = id(ops.submodule(root, call.path))
                objects[key] = objects.get(key, 0) + 1
        # Module calls of objects called once (a module shared under two names is called twice).
        self.once = [
            c for c in graph.calls if c.path and objects.get(id(ops.submodule(root, c.path)), 0) == 1
        ]
        self.slots: dict[tuple[str, str, str], bool] = {}
        # Slot verdicts of this call by what decides them (see _code_design), for the designs
        # not kept across calls.
        self.slot_designs: dict[tuple[Any, ...], bool] = {}

    def _trace_problem(self, path: str) -> Refusal | None:
        if path not in self.traceable:
            why = self.calls.why_not(path)
            if why is None and reads_training(ops.submodule(self.root, path)):
                why = Refusal(f"{path}'s forward reads self.training, which a rewrite would fix to eval")
            if why is None:
                try:
                    extract_scope(self.root, self.graph, self.calls.single[path])
                except ScopeError as error:
                    why = Refusal(str(error))
            self.traceable[path] = why
        return self.traceable[path]

    def _inside(self, node: fx.Node, path: str) -> bool:
        return not path or node in self.calls.span.get(path, ())

    def _derivable(self, path: str) -> bool:
        """Whether a block can run around the module's own forward: its class's (a forward
        set on the instance, as timm's FasterNet does, is not a method a subclass replaces)."""
        module = ops.submodule(self.root, path)
        spec = derived_spec(module)
        return "forward" not in vars(module) and (spec is None or spec.graph is None)

    def after_site(self, producer: fx.Node, readers: list[fx.Node]) -> str | None:
        """The module that runs a block on everything ``producer`` gives its readers: called
        once, it computed and returns the value, no reader lies inside. The innermost such
        module with code of its own (not a plain Sequential, whose length would change), or
        else the innermost layer."""
        found = [
            c
            for c in self.once
            if c.output is producer
            and producer in c.nodes
            and not any(r in c.nodes for r in readers)
            and self._derivable(c.path)
        ]
        for call in found:  # innermost first: calls are listed in the order they ended
            if not call.leaf and not iterates_children(ops.submodule(self.root, call.path)):
                return call.path
        leaves = [c for c in found if c.leaf]
        if leaves:
            return leaves[0].path
        for call in found:  # a dict of modules that loops over its own items: it hides its blocks
            if isinstance(ops.submodule(self.root, call.path), nn.ModuleDict) and not _loops_children(
                ops.submodule(self.root, call.path)
            ):
                return call.path
        return None

    def before_site(self, producer: fx.Node, readers: list[fx.Node]) -> tuple[str, str] | None:
        """(module, parameter) for a block on the one argument of a module (called once)
        that holds every reader of ``producer`` and takes it as that parameter."""
        for call in self.once:
            if producer in call.nodes or not all(r in call.nodes for r in readers):
                continue
            if any(u in call.nodes for u in producer.users if u not in readers):
                continue
            if not self._derivable(call.path) or iterates_children(ops.submodule(self.root, call.path)):
                continue
            if call.leaf:
                reader = readers[0] if len(readers) == 1 else None
                if reader is None or reader.op != "call_module":
                    continue
                name = _parameter_of(ops.submodule(self.root, call.path), reader, producer)
            else:
                given = [n for n, v in call.arguments or () if v is producer]
                name = given[0] if len(given) == 1 and set(call.inputs) == {producer} else None
            return (call.path, name) if name else None
        return None

    def slot_site(self, producer: fx.Node, readers: list[fx.Node], name: str) -> str | None:
        """The module whose own code calls its attribute ``name`` (None there) at this point."""
        deepest = _common([_module_path(r, self.leaf_calls) for r in readers if r.op != "output"])
        if not deepest or any(r.op == "output" for r in readers) or producer.op != "call_module":
            return None
        if self.calls.why_not(deepest) is not None or not self._inside(producer, deepest):
            return None
        host = ops.submodule(self.root, deepest)
        if name not in vars(host) or vars(host)[name] is not None or name in host._modules:
            return None
        target = str(producer.target)
        if not target.startswith(deepest + "."):
            return None
        key = (deepest, name, target[len(deepest) + 1 :])
        if key not in self.slots:
            every_reader = set(readers) == set(producer.users)
            self.slots[key] = _slot_verdict(host, name, key[2], every_reader, self.slot_designs)
        return deepest if self.slots[key] else None

    def choose(
        self, producer: fx.Node, consumers: list[fx.Node] | None, name: str, grid_from: GridFrom | None = None
    ) -> Placement:
        """Where a block on ``producer`` read by ``consumers`` (None: all) goes; ``grid_from``:
        the map (and its dims) giving a dynamic grid's H' x W', which the block is also given:
        by the module returning ``producer`` where its call is given those sizes, else by a
        graph that computes the map or is given its sizes."""
        readers = list(producer.users) if consumers is None else consumers
        every = set(readers) == set(producer.users)
        if grid_from is not None:
            after = self.after_site(producer, readers) if every else None
            sizes = self._size_parameters(after, grid_from) if after is not None else None
            if after is not None and sizes is not None:
                return Placement(after, name, after, AFTER, grid_arguments=sizes)
        else:
            slot = self.slot_site(producer, readers, name)
            if slot is not None:
                return Placement(slot, name, slot, SLOT)
            after = self.after_site(producer, readers) if every else None
            if after is not None:
                return Placement(after, name, after, AFTER)
            before = self.before_site(producer, readers)
            if before is not None:
                return Placement(before[0], name, before[0], BEFORE, argument=before[1])
        owner = self._graph_owner(producer, consumers, grid_from)
        module, note = owner.module, owner.note
        returning = self.calls.returned_by.get(producer, [])
        if returning and module not in returning:
            outer = returning[-1]
            if outer.startswith(module + ".") or not module:
                via = relative_name(outer, module).split(".")[0]
                name = f"{via}_{name}" if not via.isdigit() else name
        return Placement(module, name, module, GRAPH, note)

    def _graph_owner(
        self, producer: fx.Node, consumers: list[fx.Node] | None, grid_from: GridFrom | None = None
    ) -> _Owner:
        """The module whose graph runs a block on ``producer`` for ``consumers`` (None: all):
        the outermost module returning it that can stand alone, when it is read only outside
        them; else the innermost module holding every reader that can; else the root, which
        holds every point. Each gives the block its grid's size too, where it needs one."""
        readers = list(producer.users) if consumers is None else consumers
        refusals: list[Refusal] = []
        if consumers is None:
            for path in self._returning(producer, readers):
                why = self._source_refusal(path, grid_from) or self._trace_problem(path)
                if why is None:
                    return _Owner(path)
                refusals.append(why)
        deepest = _common([_module_path(r, self.leaf_calls) for r in readers if r.op != "output"])
        if any(r.op == "output" for r in readers):
            deepest = ""
        for path in _ancestors(deepest):
            why = self._source_refusal(path, grid_from) or self._holding_refusal(path, producer, readers)
            if why is None:
                return _Owner(path, tuple(refusals))
            refusals.append(why)
        return _Owner("", tuple(refusals))

    def _returning(self, producer: fx.Node, readers: list[fx.Node]) -> list[str]:
        """The modules that return ``producer``, outermost first, called once, with no
        reader inside."""
        return [
            p
            for p in reversed(self.calls.returned_by.get(producer, []))
            if self.calls.why_not(p) is None and not any(self._inside(r, p) for r in readers)
        ]

    def _size_parameters(self, path: str, grid_from: GridFrom) -> tuple[str, str] | None:
        """What module ``path``'s one call is given the sizes of the map ``grid_from`` names
        in (:func:`~attn_inject.graph.ops.gives_size`), height then width: a parameter, or an
        item of a tuple one (``size[0]``, as timm's Twins blocks are called)."""
        call = self.calls.single.get(path)
        if call is None or not call.arguments:
            return None
        source, *dims = grid_from
        found = []
        for dim in dims:
            given = [
                expression
                for expression, value in _argument_values(call.arguments)
                if ops.gives_size(value, source, dim, self.root)
            ]
            if not given:
                return None
            found.append(given[0])
        return found[0], found[1]

    def _source_refusal(self, path: str, grid_from: GridFrom | None) -> Refusal | None:
        """Why module ``path`` cannot give a block its grid's size: it neither computes the
        map nor is given its sizes."""
        if grid_from is None or self._inside(grid_from[0], path) or self._size_parameters(path, grid_from):
            return None
        return Refusal(
            f"{path} neither computes {grid_from[0].name}, the map the grid's H' x W' are read "
            "from, nor is given its sizes"
        )

    def _holding_refusal(self, path: str, producer: fx.Node, readers: list[fx.Node]) -> Refusal | None:
        """Why module ``path`` cannot run a block on ``producer`` for ``readers`` in its own
        graph; None when it can."""
        why = self.calls.why_not(path)
        if why is None and not all(self._inside(r, path) for r in readers):
            why = Refusal(f"{path} does not hold every reader")
        if why is None and not (self._inside(producer, path) or producer in self.calls.single[path].inputs):
            why = Refusal(f"{path} is not given the block's input")
        return self._trace_problem(path) if why is None else why


def _parameter_of(module: nn.Module, call: fx.Node, producer: fx.Node) -> str | None:
    """The parameter of ``module``'s forward that ``call`` (a call_module node) gives
    ``producer``, when it is given it once and as nothing else."""
    try:
        bound = inspect.signature(type(module).forward).bind(None, *call.args, **call.kwargs)
    except (TypeError, ValueError):
        return None
    names = [name for name, value in bound.arguments.items() if value is producer]
    if len(names) != 1 or any(
        _holds(value, producer) for name, value in bound.arguments.items() if name != names[0]
    ):
        return None
    param = inspect.signature(type(module).forward).parameters[names[0]]
    return names[0] if param.kind not in (param.VAR_POSITIONAL, param.VAR_KEYWORD) else None


def _holds(value: Any, node: fx.Node) -> bool:
    found = False

    def visit(v: Any) -> Any:
        nonlocal found
        found = found or v is node
        return v

    fx.node.map_aggregate(value, visit)
    return found


def _calls_slot(host: nn.Module, name: str, producer: str, every_reader: bool) -> bool:
    """Whether ``host``'s own code, with a block in its None attribute ``name``, calls the
    block on the output of its submodule ``producer`` and on nothing else: traced alone, with
    a marker in the slot (on a copy: ``host`` is left as it is)."""
    trial = copy.copy(host)
    trial.__dict__ = dict(vars(host))
    trial._modules = dict(host._modules)
    del trial.__dict__[name]
    marker = _Marker()
    trial._modules[name] = marker
    try:
        graph = _SlotTracer(marker).trace(trial)
    except Exception:  # any code fx cannot trace alone: no slot, the other ways are tried
        return False
    calls = [n for n in graph.nodes if n.op == "call_module" and n.target == name]
    if len(calls) != 1 or len(calls[0].args) != 1 or calls[0].kwargs:
        return False
    given = calls[0].args[0]
    if not isinstance(given, fx.Node) or given.op != "call_module" or given.target != producer:
        return False
    return not every_reader or list(given.users) == [calls[0]]


# Slot verdicts by what decides them (see _code_design), kept across calls: one trace per
# design, not per module, and not again for the same design in a later call (a trace of one
# module alone costs fx's fixed patching, a few milliseconds). Each entry holds the objects its key
# names by identity.
slot_verdicts: Kept[bool] = Kept(512)


def _slot_verdict(
    host: nn.Module, name: str, producer: str, every_reader: bool, this_call: dict[tuple[Any, ...], bool]
) -> bool:
    """:func:`_calls_slot`, traced once per code design and fx configuration: across calls,
    or within ``this_call`` for a design that names a tensor (not kept alive here)."""
    design = _code_design(host)
    if design is None:
        return _calls_slot(host, name, producer, every_reader=every_reader)
    key = (design[0], name, producer, every_reader, _fx_wrapped())
    if any(isinstance(v, torch.Tensor) for v in design[1]):
        if key not in this_call:
            this_call[key] = _calls_slot(host, name, producer, every_reader=every_reader)
        return this_call[key]
    trace = functools.partial(_calls_slot, host, name, producer, every_reader=every_reader)
    return slot_verdicts.get(key, trace, held=design[1])


def _fx_wrapped() -> tuple[int, int]:
    """How many functions and methods fx wraps in every trace (``torch.fx.wrap``): a library
    that registers one later may change what a trace records."""
    from torch.fx import _symbolic_trace

    functions = getattr(_symbolic_trace, "_wrapped_fns_to_patch", ())
    methods = getattr(_symbolic_trace, "_wrapped_methods_to_patch", ())
    return len(functions), len(methods)


def _code_design(host: nn.Module) -> tuple[tuple[Any, ...], tuple[Any, ...]] | None:
    """What a trace of ``host`` alone depends on, as a key, with the objects the key names
    by identity; None where it cannot be told.

    fx runs the code of ``host`` and of every submodule it traces through, and stops at
    torch.nn's own layers: so the trace is decided by the classes, the plain attributes
    (None, numbers, strings) and the parameter and buffer names of the traced modules, and
    only the class of each leaf layer. Two bottlenecks that differ in channels and stride
    share one; one with a downsample branch does not. Any other attribute (a function, a
    tensor, an object) is keyed by its identity, a plain value with its type (``1`` is not
    ``True``), and a module with hooks is not keyed."""
    parts: list[tuple[Any, ...]] = []
    held: list[Any] = []
    for path, module in host.named_modules():
        if any(getattr(module, hooks, None) for hooks in HOOK_DICTS):
            return None
        cls = type(module)
        if path and cls.__module__.startswith("torch.nn.") and not isinstance(module, nn.Sequential):
            parts.append((path, cls))
            continue
        attributes = tuple(
            sorted(
                (k, (type(v), v) if isinstance(v, CONSTANT_TYPES) else ("object", id(v)))
                for k, v in vars(module).items()
                if not k.startswith("_")
            )
        )
        held += [
            v for k, v in vars(module).items() if not k.startswith("_") and not isinstance(v, CONSTANT_TYPES)
        ]
        tensors = tuple(k for k, v in module._parameters.items() if v is not None)
        tensors += tuple(f"buffer:{k}" for k, v in module._buffers.items() if v is not None)
        children = tuple((k, v is None) for k, v in module._modules.items())
        parts.append((path, cls, attributes, tensors, children))
    return tuple(parts), tuple(held)


def _free(host: nn.Module, name: str, rewritten: bool) -> bool:
    """Whether a block may take attribute ``name`` of ``host``: an attribute set to None (as
    timm's ``self.se = None`` in a block built without attention) when ``host``'s own code is
    rewritten, so nothing else reads it."""
    return rewritten and name in vars(host) and vars(host)[name] is None and name not in host._modules


def place(
    root: nn.Module,
    graph: AnnotatedGraph,
    edges: list[tuple[fx.Node, list[fx.Node] | None]],
    names: list[str],
    grids: list[GridFrom | None] | None = None,
    refuse: Callable[[Placement, GridFrom | None], bool] | None = None,
) -> list[Placement | None]:
    """A :class:`Placement` for each edge, named ``names[i]`` in its module (made unique);
    ``grids[i]``: the map giving its dynamic grid's size (see :meth:`Placer.choose`). An edge
    whose placement ``refuse`` turns down gets None, and the others are placed without it."""
    placer = Placer(root, graph)
    grids = grids or [None] * len(edges)
    chosen: list[Placement | None] = [
        placer.choose(producer, consumers, name, grid)
        for (producer, consumers), name, grid in zip(edges, names, grids, strict=True)
    ]
    while True:
        placements = _merged(root, chosen)
        if refuse is None:
            return placements
        # First the edges whose own choice is turned down; only when none is left, those a
        # merged owner drew in (the owner an own choice brought may go with it).
        turned_down = [
            i for i, (c, grid) in enumerate(zip(chosen, grids, strict=True)) if c and refuse(c, grid)
        ]
        if not turned_down:
            turned_down = [
                i for i, (p, grid) in enumerate(zip(placements, grids, strict=True)) if p and refuse(p, grid)
            ]
        if not turned_down:
            return placements
        for i in turned_down:
            chosen[i] = None


def _merged(root: nn.Module, chosen: list[Placement | None]) -> list[Placement | None]:
    """The placements once owners are merged: a block in a module whose code a graph owner's
    rewritten forward inlines is run by that owner; names are made unique in each module."""
    owners = sorted(
        {c.owner for c in chosen if c is not None and c.attach == GRAPH},
        key=lambda p: (p.count("."), len(p)) if p else (-1, 0),
    )

    def owner_of(module: str) -> str | None:
        for path in owners:
            if not path or module == path or module.startswith(path + "."):
                return path
        return None

    taken: dict[str, set[str]] = {}
    placements: list[Placement | None] = []
    for placement in chosen:
        if placement is None:
            placements.append(None)
            continue
        module, name, attach, owner = placement.module, placement.name, placement.attach, placement.owner
        outer = owner_of(module)
        if outer is not None and (attach != GRAPH or outer != owner):
            # A rewritten forward inlines the code of what it holds: the block is run by it.
            if module != outer:
                via = relative_name(module, outer).split(".")[0]
                module, name = outer, f"{via}_{name}" if not via.isdigit() else name
            attach, owner = GRAPH, outer
        used = taken.setdefault(module, set())
        host = ops.submodule(root, module)
        slot = attach == SLOT
        unique, n = name, 2
        while unique in used or (
            hasattr(host, unique) and not (slot or _free(host, unique, attach == GRAPH))
        ):
            unique, n = f"{name}_{n}", n + 1
        used.add(unique)
        argument = placement.argument if attach == BEFORE else ""
        sizes = placement.grid_arguments if attach == AFTER else None  # a graph reads them from the map
        placements.append(Placement(module, unique, owner, attach, placement.note, argument, sizes))
    return placements
