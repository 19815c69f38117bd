"""The ``cpu`` backend of the LDSD passes: the C++ kernels of csrc/cpu/ldsd_pass.cpp (zokern._ldsd_reference gives
their math and coefficient layout). CPU only: on a GPU the Triton kernels run them."""

from __future__ import annotations

import torch

from zokern import _native
from zokern._reference import DISTRIBUTIONS

_RULES = {"sgd": 0, "momentum": 1, "adam": 2}

if _native.LOAD_ERROR is None:

    @torch.library.register_fake("zokern::ldsd_pass_")
    def _ldsd_pass_fake(*args) -> float:
        return 0.0


def ldsd_move_(params, mus, bases, *, seeds, coef, distribution, norm_coef=None) -> torch.Tensor | None:
    """x += coef[0] mu + sum_s coef[1 + s] xi_s, and optionally the squared norm of the ``norm_coef`` row
    (zokern._ldsd_reference.ldsd_move_)."""
    both = coef if norm_coef is None else torch.cat((coef.float().cpu(), norm_coef.float().cpu()))
    total = 0.0
    if params:
        total = torch.ops.zokern.ldsd_pass_(
            list(params), list(mus), [], [], list(bases), list(seeds), both.float().cpu().contiguous(),
            0 if norm_coef is None else 3, 0, DISTRIBUTIONS[distribution], 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0, False,
        )  # fmt: skip
    return None if norm_coef is None else torch.tensor(total, dtype=torch.float64)


def ldsd_squared_norm(mus, bases, *, seeds, coef, distribution) -> torch.Tensor:
    """sum of (coef[0] mu + sum_s coef[1 + s] xi_s)^2, a 0-d float64 tensor."""
    value = torch.ops.zokern.ldsd_squared_norm(
        list(mus), list(bases), list(seeds), coef.float().cpu().contiguous(), DISTRIBUTIONS[distribution]
    )
    return torch.tensor(value, dtype=torch.float64)


def ldsd_final_(
    params,
    mus,
    states,
    bases,
    *,
    seeds,
    coef,
    rule,
    lr,
    weight_decay,
    momentum=0.0,
    beta1=0.9,
    beta2=0.999,
    adam_eps=1e-8,
    distribution,
    rounding_seed=None,
) -> None:
    """Restore, update theta by the rule and mu by its row (zokern._ldsd_reference.ldsd_final_)."""
    if not params:
        return
    state1 = [s[0] for s in states] if rule != "sgd" else []
    state2 = [s[1] for s in states] if rule == "adam" else []
    torch.ops.zokern.ldsd_pass_(
        list(params), list(mus), state1, state2, list(bases), list(seeds), coef.float().cpu().contiguous(), 2,
        _RULES[rule], DISTRIBUTIONS[distribution], lr, weight_decay, momentum, beta1, beta2, adam_eps,
        0 if rounding_seed is None else rounding_seed, rounding_seed is not None,
    )  # fmt: skip
