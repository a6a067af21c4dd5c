"""The run folder's file names, and the error for a folder or resume state a run may not use."""

from __future__ import annotations

from ..core.errors import AttnInjectError

__all__ = ["ARGS", "BEST", "CURVES", "LAST", "OUTPUTS", "RESUME", "SUMMARY", "RunError"]

ARGS, SUMMARY, CURVES, LAST, BEST, RESUME = (
    "args.yaml",
    "summary.csv",
    "curves.png",
    "last.safetensors",
    "best.safetensors",
    "resume.pth",
)
OUTPUTS = (ARGS, SUMMARY, CURVES, LAST, BEST, RESUME)


class RunError(AttnInjectError, ValueError):
    """The run cannot start: its output folder or resume state is not what it should be."""
