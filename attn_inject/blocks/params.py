"""Checks for block parameters, shared by every built-in block.

Each check raises :class:`BlockParamError` naming the parameter, what it got and what is
allowed, so that a recipe loader can prefix the file and key.
"""

from __future__ import annotations

import math
from typing import Any

from ..core.errors import AttnInjectError
from ..core.messages import shown
from ..core.values import is_int, is_number
from ..core.vocabulary import Word


class Init(Word):
    """How a block starts: computing its input (``identity``: a blend at 0, the model
    unchanged at insertion) or as its paper initialises it (``paper``)."""

    IDENTITY = "identity"
    PAPER = "paper"


INIT_MODES = Init.values()


class BlockParamError(AttnInjectError, ValueError):
    """A block parameter has a value the block does not allow."""

    def __init__(self, param: str, value: Any, allowed: str) -> None:
        self.param = param
        self.value = value
        self.allowed = allowed
        super().__init__(f"{param}={shown(value)} is not allowed; {param} must be {allowed}")


def positive_number(name: str, value: Any) -> float:
    if not is_number(value) or not math.isfinite(value) or value <= 0:
        raise BlockParamError(name, value, "a positive number")
    return value


def number(name: str, value: Any) -> float:
    if not is_number(value) or not math.isfinite(value):
        raise BlockParamError(name, value, "a number")
    return value


def ratio(name: str, value: Any) -> float:
    """A reduction ratio: hidden width = channels / ratio, so at least 1."""
    if not is_number(value) or not math.isfinite(value) or value < 1:
        raise BlockParamError(name, value, "a number >= 1 (hidden width = channels / ratio)")
    return value


def positive_int(name: str, value: Any, largest: int = 4096) -> int:
    if not is_int(value) or not 1 <= value <= largest:
        raise BlockParamError(name, value, f"an integer from 1 to {largest}")
    return value


def odd_int(name: str, value: Any, largest: int = 63) -> int:
    if not is_int(value) or not 1 <= value <= largest or value % 2 == 0:
        raise BlockParamError(name, value, f"an odd integer from 1 to {largest}")
    return value


def boolean(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise BlockParamError(name, value, "true or false")
    return value


def choice(name: str, value: Any, allowed: tuple[Any, ...]) -> Any:
    """One of ``allowed``, of the same type too: ``7.0`` is not the kernel size ``7``."""
    if isinstance(value, bool) or not any(type(value) is type(a) and value == a for a in allowed):
        raise BlockParamError(name, value, "one of " + ", ".join(repr(a) for a in allowed))
    return value


def channel_count(channels: Any) -> int:
    return positive_int("channels", channels, largest=1 << 20)


def init_mode(init: Any) -> str:
    """``init`` as its plain text, or a :class:`BlockParamError` naming what is allowed."""
    return str(choice("init", init, INIT_MODES))
