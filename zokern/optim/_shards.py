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


def is_dtensor(p: torch.Tensor) -> bool:
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
    return local_slice(p, name) if is_dtensor(p) else (p, 0)


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
    mesh = p.device_mesh
    sizes = [mesh.size(d) for d in range(mesh.ndim)]
    coordinate = [mesh.get_local_rank(d) for d in range(mesh.ndim)]
    return _block(p, tuple(p.placements), sizes, coordinate, tuple(local.shape), name)


def _block(p: torch.Tensor, placements: tuple, sizes: list[int], coordinate: list[int], shape: tuple, name: str) -> int:
    """The row-major index in ``p`` of the first element of the shard, shaped ``shape``, held by the coordinate
    ``coordinate`` of a mesh of ``sizes`` under ``placements``; a TypeError for a shard not a block of rows."""
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor import Shard

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
        chunk = -(-(end - start) // sizes[mesh_dim])
        k = coordinate[mesh_dim]
        start, end = min(start + k * chunk, end), min(start + (k + 1) * chunk, end)
    expected = (end - start, *p.shape[1:]) if p.dim() else ()
    if shape != expected:  # a placement that splits otherwise than torch.chunk: refuse, not guess
        raise TypeError(
            f"{name} is a DTensor placed {placements} whose local shard has shape {shape}, where rows "
            f"[{start}, {end}) of its shape {tuple(p.shape)} were expected: zokern cannot tell which slice of the "
            "stream this shard holds"
        )
    return start * (p.numel() // rows if rows else 0)


def saved_slice(value: torch.Tensor, rank: int, name: str) -> tuple[torch.Tensor, int]:
    """The values a saved state ``value`` holds, flat, and the row-major index of the first in its parameter: for a
    DTensor, the shard that global rank ``rank`` of the run that saved it held (its mesh as saved); else all."""
    if not is_dtensor(value):
        return value.reshape(-1), 0
    local = local_tensor(value)
    mesh = value.device_mesh
    where = (mesh.mesh == rank).nonzero().tolist()
    if len(where) != 1:
        raise ValueError(
            f"the state of {name} given as rank {rank}'s is placed over the ranks {mesh.mesh.flatten().tolist()}, "
            "not over that rank: give the state dicts of all the ranks that saved them, in rank order"
        )
    start = _block(value, tuple(value.placements), list(mesh.shape), where[0], tuple(local.shape), name)
    return local.reshape(-1), start


def check_optimizer_params(params: list[torch.Tensor]) -> None:
    """At a ZO optimizer's construction: with DTensors among ``params``, learn the FSDP2 modules from now on
    (track_forwards), and warn when trainable parameters mix DTensors and plain tensors: after a forward, FSDP2 keeps
    its root module's parameters gathered, and ``model.parameters()`` yields those plain copies, which it frees and
    refills from the shards at every forward, in place of the root's DTensors (the steps would train copies)."""
    dtensor = dtensor_class()
    if dtensor is None or not any(isinstance(p, dtensor) for p in params):
        return
    track_forwards()
    trainable = [p for p in params if p.requires_grad]
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


def sum_over_shards(values: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """``values`` summed over the ranks that hold the other shards of DTensor ``p`` (the mesh dimensions on which it
    is sharded; replicas along the others hold the same rows): a reduction over a parameter's whole from each rank's
    share of it. In place, and returned."""
    from torch.distributed.tensor import Shard

    for dim, placement in enumerate(p.placements):
        if isinstance(placement, Shard):
            torch.distributed.all_reduce(values, group=p.device_mesh.get_group(dim))
    return values


def placed_like(value: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """A DTensor placed as DTensor ``p`` whose local tensor is ``value`` (shaped like ``p``'s shard): a state as a
    checkpoint holds it (torch.distributed.checkpoint saves each rank's rows), or the exact mode's perturbed copy."""
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(value, p.device_mesh, p.placements, run_check=False, shape=p.shape, stride=p.stride())


class ShardingMismatch(ValueError):
    """A saved state sharded otherwise than its parameter is now: load_sharded_state_dict, given all the ranks'
    state dicts, takes it."""


def loaded_state(value: torch.Tensor, p: torch.Tensor, name: str) -> torch.Tensor:
    """What a saved per-element state ``value`` of parameter ``p`` holds for this rank: for a DTensor ``p``, the
    local tensor of a state placed alike over a mesh of the same shape, or its shard's rows of a whole state (a plain
    tensor, saved by an unsharded run; a replicated DTensor); for a plain ``p``, a whole state. A ValueError naming
    ``name`` for a state sharded otherwise."""
    if is_dtensor(value):
        from torch.distributed.tensor import Replicate

        mine = local_tensor(value)
        if (
            is_dtensor(p)
            and tuple(value.placements) == tuple(p.placements)
            and value.device_mesh.shape == p.device_mesh.shape
            and mine.shape == local_tensor(p).shape
        ):
            return mine
        if not all(isinstance(placement, Replicate) for placement in value.placements):
            where = (
                f"is placed {tuple(p.placements)} over a mesh of shape {tuple(p.device_mesh.shape)}"
                if is_dtensor(p)
                else "is not sharded"
            )
            raise ShardingMismatch(
                f"{name} {where}, but its saved state is placed {tuple(value.placements)} over a mesh of shape "
                f"{tuple(value.device_mesh.shape)}: load the state dicts of all the ranks that saved them with "
                "load_sharded_state_dict, or save states under the sharding that loads them, or whole"
            )
        value = mine
    if not is_dtensor(p):
        return value
    local, start = local_slice(p, name)
    return value.reshape(-1)[start : start + local.numel()].view(local.shape)


# FSDP2 keeps a module's gathered parameters after a forward (the root's always, for the backward a ZO step never
# runs), and a later forward reads them as they are: every pass that writes shards first reshards the FSDP2 modules
# known to have run, so that their next forward gathers the shards as the pass left them, and model.parameters()
# hands out DTensors again (after an evaluation between steps, apply_projected_grad or replay too). A module is
# known from its first forward after the first sharded optimizer was built, which reshards it first.
_known: weakref.WeakSet = weakref.WeakSet()
_tracking: torch.utils.hooks.RemovableHandle | None = None
_learned = False  # whether a module was learned since modules_learned() last said
_learned_count = 0  # how many modules were learned: GatheredTensors walks the modules again when it changes


def track_forwards() -> None:
    """From now on, learn the FSDP2 modules that run a forward (once per process; a sharded optimizer's first)."""
    global _tracking
    if _tracking is None:
        _tracking = torch.nn.modules.module.register_module_forward_pre_hook(_learn)


def _learn(module: torch.nn.Module, args: object) -> None:
    if module in _known:  # (the common case first: a WeakSet lookup)
        return
    fsdp = sys.modules.get("torch.distributed.fsdp")
    module_class = getattr(fsdp, "FSDPModule", None)
    if module_class is not None and isinstance(module, module_class):
        global _learned, _learned_count
        _reshard(module)  # it may hold parameters gathered before the shards' last write
        _known.add(module)
        _learned, _learned_count = True, _learned_count + 1


def modules_learned() -> bool:
    """Whether an FSDP2 module ran its first forward since the last call. A root's first forward initialises its
    tree, which in torch 2.6 gives shards that are padded new local tensors (their values copied): a step whose
    closure ran it must write those."""
    global _learned
    learned, _learned = _learned, False
    return learned


def shards_written() -> None:
    """A pass is about to write shards: the FSDP2 modules that hold gathered parameters let them go."""
    track_forwards()
    _reshard_known()


def _reshard_known() -> None:
    for module in fsdp_modules():
        _reshard(module)


def fsdp_modules() -> list[torch.nn.Module]:
    """Every module fully_shard registered (torch's registry of composable states, which holds the modules learned
    too): a module whose forward runs only through a method given to register_fsdp_forward_method never passes the
    forward pre-hook that learns modules, but keeps its gathered parameters as the others do. The modules learned
    where a torch release has no such registry."""
    registry = getattr(sys.modules.get("torch.distributed._composable_state"), "_module_state_mapping", None)
    module_class = getattr(sys.modules.get("torch.distributed.fsdp"), "FSDPModule", None)
    if registry is None or module_class is None:
        return list(_known)
    return [m for m in list(registry) if isinstance(m, module_class)]


def _reshard(module: torch.nn.Module) -> None:
    state = module._get_fsdp_state()
    _end_iteration(module, state)  # (a root whose last forward raised keeps its gathered parameters through reshard())
    _drop_pending_gathers(state)
    module.reshard()


def _drop_pending_gathers(state) -> None:
    """Drop the all-gathers a module's groups issued and have not copied out: unshard() outside a forward (or a
    forward prefetch whose forward raised) gathers the shards as they are then, and the module's next forward copies
    out those values, however the shards were written since; reshard() leaves them (torch 2.13's reset_iter_state
    drops them for a whole tree). Waited for first, as FSDP2 does."""
    for group in _param_groups(state):
        result = group._all_gather_result
        if result is None:
            continue
        if result.all_gather_event is not None:
            group.device_handle.current_stream().wait_event(result.all_gather_event)
        if isinstance(result.all_gather_work, torch.distributed.distributed_c10d.Work):
            result.all_gather_work.wait()
        group._all_gather_result = None


def _param_groups(state) -> list:
    """An FSDP2 state's parameter groups: one per module in torch 2.6 to 2.11 (``_fsdp_param_group``, None without
    parameters); later, a list."""
    groups = getattr(state, "_fsdp_param_groups", None)
    if groups is None:
        groups = [group for group in (state._fsdp_param_group,) if group is not None]
    return groups


class GatheredTensors:
    """The whole tensors FSDP2 gathers from the shards of the DTensors ``wanted`` (by id) for its modules' forwards,
    the tensors those forwards' ops receive, found among the parameters of the FSDP2 modules (fsdp_modules()). FSDP2
    makes a parameter's gathered tensor at its module's first gather and keeps that object, refilling its memory at
    each gather and freeing it after: found once, it stands for the parameter in every later forward."""

    def __init__(self, wanted: dict[int, object]) -> None:
        self._missing = set(wanted)
        self._walked = -1  # _learned_count when the modules were last walked
        self._candidates: list = []  # FSDP2's records (FSDPParam) of missing parameters, whose gather is not made yet

    @property
    def waiting(self) -> bool:
        """Whether a wanted parameter's gathered tensor is still to be found."""
        return bool(self._missing)

    def found(self) -> list[tuple[torch.Tensor, int]]:
        """(gathered tensor, id of its DTensor) of the wanted parameters whose gathered tensors were made since the
        last call: checked at each op until all are found (in the first evaluation of a run, as FSDP2's first forward
        makes them; in later ones, at once)."""
        if self._walked != _learned_count:
            self._walked = _learned_count
            seen = {id(record) for record in self._candidates}
            for module in fsdp_modules():
                for group in _param_groups(module._get_fsdp_state()):
                    self._candidates.extend(
                        record
                        for record in group.fsdp_params
                        if id(record.sharded_param) in self._missing and id(record) not in seen
                    )
        out = []
        for record in self._candidates:
            tensor = getattr(record, "_unsharded_param", None)
            if tensor is not None and id(record.sharded_param) in self._missing:
                self._missing.discard(id(record.sharded_param))
                out.append((tensor, id(record.sharded_param)))
        if out:
            self._candidates = [record for record in self._candidates if id(record.sharded_param) in self._missing]
        return out


@contextlib.contextmanager
def resharded_after() -> Iterator[None]:
    """When the block (a closure's evaluation) ends, also by an exception, the FSDP2 modules let their gathered
    parameters go, as before a pass (shards_written): else ``model.parameters()`` would hand out the root's gathered
    copies in place of its DTensors, and after a forward that raised, FSDP2 would keep any module's."""
    track_forwards()
    try:
        yield
    finally:
        _reshard_known()


def _end_iteration(module: torch.nn.Module, state) -> None:
    """End the iteration of the FSDP2 tree whose root is ``module`` (FSDP2 state ``state``; nothing for another
    module): its groups back to idle, whose reshard() a forward that raised left a no-op, and its records of forwards
    cleared, which only a backward clears otherwise (they grow by a few entries a forward, for as long as the run).
    torch 2.13's reset_iter_state() does this; earlier releases' same fields are set by hand."""
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
        tree_state._modules_to_run_forward.clear()
        for group in _param_groups(tree_state):
            group._training_state = TrainingState.IDLE
            group._post_forward_indices.clear()
    state._state_ctx.iter_forward_root = None
