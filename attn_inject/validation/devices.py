"""Where validation runs: the device, both models' weights there, and cuDNN's settings."""

from __future__ import annotations

import contextlib
import copy
import platform
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from .report import ValidationError

__all__ = ["cudnn_settings", "device_name", "on_device", "resolve_device", "tensors_of", "where"]


def resolve_device(device: str | torch.device) -> torch.device:
    """``"auto"``: CUDA where there is one, else the CPU; a CUDA device asked for where there
    is none is refused."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValidationError("device 'cuda' was asked for, but CUDA is not available; use 'cpu' or 'auto'")
    return device


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def tensors_of(*models: nn.Module) -> list[torch.Tensor]:
    """Every parameter and buffer of ``models``, each once (patched models share weights)."""
    seen: dict[int, torch.Tensor] = {}
    for model in models:
        for t in [*model.parameters(), *model.buffers()]:
            seen.setdefault(id(t), t)
    return list(seen.values())


def on_device(original: nn.Module, patched: nn.Module, device: torch.device) -> tuple[nn.Module, nn.Module]:
    """Both models on ``device``: as they are when they are there already, else one copy of
    their (shared) weights, made directly on the device."""
    tensors = tensors_of(original, patched)
    if all(t.device == device for t in tensors):
        return original, patched
    need = sum(t.numel() * t.element_size() for t in tensors)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        if need > 0.8 * free:
            raise ValidationError(
                f"the model's weights take {need / 2**30:.2f} GiB and {device} has {free / 2**30:.2f} GiB "
                "free; validate with device='cpu', or free GPU memory"
            )
    memo: dict[int, Any] = {}
    for t in tensors:
        moved = t.detach().to(device)
        memo[id(t)] = nn.Parameter(moved, t.requires_grad) if isinstance(t, nn.Parameter) else moved
    return copy.deepcopy((original, patched), memo)


@contextlib.contextmanager
def cudnn_settings(**flags: bool) -> Iterator[None]:
    """``torch.backends.cudnn`` flags set for the duration, then restored; TF32 is left as it
    is, the same for both runs compared. ``benchmark=False``: autotuning may pick different
    kernels for two runs. ``deterministic=True``: the fastest backward convolutions sum with
    atomics in an order that changes from run to run."""
    before = {name: getattr(torch.backends.cudnn, name) for name in flags}
    for name, value in flags.items():
        setattr(torch.backends.cudnn, name, value)
    try:
        yield
    finally:
        for name, value in before.items():
            setattr(torch.backends.cudnn, name, value)


def where(device: torch.device, dtype: torch.dtype | str, mode: str) -> str:
    """Where a check ran, as the report prints it: ``cpu float32 eval``."""
    name = str(dtype).replace("torch.", "")
    tf32 = ""
    if device.type == "cuda" and dtype == torch.float32:
        tf32 = f", tf32 {'on' if torch.backends.cuda.matmul.allow_tf32 else 'off'}"
    return f"{device} {name} {mode}{tf32}"
