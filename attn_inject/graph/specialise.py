"""Sizes the meta pass knows, specialised where a model's code needs a plain value.

Plain fx cannot iterate ``x.chunk(2, 1)`` (Ultralytics' C2f), call ``int(x.shape[-2])``
(Hugging Face's TensorFlow-style padding), or branch on ``x.dim() == 4`` or
``x.dtype != w.dtype`` (segmentation-models-pytorch's input check, transformers' ViT). When
the plain trace fails on such code, the model is traced again with every node evaluated on
meta tensors for the planned input, as Hugging Face's ``HFTracer`` does. Sizes and ranks
stay graph values; only where the code needs a plain ``bool``, ``int`` or length, or
iterates, is the meta value used, and that assumption is written into the graph as
``torch._assert(value == expected, ...)``: a rewritten forward checks it at every call, as
it checks the arguments the trace fixed, and says which input it was rewritten for.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Iterator
from typing import Any, cast

import torch
from torch import fx, nn

from ..core.messages import cut
from .inside import ShapedTracer
from .shapes import model_dtype
from .trace import Assumption, ModelAttribute, ModelProxy, ModelTracer, TracerFactory

__all__ = ["SpecialisingTracer", "specialising_tracer"]

# Plain values a meta pass knows exactly, and so may stand for a traced one.
KNOWN = (bool, int, float, torch.dtype, torch.device, str, type(None))


class SpecialisedValue:
    """What a traced value does when the code needs a plain one (see the module docstring)."""

    def __len__(self) -> int:
        return _tracer(self).length(_proxy(self))

    def __int__(self) -> int:
        return _tracer(self).number(_proxy(self), int)

    def __index__(self) -> int:
        return _tracer(self).number(_proxy(self), int)

    def __float__(self) -> float:
        return _tracer(self).number(_proxy(self), float)


def _tracer(value: Any) -> SpecialisingTracer:
    return cast(SpecialisingTracer, value.tracer)


def _proxy(value: SpecialisedValue) -> fx.Proxy:
    return cast(fx.Proxy, value)


class SpecialisedProxy(SpecialisedValue, ModelProxy):
    def __getattr__(self, name: str) -> ModelAttribute:
        return SpecialisedAttribute(self, name)


class SpecialisedAttribute(SpecialisedValue, ModelAttribute):
    pass


class SpecialisingTracer(ShapedTracer):
    """Traces the whole model for one input, every node evaluated on meta tensors; a value
    the code needs as a plain one is read from its meta value and checked in the graph."""

    def __init__(
        self,
        root: nn.Module,
        leaf_types: tuple[type, ...],
        functions: tuple[Callable, ...],
        opaque: frozenset[str],
        concrete: dict[str, Any],
        input_value: torch.Tensor,
    ) -> None:
        super().__init__(root, leaf_types, functions)
        self.opaque = opaque
        self.concrete = concrete
        self.input_value = input_value

    def _placeholder_value(self, target: str) -> Any:
        """The first placeholder that is not a fixed argument is the model's input."""
        name, _, count = target.rpartition("_")
        fixed = target in self.concrete or (name in self.concrete and count.isdigit())
        if not fixed and not self.inputs:
            self.inputs = {target: self.input_value}
        return super()._placeholder_value(target)

    def proxy(self, node: fx.Node) -> fx.Proxy:
        return SpecialisedProxy(node, self)

    def to_bool(self, obj: fx.Proxy) -> bool:
        value = self._known(obj, "bool")
        return bool(self._assume(obj, "bool", bool(value)))

    def iter(self, obj: fx.Proxy) -> Iterator:
        count = self.length(obj)
        items: Any = obj  # fx adds __getitem__ at run time
        return iter([items[i] for i in range(count)])

    def length(self, obj: fx.Proxy) -> int:
        value = self._value(obj.node)
        if not isinstance(value, (tuple, list, torch.Tensor, torch.Size)):
            raise fx.proxy.TraceError(f"len() of {obj.node.name}, whose value the meta pass does not give")
        size = self.create_proxy("call_function", len, (obj,), {})
        return int(self._assume(size, "len", len(value)))

    def number(self, obj: fx.Proxy, kind: type) -> Any:
        value = self._known(obj, kind.__name__)
        if not isinstance(value, (bool, int, float)):
            raise fx.proxy.TraceError(
                f"{kind.__name__}() of {obj.node.name}, which is {type(value).__name__}"
            )
        return self._assume(obj, kind.__name__, kind(value))

    def _known(self, obj: fx.Proxy, use: str) -> Any:
        value = obj.node.meta.get("val")
        if not isinstance(value, KNOWN):  # a tensor's values: meta tensors have none
            raise fx.proxy.TraceError(
                "symbolically traced variables cannot be used as inputs to control flow "
                f"({use}() of {obj.node.name}, a {type(value).__name__} "
                "whose value the meta pass does not give)"
            )
        return value

    def _assume(self, obj: fx.Proxy, use: str, value: Any) -> Any:
        """Record that ``obj`` is ``value`` and check it in the graph at every call."""
        module = next(reversed(self.module_stack), "") if self.module_stack else ""
        assumption = Assumption(module, use, obj.node.name, value)
        self.assumptions.append(assumption)
        same = self.create_proxy("call_function", operator.eq, (obj, value), {})
        message = cut(
            f"this forward was rewritten for an input where {assumption}; call it with an input of the "
            "size it was planned for, or inject again for this size",
            400,
        )
        self.create_proxy("call_function", torch._assert, (same, message), {})
        return value


def specialising_tracer(root: nn.Module, input_shape: tuple[int, ...]) -> TracerFactory:
    """A tracer factory for :func:`attn_inject.graph.trace.trace`: the model traced for an
    input of ``input_shape`` (with batch), on meta tensors, in the model's dtype."""
    value = torch.empty(input_shape, dtype=model_dtype(root), device="meta")

    def make(
        leaf_types: tuple[type, ...],
        functions: tuple[Callable, ...],
        opaque: frozenset[str],
        concrete: dict[str, Any],
    ) -> ModelTracer:
        return SpecialisingTracer(root, leaf_types, functions, opaque, concrete, value)

    return make
