"""The attribute that marks a module as an inserted attention block."""

from __future__ import annotations

from torch import nn

__all__ = ["BLOCK_FLAG", "is_inserted_block"]

BLOCK_FLAG = "_attn_inject_block"  # set on every inserted block: a leaf to later traces


def is_inserted_block(module: nn.Module) -> bool:
    """Whether ``module`` carries :data:`BLOCK_FLAG`, or forwards it from a module it wraps
    through a ``__getattr__`` of its own (torch.compile's ``OptimizedModule``). The instance's
    attributes (where ``setattr`` puts the flag) and its class are read first: a tracer asks
    this of every module it calls, and ``nn.Module.__getattr__`` answers a miss by raising."""
    cls = type(module)
    if module.__dict__.get(BLOCK_FLAG, False) or getattr(cls, BLOCK_FLAG, False):
        return True
    if cls.__getattr__ is nn.Module.__getattr__:  # finds parameters, buffers and submodules only
        return False
    return bool(getattr(module, BLOCK_FLAG, False))
