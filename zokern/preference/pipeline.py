"""`zokern demo`: the whole preference pipeline on the CPU in a few minutes.

1. Generate the demo's data (prompts, a corpus, judged preference pairs) into the output directory.
2. Build the word tokenizer; pretrain a small policy on the corpus (first order); train the reward model on the
   pairs (Bradley-Terry, first order).
3. Run ZOPrO, the MeZO direction and first-order RLOO from that same start, for the same number of policy-loss
   forwards, each judged on held-out prompts as it goes.
4. Write ``metrics.jsonl`` (one record per evaluation: method, step, forwards, seconds, reward) and ``reward.png``
   (judged reward against policy-loss forwards and against seconds), and ``sketches.jsonl`` (count-sketches of the
   policy and the reward model after every iteration) with its plots in ``viz/`` (see ``zokern viz``).
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

from zokern.preference.data import SentimentJudge
from zokern.preference.data import WordTokenizer
from zokern.preference.data import load_rows
from zokern.preference.data import make_demo_data
from zokern.preference.local import load_local
from zokern.preference.loop import DEFAULT_METHODS
from zokern.preference.loop import METHODS
from zokern.preference.loop import LoopConfig
from zokern.preference.loop import run
from zokern.preference.models import new_policy
from zokern.preference.models import new_reward_model
from zokern.preference.models import pretrain
from zokern.preference.models import train_reward_model
from zokern.preference.sketch import SketchRecorder
from zokern.preference.viz import make_plots


def run_pipeline(
    out: Path,
    seed: int = 0,
    forwards: int = 600,
    methods: tuple[str, ...] = DEFAULT_METHODS,
    model: Path | None = None,
    device: str = "cpu",
    trainable: str | None = "embed_tokens",
) -> list[dict]:
    """The demo pipeline; with ``model``, a local Hugging Face causal LM (and its tokenizer) replaces the small
    policy trained here, on ``device``."""
    import datasets
    from tqdm.auto import tqdm

    datasets.disable_progress_bars()  # the demo's files are small: their loading needs no bars
    out.mkdir(parents=True, exist_ok=True)
    begin = time.perf_counter()
    counts = make_demo_data(out, seed=seed, prompts=200, corpus=3000)
    print(f"data: {counts} in {out}")
    pairs = load_rows(out / "preferences.jsonl", ("prompt", "chosen", "rejected"))
    if model is None:
        texts = [r["text"] for r in load_rows(out / "corpus.jsonl", ("text",))]
        tokenizer = WordTokenizer.build(texts)
        tokenizer.save(out / "tokenizer.json")
        policy = new_policy(tokenizer, seed=seed)
        losses = pretrain(policy, tokenizer, texts, steps=200, seed=seed)
        print(f"policy pretrained: next-token loss {losses[0]:.2f} -> {losses[-1]:.2f}")
        reward_model = new_reward_model(tokenizer, seed=seed)
    else:
        policy, reward_model, tokenizer = load_local(model, device)
        n = sum(p.numel() for p in policy.parameters())
        print(f"policy: {model} ({n / 1e6:.1f}M parameters) on {device}")
    losses = train_reward_model(reward_model, tokenizer, pairs, steps=150, seed=seed)
    print(f"reward model trained: Bradley-Terry loss {losses[0]:.3f} -> {sum(losses[-10:]) / 10:.3f}")
    prompts = load_rows(out / "prompts.jsonl", ("prompt", "split"))
    train = [p["prompt"] for p in prompts if p["split"] == "train"]
    heldout = [p["prompt"] for p in prompts if p["split"] == "heldout"]
    judge = SentimentJudge()
    config = LoopConfig(forwards=forwards, seed=seed, trainable=trainable)
    (out / "sketches.jsonl").unlink(missing_ok=True)
    recorder = SketchRecorder(out / "sketches.jsonl", k=512, seed=seed)
    records: list[dict] = []
    with (out / "metrics.jsonl").open("w") as metrics:
        for method in methods:
            bar = tqdm(total=forwards, desc=f"{method:5s}", unit="fwd")

            def log(record: dict, bar=bar) -> None:
                metrics.write(json.dumps(record) + "\n")
                metrics.flush()
                bar.update(record["forwards"] - bar.n)
                bar.set_postfix(reward=f"{record['reward']:.3f}")

            records += run(
                method, copy.deepcopy(policy), reward_model, tokenizer, train, heldout, judge, config, log, recorder
            )
            bar.close()
    plot_rewards(records, out / "reward.png")
    page = make_plots(out)
    print(f"\njudged reward on {config.eval_prompts} held-out prompts (VADER compound, -1..1):")
    for method in methods:
        mine = [r for r in records if r["method"] == method]
        print(f"  {method:5s} {mine[0]['reward']:+.3f} -> {mine[-1]['reward']:+.3f} in {mine[-1]['seconds']:.1f} s")
    print(
        f"wrote {out / 'metrics.jsonl'}, {out / 'reward.png'} and {page} ({time.perf_counter() - begin:.0f} s in all)"
    )
    return records


def plot_rewards(records: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (by_forwards, by_seconds) = plt.subplots(1, 2, figsize=(11, 4.2))
    for method in dict.fromkeys(r["method"] for r in records):
        mine = [r for r in records if r["method"] == method]
        by_forwards.plot([r["forwards"] for r in mine], [r["reward"] for r in mine], marker=".", label=method)
        by_seconds.plot([r["seconds"] for r in mine], [r["reward"] for r in mine], marker=".", label=method)
    by_forwards.set(xlabel="policy-loss forwards", ylabel="judged reward (held-out)", title="reward per forward")
    by_seconds.set(xlabel="seconds", ylabel="judged reward (held-out)", title="reward per second")
    for ax in (by_forwards, by_seconds):
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--out", type=Path, default=Path("zokern-demo"), help="output directory (default ./zokern-demo)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--forwards", type=int, default=600, help="policy-loss forwards per method (default 600)")
    parser.add_argument(
        "--methods",
        default=",".join(DEFAULT_METHODS),
        help=f"comma-separated, of {', '.join(METHODS)} (default {','.join(DEFAULT_METHODS)})",
    )
    parser.add_argument(
        "--model",
        type=Path,
        default=None,
        help="a local Hugging Face causal LM directory (weights and tokenizer) to use as the policy instead of the "
        "small one trained here",
    )
    parser.add_argument("--device", default=None, help="where the models run (default: cuda with --model if present)")
    parser.add_argument(
        "--trainable",
        default="embed_tokens",
        help="regular expression on the policy's parameter names to train ('' for all; default embed_tokens)",
    )


def run_dpo(data: Path, out: Path, seed: int = 0, steps: int = 200) -> list[dict]:
    """`zokern dpo`: offline ZO-DPO on a preference dataset (``prompt``/``chosen``/``rejected``; JSONL, Parquet or a
    saved dataset). A small policy is built for its vocabulary and pretrained on both responses of every pair (so it
    starts without a preference), then trained with ZO-DPO; the last tenth of the pairs is held out. Writes
    ``dpo_metrics.jsonl`` (step, dpo_loss, accuracy on the held-out pairs)."""
    import datasets

    from zokern.preference.dpo import train_zo_dpo

    datasets.disable_progress_bars()
    pairs = load_rows(data, ("prompt", "chosen", "rejected"))
    if len(pairs) < 10:
        raise ValueError(f"{data}: {len(pairs)} pairs; ZO-DPO needs at least 10 (a tenth is held out)")
    texts = [f"{p['prompt']} {p[side]}" for p in pairs for side in ("chosen", "rejected")]
    tokenizer = WordTokenizer.build(texts)
    policy = new_policy(tokenizer, seed=seed)
    pretrain(policy, tokenizer, texts, steps=200, seed=seed)
    for name, p in policy.named_parameters():
        p.requires_grad_("embed_tokens" in name)
    held = max(1, len(pairs) // 10)
    out.mkdir(parents=True, exist_ok=True)
    with (out / "dpo_metrics.jsonl").open("w") as metrics:

        def log(record: dict) -> None:
            metrics.write(json.dumps(record) + "\n")
            print(f"step {record['step']:5d}  dpo loss {record['dpo_loss']:.4f}  accuracy {record['accuracy']:.2f}")

        records = train_zo_dpo(
            policy, tokenizer, pairs[:-held], pairs[-held:], steps=steps, eval_every=max(1, steps // 4), seed=seed,
            log=log,
        )  # fmt: skip
    print(f"wrote {out / 'dpo_metrics.jsonl'}")
    return records


def add_dpo_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--data", type=Path, required=True, help="preference pairs: .jsonl, .parquet or a saved dataset"
    )
    parser.add_argument("--out", type=Path, default=Path("zokern-dpo"), help="output directory (default ./zokern-dpo)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=200, help="ZO steps (default 200)")
