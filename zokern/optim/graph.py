"""Whole ZO-SGD steps replayed from a CUDA graph: ``ZOSGD(..., cuda_graph=True)``.

A step without host syncs (one probe, no momentum: the losses, g and the skipped flag stay on the device) is a fixed
sequence of kernels: perturb, forward, flip, forward, restore-and-update. After a few ordinary steps, :class:`StepGraph`
captures that sequence once (the closure's forwards included) and replays it each step: one launch of the whole step
instead of hundreds of kernel launches from Python, which matters when a forward is short (small batch, small model).

What changes from step to step reaches the captured kernels through device memory, written before each replay
(an asynchronous copy, no sync): each pass reads its seed, coefficients, learning rate, weight decay and rounding
seed from its row of ``zokern._scalars``. The projected gradient is computed on the device inside the graph. A replayed
step therefore equals the uncaptured step bit for bit, lr schedules included; a change of eps, of the parameters'
layout or of the closure object captures anew.

The closure is replayed as captured: it must read its inputs from the same tensors every step (copy each batch into
them) and must not sync with the host (no ``.item()``, no data-dependent shapes). On the CPU there is nothing to
capture: the same passes run uncaptured every step.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Callable
from typing import Any

import torch

from zokern import _scalars
from zokern import ops
from zokern._dispatch import select_backend
from zokern._transfer import to_device
from zokern.optim import _distributed
from zokern.optim import seeds as seeds_

# Uncaptured steps before a capture: Triton compiles and cuBLAS sets up its workspace outside the capture.
WARMUP_STEPS = 2


class StepGraph:
    """The captured step of one ZOSGD, for one closure and layout."""

    def __init__(self, optimizer) -> None:
        self.opt = optimizer
        self.key: tuple | None = None
        self.closure: Callable[[], Any] | None = None  # held so that id(closure) in the key stays unique
        self.rows: torch.Tensor | None = None
        self.graph: torch.cuda.CUDAGraph | None = None
        self.outputs: dict[str, Any] = {}
        self.loss_device = torch.device("cpu")
        self.keep: list[torch.Tensor] = []  # tables the captured kernels read, kept alive while the graph is
        self.uncaptured = 0
        self.side: torch.cuda.Stream | None = None  # where the uncaptured warm-up steps run, as torch advises
        self._warned_new_closure = False

    def run(self, seed: int, evaluate: Callable[[], Any], closure: Callable[[], Any]) -> dict[str, Any]:
        """One step (the record's fields, device tensors): uncaptured during warm-up, then replayed."""
        opt = self.opt
        chunks = opt._device_chunks()
        device = self._check(chunks)
        key = self._key(closure, chunks)
        if key != self.key:
            if self.key is not None and key[0] != self.key[0] and not self._warned_new_closure:
                self._warned_new_closure = True
                warnings.warn(
                    "zokern: cuda_graph=True and step() got another closure object than last step; a graph is "
                    f"captured for a closure passed {WARMUP_STEPS + 1} steps in a row (reuse one closure that reads "
                    "its batch from the same tensors every step)",
                    UserWarning,
                    stacklevel=4,
                )
            self.key, self.closure, self.graph, self.keep, self.uncaptured = key, closure, None, [], 0
            self.rows = torch.zeros((len(self._plan(seed, chunks)), _scalars.SLOTS), dtype=torch.int64, device=device)
        self.rows.copy_(to_device(self._plan(seed, chunks), device, torch.int64), non_blocking=True)
        if device.type != "cuda":
            return self._passes(seed, evaluate, chunks)
        if self.graph is None and self.uncaptured < WARMUP_STEPS:
            self.uncaptured += 1
            self.side = self.side or torch.cuda.Stream(device)
            self.side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(self.side):
                fields = self._passes(seed, evaluate, chunks)
            torch.cuda.current_stream(device).wait_stream(self.side)
            return fields
        if self.graph is None:
            self._capture(seed, evaluate, chunks)
        self.graph.replay()
        opt._loss_device = self.loss_device  # what the closure, not called in a replay, would have set
        return dict(self.outputs)

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
        eps (g = d / eps is computed inside the graph) and the pass options."""
        opt = self.opt
        layout = tuple(
            (index, group["eps"], tuple((p.data_ptr(), p.dtype, p.numel()) for p in params), tuple(offsets))
            for index, group, params, offsets in chunks
        )
        return id(closure), layout, opt.one_sided, opt.rounding, opt.distribution, opt.backend

    def _plan(self, seed: int, chunks: list) -> list[list[int]]:
        """The rows of one step, in launch order: +eps per fused call, then (two-sided) -2 eps, then the
        restore-and-update. The same values the uncaptured step passes as arguments (ZOOptimizer._update_rounding
        numbers the update passes 1, 2, ... in call order)."""
        opt = self.opt
        rows = [_scalars.pack(seed=seed, alpha=group["eps"]) for _, group, _, _ in chunks]
        if not opt.one_sided:
            rows += [_scalars.pack(seed=seed, alpha=-2.0 * group["eps"]) for _, group, _, _ in chunks]
        stochastic = opt.rounding != "nearest"
        for j, (_, group, _, _) in enumerate(chunks):
            rows.append(
                _scalars.pack(
                    seed=seed,
                    alpha=opt._restore_scale() * group["eps"],
                    lr=group["lr"],
                    weight_decay=group["weight_decay"],
                    rounding_seed=seeds_.rounding_seed(seed, j + 1) if stochastic else None,
                )
            )
        return rows

    def _passes(self, seed: int, evaluate: Callable[[], Any], chunks: list) -> dict[str, Any]:
        """The step's kernels, each reading its row: what is captured. The perturbations are tracked as the
        uncaptured step tracks them, so that an exception undoes what ran."""
        opt = self.opt
        kwargs = opt._pass_kwargs()
        rows = iter(self.rows)

        def perturb(scale: float) -> None:
            for (_, _, params, offsets), row in zip(chunks, rows):
                ops.perturb_([p.data for p in params], 0, 0.0, offsets=offsets, scalars=row, **kwargs)
            opt._track(seed, lambda group: scale * group["eps"])

        values = [evaluate()] if opt.one_sided else []
        perturb(1.0)
        values.append(evaluate())
        if not opt.one_sided:
            perturb(-2.0)
            values.append(evaluate())
        fields = opt._device_gradient(values)
        rounding = dict(rounding="stochastic", rounding_seed=0)  # the row holds the seed
        if opt.rounding == "nearest":
            rounding = dict(rounding="nearest")
        for (index, _, params, offsets), row in zip(chunks, rows):
            g = fields["projected_grad"][index]
            ops.restore_update_(
                [p.data for p in params], 0, 0.0, 0.0, g, offsets=offsets, scalars=row, **kwargs, **rounding
            )
        opt._track(seed, lambda group: opt._restore_scale() * group["eps"])
        assert next(rows, None) is None  # every row of the plan was read
        return fields

    def _capture(self, seed: int, evaluate: Callable[[], Any], chunks: list) -> None:
        """Record the step's kernels (none runs: the parameters are untouched whatever happens)."""
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                outputs = self._passes(seed, evaluate, chunks)
        except Exception as e:
            self.opt._displacement.clear()  # tracked during the capture, never applied
            self.key = None
            raise RuntimeError(
                f"zokern: the step could not be captured in a CUDA graph ({type(e).__name__}: {e}). The closure must "
                "run without host syncs (.item(), data-dependent shapes, prints of tensors); or use cuda_graph=False"
            ) from e
        self.graph, self.outputs, self.loss_device = graph, outputs, self.opt._loss_device
        triton_pass = sys.modules.get("zokern.kernels.zo_pass")
        if triton_pass is not None:
            self.keep = triton_pass.cached_tables()
