"""LDSD: its passes against a float64 reference, its step against the formula, and evidence that mu learns."""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
from helpers import DEVICE
from helpers import Z_ATOL
from helpers import backends_for
from helpers import random_params
from helpers import ulp

from zokern import _ldsd_reference
from zokern._reference import stream
from zokern.optim import LDSD
from zokern.optim import ZOSGD
from zokern.optim import replay
from zokern.optim import seeds as seeds_
from zokern.optim._ldsd_passes import final_
from zokern.optim._ldsd_passes import move_
from zokern.optim._ldsd_passes import squared_norm

SIZES = (1, 7, 128, 1000, 8195)
BASES = (3, 10, 2**40 + 5, 200, 5000)  # each tensor names its own base; misaligned ones take the masked path
ALIGNED_BASES = (0, 8, 2**40, 1024, 4096)  # whole tiles inside the largest tensor: the unmasked interior path
SEEDS = (11, 2**62 + 5, 77)
RULE_SCALARS = dict(lr=0.01, weight_decay=0.1, momentum=0.9, beta1=0.8, beta2=0.95, adam_eps=1e-6)


def _xis(distribution: str, bases=BASES, seeds=SEEDS) -> list[list[torch.Tensor]]:
    """Per tensor, the float64 streams xi_s over its elements."""
    return [[stream(s, b, n, distribution).to(DEVICE) for s in seeds] for n, b in zip(SIZES, bases)]


def _combine64(row: torch.Tensor, mu: torch.Tensor, xis: list[torch.Tensor]) -> torch.Tensor:
    return row[0].double() * mu.double() + sum(row[1 + s].double() * xi for s, xi in enumerate(xis))


def _close(out: torch.Tensor, ref: torch.Tensor, scale: float) -> None:
    """out (any dtype) within the backends' z tolerance times the coefficients' scale, plus rounding of its dtype."""
    diff = (out.double() - ref).abs()
    tol = scale * Z_ATOL + 1e-6 * ref.abs() + ulp(ref.to(out.dtype)).to(ref.device) * (out.dtype != torch.float32)
    assert bool((diff <= tol + 1e-30).all()), f"max excess {float((diff - tol).max()):.3g}"


def _inputs(dtype, n_states):
    params = random_params(SIZES, dtype)
    mus = [m.float() * 3 - 1 for m in random_params(SIZES, torch.float32, seed=1)]
    states = [tuple(s.float().abs() + 0.1 for s in random_params([n] * n_states, torch.float32, seed=2)) for n in SIZES]
    return params, mus, states


@pytest.mark.parametrize("backend", backends_for())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("distribution", ["gaussian", "rademacher"])
@pytest.mark.parametrize("bases", [BASES, ALIGNED_BASES], ids=["misaligned", "aligned"])
def test_move_and_squared_norm_match_the_formula(backend, dtype, distribution, bases):
    params, mus, _ = _inputs(dtype, 0)
    coef = torch.tensor([0.3, -0.02, 0.05, 0.01], device=DEVICE)
    xis = _xis(distribution, bases)
    expected = [p.double() + _combine64(coef, m, x) for p, m, x in zip(params, mus, xis)]
    move_(params, mus, list(bases), list(SEEDS), coef, distribution=distribution, backend=backend)
    for out, ref in zip(params, expected):
        _close(out, ref, 0.1)
    norm = squared_norm(mus, list(bases), list(SEEDS), coef, distribution=distribution, backend=backend)
    exact = sum(float(_combine64(coef, m, x).square().sum()) for m, x in zip(mus, xis))
    assert norm.dtype == torch.float64 and abs(float(norm) - exact) <= 1e-5 * exact
    # Fused: the move and the norm of a second row over the same streams, in one pass.
    params, _, _ = _inputs(dtype, 0)
    second = torch.tensor([1.0, 0.2, -0.1, 0.3], device=DEVICE)
    fused = move_(params, mus, list(bases), list(SEEDS), coef, distribution=distribution, backend=backend,
                  norm_coef=second)  # fmt: skip
    for out, ref in zip(params, expected):
        _close(out, ref, 0.1)
    exact = sum(float(_combine64(second, m, x).square().sum()) for m, x in zip(mus, xis))
    assert abs(float(fused) - exact) <= 1e-5 * exact


@pytest.mark.parametrize("backend", backends_for())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("rule", ["sgd", "momentum", "adam"])
@pytest.mark.parametrize("ok", [True, False])
@pytest.mark.parametrize("bases", [BASES, ALIGNED_BASES], ids=["misaligned", "aligned"])
def test_final_pass_matches_the_formula(backend, dtype, rule, ok, bases):
    params, mus, states = _inputs(dtype, _ldsd_reference.STATES_PER_RULE[rule])
    at = _ldsd_reference.final_layout(len(SEEDS))
    g = torch.Generator().manual_seed(3)
    coef = (torch.rand(at["size"], generator=g) * 0.2 - 0.1).to(DEVICE)
    coef[at["ok"]], coef[at["c1"]], coef[at["c2"]] = float(ok), 0.3, 0.05
    xis = _xis("gaussian", bases)
    s = RULE_SCALARS
    expected = []
    for p, m, st, x in zip(params, mus, states, xis):
        theta0 = p.double() + _combine64(coef[at["P"]], m, x)
        d = _combine64(coef[at["D"]], m, x)
        if rule == "sgd":
            u, new_states = d, ()
        elif rule == "momentum":
            u = s["momentum"] * st[0].double() + d
            new_states = (u,)
        else:
            m1 = s["beta1"] * st[0].double() + (1 - s["beta1"]) * d
            v = s["beta2"] * st[1].double() + (1 - s["beta2"]) * d * d
            u = (m1 / 0.3) / ((v / 0.05).sqrt() + s["adam_eps"])
            new_states = (m1, v)
        theta = theta0 - s["lr"] * (u + s["weight_decay"] * theta0)
        mu = _combine64(coef[at["M"]], m, x)
        if not ok:
            theta, mu, new_states = theta0, m.double(), tuple(t.double() for t in st)
        expected.append((theta, mu, new_states))
    final_(params, mus, states, list(bases), list(SEEDS), coef, backend=backend, rule=rule, distribution="gaussian",
           rounding_seed=None, **s)  # fmt: skip
    for p, m, st, (theta, mu, new_states) in zip(params, mus, states, expected):
        _close(p, theta, 0.1 * (1 + 100 * (rule == "adam")))
        _close(m, mu, 0.1)
        for out, ref in zip(st, new_states):
            _close(out, ref, 0.1)


@pytest.mark.parametrize("backend", [b for b in backends_for() if b != "torch"])
@pytest.mark.parametrize(
    "dtype, stochastic",
    [(torch.float32, False), (torch.bfloat16, False), (torch.float16, False), (torch.bfloat16, True),
     (torch.float16, True)],
    ids=["float32", "bfloat16", "float16", "bfloat16-stochastic", "float16-stochastic"],
)  # fmt: skip
@pytest.mark.parametrize("rule", ["sgd", "momentum", "adam"])
def test_final_pass_stores_the_references_bits_with_rademacher_streams(backend, dtype, stochastic, rule):
    """With exact z (Rademacher), every backend stores the torch reference's bits: parameters, mu and the rule's
    states (Adam's 1 - beta from float32 beta, and its correctly rounded square root, included)."""
    at = _ldsd_reference.final_layout(len(SEEDS))
    g = torch.Generator().manual_seed(4)
    coef = (torch.rand(at["size"], generator=g) * 0.2 - 0.1).to(DEVICE)
    coef[at["ok"]], coef[at["c1"]], coef[at["c2"]] = 1.0, 0.3, 0.05
    scalars = dict(RULE_SCALARS, beta1=0.9, beta2=0.999, adam_eps=1e-8)  # 1 - f32(0.999) != f32(1 - 0.999)
    results = []
    for impl in ("torch", backend):
        params, mus, states = _inputs(dtype, _ldsd_reference.STATES_PER_RULE[rule])
        final_(params, mus, states, list(BASES), list(SEEDS), coef, backend=impl, rule=rule,
               distribution="rademacher", rounding_seed=99 if stochastic else None, **scalars)  # fmt: skip
        results.append([params, mus, [t for st in states for t in st]])
    for expected, got in zip(*results):
        for e, o in zip(expected, got):
            assert torch.equal(e.view(torch.uint8), o.view(torch.uint8))


def test_triton_squared_norms_are_float64_sums():
    """Per-tile partial sums in float64, as the other backends: in float32 a row of 1e20 overflowed (and mu's
    projection then reset it to zero) and one of 1e-25 flushed to 0."""
    if "triton" not in backends_for():
        pytest.skip("the triton backend runs here only under TRITON_INTERPRET=1")
    for value in (1e20, 1e-25):
        mus = [torch.full((300,), value, device=DEVICE)]
        coef = torch.tensor([1.0, 0.0], device=DEVICE)
        norm = squared_norm(mus, [0], [1], coef, distribution="rademacher", backend="triton")
        exact = 300 * float(mus[0][0]) ** 2  # the float32 value's square
        assert norm.dtype == torch.float64 and math.isclose(float(norm), exact, rel_tol=1e-12)


# --------------------------------------------------------------------------------------------------- optimizer


def _quadratic(d: int = 64, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    a = torch.logspace(0, 1, d, dtype=torch.float64)
    x0 = torch.randn(d, generator=g, dtype=torch.float64)
    return a, x0


def test_one_step_is_the_formula():
    """A float64 re-derivation of one step from the stream: K candidates, argmin, f-, the update of theta and mu."""
    a, x0 = _quadratic()
    x = torch.nn.Parameter(x0.float())
    mu0 = torch.randn(64, generator=torch.Generator().manual_seed(5)) * 0.5
    k, eps, sigma, lr, mu_lr, rho = 4, 1e-2, 0.7, 1e-2, 3.0, 0.05
    opt = LDSD([x], lr=lr, eps=eps, k=k, sigma=sigma, mu_lr=mu_lr, mu_norm=rho, momentum=0.5, seed=9)
    opt._init_state()
    opt.state[x]["mu"].copy_(mu0)
    f = lambda v: 0.5 * float((a * v.double() ** 2).sum())  # noqa: E731
    calls = []
    opt.step(lambda: calls.append(x.detach().clone()) or torch.tensor(f(x.detach())))

    step_seed = seeds_.step_seed(9, 0)
    xis = [stream(seeds_.probe_seed(step_seed, i), 0, 64, "gaussian") for i in range(k)]
    zs = [mu0.double() + sigma * xi for xi in xis]
    losses = [f(x0 + eps * z) for z in zs]
    best = min(range(k), key=losses.__getitem__)
    f_minus = f(x0 - eps * zs[best])
    for seen, point in zip(calls, [x0 + eps * z for z in zs] + [x0 - eps * zs[best]]):
        assert torch.allclose(seen.double(), point, atol=1e-5)
    g = (losses[best] - f_minus) / (2 * eps)
    # The step's g comes from float32 losses: a loss of 173 is rounded by up to 7.6e-6, g by up to 7.6e-4 (and z,
    # within its tolerance, moves the losses too). The update and the buffer follow the step's own g.
    g_run = opt.trajectory[0]["projected_grad"][0]
    assert g_run == pytest.approx(g, abs=1e-3)
    g = g_run
    expected_x = x0 - lr * g * zs[best]  # momentum buffer starts at zero: the first step is plain SGD
    c = [(k * li - sum(losses)) / (k - 1) for li in losses]
    raw = mu0.double() - mu_lr / (k * sigma) * sum(ci * xi for ci, xi in zip(c, xis))
    expected_mu = raw * min(1.0, rho * sigma * 8 / float(raw.norm()))
    assert float(raw.norm()) > rho * sigma * 8  # the projection is active in this test
    assert torch.allclose(x.detach().double(), expected_x, atol=2e-5)
    assert torch.allclose(opt.state[x]["mu"].double(), expected_mu, atol=2e-5)
    assert torch.allclose(opt.state[x]["momentum_buffer"].double(), g * zs[best], atol=2e-4)
    record = opt.trajectory[0]
    assert record["best"] == best and record["losses"] == pytest.approx(losses + [f_minus], rel=1e-5)
    assert record["projected_grad"][0] == pytest.approx(g, rel=1e-3)


def test_with_one_candidate_it_is_mezo():
    a, x0 = _quadratic()
    p1, p2 = torch.nn.Parameter(x0.float()), torch.nn.Parameter(x0.float())
    o1, o2 = LDSD([p1], lr=1e-2, k=1, seed=4), ZOSGD([p2], lr=1e-2, seed=4)
    for _ in range(5):
        o1.step(lambda: 0.5 * (a.float() * p1**2).sum())
        o2.step(lambda: 0.5 * (a.float() * p2**2).sum())
    assert torch.allclose(p1, p2, atol=1e-5)
    assert not o1.state[p1]["mu"].any()


def _cosine_to_descent(pairing: str, seed: int, lr: float = 0.0, steps: int = 250) -> float:
    a, x0 = _quadratic(seed=seed)
    x = torch.nn.Parameter(x0.float())
    opt = LDSD([x], lr=lr, eps=1e-3, k=5, mu_lr=0.5, pairing=pairing, seed=seed)
    for _ in range(steps):
        opt.step(lambda: 0.5 * (a.float() * x**2).sum())
    grad = a.float() * x.detach()
    return float(torch.nn.functional.cosine_similarity(opt.state[x]["mu"], -grad, dim=0))


def test_mu_learns_the_descent_direction_on_a_quadratic_and_the_mispaired_mode_does_not():
    """d = 64: random directions have cosine about 1/8 with the gradient."""
    evaluated = [_cosine_to_descent("evaluated", s) for s in range(3)]
    faithful = [_cosine_to_descent("faithful", s) for s in range(3)]
    assert min(evaluated) > 0.8, evaluated
    assert max(abs(c) for c in faithful) < 0.45 and abs(sum(faithful) / 3) < 0.3, faithful
    # While theta moves too (the gradient turns as it descends), mu still follows it.
    moving = [_cosine_to_descent("evaluated", s, lr=2e-4) for s in range(3)]
    assert min(moving) > 0.25 and sum(moving) / 3 > 0.4, moving


def test_mu_learns_on_a_small_model():
    """A two-layer network on a fixed batch: mu aligns with -grad (from autograd) far beyond 1/sqrt(d)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    inputs, targets = torch.randn(64, 8), torch.randn(64, 1)
    loss = lambda: torch.nn.functional.mse_loss(model(inputs), targets)  # noqa: E731
    params = list(model.parameters())
    d = sum(p.numel() for p in params)
    cosines = {}
    for pairing in ("evaluated", "faithful"):
        opt = LDSD(params, lr=0.0, eps=1e-3, k=5, mu_lr=2.0, pairing=pairing, seed=1)
        for _ in range(300):
            opt.step(loss)
        model.zero_grad()
        loss().backward()
        grad = torch.cat([p.grad.reshape(-1) for p in params])
        mu = torch.cat([opt.state[p]["mu"].reshape(-1) for p in params])
        cosines[pairing] = float(torch.nn.functional.cosine_similarity(mu, -grad, dim=0))
    assert cosines["evaluated"] > 0.6 > 6 / math.sqrt(d), cosines
    assert abs(cosines["faithful"]) < 0.35, cosines


def test_mu_stays_in_its_ball():
    a, x0 = _quadratic()
    x = torch.nn.Parameter(x0.float())
    opt = LDSD([x], lr=1e-4, k=3, sigma=2.0, mu_lr=50.0, mu_norm=0.25, seed=0)
    for _ in range(30):
        opt.step(lambda: 0.5 * (a.float() * x**2).sum())
        assert float(opt.state[x]["mu"].norm()) <= 0.25 * 2.0 * 8 * (1 + 1e-5)
    assert float(opt.state[x]["mu"].norm()) == pytest.approx(4.0, rel=1e-4)  # at the boundary


@pytest.mark.parametrize(
    "kwargs, dtype",
    [
        (dict(), torch.float32),
        (dict(momentum=0.9, pairing="faithful"), torch.float32),
        (dict(update="adam", lr=1e-3), torch.float32),
        (dict(momentum=0.5), torch.bfloat16),
    ],
    ids=["sgd", "momentum-faithful", "adam", "bf16-exact"],
)
def test_replay_and_resume_are_bit_identical(kwargs, dtype):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 1)).to(dtype)
    inputs, targets = torch.randn(16, 6, dtype=dtype), torch.randn(16, 1)
    start = [p.detach().clone() for p in model.parameters()]
    options = dict(dict(lr=1e-2, eps=1e-2, k=3, mu_lr=1.0, seed=2), **kwargs)
    opt = LDSD(model.parameters(), **options)
    closure = lambda: torch.nn.functional.mse_loss(model(inputs).float(), targets)  # noqa: E731
    for _ in range(4):
        opt.step(closure)
    saved_params = [p.detach().clone() for p in model.parameters()]
    saved = copy.deepcopy(opt.state_dict())  # torch's state_dict holds the live state tensors
    for _ in range(3):
        opt.step(closure)
    final = [p.detach().clone() for p in model.parameters()]

    replayed = replay([t.clone() for t in start], opt.trajectory)
    for t, p in zip(replayed.param_groups[0]["params"], final):
        assert torch.equal(t, p)

    with torch.no_grad():
        for p, s in zip(model.parameters(), saved_params):
            p.copy_(s)
    resumed = LDSD(model.parameters(), **options)
    resumed.load_state_dict(saved)
    for _ in range(3):
        resumed.step(closure)
    for p, f in zip(model.parameters(), final):
        assert torch.equal(p.detach(), f)
    assert resumed.state[next(model.parameters())]["mu"].dtype == torch.float32


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_exact_mode_leaves_16bit_weights_bit_identical_at_lr_zero(dtype):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1)).to(dtype)
    inputs, targets = torch.randn(8, 8, dtype=dtype), torch.randn(8, 1)
    start = [p.detach().clone() for p in model.parameters()]
    opt = LDSD(model.parameters(), lr=0.0, eps=1e-2, k=3, mu_lr=5.0, seed=0)
    assert opt.exact()
    for _ in range(20):
        opt.step(lambda: torch.nn.functional.mse_loss(model(inputs).float(), targets))
    for p, s in zip(model.parameters(), start):
        assert torch.equal(p.detach(), s)
    assert any(bool(opt.state[p]["mu"].any()) for p in model.parameters())  # mu did learn meanwhile


def test_a_nonfinite_loss_skips_the_update_on_the_device():
    a, x0 = _quadratic()
    x = torch.nn.Parameter(x0.float())
    opt = LDSD([x], lr=1e-2, k=3, mu_lr=1.0, momentum=0.9, seed=0)
    opt.step(lambda: 0.5 * (a.float() * x**2).sum())
    before = x.detach().clone(), opt.state[x]["mu"].clone(), opt.state[x]["momentum_buffer"].clone()
    calls = iter(range(100))
    with pytest.warns(RuntimeWarning, match=r"non-finite loss at LDSD step 1;"):
        loss = opt.step(lambda: torch.tensor(math.nan) if next(calls) == 1 else 0.5 * (a.float() * x**2).sum())
        assert math.isnan(loss.item())  # as its record says (the best candidate and f- were finite)
    assert torch.allclose(x.detach(), before[0], atol=1e-6)
    assert torch.equal(opt.state[x]["mu"], before[1]) and torch.equal(opt.state[x]["momentum_buffer"], before[2])
    assert opt.nonfinite_steps == 1
    assert opt.trajectory[1]["skipped"] is True and opt.trajectory[0]["skipped"] is False


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_a_closure_that_raises_leaves_the_parameters_restored(dtype):
    a, x0 = _quadratic()
    x = torch.nn.Parameter(x0.to(dtype))
    opt = LDSD([x], lr=1e-2, k=3, seed=0)
    start = x.detach().clone()
    calls = iter(range(100))

    def closure():
        if next(calls) == 3:  # at theta - eps z*, after the argmin
            raise KeyError("data loader failed")
        return 0.5 * (a.to(dtype) * x**2).float().sum()

    with pytest.raises(KeyError):
        opt.step(closure)
    if dtype == torch.float32:
        assert torch.allclose(x.detach(), start, atol=1e-6)
    else:
        assert torch.equal(x.detach(), start)


@pytest.mark.parametrize("failing", ["move", "switch"])
def test_a_pass_that_raises_on_a_later_group_leaves_every_group_restored(monkeypatch, failing):
    """The step moves theta group by group: a pass that raised on the second group left the first one moved, while
    the step's position (from which its undo starts) still said it was not (theta off by several eps)."""
    import zokern.optim.ldsd as ldsd_module

    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(40)) for _ in range(2)]
    opt = LDSD([{"params": [params[0]]}, {"params": [params[1]], "lr": 2e-2}], lr=1e-2, eps=1e-2, k=3, seed=0)
    closure = lambda: sum((p**2).sum() for p in params)  # noqa: E731
    opt.step(closure)
    start = [p.detach().clone() for p in params]
    # A first move (to candidate 1) is a full pass; moves between candidates are two-seed passes.
    module, name = (ldsd_module.passes, "move_") if failing == "move" else (ldsd_module.ops, "two_seed_")
    original, calls = getattr(module, name), []

    def fails_on_the_second_group(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("device lost")
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, fails_on_the_second_group)
    with pytest.raises(RuntimeError, match="device lost"):
        opt.step(closure)
    monkeypatch.setattr(module, name, original)
    for p, before in zip(params, start):
        torch.testing.assert_close(p.detach(), before, atol=1e-6, rtol=0)


def test_a_final_pass_that_raises_on_a_later_dtype_leaves_the_earlier_ones_restored_once(monkeypatch):
    """The final pass runs one call per dtype: one that raised after an earlier dtype's had restored and updated it
    left the step's undo to restore that dtype's parameters a second time (theta off by eps z)."""
    import zokern.optim.ldsd as ldsd_module

    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(40)), torch.nn.Parameter(torch.randn(40).bfloat16())]
    opt = LDSD(params, lr=1e-2, eps=1e-2, k=3, seed=0, update="adam", perturbation="inplace")
    closure = lambda: sum((p.float() ** 2).sum() for p in params)  # noqa: E731
    opt.step(closure)
    original, calls = ldsd_module.passes.final_, []

    def fails_on_the_second_dtype(params, *args, **kwargs):
        calls.append(params[0].dtype)
        if len(calls) == 2:
            raise RuntimeError("device lost")
        return original(params, *args, **kwargs)

    reference = copy.deepcopy(opt)
    ref_params = [p for g in reference.param_groups for p in g["params"]]
    reference.step(lambda: sum((p.float() ** 2).sum() for p in ref_params))  # the same step, completed
    monkeypatch.setattr(ldsd_module.passes, "final_", fails_on_the_second_dtype)
    with pytest.raises(RuntimeError, match="device lost"):
        opt.step(closure)
    assert calls == [torch.float32, torch.bfloat16]
    # The float32 parameter keeps its completed update (restored once); the bfloat16 one is restored by the undo.
    assert torch.equal(params[0].detach(), ref_params[0].detach())


def test_a_strided_state_is_made_contiguous_before_the_kernels_read_it():
    """A state of the right dtype and device but strided (assigned by hand, loaded from a converted checkpoint) was
    kept as it was, and the kernels, which read states by address, read and wrote the wrong elements."""

    def run(strided):
        torch.manual_seed(0)
        a, b = torch.nn.Parameter(torch.randn(64)), torch.nn.Parameter(torch.randn(64).bfloat16())
        opt = LDSD([a, b], lr=0.01, eps=1e-3, k=3, update="adam", mu_lr=0.1, seed=5)
        closure = lambda: (a**2).sum() + (b.float() ** 2).sum()  # noqa: E731
        opt.step(closure)
        holder = torch.zeros(64, 2)
        if strided:
            holder[:, 0] = opt.state[b]["exp_avg"]
            opt.state[b]["exp_avg"] = holder[:, 0]
        opt.step(closure)
        return a.detach().clone(), b.detach().clone(), holder[:, 1]

    clean, strided = run(False), run(True)
    assert torch.equal(clean[0], strided[0]) and torch.equal(clean[1], strided[1])
    assert not strided[2].any()  # nothing written beside the state


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(k=0), "k must be a positive integer"),
        (dict(pairing="fresh"), "pairing must be one of"),
        (dict(update="lion"), "update must be one of"),
        (dict(update="adam", momentum=0.9), "momentum is for update='sgd'"),
        (dict(mu_norm=0.0), "invalid mu_norm"),
        (dict(sigma=-1.0), "invalid sigma"),
        (dict(mu_lr=-1.0), "invalid mu_lr"),
        (dict(betas=(0.9, 1.0), update="adam"), "invalid betas"),
        (dict(betas=(0.9, 0.99)), "betas and adam_eps are for update=.adam."),
    ],
)
def test_bad_arguments_are_clear_errors(kwargs, match):
    x = torch.nn.Parameter(torch.randn(4))
    with pytest.raises(ValueError, match=match):
        LDSD([x], **kwargs)


def test_lower_level_perturbation_is_refused_clearly():
    opt = LDSD([torch.nn.Parameter(torch.randn(3))])
    with pytest.raises(NotImplementedError, match="step\\(closure\\)"):
        with opt.perturbed(opt.new_seed()):
            pass


def test_state_holds_mu_and_the_rules_buffers_only():
    x = torch.nn.Parameter(torch.randn(5, 3, dtype=torch.bfloat16))
    for kwargs, keys in ((dict(), {"mu"}), (dict(momentum=0.9), {"mu", "momentum_buffer"}),
                         (dict(update="adam"), {"mu", "exp_avg", "exp_avg_sq", "step"})):  # fmt: skip
        opt = LDSD([x], k=2, **kwargs)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            opt.step(lambda: (x.float() ** 2).sum())
        assert set(opt.state[x]) == keys
        assert all(opt.state[x][key].shape == x.shape and opt.state[x][key].dtype == torch.float32
                   for key in keys - {"step"})  # fmt: skip


def test_a_pass_that_raises_leaves_theta_where_it_was(monkeypatch):
    """The position is recorded after a move's passes succeed: a failing pass is not undone as if it had run."""
    from zokern.optim import _ldsd_passes

    a, x0 = _quadratic()
    x = torch.nn.Parameter(x0.float())
    opt = LDSD([x], lr=1e-2, k=3, mu_lr=1.0, seed=0)
    opt.step(lambda: 0.5 * (a.float() * x**2).sum())  # mu is nonzero now: the first move reads it
    start = x.detach().clone()

    def failing(*args, **kwargs):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(_ldsd_passes, "move_", failing)
    with pytest.raises(RuntimeError, match="out of memory"):
        opt.step(lambda: 0.5 * (a.float() * x**2).sum())
    assert torch.equal(x.detach(), start)


def test_replay_follows_mid_run_changes_of_sigma_and_mu_lr():
    a, x0 = _quadratic()
    x = torch.nn.Parameter(x0.float())
    opt = LDSD([x], lr=1e-3, k=3, mu_lr=1.0, seed=5)
    closure = lambda: 0.5 * (a.float() * x**2).sum()  # noqa: E731
    for step in range(6):
        if step == 3:
            opt.param_groups[0].update(sigma=0.5, mu_lr=4.0)
        opt.step(closure)
    replayed = replay([x0.float().clone()], opt.trajectory)
    assert torch.equal(replayed.param_groups[0]["params"][0], x.detach())


def test_projected_grad_has_one_entry_per_group_even_with_a_frozen_group():
    a, x0 = _quadratic()
    frozen = torch.nn.Parameter(torch.randn(3), requires_grad=False)
    x = torch.nn.Parameter(x0.float())
    opt = LDSD([{"params": [frozen], "eps": 1e-2}, {"params": [x], "eps": 1e-3}], lr=1e-3, k=3, seed=0)
    opt.step(lambda: 0.5 * (a.float() * x**2).sum())
    record = opt.trajectory[0]
    losses = record["losses"]
    f_plus, f_minus = losses[record["best"]], losses[-1]
    assert record["projected_grad"] == pytest.approx([(f_plus - f_minus) / 2e-2, (f_plus - f_minus) / 2e-3])


def test_adam_count_is_the_runs_for_a_parameter_that_joins_later():
    first, later, also = (torch.nn.Parameter(torch.rand(n)) for n in (6, 4, 3))
    opt = LDSD([first], lr=1e-3, k=2, update="adam", seed=0)
    closure = lambda: (first.sum() + later.sum() + also.sum()) ** 2  # noqa: E731
    for _ in range(3):
        opt.step(closure)
    opt.add_param_group({"params": [later, also]})
    opt.step(closure)
    opt.step(closure)
    # One bias correction per pass: the joining parameters' counts are the run's, and their states say so.
    assert [opt.state[p]["step"].item() for p in (first, later, also)] == [5, 5, 5]


@pytest.mark.parametrize("update", ["sgd", "adam"])
def test_numpy_scalar_hyperparameters_train_as_their_float_values(update):
    """NumPy scalars pass the hyperparameter checks (numbers.Real), so a step must take them too: an np.float32 eps
    once failed every step inside the displacement (a numpy scalar assigned into a tensor)."""
    np = pytest.importorskip("numpy")
    values = dict(lr=0.01, eps=1e-3, sigma=0.5, mu_lr=0.1)
    runs = []
    for convert in (lambda v: float(np.float32(v)), np.float32):
        torch.manual_seed(0)
        model, x = torch.nn.Linear(4, 2), torch.randn(8, 4)
        opt = LDSD(model.parameters(), k=3, update=update, seed=0, **{k: convert(v) for k, v in values.items()})
        for _ in range(3):
            opt.step(lambda model=model, x=x: model(x).pow(2).mean())
        runs.append([t.clone() for p in model.parameters() for t in (p.detach(), opt.state[p]["mu"])])
    assert all(torch.equal(a, b) for a, b in zip(*runs))


@pytest.mark.parametrize("backend", backends_for())
@pytest.mark.parametrize("beta1, beta2", [(0.9, 0.999), (0.9, 0.99999), (0.0, 0.999)])
def test_the_adam_rule_follows_adam_in_float64_with_beta2_near_one(backend, beta1, beta2):
    """1 - beta2 from float32 beta2, and 1 - beta2^t in float32, lost digits: exp_avg_sq was off by 1.3e-5 of its
    scale at beta2 = 0.999 and 1.4e-3 at 0.99999, where float32 rounding gives ~1e-7 (beta1 = 0: no first moment,
    whose log is -inf). With k = 1, mu stays 0 and the estimate is g * xi(step seed)."""
    n, lr, adam_eps = 300, 0.3, 1e-8
    generator = torch.Generator().manual_seed(0)
    x = torch.nn.Parameter(torch.randn(n, generator=generator).to(DEVICE))
    target = torch.randn(n, generator=generator, dtype=torch.float64).to(DEVICE)
    opt = LDSD([x], lr=lr, eps=1e-3, k=1, update="adam", betas=(beta1, beta2), adam_eps=adam_eps, seed=5,
               backend=backend)  # fmt: skip
    m = torch.zeros(n, dtype=torch.float64, device=DEVICE)
    v = torch.zeros_like(m)
    for t in range(1, 5):
        start = x.detach().double().clone()
        opt.step(lambda: 0.5 * ((x.double() - target) ** 2).sum())
        record = opt.trajectory[-1]
        estimate = record["projected_grad"][0] * stream(record["seed"], 0, n, "gaussian").double().to(DEVICE)
        m = beta1 * m + (1 - beta1) * estimate
        v = beta2 * v + (1 - beta2) * estimate**2
        step = -lr * (m / (1 - beta1**t)) / ((v / (1 - beta2**t)).sqrt() + adam_eps)
        assert (x.detach().double() - start - step).abs().max() <= 4e-6 * step.abs().max()
        assert (opt.state[x]["exp_avg_sq"].double() - v).abs().max() <= 4e-7 * v.abs().max()
