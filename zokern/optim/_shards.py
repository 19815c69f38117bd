"""Sharded parameters: FSDP2's (``torch.distributed.fsdp.fully_shard``) DTensors. A rank's shard of such a parameter is
a block of whole rows, the elements ``[start, start + numel)`` of the parameter in row-major order, so the passes
perturb and update it in place as that slice of the stream: every rank regenerates the z of the elements it holds,
and the sharded run takes the same steps as one process holding the whole model (docs/optim.md, "Sharded
parameters")."""

from __future__ import annotations

import contextlib
import sys
import warnings
import weakref
from collections.abc import Iterator

import torch


def dtensor_class() -> type | None:
    """The DTensor class, or None while torch.distributed.tensor is not imported (no DTensor exists then)."""
    module = sys.modules.get("torch.distributed.tensor")
    return None if module is None else module.DTensor


def is_sharded(p: torch.Tensor) -> bool:
    """Whether ``p`` is a DTensor."""
    dtensor = dtensor_class()
    return dtensor is not None and isinstance(p, dtensor)


def local_tensor(p: torch.Tensor) -> torch.Tensor:
    """The plain tensor holding this rank's values of DTensor ``p``, the same object at every call: what
    ``to_local()`` returns without autograd for a plain DTensor, where for a Parameter torch 2.13 returns a new view
    of it at each call (new objects in each step's layout, and a view per parameter and step)."""
    local = getattr(p, "_local_tensor", None)
    if isinstance(local, torch.Tensor):
        return local
    with torch.no_grad():
        return p.to_local()


def written_tensor(p: torch.Tensor, name: str) -> tuple[torch.Tensor, int]:
    """The tensor the passes write for parameter ``p`` and the row-major index of its first element in ``p``: ``p``
    itself at 0, or for a DTensor this rank's shard (``local_slice``)."""
    return local_slice(p, name) if is_sharded(p) else (p, 0)


# id(DTensor) -> (a weak reference to it, its spec, its shard's shape, the index of the shard's first element): what
# local_slice found, valid while the DTensor keeps that spec (mesh, placements, shape) and its shard that shape. Each
# step looks up every parameter's shard, and working it out costs ~30 us a parameter (the mesh's rank lookups).
_found: dict[int, tuple[weakref.ref, object, torch.Size, int]] = {}


def local_slice(p: torch.Tensor, name: str) -> tuple[torch.Tensor, int]:
    """This rank's shard of DTensor ``p`` and the row-major index of its first element in ``p``; a TypeError naming
    ``name`` for a placement whose shard is not a block of whole rows."""
    local = local_tensor(p)
    spec = getattr(p, "_spec", None)
    found = _found.get(id(p))
    if found is not None and found[0]() is p and found[1] is spec and found[2] == local.shape:
        return local, found[3]
    start = _first_element(p, local, name)
    if spec is not None:
        key = id(p)
        _found[key] = (weakref.ref(p, lambda _: _found.pop(key, None)), spec, local.shape, start)
    return local, start


def _first_element(p: torch.Tensor, local: torch.Tensor, name: str) -> int:
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor import Shard

    mesh, placements = p.device_mesh, tuple(p.placements)
    rows = p.shape[0] if p.dim() else 1
    start, end = 0, rows
    for mesh_dim, placement in enumerate(placements):
        if isinstance(placement, Replicate):
            continue
        # type(), not isinstance: a _StridedShard (FSDP over tensor parallelism) is a Shard whose rows interleave.
        if type(placement) is not Shard or placement.dim != 0 or p.dim() == 0:
            raise TypeError(
                f"{name} is a DTensor placed {placements}: zokern trains sharded parameters whose local shard is a "
                "block of whole rows (FSDP2's Shard(0), or Replicate), the slice of the stream it perturbs in place. "
                "A shard of columns (tensor parallelism), a strided or a Partial placement is not supported"
            )
        # Shard(0) splits the rows it is given as torch.chunk does: chunks of ceil(rows / size), the last ones short
        # or empty; a second Shard(0) splits this rank's chunk again.
        size, coordinate = mesh.size(mesh_dim), mesh.get_local_rank(mesh_dim)
        chunk = -(-(end - start) // size)
        start, end = min(start + coordinate * chunk, end), min(start + (coordinate + 1) * chunk, end)
    expected = (end - start, *p.shape[1:]) if p.dim() else ()
    if tuple(local.shape) != expected:  # a placement that splits otherwise than torch.chunk: refuse, not guess
        raise TypeError(
            f"{name} is a DTensor placed {placements} whose local shard has shape {tuple(local.shape)}, where rows "
            f"[{start}, {end}) of its shape {tuple(p.shape)} were expected: zokern cannot tell which slice of the "
            "stream this shard holds"
        )
    return start * (p.numel() // rows if rows else 0)


def warn_if_gathered_copies(params: list[torch.Tensor]) -> None:
    """Warn when trainable parameters mix DTensors and plain tensors: after a forward, FSDP2 keeps its root module's
    parameters gathered, and ``model.parameters()`` yields those plain copies, which it frees and refills from the
    shards at every forward, in place of the root's DTensors (the steps would train copies, not the model)."""
    trainable = [p for p in params if p.requires_grad]
    dtensor = dtensor_class()
    if dtensor is None or not any(isinstance(p, dtensor) for p in trainable):
        return
    if all(isinstance(p, dtensor) for p in trainable):
        return
    warnings.warn(
        "zokern: some trainable parameters are DTensors (sharded by FSDP2) and others plain tensors. If the model ran "
        "a forward after fully_shard, FSDP2 keeps its root module's parameters gathered, and model.parameters() "
        "gave their plain copies in place of the root's DTensors: the steps would train copies FSDP2 overwrites. "
        "Build the optimizer before the model's first forward, or call reshard() on its FSDP modules first",
        UserWarning,
        stacklevel=4,
    )


def saved_state(value: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """A state of DTensor parameter ``p`` as a checkpoint holds it: a DTensor placed as ``p`` over the shard of it
    this rank keeps (shaped like the shard), so that torch.distributed.checkpoint saves each rank's rows."""
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(value, p.device_mesh, p.placements, run_check=False, shape=p.shape, stride=p.stride())


def loaded_state(value: torch.Tensor, p: torch.Tensor, name: str) -> torch.Tensor:
    """This rank's shard of a saved state of DTensor parameter ``p``: the local tensor of a DTensor saved under the
    same placements, or the shard's rows of a whole state (a plain tensor, saved by an unsharded run; a replicated
    DTensor); a ValueError naming ``name`` for a DTensor sharded otherwise."""
    from torch.distributed.tensor import Replicate

    local, start = local_slice(p, name)
    if is_sharded(value):
        mine = local_tensor(value)
        if tuple(value.placements) == tuple(p.placements) and mine.shape == local.shape:
            return mine
        if not all(isinstance(placement, Replicate) for placement in value.placements):
            raise ValueError(
                f"{name} is placed {tuple(p.placements)} with a shard of shape {tuple(local.shape)} on this rank, but "
                f"its saved state is placed {tuple(value.placements)} with a shard of shape {tuple(mine.shape)}: save "
                "states under the sharding that loads them, or whole (state.full_tensor())"
            )
        value = mine
    return value.reshape(-1)[start : start + local.numel()].view(local.shape)


@contextlib.contextmanager
def gathering_current_shards() -> Iterator[None]:
    """Inside the block, each FSDP2 module gathers its parameters from their shards when its forward starts; when the
    block ends (also by an exception), the modules that ran end their iteration and are resharded. FSDP2 keeps a
    module's gathered parameters after a forward (the root's always, for the backward that a ZO step never runs;
    any module's when a forward raised): a later forward would read them as they were, not as the passes have since
    perturbed or updated the shards, and so would ``model.parameters()`` and an evaluation after the step."""
    fsdp = sys.modules.get("torch.distributed.fsdp")
    module_class = getattr(fsdp, "FSDPModule", None)
    if module_class is None:  # no FSDP2 module exists: nothing to reshard
        yield
        return
    ran: dict[int, torch.nn.Module] = {}

    def reshard(module: torch.nn.Module, args: object) -> None:
        if isinstance(module, module_class):
            module.reshard()  # frees the gathered parameters, if any: its own pre-forward hook gathers them anew
            ran[id(module)] = module

    handle = torch.nn.modules.module.register_module_forward_pre_hook(reshard)
    try:
        yield
    finally:
        handle.remove()
        for module in ran.values():
            _end_iteration(module)
        for module in ran.values():
            module.reshard()


def _end_iteration(module: torch.nn.Module) -> None:
    """End the iteration of the FSDP2 tree whose root is ``module`` (nothing for another module): its groups back
    to idle, whose reshard() a forward that raised left a no-op, and its records of forwards cleared, which only a
    backward clears otherwise (they grow by a few entries a forward, for as long as the run). torch 2.13's
    reset_iter_state() does this; earlier releases' same fields are set by hand."""
    state = module._get_fsdp_state()
    if not getattr(state, "_is_root", False):
        return
    reset = getattr(module, "reset_iter_state", None)
    if reset is not None:
        reset()
        return
    from torch.distributed.fsdp._fully_shard._fsdp_common import TrainingState

    state._comm_ctx.post_forward_order.clear()
    for tree_state in state._state_ctx.all_states:
        tree_state._training_state = TrainingState.IDLE
        # One group per module in torch 2.6 to 2.11 (_fsdp_param_group, None without parameters), a list in 2.13.
        groups = getattr(tree_state, "_fsdp_param_groups", None)
        if groups is None:
            groups = [group for group in (tree_state._fsdp_param_group,) if group is not None]
        for group in groups:
            group._training_state = TrainingState.IDLE
            group._post_forward_indices.clear()
    state._state_ctx.iter_forward_root = None
