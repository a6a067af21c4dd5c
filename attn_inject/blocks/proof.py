"""The proof each block gives at insertion, before it joins the model.

``inject`` builds every block, then runs it once, in eval mode and without gradients, on a
random tensor of its point's shape and layout at batch 1 (drawn from a private
``torch.Generator``: the global random state is not touched). The block is refused, with
one line naming it and its kind, when it

- raises, returns something other than one tensor, or changes its input's shape or dtype;
- at ``init="identity"``, returns anything but its input bit for bit (``torch.equal``):
  the patched model then computes exactly what the original did;
- is not deterministic in eval mode: run twice on the same input under two different global
  random states (restored after), with every blend at 1 so that a blend of 0 does not hide
  the block, its outputs differ.

On the meta device only the shape and dtype are checked (there are no values to compare).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from ..core.errors import AttnInjectError
from ..core.messages import error_line, shown
from ..core.randomness import cuda_devices, seed_torch
from ..graph.trace import eval_mode
from .gate import blend_parameters, blends_at_one
from .wrapped import Blended

__all__ = ["BlockProofError", "block_name", "prove_block", "run_block"]

PROBE_SEED = 0  # the private generator's seed: the same probe for every injection


class BlockProofError(AttnInjectError, ValueError):
    """A block that fails its proof at insertion (see the module's docstring)."""


def prove_block(
    block: nn.Module,
    key: str,
    kind: str,
    shape: tuple[int, ...],
    init: str,
    device: torch.device,
    dtype: torch.dtype,
) -> None:
    """Raise :class:`BlockProofError` unless ``block`` (at ``key``, of ``kind``, for a point
    of ``shape`` without its batch) passes the proof at ``init``."""
    name = block_name(key, kind)
    probe = torch.randn((1, *shape), generator=torch.Generator().manual_seed(PROBE_SEED))
    probe = probe.to(device, dtype)
    out = run_block(block, probe, name)
    if device.type == "meta":
        return
    if init == "identity" and not torch.equal(out, probe):
        diff = float((out.float() - probe.float()).abs().max())
        raise BlockProofError(
            f"{name} does not compute its input at init='identity' (max |out - in| = {diff:.3g}); "
            "a factory with an explicit 'init' parameter must be function-preserving there "
            "(one without is blended with its input)"
        )
    cuda = cuda_devices(device)
    with blends_at_one(blend_parameters(block)), torch.random.fork_rng(devices=cuda):
        seed_torch(1, cuda)
        first = run_block(block, probe, name)
        seed_torch(2, cuda)
        second = run_block(block, probe, name)
    if not torch.allclose(first, second, rtol=0.0, atol=0.0, equal_nan=True):
        diff = float((first.float() - second.float()).abs().nan_to_num().max())
        raise BlockProofError(
            f"{name} is not deterministic in eval mode: two runs on the same input differ by up to "
            f"{diff:.3g}; a block must give one output for one input (randomness only in train mode)"
        )


def block_name(key: str, kind: str) -> str:
    """How an error names a block: ``block 'layer1.0.se' (kind 'se')``."""
    return f"block {shown(key)} (kind {shown(kind)})"


def run_block(block: nn.Module, probe: torch.Tensor, name: str) -> torch.Tensor:
    """``block(probe)`` in eval mode without gradients, or a :class:`BlockProofError` naming
    the block (``name``, see :func:`block_name`) when it raises, returns no tensor or
    changes the shape or dtype; a blended user's block (:class:`Blended`) must keep the
    shape of what it is given too (the blend would broadcast it)."""
    where = _described(probe)
    try:
        with eval_mode(block), torch.no_grad(), _inner_checked(block, name):
            out = block(probe)
    except BlockProofError:
        raise
    except Exception as error:  # a user's block: any failure is refused by name
        raise BlockProofError(f"{name} fails on a {where} input: {error_line(error)}") from None
    _check_output(out, probe, name)
    return out


def _check_output(out: object, given: torch.Tensor, name: str, dtype: bool = True) -> None:
    where = _described(given)
    if not isinstance(out, torch.Tensor):
        raise BlockProofError(
            f"{name} returns {type(out).__name__} for a {where} input; a block returns one tensor"
        )
    if out.shape != given.shape or (dtype and out.dtype != given.dtype):
        raise BlockProofError(
            f"{name} returns {_described(out)} for a {where} input; a block keeps its input's shape and dtype"
        )


def _described(tensor: torch.Tensor) -> str:
    return f"{tuple(tensor.shape)} {str(tensor.dtype).removeprefix('torch.')}"


@contextlib.contextmanager
def _inner_checked(block: nn.Module, name: str) -> Iterator[None]:
    """For a :class:`Blended` block, its user's module checked as it returns (its dtype may
    differ: the blend casts it back)."""
    if not isinstance(block, Blended):
        yield
        return

    def check(module: nn.Module, args: tuple[Any, ...], out: Any) -> None:
        if args and isinstance(args[0], torch.Tensor):
            _check_output(out, args[0], name, dtype=False)

    handle = block.block.register_forward_hook(check)
    try:
        yield
    finally:
        handle.remove()
