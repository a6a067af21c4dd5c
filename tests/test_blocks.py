"""Attention blocks against their papers' formulas.

Every expected value here is computed from the paper's equations in plain torch ops (matrix
products, shifted sums over a zero-padded tensor), reading only the block's weights; no
package function computes an expected value. Hand-written numbers (hidden widths, ECA kernel
sizes, parameter counts) come from the formulas in ../shared/reference/papers.md.
"""

from __future__ import annotations

import math

import pytest
import torch

import attn_inject as ai

KINDS = ("se", "eca", "cbam")

# (kind, params) configurations used by the shape / layout / gradient sweeps.
CONFIGS = [
    ("se", {}),
    ("se", {"pool": "max"}),
    ("se", {"bias": False}),
    ("se", {"divisor": 8}),
    ("eca", {}),
    ("eca", {"kernel_size": 3}),
    ("cbam", {}),
    ("cbam", {"channel": "conv"}),
    ("cbam", {"spatial_kernel": 3}),
    ("cbam", {"spatial_kernel": 5, "bias": False}),
    ("cbam", {"spatial_norm": True}),
]
CONFIG_IDS = [kind + "".join(f"-{k}={v}" for k, v in p.items()) for kind, p in CONFIGS]

# Number of attention maps (one blend scalar each under init="identity").
MAPS_PER_KIND = {"se": 1, "eca": 1, "cbam": 2}


# --------------------------------------------------------------------------- references


def mlp_reference(v, fc1, fc2):
    """W2 relu(W1 v + b1) + b2 on (B, C) vectors, weights read from 1x1 convs."""
    w1 = fc1.weight.reshape(fc1.weight.shape[0], -1)
    w2 = fc2.weight.reshape(fc2.weight.shape[0], -1)
    h = v @ w1.T
    if fc1.bias is not None:
        h = h + fc1.bias
    h = torch.relu(h)
    z = h @ w2.T
    if fc2.bias is not None:
        z = z + fc2.bias
    return z


def conv1d_channels_reference(v, w):
    """Zero-padded (k-1)/2, bias-free cross-correlation of (B, C) vectors along C with w (k,)."""
    k = w.numel()
    pad = (k - 1) // 2
    c = v.shape[1]
    padded = torch.cat([v.new_zeros(v.shape[0], pad), v, v.new_zeros(v.shape[0], pad)], dim=1)
    out = torch.zeros_like(v)
    for j in range(k):
        out = out + w[j] * padded[:, j : j + c]
    return out


def conv2d_same_reference(maps, w):
    """Bias-free k x k 'same' convolution of (B, 2, H, W) maps to (B, 1, H, W), zero padding."""
    k = w.shape[-1]
    p = k // 2
    b, n, h, wd = maps.shape
    padded = maps.new_zeros(b, n, h + 2 * p, wd + 2 * p)
    padded[:, :, p : p + h, p : p + wd] = maps
    out = maps.new_zeros(b, 1, h, wd)
    for i in range(k):
        for j in range(k):
            tap = w[0, :, i, j].reshape(1, n, 1, 1)
            out = out + (padded[:, :, i : i + h, j : j + wd] * tap).sum(1, keepdim=True)
    return out


def se_reference(x, block, pool="avg"):
    """SENet Eq. 2-4: x * sigmoid(W2 relu(W1 squeeze(x) + b1) + b2)."""
    squeezed = x.mean((2, 3)) if pool == "avg" else x.amax((2, 3))
    z = mlp_reference(squeezed, block.fc1, block.fc2)
    return x * torch.sigmoid(z)[:, :, None, None]


def eca_reference(x, w):
    """ECA-Net: x * sigmoid(conv1d_k(avgpool(x)))."""
    y = conv1d_channels_reference(x.mean((2, 3)), w)
    return x * torch.sigmoid(y)[:, :, None, None]


def cbam_reference(x, block, order=("max", "mean"), channel="fc", bn=None):
    """CBAM Eq. 1-3: channel map from a shared MLP (or 1-D conv), then a k x k spatial map."""
    avg, mx = x.mean((2, 3)), x.amax((2, 3))
    if channel == "fc":
        logits = mlp_reference(avg, block.channel.fc1, block.channel.fc2) + mlp_reference(
            mx, block.channel.fc1, block.channel.fc2
        )
    else:
        w = block.channel.channel_conv.weight.reshape(-1)
        logits = conv1d_channels_reference(avg, w) + conv1d_channels_reference(mx, w)
    x1 = x * torch.sigmoid(logits)[:, :, None, None]
    pooled = {"max": x1.amax(1, keepdim=True), "mean": x1.mean(1, keepdim=True)}
    maps = torch.cat([pooled[order[0]], pooled[order[1]]], dim=1)
    z = conv2d_same_reference(maps, block.spatial.conv.weight)
    if bn is not None:
        mean, var, gamma, beta, eps = bn
        z = (z - mean) / torch.sqrt(var + eps) * gamma + beta
    return x1 * torch.sigmoid(z)


def n_params(module):
    return sum(p.numel() for p in module.parameters())


def blend_params(module):
    return [p for name, p in module.named_parameters() if name.split(".")[-1] == "blend"]


def close(a, b):
    return torch.allclose(a, b, rtol=1e-10, atol=1e-12)


def make_block(kind, channels, seed=0, **params):
    torch.manual_seed(seed)
    return ai.create_block(kind, channels, **params)


def rand(*shape, dtype=torch.float64, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=dtype)


# --------------------------------------------------------------------------- 1. SE


@pytest.mark.parametrize("channels,ratio", [(32, 16), (64, 4), (48, 8)])
def test_se_paper_init_equals_senet_formula_with_avg_pool(channels, ratio):
    block = make_block("se", channels, ratio=ratio, init="paper").double()
    x = rand(3, channels, 5, 4)
    assert close(block(x), se_reference(x, block, "avg"))


def test_se_max_pool_variant_uses_max_pooling_not_avg():
    block = make_block("se", 32, pool="max").double()
    x = rand(2, 32, 6, 6)
    out = block(x)
    assert close(out, se_reference(x, block, "max"))
    assert not torch.allclose(out, se_reference(x, block, "avg"))


def test_se_without_bias_has_no_bias_parameters_and_matches_formula():
    block = make_block("se", 32, bias=False).double()
    names = [name for name, _ in block.named_parameters()]
    assert not any("bias" in name for name in names), names
    assert block.fc1.bias is None and block.fc2.bias is None
    assert n_params(block) == 2 * 32 * 2
    x = rand(2, 32, 3, 3)
    assert close(block(x), se_reference(x, block))


@pytest.mark.parametrize(
    "channels,ratio,hidden",
    [(256, 16, 16), (64, 16, 4), (8, 16, 1), (1, 16, 1), (15, 16, 1), (100, 16, 6), (96, 4, 24), (50, 3, 16)],
)
def test_se_hidden_width_is_channels_floordiv_ratio_at_least_one(channels, ratio, hidden):
    block = make_block("se", channels, ratio=ratio)
    assert block.fc1.weight.shape == (hidden, channels, 1, 1)
    assert block.fc2.weight.shape == (channels, hidden, 1, 1)


@pytest.mark.parametrize(
    "channels,ratio,divisor,hidden",
    [
        # timm make_divisible(C / r, divisor, min_value=divisor, round_limit=0), by hand:
        (256, 16, 8, 16),  # 16 + 4 = 20 -> 16
        (24, 16, 8, 8),  # 1.5 + 4 = 5 -> 0 -> min 8
        (64, 16, 8, 8),  # 4 + 4 = 8 -> 8
        (96, 16, 8, 8),  # 6 + 4 = 10 -> 8
        (112, 4, 8, 32),  # 28 + 4 = 32 -> 32 (half rounds up)
        (100, 4, 8, 24),  # 25 + 4 = 29 -> 24
        (1000, 16, 8, 64),  # 62.5 + 4 = 66 -> 64 (round_limit 0: no bump back up)
        (200, 16, 4, 12),  # 12.5 + 2 = 14 -> 12
    ],
)
def test_se_hidden_width_with_divisor_follows_timm_make_divisible(channels, ratio, divisor, hidden):
    block = make_block("se", channels, ratio=ratio, divisor=divisor)
    assert block.fc1.weight.shape[0] == hidden


# --------------------------------------------------------------------------- 2. ECA


def only_param(block):
    (p,) = list(block.parameters())
    return p


@pytest.mark.parametrize("channels", [8, 16, 64, 256])
def test_eca_equals_paper_formula_conv1d_over_channels_zero_padded_no_bias(channels):
    block = make_block("eca", channels).double()
    w = only_param(block).reshape(-1)
    x = rand(3, channels, 4, 5)
    assert close(block(x), eca_reference(x, w))


def test_eca_zero_padding_is_symmetric_so_border_channels_see_zeros():
    # A reversed (flipped) kernel or shifted padding gives another result: the test can fail.
    block = make_block("eca", 16, kernel_size=5).double()
    w = only_param(block).reshape(-1)
    assert not torch.allclose(w, w.flip(0))
    x = rand(2, 16, 3, 3)
    out = block(x)
    assert close(out, eca_reference(x, w))
    assert not torch.allclose(out, eca_reference(x, w.flip(0)))


@pytest.mark.parametrize("channels,k", [(64, 3), (256, 5), (512, 5), (1024, 5), (2048, 7)])
def test_eca_adaptive_kernel_size_matches_paper_table(channels, k):
    block = make_block("eca", channels)
    assert n_params(block) == k
    assert only_param(block).numel() == k


def paper_k(channels, gamma=2, b=1):
    t = int(abs((math.log2(channels) + b) / gamma))
    return t if t % 2 == 1 else t + 1


@pytest.mark.parametrize(
    "channels,gamma,b",
    [
        (1, 2, 1),
        (4, 2, 1),
        (8, 2, 1),
        (16, 2, 1),
        (100, 2, 1),
        (128, 2, 1),
        (300, 2, 1),
        (4096, 2, 1),
        (64, 1, 0),
        (64, 3, 2),
        (256, 1, 1),
    ],
)
def test_eca_adaptive_kernel_size_follows_log2_formula(channels, gamma, b):
    block = make_block("eca", channels, gamma=gamma, b=b)
    assert only_param(block).numel() == paper_k(channels, gamma, b)


@pytest.mark.parametrize("k", [1, 3, 7, 9])
def test_eca_kernel_size_override_fixes_k_and_matches_formula(k):
    block = make_block("eca", 256, kernel_size=k).double()
    assert n_params(block) == k
    x = rand(2, 256, 2, 3)
    assert close(block(x), eca_reference(x, only_param(block).reshape(-1)))


# --------------------------------------------------------------------------- 3. CBAM


@pytest.mark.parametrize("spatial_kernel", [3, 5, 7])
def test_cbam_equals_channel_then_spatial_formula_with_max_mean_order(spatial_kernel):
    block = make_block("cbam", 32, spatial_kernel=spatial_kernel).double()
    assert block.spatial.conv.weight.shape == (1, 2, spatial_kernel, spatial_kernel)
    assert block.spatial.conv.bias is None
    x = rand(2, 32, 9, 8)
    out = block(x)
    assert close(out, cbam_reference(x, block, order=("max", "mean")))
    # The reference is sensitive to the order: [mean, max] gives a different result.
    assert not torch.allclose(out, cbam_reference(x, block, order=("mean", "max")))


def test_cbam_channel_mlp_is_shared_between_avg_and_max():
    block = make_block("cbam", 64, ratio=16).double()
    names = sorted(name for name, _ in block.named_parameters())
    assert names == [
        "channel.fc1.bias",
        "channel.fc1.weight",
        "channel.fc2.bias",
        "channel.fc2.weight",
        "spatial.conv.weight",
    ]
    x = rand(2, 64, 5, 5)
    assert close(block(x), cbam_reference(x, block))


def test_cbam_channel_conv_uses_eca_conv_over_both_pooled_vectors():
    block = make_block("cbam", 256, channel="conv").double()
    assert n_params(block) == 5 + 2 * 7 * 7
    x = rand(2, 256, 4, 6)
    assert close(block(x), cbam_reference(x, block, channel="conv"))


def test_cbam_spatial_norm_adds_batchnorm_after_spatial_conv_in_eval_mode():
    block = make_block("cbam", 32, spatial_norm=True).double()
    assert n_params(block) == n_params(make_block("cbam", 32)) + 2
    norm = block.spatial.norm
    with torch.no_grad():
        norm.running_mean.fill_(0.3)
        norm.running_var.fill_(2.5)
        norm.weight.fill_(1.7)
        norm.bias.fill_(-0.4)
    block.eval()
    x = rand(2, 32, 6, 7)
    out = block(x)
    bn = (0.3, torch.tensor(2.5, dtype=torch.float64), 1.7, -0.4, 1e-5)
    assert close(out, cbam_reference(x, block, bn=bn))
    assert not torch.allclose(out, cbam_reference(x, block))


# --------------------------------------------------------------------------- 4. parameter counts


C, R = 256, 16
SE_PARAMS = 2 * C * C // R + C // R + C  # 8464


@pytest.mark.parametrize(
    "kind,params,expected",
    [
        ("se", {}, SE_PARAMS),
        ("se", {"bias": False}, 2 * C * C // R),
        ("se", {"ratio": 8}, 2 * C * C // 8 + C // 8 + C),
        ("eca", {}, 5),
        ("eca", {"kernel_size": 9}, 9),
        ("cbam", {}, SE_PARAMS + 2 * 7 * 7),
        ("cbam", {"spatial_kernel": 3}, SE_PARAMS + 2 * 3 * 3),
        ("cbam", {"spatial_kernel": 5}, SE_PARAMS + 2 * 5 * 5),
        ("cbam", {"bias": False}, 2 * C * C // R + 2 * 7 * 7),
        ("cbam", {"channel": "conv"}, 5 + 2 * 7 * 7),
    ],
)
def test_parameter_count_at_256_channels_matches_hand_count(kind, params, expected):
    assert SE_PARAMS == 8464
    assert n_params(ai.create_block(kind, C, **params)) == expected


@pytest.mark.parametrize("kind,params", CONFIGS, ids=CONFIG_IDS)
def test_identity_init_adds_exactly_one_scalar_per_attention_map(kind, params):
    paper = ai.create_block(kind, C, init="paper", **params)
    ident = ai.create_block(kind, C, init="identity", **params)
    extra = MAPS_PER_KIND[kind]
    assert n_params(ident) == n_params(paper) + extra
    blends = blend_params(ident)
    assert len(blends) == extra
    assert all(b.shape == () for b in blends)
    assert blend_params(paper) == []


# --------------------------------------------------------------------------- 5. identity init


@pytest.mark.parametrize("kind,params", CONFIGS, ids=CONFIG_IDS)
@pytest.mark.parametrize("shape", [(1, 16, 1, 1), (2, 16, 7, 5), (3, 16, 4, 4), (5, 16, 1, 6)])
@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
def test_identity_init_output_equals_input_exactly(kind, params, shape, channels_last):
    block = make_block(kind, shape[1], init="identity", **params).eval()
    x = rand(*shape, dtype=torch.float32, seed=sum(shape))
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        out = block(x)
    assert out.shape == x.shape
    assert torch.equal(out, x)


@pytest.mark.parametrize("kind", KINDS)
def test_identity_init_output_equals_input_in_train_mode_and_float64(kind):
    block = make_block(kind, 32, init="identity").double().train()
    x = rand(4, 32, 5, 3)
    assert torch.equal(block(x), x)


def _blend_to_one(block):
    with torch.no_grad():
        for p in blend_params(block):
            p.fill_(1.0)


@pytest.mark.parametrize(
    "kind,params,reference",
    [
        ("se", {}, lambda x, blk: se_reference(x, blk)),
        ("se", {"pool": "max"}, lambda x, blk: se_reference(x, blk, "max")),
        ("eca", {}, lambda x, blk: eca_reference(x, only_param_except_blend(blk))),
        ("cbam", {}, lambda x, blk: cbam_reference(x, blk)),
        ("cbam", {"channel": "conv"}, lambda x, blk: cbam_reference(x, blk, channel="conv")),
    ],
    ids=["se", "se-max", "eca", "cbam", "cbam-conv"],
)
def test_identity_init_with_blend_one_is_exactly_the_paper_block(kind, params, reference):
    ident = make_block(kind, 64, init="identity", **params).double()
    _blend_to_one(ident)
    x = rand(2, 64, 5, 4)
    out = ident(x)
    assert close(out, reference(x, ident))
    # bit-for-bit the paper block with the same weights
    paper = ai.create_block(kind, 64, init="paper", **params).double()
    missing, unexpected = paper.load_state_dict(ident.state_dict(), strict=False)
    assert missing == [] and all(k.split(".")[-1] == "blend" for k in unexpected)
    assert torch.equal(out, paper(x))


def only_param_except_blend(block):
    (p,) = [p for name, p in block.named_parameters() if name.split(".")[-1] != "blend"]
    return p.reshape(-1)


@pytest.mark.parametrize("kind,params", CONFIGS, ids=CONFIG_IDS)
def test_identity_init_blend_parameters_receive_nonzero_gradient(kind, params):
    block = make_block(kind, 16, init="identity", **params).train()
    x = rand(2, 16, 5, 4, dtype=torch.float32)
    target = rand(2, 16, 5, 4, dtype=torch.float32, seed=7)
    loss = (block(x) * target).sum()
    loss.backward()
    blends = blend_params(block)
    assert len(blends) == MAPS_PER_KIND[kind]
    for p in blends:
        assert p.grad is not None
        assert p.grad.abs().item() > 0


@pytest.mark.parametrize("kind,params", CONFIGS, ids=CONFIG_IDS)
def test_paper_init_every_parameter_receives_a_gradient(kind, params):
    block = make_block(kind, 16, init="paper", **params).train()
    x = rand(2, 16, 5, 4, dtype=torch.float32)
    target = rand(2, 16, 5, 4, dtype=torch.float32, seed=7)
    (block(x) * target).sum().backward()
    for name, p in block.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name


# --------------------------------------------------------------------------- 6. layouts


@pytest.mark.parametrize("kind,params", CONFIGS, ids=CONFIG_IDS)
@pytest.mark.parametrize("init", ["paper", "identity"])
@pytest.mark.parametrize("shape", [(2, 24, 7, 5), (1, 24, 1, 1), (3, 24, 6, 6)])
def test_block_maps_bchw_to_bchw_and_channels_last_matches_contiguous(kind, params, init, shape):
    block = make_block(kind, shape[1], init=init, **params).eval()
    with torch.no_grad():
        for p in blend_params(block):
            p.fill_(0.6)  # exercise the blended map, not just the identity
    x = rand(*shape, dtype=torch.float32, seed=3)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        out = block(x)
        out_cl = block(x_cl)
    assert out.shape == shape
    assert out_cl.shape == shape
    assert torch.allclose(out_cl, out, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- 7. bad parameters


@pytest.mark.parametrize(
    "kind,params,param_name",
    [
        ("se", {"ratio": 0}, "ratio"),
        ("se", {"ratio": -1}, "ratio"),
        ("cbam", {"ratio": 0}, "ratio"),
        ("cbam", {"ratio": -1}, "ratio"),
        ("se", {"pool": "mean"}, "pool"),
        ("cbam", {"spatial_kernel": 4}, "spatial_kernel"),
        ("cbam", {"channel": "mlp"}, "channel"),
        ("eca", {"kernel_size": 4}, "kernel_size"),
        ("cbam", {"channel": "conv", "kernel_size": 4}, "kernel_size"),
        ("se", {"init": "zeros"}, "init"),
        ("eca", {"init": "zeros"}, "init"),
        ("cbam", {"init": "zeros"}, "init"),
        ("se", {"bias": "yes"}, "bias"),
        ("cbam", {"bias": "yes"}, "bias"),
    ],
)
def test_bad_block_parameter_raises_block_param_error_naming_it(kind, params, param_name):
    with pytest.raises(ai.BlockParamError) as excinfo:
        ai.create_block(kind, 64, **params)
    err = excinfo.value
    assert isinstance(err, ValueError)
    assert err.param == param_name
    assert param_name in str(err)
    assert repr(params[param_name]) in str(err)


def test_block_param_error_is_a_value_error():
    assert issubclass(ai.BlockParamError, ValueError)


def test_unknown_block_kind_raises_value_error_listing_known_kinds():
    with pytest.raises(ValueError) as excinfo:
        ai.create_block("squeeze", 64)
    message = str(excinfo.value)
    assert "squeeze" in message
    for kind in KINDS:
        assert kind in message


# --------------------------------------------------------------------------- 8. registry


@pytest.fixture
def isolated_registry():
    """Blocks registered in a test are unregistered after it."""
    before = set(ai.list_blocks())
    yield
    for name in set(ai.list_blocks()) - before:
        ai.unregister_block(name)


class ScaleByTwo(torch.nn.Module):
    def __init__(self, channels, factor=2.0):
        super().__init__()
        self.channels = channels
        self.factor = factor

    def forward(self, x):
        return x * self.factor


def test_builtin_blocks_are_listed():
    assert set(KINDS) <= set(ai.list_blocks())
    assert ai.list_blocks() == sorted(ai.list_blocks())


def test_registered_custom_block_is_listed_and_buildable(isolated_registry):
    assert "scale_by_two" not in ai.list_blocks()
    returned = ai.register_block("scale_by_two", ScaleByTwo)
    assert returned is ScaleByTwo
    assert "scale_by_two" in ai.list_blocks()
    block = ai.create_block("scale_by_two", 12, factor=3.0)
    assert isinstance(block, ScaleByTwo)
    assert block.channels == 12
    x = rand(2, 12, 3, 3)
    assert torch.equal(block(x), x * 3.0)


def test_registering_same_name_twice_without_overwrite_raises(isolated_registry):
    ai.register_block("scale_by_two", ScaleByTwo)
    with pytest.raises(ValueError, match="scale_by_two"):
        ai.register_block("scale_by_two", lambda channels: torch.nn.Identity())
    assert isinstance(ai.create_block("scale_by_two", 4), ScaleByTwo)  # unchanged
    ai.register_block("scale_by_two", lambda channels: torch.nn.Identity(), overwrite=True)
    assert isinstance(ai.create_block("scale_by_two", 4), torch.nn.Identity)


def test_registering_a_builtin_name_without_overwrite_raises(isolated_registry):
    with pytest.raises(ValueError, match="se"):
        ai.register_block("se", ScaleByTwo)
    assert type(ai.create_block("se", 32)).__name__ == "SqueezeExcite"


def test_an_unregistered_block_is_gone_and_its_kind_refused_again():
    ai.register_block("scale_by_two", ScaleByTwo)
    assert ai.unregister_block("scale_by_two") is ScaleByTwo
    assert "scale_by_two" not in ai.list_blocks()
    with pytest.raises(ValueError, match="unknown block kind 'scale_by_two'"):
        ai.create_block("scale_by_two", 4)
    with pytest.raises(ValueError, match="'scale_by_two' is not registered"):
        ai.unregister_block("scale_by_two")


@pytest.mark.parametrize("kind", KINDS)
def test_a_built_in_block_cannot_be_unregistered(kind):
    with pytest.raises(ValueError) as info:
        ai.unregister_block(kind)
    assert f"block '{kind}' is built in" in str(info.value) and "\n" not in str(info.value)
    assert kind in ai.list_blocks()
