"""``validate()``: run the original and the patched model on the same random input and
report what a user needs to trust the patched one."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from .graph.trace import eval_mode
from .plan import count_params, default_input_size
from .rewrite import find_blocks

__all__ = ["ValidationError", "ValidationReport", "validate"]

IDENTITY_TOLERANCE = 1e-5  # of the output's scale, in fp32


class ValidationError(ValueError):
    """The models cannot be validated (e.g. weights on the meta device)."""


@dataclass(frozen=True)
class ValidationReport:
    """The outcome of :func:`validate`. ``passed`` is true when every check holds."""

    device: str
    input_shape: tuple[int, ...]
    init: str
    max_abs_diff: float
    output_scale: float
    relative_diff: float
    identity_expected: bool
    identity_ok: bool
    params_added: int
    params_planned: int
    params_ok: bool
    finite: bool

    @property
    def passed(self) -> bool:
        return self.finite and self.params_ok and (self.identity_ok or not self.identity_expected)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "passed": self.passed}

    def __str__(self) -> str:
        identity = (
            f"identity {'OK' if self.identity_ok else 'FAILED'}: max |patched - original| = "
            f"{self.max_abs_diff:.3g} ({self.relative_diff:.3g} of output scale {self.output_scale:.3g}, "
            f"tolerance {IDENTITY_TOLERANCE:g})"
            if self.identity_expected
            else f"init={self.init}: max |patched - original| = {self.max_abs_diff:.3g} "
            "(no identity expected)"
        )
        agreement = "matches" if self.params_ok else "DIFFERS from"
        params = f"parameters added {self.params_added:,} ({agreement} the plan's {self.params_planned:,})"
        finite = "outputs finite" if self.finite else "NON-FINITE outputs"
        verdict = "PASSED" if self.passed else "FAILED"
        return (
            f"validation on {self.device}, input {tuple(self.input_shape)}: {verdict}\n"
            f"  {identity}\n  {params}\n  {finite}"
        )


def _resolve_device(device: str | torch.device) -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValidationError("device 'cuda' was asked for, but CUDA is not available; use 'cpu' or 'auto'")
    return device


def _tensors(output: Any) -> list[torch.Tensor]:
    """Every tensor of a model's output (a tensor, or nested dicts / lists / tuples)."""
    if isinstance(output, torch.Tensor):
        return [output]
    if isinstance(output, dict):
        output = list(output.values())
    if isinstance(output, (list, tuple)):
        return [t for item in output for t in _tensors(item)]
    return []


def _outputs(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    tensors = [t.float() for t in _tensors(model(x))]
    if not tensors:
        raise ValidationError(f"{type(model).__name__} returned no tensor")
    return tensors


@torch.no_grad()
def validate(
    original: nn.Module,
    patched: nn.Module,
    *,
    input_size: Sequence[int] | None = None,
    batch: int = 2,
    device: str | torch.device = "auto",
    seed: int = 0,
) -> ValidationReport:
    """Compare ``patched`` with ``original`` in eval mode on one random batch.

    Checks that outputs are finite, that the parameters added equal the plan's, and, at
    ``init="identity"``, that max |patched(x) - original(x)| <= 1e-5 x max |original(x)|.
    Every tensor of the output is compared (a dict of feature maps too). For a plan with a
    target only that submodule changed, so the two targets are compared.
    Runs on CUDA when available (``device="auto"``); models elsewhere are copied there.
    """
    info = getattr(patched, "attn_inject", None)
    if info is None:
        raise ValidationError("the second model is not a patched model (it has no attn_inject plan)")
    if any(p.is_meta for p in patched.parameters()):
        raise ValidationError(
            "the model's weights are on the meta device; materialise them before validating"
        )
    if info.plan.target:  # only the target changed: compare it, at the plan's input size
        original = original.get_submodule(info.plan.target)
        patched = patched.get_submodule(info.plan.target)
    target = _resolve_device(device)
    model_device = next(patched.parameters()).device
    if model_device != target:
        original, patched = copy.deepcopy((original, patched))
        original.to(target)
        patched.to(target)
    size = (
        tuple(input_size)
        if input_size is not None
        else tuple(info.plan.input_size) or default_input_size(original)
    )
    dtype = next(p.dtype for p in patched.parameters() if p.is_floating_point())
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn((batch, *tuple(size)), generator=generator).to(target, dtype)
    with eval_mode(original), eval_mode(patched):
        references = _outputs(original, x)
        outputs = _outputs(patched, x)
    same_shapes = [r.shape for r in references] == [o.shape for o in outputs]
    max_abs = (
        max(float((o - r).abs().max()) for o, r in zip(outputs, references, strict=True))
        if same_shapes
        else float("inf")
    )
    scale = max(float(r.abs().max()) for r in references)
    relative = max_abs / scale if scale > 0 else max_abs
    added = count_params(patched) - count_params(original)
    # Identity holds while every blend is still 0 (at insertion; not after training).
    blends = [
        [p for name, p in block.named_parameters() if name.endswith("blend")]
        for block in find_blocks(patched).values()
    ]
    identity_expected = all(b and all(float(p.abs().max()) == 0 for p in b) for b in blends)
    return ValidationReport(
        device=str(target) if target.type != "cuda" else f"cuda ({torch.cuda.get_device_name(target)})",
        input_shape=(batch, *tuple(size)),
        init=info.plan.init,
        max_abs_diff=max_abs,
        output_scale=scale,
        relative_diff=relative,
        identity_expected=identity_expected,
        identity_ok=relative <= IDENTITY_TOLERANCE,
        params_added=added,
        params_planned=info.plan.params_added,
        params_ok=added == info.plan.params_added,
        finite=all(bool(torch.isfinite(o).all()) for o in outputs),
    )
