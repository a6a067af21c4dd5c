"""Every module surgery changes stays what it was: its class and methods, its container's
length, its forward's signature, its checkpointing, tracing and scripting, and its
``state_dict`` gains exactly the blocks' keys."""

from __future__ import annotations

import copy
import functools
import inspect

import pytest
import timm
import torch
import torch.utils.checkpoint
from torch import fx, nn

import attn_inject as ai

X64 = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))


@functools.cache
def _built_once(name: str, kwargs: tuple, flags: tuple[bool, ...]) -> tuple[nn.Module, torch.Tensor]:
    """``name`` built from seed 0 in eval mode, and the random state the build left."""
    torch.manual_seed(0)
    model = timm.create_model(name, **dict(kwargs)).eval()
    return model, torch.get_rng_state()


def _seeded(name: str, **kwargs) -> nn.Module:
    """``timm.create_model(name, **kwargs)`` from seed 0, in eval mode: a copy of the model
    built once for these arguments (and timm's scriptable / exportable / no-jit flags), with
    the random state left as that build left it."""
    flags = (timm.layers.is_scriptable(), timm.layers.is_exportable(), timm.layers.is_no_jit())
    model, state = _built_once(name, tuple(sorted(kwargs.items())), flags)
    torch.set_rng_state(state)
    return copy.deepcopy(model)


# ViT-Tiny's blocks, prefix token and 4 x 4 grid at 64 px, four blocks deep instead of twelve
VIT_DEPTH = 4


def _vit(**kwargs) -> nn.Module:
    return _seeded("vit_tiny_patch16_224", img_size=64, depth=VIT_DEPTH, **kwargs)


# Swin's structure (shifted windows in pairs of blocks, patch merging, the mask) at an eighth
# of swin_tiny's cost: two blocks a stage at half the width.
SWIN = {"img_size": 112, "window_size": 7, "depths": (2, 2, 2, 2), "embed_dim": 48}


def _swin(**kwargs) -> nn.Module:
    return _seeded("swin_tiny_patch4_window7_224", **SWIN, **kwargs)


def _changed(patched: nn.Module) -> dict[str, nn.Module]:
    return {name: m for name, m in patched.named_modules() if type(m) is not ai.base_class(m)}


@pytest.mark.parametrize("recipe", ["se_resnet", "cbam_after_every_stage"])
def test_every_changed_module_is_an_instance_of_its_own_class_with_its_methods(recipe):
    model = _swin()
    patched = ai.inject(model, recipe)
    originals = dict(model.named_modules())
    changed = _changed(patched)
    assert changed  # blocks run around these modules' own forwards
    for name, module in changed.items():
        original = originals[name]
        assert isinstance(module, type(original)) and type(module).__name__ == type(original).__name__
        assert inspect.signature(module.forward) == inspect.signature(original.forward)
        public = {m for m in dir(type(original)) if not m.startswith("_")}
        assert public <= set(dir(type(module)))  # every method is still there
    # the model's own methods walk the changed modules as they walk the originals
    model.set_input_size(img_size=(168, 168), window_size=7)
    patched.set_input_size(img_size=(168, 168), window_size=7)
    x = torch.randn(1, 3, 168, 168)
    with torch.no_grad():
        assert torch.equal(patched(x), model(x))  # identity at the new size too


def test_containers_keep_their_length_and_intermediates_carry_the_blocks():
    model = _vit()
    patched = ai.inject(model, "cbam_after_every_stage", init="paper")
    assert len(patched.blocks) == len(model.blocks) == VIT_DEPTH
    assert [type(b) for b in patched.blocks] == [type(b) for b in patched.blocks]
    assert all(isinstance(b, type(model.blocks[0])) for b in patched.blocks)
    with torch.no_grad():
        final, inner = patched.forward_intermediates(X64)
        _, plain = model.forward_intermediates(X64)
        assert len(inner) == len(plain) == VIT_DEPTH
        assert torch.equal(final, patched.forward_features(X64))
        h = patched.patch_embed(X64)
        h = patched.norm_pre(patched.patch_drop(patched._pos_embed(h)))
        for i, block in enumerate(patched.blocks):  # each tensor is its block's output, CBAM included
            h = block(h)
            expected = h[:, patched.num_prefix_tokens :].reshape(2, 4, 4, -1).permute(0, 3, 1, 2)
            assert torch.equal(inner[i], expected)
            assert not torch.equal(inner[i], plain[i])


def test_pruning_intermediate_layers_keeps_every_block_before_a_kept_feature():
    torch.manual_seed(0)
    model = timm.create_model("densenet121").eval()
    patched = ai.inject(model, "cbam_after_every_stage", init="paper", input_size=(3, 64, 64))
    with torch.no_grad():
        _, before = patched.forward_intermediates(X64, indices=[1])
    kept = [k for k in ai.inserted_blocks(patched) if k.startswith("features.denseblock1.")]
    assert kept  # the dense block runs its block itself: feature 1 carries it
    assert len(patched.features.denseblock1) == len(model.features.denseblock1)  # hidden from its items
    patched.prune_intermediate_layers([1], prune_head=False)
    assert set(ai.inserted_blocks(patched)) == set(kept)  # the later ones act after the last kept feature
    with torch.no_grad():
        _, after = patched.forward_intermediates(X64, indices=[1])
    assert torch.equal(after[0], before[0])


class _Optional(nn.Module):
    """A forward with optional arguments, as timm's ViT blocks (attn_mask, is_causal)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 1)
        self.bn = nn.BatchNorm2d(8)

    def forward(self, x: torch.Tensor, scale: float = 1.0, mask: torch.Tensor | None = None) -> torch.Tensor:
        out = self.bn(self.conv(x) * scale)
        return out if mask is None else out * mask


class _HoldsOptional(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.unit = _Optional()

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        x = self.stem(x)
        return x + self.unit(x, mask=mask)


def test_a_changed_forward_keeps_its_optional_arguments():
    torch.manual_seed(0)
    model = _HoldsOptional().eval()
    patched = ai.inject(model, "se_resnet", init="paper", input_size=(3, 16, 16))
    (point,) = patched.attn_inject.plan
    assert (point.key, point.attach) == ("unit.se", "after")
    assert inspect.signature(patched.unit.forward) == inspect.signature(model.unit.forward)
    x, mask = torch.randn(2, 3, 16, 16), torch.rand(2, 8, 16, 16)
    with torch.no_grad():
        h = model.stem(x)
        assert torch.equal(patched.unit(h, 2.0, mask=mask), patched.unit.se(model.unit(h, 2.0, mask=mask)))
        assert torch.equal(patched(x, mask=mask), h + patched.unit.se(model.unit(h, mask=mask)))
    scripted = torch.jit.script(patched)
    with torch.no_grad():
        assert torch.equal(scripted(x, mask), patched(x, mask=mask))


def test_vit_forward_features_takes_an_attention_mask_and_scripts():
    model = _vit()
    patched = ai.inject(model, "se_resnet", init="paper")
    n = patched.patch_embed.num_patches + patched.num_prefix_tokens
    mask = torch.zeros(n, n).masked_fill(torch.rand(n, n) > 0.7, float("-inf")).fill_diagonal_(0)
    identity = ai.inject(model, "se_resnet")
    with torch.no_grad():
        masked = patched.forward_features(X64, attn_mask=mask)
        assert not torch.equal(masked, patched.forward_features(X64))  # the mask is used
        assert not torch.equal(masked, model.forward_features(X64, attn_mask=mask))  # so are the blocks
        expected = model.forward_features(X64, attn_mask=mask)
        assert torch.equal(identity.forward_features(X64, attn_mask=mask), expected)
    with timm.layers.set_scriptable(True):
        scriptable = ai.inject(_vit(), "cbam_after_every_stage", init="paper")
    scripted = torch.jit.script(scriptable)
    with torch.no_grad():
        torch.testing.assert_close(scripted(X64), scriptable(X64), rtol=0, atol=0)


@pytest.mark.parametrize(
    "name, recipe",
    [("vit", "se_resnet"), ("vit", "cbam_after_every_stage"), ("swin", "se_resnet"), ("levit", "se_resnet")],
)
def test_inserted_blocks_trace_with_fx_and_both_feature_extractors(name, recipe):
    from timm.models import create_feature_extractor as timm_features
    from torchvision.models.feature_extraction import create_feature_extractor as tv_features

    if name == "levit":
        torch.manual_seed(0)
        model = timm.create_model("levit_128s").eval()
        x = torch.randn(1, 3, 224, 224)
    else:
        model, x = (_vit(), X64) if name == "vit" else (_swin(), torch.randn(1, 3, 112, 112))
    patched = ai.inject(model, recipe, init="paper")
    # the node that gives the output, as torchvision's tracer names it: timm's extractor (the
    # same tracer, with timm's leaf modules) gives that node the same name
    last = _last_node(patched)
    with torch.no_grad():
        expected = patched(x)
        if name == "vit":
            assert torch.equal(fx.symbolic_trace(patched)(x), expected)
        for extractor in (timm_features, tv_features):
            features = extractor(patched, return_nodes={last: "out"})
            assert torch.equal(features(x)["out"], expected)


def _last_node(model: nn.Module) -> str:
    from torchvision.models.feature_extraction import get_graph_node_names

    return get_graph_node_names(model)[1][-1]


class _ConstantUnit(nn.Module):
    """A residual unit whose branch ends in a function with a tensor constant: its forward is
    rewritten, and the constant must not become a state_dict key."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.conv = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        return torch.relu(x + self.conv(self.conv(x)) * torch.tensor(0.5))  # conv is called twice


@pytest.mark.parametrize("which", ["swin", "vit", "constant"])
def test_state_dict_gains_exactly_the_blocks_keys(which):
    model = {"swin": _swin, "vit": _vit, "constant": lambda: _ConstantUnit().eval()}[which]()
    size = (3, 16, 16) if which == "constant" else None
    patched = ai.inject(model, "se_resnet", input_size=size)
    if which == "constant":
        assert ai.has_rewritten_forward(patched)  # the root's own forward holds the point
    blocks = tuple(f"{key}." for key in ai.inserted_blocks(patched))
    added = set(patched.state_dict()) - set(model.state_dict())
    assert added and all(k.startswith(blocks) for k in added)
    assert set(model.state_dict()) <= set(patched.state_dict())
    assert {k for k in patched.state_dict() if k.startswith(blocks)} == added


def _checkpoint_calls(model: nn.Module, x: torch.Tensor) -> int:
    """The calls to ``torch.utils.checkpoint.checkpoint`` of one training step of ``model`` on ``x``."""
    calls = 0
    original = torch.utils.checkpoint.checkpoint

    def counting(*args, **kwargs):
        nonlocal calls
        calls += 1
        return original(*args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch.utils.checkpoint, "checkpoint", counting)
        model.train()
        model(x).sum().backward()
    return calls


@functools.cache
def _checkpointed_once(name: str) -> tuple[nn.Module, torch.Tensor, int, torch.Tensor]:
    """``name`` with gradient checkpointing on, after one training step on its input: the
    model, the input, the checkpoint calls of that step and the random state it left."""
    torch.manual_seed(0)
    if name == "vit":
        model, x = _vit(), X64
    elif name == "swin":
        model, x = _swin(), torch.randn(2, 3, 112, 112)
    else:
        model, x = _seeded(name), X64
    model.set_grad_checkpointing(True)
    calls = _checkpoint_calls(model, x)
    return model, x, calls, torch.get_rng_state()


@pytest.mark.parametrize("name", ["regnety_002", "convnext_atto", "vit", "efficientnet_b0", "swin"])
@pytest.mark.parametrize("when", ["before", "after"])
def test_gradient_checkpointing_makes_as_many_checkpoint_calls_as_the_original(name, when):
    model, x, expected, state = _checkpointed_once(name)
    model = copy.deepcopy(model)
    torch.set_rng_state(state)
    assert expected > 0
    if when == "after":
        model.set_grad_checkpointing(False)
    patched = ai.inject(model, "cbam_after_every_stage", init="paper", input_size=tuple(x.shape[1:]))
    if when == "after":
        patched.set_grad_checkpointing(True)
    assert _checkpoint_calls(patched, x) == expected


def test_a_token_grid_changed_after_inject_is_one_clear_error():
    patched = ai.inject(_vit(), "cbam_after_every_stage")  # CBAM needs the 4 x 4 grid
    patched.set_input_size(img_size=96)
    with pytest.raises(AssertionError, match="token grid of a size the model no longer gives"):
        patched(torch.randn(1, 3, 96, 96))


@pytest.mark.parametrize("recipe", ["se_resnet", "cbam_after_every_stage", "se_post"])
def test_static_and_dynamic_size_swin_get_the_same_points_and_load_each_others_weights(recipe):
    """``strict_img_size=False`` builds each shifted-window mask from the input's sizes
    (``get_attn_mask(x)``): traced as one call, the blocks around it stay open to insertion.
    The plans compared are the ones each ``inject`` recorded and placed its blocks by."""
    torch.manual_seed(0)
    static = _swin()
    dynamic = _swin(strict_img_size=False)
    patched_static = ai.inject(static, recipe, init="paper")
    patched_dynamic = ai.inject(dynamic, recipe, init="paper")
    static_plan, dynamic_plan = patched_static.attn_inject.plan, patched_dynamic.attn_inject.plan
    assert not dynamic_plan.opaque
    assert [p.key for p in dynamic_plan] == [p.key for p in static_plan]
    assert sorted(ai.inserted_blocks(patched_dynamic)) == sorted(patched_dynamic.attn_inject.block_keys)
    patched_dynamic.load_state_dict(patched_static.state_dict())
    x = torch.randn(1, 3, 112, 112)
    with torch.no_grad():
        torch.testing.assert_close(patched_dynamic(x), patched_static(x))
    assert not any("get_attn_mask" in vars(m) for m in patched_dynamic.modules())  # nothing left set


@pytest.mark.parametrize("recipe", ["se_resnet", "se_post"])  # se_post rewrites each block's forward
def test_a_dynamic_size_swin_patched_at_identity_is_exact_at_another_size(recipe):
    model = _swin(strict_img_size=False)
    patched = ai.inject(model, recipe)
    assert len(ai.inserted_blocks(patched)) > 0
    x = torch.randn(1, 3, 140, 140)  # a mask of another size, built at the call
    with torch.no_grad():
        assert torch.equal(patched(x), model(x))


def test_input_size_defaults_to_the_size_the_model_was_built_for():
    with torch.device("meta"):
        swin = timm.create_model("swin_tiny_patch4_window7_224", img_size=(224, 288))
        vit = timm.create_model("vit_tiny_patch16_224", img_size=96)
    assert ai.plan(swin, "se_resnet").input_size == (3, 224, 288)
    assert ai.plan(vit, "cbam_after_every_stage").input_size == (3, 96, 96)
    fixed = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Flatten(), nn.Linear(8 * 30 * 30, 10))
    with pytest.raises(ai.ShapeError, match=r"input_size=\(C, H, W\)"):
        ai.plan(fixed, "se_after_every_stage")


def test_deep_copies_and_ema_keep_every_changed_class():
    from timm.utils import ModelEmaV3

    patched = ai.inject(_swin(), "se_resnet")
    copied = copy.deepcopy(patched)
    assert {n: type(m) for n, m in copied.named_modules()} == {n: type(m) for n, m in patched.named_modules()}
    ema = ModelEmaV3(patched, decay=0.9)
    ema.update(patched)
    x = torch.randn(1, 3, 112, 112)
    with torch.no_grad():
        assert torch.equal(ema.module(x), patched(x))


@pytest.mark.parametrize(
    "recipe, init",
    [
        ("se_resnet", "identity"),
        ("eca_resnet", "paper"),
        ("cbam_resnet", "identity"),
        ("cbam_after_every_stage", "paper"),
    ],
)
def test_a_deep_copy_of_every_patched_model_saves_and_loads(recipe, init, tmp_path):
    from attn_inject.models.build import build_model

    torch.manual_seed(0)
    patched = ai.inject(build_model("timm:resnet10t"), recipe, init=init, input_size=(3, 32, 32))
    copied = copy.deepcopy(patched)
    ai.save(copied, tmp_path / "copy.safetensors")
    loaded = ai.load(tmp_path / "copy.safetensors")
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded.eval()(x), patched.eval()(x))


def test_channels_the_model_was_built_for_are_used_and_a_shape_error_is_one_line():
    with torch.device("meta"):
        gray = timm.create_model("resnet18", in_chans=1)
    assert ai.plan(gray, "se_resnet").input_size == (1, 224, 224)
    fixed = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Flatten(), nn.Linear(8 * 30 * 30, 10))
    with pytest.raises(ai.ShapeError) as info:
        ai.plan(fixed, "se_after_every_stage")
    assert "\n" not in str(info.value) and "input_size=(C, H, W)" in str(info.value)
