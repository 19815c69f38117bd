"""The perturbation stream and the fused pass in plain torch: the executable form of docs/stream.md.

This module is the oracle every other backend is tested against, and the ``torch`` backend that runs wherever
nothing faster is available. It favours obviously-right over fast: Philox words are computed in int64 (each
32-bit word held in the low half), the Gaussian transform in float64, and large tensors are processed in chunks
so that the fallback's temporaries stay at a few tens of MiB (~40 MiB a chunk), whatever the model size.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

STREAM_VERSION = 2

# Philox4x32 constants (Salmon et al. 2011; Random123).
PHILOX_M0 = 0xD2511F53
PHILOX_M1 = 0xCD9E8D57
PHILOX_W0 = 0x9E3779B9
PHILOX_W1 = 0xBB67AE85
PHILOX_ROUNDS = 10

# Counter word 2 separates the streams drawn from one seed.
DOMAIN_GAUSSIAN = 0
DOMAIN_RADEMACHER = 1
DOMAIN_ROUNDING = 2
DOMAIN_ROUNDING_FINE = 3  # the second rounding integer, read where the first ties (section 5)

# log2 of the number of elements one Philox call feeds, per stream.
ELEMENTS_PER_CALL_LOG2 = {DOMAIN_GAUSSIAN: 3, DOMAIN_RADEMACHER: 7, DOMAIN_ROUNDING: 3, DOMAIN_ROUNDING_FINE: 3}

DISTRIBUTIONS = {"gaussian": DOMAIN_GAUSSIAN, "rademacher": DOMAIN_RADEMACHER}

_MASK32 = 0xFFFFFFFF
# Elements per chunk of the torch backend: bounds its temporaries (float64 and int64, ~40 MiB a chunk).
_CHUNK = 1 << 20


def _mulhilo(a: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    # a < 2^32 and m < 2^32, so the product fits in 64 bits; int64 arithmetic wraps, which keeps all 64 bits.
    p = a * m
    return (p >> 32) & _MASK32, p & _MASK32


def philox4x32(
    c0: torch.Tensor, c1: torch.Tensor, c2: torch.Tensor, c3: torch.Tensor, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Philox4x32-10 on int64 tensors holding uint32 words; the key is (seed mod 2^32, seed div 2^32)."""
    k0, k1 = seed & _MASK32, (seed >> 32) & _MASK32
    for r in range(PHILOX_ROUNDS):
        if r:
            k0 = (k0 + PHILOX_W0) & _MASK32
            k1 = (k1 + PHILOX_W1) & _MASK32
        hi0, lo0 = _mulhilo(c0, PHILOX_M0)
        hi1, lo1 = _mulhilo(c2, PHILOX_M1)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return c0, c1, c2, c3


def philox_block_words(
    seed: int, domain: int, first_block: int, n_blocks: int, device: torch.device | str | None = None
) -> torch.Tensor:
    """Words of Philox(seed, counter=(n mod 2^32, n div 2^32, domain, 0)) for n in [first_block, +n_blocks).

    Returns an int64 tensor of shape (n_blocks, 4) holding uint32 values.
    """
    n = torch.arange(first_block, first_block + n_blocks, dtype=torch.int64, device=device)
    c0, c1 = n & _MASK32, n >> 32
    c2 = torch.full_like(n, domain)
    c3 = torch.zeros_like(n)
    return torch.stack(philox4x32(c0, c1, c2, c3, seed), dim=1)


def _block_span(start: int, count: int, log2_per_call: int) -> tuple[int, int, int]:
    first = start >> log2_per_call
    last = (start + count - 1) >> log2_per_call
    return first, last - first + 1, start - (first << log2_per_call)


def gaussian_from_words(words: torch.Tensor) -> torch.Tensor:
    """Box-Muller on 16-bit uniforms: (n, 4) words -> (n, 8) float64 normals (docs/stream.md, section 3)."""
    lo = (words & 0xFFFF).to(torch.float64)
    hi = (words >> 16).to(torch.float64)
    r = torch.sqrt(-2.0 * torch.log((lo + 0.5) / 65536.0))
    theta = (hi - 32767.5) * (math.pi / 32768.0)
    return torch.stack((r * torch.cos(theta), r * torch.sin(theta)), dim=2).reshape(words.shape[0], 8)


def rademacher_from_words(words: torch.Tensor) -> torch.Tensor:
    """128 signs per call: (n, 4) words -> (n, 128) float64 in {+1, -1} (docs/stream.md, section 4)."""
    bits = (words.unsqueeze(2) >> torch.arange(32, device=words.device)) & 1
    return (1 - 2 * bits).reshape(words.shape[0], 128).to(torch.float64)


def stream(
    seed: int, start: int, count: int, distribution: str, device: torch.device | str | None = None
) -> torch.Tensor:
    """z_i for i in [start, start + count), float64 (the exact value, up to float64 rounding)."""
    domain = DISTRIBUTIONS[distribution]
    if count == 0:
        return torch.empty(0, dtype=torch.float64, device=device)
    log2 = ELEMENTS_PER_CALL_LOG2[domain]
    first, n_blocks, skip = _block_span(start, count, log2)
    words = philox_block_words(seed, domain, first, n_blocks, device)
    z = gaussian_from_words(words) if domain == DOMAIN_GAUSSIAN else rademacher_from_words(words)
    return z.reshape(-1)[skip : skip + count]


def rounding_bits(
    seed: int,
    start: int,
    count: int,
    device: torch.device | str | None = None,
    words_of=None,
    domain: int = DOMAIN_ROUNDING,
) -> torch.Tensor:
    """The 16-bit stochastic-rounding integers s_i (``domain`` 2; 3: the second ones, s2_i) for i in [start, start +
    count), as int64. ``words_of``: a backend's ``philox_block_words`` (the same words; a compiled one in a few ops,
    where this module's takes ~130)."""
    if count == 0:
        return torch.empty(0, dtype=torch.int64, device=device)
    first, n_blocks, skip = _block_span(start, count, ELEMENTS_PER_CALL_LOG2[domain])
    words = (words_of or philox_block_words)(seed, domain, first, n_blocks, device)
    halves = torch.stack((words & 0xFFFF, words >> 16), dim=2).reshape(-1)
    return halves[skip : skip + count]


def add_exact(x: torch.Tensor, e: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """section 5's add(x, e, w) on float32 tensors: x + w and e plus that sum's exact rounding error (Knuth's TwoSum),
    x and e left as they are where w is +-0 (a zero term never changes a bit, -0 included)."""
    s = x + w
    v = s - x
    d = (x - (s - v)) + (w - v)
    zero = w == 0
    return torch.where(zero, x, s), torch.where(zero, e, e + d)


def round_stochastic(
    x: torch.Tensor, e: torch.Tensor, bits: torch.Tensor, fine_bits: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    """Round x + e (float32 x, and e its exact residual: section 5) to a 16-bit dtype: to one of the two neighbours
    of x + e, away from zero with the probability that makes the expectation x + e, to 2^-32 of their spacing."""
    f32 = torch.float32
    e = torch.where(torch.isfinite(e), e, 0.0)
    x, e = add_exact(x, torch.zeros_like(x), e)  # renormalised: |e| <= half of x's float32 spacing
    nearest = x.to(dtype)
    as_int = nearest.view(torch.int16).to(torch.int32) & 0xFFFF
    m = x.abs()
    r = torch.where(x < 0, -e, e)  # the residual along the magnitude
    # Sign-magnitude: subtracting 1 from the bit pattern moves one step toward zero, adding 1 one step away.
    toward = as_int - (nearest.to(f32).abs() > m).to(torch.int32)
    as_16 = lambda b: torch.where(b >= 0x8000, b - 0x10000, b).to(torch.int16).view(dtype)  # noqa: E731
    on_grid_and_below = (as_16(toward).to(f32).abs() == m) & (r < 0)
    toward = toward - on_grid_and_below.to(torch.int32)  # x + e lies in the cell below x
    t_lo, t_hi = as_16(toward), as_16(toward + 1)
    mag_lo = t_lo.to(f32).abs()
    span = t_hi.to(f32).abs() - mag_lo  # a power of two: the divisions below are exact
    big_d = ((m - mag_lo) / span) * 65536.0
    big_r = (r / span) * 65536.0
    k0 = torch.floor(big_d)
    frac = (big_d - k0) + big_r
    whole = torch.floor(frac)
    k, f = k0 + whole, frac - whole
    s, s2 = bits.to(f32), fine_bits.to(f32)
    away = (s < k) | ((s == k) & (s2 < f * 65536.0))
    rounded = torch.where(away, t_hi, t_lo)
    in_range = torch.isfinite(x) & (m <= torch.finfo(dtype).max) & (x != 0)
    return torch.where(in_range, rounded, nearest)


def round_stochastic_at(
    x: torch.Tensor,
    e: torch.Tensor,
    rounding_seed: int,
    start: int,
    dtype: torch.dtype,
    words_of=None,
) -> torch.Tensor:
    """round_stochastic with the rounding integers of elements [start, start + x.numel()) of ``rounding_seed``."""
    n = x.numel()
    bits = rounding_bits(rounding_seed, start, n, x.device, words_of)
    fine = rounding_bits(rounding_seed, start, n, x.device, words_of, DOMAIN_ROUNDING_FINE)
    return round_stochastic(x.reshape(-1), e.reshape(-1), bits, fine, dtype).view(x.shape)


def pass_values(
    x: torch.Tensor,
    z1: torch.Tensor,
    a: float,
    g: torch.Tensor | None,
    lr: float,
    weight_decay: float,
    z2: torch.Tensor | None = None,
    b: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Section 5's pass on float32 values x given the float32 streams z1 (and z2: the second seed's), with float32
    scalars (g a float32 tensor, None: no update): the result x and its exact residual e, before rounding."""
    x, e = add_exact(x, torch.zeros_like(x), a * z1)
    if g is not None and lr != 0.0:
        u = lr * (g * z1 + weight_decay * x) if weight_decay != 0.0 else lr * (g * z1)
        updated, e_updated = add_exact(x, e, -u)
        finite = torch.isfinite(g)
        x, e = torch.where(finite, updated, x), torch.where(finite, e_updated, e)
    if z2 is not None:
        x, e = add_exact(x, e, b * z2)
    return x, e


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
) -> None:
    """The fused pass of docs/stream.md, section 5, in plain torch (inputs already validated by zokern.ops).

    ``grad=None`` means no update; ``seed2=None`` no second seed; ``rounding_seed=None`` round to nearest.
    """
    f32 = torch.float32
    a, b, eta, wd = (torch.tensor(v, dtype=torch.float64).to(f32).item() for v in (alpha, alpha2, lr, weight_decay))
    with torch.no_grad():
        for t, base in zip(tensors, bases):
            flat = t.view(-1)
            g = None
            if grad is not None:
                g = (
                    grad.to(device=t.device, dtype=f32)
                    if isinstance(grad, torch.Tensor)
                    else torch.tensor(grad, dtype=f32, device=t.device)
                )
            for lo in range(0, flat.numel(), _CHUNK):
                part = flat[lo : lo + _CHUNK]
                i0, n = base + lo, part.numel()
                z1 = stream(seed, i0, n, distribution, t.device).to(f32)
                z2 = None if seed2 is None else stream(seed2, i0, n, distribution, t.device).to(f32)
                x, e = pass_values(part.to(f32), z1, a, g, eta, wd, z2, b)
                if rounding_seed is not None and t.dtype in (torch.bfloat16, torch.float16):
                    part.copy_(round_stochastic_at(x, e, rounding_seed, i0, t.dtype))
                else:
                    part.copy_(x)


def zo_copy_pass_(
    out: Sequence[torch.Tensor],
    sources: Sequence[torch.Tensor],
    bases: Sequence[int],
    *,
    seed: int,
    alpha: float,
    distribution: str,
    seed2: int | None = None,
    alpha2: float = 0.0,
) -> None:
    """``out[k] = sources[k] + alpha z(seed) [+ alpha2 z(seed2)]``, rounded to nearest: the perturbation pass written
    out of place (inputs validated by zokern.ops)."""
    f32 = torch.float32
    a, b = (torch.tensor(v, dtype=torch.float64).to(f32).item() for v in (alpha, alpha2))
    with torch.no_grad():
        for t, source, base in zip(out, sources, bases):
            flat, src = t.view(-1), source.reshape(-1)
            for lo in range(0, flat.numel(), _CHUNK):
                part = flat[lo : lo + _CHUNK]
                i0, n = base + lo, part.numel()
                x = src[lo : lo + n].to(f32) + a * stream(seed, i0, n, distribution, t.device).to(f32)
                if seed2 is not None:
                    x = x + b * stream(seed2, i0, n, distribution, t.device).to(f32)
                part.copy_(x)
