"""The torchvision side of peers/run.py: the suite folder it builds from a pytorch/vision
checkout, and the expected outputs it records from plain torchvision, only for the models that
have none yet."""

from __future__ import annotations

from pathlib import Path

import pytest

from peers import run


@pytest.fixture
def build(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setattr(run, "BUILD", tmp_path / "build")
    return tmp_path / "build"


def checkout(root: Path, *, image: bool) -> Path:
    (root / "test" / "assets" / "videos").mkdir(parents=True)
    (root / "test" / "test_models.py").write_text("def test_nothing():\n    pass\n")
    (root / "test" / "assets" / "videos" / "big.mp4").write_bytes(b"\0" * 16)
    (root / "test" / "expect").mkdir()
    (root / "test" / "expect" / "ModelTester.test_resnet18_expect.pkl").write_bytes(b"upstream")
    if image:
        (root / "test" / run.TORCHVISION_IMAGE).parent.mkdir(parents=True)
        (root / "test" / run.TORCHVISION_IMAGE).write_bytes(b"jpeg")
    return root


def test_the_suite_folder_takes_the_tests_and_the_one_photograph_not_the_assets_or_expected_files(
    tmp_path: Path, build: Path
) -> None:
    suite = run.torchvision_suite(checkout(tmp_path / "vision", image=True), ["resnet18"])
    test = suite.folder / "test"
    assert (test / "test_models.py").is_file()
    assert (test / run.TORCHVISION_IMAGE).read_bytes() == b"jpeg"
    assert not (test / "assets" / "videos").exists()
    assert not (test / "expect").exists()


def test_a_checkout_without_the_photograph_still_gives_a_suite(tmp_path: Path, build: Path) -> None:
    suite = run.torchvision_suite(checkout(tmp_path / "vision", image=False), ["resnet18"])
    assert (suite.folder / "test" / "test_models.py").is_file()
    assert not (suite.folder / "test" / "assets").exists()


def test_expected_outputs_are_recorded_plain_for_the_models_lacking_them_only(
    tmp_path: Path, build: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    runs: list[tuple[tuple[str, ...], str | None, str]] = []

    def record(suite: run.Suite, config: run.Config, *, timeout: float | None) -> dict:
        runs.append((suite.models, config.recipe, suite.environ.get("EXPECTTEST_ACCEPT", "")))
        return {}

    monkeypatch.setattr(run, "run_config", record)
    models = ["resnet18", "densenet121", "fcn_resnet50"]
    suite = run.torchvision_suite(checkout(tmp_path / "vision", image=False), models)
    expect = suite.folder / "test" / "expect"
    expect.mkdir(parents=True)
    (expect / "ModelTester.test_densenet121_expect.pkl").write_bytes(b"recorded")

    run.accept_expected(suite, None)
    assert runs == [(("resnet18", "fcn_resnet50"), None, "1")]

    for model in ("resnet18", "fcn_resnet50"):
        (expect / f"ModelTester.test_{model}_expect.pkl").write_bytes(b"recorded")
    run.accept_expected(suite, None)
    assert len(runs) == 1  # every model has its file: nothing to record
