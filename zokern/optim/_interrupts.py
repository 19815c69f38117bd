"""Signals during a pass: a pass is one fused call per (param group, device) chunk, then the step's record of what it
has applied (which its undo reads when the step fails). An exception raised by a signal handler between two calls
(Ctrl-C's KeyboardInterrupt; a preemption handler's on SIGTERM), or between the last call and that record, would
leave parameters perturbed with nothing to tell the undo; so SIGINT and SIGTERM, when a Python handler takes them,
are held while a pass runs, until the pass and its record are done, then handed to that handler as usual."""

from __future__ import annotations

import signal
import threading
import weakref

HELD_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class _Hold:
    """The handler a hold installs for one signal, standing in for ``program`` (the handler it replaced). While a
    block holds the signal it keeps it for the block's end; called with none open (a handler installed during the
    block chained to the one it replaced, which was this; or a block cut short left it installed) it hands the
    signal to ``program`` at once. One per installation, so that chains through several holds reach each handler
    each replaced, in turn."""

    def __init__(self, signum: int, program) -> None:
        self.signum, self.program, self._forwarding = signum, program, False

    def __call__(self, signum, frame) -> None:
        if _Holding.open[signum]:
            _Holding.received.setdefault(signum, (signum, frame))
        elif not self._forwarding:  # (a cycle of chains ends here)
            self._forwarding = True
            try:
                self.program(signum, frame)
            finally:
                self._forwarding = False


class _Holding:
    """The process's one hold: per signal, the blocks open, the hold installed, and the signal if it came. Open
    blocks are held weakly: one that an exception cut short before its end (a handler of another signal raising
    between two of its steps) closes when it is collected, and the next block puts the program's handler back."""

    open: dict[int, weakref.WeakSet] = {signum: weakref.WeakSet() for signum in HELD_SIGNALS}
    installed: dict[int, _Hold] = {}
    received: dict[int, tuple] = {}


class held_interrupts:  # noqa: N801 (used as a context manager, like contextlib's)
    """Hold ``signals`` (SIGINT and SIGTERM by default) during the block, each when a Python handler takes it (the
    default SIGINT handler raises KeyboardInterrupt; a program's own may raise too), in the main thread (which alone
    receives signals and may set their handlers). When the last open block of a signal ends, the signal, if it came,
    is handed to its handler, called as the signal would have called it: not raised again, since a program woken
    through a file descriptor (asyncio's add_signal_handler) heard of it when it arrived. Blocks may nest and end in
    any order: the first to open installs a signal's hold, the last to end releases it. A handler the program
    installs during the block stays installed."""

    __slots__ = ("__weakref__", "signals")

    def __init__(self, signals: tuple[int, ...] = HELD_SIGNALS) -> None:
        self.signals = signals

    def __enter__(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for signum in self.signals:
            blocks = _Holding.open[signum]
            if self in blocks:
                continue
            if not blocks:
                handler = signal.getsignal(signum)
                if isinstance(handler, _Hold):  # left installed by a block cut short: it stood in for the program's
                    handler = handler.program
                if callable(handler):  # not SIG_IGN, SIG_DFL, or a handler not set from Python
                    _Holding.installed[signum] = _Hold(signum, handler)
                    signal.signal(signum, _Holding.installed[signum])
                else:
                    _Holding.installed.pop(signum, None)
            blocks.add(self)

    def __exit__(self, *exc) -> None:
        released = []
        for signum in self.signals:
            blocks = _Holding.open[signum]
            if self not in blocks:
                continue
            blocks.discard(self)
            hold = _Holding.installed.get(signum)
            if not blocks and hold is not None:
                del _Holding.installed[signum]
                # A handler the program installed during the block (the closure's own, say) stays: only the hold is
                # taken down. The signal held, if any, came for the handler the hold stood in for.
                if signal.getsignal(signum) is hold:
                    signal.signal(signum, hold.program)
                if signum in _Holding.received:
                    released.append((hold.program, _Holding.received.pop(signum)))
        raised = None
        for handler, arguments in released:  # every one, even after a handler raised
            try:
                handler(*arguments)  # KeyboardInterrupt, for SIGINT's default handler
            except BaseException as e:
                raised = raised or e
        if raised is not None:
            raise raised
