"""Exact perturbation: the closure sees theta + alpha z while theta itself is never written.

In 16-bit, MeZO's in-place cycle (theta + eps z, then -2 eps z, then + eps z) is not an identity: every pass rounds,
and the weights random-walk away from where they were. Here, while the closure runs, a torch function mode hands
every op that receives a trainable parameter a fresh tensor holding round(theta + sum_k alpha_k z(seed_k)),
materialised by the fused kernel just before the op and freed when the op no longer needs it. The parameters only
change in the update pass, so with lr = 0 they stay bit-identical to their start, and the extra memory is the
largest parameter an op receives, plus the small ones (at most an eighth of the largest), made up front for the
evaluation. A parameter used
twice in a forward (tied input and output embeddings) is materialised twice from the same theta: the same value.
An op that receives several large parameters at once (an RNN's flat weights, multi-head attention's projections)
holds all of their copies while it runs. Code that takes a parameter's memory itself (``data_ptr()``, as a Triton
launcher or a ctypes kernel given the parameter does) gets a copy kept for the rest of the evaluation; so does a
forward that writes a parameter in place (nn.Embedding's ``max_norm``, a mask applied with ``weight.data *= mask``,
a write through a view of it, ``inplace=True``): the write goes to the perturbed copy, which the rest of the
evaluation then sees, never to theta.

What a model must satisfy: the closure reaches every trainable parameter through torch operations (modules,
functional calls, tensor methods, ``.data``, ``.T`` and the other properties made of its values, or a tensor made
from it before the evaluation and kept, which lies in its memory: found by address), as Python models do. Code
that bypasses torch's function overrides (a custom C++/CUDA extension handed raw pointers) would see the
unperturbed value; a trainable parameter no op received during an evaluation is reported as an error, naming it. A
torch.compile'd model runs eagerly here, op by op (its frames break at the view, which dynamo must not trace): right,
but not compiled; ``fullgraph=True`` cannot compile it at all. Use perturbation='inplace' to run it compiled.

Sharded parameters (FSDP2's DTensors): a module's forward computes with the whole tensors FSDP2 gathers from the
shards, so those gathered tensors stand for the parameters here, perturbed at their parameter's stream offset (found
as FSDP2 makes them: _shards.GatheredTensors); an op given the DTensor itself receives a DTensor over a perturbed copy
of the rank's shard. Neither the shards nor the gathered tensors are written (a write through the DTensor is refused).
"""

from __future__ import annotations

import bisect
from typing import Any

import torch
from torch.overrides import TorchFunctionMode
from torch.utils.weak import WeakIdKeyDictionary

from zokern import ops
from zokern._dispatch import select_backend
from zokern.optim import _shards

# Properties whose value is made of the parameter's values (a view or the tensor itself): an op reading the parameter
# through them must see the perturbed value. Every other property is metadata, read from the parameter with no copy.
_VALUE_GETTERS = frozenset(id(getattr(torch.Tensor, name)) for name in ("data", "T", "mT", "H", "mH", "real", "imag"))
# Properties that hand out the memory itself (to CuPy, Numba): as _RAW_MEMORY's methods.
_RAW_PROPERTIES = frozenset(id(torch.Tensor.__dict__[name]) for name in ("__cuda_array_interface__",))
_DTYPES = frozenset(ops.SUPPORTED_DTYPES)  # others (a model cast to float64 after construction) take ops' checks
# Methods that hand out a tensor's memory itself (a Triton launcher or a ctypes kernel given the parameter reads it
# through data_ptr): the perturbed copy they expose must outlive the call, for the whole evaluation.
_RAW_MEMORY = frozenset(
    ("data_ptr", "untyped_storage", "storage", "_typed_storage", "__dlpack__", "numpy", "__array__")
)
# Methods that read only a tensor's metadata: answered by the parameter itself, with no copy, and not a use of its
# values (vmap and TorchScript read these of a parameter whose values they then take outside the mode).
_METADATA = frozenset(
    ("size", "dim", "ndimension", "numel", "nelement", "stride", "storage_offset", "is_contiguous", "element_size")
    + ("is_floating_point", "is_complex", "is_signed", "get_device", "__len__", "requires_grad_", "retain_grad")
)
# In-place Python operators and item assignment; other writes are methods and functions named with a trailing _.
_INPLACE_OPERATORS = frozenset(
    f"__i{op}__" for op in ("add", "sub", "mul", "matmul", "truediv", "floordiv", "mod", "pow", "and", "or", "xor")
) | frozenset(("__ilshift__", "__irshift__", "__setitem__"))


# Functions that write a tensor argument in place besides their own result: (its position, its keyword, and the
# argument whose presence makes them write it). nn.Embedding's max_norm renormalises the looked-up rows of the weight.
_WRITES_ARGUMENT = {
    torch.nn.functional.embedding: (1, "weight", 3, "max_norm"),
    torch.nn.functional.embedding_bag: (1, "weight", 3, "max_norm"),
}


def _written_argument(func, args: tuple, kwargs: dict) -> tuple[int | str, Any] | None:
    """(position or keyword, tensor) of the argument ``func`` writes in place, if it is one of _WRITES_ARGUMENT's."""
    spec = _WRITES_ARGUMENT.get(func)
    if spec is None:
        return None
    position, keyword, when_position, when_keyword = spec
    when = args[when_position] if len(args) > when_position else kwargs.get(when_keyword)
    if when is None:
        return None
    if len(args) > position:
        return position, args[position]
    return (keyword, kwargs[keyword]) if keyword in kwargs else None


def _shares_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    a, b = _local(a), _local(b)
    try:
        return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr() and a.device == b.device
    except (RuntimeError, NotImplementedError):  # a tensor without storage (a subclass, a sparse result)
        return False


def _local(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's local tensor (whose memory is this rank's); any other tensor itself."""
    return _shards.local_tensor(t) if _shards.is_dtensor(t) else t


# In-place ops that change a tensor's shape, strides or storage, not its values: applied to a view or an alias of a
# parameter's copy, they rebind that tensor only; applied to the parameter, its kept copy.
_REBINDS = frozenset(
    ("t_", "transpose_", "swapdims_", "swapaxes_", "squeeze_", "unsqueeze_", "as_strided_", "resize_", "resize_as_")
    + ("set_", "detach_", "share_memory_")
)
# What __torch_function__ does with a call, by function: decided once per function (the mode sees every op).
_DESCRIPTOR, _METADATA_CALL, _RAW, _WRITE, _REBIND, _OTHER = range(6)
_KINDS: dict[Any, int] = {}


def _kind(func) -> int:
    try:
        kind = _KINDS.get(func)
    except TypeError:  # an unhashable callable
        kind = None
    if kind is None:
        name = getattr(func, "__name__", "").split(".")[0]  # torch.ops.aten.mul_.Scalar is named 'mul_.Scalar'
        if name in ("__get__", "__set__"):
            kind = _DESCRIPTOR  # (a value property's __set__ writes: see _VALUE_GETTERS in __torch_function__)
        elif name in _METADATA:
            kind = _METADATA_CALL
        elif name in _RAW_MEMORY:
            kind = _RAW
        elif name in _REBINDS:
            kind = _REBIND
        elif name in _INPLACE_OPERATORS or (name.endswith("_") and not name.startswith("__")):  # _foreach_mul_ too
            kind = _WRITE
        else:
            kind = _OTHER
        try:
            _KINDS[func] = kind
        except TypeError:
            pass
    return kind


def _with_first(args: tuple, kwargs: dict, value: Any) -> tuple[tuple, dict]:
    """The call's arguments with its first (positional, else by keyword: _first_keyword) replaced."""
    if args:
        return (value, *args[1:]), kwargs
    return args, dict(kwargs, **{_first_keyword(kwargs)[0]: value})


def _first_keyword(kwargs: dict) -> tuple[str | None, Any]:
    """The keyword and value of a call's first tensor argument given by keyword (torch names it input, self or
    tensor), if any."""
    for key in ("input", "self", "tensor"):
        if key in kwargs:
            return key, kwargs[key]
    return None, None


class ParameterUse:
    """Where a trainable parameter sits: its stream offset and param group index. ``key``: the id of the optimizer's
    parameter it stands for, by which check_all_used names it (``param`` itself, or the DTensor whose gathered copy
    ``param`` is)."""

    __slots__ = ("group", "key", "offset", "param")

    def __init__(self, param: torch.Tensor, offset: int, group: int, key: int | None = None) -> None:
        self.param, self.offset, self.group = param, offset, group
        self.key = id(param) if key is None else key


class PerturbedView(TorchFunctionMode):
    """Within this mode, ops receive theta + sum over ``displacement`` of alpha[group] z(seed) for each parameter
    in ``uses``; theta is left untouched. ``used`` collects the ids of the parameters some op received.

    Parameters of at most ``SMALL`` elements (biases, norms) are materialised up front, all in one fused call per
    group: per-op calls would cost more in launch overhead than they move. Their total is capped at an eighth of the
    largest parameter, so the extra memory stays within one large parameter.
    """

    SMALL = 1 << 16

    def __init__(
        self,
        uses: dict[int, ParameterUse],
        displacement: dict[int, list[float]],
        pass_kwargs: dict[str, Any],
        sharded: dict[int, ParameterUse] | None = None,
    ) -> None:
        super().__init__()
        self.uses = uses
        self.displacement = {seed: list(alphas) for seed, alphas in displacement.items()}
        self.pass_kwargs = pass_kwargs
        self.used: set[int] = set()  # the keys of the uses some op received
        self.expected = _perturbable(uses)
        # Where the plain parameters' memory lies, sorted: a tensor made from one before the evaluation (a cached
        # transpose of a tied weight, `.detach()`, `.data`) is no parameter here, yet reads theta (_alias).
        self.ranges = _memory_ranges(uses.values())
        self.range_starts = [start for start, _, _ in self.ranges]
        self.ready = self._materialise_small()
        # Sharded parameters (DTensors, by id): an op given one receives a DTensor over its perturbed shard, and the
        # ops of an FSDP2 module's forward receive the whole tensors FSDP2 gathers from the shards, each perturbed at
        # its DTensor's stream offset, found as FSDP2 makes them (their memory is freed between forwards: none is
        # materialised up front). Neither the shards nor the gathered tensors are written.
        self.sharded = sharded or {}
        self.gathered = _shards.GatheredTensors(self.sharded) if sharded else None
        self.uses.update(self.sharded)
        self.expected.update(_perturbable(self.sharded))
        self._take_gathered()
        # Copies kept for the rest of the evaluation: whose memory was handed out (_RAW_MEMORY), or that the forward
        # wrote; later ops receive them (and see the write).
        self.exposed: dict[int, torch.Tensor] = {}
        # Tensors sharing the memory of a parameter's copy (.data, .T, views): each maps to its parameter (not to the
        # copy: a read-only .data must not keep its copy alive), so that a write to one writes that parameter.
        self.handed_out = WeakIdKeyDictionary()

    # Never traced by torch.compile: dynamo would bake one evaluation's perturbation into the graph (later
    # evaluations then saw the wrong one). A compiled model's ops come here one by one, run eagerly.
    @torch.compiler.disable
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.gathered is not None and self.gathered.waiting:  # (FSDP2's first gathers: the first evaluation)
            self._take_gathered()
        kind = _kind(func)
        if kind is _DESCRIPTOR:
            owner = id(getattr(func, "__self__", None))
            if owner in _RAW_PROPERTIES and args and id(args[0]) in self.uses:  # CuPy, Numba: the kept copy's memory
                return func(self._keep(args[0]), *args[1:], **kwargs)
            if owner not in _VALUE_GETTERS:
                # Metadata (shape, dtype, requires_grad, ...) is the parameter's own, read or set with no copy.
                return func(*args, **kwargs)
        first = args[0] if args else _first_keyword(kwargs)[1]
        if kind is _METADATA_CALL and id(first) in self.uses:
            return func(*args, **kwargs)
        # A value property's setter (`weight.data = x`) writes the parameter; on a view it rebinds the view.
        setter = kind is _DESCRIPTOR and func.__name__ == "__set__"
        writes = kind is _WRITE or setter or kwargs.get("inplace") is True
        if kind is _RAW or kind is _REBIND or writes:
            # The copy this evaluation keeps: its memory is handed out, or it is written (a write returns the
            # parameter, as an in-place op returns its first argument, so that `module.weight *= 2` stays a Parameter).
            kept = self._kept_for(first, follow_aliases=not (kind is _REBIND or setter))
            if kept is not None:
                args, kwargs = _with_first(args, kwargs, kept)
                out = func(*args[:1], *self._swap_all(args[1:]), **self._swap_kwargs(kwargs))
                return first if out is kept else out
        if writes and isinstance(first, (list, tuple)):  # torch._foreach_*_: each parameter's kept copy
            first = type(first)(self._keep(x) if id(x) in self.uses else x for x in first)
            args, kwargs = _with_first(args, kwargs, first)
            for x in first:
                self._keep_derived(x)
        argument = _written_argument(func, args, kwargs)
        if argument is not None:  # the written weight: the parameter's kept copy
            where, weight = argument
            if id(weight) in self.uses:
                if isinstance(where, int):
                    args = (*args[:where], self._keep(weight), *args[where + 1 :])
                else:
                    kwargs = dict(kwargs, **{where: self._keep(weight)})
            else:
                self._keep_derived(weight)
        # A tensor made from a parameter's copy that shares its memory (.data, .T, a view, an index): a write to it
        # writes the parameter, and its copy becomes the one this evaluation keeps. Looked up only while one exists.
        derived = self.handed_out.get(first) if self.handed_out and isinstance(first, torch.Tensor) else None
        if derived is not None and (writes or kind is _RAW) and not setter:  # its memory written or handed out
            self._keep_written(derived, first)
        swapped, swapped_kwargs = self._swap_all(args), self._swap_kwargs(kwargs)
        out = func(*swapped, **swapped_kwargs)
        source = None
        if derived is not None:
            source = first
        elif id(first) in self.uses:
            source = swapped[0] if args else swapped_kwargs[_first_keyword(kwargs)[0]]
        if source is not None:
            param = derived if derived is not None else first
            for part in out if isinstance(out, (tuple, list)) else (out,):  # chunk, split, unbind: several views
                if isinstance(part, torch.Tensor) and part is not first and _shares_memory(part, source):
                    self.handed_out[part] = param
        return out

    def _take_gathered(self) -> None:
        """Add the gathered tensors of sharded parameters that FSDP2 made since the last call to the uses."""
        if self.gathered is None:
            return
        for tensor, key in self.gathered.found():
            use = self.sharded[key]
            self.uses[id(tensor)] = ParameterUse(tensor, use.offset, use.group, key)

    def _keep_derived(self, tensor: Any) -> None:
        """If ``tensor`` shares the memory of a parameter's copy, it is about to be written: keep that copy."""
        param = self.handed_out.get(tensor) if self.handed_out and isinstance(tensor, torch.Tensor) else None
        if param is not None:
            self._keep_written(param, tensor)

    def _keep_written(self, param: torch.Tensor, written: torch.Tensor) -> None:
        """``written`` shares the memory of a copy of ``param`` (a view, an alias, another dtype's view) and is
        being written: that copy, the parameter's shape and dtype over the same memory, is the one kept."""
        kept = self.exposed.get(id(param))
        if kept is not None and _shares_memory(kept, written):  # the kept copy already (maybe rebound: w.data = y.t())
            return
        self._refuse_sharded_write(param)
        storage = written.untyped_storage()
        if storage.nbytes() != param.nbytes:  # not a copy of its own: nothing zokern made
            raise RuntimeError(
                f"exact perturbation: the closure writes a parameter of shape {tuple(param.shape)} through a tensor "
                "whose memory zokern cannot follow; use perturbation='inplace' for a model whose forward writes "
                "its parameters so"
            )
        self.exposed[id(param)] = torch.empty(0, dtype=param.dtype, device=written.device).set_(storage, 0, param.shape)

    def _swap_kwargs(self, kwargs: dict) -> dict:
        if not kwargs:
            return kwargs
        out = kwargs.get("out")
        if isinstance(out, torch.Tensor) and id(out) in self.uses:  # written: the kept copy (see above)
            kwargs = dict(kwargs, out=self._keep(out))
        elif isinstance(out, torch.Tensor) and self.handed_out:
            param = self.handed_out.get(out)
            if param is not None:  # written through a view of a parameter's copy
                self._keep_written(param, out)
        return dict(zip(kwargs, self._swap_all(tuple(kwargs.values()))))

    def _kept_for(self, x: Any, follow_aliases: bool) -> torch.Tensor | None:
        """The kept copy of the parameter ``x`` is, or (``follow_aliases``) the same view of it for a tensor made
        from a parameter before the evaluation; None for anything else."""
        if id(x) in self.uses:
            return self._keep(x)
        alias = self._alias(x) if follow_aliases and self.ranges and isinstance(x, torch.Tensor) else None
        return None if alias is None else _aliased_view(self._keep(alias.param), x, alias.param)

    def _keep(self, param: torch.Tensor) -> torch.Tensor:
        if id(param) not in self.exposed:
            self._refuse_sharded_write(param)
            self.exposed[id(param)] = self._swap(param)
        return self.exposed[id(param)]

    def _refuse_sharded_write(self, param: torch.Tensor) -> None:
        """Writing a sharded parameter through its DTensor (or handing out its memory) would reach a copy that
        FSDP2's forwards never read (they gather the shards): refused before the write, theta untouched."""
        if id(param) in self.sharded:
            raise RuntimeError(
                f"exact perturbation: the closure writes a sharded (DTensor) parameter of shape {tuple(param.shape)} "
                "through its DTensor, or takes its memory; the exact mode never writes the shards, and FSDP2's "
                "forwards read what they gather from them, so the write would be lost. Write parameters inside "
                "their FSDP2 module's forward (on the gathered tensor), or use perturbation='inplace'"
            )

    def _swap_all(self, values: tuple) -> tuple:
        """The arguments with parameters replaced; lists and tuples of tensors (RNN weights, a namedtuple given to
        torch.cat) are searched too."""
        swapped = None
        for k, value in enumerate(values):
            if isinstance(value, torch.Tensor):
                new = self._swap(value)
            elif isinstance(value, (list, tuple)) and any(id(x) in self.uses for x in value):
                items = [self._swap(x) if isinstance(x, torch.Tensor) else x for x in value]
                new = type(value)(*items) if hasattr(value, "_fields") else type(value)(items)
            else:
                continue
            if new is not value:
                swapped = swapped or list(values)
                swapped[k] = new
        return values if swapped is None else tuple(swapped)

    def _swap(self, x: torch.Tensor) -> torch.Tensor:
        use = self.uses.get(id(x))
        if use is None:
            alias = self._alias(x) if self.ranges else None
            return x if alias is None else _aliased_view(self._swap(alias.param), x, alias.param)
        self.used.add(use.key)
        kept = self.exposed.get(id(x), self.ready.get(id(x)))
        return kept if kept is not None else self.materialise([use])[0]

    def _alias(self, x: torch.Tensor) -> ParameterUse | None:
        """The use of the parameter whose memory wholly holds ``x`` (a plain tensor, no parameter), if any."""
        if type(x) is not torch.Tensor:  # activations are plain tensors; subclasses (DTensor) have no pointer here
            return None
        try:
            ptr = x.data_ptr()
        except RuntimeError:  # no storage: a tensor being traced (flex_attention compiles itself)
            return None
        k = bisect.bisect_right(self.range_starts, ptr) - 1
        if k < 0:
            return None
        start, end, use = self.ranges[k]
        param = use.param
        if ptr >= end or x.dtype != param.dtype or x.device != param.device or not x.numel():
            return None
        last = ptr + x.element_size() * sum((n - 1) * step for n, step in zip(x.shape, x.stride()))
        return use if last < end else None

    def materialise(self, uses: list[ParameterUse]) -> list[torch.Tensor]:
        """Fresh tensors holding the perturbed values of ``uses`` (parameters of one group, or one parameter): the
        first perturbation written out of place from theta (one read, one write), any further one in place. A
        DTensor's: a DTensor placed as it over a perturbed copy of this rank's shard."""
        if _shards.is_dtensor(uses[0].param):
            outs = []
            for use in uses:
                shard, start = _shards.local_slice(use.param, f"a sharded parameter of shape {tuple(use.param.shape)}")
                (local,) = self.materialise([ParameterUse(shard, use.offset + start, use.group, use.key)])
                outs.append(_shards.placed_like(local, use.param))
            return outs
        params = [use.param.detach() for use in uses]
        offsets = [use.offset for use in uses]
        terms = [(seed, alphas[uses[0].group]) for seed, alphas in self.displacement.items()]
        if not terms:
            return [p.clone() for p in params]
        outs = [torch.empty_like(p, memory_format=torch.contiguous_format) for p in params]
        (seed, alpha), rest = terms[0], terms[1:]
        if len(params) == 1 and params[0].is_contiguous() and params[0].numel() and params[0].dtype in _DTYPES:
            # The per-op call, once per large parameter per forward: straight to the backend, whose arguments the
            # optimizer has validated (zokern.ops' checks cost more host time than the launch).
            impl = select_backend(params[0].device, self.pass_kwargs["backend"], op="zo_copy_pass_")
            with torch.no_grad():
                impl.zo_copy_pass_(
                    outs, params, offsets, seed=seed, alpha=float(alpha), distribution=self.pass_kwargs["distribution"]
                )
        else:
            ops.perturb_into_(outs, params, seed, alpha, offsets=offsets, **self.pass_kwargs)
        for seed, alpha in rest:
            ops.perturb_(outs, seed, alpha, offsets=offsets, **self.pass_kwargs)
        return outs

    def _materialise_small(self) -> dict[int, torch.Tensor]:
        largest = max((u.param.numel() for u in self.uses.values()), default=0)
        budget = largest // 8
        by_group: dict[tuple, list[ParameterUse]] = {}
        for use in self.uses.values():
            n = use.param.numel()
            if n <= self.SMALL and n <= budget:
                budget -= n
                by_group.setdefault((use.group, use.param.device), []).append(use)
        ready = {}
        for group_uses in by_group.values():
            for use, out in zip(group_uses, self.materialise(group_uses)):
                ready[id(use.param)] = out
        return ready

    def check_all_used(self, names: dict[int, str]) -> None:
        """Raise, naming them, if some trainable parameters reached no op in this evaluation (never perturbed)."""
        unused = self.expected - self.used
        missing = [names.get(k, "?") for k in self.expected if k in unused]
        sharded = [names.get(k, "?") for k in self.sharded if k in unused]
        if sharded:
            raise ValueError(
                f"exact perturbation: {len(sharded)} sharded (DTensor) parameter(s) reached no torch operation, "
                "neither as their DTensors nor as the whole tensors FSDP2 gathers for their module's forward "
                f"({', '.join(sharded[:5])}{', ...' if len(sharded) > 5 else ''}), so they could not be perturbed. "
                "Freeze parameters the loss does not use (requires_grad=False); for code that reads them outside "
                "torch (DTensor.full_tensor() or to_local() on the parameter itself), use perturbation='inplace'"
            )
        if missing:
            raise ValueError(
                f"exact perturbation: the closure never passed {len(missing)} trainable parameter(s) to a torch "
                f"operation ({', '.join(missing[:5])}{', ...' if len(missing) > 5 else ''}), so they could not be "
                "perturbed. Freeze parameters the loss does not use (requires_grad=False), or, for code that reads "
                "parameters outside torch (C++ extensions handed raw pointers), use perturbation='inplace'."
            )


def _memory_ranges(uses) -> list[tuple[int, int, ParameterUse]]:
    """(first byte, end byte, use) of each plain contiguous parameter with elements, sorted by address."""
    ranges = []
    for use in uses:
        p = use.param
        if type(p) in (torch.Tensor, torch.nn.Parameter) and p.numel() and p.is_contiguous() and not p.is_meta:
            ranges.append((p.data_ptr(), p.data_ptr() + p.numel() * p.element_size(), use))
    return sorted(ranges, key=lambda r: r[0])


def _aliased_view(copy: torch.Tensor, alias: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """The view of ``param``'s perturbed ``copy`` (its layout, contiguous) that ``alias`` is of ``param``."""
    offset = (alias.data_ptr() - param.data_ptr()) // alias.element_size()
    return copy.as_strided(alias.shape, alias.stride(), copy.storage_offset() + offset)


def _perturbable(uses: dict[int, ParameterUse]) -> set[int]:
    """The keys of the parameters an evaluation must perturb: all but those without elements, which have nothing to
    perturb (an op need not receive them)."""
    return {use.key for use in uses.values() if use.param.numel()}
