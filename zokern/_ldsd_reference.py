r"""The LDSD passes in plain torch: the oracle of the Triton kernels and the backend wherever those cannot run.

An LDSD pass combines a per-parameter mean :math:`\mu` (float32) with S streams of docs/stream.md, every coefficient
read from a float32 tensor on the parameters' device, so that loss-dependent scalars (the argmin of the candidates'
losses, the projected gradient) never travel to the host. With :math:`\xi_s` the stream of ``seeds[s]``:

- ``ldsd_move_``: :math:`x \leftarrow x + a_0\mu + \sum_s a_{1+s}\xi_s` (coefficients ``coef`` = a, 1 + S values),
  optionally also returning the squared norm below for a second row over the same streams;
- ``ldsd_squared_norm``: :math:`\sum_i (a_0\mu_i + \sum_s a_{1+s}\xi_{s,i})^2`, a 0-d float64 tensor;
- ``ldsd_final_``: with ``coef`` = [P (1 + S), D (1 + S), M (1 + S), ok, c1, c2] and each row R read as
  :math:`R(\mu, \xi) = R_0\mu + \sum_s R_{1+s}\xi_s`:
  :math:`\theta_0 = x + P(\mu, \xi)`, the direction :math:`d = D(\mu, \xi)`, then the rule
  (``sgd``: :math:`u = d`; ``momentum``: :math:`b \leftarrow \beta b + d,\ u = b`; ``adam``:
  :math:`m \leftarrow \beta_1 m + (1-\beta_1) d,\ v \leftarrow \beta_2 v + (1-\beta_2) d^2,\ u = (m/c_1)/(\sqrt{v/c_2}
  + \delta)`), :math:`x \leftarrow \theta_0 - \eta(u + \lambda\theta_0)` and :math:`\mu \leftarrow M(\mu, \xi)`.
  Where ``ok`` is 0 (a non-finite loss), only :math:`x \leftarrow \theta_0`: mu and the rule's states keep their
  values. The two additions to x are docs/stream.md's add() (section 5: a zero term leaves x; each sum's exact error
  kept for stochastic rounding), the update is left out when :math:`\eta = 0` and :math:`\lambda\theta_0` when
  :math:`\lambda = 0`, and the result is rounded as that section's pass rounds.

Arithmetic is float32. The streams come from the plain-torch oracle (``stream_backend="torch"``, the default) or,
when this module is an optimizer's fallback backend, from the fused pass of the fastest backend. Tensors are
processed in chunks so that temporaries stay at a few tens of MiB whatever the model size.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from zokern import ops
from zokern._reference import _CHUNK
from zokern._reference import add_exact
from zokern._reference import round_stochastic_at
from zokern._reference import stream

STATES_PER_RULE = {"sgd": 0, "momentum": 1, "adam": 2}


def final_layout(n_seeds: int) -> dict[str, slice | int]:
    """Where each part of ``ldsd_final_``'s coefficient vector sits."""
    row = n_seeds + 1
    return dict(P=slice(0, row), D=slice(row, 2 * row), M=slice(2 * row, 3 * row), ok=3 * row, c1=3 * row + 1,
                c2=3 * row + 2, size=3 * row + 3)  # fmt: skip


def _combine(row: torch.Tensor, mu: torch.Tensor, xis: list[torch.Tensor]) -> torch.Tensor:
    out = row[0] * mu
    for k, xi in enumerate(xis):
        out = out + row[1 + k] * xi
    return out


def _chunks(tensors: Sequence[torch.Tensor], bases: Sequence[int]):
    """(tensor index, start within the tensor, chunk length, global index of the chunk's first element)."""
    for k, (t, base) in enumerate(zip(tensors, bases)):
        for lo in range(0, t.numel(), _CHUNK):
            yield k, lo, min(_CHUNK, t.numel() - lo), base + lo


def _streams(seeds: Sequence[int], start: int, count: int, distribution: str, device, backend) -> list[torch.Tensor]:
    """The chunk of each stream in float32: from the plain-torch oracle (backend "torch"), else from the fused pass
    of the given or fastest backend (a fallback that runs the Philox rounds in torch ops is slow on small tensors)."""
    if backend == "torch":
        return [stream(s, start, count, distribution, device).to(torch.float32) for s in seeds]
    generate = ops.gaussian if distribution == "gaussian" else ops.rademacher
    return [generate(s, start, count, device=device, backend=backend) for s in seeds]


def _write(part: torch.Tensor, x: torch.Tensor, e: torch.Tensor, rounding_seed: int | None, start: int) -> None:
    if rounding_seed is not None and part.dtype in (torch.bfloat16, torch.float16):
        x = round_stochastic_at(x, e, rounding_seed, start, part.dtype)
    part.copy_(x)


@torch.no_grad()
def ldsd_move_(
    params: Sequence[torch.Tensor],
    mus: Sequence[torch.Tensor],
    bases: Sequence[int],
    *,
    seeds: Sequence[int],
    coef: torch.Tensor,
    distribution: str,
    norm_coef: torch.Tensor | None = None,
    stream_backend: str | None = "torch",
) -> torch.Tensor | None:
    """x += coef[0] mu + sum_s coef[1 + s] xi_s; with ``norm_coef``, the same pass also returns
    ``ldsd_squared_norm`` of that row over the same streams (its mu read and streams are shared)."""
    total = None if norm_coef is None else torch.zeros((), dtype=torch.float64, device=coef.device)
    for k, lo, n, start in _chunks(params, bases):
        part, mu = params[k].view(-1)[lo : lo + n], mus[k].view(-1)[lo : lo + n]
        xis = _streams(seeds, start, n, distribution, part.device, stream_backend)
        part.copy_(part.float() + _combine(coef, mu, xis))
        if norm_coef is not None:
            total = total + _combine(norm_coef, mu, xis).double().square().sum()
    return total


@torch.no_grad()
def ldsd_squared_norm(
    mus: Sequence[torch.Tensor],
    bases: Sequence[int],
    *,
    seeds: Sequence[int],
    coef: torch.Tensor,
    distribution: str,
    stream_backend: str | None = "torch",
) -> torch.Tensor:
    total = torch.zeros((), dtype=torch.float64, device=coef.device)
    for k, lo, n, start in _chunks(mus, bases):
        mu = mus[k].view(-1)[lo : lo + n]
        value = _combine(coef, mu, _streams(seeds, start, n, distribution, mu.device, stream_backend))
        total = total + value.double().square().sum()
    return total


@torch.no_grad()
def ldsd_final_(
    params: Sequence[torch.Tensor],
    mus: Sequence[torch.Tensor],
    states: Sequence[Sequence[torch.Tensor]],
    bases: Sequence[int],
    *,
    seeds: Sequence[int],
    coef: torch.Tensor,
    rule: str,
    lr: float,
    weight_decay: float,
    momentum: float = 0.0,
    beta1: float = 0.9,
    beta2: float = 0.999,
    adam_eps: float = 1e-8,
    distribution: str,
    rounding_seed: int | None = None,
    stream_backend: str | None = "torch",
) -> None:
    at = final_layout(len(seeds))
    ok = coef[at["ok"]] != 0
    f32 = float32_value
    eta, wd = f32(lr), f32(weight_decay)
    for k, lo, n, start in _chunks(params, bases):
        part, mu = params[k].view(-1)[lo : lo + n], mus[k].view(-1)[lo : lo + n]
        xis = _streams(seeds, start, n, distribution, part.device, stream_backend)
        x = part.float()
        theta0, e0 = add_exact(x, torch.zeros_like(x), _combine(coef[at["P"]], mu, xis))
        direction = _combine(coef[at["D"]], mu, xis)
        if rule == "sgd":
            step = direction
        elif rule == "momentum":
            buf = states[k][0].view(-1)[lo : lo + n]
            step = f32(momentum) * buf + direction
            buf.copy_(torch.where(ok, step, buf))
        else:
            m, v = (s.view(-1)[lo : lo + n] for s in states[k])
            # 1 - beta from beta's float64 value, rounded once (from float32 beta it lost digits: 1.3e-5 of v's scale
            # at beta2 = 0.999, 1.4e-3 at 0.99999), and a correctly rounded sqrt, as the kernels compute them (torch's
            # float32 sqrt is not always correctly rounded on the CPU).
            m_new = f32(beta1) * m + f32(1.0 - beta1) * direction
            v_new = f32(beta2) * v + f32(1.0 - beta2) * direction * direction
            root = (v_new / coef[at["c2"]]).double().sqrt().float()
            step = (m_new / coef[at["c1"]]) / (root + f32(adam_eps))
            m.copy_(torch.where(ok, m_new, m))
            v.copy_(torch.where(ok, v_new, v))
        updated, e = theta0, e0
        if eta != 0.0:  # (as the fused pass, docs/stream.md section 5: lr = 0 writes back theta0's bits)
            u = eta * (step + wd * theta0) if wd != 0.0 else eta * step
            updated, e = add_exact(theta0, e0, -u)
        mu_new = _combine(coef[at["M"]], mu, xis)
        mu.copy_(torch.where(ok, mu_new, mu))
        _write(part, torch.where(ok, updated, theta0), torch.where(ok, e, e0), rounding_seed, start)


def float32_value(v: float) -> float:
    """The float32 value of ``v``, as a host float: what a kernel given ``v`` as a float32 argument computes with."""
    return torch.tensor(v, dtype=torch.float32).item()
