"""A saved file is untrusted data: whatever its manifest says, loading it never reads a local
file, downloads, unpickles or allocates what the file's own tensors do not justify, and a
refusal is one line, small, and reads no more than the file's header.

Each hostile file is the tensors of a real saved model with one manifest field changed. They
are loaded in a fresh process so that its peak memory (``ru_maxrss``) and the bytes it reads
(``/proc/self/io``) measure the load alone: figures that do not depend on how loaded the
machine is, as a time would.
"""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys
import textwrap

import pytest
import safetensors.torch
import torch

import attn_inject as ai
from attn_inject.cli.main import main
from attn_inject.models.build import build_model
from attn_inject.saving.file import MANIFEST_KEY

SIZE = (3, 64, 64)
BYTES_READ = 1 << 20  # a refusal reads the file's header (a few kB), never its tensors
MEGABYTES = 500

# 9 levels of 9 aliases: 727 bytes that expand to 9**9 (387 million) strings.
ALIAS_BOMB = "\n".join(
    [
        'a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]',
        *(f"{n}: &{n} [{','.join([f'*{p}'] * 9)}]" for p, n in zip("abcdefgh", "bcdefghi", strict=True)),
        "rules: *i",
    ]
)


class Payload:
    """Unpickling this runs ``Path.touch(marker)``."""

    def __init__(self, marker: pathlib.Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return pathlib.Path.touch, (self.marker,)


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> pathlib.Path:
    """A real file: timm resnet10t with 10 classes (head 10 x 512) and SE after every stage."""
    folder = tmp_path_factory.mktemp("saved")
    torch.manual_seed(0)
    model = build_model("timm:resnet10t", num_classes=10).eval()
    ai.save(ai.inject(model, "se_after_every_stage", input_size=SIZE), folder / "good.safetensors")
    return folder / "good.safetensors"


def with_manifest(saved: pathlib.Path, out: pathlib.Path, **changes) -> pathlib.Path:
    """A copy of ``saved`` whose manifest has ``changes`` (``None`` values remove the field)."""
    manifest = json.loads(ai.saving.checkpoint.read_safetensors_metadata(saved)[MANIFEST_KEY])
    manifest.update(changes)
    manifest = {k: v for k, v in manifest.items() if v is not None}
    tensors = safetensors.torch.load_file(saved)
    safetensors.torch.save_file(tensors, out, metadata={MANIFEST_KEY: json.dumps(manifest)})
    return out


def hostile_cases(saved: pathlib.Path, folder: pathlib.Path) -> dict[str, tuple[dict, str]]:
    """name -> (manifest changes, what the refusal must say)."""
    secret = folder / "secret.yaml"
    secret.write_text("secret_key_XYZ: 1\nrules: []\n")
    pickled = folder / "payload.pth"
    torch.save({"state_dict": {}, "x": Payload(folder / "payload_ran")}, pickled)
    return {
        "local-path recipe": ({"recipe": str(secret)}, "manifest recipe: a recipe must be a mapping"),
        "built-in-name recipe": ({"recipe": "se_resnet"}, "manifest recipe: a recipe must be a mapping"),
        "file-loading kwargs": (
            {"base_kwargs": {"num_classes": 10, "checkpoint_path": str(pickled)}},
            "'checkpoint_path' is not allowed",
        ),
        "downloading kwargs (timm)": (
            {"base_kwargs": {"num_classes": 10, "pretrained": True}},
            "'pretrained' is not allowed",
        ),
        "downloading kwargs (torchvision)": (
            {"base_model": "tv:resnet18", "base_kwargs": {"weights_backbone": "DEFAULT"}},
            "'weights_backbone' is not allowed",
        ),
        "config overlay kwargs": (
            {"base_kwargs": {"pretrained_cfg_overlay": {"file": str(pickled)}}},
            "'pretrained_cfg_overlay' is not allowed",
        ),
        "huge kwargs": (
            {"base_kwargs": {"num_classes": 2_000_000}},
            "fc.weight: file (10, 512), model (2000000, 512)",
        ),
        "huge model name": (
            {"base_model": "timm:vit_giant_patch14_224"},
            "does not fit the file's tensors",
        ),
        "alias bomb recipe": ({"recipe": ALIAS_BOMB}, "expands to more than 10000 values"),
        "huge input size": ({"input_size": [3, 100_000, 100_000]}, "manifest field 'input_size'"),
        "huge in_chans": (
            {"base_kwargs": {"num_classes": 10, "in_chans": 20_000}},
            "does not fit the file's tensors",
        ),
    }


LOADER = textwrap.dedent(
    """
    import json, resource, sys
    import attn_inject as ai
    from attn_inject.finetune.starting_point import load_for_finetuning
    from attn_inject.models.build import resolve

    def bytes_read():  # every byte read by a system call, files and pipes alike
        with open("/proc/self/io") as f:
            return int(next(line for line in f if line.startswith("rchar:")).split()[1])

    doors = {"load": ai.load, "finetune": lambda path: load_for_finetuning(path, num_classes=3)}
    resolve("timm:resnet10t")  # the model lists, read once by any load
    for open_file in doors.values():  # the modules a load imports, imported once
        open_file(sys.argv[2])
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    results = {}
    for name, path in json.loads(sys.argv[1]).items():
        for door, open_file in doors.items():
            before = bytes_read()
            try:
                open_file(path)
                outcome = {"loaded": True}
            except Exception as error:
                outcome = {"loaded": False, "type": type(error).__name__, "message": str(error)}
            outcome["bytes_read"] = bytes_read() - before
            outcome["megabytes"] = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024
            results[f"{door}: {name}"] = outcome
    print(json.dumps(results))
    """
)


@pytest.fixture(scope="module")
def refusals(saved, tmp_path_factory):
    folder = tmp_path_factory.mktemp("hostile")
    cases = hostile_cases(saved, folder)
    paths = {
        name: str(with_manifest(saved, folder / f"{i}.safetensors", **changes))
        for i, (name, (changes, _)) in enumerate(cases.items())
    }
    done = subprocess.run(
        [sys.executable, "-c", LOADER, json.dumps(paths), str(saved)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=pathlib.Path(__file__).resolve().parent.parent,
    )
    assert done.returncode == 0, done.stderr
    return folder, cases, json.loads(done.stdout)


@pytest.mark.parametrize(
    "case",
    [
        "local-path recipe",
        "built-in-name recipe",
        "file-loading kwargs",
        "downloading kwargs (timm)",
        "downloading kwargs (torchvision)",
        "config overlay kwargs",
        "huge kwargs",
        "huge model name",
        "alias bomb recipe",
        "huge input size",
        "huge in_chans",
    ],
)
@pytest.mark.parametrize("door", ["load", "finetune"])  # finetune --num-classes rebuilds: the same checks
def test_hostile_manifest_is_refused_in_one_line_small_and_reading_only_the_header(refusals, case, door):
    folder, cases, results = refusals
    outcome, says = results[f"{door}: {case}"], cases[case][1]
    assert not outcome["loaded"] and outcome["type"] == "CheckpointError", outcome
    message = outcome["message"]
    assert "\n" not in message and len(message) < 1000 and says in message, message
    assert outcome["bytes_read"] < BYTES_READ, outcome  # the header, not the tensors (20 MB)
    assert outcome["megabytes"] < MEGABYTES, outcome
    assert "secret_key_XYZ" not in message  # a local file's content never shows
    assert not (folder / "payload_ran").exists()  # nothing was unpickled


def test_the_command_line_refuses_a_hostile_file_in_one_line(saved, tmp_path, capsys):
    hostile = with_manifest(saved, tmp_path / "h.safetensors", base_kwargs={"pretrained": True})
    assert main(["validate", str(hostile), "--device", "cpu"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "'pretrained' is not allowed" in err[0], err


def test_an_architecture_argument_edited_in_the_manifest_is_caught_before_loading(saved, tmp_path):
    # Same tensor names and shapes, another network: only the recorded architecture tells.
    edited = with_manifest(
        saved, tmp_path / "e.safetensors", base_kwargs={"num_classes": 10, "global_pool": "max"}
    )
    with pytest.raises(ai.CheckpointError, match=r"is not the network saved in the file \(global_pool\.pool"):
        ai.load(edited)


BAD_FIELDS = {
    "format 1.9": ({"format": 1.9}, "in file format 1.9; this attn-inject reads format 1"),
    "format true": ({"format": True}, "in file format True; this attn-inject reads format 1"),
    "format missing": ({"format": None}, "in file format None; this attn-inject reads format 1"),
    "base_model 5": ({"base_model": 5}, "manifest field 'base_model': must be a model name"),
    "base_model unknown": ({"base_model": "timm:resnet_nope"}, "unknown model 'resnet_nope'"),
    "plan.points not a list": (
        {"plan": {"points": 3}},
        "manifest field 'plan': must be an object whose 'points'",
    ),
    "plan not an object": ({"plan": [1, 2]}, "manifest field 'plan'"),
    "norm_layer not a string": ({"base_kwargs": {"norm_layer": 3}}, "norm_layer=3 is not allowed"),
    "base_kwargs not an object": ({"base_kwargs": [1]}, "must be a mapping of argument names"),
    "init unknown": ({"init": "zeros"}, "manifest field 'init': must be one of identity, paper"),
    "target not a name": ({"target": "a/b"}, "manifest field 'target': must be a dotted module name"),
    "recipe missing": ({"recipe": None}, "manifest field 'recipe': missing"),
    "versions not strings": ({"versions": {"torch": 2}}, "manifest field 'versions'"),
    "architecture garbled": ({"architecture": [[1, 2]]}, "manifest field 'architecture'"),
    "huge value in a message": ({"base_model": "x" * 100_000}, "manifest field 'base_model'"),
}


@pytest.mark.parametrize("case", list(BAD_FIELDS))
def test_a_garbled_manifest_field_gets_one_line_naming_it(saved, tmp_path, case):
    changes, says = BAD_FIELDS[case]
    path = with_manifest(saved, tmp_path / "bad.safetensors", **changes)
    with pytest.raises(ai.CheckpointError) as info:
        ai.load(path)
    message = str(info.value)
    assert "\n" not in message and len(message) < 600 and says in message, message
    assert info.value.__cause__ is None


def test_a_huge_tensor_name_in_the_file_is_cut_in_the_message(saved, tmp_path):
    tensors = safetensors.torch.load_file(saved)
    tensors["x" * 100_000] = torch.zeros(1)
    metadata = ai.saving.checkpoint.read_safetensors_metadata(saved)
    safetensors.torch.save_file(tensors, tmp_path / "x.safetensors", metadata=metadata)
    with pytest.raises(ai.CheckpointError, match="1 unexpected key") as info:
        ai.load(tmp_path / "x.safetensors")
    assert "\n" not in str(info.value) and len(str(info.value)) < 1000


def test_manifest_that_is_not_json_or_not_an_object_is_refused(saved, tmp_path):
    tensors = safetensors.torch.load_file(saved)
    for text, says in (("{", "is not valid JSON"), ("[1]", "must be a JSON object"), ("[" * 100_000, "JSON")):
        path = tmp_path / "x.safetensors"
        safetensors.torch.save_file(tensors, path, metadata={MANIFEST_KEY: text})
        with pytest.raises(ai.CheckpointError, match=says):
            ai.load(path)


def test_a_block_placed_elsewhere_than_in_the_file_is_named(saved, tmp_path):
    manifest = json.loads(ai.saving.checkpoint.read_safetensors_metadata(saved)[MANIFEST_KEY])
    plan = manifest["plan"]
    plan["points"][0]["key"] = "layer1.moved_se"
    edited = with_manifest(saved, tmp_path / "moved.safetensors", plan=plan)
    with pytest.raises(
        ai.CheckpointError, match=r"places block 0 at layer1\.\S+, the file has it at layer1\.moved_se"
    ):
        ai.load(edited)


@pytest.mark.parametrize(
    "field, value",
    [("position", "post_block"), ("consumers", ["add_3"]), ("attach", "graph"), ("node", "bn1")],
)
def test_a_plan_that_disagrees_with_its_recipe_is_refused(saved, tmp_path, field, value):
    manifest = json.loads(ai.saving.checkpoint.read_safetensors_metadata(saved)[MANIFEST_KEY])
    plan = manifest["plan"]
    plan["points"][1][field] = value  # same keys, so the weights would load into another network
    edited = with_manifest(saved, tmp_path / "edited.safetensors", plan=plan)
    with pytest.raises(
        ai.CheckpointError, match=rf"plan point 1 \(\S+\) has {field}=.*saved for another network"
    ):
        ai.load(edited)
    from attn_inject.saving.file import load_base_weights  # validate's reference: the same door

    with pytest.raises(ai.CheckpointError, match=rf"plan point 1 .* has {field}="):
        load_base_weights(edited)


def test_attributes_that_change_what_the_model_computes_are_compared(tmp_path):
    torch.manual_seed(0)
    dropped = ai.inject(build_model("timm:resnet10t", drop_rate=0.5), "se_resnet", input_size=SIZE)
    ai.save(dropped, tmp_path / "kept.safetensors")  # recorded by build_model: it rebuilds
    assert ai.load(tmp_path / "kept.safetensors").drop_rate == 0.5
    import timm

    hand_built = ai.inject(timm.create_model("resnet10t", drop_rate=0.5), "se_resnet", input_size=SIZE)
    with pytest.raises(
        ai.CheckpointError, match=r"\(root\): this model has 'drop_rate=0\.5'.*'drop_rate=0\.0'"
    ):
        ai.save(hand_built, tmp_path / "m.safetensors", model_name="timm:resnet10t")
    pooled = ai.inject(timm.create_model("vit_tiny_patch16_224", img_size=32), "se_resnet")
    pooled.reset_classifier(1000, global_pool="avg")  # pools another way; no module shows it
    with pytest.raises(ai.CheckpointError, match=r"global_pool='avg'"):
        ai.save(
            pooled,
            tmp_path / "v.safetensors",
            model_name="timm:vit_tiny_patch16_224",
            model_kwargs={"img_size": 32},
        )
    assert not list(tmp_path.glob("m.*")) and not list(tmp_path.glob("v.*"))
    manifest = json.loads(
        ai.saving.checkpoint.read_safetensors_metadata(tmp_path / "kept.safetensors")[MANIFEST_KEY]
    )
    manifest["attributes"] = [
        [n, t.replace("drop_rate=0.5", "drop_rate=0.0")] for n, t in manifest["attributes"]
    ]
    edited = with_manifest(
        tmp_path / "kept.safetensors", tmp_path / "edited.safetensors", attributes=manifest["attributes"]
    )
    with pytest.raises(ai.CheckpointError, match=r"not the network saved in the file .*drop_rate"):
        ai.load(edited)


def test_a_manifest_nested_too_deeply_or_with_a_huge_integer_is_one_line(saved, tmp_path):
    tensors = safetensors.torch.load_file(saved)
    for name, text, says in [
        ("deep", '{"format": 1, "training": ' + "[" * 100_000 + "]" * 100_000 + "}", "nested too deeply"),
        ("digits", '{"format": 1, "epoch": 1' + "0" * 5000 + "}", "an integer of 5,001 digits"),
    ]:
        path = tmp_path / f"{name}.safetensors"
        safetensors.torch.save_file(tensors, path, metadata={MANIFEST_KEY: text})
        with pytest.raises(ai.CheckpointError) as info:
            ai.read_manifest(path)
        message = str(info.value)
        assert says in message and "\n" not in message and "recursion" not in message, message


def test_what_a_changed_module_runs_is_part_of_the_architecture(tmp_path):
    torch.manual_seed(0)
    patched = ai.inject(build_model("timm:resnet10t"), "cbam_after_every_stage", input_size=SIZE)
    ai.save(patched, tmp_path / "m.safetensors")
    manifest = json.loads(
        ai.saving.checkpoint.read_safetensors_metadata(tmp_path / "m.safetensors")[MANIFEST_KEY]
    )
    changed = [[n, t] for n, t in manifest["attributes"] if "around=" in t]
    assert changed and all("after(cbam)" in t for _, t in changed)  # each stage's last block runs one
    edited_attributes = [
        [n, t.replace("before() after(cbam)", "before(x:cbam) after()")] for n, t in manifest["attributes"]
    ]
    edited = with_manifest(
        tmp_path / "m.safetensors", tmp_path / "e.safetensors", attributes=edited_attributes
    )
    with pytest.raises(
        ai.CheckpointError, match=r"not the network saved in the file .*around=before\(x:cbam\)"
    ):
        ai.load(edited)
