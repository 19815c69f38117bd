"""A ZO optimizer's ``state_dict`` and ``load_state_dict``: torch.optim's entries plus the run's own (``zo``: base
seed, step count, stream version, options, the stream's layout), checked whole before anything is loaded, so that a
resumed run draws the same perturbations as the run it continues or fails with nothing changed. ``Checkpointing`` is
a base of :class:`zokern.optim.base.ZOOptimizer`."""

from __future__ import annotations

import sys
import warnings
from collections.abc import Iterable
from typing import Any

import torch
import torch.distributed as dist

from zokern import ops
from zokern._reference import STREAM_VERSION
from zokern.optim import _hooks
from zokern.optim import _shards
from zokern.optim import seeds as seeds_
from zokern.optim._groups import _ZOKERN_GROUP_KEYS
from zokern.optim._groups import dtype_name

# Versions whose state dicts a run resumes from: version 1's z is version 2's (only the rounding of 16-bit updates
# changed), so its states and a pending perturbation mean the same. Replay, which regenerates every stored bit, takes
# records of this version only.
_LOADABLE_STREAM_VERSIONS = (1, STREAM_VERSION)


class Checkpointing:
    """The checkpoint half of ZOOptimizer (``self`` is one)."""

    _COUNT_STATES: tuple[str, ...] = ()  # per-parameter states that count updates (ints), beside the shaped ones

    def state_dict(self) -> dict[str, Any]:
        self._refuse_nested("state_dict")  # mid-step it would count the step, and the parameters beside it be off
        if _called_from(_DCP_STATE_DICT):
            raise TypeError(_DCP_UNSUPPORTED)
        self.materialize()
        with _hooks.quiet(self, "state_dict_post"):
            state = super().state_dict()
        self._save_shards_as_dtensors(state)
        self._save_states_in_parameter_shapes(state)
        layout = self._layout_signature()
        state["zo"] = dict(
            base_seed=self.base_seed,
            steps_taken=self.steps_taken,
            nonfinite_steps=self.nonfinite_steps,
            stream_version=STREAM_VERSION,
            optimizer=type(self).__name__,
            options=self.options(),
            numels=layout["numels"],  # the stream's layout
            shapes=layout["shapes"],  # the parameters' order
            trainable=layout["trainable"],  # load_state_dict warns when the resumed run's differ
            dtypes=[dtype_name(d) for d in layout["dtypes"]],  # and these
            states=sum(1 for entries in state["state"].values() if entries),  # parameters with states
        )
        if any(_shards.is_dtensor(v) for entries in state["state"].values() for v in entries.values()):
            # Each rank saves its shards: load_sharded_state_dict places a state dict by the rank that saved it.
            state["zo"]["rank"], state["zo"]["world_size"] = dist.get_rank(), dist.get_world_size()
        if self._lookahead.converted(clear=False):  # the next step's record says so, in the resumed run too
            state["zo"]["converted_pending"] = True
        for hook in list(self._optimizer_state_dict_post_hooks.values()):
            returned = hook(self, state)
            if returned is not None:
                state = returned
        return state

    def _save_shards_as_dtensors(self, state: dict[str, Any]) -> None:
        """A sharded parameter's states hold its shard's values; saved as DTensors placed as it is (shaped like the
        whole parameter), which torch.distributed.checkpoint saves rank by rank and load_state_dict takes back."""
        params = self._all_params()
        for index, entries in state["state"].items():
            p = params[index]
            if _shards.is_dtensor(p):
                state["state"][index] = {
                    key: _shards.placed_like(value, p) if _is_shaped_state(value) else value
                    for key, value in entries.items()
                }

    def _save_states_in_parameter_shapes(self, state: dict[str, Any]) -> None:
        """States follow a reshaped parameter at the next step: one saved before then is saved viewed to the
        parameter's shape (row-major both), which the load, checking each state's shape, then takes. torch's
        state_dict holds the optimizer's own per-parameter dicts: replaced, not edited."""
        params = self._all_params()
        shaped = set(self._state_keys())
        for index, entries in state["state"].items():
            p = params[index]
            moved = {
                key: value.reshape(p.shape)
                for key, value in entries.items()
                if key in shaped
                and isinstance(value, torch.Tensor)
                and value.shape != p.shape
                and value.numel() == p.numel()
            }
            if moved:
                state["state"][index] = {**entries, **moved}

    def _check_loadable(self, zo: dict[str, Any], state_dict: dict[str, Any]) -> None:
        """Before anything is loaded: the saved run's options are this optimizer's, and each saved state tensor has
        its parameter's shape (torch would load either silently, and the next step fail or diverge)."""
        saved = zo.get("options")  # absent from state dicts written before options were saved
        if saved is not None:
            mine = self.options()
            differ = sorted(
                k for k in saved.keys() | mine.keys() if k not in _RESUMABLE_OPTIONS and saved.get(k) != mine.get(k)
            )
            if differ:
                raise ValueError(
                    f"state dict of a {zo['optimizer']} with {', '.join(f'{k}={saved.get(k)!r}' for k in differ)}; "
                    f"this one has {', '.join(f'{k}={mine.get(k)!r}' for k in differ)}: construct it with the "
                    "saved run's options to continue that run"
                )
        groups = state_dict["param_groups"]
        saved_sizes = [len(g["params"]) for g in groups]
        sizes = [len(g["params"]) for g in self.param_groups]
        if saved_sizes != sizes:  # torch's own message names neither the sizes nor the parameters
            shapes = [tuple(p.shape) for p in self._all_params()]
            first = next(
                (k for k, (a, b) in enumerate(zip(shapes, map(tuple, zo.get("shapes", ())))) if a != b),
                min(len(shapes), len(zo.get("shapes", shapes))),
            )
            raise ValueError(
                f"the state dict's run had param groups of {saved_sizes} parameters, this optimizer has {sizes} "
                f"(the first that differs, in order: parameter {first}): a layer frozen or an adapter added since "
                "the checkpoint? An optimizer over the trainable parameters only (ZOTrainer's, or one built from "
                "those with requires_grad) has other groups then; build it over the parameters the run trained"
            )
        for k, (saved_group, group) in enumerate(zip(groups, self.param_groups)):
            # Built from named_parameters(), both name their parameters: parameters of one shape in another order
            # would each take the other's states and stream silently.
            saved_names, names = saved_group.get("param_names"), group.get("param_names")
            if saved_names is not None and names is not None and list(saved_names) != list(names):
                j, mine, theirs = next(
                    (j, a, b) for j, (a, b) in enumerate(zip([*names, None], [*saved_names, None])) if a != b
                )
                raise ValueError(
                    f"param group {k}'s parameter {j} is {mine!r} here and {theirs!r} in the state dict: not these "
                    "parameters, or not in this order"
                )
            # What the constructor refuses, loaded, would step silently (a negative lr, eps = 0) or fail mid-step.
            try:
                self._validate_group(dict(saved_group, params=group["params"]))
            except (TypeError, ValueError) as e:
                raise type(e)(f"the state dict's param group {k}: {e}") from None
            except KeyError as e:
                raise ValueError(f"the state dict's param group {k} has no {e.args[0]!r}") from None
        names = self._parameter_names()
        params = self._all_params()
        for p, numel in zip(params, zo.get("numels", ())):  # its elements' stream indices depend on every numel
            if p.numel() != numel:
                raise ValueError(f"the state dict's run had {numel} elements for {names[id(p)]}: not these parameters")
        # Equal numels in another order ((64, 32) and (32, 64) swapped) would each draw the other's stream.
        for p, shape in zip(params, zo.get("shapes", ())):  # absent from state dicts of older zokerns
            if list(p.shape) != shape:
                raise ValueError(
                    f"the state dict's run had shape {tuple(shape)} for {names[id(p)]}: not these parameters, or not "
                    "in this order"
                )
        count = sum(1 for entries in state_dict["state"].values() if entries)
        if zo.get("states", count) != count:  # (absent from state dicts of older zokerns)
            raise ValueError(
                f"the state dict holds states of {count} parameters where its run saved {zo['states']}: "
                "torch.distributed.checkpoint.load fills only the entries of the dict it is given, and a new "
                "optimizer's state_dict() has none. Load the state dict whole (torch.load), or into a dict that holds "
                "them"
            )
        shaped = set(self._state_keys())  # what the passes read as tensors shaped like the parameter
        for saved_id, p in zip([i for g in groups for i in g["params"]], params):
            saved = state_dict["state"].get(saved_id, {})
            for key, value in saved.items():
                if key in shaped or (isinstance(value, torch.Tensor) and value.dim()):
                    if not isinstance(value, torch.Tensor) or value.shape != p.shape:
                        what = type(value).__name__
                        if isinstance(value, torch.Tensor):
                            what = f"tensor of shape {tuple(value.shape)}"
                        raise ValueError(
                            f"the state dict's {key!r} for {names[id(p)]} is a {what}: not a state of this "
                            "optimizer's parameters"
                        )
            for value in saved.values():  # a state sharded otherwise than its parameter: refused before any loads
                if _is_shaped_state(value):
                    _shards.loaded_state(value, p, names[id(p)])
            missing = sorted((shaped | set(self._COUNT_STATES)) - saved.keys())
            if saved and missing:
                raise ValueError(f"the state dict's state for {names[id(p)]} lacks {', '.join(map(repr, missing))}")
            for key in self._COUNT_STATES:  # a negative count gave NaN bias corrections, written into theta
                value = saved.get(key, 0)
                if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                    raise ValueError(
                        f"the state dict's {key!r} for {names[id(p)]} is {value!r}: not a count of updates (an "
                        "integer >= 0)"
                    )

    def _warn_if_trainable_differs(self, saved: list[bool] | None) -> None:
        """Warn, naming them, when parameters the saved run trained are frozen now or the reverse. Not an error:
        unfreezing layers between stages is a schedule; a model rebuilt without its freezing (a PEFT wrapper
        forgotten, say) would otherwise train other weights than the run it continues, without a word."""
        mine = self._trainable_flags()
        if saved is None or len(saved) != len(mine) or saved == mine:
            return
        names = self._parameter_names()
        params = self._all_params()
        changed = [(names[id(p)], now) for p, was, now in zip(params, saved, mine) if was != now]
        parts = []
        for now, what in (
            (False, "frozen now, trained by the saved run"),
            (True, "trained now, frozen in the saved run"),
        ):
            listed = [name for name, state in changed if state == now]
            if listed:
                parts.append(f"{len(listed)} parameter(s) {what}: {_first_few(listed)}")
        warnings.warn(
            "the loaded state dict's run trained other parameters than this one's requires_grad selects; "
            + "; ".join(parts)
            + ". If the change is meant (unfreezing by stages), ignore this warning; else set requires_grad as the "
            "saved run had it",
            UserWarning,
            stacklevel=3,
        )

    def _warn_if_dtypes_differ(self, saved: list[str] | None, saved_trainable: list[bool] | None) -> None:
        """Warn, naming them, when trainable parameters have another dtype than in the saved run. Not an error (a
        run may convert its parameters), but a resumed run then perturbs and rounds otherwise (16-bit parameters take
        the exact mode and stochastic rounding) and does not continue the saved one: a model rebuilt in float32, or
        adapters that PEFT's load_adapter cast to float32, would go on without a word."""
        params = self._all_params()
        if saved is None or len(saved) != len(params):
            return
        names = self._parameter_names()
        trained = saved_trainable if saved_trainable is not None else [True] * len(params)
        changed = [
            f"{names[id(p)]} ({was} -> {dtype_name(p.dtype)})"
            for p, was, now, then in zip(params, saved, self._trainable_flags(), trained)
            if now and then and dtype_name(p.dtype) != was  # one the saved run froze has no dtype of its steps
        ]
        if changed:
            warnings.warn(
                f"the loaded state dict's run trained {len(changed)} parameter(s) in another dtype: "
                f"{_first_few(changed)}. The resumed steps perturb and round them as their dtype now says "
                "and do not continue the saved run's; convert them back (p.data = p.data.to(dtype)) to continue it",
                UserWarning,
                stacklevel=3,
            )

    def load_sharded_state_dict(self, state_dicts: Iterable[dict[str, Any]]) -> None:
        """Loads the state dicts that all the ranks of a sharded run saved (each rank's ``state_dict()``, in any
        order) into this optimizer, whatever its parameters' sharding: another number of ranks, another mesh, or
        none (whole parameters). Each per-parameter state (momentum, ZOAdam's moments) takes the elements this rank
        holds from the state dicts that hold them; the rest is rank 0's, as ``load_state_dict`` loads it. The state
        dicts are read one at a time: a generator of ``torch.load`` calls keeps one in memory. Refused, with nothing
        loaded, unless given exactly one state dict of each rank of the same run and step (a state dict of whole
        states, saved without sharding, stands for every rank)."""
        self._refuse_nested("load_sharded_state_dict")
        params, names = self._all_params(), self._parameter_names()
        first: dict[str, Any] | None = None
        seen: set[int] = set()
        pieces: dict[tuple[Any, str], tuple[torch.Tensor, torch.Tensor]] = {}  # (saved id, key) -> (values, filled)
        for position, state_dict in enumerate(state_dicts):
            zo = state_dict.get("zo") or {}
            rank = zo.get("rank", position)
            if first is None:
                first = state_dict
                saved_ids = [i for g in first.get("param_groups", ()) for i in g.get("params", ())]
                if not zo or len(saved_ids) != len(params):
                    break  # (load_state_dict below says what differs)
                by_id = dict(zip(saved_ids, params))
            elif _same_run_and_step(state_dict) != _same_run_and_step(first):
                raise ValueError(
                    f"state dict {position} (saved by rank {rank}) is not of the same run, step and number of ranks "
                    "as the first: give the state dicts the ranks saved together"
                )
            if rank in seen:
                raise ValueError(f"two state dicts saved by rank {rank} were given: give each rank's once")
            seen.add(rank)
            for saved_id, states in state_dict.get("state", {}).items():
                p = by_id.get(saved_id)
                if p is None:
                    continue
                local, start = _shards.written_tensor(p, names[id(p)])
                for key, value in states.items():
                    if not (_is_shaped_state(value) and value.is_floating_point()):
                        continue
                    values, where = _shards.saved_slice(value, rank, names[id(p)])
                    target, filled = pieces.setdefault(
                        (saved_id, key),
                        (torch.empty(local.numel(), dtype=torch.float32), torch.zeros(local.numel(), dtype=torch.bool)),
                    )
                    lo, hi = max(where, start), min(where + values.numel(), start + local.numel())
                    if lo < hi:
                        target[lo - start : hi - start] = values[lo - where : hi - where].float().cpu()
                        filled[lo - start : hi - start] = True
        if first is None:
            raise ValueError("no state dict was given")
        world = (first.get("zo") or {}).get("world_size")
        if world is not None and seen != set(range(world)):
            # (refused alike on every rank: a rank that found its rows would go on into collectives the others left)
            missing = sorted(set(range(world)) - seen)
            raise ValueError(
                f"the state dicts of {world} ranks were saved, and those of ranks {missing} were not given: give "
                "them all"
            )
        state_dict = dict(first, state={i: dict(states) for i, states in first.get("state", {}).items()})
        for (saved_id, key), (target, filled) in pieces.items():
            p = by_id[saved_id]
            if not bool(filled.all()):
                raise ValueError(
                    f"the state dicts given hold only part of {names[id(p)]}'s {key!r} for this rank: give the state "
                    "dicts of all the ranks that saved them"
                )
            local, _ = _shards.written_tensor(p, names[id(p)])
            value = target.view(local.shape)
            value = _shards.placed_like(value, p) if _shards.is_dtensor(p) else value
            state_dict["state"].setdefault(saved_id, {})[key] = value  # (rank 0 may hold none of p)
        self.load_state_dict(state_dict)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._refuse_nested("load_state_dict")  # mid-step it would rewind the step count under the running step
        # A roll-back abandons the timeline whose merged perturbation is pending: taken back first, so that a
        # take-back that cannot run fails the load before anything is loaded, and the hooks all see theta.
        self._lookahead.materialize()
        self._settle()  # records of steps before the load count before it, not on top of the loaded count
        state_dict = dict(state_dict)
        for hook in list(self._optimizer_load_state_dict_pre_hooks.values()):  # what they return is what loads
            returned = hook(self, state_dict)
            if returned is not None:
                state_dict = dict(returned)
        zo = state_dict.pop("zo", None)
        if zo is None:
            if _called_from(_DCP_STATE_DICT):
                raise TypeError(_DCP_UNSUPPORTED)
            raise ValueError("not a zokern optimizer state dict: it has no 'zo' entry")
        _check_run_entries(zo)
        if zo["optimizer"] != type(self).__name__:
            raise ValueError(f"state dict of a {zo['optimizer']}, loaded into a {type(self).__name__}")
        if zo["stream_version"] not in _LOADABLE_STREAM_VERSIONS:
            raise ValueError(
                f"state dict written with stream version {zo['stream_version']}; this zokern has {STREAM_VERSION}"
            )
        # A state dict of this optimizer that carries another's group keys was written by an older zokern (LDSD's
        # SGD groups held Adam's betas and adam_eps): they meant nothing then either.
        understood = self._understood_group_keys()
        # A group built from torch.optim.Adam's was accepted before its L2 flag was refused, and trained with zokern's
        # decoupled decay all the same: that run resumes as it ran.
        state_dict["param_groups"] = [
            {
                k: v
                for k, v in g.items()
                if (k not in _ZOKERN_GROUP_KEYS or k in understood) and (k, v) != ("decoupled_weight_decay", False)
            }
            for g in state_dict["param_groups"]
        ]
        self._check_loadable(zo, state_dict)
        with _hooks.quiet(self, "load_state_dict_pre", "load_state_dict_post"):  # run here, before and after
            super().load_state_dict(state_dict)
        # torch casts floating states to the parameter's dtype; zokern keeps its states in float32 whatever the
        # parameters' dtype (a bf16 momentum would lose the small updates it accumulates), contiguous, as its kernels
        # read them: a state dict whose states were cast (to save space, say) or transposed comes back so.
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = self._all_params()
        names = self._parameter_names()
        for saved_id, p in zip(saved_ids, params):
            for key, value in state_dict["state"].get(saved_id, {}).items():
                if isinstance(value, torch.Tensor) and value.is_floating_point():
                    if _is_shaped_state(value):
                        value = _shards.loaded_state(value, p, names[id(p)])
                    self.state[p][key] = _kernel_state(value, p.device, copy=True)
        self.base_seed = zo["base_seed"]
        self.steps_taken = zo["steps_taken"]
        self.nonfinite_steps = zo["nonfinite_steps"]
        # A roll-back to an earlier checkpoint of this run abandons the steps after it: their records go, so that the
        # trajectory stays the run's (replay would refuse one whose steps repeat). A checkpoint of another run
        # (another base seed) leaves the records as they are: they are not its history.
        if all(record["seed"] == seeds_.step_seed(self.base_seed, record["step"]) for record in self._trajectory):
            self._trajectory = [record for record in self._trajectory if record["step"] < self.steps_taken]
            self._last_setup = None  # the next step records its setup
        self._warn_if_trainable_differs(zo.get("trainable"))  # absent from state dicts of older zokerns
        self._warn_if_dtypes_differ(zo.get("dtypes"), zo.get("trainable"))  # likewise
        # The loaded run decides whether its next step converted a perturbation (the take-back of the abandoned
        # timeline's, at the top, noted one).
        self._lookahead.set_converted(bool(zo.get("converted_pending")))
        for hook in list(self._optimizer_load_state_dict_post_hooks.values()):
            hook(self)


# Options a run may change when it resumes: where and how the same steps are computed, not which steps they are.
_RESUMABLE_OPTIONS = frozenset({"backend", "seed_check_every", "perturbation", "rounding", "merge_steps"})


def _check_run_entries(zo: dict[str, Any]) -> None:
    """The run's entries of a state dict, before anything is loaded (a damaged one would leave half of it loaded)."""
    if not isinstance(zo, dict):
        raise ValueError(f"the state dict's 'zo' entry is of type {type(zo).__name__}, not a dict: damaged")
    missing = [k for k in ("optimizer", "stream_version", "base_seed", "steps_taken", "nonfinite_steps") if k not in zo]
    if missing:
        raise ValueError(f"the state dict's 'zo' entry lacks {', '.join(map(repr, missing))}: a damaged state dict")
    for key in ("base_seed", "steps_taken", "nonfinite_steps"):
        try:
            ops._check_index(key, zo[key])
        except (TypeError, ValueError) as e:
            raise type(e)(f"the state dict's {e}") from None
    options = zo.get("options")
    if options is not None and not (isinstance(options, dict) and all(isinstance(k, str) for k in options)):
        raise ValueError("the state dict's 'zo' entry 'options' is not a dict of options: a damaged state dict")
    numels = zo.get("numels")
    if numels is not None and not (isinstance(numels, list) and all(type(n) is int and n >= 0 for n in numels)):
        raise ValueError("the state dict's 'zo' entry 'numels' is not a list of sizes: a damaged state dict")
    shapes = zo.get("shapes")
    if shapes is not None and not (
        isinstance(shapes, list) and all(isinstance(s, list) and all(type(n) is int for n in s) for s in shapes)
    ):
        raise ValueError("the state dict's 'zo' entry 'shapes' is not a list of shapes: a damaged state dict")
    dtypes = zo.get("dtypes")
    if dtypes is not None and not (isinstance(dtypes, list) and all(isinstance(d, str) for d in dtypes)):
        raise ValueError("the state dict's 'zo' entry 'dtypes' is not a list of dtype names: a damaged state dict")
    states = zo.get("states")
    if states is not None and not (type(states) is int and states >= 0):
        raise ValueError("the state dict's 'zo' entry 'states' is not a count: a damaged state dict")
    trainable = zo.get("trainable")
    if trainable is not None and not (isinstance(trainable, list) and all(isinstance(t, bool) for t in trainable)):
        raise ValueError("the state dict's 'zo' entry 'trainable' is not a list of booleans: a damaged state dict")


def _called_from(module: str, function: str | None = None) -> bool:
    """Whether a caller up the stack is ``function`` (any function, if None) of ``module``."""
    frame = sys._getframe(2)
    while frame is not None:
        if frame.f_globals.get("__name__") == module and function in (None, frame.f_code.co_name):
            return True
        frame = frame.f_back
    return False


_DCP_STATE_DICT = "torch.distributed.checkpoint.state_dict"
_DCP_UNSUPPORTED = (
    "torch.distributed.checkpoint.state_dict's helpers are not supported by zokern's optimizers' state dicts: "
    "get_state_dict and get_optimizer_state_dict keep only 'state' and 'param_groups', which would drop the run's base "
    "seed, step count and options (the 'zo' entry), so a resumed run would draw other perturbations. Save "
    "opt.state_dict() itself, with torch.save or as a value of the dict given to torch.distributed.checkpoint.save; "
    "opt.load_state_dict (or set_optimizer_state_dict) takes it whole"
)


def _first_few(names: list[str]) -> str:
    """The first three names, and how many more (a warning names a few, not a model's hundreds)."""
    more = f" and {len(names) - 3} more" if len(names) > 3 else ""
    return ", ".join(names[:3]) + more


def _same_run_and_step(state_dict: dict[str, Any]) -> tuple:
    """What the ranks' state dicts of one checkpoint share: the run, its step, its optimizer, and its ranks."""
    zo = state_dict.get("zo") or {}
    keys = ("base_seed", "steps_taken", "optimizer", "options", "shapes", "world_size")
    return tuple(repr(zo.get(k)) for k in keys)


def _is_shaped_state(value: object) -> bool:
    """Whether a state holds values per element of its parameter (not a count, such as LDSD's Adam step)."""
    return isinstance(value, torch.Tensor) and value.dim() > 0


def _kernel_state(value: torch.Tensor, device: torch.device, copy: bool = False) -> torch.Tensor:
    """A state as the kernels read it: float32, contiguous, on its parameter's device; a normal tensor, as
    new_state's, also under torch.inference_mode. (``to(memory_format=...)`` returns a strided state of the right
    dtype and device as it is, which LDSD's kernels would read and write by address as if it were contiguous.)"""
    with torch.inference_mode(False):
        return value.to(device=device, dtype=torch.float32, copy=copy).contiguous()
