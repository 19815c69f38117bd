"""Count-sketches: faithful cosines and norms within the sketch's theory, linearity, the name-keyed hash, and the
viz command on recorded sketches."""

from __future__ import annotations

import json
import math

import pytest
import torch

from zokern.optim import ZOSGD
from zokern.preference.sketch import SketchRecorder
from zokern.preference.sketch import cosine
from zokern.preference.sketch import sketch_named
from zokern.preference.sketch import sketch_tensor


def _rms(values: list[float]) -> float:
    return math.sqrt(sum(v * v for v in values) / len(values))


def test_cosines_and_norms_match_the_exact_values_within_the_theory_and_improve_with_k():
    """For unit vectors the sketched inner product has variance <= 2/k: over 40 pairs, the RMS errors of the cosine
    and of the squared-norm ratio stay within that, and shrink like 1/sqrt(k)."""
    g = torch.Generator().manual_seed(0)
    rms = {}
    for k in (64, 1024):
        cos_err, norm_err = [], []
        for trial in range(40):
            u = torch.randn(20_000, generator=g, dtype=torch.float64)
            v = 0.6 * u + torch.randn(20_000, generator=g, dtype=torch.float64)
            su, sv = (sketch_named([("w", x)], k, seed=trial) for x in (u, v))
            cos_err.append(cosine(su, sv) - cosine(u, v))
            norm_err.append(float(su.square().sum() / u.square().sum()) - 1.0)
        bound = math.sqrt(2.0 / k)
        rms[k] = (_rms(cos_err), _rms(norm_err))
        assert rms[k][0] <= 1.3 * bound and rms[k][1] <= 1.3 * bound, (k, rms[k], bound)
    assert rms[1024][0] < rms[64][0] / 2.5 and rms[1024][1] < rms[64][1] / 2.5


def test_real_update_pairs_keep_their_angles():
    """Updates of a ZO run and of a first-order run of the same small network: their exact float64 cosines against
    the sketched ones, within 4 sqrt(2/k) for every pair and sketch seed."""
    torch.manual_seed(0)
    inputs, targets = torch.randn(64, 32), torch.randn(64, 1)

    def model():
        torch.manual_seed(1)
        return torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.Tanh(), torch.nn.Linear(64, 1))

    def flat(m):
        return {n: p.detach().double().clone() for n, p in m.named_parameters()}

    zo, fo = model(), model()
    start = flat(zo)
    opt = ZOSGD(zo.parameters(), lr=1e-2, eps=1e-3, seed=0)
    snapshots = [start]
    for _ in range(2):
        for _ in range(20):
            opt.step(lambda: torch.nn.functional.mse_loss(zo(inputs), targets))
        snapshots.append(flat(zo))
    adam = torch.optim.Adam(fo.parameters(), lr=1e-2)
    for _ in range(20):
        adam.zero_grad()
        torch.nn.functional.mse_loss(fo(inputs), targets).backward()
        adam.step()
    updates = [{n: b[n] - a[n] for n in a} for a, b in zip(snapshots, snapshots[1:])]
    updates.append({n: p - start[n] for n, p in flat(fo).items()})
    k = 512
    for i, j in ((0, 1), (0, 2), (1, 2)):
        exact = cosine(*(torch.cat([u[n].reshape(-1) for n in sorted(u)]) for u in (updates[i], updates[j])))
        for seed in range(3):
            sketched = cosine(*(sketch_named(sorted(u.items()), k, seed) for u in (updates[i], updates[j])))
            assert abs(sketched - exact) <= 4 * math.sqrt(2 / k), (i, j, seed, sketched, exact)


def test_the_map_is_linear_and_keyed_by_name_and_index():
    g = torch.Generator().manual_seed(3)
    a, b = torch.randn(3, 1000, generator=g), torch.randn(3, 1000, generator=g)
    k = 128
    assert torch.allclose(sketch_tensor(a, "w", k) - sketch_tensor(b, "w", k), sketch_tensor(a - b, "w", k))
    # Same name and shape in two models: the same map (cross-model cosines are meaningful); another name: another.
    assert torch.equal(sketch_tensor(a.clone(), "layer.weight", k), sketch_tensor(a, "layer.weight", k))
    assert not torch.allclose(sketch_tensor(a, "layer.weight", k), sketch_tensor(a, "other.weight", k))
    together = sketch_named([("x", a), ("y", b)], k)
    assert torch.allclose(together, sketch_tensor(a, "x", k) + sketch_tensor(b, "y", k))
    with pytest.raises(ValueError, match="k must be a positive integer"):
        sketch_tensor(a, "w", 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_the_fused_cpu_kernel_matches_the_torch_path(dtype):
    from zokern import _native

    if not _native.cpu_available():
        pytest.skip(f"zokern._C is not built: {_native.LOAD_ERROR}")
    g = torch.Generator().manual_seed(1)
    for n in (1, 3, 5, 1025, 70_001):
        t = torch.randn(n, generator=g).to(dtype)
        fused = sketch_tensor(t, "block.0.weight", 37, seed=3)
        reference = sketch_tensor(t, "block.0.weight", 37, seed=3, backend="torch")
        assert torch.allclose(fused, reference, rtol=1e-12, atol=1e-9), n


def _write_run(path, iterations=6, k=64):
    """A synthetic run: the reward model moves along a fixed direction, the policy along a rotating one."""
    g = torch.Generator().manual_seed(0)
    recorder = SketchRecorder(path, k=k)
    policy, reward = torch.randn(400, generator=g), torch.randn(400, generator=g)
    drift = torch.randn(400, generator=g)
    for i in range(iterations + 1):
        recorder.record("zopro", "policy", [("w", policy)], i, 10 * i, gamma=0.5 * (1 - i / iterations))
        recorder.record("zopro", "reward", [("w", reward)], i, 10 * i, gamma=0.5 * (1 - i / iterations))
        policy = policy + 0.1 * torch.randn(400, generator=g)
        reward = reward + 0.1 * drift


def test_viz_writes_plots_a_page_and_statistics(tmp_path):
    from zokern.preference.viz import interplay
    from zokern.preference.viz import load
    from zokern.preference.viz import make_plots

    _write_run(tmp_path / "sketches.jsonl")
    rows = interplay(load(tmp_path)["zopro"])
    assert [r["iteration"] for r in rows] == list(range(1, 7))
    assert all(0 <= r["policy_reward_angle"] <= 180 and r["reward_update_norm"] > 0 for r in rows)
    assert math.isnan(rows[0]["persistence_angle"]) and not math.isnan(rows[1]["persistence_angle"])
    page = make_plots(tmp_path)
    text = page.read_text()
    for name in ("zopro_trajectories.png", "zopro_interplay.png"):
        assert (tmp_path / "viz" / name).read_bytes().startswith(b"\x89PNG") and name in text
    summary = json.loads((tmp_path / "viz" / "summary.json").read_text())["zopro"]
    assert summary["iterations"] == 6 and 0 <= summary["within_10_of_90"] <= 1


def test_interplay_pairs_updates_by_iteration_around_a_left_out_sketch(tmp_path):
    """A non-finite sketch is left out of the run: the updates next to it are not formed across the gap, and every
    later update pairs the policy's and the reward model's own iteration (by position, they paired i with i + 1)."""
    from zokern.preference.viz import interplay
    from zokern.preference.viz import load

    _write_run(tmp_path / "sketches.jsonl")
    lines = (tmp_path / "sketches.jsonl").read_text().splitlines()
    broken = json.loads(lines[2 * 3])  # the policy at iteration 3
    assert (broken["model"], broken["iteration"]) == ("policy", 3)
    broken["sketch"][0] = math.inf
    lines[2 * 3] = json.dumps(broken)
    (tmp_path / "sketches.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.warns(UserWarning, match="not finite"):
        models = load(tmp_path)["zopro"]
    rows = interplay(models)
    assert [r["iteration"] for r in rows] == [1, 2, 5, 6]
    policy = {p["iteration"]: p["sketch"] for p in models["policy"]}
    reward = {p["iteration"]: p["sketch"] for p in models["reward"]}
    for row in rows:
        i = row["iteration"]
        assert row["policy_update_norm"] == pytest.approx(float((policy[i] - policy[i - 1]).norm()))
        assert row["reward_update_norm"] == pytest.approx(float((reward[i] - reward[i - 1]).norm()))
    assert [math.isnan(r["persistence_angle"]) for r in rows] == [True, False, True, False]


def test_the_summary_of_a_single_iteration_is_strict_json():
    import json
    import math

    from zokern.preference.viz import summary

    stats = summary([dict(policy_reward_angle=88.0, persistence_angle=math.nan)], k=512)
    assert "median_persistence" not in stats  # no pair of consecutive updates yet
    json.dumps(stats, allow_nan=False)


def test_viz_command_reports_a_missing_or_broken_run(tmp_path, capsys):
    from zokern.cli import main

    assert main(["viz", str(tmp_path)]) == 2
    assert "sketches.jsonl not found" in capsys.readouterr().err
    (tmp_path / "sketches.jsonl").write_text('{"method": "zopro"}\n')
    assert main(["viz", str(tmp_path)]) == 2
    assert "line 1: not a sketch record" in capsys.readouterr().err
    (tmp_path / "sketches.jsonl").unlink()
    _write_run(tmp_path / "sketches.jsonl")
    assert main(["viz", str(tmp_path), "--out", str(tmp_path / "plots")]) == 0
    assert (tmp_path / "plots" / "index.html").exists()


def test_viz_adds_a_tsne_view_when_scikit_learn_is_installed(tmp_path, monkeypatch):
    """The t-SNE path with a stand-in for scikit-learn's TSNE (not a dependency): it receives the policy's sketches
    and its 2-D output is drawn and linked from the page."""
    import sys
    import types

    seen = {}

    class TSNE:
        def __init__(self, **kwargs):
            seen["kwargs"] = kwargs

        def fit_transform(self, x):
            seen["shape"] = x.shape
            return x[:, :2]

    manifold = types.ModuleType("sklearn.manifold")
    manifold.TSNE = TSNE
    monkeypatch.setitem(sys.modules, "sklearn", types.ModuleType("sklearn"))
    monkeypatch.setitem(sys.modules, "sklearn.manifold", manifold)
    from zokern.preference.viz import make_plots

    _write_run(tmp_path / "sketches.jsonl", iterations=6, k=64)
    page = make_plots(tmp_path)
    assert seen["shape"] == (7, 64) and seen["kwargs"]["n_components"] == 2
    assert (tmp_path / "viz" / "zopro_tsne.png").read_bytes().startswith(b"\x89PNG")
    assert "zopro_tsne.png" in page.read_text()
