"""Common random numbers: every evaluation of one step draws the same random numbers.

A ZO estimate divides L+ - L- by eps. If the closure draws random numbers (dropout in a model left in train mode, a
random batch or augmentation inside the closure), two evaluations of one step that draw different ones differ by
far more than the perturbation's effect, and the estimate is noise (a thousand-fold inflation of g with dropout 0.1
in a small MLP). Rewinding torch's generators to the step's start before each evaluation makes L+ and L- share the
same draws, so the step estimates the gradient of the expected loss; the next step draws fresh ones, since the
generators end the step one evaluation's draws further on.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from collections.abc import Iterator

import torch


class SharedRandomness:
    """torch's generators as they are now (the CPU one and those of the given CUDA devices), to be rewound to."""

    def __init__(self, devices: Iterable[torch.device]) -> None:
        self._cpu = torch.get_rng_state()
        self._cuda: dict[int, torch.Tensor] = {}
        # Inside a capture (cuda_graph=True) a generator's state cannot be set: its forwards draw fresh offsets each
        # (docs/optim.md: use eval mode there).
        if torch.cuda.is_initialized() and not torch.cuda.is_current_stream_capturing():
            for device in devices:
                if device.type == "cuda":
                    index = torch.cuda.current_device() if device.index is None else device.index
                    self._cuda.setdefault(index, torch.cuda.get_rng_state(index))

    def rewind(self) -> None:
        torch.set_rng_state(self._cpu)
        for index, state in self._cuda.items():
            torch.cuda.set_rng_state(state, index)


class BlockRandomness:
    """The same for ``perturbed()`` blocks: each seed's later blocks start from the generators' state at its first
    block, so they draw what it drew (as a step's evaluations do), and leave the generators as they found them, so
    draws made between blocks are not repeated. Forgotten when a new estimate begins (a seed drawn, an update
    applied); the last KEPT seeds at most are kept (a loop that never draws its seeds from the optimizer), each a few
    kilobytes of generator state."""

    KEPT = 256

    def __init__(self) -> None:
        self._first: dict[int, SharedRandomness] = {}

    def clear(self) -> None:
        self._first.clear()

    @contextlib.contextmanager
    def block(self, seed: int, devices: Iterable[torch.device]) -> Iterator[None]:
        first = self._first.get(seed)
        if first is None:
            if len(self._first) >= self.KEPT:
                del self._first[next(iter(self._first))]
            self._first[seed] = SharedRandomness(devices)
            yield
            return
        found = SharedRandomness(devices)
        first.rewind()
        try:
            yield
        finally:
            found.rewind()
