"""Public functional API: the perturbation stream and the fused in-place passes over lists of tensors.

Every function validates all of its arguments before touching any tensor, so bad input raises a ValueError or
TypeError that names the argument and leaves the tensors as they were. ``prepare`` validates a list of tensors once
for many passes (a pass then only checks that none of them changed). The math of each pass is the one fused pass
of docs/stream.md, section 5: z is regenerated from (seed, global element index), never stored.
"""

from __future__ import annotations

import math
import numbers
import operator
from collections.abc import Callable
from collections.abc import Iterable

import torch

from zokern import _reference
from zokern import _scalars
from zokern._dispatch import available_requested_backend
from zokern._dispatch import select_backend

INDEX_LIMIT = 1 << 63
_NBYTES = operator.attrgetter("nbytes")
_DTYPE = operator.attrgetter("dtype")
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
ROUNDINGS = ("nearest", "stochastic")

Tensors = torch.Tensor | Iterable[torch.Tensor]
# The smallest magnitude float32 rounds to infinity (FLT_MAX plus half an ulp): the kernels take scalars in float32.
FLOAT32_OVERFLOW = 2.0**128 - 2.0**103
_FLOAT32_ROUNDS_TO_ZERO = 2.0**-150  # half the smallest float32 subnormal: ties to even, to 0
FLOAT32_TINY = 2.0**-126  # the smallest normal float32: an eps below it perturbs by nothing (or a subnormal)
Z_BOUND = 4.855  # the stream's largest |z| (docs/stream.md, section 3; Rademacher's is 1)
# The largest perturbation scale whose step (theta + eps z, then - 2 eps z) float32 holds wherever |theta| is small.
EPS_LIMIT = FLOAT32_OVERFLOW / (2 * Z_BOUND)


# ---------------------------------------------------------------------------------------------------- validation


def _check_index(name: str, value: object) -> int:
    if isinstance(value, bool) or isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a Python integer, got {type(value).__name__}")
    try:
        value = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an integer, got {type(value).__name__}") from None
    if not 0 <= value < INDEX_LIMIT:
        raise ValueError(f"{name} must be in [0, 2^63), got {value}")
    return value


def _check_real(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        hint = " (pass a Python float; only grad may be a device tensor)" if isinstance(value, torch.Tensor) else ""
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}{hint}")
    try:
        value = float(value)
    except OverflowError:  # an integer or fraction beyond any float
        value = math.inf
    if not abs(value) < FLOAT32_OVERFLOW:
        raise ValueError(
            f"{name} must be finite in float32, the passes' precision (|{name}| < 3.4028236e38), got {value}"
        )
    # A value that rounds to a float32 zero (-0.0, or |value| <= 2^-150) is +0.0 (docs/stream.md, section 5).
    return 0.0 if abs(value) <= _FLOAT32_ROUNDS_TO_ZERO else value


def _check_choice(name: str, value: object, choices: Iterable[str]) -> str:
    choices = tuple(choices)
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")
    return value  # type: ignore[return-value]


SUBCLASS_REASON = (
    "zokern's passes read and write a tensor's own memory, and a tensor subclass (a DTensor, a quantized weight) "
    "keeps its values elsewhere. The optimizers train FSDP2's sharded DTensors (docs/optim.md); give the passes "
    "each shard's local tensor with its stream offset"
)


def holds_plain_tensor(t: torch.Tensor) -> bool:
    """Whether ``t`` (a parameter of any class) stores its values as a plain tensor, which the kernels can write."""
    cls = type(t)  # the common classes first: .data builds a new tensor object (host time on every step)
    return cls is torch.Tensor or cls is torch.nn.Parameter or type(t.data) is torch.Tensor


def _check_tensors(tensors: Tensors, written: bool = True, name: str = "tensors") -> list[torch.Tensor]:
    """The tensors as a list, each checked; ``written``: ones a pass writes (distinct memory, no inference tensors
    outside inference mode); ``name``: the argument, for the messages."""
    if isinstance(tensors, PreparedTensors):  # a prepared set carries offsets this call would not honour
        raise TypeError("this function takes tensors, not a PreparedTensors (only the in-place passes take one)")
    if isinstance(tensors, torch.Tensor):
        tensors = [tensors]
    if isinstance(tensors, (set, frozenset)):  # as torch.optim refuses them: each tensor's slice depends on the order
        raise TypeError(
            f"{name} must be an ordered collection of tensors (a list or tuple), got a {type(tensors).__name__}: "
            "each tensor draws the stream slice after the tensors before it, and a set's order changes between runs"
        )
    try:
        tensors = list(tensors)
    except TypeError:
        raise TypeError(f"{name} must be a tensor or an iterable of tensors, got {type(tensors).__name__}") from None
    # Per call, not per tensor: this loop runs over every parameter on each optimizer pass (host time per step).
    inference_mode = torch.is_inference_mode_enabled()
    device = tensors[0].device if tensors and isinstance(tensors[0], torch.Tensor) else None
    if device is not None and device.type == "meta":  # a pass over it would do nothing, silently
        raise ValueError(f"{name}[0] is on the meta device: it holds no values to perturb or update")
    for k, t in enumerate(tensors):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}[{k}] is a {type(t).__name__}, expected a torch.Tensor")
        if not holds_plain_tensor(t):
            raise TypeError(f"{name}[{k}] is a {type(t.data).__name__}: {SUBCLASS_REASON}")
        if t.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"{name}[{k}] has dtype {t.dtype}; zokern updates float32, bfloat16 and float16 tensors")
        if t.device != device:
            raise ValueError(
                f"{name}[{k}] is on {t.device} but {name}[0] is on {device}; one call takes tensors of one device"
            )
        if t.layout != torch.strided:  # (before is_contiguous: a sparse CSR tensor raises, an mkldnn one says yes)
            raise TypeError(f"{name}[{k}] is a {t.layout} tensor; zokern's passes take dense (strided) tensors")
        if not t.is_contiguous():
            raise ValueError(
                f"{name}[{k}] (shape {tuple(t.shape)}) is not contiguous; the stream is indexed by "
                "row-major element order, so pass contiguous tensors"
            )
        if written and not inference_mode and t.is_inference():
            _refuse_inference_tensor(k, name)
    if written:  # read-only tensors may share memory (one source for several outputs)
        _check_no_overlap(tensors, name)
    return tensors


def _refuse_inference_tensor(k: int, name: str = "tensors") -> None:
    raise ValueError(
        f"{name}[{k}] is an inference tensor (made under torch.inference_mode), which cannot be updated in "
        "place outside inference mode; clone it, or call inside torch.inference_mode()"
    )


def _spans(tensors: list[torch.Tensor]) -> list[tuple[int, int, int]]:
    """(start, end, index) of each tensor's memory, sorted; empty tensors (no memory) left out (the passes refuse
    meta tensors, whose data_ptr is 0)."""
    # Attribute by attribute with map, not tensor by tensor: half the host time over hundreds of parameters.
    spans = zip(map(torch.Tensor.data_ptr, tensors), map(_NBYTES, tensors), range(len(tensors)))
    return sorted((start, start + size, k) for start, size, k in spans if size)


def _first_overlap(spans: list[tuple[int, int, int]]) -> tuple[int, int] | None:
    """The indices of two overlapping spans of a sorted list, if any (an overlap implies an adjacent one)."""
    for (_, end, k1), (start, _, k2) in zip(spans, spans[1:]):
        if start < end:
            return k1, k2
    return None


def first_overlap_by_device(tensors: list[torch.Tensor]) -> tuple[int, int] | None:
    """The indices (in order) of two of ``tensors`` that share memory on one device, if any (two devices' addresses
    may coincide)."""
    for device in {t.device for t in tensors}:
        on = [k for k, t in enumerate(tensors) if t.device == device]
        pair = _first_overlap(_spans([tensors[k] for k in on]))
        if pair is not None:
            first, second = sorted(on[k] for k in pair)
            return first, second
    return None


def _check_no_overlap(tensors: list[torch.Tensor], name: str = "tensors") -> None:
    """An element updated twice in one pass would silently receive two perturbations."""
    pair = _first_overlap(_spans(tensors))
    if pair is not None:
        first, second = sorted(pair)
        raise ValueError(f"{name}[{first}] and {name}[{second}] overlap in memory; each element must appear once")


def _bases(tensors: list[torch.Tensor], offset: int, offsets: Iterable[int] | None = None) -> list[int]:
    """Global index of each tensor's first element: consecutive from ``offset``, or given one by one."""
    if offsets is not None:
        if offset != 0:
            raise ValueError("pass either offset (tensors laid end to end) or offsets (one per tensor), not both")
        if isinstance(offsets, (set, frozenset)):
            raise TypeError(
                "offsets must be a list or tuple, one per tensor in order, got a set (its order is arbitrary)"
            )
        bases = list(offsets)
        if len(bases) != len(tensors):
            raise ValueError(f"offsets has {len(bases)} entries for {len(tensors)} tensors")
        numels = list(map(torch.Tensor.numel, tensors))
        # The common case checked whole (an optimizer's Python ints); anything else entry by entry, to name it.
        if not (
            all(type(b) is int for b in bases)
            and min(bases, default=0) >= 0
            and max(map(operator.add, bases, numels), default=0) <= INDEX_LIMIT
        ):
            bases = [_check_index(f"offsets[{k}]", b) for k, b in enumerate(bases)]
            for k, (n, b) in enumerate(zip(numels, bases)):
                if b + n > INDEX_LIMIT:
                    raise ValueError(f"offsets[{k}] + numel = {b + n} exceeds the stream's index range [0, 2^63)")
        return bases
    offset = _check_index("offset", offset)
    bases, total = [], offset
    for t in tensors:
        bases.append(total)
        total += t.numel()
    if total > INDEX_LIMIT:
        raise ValueError(f"offset + total numel = {total} exceeds the stream's index range [0, 2^63)")
    return bases


def _check_next(next_seed: int | None, next_alpha: float) -> dict:
    """The fused next perturbation's seed2 and alpha2 (none without next_seed)."""
    alpha2 = _check_real("next_alpha", next_alpha)
    if next_seed is None:
        if alpha2 != 0.0:
            raise ValueError(f"next_alpha={alpha2} needs next_seed, the seed of the perturbation it scales")
        return dict(seed2=None, alpha2=0.0)
    return dict(seed2=_check_index("next_seed", next_seed), alpha2=alpha2)


def _check_flag(found_nonfinite: object, device: torch.device) -> None:
    if found_nonfinite is None:
        return
    if not isinstance(found_nonfinite, torch.Tensor):
        raise TypeError(f"found_nonfinite must be a tensor, got {type(found_nonfinite).__name__}")
    if found_nonfinite.numel() != 1 or found_nonfinite.device != device:
        raise ValueError(f"found_nonfinite must be a one-element tensor on {device}")
    if not (found_nonfinite.dtype == torch.bool or found_nonfinite.is_floating_point()):
        raise TypeError(f"found_nonfinite must be a bool or floating tensor, got {found_nonfinite.dtype}")
    if found_nonfinite.is_inference() and not torch.is_inference_mode_enabled():
        raise ValueError("found_nonfinite is an inference tensor, which cannot be set outside inference mode")


def _check_grad(grad: object, device: torch.device) -> float | torch.Tensor:
    if not isinstance(grad, torch.Tensor):
        return _check_real("grad", grad)
    if not grad.is_floating_point() or grad.numel() != 1:
        raise ValueError(
            f"grad tensor must be a floating tensor with one element, got dtype {grad.dtype}, shape {tuple(grad.shape)}"
        )
    if grad.device != device:
        if grad.device.type == "cpu":
            return _check_real("grad", grad.item())
        raise ValueError(f"grad is on {grad.device} but the tensors are on {device}")
    # A private copy (one element): a g read from the memory the pass writes (a view into a parameter buffer) would
    # be read before or after its write depending on the backend.
    return grad.detach().reshape(()).to(torch.float32, copy=True)


def _rounding_seed(rounding: str, rounding_seed: int | None) -> Callable[[], int | None]:
    """The stochastic-rounding seed of a pass (None for round-to-nearest), checked now and drawn when called: by
    _run_pass after its own checks, so that a refused call leaves torch's global generator where it was."""
    if _check_choice("rounding", rounding, ROUNDINGS) == "nearest":
        if rounding_seed is not None:
            raise ValueError("rounding_seed is only used with rounding='stochastic'")
        return lambda: None
    if rounding_seed is None:
        # Drawn from torch's global generator: reproducible under torch.manual_seed, fresh bits every pass.
        return lambda: int(torch.randint(0, 2**62, (), dtype=torch.int64).item())
    seed = _check_index("rounding_seed", rounding_seed)
    return lambda: seed


# ------------------------------------------------------------------------------------------------------- passes


def _checked_scalars(scalars: object, prepared: PreparedTensors) -> torch.Tensor | None:
    if scalars is None:
        return None
    if prepared.device is None:  # no tensors, no pass: the row is still checked, against its own device
        _scalars.check(scalars, getattr(scalars, "device", None))
        return None
    return _scalars.check(scalars, prepared.device)


class PreparedTensors:
    """Tensors validated once, with their stream offsets, for many in-place passes: see :func:`prepare`."""

    __slots__ = ("device", "_tensors", "_by_dtype", "_data_ptrs", "_numels", "_dtypes", "_inference")

    def __init__(self, tensors: list[torch.Tensor], bases: list[int]) -> None:
        """``tensors`` as :func:`_check_tensors` returns them, ``bases`` as :func:`_bases` does."""
        self.device = tensors[0].device if tensors else None
        self._tensors = tensors
        self._data_ptrs = list(map(torch.Tensor.data_ptr, tensors))
        self._numels = list(map(torch.Tensor.numel, tensors))
        self._dtypes = list(map(_DTYPE, tensors))
        self._inference = any(map(torch.Tensor.is_inference, tensors))
        # Grouped once: each backend call takes tensors of one dtype; empty tensors have nothing to write.
        if len({t.dtype for t in tensors}) == 1 and all(self._numels):  # the usual case, without a loop
            self._by_dtype = [(tensors, bases)]
            return
        by_dtype: dict[torch.dtype, tuple[list[torch.Tensor], list[int]]] = {}
        for t, n, b in zip(tensors, self._numels, bases):
            if n:
                group = by_dtype.setdefault(t.dtype, ([], []))
                group[0].append(t)
                group[1].append(b)
        self._by_dtype = list(by_dtype.values())

    def __len__(self) -> int:
        return len(self._tensors)

    def __repr__(self) -> str:
        return f"PreparedTensors({len(self)} tensors, {sum(self._numels)} elements, device={self.device})"

    def check_unchanged(self) -> None:
        """What the validation established still holds: each tensor keeps its storage, size, dtype and layout (a
        module's ``.to()``/``.half()`` or ``p.data = ...`` gives a parameter new ones, and the allocator may hand the
        old address back). Per tensor four attribute reads, a fifth of the full validation."""
        if (
            list(map(torch.Tensor.data_ptr, self._tensors)) != self._data_ptrs
            or list(map(torch.Tensor.numel, self._tensors)) != self._numels
            or list(map(_DTYPE, self._tensors)) != self._dtypes
            or not all(map(torch.Tensor.is_contiguous, self._tensors))
        ):
            k = next(
                k
                for k, t in enumerate(self._tensors)
                if (t.data_ptr(), t.numel(), t.dtype) != (self._data_ptrs[k], self._numels[k], self._dtypes[k])
                or not t.is_contiguous()
            )
            raise ValueError(
                f"tensors[{k}] changed since zokern.ops.prepare (new storage, size or layout, e.g. after p.data = "
                "... or a module's .to()): prepare the tensors again"
            )
        if self._inference and not torch.is_inference_mode_enabled():
            k = next(k for k, t in enumerate(self._tensors) if t.is_inference())
            _refuse_inference_tensor(k)


def prepare(tensors: Tensors, *, offset: int = 0, offsets: Iterable[int] | None = None) -> PreparedTensors:
    """Validate tensors once for several in-place passes (:func:`perturb_`, :func:`restore_update_`,
    :func:`two_seed_`), which then take the returned set in place of the tensors and skip their per-tensor checks:
    for hundreds of parameters these cost more host time than launching the pass.

    The set keeps each tensor's stream offset (``offset``/``offsets`` as for :func:`perturb_`; a pass given the
    set takes neither) and the tensors themselves, so a pass writes their current values. Each pass still checks,
    cheaply, that no tensor got new storage, size or layout since (``p.data = ...``, a module's ``.to()``) and
    refuses the set if one did: prepare again after such a change.
    """
    if isinstance(tensors, PreparedTensors):
        raise TypeError("tensors is already a PreparedTensors")
    tensors = _check_tensors(tensors)
    return PreparedTensors(tensors, _bases(tensors, offset, offsets))


def _prepared(tensors: Tensors | PreparedTensors, offset: int, offsets: Iterable[int] | None) -> PreparedTensors:
    """A pass's tensors as a validated set: checked now, or (a prepared set) checked to be unchanged."""
    if not isinstance(tensors, PreparedTensors):
        return prepare(tensors, offset=offset, offsets=offsets)
    if offset != 0 or offsets is not None:
        raise ValueError("a PreparedTensors carries its stream offsets: pass it without offset or offsets")
    tensors.check_unchanged()
    return tensors


def _run_pass(
    prepared: PreparedTensors,
    backend: str | None,
    scalars: torch.Tensor | None = None,
    rounding_seed: Callable[[], int | None] = lambda: None,
    **kwargs,
) -> None:
    if not prepared._by_dtype:
        available_requested_backend(backend)  # a bad name is refused whether or not there is work
        rounding_seed()  # drawn all the same: a run's later draws do not depend on whether a list was empty
        return
    device = prepared.device
    impl = select_backend(device, backend)
    reads = getattr(impl, "reads_device_scalars", None)
    reads_row = scalars is not None and reads is not None and reads(device)
    values = None
    if scalars is not None and (not reads_row or scalars.device.type == "cpu"):
        # A row in host memory is checked as the arguments are (a free read), as is one that a backend taking its
        # scalars as arguments reads anyway; one in device memory is the kernel's to read when it runs.
        values = _scalars.check_values(scalars)
    kwargs["rounding_seed"] = rounding_seed()
    if reads_row:
        kwargs["scalars"] = scalars
    elif values is not None:  # a backend that takes its scalars as arguments: the row's values replace them
        kwargs = _scalars.with_values(kwargs, values)
    with torch.no_grad():
        for group_tensors, group_bases in prepared._by_dtype:
            impl.zo_pass_(group_tensors, group_bases, **kwargs)
    # The C++ and Triton kernels write through pointers, unseen by autograd: without this, a graph that saved one of
    # these tensors would backpropagate through the new values without the "modified by an inplace operation" error.
    torch.autograd.graph.increment_version(prepared._tensors)


def perturb_(
    tensors: Tensors | PreparedTensors,
    seed: int,
    alpha: float,
    *,
    offset: int = 0,
    offsets: Iterable[int] | None = None,
    distribution: str = "gaussian",
    rounding: str = "nearest",
    rounding_seed: int | None = None,
    backend: str | None = None,
    scalars: torch.Tensor | None = None,
) -> None:
    r"""In place, :math:`t \leftarrow t + \alpha z(\text{seed})` on every tensor, in one pass.

    Tensor k takes the stream slice starting at ``offset`` + (sum of numel of the tensors before it); see
    docs/stream.md. Computes in float32 and writes in each tensor's dtype (float32, bfloat16, float16).

    Args:
        tensors: a tensor or an iterable of contiguous tensors on one device, or a set of them validated once
            by :func:`prepare` (which carries the offsets).
        seed: the stream's seed, in [0, 2^63).
        alpha: the coefficient (for MeZO: ``eps`` to perturb, ``-2 * eps`` to flip).
        offset: global index of the first element of ``tensors[0]``.
        offsets: instead of ``offset``, the global index of each tensor's first element (for tensors that are not
            consecutive in the stream, e.g. the trainable parameters of an optimizer between frozen ones).
        distribution: ``"gaussian"`` or ``"rademacher"``.
        rounding: ``"nearest"`` or ``"stochastic"`` (unbiased, for 16-bit tensors; float32 ignores it).
        rounding_seed: seed of the stochastic-rounding bits, a stream separate from z. Default: drawn from
            torch's global generator.
        backend: force ``"cuda"``, ``"triton"``, ``"cpu"`` or ``"torch"``; default: the fastest available
            (the ``ZOKERN_BACKEND`` environment variable also forces one).
        scalars: optional, for CUDA graphs: a row of ``zokern._scalars`` on the tensors' device from which the
            kernel reads seed, alpha and rounding seed when it runs (the arguments then only choose the kernel:
            distribution, rounding mode), so that a captured pass takes new values when the row is rewritten.
            A row in host memory is checked as the arguments are; a kernel reading one in device memory takes its
            values as they are (checking them would cost the host read the row exists to avoid).
    """
    prepared = _prepared(tensors, offset, offsets)
    kwargs = dict(
        seed=_check_index("seed", seed),
        alpha=_check_real("alpha", alpha),
        distribution=_check_choice("distribution", distribution, _reference.DISTRIBUTIONS),
    )
    draw = _rounding_seed(rounding, rounding_seed)
    _run_pass(prepared, backend, _checked_scalars(scalars, prepared), draw, **kwargs)


def perturb_into_(
    out: Tensors,
    sources: Tensors,
    seed: int,
    alpha: float,
    *,
    offset: int = 0,
    offsets: Iterable[int] | None = None,
    distribution: str = "gaussian",
    next_seed: int | None = None,
    next_alpha: float = 0.0,
    backend: str | None = None,
) -> None:
    r"""Out of place, :math:`\text{out}_k \leftarrow \text{source}_k + \alpha z(\text{seed})` (optionally
    :math:`+ \beta z(\text{next\_seed})`), rounded to nearest, in one pass: one read of each source and one write
    of each output, where ``out.copy_(source)`` followed by :func:`perturb_` would take two of each. ``out[k]`` must
    have ``sources[k]``'s shape and dtype and must not overlap any source. Offsets as :func:`perturb_`.
    """
    out = _check_tensors(out, name="out")
    sources = _check_tensors(sources, written=False, name="sources")
    if len(out) != len(sources):
        raise ValueError(f"out has {len(out)} tensors but sources has {len(sources)}")
    for k, (o, src) in enumerate(zip(out, sources)):
        if o.shape != src.shape or o.dtype != src.dtype or o.device != src.device:
            raise ValueError(
                f"out[{k}] ({tuple(o.shape)}, {o.dtype}, {o.device}) differs from sources[{k}] "
                f"({tuple(src.shape)}, {src.dtype}, {src.device}): shape, dtype and device must match"
            )
    # The outputs are distinct (checked above); sources may share memory, so they count as the union of theirs.
    read: list[tuple[int, int, int]] = []
    for start, end, k in _spans(sources):
        if read and start < read[-1][1]:
            read[-1] = (read[-1][0], max(end, read[-1][1]), read[-1][2])
        else:
            read.append((start, end, k))
    if _first_overlap(sorted(_spans(out) + read)) is not None:
        raise ValueError("the outputs overlap a source: perturb_into_ writes out of place")
    kwargs = dict(
        seed=_check_index("seed", seed),
        alpha=_check_real("alpha", alpha),
        distribution=_check_choice("distribution", distribution, _reference.DISTRIBUTIONS),
        **_check_next(next_seed, next_alpha),
    )
    bases = _bases(out, offset, offsets)
    live = [(o, src, b) for o, src, b in zip(out, sources, bases) if o.numel()]
    if not live:
        available_requested_backend(backend)  # as _run_pass
        return
    impl = select_backend(live[0][0].device, backend, op="zo_copy_pass_")
    by_dtype: dict[torch.dtype, tuple[list, list, list]] = {}
    for o, src, b in live:
        group = by_dtype.setdefault(o.dtype, ([], [], []))
        for column, value in zip(group, (o, src, b)):
            column.append(value)
    with torch.no_grad():
        for outs, srcs, bs in by_dtype.values():
            impl.zo_copy_pass_(outs, srcs, bs, **kwargs)
    torch.autograd.graph.increment_version(out)  # as the in-place passes (_run_pass)


def restore_update_(
    tensors: Tensors | PreparedTensors,
    seed: int,
    alpha: float,
    lr: float,
    grad: float | torch.Tensor,
    *,
    weight_decay: float = 0.0,
    offset: int = 0,
    offsets: Iterable[int] | None = None,
    distribution: str = "gaussian",
    next_seed: int | None = None,
    next_alpha: float = 0.0,
    rounding: str = "nearest",
    rounding_seed: int | None = None,
    found_nonfinite: torch.Tensor | None = None,
    backend: str | None = None,
    scalars: torch.Tensor | None = None,
) -> torch.Tensor | None:
    r"""Restore and update in one pass: :math:`\theta = t + \alpha z`, then
    :math:`t \leftarrow \theta - \eta\,(g z + \lambda \theta)`, optionally :math:`+ \beta z(\text{next\_seed})`.

    A MeZO step is then three passes: ``perturb_(+eps)``, ``perturb_(-2 eps)``, ``restore_update_(alpha=+eps)``;
    with ``next_seed``/``next_alpha`` the last pass also starts the next step's perturbation.

    Args:
        lr: the learning rate :math:`\eta`.
        grad: the projected gradient g: a Python float, or a one-element tensor on the tensors' device, read
            inside the kernel without a host sync. A non-finite device g makes the pass restore without updating
            (weight decay included).
        weight_decay: decoupled weight decay :math:`\lambda`, applied to the restored value.
        next_seed, next_alpha: fuse the next step's ``perturb_(next_seed, next_alpha)`` into this pass.
        found_nonfinite: optional flag tensor on the device (bool or floating, one element), set to true/1 when
            the device g is non-finite, never cleared; read it when convenient.
        scalars: as for :func:`perturb_`; the kernel also reads lr, weight_decay and the next seed and alpha there.
        Other arguments as for :func:`perturb_`.

    Returns:
        A one-element bool tensor on the device, true iff a device g was non-finite (None for a float g, which
        must be finite).
    """
    prepared = _prepared(tensors, offset, offsets)
    device = prepared.device or torch.device("cpu")
    kwargs = dict(
        seed=_check_index("seed", seed),
        alpha=_check_real("alpha", alpha),
        lr=_check_real("lr", lr),
        grad=_check_grad(grad, device),
        weight_decay=_check_real("weight_decay", weight_decay),
        distribution=_check_choice("distribution", distribution, _reference.DISTRIBUTIONS),
        **_check_next(next_seed, next_alpha),
    )
    _check_flag(found_nonfinite, device)
    draw = _rounding_seed(rounding, rounding_seed)
    _run_pass(prepared, backend, _checked_scalars(scalars, prepared), draw, **kwargs)
    if not isinstance(kwargs["grad"], torch.Tensor):
        return None
    flag = ~torch.isfinite(kwargs["grad"])
    if found_nonfinite is not None:
        with torch.no_grad():  # a flag that requires grad is still just a flag
            if found_nonfinite.dtype == torch.bool:
                found_nonfinite.logical_or_(flag)
            else:
                found_nonfinite.copy_(torch.maximum(found_nonfinite, flag.to(found_nonfinite.dtype)))
    return flag


def two_seed_(
    tensors: Tensors | PreparedTensors,
    seed1: int,
    a: float,
    seed2: int,
    b: float,
    *,
    offset: int = 0,
    offsets: Iterable[int] | None = None,
    distribution: str = "gaussian",
    rounding: str = "nearest",
    rounding_seed: int | None = None,
    backend: str | None = None,
) -> None:
    r"""In place, :math:`t \leftarrow t + a\,z(\text{seed1}) + b\,z(\text{seed2})` in one pass, so the end of one
    step and the start of the next share a pass. Arguments as for :func:`perturb_`."""
    prepared = _prepared(tensors, offset, offsets)
    kwargs = dict(
        seed=_check_index("seed1", seed1),
        alpha=_check_real("a", a),
        seed2=_check_index("seed2", seed2),
        alpha2=_check_real("b", b),
        distribution=_check_choice("distribution", distribution, _reference.DISTRIBUTIONS),
    )
    _run_pass(prepared, backend, None, _rounding_seed(rounding, rounding_seed), **kwargs)


# ------------------------------------------------------------------------------------------------------- stream


def _stream(
    distribution: str,
    seed: int,
    start: int,
    count: int,
    device: torch.device | str | None,
    dtype: torch.dtype,
    backend: str | None,
) -> torch.Tensor:
    seed = _check_index("seed", seed)
    start = _check_index("start", start)
    count = _check_index("count", count)
    if start + count > INDEX_LIMIT:
        raise ValueError(f"start + count = {start + count} exceeds the stream's index range [0, 2^63)")
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating torch.dtype, got {dtype}")
    # 0 + 1 * z is exactly z in float32: a pass over zeros returns the stream itself.
    z = torch.zeros(count, dtype=torch.float32, device=device)
    _run_pass(PreparedTensors([z], [start]), backend, seed=seed, alpha=1.0, distribution=distribution)
    return z.to(dtype)


def gaussian(
    seed: int,
    start: int,
    count: int,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    backend: str | None = None,
) -> torch.Tensor:
    """The standard-Gaussian stream z_i for i in [start, start + count): a pure function of (seed, i).

    Generated in float32 by the selected backend (docs/stream.md, section 3), then cast to ``dtype``.
    """
    return _stream("gaussian", seed, start, count, device, dtype, backend)


def rademacher(
    seed: int,
    start: int,
    count: int,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    backend: str | None = None,
) -> torch.Tensor:
    """The Rademacher (+1/-1) stream z_i for i in [start, start + count): a pure function of (seed, i)."""
    return _stream("rademacher", seed, start, count, device, dtype, backend)
