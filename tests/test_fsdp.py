"""Sharded parameters: a model sharded with FSDP2 over two CPU processes (gloo) trains exactly as one process holding
the whole model (tests/fsdp_worker.py is one rank)."""

from __future__ import annotations

from pathlib import Path

import pytest
from fsdp_worker import CASES
from fsdp_worker import loop
from fsdp_worker import model_and_batch
from fsdp_worker import train
from helpers import launch_ranks

WORKER = Path(__file__).with_name("fsdp_worker.py")


def _whole(model) -> list[list[float]]:
    return [p.detach().float().flatten().tolist() for p in model.parameters()]


def _halves(x, y):
    return [(x[:8], y[:8]), (x[8:], y[8:])]


def test_sharded_steps_equal_one_process_holding_the_whole_model(tmp_path):
    ranks = launch_ranks(WORKER, "train", tmp_path)
    for name, cls, kwargs, dtype in CASES:
        assert ranks[0][name] == ranks[1][name], name
        # Each rank regenerates the z of the rows it holds, at their global stream indices (uneven shards, an empty
        # one, a frozen parameter between them): the gathered weights are bit for bit those of one process whose
        # closure averages the two half-batch losses, and so are the losses, every forward included (FSDP2's root
        # keeps what it gathered in a forward; the step's forwards gather the shards anew).
        model, x, y = model_and_batch(dtype)
        start = _whole(model)
        opt = train(model, cls, _halves(x, y), **kwargs)
        assert ranks[0][name]["losses"] == [r["losses"] for r in opt.trajectory], name
        assert ranks[0][name]["params"] == _whole(model), name
        assert _whole(model) != start, name
        if name == "zosgd":  # the same run resumed halfway from each rank's state_dict, and replayed on each rank
            assert ranks[0]["zosgd-resumed"] == ranks[1]["zosgd-resumed"] == _whole(model)
            assert ranks[0]["zosgd-replayed"] == ranks[1]["zosgd-replayed"] == _whole(model)


def test_a_loop_of_perturbed_blocks_over_shards_equals_one_process(tmp_path):
    ranks = launch_ranks(WORKER, "loop", tmp_path)
    model, x, y = model_and_batch()
    assert ranks[0]["params"] == ranks[1]["params"] == _whole(loop(model, _halves(x, y)))


@pytest.fixture(scope="module")
def refusals(tmp_path_factory):
    ranks = launch_ranks(WORKER, "refusals", tmp_path_factory.mktemp("refusals"))
    assert ranks[0] == ranks[1]
    return ranks[0]


@pytest.mark.parametrize(
    "case, message",
    [
        ("bf16 exact", "TypeError: sharded (DTensor) parameters train in the in-place mode only"),
        ("momentum", "ValueError: ZOSGD keeps per-parameter states (momentum_buffer)"),
        ("merge_steps", "ValueError: merge_steps is not supported with sharded (DTensor) parameters"),
        ("columns", "TypeError: param group 0: params[0] is a DTensor placed (Shard(dim=1),)"),
    ],
)
def test_what_shards_cannot_run_is_refused_and_leaves_them_untouched(refusals, case, message):
    assert refusals[case].startswith(message)
    assert refusals[f"{case} unchanged"] is True
