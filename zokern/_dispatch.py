"""Backend registry: which implementations of the fused pass this install can run, and which one a call gets.

Every backend is a module exposing ``zo_pass_(tensors, bases, *, seed, alpha, distribution, lr, grad,
weight_decay, seed2, alpha2, rounding_seed)`` over tensors of one device and dtype, and
``philox_block_words(seed, domain, first_block, n_blocks, device)``; all follow docs/stream.md.

An automatic choice falls back quietly to the next backend; an explicit request (``backend=`` or the
``ZOKERN_BACKEND`` environment variable) must succeed or raise, naming why it cannot run and what can.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import os
from types import ModuleType

import torch

from zokern import _floors

BACKENDS = ("cuda", "triton", "cpu", "torch")
ENV_VAR = "ZOKERN_BACKEND"

# Automatic preference per device type. On CUDA the C++ kernels come first because they need no JIT warm-up;
# which of cuda/triton is faster is measured by benchmarks/kernels_gpu.py (see benchmarks/RESULTS.md).
_PREFERENCE = {"cuda": ("cuda", "triton", "torch"), "cpu": ("cpu", "torch")}


@functools.cache
def _triton_installed() -> bool:
    # Cached: the module search stats the file system, which cost each pass about 0.1 ms of host time.
    return importlib.util.find_spec("triton") is not None


@functools.cache
def _triton_too_old() -> str | None:
    return _floors.triton_too_old()


def _triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "") == "1"


def backend_status() -> dict[str, str]:
    """Each backend's name mapped to "available" or the reason it cannot run in this install."""
    from zokern import _native

    status = {"torch": "available"}
    status["cpu"] = "available" if _native.cpu_available() else f"C++ extension not loaded: {_native.LOAD_ERROR}"
    if not _native.cpu_available():
        status["cuda"] = status["cpu"]
    elif not torch.cuda.is_available():
        status["cuda"] = "no CUDA device visible to torch"
    elif not _native.cuda_available():
        status["cuda"] = "the extension was built without CUDA kernels (torch without CUDA, or nvcc not found)"
    else:
        status["cuda"] = "available"
    if not _triton_installed():
        status["triton"] = "triton is not installed (pip install triton)"
    elif not (torch.cuda.is_available() or _triton_interpreted()):
        status["triton"] = "no CUDA device visible to torch (set TRITON_INTERPRET=1 to run Triton on the CPU)"
    elif _triton_too_old() is not None:  # (imports triton: only where it would run)
        status["triton"] = _triton_too_old()
    else:
        status["triton"] = "available"
    return {name: status[name] for name in BACKENDS}


def available_backends() -> list[str]:
    """Names of the backends this install can run, fastest first."""
    return [name for name, state in backend_status().items() if state == "available"]


# Each backend's modules; an op comes from the first of them that defines it.
_MODULES = {
    "torch": ("zokern._reference", "zokern._ldsd_reference", "zokern._zopro_reference"),
    "triton": (
        "zokern.kernels.zo_pass",
        "zokern.kernels.copy_pass",
        "zokern.kernels.ldsd_pass",
        "zokern.kernels.zopro_pass",
    ),
    "cpu": ("zokern._native", "zokern._native_copy", "zokern._native_ldsd", "zokern._native_zopro"),
    "cuda": ("zokern._native", "zokern._native_copy"),
}


# The torch op behind a backend function of another name: the cuda backend offers a function only where the
# extension has a CUDA kernel for its op.
_TORCH_OP = {"philox_block_words": "philox_words_"}


def _module(name: str, op: str = "zo_pass_") -> ModuleType | None:
    """The module of backend ``name`` that implements ``op``, or None if the backend has no such op."""
    if name == "cuda":
        from zokern import _native

        if not _native.cuda_kernel_for(_TORCH_OP.get(op, op)):
            return None
    for module_name in _MODULES[name]:
        module = importlib.import_module(module_name)
        if hasattr(module, op):
            return module
    return None


def _runs_on(name: str, device: torch.device) -> bool:
    if name == "torch":
        return True
    if name == "triton":
        return device.type == "cuda" or (device.type == "cpu" and _triton_interpreted())
    return device.type == name


def requested_backend(backend: str | None) -> str | None:
    """The explicitly requested backend name (argument, else environment), validated; None for automatic."""
    name = backend if backend is not None else (os.environ.get(ENV_VAR) or None)
    if name is None:
        return None
    if name not in BACKENDS:
        source = "backend" if backend is not None else f"environment variable {ENV_VAR}"
        raise ValueError(f"unknown zokern backend {name!r} (from {source}); choose one of {', '.join(BACKENDS)}")
    return name


# Resolved choices: a backend's availability is fixed for the life of the process, so only what a caller can change
# (the argument, the two environment variables) is in the key. Per pass, a resolution cost more host time than
# launching the pass (exact mode makes one call per large parameter per forward).
_selected: dict[tuple, ModuleType] = {}


def select_backend(device: torch.device, backend: str | None = None, op: str = "zo_pass_") -> ModuleType:
    """The backend module for tensors on ``device``: the requested one, or the fastest available.

    ``op`` names the function the caller needs. The fused pass (``zo_pass_``) and the out-of-place pass exist in every
    backend; passes that only some backends implement (the LDSD and ZOPrO passes: triton, cpu and torch) come from the
    requested backend when it has them, else from the fastest available one that does.
    """
    key = (device.type, backend, os.environ.get(ENV_VAR), os.environ.get("TRITON_INTERPRET"), op)
    module = _selected.get(key)
    if module is None:
        module = _selected[key] = _resolve(device, backend, op)
    return module


def available_requested_backend(backend: str | None) -> str | None:
    """``requested_backend``, which must also be available in this install (RuntimeError saying why not)."""
    name = requested_backend(backend)
    if name is not None:
        status = backend_status()[name]
        if status != "available":
            raise RuntimeError(
                f"zokern backend {name!r} is unavailable: {status}. Available: {', '.join(available_backends())}"
            )
    return name


def _resolve(device: torch.device, backend: str | None, op: str) -> ModuleType:
    name = available_requested_backend(backend)
    status = backend_status()
    if name is not None:
        if not _runs_on(name, device):
            raise ValueError(f"zokern backend {name!r} cannot run on tensors on {device}")
        module = _module(name, op)
        if module is not None:
            return module
    for candidate in _PREFERENCE.get(device.type, ("torch",)):
        if status[candidate] == "available" and _runs_on(candidate, device):
            try:
                module = _module(candidate, op)
            except ImportError:  # an automatic choice falls back; an explicit one above must succeed
                continue
            if module is not None:
                return module
    return _module("torch", op)
