"""The bridges to other libraries read untrusted folders and files: a transformers folder's
``config.json``, a timm hub folder, a file registered as a timm model, a timm ``train.py``
checkpoint. Whatever they hold, they shape data only: no code the folder names is run or
offered to run, nothing is downloaded and no other path is opened, nothing is allocated
before the weights file is found to justify it, a FIFO is never waited on, a bad value is
refused in one line of the package's own error class, and the caller's global random states
are left as they were.
"""

from __future__ import annotations

import argparse
import builtins
import collections
import json
import os
import random
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn.modules.module import register_module_parameter_registration_hook

import attn_inject as ai
from attn_inject.models.build import build_model
from attn_inject.saving import hub
from attn_inject.saving.checkpoint import read_state_dict

os.environ.setdefault("HF_HUB_OFFLINE", "1")

SIZE = (3, 32, 32)


def one_line(error: BaseException) -> str:
    text = str(error)
    assert isinstance(error, ai.AttnInjectError), f"{type(error).__name__}: {text}"
    assert "\n" not in text and len(text) < 1000, text
    return text


def random_states():
    return torch.random.get_rng_state(), np.random.get_state()[1].copy(), random.getstate()


def same_random_states(a, b) -> bool:
    return torch.equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[2] == b[2]


# --- timm: files, hub folders, registered names, train.py checkpoints ---------------------------


@pytest.fixture(scope="module")
def timm_saved(tmp_path_factory) -> dict[str, Path]:
    """timm's tiny test_resnet with SE blocks, saved as a file, as a hub folder, and its
    weights as a train.py checkpoint (args a Namespace, as train.py writes it)."""
    folder = tmp_path_factory.mktemp("timm")
    torch.manual_seed(0)
    patched = ai.inject(build_model("timm:test_resnet", num_classes=5), "se_resnet", input_size=SIZE)
    ai.save(patched, folder / "start.safetensors")
    hub.save_pretrained(patched, folder / "hub")
    checkpoint = {"state_dict": patched.state_dict(), "arch": "x", "args": argparse.Namespace(num_classes=5)}
    torch.save(checkpoint, folder / "model_best.pth.tar")
    return {
        "file": folder / "start.safetensors",
        "hub": folder / "hub",
        "checkpoint": folder / "model_best.pth.tar",
    }


@pytest.mark.parametrize("form", ["file", "hub", "checkpoint"])
def test_load_leaves_every_global_random_state_as_it_was(timm_saved, form):
    """The rebuilt model's random initialisation is drawn and overwritten inside ``load``:
    the caller's next draws are those it would have made without it."""
    kwargs = {"like": timm_saved["file"]} if form == "checkpoint" else {}
    torch.manual_seed(3)
    np.random.seed(3)
    random.seed(3)
    before = random_states()
    loaded = ai.load(timm_saved[form], **kwargs)
    assert ai.inserted_blocks(loaded)
    assert same_random_states(before, random_states())


@pytest.mark.parametrize(
    "allowed_before",
    [[], [argparse.Namespace], [collections.OrderedDict, argparse.Namespace]],
    ids=["nothing", "namespace", "two"],
)
def test_reading_a_train_py_checkpoint_leaves_torchs_allowed_globals_as_they_were(timm_saved, allowed_before):
    """timm's users allow ``argparse.Namespace`` to torch's weights-only loader themselves
    (``torch.serialization.add_safe_globals``) to read train.py's checkpoints: reading one
    through ``load`` keeps their list as it was, neither removing nor adding an entry."""
    kept = torch.serialization.get_safe_globals()
    torch.serialization.clear_safe_globals()
    torch.serialization.add_safe_globals(allowed_before)
    try:
        loaded = ai.load(timm_saved["checkpoint"], like=timm_saved["file"])
        after = torch.serialization.get_safe_globals()
    finally:
        torch.serialization.clear_safe_globals()
        torch.serialization.add_safe_globals(kept)
    assert ai.inserted_blocks(loaded)
    assert sorted(after, key=repr) == sorted(allowed_before, key=repr)


def test_reads_of_train_py_checkpoints_in_threads_leave_torchs_allowed_globals_empty(timm_saved):
    """Torch's list of allowed globals is one for the process: reads in several threads
    take turns with it, so none ends while another still needs ``argparse.Namespace``, and
    the list is empty again once every read is done."""
    kept = torch.serialization.get_safe_globals()
    torch.serialization.clear_safe_globals()
    errors: list[BaseException] = []

    def read() -> None:
        try:
            for _ in range(3):
                read_state_dict(timm_saved["checkpoint"])
        except BaseException as error:  # handed to the test
            errors.append(error)

    threads = [threading.Thread(target=read) for _ in range(4)]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        after = torch.serialization.get_safe_globals()
    finally:
        torch.serialization.clear_safe_globals()
        torch.serialization.add_safe_globals(kept)
    assert not errors, errors[0]
    assert after == []


def _call_without_waiting(call, fifo: Path) -> BaseException | None:
    """``call()`` in a thread; if it is still waiting after 10 s (a FIFO opened for reading
    waits for a writer), a writer is opened so the thread ends, and the wait is reported."""
    outcome: list[BaseException | None] = []

    def run() -> None:
        try:
            call()
            outcome.append(None)
        except BaseException as error:  # handed to the test
            outcome.append(error)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(10)
    if thread.is_alive():
        fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        os.close(fd)
        thread.join(10)
        pytest.fail(f"waited on the FIFO {fifo} for a writer")
    return outcome[0]


@pytest.mark.parametrize("how", ["register_timm_model", "load"])
def test_a_fifo_named_as_a_saved_file_is_refused_without_waiting_for_a_writer(tmp_path, how):
    fifo = tmp_path / "model.safetensors"
    os.mkfifo(fifo)
    if how == "load":
        error = _call_without_waiting(lambda: ai.load(fifo), fifo)
    else:
        error = _call_without_waiting(lambda: ai.register_timm_model("fifo_model", fifo), fifo)
    assert error is not None
    assert "FIFO" in one_line(error)


@pytest.mark.parametrize("value", [None, 5, ""])
def test_a_path_that_is_not_a_path_is_refused_in_one_line_by_every_bridge(
    tmp_path, monkeypatch, timm_saved, value
):
    """``""`` is no path either: as a ``Path`` it would be the working folder."""
    monkeypatch.chdir(tmp_path)
    patched = ai.load(timm_saved["file"])
    calls = {
        "register_timm_model": lambda: ai.register_timm_model("typed_model", value),
        "load": lambda: ai.load(value),
        "load(like=)": lambda: ai.load(timm_saved["checkpoint"], like=5 if value is None else value),
        "save_pretrained": lambda: hub.save_pretrained(patched, value),
    }
    for where, call in calls.items():
        with pytest.raises(ai.AttnInjectError) as caught:
            call()
        assert "a path" in one_line(caught.value), where
    assert not list(tmp_path.iterdir()), "nothing written"


# --- HF transformers: config.json is untrusted data ----------------------------------------------


def _transformers():
    return pytest.importorskip("transformers", reason="HF transformers is not installed (attn-inject[hf])")


@pytest.fixture(scope="module")
def hf_saved(tmp_path_factory) -> Path:
    """A tiny transformers ResNet with SE after every stage, saved by ai.hf.save_pretrained."""
    T = _transformers()
    config = T.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16, 16, 16], depths=[1, 1, 1, 1])
    torch.manual_seed(0)
    patched = ai.inject(T.ResNetModel(config).eval(), "se_after_every_stage", input_size=SIZE)
    folder = tmp_path_factory.mktemp("hf") / "resnet-se"
    ai.hf.save_pretrained(patched, folder)
    return folder


def _edited(saved: Path, to: Path, edit) -> Path:
    """A copy of the saved folder whose config.json is ``edit(config)`` (or what it returns)."""
    folder = Path(shutil.copytree(saved, to))
    config = json.loads((folder / "config.json").read_text())
    config = edit(config) or config
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_hf_config_naming_remote_code_is_refused_without_offering_to_run_it(hf_saved, tmp_path, monkeypatch):
    """``auto_map`` names code for transformers to import (here: from a Hub repository); the
    folder is refused before transformers reads it, so no "run the custom code? [y/N]"
    prompt is ever shown, whose "y" would download and run it."""
    T = _transformers()

    def remote(config):
        config["model_type"] = "attacker_model"
        config["auto_map"] = {
            "AutoConfig": "attacker/repo--configuration_x.XConfig",
            "AutoModel": "attacker/repo--modeling_x.XModel",
        }

    folder = _edited(hf_saved, tmp_path / "remote", remote)
    asked = []
    monkeypatch.setattr(builtins, "input", lambda prompt="": asked.append(prompt) or "y")
    with pytest.raises(ai.AttnInjectError) as caught:
        ai.hf.from_pretrained(T.AutoModel, folder)
    assert not asked, "the user was asked whether to run the folder's code"
    assert "auto_map" in one_line(caught.value)


@pytest.fixture
def timm_lookups(monkeypatch):
    """Every look-up timm makes of a model name's source (the Hub, a local folder) or a
    checkpoint path, recorded and refused."""
    import timm.models._factory as factory

    seen: list[tuple[str, tuple]] = []

    def spy(name):
        def lookup(*args, **kwargs):
            seen.append((name, args))
            raise RuntimeError(f"{name} was called")

        return lookup

    for name in ("load_model_config_from_hf", "load_model_config_from_path", "load_checkpoint"):
        monkeypatch.setattr(factory, name, spy(name))
    return seen


HUB_BACKBONE = {"model_type": "timm_backbone", "backbone": "hf-hub:attacker/x"}
NAMED = [
    # (what the config names, the auto class that builds it, the config, the key refused)
    ("a Hub backbone", "AutoBackbone", HUB_BACKBONE, "backbone"),
    ("a local backbone", "AutoBackbone", {**HUB_BACKBONE, "backbone": "local-dir:/etc"}, "backbone"),
    (
        "a nested Hub backbone",
        "AutoModel",
        {"model_type": "detr", "backbone_config": HUB_BACKBONE},
        "backbone",
    ),
    (
        "a wrapped Hub model",
        "AutoModel",
        {"model_type": "timm_wrapper", "architecture": "hf-hub:a/x"},
        "architecture",
    ),
    (
        "a checkpoint path",
        "AutoModel",
        {
            "model_type": "timm_wrapper",
            "architecture": "resnet18",
            "model_args": {"checkpoint_path": "/etc/x"},
        },
        "checkpoint_path",
    ),
]


@pytest.mark.parametrize(("case", "auto", "config", "key"), NAMED, ids=[n[0] for n in NAMED])
def test_hf_config_naming_a_timm_source_or_path_is_refused_before_timm_looks_it_up(
    hf_saved, tmp_path, timm_lookups, case, auto, config, key
):
    T = _transformers()
    folder = _edited(hf_saved, tmp_path / "named", lambda old: {**config, "attn_inject": old["attn_inject"]})
    with pytest.raises(ai.AttnInjectError) as caught:
        ai.hf.from_pretrained(getattr(T, auto), folder)
    assert not timm_lookups, f"{case}: timm was asked to look up {timm_lookups}"
    text = one_line(caught.value)
    assert "config.json" in text and key in text


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("attn_implementation", "kernels-community/flash-attn"),
        ("dtype", "_dynamo"),
        ("torch_dtype", "load"),
        ("dtype", ["float32"]),
    ],
)
def test_hf_config_choosing_a_kernel_or_a_torch_attribute_is_refused_naming_the_key(
    hf_saved, tmp_path, key, value
):
    """An attention implementation may name a kernel that transformers fetches from the Hub;
    a dtype is read by transformers as any attribute of torch (``torch._dynamo`` imports a
    compiler). Only the float dtypes are read."""
    T = _transformers()
    folder = _edited(hf_saved, tmp_path / "chooses", lambda config: config.update({key: value}))
    with pytest.raises(ai.AttnInjectError) as caught:
        ai.hf.from_pretrained(T.ResNetModel, folder)
    assert key in one_line(caught.value)


@pytest.fixture
def allocated():
    """The parameters registered off the meta device while the test runs, as [count, values];
    past a million values (which the tiny saved model is far below) the build is stopped."""
    seen = [0, 0]

    def count(module, name, param):
        if param is not None and not param.is_meta:
            seen[0] += 1
            seen[1] += param.numel()
            if seen[1] > 1_000_000:
                raise RuntimeError("allocated past a million values")

    handle = register_module_parameter_registration_hook(count)
    try:
        yield seen
    finally:
        handle.remove()


@pytest.mark.parametrize(
    ("field", "value"),
    [("hidden_sizes", [8, 16, 16, 4096]), ("depths", [1, 1, 1, 3000])],
)
def test_hf_config_larger_than_its_weights_is_refused_before_anything_is_allocated(
    hf_saved, tmp_path, allocated, field, value
):
    """A few edited bytes of config.json ask for a stage of 4096 channels or of 3000 blocks
    (hundreds of MB and tens of seconds to build); the file's tensors do not justify it,
    which is found while it is built on the meta device, bounded by the file's size."""
    T = _transformers()
    folder = _edited(hf_saved, tmp_path / "large", lambda config: config.update({field: value}))
    with pytest.raises(ai.AttnInjectError) as caught:
        ai.hf.from_pretrained(T.ResNetModel, folder)
    assert "allocated" not in one_line(caught.value)
    assert allocated == [0, 0], f"{allocated[0]} parameters ({allocated[1]:,} values) allocated"


@pytest.mark.parametrize(
    ("key", "config"),
    [
        ("num_labels", {"model_type": "resnet", "num_labels": 10**6}),
        ("num_hidden_layers", {"model_type": "qwen2", "num_hidden_layers": 10**6}),
    ],
)
def test_hf_config_count_beyond_its_weights_is_refused_before_transformers_expands_it(
    hf_saved, tmp_path, allocated, key, config
):
    """transformers turns ``num_labels`` into an ``id2label`` dict and a layer count into a
    list of layer types as it reads a config (seconds and hundreds of MB per million, from
    a few bytes); a count no tensor of the weights file needs is refused before that."""
    T = _transformers()
    folder = _edited(hf_saved, tmp_path / "counts", lambda old: {**config, "attn_inject": old["attn_inject"]})
    with pytest.raises(ai.AttnInjectError) as caught:
        ai.hf.from_pretrained(T.AutoModel, folder)
    assert key in one_line(caught.value)
    assert allocated == [0, 0], f"{allocated[0]} parameters ({allocated[1]:,} values) allocated"


def test_hf_from_pretrained_still_loads_its_own_folder_with_every_weight(hf_saved):
    from safetensors.torch import load_file

    T = _transformers()
    before = random_states()
    loaded = ai.hf.from_pretrained(T.AutoModel, hf_saved)
    assert same_random_states(before, random_states())
    assert type(loaded).__name__ == "ResNetModel" and ai.inserted_blocks(loaded)
    saved = load_file(hf_saved / "attn_inject.safetensors")
    state = loaded.state_dict()
    assert state.keys() == saved.keys()
    assert all(torch.equal(state[k], v) for k, v in saved.items())


def test_hf_save_pretrained_of_a_config_json_cannot_hold_writes_nothing(tmp_path):
    """A value on model.config that JSON cannot write is refused before the weights are
    written: no folder holding weights without the config that loads them."""
    T = _transformers()
    config = T.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16, 16, 16], depths=[1, 1, 1, 1])
    patched = ai.inject(T.ResNetModel(config).eval(), "se_after_every_stage", input_size=SIZE)
    patched.config.classes_seen = {1, 2}
    folder = tmp_path / "out"
    with pytest.raises(ai.AttnInjectError) as caught:
        ai.hf.save_pretrained(patched, folder)
    assert "JSON" in one_line(caught.value)
    assert not folder.exists() or not list(folder.iterdir()), list(folder.iterdir())
    patched.config.classes_seen = [1, 2]
    ai.hf.save_pretrained(patched, folder)  # the same folder takes the save once it can be written


@pytest.mark.parametrize("value", [None, 5])
def test_hf_bridge_refuses_a_path_that_is_not_a_path_in_one_line(hf_saved, value):
    T = _transformers()
    with pytest.raises(ai.AttnInjectError) as caught:
        ai.hf.from_pretrained(T.AutoModel, value)
    assert "a path" in one_line(caught.value)
    patched = ai.hf.from_pretrained(T.ResNetModel, hf_saved)
    with pytest.raises(ai.AttnInjectError) as caught:
        ai.hf.save_pretrained(patched, value)
    assert "a path" in one_line(caught.value)


def test_hf_weights_that_are_a_fifo_are_refused_without_waiting_for_a_writer(hf_saved, tmp_path):
    T = _transformers()
    folder = Path(shutil.copytree(hf_saved, tmp_path / "fifo"))
    (folder / "attn_inject.safetensors").unlink()
    os.mkfifo(folder / "attn_inject.safetensors")
    error = _call_without_waiting(
        lambda: ai.hf.from_pretrained(T.ResNetModel, folder), folder / "attn_inject.safetensors"
    )
    assert error is not None
    assert "FIFO" in one_line(error)


def test_bridges_leave_the_model_they_are_given_as_it_was(timm_saved, tmp_path):
    """``save_pretrained`` (timm's hub layout and transformers') reads the patched model and
    changes none of its tensors, attributes or config."""
    T = _transformers()
    patched = ai.load(timm_saved["file"])
    config = T.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16, 16, 16], depths=[1, 1, 1, 1])
    hf_patched = ai.inject(T.ResNetModel(config).eval(), "se_after_every_stage", input_size=SIZE)
    for model, save in (
        (patched, lambda: hub.save_pretrained(patched, tmp_path / "hub")),
        (hf_patched, lambda: ai.hf.save_pretrained(hf_patched, tmp_path / "hf")),
    ):
        before = _snapshot(model)
        states = random_states()
        save()
        assert same_random_states(states, random_states())
        after = _snapshot(model)
        assert after.keys() == before.keys()
        for key, value in before.items():
            same = torch.equal(value, after[key]) if isinstance(value, torch.Tensor) else value == after[key]
            assert same, key


def _snapshot(model: nn.Module) -> dict:
    out: dict = {}
    for name, module in model.named_modules():
        for key, value in vars(module).items():
            if key in ("_parameters", "_buffers"):
                out.update({(name, key, k): t.detach().clone() for k, t in value.items() if t is not None})
            elif key == "config":
                out[(name, key)] = json.dumps(value.to_dict(), sort_keys=True, default=str)
            else:
                out[(name, key)] = repr(list(value)) if isinstance(value, dict) else repr(value)
    return out
