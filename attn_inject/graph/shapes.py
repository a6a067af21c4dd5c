"""Shape propagation on the meta device: no real forward pass, no activation memory.

Each node's output is computed on ``meta`` tensors and stored in ``node.meta["val"]`` (as
torch.fx's FakeTensorProp does). Parameters and buffers are swapped for meta tensors for the
duration, so a model whose weights are real, on the GPU, or already on the meta device all
work the same. Modules that keep their input's shape (norms, activations, dropout) are not
run at all: their output is their input's meta tensor.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import fx, nn
from torch.func import functional_call

from .trace import eval_mode

__all__ = ["ShapeError", "propagate_shapes", "tensor_meta"]

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


class ShapeError(RuntimeError):
    """A node could not be evaluated on meta tensors."""


def tensor_meta(node: fx.Node) -> torch.Tensor | None:
    """The meta tensor a node produces, or ``None`` if it produces something else."""
    value = node.meta.get("val")
    return value if isinstance(value, torch.Tensor) else None


class _MetaInterpreter(fx.Interpreter):
    def run_node(self, n: fx.Node) -> Any:
        try:
            result = super().run_node(n)
        except Exception as error:
            raise ShapeError(
                f"shape propagation failed at node {n.name!r} ({n.op} {n.target}): {type(error).__name__}: {error}"
            ) from error
        n.meta["val"] = result
        return result

    def get_attr(self, target, args, kwargs):
        value = super().get_attr(target, args, kwargs)
        if isinstance(value, torch.Tensor) and value.device.type != "meta":
            value = value.to("meta")
        return value

    def call_module(self, target, args, kwargs):
        module = self.fetch_attr(target)
        if (
            isinstance(module, SHAPE_PRESERVING)
            and len(args) == 1
            and not kwargs
            and isinstance(args[0], torch.Tensor)
        ):
            return args[0]
        return super().call_module(target, args, kwargs)


class _Runner(nn.Module):
    """Holds the graph module so functional_call can swap every weight for a meta tensor."""

    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__()
        self.gm = gm

    def forward(self, *inputs: torch.Tensor) -> Any:
        return _MetaInterpreter(self.gm).run(*inputs)


def model_dtype(module: nn.Module) -> torch.dtype:
    for p in module.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def propagate_shapes(gm: fx.GraphModule, input_shape: tuple[int, ...]) -> None:
    """Annotate every node of ``gm`` with ``meta["val"]`` for an input of ``input_shape``."""
    runner = _Runner(gm)
    meta_state = {
        name: torch.empty_like(t, device="meta")
        for name, t in list(runner.named_parameters(remove_duplicate=False))
        + list(runner.named_buffers(remove_duplicate=False))
    }
    x = torch.empty(input_shape, dtype=model_dtype(gm), device="meta")
    with eval_mode(gm), torch.no_grad():
        functional_call(runner, meta_state, (x,), tie_weights=False, strict=False)
