"""zokern.optim: each optimizer's step against a float64 rule rebuilt from the stream, convergence on a quadratic at
the rate theory gives, torch.optim contracts (groups, schedulers, state_dict), replay, failure handling."""

from __future__ import annotations

import contextlib
import copy
import itertools
import json
import math
import pickle
import statistics
import warnings

import pytest
import torch
from helpers import count_passes
from helpers import tiny_opt

import zokern
from zokern.optim import FZOO
from zokern.optim import LDSD
from zokern.optim import ZOSGD
from zokern.optim import ZOAdam
from zokern.optim import ZOConservative
from zokern.optim import ZOSignSGD
from zokern.optim import seeds

# ------------------------------------------------------------------------------------------------------ fixtures


def _problem(dtype=torch.float32, seed=0):
    """Three parameters (the middle one frozen), two groups, and a closure whose loss is a smooth function."""
    g = torch.Generator().manual_seed(seed)
    a = torch.nn.Parameter((torch.randn(5, 7, generator=g) * 0.5).to(dtype))
    frozen = torch.nn.Parameter((torch.randn(11, generator=g)).to(dtype), requires_grad=False)
    b = torch.nn.Parameter((torch.randn(13, generator=g) * 0.5 + 0.3).to(dtype))
    target_a, target_b = torch.randn(5, 7, generator=g), torch.randn(13, generator=g)

    def loss_of(a_, b_):
        return ((a_.double() - target_a.double()) ** 2).sum() + (b_.double() - target_b.double()).pow(2).mul(
            torch.arange(1, 14, dtype=torch.float64)
        ).sum() / 10

    def closure():
        return loss_of(a, b).float()

    groups = [{"params": [a, frozen], "lr": 1e-3, "eps": 1e-3}, {"params": [b], "lr": 2e-3, "eps": 3e-3}]
    return (a, frozen, b), groups, closure, loss_of


def _z(seed, offset, like, distribution="gaussian"):
    fn = zokern.gaussian if distribution == "gaussian" else zokern.rademacher
    return fn(seed, offset, like.numel(), backend="torch").double().view_as(like)


OFFSETS = (0, 35, 46)  # canonical offsets of a, frozen, b: the frozen parameter still takes [35, 46)


# ---------------------------------------------------------------------------------------------- the step's rule


@pytest.mark.parametrize("distribution", ["gaussian", "rademacher"])
def test_zosgd_step_is_the_formula(distribution):
    (a, frozen, b), groups, closure, loss_of = _problem()
    start = [p.detach().double().clone() for p in (a, frozen, b)]
    opt = ZOSGD(groups, weight_decay=0.1, distribution=distribution, seed=42)
    returned = opt.step(closure)
    rec = opt.trajectory[0]
    seed = seeds.step_seed(42, 0)
    assert rec["seed"] == seed and rec["stream_version"] == zokern.STREAM_VERSION
    z_a, z_b = _z(seed, OFFSETS[0], a, distribution), _z(seed, OFFSETS[2], b, distribution)
    # The losses were evaluated at theta +- eps z, each group with its own eps.
    plus = loss_of(start[0] + 1e-3 * z_a, start[2] + 3e-3 * z_b).item()
    minus = loss_of(start[0] - 1e-3 * z_a, start[2] - 3e-3 * z_b).item()
    assert rec["losses"] == pytest.approx([plus, minus], rel=1e-5)
    assert returned.item() == pytest.approx((plus + minus) / 2, rel=1e-5)
    d = (rec["losses"][0] - rec["losses"][1]) / 2
    assert rec["projected_grad"] == pytest.approx([d / 1e-3, d / 3e-3])
    expected_a = start[0] - 1e-3 * (d / 1e-3 * z_a + 0.1 * start[0])
    expected_b = start[2] - 2e-3 * (d / 3e-3 * z_b + 0.1 * start[2])
    torch.testing.assert_close(a.double(), expected_a, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(b.double(), expected_b, atol=1e-6, rtol=1e-6)
    assert torch.equal(frozen.double(), start[1])


def _expected_sgd_direction(opt, rec, p, offset, group):
    """(1/q) sum_k d_k / eps z_k for one parameter, from the recorded losses (the rule of ZOSGD's docstring)."""
    q, losses = opt.n_probes, rec["losses"]
    probes = [seeds.probe_seed(rec["seed"], k) for k in range(q)]
    if opt.one_sided:
        diffs = [losses[1 + k] - losses[0] for k in range(q)]
    else:
        diffs = [(losses[2 * k] - losses[2 * k + 1]) / 2 for k in range(q)]
    return sum(d / group["eps"] * _z(s, offset, p, opt.distribution) for s, d in zip(probes, diffs)) / q


@pytest.mark.parametrize(
    "options",
    [dict(n_probes=3), dict(one_sided=True), dict(one_sided=True, n_probes=2), dict(momentum=0.9, n_probes=2)],
    ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()),
)
def test_zosgd_options_follow_their_rule(options):
    (a, frozen, b), groups, closure, _ = _problem()
    opt = ZOSGD(groups, weight_decay=0.05, seed=7, **options)
    theta = [a.detach().double().clone(), b.detach().double().clone()]
    momentum = [torch.zeros_like(theta[0]), torch.zeros_like(theta[1])]
    for _ in range(3):
        opt.step(closure)
        rec = opt.trajectory[-1]
        assert len(rec["losses"]) == (opt.n_probes + 1 if opt.one_sided else 2 * opt.n_probes)
        for k, (p, offset, group) in enumerate(zip((a, b), (OFFSETS[0], OFFSETS[2]), opt.param_groups)):
            g_hat = _expected_sgd_direction(opt, rec, p, offset, group)
            if opt.momentum:
                momentum[k] = opt.momentum * momentum[k] + g_hat
                g_hat = momentum[k]
            theta[k] = theta[k] - group["lr"] * (g_hat + group["weight_decay"] * theta[k])
        torch.testing.assert_close(a.double(), theta[0], atol=2e-6, rtol=1e-5)
        torch.testing.assert_close(b.double(), theta[1], atol=2e-6, rtol=1e-5)


def test_sign_variant_moves_every_weight_by_lr():
    (a, frozen, b), groups, closure, _ = _problem()
    before = [a.detach().double().clone(), b.detach().double().clone()]
    opt = ZOSignSGD(groups, seed=3)
    opt.step(closure)
    rec = opt.trajectory[0]
    for p, old, offset, group in zip((a, b), before, (OFFSETS[0], OFFSETS[2]), opt.param_groups):
        expected = old - group["lr"] * torch.sign(_expected_sgd_direction(opt, rec, p, offset, group))
        torch.testing.assert_close(p.double(), expected, atol=1e-6, rtol=0)


def test_conservative_keeps_only_steps_that_lower_the_loss():
    (a, frozen, b), groups, closure, loss_of = _problem()
    for group in groups:
        group["lr"] = 0.01  # steps large enough that some candidates overshoot and are refused
    opt = ZOConservative(groups, seed=5)
    for _ in range(20):
        before = closure().item()
        opt.step(closure)
        rec = opt.trajectory[-1]
        after = closure().item()
        assert rec["losses"][0] == pytest.approx(before, rel=1e-6)
        if rec["accepted"] == "none":
            assert after == pytest.approx(before, rel=1e-5)
        else:
            assert after < before
    assert {r["accepted"] for r in opt.trajectory} == {"descent", "ascent", "none"}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_conservative_step_stores_the_candidate_it_evaluated_in_16_bits(dtype):
    """The exact mode evaluates a candidate on copies rounded to nearest: the accepted one is stored so, not with
    stochastic bits (7 of 40 accepted bf16 steps raised the batch loss they had been kept for lowering)."""
    w = torch.nn.Parameter(torch.randn(200, generator=torch.Generator().manual_seed(0)).to(dtype))
    opt = ZOConservative([w], lr=1e-3, eps=1e-3, seed=0)
    closure = lambda: (w.float() ** 2).sum()  # noqa: E731
    for _ in range(20):
        opt.step(closure)
        record = opt.trajectory[-1]
        kept = {"descent": record["losses"][3], "ascent": record["losses"][-1], "none": record["losses"][0]}
        assert closure().item() == kept[record["accepted"]]
    assert "descent" in {r["accepted"] for r in opt.trajectory}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_conservative_step_that_accepts_nothing_leaves_exact_mode_parameters_bit_identical(dtype):
    """Its three moves cancel in exact arithmetic, not always in floating point: the residual (about 1e-19) must not
    be written (it turned zeros into -0 and tiny values)."""
    target = torch.randn(4096, generator=torch.Generator().manual_seed(0))
    target[::2] = 0.0  # half zeros, as a zero-initialised LoRA B
    w = torch.nn.Parameter(target.to(dtype))  # at the minimum: no candidate lowers the loss
    start = w.detach().clone()
    opt = ZOConservative([w], lr=2.2577424552889627e-4, eps=2.8039064169910716e-3, seed=0)
    for _ in range(3):
        opt.step(lambda: (w.double() - target.to(dtype).double()).pow(2).sum())
    assert [r["accepted"] for r in opt.trajectory] == ["none"] * 3
    assert torch.equal(w.detach().view(torch.int16), start.view(torch.int16))  # signs of zeros included


@pytest.mark.parametrize(
    "cls,kwargs",
    [(ZOSGD, {}), (ZOSGD, dict(momentum=0.9)), (ZOSignSGD, {}), (ZOConservative, dict(weight_decay=0.1)),
     (ZOAdam, {}), (FZOO, {}), (LDSD, dict(k=3))],
)  # fmt: skip
def test_how_16_bit_parameters_are_grouped_does_not_change_the_stored_bits(cls, kwargs):
    """The rounding seed is the pass's, shared by its groups: a second group with the same hyperparameters draws
    the same bits as one group would (it drew the next pass's seed)."""
    results = []
    for split in (False, True):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Linear(32, 4)).bfloat16()
        params = list(model.parameters())
        groups = [{"params": params[:2]}, {"params": params[2:]}] if split else [{"params": params}]
        opt = cls(groups, lr=1e-2, eps=1e-2, seed=5, **kwargs)
        x = torch.randn(8, 16).bfloat16()
        for _ in range(3):
            opt.step(lambda model=model, x=x: model(x).float().pow(2).mean())
        results.append([p.detach().clone() for p in params])
    assert all(torch.equal(a, b) for a, b in zip(*results))


@pytest.mark.parametrize(
    "cls,kwargs,dtype",
    [(ZOSGD, {}, torch.float32), (ZOSGD, {}, torch.bfloat16), (ZOSGD, dict(n_probes=3), torch.float32),
     (ZOSGD, dict(merge_steps=True), torch.float32), (ZOSGD, dict(one_sided=True), torch.float32),
     (ZOSGD, dict(weight_decay=0.1, perturbation="inplace"), torch.float16), (FZOO, {}, torch.float32),
     (ZOConservative, {}, torch.float32)],
)  # fmt: skip
def test_groups_whose_pass_values_are_equal_share_one_call_with_the_same_bits(monkeypatch, cls, kwargs, dtype):
    """Six groups, two learning rates, one eps: each perturbation pass is one call, each update pass one per
    learning rate, and the parameters are bit for bit those of one call per group (16-bit: stochastic rounding's
    bits included)."""
    from zokern.optim import base

    calls = count_passes(monkeypatch)
    results, counts = [], []
    for fused in (True, False):
        if not fused:  # every group its own call: no two keys equal
            monkeypatch.setattr(base, "_call_key", lambda scalars: [object()])
        torch.manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(37 + k).to(dtype)) for k in range(6)]
        groups = [{"params": [p], "lr": 1e-2 if k % 2 else 2e-2} for k, p in enumerate(params)]
        opt = cls(groups, eps=1e-2, seed=5, **kwargs)
        calls[0] = 0
        for _ in range(3):
            opt.step(lambda params=params: sum((p.float() - 0.5).pow(2).sum() for p in params))
        opt.materialize()
        results.append([p.detach().clone() for p in params])
        counts.append(calls[0])
    assert all(torch.equal(a, b) for a, b in zip(*results))
    assert counts[0] < counts[1] / 2, counts
    if cls is ZOSGD and not kwargs and dtype == torch.float32:  # +eps, -2 eps, restore and update (one per lr)
        assert counts == [3 * 4, 3 * 3 * 6]


def test_adam_follows_bias_corrected_adamw():
    (a, frozen, b), groups, closure, _ = _problem()
    opt = ZOAdam(groups, weight_decay=0.01, betas=(0.8, 0.9), adam_eps=1e-6, seed=11, n_probes=2)
    theta = [a.detach().double().clone(), b.detach().double().clone()]
    m = [torch.zeros_like(t) for t in theta]
    v = [torch.zeros_like(t) for t in theta]
    for t in range(1, 4):
        opt.step(closure)
        rec = opt.trajectory[-1]
        for k, (p, offset, group) in enumerate(zip((a, b), (OFFSETS[0], OFFSETS[2]), opt.param_groups)):
            g = _expected_sgd_direction(opt, rec, p, offset, group)
            m[k] = 0.8 * m[k] + 0.2 * g
            v[k] = 0.9 * v[k] + 0.1 * g * g
            step = (m[k] / (1 - 0.8**t)) / ((v[k] / (1 - 0.9**t)).sqrt() + 1e-6)
            theta[k] = theta[k] * (1 - group["lr"] * 0.01) - group["lr"] * step
            assert opt.state[p]["exp_avg"].dtype == torch.float32 and opt.state[p]["step"] == t
        torch.testing.assert_close(a.double(), theta[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(b.double(), theta[1], atol=1e-5, rtol=1e-5)


def test_fzoo_normalises_by_the_spread_of_probe_losses():
    (a, frozen, b), groups, closure, _ = _problem()
    opt = FZOO(groups, n_probes=4, weight_decay=0.02, seed=13)
    before = [a.detach().double().clone(), b.detach().double().clone()]
    returned = opt.step(closure)
    rec = opt.trajectory[0]
    l0, probe_losses = rec["losses"][0], rec["losses"][1:]
    assert returned.item() == pytest.approx(l0, rel=1e-6) and len(probe_losses) == 4
    spread = statistics.stdev(probe_losses)
    coefs = [(li - l0) / (4 * spread) for li in probe_losses]
    assert rec["projected_grad"] == pytest.approx(coefs)
    probes = [seeds.probe_seed(rec["seed"], k) for k in range(4)]
    for p, old, offset, group in zip((a, b), before, (OFFSETS[0], OFFSETS[2]), opt.param_groups):
        direction = sum(c * _z(s, offset, p, "rademacher") for s, c in zip(probes, coefs))
        expected = old - group["lr"] * (direction + 0.02 * old)
        torch.testing.assert_close(p.double(), expected, atol=1e-6, rtol=1e-6)


# ------------------------------------------------------------------------------------------------ convergence


def test_zosgd_converges_on_a_quadratic_at_the_predicted_rate():
    # f(theta) = a/2 |theta|^2 in d dimensions. The two-sided difference is exact for a quadratic, so a step is
    # theta - lr a z z^T theta, and E|theta'|^2 = (1 - 2 lr a + lr^2 a^2 (d + 2)) |theta|^2 exactly (Gaussian
    # z; the stream's variance is 1 - 5e-6). The best lr = 1/(a (d + 2)) gives rate 1 - 1/(d + 2) per step.
    d, a, steps, runs = 64, 2.0, 150, 40
    lr = 1 / (a * (d + 2))
    rate = 1 - 2 * lr * a + lr**2 * a**2 * (d + 2)
    ratios = []
    for run in range(runs):
        theta = torch.nn.Parameter(torch.randn(d, generator=torch.Generator().manual_seed(run)))
        start = theta.detach().double().pow(2).sum().item()
        opt = ZOSGD([theta], lr=lr, eps=1e-2, seed=1000 + run)
        for _ in range(steps):
            opt.step(lambda theta=theta: a / 2 * theta.double().pow(2).sum())
        ratios.append(theta.detach().double().pow(2).sum().item() / start)
    predicted = rate**steps
    mean = statistics.fmean(ratios)
    standard_error = statistics.stdev(ratios) / math.sqrt(runs)
    assert abs(mean - predicted) < 4 * standard_error, (mean, predicted, standard_error)
    # The test can tell rules apart: the rate without the variance term (the noiseless limit) is far off.
    assert abs(mean - (1 - 2 * lr * a) ** steps) > 4 * standard_error


def test_a_small_transformer_lowers_its_loss_on_a_fixed_batch():
    pytest.importorskip("transformers")
    model = tiny_opt().eval()
    batch = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(1))

    def closure():
        return model(input_ids=batch, labels=batch).loss

    opt = ZOSGD(model.parameters(), lr=3e-3, eps=1e-3, seed=0, n_probes=4)
    with torch.no_grad():
        start = closure().item()
    for _ in range(60):
        opt.step(closure)
    with torch.no_grad():
        end = closure().item()
    assert end < start - 0.1, (start, end)


# -------------------------------------------------------------------------------------- torch.optim contracts


def test_param_groups_schedulers_and_zero_grad():
    (a, frozen, b), groups, closure, _ = _problem()
    opt = ZOSGD(groups, seed=1)
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    for _ in range(4):
        opt.zero_grad()
        opt.step(closure)
        scheduler.step()
    assert [r["lr"] for r in opt.trajectory] == [[1e-3, 2e-3]] * 2 + [[5e-4, 1e-3]] * 2
    assert a.grad is None and b.grad is None


@pytest.mark.parametrize("cls", [ZOSGD, ZOAdam, ZOSignSGD, FZOO, ZOConservative])
def test_resuming_from_state_dict_continues_bit_identically(cls):
    kwargs = dict(momentum=0.5) if cls in (ZOSGD, ZOSignSGD) else {}
    params, groups, closure, _ = _problem(torch.bfloat16)
    opt = cls(groups, seed=9, **kwargs)
    for _ in range(6):
        opt.step(closure)
    uninterrupted = [p.detach().clone() for p in params]

    params, groups, closure, _ = _problem(torch.bfloat16)
    opt = cls(groups, seed=9, **kwargs)
    for _ in range(3):
        opt.step(closure)
    saved = opt.state_dict()
    weights = [p.detach().clone() for p in params]
    params, groups, closure, _ = _problem(torch.bfloat16)
    for p, w in zip(params, weights):
        p.data.copy_(w)
    resumed = cls(groups, seed=12345, **kwargs)  # the state dict's seed wins
    resumed.load_state_dict(saved)
    for _ in range(3):
        resumed.step(closure)
    assert all(torch.equal(p, u) for p, u in zip(params, uninterrupted))


def test_a_state_dict_of_stream_version_1_resumes_and_another_version_is_refused():
    # Version 2 changed how 16-bit updates are rounded, not z: a version-1 run's states and seeds resume as they were.
    params, groups, closure, _ = _problem()
    opt = ZOSGD(groups, seed=9, momentum=0.5)
    opt.step(closure)
    saved = opt.state_dict()
    saved["zo"] = dict(saved["zo"], stream_version=1)
    resumed = ZOSGD(_problem()[1], seed=1, momentum=0.5)
    resumed.load_state_dict(saved)
    assert resumed.state_dict()["zo"]["stream_version"] == zokern.STREAM_VERSION == 2
    saved["zo"]["stream_version"] = 3
    with pytest.raises(ValueError, match="state dict written with stream version 3; this zokern has 2"):
        ZOSGD(_problem()[1], seed=1, momentum=0.5).load_state_dict(saved)


def test_load_sharded_state_dict_of_an_unsharded_run_loads_as_load_state_dict_and_checks_the_ranks_agree():
    # (Sharded state dicts: tests/test_fsdp.py.) One state dict of whole states is every rank's: each keeps its rows.
    params, groups, closure, _ = _problem(torch.float32)
    opt = ZOAdam(groups, seed=9)
    for _ in range(2):
        opt.step(closure)
    saved = opt.state_dict()
    resumed = ZOAdam(_problem(torch.float32)[1], seed=1)
    resumed.load_sharded_state_dict(iter([saved]))
    assert resumed.steps_taken == 2 and resumed.base_seed == 9
    for p, q in zip(opt.state, resumed.state):
        assert all(torch.equal(opt.state[p][k], resumed.state[q][k]) for k in ("exp_avg", "exp_avg_sq"))
    _, other_groups, other_closure, _ = _problem(torch.float32)
    other = ZOAdam(other_groups, seed=10)  # another run
    for _ in range(2):
        other.step(other_closure)
    fresh = ZOAdam(_problem(torch.float32)[1], seed=1)
    with pytest.raises(
        ValueError, match=r"state dict 1 \(saved by rank 1\) is not of the same run, step and number of ranks"
    ):
        fresh.load_sharded_state_dict([saved, other.state_dict()])
    with pytest.raises(ValueError, match="no state dict was given"):
        fresh.load_sharded_state_dict([])
    assert fresh.steps_taken == 0 and not fresh.state


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
@pytest.mark.parametrize(
    "cls,kwargs",
    [(ZOSGD, dict(momentum=0.5)), (ZOSGD, dict(merge_steps=True)), (ZOAdam, {}), (FZOO, {}), (LDSD, dict(k=3))],
    ids=lambda x: x.__name__ if isinstance(x, type) else ",".join(map(str, x.values())),
)
def test_a_copied_optimizer_steps_on_as_the_original(cls, kwargs, how):
    (a, _, b), groups, closure, loss_of = _problem()
    opt = cls(groups, seed=5, **kwargs)
    for _ in range(2):
        opt.step(closure)
    # The optimizer last: with merge_steps, the parameters are copied while they hold the next perturbation.
    copied = copy.deepcopy((a, b, opt)) if how == "deepcopy" else pickle.loads(pickle.dumps((a, b, opt)))
    copy_a, copy_b, copy_opt = copied
    assert copy_opt.param_groups[0]["params"][0] is copy_a
    for _ in range(2):
        opt.step(closure)
        copy_opt.step(lambda: loss_of(copy_a, copy_b).float())
    assert torch.equal(copy_a, a) and torch.equal(copy_b, b)
    assert copy_opt.steps_taken == opt.steps_taken == 4
    alone = copy.deepcopy(opt)  # its own copies of the parameters, taken back when read through the optimizer
    alone.materialize()
    opt.materialize()
    assert all(torch.equal(p, q) for p, q in zip(alone.param_groups[1]["params"], opt.param_groups[1]["params"]))


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
@pytest.mark.parametrize("kwargs", [{}, dict(cuda_graph=True)], ids=["plain", "cuda_graph"])
def test_a_copy_leaves_the_original_its_scheduler_and_hooks(how, kwargs):
    # A scheduler wraps the optimizer's step (holding the optimizer) and hooks are the original's: as torch.optim,
    # a copy (and an unpickled optimizer) has neither, and stepping it never touches the original's parameters.
    (a, _, b), groups, closure, loss_of = _problem()
    opt = ZOSGD(groups, seed=5, **kwargs)
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    calls = []
    opt.register_step_post_hook(lambda *_: calls.append(1))
    opt.step(closure)
    scheduler.step()
    copied = copy.deepcopy((a, b, opt)) if how == "deepcopy" else pickle.loads(pickle.dumps((a, b, opt)))
    copy_a, copy_b, copy_opt = copied
    before = a.detach().clone(), b.detach().clone()
    copy_opt.step(lambda: loss_of(copy_a, copy_b).float())
    assert torch.equal(a, before[0]) and torch.equal(b, before[1]) and opt.steps_taken == 1
    assert not torch.equal(copy_a, before[0]) and copy_opt.steps_taken == 2 and calls == [1]
    assert copy_opt.param_groups[0]["lr"] == opt.param_groups[0]["lr"] == 5e-4  # the scheduled rate, copied


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize(
    "cls,kwargs",
    [
        (ZOSGD, {}),
        (ZOSGD, dict(momentum=0.8, n_probes=2, one_sided=True)),
        (ZOSignSGD, {}),
        (ZOConservative, {}),
        (ZOAdam, dict(n_probes=2)),
        (FZOO, dict(n_probes=3)),
    ],
    ids=lambda x: x.__name__ if isinstance(x, type) else ",".join(map(str, x.values())),
)
def test_replay_reproduces_the_trained_parameters_bit_identically(cls, kwargs, dtype):
    params, groups, closure, _ = _problem(dtype)
    initial = [p.detach().clone() for p in params]
    opt = cls(groups, seed=21, **kwargs)
    scheduler = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.9)
    for _ in range(5):
        opt.step(closure)
        scheduler.step()
    # Only the first record carries the setup; the others are a few scalars.
    assert "setup" in opt.trajectory[0] and all("setup" not in r for r in opt.trajectory[1:])
    replayed = [t.clone() for t in initial]
    zokern.replay(replayed, opt.trajectory)
    assert all(torch.equal(r, p.detach()) for r, p in zip(replayed, params))


@pytest.mark.parametrize(
    "saved_with,loaded_into,match",
    [
        (lambda ps: ZOSGD(ps, momentum=0.9), lambda ps: ZOSGD(ps), r"momentum=0.9; this one has momentum=0.0"),
        (lambda ps: LDSD(ps, k=3, update="adam"), lambda ps: LDSD(ps, k=7), r"k=3, update='adam'.*k=7, update='sgd'"),
        (
            lambda ps: ZOSGD(ps),
            lambda ps: ZOSGD(ps[::-1]),
            r"run had 35 elements for param_groups\[0\]\['params'\]\[0\]",
        ),
        (  # equal numels swapped: each would draw the other's stream
            lambda ps: ZOSGD([ps[0], ps[0].detach().t().contiguous().requires_grad_()]),
            lambda ps: ZOSGD([ps[0].detach().t().contiguous().requires_grad_(), ps[0]]),
            r"run had shape \(5, 7\) for param_groups\[0\]\['params'\]\[0\] \(shape \(7, 5\)\): not these "
            r"parameters, or not in this order",
        ),
    ],
    ids=["momentum", "ldsd update", "other parameters", "same numels in another order"],
)
def test_a_state_dict_of_another_run_is_refused_before_loading(saved_with, loaded_into, match):
    (a, _, b), _, closure, _ = _problem()
    saved = saved_with([a, b])
    saved.step(closure)
    target = loaded_into([a, b])
    with pytest.raises(ValueError, match=match):
        target.load_state_dict(saved.state_dict())
    assert target.steps_taken == 0 and not target.state
    relaxed = ZOSGD([a, b], backend="torch", seed_check_every=0)  # where the steps run may change on resume
    relaxed.load_state_dict(ZOSGD([a, b]).state_dict())


@pytest.mark.parametrize(
    "key,value,error,match",
    [
        ("lr", -1.0, ValueError, r"param group 1: invalid lr: -1.0"),
        ("eps", 0.0, ValueError, r"param group 1: invalid eps: 0.0"),
        ("momentum", 0.9, ValueError, r"param group 1: momentum is an option of the whole optimizer"),
        ("lr", "1e-4", TypeError, r"param group 1: lr must be a real number, got str"),
    ],
    ids=["negative lr", "zero eps", "group momentum", "string lr"],
)
def test_a_loaded_param_group_is_checked_as_the_constructor_checks_it(key, value, error, match):
    # Editing a checkpoint's lr is how one changes a resumed run's rate: a value the constructor refuses must not load
    # (it would step silently wrong, or fail mid-step with the parameters perturbed).
    (a, frozen, b), groups, closure, _ = _problem()
    saved = ZOSGD(groups, seed=3)
    saved.step(closure)
    state = saved.state_dict()
    state["param_groups"][1][key] = value
    target = ZOSGD([{"params": [a, frozen]}, {"params": [b]}], seed=4)
    before = [p.detach().clone() for p in (a, b)]
    with pytest.raises(error, match=match):
        target.load_state_dict(state)
    assert target.base_seed == 4 and target.param_groups[1]["lr"] == 1e-6 and "momentum" not in target.param_groups[1]
    target.step(closure)  # still the optimizer it was
    assert not torch.equal(a, before[0])


@pytest.mark.parametrize("backend", ["cpu", "torch"])
@pytest.mark.parametrize(
    "cls,kwargs",
    [(ZOSGD, dict(momentum=0.9)), (ZOAdam, {}), (LDSD, dict(k=3, momentum=0.9)), (LDSD, dict(k=3, update="adam"))],
)
def test_states_saved_in_another_dtype_or_layout_load_as_the_kernels_hold_them(cls, kwargs, backend):
    """float32 and contiguous whatever the saved tensors were: a float64 copy continues as the original does."""
    if backend not in zokern.available_backends():
        pytest.skip(f"{backend} backend not built")
    (a, frozen, b), groups, closure, _ = _problem()
    opt = cls(groups, seed=0, backend=backend, **kwargs)
    for _ in range(2):
        opt.step(closure)
    saved = copy.deepcopy(opt.state_dict())
    start = [p.detach().clone() for p in (a, b)]
    opt.step(closure)
    expected = [p.detach().clone() for p in (a, b)]
    for cast in (torch.Tensor.double, lambda t: t.t().contiguous().t() if t.dim() == 2 else t.bfloat16()):
        with torch.no_grad():
            a.copy_(start[0])
            b.copy_(start[1])
        state = copy.deepcopy(saved)
        for entry in state["state"].values():
            for key, value in entry.items():
                if isinstance(value, torch.Tensor) and value.is_floating_point() and value.dim():
                    entry[key] = cast(value)
        resumed = cls(groups, seed=0, backend=backend, **kwargs)
        resumed.load_state_dict(state)
        assert all(
            v.dtype == torch.float32 and v.is_contiguous()
            for s in resumed.state.values() for v in s.values() if isinstance(v, torch.Tensor)
        )  # fmt: skip
        resumed.step(closure)
        if cast is torch.Tensor.double:
            assert all(torch.equal(p, e) for p, e in zip((a, b), expected))


@pytest.mark.parametrize("backend", ["cpu", "torch"])
@pytest.mark.parametrize(
    "cls,kwargs", [(ZOSGD, dict(momentum=0.9)), (ZOAdam, {}), (LDSD, dict(k=3)), (LDSD, dict(k=3, update="adam"))]
)
def test_states_replaced_in_another_dtype_or_layout_are_read_as_the_kernels_hold_them(cls, kwargs, backend):
    """A state that no longer is what the passes read by address (a moved model leaves its states on the old device;
    one set by hand may be float64 or transposed) is brought to the parameter's device, float32 and contiguous,
    before the step: the step is the one the original states give."""
    if backend not in zokern.available_backends():
        pytest.skip(f"{backend} backend not built")
    runs = []
    for replace in (False, True):
        (a, frozen, b), groups, closure, _ = _problem()
        opt = cls(groups, seed=0, backend=backend, **kwargs)
        for _ in range(2):
            opt.step(closure)
        if replace:
            for state in opt.state.values():
                for key in _shaped(state):
                    value = state[key].double()
                    state[key] = value.t().contiguous().t() if value.dim() == 2 else value
        opt.step(closure)
        runs.append([a.detach().clone(), b.detach().clone()])
        assert all(
            state[key].dtype == torch.float32 and state[key].is_contiguous()
            for state in opt.state.values() for key in _shaped(state)
        )  # fmt: skip
    assert all(torch.equal(x, y) for x, y in zip(*runs))


@pytest.mark.parametrize("cls,kwargs", [(ZOSGD, dict(momentum=0.9)), (ZOAdam, {}), (LDSD, dict(k=3, update="adam"))])
def test_state_dict_hooks_see_and_change_what_a_torch_optimizer_s_would(cls, kwargs):
    """torch.optim's hooks: a state_dict post-hook sees (and may replace) the dict that is returned, 'zo' entry
    included; a load pre-hook's returned dict is the one loaded; a load post-hook sees the loaded run and its edits
    of the state stay (zokern once rewrote the states from the original dict after the hooks had run)."""
    (a, frozen, b), groups, closure, _ = _problem()
    opt = cls(groups, seed=0, **kwargs)
    for _ in range(2):
        opt.step(closure)
    seen = {}
    opt.register_state_dict_post_hook(lambda o, sd: seen.update(saved=sorted(sd)))
    opt.register_state_dict_post_hook(lambda o, sd: {**sd, "note": "kept"})
    saved = opt.state_dict()
    assert seen["saved"] == ["param_groups", "state", "zo"] and saved["note"] == "kept"

    def scaled(o, sd):
        seen["pre"] = sorted(sd)
        state = {i: {k: v * 2 if k in _shaped(s) else v for k, v in s.items()} for i, s in sd["state"].items()}
        return {**sd, "state": state}

    def zero_first(o):
        seen["post"] = (o.steps_taken, o.base_seed)
        o.state[a][_shaped(o.state[a])[0]] = torch.zeros(a.shape)

    resumed = cls(groups, seed=1, **kwargs)
    resumed.register_load_state_dict_pre_hook(scaled)
    resumed.register_load_state_dict_post_hook(zero_first)
    resumed.load_state_dict(copy.deepcopy(saved))
    assert seen["pre"] == ["note", "param_groups", "state", "zo"]
    assert seen["post"] == (opt.steps_taken, opt.base_seed)
    for p in (a, b):
        for key in _shaped(opt.state[p]):
            reset = p is a and key == _shaped(opt.state[a])[0]
            assert torch.equal(resumed.state[p][key], torch.zeros(a.shape) if reset else opt.state[p][key] * 2)


def test_hooks_registered_during_a_call_or_on_a_copy_stay_and_run_once():
    """zokern runs these hooks itself; torch.optim's loop, inside zokern's call, must run none of them, while the
    registries stay the optimizer's own: a hook a pre-hook registers runs in that very call and stays registered,
    and a copy's hooks (registered on the copy: hooks stay with the original) run once, seeing the zo entry."""
    (a, frozen, b), groups, closure, _ = _problem()
    opt = ZOSGD(groups, seed=0, momentum=0.9)
    opt.step(closure)
    seen = []

    def register_once(o):
        if not o._optimizer_state_dict_post_hooks:
            o.register_state_dict_post_hook(lambda o, sd: seen.append("zo" in sd))

    opt.register_state_dict_pre_hook(register_once)
    opt.state_dict()
    opt.state_dict()
    assert seen == [True, True] and len(opt._optimizer_state_dict_post_hooks) == 1
    for copied in (copy.deepcopy(opt), pickle.loads(pickle.dumps(opt))):
        seen.clear()
        copied.register_state_dict_post_hook(lambda o, sd: seen.append("zo" in sd))
        copied.register_load_state_dict_post_hook(lambda o: seen.append(o.steps_taken))
        copied.load_state_dict(copied.state_dict())
        assert seen == [True, 1]


def _shaped(state):
    """The keys of a parameter's state that hold tensors shaped like it."""
    return sorted(k for k, v in state.items() if isinstance(v, torch.Tensor) and v.dim())


@pytest.mark.parametrize("cls,kwargs", [(ZOSGD, dict(momentum=0.5)), (ZOAdam, {}), (LDSD, dict(k=2))])
def test_a_roll_back_to_an_earlier_checkpoint_leaves_a_trajectory_that_replays(cls, kwargs):
    """The steps after the checkpoint are abandoned: their records stayed, so the trajectory held steps 3, 4, 3, 4, 5
    and replay refused it."""
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 1)
    x, y = torch.randn(8, 8), torch.randn(8, 1)
    closure = lambda: torch.nn.functional.mse_loss(model(x), y)  # noqa: E731
    initial = [p.detach().clone() for p in model.parameters()]
    opt = cls(model.parameters(), lr=1e-2, eps=1e-2, seed=7, **kwargs)
    for _ in range(3):
        opt.step(closure)
    checkpoint = copy.deepcopy(dict(model=model.state_dict(), opt=opt.state_dict()))
    for _ in range(2):
        opt.step(closure)
    model.load_state_dict(checkpoint["model"])
    opt.load_state_dict(checkpoint["opt"])
    for _ in range(3):
        opt.step(closure)
    assert [r["step"] for r in opt.trajectory] == list(range(6))
    replayed = [t.clone() for t in initial]
    zokern.replay(replayed, opt.trajectory)
    assert all(torch.equal(r, p.detach()) for r, p in zip(replayed, model.parameters()))


def test_a_checkpoint_whose_groups_carry_keys_an_older_zokern_wrote_still_loads():
    """LDSD's SGD groups held Adam's betas and adam_eps until they were made Adam-only: such checkpoints resume."""
    (a, frozen, b), groups, closure, _ = _problem()
    opt = LDSD(groups, seed=0, k=3)
    opt.step(closure)
    saved = opt.state_dict()
    for group in saved["param_groups"]:
        group.update(betas=(0.9, 0.999), adam_eps=1e-8)
    resumed = LDSD(groups, seed=0, k=3)
    resumed.load_state_dict(saved)
    assert all("betas" not in g and "adam_eps" not in g for g in resumed.param_groups)
    resumed.step(closure)


def test_a_state_tensor_of_another_shape_is_refused():
    (a, _, b), _, closure, _ = _problem()
    saved = ZOSGD([a, b], momentum=0.9)
    saved.step(closure)
    state = saved.state_dict()
    state["zo"].pop("numels")  # as written before numels were saved: the momentum buffers' shapes still tell
    state["state"][0]["momentum_buffer"] = torch.zeros(3)
    with pytest.raises(ValueError, match=r"'momentum_buffer' for param_groups\[0\]\['params'\]\[0\].*shape \(3,\)"):
        ZOSGD([a, b], momentum=0.9).load_state_dict(state)


@pytest.mark.parametrize(
    "dtype,resumed_with",
    [
        (torch.bfloat16, dict(rounding="nearest")),
        (torch.bfloat16, dict(perturbation="inplace")),
        (torch.float32, dict(merge_steps=True)),
        (torch.float32, dict(backend="torch")),
    ],
    ids=["rounding", "perturbation", "merge_steps", "backend"],
)
def test_replay_follows_the_options_a_resumed_run_changed(dtype, resumed_with):
    # docs/optim.md: a run may resume with other backend, perturbation, rounding or merge_steps; the joined records
    # of both parts must replay to what the resumed part trained.
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1)).to(dtype)
    x, y = torch.randn(32, 16).to(dtype), torch.randn(32, 1)
    params = list(model.parameters())
    initial = [p.detach().clone() for p in params]

    def closure():
        return ((model(x).float() - y) ** 2).mean()

    opt = ZOSGD(params, lr=1e-3, eps=1e-2, seed=6)
    for _ in range(3):
        opt.step(closure)
    checkpoint, before = opt.state_dict(), opt.trajectory
    resumed = ZOSGD(params, lr=1e-3, eps=1e-2, seed=0, **resumed_with)
    resumed.load_state_dict(checkpoint)
    for _ in range(3):
        resumed.step(closure)
    resumed.materialize()
    replayed = [t.clone() for t in initial]
    zokern.replay(replayed, before + resumed.trajectory)
    assert all(torch.equal(r, p.detach()) for r, p in zip(replayed, params))


def test_replay_follows_param_groups_added_during_the_run():
    params, groups, closure, _ = _problem()
    extra = torch.nn.Parameter(torch.linspace(-1, 1, 6))
    initial = [p.detach().clone() for p in (*params, extra)]
    opt = ZOSGD(groups[:1], seed=2, momentum=0.5)
    opt.step(closure)
    opt.add_param_group(groups[1])
    opt.step(closure)
    opt.add_param_group({"params": [extra], "lr": 0.05})
    for _ in range(2):
        opt.step(lambda: closure() + extra.pow(3).sum())
    replayed = [t.clone() for t in initial]
    zokern.replay(replayed, opt.trajectory)  # the parameters of the groups added later come last, as added
    assert all(torch.equal(r, p.detach()) for r, p in zip(replayed, (*params, extra)))


@pytest.mark.parametrize("to", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("cls,kwargs", [(ZOSGD, dict(momentum=0.5)), (ZOAdam, {}), (LDSD, dict(k=2))])
def test_replay_converts_the_parameters_where_the_run_did(cls, kwargs, to):
    """A run that converted its model between steps (model.half() after a float32 warm-up; the next step goes on in
    the exact mode) recorded the new dtypes in a setup that replay refused from any initial parameters."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
    initial = [p.detach().clone() for p in model.parameters()]
    x, y = torch.randn(16, 4), torch.randn(16, 1)
    opt = cls(model.parameters(), lr=1e-2, eps=1e-2, seed=0, **kwargs)
    closure = lambda: ((model(x.to(model[0].weight.dtype)).float() - y) ** 2).mean()  # noqa: E731
    for _ in range(2):
        opt.step(closure)
    model.to(to)
    for _ in range(2):
        opt.step(closure)
    replayed = [t.clone() for t in initial]
    zokern.replay(replayed, opt.trajectory)
    assert all(r.dtype == to and torch.equal(r, p.detach()) for r, p in zip(replayed, model.parameters()))
    with pytest.raises(ValueError, match=r"params\[0\] has dtype"):  # the run's first dtypes are still required
        zokern.replay([t.to(to) for t in initial], opt.trajectory)


def test_replay_refuses_a_conversion_it_cannot_follow_before_writing():
    """A frozen parameter made float64 mid-run (its take-back failed, and the step raised): replay converted it and
    failed partway, with parameters written."""
    a, b = torch.nn.Parameter(torch.randn(16)), torch.nn.Parameter(torch.randn(16))
    initial = [a.detach().clone(), b.detach().clone()]
    opt = ZOSGD([{"params": [a]}, {"params": [b]}], lr=1e-2, eps=1e-2, seed=0, merge_steps=True)
    loss = lambda: ((a - 1) ** 2).sum() + ((b.float() - 1) ** 2).sum()  # noqa: E731
    opt.step(loss)
    b.requires_grad_(False)
    b.data = b.data.double()
    with pytest.raises(TypeError):
        opt.step(loss)
    replayed = [t.clone() for t in initial]
    with pytest.raises(ValueError, match="converted parameter 1 from float32 to float64, which replay does not"):
        zokern.replay(replayed, opt.trajectory)
    assert all(torch.equal(r, t) for r, t in zip(replayed, initial))


def test_replay_converts_a_frozen_parameter_to_any_dtype_as_the_run_did():
    a, b = torch.nn.Parameter(torch.randn(16)), torch.nn.Parameter(torch.randn(16))
    initial = [a.detach().clone(), b.detach().clone()]
    opt = ZOSGD([a, b], lr=1e-2, eps=1e-2, seed=0)
    loss = lambda: ((a - 1) ** 2).sum() + ((b.float() - 1) ** 2).sum()  # noqa: E731
    opt.step(loss)
    b.requires_grad_(False)
    b.data = b.data.double()  # frozen from now on: no pass writes it
    for _ in range(3):
        opt.step(loss)
    replayed = [t.clone() for t in initial]
    zokern.replay(replayed, opt.trajectory)
    assert replayed[1].dtype == torch.float64 and all(torch.equal(r, p.detach()) for r, p in zip(replayed, (a, b)))


def test_a_checkpoint_of_another_run_leaves_the_trajectory_as_it_was():
    """Only a roll-back within the run trims the records: another run's continuation glued to this run's first steps
    passed replay's checks and replayed to other parameters."""
    w = torch.nn.Parameter(torch.randn(8))
    opt = ZOSGD([w], lr=1e-2, eps=1e-2, seed=1)
    for _ in range(4):
        opt.step(lambda: (w**2).sum())
    other = ZOSGD([torch.nn.Parameter(torch.randn(8))], lr=1e-2, eps=1e-2, seed=2)
    for _ in range(2):
        other.step(lambda: torch.tensor(1.0))
    opt.load_state_dict(other.state_dict())
    assert [r["step"] for r in opt.trajectory] == [0, 1, 2, 3]


def _trained_trajectory():
    params, groups, closure, _ = _problem()
    initial = [p.detach().clone() for p in params]
    opt = ZOSGD(groups, seed=3)
    for _ in range(4):
        opt.step(closure)
    return initial, copy.deepcopy(opt.trajectory)


@pytest.mark.parametrize(
    "spoil,given,match",
    [
        (lambda t: t[2].update(stream_version=99), None, r"record 2 was written with stream version 99"),
        (lambda t: t[3].pop("losses"), None, r"record 3 lacks losses"),
        (lambda t: t.append(5), None, r"record 4 is of type int, not a dict"),
        (lambda t: t.pop(0), None, r"must start at a record with a 'setup'"),
        (lambda t: t.__setitem__(slice(0, 2), [dict(t[0], step=2), t[3]]), None, r"record 0 is step 2"),
        (lambda t: None, lambda ps: [ps[2], ps[1], ps[0]], r"params\[0\] has numel 13.*parameter 0 had 35"),
        (lambda t: None, lambda ps: [ps[0].double(), ps[1], ps[2]], r"params\[0\] has dtype float64.*had float32"),
        (lambda t: None, lambda ps: [ps[0].view(35), ps[1], ps[2]], r"params\[0\] has shape \[35\].*had \[5, 7\]"),
        (lambda t: None, lambda ps: ps[:2], r"had 3 parameters.*2 given"),
        (
            lambda t: t[3]["losses"].pop(),
            None,
            r"record 3 has losses \[[^,]*\]: a completed step of this ZOSGD evaluates 2",
        ),
        (lambda t: t[3]["losses"].__setitem__(1, None), None, r"record 3: its losses must be a list of numbers"),
        (lambda t: t[3]["losses"].__setitem__(1, math.nan), None, r"a completed step .* evaluates 2, all finite"),
        (lambda t: t[3]["lr"].__setitem__(1, -5.0), None, r"record 3, param group 1: invalid lr: -5.0"),
        (lambda t: t[3]["eps"].__setitem__(0, 0.0), None, r"record 3, param group 0: invalid eps: 0.0"),
        (lambda t: t[3].update(setup=dict(t[0]["setup"], optimizer="ZOAdam")), None, r"optimizer became a ZOAdam"),
        (
            lambda t: t[3].update(setup=dict(t[0]["setup"], options=dict(t[0]["setup"]["options"], n_probes=2))),
            None,
            r"record 3 changes n_probes: no run of one optimizer can",
        ),
        (
            lambda t: t[3].update(setup=dict(t[0]["setup"], options=dict(t[0]["setup"]["options"], rounding="up"))),
            None,
            r"record 3's setup: rounding must be one of",
        ),
    ],
    ids=[
        *("stream version", "missing losses", "not a record", "no setup", "resumed part alone", "order", "dtype"),
        *("shape", "count"),
        *("a loss too few", "a loss not a number", "non-finite loss of a completed step", "negative lr", "zero eps"),
        *("other optimizer", "other n_probes", "unknown rounding"),
    ],
)
def test_replay_checks_the_whole_trajectory_before_writing(spoil, given, match):
    initial, trajectory = _trained_trajectory()
    spoil(trajectory)
    params = [t.clone() for t in initial] if given is None else given([t.clone() for t in initial])
    before = [p.clone() for p in params]
    with pytest.raises(ValueError, match=match):
        zokern.replay(params, trajectory)
    assert all(torch.equal(p, b) for p, b in zip(params, before))


# ------------------------------------------------------------------------------------------------ nothing lost


def test_a_closure_that_raises_leaves_the_parameters_restored():
    (a, frozen, b), groups, closure, _ = _problem()
    before = [a.detach().clone(), b.detach().clone()]
    opt = ZOSGD(groups, seed=1, n_probes=2)
    calls = []

    def failing():
        calls.append(1)
        if len(calls) == 3:  # during the second probe
            raise KeyError("data loader broke")
        return closure()

    with pytest.raises(KeyError, match="data loader broke"):
        opt.step(failing)
    torch.testing.assert_close(a.detach(), before[0], atol=1e-6, rtol=0)
    torch.testing.assert_close(b.detach(), before[1], atol=1e-6, rtol=0)


@pytest.mark.parametrize("bad_call,bad", [(2, math.nan), (1, math.inf)], ids=["nan at minus", "inf at plus"])
def test_nonfinite_loss_skips_the_update_with_a_warning(bad_call, bad):
    (a, frozen, b), groups, closure, _ = _problem()
    before = [a.detach().clone(), b.detach().clone()]
    opt = ZOSGD(groups, seed=1)
    calls = []

    def nonfinite_once():
        calls.append(1)
        return torch.tensor(bad) if len(calls) == bad_call else closure()

    with pytest.warns(RuntimeWarning, match="non-finite loss"):
        loss = opt.step(nonfinite_once)
    assert math.isnan(loss.item())  # a skipped step's loss, whatever made it skip
    assert opt.nonfinite_steps == 1 and opt.trajectory[-1]["skipped"]
    torch.testing.assert_close(a.detach(), before[0], atol=1e-6, rtol=0)
    torch.testing.assert_close(b.detach(), before[1], atol=1e-6, rtol=0)
    assert opt.state_dict()["zo"]["nonfinite_steps"] == 1


def test_a_trainable_tensor_subclass_is_refused_and_a_frozen_one_left_alone():
    # A wrapper subclass (torchao's quantized weights) keeps its values where the passes do not see them: refused by
    # name at construction (it failed at the first step, as "overlapping memory" or an error from inside torch).
    # FSDP2's DTensors are trained shard by shard (tests/test_fsdp.py).
    from torch.testing._internal.two_tensor import TwoTensor

    values = torch.randn(6)
    wrapped = torch.nn.Parameter(TwoTensor(values, values.clone()))
    plain = torch.nn.Parameter(torch.randn(4))
    with pytest.raises(TypeError, match=r"params\[1\] is a TwoTensor: zokern's passes read and write a tensor's own"):
        ZOSGD([plain, wrapped])
    wrapped.requires_grad_(False)
    opt = ZOSGD([plain, wrapped], lr=1e-2, seed=0)
    opt.step(lambda: plain.pow(2).sum())
    wrapped.requires_grad_(True)  # made trainable after construction: refused before the step's first pass
    before = plain.detach().clone()
    with pytest.raises(TypeError, match=r"param_groups\[0\]\['params'\]\[1\] is a TwoTensor"):
        opt.step(lambda: plain.pow(2).sum())
    assert torch.equal(plain, before)


@pytest.mark.parametrize(
    "make,error,match",
    [(lambda: torch.empty(3, 4, device="meta"), ValueError, "is on the meta device: it has no values to train"),
     (lambda: torch.randn(3, 4).to_sparse(), TypeError, "is a torch.sparse_coo tensor; zokern's passes update dense"),
     (lambda: torch.randn(3, 4).to_sparse_csr(), TypeError, "is a torch.sparse_csr tensor"),
     (lambda: torch.randn(3, 4).to_mkldnn(), TypeError, "is a torch._mkldnn tensor")],
    ids=["meta", "coo", "csr", "mkldnn"],
)  # fmt: skip
def test_a_trainable_parameter_without_dense_values_is_refused_by_name(make, error, match):
    """A meta parameter (accelerate's offloading, init_empty_weights) was accepted and silently never trained; a
    sparse one was called non-contiguous (COO) or failed inside torch (CSR)."""
    plain, odd = torch.nn.Parameter(torch.randn(4)), torch.nn.Parameter(make())
    with pytest.raises(error, match=r"params\[1\] " + match):
        ZOSGD([plain, odd])
    odd.requires_grad_(False)
    opt = ZOSGD([plain, odd], lr=1e-2, seed=0)  # frozen: left alone
    odd.requires_grad_(True)
    with pytest.raises(error, match=r"param_groups\[0\]\['params'\]\[1\] " + match):
        opt.step(lambda: plain.pow(2).sum())
    with pytest.raises((TypeError, ValueError), match="meta device|dense"):
        zokern.ops.perturb_(odd.data, 0, 1.0)


class _FakeQuantized(torch.nn.Parameter):
    """A quantisation-aware weight: every linear sees it rounded to a grid of 1/8."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if func is torch.nn.functional.linear:
            args = list(args)
            with torch._C.DisableTorchFunctionSubclass():
                args[1] = torch.round(args[1].as_subclass(torch.Tensor) * 8) / 8
        return super().__torch_function__(func, types, args, kwargs or {})


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_exact_mode_refuses_a_parameter_class_with_its_own_torch_function(dtype):
    """The exact mode hands ops plain tensors holding theta + eps z: the class's __torch_function__ never ran, and
    the step trained another function than the model's. Refused before a seed is drawn; in place it trains."""
    x, y = torch.randn(16, 4), torch.randn(16, 1)
    layer = torch.nn.Linear(4, 1).to(dtype)
    layer.weight = _FakeQuantized(layer.weight.data.clone())
    closure = lambda: ((layer(x.to(dtype)).float() - y) ** 2).mean()  # noqa: E731
    before = [p.detach().clone() for p in layer.parameters()]
    for perturbation in ("exact", "auto"):
        if perturbation == "auto" and dtype == torch.float32:  # in place: the wrapper runs in every evaluation
            opt = ZOSGD(layer.parameters(), lr=0.0, eps=1e-4, seed=0)
            with torch.no_grad():
                assert opt.step(closure).item() == pytest.approx(closure().item(), abs=1e-4)
            continue
        opt = ZOSGD(layer.parameters(), lr=1e-2, eps=1e-2, seed=0, perturbation=perturbation)
        with pytest.raises(TypeError, match=r"param_groups\[0\]\['params'\]\[0\] is a _FakeQuantized with its own"):
            opt.step(closure)
        with pytest.raises(TypeError, match="perturbation='inplace'"):
            with opt.perturbed(opt.new_seed()):
                closure()
        assert opt.steps_taken == 1 and not opt.trajectory  # the refused step drew no seed (new_seed drew one)
        assert all(torch.equal(p.detach(), b) for p, b in zip(layer.parameters(), before))


def test_an_optimizer_subclass_may_mix_in_an_abstract_base_class():
    """A metaclass on the optimizers (since removed) made `class MyZO(ZOSGD, abc.ABC)` a metaclass conflict."""
    import abc

    class Scheduled(ZOSGD, abc.ABC):
        pass

    w = torch.nn.Parameter(torch.randn(4))
    Scheduled([w], lr=1e-2, seed=0).step(lambda: (w**2).sum())


def test_merge_steps_refuses_a_step_in_the_exact_mode_before_drawing_its_seed():
    """Parameters made 16-bit after the constructor (model.half()) turn the default mode to exact, where nothing can
    merge: refused as the constructor refuses it, before the step draws a seed or records anything."""
    model = torch.nn.Linear(4, 2)
    opt = ZOSGD(model.parameters(), lr=1e-2, seed=0, merge_steps=True)
    opt.step(lambda: model(torch.ones(4)).pow(2).sum())
    opt.materialize()
    model.half()
    with pytest.raises(ValueError, match="exact mode: merge_steps leaves theta"):
        opt.step(lambda: model(torch.ones(4).half()).float().pow(2).sum())
    assert opt.steps_taken == 1 and len(opt.trajectory) == 1
    with opt.perturbed(opt.new_seed()):  # a lower-level block merges nothing: it runs
        model(torch.ones(4).half())


_HUGE_G = [1e37, -1e37]  # g = (L+ - L-) / (2 eps) = 1e40 with eps = 1e-3


@pytest.mark.parametrize(
    "cls,kwargs,losses",
    [
        (ZOSGD, {}, _HUGE_G),
        (ZOSGD, dict(n_probes=2), _HUGE_G),
        (ZOSGD, dict(momentum=0.5), _HUGE_G),
        (ZOSGD, {}, [1e35, -1e35]),  # g = 1e38: float32 holds it, not g z (|z| up to 4.9)
        (ZOSignSGD, {}, _HUGE_G),
        (ZOAdam, {}, [1e20, -1e20]),  # g = 1e23: its square, in the second moment, is beyond float32
        (FZOO, dict(n_probes=2), [-1e28, 1.000000000002, 1.000000000003]),  # a spread tiny beside L_i - L_0
        (LDSD, dict(k=2), _HUGE_G),
        (LDSD, dict(k=2, sigma=10.0), [0.0, 1e30, -1e35]),  # g = 5e37, but g sigma = 5e38 moves theta
        (LDSD, dict(k=2, update="adam"), [1e20, -1e20]),
        (LDSD, dict(k=2), [0.0, 1e43, 0.0]),  # g = 0, but mu's step mu_lr c_i / (K sigma) is beyond float32
        (ZOConservative, {}, [0.0, 3e34, -3e34]),  # g = 3e37: its move to the ascent candidate is 2 lr g z
        (ZOSGD, dict(momentum=0.9), [5e33, -5e33]),  # g = 5e36: the buffer sums up to 10 of them
    ],
    ids=lambda x: x.__name__ if isinstance(x, type) else ",".join(map(str, x.values() if isinstance(x, dict) else x)),
)
def test_a_projected_gradient_beyond_float32_skips_the_update(cls, kwargs, losses):
    # Finite losses whose update float32 cannot hold: the momentum and Adam states, computed in float32, wrote inf
    # and NaN into the parameters, FZOO raised mid-step, and the device step dropped the update as if it were taken.
    (a, frozen, b), groups, _, _ = _problem()
    initial = [p.detach().clone() for p in (a, frozen, b)]
    _assert_the_step_is_skipped(cls(groups, seed=1, **kwargs), losses, (a, frozen, b), initial)


@pytest.mark.parametrize(
    "cls,kwargs", [(ZOSGD, {}), (ZOSGD, dict(n_probes=2)), (ZOSGD, dict(momentum=0.9)), (LDSD, dict(k=2))]
)
def test_a_projected_gradient_whose_step_at_a_large_lr_is_beyond_float32_skips_the_update(cls, kwargs):
    # g = 1e35 is within the limit, but not lr g z at lr = 1e4: the step wrote inf (with two probes, it raised
    # mid-step after the first probe's update).
    (a, frozen, b), groups, _, _ = _problem()
    initial = [p.detach().clone() for p in (a, frozen, b)]
    for group in groups:
        group["lr"] = 1e4
    _assert_the_step_is_skipped(cls(groups, seed=1, **kwargs), [1e32, -1e32], (a, frozen, b), initial)


@pytest.mark.parametrize(
    "cls,kwargs", [(ZOSGD, {}), (ZOSGD, dict(momentum=0.9)), (ZOSGD, dict(n_probes=2)), (LDSD, dict(k=2))]
)
def test_a_step_whose_update_a_float16_parameter_cannot_hold_skips_the_update(cls, kwargs):
    # g = 1e5 at lr 1: lr g z reaches 5e5, beyond float16's 65504 (float32 holds it): the update wrote inf, silently.
    (a, frozen, b), groups, _, _ = _problem(torch.float16)
    initial = [p.detach().clone() for p in (a, frozen, b)]
    for group in groups:
        group["lr"] = 1.0
    opt = cls(groups, seed=1, perturbation="inplace", **kwargs)  # (the losses are given: no op reads the parameters)
    _assert_the_step_is_skipped(opt, [100.0, -100.0], (a, frozen, b), initial, atol=2e-3)  # (float16's ulp at 2)


def _assert_the_step_is_skipped(opt, losses, params, initial, atol=1e-6):
    """One step of ``opt`` on ``losses`` (cycled): skipped as non-finite, the parameters restored (to ``atol``: the
    in-place cycle's rounding), replay alike."""
    values = itertools.cycle(losses)
    with pytest.warns(RuntimeWarning, match=r"non-finite loss at .*projected gradient beyond float32 counts"):
        loss = opt.step(lambda: torch.tensor(next(values), dtype=torch.float64))
    assert math.isnan(loss.item()) and opt.nonfinite_steps == 1 and opt.trajectory[-1]["skipped"]
    for p, start in zip(params, initial):
        torch.testing.assert_close(p.detach(), start, atol=atol, rtol=0)
    replayed = [t.clone() for t in initial]
    zokern.replay(replayed, opt.trajectory)
    assert all(torch.equal(r, p.detach()) for r, p in zip(replayed, params))


@pytest.mark.parametrize(
    "build,exc,match",
    [
        (lambda ps: ZOSGD(ps, lr=-1.0), ValueError, "invalid lr"),
        (lambda ps: ZOSGD(ps, eps=0.0), ValueError, "invalid eps"),
        (lambda ps: ZOSGD([{"params": ps, "eps": -1e-3}]), ValueError, "param group 0: invalid eps"),
        (lambda ps: ZOSGD(ps, momentum=1.0), ValueError, "momentum"),
        (lambda ps: ZOSGD(ps, n_probes=0), ValueError, "n_probes"),
        (lambda ps: ZOSGD(ps, distribution="uniform"), ValueError, "distribution"),
        (lambda ps: ZOSGD(ps, nesterov=True), TypeError, "nesterov"),
        (lambda ps: ZOAdam(ps, betas=(0.9, 1.0)), ValueError, "betas"),
        # float32 holds it as zero: the update's sqrt(v) + adam_eps would divide 0 by 0 where g z is 0 (NaN).
        (lambda ps: ZOAdam(ps, adam_eps=1e-46), ValueError, r"invalid adam_eps: 1e-46 \(outside float32's normal"),
        (lambda ps: ZOAdam([{"params": ps, "adam_eps": 1e-40}]), ValueError, r"param group 0: invalid adam_eps"),
        (lambda ps: LDSD(ps, update="adam", adam_eps=1e-46), ValueError, r"invalid adam_eps: 1e-46"),
        (lambda ps: FZOO(ps, n_probes=1), ValueError, "n_probes"),
        (lambda ps: ZOConservative(ps, n_probes=2), ValueError, "n_probes"),
        (lambda ps: ZOSGD(ps, seed=-3), ValueError, "seed"),
        (lambda ps: ZOSGD(ps, backend="gpu"), ValueError, "unknown zokern backend 'gpu'"),
        (lambda ps: ZOSGD(ps, eps=1e-50), ValueError, r"invalid eps: 1e-50 \(below float32's smallest normal"),
        (lambda ps: ZOSGD(ps, lr=1e39), ValueError, r"invalid lr: 1e\+39 \(beyond float32's range"),
        # theta + eps z would overflow float32 (|z| up to 4.855), or the flip's -2 eps would be refused mid-step.
        (lambda ps: ZOSGD(ps, eps=1e38), ValueError, r"invalid eps: 1e\+38 \(a step moves theta by up to 2 x 4.855"),
        (lambda ps: ZOSGD(ps, eps=3.6e37), ValueError, r"eps must be below 3.504e\+37"),
        (lambda ps: LDSD(ps, eps=1.0, sigma=1e39), ValueError, r"invalid eps \* sigma: 1e\+39"),
        (lambda ps: LDSD(ps, eps=1e-3, sigma=1e41), ValueError, r"eps \* sigma: 1e\+38 \(a step moves theta by"),
        (
            lambda ps: ZOSGD([{"params": ps, "momentum": 0.9}]),
            ValueError,
            r"param group 0: momentum is an option of the whole optimizer",
        ),
        (lambda ps: LDSD([{"params": ps, "k": 3}]), ValueError, r"k is an option of the whole optimizer"),
        # Not this optimizer's at all: "pass it to the constructor" would send the user to a TypeError.
        (lambda ps: ZOSGD([{"params": ps, "nesterov": True}]), ValueError, r"0: nesterov is not an option of ZOSGD$"),
        (lambda ps: ZOSGD([{"params": ps, "k": 3}]), ValueError, r"k is not an option of ZOSGD$"),
        (lambda ps: ZOSGD([{"params": ps, "maximize": True}]), ValueError, r"maximize=True is not supported"),
        (
            lambda ps: ZOSGD([{"params": ps, "sigma": 0.5, "amsgrad": True}]),
            ValueError,
            r"param group 0: amsgrad, sigma are not options of ZOSGD's param groups",
        ),
        (lambda ps: LDSD([{"params": ps, "betas": (0.9, 0.99)}]), ValueError, r"betas is not an option of LDSD"),
        (lambda ps: FZOO([{"params": ps, "mu_lr": 0.1}]), ValueError, r"mu_lr is not an option of FZOO"),
        (lambda ps: ZOAdam([{"params": ps, "betas": 0.9}]), ValueError, r"param group 0: invalid betas: 0.9"),
        (
            lambda ps: ZOSGD([ps[0], torch.nn.Parameter(torch.ones(2)), ps[0]]),
            ValueError,
            r"params\[0\] and params\[2\]",
        ),
        (
            lambda ps: ZOSGD([*ps, torch.nn.Parameter(torch.ones(2, dtype=torch.float64))]),
            TypeError,
            r"params\[1\].*float64",
        ),
        (
            lambda ps: ZOSGD(ps, perturbation="exact").add_param_group(
                {"params": [torch.ones(2, dtype=torch.float64, requires_grad=True)]}
            ),
            TypeError,
            r"param group 1: params\[0\] has dtype torch.float64",
        ),
    ],
)
def test_bad_arguments_are_clear_errors(build, exc, match):
    with pytest.raises(exc, match=match):
        build([torch.nn.Parameter(torch.ones(3))])


def test_a_group_with_a_key_this_optimizer_understands_is_accepted():
    p = torch.nn.Parameter(torch.ones(3))
    ZOSGD([{"params": [p], "maximize": False, "foreach": None, "name": "bias"}])  # no-op torch keys, user labels
    ZOAdam([{"params": [p], "betas": (0.8, 0.99)}])
    LDSD([{"params": [p], "sigma": 0.5, "betas": (0.8, 0.99)}], update="adam")
    with pytest.warns(UserWarning, match="duplicate"), pytest.raises(ValueError, match="same parameter"):
        ZOSGD([torch.nn.Parameter(torch.ones(2))]).add_param_group({"params": [p, p]})


@pytest.mark.parametrize(
    "cls,kwargs,key,value,exc,match",
    [
        (ZOSGD, {}, "lr", -1e-3, ValueError, r"param group 1: invalid lr: -0.001"),
        (ZOSGD, dict(momentum=0.9), "lr", math.nan, ValueError, r"param group 1: lr must be finite"),
        (ZOAdam, {}, "eps", 0.0, ValueError, r"param group 1: invalid eps"),
        (ZOAdam, {}, "betas", (0.9, 1.5), ValueError, r"param group 1: invalid betas"),
        (FZOO, {}, "weight_decay", -0.1, ValueError, r"param group 1: invalid weight_decay"),
        (LDSD, {}, "sigma", -1.0, ValueError, r"param group 1: invalid sigma"),
        (LDSD, dict(update="adam"), "lr", torch.tensor(1e-3), TypeError, r"param group 1: lr must be a real number"),
        # Equal to the last valid value, but of a refused kind: checked again, not taken from the check's cache.
        (ZOAdam, dict(betas=(0.0, 0.9)), "betas", (False, 0.9), TypeError, r"betas must be a real number, got bool"),
        (ZOAdam, {}, "betas", (torch.tensor(0.9), 0.999), TypeError, r"betas must be a real number, got Tensor"),
        (ZOSGD, dict(weight_decay=0.0), "weight_decay", False, TypeError, r"weight_decay must be a real number"),
        # Keys the constructor refuses, set between steps (a momentum warm-up): refused, not trained without them.
        (ZOSGD, dict(momentum=0.9), "momentum", 0.5, ValueError, r"param group 1: momentum is an option of the whole"),
        (ZOSGD, {}, "maximize", True, ValueError, r"param group 1: maximize=True is not supported"),
        (ZOSGD, {}, "betas", (0.5, 0.9), ValueError, r"param group 1: betas is not an option of ZOSGD"),
        (ZOAdam, {}, "sigma", 10.0, ValueError, r"param group 1: sigma is not an option of ZOAdam"),
    ],
)
def test_a_step_checks_hyperparameters_changed_since_construction(cls, kwargs, key, value, exc, match):
    """A scheduler or the user may set what the constructor would refuse; the step refuses it before any pass, so
    the parameters, the step count and the optimizer's own state dict stay usable."""
    (a, frozen, b), groups, closure, _ = _problem()
    opt = cls(groups, seed=0, **kwargs)
    opt.step(closure)
    saved_at, before = opt.steps_taken, [p.detach().clone() for p in (a, frozen, b)]
    opt.param_groups[1][key] = value
    with pytest.raises(exc, match=match):
        opt.step(closure)
    assert opt.steps_taken == saved_at and all(torch.equal(p, q) for p, q in zip((a, frozen, b), before))
    if type(opt) is not LDSD:  # (which refuses perturbed() whatever its groups)
        if type(opt) is ZOSGD and not opt.momentum:  # the others refuse apply_projected_grad whatever their groups
            with pytest.raises(exc, match=match):
                opt.apply_projected_grad(opt.new_seed(), 1.0)
        with pytest.raises(exc, match=match):
            with opt.perturbed(opt.new_seed()):
                pass
        assert all(torch.equal(p, q) for p, q in zip((a, frozen, b), before))


def test_a_scheduler_run_past_its_end_is_refused_at_the_step():
    w = torch.nn.Parameter(torch.randn(4))
    start = w.detach().clone()
    opt = ZOSGD([w], lr=1e-2, seed=0)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 - s / 2)
    for _ in range(3):
        opt.step(lambda: (w**2).sum())
        schedule.step()
    with pytest.raises(ValueError, match=r"param group 0: invalid lr: -0.005"):
        opt.step(lambda: (w**2).sum())
    replayed = start.clone()
    zokern.replay([replayed], opt.trajectory)  # every step taken had a valid lr: the trajectory replays
    assert torch.equal(replayed, w.detach())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "cls,kwargs",
    [(ZOSGD, {}), (ZOSGD, dict(n_probes=2, one_sided=True)), (ZOConservative, {}), (FZOO, {}), (LDSD, dict(k=3))],
)
def test_every_evaluation_of_a_step_draws_the_same_random_numbers(cls, kwargs, dtype):
    """Dropout masks (and any draw in the closure) shared by L+ and L-: with different draws the difference, over
    eps, would swamp the estimate. The next step draws new ones."""
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Dropout(0.5), torch.nn.Linear(16, 1)).to(dtype)
    x = torch.randn(32, 6, dtype=dtype)
    opt = cls(model.parameters(), lr=1e-3, seed=0, **kwargs)
    draws: list[list[float]] = []

    def closure():
        draws[-1].append(torch.rand(()).item())
        return model(x).float().pow(2).mean()

    for _ in range(3):
        draws.append([])
        opt.step(closure)
    assert all(len(step) >= 2 and len(set(step)) == 1 for step in draws)
    assert len({step[0] for step in draws}) == 3


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_perturbed_blocks_of_one_seed_draw_the_same_random_numbers_as_a_step(dtype):
    """The lower-level recipe (perturbed(seed, +1), perturbed(seed, -1)) drew new dropout masks per block: its
    estimate was noise where step()'s was not. Its blocks now evaluate what the step evaluates."""
    x = torch.randn(32, 6, dtype=dtype)
    runs = []
    for lower_level in (False, True):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Dropout(0.5), torch.nn.Linear(16, 1)).to(dtype)
        opt = ZOSGD(model.parameters(), lr=0.0, eps=1e-2, seed=3)
        closure = lambda model=model: model(x).float().pow(2).mean()  # noqa: E731
        losses = []
        for _ in range(3):
            if lower_level:
                seed = opt.new_seed()
                with opt.perturbed(seed, +1):
                    losses.append(closure().item())
                with opt.perturbed(seed, -1):
                    losses.append(closure().item())
            else:
                opt.step(closure)
                losses += opt.trajectory[-1]["losses"]
        runs.append(losses)
    # (in place, the step reaches theta - eps z from theta + eps z: a float32 rounding apart)
    assert runs[1] == (runs[0] if dtype == torch.bfloat16 else pytest.approx(runs[0], rel=1e-6))
    assert len(set(runs[0][0::2])) == 3  # each seed's blocks draw anew


def test_perturbed_blocks_share_draws_per_seed_and_leave_draws_outside_them_alone():
    """Interleaved seeds (A+, B+, A-, B-) share each seed's draws; a later block leaves the generators as it found
    them, so what the loop draws between blocks is not drawn again; a new seed forgets the old seeds' draws."""
    opt = ZOSGD([torch.nn.Parameter(torch.randn(4))], lr=0.0, eps=1e-2, seed=0)
    seed_a, seed_b = opt.new_seed(), 12345
    drawn = {}
    for seed, sign in ((seed_a, 1), (seed_b, 1), (seed_a, -1), (seed_b, -1)):
        with opt.perturbed(seed, sign):
            drawn[seed, sign] = torch.rand(3)
    assert torch.equal(drawn[seed_a, 1], drawn[seed_a, -1]) and torch.equal(drawn[seed_b, 1], drawn[seed_b, -1])
    assert not torch.equal(drawn[seed_a, 1], drawn[seed_b, 1])
    batches = []
    for _ in range(3):  # a loop that samples its batch between the estimate's blocks
        seed = opt.new_seed()
        batches.append(torch.randint(0, 10**6, (4,)))
        with opt.perturbed(seed, 1):
            plus = torch.rand(3)
        with opt.perturbed(seed, -1):
            assert torch.equal(torch.rand(3), plus)
    assert len({tuple(b.tolist()) for b in batches}) == 3
    with opt.perturbed(seed_a, 1):  # drawn anew: seed_a's first draws were forgotten when new seeds came
        assert not torch.equal(torch.rand(3), drawn[seed_a, 1])
    probes = [opt.new_seed() + k for k in range(12)]  # many seeds' L+ blocks, then their L- blocks
    first = {}
    for sign in (1, -1):
        for seed in probes:
            with opt.perturbed(seed, sign):
                draw = torch.rand(3)
            assert torch.equal(first.setdefault(seed, draw), draw)


def test_dropout_in_train_mode_leaves_the_estimate_as_in_eval_mode():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Dropout(0.1), torch.nn.Linear(64, 1))
    x = torch.randn(256, 32)
    y = x[:, :1].clone()
    median = {}
    for train in (True, False):
        model.train(train)
        opt = ZOSGD(model.parameters(), lr=0.0, eps=1e-6, seed=0)
        for _ in range(21):
            opt.step(lambda: torch.nn.functional.mse_loss(model(x), y))
        median[train] = statistics.median(abs(r["projected_grad"][0]) for r in opt.trajectory)
    # Masks drawn afresh per forward made the train-mode estimate about 7000 times larger.
    assert median[True] < 3 * median[False]


def test_a_closure_that_calls_backward_in_exact_mode_is_told_why_it_fails():
    model = torch.nn.Linear(4, 1).bfloat16()
    before = model.weight.detach().clone()
    opt = ZOSGD(model.parameters(), lr=1e-3, seed=0)

    def closure():
        with torch.enable_grad():
            loss = model(torch.ones(2, 4, dtype=torch.bfloat16)).float().sum()
            loss.backward()
        return loss

    with pytest.raises(RuntimeError, match=r"exact mode .* without calling backward\(\)"):
        opt.step(closure)
    assert torch.equal(model.weight, before)


def test_parameters_the_passes_cannot_update_are_rejected_before_any_pass():
    """Checked at construction and again at each step (a model can change after it): a step that would fail
    partway, after updating the param groups before the bad parameter, never starts, and draws no seed."""
    with pytest.raises(ValueError, match=r"param group 1: params\[0\] \(shape \(4, 3\).*not contiguous"):
        ZOSGD(
            [{"params": [torch.nn.Parameter(torch.rand(3, 4))]}, {"params": [torch.nn.Parameter(torch.rand(3, 4).t())]}]
        )
    frozen_view = torch.nn.Parameter(torch.rand(3, 4).t(), requires_grad=False)
    ZOSGD([torch.nn.Parameter(torch.rand(3)), frozen_view])  # frozen: never written, so accepted

    good = torch.nn.Parameter(torch.rand(3, 4))
    later = torch.nn.Parameter(torch.rand(3, 4))
    opt = ZOSGD([{"params": [good]}, {"params": [later]}], lr=0.1, seed=0)
    before = [good.detach().clone(), later.detach().clone()]
    with torch.no_grad():
        later.data = later.data.t().contiguous().t()  # same values, column-major: as a channels_last conversion does
    with pytest.raises(ValueError, match=r"param_groups\[1\]\['params'\]\[0\].*not contiguous"):
        opt.step(lambda: (good.sum() + later.sum()) ** 2)
    with torch.no_grad():
        later.data = later.data.double()
    with pytest.raises(TypeError, match=r"param_groups\[1\]\['params'\]\[0\] has dtype torch.float64"):
        opt.step(lambda: (good.sum() + later.sum()) ** 2)
    assert opt.steps_taken == 0 and not opt.trajectory
    assert torch.equal(good, before[0]) and torch.equal(later.float(), before[1])


def test_a_step_validates_its_parameters_once_for_all_of_its_passes(monkeypatch):
    from zokern import ops

    (a, _, b), groups, closure, _ = _problem()
    opt = ZOSGD(groups, seed=0)
    checks = []
    check = ops._check_tensors
    monkeypatch.setattr(ops, "_check_tensors", lambda *args, **kwargs: checks.append(1) or check(*args, **kwargs))
    passes = []
    run_pass = ops._run_pass
    monkeypatch.setattr(ops, "_run_pass", lambda *args, **kwargs: passes.append(1) or run_pass(*args, **kwargs))
    opt.step(closure)
    assert len(passes) == 6 and len(checks) == 2  # three passes per param group, one validation per group

    # The next step validates again: a parameter given new storage in between is the one it updates.
    with torch.no_grad():
        a.data = a.data.clone()
    before = a.detach().clone()
    opt.step(closure)
    assert not torch.equal(a, before)


class _PackedLinear(torch.nn.Module):
    """A QLoRA-style layer: frozen 4-bit weights packed two per uint8 byte with a frozen scale, and a trainable
    low-rank adapter. ``model.parameters()`` hands the optimizer all four."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(3)
        self.packed = torch.nn.Parameter(torch.randint(0, 256, (8, 4), dtype=torch.uint8, generator=g), False)
        self.scale = torch.nn.Parameter(torch.tensor(0.05), requires_grad=False)
        self.lora_a = torch.nn.Parameter(torch.randn(8, 2, generator=g) * 0.3)
        self.lora_b = torch.nn.Parameter(torch.randn(2, 8, generator=g) * 0.3)

    def forward(self, x):
        w = torch.stack([self.packed & 15, self.packed >> 4], -1).reshape(8, 8).float() - 7.5
        return x @ (w * self.scale + self.lora_a @ self.lora_b)


@pytest.mark.parametrize("cls", [ZOSGD, ZOAdam, ZOSignSGD, FZOO, ZOConservative, LDSD])
def test_frozen_parameters_of_any_dtype_are_accepted_and_left_alone(cls):
    model = _PackedLinear()
    x = torch.randn(16, 8, generator=torch.Generator().manual_seed(4))
    initial = [p.detach().clone() for p in model.parameters()]

    def closure():
        return model(x).pow(2).mean()

    opt = cls(model.parameters(), lr=1e-2, eps=1e-3, seed=5)
    for _ in range(4):
        opt.step(closure)
    assert torch.equal(model.packed, initial[0]) and torch.equal(model.scale, initial[1])
    assert not torch.equal(model.lora_a, initial[2])
    resumed = cls(_PackedLinear().parameters(), lr=1e-2, eps=1e-3)
    resumed.load_state_dict(opt.state_dict())
    replayed = [t.clone() for t in initial]
    zokern.replay(replayed, opt.trajectory)
    assert all(torch.equal(r, p.detach()) for r, p in zip(replayed, model.parameters()))
    model.scale.data = model.scale.data.double()  # frozen: still fine
    opt.step(closure)
    model.scale.requires_grad_(True)  # trainable in a dtype the passes cannot write: refused before the step
    with pytest.raises(TypeError, match=r"param_groups\[0\]\['params'\]\[1\] has dtype torch.float64"):
        opt.step(closure)


@pytest.mark.parametrize(
    "cls,kwargs",
    [
        (ZOSGD, dict(momentum=0.5)),
        (ZOSGD, dict(merge_steps=True, perturbation="inplace")),
        (ZOSGD, dict(n_probes=2)),
        (ZOSignSGD, {}),
        (ZOConservative, {}),
        (ZOAdam, {}),
        (FZOO, dict(n_probes=3)),
        (LDSD, dict(k=3)),
        (LDSD, dict(k=2, update="adam")),
    ],
    ids=lambda x: x.__name__ if isinstance(x, type) else ",".join(f"{k}={v}" for k, v in x.items()),
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_a_step_whose_closure_raised_replays(cls, kwargs, dtype):
    """A loop that catches a failed step and goes on: the step is recorded as raised, and the trajectory replays bit
    for bit, the failed step's passes included (in place, taking a perturbation back rounds)."""
    params, groups, closure, _ = _problem(dtype)
    initial = [p.detach().clone() for p in params]
    opt = cls(groups, seed=4, **kwargs)
    calls = [0]

    def flaky():
        calls[0] += 1
        if calls[0] == 6:  # an evaluation after the first, in the second or third step
            raise RuntimeError("a bad batch")
        return closure()

    for _ in range(5):
        before = [p.detach().clone() for p in params]
        try:
            opt.step(flaky)
        except RuntimeError:
            if opt.merge_steps:  # before held the lookahead, which the failed step took back with its own
                continue
            for a, b in zip(params, before):  # exact mode never wrote: bit for bit; in place, within rounding
                torch.testing.assert_close(a.detach(), b, atol=0 if opt.exact() else 1e-6, rtol=0)
    assert opt.steps_taken == len(opt.trajectory) == 5
    raised = [r for r in opt.trajectory if r.get("raised")]
    assert len(raised) == 1 and len(raised[0]["losses"]) >= 1 and opt.nonfinite_steps == 0
    replayed = [t.clone() for t in initial]
    again = zokern.replay(replayed, json.loads(json.dumps(opt.trajectory)))
    opt.materialize()
    assert all(torch.equal(r, p.detach()) for r, p in zip(replayed, params))
    assert again.steps_taken == 5


@pytest.mark.parametrize("cls,kwargs", [(ZOSGD, {}), (ZOSGD, dict(momentum=0.9)), (ZOAdam, {})])
def test_a_trajectory_whose_losses_were_written_as_integers_replays(cls, kwargs):
    # JSON writers other than Python's (JavaScript's) write 3.0 as 3: momentum and Adam replays wrote the first
    # steps, then failed on an int (AttributeError).
    params, groups, closure, _ = _problem()
    initial = [p.detach().clone() for p in params]
    opt = cls(groups, seed=4, **kwargs)
    for _ in range(3):
        opt.step(lambda: float(round(closure().item() * 1e4)))
    with pytest.warns(RuntimeWarning, match="non-finite loss"):
        opt.step(lambda: 10**400)  # beyond float64: a non-finite loss, the step skipped
    opt.step(lambda: float(round(closure().item() * 1e4)))
    trajectory = json.loads(json.dumps(opt.trajectory))
    for record in trajectory:
        record["losses"] = [int(v) if math.isfinite(v) else 10**400 for v in record["losses"]]
    replayed = [t.clone() for t in initial]
    zokern.replay(replayed, trajectory)
    assert all(torch.equal(r, p.detach()) for r, p in zip(replayed, params))
    assert not torch.equal(replayed[0], initial[0])


def test_schedulers_cycle_the_momentum_an_optimizer_uses():
    from torch.optim.lr_scheduler import OneCycleLR

    def run(cls, cycle, **kwargs):
        (a, _, b), groups, closure, _ = _problem()
        opt = cls(groups, lr=1e-3, seed=1, **kwargs)
        scheduler = OneCycleLR(opt, max_lr=1e-2, total_steps=10, cycle_momentum=cycle, base_momentum=0.5)
        for _ in range(4):
            opt.step(closure)
            scheduler.step()
        return a.detach().clone()

    for cls, kwargs in ((LDSD, dict(k=2, update="adam")), (ZOAdam, {})):  # betas[0], per group: cycled and used
        assert not torch.equal(run(cls, True, **kwargs), run(cls, False, **kwargs))
    for cls, kwargs in ((LDSD, dict(k=2, momentum=0.9)), (ZOSGD, dict(momentum=0.9))):  # whole-run: not cycled
        with pytest.raises(ValueError, match="momentum"):
            run(cls, True, **kwargs)
        run(cls, False, **kwargs)
    with pytest.raises(ValueError, match="betas and adam_eps are for update='adam'"):
        LDSD([torch.nn.Parameter(torch.rand(3))], betas=(0.5, 0.9))


def test_a_rejected_param_group_is_not_kept():
    a, b = torch.nn.Parameter(torch.rand(3)), torch.nn.Parameter(torch.rand(2))
    opt = ZOAdam([a], lr=0.1, seed=0)
    with pytest.raises(ValueError, match=r"param group 1: invalid betas"):
        opt.add_param_group({"params": [b], "betas": (0.9, 1.5)})
    assert len(opt.param_groups) == 1
    opt.add_param_group({"params": [b]})  # b may join once the group is right
    assert opt.param_groups[1]["betas"] == (0.9, 0.999)


def test_a_backend_unavailable_here_is_refused_at_construction():
    unavailable = [name for name, status in zokern.backend_status().items() if status != "available"]
    for name in unavailable:  # on this machine; a CUDA machine without triton still has one
        with pytest.raises(RuntimeError, match=f"backend '{name}' is unavailable"):
            ZOSGD([torch.nn.Parameter(torch.ones(3))], backend=name)


def test_bad_closures_are_clear_errors_and_restore():
    p = torch.nn.Parameter(torch.linspace(-1, 1, 10))
    before = p.detach().clone()
    opt = ZOSGD([p], seed=0)
    with pytest.raises(TypeError, match="needs a closure"):
        opt.step()
    with pytest.raises(ValueError, match="scalar loss"):
        opt.step(lambda: p * 2)
    with pytest.raises(ValueError, match="scalar loss"):
        opt.step(lambda: "high")
    with pytest.raises(ValueError, match="real loss, got a tensor of dtype torch.complex64"):
        opt.step(lambda: (p**2).sum() * (1 + 2j))
    with pytest.raises(ValueError, match="real loss, got a tensor of dtype torch.bool"):
        opt.step(lambda: (p**2).sum() > 1)
    with pytest.raises(ValueError, match="a loss on the meta device, which holds no value"):
        opt.step(lambda: torch.ones((), device="meta"))
    torch.testing.assert_close(p.detach(), before, atol=1e-7, rtol=0)
    # A number beyond float64 (an int, not a float's inf) is a non-finite loss: the step skipped, not an OverflowError.
    with pytest.warns(RuntimeWarning, match="non-finite loss"):
        assert math.isnan(opt.step(lambda: 10**400).item())
    assert opt.nonfinite_steps == 1
    torch.testing.assert_close(p.detach(), before, atol=2e-7, rtol=0)  # (float32 in place: to its rounding)


def test_lower_level_pieces_compose_into_a_step():
    (a, frozen, b), groups, closure, _ = _problem()
    manual = ZOSGD([{"params": [a, frozen, b]}], lr=1e-3, eps=1e-3, weight_decay=0.1, seed=4)
    seed = manual.new_seed()
    with manual.perturbed(seed, +1):
        plus = closure().item()
    with manual.perturbed(seed, -1):
        minus = closure().item()
    manual.apply_projected_grad(seed, (plus - minus) / 2e-3)

    (a2, frozen2, b2), _, closure2, _ = _problem()
    fused = ZOSGD([{"params": [a2, frozen2, b2]}], lr=1e-3, eps=1e-3, weight_decay=0.1, seed=4)
    fused.step(closure2)
    assert fused.trajectory[0]["losses"] == pytest.approx([plus, minus], rel=1e-6)
    torch.testing.assert_close(a.detach(), a2.detach(), atol=1e-6, rtol=0)
    torch.testing.assert_close(b.detach(), b2.detach(), atol=1e-6, rtol=0)
    assert not torch.equal(a.detach(), _problem()[0][0].detach())  # it did move

    (a3, frozen3, b3), _, closure3, _ = _problem()  # the loss tensors themselves, as docs/optim.md writes it
    with_tensors = ZOSGD([{"params": [a3, frozen3, b3]}], lr=1e-3, eps=1e-3, weight_decay=0.1, seed=4)
    seed = with_tensors.new_seed()
    with with_tensors.perturbed(seed, +1):
        plus = closure3()
    with with_tensors.perturbed(seed, -1):
        minus = closure3()
    with_tensors.apply_projected_grad(seed, (plus - minus) / 2e-3)
    torch.testing.assert_close(a3.detach(), a.detach(), atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match=r"floating tensor of 1 or 1 elements, got shape \(2,\)"):
        with_tensors.apply_projected_grad(seed, torch.ones(2))


@pytest.mark.parametrize("given_as", ["floats", "a tensor"])
def test_a_projected_gradient_whose_update_float32_cannot_hold_is_refused_or_not_applied(given_as):
    # The second group's g: lr g z is beyond float32. Numbers are refused, naming it, before the first group is
    # written (it was updated, then the pass of the second refused); a tensor, read on the device, leaves that
    # group as it is, as a non-finite g does.
    (a, frozen, b), groups, _, _ = _problem()
    opt = ZOSGD(groups, seed=4)
    before = [p.detach().clone() for p in (a, b)]
    grads = [0.5, 1e37]  # (1e37 alone is within float32, as is 1e37 * 4.9 * 2e-3, the group's lr)
    opt.param_groups[1]["lr"] = 10.0
    if given_as == "floats":
        with pytest.raises(ValueError, match=r"projected_grad\[1\] is 1e\+37: param group 1's update, .*lr = 10"):
            opt.apply_projected_grad(opt.new_seed(), grads)
        assert torch.equal(a, before[0])
    else:
        opt.apply_projected_grad(opt.new_seed(), torch.tensor(grads))
        assert not torch.equal(a, before[0])
    assert torch.equal(b, before[1])
    one = torch.nn.Parameter(torch.randn(6))
    start = one.detach().clone()
    with pytest.raises(ValueError, match=r"projected_grad is 3e\+38: param group 0's update"):
        ZOSGD([one], lr=0.1).apply_projected_grad(1, 3e38)  # finite in float32: it wrote inf
    assert torch.equal(one, start)


def test_a_projected_gradient_whose_update_a_float16_parameter_cannot_hold_is_refused_or_not_applied():
    # lr g z with g = 1e4 at lr 1 reaches 4.9e4: float32 holds it, but it brings a float16 weight to inf (or close
    # enough that the next step does); it was written silently. A float32 parameter takes it.
    half = torch.nn.Parameter(torch.randn(6).half())
    full = torch.nn.Parameter(torch.randn(6))
    opt = ZOSGD([{"params": [full]}, {"params": [half]}], lr=1.0)
    start = [p.detach().clone() for p in (full, half)]
    with pytest.raises(ValueError, match=r"projected_grad\[1\] is 10000: .*beyond half of float16's range"):
        opt.apply_projected_grad(opt.new_seed(), [1e4, 1e4])
    assert torch.equal(full, start[0]) and torch.equal(half, start[1])
    opt.apply_projected_grad(opt.new_seed(), torch.tensor([1e4, 1e4]))  # read on the device: that group is left
    assert torch.equal(half, start[1]) and not torch.equal(full, start[0])
    opt.apply_projected_grad(opt.new_seed(), [1e4, 1.0])
    assert torch.isfinite(half).all() and not torch.equal(half, start[1])


@pytest.mark.parametrize("given_as", ["floats", "a tensor", "tensors"])
def test_lower_level_pieces_with_each_groups_eps_compose_into_a_step(given_as):
    """Each group perturbs by its own eps, so its g is (L+ - L-) / (2 eps) with that eps: given one per group, the
    pieces make the step's update; one g for groups of different eps is refused (it would scale one group's update
    by the ratio of the eps)."""
    (a, frozen, b), groups, closure, _ = _problem()  # the groups' eps: 1e-3 and 3e-3
    manual = ZOSGD(groups, weight_decay=0.1, seed=4)
    seed = manual.new_seed()
    with manual.perturbed(seed, +1):
        plus = closure()
    with manual.perturbed(seed, -1):
        minus = closure()
    before = [p.detach().clone() for p in (a, b)]
    with pytest.raises(ValueError, match="eps differ"):
        manual.apply_projected_grad(seed, (plus - minus) / 2e-3)
    assert all(torch.equal(p, q) for p, q in zip((a, b), before))
    grads = [(plus - minus) / (2 * group["eps"]) for group in manual.param_groups]
    given = {"floats": [g.item() for g in grads], "a tensor": torch.stack(grads), "tensors": grads}[given_as]
    manual.apply_projected_grad(seed, given)  # "tensors": as docs/optim.md writes it, with f() returning tensors

    (a2, frozen2, b2), groups2, closure2, _ = _problem()
    fused = ZOSGD(groups2, weight_decay=0.1, seed=4)
    fused.step(closure2)
    torch.testing.assert_close(a.detach(), a2.detach(), atol=1e-6, rtol=0)
    torch.testing.assert_close(b.detach(), b2.detach(), atol=1e-6, rtol=0)
    assert not torch.equal(b.detach(), before[1])


@pytest.mark.parametrize(
    "cls,kwargs,rule",
    [(ZOSGD, dict(momentum=0.9), "momentum"), (ZOAdam, {}, "Adam"), (ZOSignSGD, {}, "its sign")]
    + [(ZOConservative, {}, "the conservative choice"), (FZOO, {}, "its probes' losses over their spread")]
    + [(LDSD, dict(k=2), "its learned directions")],
)
def test_apply_projected_grad_is_refused_where_the_step_updates_by_another_rule(cls, kwargs, rule):
    """It applies ZO-SGD's update; these optimizers' steps do not (Adam once moved every weight by g z / ~1e3)."""
    (a, frozen, b), groups, closure, _ = _problem()
    opt = cls([a, b], seed=0, **kwargs)
    before = [p.detach().clone() for p in (a, b)]
    with pytest.raises(NotImplementedError, match=f"this {cls.__name__} updates by {rule}"):
        opt.apply_projected_grad(opt.new_seed(), 0.5)
    assert all(torch.equal(p, q) for p, q in zip((a, b), before)) and not opt.state


def test_the_exact_mode_under_torch_compile_sees_the_perturbation_of_each_evaluation():
    # Dynamo traced into the perturbed view and baked one evaluation's perturbation into the graph; the view now runs
    # eagerly, op by op, so a compiled model's losses equal the eager ones.
    x = torch.randn(8, 16, generator=torch.Generator().manual_seed(0))

    def losses(compiled: bool) -> list:
        torch.manual_seed(0)
        layer = torch.nn.Linear(16, 4).bfloat16()
        forward = torch.compile(layer, backend="eager") if compiled else layer
        opt = ZOSGD(layer.parameters(), lr=0.0, eps=0.5, seed=0)
        assert opt.exact()
        for _ in range(3):
            opt.step(lambda: forward(x.bfloat16()).float().square().mean())
        return [r["losses"] for r in opt.trajectory]

    torch._dynamo.reset()
    assert losses(compiled=True) == losses(compiled=False)


@pytest.mark.parametrize(
    "dtype,kwargs,match",
    [(torch.bfloat16, {}, "the exact mode .* or use perturbation='inplace'"),
     (torch.float32, dict(merge_steps=True), "merge_steps sees")],
)  # fmt: skip
def test_a_fullgraph_compile_that_cannot_trace_zokern_is_told_which_option_needs_the_break(dtype, kwargs, match):
    """torch's own error named torch.compiler.disable and neither zokern nor the option that needs it."""
    torch._dynamo.reset()
    layer = torch.nn.Linear(16, 4).to(dtype)
    before = [p.detach().clone() for p in layer.parameters()]
    forward = torch.compile(layer, backend="eager", fullgraph=True)
    opt = ZOSGD(layer.parameters(), lr=1e-2, eps=1e-2, seed=0, **kwargs)
    with pytest.raises(RuntimeError, match="zokern: torch.compile\\(fullgraph=True\\).* cannot trace .*" + match):
        opt.step(lambda: forward(torch.ones(2, 16, dtype=dtype)).float().square().mean())
    for p, b in zip(layer.parameters(), before):  # restored (in place: to a float32 rounding)
        torch.testing.assert_close(p.detach(), b, atol=1e-6, rtol=0)


def test_a_fullgraph_compile_inside_perturbed_is_told_so_too():
    torch._dynamo.reset()
    layer = torch.nn.Linear(16, 4).to(torch.bfloat16)
    before = [p.detach().clone() for p in layer.parameters()]
    forward = torch.compile(layer, backend="eager", fullgraph=True)
    opt = ZOSGD(layer.parameters(), lr=1e-2, eps=1e-2, seed=0)
    with pytest.raises(RuntimeError, match="zokern: torch.compile\\(fullgraph=True\\).* cannot trace .*the exact mode"):
        with opt.perturbed(opt.new_seed(), +1):
            forward(torch.ones(2, 16, dtype=torch.bfloat16))
    assert all(torch.equal(p, b) for p, b in zip(layer.parameters(), before))


def test_an_op_that_compiles_itself_is_told_so_too():
    # torch.cond traces its branches with fullgraph itself: torch's UncapturedHigherOrderOpError came through raw.
    torch._dynamo.reset()
    a, b = torch.nn.Linear(8, 8).bfloat16(), torch.nn.Linear(8, 8).bfloat16()
    before = [p.detach().clone() for p in [*a.parameters(), *b.parameters()]]
    opt = ZOSGD([*a.parameters(), *b.parameters()], lr=1e-2, eps=1e-2, seed=0)
    x = torch.ones(2, 8, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="or an op that compiles itself so .*torch.cond.* the exact mode"):
        opt.step(lambda: torch.cond(x.sum() > 0, lambda t: a(t), lambda t: b(t), (x,)).float().square().mean())
    assert all(torch.equal(p, q) for p, q in zip([*a.parameters(), *b.parameters()], before))


def test_inductor_freezing_is_warned_about_where_compiled_code_reads_the_parameters(monkeypatch):
    """Freezing folds the weights a compiled forward first saw into its code (every ZO evaluation runs without
    autograd): later evaluations read stale weights, and the run trained on a wrong estimate, silently."""
    import torch._inductor.config

    monkeypatch.setattr(torch._inductor.config, "freezing", True)
    for dtype, warned in ((torch.float32, True), (torch.bfloat16, False)):  # the exact mode runs eagerly
        layer = torch.nn.Linear(4, 1).to(dtype)
        opt = ZOSGD(layer.parameters(), lr=1e-2, seed=0)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            opt.step(lambda layer=layer: layer(torch.ones(4, dtype=layer.weight.dtype)).float().sum())
        assert any("freezing is set" in str(w.message) for w in caught) == warned


@pytest.mark.parametrize(
    "kwargs,dtype",
    [({}, torch.float32), (dict(merge_steps=True), torch.float32), (dict(momentum=0.9), torch.float32),
     ({}, torch.bfloat16)],
)  # fmt: skip
def test_a_step_inside_parametrize_cached_evaluates_each_point_afresh(kwargs, dtype):
    """torch.nn.utils.parametrize.cached() keeps a parametrized weight until its block exits (torch's idiom around one
    optimisation step): L- and every later evaluation read the weight computed at theta + eps z, so the in-place mode
    trained on a wrong estimate and the exact mode refused. Inside the block, the run is the one without it."""
    from torch.nn.utils import parametrize

    class Symmetric(torch.nn.Module):
        def forward(self, w):
            return w.triu() + w.triu(1).transpose(0, 1)

    x, y = torch.randn(32, 16, dtype=dtype), torch.randn(32, 1)

    def run(cached: bool) -> tuple[list, list]:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1)).to(dtype)
        parametrize.register_parametrization(model[0], "weight", Symmetric())
        opt = ZOSGD(model.parameters(), lr=1e-2, eps=1e-2, seed=1, **kwargs)

        def closure():
            return torch.nn.functional.mse_loss(model(x).float(), y)

        for _ in range(3):
            with parametrize.cached() if cached else contextlib.nullcontext():
                opt.step(closure)
                after = closure()  # a forward after the step, in the same block, sees the update
        seed = opt.new_seed()
        with parametrize.cached() if cached else contextlib.nullcontext():
            with opt.perturbed(seed, +1):
                plus = closure()
            with opt.perturbed(seed, -1):
                minus = closure()
        opt.materialize()
        return [r["losses"] for r in opt.trajectory] + [[after.item(), plus.item(), minus.item()]], [
            p.detach().clone() for p in model.parameters()
        ]

    plain, cached = run(False), run(True)
    assert all(len(set(losses)) > 1 for losses in plain[0])
    assert cached[0] == plain[0]
    assert all(torch.equal(a, b) for a, b in zip(cached[1], plain[1]))


@pytest.mark.parametrize("kwargs", [{}, dict(merge_steps=True), dict(momentum=0.9)])
def test_a_step_inside_an_autocast_region_evaluates_each_point_afresh(kwargs):
    """Autocast keeps its bf16 copies of float32 parameters until its outermost region exits: a loop wrapped in one
    evaluated every point of a step with the first evaluation's copies (L+ = L-, g = 0, no training). Stepped inside
    the region, the run is the one with autocast inside the closure; a forward after the step sees the update."""
    x, y = torch.randn(64, 16), torch.randn(64, 1)

    def run(region_outside: bool) -> tuple[list, torch.Tensor]:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1))
        opt = ZOSGD(model.parameters(), lr=1e-2, eps=1e-2, seed=1, **kwargs)

        def closure():
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return torch.nn.functional.mse_loss(model(x).float(), y)

        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=region_outside):
            for _ in range(5):
                opt.step(closure)
            seed = opt.new_seed()
            with opt.perturbed(seed, +1):
                plus = closure()
            with opt.perturbed(seed, -1):
                minus = closure()
            if not kwargs:  # the update apply_projected_grad applies (ZO-SGD's) is seen by what follows too
                closure()  # at theta: autocast's copies of it, which the update makes stale
                opt.apply_projected_grad(seed, (plus - minus) / 2e-2)
            after = closure()  # in the region the steps ran in
        return [r["losses"] for r in opt.trajectory] + [[plus.item(), minus.item()]], after, closure()

    inside, outside = run(False), run(True)
    assert all(len(set(losses)) == 2 for losses in inside[0])
    assert inside[0] == outside[0]
    assert torch.equal(outside[1], outside[2])  # as a new region computes it
