"""Quantizing a patched model: FX graph mode keeps the blocks; eager mode is named as what cannot."""

import warnings

import pytest
import torch
import torchvision
from torch.ao.quantization import get_default_qconfig_mapping
from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

import attn_inject as ai


def quantizable_resnet18() -> torch.nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao's deprecation notes
        return torchvision.models.quantization.resnet18(num_classes=10, quantize=False).eval()


def test_a_model_built_for_eager_mode_quantization_warns_once_naming_fx_graph_mode():
    with pytest.warns(UserWarning, match=r"fuse_model\(\).*exact type.*prepare_fx") as warned:
        ai.inject(quantizable_resnet18(), "se_resnet")
    notes = [w for w in warned if "fuse_model" in str(w.message)]
    assert len(notes) == 1 and "\n" not in str(notes[0].message)
    assert str(notes[0].message).startswith("QuantizableResNet: ")


def test_a_float_model_without_quant_stubs_does_not_warn():
    model = torchvision.models.resnet18(num_classes=10).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ai.inject(model, "se_resnet")


def test_fx_graph_mode_quantizes_a_patched_model_around_its_blocks():
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        patched = ai.inject(quantizable_resnet18(), "se_resnet", init="paper").eval()
        blocks = dict(ai.inserted_blocks(patched))
        x = torch.randn(4, 3, 64, 64)
        with torch.no_grad():
            reference = patched(x)
        prepared = prepare_fx(patched, get_default_qconfig_mapping("x86"), (x,))
        with torch.no_grad():
            for _ in range(3):
                prepared(torch.randn(4, 3, 64, 64))
        quantized = convert_fx(prepared)
    kinds = {type(m).__module__ for m in quantized.modules()}
    assert any(k.startswith("torch.ao.nn.quantized") for k in kinds), "nothing was quantized"
    kept = dict(quantized.named_modules())
    assert blocks and all(name in kept for name in blocks), "a block was dropped"
    # Each block's weights are the patched model's (the block runs in float).
    name = next(iter(blocks))
    for key, value in blocks[name].state_dict().items():
        torch.testing.assert_close(kept[name].state_dict()[key], value, rtol=0, atol=0)
    with torch.no_grad():
        out = quantized(x)
    # 8-bit activations: close to the float model, not equal to it.
    assert torch.nn.functional.cosine_similarity(out.flatten(), reference.flatten(), dim=0) > 0.99
    # The blocks still act: zeroing one block's excitation changes the quantized output.
    with torch.no_grad():
        for parameter in kept[name].parameters():
            parameter.zero_()
        assert not torch.equal(quantized(x), out)
