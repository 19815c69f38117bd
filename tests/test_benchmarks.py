"""Smoke runs of the benchmark commands on the CPU: they run, print every method, and plot (numbers are not checked
here: they belong to benchmarks/RESULTS.md)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytest.importorskip("transformers")


def _run(*args: str) -> str:
    env = {k: v for k, v in os.environ.items() if k != "ZOKERN_BACKEND"}
    out = subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def test_step_benchmark_compares_every_method_on_a_tiny_model():
    text = _run(
        "benchmarks.step", "--model", "tiny", "--device", "cpu", "--batch", "1", "--seq", "8",
        "--steps", "1", "--warmup", "0", "--backends", "cpu", "--no-append",
    )  # fmt: skip
    zokern = [f"zokern ZOSGD cpu {mode}" for mode in ("inplace", "inplace merged", "exact")]
    for method in ("two forwards", "MeZO published", *zokern, "AdamW (first order)"):
        assert f"| {method} |" in text, method


def test_step_benchmark_keeps_what_it_measured_when_a_method_fails_or_time_runs_out(monkeypatch, capsys, tmp_path):
    """A GPU call is stopped at its limit with SIGINT, and one method may fail: the other rows are still written."""
    from benchmarks import step

    monkeypatch.setattr(step, "RESULTS", tmp_path / "RESULTS.md")
    monkeypatch.setattr(step, "JSONL", tmp_path / "rows.jsonl")
    real = step.ZOSGD

    def failing_merge(*args, merge_steps=False, **kwargs):
        if merge_steps:
            raise RuntimeError("a method's own failure")
        return real(*args, **kwargs)

    monkeypatch.setattr(step, "ZOSGD", failing_merge)
    monkeypatch.setattr(step.torch.optim, "AdamW", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    argv = ["--model", "tiny", "--device", "cpu", "--batch", "1", "--seq", "8", "--steps", "1", "--warmup", "0"]
    with pytest.raises(KeyboardInterrupt):  # the time limit, reached at the last method
        step.main([*argv, "--backends", "cpu"])
    rows = [json.loads(line) for line in (tmp_path / "rows.jsonl").read_text().splitlines()]
    status = {r["method"]: r["status"] for r in rows}
    assert status["zokern ZOSGD cpu inplace merged"] == "RuntimeError: a method's own failure"
    assert status["zokern ZOSGD cpu exact"] == "ok" and "AdamW (first order)" not in status
    assert "| zokern ZOSGD cpu exact |" in (tmp_path / "RESULTS.md").read_text()


def test_kernel_benchmark_checks_and_times_every_op(monkeypatch, capsys):
    """The GPU script's CPU smoke run (C++ backend), in process on small shapes: correctness check, every op per dtype
    and distribution, the flat-buffer rows and MeZO's pass."""
    from benchmarks import kernels_gpu

    monkeypatch.setattr(kernels_gpu, "opt_1_3b_shapes", lambda: [(64, 32), (32,), (100, 7)])
    assert kernels_gpu.main(["--device", "cpu", "--no-append"]) == 0
    text = capsys.readouterr().out
    assert "Correctness on device: all passed" in text
    ops = ("perturb_", "restore_update_ (device g)", "restore_update_ + next perturbation", "two_seed_")
    for dtype in ("bfloat16", "float32"):
        for op in (*ops, "perturb_, one flat tensor"):
            for z in ("gaussian", "rademacher"):
                assert f"| {op} | {dtype} | cpu | {z} |" in text, (op, dtype, z)
        assert f"| MeZO torch.normal pass (baseline) | {dtype} | torch | gaussian |" in text
    assert "| perturb_ stochastic rounding | bfloat16 | cpu | gaussian |" in text


def test_kernel_benchmark_writes_what_it_measured_when_stopped(monkeypatch, capsys, tmp_path):
    from benchmarks import kernels_gpu

    monkeypatch.setattr(kernels_gpu, "RESULTS", tmp_path / "RESULTS.md")
    monkeypatch.setattr(kernels_gpu, "opt_1_3b_shapes", lambda: [(64, 32), (32,)])
    monkeypatch.setattr(kernels_gpu, "mezo_pass", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):  # a time limit's SIGINT, at the last row of the first dtype
        kernels_gpu.main(["--device", "cpu", "--dtypes", "bfloat16"])
    written = (tmp_path / "RESULTS.md").read_text()
    assert "Correctness on device: not reached" in written and "| two_seed_ | bfloat16 | cpu | rademacher |" in written


def test_host_overhead_benchmark_runs():
    text = _run("benchmarks.host_overhead", "--calls", "50", "--steps", "5")
    assert text.count("materialise one parameter:") == 3 and "resolved" in text
    assert text.count("388 tensors, host time per step: ZOSGD step ") == 3 and "AdamW(foreach=True) step" in text


def test_drift_benchmark_shows_exact_mode_without_drift():
    text = _run("benchmarks.drift", "--steps", "3", "--batch", "1", "--seq", "8", "--no-append")
    exact = next(line for line in text.splitlines() if line.startswith("| zokern exact"))
    assert "| 0.00% | 0.000e+00 |" in exact


def test_plot_of_step_results(tmp_path):
    from benchmarks.plot_step import load

    rows = [
        dict(model=m, method=method, ms=ms, peak_gib=gib, params=n, device="cuda", batch=batch, seq=8)
        for m, n, batch in (("opt-a", 1e8, 1), ("opt-b", 1e9, 1), ("opt-c", 3e9, 16), ("llama-d", 2e9, 1))
        for method, ms, gib in (
            ("MeZO published", 100.0, 2.0),
            ("zokern ZOSGD cuda inplace", 30.0, 1.9),
            ("zokern ZOSGD cuda exact", 32.0, 2.1),
            ("AdamW (first order)", 60.0, 6.0),
        )
    ]
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    # One curve is one batch shape and one family: another batch or architecture is not a point on it.
    assert sorted(load(data, "cuda", batch=1, seq=8, family="opt")) == ["opt-a", "opt-b"]
    out = tmp_path / "plot.png"
    _run("benchmarks.plot_step", "--device", "cuda", "--data", str(data), "--seq", "8", "--out", str(out))
    assert out.read_bytes().startswith(b"\x89PNG")


def test_ldsd_overhead_benchmark_times_every_method():
    text = _run(
        "benchmarks.ldsd", "--shapes", "tiny", "--device", "cpu", "--steps", "1", "--warmup", "0", "--no-append"
    )
    for method in ("device copy", "zokern LDSD, K=5, gaussian", "prediction", "zokern ZO-SGD", "MeZO published step"):
        assert f"| {method}" in text or f"|   {method}" in text, method


def test_preference_step_benchmark_times_zo_and_first_order(tmp_path):
    text = _run("benchmarks.preference_step", "--size", "tiny", "--device", "cpu", "--steps", "1",
                "--data", str(tmp_path), "--no-append")  # fmt: skip
    for step in ("rollouts + scoring", "ZO step (ZOSGD", "ZOPrO step", "first-order RLOO step"):
        assert f"| {step}" in text, step
