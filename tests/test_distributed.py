"""Data parallelism: two CPU processes (gloo), each on half the batch, equal one process on the whole batch."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from dp_worker import SCENARIOS
from dp_worker import STEPS
from dp_worker import model_and_batch
from dp_worker import train
from helpers import launch_ranks

from zokern.optim import ZOSGD

WORKER = Path(__file__).with_name("dp_worker.py")


def _launch(scenario: str, out: Path, world: int = 2) -> list[dict]:
    return launch_ranks(WORKER, scenario, out, world)


def test_two_ranks_on_half_batches_equal_one_process_on_the_whole_batch(tmp_path):
    ranks = _launch("train", tmp_path)
    for name, cls, kwargs in SCENARIOS:
        # No parameter communication: both ranks hold exactly the same parameters.
        assert ranks[0][name] == ranks[1][name]
        # One process whose closure averages the two half-batch losses (as the all_reduce does, in float64) takes
        # bit-identical steps: data parallelism is gradient accumulation under one z, spread over ranks.
        model, x, y = model_and_batch()
        halves = ((x[:8], y[:8]), (x[8:], y[8:]))

        def mean_of_halves(model=model, halves=halves):
            return sum(torch.nn.functional.mse_loss(model(a), b).double() for a, b in halves) / 2

        opt = cls(model.parameters(), lr=1e-2, eps=1e-3, seed=77, **kwargs)
        for _ in range(STEPS):
            opt.step(mean_of_halves)
        assert [r["losses"] for r in opt.trajectory] == ranks[0][name]["losses"]
        assert ranks[0][name]["params"] == [p.detach().flatten().tolist() for p in model.parameters()]


def test_two_ranks_match_the_whole_batch_loss_within_float32_summation_order(tmp_path):
    # The whole batch in one forward sums the 16 squared errors in another order than two forwards of 8: each loss
    # may differ by a few float32 ulps, delta <= 4 ulp(L). g = (L+ - L-) / (2 eps) then differs by at most
    # delta / eps, and each step moves a weight by lr g z with |z| <= 4.86: the bound after STEPS steps.
    ranks = _launch("train", tmp_path)
    model, x, y = model_and_batch()
    opt = train(ZOSGD, x, y, model, n_probes=2)
    largest = max(max(r["losses"]) for r in opt.trajectory)
    delta = 4 * torch.finfo(torch.float32).eps * largest
    assert ranks[0]["zosgd"]["losses"][0] == pytest.approx(opt.trajectory[0]["losses"], abs=delta)
    bound = STEPS * 1e-2 * (delta / 1e-3) * 4.86
    for got, p in zip(ranks[0]["zosgd"]["params"], model.parameters()):
        torch.testing.assert_close(torch.tensor(got), p.detach().flatten(), atol=bound, rtol=0)


@pytest.mark.parametrize("scenario", ["desync_seed", "desync_check_every"])
def test_desynchronised_ranks_fail_clearly(tmp_path, scenario):
    ranks = _launch(scenario, tmp_path)
    for result in ranks:
        assert "ranks disagree" in result.get("error", ""), result


def test_ranks_that_differ_beyond_their_seed_fail_clearly_instead_of_diverging(tmp_path):
    """A rank-local learning rate or trainable set, a 16-bit merged perturbation one rank took back, ranks that start
    from different weights: the ranks diverged silently. Another n_probes aborted inside gloo, and seed=None on one
    rank hung both until the process group's timeout."""
    ranks = _launch("desync_setup", tmp_path)
    for result in ranks:
        for name in ("lr", "frozen", "merged_read"):
            assert "ranks disagree on step" in result[name] and "materialize() on every rank" in result[name], name
        assert "ranks disagree on the optimizer class and options" in result["n_probes"]
        assert "ranks disagree on the use of seed=None" in result["seed_none"]
        assert "ranks disagree on the parameters' values at this optimizer's first step" in result["weights"]
    assert ranks[0]["merged_read_float32"] == ranks[1]["merged_read_float32"]


def test_ranks_at_different_steps_fail_at_their_first_loss_reduction(tmp_path):
    # Collectives pair by call order: without the step's identity in the reduction, rank 0 would average its losses
    # with rank 1's of another step (or with a seed check) and take a garbage step.
    for result in _launch("desync_step", tmp_path):
        assert len(result["errors"]) == 2 and all("ranks disagree on step" in e for e in result["errors"]), result
        assert max(result["moved"]) < 1e-6  # restored, no update


def test_a_step_the_ranks_disagree_on_is_skipped_counted_and_replayed(tmp_path):
    for rank, result in enumerate(_launch("desync_replay", tmp_path)):
        for name, _, _ in SCENARIOS:  # host reductions (two probes, FZOO) and the device step
            assert f"ranks disagree on step {1 + rank}" in result[name]["error"], (rank, name)
            assert result[name]["nonfinite"] == 1 and result[name]["replays"] == (rank == 0), (rank, name, result[name])


def test_a_closure_that_raises_on_one_rank_leaves_the_ranks_identical(tmp_path):
    # Rank 1 goes on with NaN losses, so both ranks run the same passes and skip the same update; rank 1 raises.
    ranks = _launch("closure_raises", tmp_path)
    for name in ("zosgd", "zosgd-device", "fzoo", "ldsd"):
        zero, one = ranks[0][name], ranks[1][name]
        assert zero["params"] == one["params"], name
        assert zero["raised"] == [] and one["raised"] == ["'bad batch'"], name
        assert zero["skipped"] == one["skipped"] and len(zero["skipped"]) == 1, name


def test_default_seed_comes_from_rank_zero(tmp_path):
    ranks = _launch("default_seed", tmp_path)
    assert ranks[0]["seed"] == ranks[1]["seed"]


def test_one_rank_replays_alone(tmp_path):
    """A data-parallel run's trajectory holds the averaged losses: replay needs no other rank (a collective there
    would wait for ranks that are not replaying, until the timeout)."""
    ranks = _launch("replay_alone", tmp_path)
    assert ranks[0]["equal"] is True
    # and goes on with the optimizer replay returned, in step with the other rank (its first step made a collective
    # of its own, which paired with the other rank's loss reduction: gloo aborted)
    assert ranks[0]["after"] == ranks[1]["after"]


def test_the_first_steps_weight_checksums_read_every_parameter_a_step_writes_and_skip_the_rest():
    from zokern.optim._distributed import weights_checksums

    class TaggedParameter(torch.nn.Parameter):  # a plain subclass: trained in place, so checked
        pass

    g = torch.Generator().manual_seed(0)
    trained = [torch.randn(5, generator=g), torch.randn(3, generator=g).bfloat16(), TaggedParameter(torch.randn(4))]
    unreadable = [
        torch.quantize_per_tensor(torch.randn(4), 0.1, 0, torch.qint8),  # a frozen quantized weight
        torch.randn(3, dtype=torch.complex64).conj(),  # a lazy conjugate
        torch.empty(3, device="meta"),
    ]
    sums = weights_checksums(trained + unreadable)  # no error: what no step writes counts as 0
    assert all(s != 0 for s in sums[:3]) and sums[3:] == [0, 0, 0]
    nudged = [t.detach().clone() for t in trained]
    nudged[2] = TaggedParameter(torch.nextafter(trained[2].detach(), torch.tensor(1.0)))  # one ulp on one element
    assert weights_checksums(nudged)[2] != sums[2] and weights_checksums(nudged)[:2] == sums[:2]
