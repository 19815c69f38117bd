"""Sharded parameters: FSDP2's (``torch.distributed.fsdp.fully_shard``) DTensors. A rank's shard of such a parameter is
a block of whole rows, the elements ``[start, start + numel)`` of the parameter in row-major order, so the passes
perturb and update it in place as that slice of the stream: every rank regenerates the z of the elements it holds,
and the sharded run takes the same steps as one process holding the whole model (docs/optim.md, "Sharded
parameters")."""

from __future__ import annotations

import contextlib
import sys
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


@contextlib.contextmanager
def gathering_current_shards() -> Iterator[None]:
    """Inside the block, each FSDP2 module gathers its parameters from their shards when its forward starts, and
    the modules that ran are resharded when the block ends. FSDP2 keeps a module's gathered parameters after a
    forward (the root's always, for the backward that a ZO step never runs): a later forward would read them as they
    were, not as the passes have since perturbed or updated the shards, and so would ``model.parameters()`` and an
    evaluation after the step."""
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
            module.reshard()
