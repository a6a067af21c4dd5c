"""Tracing a model into a torch.fx graph.

Leaves (modules kept whole as ``call_module``) are torch.nn's own, timm's registered
non-traceable modules, the package's attention blocks (so a patched model can be patched
again), and small modules whose forward depends on ``self.training`` (DropPath,
StochasticDepth): traced through, their train-time behaviour would be frozen to the mode at
trace time. Functions timm registers as non-traceable are wrapped whole.
"""
from __future__ import annotations

import contextlib
import inspect
from typing import Callable, Iterator

import torch
from torch import fx, nn

__all__ = ["TraceError", "ModelTracer", "eval_mode", "trace"]


class TraceError(RuntimeError):
    """torch.fx could not trace the model."""


def _timm_notrace() -> tuple[tuple[type, ...], tuple[Callable, ...]]:
    try:
        import timm.models  # noqa: F401  (registers every model's non-traceable modules)
        from timm.layers import get_notrace_functions, get_notrace_modules
    except ImportError:
        return (), ()
    functions = tuple(f for f in get_notrace_functions() if callable(f))
    return tuple(get_notrace_modules()), functions


_TRAINING_DEPENDENT: dict[type, bool] = {}


def depends_on_training(module: nn.Module) -> bool:
    """A module without parametrised children whose forward reads ``self.training``."""
    cls = type(module)
    if cls not in _TRAINING_DEPENDENT:
        try:
            source = inspect.getsource(cls.forward)
        except (OSError, TypeError):
            source = ""
        _TRAINING_DEPENDENT[cls] = "self.training" in source
    if not _TRAINING_DEPENDENT[cls]:
        return False
    return not any(True for child in module.children() for _ in child.parameters())


class ModelTracer(fx.Tracer):
    """An fx tracer with timm's leaves, attention blocks and train-dependent modules as leaves."""

    def __init__(self, leaf_types: tuple[type, ...] = (), autowrap_functions: tuple[Callable, ...] = ()) -> None:
        super().__init__(autowrap_functions=autowrap_functions)
        from ..blocks import CBAM, EfficientChannelAttention, SqueezeExcite

        self.leaf_types = tuple(leaf_types) + (SqueezeExcite, EfficientChannelAttention, CBAM)

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if isinstance(m, self.leaf_types) or getattr(m, "_attn_inject_block", False):
            return True
        if isinstance(m, nn.Sequential):
            return False
        if super().is_leaf_module(m, module_qualified_name):
            return True
        return depends_on_training(m)


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put every module in eval mode for the duration, then restore each module's own flag."""
    flags = [(m, m.training) for m in model.modules()]
    for m, _ in flags:
        m.__dict__["training"] = False  # the flag only: cheaper than Module.__setattr__
    try:
        yield model
    finally:
        for m, flag in flags:
            m.__dict__["training"] = flag


def is_timm_model(model: nn.Module) -> bool:
    return type(model).__module__.startswith("timm.")


def trace(model: nn.Module) -> fx.Graph:
    """Trace ``model`` in eval mode; node targets name the model's own submodules."""
    leaf_types: tuple[type, ...] = ()
    functions: tuple[Callable, ...] = ()
    if is_timm_model(model) or isinstance(model, fx.GraphModule):
        leaf_types, functions = _timm_notrace()
    tracer = ModelTracer(leaf_types, functions)
    with eval_mode(model):
        try:
            graph = tracer.trace(model)
        except Exception as error:  # fx raises many kinds: TraceError, TypeError, RuntimeError...
            raise TraceError(
                f"torch.fx cannot trace {type(model).__name__}: {type(error).__name__}: {error}"
            ) from error
    return graph
