"""Left padding does not move a row's positions: its log-probabilities, reward score and sampled response are what
they would be alone, for GPT-2 (absolute positions that transformers 5 does not derive from the attention mask) and
for the demo's OPT policy (which does); OPT's samples are those it drew before position ids were passed."""

from __future__ import annotations

import pytest
import torch
from helpers import tiny_gpt2

pytest.importorskip("transformers")

from zokern.preference.data import WordTokenizer  # noqa: E402
from zokern.preference.losses import response_logprobs  # noqa: E402
from zokern.preference.models import batch_texts  # noqa: E402
from zokern.preference.models import new_policy  # noqa: E402
from zokern.preference.models import new_reward_model  # noqa: E402
from zokern.preference.models import reward_scores  # noqa: E402
from zokern.preference.models import sample  # noqa: E402

TOK = WordTokenizer.build(["the movie was great fun , i think the book at the cafe felt really sad and lovely ."])
SHORT = "the movie was"
LONG = "i think the book at the cafe felt really sad and the movie was great fun , the book was"  # 20 tokens
RESPONSE = "great , and the book was lovely ."


def _policies():
    return {"gpt2": tiny_gpt2(len(TOK)), "opt": new_policy(TOK, hidden=32, layers=1, heads=2).eval()}


def _rows(prompts):
    """[<bos> prompt | response] rows, prompts left-padded (as models.sample lays them out)."""
    ids, mask = batch_texts(TOK, prompts, 64)
    ids, mask = ids[:, :-1], mask[:, :-1]  # the prompt's <eos> dropped: the response continues it
    response = torch.tensor([TOK.encode(RESPONSE)] * len(prompts))
    return torch.cat([ids, response], 1), torch.cat([mask, torch.ones_like(response)], 1), response.shape[1]


@pytest.mark.parametrize("name", ["gpt2", "opt"])
def test_a_rows_logprobs_do_not_depend_on_its_batch(name):
    policy = _policies()[name]
    with torch.no_grad():
        alone = response_logprobs(policy, *_rows([SHORT]))[0]
        batched = response_logprobs(policy, *_rows([SHORT, LONG]))[0]  # SHORT now behind 17 pads
    assert torch.allclose(alone, batched, atol=1e-5), (alone.sum().item(), batched.sum().item())


def test_a_wrapped_policy_gets_its_models_positions():
    """A LoRA policy (PEFT) forwards **kwargs to the model it wraps: the positions must still reach it."""
    peft = pytest.importorskip("peft")
    lora = peft.LoraConfig(r=2, target_modules=["c_attn"], fan_in_fan_out=True)
    policy = peft.get_peft_model(tiny_gpt2(len(TOK)), lora)
    with torch.no_grad():
        alone = response_logprobs(policy, *_rows([SHORT]))[0]
        batched = response_logprobs(policy, *_rows([SHORT, LONG]))[0]
    assert torch.allclose(alone, batched, atol=1e-5), (alone.sum().item(), batched.sum().item())


@pytest.mark.parametrize("name", ["gpt2", "opt"])
def test_a_rows_reward_score_does_not_depend_on_its_batch(name):
    scorer = tiny_gpt2(len(TOK), classifier=True) if name == "gpt2" else new_reward_model(TOK, hidden=32).eval()
    text = f"{SHORT} {RESPONSE}"
    with torch.no_grad():
        alone = reward_scores(scorer, *batch_texts(TOK, [text], 48))[0]
        batched = reward_scores(scorer, *batch_texts(TOK, [text, f"{LONG} {RESPONSE}"], 48))[0]
    assert alone.item() == pytest.approx(batched.item(), abs=1e-5)


def test_a_rows_greedy_response_does_not_depend_on_its_batch():
    """The incremental steps (KV cache) too: each new token at position mask.sum - 1, not at the batch's width."""
    policy = tiny_gpt2(len(TOK))
    greedy = dict(k=1, response_length=10, temperature=1e-4)  # a one-hot distribution: sampling is argmax
    alone = sample(policy, TOK, [SHORT], **greedy).responses(TOK)
    batched = sample(policy, TOK, [SHORT, LONG], **greedy).responses(TOK)
    assert batched[0] == alone[0]


@pytest.mark.parametrize("name", ["gpt2", "opt"])
def test_each_cached_sampling_step_sees_the_rows_own_positions(name):
    """Every incremental step's logits, in a left-padded batch, equal those of the row alone and unpadded at the same
    token (an off-by-one in the new token's position id would not change which greedy token wins above)."""
    policy = _policies()[name]
    steps = []
    hook = policy.register_forward_hook(lambda m, a, kw, out: steps.append(out.logits[:, -1].clone()), with_kwargs=True)
    length = 6
    try:
        rollout = sample(policy, TOK, [SHORT, LONG], k=2, response_length=length, seed=3)
    finally:
        hook.remove()
    prompt_width = rollout.sequences.shape[1] - length
    for i in range(len(rollout.sequences)):
        real = rollout.sequences[i, :prompt_width][rollout.attention_mask[i, :prompt_width].bool()]
        with torch.no_grad():  # alone: the model's own positions 0..n-1, no padding, no cache
            alone = policy(input_ids=torch.cat([real, rollout.sequences[i, prompt_width:]])[None]).logits[0]
        for t in range(length):
            assert torch.allclose(steps[t][i], alone[len(real) - 1 + t], atol=1e-5), (i, t)


class _OwnPositions(torch.nn.Module):
    """A model called as before position ids were passed: its forward takes none, so none is given."""

    def __init__(self, model):
        super().__init__()
        self.model, self.config = model, model.config

    def forward(self, input_ids, attention_mask, past_key_values=None, use_cache=None, **kwargs):
        return self.model(input_ids=input_ids, attention_mask=attention_mask, past_key_values=past_key_values,
                          use_cache=use_cache, **kwargs)  # fmt: skip


def test_opt_samples_are_unchanged_by_explicit_positions():
    """OPT derived positions from the mask already: the demo's rollouts stay bit for bit what they were."""
    policy = new_policy(TOK, hidden=32, layers=1, heads=2).eval()
    prompts = [SHORT, LONG, "the book was"]
    new = sample(policy, TOK, prompts, k=3, response_length=12, seed=5)
    old = sample(_OwnPositions(policy), TOK, prompts, k=3, response_length=12, seed=5)
    assert torch.equal(new.sequences, old.sequences) and torch.equal(new.attention_mask, old.attention_mask)


def test_positions_count_real_tokens_and_refuse_a_batch_past_the_table():
    from zokern.preference.positions import position_kwargs

    policy = tiny_gpt2(len(TOK), positions=8)
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    assert position_kwargs(policy, mask)["position_ids"].tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 3, 4]]
    assert position_kwargs(policy, mask, new=1)["position_ids"].tolist() == [[2], [4]]
    with pytest.raises(ValueError, match=r"9 positions exceeds the model's 8"):
        response_logprobs(policy, torch.ones(1, 9, dtype=torch.long), torch.ones(1, 9, dtype=torch.long), 2)


def test_sampling_passes_the_kv_cache_under_the_name_the_model_takes():
    """transformers 5.24 renamed past_key_values to cache (the old name warns, and goes in 5.40): sampling uses the
    name the model's forward takes, so it warns on no version; a model taking past_key_values still gets its cache."""
    import warnings

    policy = new_policy(TOK, hidden=32, layers=1, heads=2).eval()
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*past_key_values.*")
        new = sample(policy, TOK, [SHORT, LONG], k=2, response_length=6, seed=1)
    old = sample(_OwnPositions(policy), TOK, [SHORT, LONG], k=2, response_length=6, seed=1)
    assert torch.equal(new.sequences, old.sequences)
