"""graph/residual.py on its own: residual units of small hand-built modules, each branch,
shortcut and fork named by hand."""

from __future__ import annotations

import torch
from torch import nn

from attn_inject.graph.analysis import annotate
from attn_inject.graph.residual import find_residual_units


class Basic(nn.Module):
    """y = relu(drop(bn(conv(x))) + x): one unit, the identity shortcut, dropout stepped over."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.drop = nn.Dropout(0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.drop(self.bn(self.conv(x))) + x)


class Downsample(nn.Module):
    """A branch of two convs against a shortcut of one: the branch has more convolutions."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(4, 8, 3, stride=2, padding=1)
        self.b = nn.Conv2d(8, 8, 3, padding=1)
        self.short = nn.Conv2d(4, 8, 1, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.short(x) + self.b(self.a(x))


class Peers(nn.Module):
    """Two convs summed: a merge of peers (one conv each), not a residual unit."""

    def __init__(self) -> None:
        super().__init__()
        self.left = nn.Conv2d(4, 4, 1)
        self.right = nn.Conv2d(4, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.left(x) + self.right(x)


def _units(module: nn.Module):
    graph = annotate(module.eval(), (1, 4, 8, 8))
    return find_residual_units(graph)


def _name(node) -> str:
    return str(node.target) if node.op == "call_module" else node.name


def test_a_basic_block_is_one_unit_whose_branch_ends_at_its_norm_before_dropout():
    (unit,) = _units(Basic())
    assert _name(unit.branch) == "drop" and _name(unit.branch_end) == "bn"
    assert _name(unit.branch_next) == "drop"  # the block goes between the norm and dropout
    assert unit.shortcut is unit.fork and unit.fork.op == "placeholder"
    assert [_name(n) for n in unit.branch_entries] == ["conv"]


def test_the_side_with_more_convolutions_is_the_branch_and_a_1x1_conv_the_shortcut():
    (unit,) = _units(Downsample())
    assert _name(unit.branch) == "b" and _name(unit.shortcut) == "short"
    assert unit.fork.op == "placeholder" and [_name(n) for n in unit.branch_entries] == ["a"]


def test_two_peers_with_a_convolution_each_are_no_residual_unit():
    assert _units(Peers()) == []
