"""Multiply-adds (MACs) as timm and fvcore report them: one per multiply-add of convolutions
and linear layers, for the model and for each block the plan adds."""

from __future__ import annotations

import json
import warnings
from types import SimpleNamespace

import pytest
import torch
import torchvision
from torch import nn

import attn_inject as ai
from attn_inject.search.leaderboard import Row
from attn_inject.search.records import read_trials
from attn_inject.search.study_files import DEFAULT_STUDY, StudyFiles

from .conftest import meta_model

TIMM_RESNET50_GMACS = 4.11  # timm's published results table: resnet50 at 224 px, 4.11 GMACs


def _hooked_macs(model: nn.Module, size: tuple[int, ...]) -> int:
    """Conv and linear multiply-adds from each module's weight shape and output size, counted
    with forward hooks on a meta run (independent of torch's FlopCounterMode)."""
    total = 0

    def count(module: nn.Module, _inputs: object, output: torch.Tensor) -> None:
        nonlocal total
        per_output = module.weight[0].numel()  # in_channels / groups x kernel, or in_features
        total += output.numel() * per_output

    layers = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    handles = [m.register_forward_hook(count) for m in layers]
    try:
        with torch.no_grad():
            model(torch.empty((1, *size), device="meta"))
    finally:
        for h in handles:
            h.remove()
    return total


def test_resnet50_base_macs_are_timms_published_figure_and_the_layers_sum():
    model = meta_model("timm:resnet50").eval()
    plan = ai.plan(model, "se_resnet", input_size=(3, 224, 224))
    assert plan.base_macs == _hooked_macs(model, (3, 224, 224))
    assert plan.base_macs / 1e9 == pytest.approx(TIMM_RESNET50_GMACS, rel=0.01)
    assert "MACs" in plan.table() and "FLOPs" not in plan.table()


def test_each_blocks_macs_are_its_formula():
    model = meta_model("tv:resnet18")
    c, h, w = 64, 56, 56  # layer1.0's residual branch at 224 px
    hidden = c // 16  # the excitation MLP's width, ratio 16
    k = 3  # ECA's adaptive kernel for 64 channels: int((log2 64 + 1) / 2) = 3
    expected = {
        "se": 2 * c * hidden,  # squeeze to hidden, excite back to c, on the pooled 1x1 map
        "eca": c * k,  # a k-tap 1-d convolution across the channels
        "cbam": 2 * (2 * c * hidden) + h * w * 2 * 7 * 7,  # shared MLP on avg and max; 7x7 conv 2->1
    }
    for kind, macs in expected.items():
        recipe = {"rules": [{"block": kind, "at": "residual_branch", "stages": [0]}]}
        first = ai.plan(model, recipe, input_size=(3, 224, 224))[0]
        assert (first.name, first.shape) == ("layer1.0", (c, h, w))
        assert first.macs == macs, kind


def test_plan_json_names_macs():
    plan = ai.plan(meta_model("tv:resnet18"), "se_resnet", input_size=(3, 64, 64))
    data = json.loads(json.dumps(plan.to_dict()))
    assert data["base_macs"] == plan.base_macs > 0
    assert data["macs_added"] == sum(p["macs"] for p in data["points"]) == plan.macs_added > 0
    assert not any("flops" in key for key in data) and "flops" not in data["points"][0]


def test_the_old_flop_names_warn_naming_the_new_one_and_return_twice_the_macs():
    plan = ai.plan(meta_model("tv:resnet18"), "se_resnet", input_size=(3, 64, 64))
    row = Row("se_resnet", macs_added=1234)
    for read, new, macs in (
        (lambda: plan.base_flops, "Plan.base_macs", plan.base_macs),
        (lambda: plan.flops_added, "Plan.macs_added", plan.macs_added),
        (lambda: plan[0].flops, "InsertionPoint.macs", plan[0].macs),
        (lambda: row.flops_added, "Row.macs_added", 1234),
    ):
        with pytest.warns(DeprecationWarning, match=new):
            assert read() == 2 * macs
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert plan.base_macs and plan.macs_added and plan[0].macs  # the new names are quiet


def _trial(number: int, attrs: dict) -> SimpleNamespace:
    return SimpleNamespace(
        number=number,
        state=SimpleNamespace(name="COMPLETE"),
        user_attrs={"candidate": "se", "seeds": [0], "values": [50.0], **attrs},
        system_attrs={},
    )


def test_a_study_written_in_flops_reads_as_macs(tmp_path):
    trials = [_trial(0, {"flops_added": 2000}), _trial(1, {"macs_added": 700}), _trial(2, {})]
    records, skipped = read_trials(trials, StudyFiles.of(tmp_path, DEFAULT_STUDY), {"se"})
    assert skipped == []
    assert [r.macs_added for r in records] == [1000, 700, 0]
    _, bad = read_trials([_trial(3, {"flops_added": -2})], StudyFiles.of(tmp_path, DEFAULT_STUDY), {"se"})
    assert len(bad) == 1 and "flops_added" in bad[0]


@pytest.mark.parametrize(
    "layout",
    [{}, {"layout": "NHWC"}, {"layout": "tokens", "grid": (7, 7), "prefix": 1}],
    ids=["NCHW", "NHWC", "tokens"],
)
def test_the_counter_gives_torchs_flop_counter_count_on_every_built_in_block(layout):
    from torch.utils.flop_counter import FlopCounterMode

    from attn_inject.graph.analysis import MacCounter

    shape = {"NCHW": (1, 64, 7, 7), "NHWC": (1, 7, 7, 64), "tokens": (1, 50, 64)}[
        layout.get("layout", "NCHW")
    ]
    counted = 0
    for kind in (k for k in ai.list_blocks() if not k.startswith("timm:")):
        with torch.device("meta"):
            block = ai.create_block(kind, 64, **layout).eval()
        x = torch.empty(shape, device="meta")
        with MacCounter() as ours:
            block(x)
        with FlopCounterMode(display=False) as torchs:
            block(x)
        assert ours.total_macs() == torchs.get_total_flops() // 2, kind
        counted += ours.total_macs() > 0
    assert counted >= 3  # the blocks with convolutions or linear layers were counted


def test_a_built_in_kind_registered_again_is_counted_afresh_not_from_the_kept_costs():
    from attn_inject.blocks import SqueezeExcite

    model = torchvision.models.resnet18()
    built_in = ai.plan(model, "se_resnet", input_size=(3, 64, 64))
    ai.register_block(
        "se", lambda channels, **kw: SqueezeExcite(channels, **{**kw, "ratio": 4}), overwrite=True
    )
    try:
        wider = ai.plan(model, "se_resnet", input_size=(3, 64, 64))
    finally:
        ai.unregister_block("se")  # the built-in factory back
    assert [p.macs for p in wider] != [p.macs for p in built_in]
    assert [p.params for p in wider] != [p.params for p in built_in]
    assert [p.macs for p in ai.plan(model, "se_resnet", input_size=(3, 64, 64))] == [p.macs for p in built_in]


# Every option of the built-in blocks that changes a layer, at each layout, for the closed forms.
BUILT_IN_OPTIONS = {
    "se": [{}, {"pool": "max"}, {"ratio": 4, "bias": False}, {"divisor": 8}],
    "eca": [{}, {"kernel_size": 5}, {"gamma": 1, "b": 2}],
    "cbam": [
        {},
        {"ratio": 8, "bias": False, "divisor": 8},
        {"spatial_kernel": 3},
        {"channel": "conv", "spatial_norm": True},
        {"channel": "conv", "kernel_size": 5},
    ],
    "simam": [{}],
}
BLOCK_LAYOUTS = [
    ((48, 9, 7), {}),
    ((9, 7, 48), {"layout": "NHWC"}),
    ((1 + 9 * 7, 48), {"layout": "tokens", "prefix": 1, "grid": (9, 7)}),
    ((63, 48), {"layout": "tokens", "grid": (9, 7), "order": list(range(62, -1, -1))}),
    ((3, 21, 48), {"layout": "tokens", "grid": (9, 7)}),  # Nest's (B, T, N, C) tokens
    ((2 + 20, 48), {"layout": "tokens", "prefix": 2}),  # SE, ECA and SimAM pool the tokens
]


def _built_in_blocks():
    for kind, options in BUILT_IN_OPTIONS.items():
        for params in options:
            for shape, layout in BLOCK_LAYOUTS:
                if kind == "cbam" and "grid" not in layout and layout.get("layout") == "tokens":
                    continue  # CBAM's spatial map needs the grid
                for init in ("paper", "identity"):
                    with torch.device("meta"):
                        block = ai.create_block(kind, 48, init=init, **params, **layout)
                    yield f"{kind} {params} {layout.get('layout', 'NCHW')} {init}", block.train(), shape


def test_each_built_in_blocks_closed_form_count_is_what_the_counter_counts_running_it():
    from attn_inject.blocks.costs import closed_form_macs
    from attn_inject.graph.analysis import MacCounter

    seen = 0
    for label, block, shape in _built_in_blocks():
        with MacCounter() as counter:
            block(torch.empty((2, *shape), device="meta"))
        assert closed_form_macs(block, shape) == counter.total_macs() // 2, label  # per sample
        seen += 1
    assert seen == 2 * (4 + 3 + 1) * len(BLOCK_LAYOUTS) + 2 * 5 * (len(BLOCK_LAYOUTS) - 1)


def test_the_closed_forms_leave_out_only_operators_the_counter_counts_nothing_of():
    from torch.utils._python_dispatch import TorchDispatchMode

    from attn_inject.blocks.costs import COUNTED, UNCOUNTED
    from attn_inject.blocks.proof import run_block

    ran: set = set()

    class Recording(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            ran.add(func._overloadpacket)
            return func(*args, **(kwargs or {}))

    for label, block, shape in _built_in_blocks():
        with Recording():  # in training, with gradients, and as the planner runs it
            block(torch.empty((2, *shape), device="meta"))
            run_block(block, torch.empty((1, *shape), device="meta"), label)
    assert ran - UNCOUNTED == COUNTED


@pytest.mark.parametrize("change", ["sigmoid counted", "convolution's formula replaced"])
def test_a_formula_the_closed_forms_do_not_know_has_the_blocks_counted_by_running(change):
    from torch.utils.flop_counter import flop_registry

    from attn_inject.core.kept import forget_kept_results

    model = meta_model("tv:resnet18")
    recipe = {"rules": [{"block": "cbam", "at": "residual_branch", "stages": [0]}]}
    closed = ai.plan(model, recipe, input_size=(3, 64, 64))[0]
    c, h, w = closed.shape
    aten = torch.ops.aten
    op = aten.sigmoid if change == "sigmoid counted" else aten.convolution
    saved = flop_registry.get(op)
    flop_registry[op] = lambda *args, out_val, **kwargs: 2 * out_val.numel()
    try:
        counted = ai.plan(model, recipe, input_size=(3, 64, 64))[0]
    finally:
        if saved is None:
            del flop_registry[op]
        else:
            flop_registry[op] = saved
        forget_kept_results()
    hidden = c // 16
    if op is aten.sigmoid:  # one more per channel and per position: the two gates
        assert counted.macs == closed.macs + c + h * w
    else:  # one per output value of each convolution: the MLP's 1x1s on two descriptors, the 7x7
        assert closed.macs == 2 * (2 * c * hidden) + h * w * 2 * 7 * 7
        assert counted.macs == 2 * (hidden + c) + h * w


def test_a_registered_factory_of_a_built_in_class_is_counted_by_running_its_block():
    """A factory may hand back a built-in class with other layers in it: no closed form then."""
    from attn_inject.blocks import SqueezeExcite

    def wider(channels, **kwargs):
        block = SqueezeExcite(channels, **kwargs)
        hidden = block.fc2.in_channels
        block.fc1 = nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1), nn.Conv2d(channels, hidden, 1))
        return block

    model = meta_model("tv:resnet18")
    recipe = {"rules": [{"block": "se_wider", "at": "residual_branch", "stages": [0]}]}
    ai.register_block("se_wider", wider)
    try:
        point = ai.plan(model, recipe, input_size=(3, 64, 64))[0]
    finally:
        ai.unregister_block("se_wider")
    c, hidden = point.channels, point.channels // 16
    assert point.macs == c * c * 9 + c * hidden + hidden * c
