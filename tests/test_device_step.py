"""Steps without a host sync: the losses and g stay on the device, records settle later (ZOSGD and LDSD)."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import DEVICE

import zokern
from zokern.optim import LDSD
from zokern.optim import ZOSGD
from zokern.optim import _pending


def _quadratic(d: int = 48, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    a = torch.logspace(0, 1, d, dtype=torch.float64)
    return a.to(DEVICE), torch.randn(d, generator=g, dtype=torch.float64).to(DEVICE)


def _in_flight(monkeypatch):
    """As on a GPU right after a step: the copy of a record's values to the host has not landed yet."""
    monkeypatch.setattr(_pending.PendingRecord, "ready", lambda self: False)


def _forbidden(name):
    def method(self, *args, **kwargs):
        raise AssertionError(f"Tensor.{name} called inside a step")

    return method


OPTIMIZERS = {
    "zosgd-inplace": lambda x: ZOSGD([x], lr=1e-3, seed=0, perturbation="inplace"),
    "zosgd-exact": lambda x: ZOSGD([x], lr=1e-3, seed=0, perturbation="exact"),
    "zosgd-one-sided": lambda x: ZOSGD([x], lr=1e-3, seed=0, one_sided=True, perturbation="inplace"),
    "zosgd-merged": lambda x: ZOSGD([x], lr=1e-3, seed=0, perturbation="inplace", merge_steps=True),
    "ldsd-sgd": lambda x: LDSD([x], lr=1e-3, k=3, seed=0),
    "ldsd-adam": lambda x: LDSD([x], lr=1e-3, k=3, update="adam", seed=0),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_a_step_never_reads_a_device_value_on_the_host(monkeypatch, name, dtype):
    """Every scalar stays a tensor: converting one to a Python value inside step() would be a host sync on a GPU."""
    a, x0 = _quadratic()
    x = torch.nn.Parameter(x0.to(dtype))
    opt = OPTIMIZERS[name](x)
    _in_flight(monkeypatch)
    start = x.detach().clone()
    with monkeypatch.context() as patch:
        for method in ("item", "tolist", "__bool__", "__float__", "__int__", "__index__"):
            patch.setattr(torch.Tensor, method, _forbidden(method))
        for _ in range(2):  # the second step of a merged run claims the perturbation the first one left
            loss = opt.step(lambda: 0.5 * (a.to(dtype) * x**2).float().sum())
    opt.materialize()
    assert math.isfinite(float(loss)) and len(opt.trajectory) == 2
    assert not torch.equal(x.detach(), start)


def test_zosgd_keeps_the_formula_on_the_device():
    """The device path's update is the float64 formula theta - lr * (d / eps) z."""
    a, x0 = _quadratic()
    x = torch.nn.Parameter(x0.float())
    opt = ZOSGD([x], lr=1e-3, eps=1e-2, seed=3)
    losses = []

    def closure():
        losses.append(0.5 * (a * x.detach().double() ** 2).sum())
        return losses[-1].float()

    opt.step(closure)
    record = opt.trajectory[0]
    z = _gaussian(record["seed"], x0.numel())
    plus, minus = (float(v.float()) for v in losses)
    expected = x0.float().double() - 1e-3 * (0.5 * (plus - minus) / 1e-2) * z
    torch.testing.assert_close(x.detach().double(), expected, atol=2e-6, rtol=0)
    assert record["losses"] == pytest.approx([plus, minus])
    assert record["projected_grad"] == pytest.approx([0.5 * (plus - minus) / 1e-2])
    assert record["loss"] == pytest.approx(0.5 * (plus + minus)) and record["skipped"] is False


def _gaussian(seed, n):
    return zokern.gaussian(seed, 0, n, backend="torch").double().to(DEVICE)


@pytest.mark.parametrize("name", ["zosgd-inplace", "ldsd-sgd"])
def test_records_settle_once_their_values_reach_the_host(monkeypatch, name):
    a, x0 = _quadratic()
    x = torch.nn.Parameter(x0.float())
    opt = OPTIMIZERS[name](x)
    with monkeypatch.context() as patch:
        patch.setattr(_pending.PendingRecord, "ready", lambda self: False)
        for k in range(4):
            nan_now = k == 2
            opt.step(lambda nan_now=nan_now: torch.tensor(math.nan) if nan_now else 0.5 * (a.float() * x**2).sum())
        assert len(opt._unsettled) == 4
        assert all(isinstance(r["losses"], torch.Tensor) for r in opt._trajectory)
        with pytest.warns(RuntimeWarning, match=r"non-finite loss at \w+ step 2;"):
            records = opt.trajectory  # reading settles, waiting for the copies
    assert not opt._unsettled and opt.nonfinite_steps == 1
    assert [r["skipped"] for r in records] == [False, False, True, False]
    assert records[2]["projected_grad"] is None and math.isnan(records[2]["loss"])
    assert all(isinstance(r["losses"], list) and isinstance(r["loss"], float) for r in records)
    # On the CPU, where values are on the host at once, a step settles its own record; on a GPU, once the device
    # has caught up, the next look settles it without waiting.
    opt.step(lambda: 0.5 * (a.float() * x**2).sum())
    if DEVICE != "cpu":
        torch.cuda.synchronize()
        opt._settle(wait=False)
    assert not opt._unsettled


def test_a_nonfinite_loss_skips_the_update_in_the_device_path():
    a, x0 = _quadratic()
    x = torch.nn.Parameter(x0.float())
    opt = ZOSGD([x], lr=1e-2, weight_decay=0.1, seed=0, perturbation="inplace")
    calls = iter(range(10))
    with pytest.warns(RuntimeWarning, match="non-finite loss at ZOSGD step 0;"):
        loss = opt.step(lambda: torch.tensor(math.inf) if next(calls) == 1 else 0.5 * (a.float() * x**2).sum())
        assert opt.nonfinite_steps == 1  # reading it settles the record: on a GPU, that is when the warning comes
    torch.testing.assert_close(x.detach(), x0.float(), atol=1e-6, rtol=0)  # restored, no update, no decay
    assert math.isnan(float(loss))
    assert opt.state_dict()["zo"]["nonfinite_steps"] == 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="host syncs exist only with a device (CPU: the test above)")
@pytest.mark.parametrize("name", ["zosgd-inplace", "zosgd-merged", "ldsd-sgd"])
def test_no_cuda_synchronisation_inside_a_step(name):
    """On the GPU itself: torch's sync debug mode raises on any operation that synchronises with the host."""
    a, x0 = _quadratic()
    x = torch.nn.Parameter(x0.float())
    opt = OPTIMIZERS[name](x)
    closure = lambda: 0.5 * (a.float() * x**2).sum()  # noqa: E731
    opt.step(closure)  # first step: lazy state, kernels compiled
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            opt.step(closure)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    opt.materialize()
    assert len(opt.trajectory) == 4


@pytest.mark.parametrize("name", ["zosgd-inplace", "ldsd-sgd"])
@pytest.mark.parametrize("kind", ["float64 tensor", "python float"])
def test_replay_is_bit_identical_whatever_type_the_losses_have(name, kind):
    """The recorded losses are float64 numbers; replay must read them as float64, never through float32."""
    a, x0 = _quadratic()
    x = torch.nn.Parameter(x0.float())
    opt = OPTIMIZERS[name](x)

    def closure():
        loss = 0.5 * (a * x.detach().double() ** 2).sum() + 1e-7  # not a float32 value
        return loss if kind == "float64 tensor" else float(loss)

    for _ in range(4):
        opt.step(closure)
    replayed = x0.float().clone()
    zokern.replay([replayed], opt.trajectory)
    assert torch.equal(replayed, x.detach())


def test_loading_a_state_dict_counts_earlier_skips_before_it(monkeypatch):
    a, x0 = _quadratic()
    x = torch.nn.Parameter(x0.float())
    opt = ZOSGD([x], lr=1e-3, seed=0, perturbation="inplace")
    checkpoint = opt.state_dict()
    _in_flight(monkeypatch)
    opt.step(lambda: torch.tensor(math.nan))
    with pytest.warns(RuntimeWarning, match="non-finite"):
        opt.load_state_dict(checkpoint)
    assert opt.nonfinite_steps == 0  # the checkpoint's count, not one more
