"""The cross-step merge (ZOSGD(merge_steps=True)): two passes per step, the true theta handed out to every read."""

from __future__ import annotations

import copy
import json
import math
import signal
import sys
import threading

import pytest
import torch
from helpers import DEVICE
from helpers import count_passes

import zokern
from zokern import ops
from zokern.optim import ZOSGD
from zokern.optim import ZOConservative
from zokern.optim import ZOSignSGD


def _model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3)).to(DEVICE)


def _data(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(8, 6, generator=g).to(DEVICE), torch.randn(8, 3, generator=g).to(DEVICE)


def _closure(model, inputs, targets):
    return lambda: torch.nn.functional.mse_loss(model(inputs), targets)


def _setup(merge: bool):
    """A fresh model, its in-place ZOSGD (merged or not) and the closure of the training batch."""
    model = _model()
    opt = ZOSGD(model.parameters(), lr=0.05, eps=1e-2, seed=7, perturbation="inplace", merge_steps=merge)
    return model, opt, _closure(model, *_data())


def _run(merge: bool, steps: int):
    model, opt, closure = _setup(merge)
    for _ in range(steps):
        opt.step(closure)
    return model, opt


def _params(model) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def _assert_close(a, b, atol=2e-6):
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x, y, atol=atol, rtol=0)


def test_a_merged_run_takes_the_same_steps_as_an_unmerged_one():
    merged, opt_m = _run(True, 6)
    plain, opt_p = _run(False, 6)
    assert opt_m.trajectory[-1]["next_seed"] == zokern.optim.seeds.step_seed(7, 6)
    opt_m.materialize()
    _assert_close(_params(merged), _params(plain))
    for r_m, r_p in zip(opt_m.trajectory, opt_p.trajectory):
        assert r_m["losses"] == pytest.approx(r_p["losses"], rel=1e-5)


def test_between_steps_the_parameters_hold_the_next_perturbation_until_materialized():
    model, opt = _run(True, 2)
    held = _params(model)
    plain, _ = _run(False, 2)
    offsets = [0]
    for p in plain.parameters():
        offsets.append(offsets[-1] + p.numel())
    next_seed = opt.trajectory[-1]["next_seed"]
    for h, p, offset in zip(held, plain.parameters(), offsets):
        z = zokern.gaussian(next_seed, offset, p.numel(), backend="torch").view_as(p).to(DEVICE)
        torch.testing.assert_close(h, p.detach() + 1e-2 * z, atol=2e-6, rtol=0)
    opt.materialize()
    _assert_close(_params(model), _params(plain))
    again = _params(model)
    opt.materialize()  # nothing pending: no pass
    assert all(torch.equal(a, b) for a, b in zip(_params(model), again))


def test_a_merged_step_is_two_passes(monkeypatch):
    count = count_passes(monkeypatch)
    for merge, expected in ((False, [3, 3, 3]), (True, [3, 2, 2])):
        x = torch.nn.Parameter(torch.randn(100, device=DEVICE))
        opt = ZOSGD([x], seed=0, merge_steps=merge)
        per_step = []
        for _ in range(3):
            count[0] = 0
            opt.step(lambda x=x: (x.detach() ** 2).sum())
            per_step.append(count[0])
        assert per_step == expected, merge


def test_a_module_forward_between_steps_sees_the_true_parameters():
    model, opt = _run(True, 3)
    plain, _ = _run(False, 3)
    inputs, _ = _data(5)
    torch.testing.assert_close(model(inputs), plain(inputs), atol=1e-5, rtol=0)
    assert not opt._lookahead.pending
    # and training goes on as if nothing had happened
    opt.step(_closure(model, *_data()))
    _, opt_p = _run(False, 4)
    assert opt.trajectory[-1]["losses"] == pytest.approx(opt_p.trajectory[-1]["losses"], rel=1e-5)


def test_checkpoints_hold_the_true_parameters_and_loading_one_is_not_shifted():
    model, opt = _run(True, 3)
    plain, _ = _run(False, 3)
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    _assert_close(list(saved.values()), list(plain.state_dict().values()))
    opt.step(_closure(model, *_data()))
    assert opt._lookahead.pending
    model.load_state_dict(saved)  # back to the checkpoint: the pending perturbation is not applied to it
    assert all(torch.equal(p.detach(), saved[k]) for k, p in model.named_parameters())
    assert not opt._lookahead.pending


def test_the_optimizer_state_dict_materializes():
    model, opt = _run(True, 2)
    plain, _ = _run(False, 2)
    state = opt.state_dict()
    _assert_close(_params(model), _params(plain))
    assert state["zo"]["steps_taken"] == 2


def test_replay_of_a_merged_run_is_bit_identical():
    start = _params(_model())
    model, opt = _run(True, 4)
    opt.materialize()
    replayed = [s.clone() for s in start]
    zokern.replay(replayed, opt.trajectory)  # the same merged passes, then the lookahead taken back
    assert all(torch.equal(r, t) for r, t in zip(replayed, _params(model), strict=True))


def test_a_closure_that_raises_leaves_the_true_parameters():
    model, opt = _run(True, 2)
    plain, _ = _run(False, 2)
    inputs, targets = _data()
    calls = []

    def failing():
        calls.append(1)
        if len(calls) == 2:
            raise KeyError("data loader broke")
        return torch.nn.functional.mse_loss(model(inputs), targets)

    with pytest.raises(KeyError, match="data loader broke"):
        opt.step(failing)
    assert not opt._lookahead.pending
    _assert_close(_params(model), _params(plain))


def test_a_changed_eps_takes_the_lookahead_back_and_perturbs_anew():
    runs = []
    for merge in (True, False):
        model, opt, closure = _setup(merge)
        for k in range(4):
            opt.param_groups[0]["eps"] = 1e-2 * (1 + k)  # a schedule on eps
            opt.step(closure)
        opt.materialize()
        runs.append((_params(model), opt.trajectory))
    _assert_close(runs[0][0], runs[1][0])
    assert runs[0][1][-1]["losses"] == pytest.approx(runs[1][1][-1]["losses"], rel=1e-5)


def test_a_skipped_step_keeps_the_lookahead():
    results = []
    for merge in (True, False):
        model, opt, closure = _setup(merge)
        calls = iter(range(100))
        with pytest.warns(RuntimeWarning, match="non-finite"):
            for _ in range(3):
                opt.step(lambda calls=calls, f=closure: torch.tensor(math.nan) if next(calls) == 3 else f())
                assert opt._lookahead.pending == merge  # the skipped step still applied the next perturbation
        opt.materialize()
        results.append(_params(model))
    _assert_close(*results)


@pytest.mark.parametrize(
    "build,match",
    [
        (lambda ps: ZOSGD(ps, merge_steps=True, momentum=0.9, perturbation="inplace"), "without momentum"),
        (lambda ps: ZOSGD(ps, merge_steps=True, one_sided=True, perturbation="inplace"), "two-sided"),
        (lambda ps: ZOSGD(ps, merge_steps=True, perturbation="exact"), "exact mode"),
        (lambda ps: ZOSGD([torch.nn.Parameter(p.bfloat16()) for p in ps], merge_steps=True), "exact mode"),
        (lambda ps: ZOSignSGD(ps, merge_steps=True, perturbation="inplace"), "ZOSignSGD does not support"),
        (lambda ps: ZOConservative(ps, merge_steps=True, perturbation="inplace"), "ZOConservative does not support"),
    ],
)
def test_merge_steps_refuses_what_it_cannot_merge(build, match):
    params = [torch.nn.Parameter(torch.randn(4, device=DEVICE))]
    with pytest.raises(ValueError, match=match):
        build(params)
    with pytest.raises(TypeError, match="merge_steps must be a bool"):
        ZOSGD(params, merge_steps=1)


def test_a_collected_optimizer_leaves_the_true_parameters_and_inert_hooks():
    import gc
    import weakref

    model, opt = _run(True, 2)
    plain, _ = _run(False, 2)
    ref = weakref.ref(opt)
    del opt
    gc.collect()
    assert ref() is None  # hooks on the modules do not keep the optimizer alive
    _assert_close(_params(model), _params(plain))  # and its pending perturbation was taken back
    model.state_dict()
    model(_data()[0])
    _assert_close(_params(model), _params(plain))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_replay_follows_a_run_whose_lookahead_was_taken_back(dtype):
    """An evaluation between steps takes the perturbation back and the next step perturbs anew: in 16 bits
    RN(RN(theta + e) - e) is not theta, so replay must do the same (records say whether a step claimed)."""
    model = _model().to(dtype)
    start = _params(model)
    inputs, targets = _data()
    opt = ZOSGD(model.parameters(), lr=0.05, eps=1e-2, seed=7, perturbation="inplace", merge_steps=True)
    closure = lambda: torch.nn.functional.mse_loss(model(inputs.to(dtype)).float(), targets)  # noqa: E731
    for k in range(5):
        opt.step(closure)
        if k in (1, 2):
            model(inputs.to(dtype))  # an evaluation: takes the lookahead back
    opt.materialize()
    assert [r["claimed"] for r in opt.trajectory] == [False, True, False, False, True]
    replayed = [s.clone() for s in start]
    zokern.replay(replayed, opt.trajectory)
    assert all(torch.equal(r, t) for r, t in zip(replayed, _params(model), strict=True))


class _Experts(torch.nn.Module):
    """Owners a forward does not reveal: a weight used functionally by its parent, an expert not routed to, and
    parameters held in a ParameterDict (as PEFT's LoRA embeddings hold theirs)."""

    def __init__(self) -> None:
        super().__init__()
        self.shared = torch.nn.Linear(6, 6)
        self.experts = torch.nn.ModuleList([torch.nn.Linear(6, 3), torch.nn.Linear(6, 3)])
        self.adapters = torch.nn.ParameterDict({"a": torch.nn.Parameter(torch.randn(6, 2) * 0.1)})

    def forward(self, x):
        h = torch.nn.functional.linear(x, self.shared.weight, self.shared.bias)  # self.shared's forward never runs
        return self.experts[0](h + h @ self.adapters["a"] @ self.adapters["a"].T)  # expert 1 is never routed to


def test_checkpoints_cover_owners_whose_forward_never_ran():
    torch.manual_seed(0)
    model = _Experts().to(DEVICE)
    inputs, targets = _data()
    opt = ZOSGD(model.parameters(), lr=0.05, eps=1e-2, seed=7, perturbation="inplace", merge_steps=True)
    for _ in range(2):
        opt.step(lambda: torch.nn.functional.mse_loss(model(inputs), targets))
    assert opt._lookahead.pending
    held = _params(model)
    saved = {k: v.clone() for k, v in model.experts[1].state_dict().items()}  # a submodule's own checkpoint
    assert not opt._lookahead.pending
    true = _params(model)
    assert not any(torch.equal(h, t) for h, t in zip(held, true))  # every parameter was perturbed, and restored
    torch.testing.assert_close(saved["weight"], model.experts[1].weight.detach(), atol=0, rtol=0)
    opt.step(lambda: torch.nn.functional.mse_loss(model(inputs), targets))
    model.adapters.load_state_dict({"a": true[-1]})  # loading into the ParameterDict takes the lookahead back first
    assert not opt._lookahead.pending and torch.equal(model.adapters["a"].detach(), true[-1])
    model.shared.load_state_dict(dict(zip(("weight", "bias"), true[:2])))
    assert torch.equal(model.shared.weight.detach(), true[0])


def test_nothing_trainable_still_evaluates():
    model = _model()
    for p in model.parameters():
        p.requires_grad_(False)
    start = _params(model)
    opt = ZOSGD(model.parameters(), seed=0, perturbation="inplace", merge_steps=True)
    loss = opt.step(_closure(model, *_data()))
    assert math.isfinite(float(loss)) and all(torch.equal(a, b) for a, b in zip(_params(model), start))


def test_a_collected_optimizer_removes_its_hooks():
    import gc

    model, opt = _run(True, 1)
    counts = [len(m._state_dict_pre_hooks) + len(m._load_state_dict_pre_hooks) for m in model.modules()]
    assert sum(counts) == 4  # two Linear owners, two hooks each
    del opt
    gc.collect()
    assert all(len(m._state_dict_pre_hooks) + len(m._load_state_dict_pre_hooks) == 0 for m in model.modules())


@pytest.mark.filterwarnings("ignore:Using `torch.compile\\(module\\)` when there are global hooks")
def test_a_compiled_model_trains_and_evaluates_merged():
    """torch.compile traces a module's forward with the global hooks: they must run eagerly, not be traced."""
    compiled, eager = _model(), _model()
    inputs, targets = _data()
    fast = torch.compile(compiled, backend="eager")  # dynamo's tracing is what matters here, not the code it makes
    opt = ZOSGD(compiled.parameters(), lr=0.05, eps=1e-2, seed=7, perturbation="inplace", merge_steps=True)
    ref = ZOSGD(eager.parameters(), lr=0.05, eps=1e-2, seed=7, perturbation="inplace")
    for _ in range(3):
        opt.step(lambda: torch.nn.functional.mse_loss(fast(inputs), targets))
        ref.step(_closure(eager, inputs, targets))
        with torch.no_grad():
            torch.testing.assert_close(fast(inputs), eager(inputs), atol=1e-6, rtol=0)  # took the lookahead back
        assert not opt._lookahead.pending


def test_checkpoints_hold_the_true_parameters_when_the_closure_was_compiled_before_training():
    """A function compiled before the first merged step (an evaluation before training) runs its traced code, which
    calls no global module hook: no forward showed the parameters' owners, whose state_dict saved theta + eps z and
    whose load_state_dict was shifted by -eps z. The owners are found among the live modules instead."""
    torch._dynamo.reset()
    model, plain = _model(), _model()
    inputs, targets = _data()
    loss = torch.compile(lambda: torch.nn.functional.mse_loss(model(inputs), targets), backend="eager")
    with torch.no_grad():
        loss()  # traced now, with no hook installed
    opt = ZOSGD(model.parameters(), lr=0.05, eps=1e-2, seed=7, perturbation="inplace", merge_steps=True)
    ref = ZOSGD(plain.parameters(), lr=0.05, eps=1e-2, seed=7, perturbation="inplace")
    for _ in range(2):
        ref.step(_closure(plain, inputs, targets))
    for _ in range(2):  # (a forward of the other model between them would take the perturbation back)
        opt.step(loss)
    assert opt._lookahead.pending
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    assert not opt._lookahead.pending
    _assert_close(list(saved.values()), list(plain.state_dict().values()))
    opt.step(loss)
    model.load_state_dict(saved)
    assert all(torch.equal(p.detach(), saved[k]) for k, p in model.named_parameters())


class _ScaledBody(torch.nn.Module):
    """A root that owns a parameter it uses only from outside its forward (the closure calls ``body``)."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = torch.nn.Parameter(torch.tensor([1.5, 0.5, 2.0]))
        self.body = _model()


def test_a_parameter_loaded_before_the_take_back_keeps_its_loaded_value():
    """The root's own parameters load before its children's load hooks take the perturbation back: a loaded value
    (its version counter raised) is left as loaded, not shifted by -eps z."""
    inputs, targets = _data()
    model = _ScaledBody().to(DEVICE)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    opt = ZOSGD(model.parameters(), lr=0.05, eps=1e-2, seed=7, perturbation="inplace", merge_steps=True)
    for _ in range(3):
        opt.step(lambda: torch.nn.functional.mse_loss(model.body(inputs) * model.scale, targets))
    model.load_state_dict(start)
    opt.materialize()
    assert all(torch.equal(v, start[k]) for k, v in model.state_dict().items())


def test_a_take_back_that_fails_says_so_once_and_stays_recorded():
    plain, _ = _run(False, 3)
    merged, opt = _run(True, 3)  # second: the plain run's forwards would take its perturbation back
    merged.double()  # a dtype the passes refuse: the module forward's take-back raises
    with pytest.raises(TypeError, match=r"merge_steps could not take its pending perturbation back .*float64"):
        merged(torch.zeros(1, 6, dtype=torch.float64, device=DEVICE))
    torch.nn.Linear(2, 2)(torch.zeros(1, 2))  # other modules' forwards are not held hostage
    merged.float()
    opt.materialize()  # now it can: theta again
    _assert_close(_params(merged), _params(plain))


def test_a_step_whose_take_back_fails_leaves_the_next_step_its_own_layout():
    """The step set its layout before claiming the pending perturbation, outside the block that clears it: a claim
    that raised left it, and the next step trained the parameters of the failed step's layout."""
    a, b = torch.nn.Parameter(torch.randn(16)), torch.nn.Parameter(torch.randn(16))
    opt = ZOSGD([{"params": [a]}, {"params": [b]}], lr=1e-2, eps=1e-2, seed=0, merge_steps=True)
    loss = lambda: ((a - 1) ** 2).sum() + ((b.float() - 1) ** 2).sum()  # noqa: E731
    opt.step(loss)
    b.requires_grad_(False)
    b.data = b.data.double()  # frozen, in a dtype the passes refuse: the step's take-back raises
    with pytest.raises(TypeError, match="could not take its pending perturbation back"):
        opt.step(loss)
    b.data = b.data.float()
    b.requires_grad_(True)
    opt.materialize()
    before = b.detach().clone()
    opt.step(loss)
    opt.materialize()
    assert not torch.equal(b.detach(), before)


def test_merged_steps_run_on_inference_tensors_in_inference_mode():
    runs = []
    for merge in (True, False):
        with torch.inference_mode():
            model, opt, closure = _setup(merge)
            for _ in range(3):
                opt.step(closure)
            opt.materialize()
            runs.append(_params(model))
    _assert_close(*runs)


def test_another_optimizer_over_the_same_parameters_reads_the_true_parameters():
    """Its closure reads them directly, where no forward hook sees the pending perturbation."""
    runs = []
    for merge in (True, False):
        model, opt, closure = _setup(merge)
        last = model[2]
        other = ZOSGD(last.parameters(), lr=0.05, eps=1e-2, seed=3, perturbation="inplace")
        for _ in range(3):
            opt.step(closure)
            other.step(lambda last=last: (last.weight**2).sum() + last.bias.sum())
        opt.materialize()
        runs.append(_params(model))
    _assert_close(*runs)


def test_merged_steps_of_two_optimizers_in_two_threads_take_each_perturbation_back_once():
    """Each model's forward runs every pending lookahead's global hook, the other thread's too: taking a perturbation
    back raced with its owner claiming it (taken back twice, or claimed after it was taken back: theta off by eps z,
    or an exception from the other thread). With lr = 0 both models end where they started, as run one after the
    other. Thread switches are made frequent so that an unguarded hand-over is hit (in about half the trials)."""
    x, y = torch.randn(32, 256), torch.randn(32, 1)
    switch_interval, intra_op_threads = sys.getswitchinterval(), torch.get_num_threads()
    sys.setswitchinterval(1e-6)
    torch.set_num_threads(1)
    try:
        for _ in range(5):
            runs, errors = [], []
            for seed in (1, 2):
                torch.manual_seed(seed)
                model = torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.Tanh(), torch.nn.Linear(256, 1))
                opt = ZOSGD(model.parameters(), lr=0.0, eps=1e-2, seed=seed, merge_steps=True)
                runs.append((model, opt, [p.detach().clone() for p in model.parameters()]))

            def train(model, opt, errors=errors):
                try:
                    for _ in range(150):
                        opt.step(lambda: torch.nn.functional.mse_loss(model(x), y))
                    opt.materialize()
                except Exception as e:  # noqa: BLE001 (reported by the assertion below)
                    errors.append(e)

            threads = [threading.Thread(target=train, args=run[:2]) for run in runs]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            assert not errors, errors
            for model, _, start in runs:
                assert max((p - q).abs().max().item() for p, q in zip(model.parameters(), start)) < 1e-5
    finally:
        sys.setswitchinterval(switch_interval)
        torch.set_num_threads(intra_op_threads)


def test_a_signal_handler_held_during_a_take_back_runs_after_its_lock(monkeypatch):
    """A SIGTERM that arrives during the take-back pass reaches its handler once the pass is done: after the lock
    that guards the hand-over is released, so that the handler may wait for a thread that saves a checkpoint
    (whose state_dict takes the lock). It ran with the lock held: the checkpoint thread waited forever."""
    torch.manual_seed(0)
    model = torch.nn.Linear(16, 1)
    x = torch.randn(8, 16)
    opt = ZOSGD(model.parameters(), lr=1e-3, eps=1e-3, seed=0, merge_steps=True)
    opt.step(lambda: model(x).pow(2).mean())  # leaves theta + eps z pending
    saved = []

    def save_in_a_thread(signum, frame):
        worker = threading.Thread(target=lambda: saved.append(opt.state_dict()), daemon=True)
        worker.start()
        worker.join(timeout=10)

    perturb = ops.perturb_

    def perturb_during_which_sigterm_arrives(*args, **kwargs):
        signal.raise_signal(signal.SIGTERM)
        return perturb(*args, **kwargs)

    previous = signal.signal(signal.SIGTERM, save_in_a_thread)
    try:
        monkeypatch.setattr(ops, "perturb_", perturb_during_which_sigterm_arrives)
        opt.materialize()
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert len(saved) == 1


@pytest.mark.parametrize("between", ["materialize", "nothing", "forward", "materialize_after"])
def test_a_merged_run_converted_to_bf16_mid_run_replays_bit_for_bit(between):
    # The documented way takes the pending perturbation back before model.to() reads the weights; without it the
    # conversion rounds theta + eps z, which the next step claims, or a forward or materialize() after the
    # conversion takes back in bf16. Replay must follow whichever the run did.
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    x, y = torch.randn(16, 8), torch.randn(16, 1)
    start = [p.detach().clone() for p in model.parameters()]
    opt = ZOSGD(model.parameters(), lr=1e-3, seed=3, merge_steps=True, perturbation="inplace")
    dtype = torch.float32
    for t in range(8):
        if t == 4:
            if between == "materialize":
                opt.materialize()
            model.to(torch.bfloat16)
            dtype = torch.bfloat16
            if between == "forward":
                model(x.to(dtype))
            elif between == "materialize_after":
                opt.materialize()
        opt.step(lambda dtype=dtype: ((model(x.to(dtype)).float() - y) ** 2).mean())
    opt.materialize()
    replayed = [s.clone() for s in start]
    zokern.replay(replayed, json.loads(json.dumps(opt.trajectory)))
    assert all(torch.equal(r, p.detach()) for r, p in zip(replayed, model.parameters()))
    assert replayed[0].dtype == torch.bfloat16


def _merged_run():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    x, y = torch.randn(16, 8), torch.randn(16, 1)
    start = [p.detach().clone() for p in model.parameters()]
    opt = ZOSGD(model.parameters(), lr=1e-3, seed=3, merge_steps=True, perturbation="inplace")

    def step(model=model, opt=opt):
        dtype = next(model.parameters()).dtype
        opt.step(lambda: ((model(x.to(dtype)).float() - y) ** 2).mean())

    return model, opt, start, step


def _replays(start, trajectory, model):
    replayed = [s.clone() for s in start]
    zokern.replay(replayed, json.loads(json.dumps(trajectory)))
    return all(torch.equal(r, p.detach()) for r, p in zip(replayed, model.parameters()))


def test_a_conversion_while_pending_is_not_told_to_a_later_step():
    # Converted with the perturbation applied, then a step that cannot claim it (another eps) takes it back: that
    # step records the conversion; a later documented materialize-then-convert must not inherit the flag.
    model, opt, start, step = _merged_run()
    for _ in range(3):
        step()
    model.to(torch.bfloat16)
    opt.param_groups[0]["eps"] = 1e-2
    step()
    opt.materialize()
    model.float()
    step()
    opt.materialize()
    assert [bool(r.get("converted_pending")) for r in opt.trajectory] == [False] * 3 + [True, False]
    assert _replays(start, opt.trajectory, model)


@pytest.mark.parametrize("how", ["deepcopy", "checkpoint"])
def test_a_conversion_while_pending_survives_a_copy_and_a_checkpoint(how):
    model, opt, start, step = _merged_run()
    for _ in range(3):
        step()
    model.to(torch.bfloat16)
    if how == "deepcopy":
        model, opt = copy.deepcopy((model, opt))
    else:  # the model's state_dict takes the perturbation back, in bf16; a new process resumes from both
        weights, state = model.state_dict(), opt.state_dict()
        trajectory = opt.trajectory
        model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1)).bfloat16()
        model.load_state_dict(weights)
        opt = ZOSGD(model.parameters(), lr=1e-3, seed=3, merge_steps=True, perturbation="inplace")
        opt.load_state_dict(state)
        opt.trajectory = trajectory
    x, y = torch.randn(16, 8, generator=torch.Generator().manual_seed(1)), torch.randn(16, 1)
    for _ in range(2):
        opt.step(lambda: ((model(x.bfloat16()).float() - y) ** 2).mean())
    opt.materialize()
    assert opt.trajectory[3].get("converted_pending") is True
    assert _replays(start, opt.trajectory, model)


@pytest.mark.parametrize("optimizer_first", [False, True], ids=["model-first", "optimizer-first"])
def test_a_roll_back_takes_its_checkpoints_conversion_flag_not_the_abandoned_ones(optimizer_first):
    # Rolled back from a bf16 conversion made with the perturbation applied to a float32 checkpoint that made none:
    # the resumed steps must not say they converted a perturbation.
    model, opt, start, step = _merged_run()
    for _ in range(3):
        step()
    weights, state = copy.deepcopy(model.state_dict()), opt.state_dict()
    for _ in range(2):
        step()
    model.to(torch.bfloat16)
    for load in ((opt.load_state_dict, state), (model.load_state_dict, weights))[:: 1 if optimizer_first else -1]:
        load[0](load[1])
    for _ in range(2):
        step()
    opt.materialize()
    assert not any(r.get("converted_pending") for r in opt.trajectory)
    assert _replays(start, opt.trajectory, model)


def test_a_converted_merged_run_resumed_unmerged_replays():
    model, opt, start, step = _merged_run()
    for _ in range(3):
        step()
    model.to(torch.bfloat16)
    weights, state, trajectory = model.state_dict(), opt.state_dict(), opt.trajectory
    assert state["zo"]["converted_pending"] is True
    resumed = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1)).bfloat16()
    resumed.load_state_dict(weights)
    opt = ZOSGD(resumed.parameters(), lr=1e-3, seed=3, merge_steps=False, perturbation="inplace")
    opt.load_state_dict(state)
    opt.trajectory = trajectory
    x, y = torch.randn(16, 8), torch.randn(16, 1)
    for _ in range(2):
        opt.step(lambda: ((resumed(x.bfloat16()).float() - y) ** 2).mean())
    assert opt.trajectory[3].get("converted_pending") is True
    assert _replays(start, opt.trajectory, resumed)


def test_a_load_whose_take_back_cannot_run_fails_before_loading_anything():
    # A roll-back first takes the abandoned timeline's perturbation back; a parameter made float64 since (frozen,
    # so the constructor's checks allow it) cannot be written: the load fails as it starts, the optimizer untouched.
    model, opt, start, step = _merged_run()
    for _ in range(2):
        step()
    state = opt.state_dict()
    for _ in range(3):
        step()
    model[2].requires_grad_(False)
    model[2].double()
    with pytest.raises(TypeError, match="could not take its pending perturbation back"):
        opt.load_state_dict(state)
    assert opt.steps_taken == 5 and len(opt.trajectory) == 5
    model[2].float()
    opt.materialize()
    assert not opt._lookahead.converted(clear=False)  # the failed take-back converted nothing


def test_a_take_back_that_fails_partway_keeps_the_conversion_of_the_part_it_took_back():
    # Group 0 converted with its perturbation applied; a take-back writes it back, then fails on group 1 (float64):
    # once group 1 is writable again, the next step must still say a converted perturbation was taken back.
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    x, y = torch.randn(16, 8), torch.randn(16, 1)
    start = [p.detach().clone() for p in model.parameters()]
    groups = [{"params": model[0].parameters()}, {"params": model[2].parameters()}]
    opt = ZOSGD(groups, lr=1e-3, seed=3, merge_steps=True, perturbation="inplace")

    def loss():
        h = model[1](model[0](x.to(model[0].weight.dtype))).float()
        return ((model[2](h.to(model[2].weight.dtype)).float() - y) ** 2).mean()

    for _ in range(3):
        opt.step(loss)
    model[0].bfloat16()
    model[2].requires_grad_(False)
    model[2].double()
    with pytest.raises(TypeError, match="could not take its pending perturbation back"):
        opt.materialize()
    model[2].float()
    model[2].requires_grad_(True)
    opt.step(loss)
    opt.materialize()
    assert [bool(r.get("converted_pending")) for r in opt.trajectory] == [False, False, False, True]
    assert _replays(start, opt.trajectory, model)
