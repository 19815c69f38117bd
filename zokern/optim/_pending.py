"""Trajectory records whose values a step left on the device: settled into Python numbers later, without a host sync
in the step that produced them."""

from __future__ import annotations

import math
from typing import Any

import torch

KEYS = ("losses", "projected_grad", "loss", "best", "skipped", "ranks_agree")


class PendingRecord:
    """A record whose tensor values are copied to the host asynchronously (pinned memory; a CUDA event marks
    completion), so that it can be settled later without stalling the device queue. A record whose values are
    already on the host is ready at once."""

    def __init__(self, record: dict[str, Any]) -> None:
        self.record = record
        self.host = {k: record[k] for k in KEYS if isinstance(record.get(k), torch.Tensor)}
        self.event = None
        on_gpu = [t.device for t in self.host.values() if t.device.type == "cuda"]
        if on_gpu:
            self.host = {k: t.to("cpu", non_blocking=True) for k, t in self.host.items()}
            # Each copy was queued on its tensor's device's current stream, which need not be the current device's.
            self.event = torch.cuda.Event()
            self.event.record(torch.cuda.current_stream(on_gpu[0]))

    def ready(self) -> bool:
        return self.event is None or self.event.query()

    def settle(self) -> dict[str, Any]:
        """The record with Python numbers in place of tensors; a skipped step has no projected gradient and a NaN
        loss, however its values were computed."""
        if self.event is not None:
            self.event.synchronize()
        for key, value in self.host.items():
            self.record[key] = value.tolist()
        if self.record.get("skipped"):
            self.record.update(projected_grad=None, loss=math.nan)
        return self.record
