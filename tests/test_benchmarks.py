"""Smoke runs of the benchmark commands on the CPU: they run, print every method, and plot (numbers are not checked
here: they belong to benchmarks/RESULTS.md)."""

from __future__ import annotations

import json
import os
import re
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
    for method in ("two forwards", "MeZO published", *zokern, "AdamW (first order)", "two forwards, again"):
        assert f"| {method} |" in text, method


def test_step_table_takes_the_faster_floor_and_calls_a_step_below_its_own_floor_noise():
    """The floor is timed first and again last; a graphed step is held to the graphed floor (launches replayed)."""
    import argparse

    from benchmarks import step

    def rows(times):
        return [dict(method=m, ms=ms, peak_gib=None, status="ok", model="tiny", params=10**6, batch=1, seq=8,
                     dtype="bfloat16", largest_param_gib=0.001) for m, ms in times]  # fmt: skip

    args = argparse.Namespace(model="tiny", batch=1, seq=8, dtype="bfloat16", steps=1, warmup=0, device="cpu")
    times = [("two forwards", 20.0), ("two forwards, graphed", 8.0), ("zokern ZOSGD cuda inplace", 25.0),
             ("zokern ZOSGD cuda inplace graphed", 9.0), ("two forwards, again", 10.0)]  # fmt: skip
    text = step.table(rows(times), args)
    assert "| zokern ZOSGD cuda inplace | 25.00 | 320 | - | - | 2.50 |" in text  # against the faster floor, 10 ms
    assert "Not a result" not in text  # the graphed step is above its own floor
    text = step.table(rows([("two forwards", 10.0), ("MeZO published", 8.0), ("zokern ZOSGD cpu inplace", 9.0)]), args)
    assert "Not a result: MeZO published, zokern ZOSGD cpu inplace timed below" in text


def test_step_benchmarks_adamw_is_fused_on_the_devices_torch_has_fused_kernels_for():
    from benchmarks import step

    assert {"cuda", "cpu"} <= set(step.fused_devices()) and "meta" not in step.fused_devices()


def test_step_benchmark_writes_its_rows_when_the_forward_fails(monkeypatch, tmp_path):
    """A forward that cannot run (out of memory) fails every row with its status; the table is still written."""
    from benchmarks import step

    monkeypatch.setattr(step, "RESULTS", tmp_path / "RESULTS.md")
    monkeypatch.setattr(step, "JSONL", tmp_path / "rows.jsonl")
    build = step.build

    def failing_forward(*args, **kwargs):
        model = build(*args, **kwargs)
        model.forward = lambda *a, **k: (_ for _ in ()).throw(RuntimeError("out of memory (simulated)"))
        return model

    monkeypatch.setattr(step, "build", failing_forward)
    step.main(["--model", "tiny", "--device", "cpu", "--batch", "1", "--seq", "8", "--steps", "1", "--warmup", "0",
               "--backends", "cpu", "--skip-adamw"])  # fmt: skip
    status = {r["method"]: r["status"] for r in map(json.loads, (tmp_path / "rows.jsonl").read_text().splitlines())}
    assert status["two forwards"].startswith("RuntimeError: out of memory")
    assert "| two forwards | RuntimeError" in (tmp_path / "RESULTS.md").read_text()


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


def test_each_model_is_plotted_from_its_newest_run_only(tmp_path):
    """A newer run that skipped a method (or failed it, or ran another dtype) does not borrow the older run's point."""
    from benchmarks.plot_step import load

    def rows(run, dtype, methods, model="opt-a"):
        return [
            dict(
                run=run,
                model=model,
                method=m,
                ms=ms,
                peak_gib=None,
                params=1e8,
                device="cuda",
                batch=1,
                seq=8,
                dtype=dtype,
                date="2026-12-01",
            )  # fmt: skip
            for m, ms in methods
        ]

    old = rows("r1", "bfloat16", [("two forwards", 10.0), ("MeZO published", 100.0), ("AdamW (first order)", 60.0)])
    other_dtype = rows("r2", "float32", [("two forwards", 20.0), ("AdamW (first order)", 90.0)])
    new = rows("r3", "bfloat16", [("two forwards", 9.0), ("MeZO published", 95.0), ("AdamW (first order)", None)])
    # Rows written before runs carried an id: consecutive, each run starting with its "two forwards" row.
    legacy = [
        {k: v for k, v in r.items() if k != "run"} for r in rows("", "bfloat16", [("two forwards", 5.0)], "opt-b")
    ]
    legacy += [
        {k: v for k, v in r.items() if k != "run"} for r in rows("", "bfloat16", [("MeZO published", 7.0)], "opt-b")
    ]
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in old + legacy + other_dtype + new))
    latest = load(data, "cuda", batch=1, seq=8, family="opt")
    assert {m: r["ms"] for m, r in latest["opt-a"].items()} == {"two forwards": 9.0, "MeZO published": 95.0}
    assert {m: r["ms"] for m, r in latest["opt-b"].items()} == {"two forwards": 5.0, "MeZO published": 7.0}
    assert set(load(data, "cuda", batch=1, seq=8, family="opt", dtype="float32")) == {"opt-a"}


def test_old_runs_without_ids_stay_apart_when_their_first_row_is_dropped(tmp_path):
    """Rows from before run ids: each run starts at its "two forwards" row, kept or not (failed: ms None)."""
    from benchmarks.plot_step import load

    def row(method, ms, date):
        return dict(model="opt-a", method=method, ms=ms, peak_gib=None, params=1e8, device="cuda", batch=1, seq=8,
                    dtype="bfloat16", date=date)  # fmt: skip

    rows = [row("two forwards", None, "2026-11-01"), row("zokern ZOSGD cuda inplace", 50.0, "2026-11-01")]
    rows += [row("two forwards", None, "2026-11-02"), row("MeZO published", 90.0, "2026-11-02")]
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert {m: r["ms"] for m, r in load(data, "cuda", batch=1, seq=8, family="opt")["opt-a"].items()} == {
        "MeZO published": 90.0
    }


@pytest.mark.parametrize(
    "option,match",
    [
        (("--steps", "0"), "--steps must be at least 1"),
        (("--seq", "1"), r"--seq must be in \[2, 2048\]"),
        (("--seq", "3000"), r"--seq must be in \[2, 2048\] for tiny, got 3000"),
        (("--batch", "0"), "--batch must be at least 1"),
        # A traceback, or (a backend name mistyped) rows of error text appended to RESULTS.md with exit status 0.
        (("--device", "foo"), "--device 'foo' is not a torch device"),
        (("--device", "meta"), "--device meta: this benchmark runs on the CPU or on an available CUDA GPU"),
        (("--backends", "cpu,bogus"), r"--backends bogus: not a zokern backend \(cuda, triton, cpu, torch\)"),
    ],
)
def test_step_benchmark_refuses_shapes_it_cannot_measure(option, match, capsys):
    from benchmarks import step

    with pytest.raises(SystemExit) as exit_:
        step.main(["--model", "tiny", "--device", "cpu", "--no-append", *option])
    assert exit_.value.code == 2
    assert re.search(match, capsys.readouterr().err)


@pytest.mark.parametrize("device,selected", [("cuda", None), ("cuda:1", "cuda:1")])
def test_step_benchmark_makes_an_indexed_cuda_device_current(monkeypatch, device, selected):
    """Plain "cuda" is the current device (torch.cuda.set_device refuses a device without an index)."""
    import torch

    from benchmarks import step

    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: calls.append(str(d)))
    monkeypatch.setattr(step, "measure", lambda args, rows: None)
    assert step.main(["--model", "tiny", "--device", device, "--no-append"]) == 0
    assert calls == ([] if selected is None else [selected])


@pytest.mark.parametrize("option", [("--dtypes", "bf16"), ("--elements", "0")])
def test_kernel_benchmark_refuses_bad_options(option, capsys):
    from benchmarks import kernels_gpu

    with pytest.raises(SystemExit) as exit_:
        kernels_gpu.main(["--device", "cpu", "--no-append", *option])
    assert exit_.value.code == 2 and ("bf16" in capsys.readouterr().err or option[0] == "--elements")


def test_timer_syncs_and_reads_the_peak_of_its_own_device(monkeypatch):
    """cuda:1 is timed on cuda:1, not on the current device (0)."""
    import torch

    from benchmarks.step import Timer

    calls = []
    for name in ("synchronize", "reset_peak_memory_stats"):
        monkeypatch.setattr(torch.cuda, name, lambda device=None, name=name: calls.append((name, str(device))))
    monkeypatch.setattr(
        torch.cuda, "max_memory_allocated", lambda device=None: calls.append(("peak", str(device))) or 0
    )
    Timer("cuda:1", steps=1, warmup=0)(lambda t: None)
    assert calls and all(device == "cuda:1" for _, device in calls)


def test_the_mezo_baseline_syncs_before_its_reset_pass(monkeypatch):
    """MeZO's zo_step reads the projected gradient (.item()) and then resets the parameters: the order a GPU's host
    pays for (the reset pass's launches come after the sync)."""
    import torch

    from zokern import baselines

    events = []
    seed, item = torch.manual_seed, torch.Tensor.item
    monkeypatch.setattr(torch, "manual_seed", lambda s: events.append("seed") or seed(s))
    monkeypatch.setattr(torch.Tensor, "item", lambda t: events.append("item") or item(t))
    monkeypatch.setattr(torch.Tensor, "__float__", lambda t: events.append("float") or item(t))
    w = torch.randn(5)
    modes = []
    loss = baselines.mezo_published_step(
        [w], lambda: modes.append(torch.is_inference_mode_enabled()) or (w**2).sum(), seed=1, eps=1e-3, lr=1e-3
    )
    assert events == ["seed", "seed", "item", "seed", "seed"]  # one sync: zo_step returns loss1 as a tensor
    assert isinstance(loss, torch.Tensor) and modes == [True, True]  # zo_forward's inference mode


def test_the_mezo_baseline_decays_weights_as_mezo_by_name():
    """zo_update skips weight decay for names holding bias, layer_norm or layernorm; unnamed parameters decay."""
    import torch

    from zokern import baselines

    names = ["fc.weight", "fc.bias", "layers.0.self_attn_layer_norm.weight", "final_layernorm.weight"]
    start = [torch.randn(6, generator=torch.Generator().manual_seed(k)) for k in range(4)]
    params = [t.clone() for t in start]
    lr, wd, eps = 0.1, 0.5, 1e-3
    baselines.mezo_published_step(list(zip(names, params)), lambda: sum((p**3).sum() for p in params), 7, eps, lr, wd)
    # The same step by hand, from MeZO's formulas.
    perturbed = [t.clone() for t in start]
    zs = []
    torch.manual_seed(7)
    for t in perturbed:
        zs.append(torch.normal(mean=0, std=1, size=t.size(), dtype=t.dtype))
    plus = sum(((t + z * eps) ** 3).sum() for t, z in zip(start, zs))
    minus = sum(((t + z * eps - 2 * z * eps) ** 3).sum() for t, z in zip(start, zs))
    g = float((plus - minus) / (2 * eps))
    for name, t, z, p in zip(names, start, zs, params):
        decay = 0.0 if any(k in name for k in ("bias", "layer_norm", "layernorm")) else wd
        theta = t + z * eps - 2 * z * eps + z * eps
        torch.testing.assert_close(p, theta - lr * (g * z + decay * theta), rtol=1e-5, atol=1e-6)


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
