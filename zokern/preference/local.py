"""A local Hugging Face model as the loop's policy and reward model (``zokern demo --model PATH``): nothing is
downloaded, the directory must hold the model's weights and its tokenizer (``save_pretrained`` output)."""

from __future__ import annotations

import numbers
from collections.abc import Iterable
from pathlib import Path

import torch

from zokern.preference.data import text_ids
from zokern.preference.models import check_vocabulary
from zokern.preference.models import seeded_global_rng


class HFTokenizer:
    """A Hugging Face tokenizer behind the interface the loop uses (zokern.preference.data.WordTokenizer's):
    ``encode`` without special tokens, ``decode`` up to the first end-of-sequence, and the pad/bos/eos ids (pad and
    bos fall back to eos, as for GPT-2-style tokenizers that have neither)."""

    def __init__(self, tokenizer) -> None:
        if tokenizer.eos_token_id is None:
            raise ValueError("the tokenizer has no end-of-sequence token; the loop needs one to end responses")
        self.tokenizer = tokenizer
        self.eos_id = tokenizer.eos_token_id
        self.bos_id = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else self.eos_id
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_id

    def __len__(self) -> int:
        return len(self.tokenizer)

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def decode(self, ids: Iterable[int]) -> str:
        kept = text_ids(ids, self.eos_id, (self.pad_id, self.bos_id))
        return self.tokenizer.decode(kept, skip_special_tokens=True).strip()


def loop_tokenizer(tokenizer):
    """The tokenizer as the loop and ZO-DPO use it: a Hugging Face tokenizer wrapped in :class:`HFTokenizer`; one
    with that interface already (``WordTokenizer``, ``HFTokenizer``) as it is; anything else refused by name."""
    if all(callable(getattr(tokenizer, name, None)) for name in ("encode", "decode")) and all(
        hasattr(tokenizer, name) for name in ("bos_id", "eos_id", "pad_id")
    ):
        for name in ("bos_id", "eos_id", "pad_id"):  # (a sentencepiece processor's bos_id is a method)
            value = getattr(tokenizer, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                raise TypeError(f"the tokenizer's {name} must be an integer token id, got {value!r}")
        return tokenizer
    if hasattr(tokenizer, "eos_token_id") and hasattr(tokenizer, "get_vocab"):  # transformers' tokenizers
        return HFTokenizer(tokenizer)
    raise TypeError(
        f"tokenizer must be a Hugging Face tokenizer or have zokern.preference.data.WordTokenizer's interface "
        f"(encode, decode, bos_id, eos_id, pad_id), got {type(tokenizer).__name__}"
    )


def load_local(
    path: Path, device: torch.device | str = "cpu", seed: int = 0
) -> tuple[torch.nn.Module, torch.nn.Module, HFTokenizer]:
    """(policy, reward model, tokenizer) from a local directory: the causal LM as the policy (float32, eval mode) and
    the same weights with a fresh one-output sequence-classification head (initialised from ``seed``) as the reward
    model, to be trained on the preference pairs first."""
    import transformers

    path = Path(path)
    if not path.is_dir():
        what = "a file, not a directory" if path.exists() else "no such directory"
        raise FileNotFoundError(f"--model {path}: {what} (a local save_pretrained directory is expected)")
    from safetensors import SafetensorError  # (a dependency of transformers)

    unloadable = (OSError, ValueError, KeyError, SafetensorError)  # SafetensorError: a damaged weights file
    try:
        tokenizer = HFTokenizer(transformers.AutoTokenizer.from_pretrained(path))
        policy = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    except unloadable as e:
        raise ValueError(f"--model {path}: cannot load a causal LM and its tokenizer from it ({e})") from None
    check_tokenizer(path, tokenizer, policy)  # before the second copy of the weights loads
    check_causal(path, policy)
    try:
        transformers.logging.set_verbosity_error()  # the fresh score head is expected: no warning about it
        with seeded_global_rng(seed):  # the head's initial weights, drawn on the CPU
            reward_model = transformers.AutoModelForSequenceClassification.from_pretrained(
                path, num_labels=1, dtype=torch.float32
            )
    except unloadable as e:
        raise ValueError(f"--model {path}: cannot load a sequence classifier from it ({e})") from None
    finally:
        transformers.logging.set_verbosity_warning()
    reward_model.config.pad_token_id = tokenizer.pad_id
    policy.config.pad_token_id = tokenizer.pad_id
    return policy.to(device).eval(), reward_model.to(device).eval(), tokenizer


SAMPLE_TEXT = "the movie was great"


@torch.no_grad()
def check_causal(path: Path, policy: torch.nn.Module) -> None:
    """The policy generates token by token, so its first position's logits must not depend on the tokens after it:
    an encoder loaded with a language-model head (a saved BertModel) passed the loading and failed in sampling, after
    the reward model's training, with a shape error."""
    vocabulary = policy.get_input_embeddings().num_embeddings
    ids = torch.tensor([[1 % vocabulary, 2 % vocabulary], [1 % vocabulary, 3 % vocabulary]])
    first = policy(input_ids=ids, use_cache=False).logits[:, 0].float()
    if not torch.allclose(first[0], first[1], rtol=1e-4, atol=1e-5):
        raise ValueError(
            f"--model {path}: not a causal language model (its first position's output depends on the tokens after "
            f"it: {type(policy).__name__}); a decoder-only model (GPT-2, Llama, OPT, ...) is expected"
        )


def check_tokenizer(path: Path, tokenizer: HFTokenizer, policy: torch.nn.Module) -> None:
    """A directory without tokenizer files still loads one (an empty GPT-2 tokenizer that encodes every text to
    nothing), and a tokenizer of another model emits ids past the embedding: refuse both here, naming the directory,
    rather than train on empty responses or fail inside torch's embedding."""
    ids = tokenizer.encode(SAMPLE_TEXT)
    if len(tokenizer) <= 1 or not ids:
        raise ValueError(
            f"--model {path}: no usable tokenizer ({len(tokenizer)} token(s); {SAMPLE_TEXT!r} encodes to {ids}); "
            f"the directory must hold the tokenizer's files (tokenizer.save_pretrained)"
        )
    try:
        check_vocabulary(tokenizer, policy, "model")
    except ValueError as e:
        raise ValueError(f"--model {path}: {e}") from None
