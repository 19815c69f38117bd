"""The demo's models: a small causal-LM policy pretrained here on the generated corpus, rollouts from it, and a
reward model (a sequence scorer on the same architecture) trained with the Bradley-Terry loss.

Sequences are ``[prompt | response]`` with prompts left-padded to a common length (the conventions of
zokern.preference.losses); the tokenizer is zokern.preference.data.WordTokenizer.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from zokern.preference.data import WordTokenizer
from zokern.preference.losses import bradley_terry_loss
from zokern.preference.positions import cache_kwargs
from zokern.preference.positions import innermost
from zokern.preference.positions import max_positions
from zokern.preference.positions import position_kwargs
from zokern.preference.positions import prompt_budget
from zokern.preference.positions import returned_cache


def policy_config(vocab_size: int, hidden: int = 64, layers: int = 2, heads: int = 4, max_positions: int = 64):
    import transformers

    return transformers.OPTConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        num_hidden_layers=layers,
        ffn_dim=4 * hidden,
        num_attention_heads=heads,
        word_embed_proj_dim=hidden,
        max_position_embeddings=max_positions,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        dropout=0.0,
        attention_dropout=0.0,
    )


def new_policy(tokenizer: WordTokenizer, seed: int = 0, **config) -> torch.nn.Module:
    import transformers

    torch.manual_seed(seed)
    return transformers.OPTForCausalLM(policy_config(len(tokenizer), **config))


def new_reward_model(tokenizer: WordTokenizer, seed: int = 0, **config) -> torch.nn.Module:
    import transformers

    torch.manual_seed(seed)
    cfg = policy_config(len(tokenizer), **config)
    cfg.num_labels = 1
    return transformers.OPTForSequenceClassification(cfg)


def check_vocabulary(tokenizer, model: torch.nn.Module, name: str) -> None:
    """Refuse a tokenizer whose ids reach past ``model``'s input embedding (``name``: the model, for the message),
    which would fail inside torch's embedding at its first forward."""
    try:
        embeddings = getattr(model, "get_input_embeddings", lambda: None)()
    except (NotImplementedError, AttributeError):  # transformers' default, for a model it cannot find it in
        embeddings = None
    rows = getattr(embeddings, "num_embeddings", None)
    if rows is None:  # a model of one's own without the accessor: nothing to compare
        return
    size = len(tokenizer) if hasattr(tokenizer, "__len__") else 0
    top = max(size - 1, tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id)
    if top >= rows:
        raise ValueError(
            f"the tokenizer's ids reach {top} but the {name}'s input embedding has {rows} rows: the tokenizer does "
            "not belong to this model"
        )


def check_reward_padding(reward_model: torch.nn.Module, tokenizer) -> None:
    """Refuse a transformers sequence classifier that takes another token than the tokenizer's padding for padding:
    it scores a row's last token that is not ``config.pad_token_id``, so rows shorter than their batch would be
    scored on padding (a row's score would depend on the rows beside it)."""
    if not type(innermost(reward_model)).__name__.endswith("ForSequenceClassification"):
        return  # a scorer of one's own, which may pool otherwise (by the attention mask)
    config = getattr(reward_model, "config", None)
    if config is None or not hasattr(config, "pad_token_id"):
        return
    if config.pad_token_id != tokenizer.pad_id:
        raise ValueError(
            f"the reward model's config.pad_token_id is {config.pad_token_id} but the tokenizer pads with "
            f"{tokenizer.pad_id}: the model scores each row's last token that is not its pad id, so rows would be "
            f"scored on padding. Set reward_model.config.pad_token_id = {tokenizer.pad_id}"
        )


def batch_texts(
    tokenizer: WordTokenizer, texts: Sequence[str], max_length: int, device: torch.device | str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``<bos> text <eos>`` per text, left-padded to one length: (ids, mask). A text longer than ``max_length``
    positions is cut from the left, keeping its <bos>."""
    if max_length < 3:
        raise ValueError(f"max_length={max_length} leaves no room for a token between <bos> and <eos>")
    encoded = [[tokenizer.bos_id, *tokenizer.encode(t)[-(max_length - 2) :], tokenizer.eos_id] for t in texts]
    width = max(len(e) for e in encoded)
    ids = torch.full((len(texts), width), tokenizer.pad_id, dtype=torch.long)
    mask = torch.zeros((len(texts), width), dtype=torch.long)
    for k, e in enumerate(encoded):
        ids[k, width - len(e) :] = torch.tensor(e)
        mask[k, width - len(e) :] = 1
    return ids.to(device), mask.to(device)


def model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def pretrain(
    policy: torch.nn.Module,
    tokenizer: WordTokenizer,
    texts: Sequence[str],
    steps: int = 300,
    batch: int = 32,
    lr: float = 3e-3,
    seed: int = 0,
    max_length: int = 32,
) -> list[float]:
    """Fit the policy to the corpus with AdamW (next-token loss, padding ignored); returns the loss per step."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(policy.parameters(), lr=lr, weight_decay=0.0)
    policy.train()
    losses = []
    for _ in range(steps):
        rows = torch.randint(0, len(texts), (batch,), generator=g).tolist()
        ids, mask = batch_texts(tokenizer, [texts[r] for r in rows], max_length, model_device(policy))
        labels = ids.masked_fill(mask == 0, -100)
        # No explicit position ids here: pretraining is for the policies built here (OPT), which derive them from the
        # mask with padding at -1, and this loss reads one padding output (the one that predicts <bos>): ids clamped
        # to 0 would change the demo's pretrained policy. Every other forward passes them (positions.py).
        loss = policy(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    policy.eval()
    return losses


# Positions for <bos>, a prompt and its <eos> (dropped before the response): prompts keep at most 254 tokens, cut
# from the left (a local model's context is longer).
PROMPT_TOKENS = 256


@dataclass
class Rollouts:
    """k responses per prompt: ``sequences`` [P*k, prompt_len + R] (prompt rows repeated k times, consecutive),
    ``attention_mask`` likewise, ``response_mask`` [P*k, R] (1 up to and including the first <eos>)."""

    sequences: torch.Tensor
    attention_mask: torch.Tensor
    response_mask: torch.Tensor
    response_length: int
    k: int

    def responses(self, tokenizer: WordTokenizer) -> list[str]:
        return [tokenizer.decode(row.tolist()) for row in self.sequences[:, -self.response_length :]]


@torch.no_grad()
def sample(
    policy: torch.nn.Module,
    tokenizer: WordTokenizer,
    prompts: Sequence[str],
    k: int,
    response_length: int = 12,
    temperature: float = 1.0,
    seed: int = 0,
) -> Rollouts:
    """k sampled continuations of each prompt (multinomial, no top-k/top-p), ``response_length`` tokens each; the
    tokens after a response's first <eos> are padding and masked out."""
    budget = prompt_budget(policy, response_length)  # <bos> + prompt fit before the response, or a ValueError
    # batch_texts' length counts <bos> and the prompt's <eos> (dropped below) too.
    max_length = PROMPT_TOKENS if budget is None else min(budget + 2, PROMPT_TOKENS)
    ids, mask = batch_texts(tokenizer, prompts, max_length, model_device(policy))
    ids, mask = ids[:, :-1], mask[:, :-1]  # drop each prompt's <eos>: the response continues it
    ids, mask = ids.repeat_interleave(k, 0), mask.repeat_interleave(k, 0)
    g = torch.Generator(device=ids.device).manual_seed(seed)
    done = torch.zeros(len(ids), dtype=torch.bool, device=ids.device)
    response = torch.full((len(ids), response_length), tokenizer.pad_id, dtype=torch.long, device=ids.device)
    past, step_ids, step_mask = None, ids, mask
    for t in range(response_length):
        # The prompts' positions from their masks, then each new token's: mask.sum(-1) - 1, its mask included.
        positions = position_kwargs(policy, step_mask, new=None if past is None else 1)
        out = policy(input_ids=step_ids, attention_mask=step_mask, **cache_kwargs(policy, past), **positions)
        past = returned_cache(out)
        probs = torch.softmax(out.logits[:, -1].float() / temperature, dim=-1)
        token = torch.multinomial(probs, 1, generator=g).squeeze(1)
        token = torch.where(done, torch.full_like(token, tokenizer.pad_id), token)
        response[:, t] = token
        done |= token == tokenizer.eos_id
        step_ids = token[:, None]
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        step_mask = mask
    # 1 up to and including the first <eos>, 0 after it.
    after_eos = (response == tokenizer.eos_id).long().cumsum(1) - (response == tokenizer.eos_id).long()
    response_mask = (after_eos == 0).float()
    sequences = torch.cat([ids, response], dim=1)
    attention = torch.cat([mask[:, : ids.shape[1]], response_mask.long()], dim=1)
    return Rollouts(sequences, attention, response_mask, response_length, k)


def reward_scores(reward_model: torch.nn.Module, sequences: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The reward model's score of each sequence (float32): its head on the last non-padding token, with positions
    from the attention mask (a left-padded row scores as it would alone)."""
    positions = position_kwargs(reward_model, attention_mask)
    return reward_model(input_ids=sequences, attention_mask=attention_mask, **positions).logits[:, 0].float()


def train_reward_model(
    reward_model: torch.nn.Module,
    tokenizer: WordTokenizer,
    pairs: Sequence[dict],
    steps: int = 200,
    batch: int = 32,
    lr: float = 1e-3,
    seed: int = 0,
    max_length: int = 48,
) -> list[float]:
    """First-order Bradley-Terry training on (prompt, chosen, rejected) pairs; returns the loss per step. Texts are
    cut from the left to ``max_length`` positions, and to the model's position table."""
    if not pairs:
        raise ValueError("no preference pairs to train the reward model on")
    check_vocabulary(tokenizer, reward_model, "reward model")
    check_reward_padding(reward_model, tokenizer)
    table = max_positions(reward_model)
    max_length = max_length if table is None else min(max_length, table)
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(reward_model.parameters(), lr=lr)
    reward_model.train()
    losses = []
    with seeded_global_rng(seed, model_device(reward_model)):  # the model's dropout draws from it
        for _ in range(steps):
            rows = [pairs[r] for r in torch.randint(0, len(pairs), (batch,), generator=g).tolist()]
            texts = [f"{r['prompt']} {r['chosen']}" for r in rows] + [f"{r['prompt']} {r['rejected']}" for r in rows]
            ids, mask = batch_texts(tokenizer, texts, max_length, model_device(reward_model))
            scores = reward_scores(reward_model, ids, mask)
            loss = bradley_terry_loss(scores[:batch], scores[batch:])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
    reward_model.eval()
    return losses


@contextlib.contextmanager
def seeded_global_rng(seed: int, device: torch.device | str = "cpu") -> Iterator[None]:
    """torch's global generators seeded with ``seed`` for the block, then given back as they were: what draws from
    them (dropout, a layer's fresh weights) repeats with the seed, whatever the caller's own use of them."""
    device = torch.device(device)
    cuda = device.type == "cuda"
    # The CPU's generator, and the device's where the model is on a GPU: torch.manual_seed would seed every GPU's,
    # which fork_rng gives back only for the devices it is told of.
    with torch.random.fork_rng(devices=[device] if cuda else []):
        torch.default_generator.manual_seed(seed)
        if cuda:
            with torch.cuda.device(device):
                torch.cuda.manual_seed(seed)
        yield
