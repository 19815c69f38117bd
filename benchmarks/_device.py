"""The device a benchmark times on: its syncs, peak memory and name, for any ``cuda:N`` (never the current device
by default, which may be another one)."""

from __future__ import annotations

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
