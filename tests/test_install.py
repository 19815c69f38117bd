"""The package degrades, never breaks: without the C++ extension it imports, says why, and runs on torch."""

import os
import subprocess
import sys
import textwrap


def test_imports_and_runs_without_the_extension():
    script = textwrap.dedent(
        """
        import sys
        sys.modules["zokern._C"] = None  # makes `import zokern._C` fail, as a failed build would
        import torch, zokern
        status = zokern.backend_status()
        assert "cpu" not in zokern.available_backends() and "torch" in zokern.available_backends(), status
        assert "extension not loaded" in status["cpu"], status["cpu"]
        t = torch.ones(10)
        zokern.perturb_(t, 1, 0.5)
        assert torch.equal(t, 1 + 0.5 * zokern.gaussian(1, 0, 10, backend="torch"))
        print("ok")
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "ZOKERN_BACKEND"}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_triton_sources_install_inside_the_zokern_namespace():
    import importlib.metadata

    import zokern.kernels

    assert zokern.kernels.__name__ == "zokern.kernels"
    # The top-level import name `kernels` belongs to another PyPI project: the zokern distribution must not own it.
    owners = importlib.metadata.packages_distributions()
    assert "zokern" in owners.get("zokern", [])
    assert "zokern" not in owners.get("kernels", [])


def test_wheel_ships_every_subpackage_and_no_top_level_kernels(tmp_path):
    import shutil
    import zipfile
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    source = tmp_path / "src"
    shutil.copytree(root, source, ignore=shutil.ignore_patterns(".git", "build", "*.so", "__pycache__", "*.egg-info"))
    env = dict(os.environ, ZOKERN_SKIP_BUILD="1")
    out = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(tmp_path), "."],
        cwd=source,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    (wheel,) = tmp_path.glob("zokern-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for module in (
        "zokern/ops.py",
        "zokern/optim/base.py",
        "zokern/integrations/transformers.py",
        "zokern/kernels/zo_pass.py",
    ):
        assert module in names, module
    assert not any(name.startswith("kernels/") for name in names)
