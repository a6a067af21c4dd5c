"""The model passed to ``inject`` is never changed: nothing registered on the patched model
(hooks of every kind, parametrizations, attributes) reaches it, on the root, on a container
on the path to a changed module, or on a changed module, and the reverse. Hooks registered
before ``inject`` act on both, and their handles remove them from both."""

from __future__ import annotations

import copy

import pytest
import torch
import torchvision
from torch import nn
from torch.nn.utils import parametrize

import attn_inject as ai

SIZE = (3, 64, 64)
X = torch.randn(1, *SIZE, generator=torch.Generator().manual_seed(0))
PATHS = ["", "layer1", "layer1.0"]  # the root, a container on the path, a changed module


def counting(calls: list[str], name: str):
    def hook(*args, **kwargs):
        calls.append(name)

    return hook


def register_every_hook(module: nn.Module, calls: list[str]) -> None:
    """One hook of every kind on ``module``, each appending its kind to ``calls`` when it runs."""
    module.register_forward_hook(counting(calls, "forward"))
    module.register_forward_hook(counting(calls, "forward_kwargs"), with_kwargs=True)
    module.register_forward_hook(counting(calls, "forward_always"), always_call=True)
    module.register_forward_pre_hook(counting(calls, "pre"))
    module.register_forward_pre_hook(counting(calls, "pre_kwargs"), with_kwargs=True)
    module.register_full_backward_hook(counting(calls, "backward"))
    module.register_full_backward_pre_hook(counting(calls, "backward_pre"))
    module.register_state_dict_pre_hook(counting(calls, "state_dict_pre"))
    module.register_state_dict_post_hook(counting(calls, "state_dict_post"))
    module.register_load_state_dict_pre_hook(counting(calls, "load_pre"))
    module.register_load_state_dict_post_hook(counting(calls, "load_post"))


EVERY_KIND = {
    "forward",
    "forward_kwargs",
    "forward_always",
    "pre",
    "pre_kwargs",
    "backward",
    "backward_pre",
    "state_dict_pre",
    "state_dict_post",
    "load_pre",
    "load_post",
}


def exercise(model: nn.Module) -> None:
    """A forward, a backward, ``state_dict`` and ``load_state_dict``: every hook kind's event."""
    x = X.clone().requires_grad_(True)
    model(x).sum().backward()
    model.load_state_dict(model.state_dict())
    model.zero_grad(set_to_none=True)


@pytest.fixture
def pair(injected) -> tuple[nn.Module, nn.Module]:
    """torchvision's resnet18 and its se_resnet injection, each test's own copies."""
    model, patched = injected("tv:resnet18", "se_resnet", SIZE)
    assert model.layer1[0].conv1 is patched.layer1[0].conv1
    return model, patched


def registries(model: nn.Module) -> dict[tuple[str, str], object]:
    """Every module's registries (hooks, children, parameters, buffers), copied, and its class."""
    found: dict[tuple[str, str], object] = {}
    for name, module in model.named_modules():
        found[(name, "class")] = type(module)
        for key, value in vars(module).items():
            if key.startswith("_") and isinstance(value, dict):
                found[(name, key)] = dict(value)
    return found


def test_the_paths_cover_a_changed_module(pair):
    model, patched = pair
    assert type(patched.layer1[0]) is not type(model.layer1[0]) or patched.layer1[0] is not model.layer1[0]
    assert patched.layer1 is not model.layer1 and patched is not model


@pytest.mark.parametrize("path", PATHS)
def test_hooks_registered_on_the_patched_model_never_reach_the_original(pair, path):
    model, patched = pair
    before = registries(model)
    calls: list[str] = []
    register_every_hook(patched.get_submodule(path), calls)
    exercise(model)
    assert calls == []
    assert registries(model) == before
    exercise(patched)
    assert set(calls) == EVERY_KIND


@pytest.mark.parametrize("path", PATHS)
def test_hooks_registered_on_the_original_after_inject_never_reach_the_patched_model(pair, path):
    model, patched = pair
    before = registries(patched)
    calls: list[str] = []
    register_every_hook(model.get_submodule(path), calls)
    exercise(patched)
    assert calls == []
    assert registries(patched) == before
    exercise(model)
    assert set(calls) == EVERY_KIND


@pytest.mark.parametrize("path", PATHS)
def test_hooks_from_before_inject_act_on_both_and_their_handles_remove_them_from_both(path):
    torch.manual_seed(0)
    model = torchvision.models.resnet18().eval()
    calls: list[str] = []
    handle = model.get_submodule(path).register_forward_hook(counting(calls, "before"))
    patched = ai.inject(model, "se_resnet", input_size=SIZE)
    with torch.no_grad():
        model(X)
        patched(X)
        assert calls == ["before", "before"]
        handle.remove()
        model(X)
        patched(X)
    assert calls == ["before", "before"]
    assert not patched.get_submodule(path)._forward_hooks


@pytest.mark.parametrize("path", PATHS)
def test_parametrizations_and_attributes_on_the_patched_model_never_reach_the_original(pair, path):
    model, patched = pair
    with torch.no_grad():
        expected = model(X)
    before = registries(model)
    module = patched.get_submodule(path)
    module.register_parameter("extra", nn.Parameter(torch.ones(3)))
    parametrize.register_parametrization(module, "extra", _Double())
    module.note = "patched only"
    assert torch.equal(module.extra, torch.full((3,), 2.0))
    original = model.get_submodule(path)
    assert not hasattr(original, "note") and not hasattr(original, "extra")
    assert not parametrize.is_parametrized(original)
    assert registries(model) == before
    with torch.no_grad():
        assert torch.equal(model(X), expected)


def test_deep_copy_and_pickle_of_a_patched_model_with_inherited_hooks_stand_alone():
    torch.manual_seed(0)
    model = torchvision.models.resnet18().eval()
    handle = model.layer1.register_forward_hook(_halve)
    patched = ai.inject(model, "se_resnet", input_size=SIZE)
    twin = copy.deepcopy(patched)
    handle.remove()  # removed from the original and the patched model, not from the copy
    with torch.no_grad():
        assert torch.equal(patched(X), model(X))
        assert not torch.equal(twin(X), model(X))


class _Double(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 2


def _halve(module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
    return out * 0.5
