"""What every zokern ZO optimizer shares: seeds, fused passes per param group over the canonical layout of the stream
(_layout.py), exception-safe loss evaluation, loss averaging across data-parallel ranks, and the trajectory.

A subclass implements ``_run_step(seed, evaluate)``: the sequence of passes and loss evaluations of one step.
``evaluate()`` returns the next loss as this rank knows it (a tensor, no host sync); ``_gather(values)`` turns a round
of them into floats, averaged across data-parallel ranks in one all_reduce, and records them. ``step(closure)`` runs
a step with losses from the closure; ``replay`` runs it with the losses a trajectory recorded (floats, which gather
as they are), which re-runs exactly the same passes.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import numbers
import signal
import warnings
import weakref
from collections.abc import Callable
from collections.abc import Iterator
from typing import Any

import torch

from zokern import _dispatch
from zokern import _reference
from zokern import ops
from zokern._reference import STREAM_VERSION
from zokern.optim import _distributed
from zokern.optim import _hooks
from zokern.optim import _shards
from zokern.optim import seeds as seeds_
from zokern.optim._caches import clear_weight_caches
from zokern.optim._caches import warn_if_compiled_weights_are_frozen
from zokern.optim._checkpoint import _DCP_STATE_DICT
from zokern.optim._checkpoint import Checkpointing
from zokern.optim._checkpoint import _called_from
from zokern.optim._groups import GroupChecks
from zokern.optim._groups import _check_number
from zokern.optim._groups import check_perturbation_scale
from zokern.optim._groups import dtype_name
from zokern.optim._interrupts import held_interrupts
from zokern.optim._layout import LayoutChecks
from zokern.optim._pending import PendingRecord
from zokern.optim._randomness import BlockRandomness
from zokern.optim._randomness import SharedRandomness
from zokern.optim.exact import ParameterUse
from zokern.optim.exact import PerturbedView
from zokern.optim.lookahead import Lookahead
from zokern.optim.lookahead import take_back_others

PERTURBATIONS = ("auto", "exact", "inplace")
ROUNDINGS = ("auto", "stochastic", "nearest")
_SIXTEEN_BIT = (torch.bfloat16, torch.float16)
_ROUNDING_CHUNK = 1 << 22  # elements per stochastically rounded write: at most ~200 MB of temporaries

Closure = Callable[[], Any]


class NonFiniteLoss(Exception):
    """Raised inside a step when an evaluated loss is NaN or infinite, or the projected gradient is beyond float32
    (the passes' precision, where it would write inf or NaN); the step restores and skips its update."""


class ZOOptimizer(GroupChecks, LayoutChecks, Checkpointing, torch.optim.Optimizer):
    """Base class of zokern's zeroth-order optimizers (not used directly).

    Canonical order: param groups in order, parameters within a group in order, elements row-major. Parameter k's
    first element has global stream index ``sum(numel of the parameters before it)``, whether or not those are
    trainable: freezing one parameter (``requires_grad=False``) leaves the others' z unchanged. Frozen parameters
    are never written.
    """

    def __init__(
        self,
        params,
        defaults: dict[str, Any],
        *,
        seed: int | None,
        distribution: str,
        backend: str | None,
        seed_check_every: int,
        perturbation: str = "auto",
        rounding: str = "auto",
    ) -> None:
        if perturbation not in PERTURBATIONS:
            raise ValueError(f"perturbation must be one of {', '.join(map(repr, PERTURBATIONS))}, got {perturbation!r}")
        if rounding not in ROUNDINGS:
            raise ValueError(f"rounding must be one of {', '.join(map(repr, ROUNDINGS))}, got {rounding!r}")
        if distribution not in ("gaussian", "rademacher"):
            raise ValueError(f"distribution must be 'gaussian' or 'rademacher', got {distribution!r}")
        if not isinstance(seed_check_every, int) or seed_check_every < 0:
            raise ValueError(f"seed_check_every must be a non-negative integer, got {seed_check_every!r}")
        _dispatch.available_requested_backend(backend)  # its device is checked by the passes
        super().__init__(params, defaults)
        _shards.check_optimizer_params(self._all_params())
        self.distribution = distribution
        self.backend = backend
        self.seed_check_every = seed_check_every
        self.perturbation = perturbation
        self.rounding = rounding
        # One collective every rank makes alike first: a rank given seed=None broadcasts below while one given a
        # seed compares it, and the two collectives would wait for each other until the process group times out.
        _distributed.check_same_seed(int(seed is None), "use of seed=None (1) or a given seed (0)")
        if seed is None:
            base_seed = _distributed.broadcast_seed(seeds_.draw_base_seed())
        else:
            base_seed = ops._check_index("seed", seed)
        _distributed.check_same_seed(base_seed, "optimizer seed")
        # new_seed's periodic check is a collective: every rank must reach it at the same steps.
        _distributed.check_same_seed(seed_check_every, "seed_check_every")
        self.base_seed = base_seed
        self.steps_taken = 0
        self._nonfinite = 0
        self._trajectory: list[dict[str, Any]] = []
        self._unsettled: list[PendingRecord] = []  # records whose values are still on the device, in step order
        self._trainable_override: list[bool] | None = None  # set by replay, whose tensors carry no requires_grad
        self._last_setup: dict[str, Any] | None = None
        self._step_layout: list | None = None  # the layout of the step in progress
        self._sharded = False  # whether the last layout's groups hold DTensors, whose forwards are collectives
        self._owners: dict[int, torch.Tensor] = {}  # and the DTensor of each shard, by the shard's id
        # Derived from it, built at the step's first use: the per-device chunks, and the sets of their tensors that
        # the step's passes take, each validated once for all of them (ops.prepare).
        self._step_chunks: list | None = None
        self._step_prepared: dict[tuple[int, ...], ops.PreparedTensors] = {}
        self._losses: list[float] = []  # the current step's gathered losses, in evaluation order
        self._reduced: list[torch.Tensor] = []  # and its rounds' losses as reduced, gathered or kept on the device
        self._loss_device = torch.device("cpu")  # where step() returns the loss: the closure's device
        # Perturbations applied and not yet undone (exact mode: the perturbation the closure sees): seed -> the
        # total coefficient of z(seed) in each group.
        self._displacement: dict[int, list[float]] = {}
        self._step_seed = 0
        self._round = 0  # loss reductions so far in this step
        self._agreement: list[torch.Tensor] = []  # their device flags: whether every rank was at the same round
        self._seen_disagreement = False  # whether a reduction read on the host found the ranks at different rounds
        self._step_digest: int | None = None  # what the ranks' steps must share (_digest), made once per step
        self._ranks_compared = False  # whether a step compared the class and options across ranks (kept by copies)
        self._exact_now = False
        self._warned_16bit_loss = False
        self._warned_nothing_trainable = False
        self._checked_values: list[tuple | None] = []  # per group, the hyperparameters the last step found valid
        self._update_passes = 0  # update passes of the current step: each takes its own rounding seed
        self._rows: Iterator[torch.Tensor] | None = None  # a CUDA graph's scalar rows, one per pass (graph.py)
        self._capturing = False  # while a CUDA graph records the step: its passes run nothing (graph.py)
        self.merge_steps = False  # set by optimizers that fold the next step's perturbation into their last pass
        self._lookahead = Lookahead()
        _hooks.install(self)
        self._watch_lookahead()
        self._claimed = False  # whether this step's first perturbation was already applied by the last step
        self._next_seed: int | None = None  # the seed the step in progress may fold in (merge_steps)
        self._busy = False  # while a step or a perturbed() block runs: a nested one would corrupt its bookkeeping
        self._block_randomness = BlockRandomness()  # perturbed(): each seed's first draws
        self._checked_memory: tuple | None = None  # the trainable parameters' memory _check_distinct_memory last passed
        self._update_hold: held_interrupts | None = None  # during step(): holds Ctrl-C from its update to its record

    def _watch_lookahead(self) -> None:
        # An optimizer collected between merged steps leaves theta behind; not at interpreter exit, where the
        # parameters die with the process and the device may already be gone.
        weakref.finalize(self, self._lookahead.close).atexit = False

    # What copy.deepcopy and pickle (torch.save of the object) keep: everything a copy needs to go on stepping as
    # the original would, not only what torch.optim keeps (defaults, state, param_groups); a pending merged
    # perturbation included (lookahead.py), so a model copied before or after its optimizer agrees with it. Device
    # records in flight are settled first; a captured CUDA graph is not copied (the copy captures its own). What
    # belongs to the original object stays with it, as torch.optim does: hooks registered on it, and the wrapper an
    # LR scheduler puts on its ``step`` (which holds the original: a copy's step would step the original).
    _TRANSIENT = (
        "_unsettled",
        "_rows",
        "_capturing",
        "_step_chunks",
        "_step_prepared",
        "_block_randomness",
        "step",
    ) + tuple(
        f"_optimizer_{kind}_hooks"
        for kind in ("step_pre", "step_post", "state_dict_pre", "state_dict_post")
        + ("load_state_dict_pre", "load_state_dict_post")
    )

    def __getstate__(self) -> dict[str, Any]:
        self._settle()
        return {k: v for k, v in self.__dict__.items() if k not in self._TRANSIENT}

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)  # new, empty hook dicts
        if _loading(state):
            return
        _hooks.install(self)
        self._unsettled, self._rows, self._capturing = [], None, False
        self._step_chunks, self._step_prepared = None, {}
        self._checked_values = []
        self._busy = False
        self._block_randomness = BlockRandomness()
        self.__dict__.setdefault("_ranks_compared", True)  # an optimizer pickled before the flag had stepped or not
        self._checked_memory = None
        self._update_hold = None
        self._watch_lookahead()

    # ------------------------------------------------------------------------------------------- fused calls

    def _follow_new_shards(self) -> None:
        """After a closure that ran an FSDP2 tree's first forward: if that gave shards new local tensors (torch 2.6
        pads uneven ones so, copying their values), the step's later passes take the new ones, not the tensors its
        layout holds (which FSDP2 no longer reads: the forwards after them would see the old values, and the update
        would be lost)."""
        if not _shards.modules_learned() or self._step_layout is None:  # (outside a step, each pass lays out anew)
            return
        if all(id(_shards.local_tensor(p)) == key for key, p in self._owners.items()):
            return
        self._step_layout = None
        self._step_layout = self._groups_layout()
        self._step_chunks, self._step_prepared = None, {}

    def _device_chunks(self) -> list[tuple[int, dict[str, Any], list[torch.Tensor], list[int]]]:
        """(group index, group, trainable parameters, offsets) per param group and device: one fused call each."""
        if self._step_chunks is not None:
            return self._step_chunks
        out = []
        for index, (group, params, offsets) in enumerate(self._groups_layout()):
            by_device: dict[torch.device, tuple[list[torch.Tensor], list[int]]] = {}
            for p, b in zip(params, offsets):
                entry = by_device.setdefault(p.device, ([], []))
                entry[0].append(p)
                entry[1].append(b)
            out.extend((index, group, ps, bs) for ps, bs in by_device.values())
        if self._step_layout is not None:
            self._step_chunks = out
        return out

    def _fused(self, scalars_of: Callable[[dict[str, Any]], tuple]) -> list[tuple[tuple, ops.PreparedTensors]]:
        """A pass's calls: (scalars, the parameters' ``.data`` as a prepared set) per device and distinct
        ``scalars_of(group)``. Groups whose scalars for this pass are equal run as one call, whose result is bit for
        bit theirs (each element depends only on its global index and the scalars): a model split into many groups
        (layer-wise learning rates, a group per parameter) launches as few calls as it has distinct values, where each
        call costs host time. One call per entry of ``_device_chunks()`` while a CUDA graph's step runs, whose rows
        are planned so (graph.py)."""
        if self._owners:
            _shards.shards_written()
        chunks = self._device_chunks()
        if self._rows is not None:
            return [(scalars_of(group), self._prepared(chunks, (k,))) for k, (_, group, _, _) in enumerate(chunks)]
        calls: dict[tuple, tuple[tuple, list[int]]] = {}
        for k, (_, group, params, _) in enumerate(chunks):
            scalars = scalars_of(group)
            calls.setdefault((params[0].device, *_call_key(scalars)), (scalars, []))[1].append(k)
        return [(scalars, self._prepared(chunks, tuple(entries))) for scalars, entries in calls.values()]

    def _prepared(self, chunks: list, entries: tuple[int, ...]) -> ops.PreparedTensors:
        """These entries of ``chunks`` (``_device_chunks()``, of one device) as one set of tensors validated by
        ops.prepare, for one fused call; within a step, validated once for all of its passes."""
        prepared = self._step_prepared.get(entries)
        if prepared is None:
            chunks = [chunks[k] for k in entries]
            params = [p for _, _, chunk_params, _ in chunks for p in chunk_params]
            try:
                prepared = ops.prepare([p.data for p in params], offsets=[b for *_, offsets in chunks for b in offsets])
            except ValueError:  # its message counts in the joined set: name the parameter instead
                if not torch.is_inference_mode_enabled():
                    self._refuse_inference_tensors(self._groups_layout(), params)
                raise
            if self._step_layout is not None:
                self._step_prepared[entries] = prepared
        return prepared

    def materialize(self) -> None:
        """Make the parameters hold the true theta: with ``merge_steps``, a step leaves them at theta + eps z(next
        seed) (see :mod:`zokern.optim.lookahead`, which lists the reads that call this automatically). One pass
        when a perturbation is pending; nothing otherwise."""
        self._lookahead.materialize()

    def _pass_kwargs(self) -> dict[str, Any]:
        return dict(distribution=self.distribution, backend=self.backend)

    def _trainable(self) -> list[torch.Tensor]:
        return [p for _, tensors, _ in self._groups_layout() for p in tensors]

    def exact(self) -> bool:
        """Whether evaluations see theta + alpha z without theta being written (see zokern.optim.exact)."""
        return self._exact_for(self._groups_layout())

    def _exact_for(self, layout: list[tuple[dict[str, Any], list[torch.Tensor], list[int]]]) -> bool:
        if self.perturbation == "auto":
            return any(p.dtype in _SIXTEEN_BIT for _, tensors, _ in layout for p in tensors)
        return self.perturbation == "exact"

    def _begin_update(self) -> None:
        """An update pass starts: in step(), a Ctrl-C from now on is held until the step's record is written (a step
        recorded as raised must not have updated theta, or replay would miss the update)."""
        if self._update_hold is not None:
            self._update_hold.__enter__()

    def _update_rounding(self) -> dict[str, Any]:
        """Rounding of the step's next update pass: stochastic for 16-bit parameters unless rounding='nearest', so
        that the expected stored update is the intended one. Each pass of a step draws its own bits; all groups,
        devices and parameters of one pass share its seed (the rounding stream is indexed by global element, so
        they draw disjoint bits), which keeps the stored values independent of how parameters are grouped. Call it
        once per pass."""
        self._begin_update()
        if self._owners:  # (a host-side update writes shards without a fused pass)
            _shards.shards_written()
        if self.rounding == "nearest":
            return dict(rounding="nearest")
        self._update_passes += 1
        return dict(rounding="stochastic", rounding_seed=seeds_.rounding_seed(self._step_seed, self._update_passes))

    # ------------------------------------------------------------------------------------------------- passes

    def _apply(self, seed: int, alpha: Callable[[dict[str, Any]], float]) -> None:
        """theta += alpha(group) * z(seed) in each group: one pass in place, only bookkeeping in exact mode; tracked
        so that an exception can undo it."""
        with held_interrupts():
            if not self._exact_now:

                def move(call: tuple, sign: float) -> None:
                    (a,), tensors = call
                    scalars = self._row() if sign > 0 else None
                    ops.perturb_(tensors, seed, sign * a, **self._pass_kwargs(), scalars=scalars)

                self._all_or_none(self._fused(lambda group: (alpha(group),)), move)
            self._track(seed, alpha)

    def _all_or_none(self, calls: list, move: Callable[[Any, float], None]) -> None:
        """``move(call, 1.0)`` for each call of a tracked pass; if one raises, the calls already made are taken back
        (``move(call, -1.0)``) before it propagates, since the step's record, from which its undo starts, holds the
        pass as not applied. Not while a CUDA graph records its step: nothing has run, and a take-back would be
        recorded into the graph (its warm-up steps and the CPU's uncaptured ones do run, and are taken back)."""
        if self._capturing:
            for call in calls:
                move(call, 1.0)
            return
        run_all_or_take_back(calls, move)

    def _row(self) -> torch.Tensor | None:
        """The device row the next pass reads its scalars from, while a CUDA graph's step runs (graph.py)."""
        return None if self._rows is None else next(self._rows)

    def _perturb(self, seed: int, scale: float) -> None:
        """theta += scale * eps * z(seed), with each group's eps."""
        self._apply(seed, lambda group: scale * group["eps"])

    def _switch(self, seed_from: int, scale_from: float, seed_to: int, scale_to: float) -> None:
        """theta += eps * (scale_from * z(seed_from) + scale_to * z(seed_to)) in one pass."""
        with held_interrupts():
            if not self._exact_now:

                def move(call: tuple, sign: float) -> None:
                    (a_from, a_to), tensors = call
                    ops.two_seed_(tensors, seed_from, sign * a_from, seed_to, sign * a_to, **self._pass_kwargs())

                self._all_or_none(self._fused(lambda g: (scale_from * g["eps"], scale_to * g["eps"])), move)
            self._track(seed_from, lambda group: scale_from * group["eps"])
            self._track(seed_to, lambda group: scale_to * group["eps"])

    def _track(self, seed: int, alpha: Callable[[dict[str, Any]], float]) -> None:
        totals = self._displacement.setdefault(seed, [0.0] * len(self.param_groups))
        for k, group in enumerate(self.param_groups):
            totals[k] += alpha(group)
        if not any(totals):  # eps multiples cancel exactly: +1 - 2 + 1
            del self._displacement[seed]

    def _undo_displacement(self) -> None:
        """Restore theta from every perturbation still applied (after a failed evaluation). In exact mode theta was
        never written: forgetting the perturbation restores it bit for bit."""
        if not self._exact_now:
            for seed, totals in reversed(list(self._displacement.items())):
                by_group = {id(group): -total for group, total in zip(self.param_groups, totals)}
                self._apply(seed, lambda group, by_group=by_group: by_group[id(group)])
        self._displacement.clear()

    def _commit_displacement(self) -> None:
        """Make the current perturbation the parameters (a candidate accepted as the update): the very values the
        closure evaluated, which the exact mode's copies rounded to nearest (stochastic bits would store other
        weights than those accepted: a step kept for lowering the loss could raise it)."""
        self._begin_update()  # in place the candidate is in theta already: it becomes the update here
        with held_interrupts():  # an update: all of it or none
            if self._exact_now:
                rounding = dict(rounding="nearest")
                for seed, totals in list(self._displacement.items()):
                    by_group = {id(group): total for group, total in zip(self.param_groups, totals)}
                    for (total,), tensors in self._fused(lambda group, by_group=by_group: (by_group[id(group)],)):
                        ops.perturb_(tensors, seed, total, **self._pass_kwargs(), **rounding)
            self._displacement.clear()

    def _restore_update(
        self, seed: int, scale: float, coefficient: Callable[[dict[str, Any]], Any], lookahead: int | None = None
    ) -> None:
        """One pass: theta = t + scale * eps * z (the restore; nothing to restore in exact mode), then
        theta -= lr * (c * z + weight_decay * theta), with c = coefficient(group), a float or a one-element device
        tensor (non-finite: no update). With ``lookahead``, the same pass adds + eps z(lookahead), the next step's
        first perturbation (in place only; see zokern.optim.lookahead)."""
        exact = self._exact_now

        def scalars_of(group: dict[str, Any]) -> tuple:
            restore = 0.0 if exact else scale * group["eps"]
            next_alpha = 0.0 if lookahead is None else group["eps"]
            return restore, group["lr"], coefficient(group), group["weight_decay"], next_alpha

        rounding = self._update_rounding()
        with held_interrupts():
            for (restore, lr, c, weight_decay, next_alpha), tensors in self._fused(scalars_of):
                if isinstance(c, torch.Tensor):  # asynchronous only towards a GPU: a CPU kernel reads it at once
                    c = c.to(tensors.device, non_blocking=tensors.device.type == "cuda")
                ops.restore_update_(
                    tensors,
                    seed,
                    restore,
                    lr,
                    c,
                    weight_decay=weight_decay,
                    next_seed=lookahead,
                    next_alpha=next_alpha,
                    **self._pass_kwargs(),
                    **rounding,
                    scalars=self._row(),
                )
            self._track(seed, lambda group: scale * group["eps"])
            if lookahead is not None:
                chunks = [(params, offsets, group["eps"]) for _, group, params, offsets in self._device_chunks()]
                self._lookahead.set(lookahead, chunks, self._pass_kwargs())

    def _add_directions(self, terms: list[tuple[int, Callable[[dict[str, Any]], float]]]) -> None:
        """theta += sum of c_k(group) * z(seed_k), two directions per pass (raw coefficients, not eps multiples)."""
        for k in range(0, len(terms), 2):
            pair = terms[k : k + 2]
            rounding = self._update_rounding()
            with held_interrupts():  # an update: nothing tracked, but a pass over some groups only would be lost
                seeds = [s for s, _ in pair]
                kwargs = dict(self._pass_kwargs(), **rounding)
                for coefficients, tensors in self._fused(lambda group, pair=pair: tuple(c(group) for _, c in pair)):
                    if len(pair) == 2:
                        ops.two_seed_(tensors, seeds[0], coefficients[0], seeds[1], coefficients[1], **kwargs)
                    else:
                        ops.perturb_(tensors, seeds[0], coefficients[0], **kwargs)

    def _write_update(
        self,
        p: torch.Tensor,
        offset: int,
        direction: torch.Tensor | None,
        group: dict[str, Any],
        rounding: dict[str, Any],
    ) -> None:
        """p <- p - lr * (direction + weight_decay * p) (``direction`` None: the decay alone), computed in float32 as
        the fused pass computes its update (docs/stream.md section 5: a zero lr or weight_decay leaves its term out,
        and the subtraction's exact residual goes to stochastic rounding, so that an update below p's float32
        spacing is not lost), written in p's dtype (``rounding``: the update pass's)."""
        lr, weight_decay = group["lr"], group["weight_decay"]
        if lr == 0 or (direction is None and weight_decay == 0):
            return
        theta = p.data.float()
        if weight_decay == 0:
            step = direction
        else:
            step = theta * weight_decay if direction is None else direction + weight_decay * theta
        x, residual = _reference.add_exact(theta, torch.zeros_like(theta), -(step * lr))
        self._write(p, offset, x, residual, rounding)

    def _write(
        self, p: torch.Tensor, offset: int, x: torch.Tensor, residual: torch.Tensor, rounding: dict[str, Any]
    ) -> None:
        """Store the float32 values x (``residual``: what x lost to float32 rounding) into parameter p: x + residual
        stochastically rounded for 16-bit parameters (the bits of the rounding stream at p's offsets, docs/stream.md
        section 5, with the seed of the pass's ``rounding``), unless rounding='nearest'; else x as it is."""
        if p.dtype not in _SIXTEEN_BIT or rounding["rounding"] != "stochastic":
            p.data.copy_(x)
            return
        words_of = _dispatch.select_backend(p.device, self.backend, "philox_block_words").philox_block_words
        # By chunks: the rounding's integer temporaries take ~50 bytes an element, which over a whole embedding
        # matrix would dwarf the step's documented memory. The bits are keyed by element index, so chunks change none.
        flat_p, flat_x, flat_e = p.data.view(-1), x.reshape(-1), residual.reshape(-1)
        for start in range(0, p.numel(), _ROUNDING_CHUNK):
            end = min(start + _ROUNDING_CHUNK, p.numel())
            flat_p[start:end] = _reference.round_stochastic_at(
                flat_x[start:end], flat_e[start:end], rounding["rounding_seed"], offset + start, p.dtype, words_of
            )

    def _direction(self, p: torch.Tensor, offset: int, terms: list[tuple[int, float]]) -> torch.Tensor:
        """sum_k c_k z(seed_k) over p's slice of the stream, materialised in float32 (one tensor at a time)."""
        stream = ops.gaussian if self.distribution == "gaussian" else ops.rademacher
        out = None
        for seed, c in terms:
            z = stream(seed, offset, p.numel(), device=p.device, backend=self.backend).view_as(p)
            out = z.mul_(c) if out is None else out.add_(z, alpha=c)
        return out

    # -------------------------------------------------------------------------------------- public lower level

    def new_seed(self) -> int:
        """The next step's seed (advances the step counter): for loops that drive the passes themselves. Under
        torch.distributed, every ``seed_check_every`` steps the ranks compare it (one collective: such a loop must
        call this on every rank in step); ``step`` checks every loss reduction instead."""
        if self.seed_check_every and self.steps_taken % self.seed_check_every == 0:
            seed = seeds_.step_seed(self.base_seed, self.steps_taken)
            _distributed.check_same_seed(seed, f"seed of step {self.steps_taken}")
        return self._advance_seed()

    def _advance_seed(self) -> int:
        seed = seeds_.step_seed(self.base_seed, self.steps_taken)
        self.steps_taken += 1
        self._block_randomness.clear()  # a new estimate begins
        return seed

    def apply_projected_grad(self, seed: int, projected_grad: Any) -> None:
        """ZO-SGD's update of a step whose estimate the caller formed (:class:`ZOSGD`'s): refused by optimizers
        whose steps update otherwise."""
        raise NotImplementedError(
            f"apply_projected_grad applies ZO-SGD's update, but this {type(self).__name__} updates by "
            f"{self._own_update_rule()}: drive it with step(closure)"
        )

    def _own_update_rule(self) -> str | None:
        """How step() updates theta when it is not ZO-SGD's rule (which apply_projected_grad applies)."""
        return "its own rule"

    @contextlib.contextmanager
    def perturbed(self, seed: int, scale: float = 1.0) -> Iterator[None]:
        """Inside the block, every trainable parameter is theta + scale * eps * z(seed); restored on exit, also when
        the block raises. ``with opt.perturbed(seed, +1): loss_plus = f()``. In exact mode the parameters are
        not written: ops inside the block see the perturbed values (see zokern.optim.exact)."""
        _check_number("scale", scale, None, False)
        seed = ops._check_index("seed", seed)  # the exact mode's copy pass takes it unchecked (it wrapped mod 2^64)
        self._refuse_nested("perturbed")
        self._check_groups_hyperparameters()
        for group in self.param_groups:
            check_perturbation_scale("scale * eps", abs(scale * group["eps"]))
        layout = self._groups_layout()
        self._exact_now = self._exact_for(layout)
        self._check_runnable(layout, self._exact_now, stepping=False)
        take_back_others(self._lookahead, self._trainable)
        self.materialize()
        self._displacement.clear()
        self._busy = True
        with held_interrupts((signal.SIGTERM,)):  # a preemption handler runs after the block, at theta (see step)
            try:
                self._perturb(seed, scale)
                clear_weight_caches()  # weights computed from theta before the block (see _caches)
                devices = {p.device for _, tensors, _ in layout for p in tensors}
                with self._block_randomness.block(seed, devices):  # the seed's blocks draw the same (dropout masks)
                    if self._exact_now:
                        view = self._perturbed_view()
                        try:
                            with self._evaluation(view):
                                yield
                        except RuntimeError as e:
                            refusal = _fullgraph_refusal(e, exact=True)
                            if refusal is None:
                                raise
                            raise refusal from e
                        view.check_all_used(self._parameter_names())  # as step() does: L(theta) taken for L+
                    else:
                        with self._evaluation(None):
                            yield
            finally:
                self._busy = False
                self._undo_displacement()
                clear_weight_caches()

    def _perturbed_view(self) -> PerturbedView:
        uses, sharded = {}, {}
        for index, (_, tensors, offsets) in enumerate(self._groups_layout()):
            for p, offset in zip(tensors, offsets):
                owner = self._owners.get(id(p))
                if owner is None:
                    uses[id(p)] = ParameterUse(p, offset, index)
                else:  # a shard: ops receive its DTensor's gathered whole tensor, perturbed from the DTensor's offset
                    start = _shards.local_slice(owner, "a sharded parameter")[1]
                    sharded[id(owner)] = ParameterUse(owner, offset - start, index)
        return PerturbedView(uses, self._displacement, self._pass_kwargs(), sharded)

    @contextlib.contextmanager
    def _evaluation(self, view: PerturbedView | None) -> Iterator[None]:
        """An evaluation of the closure, seeing the perturbation through ``view`` in the exact mode. Over shards, the
        FSDP2 modules let their gathered parameters go when it ends (outside the view), and the step follows new
        local tensors of the shards (before the passes after it, the restoring one if it raised)."""
        seen = contextlib.nullcontext() if view is None else view
        if not self._sharded:
            with seen:
                yield
            return
        try:
            with _shards.resharded_after(), seen:
                yield
        finally:
            self._follow_new_shards()

    # --------------------------------------------------------------------------------------------------- steps

    def _run_step(self, seed: int, evaluate: Callable[[], Any]) -> dict[str, Any]:
        """The passes and evaluations of one step; returns the record's method-specific fields (at least
        ``projected_grad`` and ``loss``, the value ``step`` returns)."""
        raise NotImplementedError

    @torch.no_grad()
    def step(self, closure: Closure | None = None) -> torch.Tensor:  # type: ignore[override]
        """One ZO step. ``closure()`` evaluates the loss at the current parameters, without autograd, and returns a
        scalar (a one-element tensor or a number); it is called several times per step at perturbed parameters.
        Returns the loss the subclass documents, as a 0-d float32 tensor on the closure's device.

        If the closure raises, the parameters are restored (by the step's own restore pass) and the exception
        propagates; the step is recorded as raised, so that a loop that catches the exception and goes on keeps a
        trajectory that replays. A non-finite loss skips the update: parameters restored, the step returns NaN, a
        RuntimeWarning, and ``nonfinite_steps`` counts it. A step that keeps its losses on the device reports this
        once its values reach the host: at the end of the step on the CPU, at a later step on a GPU (or when
        ``trajectory``, ``nonfinite_steps`` or ``state_dict`` is read).
        """
        self._refuse_nested("step")
        if closure is None and _called_from(_DCP_STATE_DICT, "_init_optim_state"):
            # DCP's helpers create torch optimizers' states by a step with lr 0 and zero grads, and leave lr at 0 if
            # it raises: nothing to create here; the state_dict or load_state_dict call that follows explains.
            return None  # type: ignore[return-value]
        self._require_closure(closure)
        self._check_groups_hyperparameters()
        layout = self._groups_layout()  # checks the parameters: a step that cannot run draws no seed
        exact = self._exact_for(layout)
        self._check_runnable(layout, exact)
        if not self._warned_nothing_trainable and not any(tensors for _, tensors, _ in layout):
            self._warned_nothing_trainable = True
            warnings.warn(
                f"zokern: no parameter of this {type(self).__name__} requires grad, so its steps evaluate the closure "
                "and change nothing. Was it built before the parameters were frozen or replaced (an optimizer built "
                "before peft.get_peft_model holds the frozen base weights)? Build it over the parameters to train",
                UserWarning,
                stacklevel=3,
            )
        if not self._ranks_compared and _distributed.active():
            # At every rank's first step of a run's optimizer: options that change a step's number of losses
            # (n_probes, one_sided, the class) would pair loss reductions of different sizes, which the backend
            # aborts on or hangs. (Not at construction: subclasses set their options after the base's.) A copy keeps
            # the flag, and replay sets it on the optimizer it returns, whose run compared them already.
            digest = _digest48((type(self).__name__, self.options()))
            _distributed.check_same_seed(digest, "optimizer class and options (a digest of them)")
            # Nothing else makes the ranks' weights equal (no DDP broadcast): a model initialised randomly on each
            # rank would train a different model per rank under the same updates, silently.
            params = self._all_params()
            _distributed.check_same_seed(
                _digest48(_distributed.weights_checksums(params)),
                "parameters' values at this optimizer's first step (a digest of their bits): every rank must start "
                "from the same weights (the same checkpoint, or the same torch.manual_seed before building the model)",
            )
            self._ranks_compared = True
        # A preemption handler (SIGTERM, when one is set from Python) runs between steps: the checkpoint it saves holds
        # theta, not theta + eps z, and counts only the steps done. Ctrl-C still interrupts a closure (held by passes).
        with held_interrupts((signal.SIGTERM,)):
            return self._draw_and_take_step(closure, layout, exact)

    def _draw_and_take_step(self, closure: Closure, layout: list, exact: bool) -> torch.Tensor:
        """step() once it has checked what it could before drawing its seed: draw it, take the step, record it."""
        self._settle(wait=False)  # the records of earlier steps whose values have reached the host
        self._loss_device = torch.device("cpu")  # the closure's, once it has returned a tensor
        seed = self._advance_seed()  # each loss reduction checks the ranks agree on it (_reduce)
        next_seed = seeds_.step_seed(self.base_seed, self.steps_taken) if self.merge_steps else None
        evaluated: list[torch.Tensor] = []
        failed: list[Exception] = []
        randomness: list[SharedRandomness] = []
        scales = self._perturbation_scales()

        def evaluate() -> torch.Tensor:
            # Alone, a step whose evaluation fails undoes its perturbation and re-raises. Under torch.distributed
            # the other ranks would wait in this step's loss reduction, and pair it with this rank's next one: this
            # rank goes on with NaN losses instead (for the rest of the step), so that every rank runs the same
            # passes, skips the same update and keeps the same parameters; it raises once the step is done. Over
            # sharded parameters the forwards are collectives too: a closure that raised may have left one
            # unpaired, and the step raises at once; a failure found after the closure returned (a parameter the
            # exact mode saw no op receive, a loss not a scalar) leaves the forwards paired, and this rank goes on
            # running them, its losses NaN.
            if failed and not self._sharded:
                return self._failed_evaluation(evaluated)
            if randomness:  # the same dropout masks (and any draws of the closure) as the step's first
                randomness[0].rewind()
            else:
                randomness.append(SharedRandomness(params[0].device for *_, params, _ in self._device_chunks()))
            try:
                view = self._perturbed_view() if self._exact_now else None
                loss = self._call_closure(closure, view)
            except BaseException as e:
                self._put_back_scales(scales)  # for the passes that take the perturbation back, and the record
                if not isinstance(e, Exception) or not _distributed.active() or self._sharded:
                    raise
                failed.append(e)
                return self._failed_evaluation(evaluated)
            try:
                self._refuse_changed_scales(scales)
                # The update reads the groups after the closures, as torch.optim's steps do; a value set there is
                # checked as one set between steps (an lr set to NaN wrote NaN through the host-side update rules).
                self._check_groups_hyperparameters()
                loss = self._checked_loss(loss, view)
            except Exception as e:
                if not _distributed.active():
                    raise
                failed.append(e)
            if failed:
                return self._failed_evaluation(evaluated)
            evaluated.append(loss)
            return loss

        self._update_hold = held_interrupts()  # entered by the step's first update pass (_begin_update)
        try:
            try:
                fields = self._take_step(seed, evaluate, next_seed, layout=layout, exact=exact)
            except BaseException:
                self._record_raised(seed, evaluated)
                raise
            if self.merge_steps or self._converted_pending:  # (a merged run resumed unmerged: its first step)
                fields.update(self._lookahead_fields())  # the last step's lookahead: replay must do the same
            if self._agreement:
                fields["ranks_agree"] = torch.stack(self._agreement).all()
            losses = fields.pop("losses", None)
            self._record(seed, self._losses if losses is None else losses, fields)
            self._unsettled.append(PendingRecord(self._trajectory[-1]))
        finally:
            clear_weight_caches()  # for forwards after the step in the same autocast or cached() region
            hold, self._update_hold = self._update_hold, None
            hold.__exit__(None, None, None)  # a Ctrl-C held since the update is raised now, the step recorded
        if failed:
            self._settle()  # this rank's skipped step, reported before its own exception
            raise failed[0]
        self._settle(wait=self._seen_disagreement)  # one the host has read raises now, on every rank
        loss = fields["loss"]
        if isinstance(loss, torch.Tensor):
            return loss.to(self._loss_device, torch.float32)
        return torch.tensor(loss, dtype=torch.float32, device=self._loss_device)

    def _record_raised(self, seed: int, evaluated: list[torch.Tensor]) -> None:
        """The record of a step whose closure raised: no update, but its passes ran (perturbations and their undo,
        which rounds in place), and replay redoes them to stay bit-identical. Its losses are the values those passes
        depended on (LDSD moves to its best candidate): those of the rounds reduced (averaged across ranks, gathered
        or kept on the device), then this rank's of evaluations not reduced yet."""
        losses = list(self._losses)
        reduced: list[float] = []
        for values in self._reduced:
            try:
                reduced.extend(values.tolist())
            except Exception:  # the device failed with the closure: nothing more to read
                break
        if len(reduced) > len(losses):
            losses = reduced
        for value in evaluated[len(losses) :]:
            try:
                losses.append(float(value))
            except Exception:  # the device failed with the closure: nothing more to read
                losses.append(math.nan)
        fields = dict(raised=True, skipped=False, projected_grad=None, loss=math.nan)
        if self.merge_steps or self._converted_pending:
            fields.update(self._lookahead_fields())
        self._record(seed, losses, fields)

    def _lookahead_fields(self) -> dict[str, bool]:
        """A merged step's record of the perturbation the last step left: whether this step claimed it, and whether
        the parameters were converted (model.half()) while it was applied, so that replay converts theta + eps z
        there rather than theta."""
        fields = dict(claimed=self._claimed)
        if self._converted_pending:
            fields["converted_pending"] = True
        return fields

    def _refuse_nested(self, what: str) -> None:
        if self._busy:
            raise RuntimeError(
                f"{type(self).__name__}.{what} was called while a step or a perturbed() block of the same optimizer "
                "was running (from its closure, or a signal handler?), where the parameters are not theta: the "
                "closure must only evaluate the loss"
            )

    def _require_closure(self, closure: Closure | None) -> None:
        if closure is None:
            raise TypeError(
                f"{type(self).__name__}.step needs a closure that evaluates the loss (ZO optimizers call it at "
                "perturbed parameters). With the Hugging Face Trainer use zokern.integrations.ZOTrainer."
            )

    def _take_step(
        self,
        seed: int,
        evaluate: Callable[[], Any],
        next_seed: int | None = None,
        may_claim: bool = True,
        layout: list | None = None,
        exact: bool | None = None,
    ) -> dict[str, Any]:
        """Run one step's passes; restore on a non-finite loss (a skipped step) or on any exception (re-raised).
        ``next_seed``: the next step's seed, which a merging step folds into its last pass; ``may_claim=False``
        (replay of a step that found its perturbation taken back) takes a pending one back instead of claiming it;
        ``layout``: the step's ``_groups_layout()``, and ``exact`` whether it runs in the exact mode, when the
        caller has them already."""
        self._displacement.clear()
        self._losses, self._reduced = [], []
        self._step_layout = self._groups_layout() if layout is None else layout
        self._exact_now = self.exact() if exact is None else exact
        self._step_seed, self._update_passes = seed, 0
        self._claimed = self._converted_pending = False  # until _claim_lookahead finds otherwise (or raises)
        self._round, self._agreement, self._seen_disagreement = 0, [], False
        self._step_digest = None  # made at the step's first loss reduction under torch.distributed
        self._next_seed = next_seed
        self._busy = True
        try:
            # In the try: a take-back that fails must not leave this step's layout behind for the next step.
            self._claimed = self._claim_lookahead(seed, may_claim)
            if self._exact_now:  # its first pass is the update: its checks (overlap, layout) before any forward
                self._fused(lambda group: ())
            fields = {"skipped": False, **self._run_step(seed, evaluate)}
        except NonFiniteLoss:
            self._undo_displacement()
            return dict(skipped=True, projected_grad=None, loss=math.nan)
        except BaseException:
            self._undo_displacement()
            raise
        finally:
            self._busy = False
            self._step_layout = self._step_chunks = None
            self._step_prepared = {}
        self._displacement.clear()
        return fields

    def _claim_lookahead(self, seed: int, may_claim: bool) -> bool:
        """Whether the last step already applied this step's first perturbation, +eps z(seed) in every group (then
        tracked as applied); a pending perturbation that is not that one, or that may not be claimed, is taken back."""
        take_back_others(self._lookahead, self._trainable)
        self._converted_pending = self._lookahead.converted()  # replay converts as the run did (its record says)
        if not self._lookahead.pending:
            return False
        try:
            if not may_claim or self._exact_now or not self.merge_steps:
                self._lookahead.materialize()
                return False
            expected = [(params, offsets, group["eps"]) for _, group, params, offsets in self._device_chunks()]
            if not self._lookahead.claim(seed, expected):
                return False
        finally:
            self._lookahead.converted()  # this step's own take-back: recorded above, not the next step's
        self._track(seed, lambda group: group["eps"])
        return True

    _SCALE_KEYS = ("eps", "sigma")  # the group values a step's passes perturb by (sigma: LDSD's)

    def _perturbation_scales(self) -> list[tuple]:
        return [tuple(group.get(key) for key in self._SCALE_KEYS) for group in self.param_groups]

    def _put_back_scales(self, scales: list[tuple]) -> list[tuple]:
        """Put back each group's eps (or sigma) that differs from ``scales``, its value when the step began; returns
        (group index, key, value put back, value found) for each."""
        changed = []
        for k, (group, was) in enumerate(zip(self.param_groups, scales)):
            for key, before in zip(self._SCALE_KEYS, was):
                after = group.get(key)
                if after != before:
                    changed.append((k, key, before, after))
                    group[key] = before
        return changed

    def _refuse_changed_scales(self, scales: list[tuple]) -> None:
        """Refuse a closure that changed a group's eps (or sigma) during the step, once those values are put back:
        the passes after it would take back another perturbation than the one applied (theta displaced)."""
        changed = self._put_back_scales(scales)
        if changed:
            k, key, before, after = changed[0]
            raise ValueError(
                f"param group {k}'s {key} was changed from {before} to {after} during a step (by its closure), and is "
                f"put back to {before}, by which the step's passes perturbed and restore the parameters: change "
                "hyperparameters between steps"
            )

    @staticmethod
    def _failed_evaluation(evaluated: list[torch.Tensor]) -> torch.Tensor:
        """The loss a rank whose step failed reports for an evaluation: NaN, so that every rank skips the update."""
        evaluated.append(torch.tensor(math.nan, dtype=torch.float64))
        return evaluated[-1]

    def _call_closure(self, closure: Closure, view: PerturbedView | None) -> Any:
        """What the closure returns on this rank, evaluated as a ZO step does: without autograd, through the exact
        mode's ``view`` (or, with merge_steps, finding who reads the parameters)."""
        clear_weight_caches()  # each evaluation reads other weights than the last (see _caches)
        if view is None:  # (the exact mode's evaluations run eagerly: nothing compiled to freeze)
            warn_if_compiled_weights_are_frozen()
        try:
            if view is None and self.merge_steps:  # (refused over shards)
                with self._lookahead.finding_owners(self._trainable()):
                    loss = closure()
            else:
                with self._evaluation(view):
                    loss = closure()
        except RuntimeError as e:  # torch.optim's habit of a closure that calls backward()
            refusal = _fullgraph_refusal(e, exact=view is not None)
            if refusal is not None:
                raise refusal from e
            if "does not require grad" not in str(e):
                raise
            raise RuntimeError(
                f"{e}. zokern: a ZO step evaluates the closure without autograd (under torch.no_grad; in exact mode "
                "on perturbed copies): return the loss without calling backward(), which a ZO step does not use"
            ) from e
        return loss

    def _checked_loss(self, loss: Any, view: PerturbedView | None) -> torch.Tensor:
        """The closure's value ``loss`` as a 0-d tensor (not synchronised to the host), once checked: a real scalar,
        and with the exact mode's ``view`` every trainable parameter perturbed in the evaluation."""
        if view is not None:
            view.check_all_used(self._parameter_names())
        if isinstance(loss, torch.Tensor):
            if loss.numel() != 1:
                raise ValueError(f"the closure must return a scalar loss, got a tensor of shape {tuple(loss.shape)}")
            if loss.is_meta:
                raise ValueError("the closure returned a loss on the meta device, which holds no value")
            if loss.is_complex() or loss.dtype == torch.bool:  # no order: L+ - L- would not be a slope
                raise ValueError(f"the closure must return a real loss, got a tensor of dtype {loss.dtype}")
            self._loss_device = loss.device
            if loss.dtype in _SIXTEEN_BIT and not self._warned_16bit_loss:
                self._warned_16bit_loss = True
                message = sixteen_bit_loss_message("the closure", loss.dtype)
                if self._sharded:
                    message += (
                        " Under FSDP2, a MixedPrecisionPolicy's output_dtype casts the model's outputs, the loss "
                        "included: leave it unset"
                    )
                warnings.warn(message, UserWarning, stacklevel=4)
            # A copy (one scalar, no host sync): a closure may return the same tensor, refilled, at every call.
            return loss.detach().reshape(()).clone()
        if isinstance(loss, numbers.Real) and not isinstance(loss, bool):
            return torch.tensor(real_as_float(loss), dtype=torch.float64)
        raise ValueError(f"the closure must return a scalar loss (tensor or number), got {type(loss).__name__}")

    def _gather(self, values: list) -> list[float]:
        """One round of evaluated losses as floats: averaged over data-parallel ranks in a single all_reduce (one
        host sync), recorded in evaluation order; a non-finite one makes the step skip its update."""
        if all(isinstance(v, float) for v in values):  # replay: the recorded values themselves
            floats = list(values)
        else:
            # Ranks that disagree have NaN losses: the step is skipped (replay does the same from its record), and
            # its record makes step() raise RanksDisagree on every rank (they all read the same sums).
            losses, agree = self._reduce(values, values[0].device)
            floats = losses.tolist()
            self._seen_disagreement |= agree is not None and not bool(agree)  # read on the host already
        self._losses.extend(floats)
        if not all(math.isfinite(v) for v in floats):
            raise NonFiniteLoss
        return floats

    # The largest projected gradient a step applies: g z (|z| < 5; in the momentum buffer too) and its step lr g z
    # must be finite in float32, where the passes and the states compute (see _update_reach). Adam's second moment
    # squares it (ZOAdam: lower).
    _PROJECTED_LIMIT = ops.FLOAT32_OVERFLOW / 8
    _SQUARED_PROJECTED_LIMIT = math.sqrt(ops.FLOAT32_OVERFLOW) / 8  # for rules that square it (Adam's second moment)

    def _update_reach(self) -> float:
        """What a projected gradient is multiplied by, at most, on its way into theta or a state: a group's lr beyond
        1 (a gradient within _PROJECTED_LIMIT times lr = 1e4 would still write inf), and a momentum buffer's sum of up
        to 1 / (1 - momentum) of them."""
        return max(1.0, *(group["lr"] for group in self.param_groups)) * self._buffer_sum()

    def _buffer_sum(self) -> float:
        """How many steps' g z a momentum buffer holds at most: 1 / (1 - momentum); 1 without momentum."""
        return 1.0 / (1.0 - getattr(self, "momentum", 0.0))

    _LINEAR_UPDATE = False  # whether the update is lr g z (ZO-SGD's rule, LDSD's SGD rules): see _float16_limit
    _FLOAT16_ROOM = 65504.0 / 2  # what an update may add to a float16 weight: half its range, the rest its own value

    def _float16_limit(self) -> float:
        """The largest |g| whose update lr g z (|z| < 4.855; a momentum buffer's sum of 1 / (1 - momentum) of them) a
        float16 parameter holds, for rules whose update is linear in g (a float16 weight overflows long before
        float32's range, which _update_reach bounds); inf where no float16 parameter trains or the rule normalises
        its step."""
        if not self._LINEAR_UPDATE:
            return math.inf
        if not any(p.dtype == torch.float16 for _, tensors, _ in self._groups_layout() for p in tensors):
            return math.inf
        return self._float16_bound(max(group["lr"] for group in self.param_groups))

    def _float16_bound(self, lr: float) -> float:
        """The largest |g| whose update at ``lr`` (times the momentum buffer's sum) stays within _FLOAT16_ROOM."""
        step = lr * ops.Z_BOUND * self._buffer_sum()
        return self._FLOAT16_ROOM / step if step else math.inf

    def _within_limits(self, size: Any, limit: float | None = None) -> Any:
        """Whether projected gradients of magnitude ``size`` (a float, or a tensor of them, read on the device) can
        be applied: times _update_reach below ``limit`` (default _PROJECTED_LIMIT), and below _float16_limit."""
        within = size * self._update_reach() < (self._PROJECTED_LIMIT if limit is None else limit)
        float16 = self._float16_limit()
        return within if float16 == math.inf else within & (size < float16)

    def _check_projected(self, coefficients: list[float], per_eps: bool = True) -> None:
        """Skip the step (as for a non-finite loss) if a projected gradient, c / eps in some group (``per_eps``) or c,
        is beyond the limits (_within_limits): applied, it would write inf or NaN into the parameters or the
        states."""
        largest = max(map(abs, coefficients), default=0.0)
        if per_eps:
            largest /= min(group["eps"] for group in self.param_groups)
        if not self._within_limits(largest):
            raise NonFiniteLoss

    def _reduce(self, values: list, device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One round of losses averaged over the data-parallel ranks, on ``device``, with whether every rank was at
        this round of this step (its step seed and round number ride in the same all_reduce); a device flag is kept
        for the step's record, which reports a disagreement when it reaches the host."""
        identity = (self._step_seed, self._round)
        if _distributed.active():
            if self._step_digest is None:
                self._step_digest = self._digest()
            identity += (self._step_digest,)
        losses, agree = _distributed.mean_across_ranks_on_device(values, device, identity)
        self._reduced.append(losses)
        self._round += 1
        if agree is not None:
            self._agreement.append(agree)
        return losses, agree

    def _digest(self) -> int:
        """48 bits of what every rank's step must share beyond its seed, compared by the loss reduction: the class
        and options, each group's hyperparameters, every parameter's numel, shape and dtype and which it trains, the
        backends running its passes, and, with 16-bit parameters, whether it claimed a merged perturbation (one a
        rank-local read took back is applied anew with other rounding; in float32 the bits come back, but for a rare
        last bit). A rank that differs would otherwise diverge silently."""
        groups = [[g[k] for k in ("lr", "eps", "weight_decay", *self._extra_group_keys())] for g in self.param_groups]
        devices = sorted({str(params[0].device) for _, _, params, _ in self._device_chunks()})
        backends = [_dispatch.select_backend(torch.device(d), self.backend).__name__ for d in devices]
        claimed = self._claimed if any(p.dtype in _SIXTEEN_BIT for p in self._trainable()) else None
        # Shapes included: equal numels in another order on one rank would each draw the other's stream.
        return _digest48((type(self).__name__, self.options(), groups, self._layout_signature(), backends, claimed))

    def _record(self, seed: int, losses: list[float], fields: dict[str, Any]) -> None:
        record = dict(
            step=self.steps_taken - 1,
            seed=seed,
            losses=losses,
            lr=[g["lr"] for g in self.param_groups],
            eps=[g["eps"] for g in self.param_groups],
            weight_decay=[g["weight_decay"] for g in self.param_groups],
            stream_version=STREAM_VERSION,
        )
        record.update(fields)
        # What replay needs beyond the step's scalars, written only when it changes (a new layout, a resume).
        setup = dict(
            optimizer=type(self).__name__,
            options=self.options(),
            base_seed=self.base_seed,  # so that the optimizer replay returns draws the run's next seeds
            **self._layout_signature(),
        )
        if setup != self._last_setup:
            record["setup"] = dict(setup, dtypes=[dtype_name(d) for d in setup["dtypes"]])
            self._last_setup = setup
        self._trajectory.append(record)

    @property
    def trajectory(self) -> list[dict[str, Any]]:
        """One record per step taken with :meth:`step`: seed, losses, hyperparameters and the method's fields."""
        self._settle()
        return self._trajectory

    @trajectory.setter
    def trajectory(self, records: list[dict[str, Any]]) -> None:
        self._trajectory = records

    def _settle(self, wait: bool = True) -> None:
        """Write the device values of pending records as Python numbers, in step order; without ``wait``, only those
        whose copy to the host has completed (no host sync). Counts and reports the skipped steps."""
        skipped, disagreed = [], []
        while self._unsettled and (wait or self._unsettled[0].ready()):
            record = self._unsettled.pop(0).settle()
            if not record.pop("ranks_agree", True):  # its update was skipped (NaN losses); training cannot go on
                disagreed.append(record["step"])
            if record["skipped"]:
                skipped.append(record["step"])
        if disagreed:  # counted as skipped steps are (the state agrees with what replay rebuilds), then raised
            self._nonfinite += len(skipped)
            raise _distributed.disagreement(disagreed[0])
        if skipped:
            self._nonfinite += len(skipped)
            steps = f"step {skipped[0]}" if len(skipped) == 1 else f"steps {skipped}"
            warnings.warn(
                f"zokern: non-finite loss at {type(self).__name__} {steps}; parameters restored, update skipped "
                f"({self._nonfinite} skipped so far; a projected gradient beyond float32 counts as non-finite)",
                RuntimeWarning,
                stacklevel=3,
            )

    @property
    def nonfinite_steps(self) -> int:
        """Steps whose update was skipped because a loss was NaN or infinite."""
        self._settle()
        return self._nonfinite

    @nonfinite_steps.setter
    def nonfinite_steps(self, value: int) -> None:
        self._nonfinite = value

    def _all_params(self) -> list[torch.Tensor]:
        """Every parameter, frozen ones included, in the canonical order."""
        return [p for g in self.param_groups for p in g["params"]]

    def _trainable_flags(self) -> list[bool]:
        """Per parameter, in order, whether the steps train it (replay's override, else requires_grad)."""
        if self._trainable_override is not None:
            return list(self._trainable_override)
        return [p.requires_grad for p in self._all_params()]

    def _layout_signature(self) -> dict[str, list]:
        trainable = self._trainable_flags()
        extras = {k: [g[k] for g in self.param_groups] for k in self._extra_group_keys()}
        params = self._all_params()
        return dict(
            group_sizes=[len(g["params"]) for g in self.param_groups],
            trainable=trainable,
            group_extras=extras,
            numels=[p.numel() for p in params],  # checked by replay against the parameters it is given
            shapes=[list(p.shape) for p in params],  # likewise, where a setup adds them
            dtypes=[p.dtype for p in params],  # names in the record (_record)
        )

    def _extra_group_keys(self) -> tuple[str, ...]:
        """Per-group hyperparameters besides lr, eps and weight_decay (recorded for replay)."""
        return ()

    @classmethod
    def _losses_per_step(cls, options: dict[str, Any], record: dict[str, Any]) -> int:
        """How many losses a completed step with these options evaluates (replay checks each record against it)."""
        raise NotImplementedError

    # ---------------------------------------------------------------------------------------------- checkpoint

    def __repr__(self) -> str:
        """torch's (the param groups), and the options that hold for all of them (momentum, probes, ...)."""
        options = "\n".join(f"    {key}: {value!r}" for key, value in self.options().items())
        return f"{super().__repr__().removesuffix(')')}Options (every group)\n{options}\n)"

    def options(self) -> dict[str, Any]:
        """The constructor's keyword options besides the per-group hyperparameters (recorded for replay)."""
        return dict(
            distribution=self.distribution,
            backend=self.backend,
            seed_check_every=self.seed_check_every,
            perturbation=self.perturbation,
            rounding=self.rounding,
        )


def _loading(state: dict[str, Any]) -> bool:
    """Whether ``__setstate__`` is torch's load_state_dict updating its two entries, rather than a copy or unpickling
    of the whole object: then this object keeps what it has (its finalizer, its captured graph)."""
    return state.keys() <= {"state", "param_groups"}


def _digest48(value: Any) -> int:
    """48 bits of ``value``'s repr, the same in every process (Python's hash of a str is not): what the ranks compare
    (as four 16-bit pieces, _distributed's identity chunks)."""
    return int.from_bytes(hashlib.blake2b(repr(value).encode(), digest_size=6).digest(), "little")


def run_all_or_take_back(items: list, move: Callable[[Any, float], None]) -> None:
    """``move(item, 1.0)`` for each item; if one raises, ``move(item, -1.0)`` for those already moved, then the
    exception propagates: a pass over several calls that stopped partway leaves nothing moved."""
    moved = []
    try:
        for item in items:
            move(item, 1.0)
            moved.append(item)
    except BaseException:
        for item in moved:
            move(item, -1.0)
        raise


def _call_key(scalars: tuple) -> list:
    """Equal for two passes' scalars exactly when a kernel given either computes the same bits: floats by value and,
    zeros, by sign (0.0 == -0.0), a device tensor by identity (its value is not read on the host). Per group and
    pass, hence the one comprehension."""
    return [(id(v),) if isinstance(v, torch.Tensor) else v if v else str(v) for v in scalars]


def new_state(p: torch.Tensor) -> torch.Tensor:
    """A float32 optimizer state shaped like ``p``, zeros: a normal tensor even when the step runs under
    torch.inference_mode (an inference tensor could not be updated by the steps that run outside it)."""
    with torch.inference_mode(False):
        return torch.zeros_like(p, dtype=torch.float32, memory_format=torch.contiguous_format)


def real_as_float(value: numbers.Real) -> float:
    """A real number (a loss) as a float: one beyond float64 (an int, a Fraction) as the infinity of its sign, a
    non-finite loss."""
    try:
        return float(value)
    except OverflowError:
        return math.inf if value > 0 else -math.inf


def _fullgraph_refusal(error: RuntimeError, exact: bool) -> RuntimeError | None:
    """What to say when torch.compile(fullgraph=True) met the hooks by which the exact mode (or merge_steps) sees
    what the model reads; None for any other error."""
    if type(error).__name__ not in _DYNAMO_REFUSALS or not ("PerturbedView" in str(error) or "Lookahead" in str(error)):
        return None
    return RuntimeError(
        "zokern: torch.compile(fullgraph=True), or an op that compiles itself so (flex_attention, torch.cond, "
        f"torch.while_loop), cannot trace the hooks by which "
        f"{'the exact mode (the default for 16-bit parameters)' if exact else 'merge_steps'} sees what the model "
        f"reads; compile without fullgraph=True{', or use perturbation=' + repr('inplace') if exact else ''}"
    )


_DYNAMO_REFUSALS = ("Unsupported", "UncapturedHigherOrderOpError")  # fullgraph tracing, a higher-order op's


def sixteen_bit_loss_message(source: str, dtype: torch.dtype) -> str:
    return (
        f"zokern: {source} returned a {str(dtype).removeprefix('torch.')} loss; L+ - L- is then quantised to its "
        "spacing and often rounds to 0. Compute the loss in float32 (e.g. cross-entropy on logits.float()); casting "
        "the 16-bit loss afterwards keeps its rounding."
    )
