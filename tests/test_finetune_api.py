"""``ai.param_groups``, ``ai.freeze_base`` and ``ai.blends`` on patched models."""

from __future__ import annotations

import math

import pytest
import timm
import timm.optim
import timm.scheduler
import torch
from torch import nn

import attn_inject as ai
from attn_inject.models.build import build_model

SIZE = (3, 32, 32)


def patched_model(
    name: str = "timm:resnet10t", recipe: str = "cbam_after_every_stage", init: str = "identity"
):
    torch.manual_seed(0)
    base = build_model(name, num_classes=5)
    return ai.inject(base, recipe, init=init, input_size=SIZE)


@pytest.fixture
def patched():
    return patched_model()


def block_param_ids(model) -> set[int]:
    return {id(p) for p in ai.block_parameters(model)}


# --- param_groups ---------------------------------------------------------------------


def test_each_parameter_is_in_exactly_one_group(patched):
    groups = ai.param_groups(patched, 1e-3)
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids))
    assert set(ids) == {id(p) for p in patched.parameters()}
    names = [n for g in groups for n in g["param_names"]]
    assert sorted(names) == sorted(n for n, _ in patched.named_parameters())


def test_biases_norms_and_blend_gates_get_no_weight_decay(patched):
    groups = ai.param_groups(patched, 1e-3, weight_decay=0.05)
    decay_of = {n: g["weight_decay"] for g in groups for n in g["param_names"]}
    gates = [n for n in decay_of if n.endswith("blend")]
    assert len(gates) == 2 * len(ai.inserted_blocks(patched))  # CBAM: channel and spatial
    assert all(decay_of[n] == 0 for n in gates)
    norms = {
        f"{m}.{p}"
        for m, mod in patched.named_modules()
        if isinstance(mod, nn.BatchNorm2d)
        for p in ("weight", "bias")
    }
    assert norms and all(decay_of[n] == 0 for n in norms)
    assert all(decay_of[n] == 0 for n in decay_of if n.endswith(".bias"))
    convs = [f"{m}.weight" for m, mod in patched.named_modules() if isinstance(mod, nn.Conv2d)]
    assert convs and all(decay_of[n] == 0.05 for n in convs)


def test_new_blocks_learn_at_their_scale_and_the_rest_at_the_base_rate(patched):
    groups = ai.param_groups(patched, 2e-4, attn_lr_scale=7.0)
    blocks = block_param_ids(patched)
    for g in groups:
        inside = {id(p) in blocks for p in g["params"]}
        assert len(inside) == 1, "a group mixes block and base parameters"
        scale = 7.0 if inside.pop() else 1.0
        assert g["lr_scale"] == scale
        assert g["lr"] == pytest.approx(2e-4 * scale)
        assert g["initial_lr"] == 2e-4


def test_timm_optimizer_and_scheduler_apply_warmup_and_cosine_to_every_group(patched):
    lr, warmup, total = 1e-3, 4, 20
    optimizer = timm.optim.create_optimizer_v2(
        patched, "adamw", lr=lr, param_group_fn=lambda m: ai.param_groups(m, lr, attn_lr_scale=10.0)
    )
    scheduler, _ = timm.scheduler.create_scheduler_v2(
        optimizer, "cosine", num_epochs=total, warmup_epochs=warmup, warmup_lr=1e-5, min_lr=0.0
    )
    for epoch in (warmup, 12):
        scheduler.step(epoch)
        # timm's cosine after warm-up (warmup_prefix=False): 0.5 * lr * (1 + cos(pi * t / T))
        expected = 0.5 * lr * (1 + math.cos(math.pi * epoch / total))
        for g in optimizer.param_groups:
            assert g["lr"] == pytest.approx(expected * g["lr_scale"])
    scheduler.step(1)  # during warm-up: linear from warmup_lr towards lr
    expected = 1e-5 + (lr - 1e-5) / warmup
    for g in optimizer.param_groups:
        assert g["lr"] == pytest.approx(expected * g["lr_scale"])


def test_a_torch_optimizer_takes_the_groups_as_they_are(patched):
    optimizer = torch.optim.SGD(ai.param_groups(patched, 0.1, weight_decay=0.0), lr=0.1)
    patched.train()
    patched(torch.randn(2, *SIZE)).logsumexp(1).sum().backward()
    before = {n: p.detach().clone() for n, p in patched.named_parameters() if n.endswith("blend")}
    grads = {n: p.grad.clone() for n, p in patched.named_parameters() if n.endswith("blend")}
    optimizer.step()
    for n, p in patched.named_parameters():
        if n in before:  # plain SGD: w - lr * scale * grad, with the blocks' scale of 10
            assert torch.allclose(p, before[n] - 0.1 * 10 * grads[n])


def test_layer_decay_without_a_group_matcher_is_one_clear_error():
    patched = patched_model("tv:resnet18")
    assert not hasattr(patched, "group_matcher")  # torchvision models have none
    with pytest.raises(ValueError, match="group_matcher") as info:
        ai.param_groups(patched, 1e-3, layer_decay=0.75)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("value", [0.0, 1.5, -0.1])
def test_layer_decay_out_of_range_is_refused(patched, value):
    with pytest.raises(ValueError, match="layer_decay"):
        ai.param_groups(patched, 1e-3, layer_decay=value)


def test_layer_decay_matches_timm_for_the_base_and_puts_each_block_in_its_layer():
    patched = patched_model()
    base = build_model("timm:resnet10t", num_classes=5)
    reference = timm.optim.param_groups_layer_decay(base, weight_decay=0.05, layer_decay=0.5)
    base_params = dict(base.named_parameters())
    timm_scale = {
        n: g["lr_scale"]
        for g in reference
        for n, p in base_params.items()
        if any(p is q for q in g["params"])
    }
    groups = ai.param_groups(patched, 1e-3, layer_decay=0.5, attn_lr_scale=10.0)
    ours = {n: g["lr_scale"] for g in groups for n in g["param_names"]}
    blocks = ai.inserted_blocks(patched)
    for name, scale in timm_scale.items():
        assert ours[name] == pytest.approx(scale), name
    for block_name, block in blocks.items():
        host = block_name.rpartition(".")[0]
        host_scales = [s for n, s in timm_scale.items() if n.startswith(host + ".")]
        for param_name, _ in block.named_parameters():
            assert ours[f"{block_name}.{param_name}"] == pytest.approx(10.0 * max(host_scales))
    # the head is the last layer: no decay there
    assert ours["fc.weight"] == 1.0


# --- freeze_base -----------------------------------------------------------------------


def test_freeze_base_trains_only_the_blocks_and_keeps_frozen_norm_statistics(patched):
    trained = ai.freeze_base(patched)
    assert {id(p) for p in patched.parameters() if p.requires_grad} == block_param_ids(patched)
    assert set(trained) == {n for n, p in patched.named_parameters() if p.requires_grad}
    bn = patched.get_submodule("layer1.0.bn1")
    stats = bn.running_mean.clone(), bn.running_var.clone()
    weights = {n: p.detach().clone() for n, p in patched.named_parameters() if not p.requires_grad}
    patched.train()
    optimizer = torch.optim.SGD(ai.param_groups(patched, 0.5, weight_decay=0.0), lr=0.5)
    for _ in range(2):
        optimizer.zero_grad()
        patched(torch.randn(4, *SIZE) * 3 + 1).logsumexp(1).sum().backward()
        optimizer.step()
    assert not bn.training  # stays in eval mode through model.train()
    assert torch.equal(bn.running_mean, stats[0]) and torch.equal(bn.running_var, stats[1])
    assert all(torch.equal(p, weights[n]) for n, p in patched.named_parameters() if n in weights)
    assert any(float(v) != 0 for v in ai.blends(patched).values())  # the blocks learned


def test_freeze_base_with_the_head_and_unfreezing_restore_training(patched):
    trained = ai.freeze_base(patched, head=True)
    assert "fc.weight" in trained and "fc.bias" in trained
    assert "conv1.0.weight" not in trained
    ai.freeze_base(patched, frozen=False)
    assert all(p.requires_grad for p in patched.parameters())
    patched.train()
    patched(torch.randn(2, *SIZE))
    assert patched.get_submodule("layer1.0.bn1").training


def test_freeze_base_keeps_the_state_dict_keys(patched):
    keys = list(patched.state_dict())
    ai.freeze_base(patched)
    assert list(patched.state_dict()) == keys


# --- blends ----------------------------------------------------------------------------


def test_gates_name_every_blend_and_start_at_zero(patched):
    values = ai.blends(patched)
    expected = {f"{b}.{part}.blend" for b in ai.inserted_blocks(patched) for part in ("channel", "spatial")}
    assert set(values) == expected
    assert all(v == 0.0 for v in values.values())
    name = sorted(values)[0]
    dict(patched.named_parameters())[name].data.fill_(0.25)
    assert ai.blends(patched)[name] == 0.25


def test_blocks_inserted_at_paper_init_have_no_gates():
    assert ai.blends(patched_model(init="paper")) == {}
