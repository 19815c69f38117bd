"""The command line: `zokern info` reports the backends, `zokern quickstart` fine-tunes and times the passes, and
`zokern demo` runs the preference pipeline."""

import json
import math
import os
import re
import subprocess
import sys

import pytest


def _run(*args: str) -> str:
    env = {k: v for k, v in os.environ.items() if k != "ZOKERN_BACKEND"}
    out = subprocess.run([sys.executable, "-m", "zokern", *args], capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def test_info_lists_every_backend():
    text = _run("info")
    for name in ("cuda", "triton", "cpu", "torch"):
        assert re.search(rf"\b{name}\b", text), name


def test_quickstart_lowers_the_loss_and_times_both_loops():
    text = _run("quickstart", "--steps", "120")
    start, end = map(float, re.search(r"loss ([\d.]+) -> ([\d.]+)", text).groups())
    assert end < 0.8 * start
    assert "MeZO's published loop" in text and "ZOSGD.step" in text


def test_demo_runs_the_preference_pipeline(tmp_path):
    pytest.importorskip("vaderSentiment")
    pytest.importorskip("datasets")
    out = tmp_path / "run"
    text = _run("demo", "--out", str(out), "--forwards", "8", "--methods", "zopro,mezo,ldsd", "--seed", "1")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert {r["method"] for r in records} == {"zopro", "mezo", "ldsd"}
    assert all({"method", "step", "reward", "seconds", "forwards"} <= set(r) for r in records)
    assert (out / "reward.png").read_bytes().startswith(b"\x89PNG")
    assert "ldsd_interplay.png" in (out / "viz" / "index.html").read_text()  # the run's sketch plots
    assert "judged reward on" in text


def _local_model(directory):
    """A small OPT with random weights and a word-level fast tokenizer, saved like a downloaded model."""
    import torch
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
    torch.manual_seed(0)
    transformers.OPTForCausalLM(policy_config(len(words), max_positions=128)).save_pretrained(directory)
    fast.save_pretrained(directory)
    return fast


def test_demo_runs_a_local_hugging_face_model(tmp_path):
    pytest.importorskip("vaderSentiment")
    pytest.importorskip("datasets")
    _local_model(tmp_path / "model")
    out = tmp_path / "run"
    text = _run("demo", "--model", str(tmp_path / "model"), "--out", str(out), "--forwards", "8", "--methods", "mezo")
    assert f"policy: {tmp_path / 'model'}" in text and "on cpu" in text
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert {r["method"] for r in records} == {"mezo"} and records[-1]["forwards"] == 8


def test_hf_tokenizer_adapter_decodes_up_to_the_end_of_sequence(tmp_path):
    from zokern.preference.local import HFTokenizer

    tok = HFTokenizer(_local_model(tmp_path / "model"))
    ids = tok.encode("the weather was fine")
    assert tok.decode([tok.bos_id, *ids, tok.eos_id, *tok.encode("sad")]) == "the weather was fine"
    assert len(tok) > len(ids) and tok.pad_id != tok.eos_id


def test_demo_reports_a_missing_model_directory(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "ZOKERN_BACKEND"}
    out = subprocess.run(
        [sys.executable, "-m", "zokern", "demo", "--model", str(tmp_path / "nowhere"), "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert out.returncode == 2 and "no such directory" in out.stderr


def test_demo_rejects_unknown_methods(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "ZOKERN_BACKEND"}
    out = subprocess.run(
        [sys.executable, "-m", "zokern", "demo", "--out", str(tmp_path), "--methods", "ppo"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert out.returncode == 2 and "--methods takes some of" in out.stderr


def test_dpo_command_trains_on_a_preference_file(tmp_path):
    pytest.importorskip("vaderSentiment")
    pytest.importorskip("datasets")
    from zokern.preference.data import make_demo_data

    make_demo_data(tmp_path / "data", seed=2, prompts=120, corpus=10)
    out = tmp_path / "dpo"
    _run("dpo", "--data", str(tmp_path / "data" / "preferences.jsonl"), "--out", str(out), "--steps", "8")
    records = [json.loads(line) for line in (out / "dpo_metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 2, 4, 6, 8]
    assert records[0]["dpo_loss"] == pytest.approx(math.log(2), abs=1e-6)


def test_dpo_command_names_missing_columns(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "chosen": "b"}\n')
    env = {k: v for k, v in os.environ.items() if k != "ZOKERN_BACKEND"}
    out = subprocess.run(
        [sys.executable, "-m", "zokern", "dpo", "--data", str(bad), "--out", str(tmp_path / "o")],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert out.returncode == 2 and "zokern dpo:" in out.stderr and "missing column(s) ['rejected']" in out.stderr
    assert "Traceback" not in out.stderr
