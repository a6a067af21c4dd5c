"""The harness that runs timm's and torchvision's own model tests on patched models
(peers/plugin.py, peers/run.py): its builders return what inject returns, its filter keeps the
named models' tests, and its report counts what the JUnit XML says."""

from __future__ import annotations

import inspect
import textwrap

import pytest
import timm
import torch
from torchvision import models as tv_models

import attn_inject as ai
from peers.plugin import MODELS_VAR, RECIPE_VAR, PeerSettings, install, patched_builder
from peers.run import CONFIGS, CaseResult, Outcome, new_failures, read_junit, section, write_section

pytest_plugins = ["pytester"]

SE = PeerSettings("se_resnet", "identity")


def test_settings_come_from_the_environment_and_empty_means_plain():
    settings = PeerSettings.from_environ(
        {RECIPE_VAR: "se_resnet", "ATTN_INJECT_PEER_INIT": "paper", MODELS_VAR: "a, b,,"}
    )
    assert settings == PeerSettings("se_resnet", "paper", frozenset({"a", "b"}))
    assert PeerSettings.from_environ({RECIPE_VAR: " "}) == PeerSettings(None, None, None)


def test_a_patched_builder_returns_what_inject_returns_and_keeps_the_builders_face():
    def small_resnet(num_classes: int = 10) -> torch.nn.Module:
        """A builder as torchvision writes them."""
        return timm.create_model("resnet18", num_classes=num_classes)

    build = patched_builder(small_resnet, SE)
    assert (build.__name__, build.__module__, build.__doc__) == (
        "small_resnet",
        __name__,
        small_resnet.__doc__,
    )
    assert inspect.signature(build) == inspect.signature(small_resnet)
    patched = build(num_classes=7)
    reference = ai.inject(small_resnet(num_classes=7), "se_resnet", init="identity")
    assert list(ai.inserted_blocks(patched)) == list(ai.inserted_blocks(reference))
    assert patched.fc.out_features == 7
    assert patched_builder(small_resnet, PeerSettings()) is small_resnet


def test_install_wraps_timm_and_torchvision_builders_once_each_and_undo_restores_them():
    timm_before, tv_before = timm.create_model, tv_models.resnet18
    undo = install(SE)
    try:
        assert timm.create_model is not timm_before
        assert timm.models.create_model is timm.create_model  # one wrapper for every place
        assert tv_models.get_model_builder("resnet18") is tv_models.resnet18 is tv_models.resnet.resnet18
        assert tv_models.resnet18.__wrapped__ is tv_before
        # torchvision's list_models(module) reads each builder's module: still the quantization one
        quantized = tv_models.list_models(tv_models.quantization)
        assert "quantized_resnet18" in quantized and "resnet18" not in quantized
        assert tv_models.get_model_weights("resnet18") is tv_models.ResNet18_Weights
    finally:
        for replacement in reversed(undo):
            replacement.undo()
    assert (timm.create_model, tv_models.resnet18) == (timm_before, tv_before)
    assert tv_models.get_model_builder("resnet18") is tv_before
    assert install(PeerSettings()) == []


SUITE = """
    import pytest
    from timm import create_model  # as timm's tests import it: before any test runs

    @pytest.mark.parametrize("model_name", ["resnet18.a1_in1k", "resnet34", "resnet50"])
    def test_built(model_name):
        model = create_model(model_name.split(".")[0], pretrained=False)
        assert hasattr(model, "attn_inject") == EXPECT_PATCHED
        assert (getattr(model.layer1[0], "se", None) is not None) == EXPECT_PATCHED  # timm: se=None

    def test_without_a_model():
        pass
"""


@pytest.mark.parametrize("recipe", ["se_resnet", ""])
def test_the_plugin_patches_what_the_suite_builds_and_keeps_the_named_models_tests(
    pytester, monkeypatch, recipe
):
    before = timm.create_model
    pytester.makepyfile(test_suite=textwrap.dedent(SUITE).replace("EXPECT_PATCHED", str(bool(recipe))))
    monkeypatch.setenv(RECIPE_VAR, recipe)
    monkeypatch.setenv(MODELS_VAR, "resnet18,resnet34")
    result = pytester.runpytest_inprocess("-p", "peers.plugin", "-q", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=2, deselected=2)
    assert timm.create_model is before  # undone when the run ends


REPORT = """<?xml version="1.0" encoding="utf-8"?>
<testsuites><testsuite name="pytest">
  <testcase classname="tests.test_models" name="test_a[x]"/>
  <testcase classname="tests.test_models" name="test_b[x]">
    <failure message="AssertionError: Output does not match&#10;more">trace</failure></testcase>
  <testcase classname="tests.test_models" name="test_c[x]"><skipped message="too big"/></testcase>
  <testcase classname="tests.test_models" name="test_d[x]"><error message="fixture broke"/></testcase>
  <testcase classname="tests.test_models" name="test_e[x]"/>
  <testcase classname="tests.test_models" name="test_e[x]"><error message="teardown broke"/></testcase>
</testsuite></testsuites>
"""


def test_the_junit_report_gives_each_tests_outcome_and_first_line(tmp_path):
    path = tmp_path / "report.xml"
    path.write_text(REPORT)
    results = read_junit(path)
    assert {n: r.outcome for n, r in results.items()} == {
        "test_a[x]": Outcome.PASSED,
        "test_b[x]": Outcome.FAILED,
        "test_c[x]": Outcome.SKIPPED,
        "test_d[x]": Outcome.FAILED,
        "test_e[x]": Outcome.FAILED,  # its call passed, its teardown failed
    }
    assert results["test_b[x]"].message == "AssertionError: Output does not match"
    assert results["test_e[x]"].message == "teardown broke"


def _results(**outcomes: str) -> dict[str, CaseResult]:
    return {name: CaseResult(name, Outcome(o), f"{name} said so") for name, o in outcomes.items()}


def test_a_new_failure_fails_patched_and_not_plain():
    plain = _results(a="passed", b="failed", c="skipped", d="passed")
    patched = _results(a="failed", b="failed", c="failed", d="passed", e="failed")
    assert [r.test for r in new_failures(plain, patched)] == ["a", "c", "e"]


def test_the_docs_section_counts_each_configuration_and_replaces_only_its_own(tmp_path):
    from peers.run import Suite

    suite = Suite("timm", tmp_path, "tests/test_models.py", ("resnest14d",), "1.0")
    plain = _results(a="passed", b="failed", c="skipped")
    patched = _results(a="failed", b="failed", c="passed")
    body = section(suite, {"plain": plain, "se_resnet": patched})
    assert "| plain | 1 | 1 | 1 |  |" in body
    assert f"| {CONFIGS['se_resnet'].label} | 1 | 2 | 0 | 1 |" in body
    assert "| `a` | a said so |" in body and "`b`" not in body
    page = tmp_path / "peers.md"
    page.write_text("# Title\n\nWritten by hand.\n")
    write_section(page, "timm", "first")
    write_section(page, "torchvision", "other")
    write_section(page, "timm", "second")
    text = page.read_text()
    assert text.startswith("# Title\n\nWritten by hand.\n")
    assert "second" in text and "first" not in text and "other" in text
    assert text.index("peers:timm") < text.index("peers:torchvision")
