"""Re-apply a recorded trajectory to the initial parameters: a run's checkpoint can be its initial weights plus the
trajectory, a few hundred bytes per step (docs/optim.md)."""

from __future__ import annotations

import functools
import math
import numbers
import warnings
from collections.abc import Sequence
from typing import Any

import torch

from zokern import ops
from zokern._reference import STREAM_VERSION
from zokern.optim import _distributed
from zokern.optim._checkpoint import _RESUMABLE_OPTIONS
from zokern.optim._groups import check_step_hyperparameters
from zokern.optim._groups import dtype_name
from zokern.optim.adam import ZOAdam
from zokern.optim.base import ZOOptimizer
from zokern.optim.base import real_as_float
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
    (groups in order, parameters in order; frozen ones included, they are left alone; groups added during the run
    last, as they were added). ``trajectory`` is the run's from its first step (a resumed run's records follow those
    written before its checkpoint). On the same backend the result is bit-identical to the trained parameters. Every
    optimizer of zokern.optim replays (not zokern.preference's ZOPrO, whose directions depend on more than the
    trajectory records): their steps depend only on seeds, hyperparameters and losses, and their states
    (momentum, Adam moments) are rebuilt along the way. Returns the optimizer that replayed, whose state equals the
    original's: its next step is the one the run would have taken (same seed), and it trains the parameters whose
    ``requires_grad`` is set when ``params`` carry the run's last trainable set (else that recorded set). Under
    torch.distributed any one rank may replay alone: the recorded losses are already averaged over
    the ranks, so replay runs no collective.

    The whole trajectory is checked against ``params`` first: a mismatch raises before any parameter is written.
    """
    params = list(params)
    _check(params, trajectory)
    optimizer: ZOOptimizer | None = None
    for record in trajectory:
        if "setup" in record:
            # A merged run that converted its parameters with the last step's perturbation still applied converted
            # theta + eps z (a step that claimed it had: records before converted_pending say only that); one that
            # called materialize() first, as the docs ask, theta.
            pending = record.get("converted_pending") or record.get("claimed") or record.get("took_back")
            _convert(params, record["setup"], None if pending else optimizer)
            optimizer = _build(params, record["setup"], optimizer)
        for group, lr, eps, wd in zip(optimizer.param_groups, record["lr"], record["eps"], record["weight_decay"]):
            group.update(lr=lr, eps=eps, weight_decay=wd)
        values = [real_as_float(v) for v in record["losses"]]  # (JSON writes 3.0 as 3; the host path takes floats)
        losses = functools.partial(next, iter(values))
        if record.get("raised"):
            # It raised in an evaluation, or after its last one (a Ctrl-C held to the end of a restore pass, or
            # caught while the host waited for the losses): either way before its first update pass, which a step
            # holds a Ctrl-C through until its record says it completed. (Not told apart: a Ctrl-C at the host's
            # wait before ZOConservative's or LDSD's move to a candidate, which replay runs, then undoes.)
            losses = _raising_after(values)
            optimizer._update_hold = _UpdateNeverBegan()
        try:
            fields = optimizer._take_step(record["seed"], losses, record.get("next_seed"), record.get("claimed", True))
            optimizer.nonfinite_steps += bool(fields["skipped"])
        except _ClosureRaised:
            pass  # the step's own undo ran, as when its closure raised
        finally:
            optimizer._update_hold = None
        optimizer.steps_taken = record["step"] + 1
    optimizer.materialize()  # a merged run's last step applied the next perturbation: params end at theta
    _hand_over(optimizer, params, trajectory[_last_setup(trajectory)]["setup"])
    return optimizer


def _hand_over(optimizer: ZOOptimizer, params: list[torch.Tensor], setup: dict[str, Any]) -> None:
    """Make the replaying optimizer the run's, to go on stepping: its seeds, its collective seed checks, and its
    trainable set taken from requires_grad again where the given parameters carry the recorded one."""
    optimizer.seed_check_every = setup["options"].get("seed_check_every", optimizer.seed_check_every)
    if "base_seed" in setup:
        optimizer.base_seed = setup["base_seed"]
    else:
        warnings.warn(
            "this trajectory was written by an older zokern, which did not record the run's base seed: the returned "
            "optimizer holds the replayed parameters' state, but its next steps would draw other seeds than the "
            "run's. To go on with the run, load its state_dict into an optimizer of these parameters.",
            UserWarning,
            stacklevel=3,
        )
    if [p.requires_grad for p in params] == list(setup["trainable"]):
        optimizer._trainable_override = None
    optimizer._ranks_compared = True  # the run's ranks compared their options at its first step


_RECORD_KEYS = ("step", "seed", "losses", "lr", "eps", "weight_decay", "stream_version")


class _ClosureRaised(Exception):
    """Where a recorded step's closure raised."""


class _UpdateNeverBegan:
    """In a raised step's replay, where the step's first update pass begins (ZOOptimizer._begin_update): the run
    raised before it."""

    def __enter__(self) -> None:
        raise _ClosureRaised


def _raising_after(losses: list[float]):
    """The evaluations of a step whose closure raised: its recorded losses, then the raise."""
    values = iter(losses)

    def evaluate() -> float:
        value = next(values, None)
        if value is None:
            raise _ClosureRaised
        return value

    return evaluate


def _check(params: list[torch.Tensor], trajectory: Sequence[dict[str, Any]]) -> None:
    """Everything replay will need, before it writes anything."""
    if not trajectory:
        raise ValueError("the trajectory is empty")
    for k, record in enumerate(trajectory):
        if not isinstance(record, dict):
            raise ValueError(f"record {k} is of type {type(record).__name__}, not a dict: not a trajectory record")
    if "setup" not in trajectory[0]:
        raise ValueError("the trajectory must start at a record with a 'setup' entry (the first step of a run)")
    sizes: list[int] = []
    setup: dict[str, Any] = trajectory[0]["setup"]
    for k, record in enumerate(trajectory):
        missing = [key for key in _RECORD_KEYS if key not in record]
        if missing:
            raise ValueError(f"record {k} lacks {', '.join(missing)}: not a zokern trajectory record")
        if record["stream_version"] != STREAM_VERSION:
            raise ValueError(
                f"record {k} was written with stream version {record['stream_version']}; "
                f"this zokern regenerates version {STREAM_VERSION} only"
            )
        if record["step"] != k:
            raise ValueError(
                f"record {k} is step {record['step']}: replay rebuilds the optimizer's state from a run's first step, "
                "record after record (a resumed run's trajectory goes after the records written before its checkpoint; "
                "a seed drawn outside step, by new_seed() for apply_projected_grad, leaves a step no record)"
            )
        if "setup" in record:
            sizes = _check_setup(params, record["setup"], k, sizes, setup)
            setup = record["setup"]
        if not len(record["lr"]) == len(record["eps"]) == len(record["weight_decay"]) == len(sizes):
            raise ValueError(f"record {k} has hyperparameters for {len(record['lr'])} param groups, not {len(sizes)}")
        _check_step(record, k, setup)
    used = sum(trajectory[_last_setup(trajectory)]["setup"]["group_sizes"])
    if used != len(params):
        raise ValueError(f"the trajectory's optimizer had {used} parameters; {len(params)} were given")


def _check_step(record: dict[str, Any], k: int, setup: dict[str, Any]) -> None:
    """Record k's seeds and hyperparameters can be applied and its losses are those its step evaluates (a step that
    raised or was skipped stopped early)."""
    for key in ("seed", "next_seed"):
        if record.get(key) is not None or key == "seed":
            try:
                ops._check_index(key, record[key])
            except (TypeError, ValueError) as e:
                raise ValueError(f"record {k}: {e}") from None
    for j, values in enumerate(zip(record["lr"], record["eps"], record["weight_decay"])):
        try:
            check_step_hyperparameters(*values)
        except (TypeError, ValueError) as e:
            raise type(e)(f"record {k}, param group {j}: {e}") from None
    losses = record["losses"]
    if not isinstance(losses, (list, tuple)) or not all(
        isinstance(v, numbers.Real) and not isinstance(v, bool) for v in losses
    ):
        raise ValueError(f"record {k}: its losses must be a list of numbers, got {losses!r}")
    expected = OPTIMIZERS[setup["optimizer"]]._losses_per_step(setup["options"], record)
    if record.get("raised") or record.get("skipped"):  # stopped early (a skip: at a round it could not apply)
        consistent = len(losses) <= expected
    else:
        consistent = len(losses) == expected and all(math.isfinite(real_as_float(v)) for v in losses)
    if not consistent:
        state = "raised" if record.get("raised") else "skipped" if record.get("skipped") else "completed"
        raise ValueError(
            f"record {k} has losses {losses}: a {state} step of this {setup['optimizer']} evaluates "
            f"{'at most ' if state != 'completed' else ''}{expected}"
            f"{', all finite' if state == 'completed' else ''}"
        )


def _check_setup(
    params: list[torch.Tensor], setup: dict[str, Any], k: int, before: list[int], previous: dict[str, Any]
) -> list[int]:
    """The param groups' sizes from record k on; raises if ``params`` cannot be the parameters they describe, or the
    setup is not one the run's optimizer could have had (a resumed run may change only _RESUMABLE_OPTIONS)."""
    sizes = list(setup["group_sizes"])
    if k == 0 and setup["optimizer"] not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {setup['optimizer']!r} in the trajectory")
    if setup["optimizer"] != previous["optimizer"]:
        raise ValueError(f"record {k}: the optimizer became a {setup['optimizer']}, from a {previous['optimizer']}")
    old, new = previous["options"], setup["options"]
    changed = sorted(
        key for key in old.keys() | new.keys() if key not in _RESUMABLE_OPTIONS and old.get(key) != new.get(key)
    )
    if changed:
        raise ValueError(
            f"record {k} changes {', '.join(changed)}: no run of one optimizer can (a resumed run keeps them)"
        )
    if sizes[: len(before)] != before:
        raise ValueError(f"record {k}: param groups of sizes {before} became {sizes}; only groups can be added")
    if sum(sizes) > len(params):
        raise ValueError(f"the trajectory's optimizer had {sum(sizes)} parameters at step {k}; {len(params)} given")
    if len(setup["trainable"]) != sum(sizes):
        raise ValueError(
            f"record {k}'s setup lists {len(setup['trainable'])} trainable flags for param groups of {sum(sizes)} "
            "parameters: a damaged record"
        )
    # Trajectories before these entries were recorded are replayed unchecked. A run may convert its parameters
    # between steps (model.half()): replay converts them where its setup says so (_convert), so only the
    # parameters a setup adds (all of them at the first) must come in the dtype the run had.
    known = sum(before) if k else 0
    was, now = previous.get("numels"), setup.get("numels")
    if k and was is not None and now is not None:
        resized = next((j for j, (a, b) in enumerate(zip(was, now)) if a != b), None)
        if resized is not None:  # no initial parameters can fit both: say so, not that these are the wrong ones
            raise ValueError(
                f"the run changed parameter {resized}'s numel from {was[resized]} to {now[resized]} at record {k} "
                f"(resize_token_embeddings between steps, say): replay cannot follow a resize; it can replay the "
                f"records before it, trajectory[:{k}]"
            )
    for name, want, have, start in (
        ("numel", setup.get("numels"), [p.numel() for p in params[: sum(sizes)]], 0),
        # A run may reshape a parameter between steps (its stream is row-major whatever its shape).
        ("shape", setup.get("shapes"), [list(p.shape) for p in params[: sum(sizes)]], known),
        ("dtype", setup.get("dtypes"), [dtype_name(p.dtype) for p in params[: sum(sizes)]], known),
    ):
        if want is not None and want[start:] != have[start:]:
            j = next(i for i, (a, b) in enumerate(zip(want, have)) if a != b and i >= start)
            raise ValueError(
                f"params[{j}] has {name} {have[j]}, but the trajectory's parameter {j} had {want[j]} (record {k}): "
                "pass the initial parameters as the run had them, in the optimizer's canonical order"
            )
    if k and setup.get("dtypes") is not None and previous.get("dtypes") is not None:
        # Replay converts before the record's step. A merged perturbation still pending on a parameter the last
        # steps trained is taken back by that step, which the run's own step may have failed to do (a dtype the
        # passes refuse): such a conversion only to a dtype they write. Any other parameter takes any dtype.
        pending = [trained and previous["options"].get("merge_steps", False) for trained in previous["trainable"]]
        for j, (was, now, taken_back) in enumerate(zip(previous["dtypes"], setup["dtypes"][:known], pending)):
            if now != was and taken_back and now not in _CONVERTIBLE:
                raise ValueError(
                    f"record {k}: the run converted parameter {j} from {was} to {now}, which replay does not follow "
                    f"(only to {', '.join(_CONVERTIBLE)})"
                )
    try:
        if "base_seed" in setup:
            ops._check_index("base_seed", setup["base_seed"])
        # The options and per-group hyperparameters as the constructor checks them, then the parameters this setup
        # trains as a step checks them (layout, dtype, shared memory): neither writes anything.
        optimizer = _construct(params, setup)
        optimizer._trainable_override = list(setup["trainable"])
        optimizer._groups_layout()
    except (TypeError, ValueError) as e:
        raise ValueError(f"record {k}'s setup: {e}") from None
    return sizes


def _last_setup(trajectory: Sequence[dict[str, Any]]) -> int:
    return max(k for k, record in enumerate(trajectory) if "setup" in record)


def _groups(params: list[torch.Tensor], setup: dict[str, Any]) -> list[dict[str, Any]]:
    groups, start = [], 0
    for k, size in enumerate(setup["group_sizes"]):
        groups.append({"params": params[start : start + size], **_group_extras(setup, k)})
        start += size
    return groups


def _construct(params: list[torch.Tensor], setup: dict[str, Any]) -> ZOOptimizer:
    return OPTIMIZERS[setup["optimizer"]](_groups(params, setup), seed=0, **{**setup["options"], "seed_check_every": 0})


_CONVERTIBLE = tuple(map(dtype_name, ops.SUPPORTED_DTYPES))  # what the passes write


def _convert(params: list[torch.Tensor], setup: dict[str, Any], optimizer: ZOOptimizer | None) -> None:
    """Give each parameter the dtype the run's setup records, as the run's conversion did (``model.half()`` sets
    ``p.data`` to the values rounded to nearest). With ``optimizer``, from theta: its pending merged perturbation is
    taken back first, as the run's ``materialize()`` before converting did."""
    converted = [(p, name) for p, name in zip(params, setup.get("dtypes") or ()) if dtype_name(p.dtype) != name]
    if converted and optimizer is not None:
        optimizer.materialize()
    for p, name in converted:
        p.data = p.data.to(getattr(torch, name))


def _build(params: list[torch.Tensor], setup: dict[str, Any], previous: ZOOptimizer | None) -> ZOOptimizer:
    if previous is None:
        optimizer = _construct(params, setup)
        optimizer._trainable_override = list(setup["trainable"])
        return optimizer
    # A mid-run change (frozen parameters, per-group extras, added groups) keeps the optimizer and state.
    optimizer = previous
    groups = _groups(params, setup)
    for group, extras in zip(optimizer.param_groups, groups):
        group.update({k: v for k, v in extras.items() if k != "params"})
    for group in groups[len(optimizer.param_groups) :]:
        optimizer.add_param_group(group)
    optimizer._trainable_override = list(setup["trainable"])
    # A resumed run may compute its steps another way (its checkpoint was loaded into an optimizer constructed with
    # other _RESUMABLE_OPTIONS); its records follow them. A pending merged perturbation is taken back by the next
    # step, as the checkpoint took it back.
    options = setup["options"]
    optimizer.backend, optimizer.perturbation, optimizer.rounding = (
        options["backend"],
        options["perturbation"],
        options["rounding"],
    )
    if isinstance(optimizer, ZOSGD):
        optimizer.merge_steps = optimizer._check_merge(options.get("merge_steps", False))
    return optimizer


def _group_extras(setup: dict[str, Any], k: int) -> dict[str, Any]:
    """Group k's hyperparameters besides lr, eps and weight_decay, as the trajectory's setup recorded them."""
    return {key: tuple(v[k]) if key == "betas" else v[k] for key, v in setup["group_extras"].items()}
