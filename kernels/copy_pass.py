"""The ``triton`` backend of the out-of-place perturbation pass, ``out = source + alpha z [+ alpha2 z2]`` (math:
zokern._reference.zo_copy_pass_), tiled like the fused pass (kernels/zo_pass.py): a tile's table row holds the
addresses of its output tensor and of its source."""

from __future__ import annotations

import triton
import triton.language as tl

from zokern._reference import DISTRIBUTIONS
from zokern._reference import DOMAIN_RADEMACHER
from zokern.kernels import options
from zokern.kernels.philox import gaussian_tile
from zokern.kernels.philox import rademacher_tile
from zokern.kernels.zo_pass import _TL_DTYPES
from zokern.kernels.zo_pass import _block_size
from zokern.kernels.zo_pass import _round_nearest
from zokern.kernels.zo_pass import _widen
from zokern.kernels.zo_pass import _work_table


@triton.jit(do_not_specialize=["seed", "seed2"])
def _copy_pass_kernel(table_ptr, seed, alpha, seed2, alpha2, DTYPE: tl.constexpr, RADEMACHER: tl.constexpr,
                      SECOND: tl.constexpr, ALIGNED: tl.constexpr, BLOCK: tl.constexpr):  # fmt: skip
    row = table_ptr + tl.program_id(0).to(tl.int64) * 5
    out_ptr = tl.load(row).to(tl.pointer_type(DTYPE))
    src_ptr = tl.load(row + 1).to(tl.pointer_type(DTYPE))
    base = tl.load(row + 2)
    numel = tl.load(row + 3)
    g0 = tl.load(row + 4)
    start = g0 - base
    if ALIGNED:  # every base a multiple of 8 and every address of 16 bytes: 16-byte vector loads and stores
        out_ptr = tl.multiple_of(out_ptr, 16)
        src_ptr = tl.multiple_of(src_ptr, 16)
        start = tl.multiple_of(start, 8)
    local = start + tl.arange(0, BLOCK)
    mask = (local >= 0) & (local < numel)
    interior = (start >= 0) & (start + BLOCK <= numel)
    if interior:
        x = _widen(tl.load(src_ptr + local), DTYPE)
    else:
        x = _widen(tl.load(src_ptr + local, mask=mask, other=0.0), DTYPE)
    if RADEMACHER:
        x = x + alpha * rademacher_tile(seed, g0, BLOCK)
    else:
        x = x + alpha * gaussian_tile(seed, g0, BLOCK)
    if SECOND:
        if RADEMACHER:
            x = x + alpha2 * rademacher_tile(seed2, g0, BLOCK)
        else:
            x = x + alpha2 * gaussian_tile(seed2, g0, BLOCK)
    if interior:
        tl.store(out_ptr + local, _round_nearest(x, DTYPE))
    else:
        tl.store(out_ptr + local, _round_nearest(x, DTYPE), mask=mask)


def zo_copy_pass_(out, sources, bases, *, seed, alpha, distribution, seed2=None, alpha2=0.0) -> None:
    """``out[k] = sources[k] + alpha z(seed) [+ alpha2 z(seed2)]`` in one launch per (device, dtype) group."""
    if not out:
        return
    device, dtype = out[0].device, out[0].dtype
    block = _block_size(device)
    table = _work_table(out, bases, block, list(sources))
    addresses = [t.data_ptr() for t in out] + [t.data_ptr() for t in sources]
    aligned = all(b % 8 == 0 for b in bases) and all(a % 16 == 0 for a in addresses)
    with options.on_device(device):
        _copy_pass_kernel[(table.shape[0],)](
            table, seed, alpha, 0 if seed2 is None else seed2, alpha2, DTYPE=_TL_DTYPES[dtype],
            RADEMACHER=DISTRIBUTIONS[distribution] == DOMAIN_RADEMACHER, SECOND=seed2 is not None, ALIGNED=aligned,
            BLOCK=block, **options.LAUNCH,
        )  # fmt: skip
