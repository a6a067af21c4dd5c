"""``attn-inject search`` gives one result for one seed whether it prints to a terminal (a
progress bar, which imports rich; a fresh interpreter on a pseudo-terminal) or not (this
process, into a buffer): every trial's ``summary.csv`` byte for byte."""

from __future__ import annotations

from pathlib import Path

import pytest

from .test_finetune_inputs import run_here, run_on_a_terminal
from .test_search import args, write_digits

pytest.importorskip("optuna")


def summaries(out: Path) -> dict[str, bytes]:
    """Each trial's summary.csv by its path under ``out``."""
    found = {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("summary.csv"))}
    assert found, f"no summary.csv under {out}"
    return found


@pytest.mark.processes
def test_one_seed_gives_the_same_search_in_a_pipe_and_on_a_terminal(tmp_path):
    data = write_digits(tmp_path / "digits", (0, 1), per_class=8)
    piped, terminal = tmp_path / "piped", tmp_path / "terminal"
    run_here(args(data, piped, "se_resnet", repeats=1))  # no terminal: this process, printing into a buffer
    screen = run_on_a_terminal(args(data, terminal, "se_resnet", repeats=1))
    assert b"\x1b[" in screen  # the terminal run drew with rich
    assert summaries(piped) == summaries(terminal)
