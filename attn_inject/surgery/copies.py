"""The shallow copy the surgery makes of each module on the path to a changed one.

The copy is a new object of the same class that shares every child, parameter and buffer
with the original, and has registries of its own: a child, parameter, buffer, attribute,
hook or parametrization added to one of the two never reaches the other.

Hooks registered before the copy act on both: the copy's registry starts with them, and
holds each one for as long as the original does, so the handle ``register_*_hook`` gave the
user removes it from both. A hook registered on either after the copy acts on that one only.
"""

from __future__ import annotations

import copy
import weakref
from collections import OrderedDict
from typing import Any

from torch import nn

__all__ = ["InheritedHooks", "shallow_copy"]


class InheritedHooks(OrderedDict):
    """A copied module's hook registry (``_forward_hooks``, ``_state_dict_hooks``...): its
    own hooks, and the original's from before the copy while the original still holds them."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._source: weakref.ref[OrderedDict[Any, Any]] | None = None
        self._inherited: set[Any] = set()

    @classmethod
    def of(cls, source: OrderedDict[Any, Any]) -> InheritedHooks:
        """A registry holding ``source``'s hooks for as long as ``source`` does."""
        new = cls(source)
        new._source = weakref.ref(source)
        new._inherited = set(source)
        return new

    def _prune(self) -> None:
        """Drop the inherited hooks the original no longer holds (a handle removed them)."""
        if not self._inherited:
            return
        source = self._source() if self._source is not None else None
        if source is None:  # the original is gone, and so is every handle that could remove them
            self._inherited = set()
            return
        gone = [key for key in self._inherited if key not in source]
        for key in gone:
            self._inherited.discard(key)
            if OrderedDict.__contains__(self, key):
                OrderedDict.__delitem__(self, key)

    def __delitem__(self, key: Any) -> None:
        self._inherited.discard(key)
        super().__delitem__(key)

    def __len__(self) -> int:
        self._prune()
        return super().__len__()

    def __iter__(self):
        self._prune()
        return super().__iter__()

    def __contains__(self, key: object) -> bool:
        self._prune()
        return super().__contains__(key)

    def __getitem__(self, key: Any) -> Any:
        self._prune()
        return super().__getitem__(key)

    def get(self, key: Any, default: Any = None) -> Any:
        self._prune()
        return super().get(key, default)

    def keys(self):
        self._prune()
        return super().keys()

    def values(self):
        self._prune()
        return super().values()

    def items(self):
        self._prune()
        return super().items()

    def __repr__(self) -> str:
        self._prune()
        return super().__repr__()

    def __reduce__(self) -> tuple[Any, ...]:
        """Pickled and deep-copied as a plain registry of the hooks it holds now."""
        return (OrderedDict, (list(self.items()),))


def shallow_copy(module: nn.Module) -> nn.Module:
    """A new module object of the same class sharing every child, parameter and buffer, with
    registries of its own (see the module's docstring)."""
    new = copy.copy(module)
    for key, value in vars(module).items():
        if not key.startswith("_") or not isinstance(value, (dict, set)):
            continue
        if "hooks" in key and isinstance(value, OrderedDict) and value:
            new.__dict__[key] = InheritedHooks.of(value)
        else:
            new.__dict__[key] = copy.copy(value)
    return new
