"""A run's JSON-lines output (metrics, sketches) that a failed run cannot erase: an existing file is replaced when
the run writes its first record, not when the run starts. A run that fails before its first record (bad data, a
model that does not load, an error in pretraining) leaves the previous run's file as it was; a run that fails later
leaves the records it made, flushed one by one, so a long run's progress stays readable while it goes."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path


class RecordFile:
    """Writes records to ``path``, one JSON object a line, flushed after each; the file is opened (truncated) at
    the first record. Use as a context manager, or call ``close``."""

    def __init__(self, path: Path, on_first: Callable[[], None] | None = None) -> None:
        """``on_first``: called once, just before the first record replaces the file (a run's other outputs are
        replaced at the same moment)."""
        self.path = Path(path)
        self._file = None
        self._on_first = on_first

    def write(self, record: dict) -> None:
        if self._file is None:
            if self._on_first is not None:
                self._on_first()
            self._file = self.path.open("w")
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> RecordFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
