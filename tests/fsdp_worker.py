"""One rank of the sharded-parameter tests (tests/test_fsdp.py): a model sharded with FSDP2 (fully_shard) over gloo on
the CPU, rendezvous through a file; each rank trains on its half of the batch.

python tests/fsdp_worker.py SCENARIO OUT_DIR RANK WORLD_SIZE
"""

import warnings

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from helpers import fsdp2_on_cpu
from helpers import join_ranks
from helpers import leave_ranks
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy
from torch.distributed.fsdp import fully_shard
from torch.distributed.fsdp import register_fsdp_forward_method
from torch.distributed.tensor import DTensor
from torch.distributed.tensor import Replicate
from torch.distributed.tensor import Shard
from torch.distributed.tensor import distribute_tensor

from zokern import replay
from zokern.optim import FZOO
from zokern.optim import LDSD
from zokern.optim import ZOSGD
from zokern.optim import ZOAdam
from zokern.optim import ZOConservative
from zokern.optim import ZOSignSGD

fsdp2_on_cpu()

STEPS = 4
HSDP_STEPS = 2
# (name, optimizer, options, dtype). ZOSGD with one probe keeps g on the device, with two gathers on the host; the
# bfloat16 cases round their updates stochastically (bits keyed by global index, like z); momentum and Adam keep
# states shaped like each shard.
CASES = (
    ("zosgd", ZOSGD, {}, torch.float32),
    ("zosgd-probes", ZOSGD, dict(n_probes=2, weight_decay=0.1), torch.float32),
    ("signsgd", ZOSignSGD, dict(lr=1e-3), torch.float32),
    ("conservative", ZOConservative, {}, torch.float32),
    ("fzoo", FZOO, dict(n_probes=3), torch.float32),
    ("bf16-rademacher", ZOSGD, dict(perturbation="inplace", distribution="rademacher"), torch.bfloat16),
    ("zosgd-momentum", ZOSGD, dict(momentum=0.9), torch.float32),
    ("signsgd-momentum", ZOSignSGD, dict(lr=1e-3, momentum=0.5), torch.float32),
    ("adam", ZOAdam, dict(lr=1e-3), torch.float32),
    ("adam-bf16", ZOAdam, dict(lr=1e-3, perturbation="inplace"), torch.bfloat16),
    # LDSD: each rank's part of mu's norm, summed over the ranks; mu shaped like each shard.
    ("ldsd", LDSD, dict(k=3, mu_lr=0.5, mu_norm=1e-5), torch.float32),  # (a small ball: mu is projected)
    ("ldsd-adam-bf16", LDSD, dict(k=2, update="adam", lr=1e-3, perturbation="inplace"), torch.bfloat16),
    # The exact mode (bfloat16's default): the forwards' ops receive copies of the tensors FSDP2 gathers, perturbed.
    ("bf16-exact", ZOSGD, {}, torch.bfloat16),
    ("adam-bf16-exact", ZOAdam, dict(lr=1e-3, n_probes=2), torch.bfloat16),
)


def model_and_batch(dtype: torch.dtype = torch.float32):
    """Rows that two ranks split unevenly (7, 5, 3 and 1: one rank's shard of the last bias is empty), a frozen
    parameter between trained ones, and a head owned by the root module (FSDP2 keeps the root's gathered parameters
    after a forward)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(6, 7), torch.nn.Tanh(), torch.nn.Linear(7, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3)
    )
    model.append(torch.nn.Linear(3, 1))
    model.to(dtype)
    model[2].bias.requires_grad_(False)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(16, 6, generator=g, dtype=dtype)
    y = torch.randn(16, 1, generator=g)
    return model, x, y


def loss_of(model, x, y) -> torch.Tensor:
    return torch.nn.functional.mse_loss(model(x).float(), y)


def optimizer(cls, model, **kwargs):
    return cls(model.parameters(), **{"lr": 1e-2, "eps": 1e-3, "seed": 77, **kwargs})


def train(model, cls, batches, steps=STEPS, **kwargs):
    return run(optimizer(cls, model, **kwargs), model, batches, steps)


def run(opt, model, batches, steps=STEPS, peek=True):
    """``steps`` steps on the mean of the batches' losses (in float64, as the ranks' all_reduce averages them), each
    after a forward outside the optimizer, unless not ``peek`` (FSDP2's root keeps what it gathered there: the
    step's forwards must not)."""
    for _ in range(steps):
        if peek:
            with torch.no_grad():
                model(batches[0][0])
        opt.step(lambda: sum(loss_of(model, x, y).double() for x, y in batches) / len(batches))
    return opt


def ldsd_raising_at_f_minus(model, batches) -> list:
    """LDSD (k=2) whose second step's third forward (f-, after its candidates' losses were reduced) raises, caught;
    then two more steps. Returns the trajectory: the raised step's record holds the losses its passes used."""
    opt = optimizer(LDSD, model, k=2, mu_lr=0.5, mu_norm=1e-5)
    calls = [0]

    def closure():
        calls[0] += 1
        if calls[0] == 6:
            raise RuntimeError("raised at f-")
        return sum(loss_of(model, x, y).double() for x, y in batches) / len(batches)

    for _ in range(4):
        try:
            opt.step(closure)
        except RuntimeError as e:
            assert "raised at f-" in str(e)
    return opt.trajectory


def skipping_the_head(model, batches, skips: bool) -> tuple[str, int]:
    """STEPS ZO-SGD steps in the exact mode (bfloat16's default); where ``skips``, the second step's first forward
    leaves the head out of its ops (model[5], whose parameters the root gathers all the same: an expert no token
    reached), caught as a loop that goes on would. Returns what a step raised ('' if none) and the steps skipped."""
    opt = optimizer(ZOSGD, model)
    head, calls, raised = model[5], [0], [""]

    def closure():
        calls[0] += 1
        if skips and calls[0] == 3:
            head.forward = lambda h: h[..., :1]
        try:
            return sum(loss_of(model, x, y).double() for x, y in batches) / len(batches)
        finally:
            head.__dict__.pop("forward", None)

    for _ in range(STEPS):
        try:
            opt.step(closure)
        except ValueError as e:
            raised[0] = str(e)
    return raised[0], opt.nonfinite_steps


class Scored(torch.nn.Sequential):
    """A model whose loss comes through a method of its own (generate(), say), not through forward."""

    def score(self, x):
        return super().forward(x)


def train_scored(model, batches, **kwargs):
    """STEPS ZO-SGD steps on the loss of ``model.score``: under FSDP2, registered with register_fsdp_forward_method,
    which gathers and reshards as a forward does but passes no forward pre-hook (zokern's learning of modules)."""
    opt = optimizer(ZOSGD, model, **kwargs)
    for _ in range(STEPS):
        opt.step(
            lambda: (
                sum(torch.nn.functional.mse_loss(model.score(x).float(), y).double() for x, y in batches) / len(batches)
            )
        )
    return opt


def penalty(opt) -> torch.Tensor:
    """1e-3 times the trained weights' squared norm, in float64 (exact: a sum of few squares of bfloat16 values),
    computed on the parameters themselves (DTensors: each rank's part, then summed)."""
    total = torch.zeros((), dtype=torch.float64)
    for group in opt.param_groups:
        for p in group["params"]:
            square = p.double().pow(2).sum()
            total = total + (square.full_tensor() if isinstance(square, DTensor) else square)
    return 1e-3 * total


def raising_step(opt, model, batches) -> None:
    """A step whose closure raises inside the forward, between two sharded modules (an out-of-memory error, say),
    caught as a loop that goes on would."""

    def fail(module, args):
        raise RuntimeError("raised inside the forward")

    handle = model[2].register_forward_pre_hook(fail)
    try:
        run(opt, model, batches, steps=1, peek=False)
    except RuntimeError as e:
        assert "raised inside the forward" in str(e)
    else:
        raise AssertionError("the step did not raise")
    finally:
        handle.remove()


def loop(model, batches, average=lambda losses: None):
    """STEPS ZO-SGD steps driven by hand: the loss of each perturbation in a perturbed() block, averaged over the
    batches and then by ``average`` (summed across ranks, in place), and apply_projected_grad, between two forwards
    outside the optimizer (FSDP2's root keeps what the first gathered); returns the second forwards' losses."""
    opt = optimizer(ZOSGD, model)
    after = []
    for _ in range(STEPS):
        seed = opt.new_seed()
        losses = torch.zeros(2, dtype=torch.float64)
        with torch.no_grad():
            for k, scale in enumerate((+1, -1)):
                with opt.perturbed(seed, scale):
                    losses[k] = sum(loss_of(model, x, y).double() for x, y in batches) / len(batches)
            average(losses)
            if dist.is_initialized():
                losses /= dist.get_world_size()
            model(batches[0][0])
            opt.apply_projected_grad(seed, float(losses[0] - losses[1]) / 2e-3)
            after.append(loss_of(model, *batches[0]).item())
    return after


def placed(state, placements):
    """A DTensor state placed otherwise (Replicate, or Shard(1)), from its whole value. (Not by redistribute: its
    collectives may still be in flight when a refused load drops the tensor, which once aborted a rank.)"""
    whole = state.full_tensor()
    local = whole if placements == [Replicate()] else whole.chunk(dist.get_world_size(), dim=1)[dist.get_rank()]
    return DTensor.from_local(
        local.contiguous(), state.device_mesh, placements, run_check=False, shape=whole.shape, stride=whole.stride()
    )


def shard(model, policy: MixedPrecisionPolicy | None = None) -> None:
    kwargs = {} if policy is None else dict(mp_policy=policy)
    for k in (0, 2, 4):
        fully_shard(model[k], **kwargs)
    fully_shard(model, **kwargs)  # the root: holds model[5]


def full(model, reshard: bool = False) -> list[list[float]]:
    """The whole parameters (a collective). Without ``reshard``, the model must hold its DTensors, as after a step;
    after a forward of one's own, FSDP2's root holds its gathered copies until ``reshard``."""
    if reshard:
        model.reshard()
    whole = [p.full_tensor() if isinstance(p, DTensor) else p for p in model.parameters()]
    return [p.detach().float().flatten().tolist() for p in whole]


def main() -> None:
    scenario, out, rank, world = join_ranks()
    half = slice(rank * 16 // world, (rank + 1) * 16 // world)
    result = {}
    if scenario == "train":
        for name, cls, kwargs, dtype in CASES:
            model, x, y = model_and_batch(dtype)
            shard(model)
            opt = train(model, cls, [(x[half], y[half])], **kwargs)
            result[name] = dict(params=full(model), losses=[r["losses"] for r in opt.trajectory])
            if name == "zosgd":  # the trajectory re-applied to the shards of the untrained model
                again, _, _ = model_and_batch(dtype)
                shard(again)
                parameters = list(again.parameters())  # its DTensors, before a forward gathers the root's
                with torch.no_grad():
                    again(x[half])
                replay(parameters, opt.trajectory)
                result["zosgd-replayed"] = full(again)
        # The exact mode with lr = 0: bfloat16 shards, and float32 shards whose forwards gather bfloat16 copies (a
        # MixedPrecisionPolicy), are never written; the losses are those of the perturbed gathered tensors.
        for name, dtype, policy in (
            ("exact-lr0", torch.bfloat16, None),
            ("exact-mixed-lr0", torch.float32, MixedPrecisionPolicy(param_dtype=torch.bfloat16)),
        ):
            model, x, y = model_and_batch(dtype)
            shard(model, policy)
            before = full(model)
            opt = train(model, ZOSGD, [(x[half], y[half])], lr=0.0, perturbation="exact")
            result[name] = dict(unchanged=full(model) == before, losses=[r["losses"] for r in opt.trajectory])
        # The exact mode with a closure that also computes with the DTensors themselves (a penalty on the weights,
        # outside the forward): those ops receive DTensors over the perturbed shards.
        model, x, y = model_and_batch(torch.bfloat16)
        shard(model)
        opt = optimizer(ZOSGD, model)
        for _ in range(STEPS):
            opt.step(lambda: loss_of(model, x[half], y[half]).double() + penalty(opt))
        result["exact-penalty"] = dict(params=full(model), losses=[r["losses"] for r in opt.trajectory])
        # Modules gathered by hand between steps (unshard(): a module that has run a forward, and the root), which
        # the step must let go before its first pass writes the shards.
        model, x, y = model_and_batch()
        shard(model)
        opt = optimizer(ZOSGD, model)
        for _ in range(STEPS):
            model[2].unshard(async_op=True)  # (its handle never waited on: the gather stays pending)
            model.unshard()
            opt.step(lambda: loss_of(model, x[half], y[half]).double())
        result["zosgd-unsharded"] = dict(params=full(model), losses=[r["losses"] for r in opt.trajectory])
        # A step that raised inside a forward, then more steps (FSDP2 left the root's gathered weights behind).
        model, x, y = model_and_batch()
        shard(model)
        opt = train(model, ZOSGD, [(x[half], y[half])], steps=1)
        raising_step(opt, model, [(x[half], y[half])])
        run(opt, model, [(x[half], y[half])], steps=2, peek=False)
        result["zosgd-raised"] = dict(params=full(model), losses=[r["losses"] for r in opt.trajectory])
        model, x, y = model_and_batch()
        shard(model)
        trajectory = ldsd_raising_at_f_minus(model, [(x[half], y[half])])
        result["ldsd-raised"] = dict(params=full(model), losses=[r["losses"] for r in trajectory])
        # The exact mode on a rank whose forward left a parameter out of its ops: every rank skips the step, that
        # rank raises once the others have run the step's forwards with it, and the steps go on.
        model, x, y = model_and_batch(torch.bfloat16)
        shard(model)
        with warnings.catch_warnings(record=True):  # (the other rank's: a non-finite loss, the update skipped)
            warnings.simplefilter("always")
            raised, skipped = skipping_the_head(model, [(x[half], y[half])], skips=rank == 1)
        result["exact-skipped"] = dict(params=full(model), raised=raised, skipped=skipped)
        # A loss computed through a method given to register_fsdp_forward_method, in both modes.
        for dtype in (torch.float32, torch.bfloat16):
            model, x, y = model_and_batch(dtype)
            model.__class__ = Scored
            shard(model)
            register_fsdp_forward_method(model, "score")
            opt = train_scored(model, [(x[half], y[half])])
            result[f"scored {dtype}"] = dict(params=full(model), losses=[r["losses"] for r in opt.trajectory])
        # LDSD resumed halfway from each rank's state dict (mu's shards saved as DTensors): as the run goes on.
        model, x, y = model_and_batch()
        shard(model)
        options = next(kwargs for name, _, kwargs, _ in CASES if name == "ldsd")
        saved = train(model, LDSD, [(x[half], y[half])], steps=STEPS // 2, **options).state_dict()
        torch.save(saved, out / f"ldsd{rank}.pt")
        resumed = optimizer(LDSD, model, **options)
        resumed.load_state_dict(torch.load(out / f"ldsd{rank}.pt", weights_only=True))
        run(resumed, model, [(x[half], y[half])], STEPS - STEPS // 2)
        result["ldsd-resumed"] = full(model)
        # ZOAdam resumed halfway into a new optimizer: from each rank's state_dict (its states DTensors, through
        # torch.save), the same with the states gathered (replicated DTensors), and from the state dict of a run on
        # the whole model (plain tensors): each rank takes its shards' rows of a whole state.
        for source in ("shards", "replicated", "whole"):
            model, x, y = model_and_batch()
            if source == "whole":  # every rank runs the whole model on both halves, then shards it
                opt = train(model, ZOAdam, [(x[:8], y[:8]), (x[8:], y[8:])], steps=STEPS // 2, lr=1e-3)
                shard(model)
            else:
                shard(model)
                opt = train(model, ZOAdam, [(x[half], y[half])], steps=STEPS // 2, lr=1e-3)
            saved = opt.state_dict()
            if source == "replicated":
                for states in saved["state"].values():
                    for key in ("exp_avg", "exp_avg_sq"):
                        states[key] = placed(states[key], [Replicate()])
            torch.save(saved, out / f"{source}{rank}.pt")
            resumed = optimizer(ZOAdam, model, lr=1e-3)
            resumed.load_state_dict(torch.load(out / f"{source}{rank}.pt", weights_only=True))
            run(resumed, model, [(x[half], y[half])], STEPS - STEPS // 2)
            result[f"adam-resumed-{source}"] = full(model)
    elif scenario == "loop":  # a loop driving the passes itself: perturbed() blocks and apply_projected_grad
        model, x, y = model_and_batch()
        shard(model)
        after = loop(model, [(x[half], y[half])], average=lambda losses: dist.all_reduce(losses))
        result = dict(params=full(model, reshard=True), after=after)
        model, x, y = model_and_batch(torch.bfloat16)  # the exact mode's blocks
        shard(model)
        after = loop(model, [(x[half], y[half])], average=lambda losses: dist.all_reduce(losses))
        result["bf16"] = dict(params=full(model, reshard=True), after=after)
    elif scenario == "hsdp":  # four ranks: two replicas (Replicate) of a model sharded over two (Shard(0))
        mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("replicate", "shard"))
        model, x, y = model_and_batch()
        for k in (0, 2, 4):
            fully_shard(model[k], mesh=mesh)
        fully_shard(model, mesh=mesh)
        quarter = slice(rank * 16 // world, (rank + 1) * 16 // world)
        train(model, ZOAdam, [(x[quarter], y[quarter])], steps=HSDP_STEPS, lr=1e-3)
        result = dict(placements=str(model[0].weight.placements), params=full(model))
    elif scenario == "reshard-save":  # four ranks: ZOAdam's states saved sharded over 4, and over 2 x 2 (HSDP)
        quarter = slice(rank * 16 // world, (rank + 1) * 16 // world)
        hsdp = init_device_mesh("cpu", (2, 2), mesh_dim_names=("replicate", "shard"))
        for name, mesh in (("flat", None), ("hsdp", hsdp)):
            model, x, y = model_and_batch()
            for k in (0, 2, 4):
                fully_shard(model[k], mesh=mesh)
            fully_shard(model, mesh=mesh)
            opt = train(model, ZOAdam, [(x[quarter], y[quarter])], steps=HSDP_STEPS, lr=1e-3)
            torch.save(opt.state_dict(), out / f"{name}{rank}.pt")
            torch.save(opt.trajectory, out / "trajectory.pt")  # (the weights: the steps, replayed)
    elif scenario == "reshard-load":  # two ranks: those states loaded, and the run continued
        saved = out.parent / "save"
        for name, order in (("flat", range(4)), ("hsdp", range(4)), ("shuffled", (2, 0, 3, 1))):
            model, x, y = model_and_batch()
            shard(model)
            replay(list(model.parameters()), torch.load(saved / "trajectory.pt", weights_only=True))
            opt = optimizer(ZOAdam, model, lr=1e-3)
            files = [saved / f"{'hsdp' if name == 'hsdp' else 'flat'}{r}.pt" for r in order]
            opt.load_sharded_state_dict(torch.load(f, weights_only=True) for f in files)
            run(opt, model, [(x[half], y[half])], steps=HSDP_STEPS)
            result[name] = full(model)
        for case, order in (("three", (0, 1, 2)), ("twice", (0, 1, 2, 2))):
            try:
                optimizer(ZOAdam, model, lr=1e-3).load_sharded_state_dict(
                    torch.load(saved / f"flat{r}.pt", weights_only=True) for r in order
                )
            except ValueError as e:
                result[case] = str(e)
    elif scenario == "refusals":
        errors = {}

        def refused(name, model, cls=ZOSGD, **kwargs):
            before = full(model)
            try:
                opt = optimizer(cls, model, **kwargs)
                opt.step(lambda: loss_of(model, x[half], y[half]))
            except (TypeError, ValueError) as e:
                errors[name] = f"{type(e).__name__}: {e}"
            errors[name + " unchanged"] = full(model) == before

        def load_refused(name, fresh, state_dict):
            try:
                fresh.load_state_dict(state_dict)
            except ValueError as e:
                errors[name] = f"{type(e).__name__}: {e}"
            errors[name + " unchanged"] = not fresh.state and fresh.steps_taken == 0

        # A write through a DTensor in the exact mode (FSDP2's forwards would not read it): refused before it writes.
        model, x, y = model_and_batch(torch.bfloat16)
        shard(model)
        before = full(model)

        def halve_then_loss():
            model[2].weight.data.mul_(0.5)  # (model[2] has not run yet: its weight is still the DTensor)
            return loss_of(model, x[half], y[half])

        try:
            optimizer(ZOSGD, model).step(halve_then_loss)
        except RuntimeError as e:
            errors["exact write"] = f"{type(e).__name__}: {e}"
        errors["exact write unchanged"] = full(model) == before
        model, x, y = model_and_batch(torch.bfloat16)
        shard(model)
        refused("ldsd exact", model, LDSD, k=2)
        model, x, y = model_and_batch()
        fully_shard(model[0])  # the other layers replicated
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # (DTensors and plain tensors together: warned of, tested below)
            refused("ldsd mixed", model, LDSD, k=2)
            # Replay, which runs no other check, refuses it too (the replicated layers' share of mu's norm would be
            # counted once per rank).
            whole, _, _ = model_and_batch()
            trajectory = train(whole, LDSD, [(x[half], y[half])], steps=1, k=2).trajectory
            before = full(model)
            try:
                replay(list(model.parameters()), trajectory)
            except ValueError as e:
                errors["ldsd replay mixed"] = f"{type(e).__name__}: {e}"
            errors["ldsd replay mixed unchanged"] = full(model) == before
        model, x, y = model_and_batch()
        shard(model)
        refused("merge_steps", model, merge_steps=True)
        # A state sharded otherwise than its parameter (by columns): refused by the load, which loads nothing.
        saved = train(model, ZOAdam, [(x[half], y[half])], steps=1, lr=1e-3).state_dict()
        saved["state"][0]["exp_avg"] = placed(saved["state"][0]["exp_avg"], [Shard(1)])
        load_refused("placement", optimizer(ZOAdam, model, lr=1e-3), saved)
        columns = torch.nn.Linear(6, 4)
        columns.weight = torch.nn.Parameter(
            distribute_tensor(columns.weight.detach(), init_device_mesh("cpu", (world,)), [Shard(1)])
        )
        columns.bias.requires_grad_(False)
        before = columns.weight.full_tensor()
        try:
            ZOSGD(columns.parameters(), lr=1e-2, eps=1e-3, seed=1).step(lambda: columns(x.float()[:, :6]).sum())
        except TypeError as e:
            errors["columns"] = f"{type(e).__name__}: {e}"
        errors["columns unchanged"] = torch.equal(columns.weight.full_tensor(), before)
        # The sharded states loaded by torch.distributed.checkpoint into a new optimizer's state dict, which has no
        # entries for them: refused, not a run resumed with zero moments.
        model, x, y = model_and_batch()
        shard(model)
        saved = train(model, ZOAdam, [(x[half], y[half])], steps=1, lr=1e-3).state_dict()
        dcp.save({"optimizer": saved}, checkpoint_id=out / "dcp")
        fresh = optimizer(ZOAdam, model, lr=1e-3)
        template = {"optimizer": fresh.state_dict()}
        dcp.load(template, checkpoint_id=out / "dcp")
        load_refused("dcp template", fresh, template["optimizer"])
        # Those states loaded into an optimizer of the whole model: refused (a whole state would be taken).
        load_refused("unsharded", optimizer(ZOAdam, model_and_batch()[0], lr=1e-3), saved)
        # An optimizer built after a forward, from the root's gathered copies: warned. Built before: not.
        model, x, y = model_and_batch()
        shard(model)
        for forward_first in (False, True):
            if forward_first:
                with torch.no_grad():
                    model(x)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                optimizer(ZOSGD, model)
            errors[f"forward first {forward_first}"] = [str(w.message) for w in caught if "zokern" in str(w.message)]
        # A bfloat16 loss (a MixedPrecisionPolicy's output_dtype casts the model's outputs): warned of, with the cause.
        model, x, y = model_and_batch()
        shard(model)
        opt = optimizer(ZOSGD, model)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            opt.step(lambda: loss_of(model, x[half], y[half]).bfloat16())
        errors["bf16 loss"] = [str(w.message) for w in caught if "zokern" in str(w.message)]
        result = errors
    leave_ranks(out, rank, result)


if __name__ == "__main__":
    main()
