"""The shape rules give what torch's meta kernels give: shape, strides and dtype, on every input
they accept; every input they do not know goes to the kernel, and the kernel's refusals stay
its own. The reference is torch itself, run on the same meta tensors."""

from __future__ import annotations

import itertools
import operator
import random

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import flop_registry

from attn_inject.graph import shapes
from attn_inject.graph.analysis import MacCounter, _CountingMode
from attn_inject.graph.shape_rules import (
    BINARY_FUNCTIONS,
    FUNCTION_RULES,
    METHOD_RULES,
    STOOD_FOR,
    UNARY_FUNCTIONS,
    function_shape,
    method_shape,
    module_shape,
)
from attn_inject.graph.shapes import propagate_shapes
from attn_inject.graph.trace import trace
from attn_inject.planning.match import BATCH, prepare

RNG = random.Random(0)


def meta(shape, dtype=torch.float32, order=None):
    """A meta tensor of ``shape`` laid out with its dims in memory in ``order`` (outermost first)."""
    if order is None:
        return torch.empty(shape, dtype=dtype, device="meta")
    stored = torch.empty([shape[d] for d in order], dtype=dtype, device="meta")
    return stored.permute([order.index(d) for d in range(len(shape))])


def layouts(shape, every=True):
    """The same sizes in every memory order (dense tensors; else three: contiguous, channels
    last, reversed), plus a strided slice (not dense)."""
    dims = list(range(len(shape)))
    orders = (
        list(itertools.permutations(dims)) if every else [dims, [0, *dims[2:], 1][: len(dims)], dims[::-1]]
    )
    found = [meta(shape, order=list(p)) for p in orders]
    if shape and shape[-1] > 1:
        found.append(torch.empty((*shape[:-1], shape[-1] * 2), device="meta")[..., ::2])
    return found


SHAPES = [(2, 8, 5, 5), (1, 8, 1, 1), (1, 3, 7, 1), (2, 49, 16), (4, 6), (1, 1, 1), (5,)]


def same(rule_out: torch.Tensor, kernel_out: torch.Tensor) -> None:
    assert rule_out.is_meta
    assert (rule_out.shape, rule_out.stride(), rule_out.dtype) == (
        kernel_out.shape,
        kernel_out.stride(),
        kernel_out.dtype,
    )


def check(known, kernel) -> bool:
    """Compare a rule's output with the kernel's where the rule gave one; True if it did."""
    if known is None:
        return False
    same(known, kernel())
    return True


UNARY = [
    (F.relu, ()),
    (torch.relu, ()),
    (F.gelu, ()),
    (F.silu, ()),
    (F.hardswish, ()),
    (F.hardsigmoid, ()),
    (torch.sigmoid, ()),
    (torch.tanh, ()),
    (F.relu6, ()),
    (F.leaky_relu, (0.2,)),
    (F.elu, (1.0,)),
    (F.mish, ()),
    (F.sigmoid, ()),
    (F.tanh, ()),
]


def test_every_activation_the_rules_know_is_checked_here():
    assert {fn for fn, _ in UNARY} == set(UNARY_FUNCTIONS)


@pytest.mark.parametrize("fn, extra", UNARY, ids=lambda v: getattr(v, "__name__", ""))
def test_an_activation_keeps_its_inputs_shape_and_strides(fn, extra):
    known = 0
    for shape in SHAPES:
        for x in layouts(shape):
            known += check(function_shape(fn, (x, *extra), {}), lambda x=x: fn(x, *extra))
    assert known >= len(SHAPES)  # every dense input at least


def test_an_activation_in_place_or_on_a_half_tensor_subclass_goes_to_the_kernel():
    x = meta((2, 8, 5, 5))
    assert function_shape(F.relu, (x,), {"inplace": True}) is None
    assert function_shape(F.relu, (x, True), {}) is None
    assert function_shape(F.relu, (nn.Parameter(x),), {}) is None
    assert function_shape(F.relu, (torch.empty(3, dtype=torch.int64, device="meta"),), {}) is None


def _broadcast_partners(shape):
    """Shapes that broadcast with ``shape``: itself, per-channel, per-row, scalars, lower rank."""
    partners = {tuple(shape), (), (1,) * len(shape)}
    for i in range(len(shape)):
        partners.add(tuple(s if j == i else 1 for j, s in enumerate(shape)))
        partners.add(tuple(1 if j == i else s for j, s in enumerate(shape)))
    partners.add(tuple(shape[1:]))
    partners.add(tuple(shape[-1:]))
    return sorted(partners)


@pytest.mark.parametrize("fn", BINARY_FUNCTIONS, ids=lambda f: f.__name__)  # every one the rules know
def test_arithmetic_broadcasts_as_the_kernel_does(fn):
    known = 0
    for shape in SHAPES:
        for a in layouts(shape):
            for partner in _broadcast_partners(shape):
                for b in layouts(partner, every=False) if partner else [meta(())]:
                    known += check(function_shape(fn, (a, b), {}), lambda a=a, b=b: fn(a, b))
                    known += check(function_shape(fn, (b, a), {}), lambda a=a, b=b: fn(b, a))
            for number in (2, 0.5):
                known += check(function_shape(fn, (a, number), {}), lambda a=a, n=number: fn(a, n))
                known += check(function_shape(fn, (number, a), {}), lambda a=a, n=number: fn(n, a))
    assert known > 200


@pytest.mark.parametrize("name", ["add", "mul", "sub", "div"])
def test_arithmetic_methods_follow_the_same_rule(name):
    a, b = meta((2, 8, 5, 5), order=[0, 2, 3, 1]), meta((1, 8, 1, 1))
    assert check(method_shape(name, (a, b), {}), lambda: getattr(a, name)(b))
    assert method_shape(name, (a, b), {"alpha": 2}) is None


def test_arithmetic_the_kernel_refuses_or_promotes_goes_to_the_kernel():
    a = meta((2, 8, 5, 5))
    assert function_shape(operator.add, (a, meta((3, 1, 1))), {}) is None  # does not broadcast
    assert function_shape(operator.add, (a, meta((8, 1, 1), torch.float64)), {}) is None  # promotes
    assert function_shape(operator.add, (a, True), {}) is None
    assert function_shape(operator.add, (a, 1j), {}) is None


def test_a_mean_over_named_dims_gives_the_kernels_shape():
    known = 0
    for shape in SHAPES:
        x = meta(shape)
        for r in range(1, len(shape) + 1):
            for dims in itertools.combinations(range(-len(shape), len(shape)), r):
                for keepdim in (True, False):
                    kernel = lambda x=x, d=dims, k=keepdim: x.mean(d, keepdim=k)  # noqa: E731
                    try:
                        kernel()
                    except (RuntimeError, IndexError):
                        assert method_shape("mean", (x, dims, keepdim), {}) is None  # a dim twice
                        continue
                    known += check(method_shape("mean", (x, dims, keepdim), {}), kernel)
                    known += check(function_shape(torch.mean, (x, dims), {"keepdim": keepdim}), kernel)
    assert known > 100
    x = meta((2, 8, 5, 5))
    assert method_shape("mean", (x,), {}) is None  # over everything: the kernel's
    assert method_shape("mean", (x, (2, 3)), {"dtype": torch.float64}) is None
    assert method_shape("mean", (x, (2, 7)), {}) is None  # out of range: the kernel's error


def test_a_layer_norm_gives_the_kernels_layout_dense_or_not():
    known = 0
    for shape in SHAPES:
        for x in layouts(shape):
            for n in range(1, len(shape) + 1):
                normalized = tuple(shape[-n:])
                weight = meta(normalized)
                known += check(
                    function_shape(F.layer_norm, (x, normalized, weight, weight, 1e-6), {}),
                    lambda x=x, s=normalized, w=weight: F.layer_norm(x, s, w, w, 1e-6),
                )
                known += check(
                    function_shape(F.layer_norm, (x, normalized), {"eps": 1e-5}),
                    lambda x=x, s=normalized: F.layer_norm(x, s, eps=1e-5),
                )
    assert known > 100
    x = meta((2, 49, 16))
    assert function_shape(F.layer_norm, (x, (8,)), {}) is None  # the kernel's error
    assert function_shape(F.layer_norm, (x, (16,), meta((8,))), {}) is None


def test_a_roll_keeps_its_inputs_shape():
    known = 0
    for shape in SHAPES:
        for x in layouts(shape):
            for dims in ((0,), (-1,), tuple(range(len(shape)))[:2]):
                shifts = tuple(range(1, len(dims) + 1))
                known += check(
                    function_shape(torch.roll, (x, shifts, dims), {}),
                    lambda x=x, s=shifts, d=dims: torch.roll(x, s, d),
                )
                known += check(
                    function_shape(torch.roll, (x,), {"shifts": shifts, "dims": dims}),
                    lambda x=x, s=shifts, d=dims: torch.roll(x, s, d),
                )
    assert known > 50
    assert function_shape(torch.roll, (meta((2, 3)), 1), {}) is None  # flattened roll: the kernel's


CONVS = [
    nn.Conv2d(8, 16, 3),
    nn.Conv2d(8, 16, 3, stride=2, padding=1),
    nn.Conv2d(8, 8, 3, padding=2, dilation=2, groups=8),
    nn.Conv2d(8, 4, (3, 1), stride=(2, 1), padding=(1, 0)),
    nn.Conv2d(8, 16, 5, padding="same"),
    nn.Conv2d(8, 16, 3, padding="valid", bias=False),
    nn.Conv2d(8, 16, 2, stride=3),
    nn.Conv1d(8, 4, 3, stride=2),
    nn.Conv3d(8, 4, 3, padding=1),
]


@pytest.mark.parametrize("conv", CONVS, ids=repr)
def test_a_convolution_gives_the_kernels_output(conv):
    spatial = conv.weight.ndim - 2
    known = 0
    for size in (1, 2, 3, 7, 16):
        x = meta((2, 8, *(size,) * spatial))
        known += check(
            module_shape(conv, (x,), {}), lambda x=x: conv._conv_forward(x, conv.weight.to("meta"), None)
        )
    assert known >= 2


def test_a_convolution_the_kernel_refuses_goes_to_the_kernel():
    conv = nn.Conv2d(8, 16, 5)
    assert module_shape(conv, (meta((2, 4, 9, 9)),), {}) is None  # wrong channel count
    assert module_shape(conv, (meta((2, 8, 3, 3)),), {}) is None  # kernel larger than the input
    assert module_shape(conv, (meta((8, 9, 9)),), {}) is None  # unbatched
    assert module_shape(conv, (meta((2, 8, 9, 9), torch.float64),), {}) is None  # dtypes differ
    assert module_shape(nn.LazyConv2d(4, 3), (meta((2, 8, 9, 9)),), {}) is None
    reflecting = nn.Conv2d(8, 16, 3, padding=1, padding_mode="reflect")  # refuses inputs under 2
    assert module_shape(reflecting, (meta((2, 8, 9, 9)),), {}) is None


def test_a_linear_layer_gives_the_kernels_output():
    linear = nn.Linear(16, 24)
    known = 0
    for shape in [(2, 16), (16,), (2, 49, 16), (1, 7, 7, 16), (3, 1, 16)]:
        for x in layouts(shape):
            known += check(
                module_shape(linear, (x,), {}),
                lambda x=x: F.linear(x, linear.weight.to("meta"), linear.bias.to("meta")),
            )
    assert known >= 5
    assert module_shape(linear, (meta((2, 8)),), {}) is None
    assert module_shape(nn.LazyLinear(4), (meta((2, 8)),), {}) is None


class Subclassed(nn.Conv2d):
    def forward(self, x):
        return super().forward(x)[:, :2]


def test_a_subclass_with_its_own_forward_goes_to_the_kernel():
    assert module_shape(Subclassed(8, 4, 3), (meta((1, 8, 9, 9)),), {}) is None


@pytest.mark.parametrize(
    "name", ["test_efficientnet", "test_convnext", "test_vit", "test_resnet", "test_maxvit"]
)
def test_a_graphs_shapes_with_the_rules_equal_those_without(name, monkeypatch):
    """Every node of a timm model's graph gets the same meta value with the rules as with the
    kernels alone, and the rules do answer for nodes of the model."""
    model = timm.create_model(name).eval()
    graph = trace(model).graph
    size = (BATCH, 3, *model.pretrained_cfg["input_size"][1:])  # as the analysis plans
    answered = []

    def counting(rule):
        def counted(*args):
            out = rule(*args)
            answered.append(out is not None)
            return out

        return counted

    def values():
        propagate_shapes(model, graph, size)
        return [
            (n.name, tuple(v.shape), v.stride(), v.dtype)
            if isinstance(v := n.meta.get("val"), torch.Tensor)
            else None
            for n in graph.nodes
        ]

    for rule in ("function_shape", "method_shape", "module_shape"):
        monkeypatch.setattr(shapes, rule, counting(getattr(shapes, rule)))
    with_rules = values()
    assert sum(answered) >= 3
    for rule in ("function_shape", "method_shape", "module_shape"):
        monkeypatch.setattr(shapes, rule, lambda *args: None)
    assert values() == with_rules


def _calls_of_every_rule():
    """One call of each function and method the rules know, on meta tensors."""
    x, y, w = meta((2, 8, 5, 5)), meta((8, 1, 1)), meta((5,))
    extra = dict(UNARY)
    calls = [lambda fn=fn: fn(x, *extra[fn]) for fn in UNARY_FUNCTIONS]
    calls += [lambda fn=fn: fn(x, y) for fn in BINARY_FUNCTIONS]
    calls += [
        lambda: torch.mean(x, (2, 3)),
        lambda: F.layer_norm(x, (5,), w, w),
        lambda: torch.roll(x, 1, 2),
    ]
    method_args = {"add": (x,), "mul": (x,), "sub": (x,), "div": (x,), "mean": ((2, 3),), "roll": (1, 2)}
    calls += [lambda name=name: getattr(x, name)(*method_args.get(name, ())) for name in METHOD_RULES]
    return calls


def test_no_function_or_method_rule_stands_for_an_operator_the_mac_counter_counts():
    """A counted pass lets these rules answer: their kernels must dispatch nothing it counts,
    and nothing but the operators the rules are said to stand for (``STOOD_FOR``)."""
    calls = _calls_of_every_rule()
    assert len(calls) == len(FUNCTION_RULES) + len(METHOD_RULES)
    for call in calls:
        with MacCounter() as counter:
            call()
        assert counter.total_macs() == 0

    class Looked(dict):  # the formulas the counter looks up: every operator it runs
        def get(self, key, default=None):
            looked.add(key)
            return default

    looked: set = set()
    for call in calls:
        with _CountingMode(Looked()):
            call()
    assert looked <= STOOD_FOR, looked - STOOD_FOR
    assert not STOOD_FOR & set(flop_registry)  # torch's own formulas count none of them


def test_a_formula_registered_for_an_operator_a_rule_stands_for_turns_the_rules_off(monkeypatch):
    """Should torch (or a user) give a formula to an operator a rule answers for, the
    count still sees it: the counted pass then runs every node through its kernel."""
    model = timm.create_model("test_efficientnet").eval()
    graph = prepare(model).graph  # its squeeze-excitation blocks take means
    plain = graph.count_macs()
    monkeypatch.setitem(
        flop_registry, torch.ops.aten.mean, lambda *args, out_val, **kwargs: 2 * out_val.numel()
    )
    with MacCounter() as counter:
        propagate_shapes(graph.root, graph.graph, graph.input_shape, rules=False)
    with_means = counter.total_macs() // BATCH
    assert with_means > plain
    assert graph.count_macs() == with_means
    with MacCounter() as counter:  # the counter does count a convolution and a linear layer
        nn.Conv2d(8, 4, 1, device="meta")(meta((1, 8, 2, 2)))
        nn.Linear(8, 4, device="meta")(meta((3, 8)))
    assert counter.total_macs() == 8 * 4 * 4 + 3 * 8 * 4


@pytest.mark.parametrize("name", ["test_efficientnet", "test_convnext", "test_vit", "test_maxvit"])
def test_a_counted_pass_counts_what_every_kernel_alone_counts(name, monkeypatch):
    """The multiply-add count's pass (``counted``): the function and method rules answer, the
    convolutions and linear layers run their kernels, and the count is the one every node
    through its kernel gives."""
    model = timm.create_model(name).eval()
    graph = trace(model).graph
    size = (BATCH, 3, *model.pretrained_cfg["input_size"][1:])

    def count(**how):
        with MacCounter() as counter:
            propagate_shapes(model, graph, size, **how)
        return counter.total_macs()

    everything = count(rules=False)
    answered = []
    for rule in ("function_shape", "method_shape"):
        original = getattr(shapes, rule)
        monkeypatch.setattr(shapes, rule, lambda *a, rule=original: answered.append(rule(*a)) or answered[-1])

    def no_module_rule(*args):
        raise AssertionError("a counted pass asks no module rule")

    monkeypatch.setattr(shapes, "module_shape", no_module_rule)
    assert count(counted=True) == everything > 0
    assert sum(a is not None for a in answered) >= 3


class OwnPadding(nn.Conv2d):
    """TF-style "same" padding inside ``_conv_forward`` (as timm's ``Conv2dSame``)."""

    def _conv_forward(self, x, weight, bias):
        return F.conv2d(F.pad(x, (1, 1, 1, 1)), weight, bias, self.stride, 0, self.dilation, self.groups)


def test_a_convolution_with_its_own_conv_forward_goes_to_the_kernel():
    conv = OwnPadding(8, 8, 3, stride=2)
    assert module_shape(conv, (meta((2, 8, 9, 9)),), {}) is None


def test_tensors_recording_gradients_or_empty_go_to_the_kernel():
    """A rule's result records no gradient and picks no strides for an empty tensor: those
    inputs keep the kernel's answer (a traced ``if y.requires_grad`` reads it)."""
    x = meta((2, 49, 16))
    grad = meta((1, 49, 16)).requires_grad_()
    empty = torch.empty(2, 8, 16, device="meta")[:, :0]
    assert function_shape(operator.add, (x, grad), {}) is None
    assert function_shape(F.gelu, (grad,), {}) is None
    assert function_shape(F.layer_norm, (x, (16,), meta((16,)).requires_grad_()), {}) is None
    assert function_shape(F.relu, (empty,), {}) is None
    assert function_shape(operator.mul, (empty, 2), {}) is None
    assert function_shape(torch.roll, (empty, 1, 2), {}) is None


@pytest.mark.parametrize(
    "fn, args, kwargs",
    [
        (F.gelu, (), {"approximate": "bogus"}),
        (F.relu, (), {"foo": 1}),
        (torch.relu, (1,), {}),
        (F.layer_norm, ((16.0,),), {}),
        (operator.add, (2**64,), {}),
        (torch.roll, (2**64, 1), {}),
        (torch.mean, (1,), {"dim": 2}),
    ],
    ids=[
        "gelu-bogus",
        "relu-kwarg",
        "relu-extra",
        "norm-float",
        "add-huge",
        "roll-huge",
        "mean-dim-twice",
    ],
)
def test_a_call_the_kernel_refuses_gets_no_rule(fn, args, kwargs):
    x = meta((2, 49, 16))
    with pytest.raises((TypeError, RuntimeError, ValueError, OverflowError)):
        fn(x, *args, **kwargs)
    assert function_shape(fn, (x, *args), kwargs) is None
