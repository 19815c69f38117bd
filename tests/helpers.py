"""Shared test helpers: random inputs, tolerances relative to the reference, ids, the distributed tests' ranks."""

from __future__ import annotations

from pathlib import Path

import torch

import zokern

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# Max |z_backend - z_exact| allowed for Gaussian z (docs/stream.md, section 3: 2^-17 (1 + |z|), |z| <= 4.86).
Z_ATOL = 2.0**-17 * 5.86


def backends_for(device: str = DEVICE) -> list[str]:
    """The backends that can run on ``device`` in this install (triton on the CPU only when interpreted)."""
    names = []
    for name in zokern.available_backends():
        if name == "torch" or name == device or (name == "triton" and (device == "cuda" or _interpreted())):
            names.append(name)
    return names


def _interpreted() -> bool:
    import os

    return os.environ.get("TRITON_INTERPRET") == "1"


def emulated_cuda_backend():
    """tests/cuda_emulated.py, built; a test needing it is skipped only where no C++ compiler exists and no build is
    required (CI sets ZOKERN_REQUIRE_BUILD=1, so there it must build)."""
    import os

    import cuda_emulated
    import pytest

    if cuda_emulated.compiler() is None and os.environ.get("ZOKERN_REQUIRE_BUILD") != "1":
        pytest.skip("no C++ compiler to build the CUDA emulation")
    cuda_emulated.build()
    return cuda_emulated


def count_passes(monkeypatch) -> list[int]:
    """A one-element list counting the fused calls zokern.ops makes from now on (count[0] = 0 resets it)."""
    count = [0]
    run_pass = zokern.ops._run_pass

    def counting(*args, **kwargs):
        count[0] += 1
        return run_pass(*args, **kwargs)

    monkeypatch.setattr(zokern.ops, "_run_pass", counting)
    return count


def random_params(sizes, dtype, device: str = DEVICE, seed: int = 0) -> list[torch.Tensor]:
    """Weights like a model's (rms ~0.02 around small offsets), never zeros."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in sizes:
        t = torch.randn(n, generator=g, dtype=torch.float64) * 0.02 + torch.rand(n, generator=g, dtype=torch.float64)
        out.append(t.to(dtype).to(device))
    return out


def ulp(x: torch.Tensor) -> torch.Tensor:
    """Spacing of x's dtype at |x| (the distance to the next value away from zero), as float64."""
    mag = x.detach().double().abs().clamp_min(torch.finfo(x.dtype).smallest_normal)
    return torch.exp2(torch.floor(torch.log2(mag)) - MANTISSA_BITS[x.dtype])


MANTISSA_BITS = {torch.float32: 23, torch.bfloat16: 7, torch.float16: 10}


def assert_matches_reference(out: torch.Tensor, ref: torch.Tensor, alpha_scale: float = 1.0) -> None:
    """out and ref come from the same input through two backends whose z differ by at most Z_ATOL.

    float32: within alpha_scale * Z_ATOL plus 4 ulps. 16-bit: that float32 difference can move a value across a
    rounding boundary, so each element may differ by one ulp of its dtype, and such elements must be rare.
    """
    assert out.dtype == ref.dtype and out.shape == ref.shape
    diff = (out.double() - ref.double()).abs().cpu()
    if out.dtype == torch.float32:
        tol = alpha_scale * Z_ATOL + 4 * ulp(ref).cpu()
        bad = diff > tol
        assert not bad.any(), f"{int(bad.sum())} elements off; max diff {diff.max():.3g}"
        return
    step = torch.maximum(ulp(ref), ulp(out)).cpu()
    assert (diff <= step * (1 + 1e-9) + alpha_scale * Z_ATOL).all(), f"max diff {diff.max():.3g} exceeds one ulp"
    assert (diff > 0).double().mean() < 0.02, f"{(diff > 0).double().mean():.3%} of elements differ by one ulp"


def tiny_opt(dtype: torch.dtype = torch.float32, dropout: float = 0.0):
    """An OPT causal LM built from a config (random weights, seeded): 64 tokens, 2 layers of width 32."""
    import transformers

    config = transformers.OPTConfig(
        vocab_size=64,
        hidden_size=32,
        num_hidden_layers=2,
        ffn_dim=64,
        num_attention_heads=4,
        max_position_embeddings=32,
        word_embed_proj_dim=32,
        dropout=dropout,
    )
    torch.manual_seed(0)
    return transformers.OPTForCausalLM(config).to(dtype)


def tiny_gpt2(vocab_size: int, positions: int = 64, classifier: bool = False, seed: int = 0):
    """A GPT-2 built from a config (random weights, seeded): absolute position embeddings that transformers 5 does not
    derive from the attention mask. 1 layer of width 32; a one-output sequence classifier with ``classifier``."""
    import transformers

    config = transformers.GPT2Config(
        n_layer=1, n_embd=32, n_head=2, vocab_size=vocab_size, n_positions=positions, bos_token_id=1, eos_token_id=2,
        pad_token_id=0, num_labels=1,
    )  # fmt: skip
    torch.manual_seed(seed)
    model = transformers.GPT2ForSequenceClassification(config) if classifier else transformers.GPT2LMHeadModel(config)
    return model.eval()


def save_local_model(
    directory, kind: str = "opt", embedding_rows: int | None = None, tokenizer: bool = True, positions: int = 128
):
    """A small causal LM with random weights and a word-level fast tokenizer, saved like a downloaded model
    (``save_pretrained``); ``kind`` "opt" (the demo's policy architecture) or "gpt2"; ``embedding_rows`` (default:
    the tokenizer's size) to build a model whose vocabulary does not match (``positions``: a GPT-2's position
    table); ``tokenizer=False`` saves the weights
    only; ``kind`` "bert": an encoder (BertModel), which is not causal. Returns the tokenizer (saved or not)."""
    import transformers
    from tokenizers import Tokenizer
    from tokenizers import models
    from tokenizers import pre_tokenizers

    from zokern.preference.data import WordTokenizer
    from zokern.preference.models import policy_config

    words = WordTokenizer.build(["a happy calm day , the weather was fine and sad ."])
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words.vocabulary)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>"
    )
    rows = embedding_rows or len(words)
    torch.manual_seed(0)
    if kind == "opt":
        model = transformers.OPTForCausalLM(policy_config(rows, max_positions=128))
    elif kind == "bert":
        config = transformers.BertConfig(
            vocab_size=rows, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64
        )
        model = transformers.BertModel(config)
    else:
        model = tiny_gpt2(rows, positions=positions)
    model.save_pretrained(directory)
    if tokenizer:
        fast.save_pretrained(directory)
    return fast


def fsdp2_on_cpu() -> None:
    """torch 2.6's CPU Stream lacks the record_event and wait_event that FSDP2's collectives call (no-ops from 2.7 on,
    pytorch#145935): the same no-ops, so that FSDP2 runs over gloo on the CPU. For the distributed workers."""
    if not hasattr(torch.cpu.Stream, "record_event"):
        torch.cpu.Stream.record_event = lambda self, event=None: None
        torch.cpu.Stream.wait_event = lambda self, event: None


def launch_ranks(worker, scenario: str, out, world: int = 2) -> list[dict]:
    """Run ``python worker SCENARIO OUT RANK WORLD`` as ``world`` processes (gloo ranks rendezvousing through a file in
    ``out``); each writes ``out/rank{r}.json``, returned in rank order. Fails with a rank's stderr if one fails."""
    import json
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "ZOKERN_BACKEND"}
    ranks = [
        subprocess.Popen(
            [sys.executable, str(worker), scenario, str(out), str(rank), str(world)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in range(world)
    ]
    for rank, process in enumerate(ranks):
        try:
            _, stderr = process.communicate(timeout=240)
        finally:
            for p in ranks:
                if p.poll() is None and process.returncode is None:
                    p.kill()
        assert process.returncode == 0, f"rank {rank}: {stderr[-4000:]}"
    return [json.loads((Path(out) / f"rank{r}.json").read_text()) for r in range(world)]


def join_ranks() -> tuple[str, Path, int, int]:
    """In a worker that launch_ranks started: its arguments (scenario, out directory, rank, world size), once it has
    joined the gloo process group (rendezvous through a file in the out directory)."""
    import datetime
    import sys

    import torch.distributed as dist

    scenario, out, rank, world = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    dist.init_process_group(
        "gloo",
        init_method=f"file://{out / 'rendezvous'}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=60),
    )
    return scenario, out, rank, world


def leave_ranks(out, rank: int, result: dict) -> None:
    """Write a worker's result where launch_ranks reads it, and leave the process group."""
    import json
    import os
    import sys

    import torch.distributed as dist

    (out / f"rank{rank}.json").write_text(json.dumps(result))
    dist.barrier()  # no rank tears down its connections while another still uses them
    dist.destroy_process_group()
    # Out without the interpreter's teardown: once under a loaded CI run, a rank whose result was written aborted
    # there ("terminate called without an active exception", torch's threads destroyed at exit).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
