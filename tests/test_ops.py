"""The public ops: multi-tensor offsets, composition into a MeZO step, device-side g, dispatch, bad input."""

import math

import pytest
import torch
from helpers import DEVICE
from helpers import DTYPES
from helpers import Z_ATOL
from helpers import assert_matches_reference
from helpers import backends_for
from helpers import random_params
from torch.testing._internal.two_tensor import TwoTensor

import zokern
from zokern import _reference
from zokern import _scalars

BACKENDS = backends_for()
SIZES = (0, 1, 7, 129, 300)  # empty, single, odd, straddling the 8- and 128-element Philox groups
EPS = 1e-3


def _copy(ts):
    return [t.clone() for t in ts]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("distribution", ["gaussian", "rademacher"])
def test_list_equals_each_tensor_at_its_offset(backend, distribution):
    params = random_params(SIZES, torch.float32)
    together, apart = _copy(params), _copy(params)
    zokern.perturb_(together, 11, EPS, offset=5, distribution=distribution, backend=backend)
    start = 5
    for t in apart:
        zokern.perturb_([t], 11, EPS, offset=start, distribution=distribution, backend=backend)
        start += t.numel()
    for a, b in zip(together, apart):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
def test_offsets_place_each_tensor_anywhere_in_the_stream(backend):
    # An optimizer's trainable tensors with frozen ones between them: each at its own offset, in one call.
    params = random_params(SIZES, torch.float32)
    offsets = [2**40 + 7, 3, 1000, 2**33, 129]
    together = _copy(params)
    zokern.restore_update_(together, 11, EPS, 0.1, 0.5, offsets=offsets, backend=backend)
    for t, offset in zip(params, offsets):
        zokern.restore_update_([t], 11, EPS, 0.1, 0.5, offset=offset, backend=backend)
    assert all(torch.equal(a, b) for a, b in zip(together, params))


@pytest.mark.parametrize("backend", BACKENDS)
def test_perturb_adds_alpha_times_the_stream(backend):
    params = random_params(SIZES, torch.float32)
    out = _copy(params)
    zokern.perturb_(out, 3, 0.5, offset=100, backend=backend)
    z = zokern.gaussian(3, 100, sum(SIZES), backend="torch", device=DEVICE)
    expected = torch.cat([p.double() for p in params]) + 0.5 * _reference.stream(3, 100, sum(SIZES), "gaussian")
    got = torch.cat([t.double() for t in out]).cpu()
    assert (got - expected).abs().max() <= 0.5 * Z_ATOL + 1e-6
    assert z.dtype == torch.float32


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_mezo_step_in_three_passes_matches_reference(backend, dtype):
    params = random_params((257, 64), dtype)
    ours, ref = _copy(params), _copy(params)
    seed, lr, g, wd = 99, 0.1, 0.75, 0.01
    for ts, be in ((ours, backend), (ref, "torch")):
        zokern.perturb_(ts, seed, EPS, backend=be)
        zokern.perturb_(ts, seed, -2 * EPS, backend=be)
        zokern.restore_update_(ts, seed, EPS, lr, g, weight_decay=wd, backend=be)
    for o, r in zip(ours, ref):
        assert_matches_reference(o, r, alpha_scale=3 * EPS + lr * g)
    if dtype == torch.float32:  # the step itself: theta - lr (g z + wd theta)
        theta = torch.cat([p.double() for p in params]).cpu()
        z = _reference.stream(seed, 0, theta.numel(), "gaussian")
        got = torch.cat([o.double() for o in ours]).cpu()
        assert (got - (theta - lr * (g * z + wd * theta))).abs().max() < 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
def test_device_grad_updates_like_a_float(backend):
    params = random_params((50, 9), torch.float32)
    a, b = _copy(params), _copy(params)
    zokern.restore_update_(a, 5, EPS, 0.2, 0.3, backend=backend)
    flag = zokern.restore_update_(b, 5, EPS, 0.2, torch.tensor(0.3, device=DEVICE), backend=backend)
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    assert flag is not None and not bool(flag)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", [math.inf, -math.inf, math.nan])
def test_nonfinite_device_grad_restores_without_update_and_sets_flag(backend, bad):
    params = random_params((40, 200), torch.float32)
    restored, updated = _copy(params), _copy(params)
    zokern.perturb_(restored, 8, EPS, backend=backend)  # restore-only: the result of perturb(+eps)
    found = torch.zeros((), device=DEVICE)
    flag = zokern.restore_update_(
        updated,
        8,
        EPS,
        0.5,
        torch.tensor(bad, device=DEVICE),
        weight_decay=0.1,
        found_nonfinite=found,
        backend=backend,
    )
    for x, y in zip(restored, updated):
        assert torch.equal(x, y)
    assert bool(flag) and float(found) == 1.0
    flag_bool = torch.zeros((), dtype=torch.bool, device=DEVICE)
    zokern.restore_update_(updated, 8, 0.0, 0.5, torch.tensor(1.0, device=DEVICE), found_nonfinite=flag_bool)
    assert not bool(flag_bool)  # a finite g never clears or sets it


@pytest.mark.parametrize("backend", BACKENDS)
def test_two_seed_pass_equals_two_perturbations(backend):
    params = random_params((77, 130), torch.float32)
    fused, split = _copy(params), _copy(params)
    zokern.two_seed_(fused, 1, 0.25, 2, -0.5, offset=3, backend=backend)
    zokern.perturb_(split, 1, 0.25, offset=3, backend=backend)
    zokern.perturb_(split, 2, -0.5, offset=3, backend=backend)
    for x, y in zip(fused, split):
        torch.testing.assert_close(x, y, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_restore_update_fuses_next_perturbation(backend):
    params = random_params((90,), torch.float32)
    fused, split = _copy(params), _copy(params)
    zokern.restore_update_(fused, 4, EPS, 0.1, 0.5, next_seed=5, next_alpha=EPS, backend=backend)
    zokern.restore_update_(split, 4, EPS, 0.1, 0.5, backend=backend)
    zokern.perturb_(split, 5, EPS, backend=backend)
    torch.testing.assert_close(fused[0], split[0], atol=1e-7, rtol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_stream_functions_are_pure_and_typed(backend):
    a = zokern.gaussian(7, 2**40 + 3, 33, backend=backend, device=DEVICE)
    b = zokern.gaussian(7, 2**40, 40, backend=backend, device=DEVICE)[3:36]
    assert torch.equal(a, b)
    r = zokern.rademacher(7, 5, 300, dtype=torch.bfloat16, backend=backend, device=DEVICE)
    assert r.dtype == torch.bfloat16 and set(r.float().unique().tolist()) == {-1.0, 1.0}
    assert zokern.gaussian(7, 0, 0, backend=backend).numel() == 0


def test_stochastic_rounding_defaults_to_a_fresh_seed_each_pass():
    x = torch.full((4000,), 1.0 + 2**-9, dtype=torch.float32)  # halfway between two bf16 neighbours
    a, b = x.to(torch.bfloat16), x.to(torch.bfloat16)
    zokern.perturb_(a, 1, 2**-9, rounding="stochastic")
    zokern.perturb_(b, 1, 2**-9, rounding="stochastic")
    assert not torch.equal(a, b)


@pytest.mark.parametrize(
    "call",
    [
        lambda x: zokern.perturb_(x, 1, 1e-3, rounding="stochastic", backend="gpu"),
        lambda x: zokern.two_seed_(x, 1, 1e-3, 2, 1e-3, rounding="stochastic", backend="no-such"),
        lambda x: zokern.restore_update_(
            x, 1, 1e-3, 0.1, 0.5, rounding="stochastic", scalars=torch.tensor(_scalars.pack(seed=1, alpha=1.0))[:7]
        ),
        lambda x: zokern.perturb_(
            x, 1, 1e-3, rounding="stochastic", scalars=torch.tensor(_scalars.pack(seed=1, alpha=1.0)).fill_(-1)
        ),
    ],
    ids=["backend", "two-seed-backend", "row-shape", "row-values"],
)
def test_a_refused_stochastic_pass_draws_nothing_from_torchs_generator(call):
    # Its rounding seed is drawn after every check: a refused call must not shift a seeded run's later draws.
    x = torch.randn(64).bfloat16()
    before = x.clone()
    state = torch.get_rng_state()
    with pytest.raises((ValueError, TypeError, RuntimeError)):
        call(x)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(x, before)


# ------------------------------------------------------------------------------------------------ dispatch


def test_available_backends_and_status():
    status = zokern.backend_status()
    assert set(status) == {"cuda", "triton", "cpu", "torch"}
    assert status["torch"] == "available"
    assert zokern.available_backends() == [n for n, s in status.items() if s == "available"]
    for name, state in status.items():
        assert state == "available" or len(state) > 10, name  # an unavailable backend says why


def test_unavailable_backend_is_a_clear_error():
    unavailable = [n for n, s in zokern.backend_status().items() if s != "available"]
    if not unavailable:
        pytest.skip("every backend is available here")
    t = random_params((10,), torch.float32)
    before = _copy(t)
    with pytest.raises(RuntimeError, match=f"backend '{unavailable[0]}' is unavailable"):
        zokern.perturb_(t, 1, EPS, backend=unavailable[0])
    assert torch.equal(t[0], before[0])


def test_environment_variable_forces_a_backend(monkeypatch):
    monkeypatch.setenv("ZOKERN_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="environment variable ZOKERN_BACKEND"):
        zokern.perturb_(random_params((3,), torch.float32), 1, EPS)
    monkeypatch.setenv("ZOKERN_BACKEND", "torch")
    t = random_params((9,), torch.float32)
    u = _copy(t)
    zokern.perturb_(t, 1, EPS)
    zokern.perturb_(u, 1, EPS, backend="torch")
    assert torch.equal(t[0], u[0])


def test_a_resolved_choice_still_follows_the_environment(monkeypatch):
    """select_backend caches what it resolved; the environment variables are part of what it is keyed on."""
    from zokern import _dispatch
    from zokern import _reference

    cpu = torch.device("cpu")
    automatic = _dispatch.select_backend(cpu)
    assert _dispatch.select_backend(cpu) is automatic
    monkeypatch.setenv("ZOKERN_BACKEND", "torch")
    assert _dispatch.select_backend(cpu) is _reference
    monkeypatch.delenv("ZOKERN_BACKEND")
    assert _dispatch.select_backend(cpu) is automatic


def test_the_cuda_backend_offers_only_ops_with_a_cuda_kernel():
    """Asked for an op on a GPU, the cuda backend comes first: it must answer None (next backend) for the passes it
    lacks, whether the extension registers them for the CPU only or not at all, rather than raise."""
    from zokern import _dispatch
    from zokern import _native

    for op in ("ldsd_move_", "ldsd_squared_norm", "ldsd_final_", "zopro_reduce", "zopro_apply_", "no_such_pass_"):
        assert not _native.cuda_kernel_for(op), op
        assert _dispatch._module("cuda", op) is None, op
    if _native.cuda_kernel_for("zo_pass_"):  # an extension built with CUDA kernels
        assert _dispatch._module("cuda", "zo_copy_pass_") is not None


def test_the_cuda_backend_offers_its_functions_by_their_ops(monkeypatch):
    """A function is looked up by the torch op it calls, whose name may differ: the stochastic-rounding words
    (philox_block_words, over zokern::philox_words_) come from the CUDA kernels of an extension that has them."""
    from zokern import _dispatch
    from zokern import _native

    if _native.LOAD_ERROR is not None:
        pytest.skip(f"the extension did not load: {_native.LOAD_ERROR}")
    with_cuda_kernels = {"zo_pass_", "zo_copy_pass_", "philox_words_"}  # csrc/cuda/bindings.cpp registers these
    assert all(hasattr(torch.ops.zokern, op) for op in with_cuda_kernels)
    monkeypatch.setattr(_native, "cuda_kernel_for", lambda op: op in with_cuda_kernels)
    for function in ("zo_pass_", "zo_copy_pass_", "philox_block_words"):
        module = _dispatch._module("cuda", function)
        assert module is not None and hasattr(module, function), function


OPS = (
    "zo_pass_",
    "zo_copy_pass_",
    "philox_block_words",
    "ldsd_move_",
    "ldsd_squared_norm",
    "ldsd_final_",
    "zopro_reduce",
    "zopro_apply_",
)


@pytest.mark.parametrize("requested", [None, "cuda", "triton"])
def test_every_pass_resolves_on_a_gpu_machine(monkeypatch, requested):
    """The resolution a GPU machine makes (every backend available, a CUDA device), run here with the status
    pretended: each op the package asks for gets a module that has it."""
    from zokern import _dispatch

    pytest.importorskip("triton")
    monkeypatch.setattr(_dispatch, "backend_status", lambda: dict.fromkeys(_dispatch.BACKENDS, "available"))
    monkeypatch.setattr(_dispatch, "_selected", {})
    for op in OPS:
        module = _dispatch.select_backend(torch.device("cuda", 0), requested, op=op)
        assert hasattr(module, op), (op, module.__name__)


# ---------------------------------------------------------------------------------------------- bad input


def _good():
    return random_params((5, 6), torch.float32)


def _inference_tensor():
    with torch.inference_mode():
        return torch.rand(3, device=DEVICE)


BAD_CALLS = [
    ("int tensor", lambda ts: zokern.perturb_(ts + [torch.arange(3)], 1, EPS), TypeError, r"tensors\[2\].*int64"),
    (
        "float64",
        lambda ts: zokern.perturb_(ts + [torch.rand(3, dtype=torch.float64)], 1, EPS),
        TypeError,
        r"tensors\[2\].*float64",
    ),
    ("not a tensor", lambda ts: zokern.perturb_(ts + [[1.0]], 1, EPS), TypeError, r"tensors\[2\] is a list"),
    # A set's order (by id) changes between runs, and with it each tensor's slice of the stream.
    ("a set", lambda ts: zokern.perturb_(set(ts), 1, EPS), TypeError, r"tensors must be an ordered .* got a set"),
    ("a set of offsets", lambda ts: zokern.perturb_(ts, 1, EPS, offsets={0, 9}), TypeError, r"offsets must be a list"),
    (
        "sets into",
        lambda ts: zokern.perturb_into_([t.clone() for t in ts], frozenset(ts), 1, EPS),
        TypeError,
        r"must be an ordered collection of tensors .* got a frozenset",
    ),
    (
        "two devices",
        lambda ts: zokern.perturb_(ts + [torch.empty(2, device="meta")], 1, EPS),
        ValueError,
        r"tensors\[2\] is on meta",
    ),
    (
        "non-contiguous",
        lambda ts: zokern.perturb_(ts + [torch.rand(4, 3).t()], 1, EPS),
        ValueError,
        r"tensors\[2\].*not contiguous",
    ),
    ("same tensor twice", lambda ts: zokern.perturb_(ts + [ts[0]], 1, EPS), ValueError, r"overlap"),
    ("overlapping views", lambda ts: zokern.perturb_([ts[1][:4], ts[1][2:]], 1, EPS), ValueError, r"overlap"),
    ("negative seed", lambda ts: zokern.perturb_(ts, -1, EPS), ValueError, r"seed must be in \[0, 2\^63\)"),
    ("seed 2^63", lambda ts: zokern.perturb_(ts, 2**63, EPS), ValueError, r"seed"),
    ("float seed", lambda ts: zokern.perturb_(ts, 1.5, EPS), TypeError, r"seed must be an integer"),
    ("bool seed", lambda ts: zokern.perturb_(ts, True, EPS), TypeError, r"seed"),
    ("negative offset", lambda ts: zokern.perturb_(ts, 1, EPS, offset=-4), ValueError, r"offset"),
    ("offset past 2^63", lambda ts: zokern.perturb_(ts, 1, EPS, offset=2**63 - 5), ValueError, r"exceeds"),
    ("offset and offsets", lambda ts: zokern.perturb_(ts, 1, EPS, offset=3, offsets=[0, 9]), ValueError, r"not both"),
    ("offsets too short", lambda ts: zokern.perturb_(ts, 1, EPS, offsets=[0]), ValueError, r"1 entries for 2"),
    ("negative offsets", lambda ts: zokern.perturb_(ts, 1, EPS, offsets=[0, -1]), ValueError, r"offsets\[1\]"),
    ("offsets past 2^63", lambda ts: zokern.perturb_(ts, 1, EPS, offsets=[0, 2**63 - 2]), ValueError, r"exceeds"),
    ("float offsets", lambda ts: zokern.perturb_(ts, 1, EPS, offsets=[0, 2.0]), TypeError, r"offsets\[1\] must be"),
    (
        "overlap across an empty tensor",
        lambda ts: zokern.perturb_([ts[1][:4], ts[0][:0], ts[1][3:]], 1, EPS),
        ValueError,
        r"tensors\[0\] and tensors\[2\] overlap",
    ),
    (
        "prepared set and offsets",
        lambda ts: zokern.perturb_(zokern.prepare(ts), 1, EPS, offsets=[0, 30]),
        ValueError,
        r"carries its stream offsets",
    ),
    (
        "prepared set out of place",
        lambda ts: zokern.perturb_into_(zokern.prepare(ts), [t.clone() for t in ts], 1, EPS),
        TypeError,
        r"not a PreparedTensors",
    ),
    ("nan alpha", lambda ts: zokern.perturb_(ts, 1, math.nan), ValueError, r"alpha must be finite"),
    ("alpha beyond any float", lambda ts: zokern.perturb_(ts, 1, 10**400), ValueError, r"alpha must be finite"),
    (
        "inference flag",
        lambda ts: zokern.restore_update_(
            ts, 1, EPS, 0.1, torch.tensor(1.0, device=DEVICE), found_nonfinite=_inference_tensor()[:1]
        ),
        ValueError,
        r"found_nonfinite is an inference tensor",
    ),
    ("scalars, no tensors", lambda ts: zokern.perturb_([], 1, EPS, scalars=torch.zeros(3)), ValueError, r"scalars"),
    (
        "inference output",
        lambda ts: zokern.perturb_into_([_inference_tensor()], [ts[0][:3]], 1, EPS),
        ValueError,
        r"out\[0\] is an inference tensor",
    ),
    ("inf alpha", lambda ts: zokern.perturb_(ts, 1, math.inf), ValueError, r"alpha must be finite"),
    ("tensor alpha", lambda ts: zokern.perturb_(ts, 1, torch.tensor(1.0)), TypeError, r"alpha.*only grad"),
    ("nan lr", lambda ts: zokern.restore_update_(ts, 1, EPS, math.nan, 1.0), ValueError, r"lr must be finite"),
    ("inf grad", lambda ts: zokern.restore_update_(ts, 1, EPS, 0.1, math.inf), ValueError, r"grad must be finite"),
    (
        "cpu nan grad tensor",
        lambda ts: (
            zokern.restore_update_(ts, 1, EPS, 0.1, torch.tensor(math.nan))
            if DEVICE != "cpu"
            else zokern.restore_update_(ts, 1, EPS, 0.1, math.nan)
        ),
        ValueError,
        r"grad must be finite",
    ),
    (
        "grad of two elements",
        lambda ts: zokern.restore_update_(ts, 1, EPS, 0.1, torch.ones(2, device=DEVICE)),
        ValueError,
        r"one element",
    ),
    (
        "int grad tensor",
        lambda ts: zokern.restore_update_(ts, 1, EPS, 0.1, torch.tensor(1, device=DEVICE)),
        ValueError,
        r"floating",
    ),
    (
        "nan weight decay",
        lambda ts: zokern.restore_update_(ts, 1, EPS, 0.1, 1.0, weight_decay=math.nan),
        ValueError,
        r"weight_decay",
    ),
    ("bad next seed", lambda ts: zokern.restore_update_(ts, 1, EPS, 0.1, 1.0, next_seed=-2), ValueError, r"next_seed"),
    (
        "bad flag",
        lambda ts: zokern.restore_update_(
            ts, 1, EPS, 0.1, torch.tensor(1.0, device=DEVICE), found_nonfinite=torch.zeros(3, device=DEVICE)
        ),
        ValueError,
        r"found_nonfinite",
    ),
    (
        "flag not a tensor",
        lambda ts: zokern.restore_update_(ts, 1, EPS, 0.1, torch.tensor(1.0, device=DEVICE), found_nonfinite=False),
        TypeError,
        r"found_nonfinite must be a tensor",
    ),
    (
        "int flag",
        lambda ts: zokern.restore_update_(
            ts,
            1,
            EPS,
            0.1,
            torch.tensor(1.0, device=DEVICE),
            found_nonfinite=torch.zeros((), dtype=torch.int32, device=DEVICE),
        ),
        TypeError,
        r"bool or floating",
    ),
    (
        "next alpha without next seed",
        lambda ts: zokern.restore_update_(ts, 1, EPS, 0.1, 1.0, next_alpha=EPS),
        ValueError,
        r"next_alpha=.* needs next_seed",
    ),
    (
        "copy: next alpha without next seed",
        lambda ts: zokern.perturb_into_([torch.empty_like(t) for t in ts], ts, 1, EPS, next_alpha=EPS),
        ValueError,
        r"needs next_seed",
    ),
    (
        "inference tensor",
        lambda ts: zokern.perturb_(ts + [_inference_tensor()], 1, EPS),
        ValueError,
        r"tensors\[2\] is an inference tensor",
    ),
    ("nan b", lambda ts: zokern.two_seed_(ts, 1, EPS, 2, math.nan), ValueError, r"b must be finite"),
    # Finite in float64 but infinite in the float32 the passes compute in: would write inf, or skip the update.
    ("alpha over float32", lambda ts: zokern.perturb_(ts, 1, -1e39), ValueError, r"alpha must be finite in float32"),
    ("grad over float32", lambda ts: zokern.restore_update_(ts, 1, EPS, 0.1, 1e39), ValueError, r"grad must be finite"),
    ("lr over float32", lambda ts: zokern.restore_update_(ts, 1, EPS, 3.5e38, 1.0), ValueError, r"lr must be finite"),
    ("bad seed2", lambda ts: zokern.two_seed_(ts, 1, EPS, 2**64, EPS), ValueError, r"seed2"),
    (
        "distribution",
        lambda ts: zokern.perturb_(ts, 1, EPS, distribution="uniform"),
        ValueError,
        r"distribution must be one of",
    ),
    ("rounding", lambda ts: zokern.perturb_(ts, 1, EPS, rounding="up"), ValueError, r"rounding must be one of"),
    (
        "tensor subclass",
        lambda ts: zokern.perturb_([ts[0], TwoTensor(ts[1], ts[1].clone())], 1, EPS),
        TypeError,
        r"tensors\[1\] is a TwoTensor: zokern's passes read and write a tensor's own memory",
    ),
    ("rounding seed without SR", lambda ts: zokern.perturb_(ts, 1, EPS, rounding_seed=3), ValueError, r"rounding_seed"),
    (
        "bad rounding seed",
        lambda ts: zokern.perturb_(ts, 1, EPS, rounding="stochastic", rounding_seed=-3),
        ValueError,
        r"rounding_seed",
    ),
    (
        "unknown backend",
        lambda ts: zokern.perturb_(ts, 1, EPS, backend="gpu"),
        ValueError,
        r"unknown zokern backend 'gpu'",
    ),
    (
        "backend of another device",
        lambda ts: zokern.perturb_(ts, 1, EPS, backend="cuda" if DEVICE == "cpu" else "cpu"),
        (RuntimeError, ValueError),
        r"backend 'c(uda|pu)' (is unavailable|cannot run)",
    ),
]


@pytest.mark.parametrize(
    "call",
    [
        lambda: zokern.perturb_([torch.zeros(0)], 1, EPS, backend="gpu"),
        lambda: zokern.perturb_into_([torch.zeros(0)], [torch.zeros(0)], 1, EPS, backend="gpu"),
        lambda: zokern.gaussian(1, 0, 0, backend="gpu"),
    ],
    ids=["perturb_", "perturb_into_", "gaussian"],
)
def test_an_unknown_backend_is_refused_when_there_is_nothing_to_write(call):
    with pytest.raises(ValueError, match=r"unknown zokern backend 'gpu'"):
        call()


@pytest.mark.parametrize("call,exc,match", [c[1:] for c in BAD_CALLS], ids=[c[0] for c in BAD_CALLS])
def test_bad_input_raises_before_touching_tensors(call, exc, match):
    tensors = _good()
    before = _copy(tensors)
    with pytest.raises(exc, match=match):
        call(tensors)
    for t, b in zip(tensors, before):
        assert torch.equal(t, b)


def test_meta_tensors_are_refused_as_holding_no_values():
    """A pass over them did nothing, silently (and all their data_ptrs are 0: they are not "overlapping")."""
    metas = [torch.empty(3, device="meta"), torch.empty(4, device="meta")]
    for run in (lambda: zokern.perturb_(metas, 1, EPS), lambda: zokern.restore_update_(metas, 1, EPS, 0.1, 1.0)):
        with pytest.raises(ValueError, match=r"tensors\[0\] is on the meta device: it holds no values"):
            run()


def test_a_flag_that_requires_grad_is_set():
    flag = torch.zeros((), device=DEVICE, requires_grad=True)
    zokern.restore_update_(_good(), 1, EPS, 0.1, torch.tensor(math.nan, device=DEVICE), found_nonfinite=flag)
    assert flag.item() == 1.0


def test_inference_tensors_are_updated_in_inference_mode():
    tensor = _inference_tensor()
    before = tensor.clone()
    with torch.inference_mode():
        zokern.perturb_(tensor, 1, EPS)
    assert not torch.equal(tensor, before)


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        (dict(seed=-1, start=0, count=3), ValueError, "seed"),
        (dict(seed=1, start=-1, count=3), ValueError, "start"),
        (dict(seed=1, start=0, count=-3), ValueError, "count"),
        (dict(seed=1, start=2**63 - 2, count=3), ValueError, "exceeds"),
        (dict(seed=1, start=0, count=3, dtype=torch.int32), TypeError, "dtype"),
    ],
)
def test_stream_functions_reject_bad_arguments(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        zokern.gaussian(**kwargs)


# ------------------------------------------------------------------------------------------- prepared sets


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_prepared_set_passes_as_its_tensors_do(backend):
    # Mixed dtypes, an empty tensor and explicit offsets: the set keeps the offsets and the per-dtype split.
    params = random_params((5, 0, 129, 300), torch.float32)
    params[2] = params[2].to(torch.bfloat16)
    params[3] = params[3].to(torch.float16)
    offsets = [2**40, 7, 1000, 2**33]
    prepared, plain = _copy(params), _copy(params)
    tensors = zokern.prepare(prepared, offsets=offsets)
    assert len(tensors) == 4 and "4 tensors, 434 elements" in repr(tensors)
    grad = torch.tensor(0.75, device=DEVICE)
    for ts, kwargs in ((tensors, {}), (plain, dict(offsets=offsets))):
        zokern.perturb_(ts, 3, EPS, backend=backend, **kwargs)
        zokern.two_seed_(ts, 3, -2 * EPS, 4, EPS, backend=backend, **kwargs)
        zokern.restore_update_(ts, 4, -EPS, 0.1, grad, next_seed=5, next_alpha=EPS, backend=backend, **kwargs)
    assert all(torch.equal(a, b) for a, b in zip(prepared, plain))
    assert not torch.equal(prepared[0], params[0])


def _changes():
    """Ways a prepared parameter stops being the tensor that was validated, each on parameter 1 of three."""
    return [
        ("new storage (p.data = ...)", lambda p: setattr(p, "data", p.data.clone())),
        ("fewer elements, same storage", lambda p: setattr(p, "data", p.data[:3])),
        ("transposed, same storage", lambda p: setattr(p, "data", p.data.t())),
        ("a module's .to()", lambda p: setattr(p, "data", p.data.to(torch.bfloat16))),
        ("another dtype, same storage", lambda p: setattr(p.requires_grad_(False), "data", p.data.view(torch.int32))),
    ]


@pytest.mark.parametrize("change", [c[1] for c in _changes()], ids=[c[0] for c in _changes()])
def test_a_prepared_set_refuses_tensors_changed_since(change):
    params = [torch.nn.Parameter(t) for t in random_params((4, 4), torch.float32)]
    params.insert(1, torch.nn.Parameter(torch.rand(4, 6, device=DEVICE)))
    tensors = zokern.prepare(params)
    change(params[1])
    before = _copy(params)
    with pytest.raises(ValueError, match=r"tensors\[1\] changed since zokern.ops.prepare"):
        with torch.no_grad():
            zokern.perturb_(tensors, 1, EPS)
    assert all(torch.equal(a, b) for a, b in zip(params, before))  # refused before any write
    with torch.no_grad():
        again = zokern.prepare([p for p in params if p.is_contiguous() and p.is_floating_point()])
        zokern.perturb_(again, 1, EPS)  # prepared again: runs


def test_a_prepared_set_follows_the_values_of_its_tensors():
    # It holds the tensors, not a copy: in-place changes between passes are what the next pass updates.
    params = random_params((6, 9), torch.float32)
    tensors = zokern.prepare(params, offset=40)
    for t in params:
        t.mul_(2.0)
    expected = _copy(params)
    zokern.perturb_(expected, 8, EPS, offset=40)
    zokern.perturb_(tensors, 8, EPS)
    assert all(torch.equal(a, b) for a, b in zip(params, expected))


def test_a_prepared_set_of_inference_tensors_runs_only_in_inference_mode():
    tensor = _inference_tensor()
    with torch.inference_mode():
        tensors = zokern.prepare([tensor])
    with pytest.raises(ValueError, match="inference tensor"):
        zokern.perturb_(tensors, 1, EPS)
    with torch.inference_mode():
        zokern.perturb_(tensors, 1, EPS)


def test_prepare_checks_as_the_passes_do():
    with pytest.raises(ValueError, match="not contiguous"):
        zokern.prepare([torch.rand(4, 3).t()])
    with pytest.raises(ValueError, match="overlap"):
        zokern.prepare([torch.rand(4)] * 2)
    with pytest.raises(TypeError, match="already a PreparedTensors"):
        zokern.prepare(zokern.prepare([torch.rand(4)]))
    empty = zokern.prepare([])
    zokern.perturb_(empty, 1, EPS)
    assert zokern.restore_update_(empty, 1, EPS, 0.1, 1.0) is None


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_pass_counts_as_an_in_place_write_for_autograd(backend):
    # The kernels write through pointers; autograd must still see the write, or backward would use the new values.
    weight = torch.nn.Parameter(torch.rand(4, device=DEVICE))
    data = torch.rand(4, device=DEVICE)
    loss = (weight * data).sum()  # saves data for backward
    zokern.perturb_([data], 1, EPS, backend=backend)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_one_source_may_feed_several_outputs():
    source = torch.rand(7, device=DEVICE)
    outs = [torch.empty(7, device=DEVICE), torch.empty(7, device=DEVICE)]
    zokern.perturb_into_(outs, [source, source], 3, EPS, offsets=[0, 7])
    torch.testing.assert_close(outs[0], source + EPS * zokern.gaussian(3, 0, 7, device=DEVICE), atol=1e-7, rtol=0)
    torch.testing.assert_close(outs[1], source + EPS * zokern.gaussian(3, 7, 7, device=DEVICE), atol=1e-7, rtol=0)
    with pytest.raises(ValueError, match="the outputs overlap a source"):
        zokern.perturb_into_([source[:3]], [source[2:5]], 3, EPS)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_grad_read_from_the_written_memory_is_its_value_before_the_pass(backend):
    buffer = torch.rand(2, 300, device=DEVICE)
    aliased, separate = buffer.clone(), buffer.clone()
    zokern.restore_update_([aliased[0], aliased[1]], 5, EPS, 0.1, aliased[0, :1], backend=backend)
    zokern.restore_update_([separate[0], separate[1]], 5, EPS, 0.1, buffer[0, :1].clone(), backend=backend)
    assert torch.equal(aliased, separate)


@pytest.mark.parametrize("distribution", ["gaussian", "rademacher"])
@pytest.mark.parametrize("zero", [-0.0, -1e-50, -(2.0**-150), 2.0**-150])
def test_a_scalar_that_rounds_to_a_float32_zero_is_plus_zero_on_every_backend(distribution, zero):
    """docs/stream.md section 5: a scalar that rounds to a float32 zero (-0.0; a tiny value, which float32 rounds to
    a signed zero) is taken as +0.0 (Triton's interpreter cannot pass -0.0 to a kernel), so signed zeros come out
    alike everywhere."""
    results = []
    for backend in BACKENDS:
        t = torch.tensor([-0.0, 0.0] * 8)
        zokern.perturb_(t, 3, zero, distribution=distribution, backend=backend)
        results.append(t.view(torch.int32))
        plus = torch.tensor([-0.0, 0.0] * 8)
        zokern.perturb_(plus, 3, 0.0, distribution=distribution, backend=backend)
        assert torch.equal(t.view(torch.int32), plus.view(torch.int32)), backend
        both, both_plus = torch.tensor([-0.0, 0.0] * 8), torch.tensor([-0.0, 0.0] * 8)
        zokern.two_seed_(both, 3, zero, 4, zero, distribution=distribution, backend=backend)
        zokern.two_seed_(both_plus, 3, 0.0, 4, 0.0, distribution=distribution, backend=backend)
        assert torch.equal(both.view(torch.int32), both_plus.view(torch.int32)), backend
    assert all(torch.equal(r, results[0]) for r in results)


def test_the_smallest_scalar_above_the_zero_rounding_still_moves_a_tensor():
    """2^-150 rounds to a float32 zero (a tie, to even); the next float64 rounds to the smallest subnormal."""
    t = torch.zeros(16)
    zokern.perturb_(t, 3, math.nextafter(2.0**-150, 1.0), distribution="rademacher", backend="torch")
    assert torch.equal(t.abs(), torch.full((16,), 2.0**-149))
