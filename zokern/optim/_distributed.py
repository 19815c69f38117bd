"""Data parallelism without parameter communication: every rank draws the same seeds, evaluates its own micro-batch,
and the ranks average their losses with one small all_reduce per evaluation round. Parameters then receive the same
passes on every rank and stay identical, provided every rank starts from the same parameters and seeds.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.distributed as dist

from zokern._transfer import to_device
from zokern.ops import holds_plain_tensor

_alone = False  # set by alone(): this process runs without collectives


@contextlib.contextmanager
def alone() -> Iterator[None]:
    """Inside the block this process acts alone, with no collective: replay rebuilds weights on any one rank from a
    trajectory whose losses are already averaged, while the other ranks do something else."""
    global _alone
    previous, _alone = _alone, True
    try:
        yield
    finally:
        _alone = previous


def active() -> bool:
    return not _alone and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _comm_device() -> torch.device:
    # NCCL reduces CUDA tensors only; gloo and the others take CPU tensors.
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def mean_across_ranks_on_device(
    values: list, device: torch.device, identity: tuple[int, ...] = ()
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The losses (tensors or numbers) as one float64 vector on ``device``, averaged over all ranks when
    torch.distributed is initialised; no host sync where the communication device is ``device``.

    ``identity`` (non-negative integers: the step's seed, the round's number) rides along in the same all_reduce:
    collectives pair by call order alone, so a rank one step ahead, or one that skipped a round, would silently
    average another step's losses. Returns the vector and, when reduced, a 0-d bool tensor on ``device``: whether
    every rank gave the same identity (where not, the vector is NaN, so no update follows from it)."""
    # float64 from the start: a Python float (replay's recorded losses) must not pass through float32.
    vector = torch.stack([torch.as_tensor(v, dtype=torch.float64).detach().reshape(()).to(device) for v in values])
    if not active():
        return vector, None
    chunks = _chunks(identity)
    header = to_device(chunks + [c * c for c in chunks], _comm_device(), torch.float64)  # no host sync on a GPU
    reduced = torch.cat((vector.to(_comm_device()), header))
    dist.all_reduce(reduced, op=dist.ReduceOp.SUM)
    world = dist.get_world_size()
    n, m = len(values), len(chunks)
    sums, squares = reduced[n : n + m], reduced[n + m :]
    # Equal on every rank iff world * sum(c^2) == sum(c)^2 (Cauchy-Schwarz); exact in float64 for 16-bit chunks.
    agree = (squares * world == sums * sums).all()
    vector = torch.where(agree, reduced[:n] / world, torch.nan).to(device)
    return vector, agree.to(device)


def _chunks(identity: tuple[int, ...]) -> list[int]:
    """Each integer as four 16-bit pieces (enough for the 63-bit seeds)."""
    return [(value >> shift) & 0xFFFF for value in identity for shift in (0, 16, 32, 48)]


def broadcast_seed(seed: int) -> int:
    """Rank 0's seed, on every rank."""
    if not active():
        return seed
    t = torch.tensor([seed], dtype=torch.int64, device=_comm_device())
    dist.broadcast(t, src=0)
    return int(t.item())


def check_same_seed(seed: int, what: str) -> None:
    """Raise on every rank if the ranks disagree on ``seed``: a desynchronised rank would silently diverge."""
    if not active():
        return
    t = torch.tensor([seed, -seed], dtype=torch.int64, device=_comm_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    high, low = int(t[0]), -int(t[1])
    if high != low:
        raise RanksDisagree(
            f"zokern: ranks disagree on the {what} (this rank {seed}, range [{low}, {high}] across ranks). {_ADVICE}"
        )


# Same-size integer views of a parameter's bits: their integer sum is exact in any order, so equal weights give equal
# checksums whatever each rank's threads split (a float sum's last bit depends on the split).
_BITS_AS = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def weights_checksums(params: list[torch.Tensor]) -> list[int]:
    """Per parameter, the int64 sum of its elements' bits (one read, one host sync): equal on every rank that holds
    the same weights. Parameters whose bits cannot be read as integers in place (meta, sparse, quantized, a lazy
    conjugate or negation, a subclass keeping its values elsewhere) count as 0: no step writes them."""
    sums: dict[torch.device, list[tuple[int, torch.Tensor]]] = {}
    for k, p in enumerate(params):
        bits = _BITS_AS.get(p.element_size())
        if (
            bits is None
            or p.layout != torch.strided
            or p.is_meta
            or p.is_quantized
            or p.is_conj()
            or p.is_neg()
            or not holds_plain_tensor(p)
        ):
            continue
        sums.setdefault(p.device, []).append((k, p.detach().view(bits).sum(dtype=torch.int64)))
    checksums = [0] * len(params)
    for pairs in sums.values():
        for (k, _), value in zip(pairs, torch.stack([s for _, s in pairs]).tolist()):
            checksums[k] = value
    return checksums


def max_across_ranks(value: int) -> int:
    """The largest of the ranks' ``value`` (this one's alone without torch.distributed)."""
    if not active():
        return value
    t = torch.tensor([value], dtype=torch.int64, device=_comm_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


class RanksDisagree(RuntimeError):
    """The ranks are not taking the same step: their parameters would silently diverge."""


_ADVICE = (
    "Data-parallel ZO needs every rank to take the same steps with the same seed: construct the optimizer with the "
    "same seed and options everywhere, resume every rank from the same checkpoint, and call step() the same number of "
    "times on every rank."
)


def disagreement(step: int) -> RanksDisagree:
    return RanksDisagree(
        f"zokern: ranks disagree on step {step}: they were not all taking it (or not the same evaluation round of it), "
        "or took it with other options, hyperparameters (a scheduler stepped on a rank's own metric?), trainable "
        f"parameters or backends, or one rank had taken the last step's merged perturbation back (a read of the "
        f"parameters on one rank only: call materialize() on every rank); its update was skipped. {_ADVICE}"
    )
