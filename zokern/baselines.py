"""MeZO's published step, re-implemented as the baseline the demo and the benchmarks measure zokern against.

It follows MeZO's large-model trainer (princeton-nlp/MeZO, large_models/trainer.py: zo_perturb_parameters,
zo_forward, zo_step, zo_update): the global generator reseeded before every pass, ``torch.normal`` per tensor in the
parameter's dtype, out-of-place adds, four passes, the forwards under ``torch.inference_mode``, one ``.item()`` host
sync (the projected gradient, before the reset pass), and weight decay skipped for biases and layer norms.
"""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Iterable

import torch

# zo_update decays a parameter unless its name holds one of these.
_NO_DECAY = ("bias", "layer_norm", "layernorm")


@torch.no_grad()
def mezo_published_step(
    params: Iterable[torch.Tensor] | Iterable[tuple[str, torch.Tensor]],
    loss_fn: Callable[[], torch.Tensor],
    seed: int,
    eps: float,
    lr: float,
    weight_decay: float = 0.0,
) -> torch.Tensor:
    """One MeZO step; returns L+ as a device tensor (zo_step's loss1: no second sync).

    ``params``: the trainable parameters, or ``(name, parameter)`` pairs (``model.named_parameters()``, the trainable
    ones), whose names decide weight decay as MeZO's do; unnamed parameters are all decayed.
    """
    named = [(None, p) if isinstance(p, torch.Tensor) else p for p in params]

    def perturb(scale: float) -> None:
        torch.manual_seed(seed)
        for _, p in named:
            z = torch.normal(mean=0, std=1, size=p.size(), device=p.device, dtype=p.dtype)
            p.data = p.data + scale * z * eps

    def forward() -> torch.Tensor:
        with torch.inference_mode():
            return loss_fn().detach()

    perturb(1)
    loss_plus = forward()
    perturb(-2)
    loss_minus = forward()
    projected_grad = ((loss_plus - loss_minus) / (2 * eps)).item()  # MeZO syncs here, before its reset pass
    perturb(1)
    torch.manual_seed(seed)
    for name, p in named:
        z = torch.normal(mean=0, std=1, size=p.size(), device=p.device, dtype=p.dtype)
        if name is not None and any(key in name for key in _NO_DECAY):
            p.data = p.data - lr * (projected_grad * z)
        else:
            p.data = p.data - lr * (projected_grad * z + weight_decay * p.data)
    return loss_plus
