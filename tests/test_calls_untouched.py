"""The calls besides ``inject`` leave process-wide state as they found it: ``validate`` does
not reseed a CUDA generator it does not restore."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import attn_inject as ai

SIZE = (3, 64, 64)


@pytest.fixture
def pair(injected) -> tuple[nn.Module, nn.Module]:
    """timm's resnet18 and its cbam_after_every_stage injection, each test's own copies."""
    return injected("timm:resnet18", "cbam_after_every_stage", SIZE)


@pytest.mark.skipif(torch.cuda.is_initialized(), reason="a CUDA seed is queued only before CUDA starts")
def test_validate_keeps_the_cuda_seed_queued_by_the_caller(pair):
    model, patched = pair
    torch.manual_seed(123)  # CUDA not started: its seeding is queued, to run when it starts
    queued = torch.cuda._lazy_seed_tracker.get_calls()
    report = ai.validate(model, patched, device="cpu", batch=1, seeds=1, checks=["train", "gradients"])
    assert report.passed
    assert torch.cuda._lazy_seed_tracker.get_calls() == queued


def test_validate_compile_check_keeps_the_callers_compiled_code(pair, monkeypatch):
    """The compile check compiles the patched model apart from the caller's own compiled code:
    a model of the same class the caller compiled before runs on without compiling again
    (torch's cache of compiled code is one for the process; clearing it would make every
    compiled model of the caller's compile again, minutes on a large one)."""
    import torch._dynamo.testing

    from attn_inject.validation import runtimes

    monkeypatch.setattr(runtimes, "compile_backend", lambda device: ("eager", "eager in this test"))
    model, patched = pair
    counter = torch._dynamo.testing.CompileCounter()
    own = torch.compile(copy.deepcopy(model), backend=counter)  # the caller's compiled model
    x = torch.randn(2, *SIZE)
    with torch.no_grad():
        own(x)
    compiled_frames = counter.frame_count
    assert compiled_frames >= 1
    report = ai.validate(model, patched, device="cpu", batch=2, seeds=1, checks=["compile"])
    assert report.check("compile").status == "passed", report.check("compile").detail
    with torch.no_grad():
        own(x)
    assert counter.frame_count == compiled_frames


def test_compile_checks_of_one_class_never_meet_dynamos_recompile_limit(injected, monkeypatch):
    """Each compile check compiles from code of its own: ResNets of two depths, checked one
    after the other under a recompile limit of 1, are each really compiled (a check that met
    the limit would run eagerly and compare eager with eager)."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    from attn_inject.validation import runtimes

    monkeypatch.setattr(runtimes, "compile_backend", lambda device: ("eager", "eager in this test"))
    monkeypatch.setattr(torch._dynamo.config, "recompile_limit", 1)
    counters.clear()
    for name in ("timm:resnet10t", "timm:resnet14t"):
        model, patched = injected(name, "se_resnet", SIZE)
        report = ai.validate(model, patched, device="cpu", batch=2, seeds=1, checks=["compile"])
        assert report.check("compile").status == "passed", report.check("compile").detail
    assert counters["frames"]["ok"] == 2
