"""``ZOPrO``: ZO-SGD whose perturbation is ZOPrO's structured direction instead of the plain stream."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from zokern.optim import ZOSGD
from zokern.optim._interrupts import held_interrupts
from zokern.preference.directions import ZOPrODirection


class ZOPrO(ZOSGD):
    r"""Zeroth-order preference optimisation (Galatolo et al., 2025): two-sided SPSA along
    z = ZOPrODirection (the policy's previous update mixed with noise orthogonal to the reward model's latest update;
    :mod:`zokern.preference.directions`), with the rule and returned loss of :class:`zokern.optim.ZOSGD`.

    ``set_direction(direction)`` installs the direction inputs of the current policy iteration (mu, vhat, gamma),
    built over the optimizer's trainable tensors in canonical order; until then, and with ``direction=None``, z is the
    projected-free Gaussian direction normalised per tensor (MeZO's, up to its norm).

    Parameters must be float32 and perturbed in place: the direction (mu, vhat and the stream's noise together) is
    applied by one fused pass per param group (:meth:`ZOPrODirection.apply_`). Weight decay is not supported. Replay
    needs the direction inputs of every iteration, so ``zokern.replay`` does not cover ZOPrO runs. Extra memory: mu
    and vhat, 8 bytes per trainable parameter (the loop's copies of the next ones, taken at an iteration's start, 8
    more during it).
    """

    _MERGES = False
    _GRAPHS = False
    _DEVICE_ESTIMATE = False  # the structured direction's passes take host coefficients

    def __init__(self, params, lr: float = 1e-4, eps: float = 1e-3, *, seed: int | None = None, **kwargs) -> None:
        for name in ("weight_decay", "momentum"):
            if kwargs.get(name, 0.0):
                raise ValueError(f"ZOPrO does not support {name}")
        kwargs.setdefault("perturbation", "inplace")
        if kwargs["perturbation"] != "inplace":
            raise ValueError("ZOPrO perturbs in place (its direction is not available to the exact mode's view)")
        if kwargs.get("distribution", "gaussian") != "gaussian":
            raise ValueError("ZOPrO's noise is Gaussian")
        super().__init__(params, lr, eps, seed=seed, **kwargs)
        self._check_float32()  # here, not at the first step: a loop would have done its work before it
        self.direction: ZOPrODirection | None = None
        self._own_direction = False  # whether self.direction is the built-in one, made over the trainable tensors
        self._per_group = []
        self._per_group_sizes: list[int] = []  # the trainable tensors per group that _per_group was split for

    def _check_float32(self) -> None:
        for t in self._trainable():
            if t.dtype != torch.float32:
                raise TypeError(f"ZOPrO needs float32 parameters, got {t.dtype}")

    def set_direction(self, direction: ZOPrODirection | None) -> None:
        if direction is not None:
            self._check_float32()
            direction._check(self._trainable())
        self.direction, self._own_direction = direction, False
        self._per_group: list[ZOPrODirection] = []

    def _group_directions(self) -> list[ZOPrODirection]:
        """The direction split by param group (kept, so each group's reductions of a seed are computed once), split
        anew when the trainable tensors change (a group added, a parameter frozen): the built-in direction is made
        over them again, one set by set_direction must fit them."""
        sizes = [len(tensors) for _, tensors, _ in self._groups_layout()]
        if sizes != self._per_group_sizes:
            self._per_group = []
            if self._own_direction:
                self.direction = None
            elif self.direction is not None:
                try:
                    self.direction._check(self._trainable())
                except (TypeError, ValueError) as e:
                    raise ValueError(
                        f"the direction set by set_direction no longer fits the trainable parameters ({e}): a param "
                        "group was added or a parameter frozen or unfrozen since; set a direction built over them"
                    ) from None
        if not self._per_group:
            if self.direction is None:
                n = sum(sizes)
                self.direction, self._own_direction = ZOPrODirection([None] * n, [None] * n, 0.0), True
            index = 0
            for size in sizes:
                self._per_group.append(_Subset(self.direction, index, size))
                index += size
            self._per_group_sizes = sizes
        return self._per_group

    def _check_hyperparameters(self, group: dict[str, Any]) -> None:
        super()._check_hyperparameters(group)
        if group["weight_decay"]:  # the direction's pass has no decay term: a group's would be recorded, not applied
            raise ValueError("ZOPrO does not support weight_decay")

    def _move(self, seed: int, alpha: Callable[[dict[str, Any]], float]) -> None:
        """theta_p += alpha(group of p) z_p(seed) for every trainable tensor."""
        for direction, (group, tensors, offsets) in zip(self._group_directions(), self._groups_layout()):
            direction.apply_([t.data for t in tensors], offsets, seed, alpha(group), backend=self.backend)

    # The pass primitives of ZOOptimizer, with the structured direction in place of the stream.

    def _apply(self, seed: int, alpha: Callable[[dict[str, Any]], float]) -> None:
        with held_interrupts():  # as ZOOptimizer's: the passes and their record together
            self._move(seed, alpha)
            self._track(seed, alpha)

    def _switch(self, seed_from: int, scale_from: float, seed_to: int, scale_to: float) -> None:
        self._apply(seed_from, lambda group: scale_from * group["eps"])
        self._apply(seed_to, lambda group: scale_to * group["eps"])

    def _restore_update(
        self, seed: int, scale: float, coefficient: Callable[[dict[str, Any]], float], lookahead: None = None
    ) -> None:  # ZOPrO does not merge steps: lookahead is always None
        self._begin_update()
        # The direction's pass takes float coefficients (ZOPrO's steps are host-side); a g that apply_projected_grad
        # got as a tensor is read here, and a group's non-finite one restores it without updating, as
        # ops.restore_update_ does for each call.
        grads = {id(group): float(coefficient(group)) for group in self.param_groups}
        grads = {key: g if math.isfinite(g) else 0.0 for key, g in grads.items()}
        with held_interrupts():
            self._move(seed, lambda group: scale * group["eps"] - group["lr"] * grads[id(group)])
            self._track(seed, lambda group: scale * group["eps"])

    def _add_directions(self, terms: list[tuple[int, Callable[[dict[str, Any]], float]]]) -> None:
        self._begin_update()
        for seed, coefficient in terms:
            with held_interrupts():
                self._move(seed, coefficient)


class _Subset(ZOPrODirection):
    """The tensors [start, start + count) of a direction (one param group), sharing its tensors."""

    def __init__(self, full: ZOPrODirection, start: int, count: int) -> None:
        self.gamma = full.gamma
        self._cached_key, self._cached = None, []
        self.mu = full.mu[start : start + count]
        self.mu_norm = full.mu_norm[start : start + count]
        self.vhat = full.vhat[start : start + count]
