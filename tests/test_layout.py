"""The package layout shows the architecture: folders by stage, no import circle, a package
root that only re-exports, and nothing inside the package importing that face.

Every module's imports are read with ``ast`` (at module level and inside functions); an
import under ``if TYPE_CHECKING:`` is for the type checker and runs never, so it is left out.
"""

from __future__ import annotations

import ast
import functools
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

PACKAGE = "attn_inject"
ROOT = Path(__file__).resolve().parent.parent / PACKAGE
MAX_ROOT_MODULES = 8


@dataclass(frozen=True)
class Import:
    source: str
    target: str
    line: int
    in_function: bool


def module_name(path: Path) -> str:
    parts = [PACKAGE, *path.relative_to(ROOT).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _walk(node: ast.AST, in_function: bool):
    """(import node, whether it sits inside a function), skipping ``if TYPE_CHECKING:`` blocks."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.If) and _is_type_checking(child):
            for orelse in child.orelse:
                yield from _walk(orelse, in_function)
            continue
        if isinstance(child, (ast.Import, ast.ImportFrom)):
            yield child, in_function
        inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
        yield from _walk(child, inner)


def _longest_module(name: str, modules: dict[str, Path]) -> str | None:
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        candidate = ".".join(parts[:end])
        if candidate in modules:
            return candidate
    return None


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> list[Import]:
    """The package's modules ``name`` imports: ``from .x import y`` reads module ``x.y`` when
    ``y`` is a submodule, else module ``x`` (the names it holds or re-exports); either way the
    folders above run first."""
    is_package = path.name == "__init__.py"
    found = []
    for node, in_function in _walk(ast.parse(path.read_text(encoding="utf-8")), False):
        targets: list[str | None] = []
        if isinstance(node, ast.Import):
            targets = [_longest_module(a.name, modules) for a in node.names]
        else:
            if node.level:
                base = name.split(".")
                if not is_package:
                    base = base[:-1]
                base = base[: len(base) - (node.level - 1)]
                origin = ".".join([*base, *([node.module] if node.module else [])])
            else:
                origin = node.module or ""
            for alias in node.names:
                sub = f"{origin}.{alias.name}"
                targets.append(sub if sub in modules else _longest_module(origin, modules))
        for target in {t for t in targets if t is not None}:
            found += [Import(name, t, node.lineno, in_function) for t in _loaded(name, target)]
    return found


def _loaded(source: str, target: str) -> list[str]:
    """What importing ``target`` from ``source`` runs: the target and the folders above it (their
    ``__init__``), less the face and the folders ``source`` already sits in."""
    parts = target.split(".")
    folders = [".".join(parts[:end]) for end in range(2, len(parts))]
    if target == source:
        return []
    return [m for m in folders if m != source and not source.startswith(m + ".")] + [target]


@functools.cache
def all_imports() -> tuple[Import, ...]:
    """Every import among the package's modules, read once for the tests that check them."""
    modules = package_modules()
    return tuple(i for name, path in modules.items() for i in imports_of(name, path, modules))


def _reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen: set[str] = set()
    todo = [start]
    while todo:
        for nxt in graph.get(todo.pop(), ()):
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def cycles(imports: Sequence[Import]) -> list[str]:
    """Each import on a circle of imports. A function-level import counts as if it were at
    module level: one that closes a circle only works around it."""
    graph: dict[str, set[str]] = {}
    for i in imports:
        graph.setdefault(i.source, set()).add(i.target)
    return sorted(
        f"{i.source}:{i.line} imports {i.target}{' (inside a function)' if i.in_function else ''}"
        for i in imports
        if i.source in _reachable(graph, i.target)
    )


def test_no_import_circle_among_the_package_modules():
    assert cycles(all_imports()) == []


def test_nothing_inside_the_package_imports_the_package_face():
    face = [f"{i.source}:{i.line}" for i in all_imports() if i.target == PACKAGE and i.source != PACKAGE]
    assert face == []


def test_the_package_root_holds_few_modules_beside_its_folders():
    root_modules = sorted(p.name for p in ROOT.glob("*.py"))
    assert len(root_modules) <= MAX_ROOT_MODULES, root_modules


@pytest.mark.parametrize("init", sorted(ROOT.glob("*/__init__.py")), ids=lambda p: p.parent.name)
def test_every_folder_says_its_job_in_a_docstring(init: Path):
    assert ast.get_docstring(ast.parse(init.read_text(encoding="utf-8"))), f"{init} has no docstring"


def test_the_checker_finds_a_circle_closed_inside_a_function():
    """The checker itself: a -> b at module level, b -> a inside a function."""
    imports = [Import("p.a", "p.b", 1, False), Import("p.b", "p.a", 5, True), Import("p.c", "p.a", 2, False)]
    assert cycles(imports) == ["p.a:1 imports p.b", "p.b:5 imports p.a (inside a function)"]
    assert cycles([imports[0], imports[2]]) == []


def test_the_checker_reads_relative_imports_of_submodules_and_names(tmp_path: Path):
    pkg = tmp_path / PACKAGE
    (pkg / "sub").mkdir(parents=True)
    files = {
        "__init__.py": "from .sub.mod import thing\n",
        "sub/__init__.py": '"""Sub."""\nfrom . import mod\n',
        "sub/mod.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .. import thing\n"
        "def f():\n    from .. import thing\n    from ..sub import mod\n",
    }
    for rel, text in files.items():
        (pkg / rel).write_text(text, encoding="utf-8")
    modules = {module_name_in(pkg, p): p for p in sorted(pkg.rglob("*.py"))}
    found = {
        (i.source, i.target, i.in_function) for n, p in modules.items() for i in imports_of(n, p, modules)
    }
    assert found == {
        (PACKAGE, f"{PACKAGE}.sub", False),
        (PACKAGE, f"{PACKAGE}.sub.mod", False),
        (f"{PACKAGE}.sub", f"{PACKAGE}.sub.mod", False),
        (f"{PACKAGE}.sub.mod", PACKAGE, True),
    }


def module_name_in(root: Path, path: Path) -> str:
    parts = [PACKAGE, *path.relative_to(root).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
