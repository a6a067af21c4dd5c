"""graph/stages.py on its own: the stages of a hand-built 3-stage model, from the output's
dominators and from timm-style ``feature_info``, against the stages and channels built."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from attn_inject.graph.analysis import AnnotatedGraph, annotate, scope_of
from attn_inject.graph.stages import find_stages, output_dominators, stage_entries

SIZE = (1, 3, 32, 32)
CHANNELS = (16, 32, 64)


class Stage(nn.Module):
    """A strided conv, then a residual unit whose branch is a conv: one resolution."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.down = nn.Conv2d(cin, cout, 3, stride=stride, padding=1)
        self.branch = nn.Conv2d(cout, cout, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.down(x))
        return x + torch.relu(self.branch(x))


class ThreeStages(nn.Module):
    """stem (stride 2), stages at reductions 4, 8 and 16, then a pooled head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.layer1 = Stage(8, CHANNELS[0], 2)
        self.layer2 = Stage(CHANNELS[0], CHANNELS[1], 2)
        self.layer3 = Stage(CHANNELS[1], CHANNELS[2], 2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(CHANNELS[2], 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer3(self.layer2(self.layer1(torch.relu(self.stem(x)))))
        return self.fc(torch.flatten(self.pool(x), 1))


FEATURE_INFO = [
    {"module": "stem", "num_chs": 8, "reduction": 2},  # below reduction 4: not a stage
    {"module": "layer1", "num_chs": CHANNELS[0], "reduction": 4},
    {"module": "layer2", "num_chs": CHANNELS[1], "reduction": 8},
    {"module": "layer3", "num_chs": CHANNELS[2], "reduction": 16},
]


@pytest.fixture(scope="module")
def graph() -> AnnotatedGraph:
    torch.manual_seed(0)
    return annotate(ThreeStages().eval(), SIZE)


def _returned_by(graph: AnnotatedGraph, path: str):
    """The node module ``path`` returns: the residual add in its own code."""
    (add,) = [n for n in graph.nodes if n.op == "call_function" and scope_of(n) == path and "add" in n.name]
    return add


def test_without_feature_info_the_stages_are_the_three_stage_modules_with_their_channels(graph):
    stages = find_stages(graph)
    assert [(s.index, s.name, s.channels, s.reduction) for s in stages] == [
        (0, "layer1", 16, 4),
        (1, "layer2", 32, 8),
        (2, "layer3", 64, 16),
    ]
    assert [s.node for s in stages] == [_returned_by(graph, f"layer{i}") for i in (1, 2, 3)]
    assert all(s.skip_reason is None for s in stages)


def test_feature_info_entries_below_reduction_4_are_left_out():
    assert [e["module"] for e in stage_entries(FEATURE_INFO)] == ["layer1", "layer2", "layer3"]
    assert stage_entries([{"module": "stem", "reduction": 2}]) == []


def test_with_feature_info_the_stages_are_its_modules(graph):
    stages = find_stages(graph, FEATURE_INFO)
    assert [(s.name, s.channels, s.reduction, s.skip_reason) for s in stages] == [
        ("layer1", 16, 4, None),
        ("layer2", 32, 8, None),
        ("layer3", 64, 16, None),
    ]
    assert [s.node for s in stages] == [_returned_by(graph, f"layer{i}") for i in (1, 2, 3)]


def test_a_feature_info_that_disagrees_on_channels_marks_the_stage_skipped(graph):
    wrong = [dict(e) for e in FEATURE_INFO]
    wrong[2]["num_chs"] = 48
    stages = find_stages(graph, wrong)
    assert [s.skip_reason is None for s in stages] == [True, False, True]
    assert "feature_info says 48 channels, the graph has 32" in str(stages[1].skip_reason)


def test_a_feature_info_naming_no_module_of_the_graph_falls_back_to_the_dominators(graph):
    stages = find_stages(graph, [{"module": "nowhere", "num_chs": 16, "reduction": 4}])
    assert [s.name for s in stages] == ["layer1", "layer2", "layer3"]


def test_the_output_dominators_pass_each_stage_end_but_no_residual_branch(graph):
    dominators = output_dominators(graph)
    assert dominators[0].op == "placeholder"
    assert dominators[-1].op == "call_module" and dominators[-1].target == "fc"
    names = {str(n.target) for n in dominators if n.op == "call_module"}
    assert {"stem", "layer1.down", "layer2.down", "layer3.down", "pool", "fc"} <= names
    assert not names & {"layer1.branch", "layer2.branch", "layer3.branch"}  # a shortcut bypasses them
    for path in ("layer1", "layer2", "layer3"):
        assert _returned_by(graph, path) in dominators
    order = [graph.index[n] for n in dominators]
    assert order == sorted(order)  # in graph order


class SequentialStages(nn.Module):
    """The same three stages in a Sequential (timm's ``self.stages``)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.stages = nn.Sequential(
            Stage(8, CHANNELS[0], 2), Stage(CHANNELS[0], CHANNELS[1], 2), Stage(CHANNELS[1], CHANNELS[2], 2)
        )
        self.pool = nn.AdaptiveAvgPool2d(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.stages(self.stem(x))).flatten(1)


def test_stages_in_a_sequential_end_where_each_member_returns_with_its_channels():
    graph = annotate(SequentialStages().eval(), SIZE)
    ends = [_returned_by(graph, f"stages.{i}") for i in range(3)]
    found = find_stages(graph)
    assert [(s.node, s.channels, s.reduction) for s in found] == list(
        zip(ends, CHANNELS, (4, 8, 16), strict=True)
    )
    info = [{"module": f"stages.{i}", "num_chs": c, "reduction": 4 * 2**i} for i, c in enumerate(CHANNELS)]
    named = find_stages(graph, info)
    assert [(s.name, s.node, s.channels) for s in named] == [
        (f"stages.{i}", end, c) for i, (end, c) in enumerate(zip(ends, CHANNELS, strict=True))
    ]
