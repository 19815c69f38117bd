"""What only the C++ extension has: a thread count that never changes results, and the torch op's own contract."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from helpers import random_params

from zokern import _native
from zokern import ops

if not _native.cpu_available():
    pytest.skip(f"zokern._C is not built: {_native.LOAD_ERROR}", allow_module_level=True)


def _bases(tensors, offset):
    bases, total = [], offset
    for t in tensors:
        bases.append(total)
        total += t.numel()
    return bases


def _run(tensors, offset, **kwargs):
    out = [t.clone() for t in tensors]
    _native.zo_pass_(out, _bases(out, offset), **kwargs)
    return out


def test_thread_count_does_not_change_the_result():
    tensors = random_params((1, 100_000, 3, 70_000), torch.float16, "cpu", seed=10)
    kwargs = dict(seed=5, alpha=1e-2, distribution="gaussian", lr=1e-3, grad=2.0, rounding_seed=6)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _run(tensors, 11, **kwargs)
        torch.set_num_threads(max(2, threads))
        many = _run(tensors, 11, **kwargs)
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for a, b in zip(one, many))


# ---------------------------------------------------------------------------------------- the op's contract


def _op_args(tensors, **overrides):
    args = dict(
        tensors=tensors,
        bases=_bases(tensors, 0),
        seed=1,
        alpha=1e-3,
        domain=0,
        lr=0.0,
        grad_value=0.0,
        grad_tensor=None,
        update=False,
        weight_decay=0.0,
        seed2=0,
        alpha2=0.0,
        second=False,
        rounding_seed=0,
        stochastic=False,
    )
    args.update(overrides)
    return list(args.values())


@pytest.mark.parametrize(
    "overrides,match",
    [
        (dict(bases=[0]), "2 tensors but 1 bases"),
        (dict(domain=2), "domain must be 0"),
        (dict(seed=-1), "seed"),
        (dict(bases=[0, 2**63 - 5]), "leaves the index range"),
        (dict(update=True, grad_tensor=torch.ones(2)), "one-element float32"),
    ],
)
def test_op_rejects_bad_arguments(overrides, match):
    tensors = [torch.ones(10), torch.ones(10)]
    with pytest.raises(RuntimeError, match=match):
        torch.ops.zokern.zo_pass_(*_op_args(tensors, **overrides))
    assert all(torch.equal(t, torch.ones(10)) for t in tensors)


def test_every_cpu_op_refuses_bases_past_the_index_range():
    """zokern.ops checks bases first; the raw ops must too (a wrapped index made the copy pass a silent no-op)."""
    out, src = [torch.ones(10)], [torch.full((10,), 2.0)]
    for bases in ([2**63 - 5], [-1]):
        with pytest.raises(RuntimeError, match=r"leaves the stream's index range"):
            torch.ops.zokern.zo_copy_pass_(out, src, bases, 1, 0.5, 0, 0, 0.0, False)
        with pytest.raises(RuntimeError, match=r"leaves the stream's index range"):
            torch.ops.zokern.zopro_reduce(src, [None], bases, 1)
        assert torch.equal(out[0], torch.ones(10))


@pytest.mark.parametrize(
    "tensors,match",
    [
        ([torch.ones(4), torch.ones(4, dtype=torch.float16)], "has dtype"),
        ([torch.ones(4, 4).t()], "not contiguous"),
        ([torch.ones(4, dtype=torch.float64)], "float32, bfloat16 or float16"),
    ],
)
def test_op_rejects_bad_tensors(tensors, match):
    with pytest.raises(RuntimeError, match=match):
        torch.ops.zokern.zo_pass_(*_op_args(tensors))


def test_opcheck():
    tensors = random_params((9, 130), torch.bfloat16, "cpu", seed=13)
    args = _op_args(tensors, update=True, grad_tensor=torch.tensor(0.5), lr=0.01, stochastic=True, rounding_seed=3)
    torch.library.opcheck(torch.ops.zokern.zo_pass_.default, args)
    torch.library.opcheck(torch.ops.zokern.philox_words_.default, (torch.empty(5, 4, dtype=torch.int64), 3, 1, 9))


# The hand-written AVX-512 and AVX2 paths (taken on CPUs that have the instructions) against the portable loops:
# the same script in processes with ZOKERN_CPU_PATHS set to each, compared bit for bit. On a CPU without a path, its
# cap runs the best path the CPU has (the portable loop at worst), and the comparison still holds.


def _script_output(script: str, args: list[str], path, cpu_paths: str) -> torch.Tensor:
    env = {k: v for k, v in os.environ.items() if k != "ZOKERN_CPU_PATHS"}
    env["ZOKERN_CPU_PATHS"] = cpu_paths
    subprocess.run([sys.executable, "-c", script, *args, str(path)], env=env, check=True, timeout=300)
    return torch.load(path)


PASSES_SCRIPT = """
import sys, torch
from zokern import _native, ops
out = []
for dtype in (torch.float32, torch.bfloat16, torch.float16):
    # Block counters that carry into their high word: Gaussian and rounding blocks hold 8 indices, so 2^35.
    for offset in (13, 2**35 - 4000, 2**40 + 3):
        t = (torch.randn(9000, generator=torch.Generator().manual_seed(offset % 97)) * 0.02).to(dtype)
        ops.perturb_(t, 7, 1e-3, offset=offset, backend="cpu")
        ops.perturb_(t, 8, -1e-3, offset=offset, rounding="stochastic", rounding_seed=9, backend="cpu")
        ops.restore_update_(t, 7, -1e-3, 1e-2, 0.5, weight_decay=0.1, offset=offset, next_seed=11,
                            next_alpha=2e-3, rounding="stochastic", rounding_seed=2**62 + 1, backend="cpu")
        ops.two_seed_(t, 3, 1e-3, 4, -2e-3, offset=offset, backend="cpu")
        out.append(t.float())
# Raw batches at unaligned first blocks: a carry into the counter's high word inside a vector, partial vectors.
for first in (2**32 - 3, 2**62 + 2**40 - 21, 5):
    out.append(_native.philox_block_words(2**63 - 5, 2, first, 1003))  # a partial vector at the end
torch.save(out, sys.argv[1])
"""


@pytest.mark.parametrize("cpu_paths", ["avx512", "avx2"])
def test_gaussian_and_rounding_streams_equal_the_portable_philox(cpu_paths, tmp_path):
    vector = _script_output(PASSES_SCRIPT, [], tmp_path / "vector.pt", cpu_paths)
    portable = _script_output(PASSES_SCRIPT, [], tmp_path / "portable.pt", "portable")
    assert len(vector) == len(portable) == 3 * 3 + 3
    assert all(torch.equal(v, p) for v, p in zip(vector, portable))


# Every 16-bit value (NaNs, infinities, subnormals, both zeros) perturbed by Rademacher z, against the portable loop
# and the plain-torch reference.
ALPHAS = (1e-3, -3.0, 1e-40, 6e4, 3e38, 1e-38)  # plain; large; subnormal sums; fp16 overflow; bf16 overflow
ALL_BITS_SCRIPT = f"""
import sys, torch
from zokern import ops
dtype = getattr(torch, sys.argv[1])
out = []
for alpha in {ALPHAS}:
    for offset in (0, 5):  # 5: partial words at both ends of the tensor
        t = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(dtype)
        ops.perturb_(t, 123, alpha, offset=offset, distribution="rademacher", backend="cpu")
        out.append(t.view(torch.int16))
torch.save(torch.stack(out), sys.argv[2])
"""


@pytest.mark.parametrize("cpu_paths", ["avx512", "avx2"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_rademacher_perturb_of_every_16_bit_value(dtype, cpu_paths, tmp_path):
    name = [str(dtype).removeprefix("torch.")]
    vector = _script_output(ALL_BITS_SCRIPT, name, tmp_path / "vector.pt", cpu_paths)
    portable = _script_output(ALL_BITS_SCRIPT, name, tmp_path / "portable.pt", "portable")
    assert torch.equal(vector, portable)  # NaNs included: both write the canonical NaN
    values = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(dtype)
    nan = torch.isnan(values)
    k = 0
    for alpha in ALPHAS:
        for offset in (0, 5):
            expected = values.clone()
            ops.perturb_(expected, 123, alpha, offset=offset, distribution="rademacher", backend="torch")
            assert torch.equal(vector[k][~nan], expected.view(torch.int16)[~nan]), (alpha, offset)
            k += 1
    canonical = {torch.bfloat16: {0x7FC0}, torch.float16: {0x7E00, -0x200}}[dtype]  # fp16 keeps the NaN's sign
    assert set(vector[:, nan].unique().tolist()) <= canonical


def _correctly_rounded_gaussian_tables() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """docs/stream.md, section 3: r for every low half-word, and (cos theta, sin theta) for every high one (theta as
    the kernels compute it, in float32), each the float32 nearest the exact value."""
    mpmath = pytest.importorskip("mpmath")  # a dependency of torch's sympy
    theta = (torch.arange(65536, dtype=torch.float32) - 32767.5) * torch.tensor(9.58737992428525768e-05)
    radius, cos, sin = [], [], []
    with mpmath.workprec(80):
        for v, t in enumerate(theta.tolist()):
            r = mpmath.sqrt(-2 * mpmath.log(mpmath.mpf(2 * v + 1) / 131072))
            c, s = mpmath.cos(t), mpmath.sin(t)
            with mpmath.workprec(24):  # unary plus rounds to nearest at 24 bits, float32's precision
                radius.append(float(+r))
                cos.append(float(+c))
                sin.append(float(+s))
    return tuple(torch.tensor(v, dtype=torch.float32) for v in (radius, cos, sin))


def test_gaussian_z_is_the_product_of_correctly_rounded_r_and_angle():
    """The CPU backend's z is r * cos theta or r * sin theta, the three each rounded correctly: bits that do not
    depend on the platform's libm. Tables from float32 logf, sinf and cosf (r rounded three times) gave another z at
    13 % of the elements with glibc 2.36, and would differ otherwise with another libm."""
    radius, cos, sin = _correctly_rounded_gaussian_tables()
    seed, n_blocks = 2**40 + 9, 1 << 19
    words = _native.philox_block_words(seed, 0, 0, n_blocks)  # domain 0: the Gaussian stream
    lo, hi = (words & 0xFFFF).flatten(), (words >> 16).flatten()
    assert lo.unique().numel() == hi.unique().numel() == 65536  # every entry of both tables is checked
    expected = torch.stack([radius[lo] * cos[hi], radius[lo] * sin[hi]], dim=1).flatten()  # float32 products
    z = ops.gaussian(seed, 0, 8 * n_blocks, backend="cpu")
    assert torch.equal(z.view(torch.int32), expected.view(torch.int32))
