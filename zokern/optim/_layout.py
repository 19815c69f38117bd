"""Which tensors a ZO optimizer's step trains and where their stream starts, and what a step refuses to run on: the
canonical layout over the param groups (trainable tensors and their global stream offsets), checked for memory that
two trained tensors share, states that no longer fit their parameter, and what the exact mode cannot see.
``LayoutChecks`` is a base of :class:`zokern.optim.base.ZOOptimizer`."""

from __future__ import annotations

from typing import Any

import torch

from zokern import ops
from zokern.optim import _shards
from zokern.optim._checkpoint import _kernel_state
from zokern.optim._groups import _reject_parameter
from zokern.optim._groups import _writable


class LayoutChecks:
    """The layout half of ZOOptimizer (``self`` is one)."""

    # Whether the passes check the tensors of one call (distinct memory, no inference tensor: ops.prepare does; LDSD's
    # passes check neither).
    _PASSES_CHECK_MEMORY = True

    def _groups_layout(self) -> list[tuple[dict[str, Any], list[torch.Tensor], list[int]]]:
        """Per param group: the group, its trainable tensors (of a sharded parameter, this rank's local shard) and
        their global stream offsets (fixed during a step, which computes it once for all of its passes and
        evaluations). Sets ``_owners``, the DTensor of each shard among them (by the shard's id), and ``_sharded``:
        whether any parameter of the groups, frozen ones included, is a DTensor (its forwards are collectives)."""
        if self._step_layout is not None:
            return self._step_layout
        layout, base, index, owners, sharded = [], 0, 0, {}, False
        dtensor = _shards.dtensor_class()  # (once: this loop runs over every parameter at each step)
        plain = (torch.nn.Parameter, torch.Tensor)
        for g, group in enumerate(self.param_groups):
            tensors, offsets = [], []
            for k, p in enumerate(group["params"]):
                trainable = p.requires_grad if self._trainable_override is None else self._trainable_override[index]
                tensor, start = p, 0
                if type(p) not in plain and dtensor is not None and isinstance(p, dtensor):  # (rare: one test)
                    sharded = True
                    if trainable:
                        tensor, start = _shards.local_slice(p, f"param_groups[{g}]['params'][{k}]")
                        owners[id(tensor)] = p
                if trainable:
                    if not _writable(tensor):
                        _reject_parameter(f"param_groups[{g}]['params'][{k}]", tensor)
                    tensors.append(tensor)  # a shard: the rank's local tensor, at its slice of the parameter's stream
                    offsets.append(base + start)
                base += p.numel()
                index += 1
            layout.append((group, tensors, offsets))
        self._owners, self._sharded = owners, sharded
        self._check_distinct_memory(layout)
        self._check_state_shapes(layout)
        return layout

    def _state_of(self, p: torch.Tensor) -> dict[str, Any]:
        """The optimizer state of the parameter whose tensor in the layout is ``p`` (a DTensor's, for its shard: the
        state holds the shard's values, as plain tensors shaped like it)."""
        return self.state[self._owners.get(id(p), p)]

    def _check_distinct_memory(self, layout: list[tuple[dict[str, Any], list[torch.Tensor], list[int]]]) -> None:
        """What the passes' own checks (ops.prepare's) cannot see, before the step draws its seed: trainable
        parameters of different groups that share memory (the step would perturb and update the shared elements once
        per group); for LDSD, whose passes check nothing, any shared memory and inference tensors. Checked again only
        when a parameter's memory changes."""
        if len(layout) < 2 and self._PASSES_CHECK_MEMORY:
            return
        tensors = [p for _, group_tensors, _ in layout for p in group_tensors]
        inference_mode = torch.is_inference_mode_enabled()
        key = (inference_mode, tuple(map(torch.Tensor.data_ptr, tensors)), tuple(map(ops._NBYTES, tensors)))
        if key == self._checked_memory:
            return
        if not self._PASSES_CHECK_MEMORY and not inference_mode:
            self._refuse_inference_tensors(layout, tensors)
        # Per device only when some addresses overlap (the rare path): two devices' addresses may coincide.
        pair = ops.first_overlap_by_device(tensors) if ops._first_overlap(ops._spans(tensors)) is not None else None
        if pair is not None:
            names = self._trainable_names(layout)
            raise ValueError(
                f"{names[pair[0]]} and {names[pair[1]]} overlap in memory; each element must be trained once "
                "(tie weights by using one Parameter in both places)"
            )
        self._checked_memory = key

    def _refuse_inference_tensors(self, layout: list, tensors: list[torch.Tensor]) -> None:
        """Raise, naming it, if one of ``tensors`` (trainable parameters of ``layout``) is an inference tensor."""
        for p in tensors:
            if p.is_inference():
                trainable = [q for _, group_tensors, _ in layout for q in group_tensors]
                name = self._trainable_names(layout)[next(k for k, q in enumerate(trainable) if q is p)]
                raise ValueError(
                    f"{name} is an inference tensor, which cannot be updated in place outside inference mode; clone "
                    "it, or step inside torch.inference_mode()"
                )

    def _trainable_names(self, layout: list[tuple[dict[str, Any], list[torch.Tensor], list[int]]]) -> list[str]:
        """``param_groups[g]['params'][k]`` of each trainable tensor of ``layout``, in its order."""
        names = []
        for g, (group, tensors, _) in enumerate(layout):
            positions = {id(p): k for k, p in enumerate(group["params"])}
            owners = self._owners  # (a shard is named by its DTensor's place)
            names += [f"param_groups[{g}]['params'][{positions[id(owners.get(id(p), p))]}]" for p in tensors]
        return names

    def _state_keys(self) -> tuple[str, ...]:
        """The per-parameter states shaped like their parameter, which a step reads (none by default)."""
        return ()

    def _check_state_shapes(self, layout: list[tuple[dict[str, Any], list[torch.Tensor], list[int]]]) -> None:
        """Each state still fits its parameter, whose ``.data`` may have been replaced since the state was built:
        moved to another device (``model.to(device)`` moves parameters, not optimizer states) the state follows, as
        float32 and contiguous as the kernels read it (the fused LDSD passes read states by address: on another
        device that is an illegal access, not an error); reshaped with its elements (same numel) it follows,
        row-major like the stream; resized (a grown embedding) the step is refused before any pass, where it would
        update some parameters and then fail."""
        if not self.state:  # (a stateless optimizer: nothing to look up for each of its parameters)
            return
        keys, owners = self._state_keys(), self._owners
        for g, (group, tensors, _) in enumerate(layout):
            for p in tensors:
                owner = owners.get(id(p), p) if owners else p
                state = self.state.get(owner)
                if not state:
                    continue
                for key, value in list(state.items()):
                    if not isinstance(value, torch.Tensor):
                        continue  # (not a tensor: refused by load_state_dict, or put there by hand)
                    shaped = key in keys
                    if not shaped:  # a count (LDSD's Adam step): it keeps its dtype, and follows its parameter
                        if value.device != p.device:
                            with torch.inference_mode(False):
                                state[key] = value.to(p.device)
                        continue
                    if value.device != p.device or value.dtype != torch.float32 or not value.is_contiguous():
                        value = state[key] = _kernel_state(value, p.device)
                    if value.shape == p.shape:
                        continue
                    if value.numel() == p.numel():
                        state[key] = value.view(p.shape)
                        continue
                    k = next(k for k, q in enumerate(group["params"]) if q is owner)
                    shape = (
                        f"a shard of shape {tuple(p.shape)} on this rank"
                        if owner is not p
                        else f"shape {tuple(p.shape)}"
                    )
                    raise ValueError(
                        f"param_groups[{g}]['params'][{k}] has {shape} but its optimizer state "
                        f"{key!r} has shape {tuple(value.shape)}: the parameter was resized after the state was "
                        f"built. Build a new optimizer, or start this parameter's state afresh (del opt.state[p])"
                    )

    def _check_runnable(
        self, layout: list[tuple[dict[str, Any], list[torch.Tensor], list[int]]], exact: bool, stepping: bool = True
    ) -> None:
        """What a step (``stepping``) or a ``perturbed()`` block in this mode cannot run, refused before it starts.
        The exact mode hands each op plain tensors holding theta + eps z in place of the parameters: a parameter class
        with its own ``__torch_function__`` (a fake-quantisation wrapper) would not run, and the step would train
        another function than the model's."""
        if self._owners:
            self._check_sharded_runnable()
        if not exact:
            return
        for g, (group, tensors, _) in enumerate(layout):
            for p in tensors:
                function = type(p).__torch_function__
                if getattr(function, "__func__", function) not in _PLAIN_TORCH_FUNCTIONS:
                    k = next(k for k, q in enumerate(group["params"]) if q is p)
                    raise TypeError(
                        f"param_groups[{g}]['params'][{k}] is a {type(p).__name__} with its own __torch_function__, "
                        "which the exact mode (the default for 16-bit parameters) would bypass: its evaluations hand "
                        "ops plain tensors in place of the parameters. Use perturbation='inplace'"
                    )
        self._refuse_frozen_aliases(layout)

    def _check_sharded_runnable(self) -> None:
        """What sharded parameters cannot run yet, refused before a step or a perturbed() block starts."""
        if self.merge_steps:
            raise ValueError(
                "merge_steps is not supported with sharded (DTensor) parameters: the perturbation it leaves between "
                "steps is taken back through the modules that own the parameters, which FSDP2 replaces in each forward"
            )

    def _refuse_frozen_aliases(self, layout: list[tuple[dict[str, Any], list[torch.Tensor], list[int]]]) -> None:
        """The exact mode hands the perturbed copy to the ops that receive a trained Parameter: a frozen Parameter of
        the groups over its memory (built as nn.Parameter(w.data), then frozen) would read theta unperturbed, where
        the in-place mode perturbs both. Looked for among frozen parameters on a trained one's storage only (one
        memory lookup each), so that a model of many frozen weights pays little per step."""
        frozen = [
            p
            for group in self.param_groups
            for p in group["params"]
            if not p.requires_grad and p.layout == torch.strided and not p.is_meta
        ]
        if not frozen:
            return
        on_storage: dict[tuple, list[torch.Tensor]] = {}
        for _, tensors, _ in layout:
            for p in tensors:
                on_storage.setdefault(_storage_key(p), []).append(p)
        on_storage.pop(None, None)  # (unreadable storages: none is shared with a trained parameter)
        pair = next(
            (
                (t, f)
                for f in frozen
                for t in on_storage.get(_storage_key(f), ())
                if f.numel() and t.numel() and _extents_overlap(t, f)
            ),
            None,
        )
        if pair is None:
            return
        names = self._parameter_names()
        first, second = (names[id(p)] for p in pair)
        raise ValueError(
            f"{first} and {second} share memory, and one of them is frozen: the exact mode (the default for 16-bit "
            "parameters) perturbs the uses of the trained Parameter only, so the frozen one would read theta "
            "unperturbed. Use one Parameter in both places (tied weights), or perturbation='inplace'"
        )

    def _parameter_names(self) -> dict[int, str]:
        """How messages name each parameter: its place, and its name where the groups were built from
        ``named_parameters()`` (torch >= 2.6 keeps the names as ``param_names``)."""
        names = {}
        for g, group in enumerate(self.param_groups):
            given = group.get("param_names") or ()
            for k, p in enumerate(group["params"]):
                place = f"param_groups[{g}]['params'][{k}] (shape {tuple(p.shape)})"
                names[id(p)] = f"{given[k]!r}, {place}" if k < len(given) else place
        return names


# The __torch_function__ of plain tensors and of nn.Parameter (which disables it): any other is a class's own.
_PLAIN_TORCH_FUNCTIONS = (torch.Tensor.__torch_function__.__func__, torch._C._disabled_torch_function_impl)


def _storage_key(t: torch.Tensor) -> tuple | None:
    """Where a tensor's memory lives; None for one whose storage cannot be read (a wrapper subclass: torchao's
    quantized weights, a DTensor), which no trained parameter shares."""
    try:
        return t.device, t.untyped_storage().data_ptr()
    except RuntimeError:
        return None


def _extents_overlap(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether the byte ranges two strided tensors span meet (a non-contiguous view spans more than its nbytes; two
    interleaved views that span each other's range count as overlapping)."""

    def extent(t: torch.Tensor) -> tuple[int, int]:
        start = t.data_ptr()
        return start, start + (sum((n - 1) * s for n, s in zip(t.shape, t.stride())) + 1) * t.element_size()

    (a0, a1), (b0, b1) = extent(a), extent(b)
    return a0 < b1 and b0 < a1
