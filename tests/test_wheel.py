"""The wheel a user installs: built from the repository without warnings of ours, installed
into a fresh virtual environment outside it, it carries its recipes, its type hints
(``py.typed``) and its licence, and its command and one ``inject`` run from there."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import zipfile
from pathlib import Path

import pytest

import attn_inject

ROOT = Path(__file__).resolve().parent.parent


def run(*command: str | Path, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    done = subprocess.run(
        [str(c) for c in command], cwd=cwd, capture_output=True, text=True, timeout=600, env=env
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return done


@pytest.mark.processes
def test_the_wheel_installs_outside_the_repository_and_runs(tmp_path):
    build = run(
        sys.executable,
        "-m",
        "pip",
        "wheel",
        ROOT,
        "--no-deps",
        "--no-build-isolation",
        "-w",
        tmp_path / "dist",
        cwd=tmp_path,
    )
    ours = [
        line
        for line in (build.stdout + build.stderr).splitlines()
        if "warning" in line.lower() and "byte-compil" not in line.lower()  # pip's own setting
    ]
    assert not ours, ours
    (wheel,) = (tmp_path / "dist").glob("attn_inject-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "attn_inject/py.typed" in names and "attn_inject/builtin_recipes/se_resnet.yaml" in names
    assert any(n.endswith("licenses/LICENSE") for n in names)
    assert not any(n.startswith(("tests/", "benchmarks/", "examples/")) for n in names)
    metadata = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("METADATA"))).decode()
    assert "License-Expression: Apache-2.0" in metadata

    venv = tmp_path / "venv"
    run(sys.executable, "-m", "venv", "--without-pip", venv, cwd=tmp_path)  # this pip installs into it
    python = venv / "bin" / "python"
    site = run(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])", cwd=tmp_path)
    # The dependencies (torch, timm, ...) are this environment's: a path entry, not a site
    # directory, so its editable install of the repository is not seen there.
    deps = sysconfig.get_paths()["purelib"]
    Path(site.stdout.strip(), "dependencies.pth").write_text(deps + "\n")
    run(
        sys.executable,
        "-m",
        "pip",
        "--python",
        python,
        "install",
        "--no-deps",
        "--no-index",
        wheel,
        cwd=tmp_path,
    )
    recipes = run(venv / "bin" / "attn-inject", "recipes", cwd=tmp_path)
    assert "se_resnet" in recipes.stdout
    code = (
        "import torchvision, attn_inject as ai; print(ai.__file__); "
        "m = ai.inject(torchvision.models.resnet18(), 'se_resnet', input_size=(3, 64, 64)); "
        "print(len(ai.inserted_blocks(m)))"
    )
    where, blocks = run(python, "-c", code, cwd=tmp_path).stdout.strip().splitlines()
    assert str(venv) in where and str(ROOT) not in where  # the installed copy, not the repository
    assert blocks == "8"


@pytest.mark.processes
def test_the_source_distribution_carries_the_docs_the_readme_links_to(tmp_path):
    """Every ``docs/...`` link of the README resolves inside the sdist, and its metadata
    carries the version ``attn_inject.__version__`` reports and the classifiers."""
    # From the tracked files alone: an egg-info left by an editable install lists files too.
    source = tmp_path / "source"
    tracked = run("git", "ls-files", "-z", cwd=ROOT).stdout.split("\0")
    for name in filter(None, tracked):
        if (ROOT / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, source / name)
    run(
        sys.executable,
        "-c",
        f"from setuptools import build_meta; build_meta.build_sdist({str(tmp_path)!r})",
        cwd=source,
    )
    (sdist,) = tmp_path.glob("attn_inject-*.tar.gz")
    with tarfile.open(sdist) as archive:
        names = {name.split("/", 1)[1] for name in archive.getnames() if "/" in name}
        pkg_info = archive.extractfile(next(m for m in archive.getmembers() if m.name.endswith("/PKG-INFO")))
        metadata = pkg_info.read().decode() if pkg_info else ""
    linked = set(re.findall(r"\]\((docs/[^)#]+)", (ROOT / "README.md").read_text()))
    assert linked and linked <= names, sorted(linked - names)
    assert "recipes/se_resnet.yaml" in names
    assert f"Version: {attn_inject.__version__}\n" in metadata
    assert "Classifier: Typing :: Typed" in metadata


def test_the_command_reports_the_version_the_package_metadata_holds(capsys):
    import importlib.metadata

    from attn_inject.cli.main import main

    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"attn-inject {importlib.metadata.version('attn-inject')}"
    assert attn_inject.__version__ == importlib.metadata.version("attn-inject")
