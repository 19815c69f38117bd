"""`zokern quickstart`: a small zeroth-order fine-tune that shows the kernel layer working end to end.

A student MLP learns a teacher MLP's function from forward passes only with zokern.optim.ZOSGD (MeZO / two-sided
SPSA), each step being three fused passes: perturb(+eps), perturb(-2 eps), restore-and-update(+eps). The optimizer's
step is then timed against MeZO's published per-parameter loop (global generator, torch.normal per tensor, four
passes) on a larger model, forwards excluded, so the saving shows on whatever machine runs the demo.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
from torch import nn

import zokern
from zokern import _options as options
from zokern.baselines import mezo_published_step
from zokern.optim import ZOSGD


def _mlp(d_in: int, hidden: int, dtype: torch.dtype, device: str) -> nn.Module:
    return nn.Sequential(
        nn.Linear(d_in, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh(), nn.Linear(hidden, 1)
    ).to(device=device, dtype=dtype)


def _teacher_task(d_in: int, n: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    teacher = _mlp(d_in, 16, torch.float32, "cpu")
    for p in teacher.parameters():
        p.data = torch.randn(p.shape, generator=g) * 0.5
    x = torch.randn(n, d_in, generator=g)
    with torch.no_grad():
        y = teacher(x)
    return x.to(device), y.to(device)


def _time_steps(step: Callable[[int], object], steps: int, device: str | None) -> float:
    """Seconds per step. On a GPU the queue is drained around the timed steps: zokern's steps do not sync with the
    host, so the wall clock would otherwise time their launches only."""
    sync = torch.cuda.synchronize if torch.device(device or "cpu").type == "cuda" else lambda: None
    step(0)  # warm-up: JIT compilation, allocator
    sync()
    start = time.perf_counter()
    for s in range(1, steps + 1):
        step(s)
    sync()
    return (time.perf_counter() - start) / steps


def run(
    steps: int = 600, eps: float = 1e-3, lr: float = 2e-3, backend: str | None = None, device: str | None = None
) -> dict[str, float]:
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    print(f"zokern {zokern.__version__}, stream version {zokern.STREAM_VERSION}, device {device}")
    for name, state in zokern.backend_status().items():
        print(f"  backend {name:6s} {state}")

    torch.manual_seed(0)
    x, y = _teacher_task(16, 512, device)
    student = _mlp(16, 64, torch.float32, device)
    params = [p for p in student.parameters()]
    n_params = sum(p.numel() for p in params)

    @torch.no_grad()
    def loss_fn() -> torch.Tensor:
        return nn.functional.mse_loss(student(x), y)

    start_loss = loss_fn().item()
    print(f"\nZO fine-tune: {n_params} parameters in {len(params)} tensors, ZOSGD (eps={eps}, lr={lr}), forwards only")
    print(f"  step {0:5d}  loss {start_loss:.4f}")
    optimizer = ZOSGD(params, lr=lr, eps=eps, seed=0, backend=backend)
    for step in range(1, steps + 1):
        optimizer.step(loss_fn)
        if step % max(1, steps // 6) == 0:
            print(f"  step {step:5d}  loss {loss_fn().item():.4f}")
    end_loss = loss_fn().item()
    print(f"  loss {start_loss:.4f} -> {end_loss:.4f} ({end_loss / start_loss:.1%} of the start)")

    # Perturbation overhead on a larger model of many tensors, forwards excluded.
    big = [nn.Parameter(torch.randn(512, 512, device=device) * 0.02) for _ in range(24)]

    def no_forward() -> torch.Tensor:
        return torch.zeros((), device=device)

    big_optimizer = ZOSGD(big, lr=lr, eps=eps, seed=0, backend=backend)
    fused = _time_steps(lambda s: big_optimizer.step(no_forward), 5, device)
    published = _time_steps(lambda s: mezo_published_step(big, no_forward, s, eps, lr), 5, device)
    print(
        f"\nPerturbation passes per step, {sum(t.numel() for t in big) / 1e6:.1f}M parameters in {len(big)} tensors "
        f"({device}, forwards excluded):"
    )
    print(f"  MeZO's published loop (4 passes, torch.normal): {published * 1e3:8.2f} ms")
    print(
        f"  zokern ZOSGD.step (3 fused passes)           : {fused * 1e3:8.2f} ms  "
        f"(MeZO time / zokern time = {published / fused:.1f})"
    )
    return {"start_loss": start_loss, "end_loss": end_loss, "fused_ms": fused * 1e3, "published_ms": published * 1e3}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--steps", type=options.positive_int, default=600, help="ZO steps of the fine-tune (default 600)"
    )
    parser.add_argument("--eps", type=options.eps, default=1e-3, help="perturbation scale (default 1e-3)")
    parser.add_argument("--lr", type=options.non_negative_float, default=2e-3, help="learning rate (default 2e-3)")
    parser.add_argument(
        "--backend",
        choices=["cuda", "triton", "cpu", "torch"],
        default=None,
        help="force a backend (default: the fastest available)",
    )
    parser.add_argument(
        "--device", type=options.device, default=None, help="cpu or cuda (default: cuda when available)"
    )
