"""Host time zokern itself spends per pass call, with the backend's kernels replaced by no-ops:

    python -m benchmarks.host_overhead [--calls N]

The exact mode (16-bit default) materialises each large parameter once per forward, so its per-call host time is
paid about 300 times per OPT-1.3B step; on a GPU it is hidden only while the host stays ahead of the device. Prints
the exact mode's per-parameter materialisation against the same call through zokern.ops (its former path, with the
backend resolved per call), and the cost of choosing a backend, cached and resolved, in one process, interleaved.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import time

import torch

import zokern._native_copy
from zokern import _dispatch
from zokern import ops
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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=20000, help="calls per timing (best of 5)")
    n = parser.parse_args(argv).calls
    zokern._native_copy.zo_copy_pass_ = lambda *args, **kwargs: None  # host time only
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


if __name__ == "__main__":
    main()
