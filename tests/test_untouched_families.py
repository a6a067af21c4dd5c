"""Across every family of timm and torchvision (one small model each, random init), ``inject``
leaves the model it is given as it was, all of it: each module's class, every attribute in
its ``__dict__`` (rebound, added or removed), the contents of its dicts (hooks included), lists and sets,
every parameter and buffer (the same tensor object, the same values), and the global random
states of torch, NumPy and Python. The default suite checks the kinds of change one by one
on a few models (tests/test_input_untouched.py, tests/test_timm_changes.py); this sweep runs
the same promise over the zoo's families (``make zoo-test``)."""

from __future__ import annotations

import random
import re
import warnings
from typing import Any

import numpy as np
import pytest
import timm
import torch
import torchvision
from torch import nn

import attn_inject as ai

pytestmark = pytest.mark.zoo

RECIPES = ("se_resnet", "cbam_after_every_stage")
SMALL = ("nano", "pico", "atto", "femto", "tiny", "small", "xs", "_s", "18", "b0", "_t", "10")
Snapshot = dict[str, tuple[type, dict[str, Any]]]


def one_per_family(names: list[str]) -> list[str]:
    """For each family (a name's letters before its first digit or underscore), its shortest
    name among those that read as a small variant, else its shortest name."""
    families: dict[str, list[str]] = {}
    for name in names:
        families.setdefault(re.split(r"[_\d]", name)[0], []).append(name)
    chosen = []
    for _, members in sorted(families.items()):
        small = [n for n in members if any(s in n for s in SMALL)] or members
        chosen.append(min(small, key=lambda n: (len(n), n)))
    return chosen


TIMM_MODELS = one_per_family(timm.list_models())
TORCHVISION_MODELS = one_per_family(torchvision.models.list_models(module=torchvision.models))


def _value(value: Any) -> Any:
    """What is compared of an attribute: a plain value itself, a container's identity and
    items (by identity), anything else its identity."""
    if isinstance(value, (int, float, str, bool, type(None))):
        return value
    if isinstance(value, dict):  # plain dicts and the OrderedDicts that hold hooks
        return ("dict", id(value), [(k, id(v)) for k, v in value.items()])
    if isinstance(value, (list, set, tuple)):
        return (type(value).__name__, id(value), [id(v) for v in value])
    return ("object", id(value))


def snapshot(model: nn.Module) -> Snapshot:
    taken: Snapshot = {}
    for name, module in model.named_modules():
        state: dict[str, Any] = {}
        for key, value in vars(module).items():
            if key in ("_parameters", "_buffers"):
                state[key] = {n: None if t is None else (id(t), t.detach().clone()) for n, t in value.items()}
            else:
                state[key] = _value(value)
        taken[name] = (type(module), state)
    return taken


def differences(before: Snapshot, after: Snapshot) -> list[str]:
    found = [f"module {n!r} added or removed" for n in set(before) ^ set(after)]
    for name in set(before) & set(after):
        (kind, was), (kind_now, now) = before[name], after[name]
        if kind is not kind_now:
            found.append(f"{name}: class {kind.__name__} became {kind_now.__name__}")
        found += [f"{name}.{k} added or removed" for k in set(was) ^ set(now)]
        for key in set(was) & set(now):
            if key in ("_parameters", "_buffers"):
                for tensor_name in set(was[key]) | set(now[key]):
                    a, b = was[key].get(tensor_name, "absent"), now[key].get(tensor_name, "absent")
                    if a is None or b is None or isinstance(a, str) or isinstance(b, str):
                        if a is not b:
                            found.append(f"{name}.{tensor_name} added, removed or set to None")
                    elif a[0] != b[0]:
                        found.append(f"{name}.{tensor_name} replaced")
                    elif a[1].shape != b[1].shape or not torch.equal(a[1], b[1]):
                        found.append(f"{name}.{tensor_name} written")
            elif was[key] != now[key]:
                found.append(f"{name}.{key} changed")
    return sorted(found)


def random_states() -> tuple[torch.Tensor, object, np.ndarray]:
    return torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy()


def same_random_states(a: tuple, b: tuple) -> bool:
    return torch.equal(a[0], b[0]) and a[1] == b[1] and np.array_equal(a[2], b[2])


def check_untouched(model: nn.Module) -> None:
    for recipe in RECIPES:
        before, states = snapshot(model), random_states()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ai.inject(model, recipe, allow_empty=True)
        assert same_random_states(states, random_states()), f"{recipe}: the global random state moved"
        changed = differences(before, snapshot(model))
        assert not changed, f"{recipe}: the input model changed: {changed[:5]}"


def test_the_families_are_many():
    assert len(TIMM_MODELS) > 100 and len(TORCHVISION_MODELS) > 15


@pytest.mark.parametrize("name", TIMM_MODELS)
def test_inject_leaves_a_timm_model_and_the_random_state_as_they_were(name):
    torch.manual_seed(0)
    check_untouched(timm.create_model(name).eval())


@pytest.mark.parametrize("name", TORCHVISION_MODELS)
def test_inject_leaves_a_torchvision_model_and_the_random_state_as_they_were(name):
    torch.manual_seed(0)
    check_untouched(torchvision.models.get_model(name).eval())


def test_the_snapshot_sees_each_kind_of_change():
    """The comparison itself: each kind of change to a model is reported."""
    model = torchvision.models.get_model("resnet18").eval()
    changes = {
        "written": lambda m: m.conv1.weight.data.add_(1),
        "replaced": lambda m: setattr(m.conv1, "weight", nn.Parameter(m.conv1.weight.detach().clone())),
        "added or removed": lambda m: setattr(m.layer1, "_cache", 1),
        "changed": lambda m: m.layer1.__dict__["_forward_hooks"].__setitem__(0, print),
        "class": lambda m: setattr(m.layer1[0], "__class__", type("Sub", (type(m.layer1[0]),), {})),
    }
    for words, change in changes.items():
        before = snapshot(model)
        change(model)
        assert any(words in d for d in differences(before, snapshot(model))), words
        model = torchvision.models.get_model("resnet18").eval()
