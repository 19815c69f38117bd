"""The device a benchmark times on: its syncs, peak memory and name, for any ``cuda:N`` (never the current device
by default, which may be another one), and the timer every benchmark uses."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def is_cuda(device: torch.device | str) -> bool:
    return torch.device(device).type == "cuda"


def synchronize(device: torch.device | str) -> None:
    if is_cuda(device):
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device | str) -> None:
    if is_cuda(device):
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def peak_bytes(device: torch.device | str) -> int | None:
    """The peak allocated since the last reset_peak; None on the CPU, where it is not tracked."""
    return torch.cuda.max_memory_allocated(device) if is_cuda(device) else None


def name(device: torch.device | str) -> str:
    return torch.cuda.get_device_name(device) if is_cuda(device) else f"CPU ({torch.get_num_threads()} threads)"


class Timer:
    """Median wall time of a callable over ``steps`` calls after ``warmup``, synchronising CUDA around each."""

    def __init__(self, device: str, steps: int, warmup: int) -> None:
        self.device, self.steps, self.warmup = device, steps, warmup

    def reset_peak(self) -> None:
        reset_peak(self.device)

    def __call__(self, fn: Callable[[int], object], peak_from_now: bool = True) -> tuple[float, float | None]:
        """(median ms, peak GiB during the timed calls or None on the CPU). ``peak_from_now=False``: the peak since
        the last reset_peak() (a CUDA graph's activations are allocated while it is captured, not when replayed)."""
        for t in range(self.warmup):
            fn(t)
        if peak_from_now:
            self.reset_peak()
        times = []
        for t in range(self.steps):
            synchronize(self.device)
            begin = time.perf_counter()
            fn(self.warmup + t)
            synchronize(self.device)
            times.append((time.perf_counter() - begin) * 1e3)
        peak = peak_bytes(self.device)
        return statistics.median(times), None if peak is None else peak / 2**30
