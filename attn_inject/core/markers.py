"""The attribute that marks a module as an inserted attention block."""

from __future__ import annotations

__all__ = ["BLOCK_FLAG"]

BLOCK_FLAG = "_attn_inject_block"  # set on every inserted block: a leaf to later traces
