"""The run folder: refused before anything is written, made ready, and its summary written."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..core.files import write_atomic
from ..core.messages import shown_apart
from ..core.values import is_int
from .config import FinetuneConfig
from .distributed import Context
from .outputs import ARGS, OUTPUTS, RESUME, RunError
from .resume import load_state

__all__ = ["check_out", "prepare_out", "write_summary"]


def check_out(config: FinetuneConfig) -> dict[str, Any] | None:
    """Refuse an output folder that is not one the run may write (one line, before anything
    is written); under ``--resume``, the checked resume state (else None)."""
    out = Path(config.out)
    if out.exists() and not out.is_dir():
        raise RunError(f"--out {out}: exists and is not a folder")
    found = [name for name in OUTPUTS if (out / name).exists()]
    if config.resume:
        if not (out / RESUME).is_file() or not (out / ARGS).is_file():
            raise RunError(f"--resume: {out} holds no run to resume (no {RESUME} and {ARGS})")
        from ..recipes.recipe import MAX_RECIPE_BYTES, RecipeError, read_yaml

        with open(out / ARGS, "rb") as f:
            raw = f.read(MAX_RECIPE_BYTES + 1)
        if len(raw) > MAX_RECIPE_BYTES:
            raise RunError(f"--resume: {out / ARGS} is over {MAX_RECIPE_BYTES} bytes; it is not this run's")
        try:
            saved = read_yaml(raw.decode("utf-8", "replace"), f"--resume: {out / ARGS}")
        except RecipeError as error:
            raise RunError(str(error)) from None
        if not isinstance(saved, dict):
            raise RunError(f"--resume: {out / ARGS} does not hold the run's settings")
        differ = config.differences(saved)
        if differ:
            now = config.to_dict()
            pairs = [(k, *shown_apart(saved.get(k), now[k], 60)) for k in differ]
            listed = ", ".join(f"{k}={was} in the run, {given} now" for k, was, given in pairs[:3])
            more = f" and {len(differ) - 3} more" if len(differ) > 3 else ""
            raise RunError(
                f"--resume: settings differ from the run in {out} ({listed}{more}); resume with the same ones"
                + (" (more --epochs extend the run)" if "epochs" in differ else "")
            )
        return load_state(out / RESUME, config.epochs)  # its fields too, before anything is written
    if found and not config.force:
        raise RunError(
            f"--out {out} holds the results of an earlier run ({', '.join(found)}); "
            "pass --resume to continue it or --force to start over"
        )
    return None


def prepare_out(config: FinetuneConfig, context: Context) -> Path:
    """RUNDIR made ready by the main process: a killed run's temporaries removed, old results
    removed under ``--force``, ``args.yaml`` written for a new or extended run."""
    import yaml

    out = Path(config.out)
    if context.main:
        out.mkdir(parents=True, exist_ok=True)
        for name in OUTPUTS:  # left by a run killed while writing (as convert cleans its own)
            for stale in out.glob(f".{name}.*.tmp*"):
                stale.unlink(missing_ok=True)
        if config.force and not config.resume:
            for name in OUTPUTS:
                (out / name).unlink(missing_ok=True)
        if not config.resume or config.epochs > _saved_epochs(out):  # a new run, or one extended
            text = yaml.safe_dump(config.to_dict(), sort_keys=False)
            write_atomic(out / ARGS, lambda tmp: tmp.write_text(text))
    context.barrier()
    return out


def _saved_epochs(out: Path) -> int:
    """The ``epochs`` an earlier run in ``out`` recorded (0 when there is none readable)."""
    from ..recipes.recipe import MAX_RECIPE_BYTES, RecipeError, read_yaml

    try:
        with open(out / ARGS, "rb") as f:
            saved = read_yaml(f.read(MAX_RECIPE_BYTES).decode("utf-8", "replace"), str(out / ARGS))
    except (OSError, RecipeError):
        return 0
    epochs = saved.get("epochs") if isinstance(saved, dict) else None
    return epochs if is_int(epochs) else 0


def write_summary(history: list[dict[str, float]], path: Path) -> None:
    """All rows so far, in timm's ``update_summary`` format, replacing ``path`` atomically."""
    from timm.utils import update_summary

    def write(tmp: Path) -> None:
        for i, row in enumerate(history):
            train = {k[len("train_") :]: v for k, v in row.items() if k.startswith("train_")}
            evaluation = {k[len("eval_") :]: v for k, v in row.items() if k.startswith("eval_")}
            update_summary(int(row["epoch"]), train, evaluation, str(tmp), lr=row["lr"], write_header=i == 0)

    write_atomic(path, write)
