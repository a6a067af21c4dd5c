"""Ultralytics YOLO: a patched model trained with Ultralytics' own ``YOLO.train`` through
``ai.ultralytics.trainer`` keeps its blocks (trainer set-up, EMA, last.pt / best.pt, resume,
validation, fusing), computes the base model's predictions at insertion, and refuses to be
trained without the bridge. Everything runs offline on a tiny dataset the test draws:
coloured rectangles on noise, labelled with their known boxes."""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import attn_inject as ai
from attn_inject.cli.main import main as cli_main
from attn_inject.surgery.record import patched_record
from attn_inject.validation.compare import tensors

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("ultralytics") is None,
    reason="Ultralytics is not installed (pip install 'attn-inject[ultralytics]')",
)

SIZE = 64
TRAIN_SIZE = 32  # the training run's images and imgsz: YOLO's largest stride, one cell at P5
COLOURS = {0: (220, 40, 40), 1: (40, 40, 220)}  # class 0: red, class 1: blue
INTEGRATIONS = ("clearml", "comet", "dvc", "hub", "mlflow", "neptune", "raytune", "tensorboard", "wandb")


@pytest.fixture(scope="module")
def yolo_home(tmp_path_factory):
    """Ultralytics offline, its settings in a temporary folder (no integration, no sync),
    imported only now."""
    home = tmp_path_factory.mktemp("ultralytics")
    settings = home / "Ultralytics"
    settings.mkdir()
    (settings / "settings.json").write_text(
        json.dumps({"settings_version": "0.0.8", "sync": False, **dict.fromkeys(INTEGRATIONS, False)})
    )
    env = {"YOLO_OFFLINE": "1", "YOLO_CONFIG_DIR": str(home), "HF_HUB_OFFLINE": "1"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        from ultralytics.utils import SETTINGS

        if Path(SETTINGS.file).is_relative_to(home):  # never touch a user's own settings
            SETTINGS.update({"sync": False, **{k: False for k in INTEGRATIONS if k in SETTINGS}})
        yield home
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def draw_dataset(root: Path, counts: dict[str, int], seed: int = 0, size: int = TRAIN_SIZE) -> Path:
    """A YOLO-format detection set: per image two rectangles of known colour on noise; the
    labels are their boxes (class, centre, size, relative to the image)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for split, n in counts.items():
        (root / "images" / split).mkdir(parents=True)
        (root / "labels" / split).mkdir(parents=True)
        for i in range(n):
            image = rng.integers(0, 60, (size, size, 3), dtype=np.uint8)
            lines = []
            for _ in range(2):
                cls = int(rng.integers(0, 2))
                w, h = (int(v) for v in rng.integers(size // 4, size // 2, 2))
                x0, y0 = int(rng.integers(0, size - w)), int(rng.integers(0, size - h))
                image[y0 : y0 + h, x0 : x0 + w] = COLOURS[cls]
                cx, cy = (x0 + w / 2) / size, (y0 + h / 2) / size
                lines.append(f"{cls} {cx:.6f} {cy:.6f} {w / size:.6f} {h / size:.6f}")
            Image.fromarray(image).save(root / "images" / split / f"{i}.png")
            (root / "labels" / split / f"{i}.txt").write_text("\n".join(lines) + "\n")
    data = root / "data.yaml"
    data.write_text(f"path: {root}\ntrain: images/train\nval: images/val\nnames:\n  0: red\n  1: blue\n")
    return data


@pytest.fixture(scope="module")
def dataset(yolo_home, tmp_path_factory) -> Path:
    return draw_dataset(tmp_path_factory.mktemp("shapes"), {"train": 4, "val": 2})


def tiny_yolo(name: str = "yolov8n.yaml"):
    from ultralytics import YOLO

    torch.manual_seed(0)
    return YOLO(name)


@pytest.fixture(scope="module")
def injected_once(yolo_home):
    """yolov8n and the YOLO ``ai.ultralytics.inject`` returns for it with se_resnet at
    SIZE, built once for the module; tests take copies (:func:`se_yolo`), never these."""
    base = tiny_yolo()
    return base, ai.ultralytics.inject(base, "se_resnet", input_size=(3, SIZE, SIZE))


@pytest.fixture
def se_yolo(injected_once):
    """(base, patched): this test's own deep copies of the module's yolov8n and its
    se_resnet patch (a test that trains or changes them changes no other test's)."""
    return copy.deepcopy(injected_once)


def same_outputs(a, b) -> bool:
    ta, tb = tensors(a), tensors(b)
    return len(ta) == len(tb) > 0 and all(
        x.shape == y.shape and torch.equal(x, y) for x, y in zip(ta, tb, strict=True)
    )


def open_blends(model: torch.nn.Module, value: float = 1.0) -> None:
    """Move every block away from identity (blend = value), as training would."""
    with torch.no_grad():
        for block in ai.inserted_blocks(model).values():
            for name, p in block.named_parameters():
                if name.rsplit(".", 1)[-1] == "blend":
                    p.fill_(value)


def test_se_resnet_reaches_every_bottleneck_residual_and_computes_the_base(se_yolo):
    base, yolo = se_yolo
    # the residual bottlenecks: C2f's Bottleneck with a shortcut (the backbone's; the neck's have none)
    from ultralytics.nn.modules.block import Bottleneck

    residual = sorted(n for n, m in base.model.named_modules() if isinstance(m, Bottleneck) and m.add)
    hosts = sorted({key.rsplit(".", 2)[0] for key in ai.inserted_blocks(yolo.model)})
    assert hosts == residual and len(residual) == 6
    assert type(yolo.model) is type(base.model) and base.model is not yolo.model
    assert patched_record(base.model) is None  # the YOLO passed in is unchanged
    x = torch.rand(2, 3, SIZE, SIZE)
    with torch.no_grad():
        assert same_outputs(base.model.eval()(x), yolo.model.eval()(x))


@pytest.mark.parametrize(
    ("task", "yaml"),
    [
        ("DetectionModel", "yolo11n.yaml"),
        ("SegmentationModel", "yolo11n-seg.yaml"),
        ("ClassificationModel", "yolo11n-cls.yaml"),
    ],
)
def test_a_stage_recipe_ends_the_backbone_stages_and_leaves_the_heads(yolo_home, task, yaml):
    """The plan read from the record ``inject`` leaves is the one it placed its blocks by
    (one analysis of the model instead of two)."""
    from ultralytics.nn import tasks

    base = getattr(tasks, task)(yaml, verbose=False).eval()
    backbone = len(base.yaml["backbone"])
    patched = ai.inject(base, "cbam_after_every_stage", input_size=(3, SIZE, SIZE), init="identity")
    record = patched_record(patched)
    assert record is not None
    plan = record.plan
    # the last backbone layer at strides 4, 8, 16 and 32: YOLO's P2 to P5
    assert [p.name for p in plan] == [f"model.{i}" for i in (2, 4, 6, backbone - 1)]
    assert [p.channels for p in plan] == [
        base.model[i].cv2.conv.out_channels for i in (2, 4, 6, backbone - 1)
    ]
    assert sorted(ai.inserted_blocks(patched)) == sorted(record.block_keys)
    head = len(base.model) - 1
    assert not any(key.startswith(f"model.{head}.") for key in ai.inserted_blocks(patched))
    x = torch.rand(2, 3, SIZE, SIZE)
    with torch.no_grad():
        assert same_outputs(base(x), patched(x))


def test_blocks_survive_ultralytics_fuse(se_yolo):
    """fuse() folds BatchNorm into each Conv and swaps in its forward_fuse: a block living in
    a Conv still runs (as in validation, predict and export)."""
    base, yolo = se_yolo
    open_blends(yolo.model)
    x = torch.rand(1, 3, SIZE, SIZE)
    model = yolo.model.eval()
    with torch.no_grad():
        unfused = tensors(model(x))
        fused = tensors(model.fuse(verbose=False)(x))
        plain = tensors(base.model.eval().fuse(verbose=False)(x))
    assert model.is_fused() and len(fused) == len(unfused) == len(plain) > 1
    rounding = max((a - b).abs().max().item() for a, b in zip(fused, unfused, strict=True))
    blocks = max((a - b).abs().max().item() for a, b in zip(fused, plain, strict=True))
    assert rounding < 1e-3 and blocks > 100 * rounding  # fusing rounds; dropping the blocks would not


@contextlib.contextmanager
def in_folder(folder: Path):
    before = Path.cwd()
    os.chdir(folder)
    try:
        yield
    finally:
        os.chdir(before)


def test_bridged_training_keeps_blocks_through_ema_checkpoints_resume_and_reload(dataset, se_yolo, tmp_path):
    """One tiny run (4 images of TRAIN_SIZE px, 2 epochs) holds every fact: validation at
    insertion, the refusal without the bridge, EMA and checkpoints, learned blends, resume and
    predict from best.pt."""
    from ultralytics import YOLO

    base, yolo = se_yolo
    keys = sorted(ai.inserted_blocks(yolo.model))
    start = ai.blends(yolo.model)
    common = dict(
        data=str(dataset), imgsz=TRAIN_SIZE, batch=4, nbs=4, workers=0, device="cpu", plots=False,
        verbose=False,
    )  # fmt: skip
    runs = tmp_path / "runs"

    with in_folder(tmp_path):
        # at insertion the patched model validates exactly as the base model does
        before = base.val(**common, project=str(runs), name="base")
        patched = yolo.val(**common, project=str(runs), name="patched")
        assert patched.results_dict == before.results_dict
        images = sorted((dataset.parent / "images" / "val").glob("*.png"))
        assert images

        # without the bridge the trainer rebuilds the YAML's network: refused, not trained
        with pytest.raises(ai.ultralytics.UltralyticsError, match="dropped the attention blocks"):
            yolo.train(**common, epochs=1, project=str(runs), name="unbridged")

        midway = tmp_path / "midway.pt"

        def keep_first_epoch(trainer) -> None:
            if trainer.epoch == 0:
                shutil.copy(trainer.last, midway)  # a resumable checkpoint (optimizer, epoch 0)

        yolo.add_callback("on_model_save", keep_first_epoch)
        bridge = ai.ultralytics.trainer(yolo)
        yolo.train(**common, epochs=2, project=str(runs), name="train", trainer=bridge)
        weights = Path(yolo.trainer.save_dir) / "weights"
        assert isinstance(yolo.trainer, bridge)
        assert sorted(ai.inserted_blocks(yolo.trainer.ema.ema)) == keys

        reloaded = {
            checkpoint: YOLO(str(checkpoint))
            for checkpoint in (weights / "last.pt", weights / "best.pt", midway)
        }
        for checkpoint, model in reloaded.items():
            assert sorted(ai.inserted_blocks(model.model)) == keys, checkpoint.name
        trained = reloaded[weights / "last.pt"]
        moved = ai.blends(trained.model)
        assert moved.keys() == start.keys()
        assert any(abs(moved[k] - start[k]) > 1e-6 for k in start)  # the blends learned
        assert sorted(ai.inserted_blocks(yolo.model)) == keys  # train() reloaded best.pt, blocks kept

        # resume from the first epoch's checkpoint: the patched model it holds continues
        resumed = reloaded[midway]
        resumed.train(resume=True, trainer=ai.ultralytics.trainer(resumed))
        assert resumed.trainer.start_epoch == 1
        assert sorted(ai.inserted_blocks(resumed.trainer.model)) == keys
        assert sorted(ai.inserted_blocks(YOLO(str(weights / "last.pt")).model)) == keys
        results = YOLO(str(weights / "best.pt")).predict(
            str(images[0]), imgsz=TRAIN_SIZE, device="cpu", verbose=False
        )
        assert len(results) == 1


def test_a_different_class_count_rebuilds_the_head_and_keeps_blocks_and_weights(dataset, se_yolo, tmp_path):
    """A model built for 80 classes fine-tuned on 2: the network is built for 2 classes, the
    recipe injected again, and every weight whose name and shape match copied (blocks too)."""
    _, yolo = se_yolo
    open_blends(yolo.model, 0.5)
    task_trainer = ai.ultralytics.trainer(yolo)(
        overrides=dict(
            data=str(dataset),
            model="yolov8n.yaml",
            imgsz=TRAIN_SIZE,
            device="cpu",
            project=str(tmp_path),
            plots=False,
        )
    )
    model = task_trainer.get_model(cfg="yolov8n.yaml", verbose=False)
    assert model.model[-1].nc == 2 and yolo.model.model[-1].nc == 80
    assert ai.blends(model) == ai.blends(yolo.model)
    expected = yolo.model.state_dict()
    for key, value in model.state_dict().items():
        if expected[key].shape == value.shape:
            assert torch.equal(value, expected[key]), key


def test_bridge_and_inject_refuse_what_is_not_a_patched_yolo(se_yolo):
    base, _ = se_yolo
    with pytest.raises(ai.ultralytics.UltralyticsError, match="patch it first"):
        ai.ultralytics.trainer(base)
    with pytest.raises(ai.ultralytics.UltralyticsError, match="takes an Ultralytics YOLO"):
        ai.ultralytics.inject(base.model, "se_resnet")
    with pytest.raises(ai.ultralytics.UltralyticsError, match="takes an Ultralytics YOLO"):
        ai.ultralytics.trainer(base.model)


def test_save_and_load_a_patched_yolo_unnamed(se_yolo, tmp_path):
    """Saved after it has run, as a trained model is: the shape Detect caches while running
    is not part of the network, so the fresh build it is loaded onto matches."""
    _, yolo = se_yolo
    open_blends(yolo.model, 0.25)
    with torch.no_grad():
        yolo.model.eval()(torch.rand(1, 3, SIZE, SIZE))
    assert isinstance(vars(yolo.model.model[-1]).get("shape"), torch.Size)
    path = tmp_path / "yolo-se.safetensors"
    ai.save(yolo.model, path, model_name="")
    again = ai.load(path, model=tiny_yolo().model)
    assert type(again) is type(yolo.model)
    x = torch.rand(1, 3, SIZE, SIZE)
    with torch.no_grad():
        assert same_outputs(again.eval()(x), yolo.model.eval()(x))


def test_cli_refuses_an_ultralytics_pt_without_unpickling_it(se_yolo, tmp_path, capsys):
    """A .pt from Ultralytics is a pickle of the whole model: convert and validate refuse it in
    one line, and nothing in it runs (a pickle that would write a file, were it unpickled,
    writes none). The CLI's main runs in this process: a reader that unpickled would run the
    trap here just the same."""
    marker = tmp_path / "unpickled"
    checkpoint = tmp_path / "best.pt"
    torch.save({"model": se_yolo[0].model, "trap": Trap(str(marker))}, checkpoint)
    commands = {
        "is a PyTorch checkpoint, not a file written by attn-inject": ["validate", str(checkpoint)],
        "never unpickled": [
            "convert", "--model", "tv:resnet18", "--checkpoint", str(checkpoint),
            "--recipe", "se_resnet", "--out", str(tmp_path / "out.safetensors"),
        ],
    }  # fmt: skip
    capsys.readouterr()
    for said, command in commands.items():
        with in_folder(tmp_path):
            code = cli_main(command)
        stderr = capsys.readouterr().err
        lines = [line for line in stderr.splitlines() if line.strip()]
        assert code != 0 and "Traceback" not in stderr, stderr
        assert len(lines) == 1 and said in lines[0], stderr
    assert not marker.exists()


class Trap:
    """Unpickling it creates a file: proof that a reader unpickled the checkpoint."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))
