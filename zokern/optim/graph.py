"""Whole ZO-SGD steps replayed from a CUDA graph: ``ZOSGD(..., cuda_graph=True)``.

A step without host syncs (one probe, no momentum: the losses, g and the skipped flag stay on the device) is a fixed
sequence of kernels: perturb, forward, flip, forward, restore-and-update. After a few ordinary steps, :class:`StepGraph`
captures that sequence once (the closure's forwards included) and replays it each step: one launch of the whole step
instead of hundreds of kernel launches from Python, which matters when a forward is short (small batch, small model).

What changes from step to step reaches the captured kernels through device memory, written before each replay
(an asynchronous copy, no sync): each pass reads its seed, coefficients, learning rate, weight decay and rounding
seed from its row of ``zokern._scalars``. The projected gradient is computed on the device inside the graph. A replayed
step therefore runs the uncaptured step's passes with the same values, lr schedules included (bit for bit given the
same losses; the forwards are captured kernels too, which cuBLAS may choose differently inside a capture); a change
of eps (or of an lr above 1), of the parameters' layout or storage, or of the closure object captures anew.

The closure is replayed as captured: it must read its inputs from the same tensors every step (copy each batch into
them) and must not sync with the host (no ``.item()``, no data-dependent shapes). On the CPU there is nothing to
capture: the same passes run uncaptured every step.
"""

from __future__ import annotations

import sys
import warnings
import weakref
from collections.abc import Callable
from typing import Any

import torch

from zokern import _scalars
from zokern._dispatch import select_backend
from zokern.optim import _distributed
from zokern.optim import seeds as seeds_

# Uncaptured steps before a capture: Triton compiles and cuBLAS sets up its workspace outside the capture.
WARMUP_STEPS = 2


class StepGraph:
    """The captured step of one ZOSGD, for one closure and layout. Holds the optimizer weakly: the graph's memory
    pool (the forwards' activations) goes with the optimizer, without waiting for the garbage collector."""

    def __init__(self, optimizer) -> None:
        self._optimizer = weakref.ref(optimizer)
        self.key: tuple | None = None
        self.closure: Callable[[], Any] | None = None  # held so that id(closure) in the key stays unique
        self.rows: torch.Tensor | None = None
        self.graph: torch.cuda.CUDAGraph | None = None
        self.outputs: dict[str, Any] = {}
        self.loss_device = torch.device("cpu")
        self.keep: list[torch.Tensor] = []  # tables the captured kernels read, kept alive while the graph is
        self.uncaptured = 0
        self.streams: dict[torch.device, torch.cuda.Stream] = {}  # warm-up and capture streams, per device
        self._warned_new_closure = False

    @property
    def opt(self):
        return self._optimizer()

    def run(self, seed: int, evaluate: Callable[[], Any], closure: Callable[[], Any]) -> dict[str, Any]:
        """One step (the record's fields, device tensors): uncaptured during warm-up, then replayed."""
        opt = self.opt
        chunks = opt._device_chunks()
        if not chunks:  # nothing trainable: the losses only, as the ordinary step
            # The graph of the last layout goes with its rows (it reads them by address): a layout made trainable
            # again warms up and captures anew.
            self.key, self.closure, self.graph, self.keep, self.uncaptured = None, None, None, [], 0
            self.rows = torch.zeros((0, _scalars.SLOTS), dtype=torch.int64)
            return self._passes(seed, evaluate)
        device = self._check(chunks)
        key = self._key(closure, chunks)
        host = torch.tensor(self._plan(seed, chunks), dtype=torch.int64)
        if key != self.key:
            new_closure = self.key is not None and key[0] != self.key[0]
            if new_closure and device.type == "cuda" and not self._warned_new_closure:  # the CPU captures nothing
                self._warned_new_closure = True
                warnings.warn(
                    "zokern: cuda_graph=True and step() got another closure object than last step; a graph is "
                    f"captured for a closure passed {WARMUP_STEPS + 1} steps in a row (reuse one closure that reads "
                    "its batch from the same tensors every step)",
                    UserWarning,
                    stacklevel=4,
                )
            self.key, self.closure, self.graph, self.keep, self.uncaptured = key, closure, None, [], 0
            with torch.inference_mode(False):  # a normal tensor: later steps, outside inference mode, write it
                self.rows = torch.zeros(host.shape, dtype=torch.int64, device=device)
        if device.type != "cuda":
            self.rows.copy_(host)
            return self._passes(seed, evaluate)
        with torch.cuda.device(device):  # streams and the capture on the parameters' GPU, whichever is current
            # Pinned, so that the copy is asynchronous; the caching host allocator keeps it until the copy has run.
            self.rows.copy_(host.pin_memory(), non_blocking=True)
            if self.graph is None and self.uncaptured < WARMUP_STEPS:
                self.uncaptured += 1
                return self._warm_up(seed, evaluate, device)
            if self.graph is None:
                self._capture(seed, evaluate, device)
            self.graph.replay()
        opt._loss_device = self.loss_device  # what the closure, not called in a replay, would have set
        return dict(self.outputs)

    def _stream(self, device: torch.device) -> torch.cuda.Stream:
        if device not in self.streams:
            self.streams[device] = torch.cuda.Stream(device)
        return self.streams[device]

    def _warm_up(self, seed: int, evaluate: Callable[[], Any], device: torch.device) -> dict[str, Any]:
        """An uncaptured step on a side stream, as torch advises before a capture."""
        ambient, side = torch.cuda.current_stream(device), self._stream(device)
        side.wait_stream(ambient)
        try:
            with torch.cuda.stream(side):
                return self._passes(seed, evaluate)
        finally:  # also after an exception: the undo passes that follow must come after the step's passes
            ambient.wait_stream(side)

    # ------------------------------------------------------------------------------------------------ helpers

    def _check(self, chunks: list) -> torch.device:
        """The parameters' one device, with what a capture needs checked (clear errors before anything runs)."""
        opt = self.opt
        if opt._exact_now:
            raise ValueError(
                "cuda_graph needs perturbation='inplace': this step runs in the exact mode (the default for 16-bit "
                "parameters), whose evaluations are not captured"
            )
        devices = {p.device for _, _, params, _ in chunks for p in params}
        if len(devices) != 1:
            names = sorted(map(str, devices))
            raise ValueError(f"cuda_graph needs the trainable parameters on one device, got {names}")
        (device,) = devices
        if device.type == "cuda":
            if _distributed.active():
                raise ValueError("cuda_graph does not capture the all_reduce of data-parallel losses: one rank only")
            impl = select_backend(device, opt.backend)
            reads = getattr(impl, "reads_device_scalars", None)
            if reads is None or not reads(device):
                raise ValueError(
                    f"cuda_graph needs a backend whose kernels read their scalars from device memory (cuda or "
                    f"triton), got {impl.__name__}"
                )
        return device

    def _key(self, closure: Callable[[], Any], chunks: list) -> tuple:
        """What a captured graph holds fixed: the closure, the tensors and offsets of each fused call, each group's
        eps (g = d / eps is computed inside the graph) and the bounds on g there (_update_reach, _float16_limit),
        the pass options, and where every parameter of the optimizer lives (the closure reads the frozen ones too: one
        given new storage must not be read at its old address)."""
        opt = self.opt
        layout = tuple(
            (index, group["eps"], tuple((p.data_ptr(), p.dtype, p.numel()) for p in params), tuple(offsets))
            for index, group, params, offsets in chunks
        )
        storage = tuple(p.data_ptr() for group in opt.param_groups for p in group["params"])
        options = (opt.one_sided, opt.rounding, opt.distribution, opt.backend)
        return id(closure), layout, (opt._update_reach(), opt._float16_limit()), storage, options

    def _plan(self, seed: int, chunks: list) -> list[list[int]]:
        """The rows of one step, in launch order: +eps per fused call, then (two-sided) -2 eps, then the
        restore-and-update. The same values the uncaptured step passes as arguments (ZOOptimizer._update_rounding
        numbers the update passes 1, 2, ...; the restore-and-update is pass 1 for every fused call)."""
        opt = self.opt
        rows = [_scalars.pack(seed=seed, alpha=group["eps"]) for _, group, _, _ in chunks]
        if not opt.one_sided:
            rows += [_scalars.pack(seed=seed, alpha=-2.0 * group["eps"]) for _, group, _, _ in chunks]
        stochastic = opt.rounding != "nearest"
        for _, group, _, _ in chunks:
            rows.append(
                _scalars.pack(
                    seed=seed,
                    alpha=opt._restore_scale() * group["eps"],
                    lr=group["lr"],
                    weight_decay=group["weight_decay"],
                    rounding_seed=seeds_.rounding_seed(seed, 1) if stochastic else None,
                )
            )
        return rows

    def _passes(self, seed: int, evaluate: Callable[[], Any], capturing: bool = False) -> dict[str, Any]:
        """The step's kernels, each reading its row: what is captured. The optimizer's own device step, its passes
        fed the rows in launch order (the order of _plan)."""
        opt = self.opt
        rows = opt._rows = iter(self.rows)
        opt._capturing = capturing
        try:
            fields = opt._device_step_passes(seed, evaluate, None)
        finally:
            # Before any undo pass after an exception, which must take its scalars as arguments.
            opt._rows, opt._capturing = None, False
        assert next(rows, None) is None  # every row of the plan was read
        return fields

    def _capture(self, seed: int, evaluate: Callable[[], Any], device: torch.device) -> None:
        """Record the step's kernels. None runs: whatever happens, the parameters are untouched, so the perturbations
        tracked while recording are forgotten unless the capture succeeds (then the replay applies them)."""
        opt = self.opt
        graph = torch.cuda.CUDAGraph()
        pool = torch.cuda.graph_pool_handle()  # named, so that a failed capture can end recording into it
        captured = False
        try:
            # The outer stream context puts the ambient stream back even when a failed capture's end raises
            # before torch.cuda.graph restores it.
            with torch.cuda.stream(torch.cuda.current_stream(device)):
                with torch.cuda.graph(graph, pool=pool, stream=self._stream(device), capture_error_mode="thread_local"):
                    outputs = self._passes(seed, evaluate, capturing=True)
            captured = True
        except torch.OutOfMemoryError:
            raise
        except RuntimeError as e:
            raise RuntimeError(
                f"zokern: the step could not be captured in a CUDA graph ({e}). The closure must run without host "
                "syncs (.item(), data-dependent shapes, prints of tensors); or use cuda_graph=False"
            ) from e
        finally:
            if not captured:
                opt._displacement.clear()
                self.key = None
                stop_recording_into(pool, device)
        self.graph, self.outputs, self.loss_device = graph, outputs, opt._loss_device
        triton_pass = sys.modules.get("zokern.kernels.zo_pass")
        if triton_pass is not None:
            self.keep = triton_pass.cached_tables()


def stop_recording_into(pool: tuple[int, int], device: torch.device) -> None:
    """After a failed capture: make the caching allocator stop serving allocations from the capture's pool.

    torch before 2.12 (pytorch#180395) skips this when ending an invalidated capture raises, and the allocator then
    believes a capture is still under way: every later ``torch.cuda.empty_cache()``, and so every later capture,
    fails an internal assertion, for the rest of the process. Newer torch has done it already, and refuses (ignored).
    What the failed capture allocated stays reserved until the process ends (pytorch#190308).
    """
    end = getattr(torch._C, "_cuda_endAllocateToPool", None)
    if end is None:
        return
    try:
        end(device.index, pool)
    except RuntimeError:  # not recording into this pool: torch ended it itself (or this torch has no CUDA)
        pass
