"""Randomness is the caller's: a function of ours that draws random numbers does it in a
state of its own, and the caller's global states are as they were after it.

    >>> with own_random_state(seed=None):   # forked from the caller's states
    ...     block = SqueezeExcite(64)        # its weights drawn here
    >>> torch.rand(3)                        # the caller's next draw, as without our code

Torch's CPU generator and those of the CUDA devices already initialised, Python's
``random`` and NumPy's global state are saved and put back. Inside, they start from the
caller's (one global state gives one result) or, with ``seed``, from that seed (one seed
gives one result, whatever the caller's state).
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator

import torch

from .errors import InputError
from .messages import shown
from .values import is_int

__all__ = ["MAX_SEED", "check_seed", "cuda_devices", "own_random_state", "seed_torch"]

MAX_SEED = 2**32 - 1  # NumPy's limit; torch and Python take it too


def check_seed(seed: object) -> int | None:
    """``seed`` as given when it is None or an integer in [0, 2**32 - 1], else an error."""
    if seed is None:
        return None
    if not is_int(seed) or not 0 <= seed <= MAX_SEED:
        raise InputError(f"seed {shown(seed)} must be None or an integer from 0 to {MAX_SEED}")
    return int(seed)


@contextlib.contextmanager
def own_random_state(seed: int | None = None) -> Iterator[None]:
    """Torch's, Python's and NumPy's global random states restored on exit; seeded with
    ``seed`` on entry when it is given."""
    numpy_random = _numpy_random()
    python_state = random.getstate()
    numpy_state = numpy_random.get_state() if numpy_random is not None else None
    cuda = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    try:
        with torch.random.fork_rng(devices=cuda):
            if seed is not None:
                seed_torch(seed, cuda)
                random.seed(seed)
                if numpy_random is not None:
                    numpy_random.seed(seed)
            yield
    finally:
        random.setstate(python_state)
        if numpy_random is not None:
            numpy_random.set_state(numpy_state)


def cuda_devices(device: torch.device) -> list[int]:
    """The CUDA devices whose random state a run on ``device`` draws from (none off CUDA)."""
    if device.type != "cuda":
        return []
    return [device.index if device.index is not None else torch.cuda.current_device()]


def seed_torch(seed: int, cuda: list[int]) -> None:
    """Seed torch's CPU generator and those of the ``cuda`` devices; not ``torch.manual_seed``,
    which would queue a seed for a CUDA not started yet, to act after we are gone."""
    torch.random.default_generator.manual_seed(seed)
    for device in cuda:
        torch.cuda.default_generators[device].manual_seed(seed)


def _numpy_random():
    """NumPy's ``random`` module, or None where NumPy is not installed."""
    try:
        import numpy.random
    except ImportError:
        return None
    return numpy.random
