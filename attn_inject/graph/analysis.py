"""The annotated graph every matcher reads: trace, shapes, layouts, ancestry and scopes."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import fx, nn
from torch.utils.flop_counter import FlopCounterMode

from . import ops
from .layout import annotate_grid_dynamics, annotate_layouts
from .shapes import propagate_shapes, tensor_meta
from .trace import ModuleCall, OpaqueModule, trace

__all__ = ["AnnotatedGraph", "annotate", "scope_of"]


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
    the input's size is not a function of its values).
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
    calls: tuple[ModuleCall, ...] = ()  # every submodule call of the trace, in the order they ended

    def count_flops(self) -> int:
        """FLOPs of one sample (the multiply-adds of convolutions, linear layers and matmuls,
        x2): a second pass over the meta graph, run only when a figure asks for it."""
        with FlopCounterMode(display=False) as counter:
            propagate_shapes(self.root, self.graph, self.input_shape)
        return counter.get_total_flops() // max(1, self.input_shape[0])

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


def annotate(model: nn.Module, input_shape: tuple[int, ...]) -> AnnotatedGraph:
    """Trace ``model`` and annotate its graph for an input of ``input_shape`` (with batch)."""
    traced = trace(model)
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
        calls=traced.calls,
    )
