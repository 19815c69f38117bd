"""GPU check and kernel benchmark:

    python -m benchmarks.kernels_gpu [--elements N] [--dtypes bfloat16,float32] [--no-append]

1. Bandwidth: each op on OPT-1.3B's parameter shapes (1.316e9 elements in 388 tensors; bf16, then fp32) as
   effective GB/s (bytes read + written once) and as a fraction of a device-to-device copy of the same bytes, timed
   in the same run (kernel time: bursts of calls behind a device-side sleep, so the host's work per call is not
   counted); the perturb pass also on one flat tensor of the same elements (a flat parameter buffer against the
   per-dtype multi-tensor launch). MeZO's per-tensor `torch.normal` pass is timed beside them as the baseline.
2. Correctness on the device: the cuda and triton backends against the torch reference (same stream, same pass),
   every dtype, both distributions, every variant (the out-of-place pass included), odd sizes, offsets above 2^31.

Prints each measurement as it is made, then a Markdown table, appended to benchmarks/RESULTS.md with the device,
versions, date and command, also when the run is stopped (a time limit's SIGINT) or fails partway.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

import zokern
from benchmarks import _device
from zokern import _dispatch
from zokern import _reference

RESULTS = Path(__file__).with_name("RESULTS.md")


def opt_1_3b_shapes() -> list[tuple[int, ...]]:
    """Parameter shapes of facebook/opt-1.3b (hidden 2048, 24 layers, ffn 8192, vocab 50272): 1.316e9 elements."""
    h, ffn, layers = 2048, 8192, 24
    shapes: list[tuple[int, ...]] = [(50272, h), (2050, h)]
    for _ in range(layers):
        shapes += [(h, h), (h,)] * 4  # q, k, v, out projections
        shapes += [(h,), (h,)]  # self-attention layer norm
        shapes += [(ffn, h), (ffn,), (h, ffn), (h,)]
        shapes += [(h,), (h,)]  # final layer norm of the block
    shapes += [(h,), (h,)]  # decoder final layer norm
    return shapes


def time_ms(fn: Callable[[], object], device: str, reps: int = 20, warmup: int = 3, trials: int = 3) -> float:
    """Time per call of ``fn``: on a GPU, the median over ``trials`` of ``reps`` back-to-back calls between two CUDA
    events, launched behind a ~2 ms device-side sleep, so that the device never waits for the host (a call's host
    work, ~0.7 ms for 388 tensors, would otherwise be timed as well: this measures the kernels' bandwidth); on the CPU
    (this script's smoke run) the median wall time of ``reps`` single calls."""
    for _ in range(warmup):
        fn()
    if device != "cuda":
        times = []
        for _ in range(reps):
            begin = time.perf_counter()
            fn()
            times.append((time.perf_counter() - begin) * 1e3)
        return statistics.median(times)
    times = []
    for _ in range(trials):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda._sleep(4_000_000)  # clock cycles: the host queues the first calls meanwhile
        start.record()
        for _ in range(reps):
            fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / reps)
    return statistics.median(times)


def copy_time_ms(numel: int, dtype: torch.dtype, device: str) -> float:
    """Median time of a device-to-device copy of ``numel`` elements: the bandwidth floor of an in-place pass."""
    src = torch.empty(numel, device=device, dtype=dtype)
    dst = torch.empty_like(src)
    return time_ms(lambda: dst.copy_(src), device)


# ------------------------------------------------------------------------------------------------- correctness


def check_backend(backend: str, device: str, z_errors: dict[str, float]) -> list[str]:
    """Run every variant on small tensors through ``backend`` and the torch reference; return failures."""
    failures = []
    sizes = (1, 7, 129, 1000, 4097, 70_000)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for distribution in ("gaussian", "rademacher"):
            variants = ("perturb", "update", "update_tensor_g", "nonfinite_g", "two_seed", "stochastic", "into")
            for variant in variants:
                g = torch.Generator().manual_seed(1)
                base = [(torch.randn(n, generator=g) * 0.02 + 0.5).to(dtype).to(device) for n in sizes]
                ours, ref = [t.clone() for t in base], [t.clone() for t in base]
                offset = 2**31 + 5 if variant != "update" else 2**40 + 3
                for ts, be in ((ours, backend), (ref, "torch")):
                    kw = dict(offset=offset, distribution=distribution, backend=be)
                    if variant == "perturb":
                        zokern.perturb_(ts, 3, 1e-3, **kw)
                    elif variant == "update":
                        zokern.restore_update_(ts, 3, 1e-3, 0.1, 0.7, weight_decay=0.01, **kw)
                    elif variant == "update_tensor_g":
                        zokern.restore_update_(ts, 3, 1e-3, 0.1, torch.tensor(0.7, device=device), **kw)
                    elif variant == "nonfinite_g":
                        zokern.restore_update_(ts, 3, 1e-3, 0.1, torch.tensor(float("nan"), device=device), **kw)
                    elif variant == "two_seed":
                        zokern.two_seed_(ts, 3, 1e-3, 4, -2e-3, **kw)
                    elif variant == "into":  # the out-of-place pass (the exact mode's), from a copy into ts
                        zokern.perturb_into_(ts, [t.clone() for t in ts], 3, 1e-3, next_seed=4, next_alpha=-2e-3, **kw)
                    else:
                        zokern.perturb_(ts, 3, 1e-3, rounding="stochastic", rounding_seed=11, **kw)
                for o, r in zip(ours, ref):
                    diff = (o.double() - r.double()).abs()
                    spacing = r.double().abs().clamp_min(1e-30) * torch.finfo(dtype).eps * 2
                    bad = diff > torch.maximum(spacing, torch.full_like(spacing, 2e-7))
                    frac = (diff > 0).double().mean().item() if dtype != torch.float32 else 0.0
                    if bad.any() or frac > 0.02:
                        failures.append(
                            f"{backend} {dtype} {distribution} {variant} n={o.numel()}: "
                            f"{int(bad.sum())} elements beyond one ulp, max diff {diff.max().item():.3g}"
                        )
    for domain in (0, 1, 2):
        words = _dispatch._module(backend).philox_block_words(2**63 - 1, domain, 2**40 - 7, 4099, device)
        if not torch.equal(words.cpu(), _reference.philox_block_words(2**63 - 1, domain, 2**40 - 7, 4099)):
            failures.append(f"{backend}: Philox words differ from the reference (domain {domain})")
    z = zokern.gaussian(5, 2**33, 1 << 22, device=device, backend=backend).double().cpu()
    err = (z - _reference.stream(5, 2**33, 1 << 22, "gaussian")).abs().max().item()
    print(f"  {backend}: max |z - exact| over 4.2e6 Gaussians = {err:.3g}")
    z_errors[backend] = err
    if err > 2.0**-17 * 5.86:
        failures.append(f"{backend}: Gaussian error {err:.3g} beyond the spec's bound")
    return failures


# ---------------------------------------------------------------------------------------------------- timing


def mezo_pass(params: list[torch.Tensor], seed: int, scaling_factor: float, eps: float) -> None:
    """MeZO's published perturbation (zo_perturb_parameters): reseed the global generator, then per tensor
    torch.normal and ``p.data + scaling_factor * z * eps``, out of place (two multiplies and an add)."""
    torch.manual_seed(seed)
    for p in params:
        z = torch.normal(mean=0, std=1, size=p.size(), device=p.device, dtype=p.dtype)
        p.data = p.data + scaling_factor * z * eps


def bench(backends: list[str], n_elements: int | None, dtype: torch.dtype, device: str, rows: list[tuple]) -> None:
    """Append a row (op, dtype, backend, z, ms, GB/s, fraction of copy) to ``rows`` per measurement, as it is made."""
    shapes = opt_1_3b_shapes()
    if n_elements is not None:  # a smaller run for quick checks: one flat tensor
        shapes = [(n_elements,)]
    params = [torch.randn(s, device=device, dtype=dtype) * 0.02 for s in shapes]
    numel = sum(p.numel() for p in params)
    nbytes = 2 * numel * params[0].element_size()  # read once, write once
    copy_ms = copy_time_ms(numel, dtype, device)
    kind = str(dtype).removeprefix("torch.")

    def add(op: str, backend: str, distribution: str, ms: float) -> None:
        rows.append((op, kind, backend, distribution, ms, nbytes / ms / 1e6, copy_ms / ms))
        print(f"  {op:38s} {kind:9s} {backend:7s} {distribution:10s} {ms:8.3f} ms {copy_ms / ms:6.1%} of copy")

    add("device copy", "-", "-", copy_ms)
    g_dev = torch.tensor(0.3, device=device)
    # A tiny lr: the update is computed (lr = 0 leaves it out, docs/stream.md section 5) and the weights barely move
    # over the timed calls.
    lr = 1e-9
    ops: dict[str, Callable[[str, str], None]] = {
        "perturb_": lambda be, d: zokern.perturb_(params, 1, 1e-3, distribution=d, backend=be),
        "restore_update_ (device g)": lambda be, d: zokern.restore_update_(
            params, 1, 1e-3, lr, g_dev, distribution=d, backend=be
        ),
        "restore_update_ + next perturbation": lambda be, d: zokern.restore_update_(
            params, 1, 1e-3, lr, g_dev, next_seed=2, next_alpha=1e-3, distribution=d, backend=be
        ),
        "two_seed_": lambda be, d: zokern.two_seed_(params, 1, 1e-3, 2, -1e-3, distribution=d, backend=be),
    }
    if dtype != torch.float32:  # float32 has no stochastic rounding: the same pass as perturb_
        ops["perturb_ stochastic rounding"] = lambda be, d: zokern.perturb_(
            params, 1, 1e-3, distribution=d, rounding="stochastic", rounding_seed=5, backend=be
        )
        # A step's update pass as the optimizers run it on 16-bit weights (stochastic rounding is their default).
        ops["restore_update_ stochastic rounding"] = lambda be, d: zokern.restore_update_(
            params, 1, 1e-3, lr, g_dev, distribution=d, rounding="stochastic", rounding_seed=5, backend=be
        )
    for backend in backends:
        for distribution in ("gaussian", "rademacher"):
            for name, op in ops.items():
                add(name, backend, distribution, time_ms(lambda op=op, be=backend, d=distribution: op(be, d), device))
    if len(params) > 1:  # the same elements as one flat buffer: one launch either way, tile table or none
        flat = torch.randn(numel, device=device, dtype=dtype) * 0.02
        for backend in backends:
            for distribution in ("gaussian", "rademacher"):
                op = lambda be=backend, d=distribution: zokern.perturb_(flat, 1, 1e-3, distribution=d, backend=be)  # noqa: E731
                add("perturb_, one flat tensor", backend, distribution, time_ms(op, device))
        del flat
    mezo_ms = time_ms(lambda: mezo_pass(params, 1, 1.0, 1e-3), device, reps=5)
    add("MeZO torch.normal pass (baseline)", "torch", "gaussian", mezo_ms)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--device", choices=["cuda", "cpu"], default="cuda", help="cpu: a smoke run of the script with the C++ backend"
    )
    parser.add_argument("--elements", type=int, default=None, help="time one flat tensor of N elements instead")
    parser.add_argument("--dtypes", default="bfloat16,float32", help="comma-separated parameter dtypes to time")
    parser.add_argument("--no-append", action="store_true", help="print only; do not append to RESULTS.md")
    args = parser.parse_args(argv)
    names = args.dtypes.split(",")
    unknown = [n for n in names if n not in ("bfloat16", "float16", "float32")]
    if unknown:
        parser.error(f"--dtypes: unknown {', '.join(unknown)}; choose from bfloat16, float16, float32")
    if args.elements is not None and args.elements < 1:
        parser.error(f"--elements must be positive, got {args.elements}")
    dtypes = [getattr(torch, name) for name in names]
    if args.device == "cuda" and not torch.cuda.is_available():
        print("benchmarks.kernels_gpu needs a CUDA device (--device cpu for a smoke run)", file=sys.stderr)
        return 2
    compiled = ("cuda", "triton") if args.device == "cuda" else ("cpu",)
    backends = [b for b in compiled if b in zokern.available_backends()]
    print(f"backends on this device: {backends}; status: {zokern.backend_status()}")
    # Timings first, then the correctness check (the device tests check the same again): a call stopped at its time
    # limit still brings back the bandwidth rows, and whatever this run measured is written however it ends.
    rows: list[tuple] = []
    failures: list[str] | None = None
    z_errors: dict[str, float] = {}
    try:
        for dtype in dtypes:
            bench(backends, args.elements, dtype, args.device, rows)
            if args.device == "cuda":
                torch.cuda.empty_cache()
        failures = []
        for backend in backends:
            try:
                failures += check_backend(backend, args.device, z_errors)
            except Exception as e:  # its message is the result; the other backend is still checked
                failures.append(f"{backend}: the check raised {type(e).__name__}: {e}")
        for f in failures:
            print("FAIL", f)
    finally:
        write(rows, failures, z_errors, backends, args, argv)
    return 1 if failures else 0


def write(
    rows: list[tuple], failures: list[str] | None, z_errors: dict[str, float], backends: list[str], args, argv
) -> None:
    import importlib.metadata as md

    command = " ".join(["python -m benchmarks.kernels_gpu", *(sys.argv[1:] if argv is None else argv)])
    triton_version = md.version("triton") if "triton" in backends else "-"
    if failures is None:
        correctness = "not reached (the run stopped first)"
    else:
        correctness = "all passed" if not failures else f"{len(failures)} FAILURES"
    header = (
        f"\n### Kernel bandwidth, {datetime.date.today()}\n\n"
        f"Device {_device.name(args.device)}, torch {torch.__version__}, "
        f"triton {triton_version}, "
        f"CUDA {torch.version.cuda}, Python {platform.python_version()}, zokern {zokern.__version__} "
        f"(stream v{zokern.STREAM_VERSION}). Command: `{command}`. "
        f"Elements: {'OPT-1.3B shapes, 1.316e9 in 388 tensors' if args.elements is None else args.elements}. "
        + (
            "Time per call: median of 3 bursts of back-to-back calls behind a device-side sleep (kernel time, not the "
            "host's). "
            if args.device == "cuda"
            else "Time per call: wall time on the CPU. "
        )
        + f"Correctness on device: {correctness}."
        + "".join(f" Worst |z - exact| over 4.2e6 Gaussians, {b}: {e:.2g}." for b, e in z_errors.items())
        + " (docs/stream.md's bound: 2^-17 (1 + |z|) = 7.6e-6 (1 + |z|).)\n\n"
        "| op | dtype | backend | z | ms (median) | GB/s | fraction of copy |\n|---|---|---|---|---|---|---|\n"
    )
    table = header + "".join(
        f"| {o} | {t} | {b} | {d} | {ms:.3f} | {gbs:.0f} | {f:.1%} |\n" for o, t, b, d, ms, gbs, f in rows
    )
    print(table)
    if not args.no_append and rows:
        with RESULTS.open("a") as fh:
            fh.write(table)


if __name__ == "__main__":
    sys.exit(main())
