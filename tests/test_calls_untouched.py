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
    counters.clear()
    with torch._dynamo.config.patch(recompile_limit=1):  # dynamo's own way to set and put back
        for name in ("timm:resnet10t", "timm:resnet14t"):
            model, patched = injected(name, "se_resnet", SIZE)
            report = ai.validate(model, patched, device="cpu", batch=2, seeds=1, checks=["compile"])
            assert report.check("compile").status == "passed", report.check("compile").detail
    assert counters["frames"]["ok"] == 2


@pytest.mark.parametrize("form", ["file", "training checkpoint"])
def test_load_on_a_given_model_leaves_that_model_as_it_was(build, tmp_path, form):
    """``load(path, model=base)`` builds on a copy of ``base``: the file's weights land in the
    returned model only, and ``base`` keeps its own (the patched model shares the untouched
    modules and parameters of the model it is made from)."""
    torch.manual_seed(1)
    saved = ai.inject(build("timm:resnet10t"), "se_resnet", input_size=SIZE)
    with torch.no_grad():
        for p in saved.parameters():
            p.add_(0.5)  # weights the base does not have
    ai.save(saved, tmp_path / "start.safetensors", model_name="")
    path, kwargs = tmp_path / "start.safetensors", {}
    if form == "training checkpoint":
        path, kwargs = tmp_path / "last.pth.tar", {"like": tmp_path / "start.safetensors"}
        torch.save({"state_dict": saved.state_dict(), "arch": "x"}, path)
    base = build("timm:resnet10t")
    before = {k: v.clone() for k, v in base.state_dict().items()}
    loaded = ai.load(path, model=base, **kwargs)
    assert all(torch.equal(v, before[k]) for k, v in base.state_dict().items())
    assert all(torch.equal(v, saved.state_dict()[k]) for k, v in loaded.state_dict().items())
    mine = {id(t) for t in [*base.parameters(), *base.buffers()]}
    assert not mine & {id(t) for t in [*loaded.parameters(), *loaded.buffers()]}


def test_load_on_a_model_that_cannot_be_copied_says_so_in_one_line(build, tmp_path):
    import threading

    from attn_inject.core.errors import InputError

    ai.save(ai.inject(build("timm:resnet10t"), "se_resnet", input_size=SIZE), tmp_path / "m.safetensors")
    base = build("timm:resnet10t")
    base.lock = threading.Lock()  # copy.deepcopy cannot copy a lock
    with pytest.raises(InputError, match=r"builds on a copy of the model.*cannot be copied") as error:
        ai.load(tmp_path / "m.safetensors", model=base)
    assert "\n" not in str(error.value)
