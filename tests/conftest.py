"""Shared fixtures: small inputs, random-init models built once per session and handed to each
test as its own copy (a test that changes its model changes no other test's).

torch, timm and the package are imported where a test process needs them, not at this file's
import: pytest-xdist's controller, which only hands files to its workers, then starts in a
fraction of a second instead of importing torch first."""

from __future__ import annotations

import copy
import functools
import gc
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    import torch

SIZE = (3, 64, 64)

# The files of more than about 5 s in a full run, longest first (each file's time in a full
# run). They are handed out first, so that the two test processes of `make test` end together
# on the short files instead of one waiting for the other's last long file; `make test` passes
# pytest-xdist's --no-loadscope-reorder, which otherwise hands out the files with the most tests
# first, whatever their time.
LONG_FILES = (
    # all or most of their time in make test-processes
    "test_search_workers.py",
    "test_search_terminal.py",
    "test_wheel.py",
    # in make test (and, for their multi-process tests, in make test-processes)
    "test_finetune_run.py",
    "test_search.py",
    "test_export.py",
    "test_keeps_what_it_was.py",
    "test_tokens.py",
    "test_convert.py",
    "test_inject.py",
    "test_search_hostile.py",
    "test_ecosystem_ultralytics.py",
    "test_ecosystem_hf.py",
    "test_local_surgery.py",
    "test_coverage.py",
    "test_untrusted_files.py",
    "test_plan.py",
    "test_timm_bridge.py",
    "test_round_trip.py",
    "test_recipes.py",
    "test_unit_shape_rules.py",
    "test_search_outputs.py",
    "test_search_hostile_db.py",
    "test_timm_checks.py",
    "test_docs.py",
    "test_error_contract.py",
    "test_timm_coverage.py",
    "test_finetune_epoch_writer.py",
    "test_bridges_hostile.py",
    "test_finetune_inputs.py",
    "test_benchmarks.py",
    "test_timm_changes.py",
    "test_validate.py",
    "test_any_attention.py",
    "test_peer_causes.py",
    "test_identity_proof.py",
    "test_macs.py",
)


def _runs_tests(config: pytest.Config) -> bool:
    """False in pytest-xdist's controller, which hands the tests to its workers and runs none."""
    return hasattr(config, "workerinput") or not getattr(config.option, "numprocesses", None)


# A full collection in a test process walks every object the process holds (the imports of
# torch, timm and the other libraries alone make half a million): it runs after 100 collections
# of the middle generation instead of Python's 10. The young generations are collected as often
# as by default.
GC_THRESHOLDS = (700, 10, 100)


def pytest_configure(config: pytest.Config) -> None:
    if _runs_tests(config):
        _forget_replaced_ops()
        gc.set_threshold(*GC_THRESHOLDS)


def pytest_collection_finish(session: pytest.Session) -> None:
    """The tests are collected: the modules imported and the items made stay to the end of the
    process, so they move to the permanent generation, which no collection walks (a library's
    own ``gc.collect()`` included)."""
    if _runs_tests(session.config):
        gc.collect()
        gc.freeze()


def pytest_unconfigure(config: pytest.Config) -> None:
    """A test process ends: every object it holds moves to the permanent generation, so that
    the interpreter's last collections on the way out do not walk the millions the tests
    left (about a second per half a million objects on 2 cores; the controller waits for it)."""
    if _runs_tests(config):
        gc.freeze()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The long files first, in the order of ``LONG_FILES``; the rest as collected."""
    rank = {name: i for i, name in enumerate(LONG_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


def _forget_replaced_ops() -> None:
    """Install :func:`_refresh_forgetting_the_replaced_op` (a torch without ``_refresh_packet``
    refreshes no packet)."""
    import torch._ops

    refresh = getattr(torch._ops, "_refresh_packet", None)
    if refresh is not None and not getattr(refresh, "forgets_replaced_ops", False):
        torch._ops._refresh_packet = functools.partial(_refresh_forgetting_the_replaced_op, refresh=refresh)
        torch._ops._refresh_packet.forgets_replaced_ops = True  # type: ignore[attr-defined]


def _refresh_forgetting_the_replaced_op(packet, refresh) -> None:
    """torch's ``_refresh_packet`` with the replaced op's id taken out of TorchScript's builtin table.

    When a library adds an overload to an op that has a packet already (torch.ao's
    ``quantized_decomposed`` ops do, on importing ``quantize_fx``), torch swaps the packet's op
    and registers the new one by ``id``, but leaves the old op's ``id`` in the table. Once the old
    op is freed, a list that CPython puts at its address (a conv's
    ``_reversed_padding_repeated_twice``) is taken for that builtin, and ``torch.jit.script``
    fails on it now and then with "builtin cannot be used as a value". The test processes import
    ``quantize_fx``, so they forget the replaced op as it is replaced.
    """
    import torch.jit._builtins

    replaced = packet._op
    refresh(packet)
    table = torch.jit._builtins._builtin_table
    if table is not None and packet._op is not replaced:
        table.pop(id(replaced), None)


def _seeded_build(name: str) -> torch.nn.Module:
    """``tv:NAME`` or ``timm:NAME``, random init from seed 0, in eval mode."""
    import timm
    import torch
    import torchvision

    torch.manual_seed(0)
    source, _, bare = name.partition(":")
    if source == "tv":
        model = torchvision.models.get_model(bare, weights=None)
    else:
        model = timm.create_model(bare, pretrained=False)
    return model.eval()


_built_once = functools.cache(_seeded_build)


@functools.cache
def _injected_once(name: str, recipe: str, size: tuple[int, ...]) -> tuple[torch.nn.Module, torch.nn.Module]:
    import attn_inject as ai

    model = _seeded_build(name)
    return model, ai.inject(model, recipe, input_size=size)


@pytest.fixture
def injected():
    """``injected("tv:resnet18", "se_resnet", (3, 32, 32))``: the model and its injection,
    made once per session; each call gets its own copy of the two, copied together so that
    the modules the patched model shares with the model stay shared."""
    return lambda name, recipe, input_size: copy.deepcopy(_injected_once(name, recipe, input_size))


def _build(name: str) -> torch.nn.Module:
    """A copy of the model built once for ``name``: its own parameters, buffers and modes."""
    return copy.deepcopy(_built_once(name))


@pytest.fixture
def build():
    """``build("tv:resnet18")`` / ``build("timm:resnet50")``: a random-init model in eval mode,
    the same weights every call (built once, deep-copied), never shared with another test."""
    return _build


def meta_model(name: str, **kwargs) -> torch.nn.Module:
    import timm
    import torch
    import torchvision

    source, _, bare = name.partition(":")
    with torch.device("meta"):
        if source == "tv":
            return torchvision.models.get_model(bare, weights=None, **kwargs)
        return timm.create_model(bare, pretrained=False, **kwargs)


def blocks_of(patched: torch.nn.Module) -> torch.nn.ModuleDict:
    """The inserted blocks of a patched model as one ModuleDict (dots in names become '/')."""
    import torch

    import attn_inject as ai

    return torch.nn.ModuleDict({k.replace(".", "/"): v for k, v in ai.inserted_blocks(patched).items()})
