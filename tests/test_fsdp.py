"""Sharded parameters: a model sharded with FSDP2 over two CPU processes (gloo) trains exactly as one process holding
the whole model (tests/fsdp_worker.py is one rank)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from fsdp_worker import CASES
from fsdp_worker import HSDP_STEPS
from fsdp_worker import STEPS
from fsdp_worker import Scored
from fsdp_worker import ldsd_raising_at_f_minus
from fsdp_worker import loop
from fsdp_worker import loss_of
from fsdp_worker import model_and_batch
from fsdp_worker import optimizer
from fsdp_worker import penalty
from fsdp_worker import raising_step
from fsdp_worker import run
from fsdp_worker import skipping_the_head
from fsdp_worker import train
from fsdp_worker import train_scored
from helpers import launch_ranks

from zokern.optim import ZOSGD
from zokern.optim import ZOAdam

WORKER = Path(__file__).with_name("fsdp_worker.py")


def _whole(model) -> list[list[float]]:
    return [p.detach().float().flatten().tolist() for p in model.parameters()]


def _halves(x, y):
    return [(x[:8], y[:8]), (x[8:], y[8:])]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    return launch_ranks(WORKER, "train", tmp_path_factory.mktemp("train"))


def test_sharded_steps_equal_one_process_holding_the_whole_model(trained):
    ranks = trained
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
        if name == "zosgd":  # the trajectory replayed onto each rank's shards of the starting weights
            assert ranks[0]["zosgd-replayed"] == ranks[1]["zosgd-replayed"] == _whole(model)
        if name == "ldsd":  # resumed halfway from each rank's state dict
            assert ranks[0]["ldsd-resumed"] == ranks[1]["ldsd-resumed"] == _whole(model)
        if name == "adam":  # the same run resumed halfway from each rank's state dict (gathered or not), or a whole
            # model's
            for source in ("shards", "replicated", "whole"):
                resumed = f"adam-resumed-{source}"
                assert ranks[0][resumed] == ranks[1][resumed] == _whole(model), resumed


def test_the_exact_mode_perturbs_the_gathered_tensors_and_never_writes_the_shards(trained):
    # With lr = 0, bfloat16 shards stay bit for bit as they were, and the losses are a whole bfloat16 model's in the
    # exact mode; so are those of float32 shards gathered as bfloat16 copies (MixedPrecisionPolicy), whose copies the
    # exact mode perturbs as a bfloat16 model's weights. (Trained with lr > 0: CASES' "bf16-exact" ones.)
    ranks = trained
    model, x, y = model_and_batch(torch.bfloat16)
    opt = train(model, ZOSGD, _halves(x, y), lr=0.0, perturbation="exact")
    losses = [r["losses"] for r in opt.trajectory]
    assert all(plus != minus for plus, minus in losses)
    _, x32, _ = model_and_batch()
    mixed = train(model_and_batch(torch.bfloat16)[0], ZOSGD, _halves(x32.bfloat16(), y), lr=0.0)
    for rank in ranks:
        assert rank["exact-lr0"] == dict(unchanged=True, losses=losses)
        assert rank["exact-mixed-lr0"] == dict(unchanged=True, losses=[r["losses"] for r in mixed.trajectory])


def test_ops_given_the_dtensors_themselves_receive_them_perturbed_in_the_exact_mode(trained):
    # A closure that also computes with the DTensors (a penalty on the weights, outside the forward) read theta
    # there, not theta + eps z: its losses were not one process's.
    model, x, y = model_and_batch(torch.bfloat16)
    opt = optimizer(ZOSGD, model)
    for _ in range(STEPS):
        opt.step(lambda: sum(loss_of(model, a, b).double() for a, b in _halves(x, y)) / 2 + penalty(opt))
    expected = dict(params=_whole(model), losses=[r["losses"] for r in opt.trajectory])
    assert trained[0]["exact-penalty"] == trained[1]["exact-penalty"] == expected


def test_a_sharded_ldsd_step_that_raised_records_the_losses_its_passes_used(trained):
    # Its f- forward raised (on every rank) after the candidates' losses were averaged on the device; the record held
    # each rank's own losses, so the ranks' trajectories differed and replay took another candidate than the run.
    model, x, y = model_and_batch()
    trajectory = ldsd_raising_at_f_minus(model, _halves(x, y))
    assert trajectory[1]["raised"] and len(trajectory[1]["losses"]) == 2
    expected = dict(params=_whole(model), losses=[r["losses"] for r in trajectory])
    assert trained[0]["ldsd-raised"] == trained[1]["ldsd-raised"] == expected


def test_a_loss_computed_through_a_registered_forward_method_steps_as_one_process(trained):
    # register_fsdp_forward_method gathers the root's parameters without the forward pre-hook by which zokern learned
    # FSDP2 modules: in place, the root's gathered copies were never resharded (L- read theta + eps z); in the exact
    # mode its gathered tensors were not found (its parameters refused as unused).
    for dtype in (torch.float32, torch.bfloat16):
        model, x, y = model_and_batch(dtype)
        model.__class__ = Scored
        opt = train_scored(model, [(x[:8], y[:8]), (x[8:], y[8:])])
        assert opt.exact() == (dtype == torch.bfloat16)
        expected = dict(params=_whole(model), losses=[r["losses"] for r in opt.trajectory])
        assert trained[0][f"scored {dtype}"] == trained[1][f"scored {dtype}"] == expected, dtype


def test_modules_gathered_by_hand_between_steps_are_resharded_before_the_next_steps_passes(trained):
    # Not only the modules that ran a forward are resharded before a pass: what unshard() gathered before a step,
    # waited for or still pending (async_op=True: FSDP2's next forward of the module copies out that gather), is not
    # what its forwards read after its first pass wrote the shards. And the first step runs the model's first
    # forward, whose initialisation gave uneven shards new local tensors in torch 2.6: its later passes wrote the old
    # ones (L- read theta + eps z on one rank, the update was lost there).
    ranks = trained
    model, x, y = model_and_batch()
    opt = train(model, ZOSGD, [(x[:8], y[:8]), (x[8:], y[8:])])
    expected = dict(params=_whole(model), losses=[r["losses"] for r in opt.trajectory])
    assert ranks[0]["zosgd-unsharded"] == ranks[1]["zosgd-unsharded"] == expected


def test_after_a_step_that_raised_inside_a_forward_the_steps_go_on_as_one_process_would(trained):
    # FSDP2 keeps a module's gathered weights when its forward raises, as it does the root's after any forward: the
    # next step's forwards, and the model after it, must read the shards.
    ranks = trained
    model, x, y = model_and_batch()
    opt = train(model, ZOSGD, _halves(x, y), steps=1)
    raising_step(opt, model, _halves(x, y))
    run(opt, model, _halves(x, y), steps=2, peek=False)
    expected = dict(params=_whole(model), losses=[r["losses"] for r in opt.trajectory])
    assert ranks[0]["zosgd-raised"] == ranks[1]["zosgd-raised"] == expected


def test_a_rank_whose_forward_skipped_a_parameter_in_the_exact_mode_raises_after_the_step_every_rank_skipped(trained):
    # Raising at once, that rank would leave the other waiting in the next forward's all-gather. One process raises
    # at once and updates nothing either: the same weights after the steps that follow.
    ranks = trained
    model, x, y = model_and_batch(torch.bfloat16)
    raised, skipped = skipping_the_head(model, _halves(x, y), skips=True)
    assert "never passed 2 trainable parameter(s)" in raised and skipped == 0
    assert ranks[0]["exact-skipped"]["params"] == ranks[1]["exact-skipped"]["params"] == _whole(model)
    assert "2 sharded (DTensor) parameter(s) reached no torch operation" in ranks[1]["exact-skipped"]["raised"]
    assert ranks[0]["exact-skipped"]["raised"] == ""
    assert ranks[0]["exact-skipped"]["skipped"] == ranks[1]["exact-skipped"]["skipped"] == 1


def test_a_loop_of_perturbed_blocks_over_shards_equals_one_process(tmp_path):
    # Each forward after apply_projected_grad reads the updated shards, though FSDP2's root kept what the forward
    # before it gathered.
    ranks = launch_ranks(WORKER, "loop", tmp_path)
    model, x, y = model_and_batch()
    after = loop(model, _halves(x, y))
    assert ranks[0]["params"] == ranks[1]["params"] == _whole(model)
    assert [r["after"] for r in ranks] == [after, loop(model_and_batch()[0], [(x[8:], y[8:]), (x[:8], y[:8])])]
    model, x, y = model_and_batch(torch.bfloat16)  # the exact mode's blocks
    after = loop(model, _halves(x, y))
    assert ranks[0]["bf16"]["params"] == ranks[1]["bf16"]["params"] == _whole(model)
    assert ranks[0]["bf16"]["after"] == after


def test_hsdp_steps_equal_one_process_holding_the_whole_model(tmp_path):
    # Shards placed (Replicate(), Shard(0)) over a 2 x 2 mesh: each replica's ranks hold the same rows, and ZOAdam's
    # moments follow them.
    ranks = launch_ranks(WORKER, "hsdp", tmp_path, world=4)
    model, x, y = model_and_batch()
    train(model, ZOAdam, [(x[k * 4 : (k + 1) * 4], y[k * 4 : (k + 1) * 4]) for k in range(4)], HSDP_STEPS, lr=1e-3)
    for rank in ranks:
        assert rank["placements"] == "(Replicate(), Shard(dim=0))"
        assert rank["params"] == _whole(model)


def test_states_saved_on_four_ranks_resume_on_two_and_in_one_process(tmp_path):
    # ZOAdam's moments saved by four ranks (Shard(0) over 4: 2 + 2 + 2 + 1 rows; and HSDP's 2 x 2), loaded by two
    # (4 + 3 rows) and by one process holding the whole model: each takes its rows from the state dicts that hold
    # them, and the run goes on as one process's would have.
    from zokern import replay

    saved, loaded = tmp_path / "save", tmp_path / "load"
    saved.mkdir()
    loaded.mkdir()
    launch_ranks(WORKER, "reshard-save", saved, world=4)
    ranks = launch_ranks(WORKER, "reshard-load", loaded)
    model, x, y = model_and_batch()
    opt = train(model, ZOAdam, list(zip(x.chunk(4), y.chunk(4))), HSDP_STEPS, lr=1e-3)
    run(opt, model, _halves(x, y), HSDP_STEPS)
    for name in ("flat", "hsdp"):
        assert ranks[0][name] == ranks[1][name] == _whole(model), name
    # One process: the weights after the saved steps (replayed from the run's trajectory), the moments loaded.
    whole = model_and_batch()[0]
    replay(list(whole.parameters()), opt.trajectory[:HSDP_STEPS])
    resumed = ZOAdam(whole.parameters(), lr=1e-3, eps=1e-3, seed=77)
    resumed.load_sharded_state_dict(torch.load(saved / f"flat{r}.pt", weights_only=True) for r in range(4))
    assert resumed.steps_taken == HSDP_STEPS
    run(resumed, whole, _halves(x, y), HSDP_STEPS)
    assert _whole(whole) == _whole(model)
    # Three of the four state dicts: refused on both ranks (rank 0's rows, 0-3 of 7, are all there; rank 1's last
    # row is not), and in another order (each state dict says which rank saved it), the run goes on as above.
    for rank in ranks:
        assert "the state dicts of 4 ranks were saved, and those of ranks [3] were not given" in rank["three"]
        assert rank["shuffled"] == _whole(model)
        assert "two state dicts saved by rank 2 were given" in rank["twice"]


@pytest.fixture(scope="module")
def refusals(tmp_path_factory):
    return launch_ranks(WORKER, "refusals", tmp_path_factory.mktemp("refusals"))


@pytest.mark.parametrize(
    "case, message",
    [
        ("exact write", "RuntimeError: exact perturbation: the closure writes a sharded (DTensor) parameter of shape"),
        ("ldsd exact", "TypeError: LDSD trains sharded (DTensor) parameters in the in-place mode only"),
        ("ldsd mixed", "ValueError: LDSD trains sharded parameters when all of its trained parameters are shards"),
        ("ldsd replay mixed", "ValueError: LDSD trains sharded parameters when all of its trained parameters are"),
        ("merge_steps", "ValueError: merge_steps is not supported with sharded (DTensor) parameters"),
        ("columns", "TypeError: param group 0: params[0] is a DTensor placed (Shard(dim=1),)"),
        (
            "placement",
            "ShardingMismatch: param_groups[0]['params'][0] (shape (7, 6)) is placed (Shard(dim=0),) over a mesh",
        ),
        ("dcp template", "ValueError: the state dict holds states of 0 parameters where its run saved 7"),
        (
            "unsharded",
            "ShardingMismatch: param_groups[0]['params'][0] (shape (7, 6)) is not sharded, but its saved state",
        ),
    ],
)
def test_what_shards_cannot_run_is_refused_and_leaves_them_untouched(refusals, case, message):
    for rank in refusals:  # on every rank alike (each names its own shard's shape)
        assert rank[case].startswith(message)
        assert rank[f"{case} unchanged"] is True


def test_an_optimizer_built_from_the_gathered_copies_of_a_forward_is_warned_of(refusals):
    for rank in refusals:
        assert rank["forward first False"] == []
        (message,) = rank["forward first True"]
        assert "model.parameters() gave their plain copies in place of the root's DTensors" in message


def test_a_sixteen_bit_loss_over_shards_is_warned_of_with_fsdp2s_output_cast(refusals):
    for rank in refusals:
        (message,) = rank["bf16 loss"]
        assert "bfloat16 loss" in message and "MixedPrecisionPolicy's output_dtype casts the model's outputs" in message
