"""CPU kernel benchmarks (pytest-benchmark), run by their own command, not by the test suite:

    python -m pytest benchmarks/cpu --benchmark-only --benchmark-columns=median,ops

Each op runs on 8M elements in 64 tensors, for the `cpu` (C++) and `torch` backends, beside a plain copy of the
same bytes (the memory-bandwidth floor) and MeZO's per-tensor torch.normal pass (the baseline to beat).
"""

import pytest
import torch

import zokern

N_TENSORS, PER_TENSOR = 64, 1 << 17
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
BACKENDS = [b for b in ("cpu", "torch") if b in zokern.available_backends()]


def _params(dtype):
    return [torch.randn(PER_TENSOR, dtype=torch.float32).mul_(0.02).to(dtype) for _ in range(N_TENSORS)]


@pytest.mark.parametrize("dtype", DTYPES)
def test_copy_floor(benchmark, dtype):
    src = torch.cat(_params(DTYPES[dtype]))
    dst = torch.empty_like(src)
    benchmark(dst.copy_, src)


@pytest.mark.parametrize("dtype", DTYPES)
def test_mezo_torch_normal_pass(benchmark, dtype):
    params = _params(DTYPES[dtype])

    def mezo_pass():  # as MeZO's zo_perturb_parameters: scaling_factor * z * eps, two multiplies and an add
        torch.manual_seed(0)
        for p in params:
            p.data = p.data + 1.0 * torch.normal(0, 1, size=p.size(), dtype=p.dtype) * 1e-3

    benchmark(mezo_pass)


# The update rows use lr = 1e-9: with lr = 0 the pass leaves the update out (docs/stream.md, section 5) and would time
# a restore. restore_update_sr is the pass a step of 16-bit weights runs.
OPS = {
    "perturb": lambda ps, be, d: zokern.perturb_(ps, 1, 1e-3, distribution=d, backend=be),
    "restore_update": lambda ps, be, d: zokern.restore_update_(ps, 1, 1e-3, 1e-9, 0.5, distribution=d, backend=be),
    "restore_update_sr": lambda ps, be, d: zokern.restore_update_(
        ps, 1, 1e-3, 1e-9, 0.5, distribution=d, rounding="stochastic", rounding_seed=3, backend=be
    ),
    "two_seed": lambda ps, be, d: zokern.two_seed_(ps, 1, 1e-3, 2, -1e-3, distribution=d, backend=be),
    "perturb_sr": lambda ps, be, d: zokern.perturb_(
        ps, 1, 1e-3, distribution=d, rounding="stochastic", rounding_seed=3, backend=be
    ),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("distribution", ["gaussian", "rademacher"])
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_op(benchmark, backend, distribution, op, dtype):
    params = _params(DTYPES[dtype])
    benchmark(OPS[op], params, backend, distribution)
