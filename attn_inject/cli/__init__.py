"""The ``attn-inject`` command: the parser and its dispatch (:mod:`.main`)."""

from .main import main

__all__ = ["main"]
