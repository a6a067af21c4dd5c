"""The ``attn-inject`` command: the parser and its dispatch (:mod:`.main`), one module per
command's body (:mod:`.recipes`, :mod:`.blocks`, :mod:`.plan`, :mod:`.demo`, :mod:`.convert`,
:mod:`.validate`, :mod:`.zoo`; ``finetune`` and ``search`` live in their packages), and what
they share: option values (:mod:`.options`), output (:mod:`.output`), errors (:mod:`.errors`)."""

from .main import main

__all__ = ["main"]
