"""Small host-to-device copies that do not stall the host: on CUDA a copy from pageable memory synchronises the
stream (it waits for every queued kernel), so coefficients, seeds and tile tables go through pinned memory and an
asynchronous copy; PyTorch's caching host allocator keeps the pinned buffer alive until the copy has run."""

from __future__ import annotations

import torch


def to_device(values, device: torch.device | str, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``values`` (a host tensor or a list of numbers) as a tensor on ``device``, without a host sync."""
    host = values if isinstance(values, torch.Tensor) else torch.tensor(values, dtype=dtype)
    if dtype is not None:
        host = host.to(dtype)
    device = torch.device(device)
    if device.type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)
