"""The compiled backends (C++ ``cpu``, ``cuda``, ``triton``) against the plain-torch reference, on random data.

Each test runs for every compiled backend this install can run on the test device: on a CPU machine, ``cpu``,
``triton`` under its interpreter, and ``cuda_emulated`` (the CUDA kernels compiled for the host,
tests/cuda_emulated.py); on a GPU machine, ``cuda`` and compiled ``triton``.

Tolerances, and why:
- Philox words and Rademacher z: bit-identical (integer arithmetic).
- Gaussian z: within the conformance bound of docs/stream.md, 2^-17 (1 + |z|), element by element. The measured
  error is far below it (test_gaussian_z_error prints it; benchmarks/RESULTS.md records it per backend): it is
  dominated by theta's float32 rounding times r, about 1e-6.
- float32 outputs: the z error scaled by the pass's coefficients, plus a few float32 ulps for the re-rounding.
- 16-bit outputs: the float32 values differ from the reference's by the above, which moves a value across a rounding
  boundary only when it sits within ~1e-9 of it: such elements differ by exactly one ulp and are rare. Independently
  of the reference, each 16-bit output must equal the reference's pass and rounding rule applied with the backend's
  own z (read from a float32 pass on zeros) bit for bit.
"""

from __future__ import annotations

import math

import pytest
import torch
from helpers import DEVICE
from helpers import MANTISSA_BITS
from helpers import Z_ATOL
from helpers import backends_for
from helpers import emulated_cuda_backend
from helpers import random_params
from helpers import ulp

from zokern import _dispatch
from zokern import _reference

COMPILED = [name for name in backends_for() if name != "torch"] + (["cuda_emulated"] if DEVICE == "cpu" else [])
# Max |z - z_exact| measured on the CPU backends over 2e6 draws (C++ tabulated transform 1.02e-6, Triton's
# interpreter 7.9e-7), with margin: a regression guard tighter than the spec's bound. GPU backends use
# fast-math sincos/log and are held to the spec's bound only.
Z_ATOL_CPU = 1.5e-6

SIZES = (0, 1, 7, 8, 9, 127, 128, 129, 1000, 4097)
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
DISTRIBUTIONS = ("gaussian", "rademacher")
# Offsets of the first tensor: not a multiple of 8 or 128, past 2^31, past 2^40.
OFFSETS = (13, 2**31 + 5, 2**40 + 3)

VARIANTS = {
    "perturb": dict(alpha=1e-3),
    "restore": dict(alpha=-2e-3),
    "update_float_grad": dict(alpha=-1e-3, lr=1e-2, grad=0.75),
    "update_tensor_grad": dict(alpha=-1e-3, lr=1e-2, grad=torch.tensor(-1.25)),
    "weight_decay": dict(alpha=-1e-3, lr=1e-2, grad=0.5, weight_decay=0.1),
    "second_seed": dict(alpha=-1e-3, lr=1e-2, grad=0.5, seed2=2**62 + 11, alpha2=2e-3),
    "stochastic": dict(alpha=1e-3, rounding_seed=2**33 + 7),
    "everything": dict(alpha=-1e-3, lr=1e-2, grad=0.5, weight_decay=0.1, seed2=77, alpha2=1e-3, rounding_seed=5),
}


@pytest.fixture(params=COMPILED)
def impl(request):
    if request.param == "cuda_emulated":
        return emulated_cuda_backend()
    return _dispatch._module(request.param)


def _bases(tensors, offset):
    bases, total = [], offset
    for t in tensors:
        bases.append(total)
        total += t.numel()
    return bases


def _run(impl, tensors, offset, **kwargs):
    out = [t.clone() for t in tensors]
    impl.zo_pass_(out, _bases(out, offset), **kwargs)
    return out


def _z_scale(kwargs) -> float:
    """How much a z error of 1 moves the float32 result: |alpha| + lr |g| + |alpha2|."""
    g = kwargs.get("grad")
    g = 0.0 if g is None else abs(float(g))
    return abs(kwargs["alpha"]) + kwargs.get("lr", 0.0) * g + abs(kwargs.get("alpha2", 0.0))


def _assert_close_to_reference(out, ref, z_scale):
    diff = (out.double() - ref.double()).abs().cpu()
    ref = ref.cpu()
    if out.dtype == torch.float32:
        tol = z_scale * Z_ATOL + 4 * ulp(ref)
        assert (diff <= tol).all(), f"max diff {diff.max():.3g}"
        return
    step = torch.maximum(ulp(ref), ulp(out.cpu()))
    assert (diff <= step).all(), f"max diff {diff.max():.3g} exceeds one ulp"
    assert (diff > 0).double().mean() < 1e-3, f"{(diff > 0).double().mean():.3%} of elements differ"


def _stream_of(impl, seed, base, n, distribution):
    """The backend's own float32 z at [base, base + n): its pass, alpha = 1, on float32 zeros (0 + z is exact)."""
    out = [torch.zeros(n, device=DEVICE)]
    impl.zo_pass_(out, [base], seed=seed, alpha=1.0, distribution=distribution)
    return out[0].cpu()


def _reference_rule_on_own_stream(impl, t, base, kwargs):
    """What docs/stream.md section 5 stores for ``t`` given the backend's own z (its Gaussian z may differ from the
    reference's within tolerance: the rule, not the stream, is under test here)."""
    f32 = lambda v: torch.tensor(float(v), dtype=torch.float64).to(torch.float32).item()  # noqa: E731
    n, distribution = t.numel(), kwargs["distribution"]
    z1 = _stream_of(impl, kwargs["seed"], base, n, distribution)
    z2 = None if kwargs.get("seed2") is None else _stream_of(impl, kwargs["seed2"], base, n, distribution)
    g = kwargs.get("grad")
    g = None if g is None else torch.tensor(f32(g))
    x, e = _reference.pass_values(
        t.cpu().reshape(-1).float(), z1, f32(kwargs["alpha"]), g, f32(kwargs.get("lr", 0.0)),
        f32(kwargs.get("weight_decay", 0.0)), z2, f32(kwargs.get("alpha2", 0.0)),
    )  # fmt: skip
    seed = kwargs.get("rounding_seed")
    if seed is None or t.dtype == torch.float32:
        return x.to(t.dtype).view(t.shape)
    return _reference.round_stochastic_at(x, e, seed, base, t.dtype).view(t.shape)


# ------------------------------------------------------------------------------------------------ the stream


@pytest.mark.parametrize("domain", [0, 1, 2, 3])
def test_philox_words_bit_identical(impl, domain):
    # Seeds in [2**31, 2**32) reach Triton as uint32 scalars, not int64 (its interpreter once got their key wrong).
    cases = ((0, 0), (2**63 - 1, 2**32 - 3), (0x299F31D0A4093822, 2**59 + 17), (5, 2**60 - 40))
    cases += ((2**31, 9), (2**32 - 1, 2**31))
    for seed, first in cases:
        expected = _reference.philox_block_words(seed, domain, first, 64)
        got = impl.philox_block_words(seed, domain, first, 64, DEVICE)
        assert got.dtype == torch.int64 and torch.equal(got.cpu(), expected), (seed, first)
    assert impl.philox_block_words(3, domain, 10, 0, DEVICE).shape == (0, 4)


def _z_from_pass(impl, distribution, start, n):
    # x is tiny but never zero: x + z rounds to z exactly (|z| > 5e-10), so the pass's output is the backend's z.
    x = ((torch.rand(n, dtype=torch.float64) + 1) * 2.0**-100).float() * (1 - 2 * torch.randint(0, 2, (n,)))
    out = x.to(DEVICE, copy=True)
    impl.zo_pass_([out], [start], seed=17, alpha=1.0, distribution=distribution)
    return out.cpu().double() - x.double()


def test_gaussian_z_error(impl):
    n = 1_000_000
    worst = 0.0
    for start in (0, 2**40 + 3):
        exact = _reference.stream(17, start, n, "gaussian")
        err = (_z_from_pass(impl, "gaussian", start, n) - exact).abs()
        assert (err <= 2.0**-17 * (1 + exact.abs())).all(), "outside the bound of docs/stream.md, section 3"
        worst = max(worst, err.max().item())
    print(f"{impl.__name__}: max |z - z_exact| over {2 * n} Gaussian draws: {worst:.3g}")
    if DEVICE == "cpu":
        assert worst <= Z_ATOL_CPU


def test_rademacher_z_exact(impl):
    n = 300_000
    for start in OFFSETS:
        z = _z_from_pass(impl, "rademacher", start, n)
        assert torch.equal(z, _reference.stream(17, start, n, "rademacher"))


# ---------------------------------------------------------------------------------------------- the fused pass


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("distribution", DISTRIBUTIONS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_pass_matches_reference(impl, dtype, distribution, variant):
    kwargs = dict(VARIANTS[variant], seed=2**45 + 123, distribution=distribution)
    for k, offset in enumerate(OFFSETS):
        tensors = random_params(SIZES if k % 2 == 0 else SIZES[::-1], dtype, DEVICE, seed=k)
        got = _run(impl, tensors, offset, **kwargs)
        expected = _run(_reference, tensors, offset, **kwargs)
        assert all(out.shape == t.shape and out.dtype == dtype for t, out in zip(tensors, got))
        _assert_close_to_reference(torch.cat(got), torch.cat(expected), _z_scale(kwargs))


@pytest.mark.parametrize("variant", ["perturb", "weight_decay", "second_seed", "stochastic", "everything"])
@pytest.mark.parametrize("distribution", DISTRIBUTIONS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_16bit_rounding_is_the_reference_rule_on_our_stream(impl, dtype, distribution, variant):
    kwargs = dict(VARIANTS[variant], seed=99, distribution=distribution)
    tensors = random_params(SIZES, dtype, DEVICE, seed=3)
    offset = 2**31 + 5
    got = _run(impl, tensors, offset, **kwargs)
    for base, t, out in zip(_bases(tensors, offset), tensors, got):
        expected = _reference_rule_on_own_stream(impl, t, base, kwargs)
        assert torch.equal(out.cpu().view(torch.int16), expected.view(torch.int16))


def _assert_same_bits_or_both_nan(out, expected):
    # NaN's sign and payload carry no meaning and differ between conversion routines.
    nan = torch.isnan(expected)
    assert torch.equal(torch.isnan(out), nan)
    assert torch.equal(out[~nan].view(torch.int16), expected[~nan].view(torch.int16))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_16bit_edge_values_bit_exact(impl, dtype):
    """Subnormals, values near the largest finite one, overflow past it, NaN and infinities, both signs: stochastic
    rounding follows the reference rule bit for bit, and round-to-nearest is torch's conversion."""
    finfo = torch.finfo(dtype)
    g = torch.Generator().manual_seed(7)
    n = 20_000
    # From the smallest subnormal to the largest finite value.
    log_lo, log_hi = math.log2(finfo.smallest_normal) - MANTISSA_BITS[dtype], math.log2(finfo.max)
    mag = torch.exp2(torch.rand(n, generator=g, dtype=torch.float64) * (log_hi - log_lo) + log_lo)
    sign = 1 - 2 * torch.randint(0, 2, (n,), generator=g)
    t = (mag * sign).to(dtype)
    t[:64] = finfo.max * torch.tensor([1.0, -1.0]).repeat(32).to(dtype)
    t[64:128] = torch.tensor([finfo.smallest_normal, -finfo.tiny * 2**-3]).repeat(32).to(dtype)
    t[128:134] = torch.tensor([math.nan, -math.nan, math.inf, -math.inf, 0.0, -0.0]).to(dtype)
    t = t.to(DEVICE)
    cases = [
        # The weight-decay term moves every magnitude off the grid, subnormals included.
        dict(alpha=0.0, lr=0.1, grad=0.0, weight_decay=0.37),
        # A huge alpha carries some values past the largest finite value.
        dict(alpha=finfo.max / 3),
    ]
    for kwargs in cases:
        kwargs = dict(kwargs, seed=1, distribution="gaussian")
        x = _run(impl, [t.float()], 1000, **kwargs)[0].cpu()
        nearest = _run(impl, [t], 1000, **kwargs)[0].cpu()
        _assert_same_bits_or_both_nan(nearest, x.to(dtype))
        kwargs["rounding_seed"] = 12345
        out = _run(impl, [t], 1000, **kwargs)[0].cpu()
        _assert_same_bits_or_both_nan(out, _reference_rule_on_own_stream(impl, t, 1000, kwargs))
        if kwargs["alpha"]:
            assert (x.abs() > finfo.max).any() and torch.isinf(out.float()).any()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_stochastic_rounding_is_unbiased(impl, dtype):
    # Every element starts at 1.0 and moves by +-alpha (Rademacher): two float32 values, each between two 16-bit
    # neighbours. The mean of many stochastic roundings of each must be that value, within 5 standard errors.
    n = 200_000
    alpha = 0.3 * ulp(torch.ones((), dtype=dtype)).item()
    out = torch.ones(n, dtype=dtype, device=DEVICE)
    impl.zo_pass_([out], [0], seed=3, alpha=alpha, distribution="rademacher", rounding_seed=2024)
    out = out.cpu()
    z = _reference.stream(3, 0, n, "rademacher")
    for sign in (1.0, -1.0):
        target = torch.tensor(1.0 + sign * alpha, dtype=torch.float32).double().item()
        vals = out[z == sign].double()
        lo, hi = vals.min().item(), vals.max().item()
        assert lo < target < hi and set(vals.unique().tolist()) == {lo, hi}
        q = (target - lo) / (hi - lo)
        sem = (hi - lo) * math.sqrt(q * (1 - q) / vals.numel())
        assert abs(vals.mean().item() - target) < 5 * sem, (sign, vals.mean().item(), target, sem)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_stochastic_rounding_of_updates_below_float32_spacing_is_the_references_bit_for_bit(impl, dtype):
    # Weights on a power of two (where the float32 spacing below is half the one above) and next to it, updates of
    # a few float32 spacings or less: the pass's float32 result x alone loses them, x + e keeps them, and the second
    # rounding integer decides where the first ties (s = k). Rademacher z is exact on every backend, so the
    # reference's pass is the expected result bit for bit; enough elements that the tie happens (once in 2^16 draws:
    # about 60 times here, 2 under Triton's slow interpreter).
    n = 1 << (17 if "triton" in getattr(impl, "__name__", "") else 22)
    values = torch.tensor([1.0, -0.5, 0.75, 2.0**-14], dtype=dtype).repeat(n // 4)
    kwargs = dict(seed=5, distribution="rademacher", alpha=3e-8, lr=1.0, grad=2.5e-8, weight_decay=1e-9,
                  seed2=6, alpha2=-1e-8, rounding_seed=2**40 + 3)  # fmt: skip
    got = _run(impl, [values.to(DEVICE)], 77, **kwargs)[0].cpu()
    expected = _run(_reference, [values], 77, **kwargs)[0]
    assert torch.equal(got.view(torch.int16), expected.view(torch.int16))
    assert not torch.equal(expected, values)  # (some updates were kept)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_nonfinite_grad_restores_only(impl, dtype, bad):
    tensors = random_params((129, 1000), dtype, DEVICE, seed=5)
    bases = [7, 7 + 129]
    perturbed = [t.clone() for t in tensors]
    impl.zo_pass_(perturbed, bases, seed=4, alpha=1e-3, distribution="gaussian")
    restored = [t.clone() for t in perturbed]
    impl.zo_pass_(restored, bases, seed=4, alpha=-1e-3, distribution="gaussian")
    for grad in (bad, torch.tensor(bad, device=DEVICE)):
        out = [t.clone() for t in perturbed]
        impl.zo_pass_(out, bases, seed=4, alpha=-1e-3, distribution="gaussian", lr=0.1, grad=grad, weight_decay=0.5)
        for a, b in zip(out, restored):
            assert torch.equal(a, b)


def test_tensor_grad_equals_float_grad(impl):
    tensors = random_params((4097,), torch.float32, DEVICE, seed=8)
    kwargs = dict(seed=4, alpha=-1e-3, distribution="gaussian", lr=0.1, weight_decay=0.01)
    a = _run(impl, tensors, 3, grad=0.625, **kwargs)
    b = _run(impl, tensors, 3, grad=torch.tensor(0.625, device=DEVICE), **kwargs)
    c = _run(impl, tensors, 3, grad=torch.tensor([0.625], dtype=torch.float64, device=DEVICE), **kwargs)
    assert torch.equal(a[0], b[0]) and torch.equal(a[0], c[0])


# ---------------------------------------------------------------------------------------------------- indexing


@pytest.mark.parametrize("distribution", DISTRIBUTIONS)
def test_any_split_of_a_tensor_gives_the_same_result(impl, distribution):
    full = random_params((5000,), torch.bfloat16, DEVICE, seed=9)[0]
    kwargs = dict(seed=21, alpha=1e-2, distribution=distribution, seed2=8, alpha2=-3e-3, rounding_seed=31)
    whole = _run(impl, [full], 2**35 + 1, **kwargs)[0]
    for cuts in ((1,), (7, 8, 9), (127, 1024, 1025, 4999), (3, 130, 2048, 4097)):
        parts = list(torch.tensor_split(full, cuts))
        out = _run(impl, parts, 2**35 + 1, **kwargs)
        assert torch.equal(torch.cat(out), whole), cuts


def test_many_tensors_in_one_call(impl):
    # More tensors than one CUDA launch carries (96), of sizes that leave every alignment.
    sizes = [1 + (37 * k) % 300 for k in range(230)]
    tensors = random_params(sizes, torch.float16, DEVICE, seed=14)
    kwargs = dict(seed=6, alpha=1e-2, distribution="rademacher", lr=1e-2, grad=0.5)
    got = _run(impl, tensors, 99, **kwargs)
    expected = _run(_reference, tensors, 99, **kwargs)
    assert all(torch.equal(a, b) for a, b in zip(got, expected))  # Rademacher z is exact: so is the result


@pytest.mark.parametrize("distribution", DISTRIBUTIONS)
@pytest.mark.parametrize("n", [1, 37, 5000])
def test_last_index_of_the_stream(impl, distribution, n):
    # The final element may sit at global index 2^63 - 1 (a partial word, a partial chunk, several chunks).
    t = random_params((n,), torch.float32, DEVICE, seed=12)[0]
    offset = 2**63 - n
    got = _run(impl, [t], offset, seed=1, alpha=0.5, distribution=distribution)[0]
    ref = _run(_reference, [t], offset, seed=1, alpha=0.5, distribution=distribution)[0]
    _assert_close_to_reference(got, ref, 0.5)


def test_empty_inputs(impl):
    impl.zo_pass_([], [], seed=1, alpha=1.0, distribution="gaussian")
    empty = torch.empty(0, dtype=torch.bfloat16, device=DEVICE)
    impl.zo_pass_([empty, empty.clone()], [5, 5], seed=1, alpha=1.0, distribution="gaussian")


@pytest.mark.parametrize("backend", backends_for())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("distribution", DISTRIBUTIONS)
@pytest.mark.parametrize("second", [False, True], ids=["one_seed", "two_seeds"])
def test_out_of_place_pass_equals_copy_then_in_place_pass(backend, dtype, distribution, second):
    """``perturb_into_`` reads the sources and writes the outputs once; the values are those of ``clone`` followed by
    ``perturb_`` on the same backend, bit for bit (same float32 operations), and the sources are left alone."""
    import zokern

    sources = random_params(SIZES, dtype)
    before = [s.clone() for s in sources]
    kwargs = dict(offsets=_bases(sources, OFFSETS[1]), distribution=distribution, backend=backend)
    extra = dict(next_seed=2**62 + 3, next_alpha=-2e-3) if second else {}
    out = [torch.empty_like(s) for s in sources]
    zokern.perturb_into_(out, sources, 42, 1e-3, **kwargs, **extra)
    expected = [s.clone() for s in sources]
    if second:
        zokern.two_seed_(expected, 42, 1e-3, 2**62 + 3, -2e-3, **kwargs)
    else:
        zokern.perturb_(expected, 42, 1e-3, **kwargs)
    for o, e, s, b in zip(out, expected, sources, before):
        assert torch.equal(o, e) and torch.equal(s, b)


def test_out_of_place_pass_rejects_mismatched_or_overlapping_tensors():
    import zokern

    a, b = torch.randn(10), torch.randn(10)
    with pytest.raises(ValueError, match=r"out\[0\] .* differs from sources\[0\]"):
        zokern.perturb_into_([torch.empty(9)], [a], 1, 1e-3)
    with pytest.raises(ValueError, match="overlap a source"):
        zokern.perturb_into_([a[:5]], [a[:5]], 1, 1e-3)
    with pytest.raises(ValueError, match="out has 2 tensors but sources has 1"):
        zokern.perturb_into_([a, b], [torch.randn(10)], 1, 1e-3)
