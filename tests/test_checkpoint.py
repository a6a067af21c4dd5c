"""Checkpoint reading (weights only, unwrapping, prefix stripping), fit checks and atomic writes."""

from __future__ import annotations

import os
import pathlib
import pickle

import pytest
import safetensors
import safetensors.torch
import torch
from torch import nn

from attn_inject.saving.checkpoint import (
    SAFETENSORS_SUFFIX,
    TORCH_SUFFIXES,
    CheckpointError,
    check_fits,
    read_safetensors_metadata,
    read_state_dict,
    unwrap_state_dict,
    write_safetensors,
)


def tiny_model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    with torch.no_grad():  # non-default running stats, so a lost buffer would show
        model[1].running_mean.uniform_()
        model[1].running_var.uniform_(0.5, 2.0)
        model[1].num_batches_tracked.fill_(7)
    return model


def assert_same_tensors(got: dict, want: dict) -> None:
    assert list(got) == list(want)
    for k in want:
        assert got[k].dtype == want[k].dtype, k
        assert got[k].device.type == "cpu", k
        assert torch.equal(got[k], want[k]), k


def save(obj, path: pathlib.Path) -> pathlib.Path:
    torch.save(obj, path)
    return path


# --- round trips -------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [*TORCH_SUFFIXES, SAFETENSORS_SUFFIX])
def test_plain_state_dict_round_trips_exactly(tmp_path, suffix):
    sd = tiny_model().state_dict()
    path = tmp_path / f"model{suffix}"
    if suffix == SAFETENSORS_SUFFIX:
        safetensors.torch.save_file(dict(sd), path)
    else:
        torch.save(sd, path)
    got = read_state_dict(path)
    assert type(got) is dict
    if suffix == SAFETENSORS_SUFFIX:  # the safetensors header does not keep insertion order
        got = {k: got[k] for k in sd}
    assert_same_tensors(got, dict(sd))


def test_written_safetensors_read_back_exactly_and_load_into_the_model(tmp_path):
    model = tiny_model()
    path = tmp_path / "model.safetensors"
    write_safetensors(path, model.state_dict(), {"recipe": "se"})
    got = read_state_dict(path)
    assert_same_tensors({k: got[k] for k in model.state_dict()}, dict(model.state_dict()))
    fresh = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    check_fits(fresh, got)
    fresh.load_state_dict(got)


# --- unwrapping and prefix stripping -------------------------------------------------------


def test_training_checkpoint_is_unwrapped_and_ddp_prefix_stripped(tmp_path):
    sd = tiny_model().state_dict()
    ckpt = {
        "epoch": 3,
        "arch": "tiny",
        "optimizer": {"state": {0: {"momentum_buffer": torch.ones(2)}}, "param_groups": [{"lr": 0.1}]},
        "state_dict": {"module." + k: v for k, v in sd.items()},
    }
    got = read_state_dict(save(ckpt, tmp_path / "train.pth"))
    assert_same_tensors(got, dict(sd))


@pytest.mark.parametrize(
    "prefix",
    ["_orig_mod.", "module._orig_mod.", "_orig_mod.module.", "module.module.", "_orig_mod.module._orig_mod."],
)
def test_compile_and_ddp_prefixes_are_stripped_in_any_combination(prefix):
    t = torch.zeros(1)
    got = unwrap_state_dict({prefix + "layer1.0.conv1.weight": t, prefix + "fc.bias": t})
    assert list(got) == ["layer1.0.conv1.weight", "fc.bias"]


def test_ema_weights_are_found_when_the_checkpoint_only_has_ema():
    w = torch.arange(3.0)
    got = unwrap_state_dict({"epoch": 1, "state_dict_ema": {"module.fc.weight": w}})
    assert list(got) == ["fc.weight"] and got["fc.weight"] is w


def test_raw_weights_win_over_ema_when_both_are_present():
    raw, ema = torch.zeros(1), torch.ones(1)
    got = unwrap_state_dict({"state_dict_ema": {"w": ema}, "state_dict": {"w": raw}})
    assert got["w"] is raw


def test_nested_wrappers_are_searched_up_to_three_levels():
    w = torch.zeros(1)
    assert unwrap_state_dict({"model": {"module": {"state_dict": {"w": w}}}})["w"] is w
    with pytest.raises(CheckpointError, match="holds no state dict"):
        unwrap_state_dict({"model": {"model": {"model": {"model": {"w": w}}}}})


def test_non_tensor_entries_next_to_weights_are_ignored():
    w = torch.zeros(1)
    got = unwrap_state_dict({"model": {"w": w}, "epoch": 9, "args": {"lr": 0.1}, "arch": "resnet"})
    assert got == {"w": w}


class HasModuleNamedModule(nn.Module):
    def __init__(self):
        super().__init__()
        self.module = nn.Linear(2, 2)
        self.head = nn.Linear(2, 1)


def test_real_submodule_named_module_is_kept_when_not_every_key_has_the_prefix():
    model = HasModuleNamedModule()
    got = unwrap_state_dict(model.state_dict())
    assert list(got) == ["module.weight", "module.bias", "head.weight", "head.bias"]
    check_fits(HasModuleNamedModule(), got)


def test_ddp_wrapped_model_with_a_submodule_named_module_loses_only_the_wrapper():
    sd = HasModuleNamedModule().state_dict()
    got = unwrap_state_dict({"module." + k: v for k, v in sd.items()})
    assert list(got) == list(sd)


def test_mapping_without_tensors_names_the_keys_seen_and_looked_for(tmp_path):
    path = save({"epoch": 3, "optimizer": {}, "arch": "resnet50"}, tmp_path / "x.pth")
    with pytest.raises(CheckpointError) as err:
        read_state_dict(path)
    msg = str(err.value)
    assert str(path) in msg and "\n" not in msg
    assert "epoch, optimizer, arch" in msg and "state_dict, model, state_dict_ema" in msg


def test_top_level_keys_listed_are_capped_at_eight():
    with pytest.raises(CheckpointError) as err:
        unwrap_state_dict({f"k{i}": i for i in range(12)})
    assert "k7, ..." in str(err.value) and "k8" not in str(err.value)


@pytest.mark.parametrize("obj", [[torch.zeros(1)], torch.zeros(1), {}, {"state_dict": {}}])
def test_checkpoint_that_is_not_a_tensor_mapping_is_refused(obj):
    with pytest.raises(CheckpointError, match=r"^checkpoint holds"):
        unwrap_state_dict(obj)


# --- read errors ---------------------------------------------------------------------------


def test_missing_file_is_reported_with_its_path(tmp_path):
    path = tmp_path / "nope.pth"
    with pytest.raises(CheckpointError, match="no such file") as err:
        read_state_dict(path)
    assert str(path) in str(err.value)


def test_directory_is_refused(tmp_path):
    path = tmp_path / "dir.pth"
    path.mkdir()
    with pytest.raises(CheckpointError, match="directory") as err:
        read_state_dict(path)
    assert str(path) in str(err.value)


def test_unknown_suffix_lists_the_allowed_ones(tmp_path):
    path = save(tiny_model().state_dict(), tmp_path / "model.ckpt")
    with pytest.raises(CheckpointError) as err:
        read_state_dict(path)
    msg = str(err.value)
    assert str(path) in msg and "'.ckpt'" in msg
    assert all(s in msg for s in (".safetensors", ".pth", ".pt", ".bin"))


def _truncated_pth(path: pathlib.Path) -> bytes:
    torch.save(tiny_model().state_dict(), path)
    return path.read_bytes()[:-200]


@pytest.mark.parametrize(
    "name, make, expected",
    [
        ("garbage.pth", lambda p: b"hello, this is not a checkpoint", "not a readable PyTorch checkpoint"),
        ("empty.pt", lambda p: b"", "not a readable PyTorch checkpoint"),
        ("truncated.pth", _truncated_pth, "not a readable PyTorch checkpoint"),
        ("garbage.safetensors", lambda p: b"hello, this is not a checkpoint", "not a valid safetensors file"),
        ("empty.safetensors", lambda p: b"", "not a valid safetensors file"),
    ],
)
def test_unreadable_file_is_reported_on_one_line_with_its_path(tmp_path, name, make, expected):
    path = tmp_path / name
    path.write_bytes(make(path))
    with pytest.raises(CheckpointError, match=expected) as err:
        read_state_dict(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


# --- malicious pickles ---------------------------------------------------------------------


class TouchOnUnpickle:
    """Unpickling this creates ``marker``: a stand-in for arbitrary code execution."""

    def __init__(self, marker: pathlib.Path):
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


def _torch_zip(path, payload):
    torch.save({"fc.weight": torch.zeros(2), "payload": payload}, path)


def _raw_pickle(protocol):
    def write(path, payload):
        with open(path, "wb") as f:
            pickle.dump({"fc.weight": torch.zeros(2), "payload": payload}, f, protocol=protocol)

    return write


MALICIOUS = {
    "torch_save": _torch_zip,
    "pickle_protocol_2": _raw_pickle(2),
    "pickle_default_protocol": _raw_pickle(pickle.DEFAULT_PROTOCOL),
}


@pytest.mark.parametrize("how", list(MALICIOUS))
def test_malicious_pickle_is_refused_and_its_payload_never_runs(tmp_path, how):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    MALICIOUS[how](path, TouchOnUnpickle(marker))
    with pytest.raises(CheckpointError) as err:
        read_state_dict(path)
    msg = str(err.value)
    assert msg.startswith(f"refused checkpoint {path}") and "\n" not in msg
    assert "objects other than tensors" in msg and "never unpickled" in msg
    assert not marker.exists()


def test_refusal_names_the_global_that_is_not_allowed(tmp_path):
    import fractions

    path = save({"state_dict": {"w": torch.zeros(1)}, "args": fractions.Fraction(1, 3)}, tmp_path / "a.pth")
    with pytest.raises(CheckpointError, match=r"fractions\.Fraction"):
        read_state_dict(path)


@pytest.mark.parametrize("how", list(MALICIOUS))
def test_malicious_fixture_runs_its_payload_when_loaded_unsafely(tmp_path, how):
    """Control: the refused files really are dangerous, so the test above is not vacuous."""
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    MALICIOUS[how](path, TouchOnUnpickle(marker))
    if how == "torch_save":
        torch.load(path, map_location="cpu", weights_only=False)
    else:
        with open(path, "rb") as f:
            pickle.load(f)
    assert marker.exists()


# --- check_fits ----------------------------------------------------------------------------


def test_a_state_dict_torch_loads_strictly_passes_and_one_without_a_key_is_refused_as_torch_does():
    model, state = tiny_model(), dict(tiny_model().state_dict())
    with torch.device("meta"):  # only shapes are compared: a meta model is enough
        meta = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    assert check_fits(model, state) is None and check_fits(meta, state) is None
    loaded = model.load_state_dict(state, strict=True)  # the reference: torch's own strict check
    assert loaded.missing_keys == [] and loaded.unexpected_keys == []
    del state["0.bias"]
    with pytest.raises(RuntimeError, match=r"Missing key.*0\.bias"):
        model.load_state_dict(state, strict=True)
    with pytest.raises(CheckpointError, match=r"1 missing key \(0\.bias\)"):
        check_fits(meta, state)


def test_missing_unexpected_and_mismatched_keys_are_all_reported_on_one_line():
    model = nn.Sequential(nn.Conv2d(3, 32, 7), nn.BatchNorm2d(32), nn.Linear(4, 4))
    sd = dict(model.state_dict())
    sd["0.weight"] = torch.zeros(64, 3, 7, 7)
    del sd["2.weight"], sd["2.bias"]
    sd["head.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointError) as err:
        check_fits(model, sd, source="checkpoint model.pth")
    assert str(err.value) == (
        "checkpoint model.pth does not fit Sequential: 2 missing keys (2.weight, 2.bias), "
        "1 unexpected key (head.weight), 1 shape mismatch (0.weight: checkpoint (64, 3, 7, 7), "
        "model (32, 3, 7, 7)); is it the right architecture and --model-kwargs?"
    )


def test_fit_report_shows_at_most_three_names_per_kind():
    model = nn.Sequential(*[nn.Linear(2, 2) for _ in range(3)])  # 6 keys
    sd = {f"extra{i}": torch.zeros(1) for i in range(5)}
    sd.update({k: torch.zeros(3, 3) for k in ["0.weight", "1.weight", "2.weight", "0.bias", "1.bias"]})
    with pytest.raises(CheckpointError) as err:
        check_fits(model, sd)
    msg = str(err.value)
    assert "1 missing key (2.bias)" in msg
    assert "5 unexpected keys (extra0, extra1, extra2, ...)" in msg
    assert "5 shape mismatches (0.weight: checkpoint (3, 3), model (2, 2), 1.weight" in msg
    assert "2.weight: checkpoint (3, 3), model (2, 2), ...)" in msg
    assert "extra3" not in msg and "0.bias" not in msg


def test_fit_check_works_on_a_meta_device_model():
    with torch.device("meta"):
        model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    check_fits(model, tiny_model().state_dict())
    sd = dict(tiny_model().state_dict())
    sd["0.weight"] = torch.zeros(8, 3, 3, 3)
    with pytest.raises(CheckpointError) as err:
        check_fits(model, sd)
    assert "1 shape mismatch (0.weight: checkpoint (8, 3, 3, 3), model (4, 3, 3, 3))" in str(err.value)


# --- write_safetensors ---------------------------------------------------------------------


def test_existing_file_is_refused_without_force_and_left_unchanged(tmp_path):
    path = tmp_path / "out.safetensors"
    path.write_bytes(b"precious")
    with pytest.raises(
        CheckpointError, match=r"exists; pass force=True \(attn-inject: --force\) to overwrite"
    ) as err:
        write_safetensors(path, {"w": torch.ones(2)}, {})
    assert str(path) in str(err.value)
    assert path.read_bytes() == b"precious"
    assert sorted(os.listdir(tmp_path)) == ["out.safetensors"]


def test_existing_file_is_overwritten_with_force(tmp_path):
    path = tmp_path / "out.safetensors"
    path.write_bytes(b"old")
    write_safetensors(path, {"w": torch.ones(2)}, {"v": "2"}, force=True)
    assert torch.equal(safetensors.torch.load_file(path)["w"], torch.ones(2))
    assert sorted(os.listdir(tmp_path)) == ["out.safetensors"]


@pytest.mark.parametrize("name", ["out.pth", "out.safetensors.tmp", "out"])
def test_path_without_safetensors_suffix_is_refused(tmp_path, name):
    with pytest.raises(CheckpointError, match=r"must end with \.safetensors"):
        write_safetensors(tmp_path / name, {"w": torch.ones(1)}, {})
    assert os.listdir(tmp_path) == []


def test_missing_parent_folder_is_refused(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        write_safetensors(tmp_path / "no" / "out.safetensors", {"w": torch.ones(1)}, {})


@pytest.mark.parametrize("metadata", [{"epoch": 3}, {"ok": "yes", "recipe": None}, {1: "one"}])
def test_non_str_metadata_is_refused_before_anything_is_written(tmp_path, metadata):
    with pytest.raises(CheckpointError, match="must be str"):
        write_safetensors(tmp_path / "out.safetensors", {"w": torch.ones(1)}, metadata)
    assert os.listdir(tmp_path) == []


def test_meta_tensor_is_refused(tmp_path):
    with pytest.raises(CheckpointError, match="'w' is on the meta device"):
        write_safetensors(tmp_path / "out.safetensors", {"w": torch.empty(2, device="meta")}, {})
    assert os.listdir(tmp_path) == []


def test_tied_and_non_contiguous_tensors_are_written(tmp_path):
    emb = nn.Embedding(5, 3)
    head = nn.Linear(3, 5, bias=False)
    head.weight = emb.weight  # tied weights: one storage under two names
    base = torch.arange(12.0).reshape(3, 4)
    tensors = {"emb.weight": emb.weight, "head.weight": head.weight, "t": base.t(), "row": base[1]}
    path = tmp_path / "tied.safetensors"
    write_safetensors(path, tensors, {})
    got = safetensors.torch.load_file(path)
    assert torch.equal(got["emb.weight"], emb.weight.detach())
    assert torch.equal(got["head.weight"], emb.weight.detach())
    assert torch.equal(got["t"], torch.tensor([[0.0, 4, 8], [1, 5, 9], [2, 6, 10], [3, 7, 11]]))
    assert torch.equal(got["row"], torch.tensor([4.0, 5, 6, 7]))


def test_new_file_gets_the_same_permissions_as_any_new_file(tmp_path):
    path = tmp_path / "out.safetensors"
    write_safetensors(path, {"w": torch.ones(1)}, {})
    reference = tmp_path / "reference"
    reference.write_bytes(b"")
    assert path.stat().st_mode & 0o777 == reference.stat().st_mode & 0o777


def _failing_save_file(exc: BaseException):
    def save_file(tensors, filename, metadata=None):
        with open(filename, "wb") as f:  # a partial write, as if interrupted mid-way
            f.write(b"\x00" * 64)
        raise exc

    return save_file


@pytest.mark.parametrize(
    "exc, raised",
    [
        (OSError(28, "No space left on device"), CheckpointError),
        (RuntimeError("boom"), CheckpointError),
        (KeyboardInterrupt(), KeyboardInterrupt),
    ],
)
def test_failure_mid_write_leaves_no_file_behind(tmp_path, monkeypatch, exc, raised):
    monkeypatch.setattr(safetensors.torch, "save_file", _failing_save_file(exc))
    path = tmp_path / "out.safetensors"
    with pytest.raises(raised) as err:
        write_safetensors(path, {"w": torch.ones(1)}, {})
    if raised is CheckpointError:
        assert str(path) in str(err.value)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("exc", [OSError(28, "No space left on device"), KeyboardInterrupt()])
def test_failure_mid_overwrite_leaves_the_existing_file_untouched(tmp_path, monkeypatch, exc):
    path = tmp_path / "out.safetensors"
    write_safetensors(path, {"w": torch.ones(3)}, {"v": "1"})
    before = path.read_bytes()
    monkeypatch.setattr(safetensors.torch, "save_file", _failing_save_file(exc))
    with pytest.raises((CheckpointError, KeyboardInterrupt)):
        write_safetensors(path, {"w": torch.zeros(3)}, {"v": "2"}, force=True)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["out.safetensors"]


# --- read_safetensors_metadata -------------------------------------------------------------


def test_metadata_reads_back_what_was_written(tmp_path):
    path = tmp_path / "out.safetensors"
    metadata = {"recipe": "name: se\nrules: []\n", "model": "timm:resnet50", "format": "pt"}
    write_safetensors(path, {"w": torch.ones(1)}, metadata)
    assert read_safetensors_metadata(path) == metadata


def test_metadata_of_a_file_without_any_is_empty(tmp_path):
    path = tmp_path / "bare.safetensors"
    safetensors.torch.save_file({"w": torch.ones(1)}, path)
    assert read_safetensors_metadata(path) == {}


@pytest.mark.parametrize(
    "content, expected", [(None, "no such file"), (b"garbage", "not a valid safetensors file")]
)
def test_metadata_of_missing_or_garbage_file_is_an_error_naming_it(tmp_path, content, expected):
    path = tmp_path / "x.safetensors"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(CheckpointError, match=expected) as err:
        read_safetensors_metadata(path)
    assert str(path) in str(err.value)
