"""Re-apply a recorded trajectory to the initial parameters: a run's checkpoint can be its initial weights plus the
trajectory, a few bytes per step."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import torch

from zokern._reference import STREAM_VERSION
from zokern.optim import _distributed
from zokern.optim.adam import ZOAdam
from zokern.optim.base import ZOOptimizer
from zokern.optim.fzoo import FZOO
from zokern.optim.ldsd import LDSD
from zokern.optim.sgd import ZOSGD
from zokern.optim.sgd import ZOConservative
from zokern.optim.sgd import ZOSignSGD

OPTIMIZERS: dict[str, type[ZOOptimizer]] = {
    cls.__name__: cls for cls in (ZOSGD, ZOSignSGD, ZOConservative, ZOAdam, FZOO, LDSD)
}


@torch.no_grad()
@_distributed.alone()
def replay(params: Sequence[torch.Tensor], trajectory: Sequence[dict[str, Any]]) -> ZOOptimizer:
    """Re-run, in place on ``params``, exactly the passes of the recorded steps, with the recorded losses.

    ``params`` are the initial values of every parameter of the optimizer's param groups, in its canonical order
    (groups in order, parameters in order; frozen ones included, they are left alone). On the same backend the
    result is bit-identical to the trained parameters. Every zokern optimizer replays: their steps depend only on
    seeds, hyperparameters and losses, and their states (momentum, Adam moments) are rebuilt along the way.
    Returns the optimizer that replayed, whose state equals the original's. Under torch.distributed any one rank may
    replay alone: the recorded losses are already averaged over the ranks, so replay runs no collective.
    """
    params = list(params)
    if not trajectory:
        raise ValueError("the trajectory is empty")
    if "setup" not in trajectory[0]:
        raise ValueError("the trajectory must start at a record with a 'setup' entry (the first step of a run)")
    optimizer: ZOOptimizer | None = None
    for k, record in enumerate(trajectory):
        if record.get("stream_version") != STREAM_VERSION:
            raise ValueError(
                f"record {k} was written with stream version {record.get('stream_version')}; "
                f"this zokern regenerates version {STREAM_VERSION} only"
            )
        if "setup" in record:
            optimizer = _build(params, record["setup"], optimizer)
        for group, lr, eps, wd in zip(optimizer.param_groups, record["lr"], record["eps"], record["weight_decay"]):
            group.update(lr=lr, eps=eps, weight_decay=wd)
        losses = functools.partial(next, iter(record["losses"]))
        fields = optimizer._take_step(record["seed"], losses, record.get("next_seed"), record.get("claimed", True))
        optimizer.nonfinite_steps += bool(fields["skipped"])
        optimizer.steps_taken = record["step"] + 1
    optimizer.materialize()  # a merged run's last step applied the next perturbation: params end at theta
    return optimizer


def _build(params: list[torch.Tensor], setup: dict[str, Any], previous: ZOOptimizer | None) -> ZOOptimizer:
    sizes, trainable = setup["group_sizes"], setup["trainable"]
    if sum(sizes) != len(params) or len(trainable) != len(params):
        raise ValueError(f"the trajectory's optimizer had {sum(sizes)} parameters; {len(params)} were given")
    if previous is not None:  # a mid-run change (frozen parameters, per-group extras) keeps the optimizer and state
        previous._trainable_override = list(trainable)
        for k, group in enumerate(previous.param_groups):
            group.update(_group_extras(setup, k))
        return previous
    cls = OPTIMIZERS.get(setup["optimizer"])
    if cls is None:
        raise ValueError(f"unknown optimizer {setup['optimizer']!r} in the trajectory")
    groups, start = [], 0
    for k, size in enumerate(sizes):
        group = {"params": params[start : start + size], **_group_extras(setup, k)}
        groups.append(group)
        start += size
    optimizer = cls(groups, seed=0, **{**setup["options"], "seed_check_every": 0})
    optimizer._trainable_override = list(trainable)
    return optimizer


def _group_extras(setup: dict[str, Any], k: int) -> dict[str, Any]:
    """Group k's hyperparameters besides lr, eps and weight_decay, as the trajectory's setup recorded them."""
    return {key: tuple(v[k]) if key == "betas" else v[k] for key, v in setup["group_extras"].items()}
