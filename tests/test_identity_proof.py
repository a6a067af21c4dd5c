"""Identity is proved at insertion: at ``init="identity"`` every block, built-in, timm's or
registered, leaves the patched model computing exactly the original, or ``inject`` refuses
it naming the block; ``validate`` checks identity whenever the blocks are those proved, and
fails a block that draws random numbers in eval mode."""

from __future__ import annotations

import copy

import pytest
import torch
import torchvision
from torch import nn

import attn_inject as ai
from attn_inject.blocks import Blended

SIZE = (3, 64, 64)
X = torch.randn(2, *SIZE, generator=torch.Generator().manual_seed(1))


def recipe(kind: str) -> dict:
    return {"rules": [{"block": kind, "at": "stage_output", "stages": [0]}]}


@pytest.fixture(scope="module")
def resnet() -> nn.Module:
    torch.manual_seed(0)
    return torchvision.models.resnet18().eval()


@pytest.fixture
def registry():
    """Blocks registered in a test are unregistered after it."""
    before = set(ai.list_blocks())
    yield
    for name in set(ai.list_blocks()) - before:
        ai.unregister_block(name)


class ScaleKwargs(nn.Module):
    """Takes ``**kwargs``: that declares nothing, so it must be blended at identity."""

    def __init__(self, channels: int, **kwargs) -> None:
        super().__init__()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 2


class ClaimsInit(nn.Module):
    """Declares ``init`` and ignores it."""

    def __init__(self, channels: int, init: str = "paper") -> None:
        super().__init__()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 2


class ZeroResidual(nn.Module):
    """Declares ``init`` and honours it without a blend: ``x + conv(x)``, the conv zero."""

    def __init__(self, channels: int, init: str = "paper") -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 1)
        if init == "identity":
            nn.init.zeros_(self.conv.weight)
            nn.init.zeros_(self.conv.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x)


class Raises(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("broken on purpose")


class ReturnsTuple(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor]:
        return (x,)


class Pools(nn.Module):
    """Returns (B, C, 1, 1): the blend would broadcast it back to the map's shape."""

    def __init__(self, channels: int) -> None:
        super().__init__()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean((2, 3), keepdim=True)


class Doubles(nn.Module):
    """Declares ``init`` and returns float64: the dtype changes."""

    def __init__(self, channels: int, init: str = "paper") -> None:
        super().__init__()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.double()


class Noisy(nn.Module):
    """Adds a little noise in eval mode too."""

    def __init__(self, channels: int) -> None:
        super().__init__()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + 1e-6 * torch.randn_like(x)


def same_output(patched: nn.Module, model: nn.Module) -> bool:
    with torch.no_grad():
        return torch.equal(patched.eval()(X), model(X))


def test_a_factory_taking_kwargs_is_blended_and_the_patched_model_computes_the_original(registry, resnet):
    ai.register_block("scale", ScaleKwargs)
    patched = ai.inject(resnet, recipe("scale"), init="identity", input_size=SIZE)
    (block,) = ai.inserted_blocks(patched).values()
    assert isinstance(block, Blended) and isinstance(block.block, ScaleKwargs)
    assert same_output(patched, resnet)
    assert not ai.blocks.accepts_init("scale")


@pytest.mark.parametrize("kind", ["se", "eca", "cbam", "simam", "timm:gc", "timm:eca", "timm:cbam"])
def test_every_shipped_and_timm_block_computes_the_original_at_identity(resnet, kind):
    patched = ai.inject(resnet, recipe(kind), init="identity", input_size=SIZE)
    assert same_output(patched, resnet)


def test_builtin_blocks_keep_their_state_dict_keys(resnet):
    patched = ai.inject(resnet, recipe("se"), init="identity", input_size=SIZE)
    (_, block), *_ = ai.inserted_blocks(patched).items()
    assert sorted(block.state_dict()) == ["blend", "fc1.bias", "fc1.weight", "fc2.bias", "fc2.weight"]


@pytest.mark.parametrize(
    ("factory", "says"),
    [
        (ClaimsInit, "does not compute its input at init='identity'"),
        (Raises, "fails on a (1, 64, 16, 16) float32 input: RuntimeError: broken on purpose"),
        (ReturnsTuple, "returns tuple for a (1, 64, 16, 16) float32 input"),
        (Pools, "returns (1, 64, 1, 1) float32 for a (1, 64, 16, 16) float32 input"),
        (Doubles, "returns (1, 64, 16, 16) float64 for a (1, 64, 16, 16) float32 input"),
        (Noisy, "is not deterministic in eval mode"),
    ],
)
def test_a_block_that_fails_its_proof_is_refused_in_one_line_naming_it(registry, resnet, factory, says):
    ai.register_block("suspect", factory)
    before = copy.deepcopy(resnet.state_dict())
    with pytest.raises(ai.InjectError) as refused:
        ai.inject(resnet, recipe("suspect"), init="identity", input_size=SIZE)
    message = str(refused.value)
    assert "\n" not in message
    assert "block 'layer1." in message and "(kind 'suspect')" in message
    assert says in message
    assert all(torch.equal(v, resnet.state_dict()[k]) for k, v in before.items())


@pytest.mark.parametrize("factory", [Raises, ReturnsTuple, Noisy])
def test_a_broken_block_is_refused_at_init_paper_too(registry, resnet, factory):
    ai.register_block("suspect", factory)
    with pytest.raises(ai.InjectError, match=r"\(kind 'suspect'\)"):
        ai.inject(resnet, recipe("suspect"), init="paper", input_size=SIZE)


def test_validate_checks_identity_of_blocks_without_a_blend_while_they_are_as_inserted(registry, resnet):
    ai.register_block("zero_residual", ZeroResidual)
    patched = ai.inject(resnet, recipe("zero_residual"), init="identity", input_size=SIZE)
    (block,) = ai.inserted_blocks(patched).values()
    assert not [n for n, _ in block.named_parameters() if n.endswith("blend")]
    assert patched.attn_inject.computes_original and patched.attn_inject.block_digest
    report = ai.validate(resnet, patched, checks=["identity"], seeds=1)
    (identity,) = report.checks
    assert identity.status == "passed" and "as inserted at init='identity'" in identity.detail

    with torch.no_grad():
        block.conv.bias.add_(0.5)  # trained: the blocks changed since insertion
    (changed,) = ai.validate(resnet, patched, checks=["identity"], seeds=1).checks
    assert changed.status == "skipped" and "changed since insertion" in changed.detail


def test_validate_fails_identity_when_a_block_proved_at_insertion_no_longer_computes_its_input(resnet):
    patched = ai.inject(resnet, recipe("se"), init="identity", input_size=SIZE)
    (block,) = ai.inserted_blocks(patched).values()
    block.forward = lambda x: x * 2  # the weights (and their digest) unchanged, the result not
    (identity,) = ai.validate(resnet, patched, checks=["identity"], seeds=1).checks
    assert identity.status == "failed"


def test_validate_says_identity_is_skipped_because_of_init_paper(resnet):
    patched = ai.inject(resnet, recipe("se"), init="paper", input_size=SIZE)
    assert not patched.attn_inject.computes_original
    (identity,) = ai.validate(resnet, patched, checks=["identity"], seeds=1).checks
    assert identity.status == "skipped" and "init='paper'" in identity.detail


def test_a_second_injection_computes_the_original_only_while_the_first_blocks_are_untouched(resnet):
    later = {"rules": [{"block": "eca", "at": "stage_output", "stages": [1]}]}
    first = ai.inject(resnet, recipe("se"), init="identity", input_size=SIZE)
    second = ai.inject(first, later, init="identity", input_size=SIZE)
    assert second.attn_inject.computes_original
    with torch.no_grad():
        next(iter(ai.inserted_blocks(first).values())).fc1.bias.add_(1.0)
    third = ai.inject(first, later, init="identity", input_size=SIZE)
    assert not third.attn_inject.computes_original


def test_validate_fails_a_block_that_draws_random_numbers_in_eval_mode(resnet):
    patched = ai.inject(resnet, recipe("se"), init="identity", input_size=SIZE)
    (block,) = ai.inserted_blocks(patched).values()
    block.attend = lambda x: x + 1e-7 * torch.randn_like(x)  # noise after the proof
    (deterministic,) = ai.validate(resnet, patched, checks=["deterministic"], seeds=1).checks
    assert deterministic.status == "failed" and "differ" in deterministic.detail
    assert float(block.blend) == 0.0  # set to 1 for the check only


def test_validate_passes_the_determinism_of_a_correct_model(resnet):
    patched = ai.inject(resnet, recipe("cbam"), init="identity", input_size=SIZE)
    state = torch.random.get_rng_state()
    (deterministic,) = ai.validate(resnet, patched, checks=["deterministic"], seeds=1).checks
    assert deterministic.status == "passed"
    assert torch.equal(torch.random.get_rng_state(), state)  # its two seeds were its own


def residual_recipe(kind: str) -> dict:
    """A block on the residual branch of each of layer1's two BasicBlocks: two points of one
    shape, (64, 16, 16) at 64 px."""
    return {"rules": [{"block": kind, "at": "residual_branch", "stages": [0]}]}


def built_for_the_model() -> bool:
    """Whether a factory is called to build a block for the model (planning builds blocks
    on the meta device too, to count their parameters and multiply-adds)."""
    return not torch.empty(0).is_meta


class SecondDoubles(nn.Module):
    """Declares ``init``; the first instance it builds for the model computes its input at
    identity, every later one doubles it."""

    built = 0

    def __init__(self, channels: int, init: str = "paper") -> None:
        super().__init__()
        type(self).built += built_for_the_model()
        self.factor = 1.0 if type(self).built <= 1 else 2.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.factor


def test_a_factory_computing_its_input_for_its_first_instance_only_is_refused_at_the_second(registry, resnet):
    SecondDoubles.built = 0
    ai.register_block("first_only", SecondDoubles)
    second = r"block 'layer1\.1\.[\w.]+' \(kind 'first_only'\) does not compute"
    with pytest.raises(ai.InjectError, match=second):
        ai.inject(resnet, residual_recipe("first_only"), init="identity", input_size=SIZE)
    assert SecondDoubles.built == 2


def _moved_blend(block: ai.blocks.SqueezeExcite) -> None:
    with torch.no_grad():
        block.blend.fill_(0.5)


def _not_a_number(block: ai.blocks.SqueezeExcite) -> None:
    with torch.no_grad():
        block.fc2.bias.fill_(float("nan"))


def _doubling_hook(block: ai.blocks.SqueezeExcite) -> None:
    block.register_forward_hook(lambda module, args, out: out * 2)


def _method_on_the_instance(block: ai.blocks.SqueezeExcite) -> None:
    block.attend = lambda x: x * 2


def _another_part(block: ai.blocks.SqueezeExcite) -> None:
    class Doubling(nn.ReLU):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * 2

    block.pool = "avg"
    block.blend = None  # the design's blend gone: the map is not blended towards one
    block.act = Doubling()


@pytest.mark.parametrize(
    "change", [_moved_blend, _not_a_number, _doubling_hook, _method_on_the_instance, _another_part]
)
def test_a_built_in_block_changed_after_the_first_of_its_design_is_proved_alone(registry, resnet, change):
    """A user's factory returning the built-in SE block, the second instance changed: it does
    not share the first one's proof, and is refused."""
    built = []

    def factory(channels: int, init: str = "paper") -> nn.Module:
        block = ai.blocks.SqueezeExcite(channels, init=init)
        if built_for_the_model():
            built.append(block)
            if len(built) == 2:
                change(block)
        return block

    ai.register_block("changed_se", factory)
    with pytest.raises(ai.InjectError, match=r"block 'layer1\.1\.[\w.]+' \(kind 'changed_se'\)"):
        ai.inject(resnet, residual_recipe("changed_se"), init="identity", input_size=SIZE)
    assert len(built) == 2


def test_built_in_blocks_of_one_design_share_one_proof_and_still_compute_the_original(resnet, monkeypatch):
    runs = _counting_attend(monkeypatch)
    patched = ai.inject(resnet, residual_recipe("se"), init="identity", input_size=SIZE)
    assert len(ai.inserted_blocks(patched)) == 2
    # one proof: the identity run, then two at full strength; none for the second block
    assert runs == [(1, 64, 16, 16)] * 3
    runs.clear()
    assert same_output(patched, resnet)


class WritesItsInput(nn.Module):
    """Scales its input in place and returns it: blended at identity, the blend then reads the
    input already changed."""

    def __init__(self, channels: int) -> None:
        super().__init__()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mul_(2)


def test_a_block_writing_into_its_input_is_refused_at_identity(registry, resnet):
    ai.register_block("writes_input", WritesItsInput)
    with pytest.raises(ai.InjectError, match=r"\(kind 'writes_input'\) does not compute its input"):
        ai.inject(resnet, recipe("writes_input"), init="identity", input_size=SIZE)


def test_a_global_hook_changing_later_blocks_gets_each_block_proved(resnet):
    """A global forward hook runs around every block: one that leaves the first SE block as
    it is and doubles every other one must see the second proved, and refused."""
    seen: list[int] = []

    def doubles_later_blocks(module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor | None:
        if not isinstance(module, ai.blocks.SqueezeExcite) or out.is_meta:
            return None
        if not seen:
            seen.append(id(module))
        return out if id(module) == seen[0] else out * 2

    handle = torch.nn.modules.module.register_module_forward_hook(doubles_later_blocks)
    try:
        with pytest.raises(ai.InjectError, match=r"block 'layer1\.1\.[\w.]+' \(kind 'se'\) does not compute"):
            ai.inject(resnet, residual_recipe("se"), init="identity", input_size=SIZE)
    finally:
        handle.remove()


def _counting_attend(monkeypatch) -> list[tuple[int, ...]]:
    """Each real (not meta) run of ``SqueezeExcite.attend``, by input shape; the method
    replaced on the class, which makes it a design of its own."""
    runs: list[tuple[int, ...]] = []
    attend = ai.blocks.SqueezeExcite.attend

    def counted(self, x: torch.Tensor) -> torch.Tensor:
        if not x.is_meta:
            runs.append(tuple(x.shape))
        return attend(self, x)

    monkeypatch.setattr(ai.blocks.SqueezeExcite, "attend", counted)
    return runs


def test_a_design_proved_in_one_call_is_not_proved_again_in_the_next_until_forgotten(resnet, monkeypatch):
    from attn_inject.core.kept import forget_kept_results

    runs = _counting_attend(monkeypatch)
    first = ai.inject(resnet, residual_recipe("se"), init="identity", input_size=SIZE)
    assert runs == [(1, 64, 16, 16)] * 3  # proved: the identity run, then two at full strength
    runs.clear()
    second = ai.inject(resnet, residual_recipe("se"), init="identity", input_size=SIZE)
    assert runs == []  # the design's proof kept from the call before
    assert same_output(second, resnet) and same_output(first, resnet)
    runs.clear()
    forget_kept_results()
    ai.inject(resnet, residual_recipe("se"), init="identity", input_size=SIZE)
    assert runs == [(1, 64, 16, 16)] * 3


def test_a_method_replaced_on_the_class_between_calls_gets_the_blocks_proved_again(resnet, monkeypatch):
    ai.inject(resnet, residual_recipe("se"), init="identity", input_size=SIZE)  # the design kept

    def doubling(self, x: torch.Tensor) -> torch.Tensor:
        return x * 2

    monkeypatch.setattr(ai.blocks.SqueezeExcite, "attend", doubling)
    with pytest.raises(ai.InjectError, match=r"\(kind 'se'\) does not compute its input"):
        ai.inject(resnet, residual_recipe("se"), init="identity", input_size=SIZE)


def test_a_registered_factory_returning_a_built_in_class_never_shares_the_built_in_proof(registry, resnet):
    """A user's factory may build SqueezeExcite and then set weights that make its map NaN;
    a proof kept for the built-in design must not stand for it."""

    def overflowing_se(
        channels: int, init: str = "paper", layout: str = "NCHW", prefix: int = 0
    ) -> nn.Module:
        block = ai.blocks.SqueezeExcite(channels, init=init, layout=layout, prefix=prefix)
        with torch.no_grad():  # hidden units near 1e30, then +-1e30 weights: inf - inf in every logit
            block.fc1.weight.fill_(1e30)
            block.fc1.bias.fill_(1e30)
            block.fc2.weight[:, 0::2].fill_(1e30)
            block.fc2.weight[:, 1::2].fill_(-1e30)
        return block

    ai.register_block("overflowing_se", overflowing_se)
    ai.inject(resnet, residual_recipe("se"), init="identity", input_size=SIZE)  # the built-in design kept
    with pytest.raises(ai.InjectError, match=r"\(kind 'overflowing_se'\) does not compute its input"):
        ai.inject(resnet, residual_recipe("overflowing_se"), init="identity", input_size=SIZE)


def test_a_built_in_class_whose_method_writes_into_its_input_is_refused_at_identity(resnet, monkeypatch):
    """A method replaced on a built-in class runs in a block of that class: it is given a copy
    of the probe too, so halving its input in place is not taken for the input itself."""

    def halving_in_place(self, x: torch.Tensor) -> torch.Tensor:
        return x.mul_(0.5)

    monkeypatch.setattr(ai.blocks.SqueezeExcite, "attend", halving_in_place)
    with pytest.raises(ai.InjectError, match=r"\(kind 'se'\) does not compute its input"):
        ai.inject(resnet, residual_recipe("se"), init="identity", input_size=SIZE)


def test_a_function_the_blocks_call_replaced_between_calls_gets_the_blocks_proved_again(resnet, monkeypatch):
    """The design is the code a block runs, the package's functions its methods call among it:
    ``squeeze_excite.gate`` replaced after a proof was kept gets the next blocks proved."""
    import attn_inject.blocks.squeeze_excite as squeeze_excite

    ai.inject(resnet, residual_recipe("se"), init="identity", input_size=SIZE)  # the design kept
    gate = squeeze_excite.gate
    monkeypatch.setattr(squeeze_excite, "gate", lambda x, logits, blend: gate(x, logits, blend) * 0.5)
    with pytest.raises(ai.InjectError, match=r"\(kind 'se'\) does not compute its input"):
        ai.inject(resnet, residual_recipe("se"), init="identity", input_size=SIZE)


def test_a_kept_design_still_refuses_a_later_block_whose_blend_moved(registry, resnet):
    """The design kept from an earlier call stands only for blocks at blend 0 with finite
    weights: one built with its blend moved is proved in full, and refused."""
    ai.inject(resnet, residual_recipe("se"), init="identity", input_size=SIZE)

    def moved(channels: int, init: str = "paper") -> nn.Module:
        block = ai.blocks.SqueezeExcite(channels, init=init)
        if block.blend is not None:
            with torch.no_grad():
                block.blend.fill_(0.5)
        return block

    ai.register_block("moved_se", moved)
    with pytest.raises(ai.InjectError, match=r"\(kind 'moved_se'\) does not compute its input"):
        ai.inject(resnet, residual_recipe("moved_se"), init="identity", input_size=SIZE)


def test_a_model_built_with_its_tensors_moved_to_meta_leaves_no_global_hook_and_proofs_stay_shared(
    resnet, monkeypatch
):
    """torchvision's RegNet computes its widths from tensor values, so its shapes are built on
    the CPU with each tensor moved to meta as registered: the hooks doing it go when it ends."""
    from attn_inject.models.build import build_shapes_only

    build_shapes_only("tv:regnet_y_400mf")
    module = torch.nn.modules.module
    assert not module._global_parameter_registration_hooks
    assert not module._global_buffer_registration_hooks
    runs = _counting_attend(monkeypatch)
    ai.inject(resnet, residual_recipe("se"), init="identity", input_size=SIZE)
    assert runs == [(1, 64, 16, 16)] * 3  # the second block shares the first one's proof
