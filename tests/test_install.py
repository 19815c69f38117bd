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
