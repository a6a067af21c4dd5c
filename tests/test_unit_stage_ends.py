"""planning/stage_ends.py's own contract on hand-built models: the maps a backbone returns
end its stages, and a stage that runs into a head reading its map as sequence-first tokens
ends at its last map."""

from __future__ import annotations

import torch
from torch import nn

from attn_inject.graph.analysis import annotate
from attn_inject.graph.stages import find_stages
from attn_inject.planning.stage_ends import declared_backbone_entries, ends_at_maps, returned_stage_entries

SHAPE = (2, 3, 64, 64)


def _down(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride=2, padding=1), nn.ReLU())


class Encoder(nn.Module):
    """Returns the input and every stage's map, as an smp encoder does; the last two stages
    share a resolution (a dilated stage)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = _down(3, 8)
        self.layer1 = _down(8, 16)
        self.layer2 = _down(16, 24)
        self.layer3 = nn.Sequential(nn.Conv2d(24, 32, 3, padding=2, dilation=2), nn.ReLU())

    def forward(self, x):
        features = [x]
        for layer in (self.stem, self.layer1, self.layer2, self.layer3):
            x = layer(x)
            features.append(x)
        return features


def test_every_returned_map_at_stride_4_or_deeper_ends_a_stage_dilated_ones_too():
    entries = returned_stage_entries(annotate(Encoder(), SHAPE))
    assert entries == [
        {"module": "layer1", "num_chs": 16, "reduction": 4},
        {"module": "layer2", "num_chs": 24, "reduction": 8},
        {"module": "layer3", "num_chs": 32, "reduction": 8},
    ]


class OneMap(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layer1, self.layer2 = _down(3, 8), _down(8, 16)

    def forward(self, x):
        return self.layer2(self.layer1(x))


class NotAModuleOutput(OneMap):
    def forward(self, x):
        a = self.layer1(x)
        return [a, self.layer2(a) * 2]


def test_a_single_map_or_a_returned_value_no_module_computes_gives_no_entries():
    assert returned_stage_entries(annotate(OneMap(), SHAPE)) is None
    assert returned_stage_entries(annotate(NotAModuleOutput(), SHAPE)) is None


class AttentionPooled(nn.Module):
    """Three stride-2 stages, then a pool that reads the last map as sequence-first tokens
    with a class token (open_clip's ModifiedResNet)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.layer1, self.layer2 = _down(3, 8), _down(8, 16), _down(16, 32)
        self.attn = nn.MultiheadAttention(32, 2)

    def forward(self, x):
        x = self.layer2(self.layer1(self.stem(x)))
        tokens = x.flatten(2).permute(2, 0, 1)  # (HW, B, C)
        tokens = torch.cat([tokens.mean(dim=0, keepdim=True), tokens], dim=0)
        out, _ = self.attn(tokens[:1], tokens, tokens, need_weights=False)
        return out[0]


def test_a_stage_running_into_a_token_head_ends_at_its_last_map():
    graph = annotate(AttentionPooled(), SHAPE)
    stages = ends_at_maps(graph, find_stages(graph))
    assert [(s.name, s.channels, s.reduction, s.skip_reason) for s in stages] == [
        ("layer1", 16, 4, None),
        ("layer2", 32, 8, None),
    ]
    last = stages[-1].node
    assert tuple(last.meta["val"].shape) == (2, 32, 8, 8)


class TokensPooledChannelsFirst(nn.Module):
    """Two patch-merging stages on (B, N, C) tokens, a final norm, then the tokens turned
    channels-first for a 1-D pool (transformers' SwinModel)."""

    def __init__(self) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, 8, 4, stride=4)
        self.merge = nn.Linear(32, 16)
        self.norm = nn.LayerNorm(16)
        self.pool = nn.AdaptiveAvgPool1d(1)

    def forward(self, x):
        x = self.patch(x)  # (B, 8, 16, 16)
        b, c, h, w = x.shape
        tokens = x.flatten(2).transpose(1, 2)  # (B, 256, 8) tokens at stride 4
        grid = tokens.reshape(b, h // 2, 2, w // 2, 2, c).permute(0, 1, 3, 4, 2, 5)
        tokens = self.merge(grid.reshape(b, (h // 2) * (w // 2), 4 * c))  # (B, 64, 16) at stride 8
        tokens = self.norm(tokens)
        return self.pool(tokens.transpose(1, 2)).flatten(1)


def test_tokens_turned_channels_first_for_a_pool_end_their_stage_at_the_tokens_before():
    graph = annotate(TokensPooledChannelsFirst(), SHAPE)
    found = find_stages(graph)
    assert found[-1].node.meta["val"].dim() == 3 and found[-1].node.target == "transpose"
    stages = ends_at_maps(graph, found)
    last = stages[-1]
    assert (last.name, last.reduction, last.skip_reason) == ("norm", 8, None)
    assert tuple(last.node.meta["val"].shape) == (2, 64, 16)
    # the stride-4 stage ends in the merge's 6-D reshuffle, moved back to its tokens as before
    assert [(s.name, s.reduction, s.skip_reason) for s in stages[:-1]] == [("transpose", 4, None)]


def test_usable_stage_ends_are_left_as_they_are():
    graph = annotate(OneMap(), SHAPE)
    found = find_stages(graph)
    assert ends_at_maps(graph, found) == found


class LayerList(nn.Module):
    """A network built from a layer list that names its backbone (as Ultralytics' YAML
    models are): layers run in order, each reading the layer its ``f`` names; the last layer,
    a head, reads the backbone's stride-8 map again."""

    def __init__(self) -> None:
        super().__init__()
        self.yaml = {"backbone": [[-1, 1, "Conv", []]] * 4, "head": [[[-1, 1], 1, "Head", []]]}
        layers = [
            _down(3, 8),
            _down(8, 16),
            _down(16, 24),
            nn.Conv2d(24, 24, 3, padding=1),
            nn.Conv2d(40, 8, 1),
        ]
        for i, layer in enumerate(layers):
            layer.f, layer.i = (-1 if i < 4 else [-1, 1]), i
        self.model = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y: list[torch.Tensor] = []
        for m in self.model:
            if m.f != -1:
                x = torch.cat(
                    [nn.functional.interpolate(y[j], size=x.shape[-2:]) if j != -1 else x for j in m.f], 1
                )
            x = m(x)
            y.append(x)
        return x


def test_a_declared_backbone_ends_a_stage_at_its_last_layer_per_stride_and_none_in_the_head():
    model = LayerList().eval()
    graph = annotate(model, SHAPE)
    entries = declared_backbone_entries(model, graph)
    assert entries == [
        {"module": "model.1", "num_chs": 16, "reduction": 4},
        {"module": "model.3", "num_chs": 24, "reduction": 8},
    ]
    assert declared_backbone_entries(Encoder(), annotate(Encoder(), SHAPE)) is None  # no layer list
