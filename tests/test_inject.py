"""Injection: function preservation, learning, and everything users do with a model next."""

from __future__ import annotations

import copy
import io

import pytest
import timm
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import attn_inject as ai

from .conftest import SIZE, blocks_of, meta_model
from .test_tokens import BUT_EXPORT

MODELS = [
    "tv:resnet18",
    "tv:resnet50",
    "timm:resnet50",
    "timm:convnext_tiny",
    "timm:efficientnet_b0",
    "timm:mobilenetv3_large_100",
    "timm:densenet121",
]
RECIPES = ai.list_recipes()
RESIDUAL_RECIPES = {
    "se_resnet",
    "eca_resnet",
    "cbam_resnet",
    "se_pre",
    "se_post",
    "se_identity",
    "gc_resnet",
    "coord_resnet",
}


def _input(batch: int = 2) -> torch.Tensor:
    return torch.randn((batch, *SIZE), generator=torch.Generator().manual_seed(1))


def _identity_cases() -> list:
    """Every model with every recipe; the default run keeps a covering set (each recipe on one
    model with residual units, turn by turn, so each of those models takes one or two recipes;
    DenseNet, which has none, with a residual recipe that has a fallback, one that has none and
    a stage recipe), the rest run with ``-m zoo``."""
    with_units = [m for m in MODELS if m != "timm:densenet121"]
    kept = {(with_units[i % len(with_units)], r) for i, r in enumerate(RECIPES)}
    kept |= {("timm:densenet121", r) for r in ("cbam_resnet", "se_pre", "cbam_after_every_stage")}
    return [
        pytest.param(name, recipe, marks=() if (name, recipe) in kept else pytest.mark.zoo)
        for name in MODELS
        for recipe in RECIPES
    ]


@pytest.mark.parametrize(("name", "recipe"), _identity_cases())
def test_identity_init_preserves_outputs(build, name, recipe):
    model = build(name)
    patched = ai.inject(model, recipe, input_size=SIZE, allow_empty=True)
    plan = patched.attn_inject.plan
    residual_free = name == "timm:densenet121" and recipe in RESIDUAL_RECIPES
    has_fallback = bool(ai.load_recipe(recipe).fallback)
    assert (len(plan) == 0) == (residual_free and not has_fallback)
    assert plan.used_fallback == (residual_free and has_fallback)
    if plan.used_fallback:  # DenseNet: no residual unit, so after every convolution's activation
        assert {p.position for p in plan} == {"conv_output"}
    x = _input()
    with torch.no_grad():
        reference, output = model(x), patched(x)
    assert (output - reference).abs().max() <= 1e-5 * reference.abs().max()


@pytest.mark.parametrize(
    "name, recipe, expected",
    [
        ("tv:resnet50", "se_resnet", 28_088_024),
        ("tv:resnet50", "cbam_resnet", 28_089_592),
        ("timm:resnet50d", "eca_resnet", 25_576_350),
    ],
)
def test_paper_init_parameter_counts_match_the_papers(name, recipe, expected):
    patched = ai.inject(meta_model(name), recipe, init="paper")
    assert sum(p.numel() for p in patched.parameters()) == expected


def test_identity_init_adds_one_scalar_per_attention_map():
    base = ai.inject(meta_model("tv:resnet50"), "cbam_resnet", init="paper")
    identity = ai.inject(meta_model("tv:resnet50"), "cbam_resnet")
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(identity) - count(base) == 16 * 2


def _assert_equals_timm_model(base: nn.Module, recipe: str, reference: str) -> None:
    """The patched model has exactly the keys and shapes of timm's hand-built model; timm's
    weights load into it strictly and both compute the same, where the blocks change what
    the base model computes."""
    patched = ai.inject(base, recipe, init="paper", input_size=SIZE)
    torch.manual_seed(0)
    model = timm.create_model(reference).eval()
    theirs = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    ours = {k: tuple(v.shape) for k, v in patched.state_dict().items()}
    assert ours == theirs
    with torch.no_grad():  # timm starts each branch's last BatchNorm at zero: its block would add nothing
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.weight.uniform_(0.5, 1.5)
    patched.load_state_dict(model.state_dict(), strict=True)
    base.load_state_dict({k: v for k, v in model.state_dict().items() if k in base.state_dict()})
    x = _input()
    with torch.no_grad():
        torch.testing.assert_close(patched(x), model(x), rtol=1e-5, atol=1e-6)
        assert not torch.allclose(base(x), model(x), rtol=1e-3, atol=1e-3)  # the blocks are seen


def test_patched_resnet50_with_se_has_the_keys_and_outputs_of_timm_seresnet50(build):
    """The papers' placement reproduces timm's hand-built SE-ResNet-50, key for key."""
    _assert_equals_timm_model(build("timm:resnet50"), "se_resnet", "seresnet50")


def test_patched_resnet50d_with_eca_has_the_keys_and_outputs_of_timm_ecaresnet50d(build):
    _assert_equals_timm_model(build("timm:resnet50d"), "eca_resnet", "ecaresnet50d")


def _bottleneck_with(block, x, where, attn):
    """torchvision Bottleneck.forward written out, with ``attn`` applied at ``where``."""
    identity = x
    branch_in = attn(x) if where == "pre_block" else x
    out = block.relu(block.bn1(block.conv1(branch_in)))
    out = block.relu(block.bn2(block.conv2(out)))
    out = block.bn3(block.conv3(out))
    if where == "residual_branch":
        out = attn(out)
    if block.downsample is not None:
        identity = block.downsample(x)
    if where == "identity_branch":
        identity = attn(identity)
    out = out + identity
    if where == "post_block":
        out = attn(out)
    return block.relu(out)


@pytest.mark.parametrize(
    "recipe, where",
    [
        ("se_resnet", "residual_branch"),
        ("se_pre", "pre_block"),
        ("se_post", "post_block"),
        ("se_identity", "identity_branch"),
    ],
)
def test_positions_match_a_hand_built_resnet(build, recipe, where):
    """SENet Table 14's placements, against torchvision's ResNet-50 written out by hand."""
    model = build("tv:resnet50")
    patched = ai.inject(model, recipe, init="paper", input_size=SIZE)
    blocks = iter(blocks_of(patched).values())
    x = _input()
    with torch.no_grad():
        h = model.maxpool(model.relu(model.bn1(model.conv1(x))))
        for layer in (model.layer1, model.layer2, model.layer3, model.layer4):
            for block in layer:
                h = _bottleneck_with(block, h, where, next(blocks))
        expected = model.fc(torch.flatten(model.avgpool(h), 1))
        torch.testing.assert_close(patched(x), expected, rtol=1e-5, atol=1e-5)


def _nonzero_grads(model, steps, x, target):
    """For each of ``steps`` SGD steps, the names of block parameters that get a non-zero gradient."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    each_step = []
    for _ in range(steps):
        optimizer.zero_grad()
        F.cross_entropy(model(x), target).backward()
        named = blocks_of(model).named_parameters()
        each_step.append({n for n, p in named if p.grad is not None and p.grad.abs().sum() > 0})
        optimizer.step()
    return each_step


@pytest.mark.parametrize(
    "recipe", ["se_resnet", "eca_resnet", "cbam_resnet", "cbam_after_every_stage", "se_pre"]
)
def test_every_new_parameter_gets_a_gradient_within_two_steps(injected, recipe):
    """Identity init delays learning by at most one step. A parameter may get no gradient
    with the paper's block either (a ReLU unit of the excitation MLP dead on the whole batch
    at random init); the comparison is against the same weights at blend = 1, the paper block."""
    x, target = _input(4), torch.tensor([0, 1, 2, 3])
    _, patched = injected("tv:resnet18", recipe, SIZE)
    patched.train()
    as_paper = copy.deepcopy(patched)
    with torch.no_grad():
        for name, p in blocks_of(as_paper).named_parameters():
            if name.endswith("blend"):
                p.fill_(1.0)
    (learns_as_paper,) = _nonzero_grads(as_paper, 1, x, target)
    learns_as_paper -= {n for n in dict(blocks_of(as_paper).named_parameters()) if n.endswith("blend")}
    blends = {n for n in dict(blocks_of(patched).named_parameters()) if n.endswith("blend")}
    inner = set(dict(blocks_of(patched).named_parameters())) - blends
    assert len(learns_as_paper) >= 0.8 * len(inner)  # the comparison is not vacuous
    first_step, second_step = _nonzero_grads(patched, 2, x, target)
    assert first_step >= blends
    seen = first_step | second_step
    assert seen >= blends | learns_as_paper, sorted(blends | learns_as_paper - seen)


def test_state_dict_keeps_every_original_key(build):
    model = build("timm:efficientnet_b0")
    patched = ai.inject(model, "cbam_resnet", input_size=SIZE)
    original_keys = list(model.state_dict())
    patched_keys = list(patched.state_dict())
    assert set(original_keys) <= set(patched_keys)
    blocks = tuple(f"{name}." for name in ai.inserted_blocks(patched))
    assert all(k.startswith(blocks) for k in set(patched_keys) - set(original_keys))
    result = patched.load_state_dict(model.state_dict(), strict=False)
    assert result.unexpected_keys == []
    assert set(result.missing_keys) == set(patched_keys) - set(original_keys)


def test_original_model_keeps_working_unchanged(build):
    model = build("tv:resnet18")
    x = _input()
    with torch.no_grad():
        before = model(x)
    keys = list(model.state_dict())
    ai.inject(model, "cbam_resnet", init="paper", input_size=SIZE)
    with torch.no_grad():
        torch.testing.assert_close(model(x), before, rtol=0, atol=0)
    assert list(model.state_dict()) == keys
    assert type(model).__name__ == "ResNet" and not any(
        getattr(m, "_attn_inject_block", False) for m in model.modules()
    )


class _KeepsState(nn.Module):
    """A forward that keeps state the ways models do: a counter buffer, a private counter, a
    private cache filled on first use, a public list, a private dict, a buffer registered on
    first use."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("seen", torch.zeros(()))
        self.register_buffer("seen_through_data", torch.zeros(()))
        self._calls = 0
        self._scale: torch.Tensor | None = None
        self.shapes: list[tuple[int, ...]] = []
        self._by_size: dict[int, int] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.add_(1)
        self.seen_through_data.data += 1  # moves no version counter
        self._calls += 1
        if not hasattr(self, "_grid"):
            self._grid = x.shape[-2:]
        if self._scale is None:
            self._scale = torch.ones(x.shape[1], 1, 1, device=x.device, dtype=x.dtype)
        self.shapes.append(tuple(x.shape))
        self._by_size[x.shape[-1]] = 1
        if "table" not in self._buffers:
            self.register_buffer("table", torch.ones(1, device=x.device), persistent=False)
        return x * self._scale * self.table


class _StatefulNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.state = _KeepsState()
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(torch.relu(self.state(torch.relu(self.conv1(x)))))


@pytest.mark.parametrize("leaf", [False, True], ids=["traced", "leaf"])
def test_a_forward_that_keeps_state_leaves_the_input_model_as_it_was(leaf):
    """Tracing runs a traced module's code on proxies and the meta pass runs a leaf's on meta
    inputs with its own buffers: neither may leave a write in the model the user holds."""
    model = _StatefulNet().eval()
    if leaf:
        ai.register_leaf_module(_KeepsState)
    recipe = {"rules": [{"block": "se", "at": "conv_output"}]}
    try:
        ai.plan(model, recipe, input_size=(3, 16, 16))
        ai.inject(model, recipe, init="identity", input_size=(3, 16, 16))
    finally:
        if leaf:
            ai.unregister_leaf_module(_KeepsState)
    ai.plan(model, "se_resnet", input_size=(3, 16, 16), allow_empty=True) if False else None
    state = model.state
    assert state.seen.item() == 0 and state.seen_through_data.item() == 0
    assert state._calls == 0 and state._scale is None and not hasattr(state, "_grid")
    assert state.shapes == [] and state._by_size == {} and "table" not in state._buffers
    with torch.no_grad():
        model(torch.randn(1, 3, 16, 16))  # runs as a model never injected into
    assert state.seen.item() == 1 and state._scale.device.type == "cpu" and state.shapes == [(1, 8, 16, 16)]


class _PlainScale(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x) * torch.full((1, 8, 1, 1), 2.0)  # made of constants: fx keeps the tensor


def test_the_constants_fx_keeps_on_a_traced_module_are_not_left_on_the_input_model():
    """fx keeps a tensor it meets as ``_tensor_constant<i>`` on the module it traces: the
    patched model has it, the input model gets none, however many calls."""
    model = _PlainScale().eval()
    recipe = {"rules": [{"block": "se", "at": "conv_output"}]}
    for _ in range(2):
        plan = ai.plan(model, recipe, input_size=(3, 8, 8))
        patched = ai.inject(model, recipe, init="identity", input_size=(3, 8, 8))
    assert not [key for key in vars(model) if key.startswith("_tensor_constant")]
    # the multiply-add count, made later from the graph, still reads the constant
    assert plan.base_macs == patched.attn_inject.plan.base_macs == 8 * 3 * 9 * 8 * 8
    x = torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(patched(x), model(x))


def test_a_model_made_in_inference_mode_injects_exact():
    """Tensors made under ``torch.inference_mode`` keep no version counter: buffers the traced
    code reads (torchvision's FrozenBatchNorm2d) are kept for undoing without one."""
    with torch.inference_mode():
        model = (
            torchvision.models.resnet18(norm_layer=torchvision.ops.FrozenBatchNorm2d).eval().double().float()
        )
    patched = ai.inject(model, "se_resnet", init="identity", input_size=(3, 32, 32))
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(patched(x), model(x))


def test_meta_device_model_injects_without_allocating():
    patched = ai.inject(meta_model("timm:resnet50"), "cbam_after_every_stage")
    assert all(p.is_meta for p in patched.parameters())
    patched.to_empty(device="cpu")
    assert patched(torch.randn(1, 3, 64, 64)).shape == (1, 1000)


def test_timm_metadata_survives(build):
    model = build("timm:resnet50")
    patched = ai.inject(model, "se_resnet", input_size=SIZE)
    assert patched.pretrained_cfg == model.pretrained_cfg
    assert patched.num_classes == 1000
    assert patched.feature_info == model.feature_info
    assert patched.attn_inject.plan.model_name == "resnet50"


def test_replacing_the_classifier_head(build):
    patched = ai.inject(build("timm:resnet50"), "se_resnet", input_size=SIZE)
    patched.fc = nn.Linear(patched.num_features, 10)
    assert patched(_input()).shape == (2, 10)
    assert "fc.weight" in patched.state_dict() and patched.state_dict()["fc.weight"].shape == (10, 2048)


def test_deepcopy_and_whole_model_pickling_keep_behaviour(build):
    model = build("timm:resnet50")
    patched = ai.inject(model, "cbam_resnet", init="paper", input_size=SIZE)
    x = _input()
    with torch.no_grad():
        expected = patched(x)
    clone = copy.deepcopy(patched)
    buffer = io.BytesIO()
    torch.save(patched, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    for other in (clone, loaded):
        with torch.no_grad():
            torch.testing.assert_close(other.eval()(x), expected, rtol=0, atol=0)
        assert other.attn_inject.plan == patched.attn_inject.plan
        assert other.pretrained_cfg == model.pretrained_cfg
        assert list(other.state_dict()) == list(patched.state_dict())


def test_dtype_device_and_mode_changes_apply_to_blocks(build):
    patched = ai.inject(
        build("tv:resnet18"),
        {"rules": [{"block": {"kind": "cbam", "spatial_norm": True}, "at": "stage_output"}]},
        input_size=SIZE,
    )
    patched.train()
    inside = lambda: [m for b in ai.inserted_blocks(patched).values() for m in b.modules()]  # noqa: E731
    assert all(m.training for m in inside())
    patched.eval()
    assert not any(m.training for m in inside())
    patched.double()
    assert all(p.dtype == torch.float64 for p in blocks_of(patched).parameters())
    assert patched(_input().double()).dtype == torch.float64
    patched.half()
    assert all(p.dtype == torch.float16 for p in patched.parameters())


def test_channels_last_model_gives_same_outputs(build):
    model = build("tv:resnet18")
    patched = ai.inject(model, "cbam_resnet", init="paper", input_size=SIZE)
    x = _input()
    with torch.no_grad():
        expected = patched(x)
        patched = patched.to(memory_format=torch.channels_last)
        torch.testing.assert_close(
            patched(x.to(memory_format=torch.channels_last)), expected, rtol=1e-4, atol=1e-4
        )


def test_empty_plan_raises_unless_allowed(build):
    model = meta_model("timm:densenet121")
    with pytest.raises(
        ai.InjectError,
        match=r"matches nothing in densenet121 .*: the model has no pre_block\. .*allow_empty=True",
    ):
        ai.inject(model, "se_pre")
    patched = ai.inject(model, "se_pre", allow_empty=True)
    assert ai.inserted_blocks(patched) == {}


def test_patched_model_can_be_patched_again(injected):
    model, once = injected("tv:resnet18", "se_resnet", SIZE)
    twice = ai.inject(once, "cbam_after_every_stage", input_size=SIZE)
    assert len(ai.inserted_blocks(twice)) == 8 + 4
    x = _input()
    with torch.no_grad():
        torch.testing.assert_close(twice(x), model(x), rtol=0, atol=0)


def test_block_parameters_are_the_new_ones(injected):
    _, patched = injected("tv:resnet18", "se_resnet", SIZE)
    new = {id(p) for p in ai.block_parameters(patched)}
    assert new == {id(p) for p in blocks_of(patched).parameters()}
    assert sum(p.numel() for p in ai.block_parameters(patched)) == patched.attn_inject.plan.params_added


def test_validate_reports_identity_and_parameter_counts(build):
    """Every default check but export, which test_export.py runs on this recipe and block
    design (cbam_resnet on resnet10t's basic blocks, at the paper's init): seconds an export."""
    model = build("tv:resnet18")
    report = ai.validate(
        model,
        ai.inject(model, "cbam_resnet", input_size=SIZE),
        input_size=SIZE,
        device="cpu",
        checks=BUT_EXPORT,
    )
    assert report.passed and report.identity_ok and report.params_ok and report.max_abs_diff == 0
    paper = ai.validate(
        model,
        ai.inject(model, "cbam_resnet", init="paper", input_size=SIZE),
        input_size=SIZE,
        device="cpu",
        checks=BUT_EXPORT,
    )
    assert paper.max_abs_diff > 0 and not paper.identity_expected and paper.passed


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_validate_runs_on_cuda(build):
    model = build("tv:resnet18")
    report = ai.validate(
        model, ai.inject(model, "cbam_resnet", input_size=SIZE), input_size=SIZE, device="cuda"
    )
    assert report.device.startswith("cuda") and report.passed, str(report)


def test_a_residual_free_model_gets_the_recipes_fallback_and_round_trips(build, tmp_path):
    model = build("timm:mobilenetv1_100")  # no residual unit: depthwise-separable convolutions only
    patched = ai.inject(model, "se_resnet", input_size=SIZE)
    plan = patched.attn_inject.plan
    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    assert plan.used_fallback and plan.to_dict()["used_fallback"]
    assert [p.name for p in plan] == convs  # SE after the activation of every convolution
    assert {p.position for p in plan} == {"conv_output"} and all(p.rule == 1 for p in plan)
    assert "the recipe's fallback rules placed these" in plan.table()
    assert type(patched) is type(model)
    x = _input()
    with torch.no_grad():
        assert torch.equal(patched(x), model(x))
    path = tmp_path / "mobilenet_se.safetensors"
    ai.save(patched, path, model_name="timm:mobilenetv1_100")
    loaded = ai.load(path)
    assert loaded.state_dict().keys() == patched.state_dict().keys()
    assert [p.key for p in loaded.attn_inject.plan] == [p.key for p in plan]
    with torch.no_grad():
        assert torch.equal(loaded.eval()(x), patched(x))
    # a second residual recipe on the same model falls back again, next to the first blocks
    twice = ai.inject(patched, "eca_resnet", input_size=SIZE, allow_empty=True)
    assert len(twice.attn_inject.plans[-1]) == 0  # every conv output already holds a block
    assert twice.attn_inject.plan.used_fallback  # the merged plan still says so
