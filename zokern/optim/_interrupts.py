"""Ctrl-C during a pass: a pass is one fused call per (param group, device) chunk, then the step's record of what it
has applied (which its undo reads when the step fails). A KeyboardInterrupt between two calls, or between the last
call and that record, would leave parameters perturbed with nothing to tell the undo; so a SIGINT that arrives while
a pass runs is held until the pass and its record are done, then raised as usual."""

from __future__ import annotations

import signal
import threading


class held_interrupts:  # noqa: N801 (used as a context manager, like contextlib's)
    """Hold SIGINT during the block. Not outside the main thread (which alone receives signals and may set their
    handlers), nor when the handler in place was not set from Python (it could not be put back)."""

    __slots__ = ("_previous", "_received")

    def __enter__(self) -> None:
        self._previous = None
        self._received = False
        if threading.current_thread() is threading.main_thread():
            previous = signal.getsignal(signal.SIGINT)
            if previous is not None:
                self._previous = signal.signal(signal.SIGINT, self._hold)

    def _hold(self, signum, frame) -> None:
        self._received = True

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            if self._received:
                signal.raise_signal(signal.SIGINT)  # now, to the handler the user had
