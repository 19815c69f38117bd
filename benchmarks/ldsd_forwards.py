"""Forward passes to reach a loss target: LDSD against MeZO (ZO-SGD) and best-of-K greedy (LDSD with mu_lr = 0).

`python -m benchmarks.ldsd_forwards [--workers N] [--no-append]`

Each method gets its best learning rate from one grid (LDSD also its best mu_lr and mu_norm), chosen by the
forwards it needs on seed 0; the table reports that setting's median over seeds 0-2. Problems: quadratics
0.5 x^T A x (isotropic and ill-conditioned, d = 100 and 1000) and a small network (logistic loss through one
hidden layer on a fixed synthetic batch), each with its target (a fraction of the starting loss) and budget of
forwards. "-" means the budget ran out. CPU, float32, K = 5, eps = 1e-3.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import math
import statistics
import sys
import warnings
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor

import torch

import zokern
from benchmarks._results import publish
from zokern.optim import LDSD
from zokern.optim import ZOSGD

LRS = [10 ** (e / 2) for e in range(-10, 2)]
MU_LRS = [1.0, 10.0, 100.0, 1000.0]
MU_NORMS = [0.3, 1.0]
K = 5


def quadratic(d: int, condition: float) -> Callable[[int], tuple[list[torch.nn.Parameter], Callable]]:
    def make(seed: int):
        a = torch.logspace(0, math.log10(condition), d)
        x = torch.nn.Parameter(torch.randn(d, generator=torch.Generator().manual_seed(seed)))
        return [x], lambda: 0.5 * (a * x * x).sum()

    return make


def network(seed: int):
    g = torch.Generator().manual_seed(100)
    inputs = torch.randn(256, 16, generator=g)
    labels = (inputs @ torch.randn(16, generator=g) > 0).float()
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    loss = lambda: torch.nn.functional.binary_cross_entropy_with_logits(model(inputs).squeeze(1), labels)  # noqa: E731
    return list(model.parameters()), loss


# name: (builder, target as a fraction of the starting loss, budget of forwards)
PROBLEMS = {
    "quadratic d=100, isotropic, to 1 %": (quadratic(100, 1.0), 0.01, 6000),
    "quadratic d=100, condition 100, to 1 %": (quadratic(100, 100.0), 0.01, 6000),
    "quadratic d=1000, condition 10, to 10 %": (quadratic(1000, 10.0), 0.1, 30000),
    "network d=289, logistic loss, to 20 %": (network, 0.2, 6000),
}


def forwards_to_target(problem: str, method: str, settings: dict, seed: int) -> float:
    build, fraction, budget = PROBLEMS[problem]
    params, loss = build(seed)
    with torch.no_grad():
        start = float(loss())
    if method == "MeZO":
        opt, per_step = ZOSGD(params, lr=settings["lr"], eps=1e-3, seed=seed), 2
    else:
        opt, per_step = LDSD(params, eps=1e-3, k=K, seed=seed, **settings), K + 1
    used = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        while used < budget:
            opt.step(loss)
            used += per_step
            with torch.no_grad():
                value = float(loss())
            if not math.isfinite(value) or value > 1e3 * start:
                return math.inf
            if value <= fraction * start:
                return used
    return math.inf


def grid(method: str) -> list[dict]:
    if method == "MeZO":
        return [dict(lr=lr) for lr in LRS]
    if method == "greedy best-of-K":
        return [dict(lr=lr, mu_lr=0.0) for lr in LRS]
    return [dict(lr=lr, mu_lr=m, mu_norm=r) for lr, m, r in itertools.product(LRS, MU_LRS, MU_NORMS)]


def _run(job):
    return job, forwards_to_target(*job)


def measure(workers: int) -> list[tuple[str, str, dict, list[float]]]:
    methods = ["MeZO", "greedy best-of-K", "LDSD"]
    tuning = [(p, m, s, 0) for p in PROBLEMS for m in methods for s in grid(m)]
    with ProcessPoolExecutor(workers) as pool:
        best: dict[tuple[str, str], tuple[dict, float]] = {}
        for (p, m, s, _), value in pool.map(_run, tuning, chunksize=4):
            if (p, m) not in best or value < best[(p, m)][1]:
                best[(p, m)] = (s, value)
        repeats = [(p, m, best[(p, m)][0], seed) for p in PROBLEMS for m in methods for seed in (1, 2)]
        extra = list(pool.map(_run, repeats))
    rows = []
    for p in PROBLEMS:
        for m in methods:
            settings, first = best[(p, m)]
            values = [first] + [v for (pp, mm, *_), v in extra if (pp, mm) == (p, m)]
            rows.append((p, m, settings, values))
    return rows


def table(rows) -> str:
    out = (
        f"\n### LDSD: forwards to a loss target, {datetime.date.today()}\n\n"
        f"CPU, torch {torch.__version__}, zokern {zokern.__version__}. Command: "
        f"`python -m benchmarks.ldsd_forwards`. K = {K}, eps = 1e-3, float32; each method's best setting on seed 0 "
        "from the grid in the script, median forwards over seeds 0-2 (- : not within the problem's budget: 6000 "
        "forwards, 30000 for d = 1000).\n\n"
        "| problem | method | best setting | forwards (seeds 0, 1, 2) | median | vs MeZO |\n|---|---|---|---|---|---|\n"
    )
    mezo = {p: statistics.median(v) for p, m, _, v in rows if m == "MeZO"}
    for p, m, settings, values in rows:
        median = statistics.median(values)
        shown = ", ".join("-" if math.isinf(v) else str(int(v)) for v in values)
        setting = ", ".join(f"{k}={v:.3g}" for k, v in settings.items())
        ratio = "-" if math.isinf(median) or math.isinf(mezo[p]) else f"{mezo[p] / median:.2f}x"
        out += f"| {p} | {m} | {setting} | {shown} | {'-' if math.isinf(median) else int(median)} | {ratio} |\n"
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--no-append", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    text = table(measure(args.workers))
    publish(text, append=not args.no_append)
    return 0


if __name__ == "__main__":
    sys.exit(main())
