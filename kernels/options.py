"""What every zokern Triton kernel launch passes: its compile options (also those of the PTX checks in
tests/triton_ptx.py), and the device it runs on.

``enable_fp_fusion=False``: docs/stream.md specifies each pass as separately rounded float32 operations, which is how
the C++ and CUDA kernels compute it (zokern/stream.h's mul_rn and add_rn). Left on, Triton lets the compiler contract
``x + a * z`` into one fused multiply-add: one float32 result in about 16 then differs by an ulp from the other
backends', and a few 16-bit results per million land on the other side of a rounding boundary. Where a fused
multiply-add is wanted (the sine and cosine polynomials of the Gaussian transform), the kernels write ``tl.fma``.
Every launch passes it (Triton 3.9 warns about any launch that leaves fusion to its default, which 3.10 changes).
"""

import contextlib

import torch

LAUNCH = {"enable_fp_fusion": False}


def on_device(device: torch.device) -> contextlib.AbstractContextManager:
    """The launch's device: Triton launches on the current CUDA device, which need not be the tensors' (a model on
    cuda:1 while cuda:0 is current would be given addresses on another GPU)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
