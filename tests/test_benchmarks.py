"""A smoke run of each benchmark at tiny sizes (``--quick``), so that they never rot, and the
page ``make bench`` collects from their sections."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).parent.parent / "benchmarks"


def load(name: str):
    sys.path.insert(0, str(BENCHMARKS))
    try:
        spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCHMARKS / f"{name}.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # dataclasses look their module up there
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(BENCHMARKS))


@pytest.mark.parametrize(
    "script, rows",
    [
        (
            "bench_inject",
            [
                "ai.inject(se_resnet)",
                "torch.fx.symbolic_trace",
                "timm.create_model (meta)",
                "of which: building",
                "What a first call adds",
                "proved block designs dropped",
                "A plan's multiply-add count",
                "| yes |",  # the same count without shape rules
            ],
        ),
        ("bench_models", ["resnet18 + se_resnet", "train step batch 2"]),
        ("bench_blocks", ["cbam (channel=conv)", "channels_last"]),
        ("bench_blend", ["map-level blend ms (ratio)", "full-map blend ms (ratio)", "| cbam |"]),
        ("bench_build", ["library builder, fills run ms", "| timm:resnet10t |", "| tv:resnet18 |"]),
    ],
)
def test_benchmark_smoke_run_writes_its_section(tmp_path, script, rows):
    out = tmp_path / f"{script}.md"
    text = load(script).main(["--quick", "--out", str(out)])
    assert out.read_text() == text
    assert "Machine: " in text and "torch " in text and "--quick" in text
    assert all(row in text for row in rows)
    assert "fails:" not in text


def test_collect_gathers_sections_into_one_page(tmp_path):
    sections = []
    for i in range(2):
        sections.append(tmp_path / f"{i}.md")
        sections[-1].write_text(f"## Section {i}\n\nMachine: x.\n")
    load("collect").main([*map(str, sections), "--out", str(tmp_path / "docs" / "benchmarks.md")])
    page = (tmp_path / "docs" / "benchmarks.md").read_text()
    assert page.startswith("# Benchmarks") and page.index("Section 0") < page.index("Section 1")
    with pytest.raises(SystemExit, match="no such section"):
        load("collect").main([str(tmp_path / "missing.md"), "--out", str(tmp_path / "x.md")])


def test_rotated_rounds_start_one_candidate_later_each_round():
    common = load("common")
    order: list[str] = []
    calls = {name: (lambda name=name: order.append(name)) for name in "abc"}
    times = common.interleaved_times(calls, rounds=4, warmup=0, rotate=True)
    assert order == [*"abc", *"bca", *"cab", *"abc"]
    assert {name: len(ts) for name, ts in times.items()} == {"a": 4, "b": 4, "c": 4}
    order.clear()
    common.interleaved_times(calls, rounds=2, warmup=0)
    assert order == list("abcabc")


def test_round_ratio_pairs_each_round_with_its_peer():
    common = load("common")
    # the machine slows down 3x in the last rounds: each round's ratio stays 1.1
    peer = [1.0, 1.0, 1.0, 3.0, 3.0]
    slower = [1.1, 1.1, 1.1, 3.3, 3.3]
    ratio = common.round_ratio(slower, peer)
    assert ratio.median == pytest.approx(1.1) and ratio.low == pytest.approx(1.1) == ratio.high
    spread = common.round_ratio([1.0, 2.0, 3.0, 4.0, 5.0], [1.0] * 5)
    assert (spread.median, spread.low, spread.high) == (3.0, 2.0, 4.0)
    assert str(spread) == "3.000; IQR 2.000-4.000"
    assert common.round_ratio([2.0], [1.0]) == common.RoundRatio(2.0, 2.0, 2.0)
