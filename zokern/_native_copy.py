"""The ``cpu`` and ``cuda`` backends of the out-of-place perturbation pass (math: zokern._reference): the op
``zokern::zo_copy_pass_``, whose CPU kernel is csrc/cpu/copy_pass.cpp and whose CUDA kernel is the in-place pass of
csrc/cuda/zo_pass.cu reading each source and writing its output (csrc/cuda/bindings.cpp)."""

from __future__ import annotations

from zokern._reference import DISTRIBUTIONS


def zo_copy_pass_(out, sources, bases, *, seed, alpha, distribution, seed2=None, alpha2=0.0) -> None:
    """``out[k] = sources[k] + alpha z(seed) [+ alpha2 z(seed2)]`` in one op call."""
    import torch

    if out:
        torch.ops.zokern.zo_copy_pass_(
            list(out), list(sources), list(bases), seed, alpha, DISTRIBUTIONS[distribution],
            0 if seed2 is None else seed2, alpha2, seed2 is not None,
        )  # fmt: skip
