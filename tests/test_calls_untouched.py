"""The calls besides ``inject`` leave process-wide state as they found it: ``validate`` does
not reseed a CUDA generator it does not restore."""

from __future__ import annotations

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
