"""Every attention a user reaches for: timm's attention modules, SimAM, and a user's own
module, inserted function-preserving and through a permute on other layouts."""

from __future__ import annotations

import json

import pytest
import safetensors.torch
import timm
import torch
from timm.layers import create_attn
from torch import nn

import attn_inject as ai
from attn_inject.blocks import Blended, SimAM, block_for_point, permutes
from attn_inject.blocks.timm_attention import PREFIX, timm_kinds
from attn_inject.saving.checkpoint import read_safetensors_metadata
from attn_inject.saving.file import MANIFEST_KEY
from attn_inject.validation.registry import checks_for

SIZE = (3, 64, 64)
OFFERED = [k.kind for k in timm_kinds() if not k.refused]


def recipe(kind: str, at: str = "stage_output", **rule) -> dict:
    return {"name": f"{kind}_test", "rules": [{"block": kind, "at": at, **rule}]}


@pytest.fixture(scope="module")
def resnet():
    torch.manual_seed(0)
    return timm.create_model("resnet10t", num_classes=7).eval()


@pytest.fixture(scope="module")
def image():
    return torch.randn(2, *SIZE, generator=torch.Generator().manual_seed(1))


def test_the_offered_kinds_come_from_the_installed_timm_by_the_written_rule():
    kinds = {k.name: k for k in timm_kinds()}
    assert {"se", "eca", "gc", "cbam", "coord", "nl"} <= {n for n, k in kinds.items() if not k.refused}
    for replaces_a_conv in ("sk", "splat", "lambda", "bottleneck", "halo"):
        assert "takes a stride" in kinds[replaces_a_conv].refused
    assert set(OFFERED) <= set(ai.list_blocks())
    with pytest.raises(
        ai.AttnInjectError, match=r"'timm:sk' is not offered: timm's SelectiveKernel takes a stride"
    ):
        ai.create_block("timm:sk", 64)
    with pytest.raises(
        ai.AttnInjectError, match=r"unknown block kind 'timm:nosuch': the installed timm has no such"
    ):
        ai.create_block("timm:nosuch", 64)


@pytest.mark.parametrize("kind", OFFERED)
def test_a_timm_kind_is_planned_inserted_equal_to_timms_module_and_exact_at_identity(kind, resnet, image):
    patched = ai.inject(resnet, recipe(kind, stages=[-1]), init="paper", input_size=SIZE).eval()
    plan = patched.attn_inject.plan  # the plan the injection recorded and placed its block by
    assert [p.block.kind for p in plan.points] == [kind] and plan.points[0].channels == 512
    ((_, inserted),) = list(ai.inserted_blocks(patched).items())
    assert isinstance(inserted, Blended) and inserted.blend is None
    with torch.no_grad():  # weights of its own, so that a wrong placement shows
        for param in inserted.parameters():
            param.copy_(torch.randn(param.shape, generator=torch.Generator().manual_seed(2)) * 0.5)
    reference = create_attn(kind[len(PREFIX) :], 512).eval()
    reference.load_state_dict(inserted.block.state_dict())
    with torch.no_grad():
        expected = resnet.forward_head(reference(resnet.forward_features(image)))
        got = patched(image)
        assert not torch.allclose(got, resnet(image), atol=1e-4), "the block changed nothing"
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)

    identity = ai.inject(resnet, recipe(kind), init="identity", input_size=SIZE).eval()
    assert len(ai.inserted_blocks(identity)) == 4 and len(ai.blends(identity)) == 4
    with torch.no_grad():
        assert torch.equal(identity(image), resnet(image))
    assert all(
        key.startswith(tuple(f"{n}." for n in ai.inserted_blocks(identity)))
        for key in _new_keys(identity, resnet)
    )


def _new_keys(patched: nn.Module, base: nn.Module) -> set[str]:
    return set(patched.state_dict()) - set(base.state_dict())


def test_a_timm_kind_keeps_its_own_keys_under_one_name_and_its_blend_beside_them(resnet):
    patched = ai.inject(resnet, recipe("timm:gc", stages=[0]), init="identity", input_size=SIZE)
    (name,) = ai.inserted_blocks(patched)
    own = set(create_attn("gc", 64).state_dict())
    assert _new_keys(patched, resnet) == {f"{name}.blend"} | {f"{name}.block.{k}" for k in own}
    assert name.endswith(".gc") and ai.blends(patched) == {f"{name}.blend": 0.0}


def test_the_blend_runs_from_the_input_at_zero_to_the_block_at_one():
    torch.manual_seed(0)
    inner = create_attn("coord", 32).eval()
    x = torch.randn(2, 32, 6, 5)
    blended = Blended(inner, "identity").eval()
    with torch.no_grad():
        assert torch.equal(blended(x), x)
        blended.blend.fill_(1.0)
        torch.testing.assert_close(blended(x), inner(x), rtol=0, atol=1e-6)
        blended.blend.fill_(0.25)
        torch.testing.assert_close(blended(x), x + 0.25 * (inner(x) - x))


def test_simam_follows_the_papers_energy_formula():
    """Eq. (4) of the paper: e_t* = 4(σ² + λ) / ((t − μ)² + 2σ² + 2λ), σ² over the channel's
    other positions (its code divides by H·W − 1); out = x · sigmoid(1 / e_t*)."""
    x = torch.randn(2, 5, 7, 6, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    lam = 1e-4
    mu = x.mean(dim=(2, 3), keepdim=True)
    var = x.var(dim=(2, 3), keepdim=True, unbiased=True)
    energy = 4 * (var + lam) / ((x - mu) ** 2 + 2 * var + 2 * lam)
    expected = x * torch.sigmoid(1 / energy)
    block = SimAM(5).double()
    assert sum(p.numel() for p in block.parameters()) == 0
    torch.testing.assert_close(block(x), expected)
    channels_last = SimAM(5, layout="NHWC").double()
    torch.testing.assert_close(channels_last(x.permute(0, 2, 3, 1)), expected.permute(0, 2, 3, 1))
    assert torch.equal(SimAM(5, init="identity").double()(x), x)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_simam_in_half_precision_keeps_large_deviations_finite_and_exact_at_identity(dtype):
    """In float16 (t - mu)^2 overflows past a deviation of 256 and inf / inf is NaN: SimAM
    computes its energies in float32, so a 0-255 pixel map stays exact at identity."""
    x = torch.zeros(1, 4, 4, 4, dtype=dtype)
    x[0, 0, 0, 0] = 300.0
    x[0, 1] = torch.linspace(0, 255, 16, dtype=dtype).view(4, 4)
    assert torch.equal(SimAM(4, init="identity").to(dtype)(x), x)
    paper = SimAM(4)(x)
    assert paper.dtype == dtype and bool(paper.isfinite().all())
    torch.testing.assert_close(paper, SimAM(4)(x.float()).to(dtype))


def test_simam_is_inserted_exact_at_identity_with_one_blend_per_block(resnet, image):
    patched = ai.inject(resnet, recipe("simam", at="residual_branch"), init="identity", input_size=SIZE)
    assert len(ai.blends(patched)) == len(ai.inserted_blocks(patched)) == 4
    with torch.no_grad():
        assert torch.equal(patched(image), resnet(image))


class Doubler(nn.Module):
    """A user's module with weights and neither ``init`` nor ``layout``."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.mix = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.tanh(self.mix(x))


@pytest.fixture
def with_doubler():
    ai.register_block("doubler_test", Doubler)
    yield "doubler_test"
    ai.unregister_block("doubler_test")


def test_a_users_module_is_inserted_function_preserving_and_is_the_module_at_blend_one(
    with_doubler, resnet, image
):
    patched = ai.inject(resnet, recipe(with_doubler, stages=[-1]), init="identity", input_size=SIZE).eval()
    (name, block), *_ = ai.inserted_blocks(patched).items()
    assert isinstance(block, Blended) and isinstance(block.block, Doubler)
    assert _new_keys(patched, resnet) == {
        f"{name}.blend",
        f"{name}.block.mix.weight",
        f"{name}.block.mix.bias",
    }
    with torch.no_grad():
        assert torch.equal(patched(image), resnet(image))
        block.blend.fill_(1.0)
        expected = resnet.forward_head(block.block(resnet.forward_features(image)))
        torch.testing.assert_close(patched(image), expected)
    paper = ai.inject(resnet, recipe(with_doubler, stages=[-1]), init="paper", input_size=SIZE)
    assert all(isinstance(b, Doubler) for b in ai.inserted_blocks(paper).values())  # no wrapper needed


@pytest.mark.parametrize("layout", ["NHWC", "tokens"])
def test_an_nchw_only_block_runs_on_other_layouts_through_a_permute(layout):
    torch.manual_seed(0)
    inner = create_attn("gc", 16).eval()
    with torch.no_grad():
        for param in inner.parameters():
            param.normal_()
    grid, prefix = (4, 5), 2
    nchw = torch.randn(3, 16, *grid)
    if layout == "NHWC":
        block = block_for_point("timm:gc", 16, {}, "paper", {"layout": "NHWC"}).eval()
        block.block.load_state_dict(inner.state_dict())
        x = nchw.permute(0, 2, 3, 1)
        expected = inner(nchw).permute(0, 2, 3, 1)
    else:
        block = block_for_point(
            "timm:gc", 16, {}, "paper", {"layout": "tokens", "prefix": prefix, "grid": grid}
        )
        block.block.load_state_dict(inner.state_dict())
        cls = torch.randn(3, prefix, 16)
        x = torch.cat([cls, nchw.flatten(2).transpose(1, 2)], dim=1)
        expected = torch.cat([cls, inner(nchw).flatten(2).transpose(1, 2)], dim=1)
    with torch.no_grad():
        torch.testing.assert_close(block(x), expected)
        assert torch.equal(
            block_for_point(
                "timm:gc",
                16,
                {},
                "identity",
                {"layout": layout, **({"prefix": prefix, "grid": grid} if layout == "tokens" else {})},
            )(x),
            x,
        )


def test_a_vit_gets_timm_blocks_only_where_the_rule_says_permute():
    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", img_size=64, depth=2, num_classes=5).eval()
    native = ai.plan(vit, recipe("timm:gc"))
    assert not native.points and native.skipped
    assert all("takes NCHW maps only; the rule's channels_last: permute" in s.reason for s in native.skipped)
    assert ai.plan(vit, recipe("se")).points, "built-in blocks act on tokens natively"
    patched = ai.inject(vit, recipe("timm:gc", channels_last="permute"), init="identity").eval()
    points = patched.attn_inject.plan.points
    assert len(points) == 2 and {p.layout for p in points} == {"tokens"}
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(patched(x), vit(x))
    assert permutes("timm:gc") and not permutes("se")


# validate's default checks but export: torch.export of timm's attention kinds in a network
# (coord_resnet, gc_resnet) is tested in test_export
CHECKS_BUT_EXPORT = tuple(spec.name for spec in checks_for(None) if spec.name != "export")


def test_validate_save_load_and_param_groups_take_a_timm_kind(tmp_path, resnet, image):
    patched = ai.inject(resnet, recipe("timm:coord"), init="identity", input_size=SIZE)
    report = ai.validate(resnet, patched, input_size=SIZE, checks=CHECKS_BUT_EXPORT)
    assert report.passed and report.identity_ok, report
    with torch.no_grad():
        for name, param in patched.named_parameters():
            if ".coord." in name:
                param.add_(0.1)  # trained: the blends and the block's weights move
    path = tmp_path / "coord.safetensors"
    ai.save(patched, path)
    manifest = json.loads(read_safetensors_metadata(path)[MANIFEST_KEY])
    assert "timm:coord" in json.dumps(manifest["recipe"])
    loaded = ai.load(path).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(image), patched.eval()(image), rtol=0, atol=0)

    groups = ai.param_groups(patched, 1e-3, weight_decay=0.05, attn_lr_scale=10.0)
    of = {n: g for g in groups for n in g["param_names"]}
    blends = [n for n in of if n.endswith(".coord.blend")]
    weights = [n for n in of if ".coord.block." in n and n.endswith("weight") and of[n]["params"][0].ndim > 1]
    assert len(blends) == 4 and weights
    assert all(of[n]["weight_decay"] == 0 and of[n]["lr"] == pytest.approx(1e-2) for n in blends)
    assert all(of[n]["weight_decay"] == 0.05 and of[n]["lr"] == pytest.approx(1e-2) for n in weights)

    # a file naming a kind the installed timm lacks: one line, before anything is built
    text = json.dumps(manifest).replace("timm:coord", "timm:nosuch")
    tensors = safetensors.torch.load_file(path)
    bad = tmp_path / "bad.safetensors"
    safetensors.torch.save_file(tensors, bad, metadata={MANIFEST_KEY: text})
    with pytest.raises(ai.AttnInjectError) as refused:
        ai.load(bad)
    message = str(refused.value)
    assert "\n" not in message and "'timm:nosuch'" in message and "installed timm" in message


def test_a_timm_kind_refuses_parameters_it_does_not_have_or_that_choose_where_it_lives():
    with pytest.raises(ai.BlockParamError, match="device"):
        ai.create_block("timm:gc", 64, device="cuda")
    with pytest.raises(ai.BlockParamError, match="rd_channels"):
        ai.create_block("timm:gc", 64, rd_channels=10**9)
    with pytest.raises(ai.RecipeError, match="rd_ratio"):
        ai.load_recipe(
            recipe("timm:gc") | {"rules": [{"block": {"kind": "timm:gc", "nope": 1}, "at": "stage_output"}]}
        )
