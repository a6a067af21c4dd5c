"""Experiment trackers a fine-tune reports to: TensorBoard (``--log-tensorboard DIR``),
MLflow (``--log-mlflow``) and Weights & Biases (``--log-wandb``), as timm's ``train.py``
offers ``--log-wandb``.

Each package is imported only when its flag is given, and checked before anything is
written: a missing one is a :class:`SettingError` (exit 2) naming what to install. A
tracker is opened by the main process only. One that fails while the run goes on (a server
that went away) is closed with one line on stderr and the run continues without it: a
tracker never costs a fine-tune.

    open_trackers(config, label) ─ log(metrics, step) per log interval and per epoch ─ close(status)

Metrics share one step axis, the optimizer steps taken (W&B needs it increasing):
``train/loss``, ``train/lr``, ``train/images_per_s`` every ``--log-interval`` steps;
``epoch``, ``train/epoch_loss``, ``train/gate``, ``eval/loss``, ``eval/top1``,
``eval/top5`` and ``lr`` at each epoch's end.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..core.errors import AttnInjectError
from ..core.messages import cut, error_line
from .config import TRACKER_PACKAGES, trackers_wanted

if TYPE_CHECKING:
    from .config import FinetuneConfig

__all__ = [
    "UNLABELLED",
    "RunLabel",
    "TrackerError",
    "Trackers",
    "open_trackers",
    "tracking",
]

DEFAULT_PROJECT = "attn-inject"  # the MLflow experiment / W&B project unless the environment names one
MAX_PARAM = 500  # characters of a setting's value MLflow is given (its limit on old servers)


@dataclass(frozen=True)
class RunLabel:
    """How a fine-tune is named in a tracker: ``name`` (a TensorBoard sub-folder, an MLflow
    or W&B run name), ``group`` (the MLflow experiment and W&B project's group: a search's
    study) and ``tags`` (a search's candidate, seed and trial)."""

    name: str = ""
    group: str | None = None
    tags: tuple[tuple[str, str], ...] = ()


UNLABELLED = RunLabel()  # a fine-tune of its own: named by the tracker


class _Tracker:
    """One tracker: ``log`` metrics at a step, ``close`` with how the run ended."""

    name = "tracker"

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        raise NotImplementedError

    def close(self, status: str) -> None:
        raise NotImplementedError


class _TensorBoard(_Tracker):
    name = "TensorBoard"

    def __init__(self, folder: Path, label: RunLabel, params: Mapping[str, Any]) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(folder / label.name if label.name else folder))
        lines = [f"{k}: {v}" for k, v in {**params, **dict(label.tags)}.items()]
        self.writer.add_text("settings", "    " + "\n    ".join(lines), 0)  # markdown code block

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, step)

    def close(self, status: str) -> None:
        self.writer.close()


class _MLflow(_Tracker):
    """Through ``MlflowClient`` (no active run is left in MLflow's global state): the
    tracking URI from ``MLFLOW_TRACKING_URI``, the experiment from ``MLFLOW_EXPERIMENT_NAME``,
    else the label's group, else ``attn-inject``."""

    name = "MLflow"

    def __init__(self, label: RunLabel, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient()
        experiment = os.environ.get("MLFLOW_EXPERIMENT_NAME") or label.group or DEFAULT_PROJECT
        found = self.client.get_experiment_by_name(experiment)
        if found is None:
            try:
                experiment_id = self.client.create_experiment(experiment)
            except Exception:  # another worker of a search created it meanwhile
                found = self.client.get_experiment_by_name(experiment)
                if found is None:
                    raise
                experiment_id = found.experiment_id
        else:
            experiment_id = found.experiment_id
        run = self.client.create_run(experiment_id, run_name=label.name or None, tags=dict(label.tags))
        self.run_id = run.info.run_id
        values = [Param(k, cut(str(v), MAX_PARAM)) for k, v in params.items()]
        self.client.log_batch(self.run_id, params=values)

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(
            self.run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()]
        )

    def close(self, status: str) -> None:
        self.client.set_terminated(self.run_id, status=status)


class _Wandb(_Tracker):
    """``wandb.init`` with the project from ``WANDB_PROJECT`` (else ``attn-inject``), the
    label's group and name; ``WANDB_MODE=offline`` keeps it on the machine."""

    name = "W&B"

    def __init__(self, label: RunLabel, params: Mapping[str, Any], folder: Path) -> None:
        wandb = importlib.import_module("wandb")  # optional, untyped here
        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT") or DEFAULT_PROJECT,
            name=label.name or None,
            group=label.group,
            tags=[f"{k}={v}" for k, v in label.tags] or None,
            config={**params, **dict(label.tags)},
            dir=str(folder),
        )

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        self.run.log(dict(metrics), step=step)

    def close(self, status: str) -> None:
        self.run.finish(exit_code=0 if status == "FINISHED" else 1)


class Trackers:
    """The trackers a run reports to (none when no flag is given)."""

    def __init__(self, trackers: list[_Tracker]) -> None:
        self.trackers = trackers

    def __bool__(self) -> bool:
        return bool(self.trackers)

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        for tracker in list(self.trackers):
            try:
                tracker.log(metrics, step)
            except Exception as error:  # the run goes on without it
                self.trackers.remove(tracker)
                print(
                    f"finetune: {tracker.name} stopped logging ({error_line(error, 200)}); the run goes on",
                    file=sys.stderr,
                    flush=True,
                )
                with contextlib.suppress(Exception):
                    tracker.close("FAILED")

    def close(self, status: str = "FINISHED") -> None:
        for tracker in self.trackers:
            with contextlib.suppress(Exception):
                tracker.close(status)
        self.trackers = []


class TrackerError(AttnInjectError, RuntimeError):
    """A tracker that cannot be opened (an unreachable server, a refused login): the
    environment's error, not the command line's (exit 1)."""


def open_trackers(config: FinetuneConfig, label: RunLabel, main: bool = True) -> Trackers:
    """The trackers ``config`` asks for, opened (none on a process that is not the main
    one). A tracker that cannot be opened (an unreachable server) raises one line."""
    if not main:
        return Trackers([])
    params = {k: v for k, v in config.to_dict().items() if v is not None}
    opened: list[_Tracker] = []
    wanted = trackers_wanted(config)
    try:
        for flag, _, _ in TRACKER_PACKAGES:
            if not wanted[flag]:
                continue
            try:
                if flag == "--log-tensorboard":
                    opened.append(_TensorBoard(Path(config.log_tensorboard or "."), label, params))
                elif flag == "--log-mlflow":
                    opened.append(_MLflow(label, params))
                else:
                    opened.append(_Wandb(label, params, Path(config.out)))
            except Exception as error:
                raise TrackerError(f"{flag}: cannot start logging: {error_line(error, 300)}") from None
    except TrackerError:
        Trackers(opened).close("FAILED")
        raise
    return Trackers(opened)


@contextlib.contextmanager
def tracking(config: FinetuneConfig, label: RunLabel, main: bool = True) -> Iterator[Trackers]:
    """The trackers, open for the run's length; closed as FINISHED, or FAILED / KILLED when
    the run raised or was stopped."""
    trackers = open_trackers(config, label, main)
    status = "FAILED"
    try:
        yield trackers
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        trackers.close(status)
