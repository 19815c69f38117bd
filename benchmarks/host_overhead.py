"""Host time zokern itself spends per pass call and per optimizer step, with the backend's kernels replaced by no-ops:

    python -m benchmarks.host_overhead [--calls N] [--steps N]

The exact mode (16-bit default) materialises each large parameter once per forward, so its per-call host time is
paid about 300 times per OPT-1.3B step; on a GPU it is hidden only while the host stays ahead of the device. Prints
the exact mode's per-parameter materialisation against the same call through zokern.ops (its former path, with the
backend resolved per call), and the cost of choosing a backend, cached and resolved, in one process, interleaved.

Then a whole in-place ZOSGD step (three passes) over OPT-1.3B's 388 parameter tensors, small ones, so that only the
host's work is timed, in one param group and in a group per tensor; next to it torch's own foreach SGD and AdamW
steps over the same tensors (gradients set), as a yardstick of what a host spends per step on that many tensors. A
loop that reads the loss every step (a host sync) leaves the GPU idle while the host prepares the next step's first
pass.
"""

from __future__ import annotations

import argparse
import cProfile
import functools
import pstats
import time

import torch

import zokern._native
import zokern._native_copy
from zokern import _dispatch
from zokern import ops
from zokern.optim import ZOSGD
from zokern.optim.exact import ParameterUse
from zokern.optim.exact import PerturbedView


def per_call_us(fn, n: int) -> float:
    for _ in range(min(n, 500)):
        fn()
    best = float("inf")
    for _ in range(5):
        begin = time.perf_counter()
        for _ in range(n):
            fn()
        best = min(best, (time.perf_counter() - begin) / n * 1e6)
    return best


def python_calls(fn, n: int = 1000) -> float:
    profile = cProfile.Profile()
    profile.enable()
    for _ in range(n):
        fn()
    profile.disable()
    return pstats.Stats(profile).total_calls / n


OPT_1_3B_TENSORS = 388


def step_host_times(steps: int) -> dict[str, float]:
    """µs per step, host only: a ZOSGD step's passes reach the no-op kernels; torch's optimizers do their math on
    16-element tensors, which costs the host about what launching it on a GPU would."""
    params = [torch.nn.Parameter(torch.randn(16)) for _ in range(OPT_1_3B_TENSORS)]
    loss = torch.tensor(1.0)
    times = {}
    for merge in (False, True):
        opt = ZOSGD(params, lr=1e-3, eps=1e-3, backend="cpu", merge_steps=merge)
        times[f"ZOSGD step{', merge_steps' if merge else ''}"] = per_call_us(
            functools.partial(opt.step, lambda: loss), steps
        )
    # One param group per tensor (some fine-tuning recipes build them so): equal values, or a learning rate per
    # layer (layer-wise decay over OPT-1.3B's 24 layers).
    for name, lr in (("one lr", lambda k: 1e-3), ("24 lrs", lambda k: 1e-3 * 0.9 ** (k * 24 // len(params)))):
        groups = [{"params": [p], "lr": lr(k)} for k, p in enumerate(params)]
        opt = ZOSGD(groups, eps=1e-3, backend="cpu")
        times[f"ZOSGD step, a group per tensor, {name}"] = per_call_us(functools.partial(opt.step, lambda: loss), steps)
    for p in params:
        p.grad = torch.randn_like(p)
    for name, cls in (("torch.optim.SGD", torch.optim.SGD), ("torch.optim.AdamW", torch.optim.AdamW)):
        times[f"{name}(foreach=True) step"] = per_call_us(cls(params, lr=1e-3, foreach=True).step, steps)
    return times


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=20000, help="calls per timing (best of 5)")
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps per timing (best of 5)")
    args = parser.parse_args(argv)
    n = args.calls
    zokern._native_copy.zo_copy_pass_ = lambda *args, **kwargs: None  # host time only
    zokern._native.zo_pass_ = lambda *args, **kwargs: None
    param = torch.nn.Parameter(torch.randn(16))
    uses = {id(param): ParameterUse(param, 1000, 0)}
    view = PerturbedView(uses, {5: [1e-3]}, dict(distribution="gaussian", backend="cpu"))
    use = [uses[id(param)]]

    def through_ops():
        sources = [param.detach()]
        outs = [torch.empty_like(sources[0], memory_format=torch.contiguous_format)]
        _dispatch._selected.clear()
        ops.perturb_into_(outs, sources, 5, 1e-3, offsets=[1000], distribution="gaussian", backend="cpu")

    cpu = torch.device("cpu")
    for _ in range(3):
        print(
            f"materialise one parameter: {per_call_us(lambda: view.materialise(use), n):.1f} us "
            f"({python_calls(lambda: view.materialise(use)):.0f} Python calls); through zokern.ops: "
            f"{per_call_us(through_ops, n):.1f} us ({python_calls(through_ops):.0f} calls); choosing a backend: "
            f"cached {per_call_us(lambda: _dispatch.select_backend(cpu, 'cpu', 'zo_copy_pass_'), n):.1f} us, "
            f"resolved {per_call_us(lambda: _dispatch._resolve(cpu, 'cpu', 'zo_copy_pass_'), n):.1f} us"
        )
    for _ in range(3):
        times = step_host_times(args.steps)
        print(
            f"{OPT_1_3B_TENSORS} tensors, host time per step: " + "; ".join(f"{k} {v:.0f} us" for k, v in times.items())
        )


if __name__ == "__main__":
    main()
