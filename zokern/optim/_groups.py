"""What a ZO optimizer's param groups may hold and its trainable parameters must be: the checks it runs at
construction, in ``add_param_group``, on ``load_state_dict`` and again before each step (a scheduler or the user may
change a group between steps). ``GroupChecks`` is a base of :class:`zokern.optim.base.ZOOptimizer`; a subclass adds
its own hyperparameters through ``_check_hyperparameters`` and ``_extra_group_keys``."""

from __future__ import annotations

import functools
import inspect
import math
import numbers
import os
import sys
import warnings
from typing import Any

import torch

from zokern import ops
from zokern.optim import _shards


class GroupChecks:
    """The param-group half of ZOOptimizer (``self`` is one)."""

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        where = f"param group {len(self.param_groups) - 1}"
        try:
            self._validate_group(group)
        except (TypeError, ValueError) as e:
            self.param_groups.pop()
            raise type(e)(f"{where}: {e}") from None

    def _validate_group(self, group: dict[str, Any]) -> None:
        self._check_hyperparameters(group)
        self._check_group_keys(group)
        _warn_if_eps_unresolvable(group)
        first_index: dict[int, int] = {}
        written: dict[int, torch.Tensor] = {}  # the trainable parameters' tensors the passes write (a DTensor's shard)
        for k, p in enumerate(group["params"]):
            j = first_index.setdefault(id(p), k)
            if j != k:  # torch.optim only warns; a step would then fail on every call
                raise ValueError(f"params[{j}] and params[{k}] are the same parameter; each must appear once")
            # Only what a step writes: frozen parameters of any dtype and layout (a QLoRA model's packed 4-bit base
            # weights) are never touched; they only hold their place in the stream.
            if p.requires_grad:
                written[k] = _shards.written_tensor(p, f"params[{k}]")[0]
                if not _writable(written[k]):
                    _reject_parameter(f"params[{k}]", written[k])
        # Two Parameters over one storage (weights tied by sharing .data): named here, once; a step refuses them too,
        # but among one group only after drawing its seed, by their place among the trainable tensors.
        trainable = [k for k, t in written.items() if not t.is_meta]
        pair = ops.first_overlap_by_device([written[k] for k in trainable])
        if pair is not None:
            first, second = (trainable[k] for k in pair)
            raise ValueError(
                f"params[{first}] and params[{second}] overlap in memory; each element must be trained once (tie "
                "weights by using one Parameter in both places)"
            )

    def _check_group_keys(self, group: dict[str, Any]) -> None:
        """Keys this optimizer would keep and ignore: a whole-run option set on one group, another optimizer's
        setting. Checked at construction, on load and before each step (a momentum warm-up that sets
        ``group['momentum']`` between steps would otherwise train without it)."""
        misplaced = sorted((group.keys() & _WHOLE_RUN_OPTIONS) - self.defaults.keys())
        taken = [k for k in misplaced if _constructor_takes(type(self), k)]
        if taken:  # torch.optim keeps unknown group keys, so a per-group momentum would be silently ignored
            raise ValueError(
                f"{', '.join(taken)} {'is an option' if len(taken) == 1 else 'are options'} of the whole "
                f"optimizer, not of a param group: pass {'it' if len(taken) == 1 else 'them'} to the constructor"
            )
        if misplaced:  # another optimizer's (torch.optim.SGD's nesterov, LDSD's k on ZOSGD)
            raise ValueError(
                f"{', '.join(misplaced)} {'is not an option' if len(misplaced) == 1 else 'are not options'} of "
                f"{type(self).__name__}"
            )
        understood = self._understood_group_keys()
        foreign = sorted(k for k in (group.keys() & _FOREIGN_GROUP_KEYS) - understood if group[k] is not False)
        if "maximize" in foreign:
            raise ValueError("maximize=True is not supported: zokern minimises the closure's loss; return its negative")
        if group.get("decoupled_weight_decay") is False and group.get("weight_decay"):  # a torch.optim.Adam group's
            raise ValueError(
                "decoupled_weight_decay=False (torch.optim.Adam's L2 penalty, added to the gradient) is not supported: "
                "zokern's weight_decay is decoupled, theta <- theta - lr * weight_decay * theta, as AdamW's"
            )
        if foreign:  # a group ported from another optimizer, whose settings this one would keep and ignore
            raise ValueError(
                f"{', '.join(foreign)} {'is not an option' if len(foreign) == 1 else 'are not options'} of "
                f"{type(self).__name__}'s param groups (it takes {', '.join(sorted(understood - {'params'}))})"
            )

    def _understood_group_keys(self) -> set[str]:
        return {"params", "lr", "eps", "weight_decay", *self._extra_group_keys()}

    def _check_hyperparameters(self, group: dict[str, Any]) -> None:
        """A group's hyperparameters as the passes apply them (subclasses add theirs, through check_group_number and
        check_group_betas), made floats: another real number (a Fraction, a NumPy scalar) would reach tensor
        arithmetic and the JSON trajectory as itself."""
        check_step_hyperparameters(group["lr"], group["eps"], group["weight_decay"])
        for key in ("lr", "eps", "weight_decay"):
            if type(group[key]) is not float:
                group[key] = float(group[key])

    def _check_groups_hyperparameters(self) -> None:
        """Every group's hyperparameters, before a step or pass uses them: a scheduler or the user may have changed
        them since the constructor checked (a decay run past its end gives a negative lr, which the step would apply
        and the optimizer's own state_dict and trajectory would then refuse; a NaN lr would overwrite theta)."""
        keys = ("lr", "eps", "weight_decay", *self._extra_group_keys())
        checked = self._checked_values
        if len(checked) != len(self.param_groups):
            checked[:] = [None] * len(self.param_groups)
        for g, group in enumerate(self.param_groups):
            # Values equal to the last valid ones (types included: a tensor lr is refused) need no new check, which
            # costs about 1.5 us a group: per-tensor groups would add half a millisecond to every step.
            watched = sorted(group.keys() & _WATCHED_GROUP_KEYS)
            values = (*map(_typed, map(group.get, keys)), *watched, *(_typed(group[k]) for k in watched))
            try:
                if values == checked[g]:
                    continue
            except (RuntimeError, ValueError):  # a multi-element tensor or array compared: checked (and refused) below
                pass
            try:
                self._check_hyperparameters(group)
                self._check_group_keys(group)
            except (TypeError, ValueError) as e:
                raise type(e)(f"param group {g}: {e}") from None
            # As the check left them (floats), so that a Fraction written again is converted again (the same
            # expression as above, inline: a helper call per group and step would cost what the cache saves).
            checked[g] = (*map(_typed, map(group.get, keys)), *watched, *(_typed(group[k]) for k in watched))


@functools.cache
def _constructor_takes(cls: type, name: str) -> bool:
    """Whether ``cls(...)`` takes the keyword ``name``: its ``__init__``'s or, through ``**kwargs``, a base's."""
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        parameters = inspect.signature(init).parameters
        if name in parameters:
            return True
        if not any(p.kind == inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
            return False
    return False


def dtype_name(dtype: torch.dtype) -> str:
    """As a trajectory records it: "bfloat16", not "torch.bfloat16"."""
    return str(dtype).removeprefix("torch.")


# Constructor options of zokern's optimizers that hold for all param groups (a group may set only its defaults' keys).
_WHOLE_RUN_OPTIONS = frozenset(
    {"momentum", "n_probes", "one_sided", "distribution", "seed", "backend", "perturbation", "rounding", "merge_steps"}
    | {"cuda_graph", "k", "mu_norm", "update", "pairing", "nesterov", "dampening"}
)


# Group keys by which another optimizer (torch.optim's or zokern's) changes what a step does; a group of this one
# that carries them with a meaning it does not have is refused rather than silently trained otherwise.
_ZOKERN_GROUP_KEYS = frozenset({"sigma", "mu_lr", "betas", "adam_eps"})
_FOREIGN_GROUP_KEYS = _ZOKERN_GROUP_KEYS | {"maximize", "amsgrad"}
_WATCHED_GROUP_KEYS = _WHOLE_RUN_OPTIONS | _FOREIGN_GROUP_KEYS  # whose presence or value a step checks again


def _writable(p: torch.Tensor) -> bool:
    """Whether the passes can update ``p`` in place (else _reject_parameter says why)."""
    return (
        p.layout == torch.strided  # first: a sparse CSR tensor raises on is_contiguous, an mkldnn one says it is
        and p.is_contiguous()
        and p.dtype in ops.SUPPORTED_DTYPES
        and ops.holds_plain_tensor(p)
        and not p.is_meta
    )


def _reject_parameter(name: str, p: torch.Tensor) -> None:
    """The error for a trainable parameter the passes cannot update, raised before any pass of a step runs."""
    if not ops.holds_plain_tensor(p):
        raise TypeError(f"{name} is a {type(p.data).__name__}: {ops.SUBCLASS_REASON}")
    if p.layout != torch.strided:
        raise TypeError(f"{name} is a {p.layout} tensor; zokern's passes update dense (strided) parameters")
    if p.is_meta:
        raise ValueError(
            f"{name} is on the meta device: it has no values to train (a model built with init_empty_weights, or "
            "offloaded by accelerate, keeps its real weights elsewhere). Load or materialise the weights first, or "
            "freeze it (requires_grad_(False))"
        )
    if p.dtype not in ops.SUPPORTED_DTYPES:
        raise TypeError(f"{name} has dtype {p.dtype}; zokern's passes update float32, bfloat16 and float16 parameters")
    raise ValueError(
        f"{name} (shape {tuple(p.shape)}, strides {p.stride()}) is not contiguous: the stream indexes a parameter's "
        "elements in row-major order. Make it contiguous (a channels_last model: "
        "model.to(memory_format=torch.contiguous_format); a transposed view: register its .contiguous() copy)"
    )


def _typed(value: Any) -> Any:
    """A hyperparameter as the per-step check's cache compares it: with its type, and its elements' (betas), so that
    an equal value of a refused kind (False for 0.0, a tensor for a float) is checked again."""
    if isinstance(value, (tuple, list)):
        return type(value), tuple(map(_typed, value))
    return type(value), value


def check_step_hyperparameters(lr: Any, eps: Any, weight_decay: Any) -> None:
    """A param group's lr, eps and weight_decay as the passes can apply them (also each record replay re-applies)."""
    for name, value, strict in (("lr", lr, False), ("eps", eps, True), ("weight_decay", weight_decay, False)):
        if not abs(_check_number(name, value, 0.0, strict)) < ops.FLOAT32_OVERFLOW:
            raise ValueError(f"invalid {name}: {value} (beyond float32's range, the passes' precision)")
    if eps < ops.FLOAT32_TINY:  # float32 holds it as 0 or a subnormal: the perturbation would vanish
        raise ValueError(f"invalid eps: {eps} (below float32's smallest normal, 1.2e-38)")
    check_perturbation_scale("eps", eps)


def check_perturbation_scale(name: str, scale: float) -> None:
    """A step moves theta by up to 2 * |z| * scale: beyond float32's range, the step would overwrite theta with inf
    (the restore cannot give it back), or its flip pass would refuse the scalar after the perturbation ran."""
    if not scale < ops.EPS_LIMIT:
        raise ValueError(
            f"invalid {name}: {scale:g} (a step moves theta by up to 2 x {ops.Z_BOUND} x {name}, which float32 must "
            f"hold: {name} must be below {ops.EPS_LIMIT:.4g})"
        )


def _warn_if_eps_unresolvable(group: dict[str, Any]) -> None:
    """Warn when a group's eps is below what its trainable parameters resolve: theta + eps z then rounds to theta (or
    by a few ulps), L+ - L- is zero or rounding noise, and the run trains nothing without an error. The usual cause:
    torch.optim's Adam eps (1e-8, a denominator term: zokern's adam_eps) kept as the perturbation size."""
    dtypes = {p.dtype for p in group["params"] if p.requires_grad and p.is_floating_point()}
    if not dtypes:
        return
    coarsest = max(dtypes, key=lambda d: torch.finfo(d).eps)
    floor = max(_EPS_FLOOR, torch.finfo(coarsest).eps / 100)
    if group["eps"] < floor:
        warnings.warn(
            f"eps={float(group['eps']):g} is the perturbation size ε (MeZO uses 1e-3), below the {floor:.1g} that "
            f"{dtype_name(coarsest)} parameters resolve: θ ± εz rounds to θ or differs from it by rounding, so the "
            "steps estimate noise and train nothing. torch.optim's Adam eps (the denominator term) is ZOAdam's and "
            "LDSD's adam_eps",
            UserWarning,
            stacklevel=_caller_stacklevel(),
        )


def _caller_stacklevel() -> int:
    """The stacklevel that names the first frame outside zokern's and torch.optim's code: the user's constructor
    or add_param_group call, however many __init__s and torch frames lie between."""
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_code.co_filename.startswith(_LIBRARY_DIRS):
        frame, level = frame.f_back, level + 1
    return level


_LIBRARY_DIRS = (os.path.dirname(os.path.dirname(__file__)), os.path.dirname(torch.optim.__file__))


# The smallest eps not warned about in float32: L+ - L- of a loss near 1 is then well above its float32 rounding.
_EPS_FLOOR = 1e-6


def _check_betas(betas: Any) -> None:
    if not (isinstance(betas, (tuple, list)) and len(betas) == 2):
        raise ValueError(f"invalid betas: {betas!r} (a pair, each in [0, 1))")
    if not all(0.0 <= _check_number("betas", b, None, False) < 1.0 for b in betas):
        raise ValueError(f"invalid betas: {betas} (each must be in [0, 1))")


def check_group_betas(group: dict[str, Any]) -> None:
    """A group's betas checked, and made floats (in a pair of the type given) where one is another real number."""
    betas = group["betas"]
    _check_betas(betas)
    if any(type(b) is not float for b in betas):
        floats = [float(b) for b in betas]
        group["betas"] = floats if isinstance(betas, list) else tuple(floats)


def check_adam_eps(value: Any) -> float:
    """Adam's denominator term as float32, where the update divides by sqrt(v) + adam_eps, can hold it: a value it
    flushes to zero (or holds as a subnormal, which GPUs flush) would divide 0 by 0 wherever g z was 0 (NaN)."""
    value = _check_number("adam_eps", value, 0.0, True)
    if not ops.FLOAT32_TINY <= value < ops.FLOAT32_OVERFLOW:
        raise ValueError(
            f"invalid adam_eps: {value:g} (outside float32's normal range, [1.2e-38, 3.4e38], where the update divides "
            "by sqrt(v) + adam_eps: a smaller one makes that 0 / 0 wherever v is 0)"
        )
    return value


def check_group_adam_eps(group: dict[str, Any]) -> None:
    group["adam_eps"] = check_adam_eps(group["adam_eps"])


def check_group_number(group: dict[str, Any], key: str, low: float | None, strict: bool) -> None:
    """A group's number checked as _check_number does, and made a float where it is another real number."""
    value = _check_number(key, group[key], low, strict)
    if type(group[key]) is not float:
        group[key] = value


def _check_number(name: str, value: Any, low: float | None, strict: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    if low is not None and (value <= low if strict else value < low):
        raise ValueError(f"invalid {name}: {value} (must be {'>' if strict else '>='} {low})")
    return value
