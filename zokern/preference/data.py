"""The demo's data, generated here (nothing is downloaded), its word-level tokenizer, the judge, and dataset loading.

    python -m zokern.preference.data --out DIR [--seed 0] [--prompts 400] [--corpus 6000]

writes to DIR:
- ``corpus.jsonl`` (``text``): prompts followed by continuations of every sentiment, to pretrain a small policy;
- ``prompts.jsonl`` (``prompt``, ``split`` = train | heldout): the prompts of the online loop and of its evaluation;
- ``preferences.jsonl`` (``prompt``, ``chosen``, ``rejected``): two continuations of a prompt, the one the judge
  scores higher chosen (TRL's column convention), for the reward model and offline DPO.

The task is "continue the prompt positively"; the judge is VADER's compound sentiment score (the `vaderSentiment`
package), an external, deterministic scorer. Any object with ``score(prompt, response) -> float`` can replace it.
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import random
import re
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any
from typing import Protocol

from zokern import _options as options

SUBJECTS = [
    "the movie", "the book", "my trip to the lake", "the food at the cafe", "the new phone", "our team meeting",
    "the concert last night", "the weather today", "my first day at work", "the hotel room", "the museum visit",
    "the train ride", "the garden party", "this morning run", "the online course", "the city tour",
    "the birthday dinner", "the football match", "the new album", "the job interview",
]  # fmt: skip
OPENERS = ["i think", "honestly", "to be fair", "in the end", "overall", "for me", "at first", "later"]
POSITIVE = ["wonderful", "great", "lovely", "delightful", "amazing", "fun", "excellent", "pleasant", "happy", "good"]
NEGATIVE = ["awful", "terrible", "boring", "sad", "bad", "horrible", "disappointing", "annoying", "ugly", "poor"]
NEUTRAL = ["long", "short", "busy", "quiet", "usual", "new", "different", "simple", "early", "late"]
NOUNS = ["time", "day", "story", "place", "people", "music", "view", "service", "evening", "plan"]
# Continuations of a prompt that ends in "was" or "felt": they start with the first adjective.
TEMPLATES = [
    "{adj} , and the {noun} was {adj2} .",
    "really {adj} . the {noun} was {adj2} .",
    "{adj} and {adj2} , {opener} .",
    "{adj} , a {adj2} {noun} too .",
    "{adj} . {opener} the {noun} felt {adj2} .",
]


class Judge(Protocol):
    """Scores a response to a prompt; higher is better."""

    def score(self, prompt: str, response: str) -> float: ...


def judge_score(judge: Judge, prompt: str, response: str) -> float:
    """``judge.score(prompt, response)`` as a finite float, or a ValueError naming the judge and the response: a NaN
    score would label a pair by a comparison that is always false, a text one order pairs lexicographically."""
    score = judge.score(prompt, response)
    try:
        if isinstance(score, (str, bytes, bool)):
            raise TypeError
        value = float(score)  # a number, a NumPy scalar, a one-element tensor
    except (TypeError, ValueError, RuntimeError):
        raise ValueError(
            f"the judge {type(judge).__name__} scored {response!r} with a {type(score).__name__}, expected a number"
        ) from None
    if not math.isfinite(value):
        raise ValueError(f"the judge {type(judge).__name__} scored {response!r} (prompt {prompt!r}) {value}")
    return value


class SentimentJudge:
    """The demo's judge: VADER's compound sentiment of the response, in [-1, 1] (deterministic)."""

    def __init__(self) -> None:
        try:
            from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer
        except ImportError as e:
            raise ImportError("the sentiment judge needs vaderSentiment: pip install vaderSentiment") from e
        self._analyzer = SentimentIntensityAnalyzer()

    def score(self, prompt: str, response: str) -> float:
        return float(self._analyzer.polarity_scores(response)["compound"])


def _continuation(rng: random.Random, mood: str) -> str:
    pools = {"positive": POSITIVE, "negative": NEGATIVE, "neutral": NEUTRAL}
    mixed = mood == "mixed"
    first = pools[rng.choice(["positive", "negative"]) if mixed else mood]
    second = pools[rng.choice(["positive", "negative", "neutral"]) if mixed else mood]
    return rng.choice(TEMPLATES).format(
        opener=rng.choice(OPENERS),
        adj=rng.choice(first),
        adj2=rng.choice(second),
        noun=rng.choice(NOUNS),
    )


def make_demo_data(
    out: Path, seed: int = 0, prompts: int = 400, corpus: int = 6000, judge: Judge | None = None
) -> dict:
    """Write the three files (see the module doc) and return their row counts."""
    rng = random.Random(seed)
    judge = judge if judge is not None else SentimentJudge()  # a judge may define __len__ (an empty cache)
    out.mkdir(parents=True, exist_ok=True)
    prompt_rows = []
    for k in range(prompts):
        subject = rng.choice(SUBJECTS)
        prompt = rng.choice([f"{subject} was", f"{rng.choice(OPENERS)} {subject} was", f"{subject} felt"])
        prompt_rows.append({"prompt": prompt, "split": "heldout" if k % 5 == 0 else "train"})
    # The corpus leans neither way: the policy starts neutral on average, so the loop has room to move it.
    texts = []
    for _ in range(corpus):
        row = rng.choice(prompt_rows)
        mood = rng.choice(["positive", "negative", "neutral", "mixed"])
        texts.append({"text": f"{row['prompt']} {_continuation(rng, mood)}"})
    pairs = []
    for row in prompt_rows:
        if row["split"] != "train":
            continue
        a, b = (_continuation(rng, rng.choice(["positive", "negative", "mixed"])) for _ in range(2))
        score_a, score_b = judge_score(judge, row["prompt"], a), judge_score(judge, row["prompt"], b)
        if score_a == score_b:
            continue  # no preference to learn from
        chosen, rejected = (a, b) if score_a > score_b else (b, a)
        pairs.append({"prompt": row["prompt"], "chosen": chosen, "rejected": rejected})
    _write_jsonl(out / "corpus.jsonl", texts)
    _write_jsonl(out / "prompts.jsonl", prompt_rows)
    _write_jsonl(out / "preferences.jsonl", pairs)
    return {"corpus": len(texts), "prompts": len(prompt_rows), "preferences": len(pairs)}


def _write_jsonl(path: Path, rows: Iterable[dict]) -> None:
    with path.open("w") as fh:
        for row in rows:
            fh.write(json.dumps(row) + "\n")


# --------------------------------------------------------------------------------------------------- loading


def load_rows(source: str | Path, columns: tuple[str, ...], split: str = "train") -> list[dict]:
    """Rows of a dataset through the `datasets` library: a JSONL or Parquet file, or a directory saved with
    ``Dataset.save_to_disk`` (a saved DatasetDict: its ``split``). Every row must have the ``columns``, as non-empty
    strings. A file that is empty or cannot be parsed, or a missing split, is a ValueError naming the file."""
    import datasets

    path = Path(source)
    if path.is_dir():
        try:
            loaded = datasets.load_from_disk(str(path))
        except IndexError:  # what datasets raises for a saved dataset of no rows
            raise ValueError(f"{path}: the dataset has no rows") from None
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                raise ValueError(f"{path}: a saved DatasetDict without a {split!r} split; it has {sorted(loaded)}")
            loaded = loaded[split]
        elif split != "train":
            raise ValueError(
                f"{path}: a single dataset, without splits: the {split!r} split is for a saved DatasetDict"
            )
        dataset = loaded
    elif path.suffix in (".jsonl", ".json", ".parquet"):
        if split != "train":  # (a file is one split, loaded as 'train')
            raise ValueError(f"{path}: a file, without splits: the {split!r} split is for a saved DatasetDict")
        if path.is_file() and _blank(path):
            raise ValueError(f"{path}: the file is empty (no rows)")
        if path.is_file() and path.suffix != ".parquet":
            _check_utf8(path)
        builder = "parquet" if path.suffix == ".parquet" else "json"
        verbosity = datasets.logging.get_verbosity()
        datasets.logging.set_verbosity(datasets.logging.CRITICAL)  # its parse-error log would repeat ours
        bars = not datasets.utils.are_progress_bars_disabled()
        datasets.disable_progress_bars()  # one bar per load, now that every load parses the file
        try:
            # The name as it is, not a glob pattern ('run[1].jsonl' would load run1.jsonl, or nothing); parsed
            # afresh into memory, not through datasets' cache, which keys a file by its name and modification time
            # (a file replaced by one that kept its time, as cp -p and rsync -a do, would load the old rows).
            with tempfile.TemporaryDirectory(prefix="zokern-data-") as cache:
                dataset = datasets.load_dataset(
                    builder, data_files=glob.escape(str(path)), split="train", cache_dir=cache, keep_in_memory=True
                )
        except datasets.exceptions.DatasetGenerationError as e:
            raise ValueError(_unreadable(path, e)) from None
        except ValueError as e:  # a Parquet file of no rows: 'Instruction "train" corresponds to no data!'
            raise ValueError(f"{path}: {'the dataset has no rows' if 'no data' in str(e) else e}") from None
        finally:
            datasets.logging.set_verbosity(verbosity)
            if bars:
                datasets.enable_progress_bars()
    else:
        raise ValueError(f"{path}: expected a .jsonl, .json or .parquet file, or a saved dataset directory")
    if len(dataset) == 0:
        raise ValueError(f"{path}: the dataset has no rows")
    missing = [c for c in columns if c not in dataset.column_names]
    if missing:
        implicit = "prompt" in missing and {"chosen", "rejected"} <= set(dataset.column_names)
        hint = f"; {IMPLICIT_PROMPT}" if implicit else ""
        raise ValueError(f"{path}: missing column(s) {missing}; it has {dataset.column_names}{hint}")
    rows = [{c: row[c] for c in columns} for row in dataset]
    for k, row in enumerate(rows):
        for c in columns:
            if not isinstance(row[c], str) or not row[c].strip():
                hint = f" ({CONVERSATIONAL})" if is_conversation(row[c]) else ""
                place = _row_place(path, k, len(rows))
                raise ValueError(f"{path}, {place} has an empty or non-text {c!r}: {row[c]!r}{hint}")
    return rows


# TRL's other preference formats, which the loop does not take: named where a row shows one.
CONVERSATIONAL = "TRL's conversational format (lists of role/content messages) is not supported: give plain text"
IMPLICIT_PROMPT = (
    "TRL's implicit-prompt rows (the prompt inside chosen and rejected) are not supported: give the prompt its own "
    "column"
)


def is_conversation(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(m, dict) and "role" in m for m in value)


_SPACE = re.compile(r"\s*")


def _row_place(path: Path, k: int, rows: int) -> str:
    """Where row ``k`` (from 0) of ``rows`` is: in a JSON lines file, also the line (from 1) its object starts on,
    found by decoding the objects in turn (blank lines hold none, a pretty-printed one spans several, two may share
    a line); the row alone where the file does not decode into ``rows`` objects."""
    if path.suffix != ".jsonl":
        return f"row {k}"
    text = path.read_text(encoding="utf-8-sig")
    decoder, starts, at = json.JSONDecoder(), [], 0
    try:
        while (at := _SPACE.match(text, at).end()) < len(text):  # (in place: slicing the rest made it quadratic)
            starts.append(at)
            at = decoder.raw_decode(text, at)[1]
    except json.JSONDecodeError:
        return f"row {k}"
    return f"line {text.count(chr(10), 0, starts[k]) + 1} (row {k})" if len(starts) == rows else f"row {k}"


def _blank(path: Path) -> bool:
    """No byte, or (JSON lines) only whitespace: `datasets` raises StopIteration or an unhelpful error on these. Reads
    up to the first non-blank line only."""
    if path.stat().st_size == 0:
        return True
    if path.suffix == ".parquet":
        return False
    with path.open("rb") as fh:
        return not any(line.strip() for line in fh)


def _check_utf8(path: Path) -> None:
    """JSON text must be UTF-8: `datasets` loads other bytes without complaint and fails later, when a row is read,
    with a message that names neither the file nor the line."""
    with path.open("rb") as fh:
        for number, line in enumerate(fh, 1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"{path}, line {number}: not UTF-8 text (byte {line[e.start]:#04x})") from None


def _unreadable(path: Path, error: Exception) -> str:
    """What is wrong with a file `datasets` could not parse: the first line that is not JSON, for JSON lines;
    otherwise the parser's own message (the cause of datasets' generic DatasetGenerationError)."""
    if path.suffix == ".jsonl":
        with path.open(encoding="utf-8", errors="replace") as fh:  # a byte that is not UTF-8 fails json.loads below
            for number, line in enumerate(fh, 1):
                try:
                    record = json.loads(line) if line.strip() else {}
                except json.JSONDecodeError as e:
                    return f"{path}, line {number}: not valid JSON ({e})"
                if not isinstance(record, dict):  # (datasets said "Trailing data at position 76")
                    kinds = {list: "an array", str: "a string", bool: "a boolean", type(None): "null"}
                    kind = kinds.get(type(record), "a number")
                    return f"{path}, line {number}: {kind}, where each line must be a JSON object of columns"
    cause = error.__cause__ or error
    return f"{path}: cannot be read as {path.suffix[1:]} ({type(cause).__name__}: {cause})"


# ------------------------------------------------------------------------------------------------- tokenizer


def text_ids(ids: Iterable[int], eos_id: int, skip: tuple[int, ...]) -> list[int]:
    """The ids of a response's text: up to its first end-of-sequence, without padding and beginning markers."""
    kept = []
    for i in ids:
        if i == eos_id:
            break
        if i not in skip:
            kept.append(i)
    return kept


class WordTokenizer:
    """A word-level tokenizer built from a corpus: lowercased words and punctuation, plus <pad> <bos> <eos> <unk>."""

    SPECIALS = ("<pad>", "<bos>", "<eos>", "<unk>")
    _SPLIT = re.compile(r"[a-z0-9']+|[^\sa-z0-9']")

    def __init__(self, vocabulary: list[str]) -> None:
        self.vocabulary = list(self.SPECIALS) + [w for w in vocabulary if w not in self.SPECIALS]
        self.index = {w: k for k, w in enumerate(self.vocabulary)}
        self.pad_id, self.bos_id, self.eos_id, self.unk_id = range(4)

    @classmethod
    def build(cls, texts: Iterable[str]) -> WordTokenizer:
        words = sorted({w for text in texts for w in cls._SPLIT.findall(text.lower())})
        return cls(words)

    def __len__(self) -> int:
        return len(self.vocabulary)

    def encode(self, text: str) -> list[int]:
        return [self.index.get(w, self.unk_id) for w in self._SPLIT.findall(text.lower())]

    def decode(self, ids: Iterable[int]) -> str:
        """The text of ``ids`` up to the first <eos>, without padding and <bos>; an id past the vocabulary (a model
        whose embedding has more rows than the tokenizer) as <unk>."""
        size = len(self.vocabulary)
        words = (
            self.vocabulary[i] if i < size else "<unk>" for i in text_ids(ids, self.eos_id, (self.pad_id, self.bos_id))
        )
        return " ".join(words)

    def save(self, path: Path) -> None:
        path.write_text(json.dumps({"vocabulary": self.vocabulary}))

    @classmethod
    def load(cls, path: Path) -> WordTokenizer:
        return cls(json.loads(path.read_text())["vocabulary"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=options.output_dir, required=True)
    parser.add_argument("--seed", type=options.seed, default=0)
    parser.add_argument("--prompts", type=options.positive_int, default=400)
    parser.add_argument("--corpus", type=options.positive_int, default=6000)
    args = parser.parse_args(argv)
    counts = make_demo_data(args.out, args.seed, args.prompts, args.corpus)
    print(f"wrote {args.out}: " + ", ".join(f"{n} {name} rows" for name, n in counts.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
