"""The cross-step merge: a step's last pass also applies the next step's first perturbation, +eps z(next seed), so a
two-sided step costs two passes instead of three. Between such steps the parameters hold theta + eps z(next seed),
not theta; :class:`Lookahead` keeps track of that perturbation and takes it back whenever anything outside a step may
read the parameters:

- ``optimizer.materialize()`` and ``optimizer.state_dict()``, and the optimizer's garbage collection;
- any ``nn.Module`` forward (a global forward pre-hook, installed only while a perturbation is pending), so that an
  evaluation between steps sees theta;
- ``state_dict()`` and ``load_state_dict()`` of the modules that own the parameters (hooks registered on them
  during the first merging step's closure, on the trees of the models it calls, else found among all live modules),
  so that a checkpoint holds theta and a loaded one is not shifted.

A module's ``load_state_dict`` loads its own parameters before its children's hooks run: a parameter loaded so
(its version counter raised since the perturbation) keeps the loaded value when a load hook takes the perturbation
back (an inference tensor has no version counter: it is taken back). A step of another zokern optimizer over some
of the same parameters takes this one's perturbation back first (its closure may read them directly). A take-back
that fails (parameters converted to a dtype the passes refuse) raises once, saying so, and stays recorded:
``materialize()`` or the optimizer's next step takes it back once the parameters can be written again.

Reads that bypass modules and the optimizer (``p.data``, ``model.parameters()``, ``copy.deepcopy`` of a model
without its optimizer) see the perturbed values, and writes that bypass them (``p.data.copy_(...)``, a clamp, rows
overwritten in place) would be shifted by the take-back: call ``materialize()`` first. So must a function compiled
with ``torch.compile`` that calls the model inside, if it was traced while no perturbation was pending: its compiled
code does not run global module hooks installed later (a compiled model, ``torch.compile(model)``, does). A copy of
the optimizer (deepcopy, pickle) carries the pending perturbation, so a model copied with it, before or after it, is
taken back with it.
"""

from __future__ import annotations

import contextlib
import gc
import threading
import warnings
import weakref
from collections.abc import Callable
from collections.abc import Iterator
from typing import Any

import torch
from torch.nn.modules.module import register_module_forward_pre_hook

from zokern import ops
from zokern.optim._caches import clear_weight_caches
from zokern.optim._interrupts import held_interrupts

# (parameters, their stream offsets, coefficient of z) per fused call of a step: the layout the perturbation was
# applied with, which materialize() needs even if the param groups change afterwards.
Chunks = list[tuple[list[torch.Tensor], list[int], float]]

# The lookaheads with a perturbation pending: a step of any zokern optimizer takes the others' back first.
_PENDING: weakref.WeakSet[Lookahead] = weakref.WeakSet()

# Held while a lookahead's perturbation changes hands (set, claimed, taken back). The forward hook is global, so a
# model's forward in one thread takes back a perturbation that a step in another thread may be claiming or taking
# back itself: without the lock it was taken back twice, or claimed after it was taken back (theta off by eps z).
# Signals are held outside it (``with held_interrupts(), _LOCK``): a handler that a pass held runs after the lock is
# released, so that it may wait for a thread that reads the parameters (a checkpoint saved on SIGTERM).
_LOCK = threading.RLock()


def take_back_others(mine: Lookahead, params: Callable[[], list[torch.Tensor]]) -> None:
    """Take back every pending perturbation but ``mine`` that holds one of ``params()``: another optimizer's step is
    about to read them (its closure may do so directly, where no forward hook sees it) and write them."""
    with held_interrupts(), _LOCK:
        others = [other for other in _PENDING if other is not mine]
        if not others:
            return
        ids = {id(p) for p in params()}
        for other in others:
            if any(id(p) in ids for chunk, _, _ in other._chunks for p in chunk):
                other.materialize()


class Lookahead:
    """The next step's perturbation while it is applied ahead of time, and the hooks that take it back. It holds
    what taking it back needs (parameters, offsets, seed, pass options) and no reference to the optimizer, so hooks
    left on modules keep working, and keep nothing else alive, after the optimizer is gone."""

    def __init__(self) -> None:
        self.seed: int | None = None
        self._chunks: Chunks = []
        self._versions: list[list[int]] = []  # per chunk, the versions when perturbed (_before_load)
        self._pass_kwargs: dict[str, Any] = {}
        self._forward_hook: torch.utils.hooks.RemovableHandle | None = None
        self._hooked_modules: weakref.WeakSet[torch.nn.Module] = weakref.WeakSet()
        self._handles: list[torch.utils.hooks.RemovableHandle] = []  # the owners' hooks, removed by close()
        self._searched: frozenset[int] = frozenset()  # ids of the parameters whose owners were looked for
        self._dtypes: list[list[torch.dtype]] = []  # per chunk, the parameters' dtypes when perturbed
        self._taken_back_converted = False  # a take-back found the parameters converted (model.half()) since set()

    # A copy (copy.deepcopy, pickle) holds the pending perturbation, whose parameters the copy maps as it maps the
    # rest (the copied model's, when copied along), and watches for reads anew; hooks stay with the original.
    def __getstate__(self) -> dict[str, Any]:
        return dict(
            seed=self.seed,
            chunks=self._chunks,
            pass_kwargs=self._pass_kwargs,
            dtypes=self._dtypes,
            converted=self._taken_back_converted,
        )

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__()
        if state["seed"] is not None:
            self.set(state["seed"], state["chunks"], state["pass_kwargs"])
            self._dtypes = state.get("dtypes", self._dtypes)  # as perturbed, not as converted since
        self._taken_back_converted = state.get("converted", False)

    @property
    def pending(self) -> bool:
        return self.seed is not None

    def set(self, seed: int, chunks: Chunks, pass_kwargs: dict[str, Any]) -> None:
        """Record that the parameters now hold theta + alpha z(seed) per chunk (written by passes with
        ``pass_kwargs``: distribution, backend), and watch for reads."""
        with _LOCK:
            self.seed, self._chunks, self._pass_kwargs = seed, list(chunks), dict(pass_kwargs)
            self._versions = [_versions(params) for params, _, _ in chunks]
            self._dtypes = [[p.dtype for p in params] for params, _, _ in chunks]
            _PENDING.add(self)
            if self._forward_hook is None:
                self._forward_hook = register_module_forward_pre_hook(_eager(self.materialize))

    def claim(self, seed: int, chunks: Chunks) -> bool:
        """At the start of a step: whether the pending perturbation is exactly ``chunks`` of z(seed), the step's first
        perturbation, which then needs no pass. Any other pending perturbation is taken back first."""
        with held_interrupts(), _LOCK:
            matches = self.pending and self.seed == seed and _same(self._chunks, chunks)
            if matches:
                self._clear()
            else:
                self.materialize()
            return matches

    def converted(self, clear: bool = True) -> bool:
        """Whether the parameters were converted to another dtype while the perturbation was applied: it is still
        pending, or a take-back since the last call that cleared found them so (replay converts theta + eps z then,
        not theta)."""
        with _LOCK:
            found = self._taken_back_converted or self._dtypes_changed()
            if clear:
                self._taken_back_converted = False
            return found

    def set_converted(self, value: bool) -> None:
        """What converted() says next, as a loaded checkpoint's run had it."""
        with _LOCK:
            self._taken_back_converted = value

    def _dtypes_changed(self) -> bool:
        return any(_converted(params, dtypes) for (params, _, _), dtypes in zip(self._chunks, self._dtypes))

    def materialize(self, *_hook_args) -> None:
        """Take the pending perturbation back (one pass per chunk): the parameters hold theta again."""
        self._take_back(skip_loaded=False)

    def _before_load(self, *_hook_args) -> None:
        # torch loads a module's own parameters before its children's: one loaded by this very load_state_dict
        # (its version counter raised) holds the checkpoint's value, not theta + eps z.
        self._take_back(skip_loaded=True)

    def _take_back(self, skip_loaded: bool) -> None:
        with held_interrupts(), _LOCK:
            self._take_back_locked(skip_loaded)

    def _take_back_locked(self, skip_loaded: bool) -> None:
        if not self.pending:
            return
        try:
            # Chunk by chunk, each forgotten once taken back: a pass that raises leaves the rest recorded.
            while self._chunks:
                (params, offsets, alpha), versions = self._chunks[0], self._versions[0]
                kept = list(zip(params, offsets))
                if skip_loaded:
                    kept = [(p, o) for (p, o), v, now in zip(kept, versions, _versions(params)) if now == v]
                with held_interrupts():  # taken back and forgotten together (a Ctrl-C between: taken back twice)
                    if kept:
                        ops.perturb_([p.data for p, _ in kept], self.seed, -alpha, offsets=[o for _, o in kept],
                                     **self._pass_kwargs)  # fmt: skip
                    # Noted chunk by chunk as taken back: a chunk still pending after a failure converted nothing yet.
                    self._taken_back_converted |= _converted(params, self._dtypes[0])
                    del self._chunks[0], self._versions[0], self._dtypes[0]
            clear_weight_caches()  # copies of theta + eps z, made in an autocast or cached() region still open
        except (TypeError, ValueError) as e:
            self._unhook()  # every module's forward would raise it again, the model's or not
            raise type(e)(
                f"zokern: merge_steps could not take its pending perturbation back ({e}); it stays recorded: call "
                "the optimizer's materialize() once the parameters can be written again (its next step does)"
            ) from e
        self._clear()

    def _clear(self) -> None:
        with _LOCK:
            self.seed, self._chunks, self._versions, self._dtypes = None, [], [], []
            _PENDING.discard(self)
            self._unhook()

    def _unhook(self) -> None:
        if self._forward_hook is not None:
            self._forward_hook.remove()
            self._forward_hook = None

    @contextlib.contextmanager
    def finding_owners(self, params: list[torch.Tensor]) -> Iterator[None]:
        """While the block runs (a closure call), hook ``state_dict``/``load_state_dict`` of every module that owns
        one of ``params`` and lies under a module whose forward runs: the whole tree of a model called in the
        closure, so parameters used functionally or by submodules that did not run (an expert not routed to) are
        covered too. Owners of the parameters that no such forward reached are then looked for among all live
        modules: a function compiled before the first merged step runs its traced code, which calls no global hook
        installed since, so its forwards are invisible (and parameters used outside any module have no owner to
        find). Once per parameter."""
        ids = {id(p) for p in params} - self._searched
        if not ids:
            yield
            return
        visited: set[torch.nn.Module] = set()  # named_modules' memo: each module is walked once per closure call
        found: set[int] = set()

        def find(root: torch.nn.Module, _args) -> None:
            for _, module in root.named_modules(memo=visited):
                found.update(self._hook_if_owner(module, ids))

        handle = register_module_forward_pre_hook(_eager(find))
        try:
            yield
        finally:
            handle.remove()
        if ids - found:
            # Once per parameter: gc.get_objects() lists every tracked object (about 0.1 s in a large program).
            for obj in gc.get_objects():
                if issubclass(type(obj), torch.nn.Module):  # type(), not isinstance: no __class__ property runs
                    self._hook_if_owner(obj, ids)
        self._searched = self._searched | frozenset(ids)

    def _hook_if_owner(self, module: torch.nn.Module, ids: set[int]) -> set[int]:
        """Hook ``module``'s state_dict and load_state_dict if it owns one of the parameters ``ids``; the ones it
        owns."""
        owned = {id(p) for p in module._parameters.values() if p is not None} & ids
        if owned and module not in self._hooked_modules:
            self._hooked_modules.add(module)
            self._handles.append(module.register_state_dict_pre_hook(self.materialize))
            self._handles.append(module.register_load_state_dict_pre_hook(self._before_load))
        return owned

    def close(self) -> None:
        """Take the pending perturbation back and remove every hook (the optimizer is gone)."""
        try:
            self.materialize()
        except (TypeError, ValueError) as e:  # nothing is left to retry with: the parameters keep theta + eps z
            warnings.warn(f"{e} (the optimizer is gone: the parameters keep it)", RuntimeWarning, stacklevel=2)
        finally:
            self._clear()
            for handle in self._handles:
                handle.remove()
            self._handles.clear()


def _versions(params: list[torch.Tensor]) -> list[int | None]:
    """Each parameter's version counter (None for an inference tensor, which has none)."""
    try:
        return [p._version for p in params]
    except RuntimeError:
        return [None if p.is_inference() else p._version for p in params]


def _eager(hook):
    """The hook as torch.compile sees it: run eagerly, never traced (it mutates parameters in place, or walks
    modules, which dynamo cannot follow from inside a compiled module's forward)."""
    return torch.compiler.disable(hook, recursive=True)


def _same(a: Chunks, b: Chunks) -> bool:
    """The same parameters (by identity), offsets and coefficients."""
    if len(a) != len(b):
        return False
    for (params_a, offsets_a, alpha_a), (params_b, offsets_b, alpha_b) in zip(a, b):
        if alpha_a != alpha_b or offsets_a != offsets_b or len(params_a) != len(params_b):
            return False
        if any(x is not y for x, y in zip(params_a, params_b)):
            return False
    return True


def _converted(params: list[torch.Tensor], dtypes: list[torch.dtype]) -> bool:
    """Whether any of ``params`` has another dtype than it had (``dtypes``, as perturbed)."""
    return any(p.dtype != d for p, d in zip(params, dtypes))
