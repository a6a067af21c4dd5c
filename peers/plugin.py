"""A pytest plugin that hands timm's and torchvision's own model tests patched models.

Loaded with ``-p peers.plugin`` into a run of a peer's test suite (``tests/test_models.py`` of
timm, ``test/test_models.py`` of torchvision), it wraps the builders those suites call
(``timm.create_model``; every builder in torchvision's model registry and the module
attributes that name it), so that each model a test builds is returned as
``attn_inject.inject(model, recipe, init=init, allow_empty=True)``. The suite itself is not
changed: what it checks (forward, backward into every parameter, fx tracing, TorchScript,
feature extraction, expected outputs) it now checks on the patched model.

It reads the environment:

    ATTN_INJECT_PEER_RECIPE   the recipe to inject; unset or empty: the models are left plain
    ATTN_INJECT_PEER_INIT     the blocks' init (``identity``, ``paper``); unset: the recipe's
    ATTN_INJECT_PEER_MODELS   comma-separated model names: only the tests whose ``model_name``
                              or ``model_fn`` parameter is one of them (any pretrained tag
                              aside) run, the rest are deselected; unset: every test runs

    cd build/peers/timm-1.0.31 && ATTN_INJECT_PEER_RECIPE=se_resnet \\
        ATTN_INJECT_PEER_INIT=identity ATTN_INJECT_PEER_MODELS=resnest14d \\
        PYTHONPATH=/path/to/attn-inject python -m pytest -q -p peers.plugin tests/test_models.py
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import pytest
from torch import nn

RECIPE_VAR = "ATTN_INJECT_PEER_RECIPE"
INIT_VAR = "ATTN_INJECT_PEER_INIT"
MODELS_VAR = "ATTN_INJECT_PEER_MODELS"

# the test parameters that name the model a peer's test builds (timm: a name; torchvision: a builder)
MODEL_PARAMETERS = ("model_name", "model_fn")

Builder = Callable[..., nn.Module]


@dataclass(frozen=True)
class PeerSettings:
    """What the plugin does in one run: the recipe to inject (``None``: plain models), its
    init, and the models whose tests run (``None``: all)."""

    recipe: str | None = None
    init: str | None = None
    models: frozenset[str] | None = None

    @classmethod
    def from_environ(cls, environ: Mapping[str, str]) -> PeerSettings:
        recipe = environ.get(RECIPE_VAR, "").strip() or None
        init = environ.get(INIT_VAR, "").strip() or None
        names = environ.get(MODELS_VAR)
        models = None if names is None else frozenset(n.strip() for n in names.split(",") if n.strip())
        return cls(recipe, init, models)


def patched_builder(build: Builder, settings: PeerSettings) -> Builder:
    """``build`` with its model passed through ``inject`` (the recipe of ``settings``); the
    same name, module, signature and annotations, which the peers' suites read (test ids,
    ``list_models(module)``, torchvision's weights enum from the annotations). Whatever
    ``build`` or ``inject`` raises reaches the test: a failure to patch is a failure."""
    if settings.recipe is None:
        return build
    recipe, init = settings.recipe, settings.init

    @functools.wraps(build)
    def build_patched(*args: Any, **kwargs: Any) -> nn.Module:
        from attn_inject.surgery.inject import inject

        return inject(build(*args, **kwargs), recipe, init=init, allow_empty=True)

    return build_patched


@dataclass
class _Replacement:
    owner: Any  # a module or a dict
    name: str
    original: Any

    def undo(self) -> None:
        if isinstance(self.owner, dict):
            self.owner[self.name] = self.original
        else:
            setattr(self.owner, self.name, self.original)


def _timm_places() -> Iterator[tuple[Any, str]]:
    import timm
    import timm.models
    import timm.models._factory

    yield from ((m, "create_model") for m in (timm, timm.models, timm.models._factory))


def _torchvision_places() -> Iterator[tuple[Any, str]]:
    from torchvision.models import _api

    builders = dict(_api.BUILTIN_MODELS)
    yield from ((_api.BUILTIN_MODELS, name) for name in builders)
    by_identity = {id(fn): fn for fn in builders.values()}
    for module_name, module in list(sys.modules.items()):
        if module is None or not module_name.startswith("torchvision.models"):
            continue
        for attribute, value in list(vars(module).items()):
            if id(value) in by_identity and value is by_identity[id(value)]:
                yield module, attribute


def install(settings: PeerSettings) -> list[_Replacement]:
    """Replace timm's and torchvision's builders by their patched versions; the list undoes it.
    A builder reached twice (a registry entry and a module attribute) gets one wrapper."""
    if settings.recipe is None:
        return []
    done: list[_Replacement] = []
    wrapped: dict[int, Builder] = {}
    for place in (_timm_places, _torchvision_places):
        for owner, name in place():
            original = owner[name] if isinstance(owner, dict) else getattr(owner, name)
            if id(original) not in wrapped:
                wrapped[id(original)] = patched_builder(original, settings)
            done.append(_Replacement(owner, name, original))
            if isinstance(owner, dict):
                owner[name] = wrapped[id(original)]
            else:
                setattr(owner, name, wrapped[id(original)])
    return done


def model_named_by(item: pytest.Item) -> str | None:
    """The model a collected test builds, from its ``model_name`` or ``model_fn`` parameter."""
    params = getattr(getattr(item, "callspec", None), "params", {})
    for key in MODEL_PARAMETERS:
        if key in params:
            value = params[key]
            return value if isinstance(value, str) else getattr(value, "__name__", None)
    return None


_SETTINGS_KEY = pytest.StashKey[PeerSettings]()
_UNDO_KEY = pytest.StashKey[list[_Replacement]]()


def pytest_configure(config: pytest.Config) -> None:
    # before collection: the suites import the builders at module level (from timm import create_model)
    settings = PeerSettings.from_environ(os.environ)
    config.stash[_SETTINGS_KEY] = settings
    config.stash[_UNDO_KEY] = install(settings)


def pytest_unconfigure(config: pytest.Config) -> None:
    for replacement in reversed(config.stash.get(_UNDO_KEY, [])):
        replacement.undo()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    models = config.stash[_SETTINGS_KEY].models
    if models is None:
        return
    kept, dropped = [], []
    for item in items:
        name = model_named_by(item)
        # timm's config tests list models with their pretrained tags (resnest14d.gluon_in1k)
        (kept if name is not None and name.split(".")[0] in models else dropped).append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = kept


def pytest_report_header(config: pytest.Config) -> str:
    settings = config.stash[_SETTINGS_KEY]
    if settings.recipe is None:
        return "attn-inject peers: plain models"
    return f"attn-inject peers: models patched with {settings.recipe} (init={settings.init or 'recipe'})"
