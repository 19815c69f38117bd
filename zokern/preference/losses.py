"""The losses of preference optimisation, forward-only where a ZO method needs them, all reduced in float32.

Conventions: a batch of sequences is ``[prompt | response]`` with prompts left-padded to a common length P and
responses of R positions after them; ``response_mask`` [B, R] marks the response tokens that count (1) and the
padding after an end-of-sequence (0). Only the R positions that predict response tokens get logits: the prompt's
vocabulary projections are never computed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from zokern.preference.positions import position_kwargs


def response_logprobs(
    model: torch.nn.Module,
    sequences: torch.Tensor,
    attention_mask: torch.Tensor,
    response_length: int,
    response_mask: torch.Tensor | None = None,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Per-token log-probabilities [B, R] of the last ``response_length`` tokens of ``sequences`` under ``model``
    (a causal LM), in float32, 0 where ``response_mask`` is 0.

    The logits at position t predict token t + 1, so the R response tokens need the R logits before them: the model
    is asked for ``logits_to_keep = R + 1`` and the last is dropped. Position ids come from the attention mask
    (zokern.preference.positions): a row's log-probabilities do not depend on the padding its batch gives it.
    ``temperature`` divides the logits, as sampling at that temperature did: the log-probabilities of the policy
    that drew the responses (an RLOO ratio or KL term at another temperature is off-policy).
    """
    if sequences.shape != attention_mask.shape:
        raise ValueError(f"sequences {tuple(sequences.shape)} and attention_mask {tuple(attention_mask.shape)} differ")
    if not 0 < response_length < sequences.shape[1]:
        raise ValueError(f"response_length must be in [1, {sequences.shape[1] - 1}], got {response_length}")
    positions = position_kwargs(model, attention_mask)
    logits = model(
        input_ids=sequences, attention_mask=attention_mask, logits_to_keep=response_length + 1, **positions
    ).logits
    logits = logits[:, :-1].float() / temperature
    tokens = sequences[:, -response_length:]
    logp = torch.log_softmax(logits, dim=-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    if response_mask is not None:
        logp = logp * response_mask.to(logp.dtype)
    return logp


def kl_penalised_rewards(
    scores: torch.Tensor, logp: torch.Tensor, logp_ref: torch.Tensor, response_mask: torch.Tensor, beta: float
) -> torch.Tensor:
    """R = score - beta * sum_t (log pi(y_t) - log pi_ref(y_t)) over response tokens: the sequence-level KL estimate
    of RLOO (per sequence, float32)."""
    _check_finite("scores", scores)
    kl = ((logp - logp_ref) * response_mask.to(logp.dtype)).sum(-1)
    return scores.float() - beta * kl


def rloo_advantages(rewards: torch.Tensor) -> torch.Tensor:
    """Leave-one-out advantages for rewards [P, k] (k samples per prompt): A_i = R_i - mean_{j != i} R_j."""
    _check_finite("rewards", rewards)
    if rewards.dim() != 2 or rewards.shape[1] < 2:
        raise ValueError(f"rewards must be [prompts, k] with k >= 2 samples per prompt, got {tuple(rewards.shape)}")
    k = rewards.shape[1]
    others = (rewards.sum(dim=1, keepdim=True) - rewards) / (k - 1)
    return rewards - others


def ppo_clip_loss(
    logp_new: torch.Tensor, logp_old: torch.Tensor, advantages: torch.Tensor, clip: float = 0.2
) -> torch.Tensor:
    """The RLOO/PPO-clip surrogate on frozen rollouts, with a sequence-level ratio rho = exp(sum_t log pi - sum_t
    log pi_old): mean over sequences of max(-A rho, -A clip(rho, 1 - c, 1 + c)). Inputs are per-token log-probs
    [B, R] (masked) and advantages [B]."""
    ratio = torch.exp(logp_new.float().sum(-1) - logp_old.float().sum(-1))
    a = advantages.float()
    return torch.maximum(-a * ratio, -a * ratio.clamp(1 - clip, 1 + clip)).mean()


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    reference_chosen: torch.Tensor,
    reference_rejected: torch.Tensor,
    beta: float = 0.1,
) -> torch.Tensor:
    """DPO (Rafailov et al., 2023): -log sigmoid(beta ((pi_c - ref_c) - (pi_r - ref_r))), mean over pairs, from the
    sequence log-probabilities of the chosen and rejected responses under the policy and the frozen reference."""
    margin = (policy_chosen.float() - reference_chosen.float()) - (policy_rejected.float() - reference_rejected.float())
    return -F.logsigmoid(beta * margin).mean()


def bradley_terry_loss(reward_chosen: torch.Tensor, reward_rejected: torch.Tensor) -> torch.Tensor:
    """The reward model's loss on preference pairs: -log sigmoid(r_chosen - r_rejected), mean over pairs. Non-finite
    scores are refused (a first-order step on them would corrupt the reward model; an infinite margin would read as a
    perfect loss); the check's host sync is one a first-order loop makes anyway."""
    _check_finite("reward_chosen", reward_chosen)
    _check_finite("reward_rejected", reward_rejected)
    return -F.logsigmoid(reward_chosen.float() - reward_rejected.float()).mean()


def _check_finite(name: str, values: torch.Tensor) -> None:
    if not torch.isfinite(values).all():
        bad = int((~torch.isfinite(values)).sum())
        raise ValueError(f"{name} has {bad} non-finite value(s) (of {values.numel()}); check the judge or reward model")
