"""ZOSGD(cuda_graph=True): a whole step whose kernels read their scalars from device rows, captured and replayed on a
GPU. On the CPU the same passes run uncaptured every step, which checks everything but the capture itself: the rows
carry exactly the values the ordinary step passes as arguments, bit for bit, in every backend."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from helpers import DEVICE
from helpers import backends_for

import zokern
from zokern.optim import ZOSGD
from zokern.optim import ZOConservative
from zokern.optim import ZOSignSGD
from zokern.optim import graph as graph_


def _model(dtype=torch.float32, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))
    model[0].bias.requires_grad_(False)  # a frozen tensor between trainable ones: offsets, not consecutive
    return model.to(DEVICE, dtype)


def _data(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(8, 6, generator=g).to(DEVICE), torch.randn(8, 3, generator=g).to(DEVICE)


def _closure(model):
    inputs, targets = _data()
    return lambda: torch.nn.functional.mse_loss(model(inputs), targets)


def _assert_same_steps(model_a, model_b, opt_a=None, opt_b=None) -> None:
    """Bit for bit on the CPU, where the same kernels run. On a GPU the closure's forwards are captured kernels too,
    which cuBLAS may pick differently inside a capture: there the parameters agree to float32 rounding."""
    for a, b in zip(_params(model_a), _params(model_b), strict=True):
        if DEVICE == "cpu":
            assert torch.equal(a, b)
        else:
            torch.testing.assert_close(a, b, atol=2e-6, rtol=0)
    if opt_a is None:
        return
    if DEVICE == "cpu":
        assert opt_a.trajectory == opt_b.trajectory
    else:
        for x, y in zip(opt_a.trajectory, opt_b.trajectory, strict=True):
            assert x["seed"] == y["seed"] and x["loss"] == pytest.approx(y["loss"], rel=1e-5)


def _params(model) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def _run(graph: bool, steps: int = 5, dtype=torch.float32, backend=None, **options):
    """Train with two param groups (own lr and eps), a weight decay and an lr schedule; the closure is one object."""
    model = _model(dtype)
    groups = [
        dict(params=list(model[0].parameters())),
        dict(params=list(model[2].parameters()), lr=0.02, eps=3e-3),
    ]
    options = dict(lr=0.05, eps=1e-2, weight_decay=0.01, seed=7, perturbation="inplace", **options)
    opt = ZOSGD(groups, backend=backend, cuda_graph=graph, **options)
    schedule = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    inputs, targets = _data()

    def closure():
        return torch.nn.functional.mse_loss(model(inputs.to(dtype)).float(), targets)

    for _ in range(steps):
        opt.step(closure)
        schedule.step()
    return model, opt


# Backends a graph can run: all on the CPU (uncaptured); on a GPU those whose kernels read device rows.
GRAPH_BACKENDS = [b for b in backends_for() if DEVICE == "cpu" or b != "torch"]


@pytest.mark.parametrize("backend", GRAPH_BACKENDS)
@pytest.mark.parametrize(
    "dtype, options",
    [
        (torch.float32, {}),
        (torch.float32, dict(distribution="rademacher")),
        (torch.float32, dict(one_sided=True)),
        (torch.bfloat16, {}),  # stochastic rounding: each update pass's rounding seed comes from its row
        (torch.float16, dict(rounding="nearest")),
    ],
    ids=["fp32", "rademacher", "one-sided", "bf16", "fp16-nearest"],
)
def test_graph_steps_equal_ordinary_steps_bit_for_bit(backend, dtype, options):
    plain, opt_plain = _run(False, dtype=dtype, backend=backend, **options)
    graphed, opt_graph = _run(True, dtype=dtype, backend=backend, **options)
    _assert_same_steps(plain, graphed, opt_plain, opt_graph)
    assert not torch.equal(_params(graphed)[0], _params(_model(dtype))[0])  # training moved the weights


def test_a_graph_run_replays_bit_for_bit():
    model, opt = _run(True)
    replayed = [p.detach().clone() for p in _model().parameters()]
    zokern.replay(replayed, opt.trajectory)
    for a, b in zip(replayed, _params(model), strict=True):
        assert torch.equal(a, b)


def test_a_new_eps_is_taken_into_account():
    """eps is held fixed by a capture (g = d / eps is formed inside it): changing it must capture anew."""
    runs = []
    for graph in (False, True):
        model = _model()
        opt = ZOSGD(model.parameters(), lr=0.05, eps=1e-2, seed=3, perturbation="inplace", cuda_graph=graph)
        closure = _closure(model)
        for eps in (1e-2, 1e-2, 1e-2, 4e-3, 4e-3):
            opt.param_groups[0]["eps"] = eps
            opt.step(closure)
        runs.append((model, opt))
    _assert_same_steps(runs[0][0], runs[1][0], runs[0][1], runs[1][1])


def test_a_non_finite_loss_skips_the_update():
    model = _model()
    opt = ZOSGD(model.parameters(), lr=0.05, eps=1e-2, seed=3, perturbation="inplace", cuda_graph=True)
    inputs, targets = _data()
    scale = torch.ones((), device=DEVICE)  # read by the closure every step: a graph replays the new value
    closure = lambda: torch.nn.functional.mse_loss(model(inputs), targets) * scale  # noqa: E731
    opt.step(closure)
    before = _params(model)
    scale.fill_(math.inf)
    with pytest.warns(RuntimeWarning, match="non-finite loss"):
        opt.step(closure)
        assert opt.nonfinite_steps == 1
    for a, b in zip(before, _params(model), strict=True):  # restored, up to in-place float32 rounding
        torch.testing.assert_close(a, b, atol=1e-7, rtol=0)
    scale.fill_(1.0)
    opt.step(closure)
    assert not torch.equal(before[0], _params(model)[0])


def test_an_exception_in_the_closure_restores_theta():
    model = _model()
    opt = ZOSGD(model.parameters(), lr=0.05, eps=1e-2, seed=3, perturbation="inplace", cuda_graph=True)
    inputs, targets = _data()
    calls = []

    def closure():
        calls.append(1)
        if len(calls) == 2:  # at theta - eps z
            raise KeyError("boom")
        return torch.nn.functional.mse_loss(model(inputs), targets)

    before = _params(model)
    with pytest.raises(KeyError, match="boom"):
        opt.step(closure)
    for a, b in zip(before, _params(model), strict=True):
        torch.testing.assert_close(a, b, atol=1e-7, rtol=0)


@pytest.mark.parametrize("graph", [False, True])
def test_a_pass_that_fails_on_a_later_group_leaves_the_earlier_groups_restored(monkeypatch, graph):
    # Uncaptured graph steps (the CPU's, a GPU's warm-up) run their passes: a pass failing partway takes back the
    # groups it already moved, as the ordinary step does (they were left at theta + eps z).
    model = _model()
    groups = [{"params": [model[0].weight]}, {"params": [model[2].weight, model[2].bias]}]
    opt = ZOSGD(groups, lr=0.05, eps=1e-2, seed=3, perturbation="inplace", cuda_graph=graph)
    perturb, calls = zokern.ops.perturb_, []

    def second_call_fails(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # the first pass's call on the second group
            raise RuntimeError("device lost")
        return perturb(*args, **kwargs)

    monkeypatch.setattr(zokern.ops, "perturb_", second_call_fails)
    before = _params(model)
    with pytest.raises(RuntimeError, match="device lost"):
        opt.step(_closure(model))
    for a, b in zip(before, _params(model), strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


def test_a_new_closure_every_step_warns_on_a_gpu_and_stays_correct():
    plain, opt_plain = _run(False, steps=3)
    model = _model()
    groups = [dict(params=list(model[0].parameters())), dict(params=list(model[2].parameters()), lr=0.02, eps=3e-3)]
    opt = ZOSGD(groups, lr=0.05, eps=1e-2, weight_decay=0.01, seed=7, perturbation="inplace", cuda_graph=True)
    schedule = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    inputs, targets = _data()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            opt.step(lambda: torch.nn.functional.mse_loss(model(inputs), targets))
            schedule.step()
    warned = any("another closure object" in str(w.message) for w in caught)
    assert warned == (DEVICE != "cpu")  # the CPU captures nothing: nothing to warn about
    _assert_same_steps(plain, model)


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda p: ZOSGD(p, momentum=0.9, perturbation="inplace", cuda_graph=True), "one probe and no momentum"),
        (lambda p: ZOSGD(p, n_probes=2, perturbation="inplace", cuda_graph=True), "one probe and no momentum"),
        (lambda p: ZOSGD(p, perturbation="inplace", merge_steps=True, cuda_graph=True), "cannot be combined"),
        (lambda p: ZOSGD(p, perturbation="exact", cuda_graph=True), "perturbation='inplace'"),
        (lambda p: ZOSignSGD(p, perturbation="inplace", cuda_graph=True), "ZOSignSGD does not support"),
        (lambda p: ZOConservative(p, perturbation="inplace", cuda_graph=True), "ZOConservative does not support"),
    ],
)
def test_unsupported_configurations_are_refused(make, message):
    with pytest.raises(ValueError, match=message):
        make(_model().parameters())


def test_nothing_trainable_steps_as_the_ordinary_step():
    model = _model().requires_grad_(False)
    before = _params(model)
    opt = ZOSGD(model.parameters(), lr=0.05, eps=1e-2, seed=3, perturbation="inplace", cuda_graph=True)
    loss = opt.step(_closure(model))
    assert math.isfinite(float(loss)) and opt.trajectory[0]["loss"] == pytest.approx(float(loss))
    assert all(torch.equal(a, b) for a, b in zip(before, _params(model), strict=True))


def test_a_step_with_nothing_trainable_between_ordinary_steps_leaves_the_next_ones_running():
    """Its empty table of scalar rows replaced the graph's while the graph's layout was kept: once the parameters
    were trainable again every step failed on the table's shape."""
    model, plain = _model(), _model()
    opt = ZOSGD(model.parameters(), lr=0.05, eps=1e-2, seed=3, perturbation="inplace", cuda_graph=True)
    ref = ZOSGD(plain.parameters(), lr=0.05, eps=1e-2, seed=3, perturbation="inplace")
    closures = _closure(model), _closure(plain)  # one closure, as a graphed loop passes
    for trainable in (True, False, True, True):
        for m, o, closure in ((model, opt, closures[0]), (plain, ref, closures[1])):
            m.requires_grad_(trainable)
            o.step(closure)
    assert all(torch.equal(a, b) for a, b in zip(_params(model), _params(plain), strict=True))


def test_cuda_graph_must_be_a_bool():
    with pytest.raises(TypeError, match="cuda_graph must be a bool"):
        ZOSGD(_model().parameters(), cuda_graph=1)


def test_sixteen_bit_parameters_default_to_exact_and_are_refused():
    with pytest.raises(ValueError, match="perturbation='inplace'"):
        ZOSGD(_model(torch.bfloat16).parameters(), cuda_graph=True)


# ------------------------------------------------------------------------------------------------ on a GPU


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="captures a CUDA graph: needs a GPU")


@cuda
@pytest.mark.parametrize("backend", [b for b in ("cuda", "triton") if b in backends_for("cuda")])
def test_the_step_is_captured_and_replayed_without_host_syncs(backend):
    plain, opt_plain = _run(False, steps=6, backend=backend)
    model = _model()
    groups = [dict(params=list(model[0].parameters())), dict(params=list(model[2].parameters()), lr=0.02, eps=3e-3)]
    opt = ZOSGD(
        groups, lr=0.05, eps=1e-2, weight_decay=0.01, seed=7, perturbation="inplace", backend=backend, cuda_graph=True
    )
    schedule = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    inputs, targets = _data()
    closure = lambda: torch.nn.functional.mse_loss(model(inputs), targets)  # noqa: E731
    for step in range(6):
        if step == graph_.WARMUP_STEPS + 1:  # captured at the step before: from now on, replays only
            assert opt._graph.graph is not None
            torch.cuda.set_sync_debug_mode("error")
        try:
            loss = opt.step(closure)
            schedule.step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
        assert loss.device == inputs.device  # a replay returns the loss where the closure computes it
    _assert_same_steps(plain, model, opt_plain, opt)


@cuda
def test_the_torch_backend_cannot_be_captured():
    model = _model()
    opt = ZOSGD(model.parameters(), perturbation="inplace", backend="torch", cuda_graph=True)
    before = _params(model)
    with pytest.raises(ValueError, match="read their scalars from device memory"):
        opt.step(_closure(model))
    assert all(torch.equal(a, b) for a, b in zip(before, _params(model), strict=True))


@cuda
def test_a_new_batch_copied_into_the_static_inputs_is_used():
    """Batches copied into the closure's tensors: the replayed step sees each one, as an uncaptured step does."""
    losses = []
    for graph in (True, False):
        model = _model()
        opt = ZOSGD(model.parameters(), lr=0.05, eps=1e-2, seed=3, perturbation="inplace", cuda_graph=graph)
        inputs, targets = _data()
        closure = lambda m=model, x=inputs, y=targets: torch.nn.functional.mse_loss(m(x), y)  # noqa: E731
        run = []
        for step in range(graph_.WARMUP_STEPS + 4):
            inputs.copy_(_data(seed=10 + step)[0])
            run.append(float(opt.step(closure)))
        losses.append(run)
    assert losses[0] == pytest.approx(losses[1], rel=1e-5) and len(set(losses[0])) == len(losses[0])


# Run in a process of its own: a failed capture can leave torch's CUDA allocator broken for the rest of the process
# (torch < 2.12, pytorch#180395), which zokern repairs; the script checks that it did, and must not take down the
# other GPU tests of this worker if it did not.
_SYNCING_CLOSURE = """
import warnings, torch
from test_graph import _model, _data, _params, graph_, DEVICE
from zokern.optim import ZOSGD

model = _model()
opt = ZOSGD(model.parameters(), lr=0.05, eps=1e-2, seed=3, perturbation="inplace", cuda_graph=True)
inputs, targets = _data()
closure = lambda: torch.tensor(torch.nn.functional.mse_loss(model(inputs), targets).item(), device=DEVICE)
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    for _ in range(graph_.WARMUP_STEPS):
        opt.step(closure)
before = _params(model)
try:
    opt.step(closure)
except RuntimeError as e:
    assert "could not be captured in a CUDA graph" in str(e), e
else:
    raise AssertionError("a closure calling .item() was captured")
assert all(torch.equal(a, b) for a, b in zip(before, _params(model), strict=True)), "theta moved"
torch.cuda.empty_cache()  # fails an internal assertion if the allocator still records into the failed pool
model = _model()
opt = ZOSGD(model.parameters(), lr=0.05, eps=1e-2, seed=3, perturbation="inplace", cuda_graph=True)
good = lambda: torch.nn.functional.mse_loss(model(inputs), targets)
for _ in range(graph_.WARMUP_STEPS + 2):
    opt.step(good)
assert opt._graph.graph is not None, "no capture after a failed one"
print("ok")
"""


@cuda
def test_a_closure_that_syncs_cannot_be_captured_and_leaves_theta_and_the_allocator_working():
    import subprocess
    import sys
    from pathlib import Path

    done = subprocess.run(
        [sys.executable, "-c", _SYNCING_CLOSURE],
        cwd=Path(__file__).parent,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]


# ----------------------------------------------------------------------------------- a capture's failure modes
# CUDA graphs need a GPU; the capture's error handling does not. torch.cuda's graph and stream objects are replaced
# by stand-ins that record nothing, so that StepGraph._capture runs its bookkeeping on the CPU.


class _FakeGraph:
    def replay(self):
        raise AssertionError("a failed capture must not be replayed")


@pytest.fixture
def fake_capture(monkeypatch):
    import contextlib

    monkeypatch.setattr(torch.cuda, "CUDAGraph", _FakeGraph)
    monkeypatch.setattr(torch.cuda, "graph", lambda *args, **kwargs: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "stream", lambda stream: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: None)
    monkeypatch.setattr(graph_.StepGraph, "_stream", lambda self, device: None)
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: (0, 7))
    stopped = []
    monkeypatch.setattr(graph_, "stop_recording_into", lambda pool, device: stopped.append(pool))
    return stopped


@pytest.mark.parametrize(
    "error, raised",
    [
        (RuntimeError("operation not permitted when stream is capturing"), RuntimeError),
        (KeyError("closure bug"), KeyError),
        (KeyboardInterrupt(), KeyboardInterrupt),
    ],
)
def test_a_failed_capture_forgets_what_it_tracked(fake_capture, error, raised):
    """Nothing runs during a capture, so a failure must not leave perturbations to undo (they would move theta)."""
    model = _model()
    opt = ZOSGD(model.parameters(), lr=0.05, eps=1e-2, seed=3, perturbation="inplace", cuda_graph=True)
    step_graph = opt._graph
    step_graph.key = ("some key",)

    def passes(seed, evaluate, capturing):
        assert capturing
        opt._track(seed, lambda group: group["eps"])  # what the +eps pass records before the closure fails
        raise error

    step_graph._passes = passes
    with pytest.raises(raised) as info:
        step_graph._capture(1, lambda: None, torch.device("cpu"))
    assert opt._displacement == {} and step_graph.key is None and step_graph.graph is None
    assert fake_capture == [(0, 7)]  # the allocator told to stop recording into the failed capture's pool
    if raised is RuntimeError:
        assert "could not be captured in a CUDA graph" in str(info.value)
    else:
        assert info.value is error  # not wrapped: a closure's own error keeps its type


def test_a_successful_capture_keeps_the_graph_and_its_outputs(fake_capture):
    model = _model()
    opt = ZOSGD(model.parameters(), lr=0.05, eps=1e-2, seed=3, perturbation="inplace", cuda_graph=True)
    step_graph = opt._graph
    outputs = dict(loss=torch.tensor(1.0))
    step_graph._passes = lambda seed, evaluate, capturing: outputs
    step_graph._capture(1, lambda: None, torch.device("cpu"))
    assert isinstance(step_graph.graph, _FakeGraph) and step_graph.outputs is outputs
    assert fake_capture == []


def test_stopping_a_pool_that_is_not_recording_is_harmless():
    """What newer torch (which ends the recording itself) and a CPU build of torch answer: ignored."""
    graph_.stop_recording_into((0, 12345), torch.device("cuda", 0))
