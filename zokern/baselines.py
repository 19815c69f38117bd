"""MeZO's published step, re-implemented as the baseline the demo and the benchmarks measure zokern against.

It follows MeZO's trainer (zo_perturb_parameters, zo_forward, zo_update): the global generator reseeded before
every pass, ``torch.normal`` per tensor in the parameter's dtype, out-of-place adds, four passes, and a ``.item()``
host sync for the projected gradient.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


@torch.no_grad()
def mezo_published_step(
    params: list[torch.Tensor],
    loss_fn: Callable[[], torch.Tensor],
    seed: int,
    eps: float,
    lr: float,
    weight_decay: float = 0.0,
) -> float:
    """One MeZO step; returns (L+ + L-) / 2."""

    def perturb(scale: float) -> None:
        torch.manual_seed(seed)
        for p in params:
            z = torch.normal(mean=0, std=1, size=p.size(), device=p.device, dtype=p.dtype)
            p.data = p.data + scale * z * eps

    perturb(1)
    loss_plus = loss_fn()
    perturb(-2)
    loss_minus = loss_fn()
    projected_grad = ((loss_plus - loss_minus) / (2 * eps)).item()  # MeZO syncs here, before its reset pass
    perturb(1)
    torch.manual_seed(seed)
    for p in params:
        z = torch.normal(mean=0, std=1, size=p.size(), device=p.device, dtype=p.dtype)
        p.data = p.data - lr * (projected_grad * z + weight_decay * p.data)
    return float((loss_plus + loss_minus) / 2)
