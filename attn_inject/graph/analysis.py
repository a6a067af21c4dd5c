"""The annotated graph every matcher reads: trace, shapes, layouts, ancestry and scopes."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn
from torch.utils._python_dispatch import TorchDispatchMode

from . import ops
from .layout import annotate_grid_dynamics, annotate_layouts
from .shape_rules import STOOD_FOR
from .shapes import propagate_shapes, tensor_meta
from .specialise import specialising_tracer
from .trace import Assumption, ModuleCall, OpaqueModule, TraceError, TraceResult, trace

__all__ = ["FLOPS_PER_MAC", "AnnotatedGraph", "MacCounter", "annotate", "scope_of", "trace_for"]

FLOPS_PER_MAC = 2  # torch's FlopCounterMode counts each multiply-add as two operations


class MacCounter(contextlib.AbstractContextManager["MacCounter"]):
    """Multiply-adds (MACs) as timm's benchmark and fvcore report them: one per multiply-add
    of convolutions, linear layers and matmuls (elementwise operations, pooling and
    normalisation are not counted)::

        >>> with MacCounter() as counter:
        ...     model(x)
        >>> counter.total_macs()

    The counts are torch's (``torch.utils.flop_counter``'s formulas, its operators decomposed
    as its ``FlopCounterMode`` decomposes them), read in MACs; without that mode's per-module
    tracking, which costs more than the count on a small block. The formulas are imported on
    first use (``torch.utils.flop_counter`` imports Triton).
    """

    def __init__(self) -> None:
        from torch.utils.flop_counter import flop_registry

        self._mode = _CountingMode(flop_registry)

    def __enter__(self) -> MacCounter:
        self._mode.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._mode.__exit__(*exc)

    def total_macs(self) -> int:
        return self._mode.flops // FLOPS_PER_MAC

    @property
    def formulas(self) -> Mapping[Any, Callable[..., int]]:
        """The formulas counted, by operator packet (torch's registry, as it is now)."""
        return self._mode.formulas

    def counts_any(self, operators: Collection[Any]) -> bool:
        """Whether one of ``operators`` (packets, ``torch.ops.aten.mean``) has a formula here
        (torch's registry grows when a formula is registered)."""
        return any(op in self._mode.formulas for op in operators)


class _CountingMode(TorchDispatchMode):
    """Runs each operator and adds its FLOPs by torch's formula for it, if any."""

    def __init__(self, formulas: Mapping[Any, Callable[..., int]]) -> None:
        super().__init__()
        self.formulas = formulas
        self.flops = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        higher_order = isinstance(func, torch._ops.HigherOrderOperator)
        if not higher_order and func is not torch.ops.prim.device.default and _decomposes(func):
            with self:  # as FlopCounterMode: an operator that decomposes is counted by its parts
                decomposed = func.decompose(*args, **kwargs)
            if decomposed is not NotImplemented:
                return decomposed
        out = func(*args, **kwargs)
        formula = None if higher_order else self.formulas.get(func._overloadpacket)
        if formula is not None:
            self.flops += formula(*args, **kwargs, out_val=out)
        return out


_IMPLICIT = torch._C.DispatchKey.CompositeImplicitAutograd


def _decomposes(func: Any) -> bool:
    """Whether ``func.decompose`` would find a decomposition (its two branches, read without
    running it): entering the mode again to call it costs more than most operators do."""
    return _IMPLICIT in func.py_kernels or torch._C._dispatch_has_kernel_for_dispatch_key(
        func.name(), _IMPLICIT
    )


def module_stack(node: fx.Node) -> list[str]:
    """The qualified names of the modules ``node`` was traced in, outermost first (fx's
    ``nn_module_stack``, whose values are ``(path, type)`` pairs or, in older torch, paths)."""
    stack = node.meta.get("nn_module_stack") or {}
    return [value[0] if isinstance(value, tuple) else str(value) for value in stack.values()]


def scope_of(node: fx.Node) -> str:
    """Qualified name of the innermost module the node was traced in ('' for the root)."""
    if node.op == "call_module":
        return str(node.target)
    stack = module_stack(node)
    return stack[-1] if stack else ""


@dataclass
class AnnotatedGraph:
    """A traced model with per-node facts.

    ``ancestors[i]`` is a bitset (a Python int) of the indices of every node that node ``i``
    depends on; ``from_input`` the bitset of nodes that depend on the values of the model input (a
    shape query such as ``x.shape`` ends that dependence: a positional embedding built from
    the input's size is not a function of its values); ``to_output`` the bitset of nodes whose
    values the model's output depends on (:func:`reaching_output`).
    """

    root: nn.Module
    graph: fx.Graph
    input_shape: tuple[int, ...]
    nodes: list[fx.Node]
    index: dict[fx.Node, int]
    ancestors: list[int]
    from_input: int
    conv_mask: int
    module_outputs: dict[str, fx.Node] = field(default_factory=dict)
    module_inputs: dict[str, fx.Node] = field(default_factory=dict)
    opaque: tuple[OpaqueModule, ...] = ()
    assumptions: tuple[Assumption, ...] = ()  # plain values the trace fixed for this input
    calls: tuple[ModuleCall, ...] = ()  # every submodule call of the trace, in the order they ended
    to_output: int = -1  # every node, unless computed

    def reaches_output(self, node: fx.Node) -> bool:
        """Whether the model's output depends on the values ``node`` produces."""
        return bool(self.to_output >> self.index[node] & 1)

    def count_macs(self) -> int:
        """Multiply-adds of one sample (:class:`MacCounter`): a second pass over the meta
        graph, run only when a figure asks for it, where every node runs its torch kernels
        (the counter counts what they dispatch) but those a function or method shape rule
        answers for. The rules stand for operators the counter counts none of
        (:data:`~attn_inject.graph.shape_rules.STOOD_FOR`); should a formula be registered
        for one of them, they stay silent too."""
        with MacCounter() as counter:
            rules = not counter.counts_any(STOOD_FOR)
            propagate_shapes(self.root, self.graph, self.input_shape, rules=rules, counted=True)
        return counter.total_macs() // max(1, self.input_shape[0])

    def depends_on_input(self, node: fx.Node) -> bool:
        return bool(self.from_input >> self.index[node] & 1)

    def convs_between(self, start: fx.Node, end: fx.Node) -> int:
        """Convolutions on the paths from ``start`` (excluded) to ``end`` (included)."""
        inside = (self.ancestors[self.index[end]] | 1 << self.index[end]) & ~(
            self.ancestors[self.index[start]] | 1 << self.index[start]
        )
        return (inside & self.conv_mask).bit_count()

    def common_ancestor(self, a: fx.Node, b: fx.Node) -> fx.Node | None:
        """The latest node both ``a`` and ``b`` depend on (either one itself included)."""
        both = (
            (self.ancestors[self.index[a]] | 1 << self.index[a])
            & (self.ancestors[self.index[b]] | 1 << self.index[b])
            & self.from_input
        )
        return self.nodes[both.bit_length() - 1] if both else None

    def is_ancestor(self, a: fx.Node, b: fx.Node) -> bool:
        """Whether ``b`` depends on ``a``."""
        return bool(self.ancestors[self.index[b]] >> self.index[a] & 1)

    def module(self, node: fx.Node) -> nn.Module | None:
        return ops.module_of(node, self.root)

    def name_of(self, node: fx.Node) -> str:
        """The module a node's output belongs to: the outermost module whose output it is,
        else the module it was traced in, else the node's own name."""
        for path in module_stack(node):
            if self.module_outputs.get(path) is node:
                return path
        return scope_of(node) or node.name


def on_cpu() -> contextlib.AbstractContextManager[object]:
    """The CPU as default device while the analysis runs: it replays layouts on small real
    tensors, which a default device of ``meta`` (timm's tests build models in
    ``with torch.device("meta")``) would leave without values. A no-op where the CPU already
    is the default (a device context routes every torch call through Python)."""
    return contextlib.nullcontext() if torch.get_default_device().type == "cpu" else torch.device("cpu")


def annotate(model: nn.Module, input_shape: tuple[int, ...]) -> AnnotatedGraph:
    """Trace ``model`` and annotate its graph for an input of ``input_shape`` (with batch),
    whatever the default device (:func:`on_cpu`)."""
    with on_cpu(), ops.modules_known(model):
        return _annotate(model, input_shape)


def trace_for(model: nn.Module, input_shape: tuple[int, ...]) -> TraceResult:
    """fx's own trace of ``model``; where it fails or keeps submodules whole, the trace with
    the sizes the code needs as plain values specialised for ``input_shape``
    (:mod:`attn_inject.graph.specialise`), when that keeps fewer whole. A model fx traces as
    it is keeps its plain trace, valid for every input size."""
    plain: TraceResult | None = None
    failure: TraceError | None = None
    try:
        plain = trace(model)
    except TraceError as error:
        failure = error
    if plain is not None and not plain.opaque:
        return plain
    try:
        specialised = trace(model, specialising_tracer(model, input_shape))
    except TraceError as error:
        if failure is not None:
            again = str(error).partition("): ")[2] or str(error)
            raise TraceError(f"{failure}; traced again with its sizes specialised: {again}") from error
        assert plain is not None
        return plain
    if plain is None or len(specialised.opaque) < len(plain.opaque):
        return specialised
    return plain


def _annotate(model: nn.Module, input_shape: tuple[int, ...]) -> AnnotatedGraph:
    traced = trace_for(model, input_shape)
    graph = traced.graph
    propagate_shapes(model, graph, input_shape)
    annotate_layouts(model, graph)
    annotate_grid_dynamics(model, graph, input_shape)
    nodes = list(graph.nodes)
    index = {n: i for i, n in enumerate(nodes)}
    ancestors: list[int] = []
    from_input = 0
    conv_mask = 0
    module_outputs: dict[str, fx.Node] = {}
    module_inputs: dict[str, fx.Node] = {}
    for i, node in enumerate(nodes):
        bits = 0
        for parent in node.all_input_nodes:
            j = index[parent]
            bits |= ancestors[j] | 1 << j
            if from_input >> j & 1 and not ops.reads_shape_only(node):
                from_input |= 1 << i
        ancestors.append(bits)
        if node.op == "placeholder" and isinstance(tensor_meta(node), torch.Tensor):
            from_input |= 1 << i
        written = ops.written_in_place(node)
        if written is not None and from_input >> i & 1:
            # A buffer made from the input's shape and filled with its values in place
            # (``out = x.new_zeros(...); out[:, :c] = y``) carries them to its later readers.
            from_input |= 1 << index[written]
        if ops.is_conv(node, model):
            conv_mask |= 1 << i
        if node.op != "output":
            for name in module_stack(node):
                # Containers that are never called themselves (a ModuleList of blocks) end
                # where their last called member ends.
                parts = name.split(".")
                for end in range(1, len(parts) + 1):
                    prefix = ".".join(parts[:end])
                    module_outputs[prefix] = node
                    module_inputs.setdefault(prefix, node)
    return AnnotatedGraph(
        model,
        graph,
        tuple(input_shape),
        nodes,
        index,
        ancestors,
        from_input,
        conv_mask,
        module_outputs,
        module_inputs,
        opaque=traced.opaque,
        assumptions=traced.assumptions,
        calls=traced.calls,
        to_output=reaching_output(nodes, index),
    )


def reaching_output(nodes: list[fx.Node], index: dict[fx.Node, int]) -> int:
    """The bitset of the nodes whose values reach the graph's output: the output itself, a
    node one of them reads the values of (a shape query such as ``x.shape`` reads none), and a
    tensor written in place (``buf[:, :c] = y``, ``buf.copy_(y)``) into one of them. A block on
    any other node would get no gradient and change nothing the model returns (PiT's
    last-stage tokens, which its head, reading the class token, never reads)."""
    live = [False] * len(nodes)
    writes = {index[n]: index[w] for n in nodes if (w := ops.written_in_place(n)) is not None}
    while True:
        for node in reversed(nodes):
            i = index[node]
            if not live[i] and (
                node.op == "output"
                or any(live[index[u]] and not ops.reads_shape_only(u) for u in node.users)
                or (i in writes and live[writes[i]])
            ):
                live[i] = True
        if not any(live[w] and not live[i] for i, w in writes.items()):  # a write seen too early
            break
    return int("".join("1" if alive else "0" for alive in reversed(live)) or "0", 2)
