"""What a node does (attn_inject/graph/ops.py): the module a call_module node runs, found by
its dotted name or, within an analysis, in one table of the root's submodules."""

from __future__ import annotations

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
