"""``ai.validate``: the checks pass on correct models (identity, paper, trained blends,
frozen parameters) and fail, naming the point, on broken rewrites; the models are left as
they were; the report serialises."""

from __future__ import annotations

import json
import types

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import attn_inject as ai
import attn_inject.validation.run as running
import attn_inject.validation.runtimes as runtimes

SMALL = (3, 32, 32)
FAST = ("reference", "identity", "parameters", "shapes", "finite")


def set_blends(patched: nn.Module, value: float) -> None:
    with torch.no_grad():
        for block in ai.inserted_blocks(patched).values():
            for name, p in block.named_parameters():
                if name.split(".")[-1] == "blend":
                    p.fill_(value)


def statuses(report: ai.ValidationReport) -> dict[str, str]:
    return {c.name: c.status for c in report.checks}


def run_instead(patched: nn.Module, host: str, forward) -> None:
    """Give the module that runs a block another forward (an instance attribute wins over its
    class's): ``forward(module, x)``, with ``module.forward_without_attention`` its own code."""
    module = patched.get_submodule(host)
    module.forward = types.MethodType(forward, module)


@pytest.fixture
def se_resnet18(injected) -> tuple[nn.Module, nn.Module]:
    """torchvision's resnet18 and its se_resnet injection at 32 px, each test's own copies."""
    return injected("tv:resnet18", "se_resnet", SMALL)


def test_identity_injection_passes_and_matches_the_plain_original_bit_for_bit(se_resnet18):
    model, patched = se_resnet18
    report = ai.validate(model, patched, device="cpu", checks=FAST)
    assert statuses(report) == dict.fromkeys(FAST, "passed")
    assert report.max_abs_diff == 0 and report.identity_expected and report.params_ok
    assert "bit for bit" in report.check("identity").detail
    assert report.check("reference").where.startswith("cpu float32 eval")


@pytest.mark.parametrize("recipe", ["cbam_resnet", "cbam_after_every_stage"])
def test_paper_init_is_checked_against_the_reference(build, recipe):
    model = build("tv:resnet18")  # timm zero-inits each block's last BatchNorm: a branch would be 0
    patched = ai.inject(model, recipe, init="paper", input_size=SMALL)
    report = ai.validate(model, patched, device="cpu", seeds=1, checks=FAST)
    assert report.passed and report.max_abs_diff > 0
    assert statuses(report)["reference"] == "passed" and statuses(report)["identity"] == "skipped"


def test_trained_blends_of_two_injections_are_checked_in_eval_and_train_mode(build):
    model = build("tv:resnet18")
    patched = ai.inject(ai.inject(model, "se_resnet", input_size=SMALL), "cbam_after_every_stage")
    set_blends(patched, 0.4)
    report = ai.validate(model, patched, device="cpu", seeds=2, checks=("reference", "train"))
    assert statuses(report) == {"reference": "passed", "train": "passed"}, report
    assert not report.unreachable


def test_a_negated_block_output_fails_naming_its_point(se_resnet18):
    model, patched = se_resnet18
    run_instead(patched, "layer2.0.bn2", lambda m, x: -m.se(m.forward_without_attention(x)))
    at_identity = ai.validate(model, patched, device="cpu", seeds=1, checks=("identity", "reference"))
    assert not at_identity.passed and not at_identity.identity_ok
    assert at_identity.check("identity").point == "layer2.0.bn2.se"
    set_blends(patched, 0.5)
    trained = ai.validate(model, patched, device="cpu", seeds=1, checks=("reference",))
    assert (
        trained.check("reference").status == "failed"
        and trained.check("reference").point == "layer2.0.bn2.se"
    )
    assert "layer2.0.bn2.se" in str(trained)


def test_a_consumer_wired_to_the_wrong_node_fails_naming_its_point(se_resnet18):
    model, patched = se_resnet18
    set_blends(patched, 0.5)

    def unused(m, x):  # the block runs, the residual add reads its input
        out = m.forward_without_attention(x)
        m.se(out)
        return out

    run_instead(patched, "layer3.1.bn2", unused)
    report = ai.validate(model, patched, device="cpu", seeds=1, checks=("reference",))
    assert (
        report.check("reference").status == "failed" and report.check("reference").point == "layer3.1.bn2.se"
    )


class DropoutBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.drop = nn.Dropout(0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.drop(self.bn(self.conv(x)))


class SmallNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.body = nn.Sequential(DropoutBlock(), DropoutBlock())
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.dropout(self.body(self.stem(x)), 0.2, self.training)
        return self.head(x.mean((2, 3)))


SMALL_RECIPE = {
    "name": "se_branch",
    "rules": [{"at": "residual_branch", "block": {"kind": "se", "ratio": 4}}],
}


def test_train_mode_catches_a_dropout_lost_in_the_rewrite():
    torch.manual_seed(0)
    model = SmallNet().eval()
    patched = ai.inject(model, SMALL_RECIPE, input_size=SMALL)
    set_blends(patched, 0.5)
    assert ai.validate(model, patched, device="cpu", seeds=1, checks=("reference", "train")).passed
    run_instead(patched, "body.0", lambda m, x: x + m.bn(m.conv(x)))  # what a trace in eval mode bakes in
    report = ai.validate(model, patched, device="cpu", seeds=1, checks=("reference", "train"))
    assert statuses(report) == {"reference": "passed", "train": "failed"}
    assert report.check("train").point == "body.0.bn.se"


def test_gradients_with_frozen_parameters_and_a_cut_gradient(se_resnet18):
    model, patched = se_resnet18
    frozen = [p for name, p in model.named_parameters() if name.startswith(("conv1", "bn1", "layer1"))]
    try:
        for p in frozen:
            p.requires_grad_(False)
        report = ai.validate(model, patched, device="cpu", seeds=1, checks=("gradients",))
        assert report.passed, report
        trainable = sum(p.requires_grad for p in model.parameters())
        assert f"{trainable} trainable parameters" in report.check("gradients").detail
    finally:
        for p in frozen:
            p.requires_grad_(True)
    run_instead(patched, "layer2.0.bn2", lambda m, x: m.se(m.forward_without_attention(x).detach()))
    cut_report = ai.validate(model, patched, device="cpu", seeds=1, checks=("gradients",))
    assert cut_report.check("gradients").status == "failed"
    assert "get no gradient" in cut_report.check("gradients").detail


def test_validate_leaves_both_models_as_they_were(build):
    model = build("timm:resnet18")
    patched = ai.inject(model, "cbam_after_every_stage", input_size=SMALL)
    set_blends(patched, 0.3)
    patched.train()
    patched.layer2.eval()
    before = {k: v.clone() for k, v in patched.state_dict().items()}
    modes = [m.training for m in patched.modules()]
    report = ai.validate(model, patched, device="cpu", seeds=1, checks=("train", "gradients", "reference"))
    assert report.passed, report
    assert [m.training for m in patched.modules()] == modes and not model.training
    assert all(torch.equal(before[k], v) for k, v in patched.state_dict().items())
    assert all(p.grad is None for p in patched.parameters())
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    patched.eval()


def test_points_no_hook_reaches_are_reported_not_guessed(build):
    model = build("tv:resnet18")  # torchvision calls one ReLU twice in a block
    patched = ai.inject(model, "se_post", input_size=SMALL)
    report = ai.validate(model, patched, device="cpu", seeds=1, checks=("reference", "identity"))
    assert report.passed and len(report.unreachable) == len(patched.attn_inject.plan) > 0
    assert all("called more than once" in why for _, why in report.unreachable)
    set_blends(patched, 0.5)
    report = ai.validate(model, patched, device="cpu", seeds=1, checks=("reference",))
    assert (
        report.check("reference").status == "skipped"
        and "no hook reaches" in report.check("reference").detail
    )


def test_export_and_compile_checks(monkeypatch):
    """On a small residual network with an SE block in each branch: what is compiled and
    exported does not depend on the network's size."""
    torch.manual_seed(0)
    model = SmallNet().eval()
    patched = ai.inject(model, SMALL_RECIPE, input_size=SMALL)
    monkeypatch.setattr(runtimes, "compile_backend", lambda device: ("eager", "no compiler in this test"))
    report = ai.validate(model, patched, device="cpu", seeds=1, checks=("compile", "export"))
    assert statuses(report) == {"compile": "passed", "export": "passed"}, report
    assert "backend='eager'" in report.check("compile").detail


@pytest.mark.slow
def test_the_compile_check_passes_with_inductor(build):
    """The real compiler once (minutes of C++ on a CPU; `make test-slow`); the default run uses
    the eager backend above."""
    backend, why_not = runtimes.compile_backend(torch.device("cpu"))
    if backend != "inductor":
        pytest.skip(why_not)  # no C++ compiler for inductor on this machine, and why
    model = build("tv:resnet18")
    patched = ai.inject(model, "se_resnet", input_size=SMALL)
    report = ai.validate(model, patched, device="cpu", seeds=1, input_size=SMALL, checks=("compile",))
    assert statuses(report) == {"compile": "passed"}, report
    assert report.check("compile").where.endswith("backend inductor")


class DataDependentHead(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.mean() > 100:  # a branch on a tensor's value: fx keeps it whole, torch.export refuses it
            x = x * 2
        return super().forward(x)


class DataDependentNet(SmallNet):
    def __init__(self) -> None:
        super().__init__()
        self.head = DataDependentHead(8, 4)


def test_export_is_skipped_when_the_original_does_not_export():
    torch.manual_seed(0)
    model = DataDependentNet().eval()
    patched = ai.inject(model, SMALL_RECIPE, input_size=SMALL)
    report = ai.validate(model, patched, device="cpu", seeds=1, checks=("export", "reference"))
    assert statuses(report) == {"reference": "passed", "export": "skipped"}, report
    assert "the original does not export" in report.check("export").detail


def test_report_serialises_to_json_with_every_check(build):
    model = build("tv:resnet18")
    report = ai.validate(
        model, ai.inject(model, "eca_resnet", input_size=SMALL), device="cpu", seeds=1, checks=FAST
    )
    data = json.loads(json.dumps(report.to_dict()))
    assert data["passed"] and data["identity_ok"] and data["params_ok"]
    assert [c["name"] for c in data["checks"]] == list(FAST)
    assert all({"status", "where", "detail", "point"} <= set(c) for c in data["checks"])


def test_unknown_checks_and_missing_cuda_are_refused(se_resnet18):
    model, patched = se_resnet18
    with pytest.raises(ValueError, match="unknown checks"):
        ai.validate(model, patched, device="cpu", checks=("speed",))
    if not torch.cuda.is_available():
        with pytest.raises(ai.ValidationError, match="CUDA is not available"):
            ai.validate(model, patched, device="cuda")


def test_running_out_of_memory_is_one_clear_error(se_resnet18, monkeypatch):
    model, patched = se_resnet18

    def out_of_memory(context):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(running, "measure", out_of_memory)
    with pytest.raises(
        ai.ValidationError, match=r"out of memory on cpu .* during the forward passes at batch 2"
    ):
        ai.validate(model, patched, device="cpu", seeds=1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_runs_autocast_in_bf16_and_fp16(build):
    model = build("tv:resnet18")
    patched = ai.inject(model, "cbam_resnet", input_size=SMALL)
    set_blends(patched, 0.5)
    report = ai.validate(model, patched, device="cuda", seeds=1, checks=("reference", "autocast"))
    assert report.passed, report
    assert {"autocast bfloat16", "autocast float16"} <= {c.name for c in report.checks}
    assert report.device.startswith("cuda") and next(model.parameters()).device.type == "cpu"


class _ChannelsLastResidual(nn.Module):
    """A residual unit on an NHWC map (as inside ConvNeXt, Swin, MambaOut blocks)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 32, 3, stride=4, padding=1)
        self.norm = nn.LayerNorm(32)
        self.fc = nn.Linear(32, 32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x).permute(0, 2, 3, 1)
        x = x + self.fc(self.norm(x))
        return x.permute(0, 3, 1, 2)


@pytest.mark.parametrize("init", ["paper", "identity"])
def test_channels_last_blocks_are_checked_in_their_own_layout(init):
    model = _ChannelsLastResidual().eval()
    patched = ai.inject(model, "se_resnet", init=init, input_size=SMALL)
    assert [p.layout for p in patched.attn_inject.plan] == ["NHWC"]
    set_blends(patched, 0.5)
    report = ai.validate(model, patched, input_size=SMALL, checks=FAST)
    assert report.passed, report


class _LoudHead(nn.Module):
    """A stage whose output the rest of the network scales up a lot (as a deep residual
    stream grows): a gradient step of size one on a blend there would overflow."""

    def __init__(self) -> None:
        super().__init__()
        self.stage = nn.Sequential(nn.Conv2d(3, 128, 3, stride=4, padding=1), nn.ReLU())
        self.head = nn.Linear(128, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.stage(x).mean((2, 3)) * 1e8) * 1e8


def test_every_inserted_weight_is_reached_after_a_small_step_even_where_gradients_are_huge():
    model = _LoudHead().eval()
    patched = ai.inject(model, "cbam_after_every_stage", input_size=SMALL)
    assert [p.key for p in patched.attn_inject.plan] == ["stage.1.cbam"]
    report = ai.validate(model, patched, input_size=SMALL, checks=("gradients",))
    assert report.passed, report


def test_cudnn_deterministic_is_restored():
    from attn_inject.validation import cudnn_settings

    before = torch.backends.cudnn.deterministic
    with cudnn_settings(deterministic=True):
        assert torch.backends.cudnn.deterministic
    assert torch.backends.cudnn.deterministic == before


def test_gradient_tolerance_grows_with_the_originals_own_spread_only():
    from attn_inject.validation import GRADIENT_TOLERANCE, gradient_tolerance

    grads = [torch.tensor([100.0, -50.0]), None, torch.tensor([1.0])]
    assert gradient_tolerance(grads, [g.clone() if g is not None else None for g in grads]) == (
        GRADIENT_TOLERANCE
    )
    noisy = [torch.tensor([100.0, -50.03]), None, torch.tensor([1.0])]  # 0.03 of a largest 100
    assert gradient_tolerance(grads, noisy) == pytest.approx(4 * 0.03 / 100, rel=1e-3)
    assert gradient_tolerance([None], [None]) == GRADIENT_TOLERANCE
