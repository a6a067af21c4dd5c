"""The gate every block multiplies its input by, with the identity-init blend.

A paper block scales its input by an attention map ``a = sigmoid(logits)``. Inserted into a
trained network, that halves activations on average and damages the network. With
``init="identity"`` the map is blended with one before it touches the feature map::

    a' = 1 + blend * (a - 1)        blend: one learnable scalar, initialised to 0

so at insertion ``a' == 1`` and ``x * a' == x`` exactly, while ``blend == 1`` is the paper's
block. The blend acts on the small attention map (B, C, 1, 1) or (B, 1, H, W), never on the
full feature map: a fill and a ``torch.lerp`` on the map, in the map's own dtype under
autocast (the blend, a 0-dim weight, is not cast). Not in the papers.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

import torch
from torch import nn

BLEND = "blend"  # the attribute name of every blend parameter (here and in blocks.wrapped)


def make_blend(init: str) -> nn.Parameter | None:
    """The blend parameter for ``init="identity"`` (a zero scalar), ``None`` for ``"paper"``."""
    if init == "identity":
        return nn.Parameter(torch.zeros(()))
    return None


def gate(x: torch.Tensor, logits: torch.Tensor, blend: torch.Tensor | None) -> torch.Tensor:
    """``x * sigmoid(logits)``, the map blended towards one by ``blend`` when given."""
    attention = torch.sigmoid(logits)
    if blend is not None:
        attention = torch.lerp(torch.ones_like(attention), attention, blend)
    return x * attention


def blend_parameters(module: nn.Module) -> list[nn.Parameter]:
    """The blend parameters of ``module`` and its children."""
    return [p for name, p in module.named_parameters() if name.split(".")[-1] == BLEND]


@contextlib.contextmanager
def blends_at_one(blends: Iterable[nn.Parameter]) -> Iterator[None]:
    """Every blend in ``blends`` at 1 (the blocks at full strength, as in the papers) for the
    duration, then back to its own value."""
    params = list(blends)
    saved = [p.detach().clone() for p in params]
    try:
        with torch.no_grad():
            for p in params:
                p.fill_(1.0)
        yield
    finally:
        with torch.no_grad():
            for p, value in zip(params, saved, strict=True):
                p.copy_(value)
