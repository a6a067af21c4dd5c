"""The README and the docs guide: every link resolves, and every code block the README shows
still runs (the Python quickstart as written), loads (the recipe) or names a real
command and option (the command line)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

import attn_inject as ai
from attn_inject.cli.main import _parser

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)\s]+)\)")
BLOCK = re.compile(r"^```(\w*)\n(.*?)^```", re.MULTILINE | re.DOTALL)


def _section(title: str) -> str:
    text = README.read_text()
    start = text.index(f"## {title}")
    end = text.find("\n## ", start + 1)
    return text[start : end if end != -1 else None]


@pytest.mark.parametrize("page", PAGES, ids=[p.name for p in PAGES])
def test_every_relative_link_resolves(page):
    for target in LINK.findall(page.read_text()):
        if target.startswith(("http://", "https://", "mailto:")):
            continue
        path = target.split("#")[0]
        if path:
            assert (page.parent / path).exists(), f"{page.name} links to {target}, which does not exist"


def test_the_readme_is_short_and_its_guide_lists_every_docs_page():
    text = README.read_text()
    assert len(text.splitlines()) <= 250
    guide = _section("Documentation")
    pages = {p.name for p in (ROOT / "docs").glob("*.md")} - {"zoo.md", "benchmarks.md"}
    assert {name for name in pages if f"(docs/{name})" not in guide} == set()


def test_the_python_quickstart_runs_as_written(tmp_path, monkeypatch, capsys):
    """The README's block, verbatim: its model, every default check of validate, save and load."""
    (code,) = [body for lang, body in BLOCK.findall(_section("Python quickstart")) if lang == "python"]
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    assert "True ['layer1.0.se', 'layer1.1.se']" in capsys.readouterr().out  # what its comment says
    (saved,) = tmp_path.glob("*.safetensors")
    assert namespace["report"].passed and namespace["report"].check("export").status == "passed"
    loaded, built = namespace["patched"], namespace["model"]
    assert type(loaded) is type(built)
    assert list(ai.inserted_blocks(loaded))[:2] == ["layer1.0.se", "layer1.1.se"]
    assert ai.read_manifest(saved).base_model == "timm:resnet18"
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():  # identity init: the loaded model computes what the base does
        assert torch.equal(loaded.eval()(x), built.eval()(x))
    assert {g["name"] for g in namespace["groups"]} >= {"attention_no_decay", "base_decay"}


def test_the_recipe_shown_is_the_shipped_one():
    (text,) = [body for lang, body in BLOCK.findall(_section("Recipes")) if lang == "yaml"]
    assert ai.load_recipe(text).rules == ai.get_recipe("cbam_after_every_stage").rules


def test_the_command_line_shown_uses_real_commands_and_options():
    (text,) = [body for lang, body in BLOCK.findall(_section("Command-line quickstart")) if lang == "bash"]
    parser = _parser()
    commands = {a.dest: a for a in parser._actions if a.dest == "command"}["command"].choices
    for line in text.replace("\\\n", " ").splitlines():
        words = line.split("#")[0].split()
        if not words or words[0] != "attn-inject":
            continue
        sub = commands[words[1]]
        known = {o for action in sub._actions for o in action.option_strings}
        assert {w for w in words if w.startswith("--")} <= known, line
