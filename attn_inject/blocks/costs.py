"""The multiply-adds of the built-in blocks in closed form.

A plan counts each block's multiply-adds as :class:`~attn_inject.graph.analysis.MacCounter`
does: torch's formulas for its convolutions and matrix products, nothing for pooling, gates,
activations or normalisation. Counting by running the block on the meta device costs a few
milliseconds a design (torch's meta kernels are Python). A built-in block's count follows
from its layers' weights and the positions of the map it sees, one sample:

- SE (1709.01507): ``C * C/r`` twice, the excitation MLP on the pooled descriptor;
- ECA (1910.03151): ``k * C``, the 1-D convolution across the C channels;
- CBAM (1807.06521): the channel MLP (or 1-D convolution) on two descriptors, average and
  max, plus ``2 * k * k`` per position of the spatial map;
- SimAM: no product at all.

Each formula gives what the counter gives: the tests run every option and layout through
both. The planner uses them for blocks of the built-in factories only, while the counter's
formulas are torch's own for the convolutions and matrix products and it has none for the
other operators these blocks run (:func:`closed_forms_hold`); otherwise it runs the block.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, cast

import torch
from torch import nn

from .cbam import CBAM, ChannelAttention, ConvChannelAttention
from .eca import EfficientChannelAttention
from .layout import LayoutBlock
from .simam import SimAM
from .squeeze_excite import SqueezeExcite

__all__ = ["COUNTED", "UNCOUNTED", "closed_form_macs", "closed_forms_hold"]

aten = torch.ops.aten
# The convolutions and matrix products the built-in blocks dispatch, and every other operator
# they dispatch (the tests run each block under a dispatch mode and check these lists hold them).
COUNTED = frozenset({aten.convolution, aten.addmm, aten.mm})
UNCOUNTED = frozenset(
    {
        *(aten.mean, aten.amax, aten.sum, aten.sigmoid, aten.lerp, aten.ones_like, aten.relu, aten.relu_),
        *(aten.add, aten.add_, aten.sub, aten.mul, aten.div, aten.pow, aten.native_batch_norm),
        *(aten.stack, aten.cat, aten.unbind, aten.index_select, aten.slice, aten.view, aten.t),
        *(aten._unsafe_view, aten.alias, aten.detach, aten.empty),
    }
)


def closed_forms_hold(formulas: Mapping[Any, Any]) -> bool:
    """Whether the closed forms give what a counter with ``formulas`` counts: torch's own
    formulas (``torch.utils.flop_counter``'s) for :data:`COUNTED`, none for :data:`UNCOUNTED`."""
    torchs = all(getattr(formulas.get(op), "__module__", None) == _TORCH_FORMULAS for op in COUNTED)
    return torchs and not any(op in formulas for op in UNCOUNTED)


_TORCH_FORMULAS = "torch.utils.flop_counter"


def map_positions(block: LayoutBlock, shape: Sequence[int]) -> int:
    """The spatial positions of the map ``attend`` sees for one sample of ``shape``: H x W
    of a map, the planned grid of tokens viewed as one, else the tokens after the prefix."""
    if block.grid_view:
        return block.grid[0] * block.grid[1]
    if block.tokens:
        return math.prod(shape[:-1]) - block.prefix
    height, width = (shape[0], shape[1]) if block.channels_last else (shape[1], shape[2])
    return height * width


def _weights(*layers: nn.Module) -> int:
    """Multiply-adds of fully connected layers (1x1 convolutions or linear layers) on one
    pooled descriptor: one per weight."""
    return sum(_numel(layer.weight) for layer in layers)


def _numel(weight: torch.Tensor | nn.Module) -> int:
    return cast(torch.Tensor, weight).numel()


def _channel_map(channel: ChannelAttention, channels: int) -> int:
    """CBAM's channel map: its MLP or 1-D convolution on the average and the max descriptor."""
    if type(channel) is ConvChannelAttention:
        return 2 * _numel(channel.channel_conv.weight) * channels
    return 2 * _weights(channel.fc1, channel.fc2)


def _squeeze_excite(block: SqueezeExcite, shape: Sequence[int]) -> int:
    return _weights(block.fc1, block.fc2)


def _eca(block: EfficientChannelAttention, shape: Sequence[int]) -> int:
    return _numel(block.conv.weight) * _channels(block, shape)


def _cbam(block: CBAM, shape: Sequence[int]) -> int:
    spatial = _numel(block.spatial.conv.weight) * map_positions(block, shape)
    return _channel_map(block.channel, _channels(block, shape)) + spatial


def _simam(block: SimAM, shape: Sequence[int]) -> int:
    return 0


def _channels(block: LayoutBlock, shape: Sequence[int]) -> int:
    return shape[-1] if block.channels_last else shape[0]


_FORMULAS: dict[type, Callable[..., int]] = {
    SqueezeExcite: _squeeze_excite,
    EfficientChannelAttention: _eca,
    CBAM: _cbam,
    SimAM: _simam,
}


def closed_form_macs(block: nn.Module, shape: Sequence[int]) -> int | None:
    """Multiply-adds of ``block``, as a built-in factory makes it, on one sample of ``shape``
    ((C, H, W), or its layout's shape), or None where no formula is known (a subclass)."""
    formula = _FORMULAS.get(type(block))
    return None if formula is None else formula(block, shape)
