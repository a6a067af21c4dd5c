"""``target=`` naming a container its parent never calls: the parent iterates it and routes
each layer's input by its own index lists (as Ultralytics' ``DetectionModel`` does), so the
container traced alone as a chain is not the network and is refused, naming the parent."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import attn_inject as ai
from attn_inject.models.targets import TargetError


class Routed(nn.Module):
    """Layer i reads the output of layer ``sources[i]`` (-1: the previous one); the last one
    adds two earlier outputs: a chain of ``self.layers`` would compute something else."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
        )
        self.sources = (-1, -1, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outputs: list[torch.Tensor] = []
        for source, layer in zip(self.sources, self.layers, strict=True):
            x = layer(x if source == -1 else outputs[source])
            outputs.append(x)
        return outputs[1] + outputs[2]


class Outer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = Routed()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class Chained(nn.Module):
    """The same container, called as a whole: a fine target."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x).mean((2, 3))


@pytest.mark.parametrize(
    ("model", "target", "parent"), [(Routed(), "layers", "''"), (Outer(), "body.layers", "'body'")]
)
def test_a_container_the_parent_iterates_and_routes_is_refused_naming_the_parent(model, target, parent):
    with pytest.raises(TargetError, match=rf"never calls this Sequential.*target={parent}$") as caught:
        ai.plan(model, "cbam_after_every_stage", target=target, input_size=(3, 16, 16))
    assert "\n" not in str(caught.value)


def test_a_container_its_parent_calls_is_still_a_target():
    plan = ai.plan(Chained(), "se_after_every_stage", target="layers", input_size=(3, 16, 16))
    assert plan.target == "layers"
