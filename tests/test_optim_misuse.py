"""What a step refuses before its first pass, or survives, when the user changes things under it: parameters resized
or reshaped after their state was built, memory shared across groups, steps under torch.inference_mode, a closure
that refills one loss tensor or steps the optimizer itself, a final pass that fails, Ctrl-C during a pass; and what
a checkpoint or a replay hands back: damaged state dicts refused before loading, a replayed optimizer that goes on
as the run."""

from __future__ import annotations

import contextlib
import copy
import math
import signal
import warnings
from fractions import Fraction

import pytest
import torch

import zokern
from zokern.optim import LDSD
from zokern.optim import ZOSGD
from zokern.optim import ZOAdam
from zokern.optim import ZOSignSGD

STATEFUL = [
    pytest.param(ZOAdam, dict(), id="adam"),
    pytest.param(ZOSGD, dict(momentum=0.9), id="sgd-momentum"),
    pytest.param(ZOSignSGD, dict(momentum=0.9, lr=1e-3), id="sign-momentum"),
    pytest.param(LDSD, dict(k=2, update="adam", backend="torch"), id="ldsd-adam-torch"),
    pytest.param(LDSD, dict(k=2, momentum=0.9), id="ldsd-momentum-cpu"),
]


def _pair(seed=0):
    g = torch.Generator().manual_seed(seed)
    a = torch.nn.Parameter(torch.randn(4, generator=g))
    b = torch.nn.Parameter(torch.randn(6, generator=g))
    return a, b


def _loss(a, b):
    return a.sum() ** 2 + (b.reshape(-1) ** 2 * torch.arange(1, b.numel() + 1)).sum()


def _optimizer(cls, params, kwargs):
    return cls(params, **{"lr": 1e-2, "eps": 1e-3, "seed": 0, **kwargs})


@pytest.mark.parametrize("cls, kwargs", STATEFUL)
def test_a_parameter_resized_after_its_state_was_built_is_refused_before_any_pass(cls, kwargs):
    a, b = _pair()
    opt = _optimizer(cls, [a, b], kwargs)
    opt.step(lambda: _loss(a, b))
    b.data = torch.randn(9)  # an embedding grown in place
    a_before, steps, records = a.detach().clone(), opt.steps_taken, len(opt.trajectory)
    with pytest.raises(ValueError, match=r"params'\]\[1\] has shape \(9,\) but its optimizer state .* resized"):
        opt.step(lambda: _loss(a, b))
    assert torch.equal(a.detach(), a_before)  # the parameter before it was not updated
    assert (opt.steps_taken, len(opt.trajectory)) == (steps, records)  # no seed drawn, nothing recorded
    del opt.state[b]  # the way out the message names
    opt.step(lambda: _loss(a, b))
    assert not torch.equal(a.detach(), a_before)


@pytest.mark.parametrize("cls, kwargs", STATEFUL)
def test_a_parameter_reshaped_in_place_keeps_its_state_in_stream_order(cls, kwargs):
    a, b = _pair()
    twin_a, twin_b = _pair()
    opt, twin = _optimizer(cls, [a, b], kwargs), _optimizer(cls, [twin_a, twin_b], kwargs)
    for _ in range(2):
        opt.step(lambda: _loss(a, b))
        twin.step(lambda: _loss(twin_a, twin_b))
    b.data = b.data.view(2, 3)  # the same elements, row-major as the stream indexes them
    for _ in range(2):
        opt.step(lambda: _loss(a, b))
        twin.step(lambda: _loss(twin_a, twin_b))
    assert torch.equal(a.detach(), twin_a.detach())
    assert torch.equal(b.detach().reshape(-1), twin_b.detach())
    assert all(v.shape == b.shape for v in opt.state[b].values() if isinstance(v, torch.Tensor) and v.dim())


@pytest.mark.parametrize(
    "cls, kwargs",
    [(ZOSGD, {}), (ZOAdam, {}), (LDSD, dict(k=1)), (LDSD, dict(k=2))],
    ids=["sgd", "adam", "ldsd-k1", "ldsd-k2"],
)
def test_parameters_that_share_memory_are_refused_across_groups_and_by_ldsd(cls, kwargs):
    w = torch.nn.Parameter(torch.randn(8))
    tied = torch.nn.Parameter(w.data[2:6])  # a view of w: its elements would be trained twice
    layouts = [[{"params": [w]}, {"params": [tied], "weight_decay": 0.0}]]  # one group: refused at construction
    for params in layouts:
        opt = _optimizer(cls, params, kwargs)
        before, calls = w.detach().clone(), []
        with pytest.raises(ValueError, match=r"param_groups\[\d\]\['params'\]\[0\] and .* overlap in memory"):
            opt.step(lambda calls=calls: calls.append(1) or w.sum() ** 2)
        assert torch.equal(w.detach(), before) and not calls and opt.steps_taken == 0


def test_ldsd_refuses_inference_tensors_outside_inference_mode_before_any_evaluation():
    with torch.inference_mode():
        layer = torch.nn.Linear(3, 2)
    before, calls = layer.weight.detach().clone(), []
    opt = LDSD(layer.parameters(), lr=0.1, eps=1e-2, seed=1, k=1)
    with pytest.raises(ValueError, match=r"param_groups\[0\]\['params'\]\[0\] is an inference tensor"):
        opt.step(lambda: calls.append(1) or layer(torch.ones(1, 3)).pow(2).sum())
    assert torch.equal(layer.weight.detach(), before) and not calls and opt.steps_taken == 0


@pytest.mark.parametrize("name", ["perturb_", "two_seed_"])
def test_a_pass_whose_later_call_raises_leaves_every_group_restored(name, monkeypatch):
    """Groups of different eps make separate calls of one pass: a call that raised after an earlier one had run left
    that group moved while the step's record, from which its undo starts, held the pass as not applied."""
    a, b = _pair()
    start = [a.detach().clone(), b.detach().clone()]
    opt = ZOSGD([{"params": [a]}, {"params": [b], "eps": 2e-2}], lr=0.0, eps=1e-2, seed=3, n_probes=2)
    original, calls = getattr(zokern.optim.base.ops, name), []

    def fails_on_the_second_call(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("out of memory")
        return original(*args, **kwargs)

    monkeypatch.setattr(zokern.optim.base.ops, name, fails_on_the_second_call)
    with pytest.raises(RuntimeError, match="out of memory"):
        opt.step(lambda: _loss(a, b))
    for p, s in zip((a, b), start):
        torch.testing.assert_close(p.detach(), s, atol=1e-6, rtol=0)


def test_an_inference_tensor_among_many_groups_is_named_by_its_group():
    """Groups of equal values share one fused call, whose set counts tensors across groups: its "tensors[1]" pointed
    at another group's parameter. The step names the parameter, as LDSD's check does."""
    params = [torch.nn.Parameter(torch.randn(4)) for _ in range(3)]
    with torch.inference_mode():
        odd = torch.nn.Parameter(torch.randn(4))
    groups = [{"params": [p], "eps": eps} for p, eps in zip([*params, odd], (1e-3, 2e-3, 1e-3, 2e-3))]
    opt = ZOSGD(groups, lr=0.1, seed=1)
    with pytest.raises(ValueError, match=r"param_groups\[3\]\['params'\]\[0\] is an inference tensor"):
        opt.step(lambda: sum(p.sum() for p in params) ** 2)


@pytest.mark.parametrize("cls, kwargs", STATEFUL + [pytest.param(LDSD, dict(k=2, update="adam"), id="ldsd-adam-cpu")])
def test_states_built_under_inference_mode_serve_the_steps_outside_it(cls, kwargs):
    """ZO needs no autograd, so a first step under torch.inference_mode is natural; its states must stay usable."""
    a, b = _pair()
    twin_a, twin_b = _pair()
    opt, twin = _optimizer(cls, [a, b], kwargs), _optimizer(cls, [twin_a, twin_b], kwargs)
    with torch.inference_mode():
        opt.step(lambda: _loss(a, b))
    twin.step(lambda: _loss(twin_a, twin_b))
    for _ in range(2):
        opt.step(lambda: _loss(a, b))
        twin.step(lambda: _loss(twin_a, twin_b))
    assert torch.equal(a.detach(), twin_a.detach()) and torch.equal(b.detach(), twin_b.detach())
    assert not any(v.is_inference() for s in opt.state.values() for v in s.values() if isinstance(v, torch.Tensor))
    with torch.inference_mode():  # and a state dict loaded under it too
        reloaded = _optimizer(cls, [a, b], kwargs)
        reloaded.load_state_dict(opt.state_dict())
    reloaded.step(lambda: _loss(a, b))


@pytest.mark.parametrize(
    "cls, kwargs, key",
    [
        (ZOSGD, {}, "eps"),
        (ZOSGD, dict(n_probes=2), "eps"),
        (ZOSGD, dict(one_sided=True), "eps"),
        (ZOAdam, {}, "eps"),
        (LDSD, dict(k=3), "eps"),
        (LDSD, dict(k=3), "sigma"),
    ],
    ids=["sgd", "sgd-2-probes", "sgd-one-sided", "adam", "ldsd", "ldsd-sigma"],
)
def test_a_closure_that_changes_what_the_step_perturbs_by_is_refused_and_theta_restored(cls, kwargs, key):
    # The passes after the change took back another perturbation than the one applied: with lr = 0, theta moved
    # (by 0.78 at eps 1e-2 -> 0.5), and a value step() would refuse (eps = -1) was applied, then refused by replay.
    a, b = _pair()
    before = [a.detach().clone(), b.detach().clone()]
    opt = _optimizer(cls, [a, b], dict(kwargs, lr=0.0))
    was = opt.param_groups[0][key]
    calls = [0]

    def changing():
        calls[0] += 1
        if calls[0] == 2:
            opt.param_groups[0][key] = -1.0
        return _loss(a, b)

    opt.step(lambda: _loss(a, b))
    with pytest.raises(ValueError, match=rf"param group 0's {key} was changed from {was} to -1.0 during a step"):
        opt.step(changing)
    assert opt.param_groups[0][key] == was
    for p, start in zip((a, b), before):  # (float32 in place: restored to its rounding)
        torch.testing.assert_close(p.detach(), start, atol=1e-6, rtol=0)
    opt.step(lambda: _loss(a, b))
    replayed = [t.clone() for t in before]
    zokern.replay(replayed, opt.trajectory)
    assert torch.equal(replayed[0], a) and torch.equal(replayed[1], b)


@pytest.mark.parametrize(
    "cls, kwargs, key, value",
    [
        (ZOSignSGD, {}, "lr", math.nan),
        (ZOSGD, dict(momentum=0.9), "lr", math.nan),
        (ZOSGD, dict(momentum=0.9), "weight_decay", -math.inf),
        (ZOAdam, {}, "lr", math.nan),
        (ZOAdam, {}, "betas", (math.nan, 0.999)),
        (LDSD, dict(k=3), "lr", math.nan),
    ],
    ids=["signsgd-lr", "momentum-lr", "momentum-weight-decay", "adam-lr", "adam-betas", "ldsd-lr"],
)
def test_a_closure_that_sets_a_bad_hyperparameter_is_refused_before_the_update(cls, kwargs, key, value):
    # The host-side update rules read the groups after the closures and wrote NaN into theta, silently (not counted
    # as a non-finite step); the fused passes' own checks refused it for ZO-SGD.
    a, b = _pair()
    before = [a.detach().clone(), b.detach().clone()]
    opt = _optimizer(cls, [a, b], kwargs)
    calls = [0]

    def setting():
        calls[0] += 1
        if calls[0] == 2:
            opt.param_groups[0][key] = value
        return _loss(a, b)

    with pytest.raises(ValueError, match="param group 0"):
        opt.step(setting)
    for p, start in zip((a, b), before):
        assert torch.isfinite(p).all()
        torch.testing.assert_close(p.detach(), start, atol=1e-6, rtol=0)


def test_an_lr_the_closure_sets_is_this_steps_as_in_torch_optim():
    # torch.optim's steps call the closure first, then read the groups: so does the update here.
    a, b = _pair()
    twin_a, twin_b = _pair()
    opt, twin = ZOSGD([a, b], lr=1e-2, seed=3), ZOSGD([twin_a, twin_b], lr=1e-2, seed=3)

    def setting():
        opt.param_groups[0]["lr"] = 0.5
        return _loss(a, b)

    opt.step(setting)
    twin.param_groups[0]["lr"] = 0.5
    twin.step(lambda: _loss(twin_a, twin_b))
    assert torch.equal(a, twin_a) and torch.equal(b, twin_b) and opt.trajectory[-1]["lr"] == [0.5]


@pytest.mark.parametrize("cls, kwargs", [(ZOSGD, {}), (ZOSGD, dict(n_probes=2))], ids=["sgd", "sgd-2-probes"])
def test_a_closure_that_changes_eps_then_raises_leaves_eps_and_a_trajectory_that_replays(cls, kwargs):
    # Its own exception propagates; eps was left changed, and recorded so: replay took other steps.
    a, b = _pair()
    before = [a.detach().clone(), b.detach().clone()]
    opt = _optimizer(cls, [a, b], kwargs)

    def changing_then_raising():
        opt.param_groups[0]["eps"] = 0.1
        raise RuntimeError("a bad batch")

    opt.step(lambda: _loss(a, b))
    with pytest.raises(RuntimeError, match="a bad batch"):
        opt.step(changing_then_raising)
    assert opt.param_groups[0]["eps"] == 1e-3 and opt.trajectory[-1]["eps"] == [1e-3]
    opt.step(lambda: _loss(a, b))
    replayed = [t.clone() for t in before]
    zokern.replay(replayed, opt.trajectory)
    assert torch.equal(replayed[0], a) and torch.equal(replayed[1], b)


@pytest.mark.parametrize(
    "cls, kwargs",
    [(ZOSGD, {}), (ZOSGD, dict(n_probes=2)), (ZOAdam, {}), (LDSD, dict(k=3))],
    ids=["sgd", "sgd-2-probes", "adam", "ldsd"],
)
def test_a_closure_that_refills_one_loss_tensor_gives_each_evaluation_its_own_value(cls, kwargs):
    a, b = _pair()
    twin_a, twin_b = _pair()
    buffer = torch.zeros(())

    def refilled():
        return buffer.copy_(_loss(a, b))

    opt, twin = _optimizer(cls, [a, b], kwargs), _optimizer(cls, [twin_a, twin_b], kwargs)
    opt.step(refilled)
    twin.step(lambda: _loss(twin_a, twin_b))
    assert opt.trajectory[-1]["losses"] == twin.trajectory[-1]["losses"]
    assert len(set(opt.trajectory[-1]["losses"])) == len(opt.trajectory[-1]["losses"])
    assert torch.equal(a.detach(), twin_a.detach())


@pytest.mark.parametrize(
    "cls, kwargs",
    [(ZOSGD, dict(perturbation="exact")), (ZOSGD, {}), (LDSD, dict(k=2))],
    ids=["exact", "inplace", "ldsd"],
)
def test_a_step_called_from_its_own_closure_is_refused_and_theta_restored(cls, kwargs):
    w = torch.nn.Parameter(torch.randn(3, 3))
    start = w.detach().clone()
    opt = _optimizer(cls, [w], {**kwargs, "lr": 0.0})

    def closure():
        opt.step(lambda: w.pow(2).sum())
        return w.pow(2).sum()

    with pytest.raises(RuntimeError, match=r"step was called while a step or a perturbed\(\) block"):
        opt.step(closure)
    torch.testing.assert_close(w.detach(), start, atol=1e-6, rtol=0)
    assert [r["step"] for r in opt.trajectory] == [0] and opt.trajectory[0]["raised"]
    opt.step(lambda: w.pow(2).sum())  # the optimizer goes on
    assert [r["step"] for r in opt.trajectory] == [0, 1]


def test_nested_perturbed_blocks_and_an_update_inside_one_are_refused():
    w = torch.nn.Parameter(torch.randn(5))
    start = w.detach().clone()
    opt = ZOSGD([w], lr=0.1, eps=1e-3, seed=0)
    seed = opt.new_seed()
    with opt.perturbed(seed, +1):
        with pytest.raises(RuntimeError, match=r"perturbed was called while"):
            with opt.perturbed(seed, -1):
                pass
        with pytest.raises(RuntimeError, match=r"apply_projected_grad was called while"):
            opt.apply_projected_grad(seed, 1.0)
    torch.testing.assert_close(w.detach(), start, atol=1e-6, rtol=0)
    opt.apply_projected_grad(seed, 1.0)  # outside the block, as documented
    assert not torch.equal(w.detach(), start)


@pytest.mark.parametrize("backend", ["cpu", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "seed,scale,exc,match",
    [
        (2**64 + 5, 1.0, ValueError, r"seed must be in \[0, 2\^63\)"),
        (-1, 1.0, ValueError, r"seed must be in \[0, 2\^63\)"),
        (1.5, 1.0, TypeError, r"seed must be an integer"),
        (3, 1e42, ValueError, r"invalid scale \* eps: 1e\+39 \(a step moves theta by up to 2 x 4.855"),
        (3, -1e41, ValueError, r"scale \* eps must be below 3.504e\+37"),  # theta + scale eps z would overflow
    ],
)
def test_perturbed_checks_its_seed_and_scale_before_anything(backend, dtype, seed, scale, exc, match):
    """As the in-place passes check them: in the exact mode (bf16's default) the copy pass took the seed as it was
    (2^64 + 5 wrapped to 5 on the torch backend) and a scale * eps beyond float32 made the loss NaN."""
    w = torch.nn.Parameter(torch.randn(5).to(dtype))
    start = w.detach().clone()
    opt = ZOSGD([w], lr=0.1, eps=1e-3, backend=backend)
    with pytest.raises(exc, match=match):
        with opt.perturbed(seed, scale):
            w.pow(2).sum()
    assert torch.equal(w.detach(), start)
    with opt.perturbed(opt.new_seed()):  # the optimizer goes on
        w.float().pow(2).sum()


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_an_ldsd_final_pass_that_fails_leaves_theta_restored_and_adam_counts_unchanged(backend, monkeypatch):
    a, b = _pair()
    opt = LDSD([a, b], lr=0.1, eps=1e-2, seed=1, k=2, update="adam", backend=backend)
    opt.step(lambda: _loss(a, b))
    theta = [a.detach().clone(), b.detach().clone()]
    counts = [opt.state[p]["step"].clone() for p in (a, b)]

    def failing(*args, **kwargs):
        raise RuntimeError("device lost")

    monkeypatch.setattr(zokern.optim.ldsd.passes, "final_", failing)
    with pytest.raises(RuntimeError, match="device lost"):
        opt.step(lambda: _loss(a, b))
    torch.testing.assert_close(a.detach(), theta[0], atol=1e-6, rtol=0)
    torch.testing.assert_close(b.detach(), theta[1], atol=1e-6, rtol=0)
    assert all(torch.equal(opt.state[p]["step"], c) for p, c in zip((a, b), counts))


def _interrupted_during(monkeypatch, module, name, call=1, signals=(signal.SIGINT,)):
    """Make the ``call``-th call of module.name receive ``signals`` while it runs (SIGINT: as Ctrl-C mid-pass would)."""
    real, calls = getattr(module, name), []

    def pass_(*args, **kwargs):
        calls.append(1)
        out = real(*args, **kwargs)
        if len(calls) == call:
            for signum in signals:
                signal.raise_signal(signum)
        return out

    monkeypatch.setattr(module, name, pass_)


@contextlib.contextmanager
def _handling(signum, handler):
    """``handler`` takes ``signum`` inside the block; the one before is put back after."""
    previous = signal.signal(signum, handler)
    try:
        yield
    finally:
        signal.signal(signum, previous)


@pytest.mark.parametrize("name, call", [("perturb_", 1), ("perturb_", 2), ("restore_update_", 1), ("two_seed_", 1)])
def test_ctrl_c_during_a_pass_over_several_groups_leaves_every_group_restored(name, call, monkeypatch):
    a, b = _pair()
    groups = [{"params": [a]}, {"params": [b], "weight_decay": 0.0}]
    opt = ZOSGD(groups, lr=0.0, eps=1e-2, seed=3, n_probes=2 if name == "two_seed_" else 1)
    start = [a.detach().clone(), b.detach().clone()]
    _interrupted_during(monkeypatch, zokern.optim.base.ops, name, call)
    with pytest.raises(KeyboardInterrupt):
        opt.step(lambda: _loss(a, b))
    for p, s in zip((a, b), start):  # lr = 0: every group back at theta (to rounding), none at theta +- eps z
        torch.testing.assert_close(p.detach(), s, atol=1e-6, rtol=0)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the user's handler is back


def test_ctrl_c_during_an_ldsd_move_leaves_every_group_restored(monkeypatch):
    a, b = _pair()
    opt = LDSD([{"params": [a]}, {"params": [b]}], lr=0.0, mu_lr=0.0, eps=1e-2, seed=1, k=3)
    start = [a.detach().clone(), b.detach().clone()]
    _interrupted_during(monkeypatch, zokern.optim.ldsd.passes, "move_", 1)
    with pytest.raises(KeyboardInterrupt):
        opt.step(lambda: _loss(a, b))
    for p, s in zip((a, b), start):
        torch.testing.assert_close(p.detach(), s, atol=1e-6, rtol=0)


def test_ctrl_c_during_an_update_pass_is_raised_once_the_step_is_recorded_as_done(monkeypatch):
    """An update applied but recorded as raised would make replay miss it: the interrupt waits for the record."""
    a, b = _pair()
    start = [a.detach().clone(), b.detach().clone()]
    opt = ZOSGD([{"params": [a]}, {"params": [b], "weight_decay": 0.0}], lr=1e-2, eps=1e-3, seed=3)
    _interrupted_during(monkeypatch, zokern.optim.base.ops, "restore_update_", 1)
    with pytest.raises(KeyboardInterrupt):
        opt.step(lambda: _loss(a, b))
    record = opt.trajectory[-1]
    assert not record.get("raised") and not record["skipped"]
    replayed = [s.clone() for s in start]
    zokern.replay(replayed, opt.trajectory)
    assert torch.equal(replayed[0], a.detach()) and torch.equal(replayed[1], b.detach())


@pytest.mark.parametrize(
    "cls, kwargs", [(ZOSGD, dict(momentum=0.9)), (ZOAdam, {}), (ZOSignSGD, {})], ids=["momentum", "adam", "sign"]
)
def test_ctrl_c_after_the_last_forward_but_before_the_update_replays_as_the_run_went(cls, kwargs, monkeypatch):
    """The restore pass after the forwards holds a Ctrl-C to its end, then the step raises before its update: a
    record with all its losses but no update, which replay must not complete."""
    a, b = _pair()
    start = [a.detach().clone(), b.detach().clone()]
    opt = _optimizer(cls, [a, b], kwargs)
    opt.step(lambda: _loss(a, b))  # a first step: the state the interrupted one finds is not fresh
    _interrupted_during(monkeypatch, zokern.optim.base.ops, "perturb_", call=3)  # this step's restore pass
    with pytest.raises(KeyboardInterrupt):
        opt.step(lambda: _loss(a, b))
    monkeypatch.undo()
    opt.step(lambda: _loss(a, b))
    record = opt.trajectory[1]
    assert record["raised"] and len(record["losses"]) == 2
    replayed = [s.clone() for s in start]
    zokern.replay(replayed, opt.trajectory)
    assert torch.equal(replayed[0], a.detach()) and torch.equal(replayed[1], b.detach())


def test_ctrl_c_during_a_conservative_exact_commit_updates_all_groups_or_none(monkeypatch):
    from zokern.optim import ZOConservative

    a, b = (torch.nn.Parameter(p.detach().bfloat16()) for p in _pair())
    start = [a.detach().clone(), b.detach().clone()]
    opt = ZOConservative([{"params": [a]}, {"params": [b], "weight_decay": 0.0}], lr=1e-2, eps=1e-2, seed=3)
    _interrupted_during(monkeypatch, zokern.optim.base.ops, "perturb_", 1)  # its only passes: the commit's
    with pytest.raises(KeyboardInterrupt):
        opt.step(lambda: _loss(a.float(), b.float()))
    replayed = [s.clone() for s in start]
    zokern.replay(replayed, opt.trajectory)
    assert torch.equal(replayed[0], a.detach()) and torch.equal(replayed[1], b.detach())


def test_ctrl_c_during_a_merged_take_back_takes_it_back_once(monkeypatch):
    a, b = _pair()
    twin_a, twin_b = _pair()
    opt = ZOSGD([a, b], lr=1e-2, eps=1e-1, seed=3, perturbation="inplace", merge_steps=True)
    twin = ZOSGD([twin_a, twin_b], lr=1e-2, eps=1e-1, seed=3, perturbation="inplace", merge_steps=True)
    opt.step(lambda: _loss(a, b))
    twin.step(lambda: _loss(twin_a, twin_b))
    _interrupted_during(monkeypatch, zokern.optim.lookahead.ops, "perturb_", 1)
    with pytest.raises(KeyboardInterrupt):
        opt.materialize()
    monkeypatch.undo()
    opt.materialize()
    twin.materialize()
    assert torch.equal(a.detach(), twin_a.detach()) and torch.equal(b.detach(), twin_b.detach())


def test_ctrl_c_during_a_zopro_pass_leaves_theta_restored(monkeypatch):
    from zokern.preference.directions import ZOPrODirection
    from zokern.preference.optim import ZOPrO

    a, b = _pair()
    start = [a.detach().clone(), b.detach().clone()]
    opt = ZOPrO([a, b], lr=0.0, eps=1e-2, seed=3)
    _interrupted_during(monkeypatch, ZOPrODirection, "apply_", 1)
    with pytest.raises(KeyboardInterrupt):
        opt.step(lambda: _loss(a, b))
    for p, s in zip((a, b), start):
        torch.testing.assert_close(p.detach(), s, atol=1e-6, rtol=0)


def test_a_programs_own_sigint_handler_is_left_alone(monkeypatch):
    """A handler other than Python's default (asyncio's add_signal_handler wakes its loop through a file descriptor
    when the signal arrives) is not replaced: it hears one Ctrl-C once, when it comes."""
    import socket

    heard = []
    reader, writer = socket.socketpair()
    writer.setblocking(False)
    previous = signal.signal(signal.SIGINT, lambda signum, frame: heard.append(signum))
    previous_fd = signal.set_wakeup_fd(writer.fileno(), warn_on_full_buffer=False)  # as asyncio's loop does
    try:
        a, b = _pair()
        opt = ZOSGD([{"params": [a]}, {"params": [b]}], lr=1e-2, eps=1e-3, seed=3)
        _interrupted_during(monkeypatch, zokern.optim.base.ops, "perturb_", 1)
        opt.step(lambda: _loss(a, b))
        reader.setblocking(False)
        assert heard == [signal.SIGINT] and reader.recv(16) == bytes([signal.SIGINT])  # once, not twice
    finally:
        signal.set_wakeup_fd(previous_fd)
        signal.signal(signal.SIGINT, previous)
        reader.close()
        writer.close()


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "preemption"])
def test_a_programs_own_raising_handler_gets_the_held_signal_once_theta_is_consistent(signum, monkeypatch):
    class Stop(Exception):
        pass

    def stop(signum, frame):
        raise Stop

    with _handling(signum, stop):
        a, b = _pair()
        start = [a.detach().clone(), b.detach().clone()]
        opt = ZOSGD([{"params": [a]}, {"params": [b]}], lr=0.0, eps=1e-2, seed=3)
        _interrupted_during(monkeypatch, zokern.optim.base.ops, "perturb_", 1, signals=(signum,))
        with pytest.raises(Stop):
            opt.step(lambda: _loss(a, b))
        for p, s in zip((a, b), start):
            torch.testing.assert_close(p.detach(), s, atol=1e-6, rtol=0)
        assert signal.getsignal(signum) is stop


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["inplace", "exact"])
@pytest.mark.parametrize("lower_level", [False, True], ids=["step", "perturbed"])
def test_a_preemption_handler_that_saves_a_checkpoint_runs_between_steps(dtype, lower_level):
    """SIGTERM arrives while a closure runs, where the step spends its time: a handler that saved there saved
    theta + eps z (in place; the exact mode's perturbed copies too) and a step count that included the unfinished
    step. It runs once the step is done, and saves what a run that had stopped there would hold."""
    a, b = (p.detach().to(dtype).requires_grad_() for p in _pair())
    opt = ZOSGD([a, b], lr=1e-2, eps=1e-2, seed=3)
    saved = []

    def save(signum, frame):
        saved.append(([a.detach().clone(), b.detach().clone()], opt.state_dict()["zo"]["steps_taken"]))

    def closure():
        if not saved and len(opt.trajectory) == 1:  # in the second step's (or block's) evaluation
            signal.raise_signal(signal.SIGTERM)
        return _loss(a.float(), b.float())

    with _handling(signal.SIGTERM, save):
        opt.step(closure)
        if lower_level:
            with opt.perturbed(opt.new_seed()):
                closure()
            assert saved and saved[0][1] == 2  # after the block: theta, the seeds drawn so far
        else:
            opt.step(closure)
            assert saved and saved[0][1] == 2  # after the step: it counts
    assert all(torch.equal(held, p.detach()) for held, p in zip(saved[0][0], (a, b)))


def _installing_a_chaining_handler(name: str, ran: list, loss):
    """A closure that, at its first call, installs a SIGTERM handler that records ``name`` and chains to the handler
    it replaced; and that handler."""
    replaced = []

    def handler(signum, frame):
        ran.append(name)
        replaced[0](signum, frame)

    def closure():
        if not replaced:
            replaced.append(signal.signal(signal.SIGTERM, handler))
        return loss()

    return closure, handler


def test_a_sigterm_handler_the_closure_installs_stays_and_its_chain_reaches_the_programs():
    """The step's hold of SIGTERM put the program's handler back over one the closure had installed meanwhile, and
    a handler chaining to the one it replaced (the hold) only had the signal recorded, never handled; a later step's
    hold made that chain recurse."""
    a, b = _pair()
    opt = ZOSGD([a, b], lr=1e-3, eps=1e-3, seed=0)
    ran = []
    closure, mine = _installing_a_chaining_handler("closure's", ran, lambda: _loss(a, b))
    with _handling(signal.SIGTERM, lambda signum, frame: ran.append("program's")):
        opt.step(closure)
        assert signal.getsignal(signal.SIGTERM) is mine
        signal.raise_signal(signal.SIGTERM)
        assert ran == ["closure's", "program's"]
        opt.step(closure)  # a later step's hold stands in for the closure's handler
        signal.raise_signal(signal.SIGTERM)
        assert ran == ["closure's", "program's"] * 2
        opt.step(_installing_a_chaining_handler("later", ran, lambda: _loss(a, b))[0])
        signal.raise_signal(signal.SIGTERM)
    assert ran == ["closure's", "program's"] * 2 + ["later", "closure's", "program's"]


def test_the_optimizer_state_dict_is_refused_inside_a_step():
    a, b = _pair()
    opt = ZOSGD([a, b], lr=1e-2, eps=1e-2, seed=3)
    with pytest.raises(RuntimeError, match=r"ZOSGD.state_dict was called while a step .* signal handler"):
        opt.step(lambda: opt.state_dict() and _loss(a, b))
    assert opt.trajectory[-1]["raised"]


@pytest.mark.parametrize("optimizer", ["ldsd", "conservative-exact"])
def test_ctrl_c_during_a_final_or_commit_pass_waits_for_the_record(optimizer, monkeypatch):
    from zokern.optim import ZOConservative

    a, b = _pair()
    if optimizer == "ldsd":
        opt = LDSD([{"params": [a]}, {"params": [b]}], lr=1e-2, eps=1e-2, seed=1, k=2)
        _interrupted_during(monkeypatch, zokern.optim.ldsd.passes, "final_", 1)
    else:
        a, b = (torch.nn.Parameter(p.detach().bfloat16()) for p in (a, b))
        opt = ZOConservative([{"params": [a]}, {"params": [b]}], lr=1e-2, eps=1e-2, seed=3)
        _interrupted_during(monkeypatch, zokern.optim.base.ops, "perturb_", 1)
    with pytest.raises(KeyboardInterrupt):
        opt.step(lambda: _loss(a.float(), b.float()))
    record = opt.trajectory[-1]
    assert not record.get("raised") and record["projected_grad"] is not None
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_a_hold_cut_short_by_another_signals_handler_is_healed_by_the_next():
    """Another signal's handler that raises (a SIGALRM timeout) can cut a hold between its steps: the hold's handler
    then stays installed with no block open. The next hold puts the program's handler back, and Ctrl-C raises."""
    import gc

    from zokern.optim._interrupts import _Hold
    from zokern.optim._interrupts import _Holding
    from zokern.optim._interrupts import held_interrupts

    gc.collect()  # blocks an earlier test's exception left open are closed first: their hold is not this one's
    original = signal.getsignal(signal.SIGINT)
    cut = held_interrupts()
    cut.__enter__()  # opened, never closed: the exception came before its with-block could end it
    del cut
    gc.collect()
    assert isinstance(signal.getsignal(signal.SIGINT), _Hold) and not any(_Holding.open.values())
    with held_interrupts():
        pass
    assert signal.getsignal(signal.SIGINT) is original
    with pytest.raises(KeyboardInterrupt):
        signal.raise_signal(signal.SIGINT)


def test_sigint_and_sigterm_held_together_both_reach_their_handlers(monkeypatch):
    heard = []
    with _handling(signal.SIGTERM, lambda signum, frame: heard.append("TERM")):
        a, b = _pair()
        opt = ZOSGD([{"params": [a]}, {"params": [b]}], lr=0.0, eps=1e-2, seed=3)
        signals = (signal.SIGINT, signal.SIGTERM)
        _interrupted_during(monkeypatch, zokern.optim.base.ops, "perturb_", 1, signals=signals)
        with pytest.raises(KeyboardInterrupt):
            opt.step(lambda: _loss(a, b))
        assert heard == ["TERM"]


def test_an_ldsd_final_pass_failing_on_a_later_group_leaves_every_group_at_theta(monkeypatch):
    a, b = _pair()
    start = [a.detach().clone(), b.detach().clone()]
    opt = LDSD([{"params": [a]}, {"params": [b]}], lr=0.0, eps=1e-2, seed=1, k=2)
    real, calls = zokern.optim.ldsd.passes.final_, []

    def final_(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("device lost")
        return real(*args, **kwargs)

    monkeypatch.setattr(zokern.optim.ldsd.passes, "final_", final_)
    with pytest.raises(RuntimeError, match="device lost"):
        opt.step(lambda: _loss(a, b))
    for p, s in zip((a, b), start):  # lr = 0: group 0 restored by its final pass, group 1 by the step's undo
        torch.testing.assert_close(p.detach(), s, atol=1e-6, rtol=0)


def test_a_graph_step_under_inference_mode_leaves_later_steps_usable():
    a, b = _pair()
    opt = ZOSGD([a, b], lr=1e-2, eps=1e-3, seed=3, cuda_graph=True)

    def closure():
        return _loss(a, b)

    with torch.inference_mode():
        opt.step(closure)
    opt.step(closure)
    assert opt.steps_taken == 2


# ------------------------------------------------------------------------------------ checkpoints and replays


def _run(seed=1234, steps=3):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh(), torch.nn.Linear(3, 2))
    x = torch.randn(8, 4)
    start = [p.detach().clone() for p in model.parameters()]
    opt = ZOSGD(model.parameters(), lr=1e-2, eps=1e-3, momentum=0.9, seed=seed)
    for _ in range(steps):
        opt.step(lambda: model(x).pow(2).mean())
    return model, x, start, opt


def test_the_optimizer_replay_returns_goes_on_as_the_run_would():
    model, x, start, opt = _run()
    copy = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh(), torch.nn.Linear(3, 2))
    with torch.no_grad():
        for p, s in zip(copy.parameters(), start):
            p.copy_(s)
    replayed = zokern.replay(list(copy.parameters()), opt.trajectory)
    assert (replayed.base_seed, replayed.seed_check_every) == (opt.base_seed, opt.seed_check_every)
    model[2].bias.requires_grad_(False)  # followed by both: the given parameters carry the run's trainable set
    copy[2].bias.requires_grad_(False)
    for _ in range(2):
        opt.step(lambda: model(x).pow(2).mean())
        replayed.step(lambda: copy(x).pow(2).mean())
    assert [r["seed"] for r in replayed.trajectory[-2:]] == [r["seed"] for r in opt.trajectory[-2:]]
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), copy.parameters()))


def test_replaying_a_trajectory_that_lacks_the_base_seed_warns_that_the_optimizer_cannot_go_on():
    _, _, start, opt = _run()
    trajectory = [dict(r) for r in opt.trajectory]
    trajectory[0]["setup"] = {k: v for k, v in trajectory[0]["setup"].items() if k != "base_seed"}
    with pytest.warns(UserWarning, match="did not record the run's base seed"):
        zokern.replay([s.clone() for s in start], trajectory)


def test_replay_checks_the_parameters_each_setup_trains_before_writing_any():
    model, x, start, opt = _run(steps=0)
    model[2].weight.requires_grad_(False)
    opt.step(lambda: model(x).pow(2).mean())
    model[2].weight.requires_grad_(True)  # trained from step 1: a new setup
    opt.step(lambda: model(x).pow(2).mean())
    given = [s.clone() for s in start]
    given[2] = given[2].t().contiguous().t()  # the same values, not contiguous
    before = [g.clone() for g in given]
    with pytest.raises(ValueError, match=r"record 1's setup: .*not contiguous"):
        zokern.replay(given, opt.trajectory)
    assert all(torch.equal(a, b) for a, b in zip(given, before))


def _damage_zo(key, value):
    def damage(sd):
        if value is None:
            del sd["zo"][key]
        else:
            sd["zo"][key] = value

    return damage


def _damage_state(key, value):
    def damage(sd):
        sd["state"][1][key] = value

    return damage


@pytest.mark.parametrize(
    "damage, error, match",
    [
        (_damage_zo("steps_taken", None), ValueError, "lacks 'steps_taken'"),
        (_damage_zo("base_seed", None), ValueError, "lacks 'base_seed'"),
        (_damage_zo("base_seed", -5), ValueError, r"base_seed must be in \[0, 2\^63\)"),
        (_damage_zo("base_seed", 2**70), ValueError, r"base_seed must be in"),
        (_damage_zo("steps_taken", "3"), TypeError, "steps_taken must be an integer"),
        (_damage_zo("nonfinite_steps", -1), ValueError, "nonfinite_steps must be in"),
        (_damage_zo("trainable", "all"), ValueError, "'trainable' is not a list of booleans"),
        (_damage_zo("trainable", [1, 1, 1, 1]), ValueError, "'trainable' is not a list of booleans"),
        (_damage_zo("dtypes", [torch.float32]), ValueError, "'dtypes' is not a list of dtype names"),
        (_damage_zo("shapes", [(3,)]), ValueError, "'shapes' is not a list of shapes"),
        (_damage_zo("options", [1]), ValueError, "'options' is not a dict of options"),
        (_damage_zo("numels", "abc"), ValueError, "'numels' is not a list of sizes"),
        (lambda sd: sd.__setitem__("zo", 5), ValueError, "'zo' entry is of type int, not a dict"),
        (_damage_state("momentum_buffer", torch.tensor(0.0)), ValueError, r"'momentum_buffer' .* tensor of shape \(\)"),
        (_damage_state("momentum_buffer", 0.5), ValueError, r"'momentum_buffer' .* is a float"),
    ],
)
def test_a_damaged_state_dict_is_refused_before_anything_is_loaded(damage, error, match):
    _, _, _, source = _run()
    state = source.state_dict()
    damage(state)
    model, x, _, target = _run(seed=7, steps=1)
    target.param_groups[0]["lr"] = 0.5
    before = (target.base_seed, target.steps_taken, [b.clone() for b in _buffers(target)], 0.5)
    with pytest.raises(error, match=match):
        target.load_state_dict(state)
    after = (target.base_seed, target.steps_taken, _buffers(target), target.param_groups[0]["lr"])
    assert before[:2] == after[:2] and before[3] == after[3]
    assert all(torch.equal(a, b) for a, b in zip(before[2], after[2]))


@pytest.mark.parametrize(
    "value, match",
    [(-1, "is -1: not a count of updates"), (None, "is None: not a count"), (2.0, "is 2.0: not a count"),
     ("absent", "lacks 'step'")],
)  # fmt: skip
def test_a_damaged_adam_count_is_refused_before_anything_is_loaded(value, match):
    # step = -1 loaded, and the next step wrote NaN into that parameter (bias corrections 1 - beta^0); None failed
    # partway through the update, after earlier parameters were written.
    a, b = _pair()
    source = ZOAdam([a, b], lr=1e-2)
    source.step(lambda: _loss(a, b))
    state = source.state_dict()
    if value == "absent":
        del state["state"][1]["step"]
    else:
        state["state"][1]["step"] = value
    target = ZOAdam([a, b], lr=1e-2)
    with pytest.raises(ValueError, match=match):
        target.load_state_dict(state)
    assert not target.state and target.steps_taken == 0


def test_a_state_dict_whose_parameter_names_differ_is_refused_naming_them():
    # Built from named_parameters(), the groups carry param_names (torch >= 2.6); a load into the same-shaped
    # parameters in another order went silently, each taking the other's momentum and stream.
    model = torch.nn.ModuleDict(dict(a=torch.nn.Linear(4, 4), b=torch.nn.Linear(4, 4)))
    source = ZOSGD(list(model.named_parameters()), lr=1e-2, momentum=0.9)
    source.step(lambda: model["b"](model["a"](torch.ones(2, 4))).square().mean())
    state = source.state_dict()
    named = list(model.named_parameters())
    target = ZOSGD(named[2:] + named[:2], lr=1e-2, momentum=0.9)
    with pytest.raises(ValueError, match=r"parameter 0 is 'b.weight' here and 'a.weight' in the state dict"):
        target.load_state_dict(state)
    assert not target.state
    ZOSGD(named, lr=1e-2, momentum=0.9).load_state_dict(state)  # the same names: loads
    other = torch.nn.ModuleDict(dict(a=torch.nn.Linear(4, 3), b=torch.nn.Linear(3, 4)))
    with pytest.raises(ValueError, match=r"16 elements for 'a.weight', param_groups\[0\]\['params'\]\[0\]"):
        ZOSGD(list(other.named_parameters()), lr=1e-2, momentum=0.9).load_state_dict(state)  # named in messages


def test_a_state_dict_of_other_group_sizes_is_refused_naming_sizes_and_the_first_parameter():
    # torch's own message ("a parameter group that doesn't match the size of optimizer's group") named nothing: the
    # common case is an optimizer over the trainable parameters only, after a layer was frozen.
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    source = ZOSGD(model.parameters(), lr=1e-2, momentum=0.9)
    source.step(lambda: model(torch.ones(2, 4)).square().mean())
    model[0].requires_grad_(False)
    target = ZOSGD([p for p in model.parameters() if p.requires_grad], lr=1e-2, momentum=0.9)
    with pytest.raises(ValueError, match=r"groups of \[4\] parameters, this optimizer has \[2\] .*parameter 0\)"):
        target.load_state_dict(source.state_dict())
    assert not target.state


def test_loading_a_run_that_trained_other_parameters_warns_naming_them():
    model, _, _, source = _run()
    state = source.state_dict()
    target = _run(steps=0)[3]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        target.load_state_dict(state)  # the same parameters trained: silent
    model, x, _, target = _run(steps=0)
    model[0].weight.requires_grad_(False)
    model[2].bias.requires_grad_(False)
    with pytest.warns(
        UserWarning, match=r"2 parameter\(s\) frozen now.*\[0\]\['params'\]\[0\].*\[0\]\['params'\]\[3\]"
    ):
        target.load_state_dict(state)
    assert target.steps_taken == 3  # loaded all the same: unfreezing by stages is a schedule
    frozen_run = _run(steps=0)[3]
    frozen_run.param_groups[0]["params"][1].requires_grad_(False)
    with pytest.warns(UserWarning, match=r"1 parameter\(s\) trained now, frozen in the saved run: .*\]\[1\]"):
        _run(steps=0)[3].load_state_dict(frozen_run.state_dict())


def test_loading_a_run_whose_trainable_parameters_had_another_dtype_warns_naming_them():
    """A model rebuilt in another dtype than the saved run's (adapters that PEFT's load_adapter cast to float32, a
    forgotten .bfloat16()) resumes with another perturbation and rounding mode: loaded, with a warning."""
    model, _, _, source = _run()
    state = source.state_dict()
    model, _, _, target = _run(steps=0)
    model[0].weight.data = model[0].weight.data.bfloat16()
    with pytest.warns(
        UserWarning, match=r"in another dtype: param_groups\[0\]\['params'\]\[0\] .*\(float32 -> bfloat16\)"
    ):
        target.load_state_dict(state)
    assert target.steps_taken == 3
    model, _, _, target = _run(steps=0)
    model[0].weight.requires_grad_(False)
    model[0].weight.data = model[0].weight.data.bfloat16()  # frozen: its dtype is not the steps'
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*in another dtype", category=UserWarning)
        with pytest.warns(UserWarning, match="frozen now"):
            target.load_state_dict(state)


def test_a_checkpoint_saved_between_a_reshape_and_the_next_step_resumes():
    """States follow a reshaped parameter at the next step: a checkpoint saved before it held the old shape's state
    beside the new shape, and loaded into neither model."""

    def closure(ps):
        return lambda: sum(((p.reshape(-1) - 0.2) ** 2 * torch.arange(p.numel())).sum() for p in ps)

    torch.manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(5, 7))]
    opt = ZOSGD(ps, lr=1e-2, eps=1e-2, seed=1, momentum=0.9)
    opt.step(closure(ps))
    ps[0].data = ps[0].data.view(7, 5)
    saved, start = copy.deepcopy(opt.state_dict()), ps[0].detach().clone()
    opt.step(closure(ps))
    resumed = [torch.nn.Parameter(start.clone())]
    again = ZOSGD(resumed, lr=1e-2, eps=1e-2, momentum=0.9)
    again.load_state_dict(saved)
    assert saved["state"][0]["momentum_buffer"].shape == (7, 5)  # saved in the parameter's shape
    assert opt.state[ps[0]]["momentum_buffer"].shape == (7, 5)  # (the optimizer's own: reshaped by its step)
    assert again.state[resumed[0]]["momentum_buffer"].shape == (7, 5)
    again.step(closure(resumed))
    assert torch.equal(resumed[0].detach(), ps[0].detach())


def test_a_state_dict_without_shapes_still_refuses_states_of_another_parameter_of_equal_numel():
    """An older zokern's state dict has no shapes: only the states' own shapes tell swapped parameters apart."""
    a, b = torch.nn.Parameter(torch.randn(4, 8)), torch.nn.Parameter(torch.randn(8, 4))
    opt = ZOSGD([a, b], lr=1e-2, eps=1e-2, seed=0, momentum=0.9)
    opt.step(lambda: (a**2).sum() + (b**3).sum())
    state = opt.state_dict()
    del state["zo"]["shapes"]
    swapped = ZOSGD([b, a], lr=1e-2, eps=1e-2, momentum=0.9)
    with pytest.raises(ValueError, match=r"'momentum_buffer' for param_groups\[0\]\['params'\]\[0\].*shape \(4, 8\)"):
        swapped.load_state_dict(state)
    assert not swapped.state


def test_states_swapped_between_parameters_of_equal_numel_are_refused_whatever_the_run_recorded():
    """A merged or re-keyed state dict may keep the run's shapes while its states are another parameter's: each
    state must have its parameter's shape (states saved before a reshape reached them are saved in it)."""
    a, b = torch.nn.Parameter(torch.randn(4, 8)), torch.nn.Parameter(torch.randn(8, 4))
    opt = ZOSGD([a, b], lr=1e-2, eps=1e-2, seed=0, momentum=0.9)
    opt.step(lambda: (a**2).sum() + (b**3).sum())
    state = opt.state_dict()
    state["state"][0], state["state"][1] = state["state"][1], state["state"][0]
    target = ZOSGD([a, b], lr=1e-2, eps=1e-2, momentum=0.9)
    with pytest.raises(ValueError, match=r"'momentum_buffer' for param_groups\[0\]\['params'\]\[0\].*\(8, 4\)"):
        target.load_state_dict(state)
    assert not target.state


def test_no_dtype_warning_for_a_parameter_the_saved_run_froze():
    """Unfreezing by stages in another dtype: the saved run never trained the parameter, so its dtype then is not
    the dtype of any of its steps (only the trainable-set warning applies)."""
    a, b = torch.nn.Parameter(torch.randn(4)), torch.nn.Parameter(torch.randn(4).bfloat16(), requires_grad=False)
    opt = ZOSGD([a, b], lr=1e-2, eps=1e-2, seed=0)
    opt.step(lambda: (a**2).sum())
    state = opt.state_dict()
    b2 = torch.nn.Parameter(b.detach().float())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ZOSGD([torch.nn.Parameter(a.detach().clone()), b2], lr=1e-2, eps=1e-2).load_state_dict(state)
    messages = [str(w.message) for w in caught]
    assert any("trained now, frozen in the saved run" in m for m in messages)
    assert not any("in another dtype" in m for m in messages)


def test_ranks_whose_parameters_of_equal_numels_come_in_another_order_digest_other_steps():
    """Equal numels in another order on one rank would each draw the other's stream: the shapes tell them apart."""
    a, b = torch.randn(6, 4), torch.randn(4, 6)
    digests = []
    for order in ((a, b), (b, a)):
        params = [torch.nn.Parameter(t.clone()) for t in order]
        digests.append(ZOSGD(params, lr=1e-2, eps=1e-2, seed=0)._digest())
    assert digests[0] != digests[1]


def _buffers(opt):
    return [opt.state[p]["momentum_buffer"] for p in opt.param_groups[0]["params"]]


def test_an_adam_state_that_lacks_a_moment_is_refused():
    a, b = _pair()
    opt = ZOAdam([a, b], lr=1e-2, eps=1e-3, seed=0)
    opt.step(lambda: _loss(a, b))
    state = opt.state_dict()
    del state["state"][1]["exp_avg_sq"]
    with pytest.raises(ValueError, match=r"lacks 'exp_avg_sq'"):
        ZOAdam([a, b], lr=1e-2, eps=1e-3, seed=0).load_state_dict(state)


@pytest.mark.parametrize("key, value", [("seed", -1), ("seed", 1.5), ("seed", "12"), ("seed", None), ("seed", 2**63)])
@pytest.mark.parametrize("cls, kwargs", [(ZOSGD, {}), (LDSD, dict(k=2))], ids=["sgd", "ldsd"])
def test_replay_refuses_a_bad_seed_in_any_record_before_writing(cls, kwargs, key, value):
    a, b = _pair()
    start = [a.detach().clone(), b.detach().clone()]
    opt = _optimizer(cls, [a, b], kwargs)
    for _ in range(3):
        opt.step(lambda: _loss(a, b))
    trajectory = [dict(r) for r in opt.trajectory]
    trajectory[2][key] = value
    given = [s.clone() for s in start]
    with pytest.raises(ValueError, match=rf"record 2: {key} must be"):
        zokern.replay(given, trajectory)
    assert all(torch.equal(g, s) for g, s in zip(given, start))


def test_replay_refuses_a_bad_next_seed_of_a_merged_run_before_writing():
    a, b = _pair()
    start = [a.detach().clone(), b.detach().clone()]
    opt = ZOSGD([a, b], lr=1e-2, eps=1e-3, seed=0, perturbation="inplace", merge_steps=True)
    for _ in range(3):
        opt.step(lambda: _loss(a, b))
    trajectory = [dict(r) for r in opt.trajectory]
    trajectory[2]["next_seed"] = -5
    given = [s.clone() for s in start]
    with pytest.raises(ValueError, match=r"record 2: next_seed must be in \[0, 2\^63\)"):
        zokern.replay(given, trajectory)
    assert all(torch.equal(g, s) for g, s in zip(given, start))


@pytest.mark.parametrize(
    "cls, kwargs",
    [(ZOSGD, dict(momentum=0.9)), (ZOSGD, dict(merge_steps=True, perturbation="inplace")), (LDSD, dict(k=2))],
    ids=["momentum", "merged", "ldsd"],
)
def test_a_long_run_that_writes_out_and_clears_its_records_replays_from_them(cls, kwargs):
    a, b = _pair()
    start = [a.detach().clone(), b.detach().clone()]
    opt = _optimizer(cls, [a, b], kwargs)
    written = []
    for step in range(12):
        opt.step(lambda: _loss(a, b))
        if step % 5 == 4:
            written += opt.trajectory
            opt.trajectory = []
    written += opt.trajectory
    replayed = [s.clone() for s in start]
    zokern.replay(replayed, written)
    opt.materialize()
    assert torch.equal(replayed[0], a.detach()) and torch.equal(replayed[1], b.detach())


def test_loading_a_state_dict_keeps_the_optimizers_own_machinery():
    """torch's load_state_dict calls __setstate__ with the loaded groups and state: not a copy of the object, whose
    finalizer (one more per load) and captured graph (dropped) must stay as they are."""
    import weakref

    a, b = _pair()
    opt = ZOSGD([a, b], lr=1e-2, eps=1e-3, seed=0, cuda_graph=True)
    for _ in range(3):
        opt.step(lambda: _loss(a, b))
    graph, state = opt._graph, opt.state_dict()
    finalizers = len(weakref.finalize._registry)  # CPython's registry of live finalizers
    for _ in range(5):
        opt.load_state_dict(state)
    assert len(weakref.finalize._registry) == finalizers
    assert opt._graph is graph


def test_an_optimizer_with_nothing_trainable_says_so_once():
    """Built before peft.get_peft_model froze the base weights (and added the adapters it never saw), an optimizer
    ran every step's forwards and changed nothing, silently."""
    model = torch.nn.Linear(3, 1)
    opt = ZOSGD(model.parameters(), lr=0.1)
    model.requires_grad_(False)  # as get_peft_model does to the base model
    x = torch.randn(4, 3)
    with pytest.warns(UserWarning, match=r"no parameter of this ZOSGD requires grad.*get_peft_model"):
        opt.step(lambda: model(x).sum())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.step(lambda: model(x).sum())  # once


# ----------------------------------------------------------------------------------- ported from torch.optim


@pytest.mark.parametrize(
    "dtype, eps, warned",
    [
        (torch.float32, 1e-8, True),  # AdamW's eps kept as the perturbation size
        (torch.float32, 1e-6, False),
        (torch.bfloat16, 1e-5, True),  # bf16 resolves 2^-7 relative: theta + 1e-5 z rounds to theta
        (torch.bfloat16, 1e-3, False),
    ],
)
def test_an_eps_below_what_the_parameters_resolve_warns_at_construction(dtype, eps, warned):
    a, b = (p.detach().to(dtype).requires_grad_() for p in _pair())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ZOAdam([a, b], lr=1e-2, eps=eps)
    messages = [str(w.message) for w in caught if "perturbation size" in str(w.message)]
    assert bool(messages) == warned, messages
    if warned:
        assert "adam_eps" in messages[0] and caught[0].filename == __file__  # names the user's line, not torch's


def test_a_frozen_16_bit_parameter_does_not_warn_about_eps():
    a, b = _pair()
    frozen = torch.randn(3).bfloat16()  # never perturbed: its resolution does not matter
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ZOSGD([a, b, frozen], lr=1e-2, eps=1e-5)


def test_an_adam_group_with_l2_weight_decay_is_refused():
    a, b = _pair()
    ZOAdam(torch.optim.Adam([a, b], eps=1e-3).param_groups)  # no decay: the flag changes nothing
    ZOAdam(torch.optim.AdamW([a, b], weight_decay=0.1, eps=1e-3).param_groups)  # decoupled, as zokern's
    l2 = torch.optim.Adam([a, b], weight_decay=0.1, eps=1e-3).param_groups
    if "decoupled_weight_decay" not in l2[0]:
        pytest.skip("torch < 2.7: an Adam group carries no decoupled_weight_decay flag, so L2 cannot be told apart")
    with pytest.raises(ValueError, match="decoupled_weight_decay=False .* not supported"):
        ZOAdam(l2)


def test_parameters_tied_by_sharing_storage_are_named_at_construction():
    # The old way of tying weights (head.weight = Parameter(emb.weight.data)): two Parameters, one storage.
    frozen = torch.nn.Parameter(torch.randn(3), requires_grad=False)
    emb = torch.nn.Parameter(torch.randn(5, 4))
    head = torch.nn.Parameter(emb.data)
    for cls, kwargs in ((ZOSGD, {}), (ZOAdam, {}), (LDSD, dict(k=2))):
        with pytest.raises(ValueError, match=r"params\[1\] and params\[2\] overlap in memory.*one Parameter"):
            _optimizer(cls, [frozen, emb, head], kwargs)


def test_ldsd_with_nothing_trainable_refuses_before_drawing_a_seed():
    a, b = _pair()
    a.requires_grad_(False)
    b.requires_grad_(False)
    opt = _optimizer(LDSD, [a, b], dict(k=2))
    with pytest.raises(ValueError, match="no trainable parameters"):
        opt.step(lambda: _loss(a, b))
    assert opt.steps_taken == 0 and opt.trajectory == []


@pytest.mark.parametrize("cls", [ZOSGD, ZOAdam])
def test_torch_distributed_checkpoint_state_dict_helpers_are_refused_leaving_the_optimizer_as_it_was(cls):
    # DCP's helpers keep only 'state' and 'param_groups' (the run's seed and step count would be lost), and create
    # a torch optimizer's state by a step at lr 0 with zero grads, leaving lr at 0 when that step raises.
    from torch.distributed.checkpoint import state_dict as dcp

    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh(), torch.nn.Linear(3, 2))
    x = torch.randn(8, 4)
    opt = cls(model.parameters(), lr=1e-2, eps=1e-3, seed=3)
    if cls is ZOAdam:
        opt.step(lambda: model(x).pow(2).mean())  # a state: DCP then skips its initialising step
    before = [p.detach().clone() for p in model.parameters()]
    saved = opt.state_dict()
    calls = (
        lambda: dcp.get_optimizer_state_dict(model, opt),
        lambda: dcp.get_state_dict(model, opt),
        lambda: dcp.set_optimizer_state_dict(model, opt, {"state": {}, "param_groups": saved["param_groups"]}),
    )
    for call in calls:
        with pytest.raises(TypeError, match="torch.distributed.checkpoint.state_dict's helpers .* not supported"):
            call()
        assert opt.param_groups[0]["lr"] == 1e-2 and all(p.grad is None for p in model.parameters())
        assert opt.steps_taken == saved["zo"]["steps_taken"]
        assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    # A whole zokern state dict passes through set_optimizer_state_dict, 'zo' included: the run resumes.
    opt.step(lambda: model(x).pow(2).mean())
    dcp.set_optimizer_state_dict(model, opt, saved)
    assert opt.steps_taken == saved["zo"]["steps_taken"] and opt.param_groups[0]["lr"] == 1e-2
    with pytest.raises(TypeError, match="needs a closure"):  # outside DCP, a step without a closure is still refused
        opt.step()


def test_a_checkpoint_of_an_adam_group_with_its_l2_flag_resumes():
    # Before the flag was refused, ZOAdam(torch.optim.Adam(..., weight_decay=...).param_groups) trained with zokern's
    # decoupled decay; its checkpoint carries decoupled_weight_decay=False and must resume that run.
    a, b = _pair()
    source = ZOAdam([a, b], lr=1e-2, eps=1e-3, weight_decay=0.1, seed=0)
    source.step(lambda: _loss(a, b))
    state = source.state_dict()
    state["param_groups"][0]["decoupled_weight_decay"] = False  # as the older zokern kept it
    target = ZOAdam([a, b], lr=1e-2, eps=1e-3, weight_decay=0.1, seed=0)
    target.load_state_dict(state)
    target.step(lambda: _loss(a, b))  # the group passes each step's checks
    assert target.steps_taken == 2 and "decoupled_weight_decay" not in target.param_groups[0]


def test_load_state_dict_inside_a_step_is_refused():
    a, b = _pair()
    opt = _optimizer(ZOSGD, [a, b], {})
    opt.step(lambda: _loss(a, b))
    state = opt.state_dict()

    def closure():
        opt.load_state_dict(state)  # would rewind the step count under the running step
        return _loss(a, b)

    with pytest.raises(RuntimeError, match="load_state_dict was called while a step"):
        opt.step(closure)
    assert opt.steps_taken == 2 and [r["step"] for r in opt.trajectory] == [0, 1]


def test_hyperparameters_given_as_other_real_numbers_are_taken_as_floats():
    import json

    a, b = _pair()
    with pytest.warns(UserWarning, match=r"eps=1e-08 is the perturbation size"):
        ZOSGD([a, b], lr=1e-2, eps=Fraction(1, 10**8))
    for n_probes in (1, 2):  # the device step divides a tensor by eps; the host one records it
        opt = ZOSGD([a, b], lr=Fraction(1, 100), eps=Fraction(1, 1000), weight_decay=0, n_probes=n_probes)
        opt.step(lambda: _loss(a, b))
        for _ in range(2):  # set before each step, the same value again, as a scheduler of one's own might
            opt.param_groups[0]["lr"] = Fraction(1, 50)
            opt.param_groups[0]["eps"] = Fraction(1, 1000)
            opt.step(lambda: _loss(a, b))
        assert all(type(opt.param_groups[0][k]) is float for k in ("lr", "eps", "weight_decay"))
        assert json.loads(json.dumps(opt.trajectory))[1]["lr"] == [0.02]


@pytest.mark.parametrize(
    "cls, options, keys",
    [
        (ZOAdam, dict(betas=(Fraction(9, 10), 0.999), adam_eps=Fraction(1, 10**8)), ("betas", "adam_eps")),
        (LDSD, dict(sigma=Fraction(1), mu_lr=Fraction(1, 1000)), ("sigma", "mu_lr")),
        (LDSD, dict(update="adam", betas=[Fraction(9, 10), 0.999], adam_eps=Fraction(1, 10**8)), ("betas",)),
    ],
)
def test_the_subclasses_hyperparameters_given_as_other_real_numbers_are_taken_as_floats(cls, options, keys):
    """A Fraction beta, adam_eps, sigma or mu_lr reached tensor arithmetic as itself: every step raised."""
    a, b = _pair()
    opt = cls([a, b], lr=1e-2, eps=1e-3, **options)
    for step in range(2):
        if step:
            opt.param_groups[0][keys[0]] = options[keys[0]]  # set again between steps, as a scheduler might
        opt.step(lambda: _loss(a, b))
    assert opt.steps_taken == 2 and not any(r.get("raised") for r in opt.trajectory)
    for key in keys:
        value = opt.param_groups[0][key]
        if key == "betas":
            assert type(value) is type(options["betas"]) and all(type(v) is float for v in value)
        else:
            assert type(value) is float


def test_a_frozen_parameter_over_a_trained_ones_memory_is_refused_in_the_exact_mode():
    """The exact mode perturbs the uses of the trained Parameter: a frozen alias (nn.Parameter(w.data), frozen) read
    theta unperturbed where the in-place mode perturbs both, and the estimate lost the alias's path silently."""
    torch.manual_seed(0)
    a, b = torch.nn.Linear(8, 8).bfloat16(), torch.nn.Linear(8, 8).bfloat16()
    b.weight = torch.nn.Parameter(a.weight.data, requires_grad=False)
    before = [p.detach().clone() for p in a.parameters()]

    def closure():
        return b(a(torch.ones(2, 8, dtype=torch.bfloat16))).float().square().mean()

    opt = ZOSGD([*a.parameters(), *b.parameters()], lr=1e-2, eps=1e-2, seed=0)
    with pytest.raises(
        ValueError, match=r"\['params'\]\[0\] .* and .*\['params'\]\[2\] .* share memory, and one of them is frozen"
    ):
        opt.step(closure)
    assert opt.steps_taken == 0 and all(torch.equal(p, q) for p, q in zip(a.parameters(), before))
    # Views of one buffer that do not overlap, and the in-place mode, which perturbs the memory both read, run.
    ZOSGD([*a.parameters(), *b.parameters()], lr=1e-2, eps=1e-2, seed=0, perturbation="inplace").step(closure)
    flat = torch.randn(40, dtype=torch.bfloat16)
    trained, frozen = torch.nn.Parameter(flat[:20]), torch.nn.Parameter(flat[20:], requires_grad=False)
    ZOSGD([trained, frozen], lr=1e-2, eps=1e-2, seed=0).step(lambda: (trained.float() * frozen.float()).sum())
    # A strided frozen view meets a trained row in one element (a span of nbytes from its start would miss it).
    grid = torch.randn(4, 8, dtype=torch.bfloat16)
    row, column = torch.nn.Parameter(grid[3]), torch.nn.Parameter(grid[:, 0], requires_grad=False)
    with pytest.raises(ValueError, match="share memory, and one of them is frozen"):
        ZOSGD([row, column], lr=1e-2, eps=1e-2, seed=0).step(lambda: row.float().sum() + column.float().sum())


def test_a_frozen_wrapper_subclass_does_not_stop_the_exact_mode():
    """A frozen tensor subclass without a readable storage (torchao's quantized weights, a DTensor) shares no memory
    with a trained parameter: asking for its storage raised at every step."""
    from torch.testing._internal.two_tensor import TwoTensor

    trained = torch.nn.Parameter(torch.randn(8, dtype=torch.bfloat16))
    frozen = torch.nn.Parameter(TwoTensor(torch.randn(8), torch.randn(8)), requires_grad=False)
    opt = ZOSGD([trained, frozen], lr=1e-2, eps=1e-2, seed=0)
    opt.step(lambda: trained.float().sum())
    assert opt.steps_taken == 1


def test_repr_shows_the_options_that_hold_for_every_group():
    # torch's repr shows the groups only: ZOSGD(momentum=0.9, n_probes=4) printed as ZOSGD() did.
    text = repr(ZOSGD([torch.nn.Parameter(torch.ones(3))], lr=1e-3, momentum=0.9, n_probes=4))
    assert "lr: 0.001" in text and "momentum: 0.9" in text and "n_probes: 4" in text and text.endswith(")")


def test_replay_of_a_run_that_resized_a_parameter_says_so():
    # It blamed the caller ("pass the initial parameters as the run had them"), whichever copy was given.
    emb = torch.nn.Embedding(6, 3)
    initial = emb.weight.detach().clone()
    opt = ZOSGD(emb.parameters(), lr=1e-2)
    opt.step(lambda: emb.weight.square().sum())
    emb.weight.data = torch.cat([emb.weight.data, torch.ones(2, 3)])  # as resize_token_embeddings does
    opt.step(lambda: emb.weight.square().sum())
    with pytest.raises(ValueError, match=r"changed parameter 0's numel from 18 to 24 at record 1 .*trajectory\[:1\]"):
        zokern.replay([initial.clone()], opt.trajectory)
    replayed = initial.clone()
    zokern.replay([replayed], opt.trajectory[:1])  # the records before the resize replay
