"""Export with any batch: every built-in block in every layout, and every shipped recipe on a
small model, exports through ``torch.export`` with a dynamic batch dimension, and every block
kind and every layout through the dynamo ONNX exporter; the result runs at batch 1 and 3 and
equals eager. ``validate``'s ``export`` check exports with a dynamic batch and compares at two
batch sizes."""

from __future__ import annotations

import copy
import re
import types
import warnings

import pytest
import timm
import torch
from torch import nn
from torch.export import Dim

import attn_inject as ai

C, H, W = 24, 5, 7
IMAGE = (3, 64, 64)
KINDS = [
    ("se", {}),
    ("se", {"pool": "max"}),
    ("eca", {}),
    ("cbam", {}),
    ("cbam", {"channel": "conv"}),
    ("cbam", {"spatial_norm": True}),
    ("simam", {}),
]
KIND_IDS = ["se", "se-max", "eca", "cbam", "cbam-conv", "cbam-norm", "simam"]
RASTER = list(range(H * W))
LAYOUTS = {  # name -> (layout arguments, one sample's shape)
    "NCHW": ({}, (C, H, W)),
    "NHWC": ({"layout": "NHWC"}, (H, W, C)),
    "tokens": ({"layout": "tokens", "prefix": 1, "grid": (H, W)}, (1 + H * W, C)),
    "tokens-reordered": (
        {"layout": "tokens", "grid": (H, W), "order": RASTER[::2] + RASTER[1::2]},
        (H * W, C),
    ),
}
BATCH = ({0: Dim("batch")},)  # the dynamic_shapes of a model with one input, batch first
# what the onnxruntime run of an ONNX file may differ from eager by (fp32, other kernels)
ONNX_TOLERANCE = {"rtol": 1e-5, "atol": 1e-5}


def trained(block: nn.Module, seed: int = 0) -> nn.Module:
    """Random weights everywhere and blends away from 0, so every part of the block acts."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in block.parameters():
            p.copy_(torch.rand(p.shape, generator=g) * 1.5 - 0.5)
    return block.eval()


def batches(shape: tuple[int, ...], seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn((b, *shape), generator=g) for b in (1, 3)]


def export_any_batch(model: nn.Module, shape: tuple[int, ...]) -> torch.export.ExportedProgram:
    """The user's call: ``torch.export.export`` on a batch of 2 with dimension 0 dynamic."""
    return torch.export.export(model, (torch.randn(2, *shape),), dynamic_shapes=BATCH)


def onnx_session(model: nn.Module, shape: tuple[int, ...]):
    """An onnxruntime session of the ONNX file the dynamo exporter writes for ``model`` on a
    batch of 2 with dimension 0 dynamic (the user's call)."""
    pytest.importorskip("onnxscript", reason="the dynamo ONNX exporter needs onnxscript")
    ort = pytest.importorskip("onnxruntime", reason="the ONNX file is run by onnxruntime")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's notes on its own progress
        program = torch.onnx.export(
            model, (torch.randn(2, *shape),), dynamo=True, dynamic_shapes=BATCH, verbose=False
        )
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(
        program.model_proto.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )


def run_onnx(session, x: torch.Tensor) -> torch.Tensor:
    (out,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    return torch.from_numpy(out)


def assert_runs_from_its_onnx_file(model: nn.Module, shape: tuple[int, ...]) -> None:
    session = onnx_session(model, shape)
    with torch.no_grad():
        for x in batches(shape):
            torch.testing.assert_close(run_onnx(session, x), model(x), **ONNX_TOLERANCE)


def assert_exports_with_any_batch(model: nn.Module, shape: tuple[int, ...]) -> None:
    module = export_any_batch(model, shape).module()
    with torch.no_grad():
        for x in batches(shape):
            torch.testing.assert_close(module(x), model(x), rtol=1e-6, atol=1e-6)


# -- blocks -----------------------------------------------------------------------------------


class SideBySide(nn.Module):
    """Blocks side by side on one input, each output returned: one export checks them all, and
    each block's output is still compared with that block's own eager output."""

    def __init__(self, blocks: list[nn.Module]) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(block(x) for block in self.blocks)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_block_exports_with_a_dynamic_batch_and_matches_eager_at_batch_1_and_3(layout):
    """Every kind with every option in ``layout``, exported together side by side."""
    arguments, shape = LAYOUTS[layout]
    blocks = [trained(ai.create_block(k, C, init="paper", **arguments, **p)) for k, p in KINDS]
    module = export_any_batch(SideBySide(blocks).eval(), shape).module()
    with torch.no_grad():
        for x in batches(shape):
            for kind, block, got in zip(KIND_IDS, blocks, module(x), strict=True):
                torch.testing.assert_close(got, block(x), rtol=1e-6, atol=1e-6, msg=kind)


@pytest.mark.parametrize("layout", ["NCHW", "tokens"])
def test_an_exported_identity_block_returns_its_input_exactly_at_any_batch(layout):
    """se, eca, cbam and simam at identity in ``layout``, exported together side by side."""
    arguments, shape = LAYOUTS[layout]
    kinds = ["se", "eca", "cbam", "simam"]
    blocks = [ai.create_block(kind, C, init="identity", **arguments).eval() for kind in kinds]
    module = export_any_batch(SideBySide(blocks).eval(), shape).module()
    for x in batches(shape):
        for kind, got in zip(kinds, module(x), strict=True):
            assert torch.equal(got, x), kind


class EveryBlock(nn.Module):
    """Blocks in every layout, one after another, on one (B, C, H, W) map: the map, then
    channels last, then as tokens behind a prefix token, then as tokens in another order (one
    ONNX export for them all). ``kinds`` names the blocks of each layout."""

    def __init__(self, kinds: dict[str, list[tuple[str, dict]]]) -> None:
        super().__init__()
        self.stages = nn.ModuleList(
            nn.Sequential(*(ai.create_block(k, C, **LAYOUTS[layout][0], **p) for k, p in kinds[layout]))
            for layout in LAYOUTS
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        nchw, nhwc, tokens, reordered = self.stages
        x = nhwc(nchw(x).permute(0, 2, 3, 1))  # (B, H, W, C)
        grid = x.flatten(1, 2)
        x = tokens(torch.cat([grid.mean(1, keepdim=True), grid], dim=1))  # (B, 1 + H W, C)
        return reordered(x[:, 1:])  # (B, H W, C)


BASE_KINDS = [k for k in KINDS if not k[1]]  # se, eca, cbam, simam with the papers' options
OTHER_OPTIONS = [k for k in KINDS if k[1]]
# Each kind once and each layout once: CBAM where the token order matters (its spatial map),
# SE where the prefix token must stay out of the pool; CBAM on NCHW runs from its ONNX file in
# the model test below. Every other pairing is in the wider sweep.
ONE_OF_EACH = {
    "NCHW": [("simam", {})],
    "NHWC": [("eca", {})],
    "tokens": [("se", {})],
    "tokens-reordered": [("cbam", {})],
}


@pytest.mark.parametrize(
    "kinds",
    [
        pytest.param(ONE_OF_EACH, id="each-kind-and-layout-once"),
        pytest.param(dict.fromkeys(LAYOUTS, BASE_KINDS), id="papers-options", marks=pytest.mark.zoo),
        pytest.param(dict.fromkeys(LAYOUTS, OTHER_OPTIONS), id="other-options", marks=pytest.mark.zoo),
    ],
)
def test_every_block_in_every_layout_runs_from_its_onnx_file_at_batch_1_and_3(kinds):
    assert_runs_from_its_onnx_file(trained(EveryBlock(kinds)), (C, H, W))


# -- models -----------------------------------------------------------------------------------


class BatchOfTwoHead(nn.Linear):
    """A head that reads the batch size (fx keeps it whole; torch.export fixes the batch to 2)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] == 2:
            x = x + 0
        return nn.functional.linear(x, self.weight, self.bias)


class Net(nn.Module):
    def __init__(self, head: nn.Module) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = x + self.bn(self.conv(x))
        return self.head(x.mean((2, 3)))


SIZE = (3, 16, 16)
CBAM_RECIPE = {
    "name": "cbam_branch",
    "rules": [{"at": "residual_branch", "block": {"kind": "cbam", "ratio": 4}}],
}


# -- recipes on a model ------------------------------------------------------------------------


SMALL_RESNET = "timm:resnet10t"  # resnet18's basic blocks, one a stage


def small_vit() -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", img_size=IMAGE[1], depth=2).eval()


def paper_init(model: nn.Module, recipe: str) -> nn.Module:
    """``model`` with ``recipe``'s blocks at the paper's init, so every block acts."""
    return ai.inject(model, recipe, init="paper", input_size=IMAGE).eval()


# recipes that put the same blocks at other points of the same network: in the wider sweep
SAME_BLOCKS_ELSEWHERE = {"se_pre", "se_post", "se_after_every_stage", "eca_after_every_stage"}
EXPORT_RECIPES = [
    pytest.param(recipe, marks=pytest.mark.zoo if recipe in SAME_BLOCKS_ELSEWHERE else ())
    for recipe in ai.list_recipes()
]


@pytest.mark.parametrize("recipe", EXPORT_RECIPES)
def test_every_recipe_exports_with_a_dynamic_batch_and_matches_eager_at_batch_1_and_3(recipe, build):
    torch.manual_seed(0)
    assert_exports_with_any_batch(paper_init(build(SMALL_RESNET), recipe), IMAGE)


@pytest.mark.zoo  # the dynamo ONNX exporter takes seconds a network: the wider sweep
@pytest.mark.parametrize("recipe", ai.list_recipes())
def test_every_recipe_runs_from_its_onnx_file_at_batch_1_and_3(recipe, build):
    torch.manual_seed(0)
    patched = paper_init(build(SMALL_RESNET), recipe)
    assert_runs_from_its_onnx_file(patched, IMAGE)


def test_a_cbam_model_runs_from_its_onnx_file_at_batch_1_and_3():
    torch.manual_seed(0)
    model = Net(nn.Linear(8, 4)).eval()
    patched = ai.inject(model, "cbam_resnet", init="paper", input_size=SIZE).eval()
    assert [type(b).__name__ for b in ai.inserted_blocks(patched).values()] == ["CBAM"]
    assert_runs_from_its_onnx_file(patched, SIZE)


def test_cbam_on_the_token_grid_of_a_vit_exports_with_a_dynamic_batch():
    patched = paper_init(small_vit(), "cbam_after_every_stage")
    assert {p.layout for p in patched.attn_inject.plan} == {"tokens"}
    assert_exports_with_any_batch(patched, IMAGE)


# -- validate's export check -------------------------------------------------------------------


def export_check(original: nn.Module, patched: nn.Module, batch: int = 2) -> ai.validation.Check:
    report = ai.validate(original, patched, device="cpu", batch=batch, seeds=1, checks=("export",))
    return report.check("export")


@pytest.mark.parametrize(("batch", "other"), [(2, 1), (1, 3)])
def test_the_export_check_compares_a_dynamic_batch_export_at_two_batch_sizes(batch, other):
    torch.manual_seed(0)
    model = Net(nn.Linear(8, 4)).eval()
    patched = ai.inject(model, CBAM_RECIPE, init="paper", input_size=SIZE)
    check = export_check(model, patched, batch)
    assert check.status == "passed", check
    assert "with a dynamic batch" in check.detail, check.detail
    assert re.search(rf"[0-9.e+-]+ at batch {batch}, [0-9.e+-]+ at batch {other} \(shares", check.detail), (
        check
    )


def test_the_export_check_fails_a_patched_model_that_exports_only_at_a_fixed_batch():
    torch.manual_seed(0)
    model = Net(nn.Linear(8, 4)).eval()
    patched = ai.inject(model, CBAM_RECIPE, input_size=SIZE)
    if patched.head is model.head:  # a module the patched model shares: its own copy
        patched.head = copy.deepcopy(model.head)
    patched.head.forward = types.MethodType(BatchOfTwoHead.forward, patched.head)
    check = export_check(model, patched)
    assert check.status == "failed", check
    assert "exports only at batch 2, the original with any batch" in check.detail, check.detail
    assert "specialized it to be a constant (2)" in check.detail, check.detail


def test_the_export_check_is_skipped_when_the_original_exports_only_at_a_fixed_batch_too():
    torch.manual_seed(0)
    model = Net(BatchOfTwoHead(8, 4)).eval()
    patched = ai.inject(model, CBAM_RECIPE, input_size=SIZE)
    check = export_check(model, patched)
    assert check.status == "skipped", check
    assert "the original does not export with a dynamic batch either" in check.detail, check.detail
