"""``attn-inject search`` with real components: real fine-tunes on real (tiny) digits, a real
Optuna study on SQLite and on a PostgreSQL server the test starts, worker processes that
share it, one killed mid-trial."""

from __future__ import annotations

import csv
import json
import math
import shutil
import statistics
import sys
from pathlib import Path

import pytest
import torch

import attn_inject as ai
from attn_inject.cli.main import main

optuna = pytest.importorskip("optuna")

REPO = Path(__file__).resolve().parent.parent
T975_1 = 12.706  # Student's t(0.975) with one degree of freedom: two seeds
SEARCHED = "test_resnet"  # the base of most searches: a 0.4 M-parameter timm ResNet, fast trials
TRAINED = "resnet10t"  # learns these digits to 100% in 3 epochs: the pruner test's base


def write_digits(root: Path, digits: tuple[int, ...], per_class: int, size: int = 32) -> Path:
    """scikit-learn's digits ``digits`` as an ImageFolder, ``per_class`` images each, one in
    four in val/."""
    from PIL import Image
    from sklearn.datasets import load_digits

    data = load_digits()
    counts: dict[int, int] = {}
    for i, label in enumerate(data.target.tolist()):
        if label not in digits or counts.get(label, 0) >= per_class:
            continue
        counts[label] = counts.get(label, 0) + 1
        split = "val" if counts[label] % 4 == 0 else "train"
        folder = root / split / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        pixels = (data.images[i] * (255 / 16)).clip(0, 255).astype("uint8")
        Image.fromarray(pixels, mode="L").resize((size, size)).convert("RGB").save(folder / f"{i:04d}.png")
    return root


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_digits(tmp_path_factory.mktemp("digits"), (0, 1), per_class=16)


def args(
    data: Path,
    out: Path,
    *recipes: str,
    repeats: int = 2,
    epochs: int = 1,
    classes: int = 2,
    model: str = SEARCHED,
) -> list[str]:
    return [
        "search", "--model", f"timm:{model}", "--model-kwargs", f"num_classes={classes}",
        "--data", str(data), "--out", str(out), "--recipes", *recipes,
        "--epochs", str(epochs), "--repeats", str(repeats), "--image-size", "32",
        "--batch-size", "8", "--lr", "3e-3", "--workers", "0", "--threads", "1",
    ]  # fmt: skip


def study_of(out: Path):
    return optuna.load_study(study_name="attn-inject-search", storage=f"sqlite:///{out / 'study.db'}")


def finished(study) -> list[tuple[str, tuple[int, ...]]]:
    return sorted(
        (t.user_attrs["candidate"], tuple(t.user_attrs["seeds"]))
        for t in study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    )


def last_top1(run: str) -> float:
    with open(Path(run) / "summary.csv") as f:
        return float(list(csv.DictReader(f))[-1]["eval_top1"])


def test_a_grid_of_three_candidates_and_a_baseline_over_two_seeds_gives_the_right_leaderboard(
    data, tmp_path, capsys
):
    nothing = tmp_path / "nothing.yaml"
    nothing.write_text(
        "name: nothing\nrules:\n  - block: se\n    at: stage_output\n    include: ['^no_such$']\n"
    )
    out = tmp_path / "run"
    recipes = ("se_resnet", "eca_after_every_stage", "cbam_after_every_stage", str(nothing))
    assert main(args(data, out, *recipes)) == 0
    printed = capsys.readouterr().out
    study = study_of(out)
    names = ["baseline", "se_resnet", "eca_after_every_stage", "cbam_after_every_stage"]
    assert finished(study) == sorted((n, (s,)) for n in names for s in (0, 1))  # each once
    with open(out / "leaderboard.csv") as f:
        rows = {r["candidate"]: r for r in csv.DictReader(f)}
    assert set(rows) == set(names)
    by_candidate: dict[str, list[float]] = {}
    for t in study.get_trials(states=(optuna.trial.TrialState.COMPLETE,)):
        (run,) = t.user_attrs["runs"]
        assert t.user_attrs["values"] == [last_top1(run)]  # the fine-tune's own last validation top-1
        by_candidate.setdefault(t.user_attrs["candidate"], []).append(last_top1(run))
    for name, values in by_candidate.items():
        mean, half = statistics.fmean(values), T975_1 * statistics.stdev(values) / math.sqrt(2)
        assert float(rows[name]["top1_mean"]) == pytest.approx(mean, abs=1e-9), name
        assert float(rows[name]["top1_ci95"]) == pytest.approx(half, rel=1e-3), name  # t to 5 digits
        assert f"| {name} | 2 | {mean:.2f} ± {half:.2f} |" in (out / "leaderboard.md").read_text()
        assert rows[name]["seeds"] == "2"
        assert [float(v) for v in rows[name]["seed_values"].split()] == pytest.approx(
            sorted(values, key=values.index)
        )
    seeds = {
        (t.user_attrs["candidate"], t.user_attrs["seeds"][0]): t.user_attrs["values"][0]
        for t in study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    }
    pairs = [seeds[("se_resnet", s)] - seeds[("baseline", s)] for s in (0, 1)]  # paired by seed
    half = T975_1 * statistics.stdev(pairs) / math.sqrt(2)
    assert float(rows["se_resnet"]["delta"]) == pytest.approx(statistics.fmean(pairs), abs=1e-9)
    assert float(rows["se_resnet"]["delta_ci95"]) == pytest.approx(half, rel=1e-3)
    assert f"{statistics.fmean(pairs):+.2f} ± {half:.2f}" in (out / "leaderboard.md").read_text()
    assert rows["se_resnet"]["beyond_noise"] == "n/a"  # two seeds a side are too few to tell
    planned = ai.plan(_base(), "se_resnet", input_size=(3, 32, 32))
    assert int(rows["se_resnet"]["params_added"]) == planned.params_added
    assert int(rows["se_resnet"]["macs_added"]) == planned.macs_added
    assert f"| {planned.params_added:,} |" in (out / "leaderboard.md").read_text()  # readable there
    assert rows["baseline"]["params_added"] == "0" and rows["baseline"]["delta"] == ""
    assert float(rows["baseline"]["s_per_epoch"]) > 0
    assert "skipped nothing: places no block" in (out / "leaderboard.md").read_text()
    assert (out / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    best = max(names, key=lambda n: (statistics.fmean(by_candidate[n]), -names.index(n)))
    ordered = list(rows)
    assert ordered[0] == best or statistics.fmean(by_candidate[ordered[0]]) == statistics.fmean(
        by_candidate[best]
    )
    best_runs = [
        t.user_attrs["runs"][0]
        for t in study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
        if t.user_attrs["candidate"] == ordered[0]
    ]
    best_file = max(best_runs, key=last_top1)
    assert (out / "best.safetensors").read_bytes() == (Path(best_file) / "last.safetensors").read_bytes()
    best_model = ai.load(out / "best.safetensors")
    from safetensors.torch import load_file

    written = load_file(Path(best_file) / "last.safetensors")  # the tensors as the run wrote them
    loaded = best_model.state_dict()
    assert loaded.keys() == written.keys() and all(torch.equal(loaded[k], v) for k, v in written.items())
    assert type(best_model) is type(_base())
    if ordered[0] == "baseline":
        assert best_model.attn_inject.plan.points == ()  # the plain model: no block
    else:
        assert best_model.attn_inject.plan.recipe.name == ordered[0]

    # the study is a file like any other: a run folder written into it is never read
    import sqlite3

    with sqlite3.connect(out / "study.db") as db:
        db.execute("UPDATE trial_user_attributes SET value_json = ? WHERE key = 'runs'", ('["/etc"]',))
    (out / "best.safetensors").unlink()
    assert main(args(data, out, *recipes)) == 0
    assert (out / "best.safetensors").read_bytes() == (Path(best_file) / "last.safetensors").read_bytes()
    assert "baseline" in printed and "beyond noise" in printed


def _base(name: str = SEARCHED):
    import timm

    return timm.create_model(name, num_classes=2)


class Zero(torch.nn.Module):
    """Erases the features it is given: a candidate that is clearly worse."""

    def __init__(self, channels: int) -> None:
        super().__init__()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 0


@pytest.fixture
def zero_block():
    ai.register_block("zero_test", Zero)
    yield
    ai.unregister_block("zero_test")


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory) -> Path:
    """``TRAINED`` trained on the digits until it tells them apart: a base whose fine-tune
    starts right, so that a candidate that erases the features is clearly worse."""
    from attn_inject.finetune.config import FinetuneConfig
    from attn_inject.finetune.run import run

    folder = tmp_path_factory.mktemp("trained")
    torch.manual_seed(0)
    from attn_inject.search.trial import BASELINE_RECIPE  # no block

    model = ai.inject(_base(TRAINED), BASELINE_RECIPE, input_size=(3, 32, 32), allow_empty=True)
    ai.save(
        model, folder / "start.safetensors", model_name=f"timm:{TRAINED}", model_kwargs={"num_classes": 2}
    )
    config = FinetuneConfig(
        str(folder / "start.safetensors"), str(data), 3, str(folder / "run"), batch_size=8, image_size=32,
        lr=3e-3, workers=0, threads=1, no_aug=True,
    )  # fmt: skip
    result = run(config)
    assert result.history[-1]["eval_top1"] == 100.0, result.history
    base = ai.saving.file.load_base_weights(folder / "run" / "last.safetensors")
    torch.save(base.state_dict(), folder / "base.pth")
    return folder / "base.pth"


def test_the_median_pruner_stops_a_clearly_worse_trial(data, trained, tmp_path, zero_block, capsys):
    recipe = tmp_path / "zeroed.yaml"
    recipe.write_text("name: zeroed\ninit: paper\nrules:\n  - block: zero_test\n    at: stage_output\n")
    out = tmp_path / "run"
    argv = [
        *args(data, out, str(recipe), repeats=1, epochs=3, model=TRAINED),
        "--pruner",
        "median",
        "--base-checkpoint",
        str(trained),
        *("--lr", "1e-4", "--no-aug"),  # a fine-tune that keeps what the base knows
    ]
    assert main(argv) == 0
    study = study_of(out)
    states = {t.user_attrs["candidate"]: t for t in study.trials}
    assert states["baseline"].state == optuna.trial.TrialState.COMPLETE
    assert states["baseline"].value > 80, "the baseline must be right for the comparison to mean something"
    pruned = states["zeroed"]
    assert pruned.state == optuna.trial.TrialState.PRUNED
    assert max(pruned.intermediate_values) < 2  # stopped before its last epoch
    assert "| zeroed | 0 |" in (out / "leaderboard.md").read_text()


def test_rerunning_the_command_continues_the_study_and_a_study_of_other_data_is_refused(
    data, tmp_path, capsys
):
    out = tmp_path / "run"
    assert main(["--json", *args(data, out, "se_resnet", repeats=1), "--timeout", "0.001"]) == 0
    first = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["ran"]
    assert first == 1 and finished(study_of(out)) == [("baseline", (0,))]
    other = tmp_path / "other"
    shutil.copytree(data, other)
    next(iter(sorted((other / "train" / "0").iterdir()))).unlink()
    message = _one_line_error(capsys, args(other, out, "se_resnet", repeats=1))
    assert "was made for another data" in message and "--study" in message
    assert len(study_of(out).trials) == 2 and len(list((out / "trials").iterdir())) == 1  # left alone
    assert main(["--json", *args(data, out, "se_resnet", repeats=1)]) == 0
    second = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["ran"]
    assert second == 1 and finished(study_of(out)) == [("baseline", (0,)), ("se_resnet", (0,))]
    assert main(["--json", *args(data, out, "se_resnet", repeats=1)]) == 0  # complete: nothing left
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["ran"] == 0


def _one_line_error(capsys, argv) -> str:
    assert main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def test_bad_input_gets_one_line_and_writes_nothing(data, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    assert "--storage is empty" in _one_line_error(capsys, [*args(data, out, "se_resnet"), "--storage", ""])
    message = _one_line_error(
        capsys, [*args(data, out, "se_resnet"), "--storage", "postgresql+psycopg2://u:secret@127.0.0.1:1/x"]
    )
    assert "cannot open it" in message and "secret" not in message
    space = tmp_path / "space.yaml"
    space.write_text("block: [cbam]\nat: [stage_output]\nspatial_kernel: [4]\n")
    argv = [a if a != "--recipes" else "--space" for a in args(data, out, str(space))]
    assert "the space has no valid point" in _one_line_error(capsys, argv)
    monkeypatch.setitem(sys.modules, "optuna", None)
    assert "pip install 'attn-inject[search]'" in _one_line_error(capsys, args(data, out, "se_resnet"))
    assert not out.exists()


def test_tpe_searches_a_space_point_by_point_and_records_each_trials_recipe(data, tmp_path, capsys):
    space = tmp_path / "space.yaml"
    space.write_text("block: [se, eca]\nat: [stage_output]\nratio: [4, 16]\n")
    out = tmp_path / "run"
    argv = [a if a != "--recipes" else "--space" for a in args(data, out, str(space), repeats=1)]
    assert main([*argv, "--sampler", "tpe", "--n-trials", "2"]) == 0
    study = study_of(out)
    trials = study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    assert len(trials) == 3 == len(study.trials)  # the baseline and two sampled points
    sampled = [t for t in trials if t.user_attrs["candidate"] != "baseline"]
    for t in sampled:
        assert set(t.params) == {"block", "at", "ratio"}
        recipe = ai.load_recipe(t.user_attrs["recipe"] + "\n")
        (rule,) = recipe.rules
        assert rule.block.kind == t.params["block"] and rule.at == "stage_output"
        assert rule.block.params.get("ratio") == (
            int(t.params["ratio"]) if t.params["block"] == "se" else None
        )
        assert t.user_attrs["params_added"] > 0
    assert "baseline" in (out / "leaderboard.md").read_text()


def test_a_space_drops_what_a_kind_does_not_have_and_refuses_unknown_keys(tmp_path):
    from attn_inject.search import SearchError, load_space

    space = tmp_path / "space.yaml"
    space.write_text("block: [eca, cbam]\nat: [residual_branch]\nspatial_kernel: [3, 7]\n")
    candidates, invalid = load_space(space)
    assert sorted(c.name for c in candidates) == [
        "cbam spatial_kernel=3 @residual_branch identity",
        "cbam spatial_kernel=7 @residual_branch identity",
        "eca @residual_branch identity",  # ECA has no spatial kernel: one point, not two
    ]
    assert invalid == []
    space.write_text("block: [se]\nat: [residual_branch]\nwidth: [3]\n")
    with pytest.raises(SearchError, match="unknown key 'width'; allowed: block, at, stages"):
        load_space(space)


@pytest.fixture
def saved_base(tmp_path) -> Path:
    """``SEARCHED`` with no block, written by ``ai.save``: every floating-point weight and buffer
    moved off its initial value, so that a trial started from anything else differs from it."""
    from attn_inject.search.trial import BASELINE_RECIPE  # no block

    torch.manual_seed(0)
    model = ai.inject(_base(), BASELINE_RECIPE, input_size=(3, 32, 32), allow_empty=True)
    with torch.no_grad():
        for tensor in model.state_dict().values():
            if tensor.is_floating_point():
                tensor.add_(torch.rand_like(tensor))
    path = tmp_path / "base.safetensors"
    ai.save(model, path, model_name=f"timm:{SEARCHED}", model_kwargs={"num_classes": 2})
    return path


def test_the_base_can_be_a_file_written_by_save_and_its_weights_start_every_trial(data, saved_base, tmp_path):
    out = tmp_path / "run"
    argv = [a for a in args(data, out, "se_resnet", repeats=1) if a not in ("--model", f"timm:{SEARCHED}")]
    argv = [a for a in argv if a not in ("--model-kwargs", "num_classes=2")]
    assert main([*argv, "--checkpoint", str(saved_base)]) == 0
    base = ai.saving.file.load_base_weights(saved_base).state_dict()
    for start in sorted(out.glob("trials/*/start.safetensors")):
        weights = ai.saving.file.load_base_weights(start).state_dict()
        assert all(torch.equal(weights[k], base[k]) for k in base)
    assert len(finished(study_of(out))) == 2


@pytest.mark.parametrize(
    "message, retried",
    [
        ("table studies already exists", True),  # SQLite: another worker made the tables first
        ("database is locked", True),
        ("unable to open database file", False),  # a bad path: refused at once
    ],
)
def test_opening_a_new_database_retries_only_a_lost_creation_race(monkeypatch, message, retried):
    import optuna
    from sqlalchemy.exc import OperationalError

    from attn_inject.search import study as study_module

    calls = []

    def storage(*args, **kwargs):
        calls.append(args)
        if len(calls) == 1:
            raise OperationalError("CREATE TABLE studies", {}, Exception(message))
        return "opened"

    monkeypatch.setattr(optuna.storages, "RDBStorage", storage)
    spec = study_module.StudySpec("s", "sqlite:///x.db", "grid", "none", (), (0,), 1, None, 10, {})
    if retried:
        assert study_module._storage(spec) == "opened" and len(calls) == 2
    else:
        with pytest.raises(ai.AttnInjectError, match=f"cannot open it: .*{message}"):
            study_module._storage(spec)
        assert len(calls) == 1
