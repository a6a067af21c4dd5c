"""The patched model stays the user's model: its class, methods and code, with each block a
child of the module where it acts; only modules that hold an insertion point are rewritten."""

from __future__ import annotations

import copy
import io
import warnings

import pytest
import timm
import torch
import torchvision
from torch import fx, nn
from torch.autograd.graph import saved_tensors_hooks

import attn_inject as ai

from .conftest import SIZE, meta_model

X = torch.randn(2, *SIZE, generator=torch.Generator().manual_seed(0))


def _rewritten(patched: nn.Module) -> set[str]:
    """The modules whose forward is a rewritten graph (every other one runs its own code)."""
    return {name for name, m in patched.named_modules() if ai.has_rewritten_forward(m)}


def _changed(patched: nn.Module) -> set[str]:
    """The modules surgery changed: each an instance of a generated subclass of its class."""
    return {name for name, m in patched.named_modules() if type(m) is not ai.base_class(m)}


@pytest.mark.parametrize(
    "name, recipe",
    [
        ("timm:resnet26", "se_resnet"),  # resnet50's bottlenecks, two a stage
        ("timm:convnext_atto", "cbam_after_every_stage"),  # ConvNeXt, narrow and shallow
        ("timm:efficientnet_b0", "se_resnet"),
        ("tv:resnet50", "cbam_resnet"),
        ("tv:mobilenet_v3_small", "eca_after_every_stage"),
    ],
)
def test_model_keeps_its_class_methods_and_outputs(build, name, recipe):
    model = build(name)
    patched = ai.inject(model, recipe, input_size=SIZE)
    assert type(patched) is type(model)
    assert patched is not model
    assert not isinstance(patched, fx.GraphModule)
    with torch.no_grad():
        assert torch.equal(patched(X), model(X))
    blocks = ai.inserted_blocks(patched)
    assert list(blocks) == [p.key for p in patched.attn_inject.plan]
    for key in blocks:  # each block is a child of the module where it acts
        parent, _, child = key.rpartition(".")
        assert child in dict(patched.get_submodule(parent).named_children())
    # only modules that run a block were rewritten, and the model's own code was not
    assert _rewritten(patched) == {p.owner for p in patched.attn_inject.plan if p.attach == "graph"}
    assert "" not in _rewritten(patched)
    originals = dict(model.named_modules())
    for name in _changed(patched):  # a changed module is still an instance of its own class
        assert isinstance(patched.get_submodule(name), type(originals[name]))
        assert type(patched.get_submodule(name)).__name__ == type(originals[name]).__name__
    if name.startswith("timm:"):
        with torch.no_grad():
            features = patched.forward_features(X)
            torch.testing.assert_close(patched.forward_head(features), patched(X), rtol=0, atol=0)
        assert patched.get_classifier() is model.get_classifier()
        assert patched.group_matcher() == model.group_matcher()
        if hasattr(model, "no_weight_decay"):
            assert patched.no_weight_decay() == model.no_weight_decay()


def test_resnet50_blocks_sit_where_timm_seresnet50_has_them(build):
    patched = ai.inject(build("timm:resnet50"), "se_resnet", input_size=SIZE)
    assert list(ai.inserted_blocks(patched))[:4] == [
        "layer1.0.se",
        "layer1.1.se",
        "layer1.2.se",
        "layer2.0.se",
    ]
    assert "(se): SqueezeExcite(" in repr(patched.layer1[0])
    assert [p.attach for p in patched.attn_inject.plan] == ["slot"] * 16  # timm's own `se` slot
    assert _changed(patched) == set()  # the bottlenecks' own code calls the blocks
    paper = ai.inject(build("timm:resnet50"), "se_resnet", init="paper", input_size=SIZE)
    assert set(paper.state_dict()) == set(meta_model("timm:seresnet50").state_dict())
    stages = ai.inject(build("timm:resnet50"), "cbam_after_every_stage", input_size=SIZE)
    # each stage's last block runs it after its own forward: the stages keep their length
    assert list(ai.inserted_blocks(stages)) == [
        "layer1.2.cbam",
        "layer2.3.cbam",
        "layer3.5.cbam",
        "layer4.2.cbam",
    ]
    assert [p.attach for p in stages.attn_inject.plan] == ["after"] * 4  # no code rewritten at all
    assert _rewritten(stages) == set()
    assert [len(getattr(stages, f"layer{i}")) for i in (1, 2, 3, 4)] == [3, 4, 6, 3]


def test_rule_name_key_names_the_block():
    recipe = {"rules": [{"block": "eca", "at": "residual_branch", "name": "attn"}]}
    patched = ai.inject(meta_model("tv:resnet18"), recipe)  # after bn2, a child of it
    assert list(ai.inserted_blocks(patched))[:2] == ["layer1.0.bn2.attn", "layer1.1.bn2.attn"]
    with pytest.raises(ai.RecipeError, match=r"rules\[0\]\.name"):
        ai.load_recipe({"rules": [{"block": "se", "at": "post_block", "name": "not an identifier"}]})


def test_reset_classifier_and_head_swap_work(build):
    patched = ai.inject(build("timm:resnet18"), "se_resnet", input_size=SIZE)
    patched.reset_classifier(10)
    assert patched(X).shape == (2, 10)
    mobile = ai.inject(build("timm:mobilenetv3_small_050"), "se_resnet", input_size=SIZE)
    assert type(mobile.classifier).__module__.startswith("timm")  # timm's own Linear
    mobile.classifier = nn.Identity()
    assert mobile(X).shape == (2, mobile.head_hidden_size)


def test_layer_decay_groups_like_the_original_with_blocks_in_their_layers(build):
    from timm.optim import create_optimizer_v2

    model = build("timm:convnext_atto")
    patched = ai.inject(model, "se_resnet", input_size=SIZE)
    original = create_optimizer_v2(model, "adamw", lr=1e-3, layer_decay=0.75)
    ours = create_optimizer_v2(patched, "adamw", lr=1e-3, layer_decay=0.75)
    assert len(ours.param_groups) == len(original.param_groups)

    def scales(optimizer, model):
        ids = {id(p): n for n, p in model.named_parameters()}
        return {ids[id(p)]: g["lr_scale"] for g in optimizer.param_groups for p in g["params"]}

    before, after = scales(original, model), scales(ours, patched)
    assert all(after[n] == s for n, s in before.items())  # every original parameter keeps its scale
    for key in ai.inserted_blocks(patched):  # a block gets the scale of the module it acts in
        host = key.rpartition(".")[0]
        block_scales = {s for n, s in after.items() if n.startswith(key + ".")}
        host_scales = {s for n, s in before.items() if n.startswith(host + ".")}
        assert block_scales and block_scales <= host_scales


def test_dropout_in_the_models_own_forward_still_trains():
    model = timm.create_model("resnet18", drop_rate=0.3)
    patched = ai.inject(model, "cbam_after_every_stage", input_size=SIZE)
    model.train(), patched.train()
    torch.manual_seed(1)
    expected = model(X)
    torch.manual_seed(1)
    assert torch.equal(patched(X), expected)
    torch.manual_seed(2)
    assert not torch.equal(patched(X), expected)  # dropout is live: another draw differs


def _saved_tensors(model: nn.Module) -> tuple[int, dict[str, torch.Tensor]]:
    count = 0

    def pack(t):
        nonlocal count
        count += 1
        return t

    model.zero_grad()
    torch.manual_seed(0)
    with saved_tensors_hooks(pack, lambda t: t):
        model(X).square().mean().backward()
    return count, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("when", ["before", "after"])
def test_gradient_checkpointing_still_checkpoints(build, when):
    model = build("timm:resnet18").train()
    plain = ai.inject(copy.deepcopy(model), "se_resnet", init="paper", input_size=SIZE).train()
    if when == "before":
        model.set_grad_checkpointing(True)
    patched = ai.inject(model, "se_resnet", init="paper", input_size=SIZE).train()
    patched.load_state_dict(plain.state_dict())
    if when == "after":
        patched.set_grad_checkpointing(True)
    saved_plain, grads_plain = _saved_tensors(plain)
    saved, grads = _saved_tensors(patched)
    assert saved < saved_plain / 2
    assert grads.keys() == grads_plain.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, grads_plain[name], rtol=1e-5, atol=1e-6)


def test_densenet_with_checkpointing_on_can_be_injected():
    model = timm.create_model("densenet121")
    model.set_grad_checkpointing(True)
    patched = ai.inject(model, "cbam_after_every_stage", input_size=SIZE)
    with torch.no_grad():
        assert torch.equal(patched.eval()(X), model.eval()(X))


def test_hooks_on_untouched_modules_keep_firing(build):
    model = build("timm:resnet18")
    seen = []
    model.layer4.register_forward_hook(lambda m, a, out: seen.append(out.shape))
    handle = model.layer2.register_forward_hook(lambda m, a, out: out * 0.5)
    patched = ai.inject(model, "cbam_after_every_stage", input_size=SIZE)
    with torch.no_grad():
        halved = patched(X)
        assert len(seen) == 1
        handle.remove()
        assert not torch.equal(patched(X), halved)  # removing the hook removes its effect
        assert torch.equal(patched(X), model(X))
    assert len(seen) == 4  # three patched forwards and one original: never at inject time


def test_hook_inside_a_rewritten_module_is_refused_by_name(build):
    model = build("tv:resnet18")
    model.layer1[0].register_forward_hook(lambda m, a, out: out)  # hooks on the scope itself are kept
    model.layer1[1].bn2.register_forward_hook(lambda m, a, out: out * 2)  # a leaf: still called
    patched = ai.inject(model, "se_resnet", input_size=SIZE)
    with torch.no_grad():
        assert torch.equal(patched(X), model(X))
    nested = nn.Sequential(nn.Conv2d(3, 8, 3), _Unit(8)).eval()
    seen = []
    nested[1].inner.register_forward_hook(lambda m, a, out: seen.append(1))  # kept whole in unit 1
    patched_nested = ai.inject(nested, "se_resnet", input_size=SIZE)
    assert _rewritten(patched_nested) == set()  # the block runs after 1.conv, the unit's code as written
    with torch.no_grad():
        patched_nested(X)
    assert seen == [1]
    twice = nn.Sequential(nn.Conv2d(3, 8, 3), _TwiceUnit(8)).eval()
    twice[1].inner.register_forward_hook(lambda m, a, out: out)  # called twice: its code is inlined
    with pytest.raises(ai.InjectError, match=r"module '1\.inner' has hooks"):
        ai.inject(twice, "se_resnet", input_size=SIZE)


class _Inner(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)
        self.bn = nn.BatchNorm2d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x)) * 1.0


class _Unit(nn.Module):
    """A residual unit whose branch is traced through a submodule."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.inner = _Inner(c)
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.conv(self.inner(x)) + x)


class _TwiceUnit(nn.Module):
    """A residual unit whose branch calls one submodule twice and ends in a function: the
    block can only be run by the unit's rewritten forward, which inlines the submodule."""

    def __init__(self, c: int, inner: type[nn.Module] = _Inner) -> None:
        super().__init__()
        self.inner = inner(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.inner(self.inner(x)) * 0.5 + x)


class _TrainingInner(_Inner):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.dropout(self.bn(self.conv(x)), 0.5, self.training)


class _SharedUnit(nn.Module):
    """The same unit called twice: a block inside it would act at both calls."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.unit = _Unit(16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.unit(self.unit(self.stem(x)))


def test_scope_called_twice_falls_back_to_a_wider_one_and_says_why():
    model = _SharedUnit().eval()
    patched = ai.inject(model, "se_resnet", init="paper", input_size=SIZE)
    plan = patched.attn_inject.plan
    assert len(plan) == 2
    assert {p.owner for p in plan} == {""}
    assert all("unit is called 2 times" in p.scope_note for p in plan)
    with torch.no_grad():
        se, se_2 = patched.se, patched.se_2
        h = model.stem(X)
        h = torch.relu(se(model.unit.conv(model.unit.inner(h))) + h)
        expected = torch.relu(se_2(model.unit.conv(model.unit.inner(h))) + h)
        torch.testing.assert_close(patched(X), expected)


def test_patched_model_traces_again_and_computes_the_same(build):
    patched = ai.inject(build("timm:resnet18"), "cbam_resnet", init="paper", input_size=SIZE)
    traced = fx.symbolic_trace(patched)
    with torch.no_grad():
        assert torch.equal(traced(X), patched(X))
    graph = ai.plan(patched, "se_after_every_stage", input_size=SIZE)  # blocks are leaves to our tracer
    assert len(graph) == 4


def test_inject_twice_then_save_load_validate(build, tmp_path):
    model = build("timm:resnet18")
    once = ai.inject(model, "se_resnet", input_size=SIZE)
    twice = ai.inject(once, "cbam_after_every_stage", input_size=SIZE)
    plan = twice.attn_inject.plan
    assert [p.key for p in plan] == [p.key for p in once.attn_inject.plan] + [
        f"layer{i}.1.cbam" for i in (1, 2, 3, 4)
    ]
    assert plan.recipe.name == "se_resnet + cbam_after_every_stage"
    again = ai.inject(twice, "se_resnet", input_size=SIZE, allow_empty=True)
    assert len(again.attn_inject.plans[-1]) == 0
    assert all("earlier injection" in s.reason for s in again.attn_inject.plans[-1].skipped)
    with torch.no_grad():
        for block in ai.inserted_blocks(twice).values():
            for name, p in block.named_parameters():
                if name.endswith("blend"):
                    p.fill_(0.3)
    report = ai.validate(model, twice, device="cpu", checks=("reference", "parameters", "finite"))
    assert report.passed and report.params_ok and report.finite
    ai.save(twice, tmp_path / "twice.safetensors", model_name="timm:resnet18")
    loaded = ai.load(tmp_path / "twice.safetensors")
    with torch.no_grad():
        assert torch.equal(loaded.eval()(X), twice.eval()(X))
    assert [p.key for p in loaded.attn_inject.plan] == [p.key for p in plan]


def test_torchscript_and_export_of_a_patched_model(build):
    patched = ai.inject(build("timm:resnet10t"), "se_resnet", input_size=SIZE).eval()
    with torch.no_grad():
        scripted = torch.jit.script(patched)
        assert torch.equal(scripted(X), patched(X))
        exported = torch.export.export(patched, (X,))
        torch.testing.assert_close(exported.module()(X), patched(X))


def test_whole_model_pickling_and_original_untouched(build):
    model = build("tv:resnet18")
    patched = ai.inject(model, "se_resnet", input_size=SIZE)
    assert not any(getattr(m, "_attn_inject_block", False) for m in model.modules())
    assert type(model.layer1[0]) is torchvision.models.resnet.BasicBlock
    assert model.layer1[0].conv1 is patched.layer1[0].conv1  # weights are shared, not copied
    buffer = io.BytesIO()
    torch.save(patched, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    with torch.no_grad():
        assert torch.equal(loaded(X), patched(X))
    assert list(ai.inserted_blocks(loaded)) == list(ai.inserted_blocks(patched))


def test_hook_handles_from_before_inject_remove_the_hook_from_a_rewritten_module(build):
    model = build("tv:resnet18")
    handle = model.layer1[0].register_forward_hook(lambda m, a, out: out * 0.5)
    patched = ai.inject(model, "se_resnet", input_size=SIZE)
    assert _changed(patched) >= {"layer1.0.bn2"}  # the block runs after bn2, layer1.0 is a copy
    with torch.no_grad():
        assert torch.equal(patched(X), model(X))
        handle.remove()
        assert torch.equal(patched(X), model(X))
        assert not patched.layer1[0]._forward_hooks


def test_wrapped_models_are_refused_with_how_to_unwrap(build):
    with pytest.raises(ai.PlanError, match=r"model\.module"):
        ai.inject(nn.DataParallel(build("tv:resnet18")), "se_resnet")


class _StarUnit(_Unit):
    """A residual unit whose forward takes *args: it cannot stand alone as a graph."""

    def forward(self, *xs: torch.Tensor) -> torch.Tensor:
        return super().forward(xs[0])


class _HoldsStarUnit(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.body = nn.Sequential(_StarUnit(16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(self.stem(x)).mean((2, 3))


def test_scope_that_cannot_stand_alone_falls_back_to_its_parent():
    model = _HoldsStarUnit().eval()
    patched = ai.inject(model, "se_resnet", input_size=SIZE)
    (point,) = patched.attn_inject.plan
    assert (point.owner, point.attach, point.key) == ("body.0.conv", "after", "body.0.conv.se")
    assert type(patched) is _HoldsStarUnit and _rewritten(patched) == set()
    assert isinstance(patched.body, nn.Sequential) and len(patched.body) == 1
    with torch.no_grad():
        assert torch.equal(patched(X), model(X))


class _DroppedBranch(nn.Module):
    """A branch whose own forward reads self.training (an inline dropout)."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)
        self.bn = nn.BatchNorm2d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.dropout(self.bn(self.conv(x)), 0.5, self.training)


class _DroppedUnit(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.branch = _DroppedBranch(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        return torch.relu(x + self.branch(x))


def test_a_module_reading_self_training_is_kept_whole_when_its_output_takes_the_block():
    model = nn.Sequential(_DroppedUnit(), nn.Conv2d(8, 4, 1))
    patched = ai.inject(model, "se_resnet", input_size=SIZE)
    (point,) = patched.attn_inject.plan
    assert (point.owner, point.key, point.attach) == ("0.branch", "0.branch.se", "after")
    assert _rewritten(patched) == set()  # the branch runs its own code, its dropout included
    model.train(), patched.train()
    torch.manual_seed(3)
    expected = model(X)
    torch.manual_seed(3)
    assert torch.equal(patched(X), expected)  # the dropout still drops, the same elements


def test_rewriting_code_that_reads_self_training_warns():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), _TwiceUnit(8, _TrainingInner)).eval()
    with pytest.warns(UserWarning, match=r"1\.inner.* reads self\.training"):
        patched = ai.inject(model, "se_resnet", input_size=SIZE)
    assert _rewritten(patched) == {"1"} and isinstance(patched[1], _TwiceUnit)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a block run around a module's own code bakes nothing
        ai.inject(meta_model("timm:vit_tiny_patch16_224"), "se_resnet")


def test_blocks_living_deep_in_changed_modules_leave_the_original_unchanged():
    model = meta_model("timm:convnextv2_pico")
    modules = {name: type(m) for name, m in model.named_modules()}
    patched = ai.inject(model, "se_post", input_size=SIZE)
    assert patched.attn_inject.plan and _changed(patched)
    assert {name: type(m) for name, m in model.named_modules()} == modules
    count = lambda m: sum(t.numel() for t in m.parameters())  # noqa: E731
    assert count(patched) - count(model) == patched.attn_inject.plan.params_added


class _SequentialBranchUnit(nn.Module):
    """A residual unit written in the model's own forward, whose branch is one Sequential."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.branch = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        return torch.relu(self.branch(x) + x)


def test_a_residual_branch_that_is_one_sequential_takes_the_block_as_its_last_child():
    model = _SequentialBranchUnit().eval()
    patched = ai.inject(model, "se_resnet", init="paper", input_size=SIZE)
    (point,) = patched.attn_inject.plan
    assert (point.key, point.attach) == ("branch.1.se", "after")  # after its last layer: same length
    assert type(patched) is _SequentialBranchUnit and not _rewritten(patched) and len(patched.branch) == 2
    with torch.no_grad():
        h = model.stem(X)
        torch.testing.assert_close(patched(X), torch.relu(patched.branch[1].se(model.branch(h)) + h))


class _PositionalEmbedding(nn.Module):
    """Adds an embedding built from the input's size alone (as XCiT's Fourier positions)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.pos = nn.Conv2d(2, 8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        b, _, h, w = x.shape
        grid = x.new_ones((b, 2, h, w))
        return x + self.pos(grid)


def test_a_value_built_from_the_inputs_shape_alone_is_no_residual_branch():
    plan = ai.plan(_PositionalEmbedding(), "se_resnet", input_size=SIZE)
    # the embedding does not depend on the input's values: no residual unit, so the recipe's
    # fallback places SE after the convolutions instead
    assert plan.used_fallback and [p.position for p in plan] == ["conv_output", "conv_output"]


def test_xcit_keeps_its_class_under_se_resnet():
    model = meta_model("timm:xcit_nano_12_p16_224", depth=3)
    patched = ai.inject(model, "se_resnet", input_size=SIZE)
    assert type(patched) is type(model)
    assert all(p.owner for p in patched.attn_inject.plan)


def test_normfree_blocks_without_skipinit_are_traced_through_and_keep_identity():
    model = timm.create_model("nf_resnet26").eval()
    patched = ai.inject(model, "se_resnet", input_size=SIZE)
    assert type(patched) is type(model) and patched.attn_inject.plan[0].key == "stages.0.0.conv3.se"
    with torch.no_grad():
        assert torch.equal(patched(X), model(X))


class _InPlaceGain(nn.Module):
    """A residual unit whose branch is scaled in place, as timm's NormFreeBlock skipinit."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.gain = nn.Parameter(torch.tensor(0.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv(x)
        out.mul_(self.gain)
        return x + 0.2 * out  # NFNet's alpha


def test_an_in_place_gain_on_the_branch_is_kept_in_the_data_flow():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), _InPlaceGain()).eval()
    plan = ai.plan(model, "se_resnet", input_size=SIZE)
    assert [p.position for p in plan] == ["residual_branch"]
    patched = ai.inject(model, "se_resnet", input_size=SIZE, init="paper")
    report = ai.validate(model, patched, input_size=SIZE, checks=["reference"])
    assert report.passed, report  # the block sees the scaled branch; the gain is not lost
    with torch.no_grad():
        identity = ai.inject(model, "se_resnet", input_size=SIZE)
        assert torch.equal(identity(X), model(X))


def test_normfree_blocks_with_skipinit_are_traced_through():
    model = meta_model("timm:dm_nfnet_f0")
    patched = ai.inject(model, "se_resnet", input_size=SIZE)
    assert type(patched) is type(model) and patched.attn_inject.plan[0].key == "stages.0.0.attn_last.se"
    assert not _rewritten(patched)  # its in-place skipinit scale runs as written


def test_a_pool_to_a_fixed_size_starts_the_head_so_vgg_keeps_its_class():
    model = meta_model("tv:vgg11")
    plan = ai.plan(model, "cbam_after_every_stage", input_size=(3, 224, 224))
    assert [p.key for p in plan][-1] == "features.20.cbam"  # not after the 7 x 7 adaptive pool
    assert {p.attach for p in plan} == {"after"} and "" not in {
        p.owner for p in plan
    }  # the root's forward is not rewritten
    assert type(ai.inject(model, "cbam_after_every_stage", input_size=(3, 224, 224))) is type(model)


class _Projected(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.qkv = nn.Conv2d(c, c, 1)
        self.proj = nn.Sequential(nn.ReLU(), nn.Conv2d(c, c, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.qkv(x))


class _Mixer(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.fc = nn.Conv2d(c, c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x).relu()


class _TwoBranchBlock(nn.Module):
    """LeViT's shape: one branch ends in a Sequential returned by its module, the other not."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.attn = _Projected(c)
        self.mlp = _Mixer(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(x)
        return x + self.mlp(x)


def test_a_sequential_called_whole_by_a_rewritten_module_does_not_hold_its_block():
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), _TwoBranchBlock(16)).eval()
    before = {name: p.numel() for name, p in model.named_parameters()}
    patched = ai.inject(model, "se_resnet", init="paper", input_size=SIZE)
    # each after the module that returns its branch: attn (not inside attn.proj) and mlp
    assert [(p.key, p.attach) for p in patched.attn_inject.plan] == [
        ("1.attn.se", "after"),
        ("1.mlp.se", "after"),
    ]
    assert {name: p.numel() for name, p in model.named_parameters()} == before  # original untouched
    block = patched[1]
    with torch.no_grad():
        h = model[0](X)
        h = h + block.attn.se(model[1].attn(h))  # once, not again inside attn.proj
        torch.testing.assert_close(patched(X), h + block.mlp.se(model[1].mlp(h)))
    assert ai.validate(model, patched, input_size=SIZE).passed


class _InstanceForward(nn.Module):
    """A forward chosen per instance, as timm's FasterNet picks its partial convolution."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c // 2, c // 2, 3, padding=1)
        self.forward = self.forward_split  # type: ignore[method-assign]

    def forward_split(self, x: torch.Tensor) -> torch.Tensor:
        first, second = torch.split(x, [x.shape[1] // 2, x.shape[1] // 2], dim=1)
        return torch.cat([self.conv(first), second], dim=1)


class _HoldsInstanceForward(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.mixer = _InstanceForward(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        return torch.relu(x + self.mixer(x))


def test_a_forward_set_on_the_instance_is_run_and_pickled_with_its_block():
    import io

    torch.manual_seed(0)
    model = _HoldsInstanceForward().eval()
    patched = ai.inject(model, "se_resnet", init="paper", input_size=SIZE)
    (point,) = patched.attn_inject.plan
    assert point.module != "mixer" or point.attach == "graph"  # never around a per-instance forward
    with torch.no_grad():
        h = model.stem(X)
        block = patched.get_submodule(point.key)
        torch.testing.assert_close(patched(X), torch.relu(h + block(model.mixer(h))), rtol=0, atol=0)
    before = ai.inject(model, "se_pre", init="paper", input_size=SIZE)  # on the mixer's input
    assert all(p.module != "mixer" or p.attach == "graph" for p in before.attn_inject.plan)
    with torch.no_grad():
        block = before.get_submodule(before.attn_inject.plan[0].key)
        torch.testing.assert_close(before(X), torch.relu(h + model.mixer(block(h))), rtol=0, atol=0)
    buffer = io.BytesIO()
    torch.save(before, buffer)
    buffer.seek(0)
    with torch.no_grad():
        assert torch.equal(torch.load(buffer, weights_only=False)(X), before(X))


def test_a_block_read_outside_a_rewritten_owner_is_applied_to_what_it_returns():
    torch.manual_seed(0)
    model = timm.create_model("efficientformerv2_s0").eval()
    patched = ai.inject(model, "se_resnet", input_size=(3, 224, 224))
    outside = [p for p in patched.attn_inject.plan if p.attach == "graph" and p.key.endswith("proj_se")]
    assert outside  # its readers (the block's layer scale) lie outside the rewritten token mixer
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert torch.equal(patched(x), model(x))
    report = ai.validate(model, patched, input_size=(3, 224, 224), checks=("reference",), seeds=1)
    assert report.passed, report
