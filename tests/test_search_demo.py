"""examples/search_demo.py: the leaderboard it copies into docs/search.md names no folder of
the machine it ran on."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _demo():
    spec = importlib.util.spec_from_file_location("search_demo", EXAMPLES / "search_demo.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    added = [str(EXAMPLES), str(EXAMPLES.parent / "benchmarks")]
    try:
        spec.loader.exec_module(module)
    finally:
        for path in added:
            while path in sys.path:
                sys.path.remove(path)
    return module


def test_the_copied_leaderboard_describes_its_data_without_a_path(tmp_path):
    data = tmp_path / "run-1234" / "digits5-9"
    board = (
        'Base: timm:resnet10t {"num_classes": 5} 0123abcd.\n\n'
        f"Data: {data.resolve()}: 5 classes (5, 6, 7, 8, 9), 40 training and 820 validation images; "
        "file names and sizes hash 89ab.\n\n| candidate | seeds |"
    )
    text = _demo().path_free(board, data)
    assert str(tmp_path) not in text and "run-1234" not in text
    described = "Data: the digits 5-9 as search_demo.py writes them: 5 classes (5, 6, 7, 8, 9), 40 training"
    assert described in text
    assert text.startswith('Base: timm:resnet10t {"num_classes": 5} 0123abcd.')
