"""Quantizing a patched model: which of torch.ao's two workflows keeps the blocks.

A patched model is a float model, and it quantizes as one with torch.ao's **FX graph mode**
(``torch.ao.quantization.quantize_fx.prepare_fx`` / ``convert_fx``): the graph is traced
through the generated forwards, the blocks included, and the layers around them are
quantized while a module hosting a block runs in float between a dequantize and a quantize.

**Eager mode** (torchvision's ``quantize=False`` builders, then ``model.fuse_model()``,
``prepare`` and ``convert``) cannot: its ``fuse_model`` methods find the modules to fuse by
exact type (``type(m) is QuantizableBasicBlock``, torch.ao's fuser table keyed by
``(Conv2d, BatchNorm2d)``), so a module that now runs a block, an instance of a subclass of
its own class, is skipped or refused, and fusing a BatchNorm into its conv would drop a
block hosted there. Inserting into such a model says so once, naming the workflow that works.
"""

from __future__ import annotations

from torch import nn
from torch.ao.quantization import QuantStub

__all__ = ["EAGER_QUANTIZATION_NOTE", "eager_quantization_ready"]

EAGER_QUANTIZATION_NOTE = (
    "its fuse_model() (torch.ao eager-mode quantization) finds the modules to fuse by exact type "
    "and cannot fuse around inserted blocks: quantize the patched model with FX graph mode "
    "(torch.ao.quantization.quantize_fx.prepare_fx, then convert_fx), which keeps them"
)


def eager_quantization_ready(model: nn.Module) -> bool:
    """Whether ``model`` is built for torch.ao's eager-mode quantization: it holds a
    ``QuantStub`` and defines ``fuse_model``, as torchvision's quantizable models do."""
    return callable(getattr(model, "fuse_model", None)) and any(
        isinstance(module, QuantStub) for module in model.modules()
    )
