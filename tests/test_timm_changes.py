"""What a timm user changes on a model survives ``ai.save`` / ``ai.load`` with no extra
argument: a new head (``reset_classifier``, before or after ``inject``), a feature backbone
(``features_only`` with ``out_indices``), a ``pretrained_cfg_overlay`` and a drop-path rate.

The models are timm's resnet10t (resnet18's basic blocks, one a stage) and a MobileNetV3.
The reference is the model that was saved: the loaded one must give exactly its outputs (in
eval mode, on the same batch), its ``pretrained_cfg`` / ``default_cfg`` / ``num_classes``,
its module ``repr`` and its drop-path rates, all read from the models themselves.
"""

from __future__ import annotations

import json

import pytest
import safetensors.torch
import timm
import torch
from timm.layers import DropPath

import attn_inject as ai
from attn_inject.models.build import ModelKwargsError, build_model, check_model_kwargs
from attn_inject.saving.checkpoint import read_safetensors_metadata
from attn_inject.saving.file import MANIFEST_KEY

SIZE = (3, 32, 32)
OVERLAY = {"mean": (0.1, 0.2, 0.3), "std": (0.5, 0.5, 0.5), "input_size": (3, 160, 160), "crop_pct": 0.9}


def trained(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` patched, its blocks in a trained state (no longer the identity)."""
    patched = ai.inject(model.eval(), "se_resnet", input_size=SIZE)
    with torch.no_grad():
        for block in ai.inserted_blocks(patched).values():
            for name, p in block.named_parameters():
                if name.endswith("blend"):
                    p.fill_(0.5)
    return patched


def outputs(model: torch.nn.Module) -> list[torch.Tensor]:
    x = torch.randn((2, *SIZE), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = model.eval()(x)
    return list(out) if isinstance(out, (list, tuple)) else [out]


def round_trip(patched: torch.nn.Module, tmp_path) -> torch.nn.Module:
    path = tmp_path / "m.safetensors"
    ai.save(patched, path)
    return ai.load(path)


def assert_same_model(loaded: torch.nn.Module, saved: torch.nn.Module) -> None:
    assert type(loaded) is type(saved) and repr(loaded) == repr(saved)
    got, want = outputs(loaded), outputs(saved)
    assert len(got) == len(want) and all(torch.equal(g, w) for g, w in zip(got, want, strict=True))
    assert loaded.pretrained_cfg == saved.pretrained_cfg
    assert loaded.default_cfg == saved.default_cfg
    assert getattr(loaded, "num_classes", None) == getattr(saved, "num_classes", None)


def drop_path_rates(model: torch.nn.Module) -> list[tuple[str, float]]:
    return [(name, m.drop_prob) for name, m in model.named_modules() if isinstance(m, DropPath)]


def test_a_head_reset_after_injection_is_the_head_loaded(tmp_path):
    torch.manual_seed(0)
    patched = trained(timm.create_model("resnet10t"))
    patched.reset_classifier(5, global_pool="max")
    loaded = round_trip(patched, tmp_path)
    assert loaded.fc.out_features == 5 and loaded.num_classes == 5
    assert type(loaded.global_pool.pool).__name__ == "AdaptiveMaxPool2d"
    assert_same_model(loaded, patched)


def test_a_head_reset_before_injection_is_the_head_loaded(tmp_path):
    torch.manual_seed(0)
    model = timm.create_model("resnet10t")
    model.reset_classifier(5)
    patched = trained(model)
    loaded = round_trip(patched, tmp_path)
    assert loaded.fc.out_features == 5
    assert_same_model(loaded, patched)


def test_a_head_reset_on_a_model_built_by_name_is_the_head_loaded(tmp_path):
    torch.manual_seed(0)
    patched = trained(build_model("timm:resnet10t", num_classes=10))
    patched.reset_classifier(3)
    assert_same_model(round_trip(patched, tmp_path), patched)


def test_a_feature_backbone_with_chosen_outputs_loads_as_saved(tmp_path):
    torch.manual_seed(0)
    patched = trained(timm.create_model("resnet10t", features_only=True, out_indices=(1, 3)))
    loaded = round_trip(patched, tmp_path)
    assert [f.shape[1] for f in outputs(loaded)] == [64, 256]  # layer1 and layer3
    assert loaded.feature_info.out_indices == (1, 3)
    assert_same_model(loaded, patched)
    manifest = ai.read_manifest(tmp_path / "m.safetensors")
    assert manifest.base_kwargs == {"features_only": True, "out_indices": [1, 3]}


def test_out_indices_given_as_a_tuple_builds_the_same_backbone(tmp_path):
    torch.manual_seed(0)
    built = build_model("timm:resnet10t", features_only=True, out_indices=(1, 3))
    assert built.feature_info.out_indices == (1, 3)
    patched = trained(built)
    assert_same_model(round_trip(patched, tmp_path), patched)


def test_a_pretrained_cfg_overlay_loads_as_saved(tmp_path):
    torch.manual_seed(0)
    model = timm.create_model("resnet10t", pretrained_cfg_overlay=OVERLAY)
    assert model.pretrained_cfg["mean"] == (0.1, 0.2, 0.3)  # what timm does with it
    patched = trained(model)
    loaded = round_trip(patched, tmp_path)
    assert_same_model(loaded, patched)
    assert timm.data.resolve_data_config(model=loaded) == timm.data.resolve_data_config(model=model)


def test_an_overlay_naming_where_weights_come_from_is_not_recorded(tmp_path):
    # timm's way to load local weights: the saved file holds the weights instead.
    torch.manual_seed(0)
    model = timm.create_model("resnet10t", pretrained_cfg_overlay={"file": "/weights.pth", "crop_pct": 0.9})
    patched = trained(model)
    loaded = round_trip(patched, tmp_path)
    overlay = ai.read_manifest(tmp_path / "m.safetensors").base_kwargs["pretrained_cfg_overlay"]
    assert overlay == {"crop_pct": 0.9}
    assert "file" not in loaded.pretrained_cfg and loaded.pretrained_cfg["crop_pct"] == 0.9
    assert {k: v for k, v in patched.pretrained_cfg.items() if k != "file"} == loaded.pretrained_cfg


# ResNet's last block gets the whole rate, MobileNetV3's (like EfficientNet's) 11/12 of it.
@pytest.mark.parametrize("name", ["resnet10t", "mobilenetv3_small_050"])
def test_a_drop_path_rate_loads_as_saved(tmp_path, name):
    torch.manual_seed(0)
    patched = trained(timm.create_model(name, drop_path_rate=0.1))
    loaded = round_trip(patched, tmp_path)
    assert ai.read_manifest(tmp_path / "m.safetensors").base_kwargs["drop_path_rate"] == 0.1
    assert drop_path_rates(loaded) == drop_path_rates(patched) != []
    assert_same_model(loaded, patched)


def test_every_change_at_once_loads_as_saved(tmp_path):
    torch.manual_seed(0)
    model = timm.create_model("resnet10t", drop_path_rate=0.2, pretrained_cfg_overlay=OVERLAY)
    model.reset_classifier(7)
    patched = trained(model)
    patched.reset_classifier(4, global_pool="avgmax")
    loaded = round_trip(patched, tmp_path)
    assert drop_path_rates(loaded) == drop_path_rates(patched)
    assert_same_model(loaded, patched)


def test_an_overlay_key_that_names_weights_is_refused_in_one_line():
    for key in ("file", "url", "hf_hub_id", "hf_hub_filename", "state_dict", "custom_load", "architecture"):
        with pytest.raises(ModelKwargsError) as info:
            check_model_kwargs({"pretrained_cfg_overlay": {key: "x"}}, "base_kwargs")
        message = str(info.value)
        assert "\n" not in message and f"not allowed to set {key!r}" in message
        assert "allowed: tag, input_size" in message


@pytest.mark.parametrize(
    "overlay, says",
    [
        ({"input_size": [3, 100_000, 100_000]}, "pretrained_cfg_overlay['input_size']"),
        ({"num_classes": -5}, "pretrained_cfg_overlay['num_classes']"),
        ({"mean": [[0.1]]}, "pretrained_cfg_overlay['mean']"),
        ({"notes": "x" * 5000}, "pretrained_cfg_overlay['notes']"),
        ({"label_names": ["x"] * 5000}, "pretrained_cfg_overlay['label_names']"),
        ({"crop_pct": float("nan")}, "pretrained_cfg_overlay['crop_pct']"),
        ({"label_names": ["x" * 900] * 100}, "more than 65536 characters"),
        ([("mean", 1)], "must be a mapping of timm pretrained_cfg keys"),
    ],
)
def test_an_overlay_value_that_is_not_small_plain_data_is_refused(overlay, says):
    with pytest.raises(ModelKwargsError) as info:
        check_model_kwargs({"pretrained_cfg_overlay": overlay}, "base_kwargs")
    assert "\n" not in str(info.value) and len(str(info.value)) < 1000 and says in str(info.value)


def test_a_manifest_overlay_that_names_a_file_is_refused_before_anything_is_built(tmp_path):
    torch.manual_seed(0)
    saved = tmp_path / "m.safetensors"
    ai.save(trained(timm.create_model("resnet10t", pretrained_cfg_overlay=OVERLAY)), saved)
    manifest = json.loads(read_safetensors_metadata(saved)[MANIFEST_KEY])
    manifest["base_kwargs"]["pretrained_cfg_overlay"]["hf_hub_id"] = "someone/weights"
    edited = tmp_path / "edited.safetensors"
    tensors = safetensors.torch.load_file(saved)
    safetensors.torch.save_file(tensors, edited, metadata={MANIFEST_KEY: json.dumps(manifest)})
    with pytest.raises(ai.CheckpointError) as info:
        ai.load(edited)
    message = str(info.value)
    assert "\n" not in message and "manifest field 'base_kwargs'" in message
    assert "not allowed to set 'hf_hub_id'" in message
