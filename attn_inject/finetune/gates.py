"""How far each inserted block has opened from identity: its ``blend`` values.

At ``init="identity"`` every attention map is blended with one, ``a' = 1 + blend * (a - 1)``
(see :mod:`attn_inject.blocks.gate`): ``blend == 0`` is the identity, ``blend == 1`` the
paper's block. Logging the blends during fine-tuning shows whether the blocks are used.

    >>> ai.blends(patched)
    {'layer1.channel.blend': 0.0, 'layer1.spatial.blend': 0.0, ...}

``gates`` is the deprecated name of :func:`blends` (it returns blends, not gates).
"""

from __future__ import annotations

import math

from torch import nn

from ..core.deprecation import deprecated_alias
from .distributed import unwrap

__all__ = ["blends", "gates", "mean_gate"]

BLEND = "blend"


def blends(patched: nn.Module) -> dict[str, float]:
    """Every blend parameter of the inserted blocks, by qualified name (block name, then the
    parameter's name inside the block), as a float. Empty when the blocks were inserted at
    ``init="paper"`` (they have no blend)."""
    from ..surgery.record import inserted_blocks

    out: dict[str, float] = {}
    for block_name, block in inserted_blocks(unwrap(patched)).items():
        for name, param in block.named_parameters():
            if name == BLEND or name.endswith("." + BLEND):
                out[f"{block_name}.{name}"] = float(param.detach().float().mean())
    return out


def mean_gate(patched: nn.Module) -> float:
    """The mean of :func:`blends` (NaN when the blocks have no blend)."""
    values = list(blends(patched).values())
    return sum(values) / len(values) if values else math.nan


gates = deprecated_alias(blends, "gates", since="0.2.0")
