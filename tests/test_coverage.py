"""Model coverage: each tracing strategy, targets, layouts, input sizes and the zoo sweep,
on a sample that covers every class of model and failure the full sweep meets."""

from __future__ import annotations

import csv
import dataclasses
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import attn_inject as ai
from attn_inject.blocks import layout_kwargs
from attn_inject.cli.main import main
from attn_inject.models.build import build_for_planning, build_model, input_size_for
from attn_inject.models.targets import TargetError
from attn_inject.zoo.report import read_csv, write_csv, write_markdown
from attn_inject.zoo.sweep import list_zoo, stage_agreement, sweep

from .conftest import SIZE, meta_model


class Stage(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, stride, 1)
        self.bn = nn.BatchNorm2d(cout)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


class DataDependent(nn.Module):
    """Control flow on a tensor's value: fx cannot trace through it."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 1)

    def forward(self, x):
        if x.mean() > 100:  # never true for these inputs
            return x
        return self.conv(x)


class WithOptionalMask(nn.Module):
    """``mask=None`` by default and ``if mask is not None`` in forward (as timm Hiera)."""

    def __init__(self, opaque_middle: bool = False) -> None:
        super().__init__()
        self.stem = Stage(3, 16, 4)
        self.layer1 = Stage(16, 32, 2)
        self.middle = DataDependent(32) if opaque_middle else nn.Identity()
        self.layer2 = Stage(32, 64, 2)
        self.head = nn.Linear(64, 10)

    def forward(self, x, mask=None):
        x = self.stem(x)
        if mask is not None:
            x = x * mask
        x = self.layer2(self.middle(self.layer1(x)))
        return self.head(x.mean((2, 3)))


class ShapeInForward(WithOptionalMask):
    def forward(self, x, mask=None):
        if x.sum() > 0:  # the root's own code: no submodule to isolate
            x = x * 2
        return super().forward(x)


def test_optional_forward_arguments_are_fixed_to_their_defaults():
    model = WithOptionalMask().eval()
    patched = ai.inject(model, "cbam_after_every_stage", input_size=SIZE)
    assert patched.attn_inject.plan.tracing == "whole"
    x = torch.randn(2, *SIZE)
    assert torch.equal(patched(x), model(x))


def test_untraceable_submodule_is_kept_whole_and_the_rest_is_patched():
    model = WithOptionalMask(opaque_middle=True).eval()
    plan = ai.plan(model, "cbam_after_every_stage", input_size=SIZE)
    assert plan.tracing == "opaque"
    assert [o.name for o in plan.opaque] == ["middle"]
    assert "control flow" in plan.opaque[0].reason
    assert [p.name for p in plan] == ["stem", "middle", "layer2"]  # the opaque module ends stage 1
    patched = ai.inject(model, "cbam_after_every_stage", input_size=SIZE)
    x = torch.randn(2, *SIZE)
    assert torch.equal(patched(x), model(x))
    assert isinstance(patched.middle, DataDependent)  # called whole, weights shared
    assert patched.middle.conv.weight is model.middle.conv.weight


def test_failure_in_the_roots_own_forward_names_the_reason():
    with pytest.raises(ai.TraceError, match=r"ShapeInForward \(in its own forward\).*control flow"):
        ai.plan(ShapeInForward(), "cbam_after_every_stage", input_size=SIZE)


@pytest.mark.parametrize(
    "name, kwargs, input_size, strategy",
    [
        ("timm:hiera_tiny_224", {}, None, "whole"),
        ("timm:gemma4_vit_167m", {"depth": 1}, (3, 64, 64), "opaque"),
    ],  # 1 of 16 blocks, a 4 x 4 patch grid instead of its 48 x 48: fast
)
def test_timm_models_plain_fx_cannot_trace_now_plan(name, kwargs, input_size, strategy):
    model = meta_model(name, **kwargs)
    with pytest.raises((RuntimeError, torch.fx.proxy.TraceError)):
        torch.fx.symbolic_trace(model)
    plan = ai.plan(model, "se_resnet", input_size=input_size)
    assert plan.tracing == strategy


def test_detection_model_gets_its_backbone_by_default_and_stays_unchanged():
    torch.manual_seed(0)
    model = build_model("tv:fasterrcnn_mobilenet_v3_large_320_fpn").eval()
    keys = set(model.state_dict())
    patched = ai.inject(model, "cbam_after_every_stage", input_size=SIZE)
    plan = patched.attn_inject.plan
    assert plan.target == "backbone.body"
    assert [p.channels for p in plan] == [24, 40, 112, 960]  # MobileNetV3-Large stage widths
    assert type(patched) is type(model) and patched is not model
    assert model.backbone.body is not patched.backbone.body
    assert not any(getattr(m, "_attn_inject_block", False) for m in model.modules())
    new_keys = set(patched.state_dict()) - keys
    assert keys <= set(patched.state_dict())
    blocks = list(ai.inserted_blocks(patched))
    assert len(blocks) == 4 and all(b.startswith("backbone.body.") for b in blocks)
    assert new_keys and all(k.startswith(tuple(f"{b}." for b in blocks)) for k in new_keys)
    assert sum(p.numel() for p in ai.block_parameters(patched)) == plan.params_added
    x = torch.randn(2, *SIZE)
    with torch.no_grad():
        reference, output = model.backbone(x), patched.backbone(x)
    assert all(torch.equal(reference[k], output[k]) for k in reference)
    assert ai.validate(model, patched, input_size=SIZE).passed


@pytest.mark.parametrize(
    "name, target, channels",
    [
        ("tv:lraspp_mobilenet_v3_large", "backbone", [24, 40, 960]),
        ("tv:raft_small", "feature_encoder", [64, 128]),
        ("tv:retinanet_resnet50_fpn_v2", "backbone.body", [256, 512, 1024, 2048]),
        ("tv:ssd300_vgg16", "backbone", None),
    ],
)
def test_segmentation_detection_and_flow_models_plan_in_their_backbone(name, target, channels):
    plan = ai.plan(build_for_planning(name), "cbam_after_every_stage")
    assert plan.target == target
    assert len(plan) > 0
    if channels is not None:
        assert [p.channels for p in plan] == channels


def test_target_argument_and_recipe_key_limit_the_plan_to_a_submodule(build):
    model = build("tv:resnet18")
    plan = ai.plan(model, "se_resnet", target="layer3", input_size=(128, 16, 16))
    assert plan.target == "layer3" and [p.name for p in plan] == ["0", "1"] and plan[0].channels == 256
    recipe = {"name": "in_layer3", "target": "layer3", "rules": [{"block": "se", "at": "residual_branch"}]}
    patched = ai.inject(model, recipe, input_size=(128, 16, 16))
    assert isinstance(patched, torchvision_resnet()) and list(ai.inserted_blocks(patched)) == [
        "layer3.0.bn2.se",
        "layer3.1.bn2.se",
    ]
    x = torch.randn(2, *SIZE)
    assert torch.equal(patched(x), model(x))
    assert ai.plan(model, recipe, target="", input_size=SIZE).target == ""  # the caller's target wins


def torchvision_resnet():
    import torchvision

    return torchvision.models.ResNet


def test_unknown_target_lists_the_children(build):
    with pytest.raises(
        TargetError, match=r"'layer9' is not a submodule of ResNet.*conv1, bn1, relu, maxpool, layer1"
    ):
        ai.plan(build("tv:resnet18"), "se_resnet", target="layer9")
    with pytest.raises(ai.RecipeError, match="target: must be a dotted submodule name"):
        ai.load_recipe({"target": "layer 1", "rules": [{"block": "se", "at": "residual_branch"}]})


class ChannelsLast(nn.Module):
    """A stage that runs NHWC: conv, permute, a residual MLP on the last dim, permute back."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 24, 4, 4)
        self.norm = nn.LayerNorm(24)
        self.fc1, self.fc2 = nn.Linear(24, 48), nn.Linear(48, 24)
        self.down = nn.Conv2d(24, 40, 2, 2)

    def forward(self, x):
        x = self.stem(x).permute(0, 2, 3, 1)
        x = x + self.fc2(F.gelu(self.fc1(self.norm(x))))
        return self.down(x.permute(0, 3, 1, 2)).mean((2, 3))


def test_channels_last_maps_get_native_blocks_unless_the_rule_skips_them():
    model = ChannelsLast().eval()
    plan = ai.plan(
        model, {"rules": [{"block": {"kind": "se", "ratio": 4}, "at": "residual_branch"}]}, input_size=SIZE
    )
    # the last dim (24), never H or W (16); the block's shape is (H, W, C)
    assert [(p.channels, p.layout, p.shape) for p in plan] == [(24, "NHWC", (16, 16, 24))]
    assert layout_kwargs(plan[0]) == {"layout": "NHWC"}
    patched = ai.inject(
        model, {"rules": [{"block": {"kind": "se", "ratio": 4}, "at": "residual_branch"}]}, input_size=SIZE
    )
    x = torch.randn(2, *SIZE)
    assert torch.equal(patched(x), model(x))
    skipped = ai.plan(
        model, {"rules": [{"block": "se", "at": "residual_branch", "channels_last": "skip"}]}, input_size=SIZE
    )
    assert skipped == [] and "channels-last (NHWC)" in skipped.skipped[0].reason


def test_several_all_user_insertions_each_wrap_only_their_own_producer():
    """Three blocks that every later node reads (one NHWC, between two permutes): each block
    reads its producer, and every other reader of the producer reads the block."""
    model = ChannelsLast().eval()
    recipe = {
        "rules": [
            {"block": "se", "at": "conv_output"},
            {"block": "se", "at": "post_block"},
        ]
    }
    patched = ai.inject(model, recipe, init="paper", input_size=SIZE)
    blocks = {p.name + "_" + p.position: patched.get_submodule(p.key) for p in patched.attn_inject.plan}
    assert sorted(blocks) == ["add_post_block", "down_conv_output", "stem_conv_output"]
    x = torch.randn(2, *SIZE)

    def on_nhwc(block: nn.Module, h: torch.Tensor) -> torch.Tensor:  # a native block, or one between permutes
        if getattr(block, "layout", "NCHW") == "NHWC":
            return block(h)
        return block(h.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)

    with torch.no_grad():
        h = blocks["stem_conv_output"](model.stem(x)).permute(0, 2, 3, 1)
        h = h + model.fc2(F.gelu(model.fc1(model.norm(h))))
        h = on_nhwc(blocks["add_post_block"], h)
        expected = blocks["down_conv_output"](model.down(h.permute(0, 3, 1, 2))).mean((2, 3))
        torch.testing.assert_close(patched(x), expected)


def test_input_sizes_default_to_the_models_own():
    assert ai.plan(meta_model("timm:vit_tiny_patch16_384"), "se_resnet").input_size == (3, 384, 384)
    assert input_size_for("tv:inception_v3") == (3, 299, 299)
    assert input_size_for("tv:r3d_18") == (3, 16, 112, 112)
    assert input_size_for("tv:vit_h_14", build_for_planning("tv:vit_h_14")) == (3, 224, 224)
    video = ai.plan(build_for_planning("tv:swin3d_t"), "cbam_after_every_stage")
    assert video.input_size == (3, 16, 224, 224) and video == []  # 5-D maps: no 2-D block


def test_token_stages_reshaped_back_to_maps_are_known_maps():
    # PiT turns tokens (B, H*W, C) back into (B, C, H, W) maps between its stages. Its head
    # reads the class token only, which the last stage's map never reaches: no block there.
    plan = ai.plan(meta_model("timm:pit_ti_224"), "cbam_after_every_stage")
    assert [(p.channels, p.shape[1:]) for p in plan] == [(64, (27, 27)), (128, (14, 14))]
    (last,) = [s for s in plan.skipped if s.name == "transformers.2"]
    assert "output does not depend on" in last.reason


def test_planning_twice_is_unaffected_by_caches_the_model_fills():
    # EfficientFormer caches its attention biases in a dict keyed by str(x.device).
    model = meta_model("timm:efficientformer_l1")
    assert ai.plan(model, "cbam_after_every_stage") == ai.plan(model, "cbam_after_every_stage")


def test_stage_agreement_with_feature_info():
    from attn_inject.planning.match import prepare

    for name in ("timm:resnet50", "timm:convnext_tiny", "timm:vit_tiny_patch16_224"):
        model = meta_model(name)
        stages = prepare(model).stages
        assert stage_agreement(model, stages, "") == "agree", (name, stages)


def test_stage_agreement_compares_stages_by_name_not_position():
    from attn_inject.graph.stages import Stage

    model = nn.Module()
    model.feature_info = [
        {"module": "layer1", "num_chs": 64, "reduction": 4},
        {"module": "layer2", "num_chs": 128, "reduction": 8},
    ]

    def stages(*found):
        return [Stage(i, name, None, chs, 4 * 2**i) for i, (name, chs) in enumerate(found)]

    # An extra stage before the listed ones: the listed ones still agree, only the count differs.
    extra = stages(("stem", 32), ("layer1", 64), ("layer2", 128))
    assert stage_agreement(model, extra, "") == "differs: 3 stages found, feature_info lists 2"
    wrong = stages(("stem", 32), ("layer1", 64), ("layer2", 96))
    assert stage_agreement(model, wrong, "") == (
        "differs: layer2 has 96 channels in the graph, feature_info says 128"
    )
    assert stage_agreement(model, stages(("layer1", 64), ("layer2", 128)), "") == "agree"


def test_sweep_records_every_model_and_recipe_and_writes_the_report(tmp_path):
    names = ["timm:resnet18", "timm:gemma4_vit_167m_enc", "tv:fcn_resnet50", "tv:r3d_18"]
    recipes = ["cbam_after_every_stage", "se_resnet"]
    results = {f"{r.source}:{r.model}": r for r in sweep(names, recipes, identity_check=True, jobs=1)}
    assert set(results) == set(names)
    resnet = {r.recipe: r for r in results["timm:resnet18"].records}
    assert resnet["se_resnet"].points == 8 and resnet["se_resnet"].identity == "ok"
    assert resnet["cbam_after_every_stage"].stage_agreement == "agree"
    failed = results["timm:gemma4_vit_167m_enc"].records[0]
    assert failed.status == "trace" and "control flow" in failed.reason
    assert results["tv:fcn_resnet50"].records[0].target == "backbone"
    records = [r for result in results.values() for r in result.records]
    write_csv(records, tmp_path / "zoo.csv")
    write_markdown(records, tmp_path / "zoo.md", command="test", seconds=1.0)
    with open(tmp_path / "zoo.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(names) * len(recipes)
    back = {(r.model, r.recipe): r for r in read_csv(tmp_path / "zoo.csv")}
    assert all(
        back[(r.model, r.recipe)].points == r.points and back[(r.model, r.recipe)].identity == r.identity
        for r in records
    )
    text = (tmp_path / "zoo.md").read_text()
    assert text.index("## Summary") < text.index("## Failures")
    assert "| timm | 2 | 1 (50.0%)" in text and "gemma4_vit_167m_enc" in text


def test_zoo_csv_reads_back_every_field_and_rejects_bad_cells(tmp_path):
    from attn_inject.zoo.sweep import ZooRecord

    records = [
        ZooRecord(
            "timm", "a", "se_resnet", "ok", fx_plain=True, points=8, identity_rel_diff=0.25, seconds=1.5
        ),
        ZooRecord("timm", "b", "se_resnet", "trace", "control flow", fx_plain=False, identity_rel_diff=None),
        ZooRecord("tv", "c", "se_resnet", "build", fx_plain=None),
    ]
    path = tmp_path / "zoo.csv"
    write_csv(records, path)
    assert read_csv(path) == records
    text = path.read_text()
    for bad, column in [("True", "fx_plain"), ("8", "points")]:
        (tmp_path / "bad.csv").write_text(text.replace(f",{bad},", ",maybe,", 1))
        with pytest.raises(ValueError, match=rf"bad.csv, line 2, column '{column}': "):
            read_csv(tmp_path / "bad.csv")
    (tmp_path / "bad.csv").write_text(text.replace("fx_plain", "plain_fx", 1))
    with pytest.raises(ValueError, match="unknown column 'plain_fx'"):
        read_csv(tmp_path / "bad.csv")


def test_zoo_report_does_not_depend_on_the_order_the_sweep_finished_in(tmp_path):
    from attn_inject.zoo.sweep import ZooRecord

    records = [
        ZooRecord("timm", name, recipe, "ok", fx_plain=True, points=points, stage_agreement=agreement)
        for name, points, agreement in [
            ("b", 4, "differs: s1 has 8 channels in the graph, feature_info says 4"),
            ("a", 0, "differs: s0 has 6 channels in the graph, feature_info says 3"),
            ("c", 2, "agree"),
        ]
        for recipe in ("se_resnet", "cbam_after_every_stage")
    ]
    texts = []
    for order in (records, records[::-1]):
        write_markdown(order, tmp_path / "zoo.md", command="test", seconds=1.0, machine="m")
        texts.append((tmp_path / "zoo.md").read_text())
    assert texts[0] == texts[1]
    assert texts[0].index("| a | differs") < texts[0].index("| b | differs")


def test_zoo_command_writes_both_files_and_rejects_bad_input(tmp_path, capsys):
    assert (
        main(
            [
                "zoo",
                "--source",
                "timm",
                "--filter",
                "resnet10t",
                "--recipes",
                "se_resnet",
                "--jobs",
                "1",
                "--out",
                str(tmp_path),
            ]
        )
        == 0
    )
    assert (tmp_path / "zoo.md").exists() and (tmp_path / "zoo.csv").exists()
    assert main(["zoo", "--filter", "no_such_model*", "--out", str(tmp_path)]) == 2
    assert "no model from 'all' matches --filter 'no_such_model*'" in capsys.readouterr().err
    assert main(["zoo", "--recipes", "no_such_recipe", "--out", str(tmp_path)]) == 1


def test_identity_every_n_checks_every_nth_model_and_says_so(tmp_path, capsys):
    args = ["zoo", "--source", "timm", "--filter", "resnet1[04]t", "--recipes", "se_resnet", "--jobs", "1"]
    assert main([*args, "--identity-check", "--identity-every", "2", "--out", str(tmp_path)]) == 0
    rows = {r.model: r for r in read_csv(tmp_path / "zoo.csv")}
    assert sorted(rows) == ["resnet10t", "resnet14t"]
    assert rows["resnet10t"].identity == "ok" and rows["resnet14t"].identity == ""
    text = (tmp_path / "zoo.md").read_text()
    assert "identity check ran on one model in every 2 of the sorted list (1 models)" in text
    assert main([*args, "--identity-every", "0", "--out", str(tmp_path)]) == 2
    assert "--identity-every must be at least 1, got 0" in capsys.readouterr().err


def test_zoo_update_sweeps_the_filtered_models_again_and_keeps_every_other_row(tmp_path, capsys, monkeypatch):
    # The report names the command main was given, whatever the process's own arguments are.
    monkeypatch.setattr(sys, "argv", ["pytest", *(f"tests/test_{i}.py" for i in range(40))])
    args = ["zoo", "--source", "timm", "--recipes", "se_resnet", "--jobs", "1", "--out", str(tmp_path)]
    sample = ["--identity-check", "--identity-every", "2"]
    assert main([*args, "--filter", "resnet1[04]t", *sample]) == 0
    before = (tmp_path / "zoo.csv").read_text()
    rows = read_csv(tmp_path / "zoo.csv")
    stale = [dataclasses.replace(r, points=99) if r.model == "resnet14t" else r for r in rows]
    write_csv(stale, tmp_path / "zoo.csv")
    assert main([*args, "--update", "--filter", "resnet14t", *sample]) == 0
    after = {r.model: r for r in read_csv(tmp_path / "zoo.csv")}
    assert after["resnet14t"].points == next(r.points for r in rows if r.model == "resnet14t") != 99
    # the sample is every 2nd model of the full list an update keeps, not of the models it sweeps
    sampled = list_zoo("timm").index("timm:resnet14t") % 2 == 0
    assert after["resnet14t"].identity == ("ok" if sampled else "")
    assert after["resnet10t"] == next(r for r in rows if r.model == "resnet10t")  # kept as it was
    text = (tmp_path / "zoo.md").read_text()
    assert text.count("Generated by `attn-inject zoo") == 1  # the full sweep's line, kept
    assert "Generated by `attn-inject zoo --source timm --recipes se_resnet --identity-check" in text
    assert "tests/test_" not in text
    assert "The rows of 1 models were swept again by `attn-inject zoo" in text
    assert [line.split(",")[:5] for line in (tmp_path / "zoo.csv").read_text().splitlines()] == [
        line.split(",")[:5] for line in before.splitlines()
    ]
    assert main([*args, "--update"]) == 2
    assert "--update sweeps the models --filter names" in capsys.readouterr().err
    assert main([*args[:-1], str(tmp_path / "none"), "--update", "--filter", "resnet14t"]) == 2
    assert "which does not exist: run the full sweep first" in capsys.readouterr().err
