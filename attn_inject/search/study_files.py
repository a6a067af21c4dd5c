"""Where a study's files live in ``--out``, and the one check every path of a search passes.

    OUT/study.db                       the default storage, shared by every study in OUT
    OUT/trials/NNNN-seedS/             the default study's trials (--study attn-inject-search)
    OUT/leaderboard.md, .csv, pareto.png, best.safetensors
    OUT/NAME/trials/NNNN-seedS/        the trials of --study NAME
    OUT/NAME/leaderboard.md, ...       its report

A study's name is a folder name, checked: letters, digits, ``.``, ``_`` and ``-``, not a
name the default study's files use. Every path the search writes or reads (a trial's run
folder, a report file) is resolved and must lie inside ``--out``; a seed or a trial number
read from the study cannot lead elsewhere. The paths a trial writes (``trials/``, its folder,
``run/``, ``start.safetensors``) are links nowhere: each is absent, or a plain folder or file
(``lstat``), before a trial runs.
"""

from __future__ import annotations

import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path

from ..core.files import file_kind
from ..core.messages import shown
from ..core.values import is_int
from .errors import SearchError

__all__ = ["DEFAULT_STUDY", "MAX_SEED", "StudyFiles", "check_study_name", "link_or_kind"]

DEFAULT_STUDY = "attn-inject-search"
MAX_SEED = 2**32 - 1  # numpy's seeds run from 0 to 2**32 - 1
MAX_TRIAL_NUMBER = 10**9
_STUDY_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
# names the default study's own files and folders take in OUT
_RESERVED = frozenset(
    {"trials", "study.db", "leaderboard.md", "leaderboard.csv", "pareto.png", "best.safetensors"}
)


def check_study_name(name: str) -> str:
    """``name`` if it can name a study's folder; SearchError otherwise."""
    if not isinstance(name, str) or not _STUDY_NAME.fullmatch(name) or name in _RESERVED:
        raise SearchError(
            f"--study {shown(name)} is not allowed; a study name is 1 to 64 letters, digits, '.', '_' "
            f"or '-', starting with a letter or digit, and not one of {', '.join(sorted(_RESERVED))}"
        )
    return name


def link_or_kind(path: Path, want: str) -> str | None:
    """What ``path`` itself is (``lstat``: a link is not followed) when it is neither absent
    nor ``want`` ("a regular file" or "a folder"): "a symbolic link", "a FIFO (named pipe)"...;
    None when it is absent or ``want``."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return None
    kind = "a symbolic link" if stat.S_ISLNK(mode) else file_kind(mode)
    return None if kind == want else kind


@dataclass(frozen=True)
class StudyFiles:
    """The files of study ``study`` in the folder ``out`` (resolved)."""

    out: Path
    study: str

    @classmethod
    def of(cls, out: str | Path, study: str) -> StudyFiles:
        return cls(Path(out).resolve(), check_study_name(study))

    @property
    def folder(self) -> Path:
        """Where the study's trials and report go: OUT itself for the default study."""
        return self.out if self.study == DEFAULT_STUDY else self.out / self.study

    @property
    def trials(self) -> Path:
        return self.folder / "trials"

    @property
    def leaderboard_md(self) -> Path:
        return self.folder / "leaderboard.md"

    @property
    def leaderboard_csv(self) -> Path:
        return self.folder / "leaderboard.csv"

    @property
    def pareto(self) -> Path:
        return self.folder / "pareto.png"

    @property
    def best(self) -> Path:
        return self.folder / "best.safetensors"

    def inside(self, path: Path, what: str) -> Path:
        """``path`` resolved (links followed), if it lies inside OUT; SearchError otherwise."""
        resolved = path.resolve()
        if not resolved.is_relative_to(self.out):
            raise SearchError(f"{what} {shown(str(path))} resolves outside --out {shown(str(self.out))}")
        return resolved

    def trial_folder(self, number: object, seed: object) -> Path:
        """``trials/NNNN-seedS`` of trial ``number``'s ``seed``: both checked (they come from
        the study), the folder inside OUT."""
        if not is_int(number) or not 0 <= number <= MAX_TRIAL_NUMBER:
            raise SearchError(f"trial number {shown(number)} is not allowed; 0 to {MAX_TRIAL_NUMBER}")
        if not is_int(seed) or not 0 <= seed <= MAX_SEED:
            raise SearchError(
                f"trial {number}: seed {shown(seed)} is not allowed; an integer from 0 to {MAX_SEED}"
            )
        return self.inside(self.trials / f"{number:04d}-seed{seed}", f"trial {number}'s folder")

    def trial_run(self, number: object, seed: object) -> Path:
        """:meth:`trial_folder`, for a trial about to run: ``trials/``, the folder, its ``run/``
        and its ``start.safetensors`` each absent or a plain folder or file (no link, even to a
        place inside OUT), so that the fine-tune's writes and removals stay in OUT."""
        folder = self.trial_folder(number, seed)
        name = f"{number:04d}-seed{seed}"
        for path, want in (
            (self.trials, "a folder"),
            (self.trials / name, "a folder"),
            (self.trials / name / "run", "a folder"),
            (self.trials / name / "start.safetensors", "a regular file"),
        ):
            kind = link_or_kind(path, want)
            if kind is not None:
                raise SearchError(
                    f"trial {number}: {path.relative_to(self.out)} in --out {shown(str(self.out))} is "
                    f"{kind}; a trial's trials/, folder, run/ and start.safetensors must be plain "
                    "folders and files (not links), or absent"
                )
        return folder
