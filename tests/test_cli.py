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
