"""zokern.preference: the losses against explicit references, and ZOPrO's direction against its float64 formula."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import DEVICE
from helpers import backends_for
from helpers import tiny_opt

from zokern import ops
from zokern.preference import ZOPrODirection
from zokern.preference import bradley_terry_loss
from zokern.preference import dpo_loss
from zokern.preference import kl_penalised_rewards
from zokern.preference import ppo_clip_loss
from zokern.preference import response_logprobs
from zokern.preference import rloo_advantages

G = torch.Generator().manual_seed(0)


def _randn(*shape):
    return torch.randn(*shape, generator=G, dtype=torch.float64)


# ---------------------------------------------------------------------------------------------------- losses


def test_rloo_advantages_leave_one_out():
    rewards = _randn(5, 4)
    got = rloo_advantages(rewards)
    for p in range(5):
        for i in range(4):
            others = [rewards[p, j] for j in range(4) if j != i]
            assert got[p, i].item() == pytest.approx((rewards[p, i] - sum(others) / 3).item(), abs=1e-12)
    assert torch.allclose(got.sum(dim=1), torch.zeros(5, dtype=torch.float64), atol=1e-12)  # k R_i - S, summed


@pytest.mark.parametrize(
    "rewards,match",
    [(torch.ones(4), r"\[prompts, k\]"), (torch.ones(3, 1), "k >= 2"), (torch.tensor([[1.0, math.nan]]), "non-finite")],
)
def test_rloo_rejects_bad_rewards(rewards, match):
    with pytest.raises(ValueError, match=match):
        rloo_advantages(rewards)


def test_kl_penalised_rewards():
    scores, logp, ref = _randn(6), _randn(6, 5), _randn(6, 5)
    mask = (torch.rand(6, 5, generator=G) > 0.3).double()
    got = kl_penalised_rewards(scores, logp, ref, mask, beta=0.05)
    expected = scores - 0.05 * ((logp - ref) * mask).sum(-1)
    assert torch.allclose(got.double(), expected, atol=1e-6)
    with pytest.raises(ValueError, match="scores has 1 non-finite"):
        kl_penalised_rewards(torch.tensor([1.0, math.inf]), logp[:2], ref[:2], mask[:2], 0.1)


def test_ppo_clip_loss_matches_its_definition_with_and_without_clipping():
    logp_old = _randn(8, 4) * 0.1 - 2
    advantages = _randn(8)
    for shift in (1e-3, 0.5):  # a ratio inside the clip range, and one far outside it
        logp_new = logp_old + shift * _randn(8, 4)
        ratio = torch.exp(logp_new.sum(-1) - logp_old.sum(-1))
        terms = [max(-a * r, -a * min(max(r, 0.8), 1.2)) for a, r in zip(advantages.tolist(), ratio.tolist())]
        got = ppo_clip_loss(logp_new, logp_old, advantages, clip=0.2).item()
        assert got == pytest.approx(sum(terms) / len(terms), rel=1e-5)


def test_dpo_and_bradley_terry_losses():
    pc, pr, rc, rr = (_randn(7) for _ in range(4))
    expected = sum(-math.log(1 / (1 + math.exp(-0.1 * ((a - c) - (b - d))))) for a, b, c, d in zip(pc, pr, rc, rr))
    assert dpo_loss(pc, pr, rc, rr, beta=0.1).item() == pytest.approx(float(expected) / 7, rel=1e-5)
    assert bradley_terry_loss(pc, pr).item() == pytest.approx(-F.logsigmoid(pc - pr).mean().item(), rel=1e-5)
    # At equal log-ratios DPO is log 2, whatever beta.
    assert dpo_loss(pc, pc, rc, rc, beta=3.0).item() == pytest.approx(math.log(2), rel=1e-6)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_bradley_terry_loss_refuses_non_finite_scores(bad):
    """An infinite margin would read as a perfect loss, a NaN would corrupt the reward model's first-order step."""
    with pytest.raises(ValueError, match=r"reward_chosen has 1 non-finite value"):
        bradley_terry_loss(torch.tensor([0.5, bad]), torch.tensor([0.1, 0.2]))


def test_response_logprobs_computes_logits_only_for_the_response():
    pytest.importorskip("transformers")
    model = tiny_opt().eval()
    prompt_len, response_len = 6, 5
    sequences = torch.randint(1, 64, (3, prompt_len + response_len), generator=G)
    attention = torch.ones_like(sequences)
    attention[0, :2] = 0  # a left-padded prompt
    sequences[0, :2] = 1
    response_mask = torch.ones(3, response_len)
    response_mask[1, 3:] = 0  # a response that ended early
    seen = []
    hook = model.lm_head.register_forward_hook(lambda m, i, o: seen.append(i[0].shape[1]))
    with torch.no_grad():
        got = response_logprobs(model, sequences, attention, response_len, response_mask)
        full = model(input_ids=sequences, attention_mask=attention).logits.float()
    hook.remove()
    assert seen[0] == response_len + 1  # the prompt's positions never reach the vocabulary projection
    expected = torch.log_softmax(full[:, prompt_len - 1 : -1], -1).gather(-1, sequences[:, prompt_len:, None])[..., 0]
    assert torch.allclose(got, expected * response_mask, atol=1e-5)
    assert got.dtype == torch.float32
    with torch.no_grad():  # at a sampling temperature: the tempered policy's log-probabilities
        hot = response_logprobs(model, sequences, attention, response_len, response_mask, temperature=0.5)
    tempered = torch.log_softmax(full[:, prompt_len - 1 : -1] / 0.5, -1).gather(-1, sequences[:, prompt_len:, None])
    assert torch.allclose(hot, tempered[..., 0] * response_mask, atol=1e-5)
    assert not torch.allclose(hot, got, atol=1e-3)


# ------------------------------------------------------------------------------------------ ZOPrO direction

SHAPES = [(6, 7), (50,), (3, 4, 5)]
OFFSETS = [0, 42, 200]


def _direction(gamma=0.6, with_mu=(True, True, False), with_vhat=(True, False, True)):
    mu = [_randn(*s).float() if m else None for s, m in zip(SHAPES, with_mu)]
    vhat = [_randn(*s).float() * 3 if v else None for s, v in zip(SHAPES, with_vhat)]
    return ZOPrODirection(mu, vhat, gamma)


def _params():
    return [(_randn(*s) * 0.1).float() for s in SHAPES]


def test_direction_reference_is_the_formula():
    direction = _direction()
    params = _params()
    z = direction.reference(7, params, OFFSETS)
    for k, (shape, offset) in enumerate(zip(SHAPES, OFFSETS)):
        d = math.prod(shape)
        n = ops.gaussian(7, offset, d, backend="torch").double()
        v = direction.vhat[k]
        if v is not None:
            v = v.double().reshape(-1)
            n = n - (v @ n) * v
        has_mu = direction.mu[k] is not None
        gamma = direction.gamma if has_mu else 0.0
        expected = math.sqrt(d) * math.sqrt(1 - gamma**2) * n / n.norm()
        if has_mu:
            mu = direction.mu[k].double().reshape(-1)
            expected = expected + math.sqrt(d) * gamma * mu / mu.norm()
        assert torch.allclose(z[k].reshape(-1), expected, atol=1e-12)


def test_pure_noise_direction_is_orthogonal_to_the_reward_update_with_gaussian_norm():
    direction = _direction(gamma=0.0, with_mu=(False,) * 3, with_vhat=(True,) * 3)
    z = direction.reference(3, _params(), OFFSETS)
    for k, shape in enumerate(SHAPES):
        # vhat is stored in float32, unit to about 1e-7: the residual along it is of that order times |z|.
        assert abs((z[k].reshape(-1) @ direction.vhat[k].double().reshape(-1)).item()) < 1e-6
        assert z[k].norm().item() == pytest.approx(math.sqrt(math.prod(shape)), rel=1e-9)


@pytest.mark.parametrize("backend", backends_for(DEVICE))
def test_reductions_and_apply_match_the_float64_formula(backend):
    """The fused passes (C++, Triton, CUDA's fallback, the plain-torch one) on the device against the float64
    reference of z on the CPU, on tensors that span several kernel chunks and start at unaligned stream offsets."""
    shapes, offsets = SHAPES + [(70, 41)], OFFSETS + [1001]
    mu = [_randn(*s).float() for s in shapes[:2]] + [None, _randn(*shapes[3]).float()]
    vhat = [_randn(*shapes[0]).float() * 3, None] + [_randn(*s).float() for s in shapes[2:]]
    reference = ZOPrODirection(mu, vhat, 0.6)
    on_device = [None if t is None else t.to(DEVICE) for t in mu], [None if t is None else t.to(DEVICE) for t in vhat]
    direction = ZOPrODirection(*on_device, 0.6)
    start = [(_randn(*s) * 0.1).float() for s in shapes]
    params = [p.to(DEVICE, copy=True) for p in start]
    for (a, nn), p, offset, v in zip(
        direction.reductions(5, params, offsets, backend), params, offsets, reference.vhat
    ):
        n = ops.gaussian(5, offset, p.numel(), backend="torch").double()
        assert float(nn) == pytest.approx(float(n @ n), rel=1e-6)  # the backends' z: within 2^-17 (1 + |z|) of exact
        assert float(a) == pytest.approx(0.0 if v is None else float(v.double().reshape(-1) @ n), abs=1e-3)
    direction.apply_(params, offsets, 5, alpha=0.25, backend=backend)
    for p, b, z in zip(params, start, reference.reference(5, start, offsets)):
        # Three float32 roundings and the backend's z (within 2^-17 (1 + |z|) of exact), scaled by alpha.
        assert torch.allclose(p.cpu().double(), b.double() + 0.25 * z, atol=2e-5, rtol=1e-6)


@pytest.mark.parametrize("backend", backends_for(DEVICE))
def test_reductions_are_float64_sums_of_the_backends_own_stream(backend):
    """(vhat . n, n . n) per tensor are float64 sums of float64 products (docs/preference.md) of the backend's own
    z: within summation order of the exact sums (float32 per-tile sums, as Triton's were, are off by ~1e-6)."""
    shapes, offsets = [(90, 70), (3001,)], [7, 2**33 + 5]
    vhat = [_randn(*s).float().to(DEVICE) for s in shapes]
    direction = ZOPrODirection([None, None], vhat, 0.5)
    params = [torch.zeros(s, device=DEVICE) for s in shapes]
    for (a, nn), p, offset, v in zip(
        direction.reductions(3, params, offsets, backend), params, offsets, direction.vhat
    ):
        n = ops.gaussian(3, offset, p.numel(), backend=backend, device=DEVICE).double().cpu()
        assert float(nn) == pytest.approx(float(n @ n), rel=1e-12)
        assert float(a) == pytest.approx(float(v.double().reshape(-1).cpu() @ n), rel=1e-9, abs=1e-9)


@pytest.mark.parametrize(
    "build,exc,match",
    [
        (lambda: ZOPrODirection([torch.ones(2)], [], 0.5), ValueError, "1 tensors but vhat has 0"),
        (lambda: ZOPrODirection([torch.ones(2)], [None], 1.5), ValueError, "gamma"),
        (lambda: ZOPrODirection([torch.tensor([1.0, math.nan])], [None], 0.5), ValueError, r"mu\[0\] has non-finite"),
        (lambda: ZOPrODirection([torch.arange(3)], [None], 0.5), TypeError, "floating"),
    ],
)
def test_direction_rejects_bad_inputs(build, exc, match):
    with pytest.raises(exc, match=match):
        build()


def test_direction_checks_shapes_and_dtypes():
    direction = _direction()
    with pytest.raises(ValueError, match=r"mu\[0\] has shape"):
        direction.apply_([torch.zeros(5), *_params()[1:]], OFFSETS, 1, 1e-3)
    with pytest.raises(TypeError, match="float32"):
        direction.apply_([p.bfloat16() for p in _params()], OFFSETS, 1, 1e-3)


def _bare_direction(n: int) -> ZOPrODirection:
    """No mu, no vhat: nothing pins the tensors' shapes, so only apply_'s own checks stand between bad input and
    the kernels."""
    return ZOPrODirection([None] * n, [None] * n, 0.0)


@pytest.mark.parametrize("backend", backends_for(DEVICE))
@pytest.mark.parametrize(
    "bad,offsets,exc,match",
    [
        ("transposed", [0, 3], ValueError, r"tensors\[1\] .* is not contiguous"),
        ("overlap", [0, 3], ValueError, r"tensors\[0\] and tensors\[1\] overlap"),
        ("ok", [0, -8], ValueError, r"offsets\[1\] must be in \[0, 2\^63\)"),
        ("ok", [0, 2**63], ValueError, r"offsets\[1\] must be in"),
        ("ok", [0, 1.5], TypeError, r"offsets\[1\] must be an integer"),
        ("ok", [0, 3, 9], ValueError, "offsets has 3 entries for 2 tensors"),
        ("seed", [0, 3], ValueError, r"seed must be in \[0, 2\^63\)"),  # the torch backend wrapped it mod 2^64
        ("alpha", [0, 3], ValueError, r"alpha must be finite in float32"),
    ],
)
def test_direction_refuses_bad_tensors_and_offsets_before_writing(backend, bad, offsets, exc, match):
    first = _randn(3).float().to(DEVICE)
    if bad == "overlap":
        memory = _randn(40).float().to(DEVICE)
        tensors = [memory[:30], memory[10:]]
    else:
        second = _randn(5, 4).float().to(DEVICE)
        tensors = [first, second.t() if bad == "transposed" else second]
    before = [t.clone() for t in tensors]
    seed, alpha = 2**64 + 1 if bad == "seed" else 1, math.inf if bad == "alpha" else 0.1
    with pytest.raises(exc, match=match):
        _bare_direction(2).apply_(tensors, offsets, seed=seed, alpha=alpha, backend=backend)
    assert all(torch.equal(t, b) for t, b in zip(tensors, before))


@pytest.mark.parametrize("backend", backends_for(DEVICE))
def test_direction_tells_autograd_it_wrote(backend):
    p = torch.nn.Parameter(_randn(20).float().to(DEVICE))
    loss = (p * p).sum()
    _bare_direction(1).apply_([p], [0], seed=1, alpha=0.5, backend=backend)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_direction_does_not_reuse_sums_of_tensors_of_another_size():
    direction = _bare_direction(1)
    direction.apply_([torch.zeros(10, device=DEVICE)], [0], seed=3, alpha=1.0)
    big = torch.zeros(10000, device=DEVICE)
    direction.apply_([big], [0], seed=3, alpha=1.0)
    assert big.norm().item() == pytest.approx(100.0, rel=1e-5)  # sqrt(d): the pure-noise direction's norm
