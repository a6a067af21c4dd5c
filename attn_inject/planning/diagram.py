"""A picture of a plan: the model's stages, left to right, and where each block goes.

``plan_layout(plan)`` places everything and returns a :class:`Diagram`, plain typed data
(boxes, arrows and text with their coordinates) that can be printed and tested without
rendering; ``figure`` draws it as one matplotlib figure, which ``to_svg`` and ``to_png``
save; ``save_diagram`` picks the format from the file name::

    >>> p = attn_inject.plan(torchvision.models.resnet18(), "cbam_after_every_stage")
    >>> save_diagram(p, "resnet18_cbam.svg")

draws (the blocks of this recipe sit between stages, on the arrows)::

    ResNet + cbam_after_every_stage (init=identity, input 3×224×224)
    ■ cbam(ratio=16, spatial_kernel=7)
    stage = stage output, on the arrow
              ┌─────────┐   ┌──────────────┐          ┌──────────────┐          ┌─────────┐
    [ input ]→│  stem   │ → │    layer1    │ (cbam) → │    layer2    │ (cbam) → │ ...     │
              │no blocks│   │ 64 ch·1 block│          │128 ch·1 block│          │         │
              └─────────┘   └──────────────┘          └──────────────┘          └─────────┘
    4 blocks, +44,940 parameters (0.38% of 11,689,512)

One badge per insertion point, coloured by block kind and labelled with its module name and
position; a column with more than 12 points shows the first 10 and a "+N more" badge.
``stage_output`` points sit between stages, so they are drawn on the arrow that leaves their
stage. Points outside every stage go to "stem" when they come before the first staged point
of the plan, else to "head". In the SVG each badge carries the full insertion point as a
tooltip, and ``data-point`` (its index in the plan), ``data-kind`` and ``data-position``.
Text stays text in the SVG (matplotlib's ``svg.fonttype = "none"``).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, NamedTuple

from ..core.errors import InputError
from ..core.files import atomic_path
from .points import InsertionPoint, Plan

__all__ = ["Arrow", "Box", "Diagram", "Text", "plan_layout", "save_diagram", "to_png", "to_svg"]

# Colours: block kinds (white text on each), then the picture's neutrals.
KIND_COLOURS = {"se": "#2F6DB5", "eca": "#2E7D32", "cbam": "#C0392B"}
OTHER_COLOURS = ("#7B4FA0", "#B35400", "#00838F", "#795548", "#AD1457", "#5D6B00")
INK = "#1F2328"
MUTED = "#5F6670"
BACKGROUND = "#FFFFFF"
COLUMN_FILL = "#F4F6F9"
COLUMN_STROKE = "#C5CCD6"
MORE_FILL = "#E3E7ED"
ARROW = "#8A929E"

POSITION_ABBREVIATIONS = {
    "residual_branch": ("res", "residual branch"),
    "pre_block": ("pre", "before the block"),
    "identity_branch": ("id", "identity branch"),
    "post_block": ("post", "after the addition"),
    "stage_output": ("stage", "stage output, on the arrow"),
    "conv_output": ("conv", "after conv-norm-act"),
}

MAX_BADGES = 12  # a column with more points than this shows SHOWN_BADGES and "+N more"
SHOWN_BADGES = 10
MAX_LABEL = 22  # characters of a module name on a badge; longer names keep their end

MARGIN = 24
TITLE_SIZE = 17
HEADER_SIZE = 13
SMALL_SIZE = 11
BADGE_SIZE = 11
BADGE_H = 22
BADGE_GAP = 6
BADGE_PAD = 7
COLUMN_PAD = 10
HEADER_H = 46
MIN_COLUMN_INNER = 96
GAP = 36  # between columns when no stage_output marker sits in the gap
ARROW_HEAD = 7


@dataclass(frozen=True)
class Text:
    """A line of text; ``(x, y)`` is on its baseline, at its start, middle or end."""

    x: float
    y: float
    text: str
    size: float = SMALL_SIZE
    color: str = INK
    anchor: str = "start"  # start | middle | end
    bold: bool = False


@dataclass(frozen=True)
class Box:
    """A rounded rectangle with its text.

    ``role`` says what it shows: ``input``, ``column`` (a stem, stage or head), ``badge`` (an
    insertion point in a column), ``marker`` (a ``stage_output`` point on an arrow), ``more``
    (the points a full column leaves out, listed in ``hidden``) or ``swatch`` (legend).
    ``kind`` is the block kind and ``point`` the index of the insertion point in the plan.
    """

    x: float
    y: float
    w: float
    h: float
    role: str
    fill: str
    stroke: str = "none"
    radius: float = 0.0
    texts: tuple[Text, ...] = ()
    tooltip: str = ""
    kind: str | None = None
    position: str | None = None
    point: int | None = None
    hidden: tuple[int, ...] = ()


@dataclass(frozen=True)
class Arrow:
    """A horizontal or sloped line from ``(x1, y1)`` with its head at ``(x2, y2)``."""

    x1: float
    y1: float
    x2: float
    y2: float
    color: str = ARROW


@dataclass(frozen=True)
class Diagram:
    """Everything to draw, in drawing order: arrows, then boxes, then free text."""

    width: float
    height: float
    title: str
    boxes: tuple[Box, ...]
    arrows: tuple[Arrow, ...]
    texts: tuple[Text, ...]

    @property
    def badges(self) -> tuple[Box, ...]:
        """The boxes that stand for one insertion point each (badges and markers)."""
        return tuple(b for b in self.boxes if b.point is not None)

    def __str__(self) -> str:
        return (
            f"Diagram {self.width:g}x{self.height:g}: {len(self.boxes)} boxes "
            f"({len(self.badges)} insertion points), {len(self.arrows)} arrows"
        )


# ---------------------------------------------------------------------------------------
# layout


def _char_width(ch: str) -> float:
    """Width of one character in em, on the wide side of common sans-serif fonts."""
    if ch in "ijl.,:;'|!` ":
        return 0.32
    if ch in 'frt()[]{}-/\\"':
        return 0.45
    if ch in "mwMW@%&":
        return 0.95
    if ch.isupper() or ch in "<>=+~#_×–…":
        return 0.76
    if ch.isdigit():
        return 0.64
    return 0.62


def _text_width(text: str, size: float, bold: bool = False) -> float:
    """An upper estimate of how wide ``text`` is drawn at ``size`` px."""
    return sum(_char_width(ch) for ch in text) * size * (1.1 if bold else 1.0)


def _clip(text: str, limit: int = MAX_LABEL) -> str:
    """``text``, or its last characters after an ellipsis when longer than ``limit``."""
    return text if len(text) <= limit else "…" + text[-(limit - 1) :]


def _luminance(colour: str) -> float:
    def channel(v: int) -> float:
        c = v / 255
        return c / 12.92 if c <= 0.03928 else ((c + 0.055) / 1.055) ** 2.4

    r, g, b = (int(colour[i : i + 2], 16) for i in (1, 3, 5))
    return 0.2126 * channel(r) + 0.7152 * channel(g) + 0.0722 * channel(b)


def _ink_on(fill: str) -> str:
    """White or dark text, whichever contrasts more with ``fill``."""
    return INK if _luminance(fill) > 0.179 else "#FFFFFF"


def _kind_colours(points: Sequence[InsertionPoint]) -> dict[str, str]:
    """A colour per block kind: fixed for se/eca/cbam, others in order of first appearance."""
    colours: dict[str, str] = {}
    others = 0
    for p in points:
        kind = p.block.kind
        if kind in colours:
            continue
        if kind in KIND_COLOURS:
            colours[kind] = KIND_COLOURS[kind]
        else:
            colours[kind] = OTHER_COLOURS[others % len(OTHER_COLOURS)]
            others += 1
    return colours


def _abbreviation(position: str) -> str:
    return POSITION_ABBREVIATIONS.get(position, (position, position))[0]


def _label(p: InsertionPoint) -> str:
    return _clip(p.name or p.node or "(model)")


def _count(n: int) -> str:
    return "no blocks" if n == 0 else f"{n} block" if n == 1 else f"{n} blocks"


def _channels(points: Sequence[InsertionPoint]) -> str:
    values = sorted({p.channels for p in points})
    if not values:
        return ""
    if len(values) == 1:
        return f"{values[0]} ch"
    return f"{values[0]}–{values[-1]} ch"


def _assign(plan: Plan) -> tuple[list[str], list[list[int]], list[list[int]]]:
    """Column titles, the points drawn in each column, and the ``stage_output`` points drawn
    on the arrow that leaves each column (indexes into the plan)."""
    stages = tuple(plan.stages)
    titles = ["stem", *stages, "head"] if stages else ["model"]
    members: list[list[int]] = [[] for _ in titles]
    markers: list[list[int]] = [[] for _ in titles]
    staged_seen = False
    for i, p in enumerate(plan.points):
        stage = p.stage if p.stage is not None and 0 <= p.stage < len(stages) else None
        if stage is None:
            members[-1 if staged_seen else 0].append(i)
            continue
        staged_seen = True
        (markers if p.position == "stage_output" else members)[stage + 1].append(i)
    return titles, members, markers


def _badge(p: InsertionPoint, i: int, x: float, y: float, w: float, fill: str) -> Box:
    """A point in a column: its module name on the left, its position on the right."""
    ink = _ink_on(fill)
    baseline = y + BADGE_H / 2 + BADGE_SIZE * 0.36
    texts = (
        Text(x + BADGE_PAD, baseline, _label(p), BADGE_SIZE, ink),
        Text(x + w - BADGE_PAD, baseline, _abbreviation(p.position), BADGE_SIZE - 1, ink, anchor="end"),
    )
    return Box(
        x,
        y,
        w,
        BADGE_H,
        "badge",
        fill,
        radius=5,
        texts=texts,
        tooltip=f"#{i}: {p}",
        kind=p.block.kind,
        position=p.position,
        point=i,
    )


def _marker(p: InsertionPoint, i: int, x: float, y: float, w: float, fill: str) -> Box:
    """A ``stage_output`` point on an arrow between stages: a pill with the block kind."""
    baseline = y + BADGE_H / 2 + BADGE_SIZE * 0.36
    texts = (Text(x + w / 2, baseline, p.block.kind, BADGE_SIZE, _ink_on(fill), anchor="middle", bold=True),)
    return Box(
        x,
        y,
        w,
        BADGE_H,
        "marker",
        fill,
        radius=BADGE_H / 2,
        texts=texts,
        tooltip=f"#{i}: {p}",
        kind=p.block.kind,
        position=p.position,
        point=i,
    )


def _badge_width(p: InsertionPoint) -> float:
    return (
        BADGE_PAD
        + _text_width(_label(p), BADGE_SIZE)
        + 12
        + _text_width(_abbreviation(p.position), BADGE_SIZE - 1)
        + BADGE_PAD
    )


def _marker_width(p: InsertionPoint) -> float:
    return max(40, math.ceil(_text_width(p.block.kind, BADGE_SIZE, bold=True)) + 2 * BADGE_PAD + 4)


def _legend(
    plan: Plan, colours: dict[str, str], top: float, width: float
) -> tuple[list[Box], list[Text], float]:
    """The legend rows below the title: block kinds, then position abbreviations. Returns its
    boxes, text and bottom."""
    boxes: list[Box] = []
    texts: list[Text] = []
    specs: dict[str, set[str]] = {}
    for p in plan.points:
        specs.setdefault(p.block.kind, set()).add(str(p.block) if p.block.params else p.block.kind)
    x: float = MARGIN
    baseline: float = top + 12
    if not specs:
        texts.append(Text(x, baseline, "no insertion points: the recipe matched nothing", 12, MUTED))
    for kind, colour in colours.items():
        label = next(iter(specs[kind])) if len(specs[kind]) == 1 else f"{kind} (several settings)"
        w = 14 + 6 + _text_width(label, 12) + 22
        if x > MARGIN and x + w > MARGIN + width:
            x, baseline = MARGIN, baseline + 20
        boxes.append(Box(x, baseline - 11, 14, 14, "swatch", colour, radius=3, kind=kind))
        texts.append(Text(x + 20, baseline, label, 12))
        x += w
    used = [pos for pos in POSITION_ABBREVIATIONS if any(p.position == pos for p in plan.points)]
    used += sorted({p.position for p in plan.points} - set(POSITION_ABBREVIATIONS))
    if used:
        baseline += 19
        x = MARGIN
        for pos in used:
            abbreviation, meaning = POSITION_ABBREVIATIONS.get(pos, (pos, pos))
            label = f"{abbreviation} = {meaning}"
            w = _text_width(label, SMALL_SIZE) + 22
            if x > MARGIN and x + w > MARGIN + width:
                x, baseline = MARGIN, baseline + 17
            texts.append(Text(x, baseline, label, SMALL_SIZE, MUTED))
            x += w
    return boxes, texts, baseline + 6


class _Column(NamedTuple):
    name: str
    title: str  # the name, shortened to fit
    subtitle: str
    shown: list[int]  # points drawn as badges
    hidden: tuple[int, ...]  # points behind "+N more"
    width: int
    rows: int


def plan_layout(plan: Plan) -> Diagram:
    """Place the stages and insertion points of ``plan``: see the module docstring."""
    points = tuple(plan.points)
    colours = _kind_colours(points)
    titles, members, markers = _assign(plan)
    columns = _columns(plan, points, titles, members, markers)
    rows = max(col.rows for col in columns)
    marker_stack = max((len(m) * (BADGE_H + 4) for m in markers), default=0)
    column_h = HEADER_H + (rows * (BADGE_H + BADGE_GAP) - BADGE_GAP + COLUMN_PAD if rows else 0)
    column_h = max(column_h, marker_stack + 12)
    gaps = [max([GAP] + [_marker_width(points[i]) + 32 for i in m]) for m in markers]

    # Title and legend on top; their width depends on the columns' total width.
    size_text = "×".join(str(s) for s in plan.input_size)
    input_w = (
        math.ceil(max(_text_width("input", 12, bold=True), _text_width(size_text, SMALL_SIZE)))
        + 2 * COLUMN_PAD
    )
    row_w = input_w + GAP + sum(col.width for col in columns) + sum(gaps[:-1])
    heading = f"{plan.model_name} + {plan.recipe.name} (init={plan.init}, input {size_text})"
    title_y = MARGIN + TITLE_SIZE - 3
    legend_boxes, legend_texts, legend_bottom = _legend(plan, colours, title_y + 10, max(row_w, 560.0))

    # The row: input, columns and the arrows between them, all centred on one line.
    top = round(legend_bottom + 18)
    mid = top + round(column_h / 2)
    row = _Row(top, mid, column_h, gaps, points, colours)
    row.boxes.append(_input_box(MARGIN, mid, input_w, size_text))
    x: float = MARGIN + input_w
    for c, column in enumerate(columns):
        x = row.add_column(c, column, x, markers[c])

    texts = [Text(MARGIN, title_y, heading, TITLE_SIZE, bold=True), *legend_texts]
    footer, bottom = _footer(plan, points, top + column_h + 30)
    texts += footer
    extents = (
        [x] + [t.x + _text_width(t.text, t.size, t.bold) for t in texts] + [b.x + b.w for b in legend_boxes]
    )
    width = round(max(extents) + MARGIN)
    height = round(bottom + MARGIN - 4)
    boxes = tuple(row.boxes + legend_boxes + row.badges)
    return Diagram(width, height, heading, boxes, tuple(row.arrows), tuple(texts))


def _columns(
    plan: Plan,
    points: tuple[InsertionPoint, ...],
    titles: list[str],
    members: list[list[int]],
    markers: list[list[int]],
) -> list[_Column]:
    """Each column's contents and width: its badges (the first ones, when there are too
    many to show), title and subtitle."""
    columns: list[_Column] = []
    for c, name in enumerate(titles):
        shown = members[c] if len(members[c]) <= MAX_BADGES else members[c][:SHOWN_BADGES]
        hidden = tuple(members[c][len(shown) :])
        all_points = [points[i] for i in sorted(members[c] + markers[c])]
        subtitle = " · ".join(s for s in (_channels(all_points), _count(len(all_points))) if s)
        if not plan.stages:
            subtitle = "no stages found · " + subtitle
        title = _clip(name, 28)
        inner = max(
            [MIN_COLUMN_INNER, _text_width(title, HEADER_SIZE, bold=True), _text_width(subtitle, SMALL_SIZE)]
            + [_badge_width(points[i]) for i in shown]
        )
        rows = len(shown) + (1 if hidden else 0)
        columns.append(_Column(name, title, subtitle, shown, hidden, math.ceil(inner) + 2 * COLUMN_PAD, rows))
    return columns


def _input_box(x: float, mid: float, width: float, size_text: str) -> Box:
    return Box(
        x,
        mid - 20,
        width,
        40,
        "input",
        BACKGROUND,
        COLUMN_STROKE,
        6,
        (
            Text(x + width / 2, mid - 4, "input", 12, anchor="middle", bold=True),
            Text(x + width / 2, mid + 12, size_text, SMALL_SIZE, MUTED, anchor="middle"),
        ),
    )


class _Row:
    """The row being laid out: columns left to right, the arrows between them, the badges
    in each column and the stage-output markers on the arrow that leaves it."""

    def __init__(
        self,
        top: float,
        mid: float,
        column_h: float,
        gaps: list[float],
        points: tuple[InsertionPoint, ...],
        colours: dict[str, str],
    ) -> None:
        self.top, self.mid, self.column_h, self.gaps = top, mid, column_h, gaps
        self.points, self.colours = points, colours
        self.boxes: list[Box] = []
        self.arrows: list[Arrow] = []
        self.badges: list[Box] = []

    def add_column(self, c: int, column: _Column, x: float, stack: list[int]) -> float:
        """Column ``c`` after an arrow from ``x``; returns where the next arrow starts."""
        name, title, subtitle, shown, hidden, w, _ = column
        gap = GAP if c == 0 else self.gaps[c - 1]
        self.arrows.append(Arrow(x, self.mid, x + gap, self.mid))
        x += gap
        top = self.top
        header = (
            Text(x + w / 2, top + 19, title, HEADER_SIZE, anchor="middle", bold=True),
            Text(x + w / 2, top + 36, subtitle, SMALL_SIZE, MUTED, anchor="middle"),
        )
        self.boxes.append(
            Box(x, top, w, self.column_h, "column", COLUMN_FILL, COLUMN_STROKE, 8, header, tooltip=name)
        )
        y = top + HEADER_H
        for i in shown:
            p = self.points[i]
            self.badges.append(
                _badge(p, i, x + COLUMN_PAD, y, w - 2 * COLUMN_PAD, self.colours[p.block.kind])
            )
            y += BADGE_H + BADGE_GAP
        if hidden:
            self.badges.append(self._more(hidden, x, y, w))
        x += w
        # stage_output points: stacked on the middle of the arrow that leaves this column.
        y = self.mid - (len(stack) * (BADGE_H + 4) - 4) // 2
        for i in stack:
            p = self.points[i]
            mw = _marker_width(p)
            self.badges.append(_marker(p, i, x + (self.gaps[c] - mw) // 2, y, mw, self.colours[p.block.kind]))
            y += BADGE_H + 4
        return x

    def _more(self, hidden: tuple[int, ...], x: float, y: float, w: float) -> Box:
        """The "+N more" badge of a column with more points than it shows."""
        names = [self.points[i].name or self.points[i].node for i in hidden]
        tooltip = ", ".join(names[:40]) + (f" and {len(names) - 40} more" if len(names) > 40 else "")
        label = Text(
            x + w / 2,
            y + BADGE_H / 2 + BADGE_SIZE * 0.36,
            f"+{len(hidden)} more",
            BADGE_SIZE,
            INK,
            anchor="middle",
        )
        return Box(
            x + COLUMN_PAD,
            y,
            w - 2 * COLUMN_PAD,
            BADGE_H,
            "more",
            MORE_FILL,
            radius=5,
            texts=(label,),
            tooltip=tooltip,
            hidden=hidden,
        )


def _footer(plan: Plan, points: tuple[InsertionPoint, ...], footer_y: float) -> tuple[list[Text], float]:
    """Totals from the points themselves, multiply-adds and skipped candidates; and the last line's y."""
    added = sum(p.params for p in points)
    share = ""
    if plan.base_params:
        percent = 100 * added / plan.base_params
        share = f" ({'<0.01' if 0 < percent < 0.01 else format(percent, '.2f')}% of {plan.base_params:,})"
    footer = f"{_count(len(points)) if points else '0 blocks'}, +{added:,} parameters{share}"
    texts = [Text(MARGIN, footer_y, footer, 13, bold=True)]
    bottom = footer_y
    if plan.base_macs:
        macs = sum(p.macs for p in points)
        bottom += 18
        line = (
            f"+{macs / 1e6:,.1f} M MACs per image "
            f"({100 * macs / plan.base_macs:.2f}% of {plan.base_macs / 1e9:,.2f} G MACs)"
        )
        texts.append(Text(MARGIN, bottom, line, SMALL_SIZE, MUTED))
    if plan.skipped:
        bottom += 18
        n = len(plan.skipped)
        line = f"{n} candidate{'s' if n != 1 else ''} skipped (the plan's skipped list says why)"
        texts.append(Text(MARGIN, bottom, line, SMALL_SIZE, MUTED))
    return texts, bottom


# ---------------------------------------------------------------------------------------
# drawing: one matplotlib figure, saved as SVG or PNG

POINTS_PER_INCH = 72  # the layout's units are SVG user units: 1 px = 1 pt at 72 dpi
SVG_NAMESPACE = "http://www.w3.org/2000/svg"
_GID = "attn-inject-"
_RC: dict[str, Any] = {"svg.fonttype": "none", "svg.hashsalt": "attn-inject", "font.family": "sans-serif"}


def _box_gid(index: int) -> str:
    return f"{_GID}box-{index}"


def figure(diagram: Diagram):
    """The diagram as a matplotlib ``Figure`` (no pyplot state): one axes over the whole
    figure in the layout's coordinates (y down), every box a ``FancyBboxPatch``, every arrow a
    ``FancyArrowPatch``, every text a ``Text`` on its baseline."""
    from matplotlib.figure import Figure

    fig = Figure(
        figsize=(diagram.width / POINTS_PER_INCH, diagram.height / POINTS_PER_INCH), dpi=POINTS_PER_INCH
    )
    fig.patch.set_facecolor(BACKGROUND)
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set_xlim(0, diagram.width)
    ax.set_ylim(diagram.height, 0)
    ax.set_axis_off()

    for i, a in enumerate(diagram.arrows):
        ax.add_patch(_arrow_patch(a, f"{_GID}arrow-{i}"))
    for j, b in enumerate(diagram.boxes):
        ax.add_patch(_box_patch(b, _box_gid(j)))
        for k, t in enumerate(b.texts):
            _draw_text(ax, t, f"{_box_gid(j)}-text-{k}")
    for k, t in enumerate(diagram.texts):
        _draw_text(ax, t, f"{_GID}text-{k}")
    return fig


def _draw_text(ax: Any, t: Text, gid: str) -> None:
    """``t`` on its baseline in ``ax``, as text (never parsed as mathtext), not clipped."""
    ha = {"start": "left", "middle": "center", "end": "right"}[t.anchor]
    artist = ax.text(
        t.x,
        t.y,
        t.text,
        fontsize=t.size,
        color=t.color,
        ha=ha,
        va="baseline",
        fontweight="bold" if t.bold else "normal",
        parse_math=False,  # a module name is text, "$" included
        gid=gid,
    )
    artist.set_clip_on(False)


def _arrow_patch(a: Arrow, gid: str) -> Any:
    from matplotlib.patches import FancyArrowPatch

    return FancyArrowPatch(
        (a.x1, a.y1),
        (a.x2, a.y2),
        arrowstyle=f"-|>,head_length={ARROW_HEAD * 0.1:.2f},head_width={ARROW_HEAD * 0.055:.3f}",
        mutation_scale=10,
        color=a.color,
        linewidth=1.5,
        shrinkA=0,
        shrinkB=0,
        gid=gid,
    )


def _box_patch(b: Box, gid: str) -> Any:
    from matplotlib.patches import FancyBboxPatch

    return FancyBboxPatch(
        (b.x, b.y),
        b.w,
        b.h,
        boxstyle=f"round,pad=0,rounding_size={b.radius}" if b.radius else "square,pad=0",
        facecolor=b.fill,
        edgecolor="none" if b.stroke == "none" else b.stroke,
        linewidth=1,
        gid=gid,
    )


def _classes(b: Box) -> str:
    return "badge marker" if b.role == "marker" else b.role


def to_svg(diagram: Diagram) -> str:
    """The diagram as an SVG document (UTF-8 text), drawn by matplotlib with text kept as
    text. Each box and its text are grouped in ``<g class="ROLE">`` with the box's tooltip
    as ``<title>`` and, for insertion points, ``data-point``, ``data-kind`` and
    ``data-position`` (the tooltip technique of matplotlib's SVG tooltip example)."""
    import io
    import xml.etree.ElementTree as ET

    import matplotlib

    with matplotlib.rc_context(_RC):  # type: ignore[arg-type]
        buffer = io.BytesIO()
        figure(diagram).savefig(buffer, format="svg", metadata={"Date": None, "Title": diagram.title})
    ET.register_namespace("", SVG_NAMESPACE)
    ET.register_namespace("xlink", "http://www.w3.org/1999/xlink")
    root = ET.fromstring(buffer.getvalue())
    parents = {child: parent for parent in root.iter() for child in parent}
    by_id = {e.get("id"): e for e in root.iter() if e.get("id", "").startswith(_GID)}
    for j, b in enumerate(diagram.boxes):
        shape = by_id[_box_gid(j)]
        parent = parents[shape]
        group = ET.Element(f"{{{SVG_NAMESPACE}}}g", {"class": _classes(b)})
        if b.point is not None:
            group.set("data-point", str(b.point))
        if b.kind is not None:
            group.set("data-kind", b.kind)
        if b.position is not None:
            group.set("data-position", b.position)
        if b.role == "more":
            group.set("data-hidden", str(len(b.hidden)))
        if b.tooltip:
            ET.SubElement(group, f"{{{SVG_NAMESPACE}}}title").text = b.tooltip
        parent.insert(list(parent).index(shape), group)
        for member in [shape] + [by_id[f"{_box_gid(j)}-text-{k}"] for k in range(len(b.texts))]:
            parents[member].remove(member)
            group.append(member)
            parents[member] = group
    for i in range(len(diagram.arrows)):
        by_id[f"{_GID}arrow-{i}"].set("class", "arrow")
    return ET.tostring(root, encoding="unicode", xml_declaration=False) + "\n"


def to_png(diagram: Diagram, path: str | os.PathLike, *, scale: float = 2.0) -> None:
    """The diagram as a PNG of ``scale`` times its size (2: sharp on high-density screens),
    drawn by matplotlib and written atomically to ``path``."""
    import matplotlib

    with matplotlib.rc_context(_RC):  # type: ignore[arg-type]
        fig = figure(diagram)
        _write_atomic(
            Path(path),
            lambda f: fig.savefig(f, format="png", dpi=POINTS_PER_INCH * scale, metadata={"Software": None}),
        )


# ---------------------------------------------------------------------------------------
# files

SUFFIXES = (".svg", ".png")


def _write_atomic(path: Path, write: Callable[[IO[bytes]], object]) -> None:
    """``write`` into a new file next to ``path``, then rename it over ``path``; on any
    error the temporary file is removed and ``path`` is left as it was."""
    if not path.parent.is_dir():
        raise FileNotFoundError(f"{path}: folder {path.parent} does not exist")
    with atomic_path(path) as tmp, open(tmp, "xb") as f:
        write(f)


def save_diagram(plan: Plan, path: str | os.PathLike) -> None:
    """Draw ``plan`` to ``path``: SVG or PNG, chosen by the suffix (``.svg``, ``.png``)."""
    target = Path(path)
    suffix = target.suffix.lower()
    if suffix not in SUFFIXES:
        raise InputError(
            f"{target}: cannot write a diagram as {suffix or 'a file without a suffix'}; "
            f"allowed suffixes: {', '.join(SUFFIXES)}"
        )
    diagram = plan_layout(plan)
    if suffix == ".png":
        to_png(diagram, target)
    else:
        _write_atomic(target, lambda f: f.write(to_svg(diagram).encode("utf-8")))
