"""Caches of values computed from the parameters, which outlive a change of the parameters.

torch keeps two that a ZO step must empty whenever theta or its perturbation changes, since each evaluation of a
step reads other weights than the last (and a third that it cannot empty, below):

- autocast's low-precision copies of the parameters, kept until the outermost autocast region exits (a step run
  inside one evaluated every point with the first evaluation's copies: L+ = L-, g = 0);
- ``torch.nn.utils.parametrize.cached()``'s parametrized weights, kept until its block exits (torch's idiom around
  one optimisation step: L- and the steps after were evaluated with the weight computed at theta + eps z).
"""

from __future__ import annotations

import sys
import warnings

import torch
from torch.nn.utils import parametrize


def clear_weight_caches() -> None:
    torch.clear_autocast_cache()
    # A private flag and dict, present in every torch that has cached() (1.9 on); read defensively all the same.
    if getattr(parametrize, "_cache_enabled", 0):
        parametrize._cache.clear()


def warn_if_compiled_weights_are_frozen() -> None:
    """Inductor's ``freezing`` folds the parameters a compiled forward first saw into constants of its code when it
    runs without autograd, as every ZO evaluation does: the evaluations after the first read stale weights, and the
    run trains on a wrong estimate, silently. Only torch.compile can undo it (a recompile)."""
    config = sys.modules.get("torch._inductor.config")
    if getattr(config, "freezing", False):
        warnings.warn(
            "zokern: torch._inductor.config.freezing is set: a model compiled by inductor evaluates with the "
            "weights it first saw, not theta + eps z, so steps train on a wrong estimate. Unset it for ZO training",
            RuntimeWarning,
            stacklevel=5,
        )
