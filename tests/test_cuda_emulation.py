"""The CUDA kernels' launch, indexing and memory-access logic, run on the CPU (tests/cuda_emulated.py).

tests/test_backends.py runs its whole battery on the emulated kernels as on any backend; these tests add what only
an emulation can show: the result is bit for bit the C++ CPU backend's (both evaluate zokern/stream.h on the host)
whatever the grid and the addresses, nothing outside the tensors is touched, 16-byte accesses are aligned, a launch
carries at most 96 tensors, the grid is one wave, and the device-only log of the Gaussian transform is accurate.
Every emulated call also fails on any sanitizer report (misaligned access, signed overflow, shift, index).
"""

from __future__ import annotations

import math

import pytest
import torch
from helpers import DEVICE
from helpers import emulated_cuda_backend
from helpers import random_params

from zokern import _native
from zokern import _native_copy

pytestmark = [
    pytest.mark.skipif(DEVICE != "cpu", reason="on a GPU the real kernels are tested instead"),
    pytest.mark.skipif(not _native.cpu_available(), reason="compares with the C++ CPU backend"),
]

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
PASSES = {
    "perturb": dict(alpha=1e-3),
    "restore_update": dict(alpha=-1e-3, lr=1e-2, grad=0.75, weight_decay=0.1),
    "device_grad": dict(alpha=-1e-3, lr=1e-2, grad=torch.tensor(-1.25)),
    "two_seeds_stochastic": dict(alpha=-1e-3, lr=1e-2, grad=0.5, seed2=2**62 + 11, alpha2=2e-3, rounding_seed=9),
}


@pytest.fixture
def emulated():
    backend = emulated_cuda_backend()
    backend.launches()  # counts from here
    yield backend
    backend.configure(132)


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(a.view(torch.uint8), b.view(torch.uint8)) if a.numel() else a.shape == b.shape


@pytest.mark.parametrize("multiprocessors", [1, 3, 132, 10_000])
@pytest.mark.parametrize("distribution", ["gaussian", "rademacher"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_bit_identical_to_cpu_backend_for_any_grid(emulated, dtype, distribution, multiprocessors):
    """A small grid makes each block walk many tiles and tensors (the grid-stride loop); a large one gives each tile
    its own block."""
    emulated.configure(multiprocessors)
    sizes = (1, 7, 8, 9, 127, 2047, 2048, 2049, 5000, 3)
    for name, kwargs in PASSES.items():
        tensors = random_params(sizes, dtype, seed=len(name))
        bases = [2**40 + 13 + 3000 * k for k in range(len(sizes))]  # gaps, unaligned starts, past 2^32 tiles
        got = [t.clone() for t in tensors]
        expected = [t.clone() for t in tensors]
        emulated.zo_pass_(got, bases, seed=2**45 + 123, distribution=distribution, **kwargs)
        _native.zo_pass_(expected, bases, seed=2**45 + 123, distribution=distribution, **kwargs)
        assert all(_same_bits(a, b) for a, b in zip(got, expected)), name
        assert emulated.launches()["largest_grid"] <= 2 * multiprocessors


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_every_address_alignment_touches_only_the_tensors(emulated, dtype):
    """Views starting at every element offset of a 16-byte line and every base index modulo 8: the kernel takes its
    16-byte path only where the address allows it (a misaligned one would be a sanitizer report, a fault on a GPU),
    elements at the views' ends are processed once, and the canaries between views keep their bits."""
    emulated.configure(3)
    per_line = 16 // torch.empty((), dtype=dtype).element_size()
    buffer = random_params((40_000,), dtype, seed=1)[0]
    views, bases, start, base = [], [], 0, 5
    for k in range(3 * per_line):
        start += k % per_line + 8  # the gap is the canary
        n = (31, 2048 + 9, 517)[k % 3]
        views.append((start, n))
        bases.append(base)
        start += n
        base += n + k % 8  # base index modulo 8 cycles too
    assert start < buffer.numel()
    out = buffer.clone()
    emulated.zo_pass_([out[s : s + n] for s, n in views], bases, seed=3, alpha=0.5, distribution="gaussian")
    expected = buffer.clone()
    for (s, n), b in zip(views, bases):
        piece = expected[s : s + n].clone()
        _native.zo_pass_([piece], [b], seed=3, alpha=0.5, distribution="gaussian")
        expected[s : s + n] = piece
    assert _same_bits(out, expected)
    touched = torch.zeros(buffer.numel(), dtype=torch.bool)
    for s, n in views:
        touched[s : s + n] = True
    assert _same_bits(out[~touched], buffer[~touched])
    assert not torch.equal(out[touched], buffer[touched])


@pytest.mark.parametrize("second", [False, True], ids=["one_seed", "two_seeds"])
@pytest.mark.parametrize("distribution", ["gaussian", "rademacher"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_out_of_place_pass_is_the_cpu_backends_bit_for_bit(emulated, dtype, distribution, second):
    """The cuda backend's zo_copy_pass_ (the exact mode's theta + alpha z) is the in-place kernel reading each source
    and writing its output: sources and outputs at every relative alignment, the sources left alone."""
    emulated.configure(3)
    per_line = 16 // torch.empty((), dtype=dtype).element_size()
    pool = random_params((60_000,), dtype, seed=5)[0]
    before = pool.clone()
    sizes = (1, 9, 2048 + 3, 517, 4097)
    sources, start = [], 0
    for k, n in enumerate(sizes):
        start += k % per_line + 8
        sources.append(pool[start : start + n])
        start += n
    bases = [2**33 + 1000 * k + k % 8 for k in range(len(sizes))]
    kwargs = dict(seed=9, alpha=1e-2, distribution=distribution)
    if second:
        kwargs.update(seed2=2**50 + 1, alpha2=-3e-3)
    for shift in range(per_line):  # the outputs' alignment, relative to the sources'
        buffer = torch.full((sum(sizes) + 16 * len(sizes) + shift,), 7.0, dtype=dtype)
        outs, untouched, at = [], torch.ones_like(buffer, dtype=torch.bool), shift
        for n in sizes:
            outs.append(buffer[at : at + n])
            untouched[at : at + n] = False
            at += n + 3
        emulated.zo_copy_pass_(outs, sources, bases, **kwargs)
        expected = [torch.empty_like(t) for t in sources]
        _native_copy.zo_copy_pass_(expected, sources, bases, **kwargs)
        assert all(_same_bits(a, b) for a, b in zip(outs, expected)), shift
        assert _same_bits(pool, before)
        assert (buffer[untouched] == 7.0).all()


def test_a_launch_carries_at_most_96_tensors_and_skips_empty_ones(emulated):
    emulated.configure(132)
    sizes = [0 if k % 5 == 0 else 1 + (37 * k) % 300 for k in range(250)]
    tensors = random_params(sizes, torch.bfloat16, seed=2)
    bases, total = [], 0
    for t in tensors:
        bases.append(total)
        total += t.numel()
    got = [t.clone() for t in tensors]
    expected = [t.clone() for t in tensors]
    emulated.zo_pass_(got, bases, seed=6, alpha=1e-2, distribution="rademacher", lr=1e-2, grad=0.5)
    _native.zo_pass_(expected, bases, seed=6, alpha=1e-2, distribution="rademacher", lr=1e-2, grad=0.5)
    assert all(_same_bits(a, b) for a, b in zip(got, expected))
    non_empty = sum(n > 0 for n in sizes)
    assert emulated.launches()["launches"] == math.ceil(non_empty / 96)


def test_grid_is_one_resident_wave_and_no_larger_than_the_tiles(emulated):
    emulated.configure(4)  # the stand-in answers 2 resident blocks per multiprocessor
    t = random_params((100_000,), torch.float32, seed=3)[0]
    emulated.zo_pass_([t], [0], seed=1, alpha=1.0, distribution="gaussian")
    assert emulated.launches() == {"launches": 1, "largest_grid": 8}
    emulated.configure(1000)
    emulated.zo_pass_([t[:3000]], [4000], seed=1, alpha=1.0, distribution="gaussian")
    # Indices 4000 .. 6999 meet tiles 1, 2 and 3 of 2048 indices.
    assert emulated.launches() == {"launches": 1, "largest_grid": 3}


def test_scalars_row_replaces_the_arguments(emulated):
    """What a CUDA graph replays: the kernel reads seeds and coefficients from the row, ignoring the arguments."""
    from zokern import _scalars

    tensors = random_params((300, 5000), torch.bfloat16, seed=4)
    kwargs = dict(seed=11, alpha=-1e-3, lr=1e-2, grad=torch.tensor(0.5), weight_decay=0.01, seed2=12, alpha2=2e-3)
    kwargs["rounding_seed"] = 13
    expected = [t.clone() for t in tensors]
    emulated.zo_pass_(expected, [7, 307], distribution="gaussian", **kwargs)
    row = torch.tensor(
        _scalars.pack(seed=11, seed2=12, rounding_seed=13, alpha=-1e-3, alpha2=2e-3, lr=1e-2, weight_decay=0.01)
    )
    got = [t.clone() for t in tensors]
    wrong = dict(kwargs, seed=99, alpha=5.0, lr=3.0, weight_decay=2.0, seed2=98, alpha2=-4.0, rounding_seed=97)
    emulated.zo_pass_(got, [7, 307], distribution="gaussian", scalars=row, **wrong)
    assert all(_same_bits(a, b) for a, b in zip(got, expected))


def test_device_log_of_the_gaussian_radius_is_accurate_on_every_input(emulated):
    """zokern/stream.h's log_unit_interval runs only on the GPU, where the radius r = sqrt(-2 ln u) of every Gaussian
    pair comes from it; here it is evaluated on the host (same float32 operations, fused multiply-adds included) for
    all 65536 values of u. Its error, with the documented errors of the GPU's sqrt.approx (taken as 4 ulps, its
    actual error is about 1) and __sincosf (2^-21.41 absolute on [-pi, pi]), keeps each normal within the bound of
    docs/stream.md, section 3."""
    lo = torch.arange(65536, dtype=torch.float64)
    u = (lo + 0.5) / 65536  # exact in float32
    ln = torch.tensor([emulated.log_unit_interval(v) for v in u.tolist()], dtype=torch.float64)
    exact = torch.log(u)
    relative = ((ln - exact) / exact).abs()
    assert relative.max() < 2.6e-7, relative.max().item()  # the claim in stream.h
    r_exact = torch.sqrt(-2 * exact)
    r_from_log = torch.sqrt(-2 * ln)
    sqrt_error = 4 * 2.0**-23 * r_from_log
    radius_error = (r_from_log - r_exact).abs() + sqrt_error
    assert (r_from_log - r_exact).abs().max() < 1.2e-7
    # z = r cos(theta): theta rounded to float32 (|theta| < pi: half an ulp <= 2^-23), cos and sin off by 2^-21.41,
    # the product rounded (half an ulp of z <= 2^-22 r). Worst case over theta: |z| as small as it gets, 0.
    z_error = radius_error + r_exact * (2.0**-23 + 2.0**-21.41 + 2.0**-22)
    assert (z_error < 2.0**-17).all(), z_error.max().item()
