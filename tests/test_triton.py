"""The Triton backend's own concerns: tiling must not change z, and the kernels compile for a GPU.

Correctness against the reference is in test_backends.py (Triton runs there under its interpreter on a CPU). The
interpreter does not compile anything, so the compile tests below build the kernels for an H100 (sm_90) with
Triton's own compiler and assembler, which needs no GPU: a kernel that only the interpreter accepts fails here; and
the package's launches run through Triton's compiled launch path with a stand-in H100 driver, compiling each.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import DEVICE
from helpers import backends_for
from helpers import random_params

pytest.importorskip("triton")

from zokern import _reference  # noqa: E402
from zokern.kernels import copy_pass  # noqa: E402
from zokern.kernels import ldsd_pass  # noqa: E402
from zokern.kernels import zo_pass  # noqa: E402
from zokern.kernels import zopro_pass  # noqa: E402

requires_triton_backend = pytest.mark.skipif(
    "triton" not in backends_for(), reason="Triton needs a GPU or TRITON_INTERPRET=1 (set by conftest on a CPU)"
)


@requires_triton_backend
@pytest.mark.parametrize("distribution", ("gaussian", "rademacher"))
def test_tile_size_does_not_change_the_result(distribution):
    tensors = random_params((5, 130, 1000, 3000), torch.bfloat16, DEVICE, seed=2)
    bases = [2**33 + 3 + k for k in (0, 5, 135, 1135)]
    kwargs = dict(seed=8, alpha=1e-2, distribution=distribution, lr=0.1, grad=0.5, seed2=9, alpha2=1e-3)
    results = []
    for block in (128, 1024, 8192):
        out = [t.clone() for t in tensors]
        zo_pass.zo_pass_(out, bases, rounding_seed=4, block=block, **kwargs)
        results.append(torch.cat(out))
    assert all(torch.equal(r, results[0]) for r in results[1:])


@requires_triton_backend
def test_tables_are_reused_and_follow_the_offsets():
    t = random_params((3000,), torch.float32, DEVICE, seed=4)[0]
    ref = t.clone()
    block = zo_pass._block_size(t.device)
    for base in (0, 0, 77):  # the same tensor twice, then at another offset
        zo_pass.zo_pass_([t], [base], seed=1, alpha=0.5, distribution="rademacher")
        _reference.zo_pass_([ref], [base], seed=1, alpha=0.5, distribution="rademacher")
        if base == 0:
            table = zo_pass._work_table([t], [0], block)
    assert zo_pass._work_table([t], [0], block) is table  # cached, not rebuilt
    assert torch.equal(t, ref)  # Rademacher z is exact, so is every pass


def test_the_tables_of_a_large_models_parameters_stay_cached():
    """The exact mode materialises each large parameter once per forward, each with its own table: a model with more
    of them than the cache holds would rebuild every table on every forward."""
    tensors = [torch.empty(3) for _ in range(400)]
    first = [zo_pass._work_table([t], [0], 2048) for t in tensors]
    assert all(zo_pass._work_table([t], [0], 2048) is table for t, table in zip(tensors, first))


def test_the_table_cache_is_bounded_in_bytes(monkeypatch):
    """Tensors that get new memory at every call (the exact mode's copies) would fill it with dead tables."""
    monkeypatch.setattr(zo_pass, "_tables", type(zo_pass._tables)())
    monkeypatch.setattr(zo_pass, "_table_bytes", 0)
    monkeypatch.setattr(zo_pass, "_TABLE_CACHE_BYTES", 16 * 1024)
    keep = [torch.empty(100_000) for _ in range(40)]  # 49 tiles of 2048 each: 1568 bytes a table
    tables = [zo_pass._work_table([t], [0], 2048) for t in keep]
    assert zo_pass._table_bytes == sum(t.nbytes for t in zo_pass._tables.values()) <= 16 * 1024
    assert len(zo_pass._tables) < len(keep) and zo_pass._work_table([keep[-1]], [0], 2048) is tables[-1]


def compiled_in_subprocess(script: str):
    """The JSON a script beside this file prints. The interpreter replaces @triton.jit functions at import, so the
    compiler runs in a process without it."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    path = Path(__file__).with_name(script)
    out = subprocess.run([sys.executable, str(path)], capture_output=True, text=True, env=env, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout)


def test_every_kernel_launches_through_the_package_as_compiled_for_an_h100():
    """The launch path the interpreter skips: argument binding and typing, options, and a compile for each launch's
    own specialisation, for every op and optimizer that launches Triton (tests/triton_launch.py)."""
    launches = compiled_in_subprocess("triton_launch.py")
    modules = (zo_pass, copy_pass, ldsd_pass, zopro_pass)
    assert set(launches) == {name for m in modules for name in vars(m) if name.endswith("_kernel")}, launches


@pytest.fixture(scope="module")
def h100_ptx_facts():
    return compiled_in_subprocess("triton_ptx.py")


def test_pass_compiles_for_h100_with_vector_memory_access(h100_ptx_facts):
    passes = {name: facts for name, facts in h100_ptx_facts.items() if name.startswith("zo_pass")}
    # dtype x distribution x (aligned with no flags, aligned all flags, the same reading a scalars row, unaligned)
    assert len(passes) == 3 * 2 * 4
    for name, facts in passes.items():
        if "aligned" in name and "unaligned" not in name:
            # Interior tiles of aligned tensors move 16 bytes per access: the pass is meant to be memory-bound.
            assert facts["vector_load"] and facts["vector_store"], name
        assert facts["stores"], name
        assert not facts["local_memory"], f"{name} uses local memory (register spills or a library slow path)"


def test_pass_arithmetic_is_separately_rounded_as_specified(h100_ptx_facts):
    """docs/stream.md, section 5: no multiply-add of the pass is fused (kernels/options.py), which the Rademacher
    variants show alone (the Gaussian transform's polynomials are explicit fused multiply-adds)."""
    for dtype in ("float32", "bfloat16", "float16"):
        facts = h100_ptx_facts[f"zo_pass_{dtype}_rademacher_aligned_all_flags"]
        assert facts["fused_multiply_adds"] == 0, dtype
        assert facts["separately_rounded_products"] > 0, dtype
    gaussian = h100_ptx_facts["zo_pass_float32_gaussian_aligned_all_flags"]
    assert gaussian["fused_multiply_adds"] > 0  # the polynomials' Horner steps


def test_philox_kernel_compiles_for_h100(h100_ptx_facts):
    assert h100_ptx_facts["philox_words"]["mul_hi_u32"]  # 32x32->64 products as mul.hi, not 64-bit emulation


def test_ldsd_kernels_compile_for_h100(h100_ptx_facts):
    ldsd = {name: facts for name, facts in h100_ptx_facts.items() if name.startswith("ldsd")}
    assert len(ldsd) == 6
    for name, facts in ldsd.items():
        assert facts["mul_hi_u32"] and not facts["local_memory"], name
        assert facts["vector_load"], name  # 16-byte accesses in aligned interiors
        assert facts["vector_store"] or name.startswith("ldsd_norm"), name  # the norm stores one sum per tile


def test_zopro_kernels_compile_for_h100(h100_ptx_facts):
    for name in ("zopro_apply", "zopro_reduce"):
        facts = h100_ptx_facts[name]
        assert facts["mul_hi_u32"] and facts["stores"] and not facts["local_memory"], name


def test_out_of_place_pass_compiles_for_h100_with_vector_memory_access(h100_ptx_facts):
    for dtype in ("float32", "bfloat16"):
        facts = h100_ptx_facts[f"copy_pass_{dtype}"]
        assert facts["vector_load"] and facts["vector_store"] and not facts["local_memory"], dtype
