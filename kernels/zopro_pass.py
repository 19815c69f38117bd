"""The ``triton`` backend of ZOPrO's direction passes (their math: zokern._zopro_reference).

Tiled like the fused pass (kernels/zo_pass.py); a tile's table row holds the addresses of the parameter, its mu and
its vhat (0 where a tensor has none) and the tensor's index, which selects its row of per-tensor coefficients. The
reduction stores one (vhat . n, n . n) pair per tile; the pairs are summed per tensor on the host, in tile order.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from zokern.kernels import options
from zokern.kernels.philox import gaussian_tile
from zokern.kernels.zo_pass import _TL_DTYPES
from zokern.kernels.zo_pass import _round_nearest
from zokern.kernels.zo_pass import _widen
from zokern.kernels.zo_pass import _work_table

GPU_BLOCK = 2048
INTERPRETER_BLOCK = 8192


@triton.jit(do_not_specialize=["seed"])
def _zopro_kernel(table_ptr, seed, coef_ptr, partial_ptr, DTYPE: tl.constexpr, REDUCE: tl.constexpr,
                  BLOCK: tl.constexpr):  # fmt: skip
    pid = tl.program_id(0).to(tl.int64)
    row = table_ptr + pid * 7
    mu_address = tl.load(row + 1)
    vhat_address = tl.load(row + 2)
    base = tl.load(row + 3)
    numel = tl.load(row + 4)
    g0 = tl.load(row + 5)
    index = tl.load(row + 6)
    local = g0 - base + tl.arange(0, BLOCK)
    mask = (local >= 0) & (local < numel)
    n = gaussian_tile(seed, g0, BLOCK)
    if REDUCE:
        # Products and sums in float64, per tile then per tensor (docs/preference.md), as the other backends.
        n64 = n.to(tl.float64)
        dot = tl.zeros((BLOCK,), tl.float64)
        if vhat_address != 0:
            vhat = tl.load(vhat_address.to(tl.pointer_type(tl.float32)) + local, mask=mask, other=0.0)
            dot = vhat.to(tl.float64) * n64
        tl.store(partial_ptr + 2 * pid, tl.sum(tl.where(mask, dot, 0.0), axis=0))
        tl.store(partial_ptr + 2 * pid + 1, tl.sum(tl.where(mask, n64 * n64, 0.0), axis=0))
    else:
        x_ptrs = tl.load(row).to(tl.pointer_type(DTYPE)) + local
        x = _widen(tl.load(x_ptrs, mask=mask, other=0.0), DTYPE)
        x = x + tl.load(coef_ptr + 3 * index + 2) * n
        if mu_address != 0:
            mu = tl.load(mu_address.to(tl.pointer_type(tl.float32)) + local, mask=mask, other=0.0)
            x = x + tl.load(coef_ptr + 3 * index) * mu
        if vhat_address != 0:
            vhat = tl.load(vhat_address.to(tl.pointer_type(tl.float32)) + local, mask=mask, other=0.0)
            x = x + tl.load(coef_ptr + 3 * index + 1) * vhat
        tl.store(x_ptrs, _round_nearest(x, DTYPE), mask=mask)


def _launch(tensors, mus, vhats, bases, seed, coef, reduce: bool) -> torch.Tensor | None:
    device, dtype = tensors[0].device, tensors[0].dtype
    block = GPU_BLOCK if device.type == "cuda" else INTERPRETER_BLOCK
    table = _work_table(tensors, bases, block, list(mus), list(vhats), with_index=True)
    partial = torch.empty(2 * table.shape[0] if reduce else 1, dtype=torch.float64, device=device)
    coef = partial if coef is None else coef.to(device=device, dtype=torch.float32).contiguous()
    with options.on_device(device):
        _zopro_kernel[(table.shape[0],)](table, seed, coef, partial, DTYPE=_TL_DTYPES[dtype], REDUCE=reduce,
                                         BLOCK=block, **options.LAUNCH)  # fmt: skip
    if not reduce:
        return None
    # Per-tile pairs summed per tensor on the host, in tile order: deterministic, and ZOPrO's coefficients are
    # computed on the host anyway.
    out = torch.zeros(len(tensors), 2, dtype=torch.float64)
    return out.index_add_(0, table[:, 6].cpu(), partial.view(-1, 2).cpu())


def zopro_reduce(tensors, vhats, bases, *, seed) -> torch.Tensor:
    """Per tensor, (vhat . n, n . n) as an [n_tensors, 2] float64 tensor (on the CPU)."""
    live = [k for k, t in enumerate(tensors) if t.numel()]
    out = torch.zeros(len(tensors), 2, dtype=torch.float64)
    if live:
        sums = _launch([tensors[k] for k in live], [None] * len(live), [vhats[k] for k in live],
                       [bases[k] for k in live], seed, None, reduce=True)  # fmt: skip
        out[live] = sums
    return out


def zopro_apply_(tensors, mus, vhats, bases, *, seed, coef) -> None:
    """x += coef[p, 0] mu + coef[p, 1] vhat + coef[p, 2] n for every tensor p."""
    live = [k for k, t in enumerate(tensors) if t.numel()]
    if live:
        _launch([tensors[k] for k in live], [mus[k] for k in live], [vhats[k] for k in live],
                [bases[k] for k in live], seed, coef[live], reduce=False)  # fmt: skip
