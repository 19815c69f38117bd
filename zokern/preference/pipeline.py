"""`zokern demo`: the whole preference pipeline on the CPU in a few minutes.

1. Generate the demo's data (prompts, a corpus, judged preference pairs); they replace a previous run's in the output
   directory with the run's first record.
2. Build the word tokenizer; pretrain a small policy on the corpus (first order); train the reward model on the
   pairs (Bradley-Terry, first order).
3. Run the chosen methods (ZOPrO, the MeZO direction and first-order RLOO; ``--methods`` adds LDSD) from that same
   start, for the same number of policy-loss forwards, each judged on held-out prompts as it goes.
4. Write ``metrics.jsonl`` (one record per evaluation: method, step, forwards, seconds, reward) and ``reward.png``
   (judged reward against policy-loss forwards and against seconds), and ``sketches.jsonl`` (count-sketches of the
   policy and the reward model after every iteration) with its plots in ``viz/`` (see ``zokern viz``).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

from zokern import _options as options
from zokern._options import check_device
from zokern._options import check_output_dir
from zokern._options import check_positive_int
from zokern._options import check_regex
from zokern._options import check_seed
from zokern.preference.data import SentimentJudge
from zokern.preference.data import WordTokenizer
from zokern.preference.data import load_rows
from zokern.preference.data import make_demo_data
from zokern.preference.dpo import RESPONSE_TOKENS
from zokern.preference.local import load_local
from zokern.preference.loop import DEFAULT_METHODS
from zokern.preference.loop import METHODS
from zokern.preference.loop import LoopConfig
from zokern.preference.loop import check_forwards
from zokern.preference.loop import run
from zokern.preference.models import new_policy
from zokern.preference.models import new_reward_model
from zokern.preference.models import pretrain
from zokern.preference.models import train_reward_model
from zokern.preference.positions import prompt_budget
from zokern.preference.records import RecordFile
from zokern.preference.sketch import SketchRecorder
from zokern.preference.trainable import select_trainable
from zokern.preference.trainable import trainable_names
from zokern.preference.viz import check_replaceable_page
from zokern.preference.viz import clear_plots
from zokern.preference.viz import make_plots

# The files a demo run generates in --out besides its records (the tokenizer only for the small policy it trains).
GENERATED = ("corpus.jsonl", "prompts.jsonl", "preferences.jsonl", "tokenizer.json")


def run_pipeline(
    out: Path,
    seed: int = 0,
    forwards: int = 600,
    methods: tuple[str, ...] = DEFAULT_METHODS,
    model: Path | None = None,
    device: str = "cpu",
    trainable: str | None = None,
) -> list[dict]:
    """The demo pipeline, on ``device``; with ``model``, a local Hugging Face causal LM (and its tokenizer) replaces
    the small policy trained here. ``trainable``: a regular expression on the policy's parameter names ('' for all),
    or None for its input embedding. Options are checked before any work, the trainable selection as soon as the
    policy exists (before pretraining or reward-model training)."""
    import datasets
    from tqdm.auto import tqdm

    methods = check_methods(methods)
    forwards, seed = check_positive_int(forwards), check_seed(seed)
    config = LoopConfig(forwards=forwards, seed=seed, trainable=trainable)
    check_forwards(forwards, methods, config)
    out, device = check_output_dir(out), check_device(device)
    check_output_dir(out / "viz")
    if trainable is not None:
        check_regex(trainable)
    if model is not None and not Path(model).is_dir():
        raise FileNotFoundError(f"--model {model}: no such directory (a local save_pretrained directory is expected)")
    if model is not None and Path(out).resolve() == Path(model).resolve():
        raise ValueError(f"--out {out} is the --model directory: the demo's data and plots would replace its files")
    _check_replaceable(out)
    datasets.disable_progress_bars()  # the demo's files are small: their loading needs no bars
    begin = time.perf_counter()
    # The run's files go to a staging directory first, and replace the previous run's in ``out`` with its first
    # record: a run that fails before (a model that does not load, a trainable pattern that matches nothing) leaves
    # the previous run's data, metrics and plots as they were, and one that fails after leaves no plot of another run.
    with tempfile.TemporaryDirectory(prefix="zokern-demo-") as staging_dir:
        staging = Path(staging_dir)
        policy, reward_model, tokenizer, train, heldout = _starting_point(
            staging, model, device, seed, trainable, config.response_length
        )
        judge = SentimentJudge()

        def publish() -> None:
            """At the run's first record: its data replace the previous run's, whose plots go (and its tokenizer,
            which a run of a local model does not write: only the demo's own, not a Hugging Face one)."""
            out.mkdir(parents=True, exist_ok=True)
            for name in GENERATED:
                if (staging / name).exists() or _word_tokenizer_file(out / name):
                    (out / name).unlink(missing_ok=True)
            for path in staging.iterdir():
                shutil.copyfile(path, out / path.name)
            (out / "reward.png").unlink(missing_ok=True)
            clear_plots(out / "viz")

        # The sketches file is replaced at the run's first record too (zokern.preference.records).
        recorder = SketchRecorder(out / "sketches.jsonl", k=512, seed=seed, fresh=True)
        records: list[dict] = []
        with RecordFile(out / "metrics.jsonl", on_first=publish) as metrics:
            for method in methods:
                bar = tqdm(total=forwards, desc=f"{method:5s}", unit="fwd")

                def log(record: dict, bar=bar) -> None:
                    metrics.write(record)
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


def _check_replaceable(out: Path) -> None:
    """Before any work: what the run's first record replaces in ``out`` can be replaced, and is an earlier run's. A
    metrics.jsonl whose first record is not a demo's, or data files or plots without an earlier run's metrics beside
    them, are the user's own (they were replaced without a word); a records file or a plot the run cannot rewrite
    failed the run after the earlier run's data and plots were gone (or beside them)."""
    data = [name for name in GENERATED if name != "tokenizer.json"]  # (a tokenizer goes only if it is the demo's)
    replaced = [name for name in (*data, "metrics.jsonl", "sketches.jsonl", "reward.png") if (out / name).exists()]
    if replaced and not _earlier_demo_metrics(out / "metrics.jsonl"):
        raise ValueError(
            f"--out {out} holds {', '.join(replaced)} but no earlier demo run's metrics.jsonl: the demo would replace "
            "them. Choose another --out"
        )
    for name in ("metrics.jsonl", "sketches.jsonl", "reward.png"):
        _check_writable(out / name)
    check_replaceable_page(out / "viz")


def _check_writable(path: Path) -> None:
    if path.exists() and (not path.is_file() or not os.access(path, os.W_OK)):
        raise ValueError(f"{path} cannot be replaced (not a writable file): the run writes it")


def _earlier_demo_metrics(path: Path) -> bool:
    """Whether ``path`` holds a demo run's records (its first line one: method, step, forwards, seconds, reward), or
    none (a run stopped before its first)."""
    try:
        with path.open(encoding="utf-8") as f:
            first = f.readline()
    except (OSError, UnicodeDecodeError):
        return False
    if not first.strip():
        return True
    try:
        record = json.loads(first)
    except ValueError:
        return False
    return isinstance(record, dict) and {"method", "step", "forwards", "seconds", "reward"} <= record.keys()


def _word_tokenizer_file(path: Path) -> bool:
    """Whether ``path`` is a tokenizer as the demo saves it (WordTokenizer.save: its vocabulary alone)."""
    try:
        return set(json.loads(path.read_text())) == {"vocabulary"}
    except (OSError, UnicodeDecodeError, ValueError, TypeError):
        return False


def _starting_point(
    staging: Path, model: Path | None, device: str, seed: int, trainable: str | None, response_length: int
):
    """The demo's data, written to ``staging``; the policy (the small one pretrained here, or ``model``) and the
    reward model trained on the data's pairs, on ``device``; the train and held-out prompts."""
    counts = make_demo_data(staging, seed=seed, prompts=200, corpus=3000)
    print(f"data: {counts}")
    pairs = load_rows(staging / "preferences.jsonl", ("prompt", "chosen", "rejected"))
    if model is None:
        texts = [r["text"] for r in load_rows(staging / "corpus.jsonl", ("text",))]
        tokenizer = WordTokenizer.build(texts)
        tokenizer.save(staging / "tokenizer.json")
        policy = new_policy(tokenizer, seed=seed).to(device)
        trainable_names(policy, trainable)
        losses = pretrain(policy, tokenizer, texts, steps=200, seed=seed)
        print(f"policy pretrained: next-token loss {losses[0]:.2f} -> {losses[-1]:.2f}")
        reward_model = new_reward_model(tokenizer, seed=seed).to(device)
    else:
        policy, reward_model, tokenizer = load_local(model, device, seed=seed)
        try:  # a position table too short for the responses, before the reward model's training (the loop says too)
            prompt_budget(policy, response_length)
        except ValueError as e:
            raise ValueError(f"--model {model}: {e}") from None
        names = trainable_names(policy, trainable)
        n = sum(p.numel() for p in policy.parameters())
        print(f"policy: {model} ({n / 1e6:.1f}M parameters) on {device}; trainable: {', '.join(names)}")
    losses = train_reward_model(reward_model, tokenizer, pairs, steps=150, seed=seed)
    print(f"reward model trained: Bradley-Terry loss {losses[0]:.3f} -> {sum(losses[-10:]) / 10:.3f}")
    prompts = load_rows(staging / "prompts.jsonl", ("prompt", "split"))
    train = [p["prompt"] for p in prompts if p["split"] == "train"]
    heldout = [p["prompt"] for p in prompts if p["split"] == "heldout"]
    return policy, reward_model, tokenizer, train, heldout


def check_methods(methods: str | tuple[str, ...]) -> tuple[str, ...]:
    """The loop's methods, from a tuple or the command line's comma-separated list: known, at least one, no repeats
    (a repeated method would run twice and mix its sketches under one key)."""
    if isinstance(methods, str):
        methods = tuple(m.strip() for m in methods.split(",") if m.strip())
    methods = tuple(methods)
    unknown = [m for m in methods if m not in METHODS]
    repeated = sorted({m for m in methods if methods.count(m) > 1})
    if unknown or not methods or repeated:
        problem = f"unknown {unknown}" if unknown else f"repeated {repeated}" if repeated else "none given"
        raise ValueError(f"expected some of {', '.join(METHODS)}, each once; got {','.join(methods)!r} ({problem})")
    return methods


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
        "--out",
        type=options.output_dir,
        default=Path("zokern-demo"),
        help="output directory (default ./zokern-demo); a previous run's records, data and plots there are replaced "
        "when the run writes its first record",
    )
    parser.add_argument("--seed", type=options.seed, default=0, help="in [0, 2^63) (default 0)")
    parser.add_argument(
        "--forwards",
        type=options.positive_int,
        default=600,
        help="policy-loss forwards per method, a multiple of each method's step (default 600)",
    )
    parser.add_argument(
        "--methods",
        type=options.argtype(check_methods),
        default=DEFAULT_METHODS,
        help=f"comma-separated, each once, of {', '.join(METHODS)} (default {','.join(DEFAULT_METHODS)})",
    )
    parser.add_argument(
        "--model",
        type=options.path,
        default=None,
        help="a local Hugging Face causal LM directory (weights and tokenizer) to use as the policy instead of the "
        "small one trained here",
    )
    parser.add_argument(
        "--device",
        type=options.device,
        default=None,
        help="where the policy and reward model run (default: cuda with --model when present, else cpu)",
    )
    parser.add_argument(
        "--trainable",
        type=options.regex,
        default=None,
        help="regular expression on the policy's parameter names to train ('' for all; default: the input "
        "embedding, whatever its name, e.g. embed_tokens or wte)",
    )


def run_dpo(
    data: Path,
    out: Path,
    seed: int = 0,
    steps: int = 200,
    response_tokens: int = RESPONSE_TOKENS,
    split: str = "train",
) -> list[dict]:
    """`zokern dpo`: offline ZO-DPO on a preference dataset (``prompt``/``chosen``/``rejected``; JSONL, Parquet or a
    saved dataset, of which ``split`` for a saved DatasetDict). A small policy (64 positions) is built for its
    vocabulary and pretrained on both responses of every pair (so it starts without a preference), then trained with
    ZO-DPO; the last tenth of the pairs is held out. The command shows ZO-DPO at work on the data: it trains no
    model of the user's and saves none (for one's own model, call ``dpo.train_zo_dpo``). Responses take
    ``response_tokens`` positions (<eos> included), prompts the rest (see dpo.train_zo_dpo). Writes
    ``dpo_metrics.jsonl`` (step, dpo_loss, accuracy on the held-out pairs), replacing a previous run's at
    the first record."""
    import datasets

    from zokern.preference.dpo import train_zo_dpo

    seed, steps = check_seed(seed), check_positive_int(steps)
    response_tokens, out = check_positive_int(response_tokens), check_output_dir(out)
    _check_writable(out / "dpo_metrics.jsonl")  # before the data and the pretraining, not after
    datasets.disable_progress_bars()
    pairs = load_rows(data, ("prompt", "chosen", "rejected"), split=split)
    if len(pairs) < 10:
        raise ValueError(f"{data}: {len(pairs)} pairs; ZO-DPO needs at least 10 (a tenth is held out)")
    texts = [f"{p['prompt']} {p[side]}" for p in pairs for side in ("chosen", "rejected")]
    tokenizer = WordTokenizer.build(texts)
    policy = new_policy(tokenizer, seed=seed)
    prompt_budget(policy, response_tokens)  # a response length the policy cannot hold: say so before pretraining
    out.mkdir(parents=True, exist_ok=True)  # before the work too
    pretrain(policy, tokenizer, texts, steps=200, seed=seed)
    select_trainable(policy, None)  # the token embeddings
    held = max(1, len(pairs) // 10)
    with RecordFile(out / "dpo_metrics.jsonl") as metrics:

        def log(record: dict) -> None:
            metrics.write(record)
            print(f"step {record['step']:5d}  dpo loss {record['dpo_loss']:.4f}  accuracy {record['accuracy']:.2f}")

        records = train_zo_dpo(
            policy, tokenizer, pairs[:-held], pairs[-held:], steps=steps, eval_every=max(1, steps // 4), seed=seed,
            log=log, response_length=response_tokens,
        )  # fmt: skip
    print(f"wrote {out / 'dpo_metrics.jsonl'}")
    return records


def add_dpo_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--data", type=options.path, required=True, help="preference pairs: .jsonl, .json, .parquet or a saved dataset"
    )
    parser.add_argument(
        "--out",
        type=options.output_dir,
        default=Path("zokern-dpo"),
        help="output directory (default ./zokern-dpo); its dpo_metrics.jsonl is replaced at the run's first record",
    )
    parser.add_argument(
        "--split", default="train", help="the split of a saved DatasetDict to use (default train; e.g. train_prefs)"
    )
    parser.add_argument("--seed", type=options.seed, default=0, help="in [0, 2^63) (default 0)")
    parser.add_argument("--steps", type=options.positive_int, default=200, help="ZO steps (default 200)")
    parser.add_argument(
        "--response-tokens",
        type=options.positive_int,
        default=RESPONSE_TOKENS,
        help=f"positions per response, <eos> included (default {RESPONSE_TOKENS}); longer responses are cut and "
        f"prompts cut from the left to fit the policy's 64 positions, with a warning that counts them",
    )
