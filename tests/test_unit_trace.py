"""graph/trace.py's tracer against fx's own: the same graph, with a model's parameters and
buffers found by one table per trace instead of a walk of the model per read, and the code
that unpacks a traced value read once per code object instead of at every unpacking."""

from __future__ import annotations

import dis

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

from attn_inject.core.kept import forget_kept_results
from attn_inject.graph.trace import ModelTracer, TensorNames


class FunctionalNorm(nn.Module):
    """Reads its weight, bias and running statistics as attributes (as timm's norm layers do)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.register_buffer("running_mean", torch.zeros(channels))
        self.register_buffer("running_var", torch.ones(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False)


class FunctionalConv(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(channels, channels, 3, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight, padding=1)


class Tied(nn.Module):
    """Two convolutions sharing one weight, a norm, and a parameter passed to a function as a
    value (not read through a module attribute)."""

    def __init__(self) -> None:
        super().__init__()
        self.first = FunctionalConv(4)
        self.second = FunctionalConv(4)
        self.second.weight = self.first.weight  # tied: fx names it by its first name
        self.norm = FunctionalNorm(4)
        self.scale = nn.Parameter(torch.full((1, 4, 1, 1), 2.0))
        self.params = [self.scale]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(self.second(self.first(x)))
        return torch.mul(x, self.params[0])  # a Parameter as a plain argument: create_arg


def _get_attrs(graph: fx.Graph) -> list[str]:
    return [str(n.target) for n in graph.nodes if n.op == "get_attr"]


def test_parameters_and_buffers_get_the_names_fx_gives_them():
    model = Tied()
    ours = ModelTracer().trace(model)
    theirs = fx.Tracer().trace(model)
    assert _get_attrs(ours) == _get_attrs(theirs)
    assert "second.weight" not in _get_attrs(ours) and "first.weight" in _get_attrs(ours)
    assert {"norm.running_mean", "norm.running_var", "scale"} <= set(_get_attrs(ours))
    x = torch.randn(2, 4, 8, 8)
    torch.testing.assert_close(fx.GraphModule(model, ours)(x), model(x), rtol=0, atol=0)


def test_a_trace_reads_the_models_parameters_once_not_once_per_attribute_read(monkeypatch):
    model = nn.Sequential(*(FunctionalNorm(4) for _ in range(12)), FunctionalConv(4))
    walks = {"parameters": 0, "buffers": 0}
    for kind in walks:
        original = getattr(nn.Module, f"named_{kind}")

        def counted(self, *args, _kind=kind, _original=original, **kwargs):
            if self is model:
                walks[_kind] += 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(nn.Module, f"named_{kind}", counted)
    graph = ModelTracer().trace(model)
    assert len(_get_attrs(graph)) == 12 * 4 + 1
    assert walks == {"parameters": 1, "buffers": 1}


def test_a_buffer_replaced_during_the_trace_is_traced_as_fx_traces_it():
    class Refreshing(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("cache", torch.zeros(4))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.cache = torch.ones(4)  # a new tensor under the same name, after the table
            return x + self.cache.view(1, 4, 1, 1)

    ours = ModelTracer().trace(Refreshing())
    theirs = fx.Tracer().trace(Refreshing())
    assert _get_attrs(ours) == _get_attrs(theirs) != []


class Rope(nn.Module):
    """Re-registers a buffer in its forward, the old tensor still held as another buffer
    (as Hugging Face's dynamic rotary embeddings do)."""

    def __init__(self) -> None:
        super().__init__()
        frequencies = torch.arange(4.0)
        self.register_buffer("inv_freq", frequencies, persistent=False)
        self.register_buffer("original_inv_freq", frequencies, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x * self.inv_freq
        self.register_buffer("inv_freq", self.original_inv_freq * 2, persistent=False)
        return y + self.original_inv_freq


class Reassigned(nn.Module):
    """A tied weight whose first owner gets a new weight in the forward."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(2, 2), nn.Linear(2, 2)
        self.b.weight = self.a.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.linear(x, self.a.weight)
        self.a.weight = nn.Parameter(torch.zeros(2, 2))
        return F.linear(x, self.b.weight)


class Deleted(nn.Module):
    """Deletes a buffer in its forward, then uses the tensor from a list."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("buf", torch.ones(2))
        self.kept = [self.buf]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.buf
        del self.buf
        return x + self.kept[0]


@pytest.mark.parametrize("build", [Rope, Reassigned, Deleted])
def test_tensors_the_forward_re_registers_replaces_or_deletes_are_named_as_fx_names_them(build):
    torch.manual_seed(0)
    ours_root = build()
    torch.manual_seed(0)
    theirs_root = build()
    ours, theirs = ModelTracer().trace(ours_root), fx.Tracer().trace(theirs_root)
    assert _get_attrs(ours) == _get_attrs(theirs)
    if build is Deleted:
        return  # both graphs read the buffer the trace deleted: neither runs on its root
    x = torch.ones(4) if build is Rope else torch.ones(2, 2)
    out = fx.GraphModule(ours_root, ours)(x)  # each on the root it traced, changed by that trace
    torch.testing.assert_close(out, fx.GraphModule(theirs_root, theirs)(x), rtol=0, atol=0)


def test_a_tensor_the_table_does_not_hold_has_no_name():
    names = TensorNames.of(nn.Linear(2, 2))
    assert names.parameter(torch.zeros(2)) is None and names.buffer(torch.zeros(2)) is None
    assert names.parameter(names.root.weight) == "weight"


class Unpacking(nn.Module):
    """Unpacks traced values, a tensor's and an attribute's (``x.shape``), again and again."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for _ in range(4):
            a, b = x.chunk(2, 1)
            n, c, h, w = x.shape
            x = torch.cat([b, a], 1).reshape(n, c, h, w)
        return x


def _ops(graph: fx.Graph) -> list[tuple[str, str]]:
    return [(n.op, str(n.target)) for n in graph.nodes]


def test_unpacking_traces_as_fx_traces_it_and_reads_the_code_once_until_forgotten(monkeypatch):
    reads: list[object] = []
    original = dis.get_instructions

    def counted(code, *args, **kwargs):
        reads.append(code)
        return original(code, *args, **kwargs)

    monkeypatch.setattr(dis, "get_instructions", counted)
    forget_kept_results()
    model = Unpacking()
    ours = ModelTracer().trace(model)
    assert reads.count(Unpacking.forward.__code__) == 1  # fx reads it at each of the 8 unpackings
    reads.clear()
    theirs = fx.Tracer().trace(model)
    assert reads.count(Unpacking.forward.__code__) == 8
    assert _ops(ours) == _ops(theirs)
    reads.clear()
    ModelTracer().trace(model)
    assert Unpacking.forward.__code__ not in reads  # kept across traces
    forget_kept_results()  # as a process's first trace: read again
    ModelTracer().trace(model)
    assert reads.count(Unpacking.forward.__code__) == 1
    x = torch.randn(2, 4, 3, 3)
    torch.testing.assert_close(fx.GraphModule(model, ours)(x), model(x), rtol=0, atol=0)


def test_iterating_other_than_by_unpacking_fails_as_in_fx():
    class Listing(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.cat(list(x.chunk(2, 1)), 1)

    with pytest.raises(fx.proxy.TraceError, match="Proxy object cannot be iterated"):
        fx.Tracer().trace(Listing())
    with pytest.raises(fx.proxy.TraceError, match="Proxy object cannot be iterated"):
        ModelTracer().trace(Listing())


class Delegating(nn.Module):
    """A wrapper that forwards attribute reads it lacks to the module it wraps (as
    torch.compile's OptimizedModule does)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.inner, name)

    def forward(self, x):
        return self.inner(x)


def test_a_wrapper_that_forwards_the_block_marker_is_kept_whole():
    from attn_inject.core.markers import BLOCK_FLAG
    from attn_inject.graph.trace import trace

    block = nn.Conv2d(8, 8, 1)
    setattr(block, BLOCK_FLAG, True)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), Delegating(block))
    called = [str(n.target) for n in trace(model).graph.nodes if n.op == "call_module"]
    assert called == ["0", "1"]


class TrainOnly(nn.Module):
    """No parametrised children and a forward that reads ``self.training``: a leaf."""

    def forward(self, x):
        return x.mean((2, 3)) if self.training else x


class MadeOnFirstCall(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)

    def forward(self, x):
        if "head" not in self._modules:  # a submodule the first call creates
            self.head = TrainOnly()
        return self.head(self.conv(x))


def test_a_submodule_a_forward_creates_is_set_aside_like_every_other():
    """The guards around each step read the model as it is then: a submodule created by the
    first trace is in eval mode for the meta pass, as it was before the analysis kept a table."""
    from attn_inject.graph.analysis import annotate

    model = MadeOnFirstCall().eval()
    graph = annotate(model, (2, 3, 8, 8)).graph
    output = next(n for n in graph.nodes if n.op == "output")
    assert [tuple(n.meta["val"].shape) for n in output.all_input_nodes] == [(2, 8, 8, 8)]
