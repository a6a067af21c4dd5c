"""The layout of what a kept-whole module returns, read from inside it.

A module fx cannot trace (its code branches on its input's rank or size, as NaFlex's patch
embedding does, which timm registers as not traceable) stays one ``call_module`` node, and
the layout of its output would be unknown. Here that module alone is traced once more with
every proxy carrying the meta tensor of its value, as Hugging Face's ``HFTracer`` does:
ranks, shapes and sizes are plain numbers, so each branch on them goes the way this input
goes. That graph holds for these shapes only, so it is read for layouts and never used to
rewrite: the module stays whole, with no block inside it.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import fx, nn

from .shapes import MetaInterpreter, all_meta, tensor_meta
from .trace import ModelProxy, ModelTracer, mode, thread_in_place, timm_notrace, tracing_guards

__all__ = ["ShapedTracer", "trace_at"]

try:  # fx's patches of Module.__call__ / __getattr__ set aside while a node is evaluated
    from torch.fx._symbolic_trace import _maybe_revert_all_patches as _patches_reverted
except ImportError:  # pragma: no cover - an older torch: evaluation then fails, the module stays unread
    _patches_reverted = contextlib.nullcontext  # type: ignore[assignment]

# Read from a proxy's meta tensor, so code can branch on them.
CONCRETE_ATTRIBUTES = frozenset({"shape", "ndim", "dtype", "device", "is_cuda", "is_meta"})
CONCRETE_METHODS = frozenset({"dim", "size", "numel", "ndimension", "is_floating_point", "is_complex"})


class ShapedProxy(ModelProxy):
    """A proxy whose shape, rank, dtype and device are those of its meta tensor."""

    def __getattr__(self, name: str) -> Any:
        value = self.node.meta.get("val")
        if isinstance(value, torch.Tensor) and name in CONCRETE_ATTRIBUTES | CONCRETE_METHODS:
            return getattr(value, name)
        return super().__getattr__(name)

    def __len__(self) -> int:
        value = self.node.meta.get("val")
        if isinstance(value, (torch.Tensor, tuple, list)):
            return len(value)
        raise RuntimeError(f"len() of {self.node.name}, whose value is not known")

    def __iter__(self):
        value = self.node.meta.get("val")
        if isinstance(value, (tuple, list, torch.Tensor)):
            items: Any = self  # fx adds __getitem__ at run time
            return iter([items[i] for i in range(len(value))])
        return super().__iter__()


# Code that never calls a module or a function fx patched: torch's operators, on tensors.
TORCH_FUNCTION_MODULES = frozenset(
    {
        "torch",
        "torch.functional",
        "torch.nn.functional",
        "torch._C._nn",
        "torch._C._VariableFunctions",
        "_operator",
    }
)
_UNPATCHED = contextlib.nullcontext()


def _may_call_modules(kind: str, target: Any, values: tuple[Any, Any]) -> bool:
    """Whether evaluating a node may run code that calls a module or a function fx has
    patched for the trace, which must then be set aside (they would record nodes): a module,
    an attribute fetch, or any function but torch's operators and a tensor's own methods.
    Setting the patches aside costs two writes per patched function, for every node."""
    if kind == "call_method":
        args = values[0]
        return not (args and isinstance(args[0], torch.Tensor))
    if kind == "call_function":
        if isinstance(target, torch._ops.OpOverload | torch._ops.OpOverloadPacket):
            return False
        return getattr(target, "__module__", None) not in TORCH_FUNCTION_MODULES
    return True


class ShapedTracer(ModelTracer):
    """Traces one module for given inputs, evaluating every node on meta tensors as it is
    created; its leaves are the model trace's (:class:`ModelTracer`)."""

    def __init__(
        self, root: nn.Module, leaf_types: tuple[type, ...], functions: tuple[Callable, ...]
    ) -> None:
        super().__init__(leaf_types, functions)
        self.root_module = root
        self.inputs: dict[str, Any] = {}  # tensor arguments by name
        self.concrete: dict[str, Any] = {}  # the other arguments by name, fixed in the trace
        self.evaluator: MetaInterpreter | None = None

    def proxy(self, node: fx.Node) -> fx.Proxy:
        return ShapedProxy(node, self)

    def create_proxy(self, kind, target, args, kwargs, name=None, type_expr=None, proxy_factory_fn=None):
        proxy = super().create_proxy(kind, target, args, kwargs, name, type_expr, proxy_factory_fn)
        node = proxy.node
        if kind == "placeholder":
            node.meta["val"] = self._placeholder_value(str(target))
        elif kind in ("call_function", "call_method", "call_module", "get_attr"):
            if self.evaluator is None:
                self.evaluator = MetaInterpreter(self.root_module, graph=self.graph, fixed_modules=False)
            evaluator = self.evaluator
            values = fx.node.map_arg((node.args, node.kwargs), self._value)
            with _patches_reverted() if _may_call_modules(kind, node.target, values) else _UNPATCHED:
                node.meta["val"] = all_meta(getattr(evaluator, kind)(node.target, *values))
        return proxy

    def _placeholder_value(self, target: str) -> Any:
        """A tensor argument's meta tensor; for a fixed argument, fx's placeholder
        ``name_k`` stands for the k-th leaf of its value (checked by an assert in the graph)."""
        if target in self.inputs:
            return self.inputs[target]
        name, _, count = target.rpartition("_")
        if name in self.concrete and count.isdigit():
            leaves = pytree.tree_leaves(self.concrete[name])
            index = int(count) - 1
            return leaves[index] if 0 <= index < len(leaves) else None
        return None

    def _value(self, node: fx.Node) -> Any:
        """A node's value; for a tensor constant fx stored on the module itself, that tensor."""
        if "val" not in node.meta and node.op == "get_attr" and self.evaluator is not None:
            node.meta["val"] = all_meta(self.evaluator.fetch_attr(str(node.target)))
        return node.meta.get("val")


def _copy(value: torch.Tensor) -> torch.Tensor:
    """A meta tensor like ``value``: the module read may change its input in place."""
    return torch.empty_strided(value.shape, value.stride(), dtype=value.dtype, device="meta")


def trace_at(
    module: nn.Module, args: Sequence[Any], kwargs: dict[str, Any], training: bool = False
) -> fx.Graph | None:
    """``module``'s graph for these arguments (meta tensors and plain values), in eval or
    ``training`` mode, with each node's value in ``meta["val"]``; None where it cannot be
    traced even so."""
    try:
        bound = inspect.signature(module.forward).bind(*args, **kwargs)
    except (TypeError, ValueError):
        return None
    bound.apply_defaults()
    tensors = {k: _copy(v) for k, v in bound.arguments.items() if isinstance(v, torch.Tensor)}
    concrete = {k: v for k, v in bound.arguments.items() if k not in tensors}
    plain = (type(None), bool, int, float, str, torch.dtype, torch.device)
    if not all(isinstance(leaf, plain) for leaf in pytree.tree_leaves(concrete)):
        return None  # tensors in containers, modules, graph values: not fixed here
    leaf_types, functions = timm_notrace()
    tracer = ShapedTracer(module, leaf_types, functions)
    tracer.inputs, tracer.concrete = tensors, concrete
    try:
        with tracing_guards(module), mode(module, training), torch.no_grad():
            graph = tracer.trace(module, concrete_args=concrete or None)
    except Exception:  # fx and the meta kernels raise many kinds: the module stays unread
        return None
    thread_in_place(graph)
    for node in graph.nodes:
        if node.op == "placeholder" and tensor_meta(node) is None and str(node.target) in tensors:
            return None
    return graph
