"""``attn-inject convert`` / ``validate``, ``ai.save`` / ``ai.load``: the round trip, and one
clear failure for every bad input, with nothing left behind."""

from __future__ import annotations

import json
import pathlib
import pickle

import pytest
import torch
import torchvision

import attn_inject as ai
from attn_inject.cli.main import main
from attn_inject.models.build import build_model
from attn_inject.saving.file import MANIFEST_KEY
from attn_inject.validation.registry import checks_for

SIZE = (3, 64, 64)


@pytest.fixture(scope="module")
def resnet18():
    torch.manual_seed(0)
    return torchvision.models.resnet18().eval()


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, resnet18):
    """resnet18's weights as a plain and a wrapped PyTorch checkpoint, written once for the
    module in a folder of their own (tests read them; none writes there)."""
    tmp_path = tmp_path_factory.mktemp("checkpoints")
    plain = tmp_path / "plain.pth"
    torch.save(resnet18.state_dict(), plain)
    wrapped = tmp_path / "wrapped.pth"
    torch.save(
        {"epoch": 7, "state_dict": {f"module.{k}": v for k, v in resnet18.state_dict().items()}}, wrapped
    )
    return {"plain": plain, "wrapped": wrapped}


def convert(tmp_path, checkpoint, *extra, out="out.safetensors", recipe="se_resnet", model="tv:resnet18"):
    target = tmp_path / out
    argv = [
        "convert",
        "--model",
        model,
        "--checkpoint",
        str(checkpoint),
        "--recipe",
        recipe,
        "--out",
        str(target),
        "--input-size",
        *map(str, SIZE),
        *extra,
    ]
    return main(argv), target


def outputs(model, seed=1):
    x = torch.randn((2, *SIZE), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model.eval()(x)


# Every default check of validate but export: for the wrapped checkpoint, whose weights and
# patched network are the plain one's, exported by the plain case.
BUT_EXPORT = ",".join(spec.name for spec in checks_for(None) if spec.name != "export")


@pytest.mark.parametrize("kind", ["plain", "wrapped"])
def test_converted_checkpoint_loads_back_and_computes_what_the_original_did(
    tmp_path, checkpoints, resnet18, kind
):
    checks = () if kind == "plain" else ("--checks", BUT_EXPORT)
    code, out = convert(tmp_path, checkpoints[kind], "--validate", "--device", "cpu", *checks)
    assert code == 0 and out.exists()
    patched = ai.load(out)
    assert len(patched.attn_inject.plan) == 8 and patched.attn_inject.base_model == "tv:resnet18"
    assert torch.equal(outputs(patched), outputs(resnet18))
    keys = set(patched.state_dict())
    assert set(resnet18.state_dict()) <= keys
    blocks = tuple(f"{b}." for b in ai.inserted_blocks(patched))
    assert blocks == tuple(f"layer{i}.{j}.bn2.se." for i in (1, 2, 3, 4) for j in (0, 1))  # after bn2
    assert {k for k in keys - set(resnet18.state_dict())} == {k for k in keys if k.startswith(blocks)}


def test_manifest_records_model_recipe_plan_and_versions(tmp_path, checkpoints):
    code, out = convert(
        tmp_path, checkpoints["plain"], "--model-kwargs", "num_classes=1000", "--init", "paper"
    )
    assert code == 0
    manifest = ai.read_manifest(out)
    assert manifest.base_model == "tv:resnet18" and manifest.base_kwargs == {"num_classes": 1000}
    assert manifest.init == "paper" and manifest.input_size == SIZE
    assert ai.load_recipe(manifest.recipe).to_dict() == ai.load_recipe("se_resnet").to_dict()
    assert [p["channels"] for p in manifest.plan["points"]] == [64, 64, 128, 128, 256, 256, 512, 512]
    assert set(manifest.versions) == {"attn_inject", "torch", "torchvision", "timm"}
    assert manifest.versions["torch"] == torch.__version__


def test_save_and_load_in_python_including_a_custom_architecture(tmp_path):
    torch.manual_seed(0)
    named = build_model("timm:resnet18", num_classes=5).eval()
    patched = ai.inject(named, "cbam_after_every_stage", input_size=SIZE)
    with torch.no_grad():  # a trained state: blends away from 0
        for block in ai.inserted_blocks(patched).values():
            block.channel.blend.fill_(0.5)
    ai.save(patched, tmp_path / "named.safetensors")
    again = ai.load(tmp_path / "named.safetensors")
    assert torch.equal(outputs(again), outputs(patched))
    custom = torchvision.models.resnet18(num_classes=3).eval()
    unknown = ai.inject(custom, "se_resnet", input_size=SIZE)
    with pytest.raises(ai.CheckpointError, match=r"could not rebuild it; pass model_name=.*or model_name=''"):
        ai.save(unknown, tmp_path / "custom.safetensors")  # a file load(path) could not rebuild
    assert not (tmp_path / "custom.safetensors").exists()
    ai.save(unknown, tmp_path / "custom.safetensors", model_name="")
    with pytest.raises(ai.CheckpointError, match=r"does not name its base model.*model=\.\.\."):
        ai.load(tmp_path / "custom.safetensors")
    loaded = ai.load(tmp_path / "custom.safetensors", model=torchvision.models.resnet18(num_classes=3))
    assert torch.equal(outputs(loaded), outputs(custom))


@pytest.fixture(scope="module")
def converted(tmp_path_factory, checkpoints):
    """The plain checkpoint converted with se_resnet, written once for the module (tests read
    it; none writes there)."""
    code, out = convert(tmp_path_factory.mktemp("converted"), checkpoints["plain"])
    assert code == 0
    return out


def test_validate_command_checks_a_converted_file(converted, capsys):
    out = converted
    capsys.readouterr()
    assert main(["validate", str(out), "--device", "cpu", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["validation"]["passed"] and report["validation"]["identity_ok"]
    assert report["manifest"]["base_model"] == "tv:resnet18"


def test_validate_command_runs_the_checks_asked_for(converted, capsys):
    out = converted
    capsys.readouterr()
    assert main(["validate", str(out), "--device", "cpu", "--json", "--checks", "reference,train"]) == 0
    checks = json.loads(capsys.readouterr().out)["validation"]["checks"]
    assert [(c["name"], c["status"]) for c in checks] == [("reference", "passed"), ("train", "passed")]
    assert main(["validate", str(out), "--checks", "speed"]) == 2
    assert "--checks speed: unknown speed" in capsys.readouterr().err


class Payload:
    """Unpickling this runs ``Path.touch(marker)``."""

    def __init__(self, marker: pathlib.Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return pathlib.Path.touch, (self.marker,)


def _bad_inputs(tmp_path: pathlib.Path, checkpoints) -> dict:
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"\x00not a checkpoint" * 50)
    garbage_st = tmp_path / "garbage.safetensors"
    garbage_st.write_bytes(b"{not safetensors" * 10)
    marker = tmp_path / "payload_ran"
    malicious = tmp_path / "malicious.pth"
    torch.save({"state_dict": {"fc.weight": torch.zeros(1)}, "extra": Payload(marker)}, malicious)
    raw = tmp_path / "raw.pt"
    raw.write_bytes(pickle.dumps(Payload(marker), protocol=2))
    existing = tmp_path / "existing.safetensors"
    existing.write_bytes(b"keep me")
    return {
        "missing file": (dict(checkpoint=tmp_path / "missing.pth"), "no such file"),
        "garbage bytes": (dict(checkpoint=garbage), "not a readable PyTorch checkpoint"),
        "garbage safetensors": (dict(checkpoint=garbage_st), "not a valid safetensors file"),
        "malicious pickle": (dict(checkpoint=malicious), "never unpickled as arbitrary objects"),
        "malicious raw pickle": (dict(checkpoint=raw), "refused"),
        "wrong architecture": (dict(checkpoint=checkpoints["plain"], model="tv:resnet34"), "missing keys"),
        "wrong class count": (
            dict(
                checkpoint=checkpoints["plain"],
                model="tv:resnet18",
                extra=("--model-kwargs", "num_classes=3"),
            ),
            "shape mismatch",
        ),
        "unknown model": (
            dict(checkpoint=checkpoints["plain"], model="tv:resnet19"),
            "unknown model 'resnet19'",
        ),
        "unknown recipe": (
            dict(checkpoint=checkpoints["plain"], recipe="se_everywhere"),
            "unknown recipe 'se_everywhere'",
        ),
        "existing output": (
            dict(checkpoint=checkpoints["plain"], out="existing.safetensors"),
            "exists; pass --force",
        ),
    }


BAD = [
    "missing file",
    "garbage bytes",
    "garbage safetensors",
    "malicious pickle",
    "malicious raw pickle",
    "wrong architecture",
    "wrong class count",
    "unknown model",
    "unknown recipe",
    "existing output",
]


@pytest.mark.parametrize("case", BAD)
def test_bad_input_fails_with_one_clear_line_and_writes_nothing(tmp_path, checkpoints, capsys, case):
    spec, says = _bad_inputs(tmp_path, checkpoints)[case]
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    extra = spec.pop("extra", ())
    checkpoint = spec.pop("checkpoint")
    code, _out = convert(tmp_path, checkpoint, *extra, **{"out": "new.safetensors", **spec})
    err = capsys.readouterr().err
    assert code == 1
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("attn-inject: error: ") and says in lines[0], err
    assert not (tmp_path / "payload_ran").exists()  # the pickle's code never ran
    after = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert after == before  # no output, no temporary file, the existing output untouched


def test_usage_errors_exit_2(tmp_path, checkpoints, capsys):
    code, _ = convert(tmp_path, checkpoints["plain"], out="out.pth")
    assert code == 2 and "must be a .safetensors file" in capsys.readouterr().err
    code, _ = convert(tmp_path, checkpoints["plain"], "--model-kwargs", "num_classes")
    assert code == 2 and "KEY=VALUE" in capsys.readouterr().err
    assert main(["convert", "--model", "tv:resnet18"]) == 2
    assert not list(tmp_path.glob("*.safetensors"))


def test_force_overwrites_an_existing_output(tmp_path, checkpoints):
    (tmp_path / "out.safetensors").write_bytes(b"old")
    code, out = convert(tmp_path, checkpoints["plain"], "--force")
    assert code == 0 and ai.read_manifest(out).base_model == "tv:resnet18"


def test_files_without_manifest_or_from_another_format_are_refused(tmp_path, converted):
    from safetensors.torch import save_file

    bare = tmp_path / "bare.safetensors"
    save_file({"w": torch.zeros(2)}, bare)
    with pytest.raises(ai.CheckpointError, match="no attn-inject manifest"):
        ai.load(bare)
    out = converted
    tensors = ai.saving.checkpoint.read_state_dict(out)
    manifest = json.loads(ai.saving.checkpoint.read_safetensors_metadata(out)[MANIFEST_KEY])
    manifest.update(format=99, versions={**manifest["versions"], "attn_inject": "9.0"})
    save_file(tensors, tmp_path / "future.safetensors", metadata={MANIFEST_KEY: json.dumps(manifest)})
    with pytest.raises(
        ai.CheckpointError, match=r"attn-inject 9\.0 in file format 99; this attn-inject reads format 1"
    ):
        ai.load(tmp_path / "future.safetensors")


def test_plan_command_prints_totals_and_draws_a_diagram(tmp_path, capsys):
    svg = tmp_path / "plan.svg"
    assert (
        main(
            [
                "plan",
                "tv:resnet18",
                "--recipe",
                "cbam_after_every_stage",
                "--input-size",
                "3",
                "64",
                "64",
                "--diagram",
                str(svg),
            ]
        )
        == 0
    )
    text = capsys.readouterr().out
    assert "+44,940 parameters (0.38% of 11,689,512)" in text and "MACs per image" in text
    assert svg.read_text().startswith("<svg") or "<svg" in svg.read_text()[:200]
    assert main(["plan", "tv:resnet18", "--recipe", "se_resnet", "--diagram", str(tmp_path / "x.jpg")]) == 2
    assert not (tmp_path / "x.jpg").exists()


def test_every_command_speaks_json(tmp_path, capsys):
    for argv in (
        ["recipes"],
        ["blocks"],
        ["recipes", "show", "se_resnet"],
        ["plan", "tv:resnet18", "-r", "se_resnet", "--input-size", "3", "64", "64"],
    ):
        assert main([*argv, "--json"]) == 0
        json.loads(capsys.readouterr().out)


def _weights_as(resnet18, key: str, value: torch.Tensor) -> dict[str, torch.Tensor]:
    state = dict(resnet18.state_dict())
    state[key] = value
    return state


@pytest.mark.parametrize(
    "kind, says",
    [
        ("int8", "conv1.weight holds torch.int8 values where the model's conv1.weight is torch.float32"),
        ("bool", "holds torch.bool values"),
        ("complex", "conv1.weight is complex (torch.complex64)"),
        ("sparse", "conv1.weight is a torch.sparse_coo tensor"),
    ],
)
def test_weights_that_are_not_dense_real_floats_are_refused_in_one_line(
    tmp_path, resnet18, capsys, kind, says
):
    weight = resnet18.conv1.weight.detach()
    value = {
        "int8": weight.to(torch.int8),
        "bool": weight > 0,
        "complex": weight.to(torch.complex64),
        "sparse": weight.to_sparse(),
    }[kind]
    path = tmp_path / f"{kind}.pth"
    torch.save(_weights_as(resnet18, "conv1.weight", value), path)
    code, out = convert(tmp_path, path)
    err = capsys.readouterr().err.strip()
    assert code == 1 and not out.exists()
    assert len(err.splitlines()) == 1 and says in err, err


def test_a_compressed_record_in_a_torch_zip_is_refused_before_it_is_read(tmp_path, checkpoints, capsys):
    """Every record of resnet18's checkpoint deflated (at level 0: the method, not the ratio,
    is what torch.save never writes)."""
    import zipfile

    packed = tmp_path / "packed.pth"
    with (
        zipfile.ZipFile(checkpoints["plain"]) as source,
        zipfile.ZipFile(packed, "w", zipfile.ZIP_DEFLATED, compresslevel=0) as target,
    ):
        for info in source.infolist():
            target.writestr(info.filename, source.read(info.filename))
    code, out = convert(tmp_path, packed)
    err = capsys.readouterr().err.strip()
    assert code == 1 and not out.exists()
    assert len(err.splitlines()) == 1 and "is compressed, which torch.save never writes" in err, err
