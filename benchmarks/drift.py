"""16-bit drift at lr = 0 and step time, per perturbation scheme:
`python -m benchmarks.drift [--model tiny|opt-125m|opt-1.3b] [--device cpu|cuda] [--dtype bfloat16|float16]
[--steps 1000] [--no-append]`.

An OPT model is built from its config (random weights, tied input/output embeddings) in bf16 (``--dtype``; MeZO's
published large-model runs load fp16, whose finer mantissa drifts less) and trained with
lr = 0 on a fixed batch, so any change of a weight is damage done by the perturb/restore cycle. Three schemes, each
from the same start, in one run:
- MeZO's published scheme: the global generator reseeded, torch.normal per tensor, out-of-place adds in the
  parameter's dtype (+eps, -2 eps, +eps), then the update pass;
- zokern in place (ZOSGD, perturbation="inplace"): the fused passes, perturbing the weights themselves;
- zokern exact (ZOSGD, perturbation="exact", the default for 16-bit): the weights are never written while the loss
  is evaluated.
Reports the fraction of weights changed, the rms drift (absolute, and relative to the weights' rms) and the median
step time; appends the table to benchmarks/RESULTS.md with device, versions, date and command.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import math
import platform
import sys

import torch

import zokern
from benchmarks import _device
from benchmarks._results import publish
from benchmarks.step import MODELS
from benchmarks.step import build
from zokern.baselines import mezo_published_step
from zokern.optim import ZOSGD

# OPT ties its input and output embeddings: the case exact mode must get right.
OPT_MODELS = [name for name in MODELS if MODELS[name][0] == "opt"]


def run(
    model_name: str, device: str, dtype: torch.dtype, steps: int, batch: int, seq: int, eps: float, rows: list[tuple]
) -> None:
    """Append a row per scheme to ``rows`` as it finishes: zokern's exact mode first, the one this table is for."""
    for scheme in ("zokern exact", "zokern in place", "MeZO published"):
        model = build(model_name, device, dtype)
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        params = [p for _, p in named]
        start = [p.detach().clone() for p in params]
        ids = torch.randint(0, model.config.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(1))
        ids = ids.to(device)

        @torch.no_grad()
        def closure(model=model, ids=ids):
            return model(input_ids=ids, labels=ids).loss

        if scheme == "MeZO published":

            def step(t, named=named, closure=closure):
                mezo_published_step(named, closure, t, eps, 0.0)

        else:
            mode = "inplace" if scheme == "zokern in place" else "exact"
            opt = ZOSGD(params, lr=0.0, eps=eps, seed=0, perturbation=mode)

            def step(t, opt=opt, closure=closure):
                opt.step(closure)

        ms, _ = _device.Timer(device, steps, warmup=0)(step)
        params = [p.detach() for p in params]
        changed = sum(int((p != s).sum()) for p, s in zip(params, start))
        total = sum(p.numel() for p in params)
        drift = math.sqrt(sum(float((p.double() - s.double()).pow(2).sum()) for p, s in zip(params, start)) / total)
        rms = math.sqrt(sum(float(s.double().pow(2).sum()) for s in start) / total)
        rows.append((scheme, changed / total, drift, drift / rms, ms))
        print(
            f"{scheme:18s} changed {changed / total:7.2%}  rms drift {drift:.3e} ({drift / rms:.2%} of rms)  "
            f"{rows[-1][-1]:.2f} ms/step",
            flush=True,
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=OPT_MODELS, default="tiny")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["bfloat16", "float16"], default="bfloat16")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--eps", type=float, default=1e-3)
    parser.add_argument("--no-append", action="store_true")
    args = parser.parse_args()
    rows: list[tuple] = []
    try:
        run(args.model, args.device, getattr(torch, args.dtype), args.steps, args.batch, args.seq, args.eps, rows)
    finally:  # what was measured is written, also when the run is stopped at a time limit
        if rows:
            write(rows, args)
    return 0


def write(rows: list[tuple], args: argparse.Namespace) -> None:
    device = _device.name(args.device)
    ms = {scheme: row[-1] for scheme, *row in rows}
    ratio = ""
    if "zokern exact" in ms and "zokern in place" in ms:
        ratio = f"\nExact mode step time / in-place step time: {ms['zokern exact'] / ms['zokern in place']:.3f}.\n"
    command = " ".join(["python -m benchmarks.drift", *sys.argv[1:]])
    table = (
        f"\n### 16-bit drift at lr = 0, {args.dtype}, {datetime.date.today()}\n\n"
        f"Device {device}, torch {torch.__version__}, transformers {importlib.metadata.version('transformers')}, "
        f"Python {platform.python_version()}, zokern {zokern.__version__} (stream v{zokern.STREAM_VERSION}), "
        f"backends {zokern.available_backends()}. Model {args.model} ({args.dtype}, tied embeddings, weights rms from "
        f"OPT's init), batch {args.batch} x {args.seq}, eps {args.eps}, {args.steps} steps at lr = 0. "
        f"Command: `{command}`.\n\n"
        "| scheme | weights changed | rms drift | drift / weight rms | ms/step (median) |\n|---|---|---|---|---|\n"
        + "".join(f"| {s} | {c:.2%} | {d:.3e} | {r:.2%} | {t:.2f} |\n" for s, c, d, r, t in rows)
        + ratio
    )
    publish(table, append=not args.no_append)


if __name__ == "__main__":
    sys.exit(main())
