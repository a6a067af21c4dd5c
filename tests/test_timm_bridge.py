"""timm's training script and hub format: a patched model registered under a timm name, timm's
``.pth.tar`` training checkpoints read back, and timm's hub folder layout written and read."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch
import timm
import torch
from PIL import Image
from timm.utils import CheckpointSaver, ModelEmaV3

import attn_inject as ai
from attn_inject.cli.main import main
from attn_inject.models.build import build_model
from attn_inject.saving.checkpoint import CheckpointError, read_state_dict, read_training_checkpoint
from attn_inject.saving.timm_train import main as timm_train

SIZE = (3, 64, 64)
RECIPE = "se_resnet"


@pytest.fixture(scope="module")
def start(tmp_path_factory) -> Path:
    """A patched resnet10t (5 classes, random init) saved as train.py's starting point: timm's
    smallest ResNet with resnet18's blocks and head."""
    torch.manual_seed(0)
    patched = ai.inject(build_model("timm:resnet10t", num_classes=5), RECIPE, input_size=SIZE)
    path = tmp_path_factory.mktemp("start") / "start.safetensors"
    ai.save(patched, path)
    return path


def _x() -> torch.Tensor:
    return torch.randn(2, *SIZE, generator=torch.Generator().manual_seed(1))


def _file_tensors(path: Path) -> dict[str, torch.Tensor]:
    return safetensors.torch.load_file(path)  # the file read by safetensors itself


def _as_train_py_builds(name: str, **kwargs):
    """The call timm's train.py makes (its defaults: pretrained off, 3 channels, no dropout;
    None for what the command line left out, which create_model drops)."""
    args = dict(
        pretrained=False,
        in_chans=3,
        num_classes=None,
        drop_rate=0.0,
        drop_path_rate=None,
        drop_block_rate=None,
        global_pool=None,
        bn_momentum=None,
        bn_eps=None,
        scriptable=False,
        checkpoint_path=None,
    )
    return timm.create_model(name, **{**args, **kwargs})


# --- into timm: a registered name ----------------------------------------------------------


def test_registered_name_builds_the_patched_network_and_loads_the_start_file_strictly(start):
    ai.register_timm_model("resnet10t_se_t1", start)
    model = _as_train_py_builds("resnet10t_se_t1", num_classes=5, checkpoint_path=str(start)).eval()
    # every tensor is the file's (timm's load_checkpoint loads strictly: no key left over)
    want = _file_tensors(start)
    got = model.state_dict()
    assert sorted(got) == sorted(want)
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert any(k.endswith(".se.fc1.weight") for k in got)  # the blocks are there, where they act
    assert isinstance(model, timm.models.ResNet)
    loaded = ai.load(start).eval()
    with torch.no_grad():
        assert torch.equal(model(_x()), loaded(_x()))


def test_registered_name_takes_the_callers_builder_arguments(start):
    ai.register_timm_model("resnet10t_se_t2", start)
    model = _as_train_py_builds("resnet10t_se_t2", num_classes=3, drop_path_rate=0.1)
    assert model.fc.out_features == 3
    drop = [m.drop_prob for m in model.modules() if isinstance(m, timm.layers.DropPath)]
    assert max(drop) == pytest.approx(0.1)
    assert sorted(ai.inserted_blocks(model)) == sorted(ai.inserted_blocks(ai.load(start)))


def test_pretrained_loads_the_files_weights_and_a_new_head_keeps_its_initialisation(start):
    ai.register_timm_model("resnet10t_se_t3", start)
    model = timm.create_model("resnet10t_se_t3", pretrained=True, num_classes=3)
    want = _file_tensors(start)
    got = model.state_dict()
    assert model.fc.weight.shape == (3, 512)
    assert all(torch.equal(got[k], want[k]) for k in want if not k.startswith("fc."))


def test_register_refuses_a_timm_name_and_a_malformed_name(start):
    with pytest.raises(ai.InputError, match="'resnet18' is a timm model of its own"):
        ai.register_timm_model("resnet18", start)
    with pytest.raises(ai.InputError, match="letters, digits and _"):
        ai.register_timm_model("../x", start)


def test_register_refuses_a_file_that_is_not_a_saved_model(tmp_path):
    path = tmp_path / "plain.safetensors"
    safetensors.torch.save_file({"w": torch.zeros(1)}, path)
    with pytest.raises(CheckpointError, match="no attn-inject manifest"):
        ai.register_timm_model("resnet10t_se_t4", path)


def test_timm_train_registers_then_runs_the_script_with_its_arguments(start, tmp_path):
    script = tmp_path / "script.py"
    out = tmp_path / "out.json"
    script.write_text(
        "import sys, json, timm\n"
        "model = timm.create_model(sys.argv[2], num_classes=5, checkpoint_path=sys.argv[3])\n"
        "json.dump({'argv': sys.argv[1:], 'blocks': sum('.se.' in k for k in model.state_dict())},"
        " open(sys.argv[1], 'w'))\n"
    )
    code = timm_train(
        ["--register", f"resnet10t_se_t5={start}", str(script), str(out), "resnet10t_se_t5", str(start)]
    )
    assert code == 0
    got = json.loads(out.read_text())
    assert got["argv"] == [str(out), "resnet10t_se_t5", str(start)]
    assert got["blocks"] > 0


def test_timm_train_refuses_a_malformed_register_before_the_script_runs(tmp_path, capsys):
    script = tmp_path / "script.py"
    script.write_text("raise SystemExit('ran')\n")
    with pytest.raises(SystemExit) as exit_:
        timm_train(["--register", "no_equals_sign", str(script)])
    assert exit_.value.code == 2
    assert "NAME=FILE" in capsys.readouterr().err


def _dataset(root: Path, classes: int = 2, per_class: int = 4) -> Path:
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    for split in ("train", "validation"):
        for c in range(classes):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True)
            for i in range(per_class):
                pixels = torch.randint(0, 256, (64, 64, 3), generator=g, dtype=torch.uint8).numpy()
                Image.fromarray(pixels).save(folder / f"{i}.png")
    return root


TRAIN_PY = os.environ.get("TIMM_TRAIN_PY")


@pytest.mark.skipif(not TRAIN_PY, reason="set TIMM_TRAIN_PY to timm's train.py (it is not in timm's wheel)")
def test_timm_train_py_trains_a_registered_patched_model_and_its_checkpoint_loads_back(start, tmp_path):
    data = _dataset(tmp_path / "data")
    out = tmp_path / "runs"
    command = [
        sys.executable, "-m", "attn_inject.timm_train", "--register", f"resnet10t_se={start}", str(TRAIN_PY),
        "--data-dir", str(data), "--model", "resnet10t_se", "--initial-checkpoint", str(start),
        "--num-classes", "5", "--img-size", "64", "--epochs", "1", "-b", "4", "--workers", "0",
        "--device", "cpu", "--no-prefetcher", "--model-ema", "--output", str(out), "--experiment", "t",
        "--warmup-epochs", "0", "--log-interval", "1",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    best = out / "t" / "model_best.pth.tar"
    model = ai.load(best, like=start)
    trained = read_training_checkpoint(best)
    assert model.state_dict().keys() == trained.state_dict.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in trained.state_dict.items())
    ema = ai.load(best, like=start, use_ema=True)
    assert torch.equal(ema.fc.weight, read_state_dict(best, use_ema=True)["fc.weight"])


# --- out of timm: train.py's .pth.tar checkpoints ------------------------------------------


def _train_py_checkpoint(model, folder: Path, *, arch: str, num_classes: int, ema: bool = True) -> Path:
    """A checkpoint written as timm's train.py writes it: its CheckpointSaver, with its
    optimizer, command line (a Namespace), EMA copy and metric."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    args = argparse.Namespace(
        model=arch, num_classes=num_classes, lr=0.1, model_kwargs={}, input_size=None, img_size=64,
        device="cpu", distributed=False, opt_betas=None, mean=(0.5, 0.5, 0.5), sched="cosine",
    )  # fmt: skip
    model_ema = ModelEmaV3(model, decay=0.5) if ema else None
    model(torch.randn(2, *SIZE)).sum().backward()
    optimizer.step()  # momentum buffers in the optimizer's state, as after a step of training
    if model_ema is not None:
        model_ema.update(model)
    saver = CheckpointSaver(
        model, optimizer, args=args, model_ema=model_ema, checkpoint_dir=str(folder), recovery_dir=str(folder)
    )
    saver.save_checkpoint(epoch=0, metric=12.5)
    return folder / "model_best.pth.tar"


def test_train_py_checkpoint_of_a_patched_model_loads_back_exactly(start, tmp_path):
    ai.register_timm_model("resnet10t_se_t6", start)
    torch.manual_seed(1)
    trained = timm.create_model("resnet10t_se_t6", num_classes=4, pretrained=True)
    path = _train_py_checkpoint(trained, tmp_path, arch="resnet10t_se_t6", num_classes=4)
    raw = torch.load(path, map_location="cpu", weights_only=False)  # the control: trusted here, our own file
    assert isinstance(raw["args"], argparse.Namespace) and {"optimizer", "state_dict_ema", "saver"} <= set(
        raw
    )

    model = ai.load(path, like=start).eval()
    assert model.fc.out_features == 4  # the run's --num-classes, not the start file's 5
    for key, value in raw["state_dict"].items():
        assert torch.equal(model.state_dict()[key], value), key
    by_name = ai.load(path)  # its arch is a registered name: the start file registered under it
    assert all(torch.equal(by_name.state_dict()[k], v) for k, v in raw["state_dict"].items())
    ema = ai.load(path, like=start, use_ema=True)
    assert all(torch.equal(ema.state_dict()[k], v) for k, v in raw["state_dict_ema"].items())
    assert not torch.equal(raw["state_dict_ema"]["fc.weight"], raw["state_dict"]["fc.weight"])


def test_train_py_checkpoint_without_a_manifest_source_names_what_to_pass(start, tmp_path):
    torch.manual_seed(1)
    model = ai.load(start)
    path = _train_py_checkpoint(model, tmp_path, arch="never_registered_name", num_classes=5)
    with pytest.raises(CheckpointError, match=r"training checkpoint of 'never_registered_name'.*like="):
        ai.load(path)


def test_convert_reads_a_train_py_checkpoint_and_its_ema_weights(tmp_path):
    torch.manual_seed(2)
    base = timm.create_model("resnet10t", num_classes=3)
    path = _train_py_checkpoint(base, tmp_path, arch="resnet10t", num_classes=3)
    raw = torch.load(path, map_location="cpu", weights_only=False)
    for flags, key in (([], "state_dict"), (["--use-ema"], "state_dict_ema")):
        out = tmp_path / f"{key}.safetensors"
        code = main(
            ["convert", "--model", "timm:resnet10t", "--model-kwargs", "num_classes=3",
             "--checkpoint", str(path), "--recipe", RECIPE, "--input-size", *map(str, SIZE),
             "--out", str(out), *flags]
        )  # fmt: skip
        assert code == 0
        written = _file_tensors(out)
        assert all(torch.equal(written[k], v) for k, v in raw[key].items()), key


def test_use_ema_on_a_checkpoint_without_ema_weights_is_one_line(tmp_path):
    torch.manual_seed(3)
    path = _train_py_checkpoint(
        timm.create_model("resnet10t", num_classes=3), tmp_path, arch="r", num_classes=3, ema=False
    )
    with pytest.raises(
        CheckpointError, match=r"has no EMA weights .*top-level keys are .*state_dict"
    ) as error:
        read_state_dict(path, use_ema=True)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize(
    ("value", "shown"),
    [
        (torch.zeros(2), "tensor"),
        (list(range(20_000)), "[0, 1, 2, 3, ...]"),
        (argparse.Namespace(a=1), "Namespace"),
    ],
)
def test_a_namespace_holding_more_than_plain_values_is_refused(tmp_path, value, shown):
    path = tmp_path / "run.pth.tar"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "args": argparse.Namespace(lr=0.1, x=value)}, path)
    with pytest.raises(CheckpointError, match=r"args'\]\.x holds .*only plain values") as error:
        read_state_dict(path)
    assert shown in str(error.value) and "\n" not in str(error.value)


def test_the_namespace_is_allowed_only_while_a_checkpoint_is_read(tmp_path):
    path = tmp_path / "run.pth.tar"
    torch.save(
        {"state_dict": {"w": torch.ones(1)}, "args": argparse.Namespace(model="m", num_classes=2)}, path
    )
    before = list(torch.serialization.get_safe_globals())
    checkpoint = read_training_checkpoint(path)
    assert checkpoint.args == {"model": "m", "num_classes": 2} and torch.equal(
        checkpoint.state_dict["w"], torch.ones(1)
    )
    after = list(torch.serialization.get_safe_globals())
    # nothing of ours stays allowed; torch may add its own classes as its modules import lazily
    added = [g for g in after if g not in before]
    assert argparse.Namespace not in after
    assert all(getattr(g, "__module__", "").startswith("torch.") for g in added), added
    with pytest.raises(Exception, match="Namespace"):  # torch's own loader still refuses it
        torch.load(path, weights_only=True)


# --- timm's hub layout -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def patched():
    torch.manual_seed(0)
    model = timm.create_model("resnet10t", num_classes=7, pretrained_cfg_overlay={"mean": (0.5, 0.5, 0.5)})
    return ai.inject(model, RECIPE, input_size=SIZE).eval()


def test_save_pretrained_writes_timms_layout_with_the_recipe_and_plan(patched, tmp_path):
    folder = tmp_path / "hub"
    ai.save_pretrained(patched, folder)
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
    config = json.loads((folder / "config.json").read_text())
    assert config["num_classes"] == 7 and config["num_features"] == 512
    assert config["pretrained_cfg"]["mean"] == [0.5, 0.5, 0.5]
    recorded = config["attn_inject"]
    assert recorded["base_model"] == "timm:resnet10t"
    assert recorded["recipe"] == ai.get_recipe(RECIPE).text
    keys = [p["key"] for p in recorded["plan"]["points"]]
    assert keys == [p.key for p in patched.attn_inject.plan]
    assert sorted(_file_tensors(folder / "model.safetensors")) == sorted(patched.state_dict())


def test_load_of_a_hub_folder_rebuilds_the_model_exactly(patched, tmp_path):
    ai.save_pretrained(patched, tmp_path / "hub")
    loaded = ai.load(tmp_path / "hub").eval()
    assert loaded.pretrained_cfg == patched.pretrained_cfg
    with torch.no_grad():
        assert torch.equal(loaded(_x()), patched(_x()))


def test_timm_local_dir_fails_naming_the_loader_or_builds_once_registered(patched, tmp_path):
    folder = tmp_path / "hub"
    ai.save_pretrained(patched, folder)
    with pytest.raises(RuntimeError, match=r"attn_inject\.load\(folder\)"):
        timm.create_model(f"local-dir:{folder}")
    ai.register_timm_model("resnet10t_se_hub", folder)
    model = timm.create_model("resnet10t_se_hub", pretrained=True).eval()
    with torch.no_grad():
        assert torch.equal(model(_x()), patched(_x()))


def test_a_hub_folder_whose_config_disagrees_with_its_weights_is_refused(patched, tmp_path):
    folder = tmp_path / "hub"
    ai.save_pretrained(patched, folder)
    config = json.loads((folder / "config.json").read_text())
    config["attn_inject"]["recipe"] = config["attn_inject"]["recipe"].replace("se", "eca")
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"attn_inject\.recipe is .*different models"):
        ai.load(folder)


def test_save_pretrained_keeps_an_earlier_save_without_force(patched, tmp_path):
    folder = tmp_path / "hub"
    ai.save_pretrained(patched, folder)
    before = (folder / "config.json").read_bytes()
    with pytest.raises(
        CheckpointError, match=r"already holds config\.json, model\.safetensors; pass force=True"
    ):
        ai.save_pretrained(patched, folder)
    assert (folder / "config.json").read_bytes() == before
    ai.save_pretrained(patched, folder, force=True)


def test_finetune_starts_from_a_train_py_checkpoint_and_its_ema_weights(start, tmp_path):
    """``finetune --checkpoint X.pth.tar --like START [--use-ema]``: the run starts from the
    checkpoint's weights (or its EMA's) in the network the start file describes."""
    from attn_inject.finetune.starting_point import load_for_finetuning

    torch.manual_seed(1)
    path = _train_py_checkpoint(ai.load(start), tmp_path, arch="not_registered_here", num_classes=5)
    raw = torch.load(path, map_location="cpu", weights_only=False)  # our own file: the control
    for use_ema, key in ((False, "state_dict"), (True, "state_dict_ema")):
        begun = load_for_finetuning(path, like=start, use_ema=use_ema)
        assert begun.num_classes == 5 and begun.reinitialised == ()
        state = begun.model.state_dict()
        assert all(torch.equal(state[k], v) for k, v in raw[key].items()), key
    with pytest.raises(CheckpointError, match="--num-classes 3 is for a file written by convert"):
        load_for_finetuning(path, 3, like=start)
    with pytest.raises(ai.InputError, match="--use-ema is for a timm training checkpoint"):
        load_for_finetuning(start, use_ema=True)

    data = tmp_path / "data"
    for split, count in (("train", 4), ("val", 2)):
        for c in range(5):
            folder = data / split / f"class{c}"
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = torch.randint(0, 255, (32, 32, 3), generator=torch.Generator().manual_seed(i + c))
                Image.fromarray(pixels.to(torch.uint8).numpy()).save(folder / f"{i}.png")
    code = main(
        ["finetune", "--checkpoint", str(path), "--like", str(start), "--use-ema", "--data", str(data),
         "--epochs", "1", "--out", str(tmp_path / "run"), "--batch-size", "4", "--image-size", "32",
         "--workers", "0", "--threads", "1"]
    )  # fmt: skip
    assert code == 0 and (tmp_path / "run" / "summary.csv").is_file()
