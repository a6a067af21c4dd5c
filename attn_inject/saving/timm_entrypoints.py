"""The model functions that :func:`attn_inject.register_timm_model` registers in timm.

timm's ``register_model`` lists every entrypoint in its module's ``__all__``, as its own
model modules do; the registered names gather here, not in a module of the package's API.
"""

from __future__ import annotations

__all__: list[str] = []
