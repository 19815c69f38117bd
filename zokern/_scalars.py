"""A pass's scalars in device memory: what the kernels of a captured CUDA graph read, since a graph replays its kernel
arguments frozen. One row of 8 int64 slots per pass:

    0 seed   1 seed2   2 rounding_seed   3 alpha   4 alpha2   5 lr   6 weight_decay   7 unused (0)

The seeds as themselves; the coefficients as the bits of their float32 value (the value every backend computes with:
a kernel argument is rounded to float32 the same way), zero-extended.
"""

from __future__ import annotations

import math

import torch

SLOTS = 8
_FLOAT_SLOTS = ("alpha", "alpha2", "lr", "weight_decay")


def pack(
    *,
    seed: int,
    alpha: float,
    seed2: int | None = None,
    alpha2: float = 0.0,
    lr: float = 0.0,
    weight_decay: float = 0.0,
    rounding_seed: int | None = None,
) -> list[int]:
    """One row: the slots of a pass with these scalars; unused seeds are 0."""
    seeds = [_checked_seed(seed), _checked_seed(seed2 or 0), _checked_seed(rounding_seed or 0)]
    # + 0.0 after the rounding takes a value that rounds to -0 as +0, as the passes' arguments are (docs/stream.md,
    # section 5).
    floats = torch.tensor([alpha, alpha2, lr, weight_decay], dtype=torch.float64).to(torch.float32).add(0.0)
    _check_finite(dict(zip(_FLOAT_SLOTS, floats.tolist())))
    bits = floats.view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    return [*seeds, *bits.tolist(), 0]


def _checked_seed(value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**63:
        raise ValueError(f"a seed in a scalars row must be an integer in [0, 2^63), got {value!r}")
    return value


def _check_finite(floats: dict[str, float]) -> None:
    for name, value in floats.items():
        if not math.isfinite(value):
            raise ValueError(f"{name} in a scalars row must be finite in float32, got {value}")


def check_values(scalars: torch.Tensor) -> dict[str, float | int]:
    """The row's values (read on the host), each a valid seed or a finite float, or a ValueError naming it."""
    values = unpack(scalars)
    for name in ("seed", "seed2", "rounding_seed"):
        _checked_seed(values[name])
    _check_finite({name: values[name] for name in _FLOAT_SLOTS})
    return {**values, **{name: values[name] + 0.0 for name in _FLOAT_SLOTS}}  # -0 as +0, as pack writes it


def unpack(scalars: torch.Tensor) -> dict[str, float | int]:
    """The values a row holds (read on the host: for the backends that take scalars as arguments)."""
    row = scalars.tolist()
    floats = torch.tensor(row[3:7], dtype=torch.int64).to(torch.int32).view(torch.float32).tolist()
    return dict(seed=row[0], seed2=row[1], rounding_seed=row[2], **dict(zip(_FLOAT_SLOTS, floats)))


def check(scalars: object, device: torch.device) -> torch.Tensor:
    """``scalars`` validated as a row on ``device``."""
    if not isinstance(scalars, torch.Tensor):
        raise TypeError(f"scalars must be a tensor, got {type(scalars).__name__}")
    if scalars.dtype != torch.int64 or scalars.shape != (SLOTS,) or not scalars.is_contiguous():
        raise ValueError(
            f"scalars must be a contiguous int64 tensor of shape ({SLOTS},) (zokern._scalars.pack), got dtype "
            f"{scalars.dtype}, shape {tuple(scalars.shape)}"
        )
    if scalars.device != device:
        raise ValueError(f"scalars is on {scalars.device} but the tensors are on {device}")
    return scalars


def with_values(kwargs: dict, values: dict[str, float | int]) -> dict:
    """A backend's pass arguments with a row's values (check_values') in place of the scalars. What the row does not
    replace stays: whether a second seed or stochastic rounding is used is the call's, not the row's."""
    out = dict(kwargs, alpha=values["alpha"], seed=values["seed"])
    if kwargs.get("seed2") is not None:
        out.update(seed2=values["seed2"], alpha2=values["alpha2"])
    if kwargs.get("rounding_seed") is not None:
        out["rounding_seed"] = values["rounding_seed"]
    if kwargs.get("grad") is not None:
        out.update(lr=values["lr"], weight_decay=values["weight_decay"])
    return out
