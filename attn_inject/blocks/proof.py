"""The proof each block gives at insertion, before it joins the model.

``inject`` builds every block, then runs it in eval mode and without gradients on a random
tensor of its point's shape and layout at batch 1 (uniform on [-2, 2): one draw of 65,521
values a process, cut or repeated to the shape, from a private ``torch.Generator``: the
global random state is not touched). The block is refused, with one line naming it and its kind, when it

- raises, returns something other than one tensor, or changes its input's shape or dtype;
- at ``init="identity"``, returns anything but its input bit for bit (``torch.equal``):
  the patched model then computes exactly what the original did;
- is not deterministic in eval mode: run twice on the same input under two different global
  random states (restored after), with every blend at 1 so that a blend of 0 does not hide
  the block, its outputs differ.

Every block is given a copy of the probe each run and compared with the probe as made, so
that one writing into its input (a registered factory's, timm's, or a built-in class whose
method was replaced) is not proved by its own write. On the meta device only the shape and
dtype are checked (there are no values to compare).

Within one ``inject`` call (:func:`shared_proofs`) the probe of each shape is made once.
A passed proof stands for every later block of the same *design*, in this call and in
later ones of the process (:data:`proved_designs`, bounded): the same built-in class made
of the same built-in parts (every module's exact type is one of ``SqueezeExcite``,
``EfficientChannelAttention``, ``CBAM``, ``SimAM``, their inner modules, or the
``torch.nn`` layers they are built of), with the same methods (the function objects of
each class's own namespace, so a method replaced on the class is another design), the same
plain attributes on every module (what the constructor's arguments became: ratio, pool,
layout, prefix, grid, init, ...), the same parameter names, shapes, dtypes and devices, the
same buffers (values included), no hook on any module and no global module hook, at the
same point shape, dtype, device and init; the methods include the package's functions they
call by a global name (``gate``). Why that is sound:

- whether the block raises, returns one tensor and keeps the shape and dtype is decided by
  its code and those attributes and shapes, never by the values of its weights;
- determinism in eval mode is a property of the code: the built-in blocks draw no random
  numbers, whatever their weights;
- at ``init="identity"`` a built-in block returns ``x * a'`` with ``a' = 1 + blend * (a -
  1)`` (:mod:`attn_inject.blocks.gate`) and ``a`` a sigmoid, or SimAM's map of the input
  alone: with every blend exactly 0 and a finite map ``a'`` is exactly 1 and the block
  returns its input bit for bit, whatever the weights' values (finite weights of the
  built-in factories give finite logits; SimAM computes its energies in float32 for half
  precision maps, where their squares overflow). So a later block of the
  design reuses the proof only when its blends are all 0 and its weights all finite
  (checked on the block itself, which costs a few small reductions); otherwise it is
  proved in full.

Nothing else shares a proof: a block whose factory is a user's (even one returning a
built-in class, whatever it then set: weights, a hook, a method on the instance, another
part, a blend moved from 0), timm's, or a :class:`Blended` user's module, is proved on its
own, every instance, since its result may depend on its weights, or on how many were built
before it (a factory returning identity for the first instance only is refused at the
second). A failed proof is never shared: the block that fails is refused by name.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Hashable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..core.errors import AttnInjectError
from ..core.kept import Kept
from ..core.messages import error_line, shown
from ..core.randomness import cuda_devices, seed_torch
from ..graph.trace import HOOK_DICTS, eval_mode
from . import block_factory
from .cbam import CBAM, ChannelAttention, ConvChannelAttention, SpatialAttention
from .eca import ChannelConv, EfficientChannelAttention
from .gate import BLEND, blend_parameters, blends_at_one
from .simam import SimAM
from .squeeze_excite import SqueezeExcite
from .wrapped import Blended

__all__ = [
    "BlockProofError",
    "block_name",
    "built_in_class",
    "prove_block",
    "proved_designs",
    "run_block",
    "shared_proofs",
]

PROBE_SEED = 0  # the private generator's seed: the same probe for every injection
PROBE_PERIOD = 65_521  # values drawn for one probe at most, repeated past that

# Built-in blocks whose output is their input times gates blended towards one.
GATED_BLOCKS = frozenset({SqueezeExcite, EfficientChannelAttention, CBAM, SimAM})
# Every module type a built-in block is made of (exact types: a subclass is another code).
BUILT_IN_PARTS = GATED_BLOCKS | {
    ChannelAttention,
    ConvChannelAttention,
    SpatialAttention,
    ChannelConv,
    nn.Conv2d,
    nn.Linear,
    nn.ReLU,
    nn.BatchNorm2d,
    nn.Identity,
}
# What every nn.Module keeps in its __dict__ that does not decide its forward's result (the
# forward hooks are in HOOK_DICTS, which must be empty).
_MODULE_BOOKKEEPING = frozenset(
    {
        "training",
        "_parameters",
        "_buffers",
        "_modules",
        "_non_persistent_buffers_set",
        "_is_full_backward_hook",
        "_state_dict_hooks",
        "_state_dict_pre_hooks",
        "_load_state_dict_pre_hooks",
        "_load_state_dict_post_hooks",
    }
)
_GLOBAL_HOOKS = (
    "_global_forward_hooks",
    "_global_forward_hooks_always_called",
    "_global_forward_hooks_with_kwargs",
    "_global_forward_pre_hooks",
    "_global_module_registration_hooks",
    "_global_parameter_registration_hooks",
    "_global_buffer_registration_hooks",
)


class BlockProofError(AttnInjectError, ValueError):
    """A block that fails its proof at insertion (see the module's docstring)."""


# The designs whose proof passed, kept across calls (see the module's docstring).
proved_designs: Kept[bool] = Kept(1024)


@dataclass(frozen=True)
class _Proofs:
    """What the blocks of one injection share: each shape's probe."""

    probes: dict[tuple[Any, ...], torch.Tensor] = field(default_factory=dict)

    def probe(self, shape: tuple[int, ...], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        key = (shape, device, dtype)
        if key not in self.probes:
            self.probes[key] = _drawn_probe(shape, device, dtype)
        return self.probes[key]


_SHARED: ContextVar[_Proofs | None] = ContextVar("attn_inject_shared_proofs", default=None)


@contextlib.contextmanager
def shared_proofs() -> Iterator[None]:
    """Within: the blocks proved share their probes and, where sound, their proofs (see the
    module's docstring); ``inject`` proves each call's blocks in one. Nested: the outer one."""
    if _SHARED.get() is not None:
        yield
        return
    token = _SHARED.set(_Proofs())
    try:
        yield
    finally:
        _SHARED.reset(token)


def prove_block(
    block: nn.Module,
    key: str,
    kind: str,
    shape: tuple[int, ...],
    init: str,
    device: torch.device,
    dtype: torch.dtype,
) -> None:
    """Raise :class:`BlockProofError` unless ``block`` (at ``key``, of ``kind``, for a point
    of ``shape`` without its batch) passes the proof at ``init``."""
    proofs = _SHARED.get() or _Proofs()
    # only a block its kind's built-in factory made shares a proof: a user's factory returning
    # a built-in class may have set its weights to anything
    shared = type(block) in GATED_BLOCKS and built_in_class(kind) is type(block)
    design = _design(block, shape, init, device, dtype) if shared else None
    if design is not None and design in proved_designs and _as_proved(block, init):
        return
    probe = proofs.probe(shape, device, dtype)
    _prove(block, block_name(key, kind), probe, init)
    if design is not None:
        proved_designs.put(design, True)


def _prove(block: nn.Module, name: str, probe: torch.Tensor, init: str) -> None:
    """The proof in full on ``probe``. The block is given a copy each run, even a built-in
    class's: a method replaced on the class may write into its input."""

    def given() -> torch.Tensor:
        return probe.clone()

    if probe.device.type == "meta":
        run_block(block, given(), name)
        return
    if init == "identity":
        out = run_block(block, given(), name)
        if not torch.equal(out, probe):
            diff = float((out.float() - probe.float()).abs().max())
            raise BlockProofError(
                f"{name} does not compute its input at init='identity' (max |out - in| = {diff:.3g}); "
                "a factory with an explicit 'init' parameter must be function-preserving there "
                "(one without is blended with its input)"
            )
    cuda = cuda_devices(probe.device)
    with blends_at_one(blend_parameters(block)), torch.random.fork_rng(devices=cuda):
        seed_torch(1, cuda)
        first = run_block(block, given(), name)
        seed_torch(2, cuda)
        second = run_block(block, given(), name)
    if not (torch.equal(first, second) or torch.allclose(first, second, rtol=0.0, atol=0.0, equal_nan=True)):
        diff = float((first.float() - second.float()).abs().nan_to_num().max())
        raise BlockProofError(
            f"{name} is not deterministic in eval mode: two runs on the same input differ by up to "
            f"{diff:.3g}; a block must give one output for one input (randomness only in train mode)"
        )


def _drawn_probe(shape: tuple[int, ...], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    if device.type == "meta":
        return torch.empty((1, *shape), device=device, dtype=dtype)
    # Uniform on [-2, 2): both signs and magnitudes past 1. A larger probe repeats one draw of
    # PROBE_PERIOD values (a prime: the repeat lines up with no channel or row length), which
    # costs a copy instead of a serial draw of every value.
    size = math.prod(shape)
    tile = _probe_tile()
    flat = tile.repeat(-(-size // len(tile)))[:size] if size > len(tile) else tile[:size].clone()
    return flat.reshape(1, *shape).to(device, dtype)


@functools.cache
def _probe_tile() -> torch.Tensor:
    """The one draw every probe is cut from (float32, on the CPU), drawn once a process. A
    probe is a copy of it, never a view: a block may write into what it is given."""
    tile = torch.empty(PROBE_PERIOD, dtype=torch.float32, device="cpu")
    return tile.uniform_(-2.0, 2.0, generator=torch.Generator().manual_seed(PROBE_SEED))


def built_in_class(kind: str) -> type | None:
    """The built-in block class ``kind``'s factory is (:data:`GATED_BLOCKS`), or None for a
    registered factory or timm's kinds: only those blocks share proofs and kept costs."""
    factory = block_factory(kind)
    return factory if factory in GATED_BLOCKS else None


def _design(
    block: nn.Module, shape: tuple[int, ...], init: str, device: torch.device, dtype: torch.dtype
) -> Hashable | None:
    """What decides a built-in block's proof (see the module's docstring), or None for a
    block that is proved on its own."""
    if type(block) not in GATED_BLOCKS or _global_hooks():
        return None
    modules = []
    for path, module in block.named_modules(remove_duplicate=False):
        if type(module) not in BUILT_IN_PARTS or any(module.__dict__.get(k) for k in HOOK_DICTS):
            return None
        attributes = []
        for name, value in module.__dict__.items():
            if name in _MODULE_BOOKKEEPING or name in HOOK_DICTS:
                continue
            plain = _plain(value)
            if plain is None:
                return None
            attributes.append((name, plain))
        modules.append((path, type(module), _methods(type(module)), tuple(sorted(attributes))))
    parameters = tuple((n, tuple(p.shape), p.dtype, p.device) for n, p in block.named_parameters())
    buffers = tuple(
        (n, tuple(b.shape), b.dtype, b.device, () if b.is_meta else tuple(b.flatten().tolist()))
        for n, b in block.named_buffers()
    )
    design = (tuple(modules), parameters, buffers, shape, init, device, dtype)
    try:
        hash(design)
    except TypeError:  # a method that is an unhashable object: proved on its own
        return None
    return design


def _methods(cls: type) -> tuple[Any, ...]:
    """The function objects in the namespaces of ``cls`` and its bases below ``nn.Module``,
    with the package's functions they call by a global name: the code a block of the class
    runs (a method replaced on the class, or ``squeeze_excite.gate`` replaced in its module,
    changes them)."""
    methods = tuple(
        value
        for base in cls.__mro__
        if base is not nn.Module and base is not object
        for value in vars(base).values()
        if callable(value) or isinstance(value, (staticmethod, classmethod, property))
    )
    seen: set[int] = set()
    return methods + tuple(called for method in methods for called in _package_globals(method, seen))


_PACKAGE = __name__.split(".")[0]


def _package_globals(function: Any, seen: set[int]) -> list[tuple[str, Any]]:
    """The package's own functions and classes that ``function``'s code reads by a global
    name, and theirs in turn, each once."""
    code = getattr(function, "__code__", None)
    if code is None:
        return []
    found = []
    for name in code.co_names:
        value = function.__globals__.get(name)
        if not callable(value) or id(value) in seen:
            continue
        module = getattr(value, "__module__", None)
        if not isinstance(module, str) or not module.startswith(_PACKAGE):
            continue
        seen.add(id(value))
        found.append((name, value))
        found += _package_globals(value, seen)
    return found


def _plain(value: Any) -> Hashable | None:
    """``value`` with its type as a hashable key when it is plain data (numbers, strings,
    None, dtypes, tuples and lists of them), else None."""
    if value is None or isinstance(value, (bool, int, float, str, torch.dtype)):
        return (type(value), value)
    if isinstance(value, (tuple, list)):
        items = [_plain(v) for v in value]
        return None if any(i is None for i in items) else (type(value), tuple(items))
    return None


def _global_hooks() -> bool:
    """Whether a global module hook is registered (it runs around every block's forward)."""
    module = torch.nn.modules.module
    return any(getattr(module, name, None) for name in _GLOBAL_HOOKS)


def _as_proved(block: nn.Module, init: str) -> bool:
    """Whether a block of a proved design passes as the proved one did: at
    ``init="identity"`` its blends exactly 0 and its weights finite (nothing else depends on
    their values)."""
    if init != "identity":
        return True
    blends, sums = [], []
    with torch.no_grad():
        for name, parameter in block.named_parameters():
            if parameter.is_meta:
                continue
            if name.rpartition(".")[2] == BLEND:
                blends.append(parameter.ne(0).any().reshape(1))
            # A finite sum means every value is finite (a NaN or an infinity makes the sum
            # NaN or infinite); a sum that overflows only sends the block to its full proof.
            values = torch.view_as_real(parameter) if parameter.is_complex() else parameter
            wide = torch.float32 if values.is_floating_point() and values.element_size() < 4 else None
            sums.append(values.sum(dtype=wide).reshape(1).double())
        if not sums:
            return True
        any_blend_moved = bool(torch.cat(blends).any()) if blends else False
        return not any_blend_moved and bool(torch.cat(sums).isfinite().all())


def block_name(key: str, kind: str) -> str:
    """How an error names a block: ``block 'layer1.0.se' (kind 'se')``."""
    return f"block {shown(key)} (kind {shown(kind)})"


def run_block(block: nn.Module, probe: torch.Tensor, name: str) -> torch.Tensor:
    """``block(probe)`` in eval mode without gradients, or a :class:`BlockProofError` naming
    the block (``name``, see :func:`block_name`) when it raises, returns no tensor or
    changes the shape or dtype; a blended user's block (:class:`Blended`) must keep the
    shape of what it is given too (the blend would broadcast it)."""
    where = _described(probe)
    try:
        with eval_mode(block), torch.no_grad(), _inner_checked(block, name):
            out = block(probe)
    except BlockProofError:
        raise
    except Exception as error:  # a user's block: any failure is refused by name
        raise BlockProofError(f"{name} fails on a {where} input: {error_line(error)}") from None
    _check_output(out, probe, name)
    return out


def _check_output(out: object, given: torch.Tensor, name: str, dtype: bool = True) -> None:
    where = _described(given)
    if not isinstance(out, torch.Tensor):
        raise BlockProofError(
            f"{name} returns {type(out).__name__} for a {where} input; a block returns one tensor"
        )
    if out.shape != given.shape or (dtype and out.dtype != given.dtype):
        raise BlockProofError(
            f"{name} returns {_described(out)} for a {where} input; a block keeps its input's shape and dtype"
        )


def _described(tensor: torch.Tensor) -> str:
    return f"{tuple(tensor.shape)} {str(tensor.dtype).removeprefix('torch.')}"


@contextlib.contextmanager
def _inner_checked(block: nn.Module, name: str) -> Iterator[None]:
    """For a :class:`Blended` block, its user's module checked as it returns (its dtype may
    differ: the blend casts it back)."""
    if not isinstance(block, Blended):
        yield
        return

    def check(module: nn.Module, args: tuple[Any, ...], out: Any) -> None:
        if args and isinstance(args[0], torch.Tensor):
            _check_output(out, args[0], name, dtype=False)

    handle = block.block.register_forward_hook(check)
    try:
        yield
    finally:
        handle.remove()
