"""Position ids for the left-padded batches of zokern.preference.

A row's tokens must sit at positions 0, 1, 2, ... whatever padding precedes them, or its log-probabilities and reward
scores depend on the other rows of its batch. Models with absolute position embeddings do not all derive positions
from the attention mask (OPT does; GPT-2 in transformers 5 counts from the first column, padding included), so every
forward on such a batch passes them explicitly: the number of real tokens before each one.
"""

from __future__ import annotations

import functools
import inspect

import torch


def max_positions(model: torch.nn.Module) -> int | None:
    """The model's position table size (``config.max_position_embeddings``), None where its config states none."""
    return getattr(getattr(model, "config", None), "max_position_embeddings", None)


@functools.cache
def _takes_position_ids(model_class: type) -> bool:
    # ALiBi models (Bloom, MPT) have no position ids: their biases come from the attention mask already.
    return "position_ids" in inspect.signature(model_class.forward).parameters


@functools.cache
def _cache_argument(model_class: type) -> str:
    # transformers 5.24 renamed the KV cache argument and output field past_key_values -> cache (the old names warn
    # a FutureWarning and go in 5.40); earlier versions, and models written against them, take past_key_values.
    return "cache" if "cache" in inspect.signature(model_class.forward).parameters else "past_key_values"


def cache_kwargs(model: torch.nn.Module, cache) -> dict:
    """``{name: cache, "use_cache": True}`` under the name ``model``'s forward takes its KV cache by."""
    return {_cache_argument(type(innermost(model))): cache, "use_cache": True}


def returned_cache(output):
    """The KV cache a forward returned: ``output.cache`` from transformers 5.24, ``output.past_key_values`` before."""
    return output["cache"] if "cache" in output.keys() else output.past_key_values


def innermost(model: torch.nn.Module) -> torch.nn.Module:
    """The model a wrapper forwards to (torch.compile's ``_orig_mod``, PEFT's base model): wrappers take ``**kwargs``,
    so only the model they wrap says whether position ids are taken."""
    while True:
        inner = getattr(model, "_orig_mod", None)
        if inner is None and callable(getattr(model, "get_base_model", None)):
            inner = model.get_base_model()
        if inner is None or inner is model:
            return model
        model = inner


def position_kwargs(model: torch.nn.Module, attention_mask: torch.Tensor, new: int | None = None) -> dict:
    """``{"position_ids": ...}`` for a forward of ``model`` on a left-padded batch: (cumsum(mask) - 1) clamped at 0
    (padding gets position 0; it is masked out). ``attention_mask`` covers every position so far; with a KV cache
    only the ``new`` last positions are fed, and their ids are those of the last ``new`` columns (for one new token:
    mask.sum(-1) - 1). Empty for models that take no position ids.

    Raises ValueError, rather than an IndexError deep in the model, when the batch is wider than the model's position
    table: a row as wide as the mask would need positions past it."""
    width = attention_mask.shape[-1]
    limit = max_positions(model)
    if limit is not None and width > limit:
        raise ValueError(
            f"a batch of {width} positions exceeds the model's {limit} (config.max_position_embeddings): "
            f"truncate the prompts or shorten the responses"
        )
    if not _takes_position_ids(type(innermost(model))):
        return {}
    ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    return {"position_ids": ids if new is None else ids[:, -new:]}


def prompt_budget(model: torch.nn.Module, response_length: int) -> int | None:
    """Prompt tokens that fit in the model's position table before ``response_length`` response positions and the
    prompt's <bos>: max positions - response_length - 1 (None: the model states no maximum)."""
    table = max_positions(model)
    if table is None:
        return None
    budget = table - response_length - 1
    if budget < 1:
        raise ValueError(
            f"a response of {response_length} tokens leaves no room for a prompt in the model's {table} positions "
            f"(at most {table - 2} response tokens)"
        )
    return budget
