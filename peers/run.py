"""Run a peer's own model tests on plain and on patched models; report what patching breaks.

    python -m peers.run timm                       # 29 families, plain + se_resnet + cbam
    python -m peers.run torchvision --source ~/vision   # a pytorch/vision checkout at the
                                                        # installed torchvision's tag

For each configuration (plain; ``se_resnet`` at ``init=identity``; ``cbam_after_every_stage``
at ``init=paper``) it runs the peer's ``test_models.py`` from a folder under ``build/peers/``,
outside the project, with :mod:`peers.plugin` loaded, and reads the outcome of every test from
pytest's JUnit XML. A *new failure* is a test that fails on patched models and passes or is
skipped on plain ones. The counts and the new failures go to a section of ``docs/peers.md``
(the part between its ``begin peers:<suite>`` and ``end peers:<suite>`` marks; the rest of the
page is left as written).

timm's suite comes from its source distribution on the package index (``pip download
timm==<installed> --no-binary :all:``), only its ``tests/`` folder and ``pyproject.toml``
(pytest's markers) extracted. torchvision publishes no source distribution: ``--source`` names
a checkout of pytorch/vision; its ``test/`` folder is copied to ``build/peers/`` and its expected
outputs are regenerated from plain torchvision there (``EXPECTTEST_ACCEPT=1``) before the runs.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import xml.etree.ElementTree as ET
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from enum import Enum
from importlib import metadata
from pathlib import Path

from attn_inject.core.messages import cut, shown
from attn_inject.core.tables import markdown_table

from .plugin import INIT_VAR, MODELS_VAR, RECIPE_VAR

ROOT = Path(__file__).resolve().parent.parent
BUILD = ROOT / "build" / "peers"
DOCS = ROOT / "docs" / "peers.md"

# a timm family is the models whose names start with it; its smallest model (fewest parameters) runs
# fmt: off
TIMM_FAMILIES = (
    "hiera", "fastvit", "repvit", "efficientvit", "tiny_vit", "nextvit", "rdnet", "mambaout", "hgnetv2",
    "ghostnetv2", "mobilenetv4", "xcit", "crossvit", "twins", "pit", "dla", "hrnet", "vovnet", "gcvit",
    "focalnet", "davit", "edgenext", "inception_next", "nf_resnet", "cspresnet", "res2net", "resnest",
    "sebotnet", "regnetz",
)
# The families users reach for first, run as a second set with its own section (``--more``)
TIMM_MORE_FAMILIES = (
    "resnet", "resnetv2", "convnext", "efficientnet", "mobilenetv3", "regnety", "vit_", "deit", "swin",
    "maxvit", "coatnet", "levit", "poolformer", "densenet", "dpn", "inception_v", "xception", "nfnet",
    "rexnet", "mixnet", "tresnet", "cait", "beit", "eva02", "volo", "convit", "vgg", "repvgg", "cs3",
    "selecsls", "skresnet", "seresnet", "halonet", "efficientformer", "mobilevit", "fasternet", "starnet",
    "mobileone", "mixer", "caformer", "pvt_v2", "mvitv2", "nest", "tnt", "ghostnet_", "lcnet",
)
# fmt: on

# torchvision: classification, detection and segmentation builders that se_resnet acts on, and a
# few it leaves alone (densenet's TorchScript overloads; the quantized models it returns unchanged)
# fmt: off
TORCHVISION_MODELS = (
    "resnet18", "resnet50", "resnext50_32x4d", "wide_resnet50_2", "densenet121", "mobilenet_v3_small",
    "fasterrcnn_resnet50_fpn", "retinanet_resnet50_fpn", "fcos_resnet50_fpn", "maskrcnn_resnet50_fpn",
    "keypointrcnn_resnet50_fpn", "fcn_resnet50", "deeplabv3_resnet50", "lraspp_mobilenet_v3_large",
)
# fmt: on
TORCHVISION_IMAGE = Path("assets", "encode_jpeg", "grace_hopper_517x606.jpg")


@dataclass(frozen=True)
class Config:
    """One run of a suite: plain models (``recipe`` None) or models patched with ``recipe``."""

    name: str
    recipe: str | None = None
    init: str | None = None

    def environ(self) -> dict[str, str]:
        return {RECIPE_VAR: self.recipe or "", INIT_VAR: self.init or ""}

    @property
    def label(self) -> str:
        return "plain" if self.recipe is None else f"{self.recipe} (init={self.init or 'recipe'})"


CONFIGS = {
    c.name: c
    for c in (
        Config("plain"),
        Config("se_resnet", "se_resnet", "identity"),
        Config("cbam", "cbam_after_every_stage", "paper"),
    )
}
DEFAULT_CONFIGS = {"timm": ("plain", "se_resnet", "cbam"), "torchvision": ("plain", "se_resnet")}


class Outcome(Enum):
    PASSED = "passed"
    FAILED = "failed"
    SKIPPED = "skipped"


@dataclass(frozen=True)
class CaseResult:
    test: str  # the test's name with its parameters: test_model_forward[1-resnest14d]
    outcome: Outcome
    message: str = ""  # the failure's or skip's first line


@dataclass(frozen=True)
class Counts:
    passed: int
    failed: int
    skipped: int

    @classmethod
    def of(cls, results: Mapping[str, CaseResult]) -> Counts:
        outcomes = [r.outcome for r in results.values()]
        return cls(*(outcomes.count(o) for o in (Outcome.PASSED, Outcome.FAILED, Outcome.SKIPPED)))


@dataclass(frozen=True)
class Suite:
    """A peer's model tests, ready to run: the folder pytest runs in, the file it runs, the
    models it keeps, and the environment it needs besides the plugin's."""

    name: str
    folder: Path
    test_file: str
    models: tuple[str, ...]
    version: str
    environ: Mapping[str, str] = field(default_factory=dict)


def read_junit(path: Path) -> dict[str, CaseResult]:
    """Each test's outcome in a pytest JUnit XML report: a ``failure`` or ``error`` element is
    a failure, a ``skipped`` element a skip, none a pass. A test reported twice (a failure in
    its call, an error in its teardown) keeps its worst outcome."""
    results: dict[str, CaseResult] = {}
    for case in ET.parse(path).getroot().iter("testcase"):
        name = case.get("name", "")
        outcome, message = Outcome.PASSED, ""
        for child in case:
            if child.tag in ("failure", "error"):
                outcome, message = Outcome.FAILED, child.get("message") or (child.text or "")
                break
            if child.tag == "skipped":
                outcome, message = Outcome.SKIPPED, child.get("message") or ""
        message = cut(message.strip().splitlines()[0] if message.strip() else "", 240)
        earlier = results.get(name)
        if earlier is None or earlier.outcome is not Outcome.FAILED:
            results[name] = CaseResult(name, outcome, message)
    return results


def new_failures(plain: Mapping[str, CaseResult], patched: Mapping[str, CaseResult]) -> list[CaseResult]:
    """The tests that fail on patched models and pass or are skipped on plain ones (a test
    plain models do not run at all is new too), in test-name order."""
    return sorted(
        (
            r
            for name, r in patched.items()
            if r.outcome is Outcome.FAILED
            and (name not in plain or plain[name].outcome is not Outcome.FAILED)
        ),
        key=lambda r: r.test,
    )


def section(suite: Suite, results: Mapping[str, Mapping[str, CaseResult]]) -> str:
    """The Markdown section of ``docs/peers.md`` for ``suite``: counts per configuration, then
    each patched configuration's new failures with their first line."""
    plain = results.get("plain", {})
    rows = []
    for name, by_test in results.items():
        counts = Counts.of(by_test)
        new = "" if name == "plain" else str(len(new_failures(plain, by_test)))
        rows.append((CONFIGS[name].label, counts.passed, counts.failed, counts.skipped, new))
    lines = [
        f"{suite.name} {suite.version}, `{suite.test_file}`, {len(suite.models)} models: "
        + ", ".join(f"`{m}`" for m in suite.models)
        + ".",
        "",
        *markdown_table(("configuration", "passed", "failed", "skipped", "new failures"), rows),
    ]
    for name, by_test in results.items():
        if name == "plain":
            continue
        new = new_failures(plain, by_test)
        lines += ["", f"New failures with {CONFIGS[name].label}: {len(new) or 'none'}."]
        if new:
            lines += ["", *markdown_table(("test", "first line"), [(f"`{r.test}`", r.message) for r in new])]
    return "\n".join(lines)


def write_section(page: Path, suite_name: str, body: str) -> None:
    """Replace the text between ``page``'s marks for ``suite_name`` with ``body``; append the
    marks and the body when the page has none."""
    begin, end = f"<!-- begin peers:{suite_name} -->", f"<!-- end peers:{suite_name} -->"
    text = page.read_text() if page.exists() else "# Peers' own tests on patched models\n"
    block = f"{begin}\n{body}\n{end}"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        text = head + block + rest.split(end, 1)[1]
    else:
        text = text.rstrip("\n") + f"\n\n## {suite_name}\n\n{block}\n"
    page.write_text(text)


def run_config(suite: Suite, config: Config, *, timeout: float | None) -> dict[str, CaseResult]:
    """Run ``suite`` once under ``config``; each test's result, also kept as JSON in build/."""
    report = BUILD / f"{suite.name}-{config.name}.xml"
    report.unlink(missing_ok=True)
    environ = {
        **os.environ,
        **suite.environ,
        **config.environ(),
        MODELS_VAR: ",".join(suite.models),
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
        "HF_HUB_OFFLINE": "1",
    }
    command = [sys.executable, "-m", "pytest", suite.test_file, "-q", "-p", "peers.plugin"]
    command += ["-p", "no:cacheprovider", "-W", "ignore", f"--junitxml={report}", "-o", "junit_family=xunit2"]
    print(f"[{suite.name} {config.name}] {' '.join(command[1:])}", flush=True)
    try:
        subprocess.run(command, cwd=suite.folder, env=environ, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        print(f"[{suite.name} {config.name}] stopped after {timeout:.0f} s", flush=True)
    if not report.exists():
        raise SystemExit(f"{suite.name} {config.name}: pytest wrote no report {report}; its output says why")
    results = read_junit(report)
    as_json = {n: {"outcome": r.outcome.value, "message": r.message} for n, r in results.items()}
    report.with_suffix(".json").write_text(json.dumps(as_json, indent=1, sort_keys=True))
    return results


def _extract(archive: Path, into: Path, members: Sequence[str]) -> None:
    """The archive's ``members`` (paths under its top folder) into ``into``, by tarfile's
    ``data`` filter: no absolute paths, no links out, no device files."""
    with tarfile.open(archive) as tar:
        top = tar.getnames()[0].split("/")[0]
        wanted = [
            m
            for m in tar.getmembers()
            if any(m.name == f"{top}/{w}" or m.name.startswith(f"{top}/{w}/") for w in members)
        ]
        for member in wanted:
            member.name = member.name.split("/", 1)[1]
        tar.extractall(into, members=wanted, filter="data")


def smallest_models(families: Sequence[str], version: str) -> tuple[str, ...]:
    """Each family's model with the fewest parameters, counted on the meta device; cached in
    build/ per timm version (a couple of minutes to build every model of 29 families)."""
    import timm
    import torch

    cache = BUILD / f"timm-{version}-smallest.json"
    known = json.loads(cache.read_text()) if cache.exists() else {}
    for family in families:
        if family in known:
            continue
        sizes = {}
        for name in timm.list_models(f"{family}*"):
            with torch.device("meta"):
                sizes[name] = sum(p.numel() for p in timm.create_model(name).parameters())
        if not sizes:
            raise SystemExit(f"no timm model's name starts with {shown(family)}")
        known[family] = min(sizes, key=lambda n: (sizes[n], n))
        cache.write_text(json.dumps(known, indent=1, sort_keys=True))
    return tuple(known[f] for f in families)


def timm_suite(families: Sequence[str]) -> Suite:
    version = metadata.version("timm")
    folder = BUILD / f"timm-{version}"
    if not (folder / "tests" / "test_models.py").exists():
        with tempfile.TemporaryDirectory() as download:
            command = [sys.executable, "-m", "pip", "download", f"timm=={version}", "--no-deps"]
            subprocess.run([*command, "--no-binary", ":all:", "-d", download], check=True)
            (archive,) = Path(download).glob("timm-*.tar.gz")
            folder.mkdir(parents=True, exist_ok=True)
            _extract(archive, folder, ["tests", "pyproject.toml"])
        if not (folder / "tests" / "test_models.py").exists():
            raise SystemExit(f"timm {version}'s source distribution has no tests/test_models.py")
    return Suite("timm", folder, "tests/test_models.py", smallest_models(families, version), version)


def torchvision_suite(source: Path | None, models: Sequence[str]) -> Suite:
    version = metadata.version("torchvision").split("+")[0]
    folder = BUILD / f"torchvision-{version}"
    if not (folder / "test" / "test_models.py").exists():
        if source is None or not (source / "test" / "test_models.py").is_file():
            raise SystemExit(
                "torchvision publishes no source distribution with its tests: give --source, a "
                f"checkout of pytorch/vision at tag v{version} (its test/test_models.py)"
            )
        shutil.copytree(source / "test", folder / "test", ignore=shutil.ignore_patterns("expect", "assets"))
        # of the (large) assets folder, the one image test_models.py reads (detection's real_image models)
        image = source / "test" / TORCHVISION_IMAGE
        if image.is_file():
            (folder / "test" / TORCHVISION_IMAGE).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(image, folder / "test" / TORCHVISION_IMAGE)
    return Suite("torchvision", folder, "test/test_models.py", tuple(models), version)


def accept_expected(suite: Suite, timeout: float | None) -> None:
    """torchvision compares outputs with files its repository keeps: write them from plain
    torchvision (the suite's own ``EXPECTTEST_ACCEPT=1``) into build/, for the models that have
    none yet (``ModelTester.test_<model>_expect.pkl``)."""
    expect = suite.folder / "test" / "expect"
    expect.mkdir(parents=True, exist_ok=True)
    missing = tuple(m for m in suite.models if not (expect / f"ModelTester.test_{m}_expect.pkl").exists())
    if not missing:
        return
    accepting = replace(suite, models=missing, environ={**suite.environ, "EXPECTTEST_ACCEPT": "1"})
    run_config(accepting, CONFIGS["plain"], timeout=timeout)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m peers.run", description=__doc__.split("\n\n")[0])
    parser.add_argument("suite", choices=("timm", "torchvision"))
    parser.add_argument("--configs", nargs="+", choices=sorted(CONFIGS), help="default: the suite's")
    parser.add_argument("--models", nargs="+", help="timm: families (default: the 29); torchvision: models")
    parser.add_argument(
        "--more", action="store_true", help="timm: the second set of families (section 'timm-more')"
    )
    parser.add_argument("--source", type=Path, help="torchvision: a pytorch/vision checkout")
    parser.add_argument("--timeout", type=float, default=None, help="seconds per configuration")
    parser.add_argument("--jobs", type=int, default=1, help="configurations run at once (default: 1)")
    parser.add_argument("--docs", type=Path, default=DOCS, help="the page to write (default: docs/peers.md)")
    args = parser.parse_args(argv)
    BUILD.mkdir(parents=True, exist_ok=True)
    if args.suite == "timm":
        suite = timm_suite(args.models or (TIMM_MORE_FAMILIES if args.more else TIMM_FAMILIES))
    else:
        suite = torchvision_suite(args.source, args.models or TORCHVISION_MODELS)
        accept_expected(suite, args.timeout)
    names = ["plain", *(c for c in (args.configs or DEFAULT_CONFIGS[suite.name]) if c != "plain")]
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:  # each configuration is its own process
        runs = {name: pool.submit(run_config, suite, CONFIGS[name], timeout=args.timeout) for name in names}
        results = {name: run.result() for name, run in runs.items()}
    body = section(suite, results)
    write_section(args.docs, f"{suite.name}-more" if args.more else suite.name, body)
    print(body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
