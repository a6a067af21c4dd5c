"""Shared fixtures: small inputs, random-init models built once per session and handed to each
test as its own copy (a test that changes its model changes no other test's)."""

from __future__ import annotations

import copy
import functools

import pytest
import timm
import torch
import torch._ops
import torch.jit._builtins
import torchvision

import attn_inject as ai

SIZE = (3, 64, 64)


_REFRESH_PACKET = getattr(torch._ops, "_refresh_packet", None)


def _refresh_forgetting_the_replaced_op(packet, _refresh=_REFRESH_PACKET) -> None:
    """torch's ``_refresh_packet`` with the replaced op's id taken out of TorchScript's builtin table.

    When a library adds an overload to an op that has a packet already (torch.ao's
    ``quantized_decomposed`` ops do, on importing ``quantize_fx``), torch swaps the packet's op
    and registers the new one by ``id``, but leaves the old op's ``id`` in the table. Once the old
    op is freed, a list that CPython puts at its address (a conv's
    ``_reversed_padding_repeated_twice``) is taken for that builtin, and ``torch.jit.script``
    fails on it now and then with "builtin cannot be used as a value". The test processes import
    ``quantize_fx``, so they forget the replaced op as it is replaced.
    """
    replaced = packet._op
    _refresh(packet)
    table = torch.jit._builtins._builtin_table
    if table is not None and packet._op is not replaced:
        table.pop(id(replaced), None)


if _REFRESH_PACKET is not None:  # a torch without it refreshes no packet
    torch._ops._refresh_packet = _refresh_forgetting_the_replaced_op


def _seeded_build(name: str) -> torch.nn.Module:
    """``tv:NAME`` or ``timm:NAME``, random init from seed 0, in eval mode."""
    torch.manual_seed(0)
    source, _, bare = name.partition(":")
    if source == "tv":
        model = torchvision.models.get_model(bare, weights=None)
    else:
        model = timm.create_model(bare, pretrained=False)
    return model.eval()


_built_once = functools.cache(_seeded_build)


@functools.cache
def _injected_once(name: str, recipe: str, size: tuple[int, ...]) -> tuple[torch.nn.Module, torch.nn.Module]:
    model = _seeded_build(name)
    return model, ai.inject(model, recipe, input_size=size)


@pytest.fixture
def injected():
    """``injected("tv:resnet18", "se_resnet", (3, 32, 32))``: the model and its injection,
    made once per session; each call gets its own copy of the two, copied together so that
    the modules the patched model shares with the model stay shared."""
    return lambda name, recipe, input_size: copy.deepcopy(_injected_once(name, recipe, input_size))


def _build(name: str) -> torch.nn.Module:
    """A copy of the model built once for ``name``: its own parameters, buffers and modes."""
    return copy.deepcopy(_built_once(name))


@pytest.fixture
def build():
    """``build("tv:resnet18")`` / ``build("timm:resnet50")``: a random-init model in eval mode,
    the same weights every call (built once, deep-copied), never shared with another test."""
    return _build


def meta_model(name: str, **kwargs) -> torch.nn.Module:
    source, _, bare = name.partition(":")
    with torch.device("meta"):
        if source == "tv":
            return torchvision.models.get_model(bare, weights=None, **kwargs)
        return timm.create_model(bare, pretrained=False, **kwargs)


def blocks_of(patched: torch.nn.Module) -> torch.nn.ModuleDict:
    """The inserted blocks of a patched model as one ModuleDict (dots in names become '/')."""
    import attn_inject as ai

    return torch.nn.ModuleDict({k.replace(".", "/"): v for k, v in ai.inserted_blocks(patched).items()})
