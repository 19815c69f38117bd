"""The command line: `zokern info` reports the backends, `zokern demo` fine-tunes and times the passes."""

import os
import re
import subprocess
import sys


def _run(*args: str) -> str:
    env = {k: v for k, v in os.environ.items() if k != "ZOKERN_BACKEND"}
    out = subprocess.run([sys.executable, "-m", "zokern", *args], capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def test_info_lists_every_backend():
    text = _run("info")
    for name in ("cuda", "triton", "cpu", "torch"):
        assert re.search(rf"\b{name}\b", text), name


def test_demo_lowers_the_loss_and_times_both_loops():
    text = _run("demo", "--steps", "120")
    start, end = map(float, re.search(r"loss ([\d.]+) -> ([\d.]+)", text).groups())
    assert end < 0.8 * start
    assert "MeZO's published loop" in text and "ZOSGD.step" in text
