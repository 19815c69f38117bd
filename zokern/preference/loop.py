"""The online preference-optimisation loop: ZOPrO, the MeZO direction, LDSD and first-order RLOO in one code path.

One policy step: sample k responses to each of P prompts (frozen rollouts), score them with the reward model, subtract
the sequence-level KL to the frozen reference, take RLOO advantages, and minimise the PPO-clip surrogate on those
rollouts: with a ZO step (two policy-loss forwards; LDSD's k + 1) or a first-order one (one forward and a backward).
Methods are compared at the same number of policy-loss forwards. After every iteration of ``2 * steps_per_iteration``
policy-loss forwards (``steps_per_iteration`` ZO steps), pairs of the policy's own responses are labelled by the judge
and the reward model is refined (first order); ZOPrO's next direction is built from the policy's update over the
iteration (mu) and the reward model's refinement (vhat, matched to the policy's tensors by name), with gamma decaying
linearly over the run.
"""

from __future__ import annotations

import copy
import math
import numbers
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from zokern._options import check_non_negative_float
from zokern._options import check_positive_float
from zokern._options import check_regex
from zokern._options import check_seed
from zokern.optim import LDSD
from zokern.optim import ZOSGD
from zokern.preference.data import Judge
from zokern.preference.data import WordTokenizer
from zokern.preference.data import judge_score
from zokern.preference.directions import ZOPrODirection
from zokern.preference.local import loop_tokenizer
from zokern.preference.losses import kl_penalised_rewards
from zokern.preference.losses import ppo_clip_loss
from zokern.preference.losses import response_logprobs
from zokern.preference.losses import rloo_advantages
from zokern.preference.models import check_reward_padding
from zokern.preference.models import check_vocabulary
from zokern.preference.models import reward_scores
from zokern.preference.models import sample
from zokern.preference.models import train_reward_model
from zokern.preference.optim import ZOPrO
from zokern.preference.positions import innermost
from zokern.preference.positions import prompt_budget
from zokern.preference.sketch import SketchRecorder
from zokern.preference.trainable import select_trainable

METHODS = ("zopro", "mezo", "rloo", "ldsd")
DEFAULT_METHODS = ("zopro", "mezo", "rloo")  # the demo's comparison; LDSD on request (--methods ...,ldsd)


@dataclass
class LoopConfig:
    """The loop's settings. Defaults are the demo's, measured on its tiny policy (docs/preference.md): with the
    token embeddings (tied with the output layer) as the trainable set, ZOPrO at lr 3e-4 raised the judged reward
    from 0.15 to 0.44-0.91 in 600 forwards over four seeds, where lr 1e-3 and above collapsed the policy."""

    forwards: int = 600  # policy-loss forwards per method (a ZO step uses 2, LDSD k + 1, a first-order step 1)
    steps_per_iteration: int = 10  # MeZO steps between reward-model refinements; other methods: as many forwards
    prompts_per_step: int = 8
    k: int = 4
    response_length: int = 12
    temperature: float = 1.0
    beta: float = 0.05  # KL coefficient
    clip: float = 0.2
    zo_lr: float = 3e-4
    zo_eps: float = 1e-3
    rloo_lr: float = 1e-3
    ldsd_k: int = 4  # LDSD's candidates per step (k + 1 forwards)
    ldsd_mu_lr: float = 1.0
    gamma0: float = 0.5  # ZOPrO's weight of the previous update, decaying linearly to 0
    rm_steps: int = 30  # reward-model refinement steps per iteration
    eval_every: int = 50  # in policy-loss forwards
    eval_prompts: int = 32
    # Regular expression on parameter names ('' matches all); None: the input embedding, whatever its name.
    trainable: str | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        self.check()

    def check(self) -> None:
        """Each setting in its range, or a ValueError naming it; run() checks again before any work (a field may
        have been set since)."""
        counts = ("forwards", "steps_per_iteration", "prompts_per_step", "response_length", "ldsd_k", "eval_every")
        for name, low in (*((name, 1) for name in counts), ("eval_prompts", 1), ("k", 2), ("rm_steps", 0), ("seed", 0)):
            _require_int(self, name, low)
        for name, check in (
            ("temperature", check_positive_float),
            ("clip", check_positive_float),
            ("zo_eps", check_positive_float),
            ("zo_lr", check_non_negative_float),
            ("rloo_lr", check_non_negative_float),
            ("beta", check_non_negative_float),
            ("ldsd_mu_lr", check_non_negative_float),
            ("gamma0", check_non_negative_float),
            ("seed", check_seed),
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real):  # the CLI's checks would parse "0.7"
                raise ValueError(f"LoopConfig.{name}: expected a number, got {type(value).__name__} {value!r}")
            try:
                setattr(self, name, check(value))  # a plain float or int (NumPy's would reach the JSON records)
            except ValueError as e:
                raise ValueError(f"LoopConfig.{name}: {e}") from None
        if self.gamma0 > 1:
            raise ValueError(f"LoopConfig.gamma0: ZOPrO's weight of the previous update, in [0, 1]; got {self.gamma0}")
        if self.trainable is not None:
            try:
                check_regex(self.trainable)
            except (TypeError, ValueError) as e:
                raise ValueError(f"LoopConfig.trainable: a regular expression or None ({e})") from None


def _require_int(config: LoopConfig, name: str, low: int) -> None:
    value = getattr(config, name)
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        why = " (RLOO's leave-one-out baseline needs two samples per prompt)" if name == "k" else ""
        raise ValueError(f"LoopConfig.{name}: expected an integer >= {low}{why}, got {value!r}")


def _check_prompts(name: str, prompts: Any) -> None:
    """A non-empty list (or tuple) of non-empty strings: a string would be sampled from character by character."""
    if not isinstance(prompts, (list, tuple)) or not prompts:
        raise ValueError(f"{name}: expected a non-empty list of prompts, got {type(prompts).__name__} {prompts!r:.60}")
    bad = next((p for p in prompts if not isinstance(p, str) or not p.strip()), None)
    if bad is not None:
        raise ValueError(f"{name}: every prompt must be a non-empty string, got {bad!r}")


def judged_reward(policy, tokenizer: WordTokenizer, prompts: list[str], judge: Judge, config: LoopConfig) -> float:
    """Mean judge score of one sampled response per held-out prompt (fixed sampling seed: comparable over time)."""
    rollouts = sample(policy, tokenizer, prompts, 1, config.response_length, config.temperature, seed=12345)
    responses = rollouts.responses(tokenizer)
    return sum(judge_score(judge, p, r) for p, r in zip(prompts, responses)) / len(prompts)


def _policy_objective(policy, reference, reward_model, tokenizer, prompts, config, seed):
    """Frozen rollouts and their advantages; returns the closure of the PPO-clip surrogate."""
    rollouts = sample(policy, tokenizer, prompts, config.k, config.response_length, config.temperature, seed=seed)
    args = (rollouts.sequences, rollouts.attention_mask, rollouts.response_length, rollouts.response_mask)
    args += (config.temperature,)  # the sampling policy's log-probabilities: logits / T, as sample() drew them
    with torch.no_grad():
        logp_old = response_logprobs(policy, *args)
        logp_ref = response_logprobs(reference, *args)
        scores = reward_scores(reward_model, rollouts.sequences, rollouts.attention_mask)
    rewards = kl_penalised_rewards(scores, logp_old, logp_ref, rollouts.response_mask, config.beta)
    advantages = rloo_advantages(rewards.view(-1, config.k)).view(-1)

    def closure() -> torch.Tensor:
        return ppo_clip_loss(response_logprobs(policy, *args), logp_old, advantages, config.clip)

    return closure, rollouts


def _judged_pairs(policy, tokenizer, prompts, judge, config, seed) -> list[dict]:
    """Two responses of the policy per prompt, ordered by the judge (ties dropped)."""
    rollouts = sample(policy, tokenizer, prompts, 2, config.response_length, config.temperature, seed=seed)
    responses = rollouts.responses(tokenizer)
    pairs = []
    for p, (a, b) in zip(prompts, zip(responses[0::2], responses[1::2])):
        sa, sb = judge_score(judge, p, a), judge_score(judge, p, b)
        if sa != sb:
            pairs.append({"prompt": p, "chosen": a if sa > sb else b, "rejected": b if sa > sb else a})
    return pairs


def _inner_names(model) -> dict[int, str]:
    """Each parameter's name inside the model's wrappers (PEFT's, torch.compile's): the names by which a wrapped
    policy's tensors meet a plain reward model's. A wrapper's own parameters (PEFT's prompt encoder) keep their
    outer names."""
    names = {id(p): n for n, p in innermost(model).named_parameters()}
    inner = set(names.values())
    for n, p in model.named_parameters():
        if id(p) not in names:  # one name per tensor: a wrapper's own that an inner one has is marked as the wrapper's
            names[id(p)] = n if n not in inner else f"(wrapper) {n}"
    return names


def _trainable_named(policy) -> list[tuple[str, torch.Tensor]]:
    names = _inner_names(policy)
    return [(names[id(p)], p) for p in policy.parameters() if p.requires_grad]


def _reward_counterparts(policy, reward_model) -> dict[str, torch.Tensor]:
    """The reward model's tensors of the (inner) names and shapes of the policy's trainable ones: where ZOPrO's
    projection and the sketches map one model onto the other."""
    trainable = {n: p.shape for n, p in _trainable_named(policy)}
    return {n: p for n, p in innermost(reward_model).named_parameters() if trainable.get(n) == p.shape}


def forwards_per_step_of(method: str, config: LoopConfig) -> int:
    """Policy-loss forwards per step: a ZO step 2, LDSD k + 1, a first-order step 1."""
    return {"rloo": 1, "ldsd": config.ldsd_k + 1}.get(method, 2)


def iteration_ends(steps: int, forwards_per_step: int, forwards_per_iteration: int) -> list[int]:
    """The step after which each iteration ends (its reward-model refinement): the first at which the run's
    policy-loss forwards reach each multiple of ``forwards_per_iteration``, so that methods whose step costs another
    number of forwards (LDSD's k + 1) refine at the same budgets on average; at least one step each, the last at the
    run's end."""
    ends: list[int] = []
    while not ends or ends[-1] < steps:
        reach = math.ceil(forwards_per_iteration * (len(ends) + 1) / forwards_per_step)
        ends.append(min(steps, max(reach, ends[-1] + 1 if ends else 1)))
    return ends


def check_forwards(forwards: int, methods: tuple[str, ...], config: LoopConfig) -> None:
    """A budget every method spends whole: compared at the same number of policy-loss forwards, each must take a
    whole number of steps in it."""
    per_step = {m: forwards_per_step_of(m, config) for m in methods}
    unit = math.lcm(*per_step.values())
    if forwards % unit:
        steps = ", ".join(f"{n} ({m})" for m, n in per_step.items())
        raise ValueError(
            f"forwards {forwards}: every method must get the same number of policy-loss forwards, in whole steps of "
            f"{steps}; give a multiple of {unit}"
        )


def run(
    method: str,
    policy: torch.nn.Module,
    reward_model: torch.nn.Module,
    tokenizer: WordTokenizer,
    train_prompts: list[str],
    heldout_prompts: list[str],
    judge: Judge,
    config: LoopConfig,
    log: Callable[[dict], None] = lambda record: None,
    recorder: SketchRecorder | None = None,
) -> list[dict]:
    """Train ``policy`` (in place) with ``method``; returns the evaluation records (method, step, forwards,
    seconds, reward) and passes each to ``log`` as it is made. ``policy`` and ``reward_model`` are the starting
    models; the reference is a frozen copy of the policy. With a ``recorder``, the policy's trainable tensors and
    the reward model's tensors of the same names are sketched at the start and after every iteration."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    tokenizer = loop_tokenizer(tokenizer)
    config.check()
    if not callable(getattr(judge, "score", None)):  # (before the copies and the first sampling)
        raise TypeError(
            f"judge must have a score(prompt, response) method returning a number, got {type(judge).__name__}"
        )
    for name, prompts in (("train_prompts", train_prompts), ("heldout_prompts", heldout_prompts)):
        _check_prompts(name, prompts)
    prompt_budget(policy, config.response_length)  # a response the policy's positions cannot hold, before any work
    check_vocabulary(tokenizer, policy, "policy")
    check_vocabulary(tokenizer, reward_model, "reward model")
    check_reward_padding(reward_model, tokenizer)
    reference = copy.deepcopy(policy).eval()
    reward_model = copy.deepcopy(reward_model).eval()  # scores without dropout, as after each refinement
    policy.eval()  # dropout off: ZO compares two losses of one function
    params = select_trainable(policy, config.trainable)
    if method == "zopro" and not _reward_counterparts(policy, reward_model):
        raise ValueError(
            "ZOPrO projects the reward model's update out of the policy's noise per tensor of the same name (inside "
            "PEFT's or torch.compile's wrapper) and shape, and no trainable policy tensor has one in the reward "
            "model (a LoRA policy's adapters have none in a plain reward model: give the reward model the same "
            "adapters, or train tensors the two models share); without it the direction is the previous update "
            "plus plain noise"
        )
    zo = method != "rloo"
    if method == "zopro":
        optimizer: Any = ZOPrO(params, lr=config.zo_lr, eps=config.zo_eps, seed=config.seed)
    elif method == "mezo":
        optimizer = ZOSGD(params, lr=config.zo_lr, eps=config.zo_eps, seed=config.seed)
    elif method == "ldsd":
        optimizer = LDSD(
            params, lr=config.zo_lr, eps=config.zo_eps, k=config.ldsd_k, mu_lr=config.ldsd_mu_lr, seed=config.seed
        )
    else:
        optimizer = torch.optim.Adam(params, lr=config.rloo_lr)
    forwards_per_step = forwards_per_step_of(method, config)
    steps = config.forwards // forwards_per_step
    if steps == 0:  # nothing would train, and the run's record would read as a result
        raise ValueError(
            f"forwards={config.forwards} is less than one {method} step ({forwards_per_step} policy-loss forwards)"
        )
    ends = iteration_ends(steps, forwards_per_step, 2 * config.steps_per_iteration)
    iterations = len(ends)
    eval_prompts = heldout_prompts[: config.eval_prompts]
    g = torch.Generator().manual_seed(config.seed)
    records: list[dict] = []
    clock = time.perf_counter()

    def evaluate(step: int) -> None:
        records.append(
            dict(
                method=method,
                step=step,
                forwards=step * forwards_per_step,
                seconds=time.perf_counter() - clock,
                reward=judged_reward(policy, tokenizer, eval_prompts, judge, config),
            )
        )
        log(records[-1])

    def sketch(iteration: int, gamma: float | None) -> None:
        if recorder is None:
            return
        recorder.record(method, "policy", _trainable_named(policy), iteration, step, gamma)
        recorder.record(
            method, "reward", list(_reward_counterparts(policy, reward_model).items()), iteration, step, gamma
        )

    evaluate(0)
    step = 0
    gamma = 0.0 if method == "zopro" else None  # ZOPrO's first iteration explores without a previous update
    sketch(0, gamma)
    for iteration, end in enumerate(ends):
        if method == "zopro":  # what mu and vhat are formed from: the trained tensors and their counterparts alone
            policy_start = {n: p.detach().clone() for n, p in _trainable_named(policy)}
            rm_start = {n: p.detach().clone() for n, p in _reward_counterparts(policy, reward_model).items()}
        while step < end:
            rows = torch.randint(0, len(train_prompts), (config.prompts_per_step,), generator=g).tolist()
            closure, _ = _policy_objective(
                policy, reference, reward_model, tokenizer, [train_prompts[r] for r in rows], config, seed=step
            )
            if zo:
                optimizer.step(closure)
            else:
                policy.zero_grad(set_to_none=True)
                closure().backward()
                optimizer.step()
            step += 1
            if (step * forwards_per_step) // config.eval_every > ((step - 1) * forwards_per_step) // config.eval_every:
                evaluate(step)
        # Refine the reward model on judged pairs of the policy's own responses.
        rows = torch.randint(0, len(train_prompts), (config.prompts_per_step * 2,), generator=g).tolist()
        pairs = _judged_pairs(policy, tokenizer, [train_prompts[r] for r in rows], judge, config, seed=10_000 + step)
        if pairs:
            train_reward_model(reward_model, tokenizer, pairs, steps=config.rm_steps, batch=len(pairs), seed=step)
        sketch(iteration + 1, gamma)  # gamma: the weight of the previous update during this iteration
        if method == "zopro":
            direction = _zopro_direction(policy, policy_start, reward_model, rm_start, config, iteration, iterations)
            optimizer.set_direction(direction)
            gamma = direction.gamma
    if not records or records[-1]["step"] != step:
        evaluate(step)
    return records


def _zopro_direction(policy, policy_start, reward_model, rm_start, config, iteration, iterations) -> ZOPrODirection:
    """mu = the policy's update over the iteration; vhat = the reward model's refinement on the tensor of the same
    name (the score head has none); gamma decays linearly from gamma0 to 0 over the run. Formed in the copies taken
    at the iteration's start, which they replace (no third copy)."""
    counterparts = _reward_counterparts(policy, reward_model)
    mu, vhat = [], []
    for name, p in _trainable_named(policy):
        mu.append(policy_start.pop(name).neg_().add_(p.detach()))
        mapped = counterparts.get(name)
        vhat.append(None if mapped is None else rm_start.pop(name).neg_().add_(mapped.detach()))
    gamma = config.gamma0 * max(0.0, 1.0 - (iteration + 1) / iterations)
    return ZOPrODirection(mu, vhat, gamma)
