"""Checks the ecosystem tests share: every output tensor equal, the class kept, validate."""

from __future__ import annotations

import torch
from torch import nn

import attn_inject as ai
from attn_inject.validation.compare import tensors


def assert_same_outputs(want: object, got: object) -> None:
    a, b = tensors(want), tensors(got)
    assert len(a) == len(b) > 0
    for i, (x, y) in enumerate(zip(a, b, strict=True)):
        assert torch.equal(x, y), f"output tensor {i} differs"


def inputs(size: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(seed))


def assert_identity_at_insertion(model: nn.Module, patched: nn.Module, size: int) -> None:
    """``patched`` (injected at ``init="identity"``) computes exactly what ``model`` does on
    every output tensor, keeps its class and passes ``ai.validate``."""
    assert len(ai.inserted_blocks(patched)) > 0
    assert ai.base_class(patched) is type(model) and type(patched).__name__ == type(model).__name__
    x = inputs(size)
    with torch.no_grad():
        assert_same_outputs(model(x), patched(x))
    report = ai.validate(model, patched, checks=("reference", "identity"), seeds=1, device="cpu")
    assert report.passed, str(report)


def assert_save_load_round_trip(
    patched: nn.Module, model: nn.Module, rebuilt: nn.Module, tmp_path, size: int
) -> None:
    """``patched`` (blocks that are not identity) saved unnamed and loaded onto ``rebuilt``,
    the base model its builder makes again: the same network with the same weights."""
    path = tmp_path / "patched.safetensors"
    ai.save(patched, path, model_name="")
    loaded = ai.load(path, model=rebuilt)
    loaded.eval()
    assert type(loaded).__name__ == type(model).__name__
    assert set(ai.inserted_blocks(loaded)) == set(ai.inserted_blocks(patched))
    x = inputs(size, seed=2)
    with torch.no_grad():
        assert_same_outputs(patched(x), loaded(x))
        assert not torch.equal(tensors(model(x))[-1], tensors(patched(x))[-1])
