"""One rank of the data-parallel tests (tests/test_distributed.py): gloo on the CPU, rendezvous through a file.

python tests/dp_worker.py SCENARIO OUT_DIR RANK WORLD_SIZE
"""

import datetime
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from zokern import replay
from zokern.optim import FZOO
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
    scenario, out, rank, world = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    dist.init_process_group(
        "gloo",
        init_method=f"file://{out / 'rendezvous'}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=60),
    )
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
            replay(replayed, opt.trajectory)
            result["equal"] = all(torch.equal(r, p.detach()) for r, p in zip(replayed, model.parameters()))
    elif scenario == "desync_seed":
        try:
            ZOSGD(model.parameters(), seed=5 + rank)
        except RuntimeError as e:
            result["error"] = str(e)
    elif scenario == "desync_step":
        opt = ZOSGD(model.parameters(), seed=5, seed_check_every=1)
        opt.steps_taken = 3 * rank  # as if one rank had resumed from another checkpoint
        try:
            opt.step(lambda: torch.nn.functional.mse_loss(model(x[shard]), y[shard]))
        except RuntimeError as e:
            result["error"] = str(e)
    elif scenario == "default_seed":
        torch.manual_seed(100 + rank)  # ranks seeded differently: rank 0's seed must win
        result["seed"] = ZOSGD(model.parameters()).base_seed
    (out / f"rank{rank}.json").write_text(json.dumps(result))
    dist.barrier()  # no rank tears down its connections while another still uses them
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
