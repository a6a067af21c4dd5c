"""The plans printed in the docs are what the code prints today."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import attn_inject as ai

from .conftest import meta_model

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
PRINTED_PLAN = re.compile(
    r"^>>> print\(ai\.plan\(timm\.create_model\('(?P<model>[\w.]+)'\), '(?P<recipe>\w+)'\)\)\n"
    r"(?P<out>.*?)^```",
    re.MULTILINE | re.DOTALL,
)
EXAMPLES = [m.groupdict() for page in PAGES for m in PRINTED_PLAN.finditer(page.read_text())]


def test_the_readme_prints_plans():
    assert len(EXAMPLES) >= 2  # Swin and DeiT


@pytest.mark.parametrize("example", EXAMPLES, ids=[e["model"] for e in EXAMPLES])
def test_a_plan_printed_in_the_readme_matches_the_code(example):
    plan = ai.plan(meta_model(f"timm:{example['model']}"), example["recipe"])
    assert str(plan) + "\n" == example["out"]
