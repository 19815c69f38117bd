"""torch.optim.Optimizer runs its ``state_dict`` post-hooks and ``load_state_dict`` hooks inside those calls, where
they would see neither zokern's ``zo`` entry nor the loaded run (its float32 states, its step count): zokern's own
``state_dict`` and ``load_state_dict`` run them at the right point themselves. The registries stay the optimizer's
own objects (a hook registered or removed meanwhile, by this thread or another, is kept or removed as usual); only
torch's loop over them finds them empty, on the calling thread, while zokern's call runs."""

from __future__ import annotations

import collections
import contextlib
import threading
from collections.abc import Iterator

import torch

RUN_BY_ZOKERN = ("state_dict_post", "load_state_dict_pre", "load_state_dict_post")

_running = threading.local()  # per thread: id of a registry -> how many zokern calls are running its hooks


class HookRegistry(collections.OrderedDict):
    """One of an optimizer's hook registries, which torch.optim's loop sees empty while zokern runs its hooks."""

    def values(self):
        if getattr(_running, "counts", {}).get(id(self)):
            return ()
        return super().values()


def install(optimizer: torch.optim.Optimizer) -> None:
    """Make the registries zokern runs itself HookRegistry objects (at construction, and after unpickling or a copy,
    whose torch.optim.__setstate__ made plain new ones)."""
    for kind in RUN_BY_ZOKERN:
        name = f"_optimizer_{kind}_hooks"
        hooks = getattr(optimizer, name)
        if not isinstance(hooks, HookRegistry):
            setattr(optimizer, name, HookRegistry(hooks))


@contextlib.contextmanager
def quiet(optimizer: torch.optim.Optimizer, *kinds: str) -> Iterator[None]:
    """torch.optim's loops over the hooks of ``kinds`` run none during the block, on this thread: the caller runs
    them (hooks registered or removed meanwhile count, as they would in torch's loop)."""
    counts = _running.__dict__.setdefault("counts", {})
    ids = [id(getattr(optimizer, f"_optimizer_{kind}_hooks")) for kind in kinds]
    for key in ids:
        counts[key] = counts.get(key, 0) + 1
    try:
        yield
    finally:
        for key in ids:
            counts[key] -= 1
            if not counts[key]:
                del counts[key]
