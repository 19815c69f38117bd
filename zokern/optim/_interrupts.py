"""Ctrl-C during a pass: a pass is one fused call per (param group, device) chunk, then the step's record of what it
has applied (which its undo reads when the step fails). A KeyboardInterrupt between two calls, or between the last
call and that record, would leave parameters perturbed with nothing to tell the undo; so a SIGINT that arrives while
a pass runs is held until the pass and its record are done, then raised as usual."""

from __future__ import annotations

import signal
import threading


class held_interrupts:  # noqa: N801 (used as a context manager, like contextlib's)
    """Hold SIGINT during the block, when Python's default handler (the KeyboardInterrupt) is in place, in the main
    thread (which alone receives signals and may set their handlers). A program's own handler is left alone: one
    that is woken through a file descriptor (asyncio's add_signal_handler) hears of the signal when it arrives,
    whatever the Python handler, and would hear it twice."""

    __slots__ = ("_previous", "_received")

    def __init__(self) -> None:
        self._previous = None
        self._received = False

    def __enter__(self) -> None:
        if self._previous is None and (
            signal.getsignal(signal.SIGINT) is signal.default_int_handler
            and threading.current_thread() is threading.main_thread()
        ):
            self._previous = signal.signal(signal.SIGINT, self._hold)

    def _hold(self, signum, frame) -> None:
        self._received = True

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            previous, self._previous = self._previous, None
            signal.signal(signal.SIGINT, previous)
            if self._received:
                self._received = False
                signal.raise_signal(signal.SIGINT)  # now: the KeyboardInterrupt
