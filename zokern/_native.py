"""The ``cpu`` and ``cuda`` backends: zokern's C++/CUDA extension, ``zokern._C``, behind the backend interface.

Importing ``zokern._C`` registers zokern's torch ops; this module wraps the two whose schemas csrc/cpu/zo_pass.cpp
defines (the others' are in copy_pass.cpp, ldsd_pass.cpp, zopro_pass.cpp and sketch.cpp, wrapped by _native_copy,
_native_ldsd, _native_zopro and preference/sketch.py):

- ``zokern::zo_pass_(Tensor(a!)[] tensors, int[] bases, int seed, float alpha, int domain, float lr,
  float grad_value, Tensor? grad_tensor, bool update, float weight_decay, int seed2, float alpha2, bool second,
  int rounding_seed, bool stochastic, Tensor? scalars=None) -> ()``: the fused pass of docs/stream.md, section 5,
  with CPU kernels, and CUDA kernels when the extension was built with them (only they read ``scalars``, a row of
  zokern._scalars);
- ``zokern::philox_words_(Tensor(a!) out, int seed, int domain, int first_block) -> ()``: fills an int64 ``[n, 4]``
  tensor with the words of Philox blocks ``first_block .. first_block + n - 1``. It writes into a tensor rather
  than returning one so that the dispatcher picks the CPU or CUDA kernel from ``out``'s device.

The wrappers below have the signatures of ``zokern._reference`` and assume inputs validated by ``zokern.ops``
(one device, one dtype, contiguous, indices in range). The C++ side re-checks them cheaply.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from zokern._reference import DISTRIBUTIONS

LOAD_ERROR: str | None
try:
    import zokern._C  # noqa: F401 - registers torch.ops.zokern
except ImportError as e:  # not built (ZOKERN_SKIP_BUILD, no compiler) or built against another torch
    LOAD_ERROR = f"{type(e).__name__}: {e}"
else:
    LOAD_ERROR = None


def cpu_available() -> bool:
    """Whether the extension is loaded (its CPU kernels always are)."""
    return LOAD_ERROR is None


def cuda_available() -> bool:
    """Whether the extension has CUDA kernels and torch sees a CUDA device."""
    return cuda_kernel_for("zo_pass_") and torch.cuda.is_available()


def cuda_kernel_for(op: str) -> bool:
    """Whether the loaded extension has a CUDA kernel for ``zokern::<op>`` (one built before an op gained its CUDA
    kernel has not: its callers then fall back to another backend)."""
    if LOAD_ERROR is not None:
        return False
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(f"zokern::{op}", "CUDA")
    except RuntimeError:  # no such op at all (ldsd_move_ and ldsd_final_, Python names over ldsd_pass_): none either
        return False


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
    """The fused pass (docs/stream.md, section 5) in one op call; same arguments as ``zokern._reference.zo_pass_``,
    and on CUDA ``scalars``, a row of zokern._scalars the kernel reads its seeds and coefficients from."""
    if not tensors:
        return
    grad_value, grad_tensor = 0.0, None
    if isinstance(grad, torch.Tensor):
        grad_tensor = grad.detach().to(device=tensors[0].device, dtype=torch.float32)
    elif grad is not None:
        grad_value = float(grad)
    torch.ops.zokern.zo_pass_(
        list(tensors),
        list(bases),
        seed,
        alpha,
        DISTRIBUTIONS[distribution],
        lr,
        grad_value,
        grad_tensor,
        grad is not None,
        weight_decay,
        0 if seed2 is None else seed2,
        alpha2,
        seed2 is not None,
        0 if rounding_seed is None else rounding_seed,
        rounding_seed is not None,
        scalars,
    )


def reads_device_scalars(device: torch.device) -> bool:
    """Only the CUDA kernels read a pass's scalars from device memory; the CPU op takes them as arguments."""
    return device.type == "cuda"


def philox_block_words(
    seed: int, domain: int, first_block: int, n_blocks: int, device: torch.device | str | None = None
) -> torch.Tensor:
    """Words of Philox(seed, counter=(n mod 2^32, n div 2^32, domain, 0)) for n in [first_block, +n_blocks).

    Returns an int64 tensor of shape (n_blocks, 4) holding uint32 values, on ``device`` (CPU by default).
    """
    out = torch.empty((n_blocks, 4), dtype=torch.int64, device=device)
    torch.ops.zokern.philox_words_(out, seed, domain, first_block)
    return out


if LOAD_ERROR is None:
    # Shape-only implementations, for FakeTensor tracing (torch.compile, opcheck): both ops only mutate their inputs.

    @torch.library.register_fake("zokern::zo_pass_")
    def _zo_pass_fake(*args) -> None:
        return None

    @torch.library.register_fake("zokern::philox_words_")
    def _philox_words_fake(*args) -> None:
        return None
