"""`zokern viz RUN_DIR`: the policy–reward interplay of a run, from the sketches its loop recorded (sketches.jsonl).

Per method, with P_i and R_i the sketches after iteration i (i = 0: the start), the updates are p_i = P_i - P_{i-1}
and r_i = R_i - R_{i-1} (S is linear). Statistics per iteration: the angle between p_i and the concurrent r_i,
the angle between consecutive policy updates p_{i-1}, p_i (persistence), the norms of p_i and r_i, and ZOPrO's gamma.
Plots (PNG) and an HTML page that shows them are written to RUN_DIR/viz (or --out). Trajectories are drawn in 2-D by
PCA of the sketches; t-SNE is added when scikit-learn is installed. Angles come from the sketches, so they carry the
sketch's error: a cosine's standard deviation is at most sqrt(2/k) (zokern.preference.sketch).
"""

from __future__ import annotations

import argparse
import html
import json
import math
import statistics
import warnings
from pathlib import Path

import torch

from zokern import _options as options
from zokern._options import check_output_dir
from zokern.preference.sketch import cosine

FIELDS = ("method", "model", "iteration", "step", "gamma", "k", "sketch")  # what the plots read of a record


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _plain_name(method) -> bool:
    return isinstance(method, str) and method.replace("_", "").replace("-", "").isalnum()


def _check_record(point) -> None:
    """ValueError naming what makes a line not a recorder's record (a file edited by hand, or another program's)."""
    if not isinstance(point, dict):
        raise ValueError(f"a JSON {type(point).__name__}, not an object")
    missing = [f for f in FIELDS if f not in point]
    if missing:
        raise ValueError(f"no {', '.join(map(repr, missing))}")
    for field in ("method", "model"):
        if not isinstance(point[field], str):
            raise ValueError(f"{field} {point[field]!r} is not a string")
    if not _plain_name(point["method"]):  # it names the plot files
        raise ValueError(f"method {point['method']!r} is not a plain name (letters, digits, '_' and '-')")
    for field in ("iteration", "step"):
        if not _is_int(point[field]) or point[field] < 0:
            raise ValueError(f"{field} {point[field]!r} is not a non-negative integer")
    gamma = point["gamma"]
    if gamma is not None and (isinstance(gamma, bool) or not isinstance(gamma, (int, float))):
        raise ValueError(f"gamma {gamma!r} is neither a number nor null")
    sketch, k = point["sketch"], point["k"]
    if not _is_int(k) or k < 1:
        raise ValueError(f"k {k!r} is not a positive integer")
    if not isinstance(sketch, list) or any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in sketch):
        raise ValueError("sketch is not a list of numbers")
    if len(sketch) != k:
        raise ValueError(f"sketch has {len(sketch)} values where k is {k}")
    if "seed" in point and not _is_int(point["seed"]):
        raise ValueError(f"seed {point['seed']!r} is not an integer")


def load(run_dir: Path) -> dict[str, dict[str, list[dict]]]:
    """method -> model ("policy", "reward") -> the recorded points in iteration order. ValueError, naming the file
    and line, for a record without one of FIELDS; for a file with no records; for a method with no policy points."""
    path = Path(run_dir) / "sketches.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: run the loop with a SketchRecorder (zokern demo writes one)")
    runs: dict[str, dict[str, list[dict]]] = {}
    data = path.read_bytes()
    lines = data.split(b"\n")
    nonfinite: dict[str, int] = {}
    for number, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        try:
            point = json.loads(raw.decode("utf-8"))
            _check_record(point)
            point["sketch"] = torch.tensor(point["sketch"], dtype=torch.float64)
        except (json.JSONDecodeError, UnicodeDecodeError, ValueError, TypeError, AttributeError) as e:
            if number == len(lines):  # the last line, cut off (no newline after it): a run stopped while writing
                warnings.warn(f"{path}, line {number}: an incomplete last record, left out", UserWarning, stacklevel=2)
                continue
            raise ValueError(f"{path}, line {number}: not a sketch record ({e})") from None
        if not torch.isfinite(point["sketch"]).all():  # a run that diverged: its points have no place in a plot
            nonfinite[point["method"]] = nonfinite.get(point["method"], 0) + 1
            continue
        runs.setdefault(point["method"], {}).setdefault(point["model"], []).append(point)
    for method, count in nonfinite.items():
        warnings.warn(f"{path}: {count} sketch(es) of {method!r} are not finite (the run diverged?), left out",
                      UserWarning, stacklevel=2)  # fmt: skip
    if not runs:
        raise ValueError(f"{path} holds no sketch records (the run recorded none, or failed before its first)")
    for method, models in runs.items():
        if not models.get("policy"):
            raise ValueError(f"{path}: method {method!r} has no policy sketches (models recorded: {sorted(models)})")
        # Sketches compare only under one hashing (size k and seed): a file appended to by runs that differ in them.
        kinds = {(p["k"], p.get("seed")) for points in models.values() for p in points}
        if len(kinds) > 1:
            described = ", ".join(f"k={k}, seed {seed}" for k, seed in sorted(kinds, key=str))
            raise ValueError(
                f"{path}: method {method!r} has sketches of different kinds ({described}), which do not compare: "
                "keep one run's records per file"
            )
        for model, points in models.items():
            points.sort(key=lambda p: p["iteration"])
            repeated = sorted({a["iteration"] for a, b in zip(points, points[1:]) if a["iteration"] == b["iteration"]})
            if repeated:  # two runs appended to one file: their updates would be taken between the runs
                raise ValueError(
                    f"{path}: method {method!r} has more than one {model} sketch at iteration(s) {repeated}: "
                    "keep one run's records per file"
                )
    return runs


def _angle(a: torch.Tensor, b: torch.Tensor) -> float:
    c = cosine(a, b)
    return math.nan if math.isnan(c) else math.degrees(math.acos(max(-1.0, min(1.0, c))))


def interplay(models: dict[str, list[dict]]) -> list[dict]:
    """One row per iteration i >= 1: angles (degrees), update norms (sketched) and gamma."""
    # By iteration number, not position: an iteration whose sketch was left out (not finite) has no update, and
    # neither has the one after it.
    policy = {p["iteration"]: p for p in models.get("policy", [])}
    reward = {p["iteration"]: p for p in models.get("reward", [])}
    rows = []
    for i in sorted(policy):
        if not {i - 1, i} <= policy.keys() & reward.keys():
            continue
        p = policy[i]["sketch"] - policy[i - 1]["sketch"]
        r = reward[i]["sketch"] - reward[i - 1]["sketch"]
        previous = policy[i - 1]["sketch"] - policy[i - 2]["sketch"] if i - 2 in policy else None
        rows.append(
            dict(
                iteration=i,
                step=policy[i]["step"],
                gamma=policy[i]["gamma"],
                policy_reward_angle=_angle(p, r),
                persistence_angle=math.nan if previous is None else _angle(previous, p),
                policy_update_norm=float(p.norm()),
                reward_update_norm=float(r.norm()),
            )
        )
    return rows


_SUMMARY_KEYS = {"iterations", "median_angle", "min_angle", "max_angle", "within_10_of_90", "median_persistence",
                 "sketch_noise_degrees"}  # fmt: skip


def summary(rows: list[dict], k: int) -> dict[str, float]:
    """Median and spread of the policy–reward angles; the share within 10 degrees of orthogonal; the sketch's own
    spread of angles around 90 degrees (one standard deviation of the cosine, sqrt(1/k))."""
    angles = [r["policy_reward_angle"] for r in rows if not math.isnan(r["policy_reward_angle"])]
    persistence = [r["persistence_angle"] for r in rows if not math.isnan(r["persistence_angle"])]
    if not angles:
        return {}
    out = dict(
        iterations=len(angles),
        median_angle=statistics.median(angles),
        min_angle=min(angles),
        max_angle=max(angles),
        within_10_of_90=sum(80 <= a <= 100 for a in angles) / len(angles),
    )
    if persistence:  # none with a single iteration: left out, not NaN (which strict JSON has no word for)
        out["median_persistence"] = statistics.median(persistence)
    out["sketch_noise_degrees"] = math.degrees(math.asin(min(1.0, math.sqrt(1.0 / k))))
    return out


def _pca_2d(sketches: torch.Tensor) -> torch.Tensor:
    centred = sketches - sketches.mean(0, keepdim=True)
    if sketches.shape[0] < 2:
        return torch.zeros(sketches.shape[0], 2, dtype=torch.float64)
    _, _, v = torch.linalg.svd(centred, full_matrices=False)
    basis = v[:2].T if v.shape[0] >= 2 else torch.cat((v.T, torch.zeros_like(v.T)), dim=1)
    return centred @ basis


PLOT_KINDS = ("trajectories", "tsne", "interplay")  # each method's plots: f"{method}_{kind}.png"


def _plot_names(method: str) -> list[str]:
    return [f"{method}_{kind}.png" for kind in PLOT_KINDS]


def _page_files(out: Path) -> list[str] | None:
    """The files of the page make_plots wrote in ``out`` (index.html, summary.json and its methods' plots, from
    summary.json's methods); None where ``out`` holds no such page."""
    try:
        summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    ours = isinstance(summary, dict) and all(
        _plain_name(m) and isinstance(v, dict) and v.keys() <= _SUMMARY_KEYS for m, v in summary.items()
    )
    return ["index.html", "summary.json", *(n for m in summary for n in _plot_names(m))] if ours else None


def check_replaceable_page(out: Path, methods: list[str] = ()) -> None:
    """Before a page is written in ``out``: refuse a page (index.html, summary.json), or plots of ``methods``, that
    no earlier page of zokern viz wrote there (the user's own, which the page would replace)."""
    if not out.exists():
        return
    if not out.is_dir():
        raise ValueError(f"{out} is not a directory: the page goes there")
    ours = _page_files(out) or []
    theirs = [n for n in ("index.html", "summary.json", *(n for m in methods for n in _plot_names(m))) if n not in ours]
    clash = [n for n in theirs if (out / n).exists()]
    if clash:
        raise ValueError(
            f"{out} holds {', '.join(clash)}, which no earlier zokern viz page wrote: the page would replace them. "
            "Choose another --out"
        )


def clear_plots(out: Path) -> None:
    """Remove the earlier page make_plots wrote in ``out`` (and nothing else): a page must not show, or link past,
    plots of another run."""
    for name in _page_files(Path(out)) or []:
        (Path(out) / name).unlink(missing_ok=True)


def make_plots(run_dir: Path, out: Path | None = None) -> Path:
    """Write the PNG plots and index.html for every method of the run (those of an earlier run's other methods
    removed); returns the page's path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = load(run_dir)
    out = Path(out) if out is not None else Path(run_dir) / "viz"
    check_replaceable_page(out, list(runs))
    out.mkdir(parents=True, exist_ok=True)
    clear_plots(out)
    sections = []
    for method, models in runs.items():
        rows = interplay(models)
        k = models["policy"][0]["k"]
        images = []

        fig, axes = plt.subplots(1, 2, figsize=(10, 4.2))
        for ax, model in zip(axes, ("policy", "reward")):
            points = models.get(model, [])
            if points:
                xy = _pca_2d(torch.stack([p["sketch"] for p in points]))
                ax.plot(xy[:, 0], xy[:, 1], "-", color="0.7", zorder=1)
                scatter = ax.scatter(xy[:, 0], xy[:, 1], c=[p["iteration"] for p in points], cmap="viridis", zorder=2)
                fig.colorbar(scatter, ax=ax, label="iteration")
            ax.set(title=f"{model} trajectory (PCA of sketches)", xlabel="PC 1", ylabel="PC 2")
        fig.tight_layout()
        images.append(_save(fig, out / f"{method}_trajectories.png", plt))
        images += _tsne(models, out / f"{method}_tsne.png", plt)

        if rows:
            its = [r["iteration"] for r in rows]
            fig, axes = plt.subplots(2, 2, figsize=(11, 7))
            ax = axes[0][0]
            ax.plot(its, [r["policy_reward_angle"] for r in rows], ".-")
            ax.axhline(90, color="0.5", lw=0.8)
            ax.set(title="angle(policy update, reward-model update)", xlabel="iteration", ylabel="degrees")
            ax = axes[0][1]
            ax.plot(its, [r["persistence_angle"] for r in rows], ".-", color="C1")
            ax.axhline(90, color="0.5", lw=0.8)
            ax.set(title="angle(consecutive policy updates)", xlabel="iteration", ylabel="degrees")
            ax = axes[1][0]
            ax.semilogy(its, [r["policy_update_norm"] for r in rows], ".-", label="policy")
            ax.semilogy(its, [r["reward_update_norm"] for r in rows], ".-", label="reward model (shared tensors)")
            ax.set(title="update norms (sketched)", xlabel="iteration")
            ax.legend()
            ax = axes[1][1]
            angles = [r["policy_reward_angle"] for r in rows if not math.isnan(r["policy_reward_angle"])]
            low = max(0, math.floor(min(angles, default=90)) - 5)
            high = min(180, math.ceil(max(angles, default=90)) + 5)
            ax.hist(angles, bins=max(1, high - low), range=(low, high), color="C2")  # 1-degree bins
            ax.axvline(90, color="0.5", lw=0.8)
            if any(r["gamma"] is not None for r in rows):
                twin = ax.inset_axes([0.62, 0.6, 0.35, 0.35])
                twin.plot(its, [r["gamma"] or 0.0 for r in rows], color="C3")
                twin.set_title("ZOPrO gamma", fontsize=8)
                twin.tick_params(labelsize=7)
            ax.set(title="policy–reward angles", xlabel="degrees", ylabel="iterations")
            fig.tight_layout()
            images.append(_save(fig, out / f"{method}_interplay.png", plt))
        sections.append((method, summary(rows, k), images))
    page = out / "index.html"
    page.write_text(_html(Path(run_dir), sections))
    (out / "summary.json").write_text(json.dumps({m: s for m, s, _ in sections}, indent=1, allow_nan=False))
    return page


def _save(fig, path: Path, plt) -> str:
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path.name


def _tsne(models, path: Path, plt) -> list[str]:
    try:
        from sklearn.manifold import TSNE
    except ImportError:
        return []
    points = models.get("policy", [])
    if len(points) < 5:
        return []
    xy = TSNE(n_components=2, perplexity=min(5, len(points) - 1), init="pca", random_state=0).fit_transform(
        torch.stack([p["sketch"] for p in points]).numpy()
    )
    fig, ax = plt.subplots(figsize=(5, 4.2))
    ax.scatter(xy[:, 0], xy[:, 1], c=[p["iteration"] for p in points], cmap="viridis")
    ax.set(title="policy trajectory (t-SNE of sketches; distances, not angles)")
    return [_save(fig, path, plt)]


def _html(run_dir: Path, sections) -> str:
    parts = [
        "<!doctype html><meta charset='utf-8'><title>zokern viz</title>",
        "<style>body{font-family:sans-serif;max-width:1150px;margin:auto}td,th{padding:2px 8px}</style>",
        f"<h1>Policy–reward interplay: {html.escape(str(run_dir))}</h1>",
    ]
    for method, stats, images in sections:
        parts.append(f"<h2>{html.escape(method)}</h2><table>")
        parts += [f"<tr><th align=left>{html.escape(k)}</th><td>{v:.3g}</td></tr>" for k, v in stats.items()]
        parts.append("</table>")
        parts += [f"<p><img src='{html.escape(name)}' style='max-width:100%'></p>" for name in images]
    return "\n".join(parts) + "\n"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "run_dir", type=options.path, help="a run directory holding sketches.jsonl (e.g. zokern demo --out)"
    )
    parser.add_argument("--out", type=options.output_dir, default=None, help="output directory (default RUN_DIR/viz)")


def run_command(args: argparse.Namespace) -> int:
    """The command's work; its ValueError and FileNotFoundError are reported by zokern.cli as one line."""
    out = Path(args.out) if args.out is not None else Path(args.run_dir) / "viz"
    check_output_dir(out)
    page = make_plots(args.run_dir, out)
    print(f"wrote {page}")
    return 0
