"""The one base of every error the package raises on purpose.

``except attn_inject.AttnInjectError`` catches a refused recipe, plan, checkpoint, shape or
validation alike; each subclass also derives from the builtin error it refines
(``ValueError``, ``RuntimeError``...), so code written against those keeps working.
"""

from __future__ import annotations

__all__ = ["AttnInjectError", "InputError", "InputTypeError"]


class AttnInjectError(Exception):
    """An input or a model that attn-inject refuses, with one line that says why."""


class InputError(AttnInjectError, ValueError):
    """A value given to a function or command that is not one it allows."""


class InputTypeError(AttnInjectError, TypeError):
    """A value of a type a function does not take."""
