"""A saved file rebuilds exactly the network that was saved, or the save (or load) refuses.

timm's builder arguments change the network without changing the model's name: a model
built with ``global_pool="max"`` and rebuilt without it loads strictly (same keys and
shapes) and computes something else. The references here are independent of the code under
test: the models' own ``repr`` and their outputs on the same batch. The timm model is
``test_resnet``, timm's tiny ResNet (a deep stem, one block a stage).
"""

from __future__ import annotations

import pytest
import timm
import torch
import torchvision

import attn_inject as ai
from attn_inject.models.build import build_model, build_shapes_only

REGISTER_PARAMETER = torch.nn.Module.register_parameter

ARGUMENTS = {
    "global_pool": {"num_classes": 10, "global_pool": "max"},
    "output_stride": {"output_stride": 8},
    "act_layer": {"act_layer": "gelu"},
    "in_chans": {"in_chans": 1},
    "drop_path_rate": {"drop_path_rate": 0.2},
    "features_only": {"features_only": True},
}
# What timm keeps on the model it builds (class count, pooling, drop-path rates, feature
# outputs): save reads them from the model; the other arguments leave no trace.
KEPT_BY_TIMM = ["global_pool", "drop_path_rate", "features_only"]
UNKNOWN_TO_SAVE = [case for case in ARGUMENTS if case not in KEPT_BY_TIMM]


def size_for(kwargs: dict) -> tuple[int, int, int]:
    return (kwargs.get("in_chans", 3), 64, 64)


def patched_model(model: torch.nn.Module, kwargs: dict) -> torch.nn.Module:
    patched = ai.inject(model.eval(), "se_resnet", input_size=size_for(kwargs))
    with torch.no_grad():  # a trained state: the blocks no longer compute the identity
        for block in ai.inserted_blocks(patched).values():
            for name, p in block.named_parameters():
                if name.endswith("blend"):
                    p.fill_(0.5)
    return patched


def outputs(model: torch.nn.Module, kwargs: dict) -> list[torch.Tensor]:
    x = torch.randn((2, *size_for(kwargs)), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = model.eval()(x)
    return list(out) if isinstance(out, (list, tuple)) else [out]


def assert_same_network(loaded: torch.nn.Module, saved: torch.nn.Module, kwargs: dict) -> None:
    assert repr(loaded) == repr(saved)
    got, want = outputs(loaded, kwargs), outputs(saved, kwargs)
    assert len(got) == len(want) and all(torch.equal(g, w) for g, w in zip(got, want, strict=True))


@pytest.mark.parametrize("case", list(ARGUMENTS))
def test_model_built_by_name_round_trips_to_the_same_network(tmp_path, case):
    kwargs = ARGUMENTS[case]
    torch.manual_seed(0)
    patched = patched_model(build_model("timm:test_resnet", **kwargs), kwargs)
    ai.save(patched, tmp_path / "m.safetensors")
    assert ai.read_manifest(tmp_path / "m.safetensors").base_kwargs == kwargs
    assert_same_network(ai.load(tmp_path / "m.safetensors"), patched, kwargs)


@pytest.mark.parametrize("case", KEPT_BY_TIMM)
def test_a_timm_model_whose_arguments_timm_keeps_round_trips_without_them(tmp_path, case):
    kwargs = ARGUMENTS[case]
    torch.manual_seed(0)
    patched = patched_model(timm.create_model("test_resnet", **kwargs), kwargs)
    ai.save(patched, tmp_path / "m.safetensors")
    recorded = ai.read_manifest(tmp_path / "m.safetensors").base_kwargs
    assert all(recorded[key] == value for key, value in kwargs.items())
    assert_same_network(ai.load(tmp_path / "m.safetensors"), patched, kwargs)


@pytest.mark.parametrize("case", UNKNOWN_TO_SAVE)
def test_save_refuses_a_timm_model_whose_arguments_it_cannot_know_until_they_are_given(tmp_path, case):
    kwargs = ARGUMENTS[case]
    torch.manual_seed(0)
    patched = patched_model(timm.create_model("test_resnet", **kwargs), kwargs)
    path = tmp_path / "m.safetensors"
    with pytest.raises(ai.CheckpointError) as info:
        ai.save(patched, path)
    message = str(info.value)
    assert "\n" not in message and "gives a different network" in message
    assert "model_kwargs={...}" in message and "build_model" in message
    assert not list(tmp_path.iterdir())  # nothing written
    ai.save(patched, path, model_kwargs=kwargs)  # how the message says to fix it
    assert_same_network(ai.load(path), patched, kwargs)
    assert 'model_name="")' in message and "ai.load(path, model=...)" in message  # the other way
    ai.save(patched, tmp_path / "unnamed.safetensors", model_name="")
    with pytest.raises(ai.CheckpointError, match="does not name its base model"):
        ai.load(tmp_path / "unnamed.safetensors")
    base = timm.create_model("test_resnet", **kwargs)
    assert_same_network(ai.load(tmp_path / "unnamed.safetensors", model=base), patched, kwargs)


def test_save_names_the_first_module_that_differs(tmp_path):
    patched = patched_model(timm.create_model("test_resnet", num_classes=10, act_layer="gelu"), {})
    with pytest.raises(ai.CheckpointError, match=r"conv1\.2: this model has 'GELU\(\)', the rebuilt one"):
        ai.save(patched, tmp_path / "m.safetensors")


def test_load_refuses_a_given_model_that_is_not_the_saved_network(tmp_path):
    kwargs = ARGUMENTS["global_pool"]
    ai.save(patched_model(build_model("timm:test_resnet", **kwargs), kwargs), tmp_path / "m.safetensors")
    other = timm.create_model("test_resnet", num_classes=10)  # same keys and shapes, average pooling
    with pytest.raises(ai.CheckpointError) as info:
        ai.load(tmp_path / "m.safetensors", model=other)
    message = str(info.value)
    assert "\n" not in message and "is not the network saved in the file" in message
    assert "global_pool.pool: the file has 'AdaptiveMaxPool2d" in message
    same = timm.create_model("test_resnet", **kwargs)
    assert repr(ai.load(tmp_path / "m.safetensors", model=same).global_pool) == repr(same.global_pool)


def test_a_head_replaced_after_injection_is_caught_at_save(tmp_path):
    patched = patched_model(build_model("timm:test_resnet"), {})
    patched.fc = torch.nn.Linear(96, 7)
    with pytest.raises(
        ai.CheckpointError, match=r"fc: this model has 'Linear\(in_features=96, out_features=7"
    ):
        ai.save(patched, tmp_path / "m.safetensors")
    ai.save(patched, tmp_path / "m.safetensors", model_kwargs={"num_classes": 7})
    assert_same_network(ai.load(tmp_path / "m.safetensors"), patched, {})


def test_a_model_whose_builder_needs_real_tensors_is_checked_without_allocating_its_weights(tmp_path):
    # torchvision RegNet computes its widths from tensor values: it cannot be built on meta.
    with pytest.raises(NotImplementedError), torch.device("meta"):
        torchvision.models.regnet_x_400mf()
    shapes = build_shapes_only("tv:regnet_x_400mf")
    assert {t.device.type for t in [*shapes.parameters(), *shapes.buffers()]} == {"meta"}
    assert torch.nn.Module.register_parameter is REGISTER_PARAMETER  # put back
    real = torchvision.models.regnet_x_400mf()
    assert repr(shapes) == repr(real)
    assert {k: v.shape for k, v in shapes.state_dict().items()} == {
        k: v.shape for k, v in real.state_dict().items()
    }
    torch.manual_seed(0)
    patched = patched_model(build_model("tv:regnet_x_400mf"), {})
    ai.save(patched, tmp_path / "m.safetensors")
    assert_same_network(ai.load(tmp_path / "m.safetensors"), patched, {})


def test_building_shapes_only_changes_nothing_outside_its_own_thread():
    """The shapes-only build moves what its own thread registers to the meta device, through
    torch's registration hooks: ``nn.Module`` itself and other threads are untouched."""
    import threading

    from attn_inject.models import build

    methods = (torch.nn.Module.register_parameter, torch.nn.Module.register_buffer)
    inside, elsewhere = threading.Event(), threading.Event()
    built: dict[str, torch.nn.Module] = {}

    def other_thread() -> None:
        inside.wait(timeout=60)
        built["other"] = torch.nn.BatchNorm2d(4)
        elsewhere.set()

    worker = threading.Thread(target=other_thread)
    worker.start()
    with build._registered_on_meta():
        assert (torch.nn.Module.register_parameter, torch.nn.Module.register_buffer) == methods
        inside.set()
        assert elsewhere.wait(timeout=60)
        built["here"] = torch.nn.BatchNorm2d(4)
    worker.join()
    assert all(t.is_meta for t in [*built["here"].parameters(), *built["here"].buffers()])
    assert not any(t.is_meta for t in [*built["other"].parameters(), *built["other"].buffers()])
    after = torch.nn.Linear(2, 2)
    assert not after.weight.is_meta


def test_saving_one_network_again_checks_its_rebuild_once(tmp_path, monkeypatch):
    import attn_inject.saving.file as saving

    patched = patched_model(build_model("timm:test_resnet"), {})
    calls = []
    check = saving._check_rebuilds
    monkeypatch.setattr(saving, "_check_rebuilds", lambda *a: calls.append(a[1]) or check(*a))
    monkeypatch.setattr(saving, "_REBUILDS_CHECKED", {})
    for epoch in range(3):  # as a fine-tuning run saves after every epoch
        ai.save(patched, tmp_path / "last.safetensors", force=True, training={"epoch": epoch})
    assert calls == ["timm:test_resnet"]
    with torch.no_grad():
        patched.conv1[0].weight.zero_()  # new weights, same network: still checked once
    ai.save(patched, tmp_path / "last.safetensors", force=True)
    changed = patched_model(timm.create_model("test_resnet", num_classes=10, act_layer="gelu"), {})
    with pytest.raises(ai.CheckpointError, match="GELU"):  # another network is checked, and refused
        ai.save(changed, tmp_path / "other.safetensors")
    assert calls == ["timm:test_resnet"] * 2


FILLS = {"normal_", "uniform_", "trunc_normal_", "kaiming_normal_", "kaiming_uniform_", "xavier_uniform_"}


class _FillsSeen(torch.overrides.TorchFunctionMode):
    """Records the initialisation fills (``Tensor.normal_``, ``torch.nn.init.kaiming_normal_``...)
    that reach it."""

    def __init__(self) -> None:
        super().__init__()
        self.fills: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in FILLS:
            self.fills.append(func.__name__)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize(
    "name", ["timm:resnet18", "timm:efficientnet_b0", "timm:vit_tiny_patch16_224", "tv:regnet_x_400mf"]
)
def test_a_shapes_only_build_runs_no_fill_and_builds_the_network_a_cpu_build_does(name):
    """A meta tensor has no values for an initialisation to write: the shapes-only build
    skips the fills (torch runs ``normal_`` on the meta device through a slow reference) and
    builds the modules, keys, shapes and dtypes a build on the CPU does."""
    with _FillsSeen() as on_meta:
        shapes = build_shapes_only(name)
    with _FillsSeen() as on_cpu:
        real = build_model(name)
    assert on_meta.fills == [] and on_cpu.fills
    assert repr(shapes) == repr(real)
    assert {k: (v.shape, v.dtype) for k, v in shapes.state_dict().items()} == {
        k: (v.shape, v.dtype) for k, v in real.state_dict().items()
    }
    assert all(t.is_meta for t in [*shapes.parameters(), *shapes.buffers()])
