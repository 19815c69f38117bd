"""ZO-Adam: Adam moments of the ZO-SGD gradient estimate."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from zokern.optim._groups import _check_betas
from zokern.optim._groups import check_adam_eps
from zokern.optim._groups import check_group_adam_eps
from zokern.optim._groups import check_group_betas
from zokern.optim.base import new_state
from zokern.optim.sgd import ZOSGD


class ZOAdam(ZOSGD):
    r"""Adam on the ZO-SGD estimate :math:`\hat g = \frac1q\sum_k (d_k/\epsilon) z_k` (see :class:`ZOSGD`):

    .. math::
        m \leftarrow \beta_1 m + (1-\beta_1)\hat g,\quad v \leftarrow \beta_2 v + (1-\beta_2)\hat g^2,\quad
        \theta \leftarrow \theta - \eta\Big(\frac{m/(1-\beta_1^t)}{\sqrt{v/(1-\beta_2^t)} + \delta}
        + \lambda\theta\Big),

    bias-corrected, with float32 moments whatever the parameters' dtype, and decoupled weight decay
    :math:`\lambda` (AdamW's). :math:`t` counts the updates a parameter received (skipped steps do not count).
    The estimate is materialised one tensor at a time from the stream (the moments need it elementwise).

    Extra memory: 8 bytes per trainable parameter (m and v in float32), plus two float32 tensors the size of the
    largest trainable parameter, transient (the estimate and the denominator; three for 16-bit parameters, with
    their float32 value), and exact mode's transient copy, see :class:`ZOSGD`.

    Args:
        lr: :math:`\eta` (default 1e-4: Adam's step is normalised, so it is not MeZO's 1e-6).
        eps: the perturbation scale :math:`\epsilon` (default 1e-3).
        betas: :math:`(\beta_1, \beta_2)` (default (0.9, 0.999)).
        adam_eps: :math:`\delta` (default 1e-8); named apart from the perturbation's ``eps``.
        Other arguments as :class:`ZOSGD` (``n_probes``, ``one_sided``, ``distribution``, ``seed``, ...), without
        ``momentum``. ``step`` returns the loss :class:`ZOSGD` returns.
    """

    def __init__(
        self,
        params,
        lr: float = 1e-4,
        eps: float = 1e-3,
        weight_decay: float = 0.0,
        *,
        betas: tuple[float, float] = (0.9, 0.999),
        adam_eps: float = 1e-8,
        n_probes: int = 1,
        one_sided: bool = False,
        distribution: str = "gaussian",
        seed: int | None = None,
        backend: str | None = None,
        seed_check_every: int = 100,
        perturbation: str = "auto",
        rounding: str = "auto",
    ) -> None:
        _check_betas(betas)
        check_adam_eps(adam_eps)
        super().__init__(
            params,
            lr,
            eps,
            weight_decay,
            n_probes=n_probes,
            one_sided=one_sided,
            distribution=distribution,
            seed=seed,
            backend=backend,
            seed_check_every=seed_check_every,
            perturbation=perturbation,
            rounding=rounding,
        )
        for group in self.param_groups:
            group.setdefault("betas", tuple(betas))
            group.setdefault("adam_eps", adam_eps)
        self.defaults.update(betas=tuple(betas), adam_eps=adam_eps)

    _PROJECTED_LIMIT = ZOSGD._SQUARED_PROJECTED_LIMIT  # the second moment holds (g z)^2 in float32
    _LINEAR_UPDATE = False  # its step is about lr whatever g

    def _check_hyperparameters(self, group: dict[str, Any]) -> None:
        super()._check_hyperparameters(group)
        # Each once present: torch.optim adds the groups before the constructor fills in these defaults.
        if "betas" in group:
            check_group_betas(group)
        if "adam_eps" in group:
            check_group_adam_eps(group)

    def options(self) -> dict[str, Any]:
        options = super().options()
        del options["momentum"]
        return options

    def _extra_group_keys(self) -> tuple[str, ...]:
        return ("betas", "adam_eps")

    _COUNT_STATES = ("step",)

    def _state_keys(self) -> tuple[str, ...]:
        return ("exp_avg", "exp_avg_sq")

    def _own_update_rule(self) -> str | None:
        return "Adam"

    def _run_step(self, seed: int, evaluate: Callable[[], Any]) -> dict[str, Any]:
        probes, diffs, loss, _ = self._estimate(seed, evaluate)
        self._perturb(probes[-1], self._restore_scale())
        rounding = self._update_rounding()  # one update pass over every parameter
        for group, tensors, offsets in self._groups_layout():
            beta1, beta2 = group["betas"]
            terms = [(s, self._coefficient(d)(group)) for s, d in zip(probes, diffs)]
            for p, offset in zip(tensors, offsets):
                g = self._direction(p, offset, terms)
                state = self._state_of(p)
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = new_state(p)
                    state["exp_avg_sq"] = new_state(p)
                state["step"] += 1
                t = state["step"]
                m, v = state["exp_avg"], state["exp_avg_sq"]
                m.mul_(beta1).add_(g, alpha=1 - beta1)
                v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
                denominator = (v / (1 - beta2**t)).sqrt_().add_(group["adam_eps"])
                self._write_update(p, offset, m.div(denominator).div_(1 - beta1**t), group, rounding)
        grads = [sum(diffs) / (self.n_probes * g["eps"]) for g in self.param_groups]
        return dict(projected_grad=grads, loss=loss)
