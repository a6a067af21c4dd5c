"""timm's own model checks (``tests/test_models.py``) on patched models: forward, backward
with a gradient for every parameter, an fx feature extractor exactly equal to eager,
``forward_features`` / ``forward_head`` / ``reset_classifier``, ``features_only`` models and
TorchScript, wherever they hold on the originals."""

from __future__ import annotations

import copy

import pytest
import timm
import torch
from timm.models._features_fx import create_feature_extractor, get_graph_node_names

import attn_inject as ai

from .conftest import SIZE

MODELS = ["resnet10t", "mobilenetv3_small_050"]  # the default run; the wider set is marked zoo
WIDER = ["convnext_atto", "efficientnet_b0", "regnety_002", "densenet121", "cspresnet50"]
RECIPES = ["se_resnet", "cbam_after_every_stage"]
X = torch.randn(2, *SIZE, generator=torch.Generator().manual_seed(0))


@pytest.fixture(
    scope="module",
    params=[pytest.param((m, r), id=f"{m}-{r}") for m in MODELS for r in RECIPES]
    + [
        pytest.param((m, r), id=f"{m}-{r}", marks=pytest.mark.zoo)
        for m in WIDER
        for r in RECIPES
        if (m, r) != ("densenet121", "se_resnet")  # DenseNet concatenates: no residual addition
    ],
)
def injected(request):
    """The model and its injection, made once per module for each model and recipe."""
    name, recipe = request.param
    torch.manual_seed(0)
    model = timm.create_model(name).eval()
    return name, model, ai.inject(model, recipe, input_size=SIZE), recipe


@pytest.fixture
def pair(injected):
    """(name, model, patched, recipe), the model and the patched model each test's own copies."""
    name, model, patched, recipe = injected
    return name, copy.deepcopy(model), copy.deepcopy(patched), recipe


def test_backward_gives_every_parameter_a_gradient(pair):
    _, _, patched, _ = pair
    patched = patched.train()
    patched(X).mean().backward()
    missing = [n for n, p in patched.named_parameters() if p.grad is None]
    assert missing == []


def test_fx_feature_extractor_equals_eager_exactly(pair):
    _, model, patched, _ = pair
    _, eval_nodes = get_graph_node_names(patched)
    extractor = create_feature_extractor(patched, return_nodes=[eval_nodes[-1]]).eval()
    with torch.no_grad():
        assert torch.equal(extractor(X)[eval_nodes[-1]], patched(X))
        assert torch.equal(patched(X), model(X))


def test_default_cfg_features_head_and_reset_classifier(pair):
    _, model, patched, _ = pair
    assert timm.data.resolve_data_config(model=patched) == timm.data.resolve_data_config(model=model)
    with torch.no_grad():
        features = patched.forward_features(X)
        assert torch.equal(features, model.forward_features(X))
        assert torch.equal(patched.forward_head(features), patched(X))
    clone = copy.deepcopy(patched)
    clone.reset_classifier(7)
    assert clone(X).shape == (2, 7)
    clone.reset_classifier(0)
    assert clone(X).shape == (2, clone.num_features) or clone(X).shape[1] == clone.head_hidden_size


def test_features_only_model_takes_blocks_and_keeps_its_features(pair):
    name, _, _, recipe = pair
    torch.manual_seed(0)
    features = timm.create_model(name, features_only=True).eval()
    patched = ai.inject(features, recipe, input_size=SIZE)
    assert ai.inserted_blocks(patched)
    # The class is kept unless a point lies in the root's own code: in DenseNet's feature
    # list, the last stage ends at norm5, a leaf whose output the root's forward reads.
    in_root = [p.key for p in patched.attn_inject.plan if not p.owner and p.attach == "graph"]
    assert (type(patched) is type(features)) == (not in_root), in_root
    with torch.no_grad():
        for ours, theirs in zip(patched(X), features(X), strict=True):
            assert torch.equal(ours, theirs)
    assert patched.feature_info.channels() == features.feature_info.channels()


def test_torchscript_of_a_patched_model(pair):
    _, _, patched, _ = pair
    with torch.no_grad():
        scripted = torch.jit.script(patched)
        assert torch.equal(scripted(X), patched(X))
