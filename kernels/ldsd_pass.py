"""The ``triton`` backend of the LDSD passes (the math and the coefficient layout: zokern._ldsd_reference).

One launch per (device, dtype) group, tiled like the fused pass (kernels/zo_pass.py): a tile's row in the cached
table holds the addresses of the parameter, its mean mu and up to two optimizer states, so one program reads each of
them once and regenerates the S streams in registers. Coefficients are read from a float32 tensor on the device: the
argmin of the candidates' losses and the projected gradient never reach the host. The squared norm is reduced per
tile into a buffer that torch then sums, so the result does not depend on the order in which tiles finish.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from zokern._ldsd_reference import final_layout
from zokern._ldsd_reference import float32_value
from zokern._reference import DISTRIBUTIONS
from zokern._reference import DOMAIN_RADEMACHER
from zokern._transfer import to_device
from zokern.kernels import options
from zokern.kernels.philox import gaussian_tile
from zokern.kernels.philox import rademacher_tile
from zokern.kernels.zo_pass import _TL_DTYPES
from zokern.kernels.zo_pass import _add
from zokern.kernels.zo_pass import _rounded
from zokern.kernels.zo_pass import _widen
from zokern.kernels.zo_pass import _work_table

# Fewer elements per program than the fused pass: a program keeps three running sums and up to four loaded tensors.
GPU_BLOCK = 1024
INTERPRETER_BLOCK = 8192
_MODES = {"move": 0, "norm": 1, "final": 2, "move_norm": 3}
_RULES = {"sgd": 0, "momentum": 1, "adam": 2}


@triton.jit
def _xi(seeds_ptr, s: tl.constexpr, g0, RADEMACHER: tl.constexpr, BLOCK: tl.constexpr):
    seed = tl.load(seeds_ptr + s)
    if RADEMACHER:
        return rademacher_tile(seed, g0, BLOCK)
    else:
        return gaussian_tile(seed, g0, BLOCK)


@triton.jit
def _pointer(row, column: tl.constexpr, DTYPE: tl.constexpr, ALIGNED: tl.constexpr):
    ptr = tl.load(row + column).to(tl.pointer_type(DTYPE))
    if ALIGNED:
        ptr = tl.multiple_of(ptr, 16)  # on the pointer: the hint does not survive the int cast
    return ptr


@triton.jit
def _load(ptrs, mask, interior):
    # Interior tiles skip the mask, whose unknown bound would otherwise stop the loads from being vectorised. One
    # return after the runtime branch: Triton 3.2 aborts on a return in each ("Argument rematerialization").
    if interior:
        value = tl.load(ptrs)
    else:
        value = tl.load(ptrs, mask=mask, other=0.0)
    return value


@triton.jit
def _store(ptrs, value, mask, interior):
    if interior:
        tl.store(ptrs, value)
    else:
        tl.store(ptrs, value, mask=mask)


@triton.jit(do_not_specialize=["rounding_seed"])
def _ldsd_kernel(
    table_ptr,
    seeds_ptr,
    coef_ptr,
    partial_ptr,
    lr,
    weight_decay,
    momentum,
    beta1,
    beta2,
    one_minus_beta1,
    one_minus_beta2,
    adam_eps,
    rounding_seed,
    DTYPE: tl.constexpr,
    RADEMACHER: tl.constexpr,
    N_SEEDS: tl.constexpr,
    MODE: tl.constexpr,
    RULE: tl.constexpr,
    STOCHASTIC: tl.constexpr,
    ALIGNED: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    row = table_ptr + pid * 7
    base = tl.load(row + 4)
    numel = tl.load(row + 5)
    g0 = tl.load(row + 6)
    start = g0 - base  # negative at a misaligned tensor start
    if ALIGNED:  # every base a multiple of 8 and every address of 16 bytes: 16-byte vector loads and stores
        start = tl.multiple_of(start, 8)
    local = start + tl.arange(0, BLOCK)
    mask = (local >= 0) & (local < numel)
    interior = (start >= 0) & (start + BLOCK <= numel)
    mu_ptrs = _pointer(row, 1, tl.float32, ALIGNED) + local
    mu = _load(mu_ptrs, mask, interior)
    R: tl.constexpr = N_SEEDS + 1

    if MODE == 1:  # squared norm of M(mu, xi); the row is the whole coefficient vector
        acc = tl.load(coef_ptr) * mu
        for s in tl.static_range(N_SEEDS):
            acc += tl.load(coef_ptr + 1 + s) * _xi(seeds_ptr, s, g0, RADEMACHER, BLOCK)
        acc64 = acc.to(tl.float64)  # float64 per tile, as the other backends sum
        tl.store(partial_ptr + pid, tl.sum(tl.where(mask, acc64 * acc64, 0.0), axis=0))
    else:
        x_ptrs = _pointer(row, 0, DTYPE, ALIGNED) + local
        x = _widen(_load(x_ptrs, mask, interior), DTYPE)
        acc_p = tl.load(coef_ptr) * mu
        if MODE == 2:
            acc_d = tl.load(coef_ptr + R) * mu
            acc_m = tl.load(coef_ptr + 2 * R) * mu
        if MODE == 3:  # the move, and the squared norm of a second row (coefficients after the first)
            acc_m = tl.load(coef_ptr + R) * mu
        for s in tl.static_range(N_SEEDS):
            xi = _xi(seeds_ptr, s, g0, RADEMACHER, BLOCK)
            acc_p += tl.load(coef_ptr + 1 + s) * xi
            if MODE == 2:
                acc_d += tl.load(coef_ptr + R + 1 + s) * xi
                acc_m += tl.load(coef_ptr + 2 * R + 1 + s) * xi
            if MODE == 3:
                acc_m += tl.load(coef_ptr + R + 1 + s) * xi
        if MODE == 3:
            acc64 = acc_m.to(tl.float64)
            tl.store(partial_ptr + pid, tl.sum(tl.where(mask, acc64 * acc64, 0.0), axis=0))
        if MODE == 2:
            x, e = _add(x, tl.zeros_like(x), acc_p)  # theta0; e: its exact residual, read by stochastic rounding
            ok = tl.load(coef_ptr + 3 * R) != 0.0
            if RULE == 0:
                step = acc_d
            elif RULE == 1:
                buf_ptrs = _pointer(row, 2, tl.float32, ALIGNED) + local
                buf = _load(buf_ptrs, mask, interior)
                step = momentum * buf + acc_d
                _store(buf_ptrs, tl.where(ok, step, buf), mask, interior)
            else:
                m_ptrs = _pointer(row, 2, tl.float32, ALIGNED) + local
                v_ptrs = _pointer(row, 3, tl.float32, ALIGNED) + local
                m = _load(m_ptrs, mask, interior)
                v = _load(v_ptrs, mask, interior)
                m_new = beta1 * m + one_minus_beta1 * acc_d
                v_new = beta2 * v + one_minus_beta2 * acc_d * acc_d
                c1 = tl.load(coef_ptr + 3 * R + 1)
                c2 = tl.load(coef_ptr + 3 * R + 2)
                # Correctly rounded, as the other backends compute it (compiled, "/" and tl.sqrt are approximate).
                step = tl.math.div_rn(tl.math.div_rn(m_new, c1), tl.math.sqrt_rn(tl.math.div_rn(v_new, c2)) + adam_eps)
                _store(m_ptrs, tl.where(ok, m_new, m), mask, interior)
                _store(v_ptrs, tl.where(ok, v_new, v), mask, interior)
            _store(mu_ptrs, tl.where(ok, acc_m, mu), mask, interior)
            # As the fused pass: lr = 0 and weight_decay = 0 leave their terms out (an infinite theta0 stays so).
            if lr != 0.0:
                if weight_decay != 0.0:
                    step = step + weight_decay * x
                updated, e_updated = _add(x, e, -(lr * step))
                x = tl.where(ok, updated, x)
                e = tl.where(ok, e_updated, e)
        else:  # a move is a plain sum (zokern._ldsd_reference.ldsd_move_), rounded to nearest
            x = x + acc_p
            e = tl.zeros_like(x)
        _store(x_ptrs, _rounded(x, e, rounding_seed, g0, DTYPE, STOCHASTIC, BLOCK), mask, interior)


def _launch(
    mode: str,
    params: Sequence[torch.Tensor],
    mus: Sequence[torch.Tensor],
    states: Sequence[Sequence[torch.Tensor]],
    bases: Sequence[int],
    seeds: Sequence[int],
    coef: torch.Tensor,
    distribution: str,
    rule: str = "sgd",
    scalars: tuple[float, ...] = (0.0,) * 8,
    rounding_seed: int | None = None,
) -> torch.Tensor | None:
    device, dtype = params[0].device, params[0].dtype
    block = GPU_BLOCK if device.type == "cuda" else INTERPRETER_BLOCK
    companions = [list(mus)]
    for j in range(2):
        companions.append([s[j] if len(s) > j else m for s, m in zip(states, mus)] if states else list(mus))
    table = _work_table(params, bases, block, *companions)
    addresses = [t.data_ptr() for t in params] + [t.data_ptr() for column in companions for t in column]
    aligned = all(b % 8 == 0 for b in bases) and all(a % 16 == 0 for a in addresses)
    seed_tensor = to_device(list(seeds), device, torch.int64)
    reduces = mode in ("norm", "move_norm")
    partial = torch.empty(table.shape[0] if reduces else 1, dtype=torch.float64, device=device)
    with options.on_device(device):
        _ldsd_kernel[(table.shape[0],)](
            table,
            seed_tensor,
            coef.to(device=device, dtype=torch.float32),
            partial,
            *scalars,
            0 if rounding_seed is None else rounding_seed,
            DTYPE=_TL_DTYPES[dtype],
            RADEMACHER=DISTRIBUTIONS[distribution] == DOMAIN_RADEMACHER,
            N_SEEDS=len(seeds),
            MODE=_MODES[mode],
            RULE=_RULES[rule],
            STOCHASTIC=rounding_seed is not None and dtype != torch.float32,
            ALIGNED=aligned,
            BLOCK=block,
            **options.LAUNCH,
        )
    return partial.sum() if reduces else None


def ldsd_move_(params, mus, bases, *, seeds, coef, distribution, norm_coef=None) -> torch.Tensor | None:
    """x += coef[0] mu + sum_s coef[1 + s] xi_s, and optionally the squared norm of the ``norm_coef`` row;
    arguments as zokern._ldsd_reference.ldsd_move_."""
    if not params:
        return None if norm_coef is None else torch.zeros((), dtype=torch.float64, device=coef.device)
    if norm_coef is None:
        return _launch("move", params, mus, [], bases, seeds, coef, distribution)
    both = torch.cat((coef.to(torch.float32), norm_coef.to(device=coef.device, dtype=torch.float32)))
    return _launch("move_norm", params, mus, [], bases, seeds, both, distribution)


def ldsd_squared_norm(mus, bases, *, seeds, coef, distribution) -> torch.Tensor:
    """sum of (coef[0] mu + sum_s coef[1 + s] xi_s)^2 as a 0-d float64 tensor."""
    if not mus:
        return torch.zeros((), dtype=torch.float64, device=coef.device)
    return _launch("norm", mus, mus, [], bases, seeds, coef, distribution)


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
    """The final pass: restore, update theta by the rule, update mu (zokern._ldsd_reference.ldsd_final_)."""
    if not params:
        return
    assert coef.numel() == final_layout(len(seeds))["size"]
    # 1 - beta from beta's float64 value, rounded once to float32, as on the other backends; the interpreter
    # computes in float64, so the values it takes are float32's already.
    one_minus = float32_value(1.0 - beta1), float32_value(1.0 - beta2)
    beta1, beta2 = float32_value(beta1), float32_value(beta2)
    scalars = (lr, weight_decay, momentum, beta1, beta2, *one_minus, adam_eps)
    _launch("final", params, mus, states, bases, seeds, coef, distribution, rule, scalars, rounding_seed)
