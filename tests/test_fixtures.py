"""The shared fixtures hand each test a model of its own."""

from __future__ import annotations

import torch


def test_build_gives_a_new_model_with_the_same_weights_each_call(build):
    first, second = build("tv:resnet18"), build("tv:resnet18")
    assert first is not second
    assert not {id(p) for p in first.parameters()} & {id(p) for p in second.parameters()}
    with torch.no_grad():
        first.conv1.weight.zero_()
        first.train()
    third = build("tv:resnet18")
    assert not third.training and bool(third.conv1.weight.abs().sum() > 0)
    assert torch.equal(third.conv1.weight, second.conv1.weight)
