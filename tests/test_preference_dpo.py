"""Offline ZO-DPO's batches: prompts cut from the left to the policy's positions, responses to their stated length
(with one warning that counts both), and the reference and evaluation passes in chunks that give the one-forward
result."""

from __future__ import annotations

import copy
import re
import warnings

import pytest
import torch

pytest.importorskip("transformers")

from zokern.preference.data import WordTokenizer  # noqa: E402
from zokern.preference.dpo import pair_batch  # noqa: E402
from zokern.preference.dpo import reference_logprobs  # noqa: E402
from zokern.preference.dpo import sequence_logprobs  # noqa: E402
from zokern.preference.dpo import train_zo_dpo  # noqa: E402
from zokern.preference.models import new_policy  # noqa: E402

WORDS = "the movie was great fun and sad , i think book felt lovely awful ."
TOK = WordTokenizer.build([WORDS])


def _policy():
    """The dpo command's policy architecture (64 positions), small."""
    return new_policy(TOK, hidden=16, layers=1, heads=2).eval()


def _pairs(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    words = WORDS.split()

    def text(lo, hi):
        length = int(torch.randint(lo, hi, (1,), generator=g))
        return " ".join(words[int(i)] for i in torch.randint(0, len(words), (length,), generator=g))

    return [{"prompt": text(2, 12), "chosen": text(1, 10), "rejected": text(1, 10)} for _ in range(n)]


def test_a_long_prompt_is_cut_from_the_left_to_fit_the_positions():
    """64 positions, 16 for the response, 1 for <bos>: a prompt keeps its last 47 tokens (it crashed past 47)."""
    policy = _policy()
    prompt = " ".join(["the movie was great"] * 25)  # 100 tokens
    kept = " ".join(prompt.split()[-47:])
    with torch.no_grad():
        got = sequence_logprobs(policy, TOK, [prompt, "the movie was"], ["great fun .", "sad ."])
        expected = sequence_logprobs(policy, TOK, [kept, "the movie was"], ["great fun .", "sad ."])
    assert torch.allclose(got, expected, atol=1e-5)
    sequences, attention, _ = pair_batch(TOK, [prompt], ["fun"], response_length=16, prompt_tokens=47)
    assert sequences.shape == (1, 64) and sequences[0, 0] == TOK.bos_id
    assert sequences[0, 1:48].tolist() == TOK.encode(kept)


def test_truncation_is_warned_once_with_counts():
    pairs = _pairs(12)
    pairs[0]["prompt"] = " ".join(["the movie was"] * 20)  # 60 tokens > 47
    pairs[5]["prompt"] = " ".join(["i think"] * 30)
    pairs[3]["chosen"] = " ".join(["great fun"] * 8)  # 16 tokens + <eos> > 16
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train_zo_dpo(_policy(), TOK, pairs[:9], pairs[9:], steps=2, batch=4, eval_every=2)
    messages = [str(w.message) for w in caught if "ZO-DPO truncates" in str(w.message)]
    assert len(messages) == 1, messages
    assert "2 of 12 prompts" in messages[0] and "1 of 24 responses (to 16 tokens" in messages[0]


def test_a_response_length_the_positions_cannot_hold_is_a_clear_error():
    with pytest.raises(ValueError, match=r"a response of 63 tokens leaves no room for a prompt in the model's 64"):
        train_zo_dpo(_policy(), TOK, _pairs(4), _pairs(2), steps=1, response_length=63)


def _batch_sizes(model):
    sizes = []
    handle = model.register_forward_pre_hook(lambda m, args, kwargs: sizes.append(kwargs["input_ids"].shape[0]),
                                             with_kwargs=True)  # fmt: skip
    return sizes, handle


def test_reference_logprobs_in_chunks_match_one_forward():
    policy, pairs = _policy(), _pairs(70)
    sizes, handle = _batch_sizes(policy)
    chunked = reference_logprobs(policy, TOK, pairs)  # the default chunk, 64 pairs
    assert max(sizes) == 64 and len(sizes) == 4  # (64 + 6 pairs) x (chosen, rejected)
    sizes.clear()
    small = reference_logprobs(policy, TOK, pairs, chunk=8)
    assert max(sizes) == 8
    sizes.clear()
    whole = reference_logprobs(policy, TOK, pairs, chunk=len(pairs))
    handle.remove()
    assert sizes == [70, 70]
    assert chunked.shape == (70, 2)
    assert torch.allclose(chunked, whole, atol=1e-5) and torch.allclose(small, whole, atol=1e-5)


def test_training_evaluates_in_chunks_with_the_one_forward_results():
    pairs = _pairs(40, seed=1)
    start = _policy()
    for name, p in start.named_parameters():
        p.requires_grad_("embed_tokens" in name)
    policy = copy.deepcopy(start)
    sizes, handle = _batch_sizes(policy)
    chunked = train_zo_dpo(policy, TOK, pairs[:30], pairs[30:], steps=2, batch=4, eval_every=1, chunk=3)
    handle.remove()
    whole = train_zo_dpo(copy.deepcopy(start), TOK, pairs[:30], pairs[30:], steps=2, batch=4, eval_every=1, chunk=100)
    assert max(sizes) == 4  # the training step's batch; the reference and evaluation passes took 3 pairs at a time
    assert sizes.count(3) > 0 and 10 not in sizes and 30 not in sizes
    for a, b in zip(chunked, whole):
        assert a["step"] == b["step"] and a["accuracy"] == b["accuracy"]
        assert a["dpo_loss"] == pytest.approx(b["dpo_loss"], abs=1e-6)


def test_a_datasets_dataset_of_pairs_trains_as_its_rows_do():
    datasets = pytest.importorskip("datasets")
    pairs = _pairs(12)
    start = _policy()
    from_rows = train_zo_dpo(copy.deepcopy(start), TOK, pairs[:9], pairs[9:], steps=2, batch=4, eval_every=1)
    from_dataset = train_zo_dpo(
        copy.deepcopy(start),
        TOK,
        datasets.Dataset.from_list(pairs[:9]),
        datasets.Dataset.from_list(pairs[9:]),
        steps=2,
        batch=4,
        eval_every=1,
    )
    assert from_dataset == from_rows


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(train_pairs=[("a", "b", "c")] * 3), r"train_pairs\[0\] is a tuple, not a pair"),
        (dict(eval_pairs=[{"prompt": "the", "chosen": "fun"}]), r"eval_pairs\[0\] has an empty, missing .* 'rejected'"),
        (dict(eval_pairs=[{"prompt": "the", "chosen": "", "rejected": "sad"}]), r"eval_pairs\[0\] .* 'chosen': ''"),
        (dict(eval_pairs=3), r"eval_pairs must be a sequence of pairs"),
        (dict(batch=0), r"batch must be an integer >= 1, got 0"),
        (dict(eval_every=0), r"eval_every must be an integer >= 1, got 0"),
        (dict(steps=-1), r"steps must be an integer >= 0"),
        (dict(response_length=-3), r"response_length must be a positive integer, got -3"),
        (dict(beta=0.0), r"beta: expected a finite number > 0"),
    ],
)
def test_bad_pairs_and_counts_are_refused_before_any_forward(change, message):
    policy = _policy()
    sizes, handle = _batch_sizes(policy)
    arguments = {**dict(train_pairs=_pairs(6), eval_pairs=_pairs(3), steps=1, batch=2, eval_every=1), **change}
    with pytest.raises(ValueError, match=message):
        train_zo_dpo(policy, TOK, **arguments)
    handle.remove()
    assert sizes == []


def test_pairs_with_the_same_responses_are_counted_in_a_warning():
    # The same as the policy sees them: after the tokenizer (which lowercases) and the cut to the response length.
    pairs = _pairs(6)
    pairs[2] = dict(pairs[2], rejected=pairs[2]["chosen"])
    pairs[4] = dict(pairs[4], chosen="The movie was GREAT", rejected="the movie was great")
    long = " ".join(["the"] * 20)
    pairs[5] = dict(pairs[5], chosen=f"{long} fun", rejected=f"{long} sad")  # the same first 16 tokens
    with pytest.warns(UserWarning) as caught:
        train_zo_dpo(_policy(), TOK, pairs, _pairs(3, seed=1), steps=0)
    messages = [str(w.message) for w in caught]
    tie = r"train_pairs: 3 of 6 pairs \(the first: train_pairs\[2\]\) have the same chosen and rejected response once"
    assert any(re.match(tie, m) for m in messages), messages
    assert not any("eval_pairs" in m for m in messages)


class _Normalising(WordTokenizer):
    """A tokenizer whose normalisation drops a text entirely (a BERT-style one drops zero-width spaces)."""

    def encode(self, text):
        return [] if text == "\u200b" else super().encode(text)


def test_responses_that_encode_to_no_token_are_counted_in_a_warning():
    pairs = _pairs(6)
    pairs[1] = dict(pairs[1], chosen="\u200b")
    with pytest.warns(UserWarning, match=r"train_pairs: 1 of 12 responses encode to no token"):
        train_zo_dpo(_policy(), _Normalising(TOK.vocabulary), pairs, _pairs(3, seed=1), steps=0)


@pytest.mark.filterwarnings("ignore:ZO-DPO truncates")
def test_a_hugging_face_tokenizer_is_taken_as_the_loop_takes_it():
    """The natural call with one's own model passes its own tokenizer: it is wrapped, and trains as the wrapped one;
    an object with neither interface is refused by name."""
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer
    from tokenizers import models as token_models
    from tokenizers import pre_tokenizers

    from zokern.preference.local import HFTokenizer

    vocabulary = {word: k for k, word in enumerate(["<eos>", *sorted(set(WORDS.split()))])}
    backend = Tokenizer(token_models.WordLevel(vocabulary, unk_token="<eos>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    hf = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>")
    config = transformers.GPT2Config(vocab_size=len(hf), n_embd=16, n_layer=1, n_head=2, n_positions=32)
    results = []
    for tokenizer in (hf, HFTokenizer(hf)):
        torch.manual_seed(0)
        policy = transformers.GPT2LMHeadModel(config).eval()
        arguments = dict(steps=2, batch=2, eval_every=1, response_length=4, seed=0)
        results.append(train_zo_dpo(policy, tokenizer, _pairs(6), _pairs(3, seed=1), **arguments))
    assert results[0] == results[1]
    with pytest.raises(TypeError, match=r"tokenizer must be a Hugging Face tokenizer .* got dict"):
        train_zo_dpo(_policy(), {}, _pairs(6), _pairs(3), steps=0)

    class SentencePieceLike:  # its ids are methods, not the loop's integers
        def encode(self, text):
            return [3]

        def decode(self, ids):
            return ""

        def bos_id(self):
            return 1

        eos_id = pad_id = bos_id

    with pytest.raises(TypeError, match=r"the tokenizer's bos_id must be an integer token id, got <bound method"):
        train_zo_dpo(_policy(), SentencePieceLike(), _pairs(6), _pairs(3), steps=0)


def test_no_copy_of_the_policy_is_kept_while_training(monkeypatch):
    """The reference is the starting policy's log-probabilities, computed before the first step: a copy of the
    model held for the whole run would double its weights' memory."""
    import zokern.preference.dpo as dpo

    copied = []
    real = copy.deepcopy
    monkeypatch.setattr(copy, "deepcopy", lambda x, *a: copied.append(isinstance(x, torch.nn.Module)) or real(x, *a))
    pairs = _pairs(12)
    records = dpo.train_zo_dpo(_policy(), TOK, pairs[:9], pairs[9:], steps=2, batch=4, eval_every=1)
    assert not any(copied) and records[0]["dpo_loss"] == pytest.approx(0.6931472, abs=1e-6)
