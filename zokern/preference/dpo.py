"""Offline zeroth-order DPO: the DPO loss needs only forwards of the policy (and, once, of the frozen reference), so a
ZO optimizer trains on a preference dataset (TRL's ``prompt`` / ``chosen`` / ``rejected`` columns) at inference
memory.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from collections.abc import Mapping
from collections.abc import Sequence

import torch

from zokern._options import check_positive_float
from zokern.optim import ZOSGD
from zokern.optim import ZOOptimizer
from zokern.preference.data import CONVERSATIONAL
from zokern.preference.data import IMPLICIT_PROMPT
from zokern.preference.data import WordTokenizer
from zokern.preference.data import is_conversation
from zokern.preference.local import loop_tokenizer
from zokern.preference.losses import dpo_loss
from zokern.preference.losses import response_logprobs
from zokern.preference.models import check_vocabulary
from zokern.preference.models import model_device
from zokern.preference.positions import prompt_budget

RESPONSE_TOKENS = 16  # response positions per pair, <eos> included: a longer response is cut (and loses its <eos>)
CHUNK = 64  # pairs per forward outside the training step: evaluation holds one chunk's logits, never the dataset's


def pair_batch(
    tokenizer: WordTokenizer,
    prompts: Sequence[str],
    responses: Sequence[str],
    response_length: int = RESPONSE_TOKENS,
    prompt_tokens: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``[<bos> prompt | response <eos>]`` rows: prompts truncated from the left to ``prompt_tokens`` (None: kept
    whole) and left-padded, responses truncated to ``response_length`` tokens, <eos> included, and right-padded.
    Returns (sequences, attention_mask, response_mask)."""
    if prompt_tokens is not None and prompt_tokens < 1:
        raise ValueError(f"prompt_tokens must be None or positive, got {prompt_tokens}")
    keep = 0 if prompt_tokens is None else -prompt_tokens  # a slice [-n:] keeps the last n; [0:] all
    heads = [[tokenizer.bos_id, *tokenizer.encode(p)[keep:]] for p in prompts]
    tails = [[*tokenizer.encode(r), tokenizer.eos_id][:response_length] for r in responses]
    width = max(len(h) for h in heads)
    rows = len(prompts)
    sequences = torch.full((rows, width + response_length), tokenizer.pad_id, dtype=torch.long)
    attention = torch.zeros_like(sequences)
    response_mask = torch.zeros((rows, response_length))
    for k, (head, tail) in enumerate(zip(heads, tails)):
        sequences[k, width - len(head) : width] = torch.tensor(head)
        attention[k, width - len(head) : width] = 1
        sequences[k, width : width + len(tail)] = torch.tensor(tail)
        attention[k, width : width + len(tail)] = 1
        response_mask[k, : len(tail)] = 1
    return sequences, attention, response_mask


def sequence_logprobs(
    model, tokenizer: WordTokenizer, prompts, responses, response_length: int = RESPONSE_TOKENS
) -> torch.Tensor:
    """log pi(response | prompt) per row, summed over the response's tokens (float32); prompts are truncated from
    the left to fit the model's positions (``prompt_budget``)."""
    prompt_tokens = prompt_budget(model, response_length)
    sequences, attention, mask = pair_batch(tokenizer, prompts, responses, response_length, prompt_tokens)
    sequences, attention, mask = (t.to(model_device(model)) for t in (sequences, attention, mask))
    return response_logprobs(model, sequences, attention, response_length, mask).sum(-1)


def pair_logprobs(
    model, tokenizer, pairs: Sequence[dict], response_length: int = RESPONSE_TOKENS, chunk: int = CHUNK
) -> torch.Tensor:
    """[N, 2] log-probabilities of (chosen, rejected) under ``model``, ``chunk`` pairs per forward: the [chunk,
    response_length + 1, vocabulary] logits of one chunk are the most this holds, whatever N."""
    if not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"chunk must be a positive integer, got {chunk!r}")
    parts = []
    for start in range(0, len(pairs), chunk):
        part = pairs[start : start + chunk]
        prompts = [p["prompt"] for p in part]
        chosen = sequence_logprobs(model, tokenizer, prompts, [p["chosen"] for p in part], response_length)
        rejected = sequence_logprobs(model, tokenizer, prompts, [p["rejected"] for p in part], response_length)
        parts.append(torch.stack([chosen, rejected], dim=1))
    return torch.cat(parts)


@torch.no_grad()
def evaluate(
    policy,
    reference_logps: torch.Tensor,
    tokenizer,
    pairs: Sequence[dict],
    beta: float,
    response_length: int = RESPONSE_TOKENS,
    chunk: int = CHUNK,
) -> dict:
    """DPO loss and preference accuracy (the policy's implicit reward ranks chosen above rejected) on ``pairs``."""
    logps = pair_logprobs(policy, tokenizer, pairs, response_length, chunk)
    chosen, rejected = logps[:, 0], logps[:, 1]
    reference_logps = reference_logps.to(logps.device)
    margin = (chosen - reference_logps[:, 0]) - (rejected - reference_logps[:, 1])
    loss = dpo_loss(chosen, rejected, reference_logps[:, 0], reference_logps[:, 1], beta).item()
    return {"dpo_loss": loss, "accuracy": float((margin > 0).float().mean())}


@torch.no_grad()
def reference_logprobs(
    reference, tokenizer, pairs: Sequence[dict], response_length: int = RESPONSE_TOKENS, chunk: int = CHUNK
) -> torch.Tensor:
    """[N, 2] log-probabilities of (chosen, rejected) under the frozen reference, computed once, in chunks."""
    return pair_logprobs(reference, tokenizer, pairs, response_length, chunk)


def _checked_pairs(pairs, name: str) -> list[dict]:
    """The pairs as a list of dicts (a datasets.Dataset slices into columns, not rows), each with text prompt,
    chosen and rejected."""
    try:
        rows = list(pairs)
    except TypeError:
        raise ValueError(f"{name} must be a sequence of pairs (dicts), got {type(pairs).__name__}") from None
    for k, row in enumerate(rows):
        if not isinstance(row, Mapping):
            raise ValueError(f"{name}[{k}] is a {type(row).__name__}, not a pair (a dict of prompt, chosen, rejected)")
        for column in ("prompt", "chosen", "rejected"):
            value = row.get(column)
            if not isinstance(value, str) or not value.strip():
                hint = f" ({CONVERSATIONAL})" if is_conversation(value) else ""
                if value is None and column == "prompt" and "chosen" in row and "rejected" in row:
                    hint = f" ({IMPLICIT_PROMPT})"
                raise ValueError(f"{name}[{k}] has an empty, missing or non-text {column!r}: {value!r}{hint}")
    return rows


def warn_ties(tokenizer, pairs: Sequence[dict], name: str, response_length: int) -> None:
    """One warning, with counts, for the pairs of ``name`` whose chosen and rejected responses are the same tokens
    as the policy sees them (after the tokenizer's normalisation and the cut to ``response_length``), and one for
    responses that encode to no token (the policy sees <eos> alone)."""
    ties, empty = [], 0
    for k, row in enumerate(pairs):
        chosen, rejected = tokenizer.encode(row["chosen"]), tokenizer.encode(row["rejected"])
        empty += (not chosen) + (not rejected)
        if [*chosen, tokenizer.eos_id][:response_length] == [*rejected, tokenizer.eos_id][:response_length]:
            ties.append(k)
    if ties:
        warnings.warn(
            f"{name}: {len(ties)} of {len(pairs)} pairs (the first: {name}[{ties[0]}]) have the same chosen and "
            f"rejected response once tokenized (and cut to {response_length} tokens): they teach nothing (their DPO "
            "loss stays log 2) and count as misranked in the accuracy",
            UserWarning,
            stacklevel=3,
        )
    if empty:
        warnings.warn(
            f"{name}: {empty} of {2 * len(pairs)} responses encode to no token (the policy sees <eos> alone)",
            UserWarning,
            stacklevel=3,
        )


def warn_truncation(tokenizer, pairs: Sequence[dict], response_length: int, prompt_tokens: int | None) -> None:
    """One warning, with counts, when ``pair_batch`` will cut prompts or responses of ``pairs``."""
    prompts = 0 if prompt_tokens is None else sum(len(tokenizer.encode(p["prompt"])) > prompt_tokens for p in pairs)
    sides = ("chosen", "rejected")
    responses = sum(len(tokenizer.encode(p[s])) + 1 > response_length for p in pairs for s in sides)
    cut = []
    if prompts:
        cut.append(f"{prompts} of {len(pairs)} prompts (from the left, to the {prompt_tokens} tokens the model's "
                   f"positions leave)")  # fmt: skip
    if responses:
        cut.append(f"{responses} of {2 * len(pairs)} responses (to {response_length} tokens, <eos> included)")
    if cut:
        warnings.warn(f"ZO-DPO truncates {' and '.join(cut)}", stacklevel=3)


def train_zo_dpo(
    policy: torch.nn.Module,
    tokenizer: WordTokenizer,
    train_pairs: Sequence[dict],
    eval_pairs: Sequence[dict],
    *,
    steps: int = 200,
    batch: int = 32,
    beta: float = 0.1,
    optimizer: ZOOptimizer | None = None,
    eval_every: int = 50,
    seed: int = 0,
    log: Callable[[dict], None] = lambda record: None,
    response_length: int = RESPONSE_TOKENS,
    chunk: int = CHUNK,
) -> list[dict]:
    """Train ``policy`` in place with a ZO optimizer on the DPO loss against itself as it starts (the reference:
    its log-probabilities of every pair, computed before the first step; no copy of the model is kept); returns
    evaluation records (step, dpo_loss, accuracy) on ``eval_pairs``. The pairs are sequences of mappings with text
    ``prompt``, ``chosen`` and ``rejected`` (a list of dicts, or a ``datasets.Dataset`` with those columns), checked
    before any work, as are the counts (``steps`` >= 0, ``batch``, ``eval_every``, ``response_length`` positive) and
    ``beta`` (positive).

    Each response takes ``response_length`` positions (<eos> included; longer ones are cut) and each prompt what is
    left of the model's positions (cut from the left): one warning counts the pairs cut. The reference pass and the
    evaluations go ``chunk`` pairs per two forwards (chosen, then rejected), the training step's ``batch`` pairs
    likewise.

    The default optimizer is ZOSGD over the trainable parameters with lr 1e-2, eps 1e-3: on the demo's policy (token
    embeddings trainable) it took the held-out DPO loss from log 2 to 0.607 in 200 steps (accuracy 0.69), where
    lr 1e-3 moved it only to 0.684 and lr 5e-2 was unstable."""
    tokenizer = loop_tokenizer(tokenizer)
    train_pairs, eval_pairs = _checked_pairs(train_pairs, "train_pairs"), _checked_pairs(eval_pairs, "eval_pairs")
    if not train_pairs or not eval_pairs:
        raise ValueError("ZO-DPO needs training and evaluation pairs")
    for name, value, low in (("steps", steps, 0), ("batch", batch, 1), ("eval_every", eval_every, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    if isinstance(response_length, bool) or not isinstance(response_length, int) or response_length < 1:
        raise ValueError(f"response_length must be a positive integer, got {response_length!r}")
    try:
        check_positive_float(beta)
    except ValueError as e:
        raise ValueError(f"beta: {e}") from None
    check_vocabulary(tokenizer, policy, "policy")
    warn_ties(tokenizer, train_pairs, "train_pairs", response_length)
    warn_ties(tokenizer, eval_pairs, "eval_pairs", response_length)
    warn_truncation(tokenizer, [*train_pairs, *eval_pairs], response_length, prompt_budget(policy, response_length))
    policy.eval()  # dropout off: the reference pass, and ZO compares two losses of one function
    train_ref = reference_logprobs(policy, tokenizer, train_pairs, response_length, chunk)
    eval_ref = reference_logprobs(policy, tokenizer, eval_pairs, response_length, chunk)
    optimizer = optimizer or ZOSGD([p for p in policy.parameters() if p.requires_grad], lr=1e-2, eps=1e-3, seed=seed)
    g = torch.Generator().manual_seed(seed)
    records = [dict(step=0, **evaluate(policy, eval_ref, tokenizer, eval_pairs, beta, response_length, chunk))]
    log(records[-1])
    for step in range(1, steps + 1):
        rows = torch.randint(0, len(train_pairs), (batch,), generator=g)
        chosen_pairs = [train_pairs[r] for r in rows.tolist()]
        prompts = [p["prompt"] for p in chosen_pairs]
        ref = train_ref[rows]

        def closure(prompts=prompts, chosen_pairs=chosen_pairs, ref=ref):
            chosen = sequence_logprobs(policy, tokenizer, prompts, [p["chosen"] for p in chosen_pairs], response_length)
            rejected = sequence_logprobs(
                policy, tokenizer, prompts, [p["rejected"] for p in chosen_pairs], response_length
            )
            return dpo_loss(chosen, rejected, ref[:, 0], ref[:, 1], beta)

        optimizer.step(closure)
        if step % eval_every == 0 or step == steps:
            records.append(
                dict(step=step, **evaluate(policy, eval_ref, tokenizer, eval_pairs, beta, response_length, chunk))
            )
            log(records[-1])
    return records
