"""zokern's CUDA kernels (csrc/cuda/zo_pass.cu) run on the CPU: the ``cuda`` backend's launch and indexing logic,
checked on machines without a GPU.

``build()`` compiles zo_pass.cu with g++ against a stand-in CUDA runtime (tests/cuda_emulation/include, which says
what the emulation is faithful to) into a small shared library, once per source version, and loads it with ctypes.
The module then offers the backend interface of ``zokern._dispatch`` (``zo_pass_``, ``zo_copy_pass_`` and
``philox_block_words`` over CPU tensors), so the backend tests run on it as on any backend.

What this cannot check: the device-only math of zokern/stream.h (the GPU's sqrt, sin and cos instructions; the
polynomial log is checked, through ``log_unit_interval``), which runs the host's here, and code generation (nvcc
compiles the file for sm_80 and sm_90 in .ci/check_cuda.sh). The torch adapter csrc/cuda/bindings.cpp is compiled
there too but not run.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch

from zokern._reference import DISTRIBUTIONS

ROOT = Path(__file__).resolve().parent.parent
SOURCES = (
    ROOT / "tests/cuda_emulation/emulated_pass.cpp",
    ROOT / "tests/cuda_emulation/include/cuda_runtime.h",
    ROOT / "tests/cuda_emulation/include/cuda_runtime_api.h",
    ROOT / "csrc/cuda/zo_pass.cu",
    ROOT / "csrc/cuda/zo_pass.h",
    ROOT / "csrc/include/zokern/stream.h",
)
# The sanitizer checks report to hooks in emulated_pass.cpp, not to libubsan: the library links nothing extra.
FLAGS = (
    "-std=c++17",
    "-O2",
    "-fPIC",
    "-fno-strict-aliasing",
    "-Wall",
    "-Wno-unknown-pragmas",
    "-Werror",
    "-DZOKERN_CUDA_EMULATION",
    "-fsanitize=alignment,signed-integer-overflow,shift,bounds,pointer-overflow",
    "-Wl,-Bsymbolic",  # the hooks bind to this library's own, even where libubsan is loaded into the process
)
FORMATS = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
_U64 = (1 << 64) - 1
UNDEFINED_BEHAVIOUR = -1  # emulated_pass.cpp's kUndefinedBehaviour

_lib: ctypes.CDLL | None = None


def compiler() -> str | None:
    return os.environ.get("CXX") or shutil.which("g++")


def build() -> ctypes.CDLL:
    """The emulation library, compiled on first use (a few seconds) and cached in the temp directory."""
    global _lib
    if _lib is not None:
        return _lib
    cxx = compiler()
    if cxx is None:
        raise RuntimeError("no C++ compiler (g++ or $CXX) to build the CUDA emulation")
    digest = hashlib.sha256()
    for part in (cxx, *FLAGS, *(p.read_bytes() for p in SOURCES)):
        digest.update(part if isinstance(part, bytes) else part.encode())
    cache = Path(tempfile.gettempdir()) / "zokern-cuda-emulation"
    cache.mkdir(exist_ok=True)
    target = cache / f"emulated_pass-{digest.hexdigest()[:16]}.so"
    if not target.exists():
        # Built under a private name, then renamed: concurrent test workers never load a half-written file.
        fd, partial = tempfile.mkstemp(suffix=".so", dir=cache)
        os.close(fd)
        command = [
            cxx,
            *FLAGS,
            f"-I{ROOT / 'tests/cuda_emulation/include'}",
            f"-I{ROOT / 'csrc/include'}",
            "-shared",
            str(SOURCES[0]),
            "-o",
            partial,
        ]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            os.unlink(partial)
            raise RuntimeError(f"building the CUDA emulation failed:\n{' '.join(command)}\n{done.stderr}")
        os.replace(partial, target)
    lib = ctypes.CDLL(str(target))
    p, i64, u64, f32, i32, u32 = (
        ctypes.c_void_p,
        ctypes.c_int64,
        ctypes.c_uint64,
        ctypes.c_float,
        ctypes.c_int,
        ctypes.c_uint32,
    )
    # data, sources, numel, base, count, format, seed, seed2, rounding_seed, alpha, alpha2, lr, weight_decay, grad,
    # grad_ptr, scalars, domain, update, second, stochastic
    lib.zk_emu_zo_pass.argtypes = [p, p, p, p, i64, i32, u64, u64, u64, *[f32] * 5, p, p, u32, i32, i32, i32]
    lib.zk_emu_zo_pass.restype = i32
    lib.zk_emu_philox_words.argtypes = [u64, u32, u64, i64, p]
    lib.zk_emu_philox_words.restype = i32
    lib.zk_emu_log_unit_interval.argtypes = [f32]
    lib.zk_emu_log_unit_interval.restype = f32
    lib.zk_emu_configure.argtypes = [i32]
    lib.zk_emu_counters.argtypes = [p]
    lib.zk_emu_report.restype = ctypes.c_char_p
    _lib = lib
    return lib


def configure(multiprocessors: int) -> None:
    """The multiprocessor count the stand-in runtime reports (2 resident blocks each: a pass's grid is at most twice
    this)."""
    build().zk_emu_configure(multiprocessors)


_launches = {"launches": 0, "largest_grid": 0}


def launches() -> dict[str, int]:
    """Kernel launches and the largest grid since the last call of this function."""
    out = dict(_launches)
    _launches.update(launches=0, largest_grid=0)
    return out


def _check(status: int, what: str) -> None:
    """Raises on a launch error or a sanitizer report (which abandoned the call); moves its launch counts to
    launches()."""
    lib = build()
    counters = (ctypes.c_int64 * 2)()
    lib.zk_emu_counters(counters)  # and zeroes them
    _launches["launches"] += counters[0]
    _launches["largest_grid"] = max(_launches["largest_grid"], counters[1])
    if status == UNDEFINED_BEHAVIOUR:
        raise AssertionError(f"emulated {what}: undefined behaviour in a kernel ({lib.zk_emu_report().decode()})")
    if status != 0:
        raise RuntimeError(f"emulated {what}: CUDA error {status}")


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
) -> None:
    """The ``cuda`` backend's pass, as csrc/cuda/bindings.cpp calls it, on CPU tensors (one dtype, contiguous)."""
    grad_value, grad_tensor = 0.0, None
    if isinstance(grad, torch.Tensor):
        grad_tensor = grad.detach().to(dtype=torch.float32).reshape(()).contiguous()
    elif grad is not None:
        grad_value = float(grad)
    if scalars is not None:
        assert scalars.dtype == torch.int64 and scalars.numel() == 8 and scalars.is_contiguous()
    _launch(
        tensors, None, bases, seed=seed, alpha=alpha, distribution=distribution, lr=lr, grad_value=grad_value,
        grad_ptr=None if grad_tensor is None else grad_tensor.data_ptr(), update=grad is not None,
        weight_decay=weight_decay, seed2=seed2, alpha2=alpha2, rounding_seed=rounding_seed,
        scalars_ptr=None if scalars is None else scalars.data_ptr(),
    )  # fmt: skip


def zo_copy_pass_(out, sources, bases, *, seed, alpha, distribution, seed2=None, alpha2=0.0) -> None:
    """The ``cuda`` backend's out-of-place pass (bindings.cpp's zo_copy_pass_cuda): out_k = source_k + alpha z, ..."""
    assert all(o.shape == s.shape and o.dtype == s.dtype and s.is_contiguous() for o, s in zip(out, sources))
    _launch(out, sources, bases, seed=seed, alpha=alpha, distribution=distribution, seed2=seed2, alpha2=alpha2)


def _launch(
    tensors, sources, bases, *, seed, alpha, distribution, lr=0.0, grad_value=0.0, grad_ptr=None, update=False,
    weight_decay=0.0, seed2=None, alpha2=0.0, rounding_seed=None, scalars_ptr=None,
) -> None:  # fmt: skip
    sources = list(tensors) if sources is None else list(sources)
    spans = [(t, s, b) for t, s, b in zip(tensors, sources, bases) if t.numel() > 0]  # bindings.cpp skips empty ones
    if not spans:
        return
    dtype = spans[0][0].dtype
    assert all(t.dtype == dtype and t.is_contiguous() and t.device.type == "cpu" for t, _, _ in spans)
    n = len(spans)
    status = build().zk_emu_zo_pass(
        (ctypes.c_void_p * n)(*(t.data_ptr() for t, _, _ in spans)),
        (ctypes.c_void_p * n)(*(s.data_ptr() for _, s, _ in spans)),
        (ctypes.c_int64 * n)(*(t.numel() for t, _, _ in spans)),
        (ctypes.c_int64 * n)(*(b for _, _, b in spans)),
        n,
        FORMATS[dtype],
        seed & _U64,
        (seed2 or 0) & _U64,
        (rounding_seed or 0) & _U64,
        alpha,
        alpha2,
        lr,
        weight_decay,
        grad_value,
        grad_ptr,
        scalars_ptr,
        DISTRIBUTIONS[distribution],
        update,
        seed2 is not None,
        rounding_seed is not None,
    )
    _check(status, "zo_pass_")


def philox_block_words(
    seed: int, domain: int, first_block: int, n_blocks: int, device: torch.device | str | None = None
) -> torch.Tensor:
    out = torch.empty((n_blocks, 4), dtype=torch.int64)
    _check(build().zk_emu_philox_words(seed & _U64, domain, first_block, n_blocks, out.data_ptr()), "philox_words")
    return out


def log_unit_interval(u: float) -> float:
    """zokern/stream.h's device log (the GPU's Gaussian radius uses it), evaluated on the host in float32."""
    return build().zk_emu_log_unit_interval(u)
