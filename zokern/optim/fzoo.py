"""FZOO: several one-sided Rademacher probes per step, the step normalised by the spread of their losses."""

from __future__ import annotations

import statistics
from collections.abc import Callable
from typing import Any

from zokern.optim import seeds as seeds_
from zokern.optim.base import ZOOptimizer


class FZOO(ZOOptimizer):
    r"""FZOO-style optimizer (Dang et al., 2025): N one-sided Rademacher probes and the loss at :math:`\theta`,

    .. math::
        L_i = L(\theta + \epsilon u_i),\quad \sigma = \operatorname{std}(L_1, \dots, L_N),\quad
        \theta \leftarrow \theta - \eta\Big(\frac{1}{N\sigma}\sum_i (L_i - L(\theta))\, u_i + \lambda\theta\Big),

    with :math:`\sigma` the sample standard deviation (N - 1 in the denominator). Dividing by :math:`\sigma`
    makes the step invariant to the loss's scale and shrinks it where the losses are noisy. If all :math:`L_i` are
    equal (:math:`\sigma = 0`), the step carries no information and is skipped (``record["flat"]``).
    Passes per step: one per probe (each moves from the previous probe to the next), then the last probe's restore
    carries its update and the other updates follow two per pass.

    ``step`` returns :math:`L(\theta)`. The trajectory's ``projected_grad`` is the list of
    :math:`(L_i - L(\theta))/(N\sigma)`, one per probe, shared by every group. Extra memory: none (in exact mode, a
    transient copy: see :class:`ZOSGD`).

    Args:
        n_probes: N >= 2 (default 8). ``distribution`` defaults to ``"rademacher"``, as in FZOO; other arguments
            as :class:`ZOSGD`.
    """

    def __init__(
        self,
        params,
        lr: float = 1e-6,
        eps: float = 1e-3,
        weight_decay: float = 0.0,
        *,
        n_probes: int = 8,
        distribution: str = "rademacher",
        seed: int | None = None,
        backend: str | None = None,
        seed_check_every: int = 100,
        perturbation: str = "auto",
        rounding: str = "auto",
    ) -> None:
        if isinstance(n_probes, bool) or not isinstance(n_probes, int) or n_probes < 2:
            raise ValueError(f"n_probes must be an integer >= 2 (the spread needs two losses), got {n_probes!r}")
        self.n_probes = n_probes
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

    def options(self) -> dict[str, Any]:
        return dict(super().options(), n_probes=self.n_probes)

    @classmethod
    def _losses_per_step(cls, options: dict[str, Any], record: dict[str, Any]) -> int:
        return options["n_probes"] + 1

    def _own_update_rule(self) -> str:
        return "its probes' losses over their spread"

    def _run_step(self, seed: int, evaluate: Callable[[], Any]) -> dict[str, Any]:
        probes = [seeds_.probe_seed(seed, k) for k in range(self.n_probes)]
        values = [evaluate()]
        for k, s in enumerate(probes):
            if k == 0:
                self._perturb(s, 1.0)
            else:
                self._switch(probes[k - 1], -1.0, s, 1.0)
            values.append(evaluate())
        loss_at_theta, *losses = self._gather(values)  # one all_reduce of N + 1 losses
        spread = statistics.stdev(losses)
        if spread == 0.0:
            self._perturb(probes[-1], -1.0)
            return dict(projected_grad=[0.0] * self.n_probes, loss=loss_at_theta, flat=True)
        coefficients = [(value - loss_at_theta) / (self.n_probes * spread) for value in losses]
        self._check_projected(coefficients, per_eps=False)  # a spread tiny beside L_i - L_0 (lr scales them)
        self._restore_update(probes[-1], -1.0, lambda group: coefficients[-1])
        self._add_directions([(s, lambda group, c=c: -group["lr"] * c) for s, c in zip(probes[:-1], coefficients[:-1])])
        return dict(projected_grad=coefficients, loss=loss_at_theta, flat=False)
