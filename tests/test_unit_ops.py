"""What a node does (attn_inject/graph/ops.py): the module a call_module node runs, found by
its dotted name or, within an analysis, in one table of the root's submodules."""

from __future__ import annotations

import torch
from torch import fx, nn

from attn_inject.graph import ops


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU())
        self.again = self.body[0]  # one module under two names

    def forward(self, x):
        return self.again(self.body(x))


def _calls(graph: fx.Graph) -> dict[str, fx.Node]:
    return {str(n.target): n for n in graph.nodes if n.op == "call_module"}


def test_the_table_gives_the_module_each_name_does_and_only_for_its_own_root():
    net = Net()
    calls = _calls(fx.symbolic_trace(net).graph)
    expected = {name: net.get_submodule(name) for name in calls}
    with ops.modules_known(net):
        assert {name: ops.module_of(node, net) for name, node in calls.items()} == expected
        other = Net()  # another root with the same names: its own modules, not the table's
        assert all(ops.module_of(node, other) is other.get_submodule(name) for name, node in calls.items())
        with ops.modules_known(other):
            assert ops.module_of(calls["body.0"], other) is other.body[0]
        assert ops.module_of(calls["body.0"], net) is net.body[0]


def test_a_second_name_of_one_module_is_found_by_its_dotted_name():
    """The table lists each module once (under its first name): a node naming it by its
    second name finds it by walking the name."""
    net = Net()
    graph = fx.Graph()
    node = graph.call_module("again", (graph.placeholder("x"),))
    with ops.modules_known(net):
        assert ops.module_of(node, net) is net.body[0]


def test_a_node_that_calls_no_module_has_none():
    graph = fx.symbolic_trace(Net()).graph
    placeholder = next(iter(graph.nodes))
    assert ops.module_of(placeholder, Net()) is None


class Sizes(nn.Module):
    """Reads of a map's sizes in each spelling fx records."""

    def forward(self, x):
        y = x * 2
        return (x.shape[2], x.shape[-1], x.size(2), x.size(-1), x.size()[3], y.shape[2], x.shape[1])


def test_a_read_of_a_maps_size_is_recognised_in_each_spelling_and_dim():
    graph = fx.symbolic_trace(Sizes()).graph
    x = next(n for n in graph.nodes if n.op == "placeholder")
    output = next(n for n in graph.nodes if n.op == "output")
    reads = list(output.args[0])
    height = [ops.reads_size(n, x, 2) for n in reads]
    width = [ops.reads_size(n, x, 3) for n in reads]
    assert height == [True, False, True, False, False, False, False]  # y's size is another tensor's
    assert width == [False, True, False, True, True, False, False]


class OwnConv(nn.Conv2d):
    """A convolution with code of its own: nothing about its output size is assumed."""

    def _conv_forward(self, x, weight, bias):
        return super()._conv_forward(x[:, :, 1:], weight, bias)


class Patches(nn.Module):
    """Patch embeddings that give their grid's size as timm's Twins does (``H // patch``),
    beside convolutions whose output size is not that."""

    def __init__(self) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, 8, 4, stride=4)
        self.valid = nn.Conv2d(3, 8, 4, stride=4, padding="valid")
        self.padded = nn.Conv2d(3, 8, 4, stride=4, padding=1)
        self.overlapping = nn.Conv2d(3, 8, 7, stride=4)
        self.dilated = nn.Conv2d(3, 8, 4, stride=4, dilation=2)
        self.own = OwnConv(3, 8, 4, stride=4)
        self.transposed = nn.ConvTranspose2d(3, 8, 4, stride=4)
        self.hooked = nn.Conv2d(3, 8, 4, stride=4)
        self.tall = nn.Conv2d(3, 8, (4, 2), stride=(4, 2))

    def forward(self, x):
        _, _, h, w = x.shape
        maps = (self.patch(x), self.valid(x), self.tall(x))
        others = tuple(
            m(x)
            for m in (self.padded, self.overlapping, self.dilated, self.own, self.transposed, self.hooked)
        )
        return maps, others, (h // 4, w // 4, w // 2, h // 2, x.shape[3] // 4)


def test_a_patch_embeddings_floor_division_of_its_input_gives_its_maps_size():
    from attn_inject.graph.analysis import annotate

    root = Patches().eval()
    graph = annotate(root, (1, 3, 64, 32))
    root.hooked.register_forward_hook(lambda module, args, out: out[:, :, 1:])
    output = next(n for n in graph.nodes if n.op == "output")
    (patch, valid, tall), others, (h4, w4, w2, h2, shape_w4) = output.args[0]

    def given(map_node, dim):
        return [ops.gives_size(n, map_node, dim, root) for n in (h4, w4, w2, h2, shape_w4)]

    for embedding in (patch, valid):
        assert given(embedding, 2) == [True, False, False, False, False]
        assert given(embedding, 3) == [False, True, False, False, True]  # x.shape[3] and the unpacked w
    # another size: (H + 2 - 4) // 4 + 1, (H - 7) // 4 + 1, (H - 7) // 4 + 1 dilated, code of its own,
    # a transposed convolution's 4 H, and a hook that crops
    for other in others:
        assert given(other, 2) == given(other, 3) == [False] * 5, other.target
    assert given(tall, 2) == [True, False, False, False, False]  # kernel = stride per dim
    assert given(tall, 3) == [False, False, True, False, False]


class PositionConv(nn.Module):
    """Twins' position convolution: tokens viewed as a map of a given size, a depthwise 3x3
    convolution added to it; beside maps whose size the given one is not."""

    def __init__(self) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, 8, 4, stride=4)
        self.proj = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.strided = nn.Conv2d(8, 8, 3, stride=2, padding=1)
        self.unpadded = nn.Conv2d(8, 8, 3)
        self.same = nn.Conv2d(8, 8, 5, padding="same", dilation=2)

    def forward(self, image):
        b, _, h, w = image.shape
        size = (h // 4, w // 4)
        tokens = self.patch(image).flatten(2).transpose(1, 2)
        y = tokens.transpose(1, 2).view(b, 8, *size)
        kept = torch.relu(self.proj(y) + y)
        broadcast = self.proj(y) + y[:, :, :1]
        turned = tokens.transpose(1, 2).view(b, 8, *size)
        turned.transpose_(2, 3)
        return kept, self.strided(y), self.unpadded(y), broadcast, self.proj(turned), self.same(y), size


def test_a_size_is_followed_through_the_maps_that_keep_it_and_no_others():
    from attn_inject.graph.analysis import annotate

    root = PositionConv().eval()
    graph = annotate(root, (1, 3, 32, 32))
    output = next(n for n in graph.nodes if n.op == "output")
    kept, strided, unpadded, broadcast, turned, same, (height, width) = output.args[0]
    assert ops.gives_size(height, kept, 2, root) and ops.gives_size(width, kept, 3, root)
    assert ops.gives_size(height, same, 2, root) and ops.gives_size(width, same, 3, root)
    assert not ops.gives_size(width, kept, 2, root) and not ops.gives_size(height, kept, 3, root)
    for other in (strided, unpadded):  # a stride of 2, no padding: another size
        assert not ops.gives_size(height, other, 2, root)
    # a sum with a map of height 1, broadcast: its height is not proven from that input
    assert not ops.gives_size(height, broadcast, 2, root)
    # a view of the given size, then transposed in place: the size is not where the view put it
    assert not ops.gives_size(height, turned, 2, root) and not ops.gives_size(width, turned, 3, root)
