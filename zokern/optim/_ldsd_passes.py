"""Dispatch of the LDSD passes (zokern._ldsd_reference documents their math) to a backend that implements them,
one call per parameter dtype. Inputs come from the optimizer, which has validated them."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from zokern._dispatch import select_backend


def _select(device: torch.device, backend: str | None, op: str):
    """The module implementing ``op``, and its extra arguments: the plain-torch fallback draws its streams from the
    fused pass of the requested (or fastest) backend."""
    impl = select_backend(device, backend, op=op)
    extra = {"stream_backend": backend} if impl.__name__ == "zokern._ldsd_reference" else {}
    return impl, extra


def _by_dtype(params: Sequence[torch.Tensor], *columns: Sequence) -> list[tuple[list, ...]]:
    groups: dict[torch.dtype, tuple[list, ...]] = {}
    for k, p in enumerate(params):
        if not p.numel():
            continue
        entry = groups.setdefault(p.dtype, tuple([] for _ in range(len(columns) + 1)))
        entry[0].append(p)
        for column, values in zip(entry[1:], columns):
            column.append(values[k])
    return list(groups.values())


def move_(params, mus, bases, seeds, coef, *, distribution, backend, norm_coef=None) -> torch.Tensor | None:
    """theta += coef[0] mu + sum_s coef[1 + s] xi_s; with ``norm_coef``, also returns the squared norm of that row
    over all the tensors (as ``squared_norm``), computed in the same pass."""
    total = None if norm_coef is None else torch.zeros((), dtype=torch.float64, device=coef.device)
    for ps, ms, bs in _by_dtype(params, mus, bases):
        impl, extra = _select(ps[0].device, backend, "ldsd_move_")
        part = impl.ldsd_move_(
            ps, ms, bs, seeds=seeds, coef=coef, distribution=distribution, norm_coef=norm_coef, **extra
        )
        if norm_coef is not None:
            total = total + part.to(total.device)
    return total


def squared_norm(mus, bases, seeds, coef, *, distribution, backend) -> torch.Tensor:
    """||coef[0] mu + sum_s coef[1 + s] xi_s||^2 over all the tensors, a 0-d float64 tensor on coef's device."""
    live = [(m, b) for m, b in zip(mus, bases) if m.numel()]
    if not live:
        return torch.zeros((), dtype=torch.float64, device=coef.device)
    impl, extra = _select(live[0][0].device, backend, "ldsd_squared_norm")
    ms, bs = map(list, zip(*live))
    return impl.ldsd_squared_norm(ms, bs, seeds=seeds, coef=coef, distribution=distribution, **extra)


def final_(params, mus, states, bases, seeds, coef, *, backend, rounding_seed=None, **kwargs) -> None:
    """Restore, update theta by the rule and mu by its row, in one pass per dtype."""
    for ps, ms, ss, bs in _by_dtype(params, mus, states, bases):
        impl, extra = _select(ps[0].device, backend, "ldsd_final_")
        rounding = rounding_seed if ps[0].dtype != torch.float32 else None
        impl.ldsd_final_(ps, ms, ss, bs, seeds=seeds, coef=coef, rounding_seed=rounding, **kwargs, **extra)
