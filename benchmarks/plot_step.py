"""Plot step time and peak memory against model size for MeZO, zokern and AdamW, from the rows that
`python -m benchmarks.step` appended to benchmarks/step_results.jsonl:

    python -m benchmarks.plot_step [--device cuda] [--batch 1 --seq 256 --dtype bfloat16 --family opt] [--out PNG]

For each model size the newest run counts, all of its points from that run (a method it skipped or that failed in it
has no point there rather than an older run's); zokern's point is its fastest backend and mode (named in the legend's
notes). Peak memory is plotted where it was measured (CUDA).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).parent


def load(
    path: Path, device: str, batch: int, seq: int, family: str, dtype: str = "bfloat16"
) -> dict[str, dict[str, dict]]:
    """model -> method -> row of the model's newest run (by file order), for one device kind, one batch shape, one
    dtype and one model family: a line through sizes measured at other shapes, precisions or architectures would not
    be a scaling curve, nor would a point mixing two runs' methods."""
    newest: dict[str, tuple[object, dict[str, dict]]] = {}
    previous = None
    for number, line in enumerate(path.read_text().splitlines()):
        row = json.loads(line)
        run = row.get("run") or _legacy_run(row, previous, number)
        previous = dict(row, run=run)
        if (
            row.get("device", "").split(":")[0] == device
            and (row.get("batch"), row.get("seq"), row.get("dtype", dtype)) == (batch, seq, dtype)
            and row["model"].startswith(family)
        ):
            if newest.get(row["model"], (None,))[0] != run:
                newest[row["model"]] = (run, {})  # a newer run of this model replaces the older one whole
            if row["ms"] is not None:
                newest[row["model"]][1][row["method"]] = row
    return {model: methods for model, (_, methods) in newest.items() if methods}


def _legacy_run(row: dict, previous: dict | None, number: int) -> tuple:
    """A run for rows written before each carried its run's id: one run's rows are consecutive and begin with its
    "two forwards" row (the run is named by that row's line number)."""
    if previous is not None and row["method"] != "two forwards":
        same = ("model", "batch", "seq", "dtype", "date", "device")
        if all(row.get(k) == previous.get(k) for k in same):
            return previous["run"]
    return ("legacy", number)


def series(latest: dict[str, dict[str, dict]]) -> dict[str, list[tuple[float, float, float | None, str]]]:
    """method -> [(params, ms, peak GiB, label)] sorted by size."""
    out: dict[str, list] = {"MeZO published": [], "zokern ZOSGD (fastest)": [], "AdamW (first order)": []}
    for methods in latest.values():
        for name in ("MeZO published", "AdamW (first order)"):
            if name in methods:
                r = methods[name]
                out[name].append((r["params"], r["ms"], r["peak_gib"], name))
        zo = [r for m, r in methods.items() if m.startswith("zokern")]
        if zo:
            best = min(zo, key=lambda r: r["ms"])
            out["zokern ZOSGD (fastest)"].append((best["params"], best["ms"], best["peak_gib"], best["method"]))
    return {k: sorted(v) for k, v in out.items() if v}


def plot(data: dict[str, list], out: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    has_memory = any(p[2] is not None for points in data.values() for p in points)
    fig, axes = plt.subplots(1, 2 if has_memory else 1, figsize=(11 if has_memory else 6, 4.2), squeeze=False)
    time_ax = axes[0][0]
    for name, points in data.items():
        time_ax.plot([p[0] / 1e6 for p in points], [p[1] for p in points], marker="o", label=name)
        if name.startswith("zokern"):  # which backend and mode was the fastest, point by point
            for p in points:
                time_ax.annotate(p[3].removeprefix("zokern "), (p[0] / 1e6, p[1]), fontsize=7,
                                 textcoords="offset points", xytext=(4, -10))  # fmt: skip
    time_ax.set(xscale="log", yscale="log", xlabel="parameters (millions)", ylabel="ms per step", title=title)
    time_ax.grid(True, which="both", alpha=0.3)
    time_ax.legend()
    if has_memory:
        mem_ax = axes[0][1]
        for name, points in data.items():
            pts = [(p[0] / 1e6, p[2]) for p in points if p[2] is not None]
            mem_ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
        mem_ax.set(xscale="log", xlabel="parameters (millions)", ylabel="peak memory (GiB)", title="peak memory")
        mem_ax.grid(True, which="both", alpha=0.3)
        mem_ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="cuda or cpu rows")
    parser.add_argument("--data", type=Path, default=HERE / "step_results.jsonl")
    parser.add_argument("--batch", type=int, default=1, help="the rows of this batch size (default 1)")
    parser.add_argument("--seq", type=int, default=256, help="and this sequence length (default 256)")
    parser.add_argument("--family", default="opt", help="model names starting with this (default opt)")
    parser.add_argument("--dtype", default="bfloat16", help="the rows of this parameter dtype (default bfloat16)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    latest = load(args.data, args.device, args.batch, args.seq, args.family, args.dtype)
    shape = f"{args.family}*, batch {args.batch} x {args.seq}, {args.dtype}"
    if not latest:
        print(f"no {args.device} rows of {shape} in {args.data}: run python -m benchmarks.step first", file=sys.stderr)
        return 1
    out = args.out or HERE / f"step_vs_size_{args.device}.png"
    plot(series(latest), out, f"ZO step vs model size ({args.device}, {shape})")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
