"""ZO-SGD (MeZO) and its sign and conservative variants."""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Sequence
from typing import Any

import torch

from zokern import ops
from zokern.optim import seeds as seeds_
from zokern.optim._caches import clear_weight_caches
from zokern.optim._groups import _check_number
from zokern.optim.base import Closure
from zokern.optim.base import ZOOptimizer
from zokern.optim.base import _loading
from zokern.optim.base import new_state
from zokern.optim.graph import StepGraph


class ZOSGD(ZOOptimizer):
    r"""Zeroth-order SGD: MeZO's two-sided SPSA estimate, with the fused passes of the kernel layer.

    One step with probe seeds :math:`s_1..s_q` (:math:`s_k` = ``seeds.probe_seed(step seed, k - 1)``) and, per
    param group, :math:`\epsilon, \eta, \lambda`:

    .. math::
        d_k = \tfrac12\,(L(\theta + \epsilon z_k) - L(\theta - \epsilon z_k))
              \quad\text{(one-sided: } L(\theta + \epsilon z_k) - L(\theta)\text{)}, \qquad
        \hat g = \frac1q \sum_k \frac{d_k}{\epsilon} z_k,

    :math:`\theta \leftarrow \theta - \eta(\hat g + \lambda\theta)` without momentum;
    :math:`m \leftarrow \mu m + \hat g,\ \theta \leftarrow \theta - \eta(m + \lambda\theta)` with momentum
    :math:`\mu`. :math:`z_k` is the stream of docs/stream.md at the canonical offsets. With one probe and no momentum
    a step is three passes: perturb (:math:`+\epsilon`), flip (:math:`-2\epsilon`), restore-and-update.
    Each group's own :math:`\epsilon` scales its perturbation, and :math:`d_k/\epsilon` uses that same
    :math:`\epsilon`: an unbiased estimate of each group's gradient.

    ``step(closure)`` returns the mean of :math:`\tfrac12(L_+ + L_-)` over the probes (two-sided) or
    :math:`L(\theta)` (one-sided): the loss at the parameters before the step, to :math:`O(\epsilon^2)`.

    Gradient accumulation under one z: let the closure evaluate several micro-batches and return their mean loss;
    every micro-batch then sees the same perturbation, and :math:`L_\pm` are their averages.

    Extra memory: none without momentum (the fused passes regenerate z); 4 bytes per trainable parameter with
    momentum (a float32 buffer). In exact mode (the default for 16-bit parameters), while the closure runs, a
    transient perturbed copy of the parameter an op is using (at most the largest parameter, plus small ones).

    Args:
        params: parameters or param groups; each group may set ``lr``, ``eps``, ``weight_decay``.
        lr: learning rate :math:`\eta` (default 1e-6, MeZO's order of magnitude for LLMs).
        eps: perturbation scale :math:`\epsilon` (default 1e-3).
        weight_decay: decoupled weight decay :math:`\lambda` (default 0).
        momentum: :math:`\mu` in [0, 1) (default 0).
        n_probes: :math:`q`, directions averaged per step (default 1).
        one_sided: forward differences against :math:`L(\theta)`: :math:`q + 1` forwards instead of :math:`2q`.
        distribution: ``"gaussian"`` or ``"rademacher"``.
        seed: base seed of the run (docs in :mod:`zokern.optim.seeds`); default: drawn from torch's generator.
        backend: force a kernel backend (see ``zokern.available_backends()``).
        seed_check_every: under torch.distributed, :meth:`new_seed` (for loops that drive the passes themselves)
            checks every this many calls that all ranks hold the same seed (0: only at construction); ``step``
            checks it in every loss reduction.
        perturbation: ``"exact"`` evaluates the closure at theta + eps z without writing theta (a torch function
            mode hands ops the perturbed values; :mod:`zokern.optim.exact`), so that lr = 0 leaves 16-bit weights
            bit-identical; ``"inplace"`` is MeZO's scheme, the parameters perturbed and restored in place;
            ``"auto"`` (default) is exact when a trainable parameter is bf16 or fp16, in place for float32.
        rounding: how updates are written to 16-bit parameters: ``"stochastic"`` (unbiased: the expected stored
            update is the intended one), ``"nearest"``, or ``"auto"`` (default: stochastic). float32 ignores it.
        merge_steps: fold the next step's perturbation into each step's last pass (two passes per step instead of
            three; in place, two-sided, no momentum; :mod:`zokern.optim.lookahead` says when theta is handed out).
        cuda_graph: after two ordinary steps, capture a whole step (closure included) in a CUDA graph and replay it
            (in place, one probe, no momentum, one device; :mod:`zokern.optim.graph`). The closure must read its
            batch from the same tensors every step and must not sync with the host.
    """

    _LINEAR_UPDATE = True  # theta - lr g z (momentum: through its buffer)

    def __init__(
        self,
        params,
        lr: float = 1e-6,
        eps: float = 1e-3,
        weight_decay: float = 0.0,
        *,
        momentum: float = 0.0,
        n_probes: int = 1,
        one_sided: bool = False,
        distribution: str = "gaussian",
        seed: int | None = None,
        backend: str | None = None,
        seed_check_every: int = 100,
        perturbation: str = "auto",
        rounding: str = "auto",
        merge_steps: bool = False,
        cuda_graph: bool = False,
    ) -> None:
        _check_number("momentum", momentum, 0.0, False)
        if momentum >= 1:
            raise ValueError(f"invalid momentum: {momentum} (must be in [0, 1))")
        if isinstance(n_probes, bool) or not isinstance(n_probes, int) or n_probes < 1:
            raise ValueError(f"n_probes must be a positive integer, got {n_probes!r}")
        if not isinstance(one_sided, bool):
            raise TypeError(f"one_sided must be a bool, got {type(one_sided).__name__}")
        self.momentum = float(momentum)
        self.n_probes = n_probes
        self.one_sided = one_sided
        super().__init__(
            params,
            dict(lr=lr, eps=eps, weight_decay=weight_decay),
            seed=seed,
            distribution=distribution,
            backend=backend,
            seed_check_every=seed_check_every,
            perturbation=perturbation,
            rounding=rounding,
        )
        self.merge_steps = self._check_merge(merge_steps)
        self.cuda_graph = self._check_graph(cuda_graph)
        self._graph = StepGraph(self) if self.cuda_graph else None
        self._step_closure: Closure | None = None  # the closure of the step() running, which a graph captures

    # Whether this class's steps can fold the next step's perturbation into their last pass (merge_steps), and
    # whether they can keep g on the device; subclasses with other update rules or directions cannot.
    _MERGES = True
    _DEVICE_ESTIMATE = True
    _GRAPHS = True  # whether its steps can be captured whole (cuda_graph): ZO-SGD's own device step

    def _check_merge(self, merge_steps: bool) -> bool:
        if not isinstance(merge_steps, bool):
            raise TypeError(f"merge_steps must be a bool, got {type(merge_steps).__name__}")
        if not merge_steps:
            return False
        name = type(self).__name__
        if not self._MERGES:
            raise ValueError(f"{name} does not support merge_steps (its last pass is not ZO-SGD's fused update)")
        if self.momentum or self.one_sided:
            raise ValueError(
                "merge_steps needs the two-sided estimate without momentum (the next perturbation is folded into the "
                "fused restore-and-update pass)"
            )
        if self.exact():
            raise ValueError(_MERGE_NEEDS_INPLACE)
        return True

    def _check_runnable(self, layout: list, exact: bool, stepping: bool = True) -> None:
        super()._check_runnable(layout, exact, stepping)
        if self._owners and self.cuda_graph:
            raise ValueError(
                "cuda_graph is not supported with sharded (DTensor) parameters: FSDP2 gathers them in forwards"
            )
        if stepping and self.merge_steps and exact:  # parameters made 16-bit since the constructor (model.half())
            raise ValueError(f"this step would run in the exact mode: {_MERGE_NEEDS_INPLACE}")

    def _check_graph(self, cuda_graph: bool) -> bool:
        if not isinstance(cuda_graph, bool):
            raise TypeError(f"cuda_graph must be a bool, got {type(cuda_graph).__name__}")
        if not cuda_graph:
            return False
        if not self._GRAPHS:
            raise ValueError(f"{type(self).__name__} does not support cuda_graph (only ZO-SGD's step is captured)")
        if not self._device_estimate():
            raise ValueError("cuda_graph needs one probe and no momentum (the step whose g stays on the device)")
        if self.merge_steps:
            raise ValueError("cuda_graph and merge_steps cannot be combined yet: choose one")
        if self.exact():
            raise ValueError(
                "cuda_graph needs perturbation='inplace' (16-bit parameters default to the exact mode, whose "
                "evaluations are not captured)"
            )
        return True

    _TRANSIENT = (*ZOOptimizer._TRANSIENT, "_graph")

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        if not _loading(state):
            self._graph = StepGraph(self) if self.cuda_graph else None  # a copy captures its own

    def step(self, closure: Closure | None = None) -> torch.Tensor:  # type: ignore[override]
        self._step_closure = closure if self.cuda_graph else None
        try:
            return super().step(closure)
        finally:
            self._step_closure = None

    step.__doc__ = ZOOptimizer.step.__doc__

    def _device_estimate(self) -> bool:
        """Whether g stays on the device this step: one probe without momentum, so the fused restore-and-update
        pass reads it there (several probes and momentum apply host-side coefficients)."""
        return self._DEVICE_ESTIMATE and self.n_probes == 1 and not self.momentum

    def _state_keys(self) -> tuple[str, ...]:
        return ("momentum_buffer",) if self.momentum else ()

    def options(self) -> dict[str, Any]:
        options = dict(super().options(), momentum=self.momentum, n_probes=self.n_probes, one_sided=self.one_sided)
        if self.merge_steps:
            options["merge_steps"] = True
        return options

    @classmethod
    def _losses_per_step(cls, options: dict[str, Any], record: dict[str, Any]) -> int:
        probes = options["n_probes"]
        return probes + 1 if options["one_sided"] else 2 * probes

    def apply_projected_grad(self, seed: int, projected_grad: float | Sequence[float] | torch.Tensor) -> None:
        """theta <- theta - lr * (g * z(seed) + weight_decay * theta) in every group, one pass: ZO-SGD's update of a
        step whose estimate the caller formed (with :meth:`new_seed` and :meth:`perturbed`). ``projected_grad`` is g,
        one value for every group or one per param group (each group perturbs with its own eps, so its g is
        (L+ - L-) / (2 eps) with that eps; one value is refused when the groups' eps differ): numbers, or a tensor
        with one element or one per group (read on the device, no host sync; a value not finite, or whose update
        lr g z float32 cannot hold, leaves its groups as they are; such a number is refused, before any group is
        written). Not recorded in the trajectory: replay covers steps taken with :meth:`step`. Optimizers whose step
        updates by another rule (momentum, Adam, sign, the conservative choice) refuse it."""
        rule = self._own_update_rule()
        if rule is not None:
            raise NotImplementedError(
                f"apply_projected_grad applies ZO-SGD's update, but this {type(self).__name__} updates by {rule}: "
                "drive it with step(closure)"
            )
        grads = self._projected_grads(projected_grad)
        self._refuse_nested("apply_projected_grad")
        self._check_groups_hyperparameters()
        if len(grads) == 1 and len({group["eps"] for group in self.param_groups}) > 1:
            raise ValueError(
                "the param groups' eps differ, so their projected gradients (L+ - L-) / (2 eps) do: pass one per "
                "param group"
            )
        by_group = {
            id(group): self._applicable(grads, k, group, tensors)
            for k, (group, tensors, _) in enumerate(self._groups_layout())
        }
        self.materialize()
        self._restore_update(seed, 0.0, lambda group: by_group[id(group)])
        self._block_randomness.clear()  # the estimate is applied: its blocks' draws are done with
        clear_weight_caches()  # weights computed from theta before the update (see _caches)

    def _applicable(self, grads: list, k: int, group: dict[str, Any], tensors: list) -> float | torch.Tensor:
        """Group ``k``'s g among apply_projected_grad's ``grads`` (one, or one per group), checked before any group
        is written: a number whose update lr g z float32 cannot hold (or, with float16 parameters in the group, half
        of float16's range: see _float16_limit) is refused; a tensor is made NaN there (read on the device), so that
        the pass leaves theta as it is, as for a non-finite one."""
        g = grads[k % len(grads)]
        limit, held_by = self._PROJECTED_LIMIT / max(1.0, group["lr"]), "float32"
        if any(p.dtype == torch.float16 for p in tensors):
            float16 = self._float16_bound(group["lr"])  # (no momentum here: apply_projected_grad refuses it)
            if float16 < limit:
                limit, held_by = float16, "half of float16's range (the group trains float16 parameters)"
        if isinstance(g, torch.Tensor):
            return torch.where(g.abs() < limit, g, torch.nan)
        if not abs(g) < limit:
            name = "projected_grad" if len(grads) == 1 else f"projected_grad[{k}]"
            raise ValueError(
                f"{name} is {g:g}: param group {k}'s update, lr * g * z with lr = {group['lr']:g} and |z| up to "
                f"{ops.Z_BOUND}, would be beyond {held_by} (|g| must be below {limit:.3g}); nothing was updated"
            )
        return g

    def _own_update_rule(self) -> str | None:
        return "momentum" if self.momentum else None

    def _projected_grads(self, projected_grad: Any) -> list:
        """apply_projected_grad's argument: one g (a float or one-element float32 tensor) or one per param group."""
        groups = len(self.param_groups)
        if isinstance(projected_grad, torch.Tensor):
            if projected_grad.numel() not in (1, groups) or not projected_grad.is_floating_point():
                raise ValueError(
                    f"projected_grad must be a number, one per param group, or a floating tensor of 1 or {groups} "
                    f"elements, got shape {tuple(projected_grad.shape)} and dtype {projected_grad.dtype}"
                )
            return list(projected_grad.detach().reshape(-1).float().unbind())
        if isinstance(projected_grad, (list, tuple)):
            if len(projected_grad) != groups:
                raise ValueError(f"projected_grad has {len(projected_grad)} values, not one per param group ({groups})")
            return [_projected_grad(f"projected_grad[{k}]", g) for k, g in enumerate(projected_grad)]
        return [_projected_grad("projected_grad", projected_grad)]

    # ------------------------------------------------------------------------------------------------ estimate

    def _estimate(self, seed: int, evaluate: Callable[[], Any], leading: tuple = ()) -> tuple:
        """Evaluate every probe, then gather all losses in one round (``leading`` values first); leaves theta
        displaced by the last probe (see _restore_scale).

        Returns the probe seeds, d_k, the loss step() reports, and the gathered ``leading`` values.
        """
        probes = [seeds_.probe_seed(seed, k) for k in range(self.n_probes)]
        values = list(leading)
        if self.one_sided:
            values.append(evaluate())
        for k, s in enumerate(probes):
            if k == 0:
                if not self._claimed:
                    self._perturb(s, 1.0)
            else:
                self._switch(probes[k - 1], self._restore_scale(), s, 1.0)
            values.append(evaluate())
            if not self.one_sided:
                self._perturb(s, -2.0)
                values.append(evaluate())
        floats = self._gather(values)
        lead, losses = floats[: len(leading)], floats[len(leading) :]
        if self.one_sided:
            at_theta = losses[0]
            diffs = [plus - at_theta for plus in losses[1:]]
            self._check_projected(diffs)
            return probes, diffs, at_theta, lead
        pairs = list(zip(losses[0::2], losses[1::2]))
        diffs = [0.5 * (plus - minus) for plus, minus in pairs]
        self._check_projected(diffs)
        loss = sum(0.5 * (plus + minus) for plus, minus in pairs) / len(pairs)
        return probes, diffs, loss, lead

    def _restore_scale(self) -> float:
        """What brings theta back from the last probe's evaluation point, in multiples of eps."""
        return -1.0 if self.one_sided else 1.0

    def _coefficient(self, diff: float) -> Callable[[dict[str, Any]], float]:
        """The probe's share of the projected gradient in a group: d_k / (q eps)."""
        return lambda group: diff / (self.n_probes * group["eps"])

    def _run_step(self, seed: int, evaluate: Callable[[], Any]) -> dict[str, Any]:
        if self.merge_steps and self._exact_now:
            raise ValueError(f"this step runs in the exact mode: {_MERGE_NEEDS_INPLACE}")
        lookahead = self._next_seed if self.merge_steps else None
        if self._device_estimate():
            return self._run_device_step(seed, evaluate, lookahead)
        probes, diffs, loss, _ = self._estimate(seed, evaluate)
        if self.momentum:
            self._perturb(probes[-1], self._restore_scale())
            self._momentum_update(probes, diffs)
        else:
            # The last probe's restore carries the update and the weight decay; the other probes' updates follow,
            # two directions per pass, so lambda theta uses the parameters before the step.
            last = probes[-1], self._coefficient(diffs[-1])
            self._restore_update(last[0], self._restore_scale(), last[1], lookahead)
            self._add_directions([(s, _lr_step(self._coefficient(d))) for s, d in zip(probes[:-1], diffs[:-1])])
        grads = [sum(diffs) / (self.n_probes * g["eps"]) for g in self.param_groups]
        return dict(projected_grad=grads, loss=loss, **_folded(lookahead))

    def _run_device_step(self, seed: int, evaluate: Callable[[], Any], lookahead: int | None) -> dict[str, Any]:
        """One probe, no host sync: the losses stay on the device, g = d / eps is formed there and read by the fused
        restore-and-update pass, which restores without updating when g is not finite (a skipped step)."""
        if self._step_closure is not None:
            return self._graph.run(seed, evaluate, self._step_closure)
        return self._device_step_passes(seed, evaluate, lookahead)

    def _device_step_passes(self, seed: int, evaluate: Callable[[], Any], lookahead: int | None) -> dict[str, Any]:
        """The passes and evaluations of a device step: run as they are, or captured by a CUDA graph."""
        values = [evaluate()] if self.one_sided else []
        if not self._claimed:
            self._perturb(seed, 1.0)
        values.append(evaluate())
        if not self.one_sided:
            self._perturb(seed, -2.0)
            values.append(evaluate())
        fields, by_eps = self._device_gradient(values)
        self._restore_update(seed, self._restore_scale(), lambda group: by_eps[group["eps"]], lookahead)
        return dict(fields, **_folded(lookahead))

    def _device_gradient(self, values: list) -> tuple[dict[str, Any], dict[float, torch.Tensor]]:
        """From one probe's evaluated losses, on the parameters' device: the record's losses, loss and skipped flag,
        and g per param group (``projected_grad``), all tensors; and g per distinct eps, one tensor that the groups
        of that eps share (so that their update passes fuse: base._fused)."""
        chunks = self._device_chunks()
        device = chunks[0][2][0].device if chunks else torch.device("cpu")  # nothing trainable: the losses only
        losses, _ = self._reduce(values, device)
        if self.one_sided:
            diff, loss = losses[1] - losses[0], losses[0]
        else:
            diff, loss = 0.5 * (losses[0] - losses[1]), 0.5 * (losses[0] + losses[1])
        # A non-finite loss makes g non-finite (d of inf and a finite value is inf, of inf and inf NaN): no update;
        # nor where some group's g z, or lr g z, would be beyond float32, which the update pass computes in. The
        # pass restores without updating where g is not finite: every group's g is NaN then, so no group updates alone.
        eps = list(dict.fromkeys(group["eps"] for group in self.param_groups))  # distinct, in order (eps > 0)
        grads = torch.stack([diff / e for e in eps])
        ok = torch.isfinite(losses).all() & self._within_limits(grads.abs()).all()
        grads = torch.where(ok, grads, torch.nan)
        loss = torch.where(ok, loss, torch.nan)  # a skipped step's loss is NaN, as its record and the host path say
        by_eps = dict(zip(eps, grads.unbind()))
        if len(eps) == len(self.param_groups):
            per_group = grads
        elif len(eps) == 1:  # a view: no copy per step for a model split into many groups of one eps
            per_group = grads.expand(len(self.param_groups))
        else:
            per_group = torch.stack([by_eps[group["eps"]] for group in self.param_groups])
        return dict(losses=losses, projected_grad=per_group, loss=loss, skipped=~ok), by_eps

    def _momentum_update(self, probes: list[int], diffs: list[float]) -> None:
        rounding = self._update_rounding()
        for group, tensors, offsets in self._groups_layout():
            terms = [(s, self._coefficient(d)(group)) for s, d in zip(probes, diffs)]
            for p, offset in zip(tensors, offsets):
                state = self._state_of(p)
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = new_state(p)
                buf = state["momentum_buffer"]
                buf.mul_(self.momentum).add_(self._direction(p, offset, terms))
                self._write_update(p, offset, buf, group, rounding)


class ZOSignSGD(ZOSGD):
    r"""ZO-SignSGD: the ZO-SGD estimate :math:`\hat g`, but the update uses its elementwise sign,
    :math:`\theta \leftarrow \theta - \eta(\operatorname{sign}(\hat g) + \lambda\theta)` (with momentum:
    the sign of the momentum buffer). The step size is then independent of the loss scale: use a much smaller
    ``lr`` than ZO-SGD (it moves every weight by exactly :math:`\eta`; a 16-bit one by :math:`\eta` in expectation,
    as its update rounds stochastically).

    Extra memory: one float32 tensor the size of the largest trainable parameter, transient (the estimate, or its
    sign with momentum, materialised one tensor at a time; two while several probes are summed, and a float32 copy
    of a 16-bit parameter as it is updated); plus 4 bytes per trainable parameter with momentum.
    Arguments and returned loss as :class:`ZOSGD`.
    """

    _MERGES = False
    _GRAPHS = False
    _LINEAR_UPDATE = False  # theta - lr sign(g) z: bounded whatever g

    def _own_update_rule(self) -> str | None:
        return "its sign"

    def _run_step(self, seed: int, evaluate: Callable[[], Any]) -> dict[str, Any]:
        probes, diffs, loss, _ = self._estimate(seed, evaluate)
        self._perturb(probes[-1], self._restore_scale())
        rounding = self._update_rounding()
        for group, tensors, offsets in self._groups_layout():
            terms = [(s, self._coefficient(d)(group)) for s, d in zip(probes, diffs)]
            for p, offset in zip(tensors, offsets):
                if self.momentum:
                    state = self._state_of(p)
                    if "momentum_buffer" not in state:
                        state["momentum_buffer"] = new_state(p)
                    buffer = state["momentum_buffer"].mul_(self.momentum).add_(self._direction(p, offset, terms))
                    signs = torch.sign(buffer)
                else:
                    signs = self._direction(p, offset, terms).sign_()  # in place: one transient tensor, not two
                self._write_update(p, offset, signs, group, rounding)
        grads = [sum(diffs) / (self.n_probes * g["eps"]) for g in self.param_groups]
        return dict(projected_grad=grads, loss=loss)


class ZOConservative(ZOSGD):
    r"""ZO-SGD with a conservative update: a step is kept only if it lowers the loss on the step's batch.

    After the two-sided estimate at :math:`\theta` (whose loss :math:`L_0` is evaluated first), the candidate
    :math:`\theta - \eta\hat g` is evaluated; if its loss is not below :math:`L_0`, the opposite candidate
    :math:`\theta + \eta\hat g`; if neither is, :math:`\theta` stays (in place, up to the rounding of the three
    moves there and back, about one ulp of :math:`|\theta| + \eta|\hat g|` per element, as a perturbation's restore
    leaves one of :math:`|\theta| + \epsilon|z|`; the exact mode leaves it bit-identical). Decoupled weight decay
    is applied after the choice, :math:`\theta \leftarrow (1 - \eta\lambda)\theta`. Forwards per step: 4 or 5.
    Only one two-sided probe and no momentum (the rule compares single candidates).

    ``step`` returns :math:`L_0`. Extra memory: none. Arguments as :class:`ZOSGD`. For 16-bit parameters the
    accepted candidate is stored as it was evaluated (the exact mode's copies round to nearest): stochastic rounding
    applies to the weight decay only.
    """

    _MERGES = False
    _GRAPHS = False

    def __init__(self, params, lr: float = 1e-6, eps: float = 1e-3, weight_decay: float = 0.0, **kwargs) -> None:
        for name, default in (("momentum", 0.0), ("n_probes", 1), ("one_sided", False)):
            if kwargs.get(name, default) != default:
                raise ValueError(f"ZOConservative supports only {name}={default!r}, got {kwargs[name]!r}")
        super().__init__(params, lr, eps, weight_decay, **kwargs)

    @classmethod
    def _losses_per_step(cls, options: dict[str, Any], record: dict[str, Any]) -> int:
        return 4 if record.get("accepted") == "descent" else 5  # L0, L+, L-, then one or both candidates

    _PROJECTED_LIMIT = ZOSGD._PROJECTED_LIMIT / 2  # the move to the ascent candidate is 2 lr g z

    def _own_update_rule(self) -> str | None:
        return "the conservative choice among candidates"

    def _run_step(self, seed: int, evaluate: Callable[[], Any]) -> dict[str, Any]:
        (probe,), (diff,), _, (loss_at_theta,) = self._estimate(seed, evaluate, leading=(evaluate(),))
        grads = [diff / g["eps"] for g in self.param_groups]
        # theta - eps z now; each move below is one pass, tracked so that a failure restores theta.
        step = self._coefficient(diff)
        self._apply(probe, lambda g: g["eps"] - g["lr"] * step(g))  # to theta - lr g z
        accepted = "descent"
        if not self._gather([evaluate()])[0] < loss_at_theta:
            self._apply(probe, lambda g: 2 * g["lr"] * step(g))  # to theta + lr g z
            accepted = "ascent"
            if not self._gather([evaluate()])[0] < loss_at_theta:
                self._apply(probe, lambda g: -g["lr"] * step(g))  # back to theta
                # The three moves cancel in exact arithmetic but their float sum may not (a residual of 1e-19 that
                # exact mode would write, flipping zeros' signs): theta it is.
                self._displacement.pop(probe, None)
                accepted = "none"
        self._commit_displacement()  # the accepted candidate becomes the parameters
        if any(group["weight_decay"] for group in self.param_groups):
            rounding = self._update_rounding()
            for group, tensors, offsets in self._groups_layout():
                if group["weight_decay"]:
                    for p, offset in zip(tensors, offsets):
                        self._write_update(p, offset, None, group, rounding)
        return dict(projected_grad=grads, loss=loss_at_theta, accepted=accepted)


def _folded(lookahead: int | None) -> dict[str, int]:
    """The record field of a step whose last pass applied the next step's perturbation (replay applies it too)."""
    return {} if lookahead is None else dict(next_seed=lookahead)


def _lr_step(coefficient: Callable[[dict[str, Any]], float]):
    """-lr * c(group): a probe's projected-gradient share as an update coefficient."""
    return lambda group: -group["lr"] * coefficient(group)


_MERGE_NEEDS_INPLACE = (
    "merge_steps leaves theta + eps z in the parameters between steps, which the exact mode never writes: use "
    "perturbation='inplace' (16-bit parameters default to the exact mode)"
)


def _projected_grad(name: str, value: Any) -> float | torch.Tensor:
    """One g: a real number, or a one-element floating tensor (a loss difference left on the device)."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or not value.is_floating_point():
            raise ValueError(
                f"{name} must be a number or a one-element floating tensor, got shape {tuple(value.shape)} and dtype "
                f"{value.dtype}"
            )
        return value.detach().reshape(()).float()
    return _check_number(name, value, None, False)
