"""Blocks native to channels-last maps and token grids, and every block under TorchScript."""

from __future__ import annotations

import warnings
from types import SimpleNamespace

import pytest
import torch

import attn_inject as ai
from attn_inject.blocks import BlockParamError, check_block_params, layout_kwargs

KINDS = [
    ("se", {}),
    ("se", {"pool": "max"}),
    ("eca", {}),
    ("cbam", {}),
    ("cbam", {"channel": "conv"}),
    ("cbam", {"spatial_norm": True}),
]
KIND_IDS = ["se", "se-max", "eca", "cbam", "cbam-conv", "cbam-norm"]
C, H, W = 24, 5, 7


def trained(block: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random weights everywhere and blends away from 0, so every part of the block acts."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in block.parameters():
            p.copy_(torch.rand(p.shape, generator=g) * 1.5 - 0.5)
    return block.eval()


def same_weights(reference: torch.nn.Module, block: torch.nn.Module) -> torch.nn.Module:
    """``block`` given ``reference``'s weights; 1x1 convolution kernels become linear weights."""
    state = {k: v.reshape(block.state_dict()[k].shape) for k, v in reference.state_dict().items()}
    block.load_state_dict(state)
    return block.eval()


def grads(block: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.reshape(-1).clone() for n, p in block.named_parameters()}


@pytest.mark.parametrize("init", ["identity", "paper"])
@pytest.mark.parametrize(("kind", "params"), KINDS, ids=KIND_IDS)
def test_native_nhwc_block_equals_nchw_block_on_permuted_map_values_and_gradients(kind, params, init):
    reference = trained(ai.create_block(kind, C, init=init, **params))
    native = same_weights(reference, ai.create_block(kind, C, init=init, layout="NHWC", **params))
    x = torch.randn(3, C, H, W, generator=torch.Generator().manual_seed(1))
    x_nchw = x.clone().requires_grad_()
    x_nhwc = x.permute(0, 2, 3, 1).contiguous().requires_grad_()
    out_nchw, out_nhwc = reference(x_nchw), native(x_nhwc)
    assert out_nhwc.shape == (3, H, W, C)
    torch.testing.assert_close(out_nhwc, out_nchw.permute(0, 2, 3, 1), rtol=0, atol=1e-6)
    upstream = torch.randn(3, C, H, W, generator=torch.Generator().manual_seed(2))
    out_nchw.backward(upstream)
    out_nhwc.backward(upstream.permute(0, 2, 3, 1))
    torch.testing.assert_close(x_nhwc.grad, x_nchw.grad.permute(0, 2, 3, 1), rtol=0, atol=1e-6)
    expected = grads(reference)
    assert set(grads(native)) == set(expected)
    for name, grad in grads(native).items():
        torch.testing.assert_close(grad, expected[name], rtol=1e-5, atol=1e-5, msg=name)


@pytest.mark.parametrize("prefix", [0, 1, 2])
@pytest.mark.parametrize(("kind", "params"), KINDS, ids=KIND_IDS)
def test_token_block_acts_on_grid_as_on_map_and_passes_prefix_tokens_through(kind, params, prefix):
    reference = trained(ai.create_block(kind, C, init="paper", **params))
    tokens_block = same_weights(
        reference,
        ai.create_block(kind, C, init="paper", layout="tokens", prefix=prefix, grid=(H, W), **params),
    )
    x = torch.randn(2, prefix + H * W, C, generator=torch.Generator().manual_seed(3), requires_grad=True)
    out = tokens_block(x)
    assert out.shape == x.shape
    grid_as_map = x[:, prefix:].reshape(2, H, W, C).permute(0, 3, 1, 2)  # raster order: token h*W + w
    expected = reference(grid_as_map).permute(0, 2, 3, 1).reshape(2, H * W, C)
    torch.testing.assert_close(out[:, prefix:], expected, rtol=0, atol=1e-6)
    assert torch.equal(out[:, :prefix], x[:, :prefix])
    out[:, :prefix].sum().backward()  # the prefix tokens' gradient reaches only themselves
    assert torch.equal(x.grad[:, :prefix], torch.ones(2, prefix, C))
    assert torch.equal(x.grad[:, prefix:], torch.zeros(2, H * W, C))


@pytest.mark.parametrize(("kind", "params"), KINDS, ids=KIND_IDS)
def test_reordered_tokens_act_as_their_grid_in_raster_order_values_and_gradients(kind, params):
    """Tokens holding the grid in another order (Hiera's unrolling), here also over two
    dimensions (Nest's (B, T, N, C) blocks): the block on them equals the NCHW block on the
    map they hold, put back in their order."""
    reference = trained(ai.create_block(kind, C, init="paper", **params))
    order = torch.randperm(H * W, generator=torch.Generator().manual_seed(5))
    block = same_weights(
        reference,
        ai.create_block(kind, C, init="paper", layout="tokens", grid=(H, W), order=order.tolist(), **params),
    )
    raster = torch.randn(2, H * W, C, generator=torch.Generator().manual_seed(3))
    for shape in ((2, H * W, C), (2, H, W, C)):  # (B, N, C) and (B, T, N, C)
        x = raster[:, order].reshape(shape).requires_grad_()  # token i holds position order[i]
        x_map = x.reshape(2, H * W, C)[:, torch.argsort(order)].reshape(2, H, W, C).permute(0, 3, 1, 2)
        expected = reference(x_map).permute(0, 2, 3, 1).reshape(2, H * W, C)[:, order].reshape(shape)
        out = block(x)
        torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)
        (grad,) = torch.autograd.grad((out * torch.linspace(-1, 1, out.numel()).view(shape)).sum(), x)
        (want,) = torch.autograd.grad((expected * torch.linspace(-1, 1, out.numel()).view(shape)).sum(), x)
        torch.testing.assert_close(grad, want, rtol=0, atol=1e-6)
    identity = ai.create_block(kind, C, init="identity", layout="tokens", grid=(H, W), order=order.tolist())
    assert torch.equal(identity(raster), raster)


@pytest.mark.parametrize(
    ("order", "prefix", "message"),
    [
        ([0] * (H * W), 0, r"order=\[0, 0, 0, 0, \.\.\.\] is not allowed; order must be a permutation"),
        (list(range(H * W - 1)), 0, r"order must be a permutation of 0..34"),
        (list(range(H * W)), 1, r"with prefix 0"),
        ("0123", 0, r"order='0123' is not allowed"),
    ],
)
def test_a_bad_token_order_raises_one_clear_error(order, prefix, message):
    with pytest.raises(BlockParamError, match=message):
        ai.create_block("cbam", C, layout="tokens", prefix=prefix, grid=(H, W), order=order)


def test_a_reordered_block_scripts_and_keeps_its_order_out_of_the_saved_state():
    order = torch.randperm(H * W, generator=torch.Generator().manual_seed(1)).tolist()
    block = trained(ai.create_block("cbam", C, layout="tokens", grid=(H, W), order=order))
    assert "order" not in block.state_dict() and "reordered" in repr(block)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        scripted = torch.jit.script(block)
    x = torch.randn(2, H * W, C)
    assert torch.equal(scripted(x), block(x))


@pytest.mark.parametrize(
    "layout",
    [{}, {"layout": "NHWC"}, {"layout": "tokens", "prefix": 1, "grid": (H, W)}],
    ids=["NCHW", "NHWC", "tokens"],
)
@pytest.mark.parametrize(("kind", "params"), KINDS, ids=KIND_IDS)
def test_identity_init_is_exact_in_every_layout(kind, params, layout):
    block = ai.create_block(kind, C, init="identity", **layout, **params).train()
    shape = {"NHWC": (2, H, W, C), "tokens": (2, 1 + H * W, C)}.get(layout.get("layout"), (2, C, H, W))
    x = torch.randn(shape)
    assert torch.equal(block(x), x)


@pytest.mark.parametrize(
    "layout",
    [{}, {"layout": "NHWC"}, {"layout": "tokens", "prefix": 2, "grid": (H, W)}],
    ids=["NCHW", "NHWC", "tokens"],
)
@pytest.mark.parametrize("init", ["identity", "paper"])
@pytest.mark.parametrize(("kind", "params"), KINDS, ids=KIND_IDS)
def test_every_block_compiles_with_torchscript_and_matches_eager(kind, params, init, layout):
    block = trained(ai.create_block(kind, C, init=init, **layout, **params))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.script is deprecated, still supported
        scripted = torch.jit.script(block)
    shape = {"NHWC": (2, H, W, C), "tokens": (2, 2 + H * W, C)}.get(layout.get("layout"), (2, C, H, W))
    x = torch.randn(shape)
    assert torch.equal(scripted(x), block(x))
    assert set(scripted.state_dict()) == set(block.state_dict())


def test_cbam_channel_modes_keep_their_own_state_dict_keys():
    assert sorted(ai.create_block("cbam", 32, channel="conv").state_dict()) == [
        "channel.channel_conv.weight",
        "spatial.conv.weight",
    ]
    assert "channel.fc1.weight" in ai.create_block("cbam", 32, channel="fc").state_dict()


def test_channels_last_mlp_is_linear_on_the_last_dimension_with_the_same_parameter_count():
    nchw, nhwc = ai.create_block("se", 64), ai.create_block("se", 64, layout="NHWC")
    assert isinstance(nhwc.fc1, torch.nn.Linear) and nhwc.fc1.weight.shape == (4, 64)
    assert sum(p.numel() for p in nhwc.parameters()) == sum(p.numel() for p in nchw.parameters())


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"layout": "NLC"}, r"layout='NLC' is not allowed; layout must be one of 'NCHW', 'NHWC', 'tokens'"),
        (
            {"layout": "tokens", "kind": "cbam"},
            r"grid=None is not allowed; grid must be two positive integers",
        ),
        ({"layout": "tokens", "grid": (0, 3)}, r"grid=\(0, 3\) is not allowed"),
        ({"layout": "tokens", "grid": (2, 2), "prefix": -1}, r"prefix=-1 is not allowed"),
        ({"layout": "NHWC", "grid": (2, 2)}, r"layout='NHWC' is not allowed; layout must be 'tokens' when"),
    ],
)
def test_bad_layout_arguments_raise_one_clear_error(kwargs, message):
    kind = kwargs.pop("kind", "se")
    with pytest.raises(BlockParamError, match=message):
        ai.create_block(kind, 16, **kwargs)


@pytest.mark.parametrize("kind", ["se", "eca"])
def test_channel_blocks_on_tokens_need_no_grid_and_run_at_any_token_count(kind):
    """SE and ECA pool over the grid tokens, so a grid that follows the input size is fine."""
    assert not ai.blocks.uses_grid(kind) and ai.blocks.uses_grid("cbam")
    reference = trained(ai.create_block(kind, C, init="paper"))
    block = same_weights(reference, ai.create_block(kind, C, init="paper", layout="tokens", prefix=1))
    for h, w in ((2, 3), (4, 4)):
        x = torch.randn(2, 1 + h * w, C)
        expected = reference(x[:, 1:].reshape(2, h, w, C).permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        torch.testing.assert_close(block(x)[:, 1:], expected.reshape(2, h * w, C), rtol=0, atol=1e-6)
        assert torch.equal(block(x)[:, :1], x[:, :1])


def test_a_recipe_cannot_set_the_layout_the_planner_owns():
    with pytest.raises(
        BlockParamError, match=r"layout='NHWC' is not allowed; layout must be set by the planner"
    ):
        check_block_params("se", {"layout": "NHWC"})
    assert "layout" not in ai.blocks.block_param_names("cbam")


def test_layout_kwargs_contract():
    def point(layout, prefix=0, grid=None, order=None):
        return SimpleNamespace(layout=layout, prefix=prefix, grid=grid, order=order)

    assert layout_kwargs(point("NCHW")) == {}
    assert layout_kwargs(point("NHWC")) == {"layout": "NHWC"}
    assert layout_kwargs(point("tokens", 1, (14, 14))) == {"layout": "tokens", "prefix": 1, "grid": (14, 14)}
    assert layout_kwargs(point("tokens", 0, (1, 2), (1, 0))) == {
        "layout": "tokens",
        "prefix": 0,
        "grid": (1, 2),
        "order": [1, 0],
    }
    with pytest.raises(ValueError, match=r"layout 'NLC' .* allowed: NCHW, NHWC, tokens"):
        layout_kwargs(point("NLC"))


def test_layout_benchmark_runs_both_forms_and_times_each(capsys):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).parent.parent / "benchmarks" / "bench_layouts.py"
    spec = importlib.util.spec_from_file_location("bench_layouts", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    results = module.main(["--smoke"])
    assert len(results) == 2 * len(module.KINDS)  # forward and forward + backward, each block
    for medians in results.values():
        assert set(medians) == {"native NHWC", "permute + NCHW + permute"}
        assert all(seconds > 0 for seconds in medians.values())
    assert "ratio to permute + NCHW + permute" in capsys.readouterr().out


def test_every_shipped_recipe_gives_channels_last_maps_and_tokens_native_blocks_or_a_permute():
    from attn_inject.blocks import permutes

    for name in ai.list_recipes():
        for rule in ai.load_recipe(name).rules:
            expected = "permute" if permutes(rule.block.kind) else "native"
            assert rule.channels_last == expected, (name, rule.block.kind)
    skip = ai.load_recipe({"rules": [{"block": "se", "at": "stage_output", "channels_last": "skip"}]})
    assert skip.rules[0].channels_last == "skip" and skip.rules[0].to_dict()["channels_last"] == "skip"


def test_an_unknown_channels_last_mode_is_refused_with_the_allowed_ones():
    with pytest.raises(
        ai.RecipeError, match=r"channels_last: 'adapt' is not allowed; allowed: native, permute, skip"
    ):
        ai.load_recipe({"rules": [{"block": "se", "at": "stage_output", "channels_last": "adapt"}]})
