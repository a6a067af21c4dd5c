"""Tensor layouts: what a tensor in the graph is, and what a block acts on.

A node's tensor is a feature map (``NCHW``; ``NHWC`` after a ``permute(0, 2, 3, 1)``) or
tokens (``NLC``: (B, N, C); ``NCL``: (B, C, N)). A block acts on an ``NCHW`` map, an ``NHWC``
map, or ``TOKENS``: ``NLC`` tokens of a proven patch grid (``prefix`` tokens, then the grid).
"""

from __future__ import annotations

from .vocabulary import Word

__all__ = ["BLOCK_LAYOUTS", "CHANNEL_DIM", "Layout"]


class Layout(Word):
    """What a tensor is (``NCHW``, ``NHWC``, ``NLC``, ``NCL``), or what a block acts on
    (``NCHW``, ``NHWC``, ``TOKENS``)."""

    NCHW = "NCHW"
    NHWC = "NHWC"
    NLC = "NLC"
    NCL = "NCL"
    TOKENS = "tokens"


BLOCK_LAYOUTS = (Layout.NCHW, Layout.NHWC, Layout.TOKENS)  # what a block acts on

# the channel dimension of maps and of (B, N, C) tokens, also over more than one token
# dimension, (B, T, N, C); NCL tokens are read by no rule that needs their channels
CHANNEL_DIM = {Layout.NCHW: 1, Layout.NHWC: 3, Layout.NLC: -1, Layout.TOKENS: -1}
