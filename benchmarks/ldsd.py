"""LDSD optimizer overhead: `python -m benchmarks.ldsd [--shapes opt-1.3b|opt-1.3b-lora] [--device D] [--no-append]`.

Times the optimizer alone (the closure returns a fresh random scalar on the device: no forward) on OPT-1.3B's
trainable shapes, full (1.316e9 elements, 388 tensors) or LoRA (r = 8 on q_proj and v_proj: 96 tensors, 1.57e6
elements), float32 as the published LDSD runs: zokern's LDSD (K = 5), zokern's ZO-SGD, and MeZO's published step,
side by side in one run. The published LDSD implementation measured 504.7 ms (full) and 99.2 ms (LoRA) per step on
an H100 with the same method (docs/optim.md); those numbers are quoted, not re-measured.

Prediction printed beside LDSD: its passes move (8 K + 32) bytes per float32 element (first candidate 12, K - 1
switches 8 each, the move to theta - eps z with the projection's reduction 12, the final pass 16), timed against a
device copy of the parameters (8 bytes per element) in the same run.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import sys

import torch

import zokern
from benchmarks import _device
from benchmarks._results import publish
from benchmarks.kernels_gpu import opt_1_3b_shapes
from zokern.baselines import mezo_published_step
from zokern.optim import LDSD
from zokern.optim import ZOSGD

K = 5
PUBLISHED_MS = {"opt-1.3b": 504.7, "opt-1.3b-lora": 99.2}


def lora_shapes(hidden: int = 2048, layers: int = 24, rank: int = 8) -> list[tuple[int, ...]]:
    return [shape for _ in range(layers * 2) for shape in ((rank, hidden), (hidden, rank))]


SHAPES = {"opt-1.3b": opt_1_3b_shapes, "opt-1.3b-lora": lora_shapes, "tiny": lambda: [(256, 64), (64,)] * 4}


def timed_ms(fn, device: torch.device, steps: int, warmup: int) -> float:
    return _device.Timer(device, steps, warmup)(lambda t: fn())[0]


def _copy_ms(numel: int, device: torch.device, steps: int, warmup: int) -> float:
    source = torch.empty(numel, device=device)
    target = torch.empty_like(source)
    return timed_ms(lambda: target.copy_(source), device, steps, warmup)


def measure(
    shapes: str, device: torch.device, steps: int, warmup: int, distribution: str, out: list[tuple[str, float, str]]
) -> None:
    """Append a row (method, ms/step, note) to ``out`` per measurement, as it is made."""
    generator = torch.Generator(device=device).manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, device=device) * 0.02) for s in SHAPES[shapes]()]
    numel = sum(p.numel() for p in params)
    closure = lambda: torch.rand((), device=device, generator=generator)  # noqa: E731
    rows = _Rows(out, f"{numel / 1e6:.2f}M elements, {len(params)} tensors")
    copy_ms = _copy_ms(numel, device, steps, warmup)
    rows.append(("device copy of the parameters (8 B/elem)", copy_ms, "bandwidth reference"))
    ldsd = LDSD(params, lr=1e-7, eps=1e-3, k=K, mu_lr=1e-3, seed=0, distribution=distribution)
    rows.append(
        (f"zokern LDSD, K={K}, {distribution}", timed_ms(lambda: ldsd.step(closure), device, steps, warmup), "")
    )
    rows.append((f"  prediction: passes at copy bandwidth, {8 * K + 32} B/elem", copy_ms * (8 * K + 32) / 8, ""))
    zosgd = ZOSGD(params, lr=1e-7, eps=1e-3, seed=0, distribution=distribution)
    rows.append((f"zokern ZO-SGD, {distribution}", timed_ms(lambda: zosgd.step(closure), device, steps, warmup), ""))
    counter = iter(range(10**9))
    rows.append(
        (
            "MeZO published step",
            timed_ms(lambda: mezo_published_step(params, closure, next(counter), 1e-3, 1e-7), device, steps, warmup),
            "",
        )
    )
    if shapes in PUBLISHED_MS:  # quoted for the OPT-1.3B shapes only
        rows.append(("published LDSD (H100, quoted)", PUBLISHED_MS[shapes], "from the research notes"))


class _Rows:
    """Rows appended to ``out`` as measured (printed too), an empty note standing for the shapes' description."""

    def __init__(self, out: list[tuple[str, float, str]], shapes_note: str) -> None:
        self.out, self.shapes_note = out, shapes_note

    def append(self, row: tuple[str, float, str]) -> None:
        name, ms, note = row
        self.out.append((name, ms, note or self.shapes_note))
        print(f"{name:50s} {ms:9.2f} ms", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", choices=list(SHAPES), default="opt-1.3b")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--distribution", choices=["gaussian", "rademacher"], default="gaussian")
    parser.add_argument("--no-append", action="store_true")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    rows: list[tuple[str, float, str]] = []
    try:
        measure(args.shapes, device, args.steps, args.warmup, args.distribution, rows)
    finally:  # what was measured is written, also when the run is stopped at a time limit
        if rows:
            write(rows, args, argv)
    return 0


def write(rows: list[tuple[str, float, str]], args: argparse.Namespace, argv: list[str] | None) -> None:
    device = torch.device(args.device)
    name = _device.name(device)
    command = " ".join(["python -m benchmarks.ldsd", *(argv if argv is not None else sys.argv[1:])])
    text = (
        f"\n### LDSD optimizer overhead, {args.shapes} shapes, float32, {datetime.date.today()}\n\n"
        f"Device {name}, torch {torch.__version__}, Python {platform.python_version()}, zokern {zokern.__version__}, "
        f"backends {zokern.available_backends()}. Closure: a random device scalar (no forward). Median of "
        f"{args.steps} steps after {args.warmup} warm-up. Command: `{command}`.\n\n"
        "| method | ms/step | note |\n|---|---|---|\n"
        + "".join(f"| {n} | {ms:.2f} | {note} |\n" for n, ms, note in rows)
    )
    publish(text, append=not args.no_append)


if __name__ == "__main__":
    sys.exit(main())
