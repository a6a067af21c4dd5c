"""What a search shows and leaves for other tools: a line as each trial starts and ends (k of
N, candidate, seed, elapsed, ETA), a leaderboard.csv of plain numbers, a study whose metric
has a name and whose only parameter is the candidate, the data described beside its hash,
each fine-tune in TensorBoard and MLflow, and a Pareto plot whose labels never overlap and
whose axes follow the means, not two-seed intervals."""

from __future__ import annotations

import csv
import itertools
import math
import re
import statistics

import pytest

from attn_inject.cli.main import main
from attn_inject.search.leaderboard import CSV_COLUMNS, Row, pareto_figure

from .test_search import args, data, optuna, study_of

__all__ = ["data"]  # the digits fixture, shared with test_search.py

START = re.compile(
    r"^attn-inject search: trial (\d+) of (\d+) \(study trial (\d+)\): (\S+), seed (\d+): started; "
    r"(\d+:\d\d:\d\d) elapsed, ETA (unknown until this worker ends a trial|\d+:\d\d:\d\d)$"
)
END = re.compile(
    r"^attn-inject search: trial (\d+) of (\d+) \(study trial (\d+)\): (\S+), seed (\d+): "
    r"top-1 ([\d.]+) in (\d+:\d\d:\d\d); (\d+:\d\d:\d\d) elapsed, ETA (\d+:\d\d:\d\d)$"
)


@pytest.mark.filterwarnings("ignore:Target and region quantiles")  # one parameter: importance 1
def test_a_search_reports_each_trial_writes_numbers_and_logs_each_fine_tune(
    data, tmp_path, capsys, monkeypatch
):
    pytest.importorskip("tensorboard")
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    uri = (tmp_path / "mlruns").as_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    out, board = tmp_path / "run", tmp_path / "tb"
    argv = args(data, out, "se_resnet", repeats=2)
    assert main([*argv, "--log-tensorboard", str(board), "--log-mlflow", "--log-interval", "2"]) == 0
    err = capsys.readouterr().err.splitlines()
    study = study_of(out)
    complete = study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    by_number = {t.number: t for t in complete}

    # a line as each trial starts and ends: k of N in order, its candidate and seed
    starts = [m for m in map(START.match, err) if m]
    ends = [m for m in map(END.match, err) if m]
    assert [int(m[1]) for m in starts] == [1, 2, 3, 4] == [int(m[1]) for m in ends]
    assert {int(m[2]) for m in starts + ends} == {4}  # 2 candidates x 2 seeds
    assert "unknown" in starts[0][7] and "unknown" not in starts[1][7]
    for m in ends:
        t = by_number[int(m[3])]
        assert (m[4], [int(m[5])]) == (t.user_attrs["candidate"], t.user_attrs["seeds"])
        assert float(m[6]) == pytest.approx(t.value, abs=0.005)
    assert ends[-1][9] == "0:00:00"  # nothing left
    assert any(
        line.startswith("epoch 1/1 [2/") and "images/s" in line for line in err
    )  # the fine-tunes' lines

    # the study: a named metric; the candidate is its only parameter, the seed an attribute
    assert study.metric_names == ["val_top1_mean"]
    assert all(t.params == {"candidate": t.user_attrs["candidate"]} for t in complete)
    assert optuna.importance.get_param_importances(study) == {"candidate": 1.0}
    # the data described beside its hash, counted here from the folder
    images = {split: len(list((data / split).rglob("*.png"))) for split in ("train", "val")}
    attrs = study.user_attrs
    assert attrs["data_path"] == str(data.resolve()) and attrs["data_images"] == images
    assert attrs["data_classes"] == ["0", "1"] and attrs["data_class_count"] == 2
    report = (out / "leaderboard.md").read_text()
    assert (
        f"Data: {data.resolve()}: 2 classes (0, 1), {images['train']} training and {images['val']} "
        f"validation images; file names and sizes hash {attrs['data']}." in report
    )

    # leaderboard.csv: numbers, each column one figure
    with open(out / "leaderboard.csv", newline="") as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames or ()) == CSV_COLUMNS
        rows = {r["candidate"]: r for r in reader}
    values = {
        name: [t.value for t in sorted(complete, key=lambda t: t.number) if t.user_attrs["candidate"] == name]
        for name in ("baseline", "se_resnet")
    }
    for name, seen in values.items():
        assert float(rows[name]["top1_mean"]) == pytest.approx(statistics.fmean(seen))
        assert float(rows[name]["top1_ci95"]) == pytest.approx(
            12.7062 * statistics.stdev(seen) / math.sqrt(2), rel=1e-4, abs=1e-9
        )
        assert float(rows[name]["s_per_epoch"]) > 0
        assert int(rows[name]["params_added"]) >= 0 and int(rows[name]["macs_added"]) >= 0
    assert float(rows["se_resnet"]["delta"]) == pytest.approx(
        statistics.fmean(values["se_resnet"]) - statistics.fmean(values["baseline"])
    )
    assert rows["baseline"]["delta"] == "" and rows["baseline"]["delta_ci95"] == ""
    # each fine-tune in TensorBoard (a folder per trial and seed) and in MLflow (a run, tagged)
    for t in complete:
        (seed,) = t.user_attrs["seeds"]
        events = EventAccumulator(str(board / "attn-inject-search" / f"{t.number:04d}-seed{seed}"))
        events.Reload()
        assert [e.value for e in events.Scalars("eval/top1")] == [pytest.approx(t.value)]
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("attn-inject-search")
    runs = client.search_runs([experiment.experiment_id])
    tagged = {(r.data.tags["candidate"], int(r.data.tags["seed"]), int(r.data.tags["trial"])) for r in runs}
    assert tagged == {(t.user_attrs["candidate"], t.user_attrs["seeds"][0], t.number) for t in complete}
    assert {r.info.status for r in runs} == {"FINISHED"}
    try:  # pandas reads the figures as numbers, where it is installed (not a test dependency)
        import pandas
    except ImportError:
        return
    frame = pandas.read_csv(out / "leaderboard.csv")
    for column in ("top1_mean", "top1_ci95", "delta", "delta_ci95", "s_per_epoch"):
        assert frame[column].dtype.kind == "f", column
    for column in ("params_added", "macs_added", "seeds", "pruned", "failed"):
        assert frame[column].dtype.kind == "i", column


# --- the Pareto plot -------------------------------------------------------------------------


def _row(name: str, values: list[float], macs: int = 0) -> Row:
    return Row(name, values=values, seeds=list(range(len(values))), macs_added=macs)


def _labels(figure):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.text import Text

    renderer = FigureCanvasAgg(figure).get_renderer()
    (ax,) = figure.axes
    # the text's own box (an annotation's own extent includes its leader line)
    boxes = []
    for text in ax.texts:
        text.update_positions(renderer)
        boxes.append(Text.get_window_extent(text, renderer))
    return ax, boxes


@pytest.mark.parametrize("count", [8, 40])
def test_pareto_labels_never_overlap_even_for_points_on_top_of_each_other(count):
    rows = [_row(f"candidate_with_a_long_name_{k}", [70.0 + k * 1e-3, 70.5]) for k in range(count)]
    figure = pareto_figure(rows)
    _, boxes = _labels(figure)
    assert len(boxes) == count
    for a, b in itertools.combinations(boxes, 2):
        assert not a.overlaps(b), (a, b)
    height = figure.get_figheight() * figure.dpi
    assert all(box.y0 >= 0 and box.y1 <= height for box in boxes)  # inside the figure


def test_pareto_axes_follow_the_means_not_two_seed_intervals():
    # two seeds 20 points apart: intervals of +-127 points around means 70 to 72
    rows = [_row("a", [60.0, 80.0]), _row("b", [61.0, 81.0], 5_000_000), _row("c", [62.0, 82.0], 9_000_000)]
    ax, _ = _labels(pareto_figure(rows))
    low, high = ax.get_ylim()
    assert 64 < low < 70 and 72 < high < 78  # the means' span (2 points) on each side, a margin
    cut_marks = [line for line in ax.lines if line.get_marker() in ("^", "v")]
    assert len(cut_marks) == 6  # each interval cut at both ends, and marked


def test_pareto_axes_hold_intervals_that_fit():
    rows = [_row("a", [70.0, 70.5, 71.0]), _row("b", [74.0, 75.0, 75.5], 1_000_000)]
    ax, _ = _labels(pareto_figure(rows))
    low, high = ax.get_ylim()
    assert low < rows[0].mean - rows[0].interval and high > rows[1].mean + rows[1].interval
    assert not [line for line in ax.lines if line.get_marker() in ("^", "v")]
