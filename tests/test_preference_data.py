"""The demo's generated data, its loading through `datasets`, the word tokenizer and the judge."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

pytest.importorskip("datasets")
pytest.importorskip("vaderSentiment")

from zokern.preference.data import SentimentJudge  # noqa: E402
from zokern.preference.data import WordTokenizer  # noqa: E402
from zokern.preference.data import judge_score  # noqa: E402
from zokern.preference.data import load_rows  # noqa: E402
from zokern.preference.data import make_demo_data  # noqa: E402

COLUMNS = ("prompt", "chosen", "rejected")


def _read(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_generated_data_is_deterministic_and_judged(tmp_path):
    counts = make_demo_data(tmp_path / "a", seed=3, prompts=60, corpus=200)
    make_demo_data(tmp_path / "b", seed=3, prompts=60, corpus=200)
    for name in ("corpus.jsonl", "prompts.jsonl", "preferences.jsonl"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    prompts = _read(tmp_path / "a" / "prompts.jsonl")
    assert len(prompts) == counts["prompts"] == 60
    assert {p["split"] for p in prompts} == {"train", "heldout"}
    judge = SentimentJudge()
    pairs = _read(tmp_path / "a" / "preferences.jsonl")
    assert len(pairs) == counts["preferences"] > 20
    train_prompts = {p["prompt"] for p in prompts if p["split"] == "train"}
    for pair in pairs:
        assert pair["prompt"] in train_prompts
        assert judge.score(pair["prompt"], pair["chosen"]) > judge.score(pair["prompt"], pair["rejected"])


def test_the_judge_is_pluggable(tmp_path):
    class Longer:
        def score(self, prompt, response):
            return float(len(response))

        def __len__(self):  # a judge that is falsy (an empty cache, say) is still the judge, not VADER
            return 0

    make_demo_data(tmp_path, seed=1, prompts=30, corpus=10, judge=Longer())
    for pair in _read(tmp_path / "preferences.jsonl"):
        assert len(pair["chosen"]) > len(pair["rejected"])


@pytest.mark.parametrize(
    "score,match",
    [
        (float("nan"), r"the judge Fixed scored '.*' \(prompt '.*'\) nan"),  # labelled pairs by always-false tests
        (float("inf"), r"scored .* inf"),
        ("0.5", r"scored '.*' with a str, expected a number"),  # ordered pairs lexicographically
        (None, r"with a NoneType"),
        ([0.5], r"with a list"),
    ],
)
def test_a_judge_score_that_is_not_a_finite_number_is_refused_by_name(tmp_path, score, match):
    class Fixed:
        def score(self, prompt, response):
            return score

    with pytest.raises(ValueError, match=match):
        make_demo_data(tmp_path, seed=1, prompts=10, corpus=10, judge=Fixed())
    assert judge_score(type("Tensor", (), {"score": lambda self, p, r: torch.tensor(0.25)})(), "p", "r") == 0.25


def test_load_rows_from_jsonl_parquet_and_saved_datasets(tmp_path):
    import datasets

    rows = [{"prompt": "the movie was", "chosen": "great .", "rejected": "bad ."}] * 3
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    dataset = datasets.Dataset.from_list(rows)
    dataset.to_parquet(str(tmp_path / "p.parquet"))
    dataset.save_to_disk(str(tmp_path / "saved"))
    columns = ("prompt", "chosen", "rejected")
    for source in (jsonl, tmp_path / "p.parquet", tmp_path / "saved"):
        assert load_rows(source, columns) == rows


@pytest.mark.parametrize(
    "rows,match",
    [
        ([{"prompt": "a", "chosen": "b"}], r"missing column\(s\) \['rejected'\]"),
        ([{"prompt": "  ", "chosen": "b", "rejected": "c"}], r"line 1 \(row 0\) has an empty or non-text 'prompt'"),
        (
            [{"prompt": [{"role": "user", "content": "a"}], "chosen": "b", "rejected": "c"}],
            r"row 0\) has an empty or non-text 'prompt'.*TRL's conversational format .* is not supported",
        ),
        (
            [{"chosen": "the movie was great", "rejected": "the movie was bad"}],
            r"missing column\(s\) \['prompt'\].*TRL's implicit-prompt rows .* are not supported",
        ),
    ],
)
def test_load_rows_rejects_bad_data(tmp_path, rows, match):
    path = tmp_path / "bad.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ValueError, match=match):
        load_rows(path, ("prompt", "chosen", "rejected"))
    with pytest.raises(ValueError, match="expected a .jsonl"):
        load_rows(tmp_path / "data.csv", ("prompt",))


def test_a_bad_row_of_a_json_lines_file_is_named_by_its_line(tmp_path):
    """Blank lines hold no row: the row's index alone would send the user to the wrong line."""
    good = json.dumps({"prompt": "the movie was", "chosen": "great .", "rejected": "bad ."})
    bad = json.dumps({"prompt": "the movie was", "chosen": "great .", "rejected": None})
    path = tmp_path / "pairs.jsonl"
    path.write_text(f"{good}\n\n{good}\n   \n{bad}\n{good}\n")
    with pytest.raises(ValueError, match=r"pairs.jsonl, line 5 \(row 2\) has an empty or non-text 'rejected': None"):
        load_rows(path, COLUMNS)


def test_a_json_lines_row_is_named_by_the_line_it_starts_on(tmp_path):
    rows = [{"prompt": "the movie was", "chosen": "great .", "rejected": "bad ."}] * 2
    rows.append({"prompt": "the movie was", "chosen": "", "rejected": "bad ."})
    path = tmp_path / "pretty.jsonl"
    path.write_text("".join(json.dumps(r, indent=2) + "\n" for r in rows))  # datasets reads it; a line is no row
    with pytest.raises(ValueError, match=r"pretty.jsonl, line 11 \(row 2\) has an empty or non-text 'chosen'"):
        load_rows(path, COLUMNS)
    path.write_text(json.dumps(rows[0]) + " " + json.dumps(rows[1]) + "\n" + json.dumps(rows[2], indent=1) + "\n")
    with pytest.raises(ValueError, match=r"pretty.jsonl, line 2 \(row 2\)"):  # two rows on line 1
        load_rows(path, COLUMNS)


def test_a_split_of_a_source_without_splits_is_refused(tmp_path):
    import datasets

    rows = [{"prompt": "the movie was", "chosen": "great .", "rejected": "bad ."}] * 2
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "one"))
    for source, kind in ((path, "a file"), (tmp_path / "one", "a single dataset")):
        assert load_rows(source, COLUMNS) == rows  # its one split is the default, train
        with pytest.raises(ValueError, match=f"{kind}, without splits: the 'test_prefs' split is for a saved"):
            load_rows(source, COLUMNS, split="test_prefs")


def test_word_tokenizer_round_trip(tmp_path):
    tok = WordTokenizer.build(["The movie was GREAT , really great .", "it's late"])
    ids = tok.encode("the movie was great , really great .")
    assert tok.decode(ids) == "the movie was great , really great ."
    assert tok.encode("the zebra")[1] == tok.unk_id
    assert tok.decode([tok.bos_id, *tok.encode("it's late"), tok.eos_id, *tok.encode("movie")]) == "it's late"
    tok.save(tmp_path / "tok.json")
    assert WordTokenizer.load(tmp_path / "tok.json").vocabulary == tok.vocabulary


def _saved_test_split_only(path):
    import datasets

    rows = [{"prompt": "the movie was", "chosen": "great .", "rejected": "bad ."}]
    datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)}).save_to_disk(str(path))
    return path


def _no_rows(save):
    def write(path):
        import datasets

        save(datasets.Dataset.from_dict({"prompt": [], "chosen": [], "rejected": []}), path)

    return write


@pytest.mark.parametrize(
    "name,content,match",
    [
        ("empty.jsonl", "", r"empty\.jsonl: the file is empty"),
        ("none_saved", _no_rows(lambda d, p: d.save_to_disk(str(p))), r"none_saved: the dataset has no rows"),
        (
            "none_dict",
            _no_rows(lambda d, p: __import__("datasets").DatasetDict({"train": d}).save_to_disk(str(p))),
            r"none_dict: the dataset has no rows",
        ),
        ("none.parquet", _no_rows(lambda d, p: d.to_parquet(str(p))), r"none\.parquet: the dataset has no rows"),
        ("blank.jsonl", "\n  \n", r"blank\.jsonl: the file is empty"),
        ("bad.jsonl", '{"prompt": "a", "chosen": "b", "rejected": "c"}\n{x\n', r"bad\.jsonl, line 2: not valid JSON"),
        ("lists.jsonl", '["a", "b", "c"]\n["d", "e", "f"]\n', r"lists\.jsonl, line 1: an array, where each line must"),
        ("empty.parquet", "", r"empty\.parquet: the file is empty"),
        (
            "latin1.jsonl",
            '{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": "caf\xe9", "chosen": "b", "rejected": "c"}\n',
            r"latin1\.jsonl, line 2: not UTF-8 text \(byte 0xe9\)",
        ),
        ("saved", _saved_test_split_only, r"saved: a saved DatasetDict without a 'train' split; it has \['test'\]"),
    ],
)
def test_load_rows_names_the_file_and_the_problem(tmp_path, name, content, match):
    path = tmp_path / name
    if callable(content):
        content(path)
    else:
        path.write_text(content, encoding="latin-1" if name.startswith("latin1") else "utf-8")
    with pytest.raises(ValueError, match=match):
        load_rows(path, ("prompt", "chosen", "rejected"))


@pytest.mark.parametrize("name", ["prefs[v2].jsonl", "old*.jsonl", "run?.parquet"])
def test_load_rows_reads_the_named_file_not_a_glob_pattern(tmp_path, name):
    pd = pytest.importorskip("pandas")

    def write(file_name, tag):
        rows = [{"prompt": tag, "chosen": "c", "rejected": "r"}]
        if file_name.endswith(".parquet"):
            pd.DataFrame(rows).to_parquet(tmp_path / file_name)
        else:
            (tmp_path / file_name).write_text(json.dumps(rows[0]) + "\n")

    suffix = Path(name).suffix
    write(name, "the named file")
    for other in ("prefs2", "old_backup", "run1"):  # names the pattern would match
        write(other + suffix, "another file")
    assert [r["prompt"] for r in load_rows(tmp_path / name, COLUMNS)] == ["the named file"]


def test_load_rows_reads_a_file_replaced_with_the_same_modification_time(tmp_path):
    """datasets' cache keys a file by name and modification time; cp -p and rsync -a keep the time."""
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps({"prompt": "old", "chosen": "c", "rejected": "r"}) + "\n")
    stat = path.stat()
    assert load_rows(path, COLUMNS)[0]["prompt"] == "old"
    path.write_text(json.dumps({"prompt": "new, and longer", "chosen": "c", "rejected": "r"}) + "\n")
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert load_rows(path, COLUMNS)[0]["prompt"] == "new, and longer"
