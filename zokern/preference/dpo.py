"""Offline zeroth-order DPO: the DPO loss needs only forwards of the policy (and, once, of the frozen reference), so a
ZO optimizer trains on a preference dataset (TRL's ``prompt`` / ``chosen`` / ``rejected`` columns) at inference
memory.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from collections.abc import Sequence

import torch

from zokern.optim import ZOSGD
from zokern.optim import ZOOptimizer
from zokern.preference.data import WordTokenizer
from zokern.preference.losses import dpo_loss
from zokern.preference.losses import response_logprobs


def pair_batch(
    tokenizer: WordTokenizer, prompts: Sequence[str], responses: Sequence[str], response_length: int = 16
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``[<bos> prompt | response <eos>]`` rows: prompts left-padded, responses right-padded (and truncated) to
    ``response_length``. Returns (sequences, attention_mask, response_mask)."""
    heads = [[tokenizer.bos_id, *tokenizer.encode(p)] for p in prompts]
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


def sequence_logprobs(model, tokenizer: WordTokenizer, prompts, responses, response_length: int = 16) -> torch.Tensor:
    """log pi(response | prompt) per row, summed over the response's tokens (float32)."""
    sequences, attention, mask = pair_batch(tokenizer, prompts, responses, response_length)
    return response_logprobs(model, sequences, attention, response_length, mask).sum(-1)


@torch.no_grad()
def evaluate(policy, reference_logps: torch.Tensor, tokenizer, pairs: Sequence[dict], beta: float) -> dict:
    """DPO loss and preference accuracy (the policy's implicit reward ranks chosen above rejected) on ``pairs``."""
    prompts = [p["prompt"] for p in pairs]
    chosen = sequence_logprobs(policy, tokenizer, prompts, [p["chosen"] for p in pairs])
    rejected = sequence_logprobs(policy, tokenizer, prompts, [p["rejected"] for p in pairs])
    margin = (chosen - reference_logps[:, 0]) - (rejected - reference_logps[:, 1])
    loss = dpo_loss(chosen, rejected, reference_logps[:, 0], reference_logps[:, 1], beta).item()
    return {"dpo_loss": loss, "accuracy": float((margin > 0).float().mean())}


def reference_logprobs(reference, tokenizer, pairs: Sequence[dict]) -> torch.Tensor:
    """[N, 2] log-probabilities of (chosen, rejected) under the frozen reference, computed once."""
    with torch.no_grad():
        prompts = [p["prompt"] for p in pairs]
        chosen = sequence_logprobs(reference, tokenizer, prompts, [p["chosen"] for p in pairs])
        rejected = sequence_logprobs(reference, tokenizer, prompts, [p["rejected"] for p in pairs])
    return torch.stack([chosen, rejected], dim=1)


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
) -> list[dict]:
    """Train ``policy`` in place with a ZO optimizer on the DPO loss against a frozen copy of itself; returns
    evaluation records (step, dpo_loss, accuracy) on ``eval_pairs``.

    The default optimizer is ZOSGD over the trainable parameters with lr 1e-2, eps 1e-3: on the demo's policy (token
    embeddings trainable) it took the held-out DPO loss from log 2 to 0.608 in 200 steps (accuracy 0.81), where
    lr 1e-3 moved it only to 0.684 and lr 5e-2 was unstable."""
    if not train_pairs or not eval_pairs:
        raise ValueError("ZO-DPO needs training and evaluation pairs")
    reference = copy.deepcopy(policy).eval()
    policy.eval()
    train_ref = reference_logprobs(reference, tokenizer, train_pairs)
    eval_ref = reference_logprobs(reference, tokenizer, eval_pairs)
    optimizer = optimizer or ZOSGD([p for p in policy.parameters() if p.requires_grad], lr=1e-2, eps=1e-3, seed=seed)
    g = torch.Generator().manual_seed(seed)
    records = [dict(step=0, **evaluate(policy, eval_ref, tokenizer, eval_pairs, beta))]
    log(records[-1])
    for step in range(1, steps + 1):
        rows = torch.randint(0, len(train_pairs), (batch,), generator=g)
        chosen_pairs = [train_pairs[r] for r in rows.tolist()]
        prompts = [p["prompt"] for p in chosen_pairs]
        ref = train_ref[rows]

        def closure(prompts=prompts, chosen_pairs=chosen_pairs, ref=ref):
            chosen = sequence_logprobs(policy, tokenizer, prompts, [p["chosen"] for p in chosen_pairs])
            rejected = sequence_logprobs(policy, tokenizer, prompts, [p["rejected"] for p in chosen_pairs])
            return dpo_loss(chosen, rejected, ref[:, 0], ref[:, 1], beta)

        optimizer.step(closure)
        if step % eval_every == 0 or step == steps:
            records.append(dict(step=step, **evaluate(policy, eval_ref, tokenizer, eval_pairs, beta)))
            log(records[-1])
    return records
