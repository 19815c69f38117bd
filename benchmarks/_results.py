"""Where the benchmarks' tables go: printed, and appended to benchmarks/RESULTS.md unless --no-append."""

from __future__ import annotations

from pathlib import Path

RESULTS = Path(__file__).with_name("RESULTS.md")


def publish(text: str, append: bool) -> None:
    print(text)
    if append:
        with RESULTS.open("a") as fh:
            fh.write(text)
