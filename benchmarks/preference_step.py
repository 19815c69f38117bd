"""Time and peak memory of one policy step of the preference loop, ZO against first-order RLOO, at a given size:

    python -m benchmarks.preference_step --size opt-1.3b          (GPU: the issue's 1B-parameter configuration)
    python -m benchmarks.preference_step --size tiny --device cpu  (CPU smoke)

The policy, its frozen reference and the reward model are OPT models built from the size's config with random
weights (float32, every parameter trainable) over the demo's word vocabulary; rollouts are k = 4 sampled responses of
12 tokens to each of 8 demo prompts, scored by the reward model, with RLOO advantages and the KL penalty, exactly as
zokern.preference.loop prepares them. Timed, after the rollouts: the ZO step (ZOSGD in place: two forwards of the
PPO-clip surrogate), the ZOPrO step (its structured direction, with mu and vhat set), and the first-order step
(forward, backward, Adam). Peak memory is CUDA's allocator peak during the step, above the models' weights.
Prints a Markdown table and appends it to benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

import zokern
from benchmarks import _device
from benchmarks._results import publish
from zokern.optim import ZOSGD
from zokern.preference.data import WordTokenizer
from zokern.preference.data import make_demo_data
from zokern.preference.directions import ZOPrODirection
from zokern.preference.loop import LoopConfig
from zokern.preference.loop import _policy_objective
from zokern.preference.optim import ZOPrO

# name: (hidden, layers, heads)
SIZES = {"tiny": (64, 2, 4), "opt-125m": (768, 12, 12), "opt-1.3b": (2048, 24, 32)}


def build(size: str, vocabulary: int, device: torch.device):
    import transformers

    hidden, layers, heads = SIZES[size]
    config = transformers.OPTConfig(
        vocab_size=vocabulary, hidden_size=hidden, num_hidden_layers=layers, ffn_dim=4 * hidden,
        num_attention_heads=heads, word_embed_proj_dim=hidden, max_position_embeddings=128, pad_token_id=0,
        bos_token_id=1, eos_token_id=2, dropout=0.0, attention_dropout=0.0,
    )  # fmt: skip
    torch.manual_seed(0)
    with torch.device(device):  # initialised where they run: 1.3B weights drawn on a CPU take tens of seconds
        policy = transformers.OPTForCausalLM(config).eval()
        config.num_labels = 1
        reward_model = transformers.OPTForSequenceClassification(config).eval()
    return policy, copy.deepcopy(policy), reward_model


def timed(fn, device: torch.device, steps: int, weights: int) -> tuple[float, float | None]:
    """(median ms, peak GiB above ``weights`` bytes, the models' memory before any method ran; None on the CPU). Not
    above the memory in use before the step: that holds the method's own states (Adam's moments, ZOPrO's mu and
    vhat, last step's gradients), which the comparison is about."""
    fn()  # warm-up
    times, peak = [], None
    for _ in range(steps):
        _device.reset_peak(device)
        begin = time.perf_counter()
        fn()
        _device.synchronize(device)
        if _device.is_cuda(device):
            peak = max(peak or 0.0, (_device.peak_bytes(device) - weights) / 2**30)
        times.append((time.perf_counter() - begin) * 1e3)
    return statistics.median(times), peak


def _zo_step(params, closure, device, steps, weights):
    optimizer = ZOSGD(params, lr=1e-7, eps=1e-3, seed=0)
    return timed(lambda: optimizer.step(closure), device, steps, weights)


def _zopro_step(params, closure, device, steps, weights):
    """ZOPrO with a previous update (mu) and a reward-model direction (vhat) on every tensor: 8 bytes per parameter,
    freed on return."""
    optimizer = ZOPrO(params, lr=1e-7, eps=1e-3, seed=0)
    g = torch.Generator(device=device).manual_seed(1)
    mu = [torch.randn(p.shape, generator=g, device=device) for p in params]
    vhat = [torch.randn(p.shape, generator=g, device=device) for p in params]
    optimizer.set_direction(ZOPrODirection(mu, vhat, 0.5))
    return timed(lambda: optimizer.step(closure), device, steps, weights)


class _NoJudge:
    """The preference pairs are not used here: no sentiment scorer (nor its package) is needed."""

    def score(self, prompt: str, response: str) -> float:
        return 0.0


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def measure(size: str, device: torch.device, steps: int, data_dir: Path, rows: list[tuple]) -> int:
    """Append a row (step, ms, peak GiB) to ``rows`` per measurement, as it is made; returns the parameter count.
    Only the demo's texts and prompts are read (plain JSON lines: the GPU machine has no ``datasets``)."""
    make_demo_data(data_dir, seed=0, prompts=50, corpus=200, judge=_NoJudge())
    texts = [r["text"] for r in _jsonl(data_dir / "corpus.jsonl")]
    prompts = [r["prompt"] for r in _jsonl(data_dir / "prompts.jsonl")][:8]
    tokenizer = WordTokenizer.build(texts)
    policy, reference, reward_model = build(size, len(tokenizer), device)
    n_params = sum(p.numel() for p in policy.parameters())
    weights = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    config = LoopConfig(k=4, response_length=12)
    begin = time.perf_counter()
    closure, _ = _policy_objective(policy, reference, reward_model, tokenizer, prompts, config, seed=0)
    _device.synchronize(device)
    rows.append(("rollouts + scoring (once per step, every method; first call)", (time.perf_counter() - begin) * 1e3))
    params = list(policy.parameters())
    rows.append(("ZO step (ZOSGD, 2 forwards)", *_zo_step(params, closure, device, steps, weights)))
    rows.append(
        ("ZOPrO step (structured direction, 2 forwards)", *_zopro_step(params, closure, device, steps, weights))
    )
    adam = torch.optim.Adam(params, lr=1e-7)

    def first_order():
        policy.zero_grad(set_to_none=True)
        with torch.enable_grad():
            closure().backward()
        adam.step()

    rows.append(("first-order RLOO step (forward, backward, Adam)", *timed(first_order, device, steps, weights)))
    return n_params


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=list(SIZES), default="opt-1.3b")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--data", type=Path, default=Path("/tmp/zokern-preference-step"))
    parser.add_argument("--no-append", action="store_true")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    rows = _Rows()
    try:
        rows.n_params = measure(args.size, device, args.steps, args.data, rows)
    finally:  # what was measured is written, also when the run is stopped at a time limit
        if rows:
            write(rows, args, argv)
    return 0


class _Rows(list):
    """Rows printed as they are appended, a row without a peak (the rollouts) given None."""

    n_params: int | None = None

    def append(self, row: tuple) -> None:
        name, ms, gib = (*row, None) if len(row) == 2 else row
        super().append((name, ms, gib))
        print(f"{name:60s} {ms:10.1f} ms" + ("" if gib is None else f"  peak {gib:.2f} GiB"), flush=True)


def write(rows: _Rows, args: argparse.Namespace, argv: list[str] | None) -> None:
    device = torch.device(args.device)
    size = "?" if rows.n_params is None else f"{rows.n_params / 1e6:.3g}M"
    name = _device.name(device)
    command = " ".join(["python -m benchmarks.preference_step", *(argv if argv is not None else sys.argv[1:])])
    text = (
        f"\n### Preference loop policy step, {args.size} ({size} parameters, float32), "
        f"{datetime.date.today()}\n\nDevice {name}, torch {torch.__version__}, Python {platform.python_version()}, "
        f"zokern {zokern.__version__}. 8 prompts x k = 4 responses of 12 tokens. Median of {args.steps} steps after "
        f"one warm-up. Command: `{command}`.\n\n"
        "| step | ms | peak GiB above the three models' weights |\n|---|---|---|\n"
        + "".join(f"| {n} | {ms:.1f} | {'-' if gib is None else f'{gib:.2f}'} |\n" for n, ms, gib in rows)
    )
    publish(text, append=not args.no_append)


if __name__ == "__main__":
    sys.exit(main())
