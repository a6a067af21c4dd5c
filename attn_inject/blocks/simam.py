"""SimAM, a parameter-free attention (Yang, Zhang, Li and Xie, "SimAM: A Simple,
Parameter-Free Attention Module for Convolutional Neural Networks", ICML 2021, PMLR 139).

Each neuron's importance is the inverse of its minimal energy against the other neurons of
its channel, ``1 / e_t* = (t - mu)^2 / (4 (sigma^2 + lambda)) + 1/2`` with ``mu`` and
``sigma^2 = sum((x - mu)^2) / (n - 1)`` over the channel's n spatial positions (the paper's
closed-form solution and its own implementation), and the feature is refined as
``out = x * sigmoid(1 / E)``. ``lambda = 1e-4`` is the paper's. No parameters.

Departures: ``init="identity"`` blends the map with one (see :mod:`attn_inject.blocks.gate`;
not in paper); on float16 and bfloat16 maps the energies are computed in float32 (not in
paper: the squared deviations overflow float16); ``layout`` (see
:mod:`attn_inject.blocks.layout`): the statistics over the spatial positions of a
channels-last map, or over the grid tokens.
"""

from __future__ import annotations

import torch

from . import params as check
from .gate import gate, make_blend
from .layout import NCHW, LayoutBlock

__all__ = ["SimAM"]


class SimAM(LayoutBlock):
    """SimAM (ICML 2021): (B, C, H, W) -> (B, C, H, W), or the same on (B, H, W, C) or
    (B, N, C) tokens; ``channels`` is only checked (the block has no weights)."""

    uses_grid = False

    def __init__(
        self,
        channels: int,
        e_lambda: float = 1e-4,
        init: str = "paper",
        layout: str = NCHW,
        prefix: int = 0,
        grid: tuple[int, int] | None = None,
        order: list[int] | None = None,
    ) -> None:
        super().__init__(layout, prefix, grid, order)
        check.channel_count(channels)
        self.e_lambda = check.positive_number("e_lambda", e_lambda)
        self.init = check.init_mode(init)
        self.blend = make_blend(init)

    def attend(self, x: torch.Tensor) -> torch.Tensor:
        n = 1
        for dim in self.map_dims:
            n *= x.shape[dim]
        # In half precision (t - mu)^2 overflows past |t - mu| = 256 and inf / inf is NaN: the
        # energies are computed in float32, the map cast back (an infinite value gates as 1).
        half = x.dtype == torch.float16 or x.dtype == torch.bfloat16
        wide = x.float() if half else x
        squared = (wide - wide.mean(self.map_dims, keepdim=True)).pow(2)
        variance = squared.sum(self.map_dims, keepdim=True) / max(n - 1, 1)
        inverse_energy = squared / (4 * (variance + self.e_lambda)) + 0.5
        return gate(x, inverse_energy.to(x.dtype), self.blend)

    def extra_repr(self) -> str:
        layout = super().extra_repr()
        return f"e_lambda={self.e_lambda:g}" + (f", {layout}" if layout else "")
