"""One rank of the data-parallel tests (tests/test_distributed.py): gloo on the CPU, rendezvous through a file.

python tests/dp_worker.py SCENARIO OUT_DIR RANK WORLD_SIZE
"""

import torch
from helpers import join_ranks
from helpers import leave_ranks

from zokern import replay
from zokern.optim import FZOO
from zokern.optim import LDSD
from zokern.optim import ZOSGD

STEPS = 5
# (name, optimizer, options) trained on half batches: ZOSGD with one probe keeps its losses on the device, with two
# it gathers them on the host; FZOO gathers N + 1 losses at once.
SCENARIOS = (("zosgd", ZOSGD, dict(n_probes=2)), ("zosgd-device", ZOSGD, {}), ("fzoo", FZOO, dict(n_probes=4)))


def model_and_batch():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    g = torch.Generator().manual_seed(1)
    x = torch.randn(16, 6, generator=g)
    y = torch.randn(16, 1, generator=g)
    return model, x, y


def train(optimizer_cls, x, y, model, **kwargs):
    opt = optimizer_cls(model.parameters(), lr=1e-2, eps=1e-3, seed=77, **kwargs)
    for _ in range(STEPS):
        opt.step(lambda: torch.nn.functional.mse_loss(model(x), y))
    return opt


def main() -> None:
    scenario, out, rank, world = join_ranks()
    model, x, y = model_and_batch()
    shard = slice(rank * len(x) // world, (rank + 1) * len(x) // world)
    result = {}
    if scenario == "train":
        for name, cls, kwargs in SCENARIOS:
            model, _, _ = model_and_batch()
            opt = train(cls, x[shard], y[shard], model, **kwargs)
            result[name] = {
                "params": [p.detach().flatten().tolist() for p in model.parameters()],
                "losses": [r["losses"] for r in opt.trajectory],
            }
    elif scenario == "replay_alone":
        start = [p.detach().clone() for p in model.parameters()]
        opt = train(ZOSGD, x[shard], y[shard], model)
        if rank == 0:  # rank 0 alone rebuilds the weights from the trajectory: replay must not wait for rank 1
            replayed = [s.clone() for s in start]
            again = replay(replayed, opt.trajectory)
            result["equal"] = all(torch.equal(r, p.detach()) for r, p in zip(replayed, model.parameters()))
            with torch.no_grad():
                for p, r in zip(model.parameters(), replayed):
                    p.copy_(r)
            again.param_groups[0]["params"] = list(model.parameters())
            opt = again  # and goes on with the optimizer replay returned, beside rank 1's own
        opt.step(lambda: torch.nn.functional.mse_loss(model(x[shard]), y[shard]))
        result["after"] = [p.detach().flatten().tolist() for p in model.parameters()]
    elif scenario == "desync_seed":
        try:
            ZOSGD(model.parameters(), seed=5 + rank)
        except RuntimeError as e:
            result["error"] = str(e)
    elif scenario == "desync_step":
        # As if the ranks had resumed from checkpoints 50 steps apart: whatever seed_check_every says, each loss
        # reduction checks the step (the first one of each device and host step).
        for kwargs in ({}, dict(n_probes=2)):
            model, _, _ = model_and_batch()  # the first case's restore left each rank's own rounding behind
            opt = ZOSGD(model.parameters(), seed=5, **kwargs)
            opt.steps_taken = 250 + 50 * rank
            before = [p.detach().clone() for p in model.parameters()]
            try:
                opt.step(lambda model=model: torch.nn.functional.mse_loss(model(x[shard]), y[shard]))
            except RuntimeError as e:
                result.setdefault("errors", []).append(str(e))
            moved = max((p.detach() - b).abs().max().item() for p, b in zip(model.parameters(), before))
            result.setdefault("moved", []).append(moved)
    elif scenario == "closure_raises":
        # Rank 1's closure fails once (a bad batch); each rank's loop catches what its step raises and goes on.
        for name, cls, kwargs in (*SCENARIOS, ("ldsd", LDSD, dict(k=3))):
            model, _, _ = model_and_batch()
            opt = cls(model.parameters(), lr=1e-2, eps=1e-3, seed=77, **kwargs)
            calls, raised = 0, []

            def closure(model=model):
                nonlocal calls
                calls += 1
                if rank == 1 and calls == 4:
                    raise KeyError("bad batch")
                return torch.nn.functional.mse_loss(model(x[shard]), y[shard])

            for _ in range(STEPS):
                try:
                    opt.step(closure)
                except KeyError as e:
                    raised.append(str(e))
            result[name] = {
                "params": [p.detach().flatten().tolist() for p in model.parameters()],
                "raised": raised,
                "skipped": [r["step"] for r in opt.trajectory if r["skipped"]],
            }
    elif scenario == "desync_replay":
        # Rank 1 one step ahead after a first step together (resumed from a later checkpoint, say): the step skips
        # its update on both ranks, counts it and raises; rank 0's trajectory replays alone to its parameters (rank
        # 1's skips a step number: replay refuses it).
        for name, cls, kwargs in SCENARIOS:
            model, _, _ = model_and_batch()
            start = [p.detach().clone() for p in model.parameters()]
            opt = cls(model.parameters(), lr=1e-2, eps=1e-3, seed=77, **kwargs)
            closure = lambda model=model: torch.nn.functional.mse_loss(model(x[shard]), y[shard])  # noqa: E731
            opt.step(closure)
            opt.steps_taken += rank
            try:
                opt.step(closure)
                error = ""
            except RuntimeError as e:
                error = str(e)
            replayed = [t.clone() for t in start]
            if rank == 0:
                replay(replayed, opt.trajectory)
            result[name] = {
                "error": error,
                "nonfinite": opt.nonfinite_steps,
                "replays": all(torch.equal(r, p.detach()) for r, p in zip(replayed, model.parameters())),
            }
    elif scenario == "desync_check_every":
        try:
            ZOSGD(model.parameters(), seed=5, seed_check_every=1 if rank == 0 else 100)
        except RuntimeError as e:
            result["error"] = str(e)
    elif scenario == "desync_setup":
        # Ranks that differ in what a step does beyond its seed, each a step that must fail on both ranks rather than
        # leave them diverging: a rank-local learning rate (a plateau scheduler on a rank's own metric), a parameter
        # frozen on one rank, a step count per step (n_probes: reductions of different sizes), seed=None on one rank,
        # a weight that differs on one rank, and a merged 16-bit perturbation one rank's read took back.
        closure = lambda: torch.nn.functional.mse_loss(model(x[shard]).float(), y[shard])  # noqa: E731
        cases = {
            "lr": lambda: ZOSGD(model.parameters(), lr=1e-2 * (1 + rank), seed=5),
            "frozen": lambda: ZOSGD([{"params": [p]} for p in model.parameters()], seed=5),
            "n_probes": lambda: ZOSGD(model.parameters(), seed=5, n_probes=1 + rank),
            "seed_none": lambda: ZOSGD(model.parameters(), seed=None if rank else 5),
            "weights": lambda: ZOSGD(model.parameters(), seed=5),
        }
        for name, build in cases.items():
            model, _, _ = model_and_batch()
            try:
                opt = build()
                if name == "frozen":  # after the optimizer is built, as a partial unfreeze on one rank would
                    model[0].bias.requires_grad_(rank == 0)
                if name == "weights" and rank == 1:  # one weight off by an ulp: a rank initialised otherwise
                    with torch.no_grad():
                        model[2].bias.copy_(torch.nextafter(model[2].bias, torch.tensor(1.0)))
                for _ in range(2):
                    opt.step(closure)
                result[name] = ""
            except RuntimeError as e:
                result[name] = str(e)
        model, _, _ = model_and_batch()
        model.bfloat16()
        opt = ZOSGD(model.parameters(), lr=1e-2, seed=5, perturbation="inplace", merge_steps=True)
        bf16 = lambda: torch.nn.functional.mse_loss(model(x[shard].bfloat16()).float(), y[shard])  # noqa: E731
        try:
            opt.step(bf16)
            if rank == 0:
                model.state_dict()  # a checkpoint read on rank 0 only: its perturbation is taken back there
            opt.step(bf16)
            result["merged_read"] = ""
        except RuntimeError as e:
            result["merged_read"] = str(e)
        # In float32 the take-back and the new perturbation give the bits back: a read on one rank is no error.
        model, _, _ = model_and_batch()
        opt = ZOSGD(model.parameters(), lr=1e-2, seed=5, merge_steps=True)
        opt.step(closure)
        if rank == 0:
            model(x[shard])  # an evaluation on rank 0 only
        opt.step(closure)
        result["merged_read_float32"] = [p.detach().flatten().tolist() for p in model.parameters()]
    elif scenario == "default_seed":
        torch.manual_seed(100 + rank)  # ranks seeded differently: rank 0's seed must win
        result["seed"] = ZOSGD(model.parameters()).base_seed
    leave_ranks(out, rank, result)


if __name__ == "__main__":
    main()
