"""Run a timm script (``train.py``, ``validate.py``...) unmodified, with patched models
registered under timm names first::

    python -m attn_inject.timm_train --register resnet18_se=start.safetensors \\
        path/to/train.py --model resnet18_se --initial-checkpoint start.safetensors ...

Each ``--register NAME=FILE`` calls :func:`attn_inject.register_timm_model`; the script then
runs as ``python SCRIPT ARGS...`` would run it (``sys.argv`` and ``sys.path[0]`` set, run as
``__main__``) in this process, where the names are registered. Its exit status is this
command's. A name or file that cannot be registered exits 2 (a malformed ``NAME=FILE``)
or 1, in one line, before the script starts.
"""

from __future__ import annotations

import argparse
import runpy
import sys
from collections.abc import Sequence
from pathlib import Path

from ..core.errors import AttnInjectError
from ..core.messages import first_line, shown

__all__ = ["main"]

PROG = "python -m attn_inject.timm_train"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Register patched models under timm names, then run a timm script (train.py) with them.",
    )
    parser.add_argument(
        "--register",
        action="append",
        required=True,
        metavar="NAME=FILE",
        help="a timm model name and the attn-inject file (or save_pretrained folder) it builds; repeatable",
    )
    parser.add_argument("script", help="the script to run, e.g. pytorch-image-models/train.py")
    parser.add_argument("args", nargs=argparse.REMAINDER, help="the script's own arguments")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    pairs = []
    for pair in args.register:
        name, sep, source = pair.partition("=")
        if not sep or not name or not source:
            parser.error(f"--register takes NAME=FILE, got {shown(pair)}")
        pairs.append((name, source))
    script = Path(args.script)
    if not script.is_file():
        parser.error(f"{args.script}: no such script")
    from .timm_bridge import register_timm_model

    try:
        for name, source in pairs:
            register_timm_model(name, source)
    except AttnInjectError as error:
        print(f"{PROG}: error: {first_line(error, 600)}", file=sys.stderr)
        return 1
    sys.argv = [str(script), *args.args]
    sys.path.insert(0, str(script.resolve().parent))
    runpy.run_path(str(script), run_name="__main__")
    return 0


if __name__ == "__main__":
    sys.exit(main())
