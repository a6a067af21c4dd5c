"""Shared fixtures: small inputs, random-init models built once per session and handed to each
test as its own copy (a test that changes its model changes no other test's)."""

from __future__ import annotations

import copy
import functools

import pytest
import timm
import torch
import torchvision

SIZE = (3, 64, 64)


@functools.cache
def _built_once(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    source, _, bare = name.partition(":")
    if source == "tv":
        model = torchvision.models.get_model(bare, weights=None)
    else:
        model = timm.create_model(bare, pretrained=False)
    return model.eval()


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
