"""The ``triton`` backend: the fused pass of docs/stream.md, section 5, as one launch per (device, dtype) group.

The tensors of a call are cut into work tiles of ``BLOCK`` global indices, each starting at a multiple of 128 so that
it holds whole Philox blocks of every stream; one program handles one tile. A cached int64 table gives each tile its
tensor's address, global base index, numel and the tile's first global index, so a model of hundreds of tensors is
still one launch. Tiles at a tensor's ends are masked; a tile never crosses into the next tensor's memory.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from zokern._reference import DISTRIBUTIONS
from zokern._reference import DOMAIN_RADEMACHER
from zokern._transfer import to_device
from zokern.kernels import options
from zokern.kernels.philox import DOMAIN_ROUNDING
from zokern.kernels.philox import DOMAIN_ROUNDING_FINE
from zokern.kernels.philox import gaussian_tile
from zokern.kernels.philox import philox_blocks
from zokern.kernels.philox import rademacher_tile
from zokern.kernels.philox import rounding_tile

_TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}
# Global indices per program. Any multiple of 128 gives the same z (the tests check two); 2048 bf16 elements is
# 4 KiB per program on a GPU. The interpreter runs programs one by one in Python, so it gets bigger tiles.
GPU_BLOCK = 2048
INTERPRETER_BLOCK = 8192
# Tables kept: the exact mode asks for one per large parameter per forward, so the cache must hold a large model's
# (OPT-30B has 290 large parameters; a cyclic walk over more keys than an LRU cache holds misses every time).
_TABLE_CACHE_SIZE = 2048
# And their bytes, on all devices together: a table holds 32-56 bytes per tile of every tensor it covers (an int64 per
# column: 4 for this pass, up to 7 for the LDSD and ZOPrO passes), and tensors that get new memory at each call (the
# exact mode's copies, where the allocator does not hand back the same blocks) would fill the cache with tables of dead
# addresses, up to 2048 tables of a model's largest parameters.
_TABLE_CACHE_BYTES = 1 << 30
_tables: OrderedDict[tuple, torch.Tensor] = OrderedDict()
_table_bytes = 0


@triton.jit
def _bf16_from_bits(bits):
    """The bf16 whose code is the high half of the uint32 ``bits``."""
    return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)


@triton.jit
def _widen(v, DTYPE: tl.constexpr):
    """A loaded value as float32. bf16 goes through its bits, like _round_nearest: Triton's interpreter flushes
    bf16 subnormals in the conversion."""
    if DTYPE == tl.bfloat16:
        return (v.to(tl.uint16, bitcast=True).to(tl.uint32) << 16).to(tl.float32, bitcast=True)
    else:
        return v.to(tl.float32)


@triton.jit
def _round_nearest(x, DTYPE: tl.constexpr):
    """x rounded to nearest-even in DTYPE. bf16 is rounded on the bits because Triton's interpreter truncates
    float32 -> bf16 conversions; compiled, these are a few integer ops in a memory-bound pass."""
    if DTYPE == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        rounded = _bf16_from_bits(bits + 0x7FFF + ((bits >> 16) & 1))
        return tl.where(x != x, x.to(DTYPE), rounded)  # the carry could turn a NaN's payload into infinity
    else:
        return x.to(DTYPE)


@triton.jit
def _add(x, e, w):
    """docs/stream.md section 5's add(x, e, w): x + w, and e plus that sum's exact rounding error (Knuth's TwoSum),
    where w is not +-0; x and e as they are where it is (a zero term never changes a bit, -0 included)."""
    s = x + w
    v = s - x
    d = (x - (s - v)) + (w - v)
    zero = w == 0.0
    return tl.where(zero, x, s), tl.where(zero, e, e + d)


@triton.jit
def _code_value(code, DTYPE: tl.constexpr):
    """The float32 value of a DTYPE code held in an int32. bf16 goes through its bits, as in _widen."""
    if DTYPE == tl.bfloat16:
        return (code.to(tl.uint32) << 16).to(tl.float32, bitcast=True)
    else:
        return code.to(tl.uint16).to(DTYPE, bitcast=True).to(tl.float32)


@triton.jit
def _sign_magnitude_round(x, e, rounding_seed, g0, DTYPE: tl.constexpr, BLOCK: tl.constexpr):
    """x + e rounded to DTYPE stochastically (docs/stream.md, section 5, steps 3 and 4) for finite, non-zero,
    in-range x and its renormalised residual e; other lanes get some value."""
    if DTYPE == tl.bfloat16:
        # bf16 is float32 with the low 16 bits cut: truncation is rounding toward zero.
        code = (x.to(tl.uint32, bitcast=True) >> 16).to(tl.int32)
    else:
        nearest = _round_nearest(x, DTYPE)
        code = nearest.to(tl.uint16, bitcast=True).to(tl.int32)
        # In sign-magnitude codes, -1 steps toward zero and +1 away from it.
        code = code - (tl.abs(nearest.to(tl.float32)) > tl.abs(x)).to(tl.int32)
    m = tl.abs(x)
    r = tl.where(x < 0.0, -e, e)  # the residual along the magnitude
    code = code - ((tl.abs(_code_value(code, DTYPE)) == m) & (r < 0.0)).to(tl.int32)  # x + e in the cell below x
    low = tl.abs(_code_value(code, DTYPE))
    span = tl.abs(_code_value(code + 1, DTYPE)) - low
    # Correctly rounded divisions (compiled, "/" is an approximation within 2 ulps): exact, as span is a power of two.
    big_d = tl.math.div_rn(m - low, span) * 65536.0
    big_r = tl.math.div_rn(r, span) * 65536.0
    k0 = tl.floor(big_d)
    frac = (big_d - k0) + big_r
    # Compiled, tl.floor flushes subnormals: a negative subnormal frac gives k one more and f = frac < 0, where the
    # reference has f = 1.0 (1 + frac rounded): the same decision, s < k0.
    whole = tl.floor(frac)
    k = k0 + whole
    f = frac - whole
    s = rounding_tile(rounding_seed, g0, BLOCK, DOMAIN_ROUNDING).to(tl.float32)
    away = s < k
    # s2 decides only where s = k and f > 0 (s2 >= 0), about once in 65536 elements: the tile draws its second
    # integers only when a lane needs them, so the pass costs what it did.
    tie = (s == k) & (f > 0.0)
    if tl.max(tie.to(tl.int32), axis=0) > 0:
        s2 = rounding_tile(rounding_seed, g0, BLOCK, DOMAIN_ROUNDING_FINE).to(tl.float32)
        away = away | (tie & (s2 < f * 65536.0))
    return (code + away.to(tl.int32)).to(tl.uint16).to(DTYPE, bitcast=True)


@triton.jit
def _rounded(x, e, rounding_seed, g0, DTYPE: tl.constexpr, STOCHASTIC: tl.constexpr, BLOCK: tl.constexpr):
    """The float32 tile x (e: its exact residual) as DTYPE: x + e stochastically rounded with the rounding streams of
    ``rounding_seed`` at the tile's indices, or x rounded to nearest (docs/stream.md, section 5)."""
    if STOCHASTIC:
        e = tl.where(tl.abs(e) <= 3.4028234663852886e38, e, 0.0)
        x, e = _add(x, tl.zeros_like(e), e)  # renormalised: |e| at most half of x's float32 spacing
        # Zeros, NaN, infinities and magnitudes beyond the format's largest finite value round to nearest.
        if DTYPE == tl.float16:
            in_range = tl.abs(x) <= 65504.0
        else:
            in_range = tl.abs(x) <= 3.3895313892515355e38
        in_range = in_range & (x != 0.0)
        stochastic = _sign_magnitude_round(x, e, rounding_seed, g0, DTYPE, BLOCK)
        return tl.where(in_range, stochastic, _round_nearest(x, DTYPE))
    else:
        return _round_nearest(x, DTYPE)


@triton.jit
def _float_slot(ptr):
    """The float32 whose bits an int64 slot holds in its low half."""
    return tl.load(ptr).to(tl.int32).to(tl.float32, bitcast=True)


@triton.jit(do_not_specialize=["seed", "seed2", "rounding_seed"])
def _zo_pass_kernel(
    table_ptr,
    seed,
    alpha,
    seed2,
    alpha2,
    lr,
    grad_ptr,
    grad_value,
    weight_decay,
    rounding_seed,
    scalars_ptr,
    DTYPE: tl.constexpr,
    SCALARS: tl.constexpr,
    RADEMACHER: tl.constexpr,
    UPDATE: tl.constexpr,
    GRAD_ON_DEVICE: tl.constexpr,
    SECOND: tl.constexpr,
    STOCHASTIC: tl.constexpr,
    ALIGNED: tl.constexpr,
    BLOCK: tl.constexpr,
):
    if SCALARS:  # a row of zokern._scalars, read at run time: a captured CUDA graph replays the new values
        seed = tl.load(scalars_ptr)
        seed2 = tl.load(scalars_ptr + 1)
        rounding_seed = tl.load(scalars_ptr + 2)
        alpha = _float_slot(scalars_ptr + 3)
        alpha2 = _float_slot(scalars_ptr + 4)
        lr = _float_slot(scalars_ptr + 5)
        weight_decay = _float_slot(scalars_ptr + 6)
    row = table_ptr + tl.program_id(0).to(tl.int64) * 4
    address = tl.load(row)
    base = tl.load(row + 1)
    numel = tl.load(row + 2)
    g0 = tl.load(row + 3)
    start = g0 - base  # index within the tensor of the tile's first element; negative at a misaligned tensor start
    tensor_ptr = address.to(tl.pointer_type(DTYPE))
    if ALIGNED:  # every base a multiple of 8 and every address of 16 bytes: 16-byte vector loads and stores
        tensor_ptr = tl.multiple_of(tensor_ptr, 16)  # on the pointer: the hint does not survive the int cast
        start = tl.multiple_of(start, 8)
    ptrs = tensor_ptr + start + tl.arange(0, BLOCK)
    local = start + tl.arange(0, BLOCK)
    mask = (local >= 0) & (local < numel)
    # Interior tiles skip the mask, whose unknown bound would otherwise stop the loads from being vectorised.
    interior = (start >= 0) & (start + BLOCK <= numel)
    if interior:
        x = _widen(tl.load(ptrs), DTYPE)
    else:
        x = _widen(tl.load(ptrs, mask=mask, other=0.0), DTYPE)

    if RADEMACHER:
        z1 = rademacher_tile(seed, g0, BLOCK)
    else:
        z1 = gaussian_tile(seed, g0, BLOCK)
    x, e = _add(x, tl.zeros_like(x), alpha * z1)  # e: the exact residual, read by stochastic rounding alone
    if UPDATE:
        if GRAD_ON_DEVICE:
            g = tl.load(grad_ptr)
        else:
            g = grad_value
        # A NaN or infinite g only restores; lr = 0 and weight_decay = 0 leave their terms out, so that an infinite
        # weight stays infinite (0 * inf is NaN).
        if (lr != 0.0) & (tl.abs(g) <= 3.4028234663852886e38):
            step = g * z1
            if weight_decay != 0.0:
                step = step + weight_decay * x
            x, e = _add(x, e, -(lr * step))
    if SECOND:
        if RADEMACHER:
            z2 = rademacher_tile(seed2, g0, BLOCK)
        else:
            z2 = gaussian_tile(seed2, g0, BLOCK)
        x, e = _add(x, e, alpha2 * z2)

    out = _rounded(x, e, rounding_seed, g0, DTYPE, STOCHASTIC, BLOCK)
    if interior:
        tl.store(ptrs, out)
    else:
        tl.store(ptrs, out, mask=mask)


@triton.jit(do_not_specialize=["seed"])
def _philox_words_kernel(out_ptr, n_blocks, seed, first_block, DOMAIN: tl.constexpr, BLOCK: tl.constexpr):
    first = tl.program_id(0).to(tl.int64) * BLOCK
    x0, x1, x2, x3 = philox_blocks(seed, first_block + first, BLOCK, DOMAIN)
    n = first + tl.arange(0, BLOCK)
    mask = n < n_blocks
    out = out_ptr + n * 4
    tl.store(out, x0.to(tl.int64), mask=mask)
    tl.store(out + 1, x1.to(tl.int64), mask=mask)
    tl.store(out + 2, x2.to(tl.int64), mask=mask)
    tl.store(out + 3, x3.to(tl.int64), mask=mask)


def _block_size(device: torch.device) -> int:
    return GPU_BLOCK if device.type == "cuda" else INTERPRETER_BLOCK


def _work_table(
    tensors: Sequence[torch.Tensor], bases: Sequence[int], block: int, *companions, with_index: bool = False
) -> torch.Tensor:
    """The tile table on the tensors' device, cached: an optimizer passes the same tensors every step.

    Row of a tile: the address of its tensor, then of the tensor's companion in each list of ``companions``
    (optimizer states shaped like it; None: address 0), then the tensor's global base index, its numel and the
    tile's first index, and with ``with_index`` the tensor's position in the list (for per-tensor coefficients).
    """
    address = lambda c: 0 if c is None else c.data_ptr()  # noqa: E731
    key = (tensors[0].device, block, with_index, tuple((t.data_ptr(), t.numel(), b) for t, b in zip(tensors, bases)))
    key += tuple(tuple(address(c) for c in column) for column in companions)
    table = _tables.get(key)
    if table is not None:
        _tables.move_to_end(key)
        return table
    if tensors[0].device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        # Its copy to the device would be recorded, not run: the graph would read an unwritten table.
        raise RuntimeError(
            f"zokern: a tile table is missing while a CUDA graph is being captured (more than {_TABLE_CACHE_SIZE} "
            "fused calls since the warm-up?); run the same passes once uncaptured first"
        )
    rows = []
    for k, (t, base) in enumerate(zip(tensors, bases)):
        first = base - base % 128
        n_tiles = -(-(base + t.numel() - first) // block)
        tiles = first + block * torch.arange(n_tiles, dtype=torch.int64)  # base + numel may be 2^63
        addresses = [t.data_ptr(), *(address(column[k]) for column in companions)]
        columns = torch.tensor([*addresses, base, t.numel()], dtype=torch.int64).expand(len(tiles), len(addresses) + 2)
        parts = [columns, tiles[:, None]]
        if with_index:
            parts.append(torch.full((len(tiles), 1), k, dtype=torch.int64))
        rows.append(torch.cat(parts, dim=1))
    table = to_device(torch.cat(rows), tensors[0].device)
    _cache(key, table)
    return table


def _cache(key: tuple, table: torch.Tensor) -> None:
    """Keep ``table``, dropping the least recently used ones beyond the cache's count and bytes (never the newest)."""
    global _table_bytes
    _tables[key] = table
    _table_bytes += table.nbytes
    while len(_tables) > 1 and (len(_tables) > _TABLE_CACHE_SIZE or _table_bytes > _TABLE_CACHE_BYTES):
        _table_bytes -= _tables.popitem(last=False)[1].nbytes


def zo_pass_(
    tensors: Sequence[torch.Tensor],
    bases: Sequence[int],
    *,
    seed: int,
    alpha: float,
    distribution: str,
    lr: float = 0.0,
    grad: float | torch.Tensor | None = None,
    weight_decay: float = 0.0,
    seed2: int | None = None,
    alpha2: float = 0.0,
    rounding_seed: int | None = None,
    scalars: torch.Tensor | None = None,
    block: int | None = None,
) -> None:
    """The fused pass in one launch; arguments as ``zokern._reference.zo_pass_`` (inputs validated by zokern.ops).

    ``scalars``: a row of zokern._scalars on the device; the kernel reads the seeds and coefficients there.
    ``block`` overrides the tile size (a multiple of 128 and a power of two); z does not depend on it.
    """
    if not tensors:
        return
    device, dtype = tensors[0].device, tensors[0].dtype
    block = block or _block_size(device)
    table = _work_table(tensors, bases, block)
    on_device = isinstance(grad, torch.Tensor)
    grad_tensor = grad.to(device=device, dtype=torch.float32) if on_device else table  # unused when a float
    aligned = all(b % 8 == 0 and t.data_ptr() % 16 == 0 for t, b in zip(tensors, bases))
    with options.on_device(device):
        _zo_pass_kernel[(table.shape[0],)](
            table,
            seed,
            alpha,
            0 if seed2 is None else seed2,
            alpha2,
            lr,
            grad_tensor,
            0.0 if grad is None or on_device else float(grad),
            weight_decay,
            0 if rounding_seed is None else rounding_seed,
            table if scalars is None else scalars,  # unused without SCALARS
            DTYPE=_TL_DTYPES[dtype],
            SCALARS=scalars is not None,
            RADEMACHER=DISTRIBUTIONS[distribution] == DOMAIN_RADEMACHER,
            UPDATE=grad is not None,
            GRAD_ON_DEVICE=on_device,
            SECOND=seed2 is not None,
            STOCHASTIC=rounding_seed is not None and dtype != torch.float32,
            ALIGNED=aligned,
            BLOCK=block,
            **options.LAUNCH,
        )


def cached_tables() -> list[torch.Tensor]:
    """The tile tables in the cache: a CUDA graph that captured passes keeps them alive, since its kernels read them
    at fixed addresses and the cache may drop them."""
    return list(_tables.values())


def reads_device_scalars(device: torch.device) -> bool:
    """The kernel reads a pass's scalars from device memory (see zokern._scalars), under the interpreter too."""
    return True


def philox_block_words(
    seed: int, domain: int, first_block: int, n_blocks: int, device: torch.device | str | None = None
) -> torch.Tensor:
    """Words of Philox(seed, counter=(n mod 2^32, n div 2^32, domain, 0)) for n in [first_block, +n_blocks).

    Returns an int64 tensor of shape (n_blocks, 4) holding uint32 values.
    """
    out = torch.empty((n_blocks, 4), dtype=torch.int64, device=device)
    if n_blocks:
        block = 1024
        grid = (triton.cdiv(n_blocks, block),)
        with options.on_device(out.device):
            _philox_words_kernel[grid](out, n_blocks, seed, first_block, domain, BLOCK=block, **options.LAUNCH)
    return out
