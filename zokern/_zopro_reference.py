r"""ZOPrO's direction passes in plain torch: the oracle of the C++ kernels and the fallback where they cannot run.

Per tensor p, with n_p the Gaussian stream of ``seed`` at p's offsets, mu_p and vhat_p optional companion tensors
(None: absent) and coefficients (A_p, B_p, C_p) = ``coef[p]``:

- ``zopro_reduce``: per tensor, (vhat_p . n_p, n_p . n_p) in float64 (vhat_p . n_p = 0 without vhat_p): the
  reductions the direction's per-tensor scale needs, in one pass over the stream;
- ``zopro_apply_``: :math:`x_p \leftarrow x_p + A_p\mu_p + B_p\hat v_p + C_p n_p`, which is
  :math:`x_p + \alpha z_p` for ZOPrO's :math:`z_p = c_\mu\mu_p + c_n(n_p - a_p\hat v_p)` with
  (A, B, C) = :math:`\alpha`(c_mu, -c_n a_p, c_n).

Arithmetic float32 for the apply, float64 for the reductions; tensors are processed in chunks, so temporaries stay
at a few tens of MiB. The streams come from the oracle (``stream_backend="torch"``) or, as a fallback backend, from
the fused pass of the fastest backend.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from zokern._ldsd_reference import _chunks
from zokern._ldsd_reference import _streams


@torch.no_grad()
def zopro_reduce(
    tensors: Sequence[torch.Tensor],
    vhats: Sequence[torch.Tensor | None],
    bases: Sequence[int],
    *,
    seed: int,
    stream_backend: str | None = "torch",
) -> torch.Tensor:
    out = torch.zeros(len(tensors), 2, dtype=torch.float64, device=tensors[0].device if tensors else "cpu")
    for k, lo, n, start in _chunks(tensors, bases):
        noise = _streams([seed], start, n, "gaussian", tensors[k].device, stream_backend)[0].double()
        out[k, 1] += noise.square().sum()
        if vhats[k] is not None:
            out[k, 0] += (vhats[k].reshape(-1)[lo : lo + n].double() * noise).sum()
    return out


@torch.no_grad()
def zopro_apply_(
    tensors: Sequence[torch.Tensor],
    mus: Sequence[torch.Tensor | None],
    vhats: Sequence[torch.Tensor | None],
    bases: Sequence[int],
    *,
    seed: int,
    coef: torch.Tensor,
    stream_backend: str | None = "torch",
) -> None:
    coef = coef.to(torch.float32)
    for k, lo, n, start in _chunks(tensors, bases):
        part = tensors[k].view(-1)[lo : lo + n]
        noise = _streams([seed], start, n, "gaussian", part.device, stream_backend)[0]
        x = part.float() + coef[k, 2] * noise
        if mus[k] is not None:
            x = x + coef[k, 0] * mus[k].reshape(-1)[lo : lo + n].float()
        if vhats[k] is not None:
            x = x + coef[k, 1] * vhats[k].reshape(-1)[lo : lo + n].float()
        part.copy_(x)
