r"""ZOPrO's perturbation direction, regenerated from a seed like every zokern z.

Per trainable tensor p (d_p elements), with mu_p the policy's previous update, vhat_p the unit direction of the reward
model's latest update mapped onto p (or none), n_p the Gaussian stream at p's offsets, and P_p = I - vhat_p vhat_p^T:

.. math::
    z_p = \sqrt{d_p}\,\Big(\gamma\,\frac{\mu_p}{\lVert\mu_p\rVert}
          + \sqrt{1-\gamma^2}\,\frac{P_p n_p}{\lVert P_p n_p\rVert}\Big)

Decisions (the published code leaves them open, see the research notes):
- **Scale**: each part is scaled to norm sqrt(d_p), the norm of a Gaussian z of that size, so eps and lr keep MeZO's
  meaning whatever the size of the previous update (the published code matched ||z_p|| to ||mu_p||, which ties the
  step size to ||mu_p||^2).
- **No previous update** (mu_p absent or zero: the first iteration of a ZO-only run): z_p is the projected noise
  alone, sqrt(d_p) P_p n_p / ||P_p n_p||. With no vhat_p either, that is MeZO's direction up to its norm.
- **Projection**: per tensor, one direction (the reward model's update restricted to p), as published.

Per element, z_i = c_mu mu_i + c_n (n_i - a_p vhat_i) with a_p = vhat_p . n_p and ||P_p n_p||^2 = ||n_p||^2 - a_p^2:
the two per-tensor reductions (a_p, ||n_p||^2) come from one fused pass over the stream and vhat, and applying the
direction is one fused pass that combines the stream with mu and vhat element by element (per-tensor coefficients):
z is never stored, not even per tensor. Kernels: C++ on the CPU (csrc/cpu/zopro_pass.cpp), Triton on a GPU
(kernels/zopro_pass.py), else the plain-torch passes of zokern._zopro_reference (chunked, the stream from the
device's fused-pass backend). ``reference`` is the
float64 formula the tests hold them to. The direction is applied to float32 parameters.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from zokern import ops
from zokern._dispatch import select_backend
from zokern._transfer import to_device


class ZOPrODirection:
    """The fixed inputs of ZOPrO's direction for one policy iteration: mu, vhat and gamma (see the module doc).

    Args:
        mu: per trainable tensor, the policy's previous update (or None), as float32: a float32 contiguous tensor is
            kept as it is, not copied (its norm is taken here: leave it unchanged while the direction is in use).
        vhat: per trainable tensor, the reward model's update direction mapped onto it (or None); normalised here.
        gamma: weight of the previous update, in [0, 1].
    """

    def __init__(self, mu: Sequence[torch.Tensor | None], vhat: Sequence[torch.Tensor | None], gamma: float) -> None:
        if len(mu) != len(vhat):
            raise ValueError(f"mu has {len(mu)} tensors but vhat has {len(vhat)}")
        if not (isinstance(gamma, (int, float)) and 0.0 <= gamma <= 1.0):
            raise ValueError(f"gamma must be in [0, 1], got {gamma!r}")
        self.gamma = float(gamma)
        self._cached_key: tuple | None = None
        self._cached: list[tuple[float, float]] = []
        self.mu: list[torch.Tensor | None] = []
        self.mu_norm: list[float] = []
        self.vhat: list[torch.Tensor | None] = []
        for k, (m, v) in enumerate(zip(mu, vhat)):
            self.mu.append(None if m is None else _finite_float32(f"mu[{k}]", m))
            self.mu_norm.append(0.0 if m is None else float(self.mu[-1].double().norm()))
            if v is None:
                self.vhat.append(None)
                continue
            v = _finite_float32(f"vhat[{k}]", v)
            norm = float(v.double().norm())
            self.vhat.append(None if norm == 0.0 else (v.double() / norm).float())

    def _check(
        self, tensors: Sequence[torch.Tensor], offsets: Sequence[int] | None = None, written: bool = False
    ) -> list[int] | None:
        """The tensors checked against mu and vhat, and (``written``) as the in-place passes check theirs; returns
        the offsets (if given) validated as stream indices."""
        if len(tensors) != len(self.mu):
            raise ValueError(f"the direction was built for {len(self.mu)} tensors, got {len(tensors)}")
        for k, (t, m, v) in enumerate(zip(tensors, self.mu, self.vhat)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"tensor {k} is a {type(t).__name__}, expected a torch.Tensor")
            for name, ref in (("mu", m), ("vhat", v)):
                if ref is not None and ref.shape != t.shape:
                    raise ValueError(f"{name}[{k}] has shape {tuple(ref.shape)} but tensor {k} has {tuple(t.shape)}")
                if ref is not None and ref.device != t.device:
                    raise ValueError(f"{name}[{k}] is on {ref.device} but tensor {k} is on {t.device}")
            if written and t.dtype != torch.float32:
                raise TypeError(f"tensor {k} is {t.dtype}: the ZOPrO direction is applied to float32 parameters")
        if written:  # layout, memory overlap, inference tensors: per device, as ops' in-place passes refuse them
            for indices in _by_device(tensors).values():
                ops._check_tensors([tensors[i] for i in indices])
        return None if offsets is None else ops._bases(list(tensors), 0, offsets)

    def reductions(
        self, seed: int, tensors: Sequence[torch.Tensor], offsets: Sequence[int], backend: str | None = None
    ) -> list[tuple[float, float]]:
        """Per tensor, (a_p, ||n_p||^2) = (vhat_p . n_p, n_p . n_p) for the Gaussian stream of ``seed``: one fused
        reduction pass over the stream and vhat (float64 sums), never a whole tensor of the stream at once."""
        offsets = self._check(tensors, offsets)
        seed = ops._check_index("seed", seed)  # the reference masks it to 64 bits: out of range, it would wrap
        out: list[tuple[float, float]] = [(0.0, 0.0)] * len(tensors)
        for device, indices in _by_device(tensors).items():
            impl = _impl(device, backend, "zopro_reduce")
            sums = impl.zopro_reduce(
                [tensors[i] for i in indices], [self.vhat[i] for i in indices], [offsets[i] for i in indices],
                seed=seed, **_extra(impl, backend),
            )  # fmt: skip
            for i, (a, nn) in zip(indices, sums.tolist()):
                out[i] = (a, nn)
        return out

    def coefficients(self, tensor_index: int, numel: int, a: float, nn: float) -> tuple[float, float]:
        """(c_mu, c_n) of z_i = c_mu mu_i + c_n (n_i - a vhat_i) for one tensor."""
        scale = math.sqrt(numel)
        has_mu = self.mu_norm[tensor_index] > 0.0
        gamma = self.gamma if has_mu else 0.0
        c_mu = scale * gamma / self.mu_norm[tensor_index] if has_mu else 0.0
        projected = math.sqrt(max(nn - a * a, 0.0))
        c_n = scale * math.sqrt(1.0 - gamma * gamma) / projected if projected > 0.0 else 0.0
        return c_mu, c_n

    def reference(
        self, seed: int, tensors: Sequence[torch.Tensor], offsets: Sequence[int], backend: str | None = "torch"
    ) -> list[torch.Tensor]:
        """z_p for every tensor, materialised in float64 from the formula (for tests)."""
        offsets = self._check(tensors, offsets)
        out = []
        for k, (t, offset) in enumerate(zip(tensors, offsets)):
            n = ops.gaussian(seed, offset, t.numel(), device=t.device, backend=backend).double().view_as(t)
            part = n if self.vhat[k] is None else n - (self.vhat[k].double() * n).sum() * self.vhat[k].double()
            z = math.sqrt(1.0 - (self.gamma if self.mu_norm[k] > 0 else 0.0) ** 2) * part / part.norm()
            if self.mu_norm[k] > 0:
                z = z + self.gamma * self.mu[k].double() / self.mu_norm[k]
            out.append(math.sqrt(t.numel()) * z)
        return out

    @torch.no_grad()
    def apply_(
        self,
        tensors: Sequence[torch.Tensor],
        offsets: Sequence[int],
        seed: int,
        alpha: float,
        backend: str | None = None,
    ) -> None:
        """In place, t_p += alpha z_p on float32 tensors, in one fused pass per device: the stream, mu and vhat are
        combined element by element with per-tensor coefficients (alpha c_mu, -alpha c_n a_p, alpha c_n); z is never
        materialised. The reductions of a seed are remembered, since a ZO step moves along the same z several
        times."""
        offsets = self._check(tensors, offsets, written=True)
        seed, alpha = ops._check_index("seed", seed), ops._check_real("alpha", alpha)
        # The sums depend on the sizes too where no mu or vhat pins a tensor's shape.
        key = (seed, tuple(offsets), tuple(t.numel() for t in tensors), backend)
        if self._cached_key != key:
            self._cached_key, self._cached = key, self.reductions(seed, tensors, offsets, backend)
        rows = []
        for k, ((a, nn), t) in enumerate(zip(self._cached, tensors)):
            c_mu, c_n = self.coefficients(k, t.numel(), a, nn)
            rows.append((alpha * c_mu, -alpha * c_n * a if self.vhat[k] is not None else 0.0, alpha * c_n))
        for device, indices in _by_device(tensors).items():
            impl = _impl(device, backend, "zopro_apply_")
            coef = to_device([rows[i] for i in indices], device, torch.float32)
            impl.zopro_apply_(
                [tensors[i] for i in indices],
                [self.mu[i] if self.mu_norm[i] > 0.0 else None for i in indices],
                [self.vhat[i] for i in indices],
                [offsets[i] for i in indices],
                seed=seed,
                coef=coef,
                **_extra(impl, backend),
            )
        # The C++ and Triton kernels write through pointers, unseen by autograd (as ops._run_pass).
        torch.autograd.graph.increment_version(list(tensors))


def _by_device(tensors: Sequence[torch.Tensor]) -> dict[torch.device, list[int]]:
    groups: dict[torch.device, list[int]] = {}
    for i, t in enumerate(tensors):
        groups.setdefault(t.device, []).append(i)
    return groups


def _impl(device: torch.device, backend: str | None, op: str):
    return select_backend(device, backend, op=op)


def _extra(impl, backend: str | None) -> dict:
    """The plain-torch fallback draws its stream from the fused pass of the requested (or fastest) backend."""
    return {"stream_backend": backend} if impl.__name__ == "zokern._zopro_reference" else {}


def _finite_float32(name: str, t: torch.Tensor) -> torch.Tensor:
    if not isinstance(t, torch.Tensor) or not t.is_floating_point():
        raise TypeError(f"{name} must be a floating tensor, got {type(t).__name__}")
    if not torch.isfinite(t).all():
        raise ValueError(f"{name} has non-finite values")
    return t.detach().float().contiguous()
