"""The plan diagram: one column per stage, one badge per insertion point, the totals, and
the SVG / PNG files a user opens. The SVG is read back as a user's browser would: groups,
the paths matplotlib drew and the text it kept as text."""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET

import matplotlib.figure
import pytest
from PIL import Image

import attn_inject as ai
from attn_inject.planning import diagram as diagram_module
from attn_inject.planning.diagram import plan_layout, save_diagram, to_svg
from attn_inject.planning.points import InsertionPoint, Plan
from attn_inject.recipes.recipe import BlockSpec, Recipe

from .conftest import SIZE, meta_model

SVG = "{http://www.w3.org/2000/svg}"
RESNET18_STAGES = ("layer1", "layer2", "layer3", "layer4")


# --- plans ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def resnet18():
    return meta_model("tv:resnet18")


@pytest.fixture(scope="module")
def se_plan(resnet18):
    return ai.plan(resnet18, "se_resnet", input_size=SIZE)


@pytest.fixture(scope="module")
def cbam_plan(resnet18):
    return ai.plan(resnet18, "cbam_after_every_stage", input_size=SIZE)


def point(
    name: str,
    stage: int | None,
    *,
    kind: str = "se",
    position: str = "residual_branch",
    channels: int = 64,
    params: int = 100,
) -> InsertionPoint:
    node = name.replace(".", "_") or "x"
    return InsertionPoint(
        name=name,
        position=position,
        channels=channels,
        block=BlockSpec(kind, {}),
        params=params,
        node=node,
        consumers=None,
        shape=(channels, 16, 16),
        stage=stage,
        rule=0,
        key=node,
    )


def hand_plan(points, stages=("layer1", "layer2"), model="Net", base_params=10_000) -> Plan:
    return Plan(
        points=tuple(points),
        recipe=Recipe(name="hand", rules=()),
        init="identity",
        input_size=(3, 64, 64),
        model_name=model,
        base_params=base_params,
        stages=tuple(stages),
    )


# --- reading the SVG back ---------------------------------------------------------------


def svg_root(plan: Plan) -> ET.Element:
    return ET.fromstring(to_svg(plan_layout(plan)))


def all_text(root: ET.Element) -> list[str]:
    return ["".join(t.itertext()) for t in root.iter(f"{SVG}text")]


def groups(root: ET.Element, cls: str) -> list[ET.Element]:
    return [g for g in root.iter(f"{SVG}g") if cls in g.get("class", "").split()]


def points_of(path: ET.Element) -> list[tuple[float, float]]:
    numbers = [float(v) for v in re.findall(r"-?\d+(?:\.\d+)?(?:e-?\d+)?", path.get("d"))]
    return list(zip(numbers[::2], numbers[1::2], strict=True))


def shape(group: ET.Element) -> ET.Element:
    """The path matplotlib drew for a box: the first one in its group."""
    return next(group.iter(f"{SVG}path"))


def rect(group: ET.Element) -> tuple[float, float, float, float]:
    """The bounding box of a box's outline (a rounded rectangle's corner control points lie
    on its edges, so this is the rectangle)."""
    xs, ys = zip(*points_of(shape(group)), strict=True)
    return min(xs), min(ys), max(xs) - min(xs), max(ys) - min(ys)


def fill(group: ET.Element) -> str:
    return re.search(r"fill: (#[0-9a-fA-F]{6})", shape(group).get("style")).group(1).upper()


def texts_of(group: ET.Element) -> list[str]:
    return ["".join(t.itertext()) for t in group.iter(f"{SVG}text")]


def size_of(root: ET.Element) -> tuple[float, float]:
    return float(root.get("width").removesuffix("pt")), float(root.get("height").removesuffix("pt"))


def columns(root: ET.Element) -> dict[str, tuple[float, float, float, float]]:
    """Column title -> rectangle, left to right."""
    found = sorted(groups(root, "column"), key=lambda g: rect(g)[0])
    return {texts_of(g)[0]: rect(g) for g in found}


def inside(inner, outer) -> bool:
    x, y, w, h = inner
    ox, oy, ow, oh = outer
    return ox <= x and x + w <= ox + ow and oy <= y and y + h <= oy + oh


def badges_in(root: ET.Element, column) -> list[ET.Element]:
    return [g for g in groups(root, "badge") + groups(root, "more") if inside(rect(g), column)]


# --- tests ------------------------------------------------------------------------------


def test_svg_parses_and_declares_width_height_and_viewbox(se_plan):
    root = svg_root(se_plan)
    assert root.tag == f"{SVG}svg"
    width, height = size_of(root)
    layout = plan_layout(se_plan)
    assert (width, height) == (layout.width, layout.height)
    assert [float(v) for v in root.get("viewBox").split()] == [0, 0, width, height]


def test_every_box_is_drawn_where_the_layout_put_it(cbam_plan):
    layout = plan_layout(cbam_plan)
    root = svg_root(cbam_plan)
    drawn = [
        g for g in root.iter(f"{SVG}g") if g.get("class") in ("input", "column", "badge marker", "swatch")
    ]
    assert len(drawn) == len(layout.boxes)
    for group, box in zip(drawn, layout.boxes, strict=True):
        assert rect(group) == pytest.approx((box.x, box.y, box.w, box.h), abs=0.01)
        assert fill(group) == box.fill.upper()
        assert texts_of(group) == [t.text for t in box.texts]


def test_columns_are_input_stem_each_stage_and_head_left_to_right(se_plan):
    root = svg_root(se_plan)
    assert list(columns(root)) == ["stem", *RESNET18_STAGES, "head"]
    text = all_text(root)
    assert "input" in text and "3×64×64" in text
    assert any("ResNet + se_resnet" in t and "init=identity" in t for t in text)


def test_each_residual_block_is_one_badge_inside_its_stage_column(se_plan):
    root = svg_root(se_plan)
    cols = columns(root)
    labels = {title: [texts_of(g) for g in badges_in(root, box)] for title, box in cols.items()}
    # resnet18 has two BasicBlocks per stage: layerN.0 and layerN.1, on the residual branch.
    assert labels == {
        "stem": [],
        "head": [],
        **{s: [[f"{s}.0", "res"], [f"{s}.1", "res"]] for s in RESNET18_STAGES},
    }
    assert len(groups(root, "badge")) == len(se_plan.points) == 8


def test_column_headers_show_channels_and_block_count(se_plan):
    text = all_text(svg_root(se_plan))
    for stage, channels in zip(RESNET18_STAGES, (64, 128, 256, 512), strict=True):
        assert stage in text
        assert f"{channels} ch · 2 blocks" in text
    assert text.count("no blocks") == 2  # stem and head


def test_stage_outputs_sit_on_the_arrow_between_their_stage_and_the_next(cbam_plan):
    root = svg_root(cbam_plan)
    cols = columns(root)
    markers = sorted(groups(root, "marker"), key=lambda g: rect(g)[0])
    assert len(markers) == 4
    assert all(badges_in(root, box) == [] for box in cols.values())  # nothing inside the columns
    arrows = [points_of(shape(g)) for g in groups(root, "arrow")]
    titles = list(cols)
    for marker, stage in zip(markers, RESNET18_STAGES, strict=True):
        assert marker.get("data-kind") == "cbam" and texts_of(marker) == ["cbam"]
        x, y, w, h = rect(marker)
        before, after = cols[stage], cols[titles[titles.index(stage) + 1]]
        assert before[0] + before[2] <= x and x + w <= after[0]
        assert any(a[0][0] <= x + w / 2 <= a[-1][0] + 10 and y <= a[0][1] <= y + h for a in arrows), (
            f"the {stage} marker is not on an arrow"
        )
    assert "64 ch · 1 block" in all_text(root)


def test_colours_differ_by_block_kind_and_match_the_legend(resnet18):
    recipe = {
        "name": "mix",
        "rules": [
            {"block": "se", "at": "residual_branch", "stages": [0]},
            {"block": "eca", "at": "residual_branch", "stages": [1]},
            {"block": "cbam", "at": "stage_output", "stages": [3]},
        ],
    }
    root = svg_root(ai.plan(resnet18, recipe, input_size=SIZE))
    fills: dict[str, set[str]] = {}
    for g in groups(root, "badge"):
        fills.setdefault(g.get("data-kind"), set()).add(fill(g))
    assert set(fills) == {"se", "eca", "cbam"}
    assert all(len(f) == 1 for f in fills.values())  # one colour per kind
    colour = {kind: next(iter(f)) for kind, f in fills.items()}
    assert len(set(colour.values())) == 3
    legend = {g.get("data-kind"): fill(g) for g in groups(root, "swatch")}
    assert legend == colour


def test_unregistered_block_kinds_get_colours_of_their_own():
    plan = hand_plan(
        [point("a.0", 0, kind="se"), point("a.1", 0, kind="gate_a"), point("b.0", 1, kind="gate_b")]
    )
    fills = {g.get("data-kind"): fill(g) for g in groups(svg_root(plan), "badge")}
    assert len(set(fills.values())) == 3


def test_footer_totals_are_the_sum_over_the_points(resnet18, se_plan):
    added = sum(p.params for p in se_plan.points)
    base = sum(p.numel() for p in resnet18.parameters())
    expected = f"8 blocks, +{added:,} parameters ({100 * added / base:.2f}% of {base:,})"
    assert expected in all_text(svg_root(se_plan))


@pytest.mark.parametrize("n, badges, more", [(12, 12, 0), (13, 10, 3), (14, 10, 4)])
def test_a_full_column_shows_ten_badges_and_how_many_more(n, badges, more):
    names = [f"layer1.{i}" for i in range(n)]
    plan = hand_plan([point(name, 0) for name in names] + [point("layer2.0", 1)])
    root = svg_root(plan)
    shown = badges_in(root, columns(root)["layer1"])
    assert [texts_of(g)[0] for g in shown if "badge" in g.get("class")] == names[:badges]
    extra = [texts_of(g) for g in shown if g.get("class") == "more"]
    assert extra == ([[f"+{more} more"]] if more else [])
    assert f"64 ch · {n} blocks" in all_text(root)


def test_points_outside_every_stage_go_to_stem_before_the_first_stage_else_to_head():
    plan = hand_plan(
        [
            point("conv1", None, position="conv_output"),
            point("layer1.0", 0),
            point("pre_logits", None, position="conv_output"),
        ]
    )
    root = svg_root(plan)
    cols = columns(root)
    assert [texts_of(g)[0] for g in badges_in(root, cols["stem"])] == ["conv1"]
    assert [texts_of(g)[0] for g in badges_in(root, cols["head"])] == ["pre_logits"]


def test_a_plan_without_stages_draws_one_column_with_every_point():
    plan = hand_plan([point("features.0", None), point("features.3", None)], stages=())
    root = svg_root(plan)
    cols = columns(root)
    assert list(cols) == ["model"]
    assert [texts_of(g)[0] for g in badges_in(root, cols["model"])] == ["features.0", "features.3"]


def test_an_empty_plan_draws_the_stages_and_zero_totals():
    plan = hand_plan([], stages=RESNET18_STAGES)
    root = svg_root(plan)
    assert list(columns(root)) == ["stem", *RESNET18_STAGES, "head"]
    assert groups(root, "badge") == []
    assert any(t.startswith("0 blocks, +0 parameters") for t in all_text(root))


def test_badges_and_columns_do_not_overlap_and_stay_in_the_picture(se_plan, cbam_plan):
    for plan in (se_plan, cbam_plan):
        root = svg_root(plan)
        picture = (0, 0, *size_of(root))
        boxes = [rect(g) for g in groups(root, "badge") + groups(root, "column") + groups(root, "input")]
        assert all(inside(b, picture) for b in boxes)
        badge_boxes = [rect(g) for g in groups(root, "badge")]
        column_boxes = [rect(g) for g in groups(root, "column") + groups(root, "input")]
        for group in (badge_boxes, column_boxes):
            for i, (x, y, w, h) in enumerate(group):
                for x2, y2, w2, h2 in group[i + 1 :]:
                    assert x + w <= x2 or x2 + w2 <= x or y + h <= y2 or y2 + h2 <= y


def test_names_with_markup_characters_are_escaped():
    plan = hand_plan([point("a<b>&c", 0), point("x$y$", 0)], stages=("stage<1>&",), model="Net<&>")
    svg = to_svg(plan_layout(plan))
    assert "<b>" not in svg
    root = ET.fromstring(svg)  # parses
    text = all_text(root)
    assert "a<b>&c" in text and "stage<1>&" in text and "x$y$" in text  # no mathtext either
    assert any(t.startswith("Net<&> + hand") for t in text)
    assert "a<b>&c" in "".join(groups(root, "badge")[0].find(f"{SVG}title").itertext())


def test_long_module_names_keep_their_end_and_the_full_name_in_the_tooltip():
    name = "features.denseblock4.denselayer16.conv2"
    root = svg_root(hand_plan([point(name, 0)]))
    badge = groups(root, "badge")[0]
    label = texts_of(badge)[0]
    assert label.startswith("…") and label.endswith("denselayer16.conv2") and len(label) <= 22
    assert name in "".join(badge.find(f"{SVG}title").itertext())


def test_png_is_a_png_twice_the_svg_size_with_the_badge_colours(se_plan, tmp_path):
    path = tmp_path / "se.png"
    save_diagram(se_plan, path)
    root = svg_root(se_plan)
    badge = groups(root, "badge")[0]
    with Image.open(path) as image:
        assert image.format == "PNG"
        width, height = size_of(root)
        assert image.size == (2 * width, 2 * height)
        x, y, _, h = rect(badge)
        # the middle of the badge's left padding, in the 2x picture, is the badge colour
        colour = image.convert("RGB").getpixel((round(2 * (x + 3)), round(2 * (y + h / 2))))
    expected = fill(badge)
    assert colour == tuple(int(expected[i : i + 2], 16) for i in (1, 3, 5))
    assert [p.name for p in tmp_path.iterdir()] == ["se.png"]


def test_svg_file_is_the_rendered_diagram_and_nothing_else_is_left(se_plan, tmp_path):
    path = tmp_path / "se.SVG"
    save_diagram(se_plan, str(path))
    assert path.read_text(encoding="utf-8") == to_svg(plan_layout(se_plan))
    assert [p.name for p in tmp_path.iterdir()] == ["se.SVG"]


@pytest.mark.parametrize("name", ["plan.pdf", "plan", "plan.svg.bak"])
def test_unknown_suffix_raises_one_line_and_writes_nothing(se_plan, tmp_path, name):
    with pytest.raises(ValueError) as info:
        save_diagram(se_plan, tmp_path / name)
    message = str(info.value)
    assert "\n" not in message and name in message and ".svg" in message and ".png" in message
    assert list(tmp_path.iterdir()) == []


def test_a_failed_write_leaves_the_old_file_and_no_temporary(se_plan, tmp_path, monkeypatch):
    svg, png = tmp_path / "plan.svg", tmp_path / "plan.png"
    svg.write_text("old")

    def broken(diagram):
        raise RuntimeError("disk full")

    monkeypatch.setattr(diagram_module, "to_svg", broken)
    with pytest.raises(RuntimeError):
        save_diagram(se_plan, svg)

    def half_written(self, fp, *args, **kwargs):
        fp.write(b"\x89PNG partial")
        raise OSError("disk full")

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", half_written)
    with pytest.raises(OSError):
        save_diagram(se_plan, png)
    assert svg.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["plan.svg"]


def test_the_same_plan_gives_the_same_picture(resnet18, se_plan):
    again = ai.plan(resnet18, "se_resnet", input_size=SIZE)
    assert plan_layout(again) == plan_layout(se_plan)
    assert to_svg(plan_layout(again)) == to_svg(plan_layout(se_plan))


def test_a_missing_folder_is_named_in_the_error(se_plan, tmp_path):
    with pytest.raises(FileNotFoundError, match="no_such_folder"):
        save_diagram(se_plan, tmp_path / "no_such_folder" / "plan.svg")
