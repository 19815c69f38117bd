"""Zeroth-order preference optimisation (ZOPrO and its baselines): losses, the structured ZOPrO direction, the online
loop and offline ZO-DPO. See docs/preference.md."""

from zokern.preference.directions import ZOPrODirection
from zokern.preference.losses import bradley_terry_loss
from zokern.preference.losses import dpo_loss
from zokern.preference.losses import kl_penalised_rewards
from zokern.preference.losses import ppo_clip_loss
from zokern.preference.losses import response_logprobs
from zokern.preference.losses import rloo_advantages

__all__ = [
    "ZOPrODirection",
    "bradley_terry_loss",
    "dpo_loss",
    "kl_penalised_rewards",
    "ppo_clip_loss",
    "response_logprobs",
    "rloo_advantages",
]
