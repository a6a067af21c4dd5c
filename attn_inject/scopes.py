"""Scopes: which module's code runs each block, and which module holds it.

The whole model is traced once to find the insertion points; the rewrite itself is local.
For each point (a producer node and the consumers that read the block's output):

- **append**: the value is what an ``nn.Sequential`` returns, the block applies to every
  reader and every reader is outside it (a stage's output; a residual branch that is one
  Sequential, as torchvision MobileNetV2's ``conv``): the block is appended to the innermost
  such Sequential (``layer1.cbam``; in ConvNeXt ``stages.0.blocks.cbam``, not the Sequential
  of stages, whose indices would shift), so no code is traced or rewritten at all;
- **graph**: otherwise the block lives in the deepest module whose forward holds the
  producer and the consumers (a residual branch lives in its bottleneck: ``layer1.0.se``),
  or, for a module's return value read only outside it, the outermost module that returns
  it. That module's own graph is cut out of the model's trace (the nodes its one call
  created, its parameters as placeholders, its return value as the output) and the module
  is replaced by an ``fx.GraphModule`` of it that calls the block. Where that module cannot
  stand alone (it is called more than once, takes ``*args``, is given graph values inside
  a container, or reads a value it is not given), a wider one is used, up to the root, and
  the reason is recorded in the plan.

Every module outside those scopes keeps its class and runs its own Python code.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any

from torch import fx, nn

from .graph.analysis import AnnotatedGraph
from .graph.trace import ModuleCall, reads_training

__all__ = ["Placement", "ScopeError", "ScopeTrace", "extract_scope", "place", "reads_training"]

APPEND = "append"
GRAPH = "graph"


class ScopeError(RuntimeError):
    """A module cannot be rewritten on its own."""


@dataclass(frozen=True)
class Placement:
    """Where one block goes: a child ``name`` of module ``module`` ('' is the model), run by
    the code of ``owner`` (``attach="graph"``: that module's forward is rewritten) or by
    ``module`` itself (``attach="append"``: the last child of a Sequential)."""

    module: str
    name: str
    owner: str
    attach: str
    note: str = ""

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


def _relative(path: str, scope: str) -> str:
    if not scope:
        return path
    return path[len(scope) + 1 :] if path.startswith(scope + ".") else path


def _holds_nodes(value: Any) -> bool:
    found = False

    def visit(v: Any) -> Any:
        nonlocal found
        found = found or isinstance(v, fx.Node)
        return v

    fx.node.map_aggregate(value, visit)
    return found


def _unpack(
    graph: fx.Graph, source: fx.Node, value: Any, node_map: dict[fx.Node, fx.Node], what: str
) -> None:
    """Map the graph values inside an argument (a node, or lists, tuples and dicts of them,
    as HRNet's branches pass) to ``source`` or the items taken from it."""
    if isinstance(value, fx.Node):
        node_map.setdefault(value, source)
    elif isinstance(value, (list, tuple)) and _holds_nodes(value):
        for i, item in enumerate(value):
            _unpack(graph, graph.call_function(operator.getitem, (source, i)), item, node_map, what)
    elif isinstance(value, dict) and _holds_nodes(value):
        for key, item in value.items():
            if not isinstance(key, (str, int)):
                raise ScopeError(f"{what} is a dict with {type(key).__name__} keys")
            _unpack(graph, graph.call_function(operator.getitem, (source, key)), item, node_map, what)
    elif _holds_nodes(value):
        raise ScopeError(f"{what} holds graph values in a {type(value).__name__}")


SIMPLE_CONSTANTS = (type(None), bool, int, float, str)


def _simple(value: Any) -> bool:
    """A value a graph can hold as an argument: a node, a plain constant, or tuples/lists of them."""
    if isinstance(value, (fx.Node, *SIMPLE_CONSTANTS)):
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
    prefix = call.path + "."
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
        results = {node for node, _ in _result_nodes(child.result)}
        own = set(child.nodes)
        if not results or not results <= own or own & readers or (own - results) & producers:
            continue
        if any(u not in own for n in own - results for u in n.users):
            continue
        if not all(_simple(v) for _, v in child.arguments):
            continue
        kept.append(child)
        covered |= own
    return kept


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
    module = root.get_submodule(call.path)
    if call.arguments is None:
        raise ScopeError(f"{call.path} takes *args or **kwargs")
    prefix = call.path + "."
    own = fx.Graph()
    node_map: dict[fx.Node, fx.Node] = {}
    constants: dict[str, Any] = {}
    for name, value in call.arguments:
        _unpack(own, own.placeholder(name), value, node_map, f"{call.path} argument {name}")

    def value_of(node: fx.Node) -> fx.Node:
        if node in node_map:
            return node_map[node]
        if node.op == "get_attr" and str(node.target).startswith(prefix):  # fetched before the call
            node_map[node] = own.get_attr(str(node.target)[len(prefix) :])
            return node_map[node]
        raise ScopeError(f"{call.path} reads {node.name}, which it is not given")

    def mapped(value: Any) -> Any:
        return fx.node.map_aggregate(value, lambda v: value_of(v) if isinstance(v, fx.Node) else v)

    kept = _kept_whole(graph, call, producers or set(), readers or set())
    whole = {child.nodes[0]: child for child in kept}
    skip: set[fx.Node] = set()
    for node in call.nodes:
        if node in skip:
            continue
        child = whole.get(node)
        if child is not None:
            assert child.arguments is not None
            called = own.call_module(
                child.path[len(prefix) :], kwargs={k: mapped(v) for k, v in child.arguments}
            )
            for result, path in _result_nodes(child.result):
                item = called
                for index in path:
                    item = own.call_function(operator.getitem, (item, index))
                node_map[result] = item
            skip |= set(child.nodes)
            continue
        copied = own.node_copy(node, value_of)
        if node.op in ("call_module", "get_attr"):
            target = str(node.target)
            if target.startswith(prefix):
                copied.target = target[len(prefix) :]
            elif node.op == "get_attr" and "." not in target and hasattr(root, target):
                constants[target] = getattr(root, target)  # a tensor constant the tracer stored
            else:
                raise ScopeError(f"{call.path} uses {target}, which is not its own")
        node_map[node] = copied
    own.output(mapped(call.result))
    span = set(call.nodes) - skip
    inner = tuple(
        c.path[len(prefix) :]
        for c in graph.calls
        if not c.leaf and c.nodes and c.nodes[0] in span and c.path.startswith(prefix)
    )
    return ScopeTrace(call.path, module, own, node_map, inner, constants)


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

    def why_not(self, path: str) -> str | None:
        if self.count.get(path, 0) > 1:
            return f"{path} is called {self.count[path]} times"
        if path not in self.single:
            return f"{path} is kept whole"
        return None


def _module_path(node: fx.Node, leaf_calls: dict[fx.Node, str]) -> str:
    """The innermost module whose forward created ``node`` (a leaf's call is in its parent)."""
    stack = node.meta.get("nn_module_stack") or {}
    paths = [p[0] if isinstance(p, tuple) else str(p) for p in stack.values()]
    if node in leaf_calls and paths and paths[-1] == leaf_calls[node]:
        paths = paths[:-1]
    return paths[-1] if paths else ""


def _ancestors(path: str) -> list[str]:
    """``path`` and every module above it, innermost first, ending with the root ''."""
    parts = path.split(".") if path else []
    return [".".join(parts[:i]) for i in range(len(parts), 0, -1)] + [""]


def _common(paths: list[str]) -> str:
    parts = [p.split(".") if p else [] for p in paths]
    common: list[str] = []
    for level in zip(*parts, strict=False):
        if len(set(level)) != 1:
            break
        common.append(level[0])
    return ".".join(common)


def _is_plain_sequential(module: nn.Module) -> bool:
    return isinstance(module, nn.Sequential) and type(module).forward is nn.Sequential.forward


class Placer:
    """Chooses a scope for each point of one traced model (or target)."""

    def __init__(self, root: nn.Module, graph: AnnotatedGraph) -> None:
        self.root = root
        self.graph = graph
        self.calls = _Calls(graph)
        self.leaf_calls = {c.output: c.path for c in graph.calls if c.leaf and c.output is not None}
        self.traceable: dict[str, str | None] = {}  # path -> None, or why it cannot be traced alone

    def _trace_problem(self, path: str) -> str | None:
        if path not in self.traceable:
            why = self.calls.why_not(path)
            if why is None and reads_training(self.root.get_submodule(path)):
                why = f"{path}'s forward reads self.training, which a rewrite would fix to eval"
            if why is None:
                try:
                    extract_scope(self.root, self.graph, self.calls.single[path])
                except ScopeError as error:
                    why = str(error)
            self.traceable[path] = why
        return self.traceable[path]

    def _inside(self, node: fx.Node, path: str) -> bool:
        return not path or node in self.calls.span.get(path, ())

    def choose(self, producer: fx.Node, consumers: list[fx.Node] | None) -> tuple[str, str, str, str]:
        """(module, attach, note, via) for a block on ``producer`` read by ``consumers`` (None:
        all). ``via``: the module whose output the block takes, when a wider one holds it."""
        module, attach, note = self._choose(producer, consumers)
        returning = self.calls.returned_by.get(producer, [])
        via = ""
        if attach == GRAPH and returning and module not in returning:
            outer = returning[-1]
            if outer.startswith(module + ".") or not module:
                via = _relative(outer, module).split(".")[0]
        return module, attach, note, via

    def _choose(self, producer: fx.Node, consumers: list[fx.Node] | None) -> tuple[str, str, str]:
        readers = list(producer.users) if consumers is None else consumers
        notes: list[str] = []
        if consumers is None or set(consumers) == set(producer.users):
            returning = [
                p
                for p in reversed(self.calls.returned_by.get(producer, []))
                if self.calls.why_not(p) is None and not any(self._inside(r, p) for r in readers)
            ]
            for path in reversed(returning):  # the innermost Sequential: its indices are blocks
                if _is_plain_sequential(self.root.get_submodule(path)):
                    return path, APPEND, ""
        if consumers is None:
            for path in returning:
                why = self._trace_problem(path)
                if why is None:
                    return path, GRAPH, ""
                notes.append(why)
        deepest = _common([_module_path(r, self.leaf_calls) for r in readers if r.op != "output"])
        if any(r.op == "output" for r in readers):
            deepest = ""
        for path in _ancestors(deepest):
            if not path:
                return "", GRAPH, "; ".join(notes)
            why = self.calls.why_not(path)
            if why is None and not all(self._inside(r, path) for r in readers):
                why = f"{path} does not hold every reader"
            if why is None and not (
                self._inside(producer, path) or producer in self.calls.single[path].inputs
            ):
                why = f"{path} is not given the block's input"
            if why is None:
                why = self._trace_problem(path)
            if why is None:
                return path, GRAPH, "; ".join(notes)
            notes.append(why)
        raise AssertionError("unreachable: the root always holds a point")


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
) -> list[Placement]:
    """A :class:`Placement` for each edge, named ``names[i]`` in its module (made unique)."""
    placer = Placer(root, graph)
    chosen = []
    for (producer, consumers), name in zip(edges, names, strict=True):
        module, attach, note, via = placer.choose(producer, consumers)
        chosen.append((module, attach, note, f"{via}_{name}" if via and not via.isdigit() else name))
    owners = sorted(
        {m for m, a, _, _ in chosen if a == GRAPH}, key=lambda p: (p.count("."), len(p)) if p else (-1, 0)
    )

    def owner_of(module: str) -> str | None:
        for path in owners:
            if not path or module == path or module.startswith(path + "."):
                return path
        return None

    taken: dict[str, set[str]] = {}
    placements = []
    for module, attach, note, name in chosen:
        owner = owner_of(module)
        if owner is None:
            owner = module
        else:
            if attach == APPEND and owner and module != owner:
                # The owner's graph calls the Sequential whole, and a child of it would run
                # twice (in the Sequential and after it): the block lives in the owner.
                via = _relative(module, owner).split(".")[0]
                module, name = owner, f"{via}_{name}" if not via.isdigit() else name
            attach = GRAPH
        used = taken.setdefault(module, set())
        host = root.get_submodule(module)
        unique, n = name, 2
        while unique in used or (hasattr(host, unique) and not _free(host, unique, owner == module)):
            unique, n = f"{name}_{n}", n + 1
        used.add(unique)
        placements.append(Placement(module, unique, owner, attach, note))
    return placements
