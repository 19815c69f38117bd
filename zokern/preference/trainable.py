"""Which of the policy's parameters a run trains: by default its input embedding, whatever the architecture calls it
(``model.decoder.embed_tokens`` in OPT, ``transformer.wte`` in GPT-2, ``model.embed_tokens`` in Llama), or those
whose names a regular expression matches (``''`` matches all)."""

from __future__ import annotations

import re
import warnings

import torch


def trainable_names(model: torch.nn.Module, trainable: str | None) -> list[str]:
    """The names of the parameters ``trainable`` selects: None, the input embedding's (model.get_input_embeddings());
    a string, those it matches (re.search). ValueError when it selects none, naming some of the model's."""
    named = list(model.named_parameters())  # tied weights (an output layer tied to the embedding) appear once
    if trainable is None:
        get = getattr(model, "get_input_embeddings", None)
        embedding = get() if get is not None else None
        if embedding is None:
            raise ValueError(f"{type(model).__name__} has no input embedding to train: pass a trainable pattern")
        ids = {id(p) for p in embedding.parameters()}
        names = [n for n, p in named if id(p) in ids]
        what = "its input embedding"
    else:
        try:
            pattern = re.compile(trainable)
        except re.error as e:  # not a ValueError: say what it is
            raise ValueError(f"trainable={trainable!r} is not a regular expression ({e})") from None
        names = [n for n, _ in named if pattern.search(n)]
        what = f"trainable={trainable!r}"
    if not names:
        some = ", ".join(n for n, _ in named[:6]) + (", ..." if len(named) > 6 else "")
        raise ValueError(f"no parameter of the policy matches {what}; its {len(named)} parameters: {some}")
    return names


def select_trainable(model: torch.nn.Module, trainable: str | None) -> list[torch.nn.Parameter]:
    """Set ``requires_grad`` on the selected parameters only (trainable_names); returns them in model order. The
    default (None) warns when it freezes parameters the model came with trainable (a PEFT model's adapters)."""
    names = set(trainable_names(model, trainable))
    if trainable is None:
        frozen = [n for n, p in model.named_parameters() if p.requires_grad and n not in names]
        if frozen and any(not p.requires_grad for _, p in model.named_parameters()):  # (not a model all trainable)
            warnings.warn(
                f"trainable=None trains the policy's input embedding and freezes the {len(frozen)} parameter(s) it "
                f"came with trainable ({', '.join(frozen[:3])}{', ...' if len(frozen) > 3 else ''}): pass a pattern "
                "to train those (trainable='lora_' for PEFT's LoRA adapters)",
                UserWarning,
                stacklevel=3,
            )
    for name, p in model.named_parameters():
        p.requires_grad_(name in names)
    return [p for name, p in model.named_parameters() if name in names]
