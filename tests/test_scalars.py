"""Pass scalars read from a tensor (zokern._scalars), what a captured CUDA graph's kernels need: every backend, given
a row, computes exactly what it computes from the same values passed as arguments, whatever the arguments say."""

from __future__ import annotations

import pytest
import torch
from helpers import DEVICE
from helpers import backends_for
from helpers import random_params

from zokern import _scalars
from zokern import ops

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
SIZES = (1, 129, 3000)
OFFSETS = (5, 2**40 + 3, 2**40 + 3 + 129)  # tensors not consecutive in the stream


@pytest.mark.parametrize("backend", backends_for())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("distribution", ("gaussian", "rademacher"))
def test_perturb_reads_the_row(backend, dtype, distribution):
    truth = dict(seed=2**62 + 17, alpha=3e-3, rounding_seed=2**35 + 1)
    expected = random_params(SIZES, dtype)
    ops.perturb_(
        expected, truth["seed"], truth["alpha"], offsets=OFFSETS, distribution=distribution,
        rounding="stochastic", rounding_seed=truth["rounding_seed"], backend=backend,
    )  # fmt: skip
    got = random_params(SIZES, dtype)
    row = torch.tensor(_scalars.pack(**truth), device=DEVICE)
    ops.perturb_(
        got, 3, -0.5, offsets=OFFSETS, distribution=distribution, rounding="stochastic", rounding_seed=9,
        backend=backend, scalars=row,
    )  # fmt: skip
    for e, g in zip(expected, got):
        assert torch.equal(e, g), (backend, dtype)
    assert not torch.equal(got[2], random_params(SIZES, dtype)[2])  # the pass did move the tensors


@pytest.mark.parametrize("backend", backends_for())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("grad_on_device", (False, True))
def test_restore_update_reads_the_row(backend, dtype, grad_on_device):
    truth = dict(seed=11, alpha=-2e-3, lr=0.05, weight_decay=0.1, seed2=2**61 + 5, alpha2=1e-3, rounding_seed=77)
    grad = torch.tensor(0.75, device=DEVICE) if grad_on_device else 0.75
    expected = random_params(SIZES, dtype, seed=1)
    ops.restore_update_(
        expected, truth["seed"], truth["alpha"], truth["lr"], grad, weight_decay=truth["weight_decay"],
        offsets=OFFSETS, next_seed=truth["seed2"], next_alpha=truth["alpha2"], rounding="stochastic",
        rounding_seed=truth["rounding_seed"], backend=backend,
    )  # fmt: skip
    got = random_params(SIZES, dtype, seed=1)
    row = torch.tensor(_scalars.pack(**truth), device=DEVICE)
    ops.restore_update_(
        got, 1, 0.25, 9.0, grad, weight_decay=0.0, offsets=OFFSETS, next_seed=2, next_alpha=0.0,
        rounding="stochastic", rounding_seed=3, backend=backend, scalars=row,
    )  # fmt: skip
    for e, g in zip(expected, got):
        assert torch.equal(e, g), (backend, dtype)


@pytest.mark.parametrize("backend", backends_for())
def test_rewriting_the_row_changes_the_next_pass(backend):
    """The same call, the row rewritten in place between two passes: what a graph replay sees."""
    row = torch.tensor(_scalars.pack(seed=1, alpha=1e-2), device=DEVICE)
    got = random_params(SIZES, torch.float32, seed=2)
    expected = [t.clone() for t in got]
    for seed, alpha in ((1, 1e-2), (2**50, -3e-2)):
        row.copy_(torch.tensor(_scalars.pack(seed=seed, alpha=alpha)))
        ops.perturb_(got, 0, 0.0, offsets=OFFSETS, backend=backend, scalars=row)
        ops.perturb_(expected, seed, alpha, offsets=OFFSETS, backend=backend)
    for e, g in zip(expected, got):
        assert torch.equal(e, g)


def test_pack_round_trips_float32_values():
    row = _scalars.pack(seed=2**63 - 1, alpha=-1e-3, seed2=5, alpha2=3.5, lr=1e-7, weight_decay=0.0, rounding_seed=2)
    values = _scalars.unpack(torch.tensor(row))
    assert values["seed"] == 2**63 - 1 and values["seed2"] == 5 and values["rounding_seed"] == 2
    for name, value in (("alpha", -1e-3), ("alpha2", 3.5), ("lr", 1e-7), ("weight_decay", 0.0)):
        assert values[name] == torch.tensor(value, dtype=torch.float32).item()
    assert all(0 <= slot < 2**63 for slot in row)


@pytest.mark.parametrize(
    "scalars, message",
    [
        (torch.zeros(8, dtype=torch.int32), "int64 tensor of shape"),
        (torch.zeros(7, dtype=torch.int64), "int64 tensor of shape"),
        (torch.zeros(16, dtype=torch.int64)[::2], "int64 tensor of shape"),
        ([0] * 8, "must be a tensor"),
    ],
)
def test_a_bad_row_is_refused_before_the_pass(scalars, message):
    tensors = random_params(SIZES, torch.float32)
    before = [t.clone() for t in tensors]
    with pytest.raises((ValueError, TypeError), match=message):
        ops.perturb_(tensors, 1, 1e-3, scalars=scalars)
    for b, t in zip(before, tensors):
        assert torch.equal(b, t)


def test_the_cpu_op_refuses_a_row():
    """Only the CUDA kernels read a row; the C++ CPU op is given the values by zokern._native."""
    pytest.importorskip("zokern._C")
    t = random_params((16,), torch.float32, "cpu")[0]
    with pytest.raises(RuntimeError, match="only the CUDA kernels read"):
        torch.ops.zokern.zo_pass_(
            [t], [0], 1, 1e-3, 0, 0.0, 0.0, None, False, 0.0, 0, 0.0, False, 0, False, torch.zeros(8, dtype=torch.int64)
        )


@pytest.mark.parametrize(
    "values, message",
    [
        (dict(seed=-1, alpha=1.0), "seed in a scalars row"),
        (dict(seed=2**63, alpha=1.0), "seed in a scalars row"),
        (dict(seed=1, alpha=1e39), "alpha in a scalars row must be finite in float32"),
        (dict(seed=1, alpha=1.0, lr=float("nan")), "lr in a scalars row"),
    ],
)
def test_pack_refuses_what_no_pass_takes(values, message):
    with pytest.raises(ValueError, match=message):
        _scalars.pack(**values)


@pytest.mark.parametrize("backend", backends_for("cpu"))
def test_a_row_in_host_memory_is_validated_before_the_pass_on_every_backend(backend):
    """A row on the CPU is read for free: a corrupt one is refused as a bad argument is, the tensors untouched, by the
    backends that take the values as arguments and by the one that reads the row itself (triton, interpreted)."""
    tensors = random_params(SIZES, torch.float32, "cpu")
    before = [t.clone() for t in tensors]
    row = torch.tensor(_scalars.pack(seed=1, alpha=1e-3))
    row[0] = -5
    with pytest.raises(ValueError, match="seed in a scalars row"):
        ops.perturb_(tensors, 1, 1e-3, backend=backend, scalars=row)
    row[0], row[3] = 1, 0x7FC00000  # alpha = NaN
    with pytest.raises(ValueError, match="alpha in a scalars row"):
        ops.restore_update_(tensors, 1, 1e-3, 0.1, 0.5, backend=backend, scalars=row)
    for b, t in zip(before, tensors):
        assert torch.equal(b, t)


def test_a_row_read_on_the_host_is_validated_before_the_pass():
    """The torch backend reads a device row on the host too: a corrupt one is refused, the tensors untouched."""
    tensors = random_params(SIZES, torch.float32)
    before = [t.clone() for t in tensors]
    row = torch.tensor(_scalars.pack(seed=1, alpha=1e-3))
    row[0], row[3] = 1, 0x7F800000  # alpha = inf
    with pytest.raises(ValueError, match="alpha in a scalars row"):
        ops.perturb_(tensors, 1, 1e-3, backend="torch", scalars=row.to(DEVICE))
    for b, t in zip(before, tensors):
        assert torch.equal(b, t)


@pytest.mark.parametrize("backend", backends_for())
@pytest.mark.parametrize("zero", [-0.0, -1e-50])
def test_a_negative_zero_in_a_row_is_taken_as_positive_zero(backend, zero):
    # docs/stream.md, section 5: a zero coefficient is +0 whether given as an argument or in a row, and its term
    # changes no bit (t + 0 * z made -0 weights +0 where z > 0 in stream version 1), however alpha came; -1e-50
    # rounds to float32's -0.
    by_argument = [-t.abs() * 0.0 for t in random_params(SIZES, torch.float32)]  # -0.0 everywhere
    by_row = [t.clone() for t in by_argument]
    ops.perturb_(by_argument, 1, zero, backend=backend)
    row = torch.tensor(_scalars.pack(seed=1, alpha=zero), device=DEVICE)
    ops.perturb_(by_row, 1, 0.5, backend=backend, scalars=row)
    for a, r in zip(by_argument, by_row):
        assert torch.equal(a.view(torch.int32), r.view(torch.int32))
    assert all(bool(torch.signbit(a).all()) for a in by_argument)


def test_a_host_backend_reads_the_row_once_per_pass(monkeypatch):
    reads = []
    unpack = _scalars.unpack
    monkeypatch.setattr(_scalars, "unpack", lambda row: reads.append(1) or unpack(row))
    tensors = random_params(SIZES, torch.float32, "cpu")
    ops.perturb_(tensors, 1, 1e-3, backend="torch", scalars=torch.tensor(_scalars.pack(seed=1, alpha=1e-3)))
    assert len(reads) == 1  # a row on a GPU: each read is a device-to-host sync
