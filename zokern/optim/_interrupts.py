"""Ctrl-C during a pass: a pass is one fused call per (param group, device) chunk, then the step's record of what it
has applied (which its undo reads when the step fails). A KeyboardInterrupt between two calls, or between the last
call and that record, would leave parameters perturbed with nothing to tell the undo; so a SIGINT that arrives while
a pass runs is held until the pass and its record are done, then handed to the program's handler as usual."""

from __future__ import annotations

import signal
import threading
import weakref


class _Holding:
    """The process's one hold: the blocks open, the handler they replaced, the SIGINT they received. Open blocks are
    held weakly: one that an exception cut short before its end (another signal's handler raising between two of its
    steps) closes when it is collected, and the next block puts the program's handler back."""

    open: weakref.WeakSet = weakref.WeakSet()
    previous = None
    received: tuple | None = None

    @classmethod
    def hold(cls, signum, frame) -> None:
        if cls.received is None:
            cls.received = (signum, frame)


class held_interrupts:  # noqa: N801 (used as a context manager, like contextlib's)
    """Hold SIGINT during the block, when a Python handler is in place (the default one raises KeyboardInterrupt; a
    program's own may raise too), in the main thread (which alone receives signals and may set their handlers).
    When the last open block ends, a SIGINT that came is handed to that handler, called as the signal would have
    called it: not raised again, since a program woken through a file descriptor (asyncio's add_signal_handler)
    heard of it when it arrived. Blocks may nest and end in any order: the first to open installs the hold, the last
    to end releases it."""

    __slots__ = ("__weakref__",)

    def __enter__(self) -> None:
        if self in _Holding.open or threading.current_thread() is not threading.main_thread():
            return
        if not _Holding.open:
            handler = signal.getsignal(signal.SIGINT)
            if handler == _Holding.hold:  # left installed by a block cut short: the handler it saved is the program's
                handler = _Holding.previous
            if not callable(handler):
                return  # SIG_IGN, SIG_DFL, or a handler not set from Python: nothing to hold it for
            _Holding.previous = handler
            signal.signal(signal.SIGINT, _Holding.hold)
        _Holding.open.add(self)

    def __exit__(self, *exc) -> None:
        if self not in _Holding.open:
            return
        _Holding.open.discard(self)
        if not _Holding.open:
            received, _Holding.received = _Holding.received, None
            signal.signal(signal.SIGINT, _Holding.previous)
            if received is not None:
                _Holding.previous(*received)  # KeyboardInterrupt, for the default handler
