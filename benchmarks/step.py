"""Step time and peak memory of a ZO step against MeZO's published step and AdamW, measured side by side in one run:

    python -m benchmarks.step --model opt-1.3b --batch 16 --seq 256            (GPU)
    python -m benchmarks.step --model tiny --device cpu --batch 2 --seq 32 --no-append   (CPU smoke)

The model is built from a `transformers` config with random weights, in bf16 (``--dtype``). Methods, one after the
other on the same model and batch:
- two forwards: the closure called twice, without zokern (the floor a ZO step is compared to); on a GPU also the two
  calls replayed from a CUDA graph (the floor of the graphed step);
- MeZO published: its step re-implemented exactly (zokern.baselines);
- zokern ZOSGD, for each available backend and mode (in place; in place with the cross-step merge, two passes per
  step; in place replayed from a CUDA graph, on a GPU; exact, the 16-bit default);
- AdamW: a first-order step (forward, backward, torch's fused AdamW where the device has it, else foreach), in the
  model's dtype (weights, gradients and moments: no float32 master copy);
- two forwards again, last: the ratios take the faster of the two floors (a floor timed cold would flatter every
  other row), and the table says so if a ZO or MeZO step came out below it (a loaded machine's noise).
The forwards of the floors run under ``torch.inference_mode``, as MeZO's, those of zokern's step under ``no_grad``.
Reports ms/step (median), tokens/s (batch x seq per step), peak memory (CUDA; "-" on the CPU), and the ratios to
MeZO's step and to two forwards. Prints a Markdown table, appends it to benchmarks/RESULTS.md and one JSON line per
method to benchmarks/step_results.jsonl (the data of `python -m benchmarks.plot_step`).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import importlib.metadata
import json
import platform
import sys
import uuid
from collections.abc import Callable
from pathlib import Path

import torch

import zokern
from benchmarks import _device
from benchmarks._device import Timer
from zokern.baselines import mezo_published_step
from zokern.optim import ZOSGD
from zokern.optim import graph

HERE = Path(__file__).parent
RESULTS = HERE / "RESULTS.md"
JSONL = HERE / "step_results.jsonl"

# name: (family, hidden, layers, heads, ffn, vocab[, kv heads])
MODELS = {
    "tiny": ("opt", 256, 4, 4, 1024, 4096),
    "opt-125m": ("opt", 768, 12, 12, 3072, 50272),
    "opt-1.3b": ("opt", 2048, 24, 32, 8192, 50272),
    "opt-6.7b": ("opt", 4096, 32, 32, 16384, 50272),
    "opt-13b": ("opt", 5120, 40, 40, 20480, 50272),
    "opt-30b": ("opt", 7168, 48, 56, 28672, 50272),
    "llama-1b": ("llama", 2048, 16, 32, 8192, 128256, 8),
    "llama-7b": ("llama", 4096, 32, 32, 11008, 32000, 32),
}


# Positions of the configs build() makes (OPT's and Llama's published ones).
MAX_POSITIONS = {"opt": 2048, "llama": 4096}


def build(name: str, device: str, dtype: torch.dtype) -> torch.nn.Module:
    import transformers

    family, hidden, layers, heads, ffn, vocab, *kv = MODELS[name]
    if family == "opt":
        config = transformers.OPTConfig(
            vocab_size=vocab,
            hidden_size=hidden,
            num_hidden_layers=layers,
            ffn_dim=ffn,
            num_attention_heads=heads,
            word_embed_proj_dim=hidden,
            max_position_embeddings=MAX_POSITIONS["opt"],
            dropout=0.0,  # AdamW's step runs in train mode; the ZO methods in eval: the same function for all
        )
        cls = transformers.OPTForCausalLM
    else:
        config = transformers.LlamaConfig(
            vocab_size=vocab,
            hidden_size=hidden,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=kv[0],
            intermediate_size=ffn,
            max_position_embeddings=MAX_POSITIONS["llama"],
            tie_word_embeddings=name == "llama-1b",  # Llama 3.2 1B ties them; Llama 2 7B does not
        )
        cls = transformers.LlamaForCausalLM
    torch.manual_seed(0)
    # Parameters are created in ``dtype`` on the device: built in float32 first, a 13B model would need 78 GB on the
    # way (float32 weights plus their copy), more than an 80 GB GPU holds.
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = cls(config)
    finally:
        torch.set_default_dtype(default_dtype)
    return model.to(dtype).eval()  # buffers created as float32 on purpose (rotary frequencies) too, as before


# zokern's modes: in place (three passes per step), in place with the cross-step merge (two), in place replayed from a
# CUDA graph (GPU only: on the CPU it is the in-place step), exact (16-bit default).
ZOSGD_MODES = {
    "inplace": dict(perturbation="inplace"),
    "inplace merged": dict(perturbation="inplace", merge_steps=True),
    "inplace graphed": dict(perturbation="inplace", cuda_graph=True),
    "exact": dict(perturbation="exact"),
}


def captured(fn: Callable[[], object]) -> Callable[[int], object]:
    """``fn`` captured in a CUDA graph (after two calls on a side stream, as torch advises), as a replaying callable."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.no_grad(), torch.cuda.stream(side):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    cuda_graph, pool = torch.cuda.CUDAGraph(), torch.cuda.graph_pool_handle()
    try:
        # The outer stream context restores the current stream even where a failed capture's end raises first.
        with torch.cuda.stream(torch.cuda.current_stream()), torch.no_grad(), torch.cuda.graph(cuda_graph, pool=pool):
            fn()
    except BaseException:
        graph.stop_recording_into(pool, torch.device("cuda", torch.cuda.current_device()))  # torch < 2.12
        raise
    return lambda t: cuda_graph.replay()


def zo_backends(device: str) -> list[str]:
    kind = torch.device(device).type
    return [b for b in zokern.available_backends() if b == "torch" or b == kind or (b == "triton" and kind == "cuda")]


def measure(args: argparse.Namespace, rows: list[dict]) -> None:
    """Append one row per method to ``rows`` as it is measured (what a run stopped at its limit has measured stays)."""
    dtype = getattr(torch, args.dtype)
    model = build(args.model, args.device, dtype)
    shape = dict(
        model=args.model,
        params=sum(p.numel() for p in model.parameters()),
        batch=args.batch,
        seq=args.seq,
        dtype=args.dtype,
        largest_param_gib=max(p.numel() * p.element_size() for p in model.parameters()) / 2**30,
    )
    ids = torch.randint(0, model.config.vocab_size, (args.batch, args.seq), generator=torch.Generator().manual_seed(1))
    ids = ids.to(args.device)

    def closure():  # no KV cache: a training forward has no use for one, and it would add to every method's peak
        return model(input_ids=ids, labels=ids, use_cache=False).loss

    timer = Timer(args.device, args.steps, args.warmup)

    def failed(method: str, status: str) -> None:
        rows.append(dict(method=method, ms=None, peak_gib=None, status=status, **shape))
        print(f"{method:34s} {status}", flush=True)

    def record(method: str, fn: Callable[[int], object], captured_since_reset: bool = False) -> None:
        try:
            ms, peak = timer(fn, peak_from_now=not captured_since_reset)
        except torch.OutOfMemoryError:
            torch.cuda.empty_cache()
            return failed(method, "out of memory")
        except Exception as e:  # one method's failure is its row; the others are still measured
            return failed(method, f"{type(e).__name__}: {e}"[:80])
        rows.append(dict(method=method, ms=ms, peak_gib=peak, status="ok", **shape))
        print(f"{method:34s} {ms:9.2f} ms" + (f"  peak {peak:6.2f} GiB" if peak is not None else ""), flush=True)

    try:  # the process's first forwards (allocator, kernel selection) count for no method
        with torch.inference_mode():
            for _ in range(3):
                closure()
        _device.synchronize(args.device)
    except Exception:  # a forward that fails (out of memory, say) fails the rows below, each with its status
        if torch.device(args.device).type == "cuda":
            torch.cuda.empty_cache()
    with torch.inference_mode():
        record("two forwards", lambda t: (closure(), closure()))
    if torch.device(args.device).type == "cuda":
        # The floor of the graphed ZO step: inside a capture, transformers builds an explicit causal mask (its
        # is_tracing() sees the capture), so the captured forwards may take another attention kernel than these.
        try:
            timer.reset_peak()
            replay = captured(lambda: (closure(), closure()))
        except Exception as e:
            failed("two forwards, graphed", f"{type(e).__name__}: {e}"[:80])
        else:
            record("two forwards, graphed", replay, captured_since_reset=True)
            del replay
            gc.collect()
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]  # its weight decay goes by name
    record("MeZO published", lambda t: mezo_published_step(named, closure, t, 1e-3, 1e-7))
    backends = zo_backends(args.device) if args.backends is None else args.backends.split(",")
    for backend in backends:
        for mode, options in ZOSGD_MODES.items():
            graphed = options.get("cuda_graph", False)
            if graphed and torch.device(args.device).type != "cuda":
                continue
            try:
                timer.reset_peak()
                opt = ZOSGD(model.parameters(), lr=1e-7, eps=1e-3, seed=0, backend=backend, **options)
                for _ in range(graph.WARMUP_STEPS + 1 if graphed else 0):  # captured before the timer's warm-up
                    opt.step(closure)
            except Exception as e:  # e.g. a model whose forward syncs with the host cannot be captured
                failed(f"zokern ZOSGD {backend} {mode}", f"{type(e).__name__}: {e}"[:80])
                continue
            record(f"zokern ZOSGD {backend} {mode}", lambda t, opt=opt: opt.step(closure), captured_since_reset=graphed)
            opt.materialize()  # a merged run leaves the next perturbation in the weights
            del opt
            gc.collect()  # a graphed run's memory pool goes with its optimizer: before the next method's peak
    if not args.skip_adamw:
        model.train()
        # Torch's fused AdamW (one kernel per step) where it has one, else foreach (its check is lazy: at step).
        fused = torch.device(args.device).type in fused_devices()
        adamw = torch.optim.AdamW(model.parameters(), lr=1e-7, fused=fused, foreach=not fused)

        def first_order(t):
            loss = closure()
            loss.backward()
            adamw.step()
            adamw.zero_grad(set_to_none=True)

        record("AdamW (first order)", first_order)
        del adamw
        model.eval()
    with torch.inference_mode():
        record("two forwards, again", lambda t: (closure(), closure()))


def fused_devices() -> list[str]:
    """The device types of torch's fused optimizer kernels (torch keeps the list private)."""
    from torch.utils import _foreach_utils

    return getattr(_foreach_utils, "_get_fused_kernels_supported_devices", lambda: ["cuda", "cpu"])()


def table(rows: list[dict], args: argparse.Namespace) -> str:
    by_method = {r["method"]: r for r in rows}
    floors = [by_method.get(m, {}).get("ms") for m in ("two forwards", "two forwards, again")]
    floors = [ms for ms in floors if ms is not None]
    floor = min(floors) if floors else None  # none measured: no ratios
    mezo = by_method.get("MeZO published", {}).get("ms")
    device = _device.name(args.device)
    triton = importlib.metadata.version("triton") if "triton" in zokern.available_backends() else "-"
    command = " ".join(["python -m benchmarks.step", *sys.argv[1:]])
    out = (
        f"\n### ZO step, {args.model}, batch {args.batch} x {args.seq}, {args.dtype}, {datetime.date.today()}\n\n"
        f"Device {device}, torch {torch.__version__}, triton {triton}, transformers "
        f"{importlib.metadata.version('transformers')}, Python {platform.python_version()}, zokern "
        f"{zokern.__version__} (stream v{zokern.STREAM_VERSION}). {rows[0]['params'] / 1e6:.1f}M parameters. "
        f"Median of {args.steps} steps after {args.warmup} warm-up. Largest parameter "
        f"{rows[0]['largest_param_gib']:.3f} GiB. Command: `{command}`.\n\n"
        "Peak over inference: the step's peak above the two forwards' (the targets: + 1 % in place, + the largest "
        "parameter in the exact mode).\n\n"
        "| method | ms/step | tokens/s | peak GiB | peak over inference | × two forwards | MeZO time / this |\n"
        "|---|---|---|---|---|---|---|\n"
    )
    inference_peak = by_method.get("two forwards", {}).get("peak_gib")
    for r in rows:
        if r["ms"] is None:
            out += f"| {r['method']} | {r['status']} | - | - | - | - | - |\n"
            continue
        tokens = r["batch"] * r["seq"] / (r["ms"] / 1e3)
        peak = over = "-"
        if r["peak_gib"] is not None:
            peak = f"{r['peak_gib']:.2f}"
            if inference_peak is not None:
                extra = r["peak_gib"] - inference_peak
                over = f"{extra:+.3f} GiB ({extra / inference_peak:+.1%})"
        times_floor = "-" if floor is None else f"{r['ms'] / floor:.2f}"
        mezo_ratio = "-" if mezo is None else f"{mezo / r['ms']:.2f}"
        out += f"| {r['method']} | {r['ms']:.2f} | {tokens:,.0f} | {peak} | {over} | {times_floor} | {mezo_ratio} |\n"
    # A graphed step replays its forwards from a CUDA graph: its floor is the graphed one (launch overhead gone).
    graphed_floor = by_method.get("two forwards, graphed", {}).get("ms")

    def floor_of(method: str) -> float | None:
        return graphed_floor if method.endswith("graphed") else floor

    stepped = [r for r in rows if r["method"].startswith(("zokern", "MeZO")) and r["ms"] is not None]
    below = [r["method"] for r in stepped if floor_of(r["method"]) and r["ms"] < floor_of(r["method"])]
    if below:
        out += (f"\nNot a result: {', '.join(below)} timed below the two forwards it runs (the machine was busy, or "
                "the floors were timed in another state); measure again on an idle device.\n")  # fmt: skip
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=list(MODELS), default="opt-1.3b")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--backends", default=None, help="comma-separated zokern backends (default: all available)")
    parser.add_argument("--skip-adamw", action="store_true", help="leave out the first-order baseline")
    parser.add_argument("--no-append", action="store_true", help="print only; write nothing")
    args = parser.parse_args(argv)
    positions = MAX_POSITIONS[MODELS[args.model][0]]
    for name, value, low in (("steps", args.steps, 1), ("warmup", args.warmup, 0), ("batch", args.batch, 1)):
        if value < low:
            parser.error(f"--{name} must be at least {low}, got {value}")
    if not 2 <= args.seq <= positions:  # a next-token loss needs two tokens; a longer one indexes past the positions
        parser.error(f"--seq must be in [2, {positions}] for {args.model}, got {args.seq}")
    try:
        device = torch.device(args.device)
    except RuntimeError:
        parser.error(f"--device {args.device!r} is not a torch device (cpu, cuda, cuda:1, ...)")
    if device.type not in ("cpu", "cuda") or (device.type == "cuda" and not torch.cuda.is_available()):
        parser.error(f"--device {args.device}: this benchmark runs on the CPU or on an available CUDA GPU")
    if args.backends is not None:
        unknown = sorted(set(args.backends.split(",")) - set(zokern.backend_status()))
        if unknown:
            parser.error(f"--backends {','.join(unknown)}: not a zokern backend ({', '.join(zokern.backend_status())})")
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)  # the capture's side stream and graph pool are the current device's
    args.run = uuid.uuid4().hex[:12]  # every row of this run carries it: plot_step plots one run per model
    rows: list[dict] = []
    try:
        measure(args, rows)
    finally:  # also when stopped at a time limit (SIGINT) or by an error: the rows measured so far are written
        if rows:
            write(rows, args)
    return 0


def write(rows: list[dict], args: argparse.Namespace) -> None:
    if not args.no_append:
        with JSONL.open("a") as fh:  # first: the data, whatever happens to the table
            stamp = dict(date=str(datetime.date.today()), device=args.device, run=args.run)
            for r in rows:
                fh.write(json.dumps(dict(r, **stamp)) + "\n")
    text = table(rows, args)
    print(text)
    if not args.no_append:
        with RESULTS.open("a") as fh:
            fh.write(text)


if __name__ == "__main__":
    sys.exit(main())
