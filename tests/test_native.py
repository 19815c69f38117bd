"""What only the C++ extension has: a thread count that never changes results, and the torch op's own contract."""

from __future__ import annotations

import pytest
import torch
from helpers import random_params

from zokern import _native

if not _native.cpu_available():
    pytest.skip(f"zokern._C is not built: {_native.LOAD_ERROR}", allow_module_level=True)


def _bases(tensors, offset):
    bases, total = [], offset
    for t in tensors:
        bases.append(total)
        total += t.numel()
    return bases


def _run(tensors, offset, **kwargs):
    out = [t.clone() for t in tensors]
    _native.zo_pass_(out, _bases(out, offset), **kwargs)
    return out


def test_thread_count_does_not_change_the_result():
    tensors = random_params((1, 100_000, 3, 70_000), torch.float16, "cpu", seed=10)
    kwargs = dict(seed=5, alpha=1e-2, distribution="gaussian", lr=1e-3, grad=2.0, rounding_seed=6)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _run(tensors, 11, **kwargs)
        torch.set_num_threads(max(2, threads))
        many = _run(tensors, 11, **kwargs)
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for a, b in zip(one, many))


# ---------------------------------------------------------------------------------------- the op's contract


def _op_args(tensors, **overrides):
    args = dict(
        tensors=tensors,
        bases=_bases(tensors, 0),
        seed=1,
        alpha=1e-3,
        domain=0,
        lr=0.0,
        grad_value=0.0,
        grad_tensor=None,
        update=False,
        weight_decay=0.0,
        seed2=0,
        alpha2=0.0,
        second=False,
        rounding_seed=0,
        stochastic=False,
    )
    args.update(overrides)
    return list(args.values())


@pytest.mark.parametrize(
    "overrides,match",
    [
        (dict(bases=[0]), "2 tensors but 1 bases"),
        (dict(domain=2), "domain must be 0"),
        (dict(seed=-1), "seed"),
        (dict(bases=[0, 2**63 - 5]), "leaves the index range"),
        (dict(update=True, grad_tensor=torch.ones(2)), "one-element float32"),
    ],
)
def test_op_rejects_bad_arguments(overrides, match):
    tensors = [torch.ones(10), torch.ones(10)]
    with pytest.raises(RuntimeError, match=match):
        torch.ops.zokern.zo_pass_(*_op_args(tensors, **overrides))
    assert all(torch.equal(t, torch.ones(10)) for t in tensors)


@pytest.mark.parametrize(
    "tensors,match",
    [
        ([torch.ones(4), torch.ones(4, dtype=torch.float16)], "has dtype"),
        ([torch.ones(4, 4).t()], "not contiguous"),
        ([torch.ones(4, dtype=torch.float64)], "float32, bfloat16 or float16"),
    ],
)
def test_op_rejects_bad_tensors(tensors, match):
    with pytest.raises(RuntimeError, match=match):
        torch.ops.zokern.zo_pass_(*_op_args(tensors))


def test_opcheck():
    tensors = random_params((9, 130), torch.bfloat16, "cpu", seed=13)
    args = _op_args(tensors, update=True, grad_tensor=torch.tensor(0.5), lr=0.01, stochastic=True, rounding_seed=3)
    torch.library.opcheck(torch.ops.zokern.zo_pass_.default, args)
    torch.library.opcheck(torch.ops.zokern.philox_words_.default, (torch.empty(5, 4, dtype=torch.int64), 3, 1, 9))
