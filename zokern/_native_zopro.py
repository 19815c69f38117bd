"""The ``cpu`` backend of ZOPrO's direction passes: the C++ kernels of csrc/cpu/zopro_pass.cpp
(zokern._zopro_reference gives their math). CPU only."""

from __future__ import annotations

import torch


def zopro_reduce(tensors, vhats, bases, *, seed) -> torch.Tensor:
    """Per tensor, (vhat . n, n . n) in float64, an [n_tensors, 2] tensor."""
    return torch.ops.zokern.zopro_reduce(list(tensors), list(vhats), list(bases), seed)


def zopro_apply_(tensors, mus, vhats, bases, *, seed, coef) -> None:
    """x += coef[p, 0] mu + coef[p, 1] vhat + coef[p, 2] n for every tensor p."""
    if tensors:
        coef = coef.to(device="cpu", dtype=torch.float32).contiguous()
        torch.ops.zokern.zopro_apply_(list(tensors), list(mus), list(vhats), list(bases), seed, coef)
