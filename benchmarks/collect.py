"""Gather the benchmarks' markdown sections into one page (``docs/benchmarks.md``).

python benchmarks/collect.py build/bench/*.md --out docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import datetime
from pathlib import Path

HEADER = """# Benchmarks

Written by `make bench` (`benchmarks/`), which runs every script and collects their
sections here. Candidates run interleaved, round after round, in one process; the figures
are medians, and each section names the machine it ran on. Timings from a machine that is
busy with other work mean little: run `make bench` on an idle one.
"""


def collect(sections: list[Path]) -> str:
    missing = [str(s) for s in sections if not s.is_file()]
    if missing:
        raise SystemExit(f"collect: no such section file: {', '.join(missing)}")
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    body = "\n".join(s.read_text().rstrip() + "\n" for s in sections)
    return f"{HEADER}\nCollected {stamp}.\n\n{body}"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("sections", nargs="+", type=Path, help="markdown files written by the scripts' --out")
    p.add_argument("--out", required=True, type=Path, help="the page to write")
    args = p.parse_args(argv)
    text = collect(args.sections)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(f"wrote {args.out} ({len(args.sections)} sections)")


if __name__ == "__main__":
    main()
