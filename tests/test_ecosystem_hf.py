"""Models from outside timm and torchvision: variadic root forwards (Ultralytics'
``forward(x, *args, **kwargs)``, decorators that wrap ``forward``), HF transformers' vision
models built from tiny configs with random weights, and their save / load round trip."""

from __future__ import annotations

import copy
import dataclasses
import functools
import inspect
import json
import os
import shutil
from collections import OrderedDict

import pytest
import torch
from torch import nn

import attn_inject as ai
from attn_inject.graph.trace import fixed_arity, trace
from attn_inject.surgery.derive import derived_spec

os.environ.setdefault("HF_HUB_OFFLINE", "1")


# --- variadic root forwards (no transformers needed) -------------------------------------------


class Backbone(nn.Module):
    """Four stride-2 convolutions with functional ReLUs in the root's own code, so a block
    after a stage is placed in the root's rewritten forward."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.c1 = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.c2 = nn.Conv2d(16, 32, 3, stride=2, padding=1)
        self.c3 = nn.Conv2d(32, 32, 3, stride=2, padding=1)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        for conv in (self.stem, self.c1, self.c2, self.c3):
            x = torch.relu(conv(x))
        return x


class VariadicRoot(Backbone):
    """Ultralytics' root signature."""

    def forward(self, x, *args, **kwargs):
        for extra in args:
            x = x + extra
        if kwargs.get("augment"):
            x = x.flip(-1)
        return self.features(x).mean((2, 3))


def doubled(forward):
    """A decorator that hides ``forward``'s parameters behind ``(self, *args, **kwargs)``."""

    @functools.wraps(forward)
    def wrapper(self, *args, **kwargs):
        scale = kwargs.pop("scale", 2.0)
        return forward(self, *args, **kwargs) * scale

    return wrapper


class WrappedRoot(Backbone):
    @doubled
    def forward(self, x, shift=None, **kwargs):
        if shift is not None:
            x = x + shift
        return self.features(x).mean((2, 3))


class TwiceWrappedRoot(Backbone):
    @doubled
    @doubled
    def forward(self, x, *, shift=None):
        if shift is not None:
            x = x + shift
        return self.features(x).mean((2, 3))


INPUT = (3, 64, 64)


def _inputs() -> torch.Tensor:
    return torch.randn(2, *INPUT, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("cls", [VariadicRoot, WrappedRoot, TwiceWrappedRoot])
def test_variadic_root_injects_identity_exact_for_the_plain_call(cls):
    torch.manual_seed(0)
    model = cls().eval()
    patched = ai.inject(model, "se_after_every_stage", input_size=INPUT)
    assert ai.inserted_blocks(patched), "the root's stages are open to insertion"
    assert type(patched).__mro__[1] is cls or type(patched) is cls
    x = _inputs()
    with torch.no_grad():
        assert torch.equal(patched(x), model(x))


def test_decorator_runs_as_part_of_the_traced_forward():
    """The wrapper's own code (a scale of 2) is in the graph: the traced forward computes
    twice the undecorated one, as the model does."""
    torch.manual_seed(0)
    model = WrappedRoot().eval()
    graph = trace(model).graph
    gm = torch.fx.GraphModule(model, graph)
    x = _inputs()
    with torch.no_grad():
        plain = model.features(x).mean((2, 3))
        assert torch.equal(gm(x), plain * 2.0)


def test_rewritten_variadic_root_refuses_extra_arguments():
    """The root's forward is rewritten for ``model(x)``: ``*args`` and ``**kwargs`` were
    empty in the trace, and a call that passes some is refused rather than ignored."""
    torch.manual_seed(0)
    model = VariadicRoot().eval()
    patched = ai.inject(model, "se_after_every_stage", input_size=INPUT)
    spec = derived_spec(patched)
    assert spec is not None and spec.graph is not None, "blocks in the root's code: its forward is rewritten"
    x = _inputs()
    with pytest.raises(RuntimeError, match=r"without \*args"):
        patched(x, torch.ones(1))
    with pytest.raises(RuntimeError, match=r"without \*\*kwargs"):
        patched(x, augment=True)


def test_fixed_arity_names_the_real_parameters():
    fixed = fixed_arity(WrappedRoot.forward)
    assert fixed is not None
    assert list(inspect.signature(fixed).parameters) == ["self", "x", "shift"]
    assert inspect.signature(fixed).parameters["shift"].default is None
    kw_only = fixed_arity(TwiceWrappedRoot.forward)
    assert kw_only is not None and list(inspect.signature(kw_only).parameters) == ["self", "x", "shift"]
    assert fixed_arity(Backbone.features) is None  # nothing to fix: fx traces it as it is
    assert fixed_arity(lambda self, *args, **kwargs: None) is None  # no parameter to trace it for


@dataclasses.dataclass
class Output(OrderedDict):
    """A dict that is also a dataclass, as transformers' ModelOutput."""

    features: torch.Tensor | None = None
    pooled: torch.Tensor | None = None

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            if getattr(self, f.name) is not None:
                self[f.name] = getattr(self, f.name)


class DictOutputRoot(Backbone):
    def forward(self, x):
        features = self.features(x)
        return Output(features=features, pooled=features.mean((2, 3)))


def test_rewritten_root_returns_its_own_output_type():
    torch.manual_seed(0)
    model = DictOutputRoot().eval()
    patched = ai.inject(model, "se_after_every_stage", input_size=INPUT)
    spec = derived_spec(patched)
    assert spec is not None and spec.graph is not None
    x = _inputs()
    with torch.no_grad():
        want, got = model(x), patched(x)
    assert type(got) is Output
    assert list(got) == list(want)
    for name in want:
        assert torch.equal(got[name], want[name])
    assert torch.equal(got.pooled, want.pooled)


# --- HF transformers ---------------------------------------------------------------------------


def _hf():
    return pytest.importorskip("transformers", reason="HF transformers is not installed (attn-inject[hf])")


def _configs(T):
    """(model class, config, image size): tiny, built with random weights, nothing downloaded."""
    stages = dict(hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 1, 1])
    vit = dict(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2)
    two = dict(num_encoder_blocks=2, depths=[1, 1], hidden_sizes=[16, 32], patch_sizes=[7, 3], strides=[4, 2])
    return {
        "resnet": (T.ResNetModel, T.ResNetConfig(embedding_size=16, **stages), 64),
        "regnet": (T.RegNetModel, T.RegNetConfig(embedding_size=16, groups_width=8, **stages), 64),
        "efficientnet": (
            T.EfficientNetModel,
            T.EfficientNetConfig(
                image_size=64, width_coefficient=0.25, depth_coefficient=0.25, hidden_dim=320
            ),
            64,
        ),
        "bit": (T.BitModel, T.BitConfig(embedding_size=16, num_groups=4, **stages), 64),
        "convnext": (T.ConvNextModel, T.ConvNextConfig(image_size=64, **stages), 64),
        "convnextv2": (T.ConvNextV2Model, T.ConvNextV2Config(image_size=64, **stages), 64),
        "poolformer": (T.PoolFormerModel, T.PoolFormerConfig(padding=[2, 1], **two), 64),
        "segformer": (
            T.SegformerModel,
            T.SegformerConfig(sr_ratios=[2, 1], num_attention_heads=[1, 2], mlp_ratios=[2, 2], **two),
            64,
        ),
        "dinov2": (T.Dinov2Model, T.Dinov2Config(**vit), 32),
        "vit": (T.ViTModel, T.ViTConfig(intermediate_size=64, **vit), 32),
        "deit": (T.DeiTModel, T.DeiTConfig(intermediate_size=64, **vit), 32),
        "mobilenetv2": (T.MobileNetV2Model, T.MobileNetV2Config(image_size=64, depth_multiplier=0.25), 64),
        "swin": (
            T.SwinModel,
            T.SwinConfig(
                image_size=32, patch_size=4, embed_dim=16, depths=[1, 1], num_heads=[1, 2], window_size=4
            ),
            32,
        ),
    }


@functools.cache
def _hf_model(name: str):
    T = _hf()
    cls, config, size = _configs(T)[name]
    torch.manual_seed(0)
    return cls(config).eval(), size


# Each model with a recipe that places blocks in it (every recipe is run on a few models).
INJECTING = [
    ("resnet", "se_resnet"),
    ("regnet", "cbam_after_every_stage"),
    ("efficientnet", "se_after_every_stage"),
    ("bit", "se_resnet"),
    ("convnext", "cbam_after_every_stage"),
    ("convnextv2", "se_resnet"),
    ("poolformer", "se_after_every_stage"),
    ("segformer", "se_resnet"),
    ("dinov2", "se_resnet"),
    ("vit", "se_resnet"),  # the root's `if` on the input's dtype, decided by the meta pass
    ("deit", "cbam_after_every_stage"),
    ("mobilenetv2", "se_after_every_stage"),  # int() of sizes in its TensorFlow-style padding
    ("swin", "cbam_after_every_stage"),  # the last stage ends before the pooler's (B, C, N) transpose
]


@functools.cache
def _injected_once(name: str, recipe: str):
    model, size = _hf_model(name)
    return ai.inject(model, recipe, init="identity", input_size=(3, size, size))


def _injected(name: str, recipe: str):
    """``name`` injected with ``recipe`` at identity: injected once per module, each test its
    own copy."""
    return copy.deepcopy(_injected_once(name, recipe))


def _assert_same_output(want, got) -> None:
    assert type(got) is type(want)
    assert list(got.keys()) == list(want.keys())
    for name in want:
        assert torch.equal(got[name], want[name]), name


@pytest.mark.parametrize(("name", "recipe"), INJECTING)
def test_hf_model_injects_identity_exact_on_every_output_field(name, recipe):
    model, size = _hf_model(name)
    patched = _injected(name, recipe)
    assert len(ai.inserted_blocks(patched)) > 0
    assert ai.base_class(patched) is type(model) and type(patched).__name__ == type(model).__name__
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        _assert_same_output(model(x), patched(x))


# validate's reference (the blocks applied by hooks to the untouched model) on one model of each
# kind of placement: blocks in a CNN's units, in the root's rewritten code, in a transformer's
# residual units, CBAM on a token grid and on Swin's windowed stages; the other models under -m zoo
VALIDATED = {"resnet", "poolformer", "segformer", "deit", "swin"}


@pytest.mark.parametrize(
    ("name", "recipe"),
    [pytest.param(n, r, marks=() if n in VALIDATED else pytest.mark.zoo) for n, r in INJECTING],
)
def test_hf_model_injected_passes_validate(name, recipe):
    model, _ = _hf_model(name)
    report = ai.validate(
        model, _injected(name, recipe), checks=("reference", "identity"), seeds=1, device="cpu"
    )
    assert report.passed, str(report)


def test_hf_swin_gets_a_block_at_every_stage_end_the_last_before_its_pooler():
    """The plan the injection recorded and placed its blocks by."""
    plan = _injected("swin", "cbam_after_every_stage").attn_inject.plan
    assert [p.name for p in plan] == ["encoder.layers.0.blocks.0", "layernorm"]
    assert not plan.skipped


def test_hf_decorated_forward_still_answers_return_dict_false():
    """ConvNext's forward is wrapped by ``@can_return_tuple``; its blocks live in its stages,
    so the decorator runs as written and ``return_dict=False`` still gives a tuple."""
    model, size = _hf_model("convnext")
    patched = _injected("convnext", "cbam_after_every_stage")
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want, got = model(x, return_dict=False), patched(x, return_dict=False)
    assert isinstance(got, tuple) and len(got) == len(want)
    for a, b in zip(want, got, strict=True):
        assert torch.equal(a, b)


def test_hf_root_rewritten_keeps_its_model_output_and_refuses_other_flags():
    """PoolFormer's last stage ends in the root's own code: its forward is rewritten, returns
    the same ModelOutput class, and a flag that would change what it computes is refused."""
    model, size = _hf_model("poolformer")
    patched = _injected("poolformer", "se_after_every_stage")
    spec = derived_spec(patched)
    assert spec is not None and spec.graph is not None
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        _assert_same_output(model(x), patched(x))
    with pytest.raises(RuntimeError, match="output_hidden_states"):
        patched(x, output_hidden_states=True)


def test_hf_save_pretrained_round_trip_keeps_the_blocks(tmp_path):
    T = _hf()
    model, size = _hf_model("resnet")
    patched = ai.inject(model, "se_after_every_stage", init="paper", input_size=(3, size, size))
    ai.hf.save_pretrained(patched, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["attn_inject"]["weights"] == "attn_inject.safetensors"
    assert config["model_type"] == "resnet"
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(4))
    state = torch.random.get_rng_state()
    for cls in (T.ResNetModel, T.AutoModel):
        loaded = ai.hf.from_pretrained(cls, tmp_path)
        assert type(loaded).__name__ == "ResNetModel"
        assert set(ai.inserted_blocks(loaded)) == set(ai.inserted_blocks(patched))
        with torch.no_grad():
            _assert_same_output(patched(x), loaded(x))
    assert torch.equal(torch.random.get_rng_state(), state), "loading leaves the caller's random state"
    # The blocks are not identity (init="paper"): a model without them computes something else.
    with torch.no_grad():
        assert not torch.equal(model(x).last_hidden_state, patched(x).last_hidden_state)


@pytest.fixture(scope="module")
def saved_resnet(tmp_path_factory):
    """The tiny ResNet with identity blocks after every stage, saved by ``ai.hf.save_pretrained``
    once per module (tests that edit it edit a copy)."""
    _hf()
    folder = tmp_path_factory.mktemp("hf") / "patched"
    ai.hf.save_pretrained(_injected("resnet", "se_after_every_stage"), folder)
    return folder


def test_hf_plain_from_pretrained_on_a_patched_folder_fails_instead_of_dropping_blocks(saved_resnet):
    T = _hf()
    with pytest.raises(OSError, match=r"model\.safetensors"):
        T.ResNetModel.from_pretrained(saved_resnet)


def test_hf_from_pretrained_refuses_a_plain_folder_another_class_and_a_bad_entry(tmp_path, saved_resnet):
    T = _hf()
    model, _ = _hf_model("resnet")
    plain = tmp_path / "plain"
    model.save_pretrained(plain)
    with pytest.raises(ai.AttnInjectError, match="has no 'attn_inject' entry"):
        ai.hf.from_pretrained(T.ResNetModel, plain)
    folder = shutil.copytree(saved_resnet, tmp_path / "patched")
    with pytest.raises(ai.AttnInjectError, match="ResNetForImageClassification"):
        ai.hf.from_pretrained(T.ResNetForImageClassification, folder)
    with pytest.raises(ai.AttnInjectError, match="exists"):
        ai.hf.save_pretrained(_injected("resnet", "se_after_every_stage"), folder)
    config = json.loads((folder / "config.json").read_text())
    config["attn_inject"]["weights"] = "../elsewhere.safetensors"
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ai.AttnInjectError, match="must name weights"):
        ai.hf.from_pretrained(T.ResNetModel, folder)
    with pytest.raises(ai.AttnInjectError, match="PreTrainedModel"):
        other = ai.inject(VariadicRoot().eval(), "se_after_every_stage", input_size=INPUT)
        ai.hf.save_pretrained(other, folder)


# --- transformers.Trainer: checkpoints that keep the blocks ------------------------------------


def _trainer_pieces(T, seed: int):
    """A patched tiny ResNet classifier (blends at 0) and 16 random labelled images: made once
    per module for each seed, each call its own copy."""
    return copy.deepcopy(_trainer_pieces_once(T, seed))


@functools.cache
def _trainer_pieces_once(T, seed: int):
    config = T.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16, 16, 16], depths=[1] * 4, num_labels=3)
    torch.manual_seed(seed)
    model = T.ResNetForImageClassification(config)
    patched = ai.inject(model, "se_after_every_stage", input_size=(3, 32, 32))
    g = torch.Generator().manual_seed(0)
    images, labels = torch.randn(16, 3, 32, 32, generator=g), torch.randint(0, 3, (16,), generator=g)
    data = [{"pixel_values": images[i], "labels": labels[i]} for i in range(16)]
    return patched, data


def _trainer(T, patched, data, out, **kwargs):
    pytest.importorskip("accelerate", reason="transformers' Trainer needs accelerate")
    args = T.TrainingArguments(
        output_dir=str(out),
        max_steps=4,
        save_steps=2,
        per_device_train_batch_size=4,
        learning_rate=0.1,
        report_to=[],
        use_cpu=True,
        remove_unused_columns=False,
        disable_tqdm=True,
        **kwargs,
    )
    return T.Trainer(model=patched, args=args, train_dataset=data, callbacks=[ai.hf.KeepBlocks()])


def _blends(model) -> dict[str, float]:
    return {k: float(v) for k, v in model.state_dict().items() if k.endswith(".blend")}


def test_hf_trainer_checkpoints_reload_with_their_trained_blocks_and_resume(tmp_path):
    from safetensors.torch import load_file

    T = _hf()
    patched, data = _trainer_pieces(T, seed=0)
    blocks = set(ai.inserted_blocks(patched))
    assert blocks and all(b == 0.0 for b in _blends(patched).values())
    _trainer(T, patched, data, tmp_path / "run").train()
    trained = {k: v.clone() for k, v in patched.state_dict().items()}
    assert all(b != 0.0 for b in _blends(patched).values()), "training moved every blend from 0"

    last, middle = tmp_path / "run" / "checkpoint-4", tmp_path / "run" / "checkpoint-2"
    for folder in (middle, last):
        assert (folder / "attn_inject_config.json").is_file() and (folder / "model.safetensors").is_file()
        assert not (folder / "config.json").exists(), "a plain from_pretrained finds no config to build"
    loaded = ai.hf.from_pretrained(T.AutoModelForImageClassification, last)
    assert type(loaded).__name__ == "ResNetForImageClassification"
    assert set(ai.inserted_blocks(loaded)) == blocks
    got = loaded.state_dict()
    assert set(got) == set(trained)
    for key, value in trained.items():
        assert torch.equal(got[key], value), key
    # checkpoint-2 holds the weights of step 2, as the Trainer itself wrote them: not step 4's.
    at_two = ai.hf.from_pretrained(T.ResNetForImageClassification, middle).state_dict()
    assert all(torch.equal(at_two[k], v) for k, v in load_file(middle / "model.safetensors").items())
    assert any(not torch.equal(at_two[k], trained[k]) for k in at_two if k.endswith(".blend"))

    for auto in (T.AutoModel, T.AutoModelForImageClassification):
        with pytest.raises(ValueError, match="model_type"):
            auto.from_pretrained(last)

    # Resume from step 2 in a fresh patched model (another initialisation): the Trainer loads
    # the checkpoint and runs steps 3 and 4, ending where the uninterrupted run ended.
    fresh, _ = _trainer_pieces(T, seed=1)
    resumed = _trainer(T, fresh, data, tmp_path / "again")
    resumed.train(resume_from_checkpoint=str(middle))
    assert resumed.state.global_step == 4
    for key, value in fresh.state_dict().items():
        assert torch.allclose(value, trained[key], rtol=0, atol=1e-6), key


def test_hf_keep_blocks_refuses_a_plain_model_and_push_to_hub_and_names_an_unkept_checkpoint(tmp_path):
    from types import SimpleNamespace

    T = _hf()
    patched, _ = _trainer_pieces(T, seed=0)
    keep = ai.hf.KeepBlocks()
    assert isinstance(keep, T.TrainerCallback)
    args = SimpleNamespace(push_to_hub=False, should_save=True, output_dir=str(tmp_path))
    keep.on_train_begin(args, None, None, model=patched)
    with pytest.raises(ai.AttnInjectError, match="no attention blocks"):
        keep.on_train_begin(args, None, None, model=ai.base_class(patched)(patched.config))
    with pytest.raises(ai.AttnInjectError, match="push_to_hub"):
        keep.on_train_begin(SimpleNamespace(push_to_hub=True), None, None, model=patched)
    # A checkpoint the Trainer wrote without the callback: config.json records no blocks.
    unkept = tmp_path / "checkpoint-2"
    patched.save_pretrained(unkept)
    (unkept / "trainer_state.json").write_text("{}")
    with pytest.raises(ai.AttnInjectError, match=r"without attn_inject\.hf\.KeepBlocks"):
        ai.hf.from_pretrained(T.ResNetForImageClassification, unkept)
    # on_save for a step whose folder holds no model.safetensors says what it keeps.
    with pytest.raises(ai.AttnInjectError, match=r"no model\.safetensors"):
        keep.on_save(args, SimpleNamespace(global_step=3), None, model=patched)


def test_a_checkpoint_whose_weights_cannot_be_kept_keeps_its_config_and_no_plain_one(tmp_path, monkeypatch):
    """KeepBlocks failing at the weights (a full disk) leaves the checkpoint's config, under
    the kept name, and no config.json that a plain from_pretrained would build a plain model
    from; keeping it again finishes it."""
    from attn_inject.saving import hf as hf_saving

    T = _hf()
    patched, _ = _trainer_pieces(T, seed=0)
    folder = tmp_path / "checkpoint-2"
    patched.save_pretrained(folder)  # what the Trainer writes: config.json and model.safetensors
    (folder / "trainer_state.json").write_text("{}")
    written = (folder / "model.safetensors").read_bytes()

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(hf_saving, "save", full_disk)
    with pytest.raises(OSError, match="No space left"):
        hf_saving._keep_checkpoint(patched, folder, step=2)
    assert not (folder / "config.json").exists()
    kept = json.loads((folder / "attn_inject_config.json").read_text())
    assert kept["attn_inject"]["weights"] == "model.safetensors"
    assert kept["model_type"] == patched.config.model_type
    assert kept["architectures"] == [type(patched).__name__]
    assert (folder / "model.safetensors").read_bytes() == written
    with pytest.raises(ValueError, match="model_type"):
        T.AutoModelForImageClassification.from_pretrained(folder)
    with pytest.raises(ai.AttnInjectError) as refused:
        ai.hf.from_pretrained(T.ResNetForImageClassification, folder)
    assert "\n" not in str(refused.value) and "manifest" in str(refused.value), str(refused.value)

    monkeypatch.undo()
    hf_saving._keep_checkpoint(patched, folder, step=2)
    loaded = ai.hf.from_pretrained(T.ResNetForImageClassification, folder)
    assert set(ai.inserted_blocks(loaded)) == set(ai.inserted_blocks(patched))
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in patched.state_dict().items())
