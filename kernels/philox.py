"""The perturbation stream in Triton (docs/stream.md, sections 2-5): Philox4x32-10 and the per-tile transforms.

Each ``*_tile`` function returns the stream for ``BLOCK`` consecutive global indices starting at ``g0``, a multiple
of 128 (so a tile holds whole Philox blocks of every stream), laid out flat in index order. Each Philox call feeds
8 Gaussians, 128 signs or 8 rounding integers, so a tile makes BLOCK/8 or BLOCK/128 calls, never one per element.
"""

import triton
import triton.language as tl

PHILOX_M0 = tl.constexpr(0xD2511F53)
PHILOX_M1 = tl.constexpr(0xCD9E8D57)
PHILOX_W0 = tl.constexpr(0x9E3779B9)
PHILOX_W1 = tl.constexpr(0xBB67AE85)

DOMAIN_GAUSSIAN = tl.constexpr(0)
DOMAIN_RADEMACHER = tl.constexpr(1)
DOMAIN_ROUNDING = tl.constexpr(2)
DOMAIN_ROUNDING_FINE = tl.constexpr(3)

# float32(pi / 32768): the angle step of the Box-Muller grid.
ANGLE_STEP = tl.constexpr(9.587379924285257e-05)


@triton.jit
def philox4x32_10(c0, c1, c2, c3, k0, k1):
    """Ten Philox rounds on uint32 tensors; the key (k0, k1) is bumped between rounds."""
    for _ in tl.static_range(10):
        hi0 = tl.umulhi(c0, PHILOX_M0)
        lo0 = c0 * PHILOX_M0
        hi1 = tl.umulhi(c2, PHILOX_M1)
        lo1 = c2 * PHILOX_M1
        c0 = hi1 ^ c1 ^ k0
        c1 = lo1
        c2 = hi0 ^ c3 ^ k1
        c3 = lo0
        k0 = k0 + PHILOX_W0
        k1 = k1 + PHILOX_W1
    return c0, c1, c2, c3


@triton.jit
def philox_blocks(seed, first_block, N_BLOCKS: tl.constexpr, DOMAIN: tl.constexpr):
    """The four output words of Philox(seed, counter=(n lo, n hi, DOMAIN, 0)) for n in [first_block, +N_BLOCKS)."""
    # Through uint64: Triton's interpreter holds a seed in [2**31, 2**32) as a numpy uint32 that a cast to int64
    # leaves as it is, and shifting that by 32 gives the wrong key word (compiled code was right either way).
    seed = seed.to(tl.uint64)
    k0 = (seed & 0xFFFFFFFF).to(tl.uint32)
    k1 = (seed >> 32).to(tl.uint32)
    n = first_block.to(tl.int64) + tl.arange(0, N_BLOCKS).to(tl.int64)
    c0 = (n & 0xFFFFFFFF).to(tl.uint32)
    c1 = (n >> 32).to(tl.uint32)
    c2 = tl.full((N_BLOCKS,), DOMAIN, tl.uint32)
    c3 = tl.zeros((N_BLOCKS,), tl.uint32)
    return philox4x32_10(c0, c1, c2, c3, k0, k1)


@triton.jit
def _sincos_first_quadrant(phi):
    """(cos phi, sin phi) for phi in (0, pi/2): Taylor polynomials to degree 12 and 11, truncation error < 6e-8.

    Library sin/cos would range-reduce arbitrary arguments (on a GPU, a slow path with local memory); theta's
    range is known, so a polynomial is both cheaper and the same on every platform. Horner steps as explicit fused
    multiply-adds: the launches turn off the compiler's own contraction (kernels/options.py).
    """
    p2 = phi * phi
    s = tl.fma(p2, -1.0 / 39916800.0, 1.0 / 362880.0)
    s = tl.fma(s, p2, -1.0 / 5040.0)
    s = tl.fma(s, p2, 1.0 / 120.0)
    s = tl.fma(s, p2, -1.0 / 6.0)
    s = tl.fma(s * p2, phi, phi)
    c = tl.fma(p2, 1.0 / 479001600.0, -1.0 / 3628800.0)
    c = tl.fma(c, p2, 1.0 / 40320.0)
    c = tl.fma(c, p2, -1.0 / 720.0)
    c = tl.fma(c, p2, 1.0 / 24.0)
    c = tl.fma(c, p2, -0.5)
    c = tl.fma(c, p2, 1.0)
    return c, s


@triton.jit
def _box_muller(word):
    """One word -> the pair (r cos theta, r sin theta) of docs/stream.md, section 3, in float32.

    theta = (hi - 32767.5) pi/32768 = -pi + q pi/2 + phi, with quadrant q = hi >> 14 and
    phi = ((hi & 0x3FFF) + 0.5) pi/32768 in (0, pi/2); cos and sin of theta follow from those of phi by
    swapping and negating.
    """
    lo = (word & 0xFFFF).to(tl.float32)
    u = (lo + 0.5) * (1.0 / 65536.0)
    r = tl.sqrt(-2.0 * tl.log(u))
    hi = word >> 16
    quadrant = hi >> 14
    phi = ((hi & 0x3FFF).to(tl.float32) + 0.5) * ANGLE_STEP
    c, s = _sincos_first_quadrant(phi)
    # cos(-pi + q pi/2 + phi) and sin(...) for q = 0, 1, 2, 3: (-c, -s), (s, -c), (c, s), (-s, c).
    odd = (quadrant & 1) == 1
    cos_t = tl.where(odd, s, c)
    sin_t = tl.where(odd, c, s)
    cos_t = tl.where((quadrant == 0) | (quadrant == 3), -cos_t, cos_t)
    sin_t = tl.where(quadrant < 2, -sin_t, sin_t)
    return r * cos_t, r * sin_t


@triton.jit
def gaussian_tile(seed, g0, BLOCK: tl.constexpr):
    """z_i for i in [g0, g0 + BLOCK), float32; g0 a multiple of 8."""
    x0, x1, x2, x3 = philox_blocks(seed, g0 >> 3, BLOCK // 8, DOMAIN_GAUSSIAN)
    z0, z1 = _box_muller(x0)
    z2, z3 = _box_muller(x1)
    z4, z5 = _box_muller(x2)
    z6, z7 = _box_muller(x3)
    # Nested joins build [BLOCK/8, 2, 2, 2] whose row-major order is (z0, z1, ..., z7): the innermost join
    # varies fastest, so the leaves go in bit-reversed order.
    z = tl.join(tl.join(tl.join(z0, z4), tl.join(z2, z6)), tl.join(tl.join(z1, z5), tl.join(z3, z7)))
    return tl.reshape(z, (BLOCK,))


@triton.jit
def rademacher_tile(seed, g0, BLOCK: tl.constexpr):
    """z_i in {+1, -1} for i in [g0, g0 + BLOCK), float32; g0 a multiple of 128."""
    x0, x1, x2, x3 = philox_blocks(seed, g0 >> 7, BLOCK // 128, DOMAIN_RADEMACHER)
    column = tl.arange(0, 128)[None, :]
    word = tl.where(
        column < 64,
        tl.where(column < 32, x0[:, None], x1[:, None]),
        tl.where(column < 96, x2[:, None], x3[:, None]),
    )
    bit = (word >> (column & 31).to(tl.uint32)) & 1
    return tl.reshape(1.0 - 2.0 * bit.to(tl.float32), (BLOCK,))


@triton.jit
def rounding_tile(seed, g0, BLOCK: tl.constexpr, DOMAIN: tl.constexpr):
    """The stochastic-rounding integers in [0, 65536) for i in [g0, g0 + BLOCK), int32; g0 a multiple of 8: s_i
    with DOMAIN_ROUNDING, the second ones s2_i with DOMAIN_ROUNDING_FINE (the same layout)."""
    x0, x1, x2, x3 = philox_blocks(seed, g0 >> 3, BLOCK // 8, DOMAIN)
    column = tl.arange(0, 8)[None, :]
    word = tl.where(
        column < 4,
        tl.where(column < 2, x0[:, None], x1[:, None]),
        tl.where(column < 6, x2[:, None], x3[:, None]),
    )
    half = (word >> ((column & 1) * 16).to(tl.uint32)) & 0xFFFF
    return tl.reshape(half.to(tl.int32), (BLOCK,))
