"""Shape propagation on the meta device: no real forward pass, no activation memory.

Each node's output is computed on ``meta`` tensors and stored in ``node.meta["val"]`` (as
torch.fx's FakeTensorProp does). Leaf modules run with meta copies of their weights, so a
model whose weights are real, on the GPU, or already on the meta device all work the same
and nothing of the model changes. Modules that keep their input's shape (norms,
activations, dropout) are not run at all: their output is their input's meta tensor; the
commonest convolutions, linear layers, activations, arithmetic, means and layer norms get
their output from their inputs' sizes (:mod:`attn_inject.graph.shape_rules`), where torch's
meta kernels are Python decompositions.
"""

from __future__ import annotations

from typing import Any, overload

import torch
import torch.nn.functional as F
from torch import fx, nn

from ..core.errors import AttnInjectError
from ..core.messages import cut, error_line
from .shape_rules import CONV_CLASSES, function_shape, method_shape, module_shape
from .trace import FX_CONSTANT, caches_kept, eval_mode, writes_undone

__all__ = ["MetaInterpreter", "ShapeError", "all_meta", "propagate_shapes", "tensor_meta"]

SHAPE_PRESERVING = (
    nn.modules.batchnorm._NormBase,
    nn.GroupNorm,
    nn.LayerNorm,
    nn.LocalResponseNorm,
    nn.Identity,
    nn.ReLU,
    nn.ReLU6,
    nn.SiLU,
    nn.GELU,
    nn.Hardswish,
    nn.Hardsigmoid,
    nn.Sigmoid,
    nn.Tanh,
    nn.LeakyReLU,
    nn.ELU,
    nn.Mish,
    nn.PReLU,
    nn.modules.dropout._DropoutNd,
)


class ShapeError(AttnInjectError, RuntimeError):
    """A node could not be evaluated on meta tensors."""

    def __str__(self) -> str:  # fx appends the node's code and a traceback hint: one line is enough
        return str(self.args[0]).split("\n")[0] if self.args else ""


def tensor_meta(node: fx.Node) -> torch.Tensor | None:
    """The meta tensor a node produces, or ``None`` if it produces something else."""
    value = node.meta.get("val")
    return value if isinstance(value, torch.Tensor) else None


class MetaInterpreter(fx.Interpreter):
    """Runs a graph on meta tensors; modules that read tensor values run on zeros. Modules
    are found in the table made when it starts unless ``fixed_modules`` is off (a trace
    running beside it may replace one). With ``rules`` off no shape rule answers: every
    node runs its torch kernels, but modules that keep their input's shape
    (``SHAPE_PRESERVING``: norms, activations, dropout), which return it as it is. A
    ``counted`` run (a :class:`~attn_inject.graph.analysis.MacCounter` counts what the
    kernels dispatch) runs torch's convolutions and linear layers through their kernels,
    which the counter counts; the function and method rules stand for operators it counts
    none of (activations, arithmetic, means, layer norms, rolls), and still answer."""

    def __init__(
        self,
        module: nn.Module,
        graph: fx.Graph | None = None,
        rules: bool = True,
        fixed_modules: bool = True,
        counted: bool = False,
    ) -> None:
        super().__init__(module, graph=graph)
        self.rules = rules
        self.module_rules = rules and not counted
        self.fixed_modules = fixed_modules  # False: a trace running beside it may change them
        # fx's constants, which the input model no longer holds once a plan is made
        self.fx_constants = {n.target: n.meta[FX_CONSTANT] for n in self.graph.nodes if FX_CONSTANT in n.meta}

    def run_node(self, n: fx.Node) -> Any:
        """fx's ``run_node`` without its bookkeeping for tracers (a context naming the current
        node, which only ``make_fx`` reads, and a debug log line): it was half the time of a
        node whose shape a rule gives."""
        try:
            args, kwargs = self.fetch_args_kwargs_from_env(n)
            result = getattr(self, n.op)(n.target, args, kwargs)
        except Exception as error:
            first = cut((str(error).strip().splitlines() or [""])[0], 300).rstrip(".")
            raise ShapeError(
                f"shape propagation failed at node {n.name!r} ({n.op} {n.target}): "
                f"{type(error).__name__}: {first}. "
                "If the model takes another input size or "
                "channel count, pass it: input_size=(C, H, W) (CLI: --input-size C H W)"
            ) from error
        # Tensors a model creates itself (torch.zeros(shape) with no device, a buffer's
        # device read at trace time) join the meta tensors here.
        result = all_meta(result)
        n.meta["val"] = result
        return result

    def call_function(self, target, args, kwargs):
        known = function_shape(target, args, kwargs) if self.rules else None
        if known is not None:
            return known
        # fx hands functions immutable containers; wrapped model functions may edit theirs.
        return super().call_function(target, _mutable(args), _mutable(kwargs))

    def call_method(self, target, args, kwargs):
        known = method_shape(target, args, kwargs) if self.rules else None
        if known is not None:
            return known
        if target in _DEVICE_MOVES and args and isinstance(args[0], torch.Tensor) and args[0].is_meta:
            args, kwargs = _kept_on_meta(target, args, kwargs)
        return super().call_method(target, args, kwargs)

    def get_attr(self, target, args, kwargs):
        value = self.fx_constants.get(target)
        if value is None:
            value = super().get_attr(target, args, kwargs)
        if isinstance(value, torch.Tensor) and value.device.type != "meta":
            value = value.to("meta")
        return value

    def call_module(self, target, args, kwargs):
        # The interpreter's table of submodules by name, made once, instead of a walk along
        # the dotted name through nn.Module's __getattr__ at every call.
        module = self.submodules.get(target) if self.fixed_modules else None
        if module is None:
            module = self.fetch_attr(target)
        single = len(args) == 1 and not kwargs and isinstance(args[0], torch.Tensor)
        if single and isinstance(module, SHAPE_PRESERVING):
            return args[0]
        known = module_shape(module, args, kwargs) if self.module_rules else None
        if known is not None:
            return known
        forward = type(module).forward
        if single and forward in CONV_CLASSES:
            return module._conv_forward(args[0], _meta(module.weight), _meta(module.bias))
        if single and forward is nn.Linear.forward:
            return F.linear(args[0], _meta(module.weight), _meta(module.bias))
        try:
            # meta inputs through the module's own weights give meta outputs; its buffers are
            # the model's, so a write into one (a call counter) is undone
            with writes_undone(module.buffers()):
                return module(*args, **kwargs)
        except Exception as error:
            return _run_real(module, target, args, kwargs, error)


def _run_real(module: nn.Module, name: str, args: tuple, kwargs: dict, error: Exception) -> Any:
    """Run a module meta tensors cannot (its forward reads tensor values: ``.item()``,
    ``if x.any()``) on zeros with its real weights, and return its output as meta tensors."""
    tensors = list(module.parameters()) + list(module.buffers())
    if any(t.is_meta for t in tensors):
        raise ShapeError(
            f"module {name!r} reads tensor values, which meta tensors do not have, and its weights are "
            "on the meta device; build the model on the CPU to plan it "
            f"({error_line(error)})"
        ) from error
    device = tensors[0].device if tensors else torch.device("cpu")

    def real(value: Any) -> Any:
        if isinstance(value, torch.Tensor) and value.is_meta:
            return torch.zeros(value.shape, dtype=value.dtype, device=device)
        return value

    with writes_undone(module.buffers()):  # its buffers are the model's: a write into them is undone
        output = module(*fx.node.map_aggregate(args, real), **fx.node.map_aggregate(kwargs, real))
    return fx.node.map_aggregate(output, lambda v: _meta(v) if isinstance(v, torch.Tensor) else v)


# Methods that move a tensor to a device: a device the trace read off a real tensor (a
# buffer's, ``x.to(device=self.freqs.device)``) is a constant of the graph, and a meta tensor
# cannot be copied there; the meta pass keeps it on the meta device, every other argument
# (a dtype) as given.
_DEVICE_MOVES = frozenset({"to", "cpu", "cuda"})


def _kept_on_meta(target: str, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    if target != "to":
        return args[:1], {}  # .cpu() / .cuda(): the meta tensor itself

    def meta_device(value: Any) -> Any:
        if isinstance(value, torch.device) or (isinstance(value, str) and value != "meta"):
            return torch.device("meta")
        return value

    return (args[0], *map(meta_device, args[1:])), {
        key: meta_device(value) if key == "device" else value for key, value in kwargs.items()
    }


def all_meta(value: Any) -> Any:
    """``value`` with every tensor in it (in tuples, lists, dicts) on the meta device."""
    if isinstance(value, torch.Tensor):
        return _meta(value)
    if isinstance(value, tuple) and not hasattr(value, "_fields"):
        return tuple(all_meta(v) for v in value)
    if type(value) is list:
        return [all_meta(v) for v in value]
    if type(value) is dict:
        return {k: all_meta(v) for k, v in value.items()}
    return value


def _mutable(value: Any) -> Any:
    if isinstance(value, tuple):
        return tuple(_mutable(v) for v in value)
    if isinstance(value, list):
        return [_mutable(v) for v in value]
    if isinstance(value, dict):
        return {k: _mutable(v) for k, v in value.items()}
    return value


@overload
def _meta(t: torch.Tensor) -> torch.Tensor: ...
@overload
def _meta(t: None) -> None: ...
def _meta(t: torch.Tensor | None) -> torch.Tensor | None:
    if t is None or t.is_meta:
        return t
    return torch.empty_like(t, device="meta")


def model_dtype(module: nn.Module) -> torch.dtype:
    for p in module.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def propagate_shapes(
    model: nn.Module, graph: fx.Graph, input_shape: tuple[int, ...], rules: bool = True, counted: bool = False
) -> None:
    """Annotate every node of ``graph`` (traced from ``model``) with ``meta["val"]``; with
    ``rules`` off, without shape rules; ``counted``: for a multiply-add count
    (:class:`MetaInterpreter`)."""
    x = torch.empty(input_shape, dtype=model_dtype(model), device="meta")
    modules = list(model.modules())
    with eval_mode(model, modules), caches_kept(model, modules), torch.no_grad():
        MetaInterpreter(model, graph=graph, rules=rules, counted=counted).run(x)
