"""The fine-tuning flags act: clipping bounds the norm the optimizer steps with,
channels-last reaches the model, autocast changes the dtype the layers compute in. Each
test also runs without its flag, so a flag that were ignored would fail it."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import attn_inject.finetune.run as run_module
from attn_inject.cli.main import main
from attn_inject.finetune.distributed import Context
from attn_inject.finetune.loop import Precision, train_one_epoch

from .test_finetune_run import finetune_args, save_patched, write_folder

CPU = Context(0, 1, 0, torch.device("cpu"))


class Probe(nn.Module):
    """A small classifier that records, at each call, its input's memory format and the
    dtype its convolution computes in."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.head = nn.Linear(8, 4)
        self.seen: list[tuple[bool, torch.dtype]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        self.seen.append((x.is_contiguous(memory_format=torch.channels_last), y.dtype))
        return self.head(y.mean((2, 3)))


class NormRecordingSGD(torch.optim.SGD):
    """SGD that records the total gradient norm of each step it takes."""

    def __init__(self, params, lr: float) -> None:
        super().__init__(params, lr=lr)
        self.norms: list[float] = []

    def step(self, closure=None):  # type: ignore[override]
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        self.norms.append(float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))))
        return super().step(closure)


def _loader() -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    return [
        (100 * torch.randn(4, 3, 8, 8, generator=generator), torch.tensor([0, 1, 2, 3])) for _ in range(3)
    ]


def _epoch(**flags) -> tuple[Probe, NormRecordingSGD]:
    torch.manual_seed(0)
    model = Probe()
    optimizer = NormRecordingSGD(model.parameters(), lr=1e-3)
    train_one_epoch(model, _loader(), optimizer, CPU, **flags)
    return model, optimizer


def test_clipping_bounds_the_norm_the_optimizer_steps_with():
    _, unclipped = _epoch()
    assert min(unclipped.norms) > 1.0  # inputs scaled by 100: large gradients
    _, clipped = _epoch(clip_grad=0.5)
    assert max(clipped.norms) <= 0.5 * (1 + 1e-5)


def test_channels_last_reaches_the_model_and_autocast_changes_the_dtype():
    plain, _ = _epoch()
    assert {seen for seen in plain.seen} == {(False, torch.float32)}
    fast, _ = _epoch(channels_last=True, precision=Precision(True, torch.bfloat16))
    assert {seen for seen in fast.seen} == {(True, torch.bfloat16)}


def test_the_command_hands_each_flag_to_the_training_step(monkeypatch, tmp_path):
    """``attn-inject finetune --clip-grad --channels-last --amp`` on a real run: the training
    step is given the clip value, channels-last images and bf16 autocast, and the model's
    weights are channels-last."""
    seen: dict[str, object] = {}
    real = run_module.train_one_epoch

    def spy(model, loader, optimizer, context, **kwargs):
        conv = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
        seen.update(
            kwargs, weights_channels_last=conv.weight.is_contiguous(memory_format=torch.channels_last)
        )
        return real(model, loader, optimizer, context, **kwargs)

    monkeypatch.setattr(run_module, "train_one_epoch", spy)
    data = write_folder(tmp_path / "data", {"train": 4, "val": 3})
    checkpoint = save_patched(tmp_path / "cbam.safetensors")
    args = finetune_args(checkpoint, data, tmp_path / "run", "--amp", "--channels-last", "--clip-grad", "0.5")
    assert main(args) == 0
    assert seen["clip_grad"] == 0.5 and seen["channels_last"] is True
    assert seen["precision"] == Precision(True, torch.bfloat16) and seen["weights_channels_last"] is True


@pytest.mark.parametrize("flag", ["--amp", "--channels-last"])
def test_without_the_flag_the_training_step_gets_none_of_it(monkeypatch, tmp_path, flag):
    """The run is stopped (as by Ctrl-C) once its first training step has been called: what
    the step was handed is all this test reads."""
    seen: dict[str, object] = {}

    def spy(model, loader, optimizer, context, **kwargs):
        seen.update(kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(run_module, "train_one_epoch", spy)
    data = write_folder(tmp_path / "data", {"train": 4, "val": 3})
    checkpoint = save_patched(tmp_path / "cbam.safetensors")
    assert main(finetune_args(checkpoint, data, tmp_path / "run", flag)) == 130
    assert seen["clip_grad"] is None
    assert seen["channels_last"] is (flag == "--channels-last")
    assert seen["precision"].enabled is (flag == "--amp")
