r"""ZO-LDSD: learned direction sampling. Directions are drawn from a Gaussian policy N(mu, sigma^2 I) whose mean mu
learns, by REINFORCE, to point where the loss falls (arXiv 2602.13659; the research notes in docs/optim.md).

A step never syncs with the host: the candidates' losses stay on the device, their argmin and every loss-dependent
coefficient are computed there, and the fused passes read those coefficients from device memory.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from zokern import ops
from zokern._ldsd_reference import STATES_PER_RULE
from zokern._ldsd_reference import final_layout
from zokern._transfer import to_device
from zokern.optim import _ldsd_passes as passes
from zokern.optim import _shards
from zokern.optim import seeds as seeds_
from zokern.optim._groups import _check_number
from zokern.optim._groups import check_group_adam_eps
from zokern.optim._groups import check_group_betas
from zokern.optim._groups import check_group_number
from zokern.optim._interrupts import held_interrupts
from zokern.optim.base import ZOOptimizer
from zokern.optim.base import new_state
from zokern.optim.base import run_all_or_take_back
from zokern.optim.exact import ParameterUse
from zokern.optim.exact import PerturbedView

PAIRINGS = ("evaluated", "faithful")
UPDATES = ("sgd", "adam")


class LDSD(ZOOptimizer):
    r"""ZO-LDSD: K candidate directions from a learned Gaussian policy, the best one used for a two-sided step.

    Per step, with candidate seeds :math:`s_1..s_K` (:math:`s_i` = ``seeds.probe_seed(step seed, i - 1)``),
    :math:`\xi_i` their streams and, per param group, :math:`\epsilon, \sigma, \eta, \eta_\mu`:

    .. math::
        z_i = \mu + \sigma\xi_i,\quad f_i = L(\theta + \epsilon z_i),\quad i^* = \arg\min_i f_i,\quad
        f_- = L(\theta - \epsilon z_{i^*}),\quad g = \frac{f_{i^*} - f_-}{2\epsilon},\quad \hat g = g\, z_{i^*}

    (K + 1 forwards: :math:`f_{i^*}` is reused as :math:`f_+`). :math:`\theta` moves along :math:`\hat g` by SGD
    (:math:`\theta \leftarrow \theta - \eta(\hat g + \lambda\theta)`), heavy-ball momentum
    (:math:`b \leftarrow \beta b + \hat g`) or Adam (``update="adam"``, bias-corrected, as :class:`ZOAdam`,
    except that t is the run's update count on each device, which a parameter added or unfrozen later takes too).
    Note :math:`E[\hat g] \approx (\mu\mu^T + \sigma^2 I)\nabla L`: along a learned mu the step is larger than
    MeZO's, which is the point of the method.

    The mean follows REINFORCE on :math:`J(\mu) = E_z L(\theta + \epsilon z)` with a leave-one-out baseline,
    each advantage paired with the noise its candidate was evaluated with:

    .. math::
        c_i = f_i - \frac{1}{K-1}\sum_{j \ne i} f_j,\qquad
        \mu \leftarrow \Pi\Big(\mu - \frac{\eta_\mu}{K\sigma}\sum_i c_i\,\xi_i\Big),\qquad
        \Pi(v) = v\,\min\big(1, \rho\,\sigma\sqrt{d}/\lVert v\rVert\big)

    with d the group's number of trainable elements. **Constraint**: to first order :math:`J(\mu) = L(\theta) +
    \epsilon\langle\nabla L, \mu\rangle` is linear in mu, so unconstrained REINFORCE drives :math:`\lVert\mu\rVert`
    to infinity; the projection keeps mu in the ball where its norm is at most ``mu_norm`` (:math:`\rho`) times the
    expected norm of the noise :math:`\sigma\xi`. On that ball the linear objective is minimised by
    :math:`\mu = -\rho\sigma\sqrt d\,\nabla L/\lVert\nabla L\rVert`, so mu learns the gradient's direction and its
    norm stays bounded. Since :math:`\nabla_\mu J = \epsilon\nabla L`, :math:`\eta_\mu` is on the scale of
    :math:`\eta/\epsilon`. mu starts at zero (the first steps are best-of-K MeZO); K = 1 or ``mu_lr=0`` never
    update it (``mu_lr=0``: best-of-K greedy MeZO).

    ``pairing="faithful"`` reproduces the published code's behaviour: each :math:`c_i` is paired with fresh noise
    rather than the :math:`\xi_i` it was measured with (the code regenerated it from the winner's stream), so mu
    random-walks and the method is best-of-K MeZO. For comparison only.

    Passes per step (in place): one to the first candidate, one two-seed pass per further candidate (mu cancels),
    one to :math:`\theta - \epsilon z_{i^*}` that also reduces the norm the projection needs, and a final pass that
    restores theta, updates it and mu, regenerating all K streams in registers: K + 2 passes, 8K + 32 bytes per
    float32 element. (Exact mode and the faithful pairing reduce the norm in a pass of their own.) No
    per-candidate buffers.

    ``step`` returns :math:`\tfrac12(f_{i^*} + f_-)`, the loss at theta to :math:`O(\epsilon^2)`, as a device
    tensor. Non-finite losses restore theta and skip the update on the device; a step's record is copied to the host
    asynchronously and settled once the copy has landed (see :meth:`ZOOptimizer.step`; the non-finite warning comes
    then).

    State and extra memory per trainable element: ``state[p]["mu"]`` (float32, shaped like p): 4 bytes; plus 4
    with momentum (``momentum_buffer``) or 8 with Adam (``exp_avg``, ``exp_avg_sq``). In exact mode (16-bit
    default), a transient perturbed copy of the parameter an op is using, as :class:`ZOSGD`.

    Args:
        params: parameters or param groups; a group may set ``lr``, ``eps``, ``weight_decay``, ``sigma``,
            ``mu_lr``, and with ``update="adam"`` ``betas``, ``adam_eps``.
        lr: :math:`\eta` (default 1e-6). eps: :math:`\epsilon` (default 1e-3). weight_decay: :math:`\lambda`.
        k: K candidates per step (default 5).
        sigma: std of the policy's noise (default 1: with mu = 0, z is MeZO's).
        mu_lr: :math:`\eta_\mu` (default 1e-3).
        mu_norm: :math:`\rho`, the bound on :math:`\lVert\mu\rVert/(\sigma\sqrt d)` (default 1).
        update: ``"sgd"`` (with ``momentum``) or ``"adam"`` (with ``betas``, default (0.9, 0.999), and
            ``adam_eps``, default 1e-8; refused with ``"sgd"``).
        pairing: ``"evaluated"`` (default, correct) or ``"faithful"`` (the published behaviour).
        Other arguments as :class:`ZOSGD` (``distribution``, ``seed``, ``backend``, ``perturbation``, ...).
    """

    _PASSES_CHECK_MEMORY = False  # its passes take the parameters as the optimizer checked them (_groups_layout)

    @property
    def _LINEAR_UPDATE(self) -> bool:  # theta - lr g (mu + sigma xi), but for the Adam rule's
        return self._rule != "adam"

    def __init__(
        self,
        params,
        lr: float = 1e-6,
        eps: float = 1e-3,
        weight_decay: float = 0.0,
        *,
        k: int = 5,
        sigma: float = 1.0,
        mu_lr: float = 1e-3,
        mu_norm: float = 1.0,
        update: str = "sgd",
        momentum: float = 0.0,
        betas: tuple[float, float] | None = None,
        adam_eps: float | None = None,
        pairing: str = "evaluated",
        distribution: str = "gaussian",
        seed: int | None = None,
        backend: str | None = None,
        seed_check_every: int = 100,
        perturbation: str = "auto",
        rounding: str = "auto",
    ) -> None:
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be a positive integer (candidates per step), got {k!r}")
        if update not in UPDATES:
            raise ValueError(f"update must be one of {', '.join(map(repr, UPDATES))}, got {update!r}")
        if pairing not in PAIRINGS:
            raise ValueError(f"pairing must be one of {', '.join(map(repr, PAIRINGS))}, got {pairing!r}")
        _check_number("mu_norm", mu_norm, 0.0, True)
        _check_number("momentum", momentum, 0.0, False)
        if momentum >= 1:
            raise ValueError(f"invalid momentum: {momentum} (must be in [0, 1))")
        if momentum and update == "adam":
            raise ValueError("momentum is for update='sgd'; Adam's first moment is set by betas")
        if update == "sgd" and (betas is not None or adam_eps is not None):
            raise ValueError("betas and adam_eps are for update='adam'; update='sgd' takes momentum")
        self.k, self.update, self.pairing = k, update, pairing
        self.mu_norm, self.momentum = float(mu_norm), float(momentum)
        self._rule = "adam" if update == "adam" else ("momentum" if momentum else "sgd")
        self._position: list[float] | torch.Tensor | None = None  # where theta is displaced to, see _move_to
        # (chunk, dtype) pairs whose final pass ran (see _final_pass): one call per dtype, any of which may fail.
        self._finished: set[tuple[int, torch.dtype]] = set()
        self._candidates: list[int] = []
        defaults = dict(lr=lr, eps=eps, weight_decay=weight_decay, sigma=sigma, mu_lr=mu_lr)
        if update == "adam":  # only then: an LR scheduler cycling momentum (OneCycleLR) cycles betas[0] if present
            defaults.update(
                betas=tuple((0.9, 0.999) if betas is None else betas), adam_eps=1e-8 if adam_eps is None else adam_eps
            )
        super().__init__(
            params,
            defaults,
            seed=seed,
            distribution=distribution,
            backend=backend,
            seed_check_every=seed_check_every,
            perturbation=perturbation,
            rounding=rounding,
        )

    def _check_hyperparameters(self, group: dict[str, Any]) -> None:
        super()._check_hyperparameters(group)
        check_group_number(group, "sigma", 0.0, True)
        self._check_candidate_reach(group)
        check_group_number(group, "mu_lr", 0.0, False)
        if self.update != "adam":
            return
        check_group_adam_eps(group)
        check_group_betas(group)

    def _check_candidate_reach(self, group: dict[str, Any]) -> None:
        """A candidate is theta + eps (mu + sigma xi), one element of mu up to the ball's radius mu_norm sigma
        sqrt(d), and a step flips it to theta - eps (mu + sigma xi): the flip's terms must stay finite in float32."""
        size = sum(p.numel() for p in group["params"] if p.requires_grad)
        scale = group["eps"] * group["sigma"]
        reach = 2 * scale * (self.mu_norm * math.sqrt(size) + ops.Z_BOUND)
        if not reach < ops.FLOAT32_OVERFLOW:
            raise ValueError(
                f"invalid eps * sigma: {scale:g} (a step moves theta by up to 2 x eps * sigma * (mu_norm * sqrt(d) + "
                f"{ops.Z_BOUND}) = {reach:.3g} with d = {size} trained elements, beyond float32's range)"
            )

    def _extra_group_keys(self) -> tuple[str, ...]:
        return ("sigma", "mu_lr", "betas", "adam_eps") if self.update == "adam" else ("sigma", "mu_lr")

    def options(self) -> dict[str, Any]:
        return dict(
            super().options(),
            k=self.k,
            mu_norm=self.mu_norm,
            update=self.update,
            momentum=self.momentum,
            pairing=self.pairing,
        )

    @classmethod
    def _losses_per_step(cls, options: dict[str, Any], record: dict[str, Any]) -> int:
        return options["k"] + 1  # the candidates, then theta - eps z*

    # ---------------------------------------------------------------------------------------------------- layout

    def _state_keys(self) -> tuple[str, ...]:
        return ("mu", *{"sgd": (), "momentum": ("momentum_buffer",), "adam": ("exp_avg", "exp_avg_sq")}[self._rule])

    def _init_state(self) -> None:
        counts = None  # the run's Adam counts, computed once a parameter needs them (not every step)
        for _, params, _ in self._groups_layout():
            for p in params:
                state = self._state_of(p)
                for key in self._state_keys():
                    if key not in state:
                        state[key] = new_state(p)
                if self._rule == "adam" and "step" not in state:  # a parameter joining later: the run's count
                    counts = self._adam_counts() if counts is None else counts
                    count = counts.get(p.device)
                    # Each its own tensor: the counts advance in place, one add per parameter. Normal tensors,
                    # as new_state's, also when this step runs under torch.inference_mode.
                    with torch.inference_mode(False):
                        state["step"] = (
                            torch.zeros((), dtype=torch.float32, device=p.device) if count is None else count.clone()
                        )

    def _mus(self, params: list[torch.Tensor]) -> list[torch.Tensor]:
        return [self._state_of(p)["mu"] for p in params]

    def _rule_states(self, params: list[torch.Tensor]) -> list[tuple[torch.Tensor, ...]]:
        keys = self._state_keys()[1:]
        assert len(keys) == STATES_PER_RULE[self._rule]
        return [tuple(self._state_of(p)[key] for key in keys) for p in params]

    # ---------------------------------------------------------------------------------------------- displacement

    def _row(self, position, group: dict[str, Any], device: torch.device) -> torch.Tensor:
        """The coefficients [mu, xi_1..xi_K] of theta's displacement eps (u_0 mu + sigma sum_i u_i xi_i)."""
        eps, sigma = float(group["eps"]), float(group["sigma"])  # numpy scalars too
        if isinstance(position, list):
            return to_device([eps * position[0], *(eps * sigma * u for u in position[1:])], device, torch.float32)
        scale = torch.full_like(position, eps * sigma)
        scale[0] = eps
        return (position * scale).to(device, torch.float32)

    def _move_to(self, position, norm_rows: dict[int, torch.Tensor] | None = None) -> dict[int, torch.Tensor] | None:
        """Displace theta to ``position`` = [u_0, u_1..u_K] (a list of floats, or a float64 device tensor): the
        perturbation eps (u_0 mu + sigma sum_i u_i xi_i). In exact mode only the bookkeeping changes.

        With ``norm_rows`` (per group index, a row over [mu, candidates]), the pass also returns each group's
        squared norm of that row, sharing the pass's reads of mu and its streams (None in exact mode)."""
        previous = self._position
        if self._exact_now:
            self._position = position
            return None
        if isinstance(previous, list) and isinstance(position, list):
            delta = [a - b for a, b in zip(position, previous)]
            changed = [i for i, d in enumerate(delta) if d]
            if not changed:
                return None
            if 0 not in changed and len(changed) <= 2:  # a candidate switch: mu cancels, one two-seed pass
                deltas = [delta[i] for i in changed]
                with held_interrupts():
                    self._each_chunk(lambda chunk, sign: self._two_seed_move(chunk, changed, deltas, sign))
                    self._position = position  # after the passes: a pass that raises has not moved theta
                return None
        else:
            delta = _as_tensor(position, like=previous) - _as_tensor(previous, like=position)
        norms: dict[int, torch.Tensor] = {}

        def move(chunk: tuple, sign: float) -> None:
            index, group, params, offsets = chunk
            device = params[0].device
            norm_row = None if norm_rows is None or sign < 0 else norm_rows[index].to(device)
            signed = delta if sign > 0 else [-d for d in delta] if isinstance(delta, list) else -delta
            part = passes.move_(
                [p.data for p in params],
                self._mus(params),
                offsets,
                self._candidates,
                self._row(signed, group, device),
                norm_coef=norm_row,
                **self._pass_kwargs(),
            )
            if part is not None and sign > 0:
                norms[index] = norms[index] + part.to(norms[index].device) if index in norms else part

        with held_interrupts():
            self._each_chunk(move)
            self._position = position  # after the passes: a pass that raises has not moved theta
        return norms if norm_rows is not None else None

    def _each_chunk(self, move: Callable[[tuple, float], None]) -> None:
        """``move(chunk, +1.0)`` for each entry of _device_chunks() whose final pass has not run (it is restored and
        updated already), all or none: theta stays where the position the step keeps says (the undo of a failed step
        starts from it)."""
        if self._owners:
            _shards.shards_written()
        chunks = []
        for n, (index, group, params, offsets) in enumerate(self._device_chunks()):
            left = [k for k, p in enumerate(params) if (n, p.dtype) not in self._finished]
            if left:
                chunks.append((index, group, [params[k] for k in left], [offsets[k] for k in left]))
        run_all_or_take_back(chunks, move)

    def _two_seed_move(self, chunk: tuple, changed: list[int], deltas: list[float], sign: float) -> None:
        _, group, params, offsets = chunk
        scale = sign * group["eps"] * group["sigma"]
        seeds = [self._candidates[i - 1] for i in changed]
        data = [p.data for p in params]
        kwargs = dict(offsets=offsets, **self._pass_kwargs())
        if len(changed) == 2:
            ops.two_seed_(data, seeds[0], scale * deltas[0], seeds[1], scale * deltas[1], **kwargs)
        else:
            ops.perturb_(data, seeds[0], scale * deltas[0], **kwargs)

    def _undo_displacement(self) -> None:
        if self._position is not None and not self._exact_now:
            self._move_to([0.0] * (self.k + 1))
        self._position, self._finished = None, set()

    def _perturbed_view(self) -> PerturbedView:
        uses = {
            id(p): _Use(p, offset, index, group)
            for index, group, params, offsets in self._device_chunks()
            for p, offset in zip(params, offsets)
        }
        return _LDSDView(uses, self)

    def _own_update_rule(self) -> str:
        return "its learned directions"

    def perturbed(self, seed: int, scale: float = 1.0):
        raise NotImplementedError("LDSD's directions depend on its learned mean: drive it with step(closure)")

    # --------------------------------------------------------------------------------------------------- step

    def _device_losses(self, values: list) -> torch.Tensor:
        return self._reduce(values, self._step_device())[0]

    def _step_device(self) -> torch.device:
        return self._device_chunks()[0][2][0].device

    def _check_runnable(self, layout: list, exact: bool, stepping: bool = True) -> None:
        super()._check_runnable(layout, exact, stepping)
        if self._owners:
            self._check_shardable(exact)
        if stepping and not any(tensors for _, tensors, _ in layout):  # before the step draws its seed
            raise ValueError("LDSD has no trainable parameters (all have requires_grad=False)")

    def _check_shardable(self, exact: bool) -> None:
        """Over shards: the in-place mode only, and the shards as _check_shard_placements wants them."""
        if exact:
            raise TypeError(
                "LDSD trains sharded (DTensor) parameters in the in-place mode only: its exact mode perturbs the "
                "whole tensors FSDP2 gathers by theta + eps (mu + sigma xi), and each rank holds only its shard of "
                "mu. Pass perturbation='inplace' (for 16-bit parameters the default is the exact mode)"
            )
        self._check_shard_placements()

    def _check_shard_placements(self) -> None:
        """Over shards, each rank reduces its shards' part of mu's norm and the ranks sum the parts: the trained
        parameters must all be shards of one placement (a replicated one would be counted once per rank). Checked
        by every step, replay's too (which runs no other check)."""
        owners = list(self._owners.values())
        first = owners[0]
        trained = sum(len(params) for _, params, _ in self._groups_layout())
        same = all(p.device_mesh == first.device_mesh and p.placements == first.placements for p in owners)
        if len(owners) != trained or not same:
            raise ValueError(
                "LDSD trains sharded parameters when all of its trained parameters are shards placed alike (one "
                "mesh, one placement): each rank's part of mu's norm is summed over the ranks holding the other "
                "shards, and a replicated parameter, or one sharded otherwise, would be counted wrongly. Freeze "
                "the others, or train them with another optimizer"
            )

    def _run_step(self, seed: int, evaluate: Callable[[], Any]) -> dict[str, Any]:
        if self._owners:
            self._check_shard_placements()
        self._finished = set()
        k = self.k
        self._init_state()
        self._candidates = [seeds_.probe_seed(seed, i) for i in range(k)]
        paired = self._candidates
        if self.pairing == "faithful":
            paired = [seeds_.probe_seed(seed, k + i) for i in range(k)]
        self._position = [0.0] * (k + 1)
        values = []
        for i in range(k):
            self._move_to([1.0] + [1.0 if j == i else 0.0 for j in range(k)])
            values.append(evaluate())
        losses = self._device_losses(values)
        best = torch.argmin(torch.nan_to_num(losses, nan=math.inf))
        onehot = (torch.arange(k, device=losses.device) == best).to(torch.float64)
        advantages = (k * losses - losses.sum()) / (k - 1) if k > 1 else torch.zeros_like(losses)
        raw_mu_rows = self._raw_mu_rows(advantages)
        # The move to theta - eps z* regenerates the candidates' streams and reads mu: with the evaluated pairing
        # it also reduces the norm the projection of mu needs (the exact mode has no such pass: a separate one).
        fuse = raw_mu_rows is not None and self.pairing == "evaluated"
        norms = self._move_to(torch.cat((losses.new_full((1,), -1.0), -onehot)), raw_mu_rows if fuse else None)
        f_minus = self._device_losses([evaluate()])[0]
        f_plus = losses.gather(0, best.view(1))[0]
        # A non-finite loss, or a projected gradient the final pass cannot apply in float32 (it moves theta by
        # g (mu + sigma xi), the Adam rule squares it; float16 weights hold less): no update.
        largest = (f_plus - f_minus).abs() / (2 * min(group["eps"] for group in self.param_groups))
        largest = largest * max(1.0, *(group["sigma"] for group in self.param_groups))
        limit = self._SQUARED_PROJECTED_LIMIT if self._rule == "adam" else self._PROJECTED_LIMIT
        ok = torch.isfinite(losses).all() & torch.isfinite(f_minus) & self._within_limits(largest, limit)
        for row in (raw_mu_rows or {}).values():  # nor a step of mu (mu_lr c_i / (K sigma) for each xi_i) beyond it
            ok = ok & (row.abs().max() * k < self._PROJECTED_LIMIT)
        grads = self._final_pass(onehot, f_plus - f_minus, raw_mu_rows, norms, paired, ok)
        return dict(
            losses=torch.cat((losses, f_minus.view(1))),
            projected_grad=grads,
            loss=torch.where(ok, 0.5 * (f_plus + f_minus), torch.nan),  # a skipped step's loss is NaN
            best=best,
            skipped=~ok,
        )

    def _final_pass(self, onehot, difference, raw_mu_rows, norms, paired, ok) -> torch.Tensor:
        k, streams = self.k, list(self._candidates)
        if self.pairing == "faithful":
            streams += paired
        restore = torch.zeros(k + 1, dtype=torch.float64, device=onehot.device)
        if not self._exact_now:
            restore = -_as_tensor(self._position, like=onehot)
        grads = torch.stack([difference / (2 * group["eps"]) for group in self.param_groups])
        adam_steps = self._adam_counts_after(ok)
        with held_interrupts():
            self._final_passes(streams, restore, grads, onehot, raw_mu_rows, norms, paired, ok, adam_steps)
            # Only now: a final pass that raises has not restored theta, which the step's undo then does (in the
            # chunks not _finished: a later chunk's pass can fail, of a device error, after an earlier one's ran).
            self._position, self._finished = None, set()
            self._advance_adam_steps(ok)
        return grads

    def _final_passes(self, streams, restore, grads, onehot, raw_mu_rows, norms, paired, ok, adam_steps) -> None:
        """The final pass of each (group, device) chunk (see _final_pass)."""
        k, sizes, rounding = self.k, self._group_sizes(), self._update_rounding()
        if norms is None and raw_mu_rows is not None:
            norms = self._mu_norms(raw_mu_rows, paired)
        if norms and self._owners:  # each rank's shards' part of each group's norm: the sum over the shards
            indices = sorted(norms)
            parts = torch.stack([norms[index].to(torch.float64) for index in indices])
            norms = dict(zip(indices, _shards.sum_over_shards(parts, next(iter(self._owners.values())))))
        for n, (index, group, chunk_params, chunk_offsets) in enumerate(self._device_chunks()):
            device = chunk_params[0].device
            sigma, g = group["sigma"], grads[index]
            # Rows over [mu, candidates..., (faithful) paired...].
            unused = len(streams) - k  # the faithful pairing's fresh streams: only mu's row uses them
            p_row = _pad(self._row(restore, group, device), unused)
            d_row = _pad(torch.cat((g.view(1), g * sigma * onehot)).to(device, torch.float32), unused)
            m_row = self._mu_row(index, group, raw_mu_rows, norms, sizes[index], device)
            if self.pairing == "faithful":
                m_row = torch.cat((m_row[:1], torch.zeros(k, device=device), m_row[1:]))
            c1 = c2 = torch.ones((), dtype=torch.float32, device=device)
            if self._rule == "adam":
                # 1 - beta^t as -expm1(t log beta), log beta taken in float64 on the host: in float32, beta^t near 1
                # lost the digits of 1 - beta^t (1.3e-5 of it at beta2 = 0.999 and t = 1). t stays on the device.
                t = adam_steps[device]
                c1, c2 = (-torch.expm1(t * (math.log(beta) if beta else -math.inf)) for beta in group["betas"])
            coef = torch.cat((p_row, d_row, m_row, torch.stack((ok.to(device, torch.float32), c1, c2))))
            assert coef.numel() == final_layout(len(streams))["size"]
            for dtype in dict.fromkeys(p.dtype for p in chunk_params):
                params = [p for p in chunk_params if p.dtype == dtype]
                offsets = [b for p, b in zip(chunk_params, chunk_offsets) if p.dtype == dtype]
                self._final_call(params, offsets, streams, coef, group, rounding)
                self._finished.add((n, dtype))

    def _final_call(self, params, offsets, streams, coef, group, rounding) -> None:
        """The final pass over parameters of one dtype (passes.final_ would make one call per dtype, any of which may
        fail: the step's undo must know which ran)."""
        passes.final_(
            [p.data for p in params],
            self._mus(params),
            self._rule_states(params),
            offsets,
            streams,
            coef,
            backend=self.backend,
            rounding_seed=rounding.get("rounding_seed"),
            rule=self._rule,
            lr=group["lr"],
            weight_decay=group["weight_decay"],
            momentum=self.momentum,
            # Read by the Adam rule only (the others' groups have no betas: schedulers would cycle them).
            beta1=group["betas"][0] if self._rule == "adam" else 0.0,
            beta2=group["betas"][1] if self._rule == "adam" else 0.0,
            adam_eps=group["adam_eps"] if self._rule == "adam" else 1.0,
            distribution=self.distribution,
        )

    def _raw_mu_rows(self, advantages: torch.Tensor) -> dict[int, torch.Tensor] | None:
        """Per group index, [1, e_1..e_K] with e_i = -mu_lr c_i / (K sigma): mu's REINFORCE step before the
        projection; None when mu does not learn (K = 1 or every mu_lr 0)."""
        if self.k == 1 or all(group["mu_lr"] == 0.0 for group in self.param_groups):
            return None
        rows = {}
        for index, (group, _, _) in enumerate(self._groups_layout()):
            step = -group["mu_lr"] * advantages / (self.k * group["sigma"])
            rows[index] = torch.cat((advantages.new_ones(1), step)).to(torch.float32)
        return rows

    def _mu_row(self, index, group, raw_rows, norms, size, device) -> torch.Tensor:
        """mu's row of the final pass, [scale, scale * e_1..e_K], scale the projection onto the ball of radius
        mu_norm * sigma * sqrt(size); the squared norm comes from the fused move or from _mu_norms."""
        if raw_rows is None or group["mu_lr"] == 0.0:
            return torch.cat((torch.ones(1, device=device), torch.zeros(self.k, device=device)))
        raw = raw_rows[index].to(device)
        squared = norms[index].to(device)
        radius = self.mu_norm * group["sigma"] * math.sqrt(size)
        scale = torch.clamp(radius / torch.sqrt(squared), max=1.0).to(torch.float32)
        return raw * scale

    def _mu_norms(self, raw_rows: dict[int, torch.Tensor], paired) -> dict[int, torch.Tensor]:
        """Per group index, the squared norm of mu's raw row over the group's tensors, where the fused move did not
        give it (the exact mode, the faithful pairing): a reduction pass per chunk, all groups in one sweep (a sweep
        per group was quadratic in the number of groups)."""
        norms: dict[int, torch.Tensor] = {}
        for index, group, params, offsets in self._device_chunks():
            if group["mu_lr"] == 0.0:
                continue
            raw = raw_rows[index].to(params[0].device)
            part = passes.squared_norm(self._mus(params), offsets, paired, raw, **self._pass_kwargs())
            norms[index] = part if index not in norms else norms[index] + part.to(norms[index].device)
        return norms

    def _group_sizes(self) -> list[int]:
        """Each group's number of trained elements (of a sharded parameter, the whole's)."""
        return [sum(self._owners.get(id(p), p).numel() for p in params) for _, params, _ in self._groups_layout()]

    def _adam_counts_after(self, ok: torch.Tensor) -> dict[torch.device, torch.Tensor]:
        """Adam's update count t of this step (skipped steps do not count), per device: one value, shared by all
        parameters (the final pass takes one bias correction per call), the run's count; see _adam_counts. The
        states advance once the final passes have run (_advance_adam_steps)."""
        if self._rule != "adam":
            return {}
        return {device: count + ok.to(device, torch.float32) for device, count in self._adam_counts().items()}

    def _advance_adam_steps(self, ok: torch.Tensor) -> None:
        if self._rule == "adam":
            for _, _, params, _ in self._device_chunks():
                steps = [self._state_of(p)["step"] for p in params]
                torch._foreach_add_(steps, ok.to(params[0].device, torch.float32))

    def _adam_counts(self) -> dict[torch.device, torch.Tensor]:
        """Per device, the largest update count of its trainable parameters (new 0-d tensors): the run's count,
        which a parameter added or unfrozen later, whose own count is smaller, is bias-corrected with too."""
        steps: dict[torch.device, list[torch.Tensor]] = {}
        for _, _, params, _ in self._device_chunks():
            for p in params:
                state = self._state_of(p)
                if "step" in state:
                    steps.setdefault(p.device, []).append(state["step"])
        return {device: torch.stack(counts).max() for device, counts in steps.items()}


class _Use(ParameterUse):
    """A parameter's place, with its param group's settings (eps and sigma scale its displacement row)."""

    __slots__ = ("settings",)

    def __init__(self, param: torch.Tensor, offset: int, group: int, settings: dict[str, Any]) -> None:
        super().__init__(param, offset, group)
        self.settings = settings


class _LDSDView(PerturbedView):
    """The exact mode's view for LDSD: each parameter an op receives is theta + eps (u_0 mu + sigma sum u_i xi_i),
    materialised by the LDSD move pass from the optimizer's current position."""

    def __init__(self, uses: dict[int, _Use], optimizer: LDSD) -> None:
        self.optimizer = optimizer
        self.rows: dict[tuple[int, torch.device], torch.Tensor] = {}  # one evaluation, one position: rows reused
        super().__init__(uses, {}, {})

    def materialise(self, uses: list[_Use]) -> list[torch.Tensor]:
        opt = self.optimizer
        outs = [use.param.detach().clone() for use in uses]
        key = (uses[0].group, outs[0].device)
        if key not in self.rows:
            self.rows[key] = opt._row(opt._position, uses[0].settings, outs[0].device)
        mus = opt._mus([use.param for use in uses])
        passes.move_(outs, mus, [use.offset for use in uses], opt._candidates, self.rows[key], **opt._pass_kwargs())
        return outs


def _as_tensor(position, like: torch.Tensor | list | None = None) -> torch.Tensor | list[float]:
    """A position as a float64 tensor when either side already is one (on its device), else the list itself."""
    if isinstance(position, torch.Tensor):
        return position
    if isinstance(like, torch.Tensor):
        return to_device(position, like.device, torch.float64)
    return list(position)


def _pad(row: torch.Tensor, count: int) -> torch.Tensor:
    """The row followed by ``count`` zero coefficients (streams it does not use)."""
    return torch.cat((row, row.new_zeros(count))) if count else row
