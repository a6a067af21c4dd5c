"""Public names: the renamed functions and arguments, and the old names kept one release
(each still works and warns with a DeprecationWarning naming the new one)."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import attn_inject as ai
from attn_inject import blocks, finetune
from attn_inject.surgery import derive

SIZE = (3, 32, 32)


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.body = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU())
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.body(self.conv(x))
        return self.fc(x.mean((2, 3)))


RECIPE = {"name": "names_test", "rules": [{"block": {"kind": "se", "ratio": 2}, "at": "conv_output"}]}


@pytest.fixture
def pair() -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    model = Net().eval()
    return model, ai.inject(model, RECIPE, input_size=SIZE)


def _new_name_in(caught: list[warnings.WarningMessage], new: str) -> bool:
    return any(issubclass(w.category, DeprecationWarning) and new in str(w.message) for w in caught)


def test_blends_are_the_blend_values_of_every_inserted_block(pair):
    _, patched = pair
    found = ai.inserted_blocks(patched)
    assert len(found) == 2  # after conv and after body.0
    # identity init: one blend per SE block, zero at insertion
    assert ai.blends(patched) == {f"{name}.blend": 0.0 for name in found}


@pytest.mark.parametrize(
    ("old", "new", "module"),
    [
        ("gates", "blends", ai),
        ("rewritten_forward", "has_rewritten_forward", ai),
        ("gates", "blends", finetune),
        ("rewritten_forward", "has_rewritten_forward", derive),
    ],
)
def test_an_old_function_name_warns_naming_the_new_one_and_returns_what_the_new_one_does(
    pair, old, new, module
):
    _, patched = pair
    with pytest.warns(DeprecationWarning, match=rf"use {new}\(\)") as caught:
        got = getattr(module, old)(patched)
    assert got == getattr(ai, new)(patched)
    assert _new_name_in(list(caught), new)
    assert old not in ai.__all__ and new in ai.__all__


def test_has_rewritten_forward_is_false_for_every_module_of_a_model_never_injected(pair):
    model, _ = pair
    assert not any(ai.has_rewritten_forward(m) for m in model.modules())


def test_make_block_is_the_old_name_of_block_for_point():
    torch.manual_seed(0)
    new = blocks.block_for_point("se", 16, {"ratio": 4}, "paper", {})
    torch.manual_seed(0)
    with pytest.warns(DeprecationWarning, match=r"use block_for_point\(\)"):
        old = blocks.make_block("se", 16, {"ratio": 4}, "paper", {})
    assert type(old) is type(new)
    assert all(
        torch.equal(a, b) for a, b in zip(old.state_dict().values(), new.state_dict().values(), strict=True)
    )
    assert "make_block" not in blocks.__all__


def test_validate_takes_the_base_model_as_model_and_original_is_its_old_keyword(pair):
    model, patched = pair
    report = ai.validate(model=model, patched=patched, checks=["reference"], seeds=1, device="cpu")
    with pytest.warns(DeprecationWarning, match=r"validate\(model=\.\.\.\)"):
        old = ai.validate(original=model, patched=patched, checks=["reference"], seeds=1, device="cpu")
    assert report.passed and old.passed
    assert report.max_abs_diff == old.max_abs_diff


@pytest.mark.parametrize("function", [ai.param_groups, ai.freeze_base])
def test_finetune_helpers_take_the_patched_model_as_patched_and_model_is_its_old_keyword(pair, function):
    _, patched = pair
    kwargs = {"lr": 0.1} if function is ai.param_groups else {}
    new = function(patched=patched, **kwargs)
    with pytest.warns(DeprecationWarning, match=rf"{function.__name__}\(patched=\.\.\.\)"):
        old = function(model=patched, **kwargs)
    if function is ai.freeze_base:
        blocks_at = tuple(f"{name}." for name in ai.inserted_blocks(patched))
        assert old == new == [n for n, _ in patched.named_parameters() if n.startswith(blocks_at)]
    else:
        assert [g["param_names"] for g in old] == [g["param_names"] for g in new]


def test_the_old_and_the_new_keyword_together_are_refused(pair):
    model, patched = pair
    with pytest.raises(TypeError, match="original= and model="):
        ai.validate(model, patched, original=model)
