"""Launch zokern's Triton kernels through the package, as on an H100, without a GPU: every launch compiles for sm_90
with the arguments, specialisations and options it is given there, and nothing runs.

The interpreter (TRITON_INTERPRET=1, which the CPU tests use) executes kernels as Python and skips what only the
compiled path does: binding and typing the launch's arguments (i32 or i64 by value, 16-byte alignment hints),
checking its keyword options, and compiling the kernel for exactly that specialisation. Here a stand-in driver
answers "device 0, an sm_90 GPU", each launch stops after compiling (``warmup``), and the optimizers and ops run on
CPU tensors routed to the triton backend. Run by tests/test_triton.py in a process without TRITON_INTERPRET; prints
the compiled kernels' specialisations as JSON.
"""

import collections
import contextlib
import json
import os
import warnings

import torch
from triton.backends.compiler import GPUTarget
from triton.runtime.driver import driver
from triton.runtime.jit import JITFunction

import zokern
from zokern import _scalars
from zokern._dispatch import select_backend
from zokern.kernels import copy_pass
from zokern.kernels import ldsd_pass
from zokern.kernels import options
from zokern.kernels import zo_pass
from zokern.kernels import zopro_pass
from zokern.optim import LDSD
from zokern.optim import ZOSGD
from zokern.preference.directions import ZOPrODirection
from zokern.preference.optim import ZOPrO

KERNEL_MODULES = (zo_pass, copy_pass, ldsd_pass, zopro_pass)


class StandInH100:
    """What the launch path asks of Triton's CUDA driver."""

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)

    def get_active_torch_device(self):
        return torch.device("cpu")


LAUNCHES: collections.Counter[str] = collections.Counter()
_run = JITFunction.run


GUARDED: list[torch.device] = []  # the devices of the options.on_device blocks open
_on_device = options.on_device


@contextlib.contextmanager
def _recorded_on_device(device):
    GUARDED.append(device)
    try:
        with _on_device(device):
            yield
    finally:
        GUARDED.pop()


def _compile_only(self, *args, grid, warmup, **kwargs):
    missing = {k: v for k, v in options.LAUNCH.items() if kwargs.get(k) != v}
    assert not missing, f"{self.fn.__name__} launched without kernels/options.py's {missing}"
    # Triton launches on the current CUDA device: without the guard, tensors on cuda:1 with cuda:0 current.
    assert GUARDED, f"{self.fn.__name__} launched outside kernels/options.on_device(its tensors' device)"
    kernel = _run(self, *args, grid=grid, warmup=True, **kwargs)
    assert kernel is not None and kernel.asm["cubin"], self.fn.__name__
    LAUNCHES[self.fn.__name__] += 1
    return kernel


def route_cpu_tensors_to_compiled_triton() -> None:
    driver.set_active(StandInH100())
    JITFunction.run = _compile_only
    options.on_device = _recorded_on_device
    for module in (zo_pass, ldsd_pass, zopro_pass):  # the GPU's tile sizes (copy_pass takes zo_pass's)
        module.INTERPRETER_BLOCK = module.GPU_BLOCK
    # zokern offers triton for CPU tensors only when interpreted. Every kernel module is imported above, before
    # this: Triton reads the variable when it decorates a kernel, so these stay compiled-mode JITFunctions.
    kernels = [value for m in KERNEL_MODULES for name, value in vars(m).items() if name.endswith("_kernel")]
    assert kernels and all(isinstance(kernel, JITFunction) for kernel in kernels), kernels
    os.environ["TRITON_INTERPRET"] = "1"


def tensors(dtype, sizes=(1000, 37, 4096)):
    return [torch.randn(n).to(dtype) for n in sizes]


def ops_launches() -> None:
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for distribution in ("gaussian", "rademacher"):
            ts = tensors(dtype)
            rounding = "stochastic" if dtype != torch.float32 else "nearest"
            common = dict(distribution=distribution, backend="triton")
            zokern.perturb_(ts, 12345678901, 1e-3, **common)
            zokern.perturb_(ts[1:], 1, 1e-3, offset=2**40 + 3, **common)  # unaligned, 64-bit indices, seed 1
            zokern.restore_update_(ts, 7, 1e-3, 1e-4, 0.5, weight_decay=0.1, rounding=rounding, **common)
            g = torch.tensor(0.25)  # g on the device, with a found-non-finite flag
            found = torch.zeros((), dtype=torch.bool)
            zokern.restore_update_(ts, 7, 1e-3, 1e-4, g, next_seed=8, next_alpha=1e-3, found_nonfinite=found, **common)
            zokern.two_seed_(ts, 3, 1e-3, 4, -1e-3, **common)
            out = [torch.empty_like(t) for t in ts]
            zokern.perturb_into_(out, ts, 5, 1e-3, **common)
            # As a captured CUDA graph launches them: the scalars read from a row on the device (placeholder seeds).
            row = torch.tensor(_scalars.pack(seed=2**40, alpha=1e-3, seed2=9, alpha2=1e-3, lr=1e-4, rounding_seed=3))
            zokern.perturb_(ts, 0, 0.0, scalars=row, **common)
            zokern.restore_update_(ts, 1, 0.0, 0.0, g, next_seed=2, rounding=rounding, scalars=row, **common)
        zokern.gaussian(5, 2**33, 1000, dtype=torch.float32, backend="triton")
    # The raw Philox words (the preference sketch's), counters carrying across 2^32.
    select_backend(torch.device("cpu"), "triton").philox_block_words(2**40 + 1, 0, 2**32 - 3, 8)


def optimizer_launches() -> None:
    torch.manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1)).to(dtype)
        x = torch.randn(8, 16, dtype=dtype)

        def closure(model=model, x=x):
            return model(x).float().pow(2).mean()

        inplace, exact = dict(perturbation="inplace"), dict(perturbation="exact")
        for kwargs in (inplace, exact, dict(inplace, merge_steps=True)):
            if kwargs.get("perturbation") == "exact" and dtype == torch.float32:
                continue
            opt = ZOSGD(model.parameters(), lr=1e-3, eps=1e-3, backend="triton", **kwargs)
            for _ in range(2):
                opt.step(closure)
            if kwargs.get("merge_steps"):
                opt.materialize()
        for update, momentum in (("sgd", 0.0), ("sgd", 0.9), ("adam", 0.0)):
            opt = LDSD(model.parameters(), lr=1e-3, eps=1e-3, k=3, update=update, momentum=momentum, backend="triton")
            for _ in range(2):
                opt.step(closure)


def zopro_launches() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1))
    x = torch.randn(8, 16)
    opt = ZOPrO(model.parameters(), lr=1e-3, eps=1e-3, backend="triton")
    opt.step(lambda: model(x).pow(2).mean())  # before a direction is set: the normalised Gaussian direction
    params = list(model.parameters())
    mus, vhats = [torch.randn_like(p) for p in params], [torch.randn_like(p) for p in params]
    opt.set_direction(ZOPrODirection(mus, vhats, 0.5))
    for _ in range(2):
        opt.step(lambda: model(x).pow(2).mean())


def main() -> None:
    # Nothing runs, so the exact mode's scratch holds garbage and its losses are non-finite: those steps are skipped
    # (with a warning each), which launches the restore-without-update variants too.
    warnings.simplefilter("ignore", RuntimeWarning)
    route_cpu_tensors_to_compiled_triton()
    ops_launches()
    optimizer_launches()
    zopro_launches()
    print(json.dumps(LAUNCHES))


if __name__ == "__main__":
    main()
