"""16-bit faithfulness: exact perturbation (lr = 0 leaves the weights bit-identical), unbiased stochastic-rounding
updates, and losses whose differences survive in float32."""

from __future__ import annotations

import math
import statistics

import pytest
import torch
from helpers import tiny_opt

import zokern
from zokern.optim import FZOO
from zokern.optim import ZOSGD
from zokern.optim import ZOAdam
from zokern.optim import ZOConservative

pytest.importorskip("transformers")

SIXTEEN = (torch.bfloat16, torch.float16)


def _batch():
    return torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(5))


def _closure(model, batch):
    return lambda: model(input_ids=batch, labels=batch).loss


def _drift(model, start):
    changed = total = 0
    squares = 0.0
    for p, s in zip(model.parameters(), start):
        p = p.detach()
        changed += int((p != s).sum())
        total += p.numel()
        squares += float((p.double() - s.double()).pow(2).sum())
    return changed / total, math.sqrt(squares / total)


@pytest.mark.parametrize("dtype", SIXTEEN, ids=str)
@pytest.mark.parametrize("cls,kwargs", [(ZOSGD, {}), (ZOSGD, dict(n_probes=2)), (FZOO, dict(n_probes=3))])
def test_exact_mode_leaves_weights_bit_identical_at_lr_zero(dtype, cls, kwargs):
    model = tiny_opt(dtype).eval()
    assert model.lm_head.weight is model.model.decoder.embed_tokens.weight  # tied embeddings
    start = [p.detach().clone() for p in model.parameters()]
    opt = cls(model.parameters(), lr=0.0, eps=1e-3, seed=1, **kwargs)
    assert opt.exact()  # the default for 16-bit parameters
    closure = _closure(model, _batch())
    for _ in range(10):
        opt.step(closure)
    assert all(torch.equal(p, s) for p, s in zip(model.parameters(), start))
    assert len({tuple(r["losses"]) for r in opt.trajectory}) == 10  # the evaluations did see perturbations


@pytest.mark.parametrize("dtype", SIXTEEN, ids=str)
def test_inplace_mode_drifts_at_lr_zero(dtype):
    model = tiny_opt(dtype).eval()
    start = [p.detach().clone() for p in model.parameters()]
    opt = ZOSGD(model.parameters(), lr=0.0, eps=1e-3, seed=1, perturbation="inplace")
    closure = _closure(model, _batch())
    for _ in range(10):
        opt.step(closure)
    fraction, rms = _drift(model, start)
    print(f"in-place, {dtype}, 10 steps at lr = 0: {fraction:.1%} of the weights changed, rms drift {rms:.2e}")
    assert fraction > 0.05  # the reason exact mode exists


@pytest.mark.parametrize("dtype", SIXTEEN, ids=str)
def test_exact_evaluation_sees_the_same_values_as_inplace_perturbation(dtype):
    # The first in-place perturbation stores round(theta + eps z) into the one tied tensor; the exact view hands
    # every use of it that same rounded value: the losses at theta + eps z agree bit for bit.
    losses = {}
    for mode in ("exact", "inplace"):
        model = tiny_opt(dtype).eval()
        opt = ZOSGD(model.parameters(), lr=0.0, eps=1e-2, seed=3, perturbation=mode)
        opt.step(_closure(model, _batch()))
        losses[mode] = opt.trajectory[0]["losses"][0]
    assert losses["exact"] == losses["inplace"]


@pytest.mark.parametrize("read", ["T", "mT", "H", "data"])
def test_exact_mode_perturbs_parameters_read_through_value_properties(read):
    """A tied output head written ``h @ w.T`` reads w through a property: it must see theta + eps z too."""
    x = torch.randn(8, 6, generator=torch.Generator().manual_seed(0))
    start = torch.randn(4, 6, generator=torch.Generator().manual_seed(1)) * 0.3

    def loss(w):
        hidden = torch.nn.functional.linear(x, w)
        return (hidden @ getattr(w, read).mT if read != "data" else hidden @ w.data).pow(2).mean()

    losses = {}
    for mode in ("exact", "inplace"):
        w = torch.nn.Parameter(start.clone())
        opt = ZOSGD([w], lr=0.0, eps=1e-2, seed=1, perturbation=mode)
        opt.step(lambda w=w: loss(w))
        losses[mode] = opt.trajectory[0]["losses"]
    assert losses["exact"] == pytest.approx(losses["inplace"], rel=1e-6)


def test_float32_keeps_the_inplace_scheme_bit_for_bit():
    results = []
    for kwargs in ({}, dict(perturbation="inplace", rounding="nearest")):
        model = tiny_opt(torch.float32).eval()
        opt = ZOSGD(model.parameters(), lr=1e-3, eps=1e-3, seed=2, **kwargs)
        for _ in range(3):
            opt.step(_closure(model, _batch()))
        assert not opt.exact()
        results.append([p.detach().clone() for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*results))


@pytest.mark.parametrize("cls", [ZOSGD, ZOAdam, ZOConservative])
def test_a_closure_that_raises_leaves_16bit_weights_bit_identical(cls):
    model = tiny_opt(torch.bfloat16).eval()
    start = [p.detach().clone() for p in model.parameters()]
    opt = cls(model.parameters(), lr=1e-2, seed=4)
    closure, calls = _closure(model, _batch()), []

    def fails_on_second_call():
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("out of memory")
        return closure()

    with pytest.raises(RuntimeError, match="out of memory"):
        opt.step(fails_on_second_call)
    assert all(torch.equal(p, s) for p, s in zip(model.parameters(), start))


def test_exact_mode_names_parameters_the_closure_never_used():
    used = torch.nn.Parameter(torch.ones(4, dtype=torch.bfloat16))
    unused = torch.nn.Parameter(torch.ones(3, dtype=torch.bfloat16))
    opt = ZOSGD([used, unused], seed=0)
    with pytest.raises(ValueError, match=r"param_groups\[0\]\['params'\]\[1\] \(shape \(3,\)\)"):
        opt.step(lambda: used.float().sum())
    assert torch.equal(unused, torch.ones(3, dtype=torch.bfloat16))
    inplace = ZOSGD([used, unused], seed=0, perturbation="inplace")
    inplace.step(lambda: used.float().sum())  # the in-place scheme does not need to see every use


def test_lower_level_perturbed_block_in_exact_mode():
    p = torch.nn.Parameter(torch.linspace(-1, 1, 64).to(torch.bfloat16))
    before = p.detach().clone()
    opt = ZOSGD([p], eps=1e-2, seed=0)
    seed = opt.new_seed()
    with opt.perturbed(seed, +1):
        seen = (p * 1).detach().clone()  # an op on the parameter sees theta + eps z (detach() would too)
    expected = before.clone()
    zokern.perturb_(expected, seed, 1e-2)
    assert torch.equal(seen, expected)
    assert torch.equal(p.detach(), before)


def test_raw_memory_of_a_parameter_holds_the_perturbed_value_for_the_whole_evaluation():
    # A Triton launcher or a ctypes kernel given the parameter reads it through data_ptr(): the perturbed copy behind
    # that address must live on (it was freed at once: two weights read from one freed block, NaN losses).
    import ctypes

    def read(t):  # what a kernel handed t.data_ptr() reads, after other work has run
        return torch.frombuffer((ctypes.c_uint16 * t.numel()).from_address(t.data_ptr()), dtype=torch.bfloat16)

    ws = [
        torch.nn.Parameter((torch.randn(64, generator=torch.Generator().manual_seed(k)) * 0.1).bfloat16())
        for k in (0, 1)
    ]
    before = [w.detach().clone() for w in ws]
    opt = ZOSGD(ws, eps=1e-2, seed=0)
    seed = opt.new_seed()
    with opt.perturbed(seed, +1):
        addresses = [w.data_ptr() for w in ws]
        assert addresses == [w.data_ptr() for w in ws]  # one copy per parameter and evaluation
        seen = [read(w).clone() for w in ws]
    expected = [b.clone() for b in before]
    zokern.perturb_(expected, seed, 1e-2)
    assert all(torch.equal(a, b) for a, b in zip(seen, expected))
    assert all(torch.equal(w.detach(), b) for w, b in zip(ws, before))


def test_parameters_in_a_namedtuple_are_perturbed():
    from collections import namedtuple

    pair = namedtuple("pair", "a b")
    a, b = (torch.nn.Parameter(torch.linspace(-1, 1, 16).bfloat16()) for _ in range(2))
    opt = ZOSGD([a, b], eps=1e-2, seed=0)
    seed = opt.new_seed()
    with opt.perturbed(seed, +1):
        seen = torch.cat(pair(a, b)).detach().clone()  # torch.cat takes any tuple
    expected = [a.detach().clone(), b.detach().clone()]
    zokern.perturb_(expected, seed, 1e-2)
    assert torch.equal(seen, torch.cat(expected))


def test_a_perturbed_block_that_never_uses_a_parameter_is_an_error():
    # As step(): where an evaluation never reaches a parameter through torch (a scripted module), its loss is L(theta)
    # and the estimate silently 0.
    used = torch.nn.Parameter(torch.ones(4, dtype=torch.bfloat16))
    unused = torch.nn.Parameter(torch.ones(3, dtype=torch.bfloat16))
    opt = ZOSGD([used, unused], seed=0)
    with pytest.raises(ValueError, match=r"never passed 1 trainable parameter.*\['params'\]\[1\]"):
        with opt.perturbed(opt.new_seed(), +1):
            used.float().sum()
    assert torch.equal(used, torch.ones(4, dtype=torch.bfloat16))


def test_a_parameter_without_elements_need_not_reach_an_op():
    # It has nothing to perturb: the exact mode refused it as unused (bfloat16), where float32 trained.
    used = torch.nn.Parameter(torch.linspace(-1, 1, 6).bfloat16())
    empty = torch.nn.Parameter(torch.ones(0, dtype=torch.bfloat16))
    opt = ZOSGD([used, empty], lr=1e-2, seed=0)
    assert opt.exact()
    opt.step(lambda: (used.float() - 0.3).pow(2).sum())
    assert opt.steps_taken == 1 and not opt.trajectory[-1].get("raised")
    assert not torch.equal(used, torch.linspace(-1, 1, 6).bfloat16())


def test_two_parameters_over_one_storage_are_refused_before_any_forward():
    # The exact mode's first pass is the update: its overlap check came after both evaluations, which had seen the
    # two "tied" parameters perturbed by different parts of the stream. Tied before the optimizer is built: refused
    # by the constructor; tied after: by the step's first pass, before its first evaluation.
    a = torch.nn.Parameter(torch.linspace(-1, 1, 8).bfloat16())
    b = torch.nn.Parameter(a.data)
    with pytest.raises(ValueError, match=r"params\[0\] and params\[1\] overlap in memory"):
        ZOSGD([a, b], lr=1e-2, seed=0)
    b = torch.nn.Parameter(a.data.clone())
    opt = ZOSGD([a, b], lr=1e-2, seed=0)
    b.data = a.data
    calls = []
    with pytest.raises(ValueError, match=r"overlap in memory"):
        opt.step(lambda: (calls.append(1), (a.float() * b.float()).sum())[1])
    assert calls == []


# -------------------------------------------------------------------------------------- stochastic rounding


def _linear_problem(n=200_000, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, generator=g, dtype=torch.float64)
    theta = torch.nn.Parameter((torch.randn(n, generator=g) * 0.02).to(torch.bfloat16))
    return theta, lambda: (theta.double() * w).sum()


@pytest.mark.parametrize("rounding", ["stochastic", "nearest"])
def test_realised_update_projects_onto_the_intended_one(rounding):
    # Weights of rms 0.02 in bf16, updates of rms about 5e-6 (a tenth of their spacing or less). Stochastic rounding
    # is unbiased, so <realised, intended> / |intended|^2 averages to 1; round-to-nearest loses most of the update.
    theta, loss = _linear_problem()
    opt = ZOSGD([theta], lr=5e-6 / math.sqrt(theta.numel()), eps=1e-3, seed=7, rounding=rounding)
    ratios = []
    for _ in range(60):
        before = theta.detach().double().clone()
        opt.step(loss)
        rec = opt.trajectory[-1]
        z = zokern.gaussian(rec["seed"], 0, theta.numel()).double()
        intended = -rec["lr"][0] * rec["projected_grad"][0] * z
        realised = theta.detach().double() - before
        ratios.append(float((realised * intended).sum() / intended.pow(2).sum()))
    mean, standard_error = statistics.fmean(ratios), statistics.stdev(ratios) / math.sqrt(len(ratios))
    print(f"{rounding}: mean projection ratio {mean:.4f} (standard error {standard_error:.4f})")
    if rounding == "stochastic":
        assert standard_error < 0.005  # the 2 % criterion below is a sharp test, not a noise-wide one
        assert abs(mean - 1) < 0.02
    else:
        assert mean < 0.8


def test_many_tiny_updates_add_up_under_stochastic_rounding():
    # 20,000 bf16 weights at 1.5 (spacing u = 2^-7), each moved T = 200 times by +-0.1 u along a fixed Rademacher z:
    # the intended total is +-20 u. Each stochastic rounding lands 0.1 u or 0.9 u from x, so a step's rounding error
    # has variance q (1 - q) u^2 with q = 0.1, the total's variance T q (1 - q) u^2, and the mean over n weights of
    # the signed error has standard deviation u sqrt(T q (1 - q) / n). Round-to-nearest never moves a weight.
    n, steps, u = 20_000, 200, 2.0**-7
    q = 0.1
    for rounding in ("stochastic", "nearest"):
        theta = torch.full((n,), 1.5, dtype=torch.bfloat16)
        for t in range(steps):
            kwargs = dict(rounding_seed=1000 + t) if rounding == "stochastic" else {}
            zokern.perturb_(theta, 11, q * u, distribution="rademacher", rounding=rounding, **kwargs)
        z = zokern.rademacher(11, 0, n).double()
        intended = steps * q * u * z
        error = (theta.double() - 1.5 - intended) * z  # signed along the intended direction
        if rounding == "stochastic":
            sd = u * math.sqrt(steps * q * (1 - q) / n)
            assert abs(error.mean().item()) < 5 * sd
        else:
            assert torch.equal(theta, torch.full((n,), 1.5, dtype=torch.bfloat16))


def test_tiny_updates_of_weights_on_a_power_of_two_are_unbiased_in_both_directions():
    # bf16 weights at 1.0 moved T times by +-3e-8 (a quarter of float32's spacing above 1.0, half of the one below)
    # along a fixed Rademacher z. Rounding x = 1 +- 3e-8 to float32 first kept 1.0 upward (every upward update lost)
    # and doubled the downward ones (1 - 6e-8): each sign's mean signed error was T * 3e-8 = 3e-6, 10 standard
    # deviations. Stochastic rounding of the pass's exact result (docs/stream.md section 5) moves each group by its
    # intended total: a weight moves up by u = 2^-7 with probability 3e-8 / u (down: 2^-8, 3e-8 / 2^-8), so the
    # group mean's variance is T * 3e-8 * u / n.
    n, steps, alpha = 1 << 18, 100, 3e-8
    theta = torch.ones(n, dtype=torch.bfloat16)
    for t in range(steps):
        zokern.perturb_(theta, 11, alpha, distribution="rademacher", rounding="stochastic", rounding_seed=500 + t)
    z = zokern.rademacher(11, 0, n).double()
    for sign, spacing in ((1.0, 2.0**-7), (-1.0, 2.0**-8)):
        moved = theta.double()[z == sign] - 1.0
        sd = math.sqrt(steps * alpha * spacing / moved.numel())
        assert abs(moved.mean().item() - sign * steps * alpha) < 5 * sd, (sign, moved.mean().item(), sd)
        assert (moved != 0).any()


@pytest.mark.parametrize("rounding", ["stochastic", "nearest"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_zeros_and_infinities_keep_their_bits_where_no_term_changes_them(dtype, rounding):
    # A zero term (lr = 0, a zero coefficient) leaves a weight's bits: -0 stayed -0 (+0 - (-0) made it +0), and an
    # infinite weight stays infinite where weight_decay is 0 (its 0 * inf made it NaN at the first update, lr = 0
    # included): a trainable -inf mask, say.
    special = torch.tensor([-0.0, 0.0, math.inf, -math.inf, 1.5, -0.0], dtype=dtype)
    kwargs = dict(rounding=rounding, **({"rounding_seed": 9} if rounding == "stochastic" else {}))
    t = special.clone()
    zokern.perturb_(t, 3, 0.0, **kwargs)
    zokern.restore_update_(t, 3, 0.0, 0.0, 2.0, weight_decay=0.1, **kwargs)
    assert torch.equal(t.view(torch.int16), special.view(torch.int16))
    zokern.restore_update_(t, 3, 0.0, 1e-2, 2.0, **kwargs)  # weight_decay 0: inf stays inf
    assert torch.equal(t[2:4], special[2:4]) and t[4] != special[4]
    theta = torch.nn.Parameter(special.clone())
    opt = ZOSGD([theta], lr=0.0, eps=1e-3, seed=1, rounding=rounding)
    for _ in range(3):
        opt.step(lambda: (theta[4].double() - 1) ** 2)  # (the exact mode: theta is never written in the forwards)
    assert torch.equal(theta.detach().view(torch.int16), special.view(torch.int16))


# ----------------------------------------------------------------------------------------------- loss precision


def test_bf16_model_loss_differences_are_not_quantised_away():
    # The loss is reduced in float32 (transformers upcasts logits for the loss; zokern averages losses in float64),
    # so at eps = 1e-3 L+ - L- resolves far below the bf16 spacing of the loss (2^-6 near 4).
    model = tiny_opt(torch.bfloat16).eval()
    opt = ZOSGD(model.parameters(), lr=0.0, eps=1e-3, seed=6)
    closure = _closure(model, _batch())
    assert closure().dtype == torch.float32
    for _ in range(8):
        opt.step(closure)
    diffs = [r["losses"][0] - r["losses"][1] for r in opt.trajectory]
    spacing = 2.0 ** (math.floor(math.log2(opt.trajectory[0]["losses"][0])) - 7)
    assert all(d != 0 for d in diffs)
    assert any(abs(d) < spacing / 2 for d in diffs) or any(abs(d / spacing - round(d / spacing)) > 1e-3 for d in diffs)


def test_a_16bit_loss_is_warned_about():
    p = torch.nn.Parameter(torch.ones(8))
    opt = ZOSGD([p], seed=0)
    with pytest.warns(UserWarning, match="bfloat16 loss"):
        opt.step(lambda: (p * 3).sum().to(torch.bfloat16))


def _hand_perturbed_loss(model, forward, seed, eps):
    """The loss of a stock forward of a copy of ``model`` whose parameters hold round(theta + eps z(seed))."""
    import copy

    reference = copy.deepcopy(model)
    with torch.no_grad():
        offset = 0
        for p in reference.parameters():
            z = zokern.ops.gaussian(seed, offset, p.numel()).view(p.shape)
            p.copy_((p.float() + eps * z).to(p.dtype))
            offset += p.numel()
        return forward(reference).item()


class _TiedRenormedLM(torch.nn.Module):
    """nn.Embedding's max_norm renormalises looked-up rows of its weight in place; the tied head reads them after."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(50, 16, max_norm=1.0)
        self.head = torch.nn.Linear(16, 50, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, ids):
        return torch.nn.functional.cross_entropy(self.head(self.embed(ids)).float().flatten(0, 1), ids.flatten())


class _MaskedInForward(torch.nn.Module):
    """Writes its weight in the forward, each way a model does: through .data, in place under no_grad, by item."""

    def __init__(self, how):
        super().__init__()
        self.how = how
        self.weight = torch.nn.Parameter(torch.randn(8, 8, generator=torch.Generator().manual_seed(2)))
        self.register_buffer("mask", (torch.rand(8, 8, generator=torch.Generator().manual_seed(3)) > 0.5).float())

    def forward(self, x):
        w = self.weight
        with torch.no_grad():
            if self.how == "data":
                w.data *= self.mask
            elif self.how == "operator":
                self.weight *= 0.5  # a Parameter again after: Module.__setattr__ takes it
            elif self.how == "method":
                w.clamp_(-0.5, 0.5)
            elif self.how == "item":
                w[self.mask == 0] = 0
            elif self.how == "row-view":
                w[0].zero_()
            elif self.how == "flat-view":
                w.view(-1)[:20] = 0
            elif self.how == "data-view":
                w.data.view(-1)[5:30] = 0
            elif self.how == "transposed-slice":
                w.T[2:5].mul_(3)
            elif self.how == "detached":
                w.detach().narrow(0, 1, 3).zero_()
            elif self.how == "chunk":
                w.chunk(2)[1].zero_()
            elif self.how == "unbind":
                w.unbind(0)[3].fill_(0.5)
            elif self.how == "out-view":
                torch.mul(w[0], 2, out=w[0])
            elif self.how == "init-by-keyword":
                torch.nn.init.constant_(tensor=w, val=0.25)
            elif self.how == "foreach":
                torch._foreach_mul_([w], 0.5)
            elif self.how == "dtype-view":
                w.view(torch.int16)[0].zero_()
            elif self.how == "aten-overload":
                torch.ops.aten.mul_.Scalar(w, 0.5)
            elif self.how == "self-keyword":
                torch._foreach_mul_(self=[w], scalar=0.5)
            elif self.how == "input-keyword-view":
                torch.select(input=w, dim=0, index=2).zero_()
            elif self.how == "rebound-then-view":  # .data rebound to a transposed tensor, then written by row
                w.data = torch.arange(64.0).reshape(8, 8).t().bfloat16() / 64
                w.data[0].zero_()
            elif self.how == "alias-rebound":  # not a write: the alias alone gets other memory
                alias = w.detach()
                alias.data = torch.zeros_like(alias)
            elif self.how == "alias-transposed":  # not a write: the alias alone is transposed
                w.detach().t_()
            else:
                torch.nn.functional.relu(w, inplace=True)
        return torch.nn.functional.linear(x, self.weight).float().pow(2).mean()


WRITES = ["data", "operator", "method", "item", "row-view", "flat-view", "data-view", "transposed-slice", "detached"]
WRITES += ["chunk", "unbind", "out-view", "init-by-keyword", "foreach", "dtype-view"]
WRITES += ["aten-overload", "self-keyword", "input-keyword-view", "rebound-then-view"]
WRITES += ["alias-rebound", "alias-transposed"]  # not writes of the parameter, though in-place


@pytest.mark.parametrize("how", ["tied-max-norm", *WRITES, "inplace-function"])
def test_a_forward_that_writes_a_parameter_sees_its_write_on_the_perturbed_value(how):
    torch.manual_seed(0)
    if how == "tied-max-norm":
        model, batch = _TiedRenormedLM().bfloat16(), torch.randint(0, 50, (2, 6))
    else:
        model, batch = _MaskedInForward(how).bfloat16(), torch.randn(4, 8).bfloat16()
    start = [p.detach().clone() for p in model.parameters()]
    expected = _hand_perturbed_loss(model, lambda m: m(batch), seed=123, eps=1e-2)
    opt = ZOSGD(model.parameters(), lr=0.0, eps=1e-2, perturbation="exact")
    with torch.no_grad(), opt.perturbed(123, 1.0):
        got = model(batch).item()
    assert got == expected
    assert all(torch.equal(p, s) for p, s in zip(model.parameters(), start))  # theta itself is never written
    assert all(type(p) is torch.nn.Parameter for p in model.parameters())


def test_metadata_calls_are_not_a_use_of_a_parameter():
    """vmap (torch.func's ensembling) and TorchScript read a parameter's size() in the mode, then take its values
    outside it (as here, with torch function handling disabled): the step would see theta. The parameter must be
    reported as unused, not taken as perturbed."""
    w = torch.nn.Parameter(torch.randn(8, 8).bfloat16())
    x = torch.randn(4, 8).bfloat16()

    def closure():
        assert w.size(0) == 8 and w.dim() == 2 and w.numel() == 64 and w.is_contiguous()
        with torch._C.DisableTorchFunction():
            return (x @ w).float().pow(2).mean()

    opt = ZOSGD([w], lr=0.0, eps=1e-2, perturbation="exact")
    with pytest.raises(ValueError, match="never passed 1 trainable parameter"):
        opt.step(closure)


def test_a_read_only_data_alias_does_not_keep_its_copy_alive():
    """A forward that reads ``weight.data`` (and drops it) must not hold a perturbed copy for the whole evaluation:
    the extra memory stays what one op receives."""
    import weakref

    w = torch.nn.Parameter(torch.randn(64, 64).bfloat16())
    alive = []

    def closure():
        alias = w.data
        alive.append(weakref.ref(alias))
        loss = (alias @ torch.ones(64, dtype=torch.bfloat16)).float().pow(2).mean()
        del alias
        alive.append(alive[-1]() is not None)
        return loss + (w.sum() * 0).float()

    ZOSGD([w], lr=0.0, eps=1e-2, perturbation="exact").step(closure)
    assert alive[1::2] == [False, False]


@pytest.mark.parametrize("how", ["parameter", "data", "contiguous"])
def test_raw_memory_reached_through_an_alias_holds_the_perturbed_value(how):
    """``lib.f(ctypes.c_void_p(w.contiguous().data_ptr()))``: the pointer must stay valid and perturbed."""
    import ctypes

    w = torch.nn.Parameter((torch.randn(4096, generator=torch.Generator().manual_seed(0)) * 0.1).bfloat16())
    opt = ZOSGD([w], eps=1e-2, seed=0)
    seed = opt.new_seed()
    with opt.perturbed(seed, +1):
        address = {"parameter": w, "data": w.data, "contiguous": w.contiguous()}[how].data_ptr()
        churn = [torch.randn(4096).bfloat16() for _ in range(8)]  # memory freed copies would be reused for
        seen = torch.frombuffer((ctypes.c_uint16 * 4096).from_address(address), dtype=torch.bfloat16).clone()
    expected = w.detach().clone()
    zokern.perturb_([expected], seed, 1e-2)
    assert torch.equal(seen, expected) and len(churn) == 8


@pytest.mark.parametrize("cls, kwargs", [(ZOSGD, dict(momentum=0.9)), (ZOAdam, {})], ids=["momentum", "adam"])
def test_a_stochastically_rounded_host_update_writes_by_chunks_with_the_same_bits(cls, kwargs, monkeypatch):
    # The host-side updates (momentum, Adam) round their float32 result into 16-bit parameters by chunks, so their
    # temporaries stay bounded; the rounding bits are keyed by element index, so a chunked write changes no bit.
    from zokern.optim import base

    def start():
        g = torch.Generator().manual_seed(0)
        return [torch.nn.Parameter(torch.randn(n, generator=g).bfloat16()) for n in (2500, 7, 1024)]

    def run():
        params = start()
        opt = cls(params, lr=1e-2, eps=1e-2, seed=0, **kwargs)
        for _ in range(3):
            opt.step(lambda: sum((p.float() ** 2 * (k + 1)).sum() for k, p in enumerate(params)))
        return [p.detach() for p in params]

    whole = run()
    monkeypatch.setattr(base, "_ROUNDING_CHUNK", 1000)  # boundaries inside the first parameter, at odd offsets
    chunked = run()
    assert all(torch.equal(a.view(torch.int16), b.view(torch.int16)) for a, b in zip(whole, chunked))
    assert not torch.equal(whole[0], start()[0].detach())  # the updates did write


class _CachedAliasLM(torch.nn.Module):
    """A tied head read through a tensor made from the embedding's weight once, before any step (a cached transpose,
    as a model might keep for speed): a plain tensor over theta's memory, which no op receives as the parameter."""

    def __init__(self, how):
        super().__init__()
        self.emb, self.how = torch.nn.Embedding(20, 8), how

    def cache(self):
        w = self.emb.weight
        self.head = {"view": w.t(), "detach": w.detach().t(), "data": w.data.t(), "rows": w.detach()[2:12]}[self.how]

    def forward(self, tokens):
        hidden = torch.tanh(self.emb(tokens))
        head = self.head if self.how != "rows" else self.head.t()
        out = hidden @ head
        if self.how == "detach":  # a write through the alias: to the evaluation's copy, seen after, never theta
            self.head.mul_(0.5)
            out = out + hidden @ self.head
        return out.float().logsumexp(-1).mean()


@pytest.mark.parametrize("how", ["view", "detach", "data", "rows"])
def test_a_tensor_made_from_a_parameter_before_the_step_reads_the_perturbed_value(how):
    # It read theta: the tied head was evaluated unperturbed at both theta + eps z and theta - eps z, and g came out
    # 0.45 of the true one (a review's repro), silently, since the parameter itself reached an op too.
    tokens = torch.randint(0, 20, (4, 6), generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    model = _CachedAliasLM(how).bfloat16()
    model.cache()
    start = model.emb.weight.detach().clone()
    reference = _CachedAliasLM(how).bfloat16()
    with torch.no_grad():
        z = zokern.ops.gaussian(123, 0, start.numel()).view(start.shape)
        reference.emb.weight.copy_((start.float() + 1e-2 * z).bfloat16())
    reference.cache()
    opt = ZOSGD(model.parameters(), lr=0.0, eps=1e-2, perturbation="exact")
    with torch.no_grad(), opt.perturbed(123, 1.0):
        got = model(tokens).item()
    assert got == reference(tokens).item()
    assert torch.equal(model.emb.weight, start)  # theta itself is never written, also through the alias
